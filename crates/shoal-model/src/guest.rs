//! What an operator gives a VM's guest beyond its template: a login user, SSH keys and cloud-init
//! user data; and how Shoal learns the guest is ready. Every rule about them is checked here, once,
//! for the CLI and the controller alike, before anything is created.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// How Shoal learns that a VM's guest is up and configured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// The guest reports through what Shoal puts in its seed: a `shoal-guest: ready` line on its
    /// serial console once configuration succeeded, `shoal-guest: failed: REASON` when it did
    /// not. Cloud-init images (through the seed's user data) and the demo guest report.
    Report,
    /// The guest prints this text on its serial console (images that do not report); a failure
    /// report still fails the VM.
    Pattern(String),
    /// A running QEMU counts as ready: Shoal cannot tell how the guest is doing.
    #[default]
    Running,
}

impl Readiness {
    /// Reads what records written before readiness had a kind hold: `ready_pattern`, a text or
    /// null. Use with `#[serde(alias = "ready_pattern", deserialize_with = ...)]`.
    pub fn compat<'de, D: Deserializer<'de>>(d: D) -> Result<Readiness, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Now(Readiness),
            Before(Option<String>),
        }
        Ok(match Either::deserialize(d)? {
            Either::Now(r) => r,
            Either::Before(Some(p)) => Readiness::Pattern(p),
            Either::Before(None) => Readiness::Running,
        })
    }
}

/// The console line prefix a reporting guest prints when configuration succeeded.
pub const GUEST_READY: &str = "shoal-guest: ready";
/// The console line prefix a reporting guest prints when configuration failed, then the reason.
pub const GUEST_FAILED: &str = "shoal-guest: failed: ";

/// The most user data Shoal takes from one source (a profile or a cluster), as OpenStack Nova
/// (64 KiB). The seed holds it with Shoal's own settings.
pub const MAX_USER_DATA: usize = 64 << 10;

/// The first lines cloud-init recognises a user-data part by, besides MIME multipart.
const USER_DATA_HEADERS: &[&str] = &[
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "#cloud-config-archive",
    "#cloud-config-jsonp",
    "## template: jinja",
    "Content-Type: multipart/",
    "MIME-Version:",
];

/// Why user data, a user name or an SSH key cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    #[error("user data of {size} bytes is over the limit of {MAX_USER_DATA} bytes (64 KiB, as OpenStack Nova)")]
    UserDataTooLarge { size: usize },
    #[error(
        "user data starting {start:?} is not a format cloud-init reads: it must begin with \
         #cloud-config, #! (a script), #include, #cloud-boothook or be MIME multipart"
    )]
    UserDataFormat { start: String },
    #[error("user data is #cloud-config but not valid YAML: {reason}")]
    CloudConfigYaml { reason: String },
    #[error("user data is #cloud-config but its YAML is a {found}, not a mapping of settings")]
    CloudConfigShape { found: &'static str },
    #[error(
        "invalid user name {name:?}: a login name is 1 to 32 of a-z, 0-9, '_' and '-', starting \
         with a letter or '_' (and not root)"
    )]
    UserName { name: String },
    #[error("invalid SSH public key {key:?}: {reason}")]
    SshKey { key: String, reason: String },
}

/// Checks user data an operator gave: size, a format cloud-init reads, and for `#cloud-config`
/// that it parses as a YAML mapping. Scripts and other formats are passed through as they are.
pub fn check_user_data(data: &str) -> Result<(), GuestError> {
    if data.len() > MAX_USER_DATA {
        return Err(GuestError::UserDataTooLarge { size: data.len() });
    }
    if !USER_DATA_HEADERS.iter().any(|h| data.starts_with(h)) {
        let start: String = data.chars().take(30).collect();
        return Err(GuestError::UserDataFormat { start });
    }
    if is_cloud_config(data) {
        let value: serde_yaml::Value =
            serde_yaml::from_str(data).map_err(|e| GuestError::CloudConfigYaml { reason: e.to_string() })?;
        let found = match value {
            serde_yaml::Value::Mapping(_) | serde_yaml::Value::Null => return Ok(()),
            serde_yaml::Value::Bool(_) => "boolean",
            serde_yaml::Value::Number(_) => "number",
            serde_yaml::Value::String(_) => "string",
            serde_yaml::Value::Sequence(_) => "list",
            serde_yaml::Value::Tagged(_) => "tagged value",
        };
        return Err(GuestError::CloudConfigShape { found });
    }
    Ok(())
}

/// Checks everything an operator gives a guest (on a profile or a cluster), naming the first bad
/// value.
pub fn check_guest_settings(
    user_data: Option<&str>,
    user: Option<&str>,
    ssh_keys: &[String],
) -> Result<(), GuestError> {
    if let Some(d) = user_data {
        check_user_data(d)?;
    }
    if let Some(u) = user {
        check_user_name(u)?;
    }
    for k in ssh_keys {
        check_ssh_key(k)?;
    }
    Ok(())
}

/// Whether user data is a `#cloud-config` document (its first line).
pub fn is_cloud_config(data: &str) -> bool {
    data.lines().next().map(str::trim_end) == Some("#cloud-config")
}

