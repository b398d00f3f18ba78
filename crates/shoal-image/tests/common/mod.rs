#![allow(dead_code)]
//! Test images: sparse raw files with an MBR signature, pseudo-random data and holes.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

pub fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    // half-compressible, like file data
    for (i, b) in out.iter_mut().enumerate() {
        if (i / 64) % 2 == 0 {
            *b &= 0x0f;
        }
    }
    out
}

/// A sparse raw image of `size` bytes: MBR signature, then `(offset, len, seed)` data regions.
pub fn raw_image(path: &Path, size: u64, regions: &[(u64, usize, u64)]) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    let mut mbr = vec![0u8; 512];
    mbr[446] = 0x80;
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    for &(off, len, seed) in regions {
        f.write_all_at(&pseudo(len, seed), off).unwrap();
    }
    // the boot signature last, so data at offset 0 keeps it
    f.write_all_at(&mbr[510..], 510).unwrap();
    f.sync_all().unwrap();
}

pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils) must be installed: make deps");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Every file under a directory with its length: a store's on-disk state, to compare before/after.
pub fn tree(dir: &Path) -> Vec<(String, u64)> {
    let mut out = vec![];
    fn walk(d: &Path, base: &Path, out: &mut Vec<(String, u64)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.push((
                    p.strip_prefix(base).unwrap().display().to_string(),
                    e.metadata().unwrap().len(),
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}
