//! The NoCloud seed: a small vfat volume labelled CIDATA holding `meta-data`, `user-data` and
//! `network-config`, which cloud-init (and the demo guest) read at boot. Built with dosfstools and
//! mtools, so no mount is needed.
//!
//! **network-config** is cloud-init's network config *version 1*: every cloud-init release users
//! run parses it without a warning and renders it for ifupdown (ENI), netplan and
//! systemd-networkd alike. Version 2 was dropped: its default route is either `to: default`,
//! which cloud-init 22.4 (Debian 12) rejects so that the guest gets no network at all,
//! `to: 0.0.0.0/0`, which Debian's ENI renderer applies only with net-tools installed, or
//! `gateway4`, which newer releases deprecate. `scripts/cloud-init/check` verifies this against
//! each release's own parser and renderers.
//!
//! **user-data** is MIME multipart: the operator's user data first, untouched (any format
//! cloud-init reads); then Shoal's reporter, a `#cloud-boothook` that installs and starts the
//! unit telling the host whether configuration succeeded ([`shoal_model::Readiness::Report`]) —
//! a boothook, so that no failing cloud-config of the operator's can keep it from running; then,
//! when there is a login user or keys, Shoal's `#cloud-config`, whose `merge_how` appends its
//! lists to the operator's instead of replacing them, so neither is dropped.

use std::net::Ipv4Addr;
use std::path::Path;

use base64::Engine;
use shoal_model::agent::VmSpec;
use shoal_model::Ipv4Subnet;
use tokio::process::Command;

use super::disk::run;
use crate::HvError;

/// Run after cloud-init's final stage: prints `shoal-guest: ready` or `shoal-guest: failed: ...`.
const REPORT_READY: &str = include_str!("guest/report-ready");
/// The systemd unit that runs [`REPORT_READY`] at every boot.
const READY_UNIT: &str = include_str!("guest/shoal-ready.service");

/// The seed's three files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub network_config: String,
    pub user_data: String,
}

impl SeedFiles {
    pub fn render(spec: &VmSpec, resolvers: &[Ipv4Addr]) -> SeedFiles {
        SeedFiles {
            meta_data: meta_data(spec),
            network_config: network_config(spec, resolvers),
            user_data: user_data(spec),
        }
    }

    /// File name and content, as they go on the volume.
    pub fn files(&self) -> [(&'static str, &str); 3] {
        [
            ("meta-data", &self.meta_data),
            ("user-data", &self.user_data),
            ("network-config", &self.network_config),
        ]
    }
}

/// The resolver QEMU's user-mode network offers a VM not on a virtual network: its DNS
/// forwarder, at the subnet's reserved resolver address.
pub fn user_mode_resolver(spec: &VmSpec) -> Option<Ipv4Addr> {
    Ipv4Subnet::containing(spec.ip, spec.prefix_len)
        .ok()
        .map(|s| s.resolver())
}

/// QEMU's user-mode network laid out on the VM's own subnet: the gateway and resolver where the
/// seed says they are, so a guest configured by the seed reaches the outside through it.
pub fn user_mode_netdev(spec: &VmSpec) -> String {
    match Ipv4Subnet::containing(spec.ip, spec.prefix_len) {
        Ok(s) => format!("user,id=net0,net={s},host={},dns={}", spec.gateway, s.resolver()),
        Err(_) => "user,id=net0".to_string(),
    }
}

/// The host's own name servers a guest can reach through NAT (loopback ones cannot be): from
/// systemd-resolved's upstream list when it runs, else from `/etc/resolv.conf`.
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    for f in ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            let found = parse_resolv_conf(&text);
            if !found.is_empty() {
                return found;
            }
        }
    }
    Vec::new()
}

/// The non-loopback IPv4 `nameserver`s of a resolv.conf.
fn parse_resolv_conf(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .collect()
}

fn meta_data(spec: &VmSpec) -> String {
    format!("instance-id: {}\nlocal-hostname: {}\n", spec.uuid, spec.name)
}