/// Checks a login name for the guest's user.
pub fn check_user_name(name: &str) -> Result<(), GuestError> {
    let bad = || GuestError::UserName { name: name.to_string() };
    let mut chars = name.chars();
    let first = chars.next().ok_or_else(bad)?;
    let ok = name.len() <= 32
        && (first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name != "root";
    ok.then_some(()).ok_or_else(bad)
}

/// SSH public key types OpenSSH accepts in `authorized_keys`.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// Whether `text` looks like a public key line rather than a file name.
pub fn looks_like_ssh_key(text: &str) -> bool {
    SSH_KEY_TYPES
        .iter()
        .any(|t| text.trim_start().starts_with(&format!("{t} ")))
}

/// Checks one OpenSSH public key line (`TYPE BASE64 [COMMENT]`) and returns it trimmed: the type
/// must be one OpenSSH knows and the base64 blob must decode to a key of that type.
pub fn check_ssh_key(line: &str) -> Result<String, GuestError> {
    let key = line.trim();
    let shown: String = key.chars().take(60).collect();
    let bad = |reason: &str| GuestError::SshKey {
        key: shown.clone(),
        reason: reason.to_string(),
    };
    if key.contains(['\n', '\r']) {
        return Err(bad("a key is one line"));
    }
    let mut fields = key.split_whitespace();
    let kind = fields.next().ok_or_else(|| bad("empty"))?;
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(bad(&format!(
            "unknown key type {kind:?} (a public key line starts with ssh-ed25519, ssh-rsa, ecdsa-sha2-…)"
        )));
    }
    let blob = fields.next().ok_or_else(|| bad("no key data after the type"))?;
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| bad("the key data is not base64"))?;
    // The blob starts with the key type again, as a 4-byte big-endian length and the name.
    let inner = bytes
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|n| bytes.get(4..4 + n));
    if inner != Some(kind.as_bytes()) {
        return Err(bad(&format!("the key data is not a {kind} key")));
    }
    Ok(key.to_string())
}

/// The keys in an `authorized_keys`-style text: one per line, blank lines and `#` comments
/// skipped. Every key is checked; there must be at least one.
pub fn parse_ssh_keys(text: &str) -> Result<Vec<String>, GuestError> {
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(check_ssh_key)
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(GuestError::SshKey {
            key: String::new(),
            reason: "no key in it (one public key per line)".into(),
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK5l test@example";

    #[test]
    fn ssh_keys_are_checked_down_to_the_type_inside_the_blob() {
        assert_eq!(check_ssh_key(&format!("  {KEY}\n")).unwrap(), KEY);
        for (bad, why) in [
            ("", "empty"),
            ("ssh-foo AAAA", "unknown key type"),
            ("ssh-ed25519", "no key data"),
            ("ssh-ed25519 !!!notbase64", "not base64"),
            // A valid blob of another type.
            (
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK5l",
                "not a ssh-rsa key",
            ),
        ] {
            let e = check_ssh_key(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(looks_like_ssh_key(KEY) && !looks_like_ssh_key("/root/.ssh/id_ed25519.pub"));
        let keys = parse_ssh_keys(&format!("# mine\n\n{KEY}\n{KEY} other\n")).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(parse_ssh_keys("# nothing\n").is_err());
    }

    #[test]
    fn user_names_follow_the_login_name_rule() {
        for ok in ["shoal", "_svc", "a-b_9", &"x".repeat(32)] {
            check_user_name(ok).unwrap();
        }
        for bad in ["", "root", "Alice", "9lives", "a b", "a:b", &"x".repeat(33)] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn user_data_must_be_a_format_cloud_init_reads_and_cloud_config_must_be_a_mapping() {
        check_user_data("#cloud-config\nruncmd: [[touch, /x]]\n").unwrap();
        check_user_data("#cloud-config\n").unwrap();
        check_user_data("#!/bin/sh\necho hi\n").unwrap();
        check_user_data("Content-Type: multipart/mixed; boundary=x\n\n--x--\n").unwrap();
        let e = check_user_data("runcmd: [ls]\n").unwrap_err();
        assert!(
            matches!(e, GuestError::UserDataFormat { .. }) && e.to_string().contains("runcmd"),
            "{e}"
        );
        let e = check_user_data("#cloud-config\nruncmd: [unclosed\n").unwrap_err();
        assert!(matches!(e, GuestError::CloudConfigYaml { .. }), "{e}");
        let e = check_user_data("#cloud-config\n- a\n- b\n").unwrap_err();
        assert_eq!(e, GuestError::CloudConfigShape { found: "list" });
        let big = format!("#!/bin/sh\n{}", "#".repeat(MAX_USER_DATA));
        assert!(matches!(
            check_user_data(&big),
            Err(GuestError::UserDataTooLarge { .. })
        ));
    }

    #[test]
    fn readiness_reads_the_old_ready_pattern_field() {
        #[derive(Deserialize)]
        struct T {
            #[serde(default, alias = "ready_pattern", deserialize_with = "Readiness::compat")]
            ready: Readiness,
        }
        let r = |j: &str| serde_json::from_str::<T>(j).unwrap().ready;
        assert_eq!(r(r#"{"ready_pattern": "ready "}"#), Readiness::Pattern("ready ".into()));
        assert_eq!(r(r#"{"ready_pattern": null}"#), Readiness::Running);
        assert_eq!(r(r#"{}"#), Readiness::Running);
        assert_eq!(r(r#"{"ready": "report"}"#), Readiness::Report);
        assert_eq!(r(r#"{"ready": {"pattern": "up"}}"#), Readiness::Pattern("up".into()));
        assert_eq!(serde_json::to_string(&Readiness::Report).unwrap(), r#""report""#);
    }
}
