//! What a template's disk is: its format on the host, and the content hash that names it.
//! Both travel as strings (`raw`, `manifest:<hex>`), parsed here and nowhere else.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The format of a template's disk image as the hosts hold it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub const fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("disk format {0:?} is not one of raw, qcow2")]
pub struct DiskFormatError(pub String);

impl FromStr for DiskFormat {
    type Err = DiskFormatError;
    fn from_str(s: &str) -> Result<Self, DiskFormatError> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            _ => Err(DiskFormatError(s.to_string())),
        }
    }
}

/// The content hash of a template file, as `Template::hash` and `VmSpec::template_hash` carry
/// it: the disk of a template in the image store is named by its manifest (`manifest:<hex>`);
/// a plain file (an uploaded disk, a kernel, an initrd) by the BLAKE3 hash of its bytes
/// (`blake3:<hex>`). Either hex is 64 lowercase digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TemplateDisk {
    /// An image-store manifest id (hex): hosts fetch its chunks.
    Manifest(String),
    /// The BLAKE3 hash (hex) of a plain file: hosts download it whole and verify it.
    File(String),
}

const MANIFEST: &str = "manifest:";
const BLAKE3: &str = "blake3:";

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("template hash {0:?} is neither manifest:<64 hex digits> nor blake3:<64 hex digits>")]
pub struct TemplateDiskError(pub String);

impl TemplateDisk {
    pub fn parse(s: &str) -> Result<TemplateDisk, TemplateDiskError> {
        let hex_ok = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match (s.strip_prefix(MANIFEST), s.strip_prefix(BLAKE3)) {
            (Some(h), _) if hex_ok(h) => Ok(TemplateDisk::Manifest(h.to_string())),
            (_, Some(h)) if hex_ok(h) => Ok(TemplateDisk::File(h.to_string())),
            _ => Err(TemplateDiskError(s.to_string())),
        }
    }

    /// The hash without its kind: what names the template's files on a host.
    pub fn hex(&self) -> &str {
        match self {
            TemplateDisk::Manifest(h) | TemplateDisk::File(h) => h,
        }
    }

    /// The manifest id, for a disk held in the image store.
    pub fn manifest(&self) -> Option<&str> {
        match self {
            TemplateDisk::Manifest(h) => Some(h),
            TemplateDisk::File(_) => None,
        }
    }

    /// The format hosts keep the disk in: an image-store disk is always exported raw.
    pub fn host_format(&self, uploaded: DiskFormat) -> DiskFormat {
        match self {
            TemplateDisk::Manifest(_) => DiskFormat::Raw,
            TemplateDisk::File(_) => uploaded,
        }
    }
}

impl fmt::Display for TemplateDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateDisk::Manifest(h) => write!(f, "{MANIFEST}{h}"),
            TemplateDisk::File(h) => write!(f, "{BLAKE3}{h}"),
        }
    }
}

impl FromStr for TemplateDisk {
    type Err = TemplateDiskError;
    fn from_str(s: &str) -> Result<Self, TemplateDiskError> {
        TemplateDisk::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_keep_their_wire_strings() {
        for (f, s) in [(DiskFormat::Raw, "raw"), (DiskFormat::Qcow2, "qcow2")] {
            assert_eq!(f.as_str(), s);
            assert_eq!(s.parse::<DiskFormat>().unwrap(), f);
            assert_eq!(serde_json::to_value(f).unwrap(), serde_json::json!(s));
            assert_eq!(serde_json::from_value::<DiskFormat>(serde_json::json!(s)).unwrap(), f);
        }
        let e = "vmdk".parse::<DiskFormat>().unwrap_err();
        assert!(e.to_string().contains("\"vmdk\""), "{e}");
        assert!(serde_json::from_value::<DiskFormat>(serde_json::json!("QCOW2")).is_err());
    }

    #[test]
    fn template_hashes_round_trip_and_bad_ones_are_named() {
        let hex = "0123456789abcdef".repeat(4);
        let m = TemplateDisk::parse(&format!("manifest:{hex}")).unwrap();
        assert_eq!(m, TemplateDisk::Manifest(hex.clone()));
        assert_eq!((m.hex(), m.manifest()), (hex.as_str(), Some(hex.as_str())));
        assert_eq!(m.to_string(), format!("manifest:{hex}"));
        assert_eq!(m.host_format(DiskFormat::Qcow2), DiskFormat::Raw);
        let f: TemplateDisk = format!("blake3:{hex}").parse().unwrap();
        assert_eq!((f.hex(), f.manifest()), (hex.as_str(), None));
        assert_eq!(f.to_string(), format!("blake3:{hex}"));
        assert_eq!(f.host_format(DiskFormat::Qcow2), DiskFormat::Qcow2);
        for bad in [
            hex.clone(),
            format!("sha256:{hex}"),
            format!("blake3:{}", &hex[1..]),
            format!("manifest:{}", hex.to_uppercase()),
            format!("manifest:{hex}0"),
            "blake3:".into(),
        ] {
            let e = TemplateDisk::parse(&bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }
}
