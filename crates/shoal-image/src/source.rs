//! Reading images to import: recognising the format, refusing what cannot be imported safely,
//! and listing where the data is without reading the rest.
//!
//! - raw: the file's own allocation, from `SEEK_DATA`/`SEEK_HOLE`; holes are never read.
//! - qcow2: the allocation map from `qemu-img map`, read straight from the qcow2 file at the
//!   host offsets it gives; unallocated and zero clusters are never read. Images with compressed
//!   clusters are first converted to a sparse raw temporary by `qemu-img convert`.
//! - refused, with the reason: a qcow2 with a backing file (its content lives elsewhere), an
//!   encrypted qcow2, other formats (VMDK, VHD/VHDX, VDI, QED: convert them first), an empty file,
//!   a raw file whose size is not a multiple of 512 bytes (truncated), and a file that holds no
//!   partition table nor known filesystem (not a disk image) unless the format is forced to raw.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{lseek, Whence};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Image file formats Shoal imports and exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(Error::Invalid(format!("image format {s:?} is not one of raw, qcow2"))),
        }
    }
}

/// One stretch of guest bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Guest bytes `[guest, guest+len)` are at `file_offset` in the file.
    Data { guest: u64, len: u64, file_offset: u64 },
    /// Guest bytes that read as zeros.
    Zero { guest: u64, len: u64 },
}

/// Where an image's data is.
#[derive(Debug)]
pub struct Layout {
    pub format: ImageFormat,
    /// Logical (virtual) size.
    pub size: u64,
    pub segments: Vec<Segment>,
    /// The file to read the data segments from (the image, or a raw temporary of it).
    pub file: PathBuf,
    /// A temporary to delete after the import.
    pub temp: Option<tempfile::TempDir>,
}

/// Formats recognised only to be refused, by magic at offset 0.
const REFUSED: &[(&[u8], &str)] = &[
    (b"KDMV", "VMDK"),
    (b"# Disk DescriptorFile", "VMDK descriptor"),
    (b"vhdxfile", "VHDX"),
    (b"conectix", "VHD"),
    (b"QED\0", "QED"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "VDI"),
    (b"<<< Sun VirtualBox Disk Image >>>", "VDI"),
];

fn head(path: &Path, f: &File, at: u64, n: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) => return Err(Error::Io(format!("reading {}: {e}", path.display()), e.kind())),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Whether the first bytes carry a partition table or a filesystem Shoal recognises.
fn looks_like_disk(start: &[u8]) -> bool {
    let at = |off: usize, magic: &[u8]| start.get(off..off + magic.len()) == Some(magic);
    at(510, &[0x55, 0xAA])                       // MBR or protective MBR of GPT
        || at(512, b"EFI PART")                   // GPT without a protective MBR
        || at(1080, &[0x53, 0xEF])                // ext2/3/4
        || at(0, b"XFSB")                         // XFS
        || at(0x10040, b"_BHRfS_M")               // btrfs
        || at(0x8001, b"CD001")                   // ISO 9660
        || at(0, b"LUKS\xba\xbe")                 // LUKS
        || at(0, b"hsqs")                         // squashfs
        || at(4086, b"SWAPSPACE2")                // swap
        || at(3, b"mkfs.fat") || at(3, b"MSDOS") // FAT
}

/// Recognises the image at `path` and lists its segments. `forced` skips recognition.
pub fn layout(path: &Path, forced: Option<ImageFormat>) -> Result<Layout, Error> {
    let name = path.display();
    let f = File::open(path).map_err(|e| Error::Io(format!("opening {name}: {e}"), e.kind()))?;
    let meta = f
        .metadata()
        .map_err(|e| Error::Io(format!("reading {name}: {e}"), e.kind()))?;
    if !meta.is_file() {
        return Err(Error::Invalid(format!("{name} is not a regular file")));
    }
    if meta.len() == 0 {
        return Err(Error::Invalid(format!("{name} is empty")));
    }
    let start = head(path, &f, 0, 0x10048)?;
    let format = match forced {
        Some(f) => f,
        None if start.starts_with(b"QFI\xfb") => ImageFormat::Qcow2,
        None => {
            if let Some((_, what)) = REFUSED.iter().find(|(m, _)| start.starts_with(m)) {
                return Err(Error::Invalid(format!(
                    "{name} is a {what} image; convert it first: qemu-img convert -O qcow2 {name} OUT.qcow2"
                )));
            }
            if !looks_like_disk(&start) {
                return Err(Error::Invalid(format!(
                    "{name} does not look like a disk image (no partition table, no known filesystem, \
                     not qcow2); pass --format raw to import it as raw anyway"
                )));
            }
            ImageFormat::Raw
        }
    };
    match format {
        ImageFormat::Raw => raw_layout(path, &f, meta.len()),
        ImageFormat::Qcow2 => qcow2_layout(path, meta.len()),
    }
}

