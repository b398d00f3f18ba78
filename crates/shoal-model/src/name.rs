//! Object names. Every user-chosen name (host, template, profile, cluster) is a DNS label, because
//! VM names become guest hostnames: `<cluster>-<index>`.

use thiserror::Error;

/// Longest accepted name. A VM name adds `-<index>` to its cluster's name and must stay a valid
/// hostname label (63 bytes), so cluster names leave room for a six-digit index.
pub const MAX_NAME_LEN: usize = 56;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
    pub reason: &'static str,
}

/// Checks that `name` is a lowercase DNS label: letters, digits and `-`, starting with a letter,
/// not ending with `-`, at most [`MAX_NAME_LEN`] bytes.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let fail = |reason| {
        Err(NameError {
            kind,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("must be at most 56 characters");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return fail("must start with a lowercase letter");
    }
    if name.ends_with('-') {
        return fail("must not end with '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("may contain only lowercase letters, digits and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web", "web-01", "hpc-lab-2"] {
            assert_eq!(validate_name("cluster", ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names_naming_the_value() {
        for bad in ["", "Web", "1web", "web-", "we_b", "we b", "wéb", &"a".repeat(57)] {
            let err = validate_name("cluster", bad).unwrap_err();
            assert_eq!(err.name, bad);
            assert!(err.to_string().contains("invalid cluster name"), "{err}");
        }
    }
}