/// Network config version 1 (see the module's documentation for why not version 2).
fn network_config(spec: &VmSpec, resolvers: &[Ipv4Addr]) -> String {
    let mtu = spec.network.as_ref().map_or(1500, |n| n.mtu);
    let mut s = format!(
        "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    mac_address: \"{mac}\"\n    mtu: {mtu}\n    \
         subnets:\n      - type: static\n        address: {ip}/{prefix}\n        gateway: {gw}\n",
        mac = spec.mac,
        ip = spec.ip,
        prefix = spec.prefix_len,
        gw = spec.gateway
    );
    if !resolvers.is_empty() {
        let list = resolvers.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
        s.push_str(&format!(
            "        dns_nameservers: [{list}]\n  - type: nameserver\n    address: [{list}]\n"
        ));
    }
    s
}

/// A YAML scalar for any text: a JSON string is a valid YAML double-quoted scalar.
fn q(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// Shoal's own `#cloud-config`: the login user and SSH keys; `None` when there are neither.
/// It comes after the operator's part, and its `merge_how` appends to theirs.
fn shoal_cloud_config(spec: &VmSpec) -> Option<String> {
    let keys = format!(
        "[{}]",
        spec.ssh_keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ")
    );
    let settings = match &spec.user {
        Some(user) => {
            let mut u = format!(
                "users:\n  - default\n  - name: {}\n    shell: /bin/bash\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    lock_passwd: true\n",
                q(user)
            );
            if !spec.ssh_keys.is_empty() {
                u.push_str(&format!("    ssh_authorized_keys: {keys}\n"));
            }
            u
        }
        // Without a user of Shoal's, the keys go to the image's default user.
        None if !spec.ssh_keys.is_empty() => format!("ssh_authorized_keys: {keys}\n"),
        None => return None,
    };
    Some(format!(
        "#cloud-config\n# Shoal's settings for VM {}, appended to the operator's user data (any part before\n\
         # this one), replacing none of it.\n\
         merge_how:\n  - name: list\n    settings: [append]\n  - name: dict\n    settings: [no_replace, recurse_list]\n{settings}",
        spec.name
    ))
}

/// The boothook that installs the reporter: cloud-init runs it early at every boot, whatever
/// the cloud-config parts say (an operator's failing `write_files` or `runcmd` cannot keep
/// the report from being made: it reports their failure instead).
fn reporter_boothook() -> String {
    format!(
        "#cloud-boothook\n#!/bin/sh\n# Shoal: tells the host, once cloud-init is done, whether it configured this guest.\n\
         mkdir -p /usr/local/lib/shoal\n\
         cat >/usr/local/lib/shoal/report-ready <<'SHOAL_EOF'\n{REPORT_READY}SHOAL_EOF\n\
         chmod 0755 /usr/local/lib/shoal/report-ready\n\
         if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then\n\
         cat >/etc/systemd/system/shoal-ready.service <<'SHOAL_EOF'\n{READY_UNIT}SHOAL_EOF\n\
         systemctl enable shoal-ready.service >/dev/null 2>&1\n\
         systemctl start --no-block shoal-ready.service\n\
         else\n\
         nohup /usr/local/lib/shoal/report-ready >/dev/null 2>&1 &\n\
         fi\n"
    )
}

/// A MIME part: text/plain in base64 (cloud-init types it by its first line; any text
/// survives), or a MIME document as it is, with its own headers.
fn part(body: &str, filename: &str) -> String {
    if body.starts_with("Content-Type:") || body.starts_with("MIME-Version:") {
        return format!("{}\n", body.trim_end());
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(body);
    let wrapped: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).expect("base64"))
        .collect();
    format!(
        "Content-Type: text/plain; charset=\"utf-8\"\nContent-Transfer-Encoding: base64\n\
         Content-Disposition: attachment; filename=\"{filename}\"\n\n{}\n",
        wrapped.join("\n")
    )
}