fn raw_layout(path: &Path, f: &File, size: u64) -> Result<Layout, Error> {
    if !size.is_multiple_of(512) {
        return Err(Error::Invalid(format!(
            "{} is {size} bytes, not a whole number of 512-byte sectors: truncated or not a disk image",
            path.display()
        )));
    }
    let segments = data_segments(f, size).map_err(|e| {
        Error::Io(
            format!("mapping {}: {e}", path.display()),
            std::io::Error::from(e).kind(),
        )
    })?;
    Ok(Layout {
        format: ImageFormat::Raw,
        size,
        segments,
        file: path.to_path_buf(),
        temp: None,
    })
}

/// Data and hole segments of a file, from `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_segments(f: &File, size: u64) -> Result<Vec<Segment>, nix::Error> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = vec![];
    let mut at = 0u64;
    while at < size {
        let data = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::Error::ENXIO) => size,
            Err(e) => return Err(e),
        };
        if data > at {
            out.push(Segment::Zero {
                guest: at,
                len: data.min(size) - at,
            });
        }
        if data >= size {
            break;
        }
        let hole = (lseek(fd, data as i64, Whence::SeekHole)? as u64).min(size);
        out.push(Segment::Data {
            guest: data,
            len: hole - data,
            file_offset: data,
        });
        at = hole;
    }
    Ok(out)
}

fn qemu_img(args: &[&str]) -> Result<std::process::Output, Error> {
    Command::new("qemu-img").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Tool("qemu-img not found: install qemu-utils (it reads and writes qcow2 images)".into())
        } else {
            Error::Tool(format!("running qemu-img: {e}"))
        }
    })
}

fn qcow2_layout(path: &Path, file_len: u64) -> Result<Layout, Error> {
    let name = path.display().to_string();
    let p = path
        .to_str()
        .ok_or_else(|| Error::Invalid(format!("{name}: path is not UTF-8")))?;
    let info = qemu_img(&["info", "--output=json", "-f", "qcow2", p])?;
    if !info.status.success() {
        return Err(Error::Invalid(format!(
            "{name} is not a readable qcow2 image: {}",
            String::from_utf8_lossy(&info.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)
        .map_err(|e| Error::Tool(format!("qemu-img info printed unexpected output: {e}")))?;
    if let Some(b) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(Error::Invalid(format!(
            "{name} is a qcow2 overlay with backing file {b}; flatten it first: qemu-img convert -O qcow2 {name} OUT.qcow2"
        )));
    }
    if info.get("encrypted").and_then(|e| e.as_bool()) == Some(true) {
        return Err(Error::Invalid(format!(
            "{name} is an encrypted qcow2 image, which Shoal does not import"
        )));
    }
    let size = info
        .get("virtual-size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| Error::Tool("qemu-img info gave no virtual-size".into()))?;
    let check = qemu_img(&["check", "-q", "-f", "qcow2", p])?;
    // 0: clean, 3: leaked clusters only (harmless); anything else is damage.
    if !matches!(check.status.code(), Some(0) | Some(3)) {
        return Err(Error::Invalid(format!(
            "{name} is a damaged qcow2 image: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        )));
    }
    let map = qemu_img(&["map", "--output=json", "-f", "qcow2", p])?;
    if !map.status.success() {
        return Err(Error::Invalid(format!(
            "{name}: qemu-img map failed: {}",
            String::from_utf8_lossy(&map.stderr).trim()
        )));
    }
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout)
        .map_err(|e| Error::Tool(format!("qemu-img map printed unexpected output: {e}")))?;
    let mut segments = vec![];
    let mut needs_convert = false;
    for e in &entries {
        let g = |k: &str| e.get(k).and_then(|v| v.as_u64());
        let b = |k: &str| e.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let (Some(guest), Some(len)) = (g("start"), g("length")) else {
            return Err(Error::Tool(format!("qemu-img map entry without start/length: {e}")));
        };
        if b("data") && !b("zero") {
            match g("offset") {
                Some(off) if !b("compressed") => {
                    if off + len > file_len {
                        return Err(Error::Invalid(format!(
                            "{name} is truncated: data at guest offset {guest} lies beyond the end of the file"
                        )));
                    }
                    segments.push(Segment::Data {
                        guest,
                        len,
                        file_offset: off,
                    })
                }
                _ => needs_convert = true,
            }
        } else {
            segments.push(Segment::Zero { guest, len });
        }
    }
    if needs_convert {
        // Compressed clusters: let qemu-img decompress into a sparse raw temporary.
        let temp = tempfile::Builder::new()
            .prefix("shoal-import-")
            .tempdir()
            .map_err(|e| Error::Io(format!("creating a temporary directory: {e}"), e.kind()))?;
        let raw = temp.path().join("image.raw");
        let out = qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-S",
            "4k",
            p,
            raw.to_str().expect("utf-8"),
        ])?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "{name}: qemu-img convert failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let f = File::open(&raw).map_err(|e| Error::Io(format!("opening {}: {e}", raw.display()), e.kind()))?;
        let segments = data_segments(&f, size).map_err(|e| {
            Error::Io(
                format!("mapping {}: {e}", raw.display()),
                std::io::Error::from(e).kind(),
            )
        })?;
        return Ok(Layout {
            format: ImageFormat::Qcow2,
            size,
            segments,
            file: raw,
            temp: Some(temp),
        });
    }
    Ok(Layout {
        format: ImageFormat::Qcow2,
        size,
        segments,
        file: path.to_path_buf(),
        temp: None,
    })
}

/// Runs `qemu-img convert` from a raw file to qcow2.
pub fn raw_to_qcow2(raw: &Path, dest: &Path) -> Result<(), Error> {
    let out = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().ok_or_else(|| Error::Invalid("path is not UTF-8".into()))?,
        dest.to_str()
            .ok_or_else(|| Error::Invalid("path is not UTF-8".into()))?,
    ])?;
    if !out.status.success() {
        return Err(Error::Tool(format!(
            "qemu-img convert to qcow2 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The layout of a qcow2 or raw image read through its backing chain: `qemu-img convert` to a
/// sparse raw temporary (for VM disks, which are overlays on their host's base image).
pub fn flattened_layout(path: &Path) -> Result<Layout, Error> {
    let name = path.display().to_string();
    let p = path
        .to_str()
        .ok_or_else(|| Error::Invalid(format!("{name}: path is not UTF-8")))?;
    let temp = tempfile::Builder::new()
        .prefix("shoal-flatten-")
        .tempdir()
        .map_err(|e| Error::Io(format!("creating a temporary directory: {e}"), e.kind()))?;
    let raw = temp.path().join("image.raw");
    let out = qemu_img(&["convert", "-O", "raw", "-S", "4k", p, raw.to_str().expect("utf-8")])?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "{name}: qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let f = File::open(&raw).map_err(|e| Error::Io(format!("opening {}: {e}", raw.display()), e.kind()))?;
    let size = f
        .metadata()
        .map_err(|e| Error::Io(format!("reading {}: {e}", raw.display()), e.kind()))?
        .len();
    let segments = data_segments(&f, size).map_err(|e| {
        Error::Io(
            format!("mapping {}: {e}", raw.display()),
            std::io::Error::from(e).kind(),
        )
    })?;
    Ok(Layout {
        format: ImageFormat::Raw,
        size,
        segments,
        file: raw,
        temp: Some(temp),
    })
}