/// MIME multipart user data: the operator's part first, untouched, then Shoal's reporter and
/// its cloud-config.
fn user_data(spec: &VmSpec) -> String {
    let boundary = format!("==shoal-{}==", spec.uuid.simple());
    let mut parts = Vec::new();
    if let Some(theirs) = spec.user_data.as_deref().filter(|u| !u.trim().is_empty()) {
        parts.push(part(theirs, "user-data"));
    }
    parts.push(part(&reporter_boothook(), "shoal-report.sh"));
    if let Some(ours) = shoal_cloud_config(spec) {
        parts.push(part(&ours, "shoal.cfg"));
    }
    let mut s = format!("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\n\n");
    for p in parts {
        s.push_str(&format!("--{boundary}\n{p}"));
    }
    s.push_str(&format!("--{boundary}--\n"));
    s
}

/// Writes the seed image for `spec` to `path`.
pub async fn write_seed(spec: &VmSpec, resolvers: &[Ipv4Addr], path: &Path) -> Result<(), HvError> {
    let seed = SeedFiles::render(spec, resolvers);
    let dir = path.with_extension("d");
    let _ = tokio::fs::remove_dir_all(&dir).await;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(HvError::file("creating", &dir))?;
    for (name, content) in seed.files() {
        let file = dir.join(name);
        tokio::fs::write(&file, content)
            .await
            .map_err(HvError::file("writing seed file", &file))?;
    }
    let _ = tokio::fs::remove_file(path).await;
    // 1 MiB holds Shoal's part and is the smallest FAT12 mkfs takes happily; user data (at
    // most 64 KiB from a profile and as much from a cluster) gets room on top, twice over.
    let kib = (1024 + seed.user_data.len() / 1024 * 2).to_string();
    run(
        Command::new("mkfs.vfat")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-C", "-n", "CIDATA"])
            .arg(path)
            .arg(&kib),
        "mkfs.vfat (dosfstools)",
    )
    .await?;
    for (name, _) in seed.files() {
        run(
            Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(path)
                .arg(dir.join(name))
                .arg(format!("::{name}")),
            "mcopy (mtools)",
        )
        .await?;
    }
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_model::VmNetwork;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK5l test@example";

    pub(crate) fn spec(network: Option<VmNetwork>) -> VmSpec {
        VmSpec {
            uuid: uuid::Uuid::nil(),
            ip: "10.60.0.2".parse().unwrap(),
            gateway: "10.60.0.1".parse().unwrap(),
            network,
            ..VmSpec::example("c-0")
        }
    }

    #[test]
    fn network_config_is_version_1_with_the_networks_mtu_gateway_and_resolvers() {
        let plain = network_config(&spec(None), &[]);
        assert!(plain.starts_with("version: 1\n"), "{plain}");
        assert!(plain.contains("mtu: 1500") && !plain.contains("nameserver"), "{plain}");
        assert!(
            plain.contains("address: 10.60.0.2/24\n        gateway: 10.60.0.1\n"),
            "{plain}"
        );
        assert!(
            !plain.contains("default"),
            "cloud-init 22.4 rejects `to: default`: {plain}"
        );
        let net = VmNetwork {
            name: "n".into(),
            vni: 7,
            mtu: 1450,
            peers: Vec::new(),
            gateway: None,
            dns: Vec::new(),
        };
        let c = network_config(
            &spec(Some(net)),
            &["10.1.1.1".parse().unwrap(), "9.9.9.9".parse().unwrap()],
        );
        assert!(c.contains("mtu: 1450"), "{c}");
        // After the interface's own address: the demo guest takes the first `address:` as its
        // own and the list after `dns_nameservers:` as its resolvers.
        let own = c.find("address: 10.60.0.2/24").unwrap();
        let ns = c.find("dns_nameservers: [10.1.1.1, 9.9.9.9]\n").expect(&c);
        assert!(own < ns, "{c}");
        assert!(
            c.contains("  - type: nameserver\n    address: [10.1.1.1, 9.9.9.9]\n"),
            "{c}"
        );
    }

    #[test]
    fn user_mode_network_is_laid_out_on_the_vms_subnet() {
        let s = spec(None);
        assert_eq!(
            user_mode_netdev(&s),
            "user,id=net0,net=10.60.0.0/24,host=10.60.0.1,dns=10.60.0.254"
        );
        assert_eq!(user_mode_resolver(&s), Some("10.60.0.254".parse().unwrap()));
    }

    #[test]
    fn resolv_conf_gives_only_resolvers_a_guest_can_reach() {
        let r = parse_resolv_conf("# x\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\nsearch a\n");
        assert_eq!(r, vec!["10.255.255.53".parse::<Ipv4Addr>().unwrap()]);
    }

    /// The parts of Shoal's MIME user data, bodies decoded, in order.
    fn parts(u: &str) -> Vec<String> {
        let boundary = u.split("boundary=\"").nth(1).unwrap().split('"').next().unwrap();
        let body = u.split(&format!("--{boundary}--")).next().unwrap();
        body.split(&format!("--{boundary}\n"))
            .skip(1)
            .map(|p| {
                let (head, body) = p.split_once("\n\n").unwrap();
                if head.contains("Content-Transfer-Encoding: base64") {
                    let b64: String = body.split_whitespace().collect();
                    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
                } else {
                    p.to_string()
                }
            })
            .collect()
    }

    #[test]
    fn shoals_user_data_is_the_reporter_then_the_user_and_keys() {
        let mut s = spec(None);
        let u = user_data(&s);
        assert!(
            u.starts_with("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\""),
            "{u}"
        );
        let p = parts(&u);
        assert_eq!(p.len(), 1, "nothing but the reporter: {p:?}");
        assert!(p[0].starts_with("#cloud-boothook\n#!/bin/sh\n"), "{}", p[0]);
        assert!(p[0].contains("shoal-ready.service") && p[0].contains("/usr/local/lib/shoal/report-ready"));
        // The reporter's script and unit go in whole.
        assert!(p[0].contains(REPORT_READY) && p[0].contains(READY_UNIT));
        // No echo of the user data can pass for the guest's report.
        assert!(!p[0].contains(shoal_model::guest::GUEST_READY) && !p[0].contains("guest: failed"));
        s.ssh_keys = vec![KEY.into()];
        let p = parts(&user_data(&s));
        assert_eq!(p.len(), 2);
        assert!(
            p[1].starts_with("#cloud-config\n") && p[1].contains("merge_how:"),
            "{}",
            p[1]
        );
        assert!(p[1].contains(&format!("ssh_authorized_keys: [\"{KEY}\"]\n")) && !p[1].contains("users:"));
        s.user = Some("ops".into());
        let p = parts(&user_data(&s));
        assert!(p[1].contains("users:\n  - default\n  - name: \"ops\"\n"), "{}", p[1]);
        assert!(
            p[1].contains(&format!("    ssh_authorized_keys: [\"{KEY}\"]\n")),
            "{}",
            p[1]
        );
    }

    #[test]
    fn operators_user_data_comes_first_untouched() {
        let mut s = spec(None);
        s.ssh_keys = vec![KEY.into()];
        let script = "#!/bin/sh\necho 'héllo' > /tmp/x\n";
        s.user_data = Some(script.into());
        let p = parts(&user_data(&s));
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], script);
        assert!(p[1].starts_with("#cloud-boothook") && p[2].starts_with("#cloud-config"));
        // MIME user data keeps its own headers, as a part of the whole.
        let mime = "Content-Type: multipart/mixed; boundary=\"in\"\nMIME-Version: 1.0\n\n--in--";
        s.user_data = Some(mime.into());
        let u = user_data(&s);
        assert!(u.contains(&format!("\n{mime}\n--==shoal-")), "{u}");
    }
}
