//! The tools a user would pick instead of Shoal's image store (borg, casync, restic), run side by
//! side with it on the same images: ingest all of them into a fresh repository, measure the
//! repository's allocated size, restore one image, check it byte for byte, clean up.
//!
//! Each tool is used in its natural, fastest way for a set of disk images:
//! - borg: one archive holding all the images (`borg create`), restored with `borg extract --sparse`
//!   run in a scratch directory (it extracts paths relative to the cwd).
//! - casync: one blob index (`.caibx`) per image, all sharing one chunk store; restored with
//!   `casync extract` of that image's index (holes punched, the default).
//! - restic: one snapshot holding all the images (`restic backup`), restored with
//!   `restic restore --include` of the one file (parallel; on the corpus about twice as fast as
//!   `restic dump`, a single sequential stream: 4.7-5.6 s against 8.3-9.1 s).
//!
//! A restore is timed until the restored file is on disk (fsync), for every tool alike.
//!
//! Every tool keeps its cache/config (borg's `BORG_BASE_DIR`, restic's `--cache-dir`) under `work`
//! too, so nothing is left in `$HOME` and the cache is not counted in `stored_bytes` (only the
//! repository is; for casync, the chunk store plus the seven indexes).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::Context;

/// One tool's line in the comparison table.
#[derive(Debug, Clone)]
pub struct ToolResult {
    /// Tool and version, e.g. `borg 1.2.4`.
    pub tool: String,
    /// Chunking, compression and layout used.
    pub settings: String,
    /// Allocated bytes of the repository after ingesting all the images.
    pub stored_bytes: u64,
    /// Wall time of the ingest, seconds.
    pub ingest_s: f64,
    /// Sum of the images' apparent sizes.
    pub logical_bytes: u64,
    /// `logical_bytes / 1e6 / ingest_s`.
    pub ingest_mb_s: f64,
    /// Wall time of restoring the one image, seconds.
    pub restore_s: f64,
    /// Whether the restored image equals the original byte for byte.
    pub restored_identical: bool,
}

const PACKAGES: [&str; 3] = ["borgbackup", "casync", "restic"];

/// borg's chunker: buzhash, min 2^10, max 2^23, mask 16 bits (~64 KiB average), window 4095.
/// borg 1.2's default is `buzhash,19,23,21,4095` (~2 MiB average), which is not what the
/// reference table measured ("~64 KiB avg").
pub const BORG_CHUNKER_64K: &str = "buzhash,10,23,16,4095";

/// Fixed password for restic's (mandatory) encryption.
const RESTIC_PASSWORD: &str = "shoal-bench";

/// Installs borgbackup, casync and restic with apt-get if any is missing.
pub fn ensure_installed() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = |missing: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-q"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run("apt-get", &mut c)
    };
    if install(&missing).is_err() {
        // Stale or absent package lists: refresh them once and retry.
        run("apt-get", Command::new("apt-get").args(["update", "-q"]))?;
        install(&missing)?;
    }
    for p in PACKAGES {
        anyhow::ensure!(
            dpkg_installed(p),
            "apt-get: {p} still not installed after apt-get install"
        );
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
        .unwrap_or(false)
}

/// borg 1.2: one unencrypted repository, one archive of all the images, lz4, ~64 KiB chunks
/// ([`BORG_CHUNKER_64K`]); restore with `borg extract --sparse`.
pub fn run_borg(images: &[PathBuf], restore: &Path, work: &Path) -> anyhow::Result<ToolResult> {
    run_borg_with(images, restore, work, BORG_CHUNKER_64K)
}

/// [`run_borg`] with other chunker params (`default`, `fixed,4096`, `buzhash,…`).
pub fn run_borg_with(
    images: &[PathBuf],
    restore: &Path,
    work: &Path,
    chunker_params: &str,
) -> anyhow::Result<ToolResult> {
    let (images, restore) = absolute(images, restore)?;
    let logical = logical_bytes(&images)?;
    let dir = Scratch::new(work, "borg")?;
    let repo = dir.0.join("repo");
    let base = dir.0.join("base");
    let out_dir = dir.0.join("restore");
    std::fs::create_dir_all(&base)?;
    std::fs::create_dir_all(&out_dir)?;
    let borg = || {
        let mut c = Command::new("borg");
        c.env("BORG_BASE_DIR", &base)
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
        // These would override BORG_BASE_DIR or the repository given on the command line.
        for v in [
            "BORG_REPO",
            "BORG_PASSPHRASE",
            "BORG_CACHE_DIR",
            "BORG_CONFIG_DIR",
            "BORG_SECURITY_DIR",
            "BORG_KEYS_DIR",
        ] {
            c.env_remove(v);
        }
        c
    };
    let version = tool_version("borg", Command::new("borg").arg("--version"));
    let archive = format!("{}::images", repo.display());

    run("borg", borg().args(["init", "--encryption=none"]).arg(&repo))?;
    let t = Instant::now();
    run(
        "borg",
        borg()
            .args([
                "create",
                "--compression",
                "lz4",
                "--chunker-params",
                chunker_params,
                &archive,
            ])
            .args(&images),
    )?;
    let ingest_s = t.elapsed().as_secs_f64();
    let stored = dir_bytes(&repo);

    // borg stores absolute paths without the leading '/', and extracts relative to the cwd.
    let member = restore.strip_prefix("/").unwrap_or(&restore).to_path_buf();
    let t = Instant::now();
    run(
        "borg",
        borg()
            .args(["extract", "--sparse", &archive])
            .arg(&member)
            .current_dir(&out_dir),
    )?;
    sync_file(&out_dir.join(&member))?;
    let restore_s = t.elapsed().as_secs_f64();
    let identical = files_identical(&restore, &out_dir.join(&member))?;

    Ok(ToolResult::new(
        version,
        format!("one archive of all images, --chunker-params {chunker_params}, lz4; extract --sparse"),
        stored,
        ingest_s,
        logical,
        restore_s,
        identical,
    ))
}

/// casync: one blob index per image into one shared chunk store, 16/64/256 KiB chunks, zstd;
/// restore with `casync extract` of that image's index.
pub fn run_casync(images: &[PathBuf], restore: &Path, work: &Path) -> anyhow::Result<ToolResult> {
    let (images, restore) = absolute(images, restore)?;
    let logical = logical_bytes(&images)?;
    let dir = Scratch::new(work, "casync")?;
    let store = dir.0.join("store");
    let idx = dir.0.join("index");
    let out = dir.0.join("restored.raw");
    std::fs::create_dir_all(&idx)?;
    let version = tool_version("casync", Command::new("casync").arg("--version"));
    let store_arg = format!("--store={}", store.display());
    let index_of = |img: &Path| -> anyhow::Result<PathBuf> {
        let name = img
            .file_name()
            .with_context(|| format!("casync: image {} has no file name", img.display()))?;
        Ok(idx.join(format!("{}.caibx", name.to_string_lossy())))
    };
    let mut seen = std::collections::HashSet::new();
    for img in &images {
        anyhow::ensure!(
            seen.insert(index_of(img)?),
            "casync: two images named like {}",
            img.display()
        );
    }

    let t = Instant::now();
    for img in &images {
        run(
            "casync",
            Command::new("casync")
                .arg("make")
                .arg(&store_arg)
                .args(["--chunk-size=16384:65536:262144", "--compression=zstd"])
                .arg(index_of(img)?)
                .arg(img),
        )?;
    }
    let ingest_s = t.elapsed().as_secs_f64();
    let stored = dir_bytes(&store) + dir_bytes(&idx);

    let t = Instant::now();
    run(
        "casync",
        Command::new("casync")
            .arg("extract")
            .arg(&store_arg)
            .arg(index_of(&restore)?)
            .arg(&out),
    )?;
    sync_file(&out)?;
    let restore_s = t.elapsed().as_secs_f64();
    let identical = files_identical(&restore, &out)?;

    Ok(ToolResult::new(
        version,
        "one blob index per image, one store, --chunk-size=16384:65536:262144, zstd".into(),
        stored,
        ingest_s,
        logical,
        restore_s,
        identical,
    ))
}

/// restic: repository version 2 (needed for compression), one snapshot of all the images,
/// `--compression auto`; restore with `restic restore --include` of the one file.
pub fn run_restic(images: &[PathBuf], restore: &Path, work: &Path) -> anyhow::Result<ToolResult> {
    let (images, restore) = absolute(images, restore)?;
    let logical = logical_bytes(&images)?;
    let dir = Scratch::new(work, "restic")?;
    let repo = dir.0.join("repo");
    let cache = dir.0.join("cache");
    let out_dir = dir.0.join("restore");
    std::fs::create_dir_all(&out_dir)?;
    let restic = || {
        let mut c = Command::new("restic");
        c.arg("--quiet")
            .arg("--cache-dir")
            .arg(&cache)
            .env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_PASSWORD", RESTIC_PASSWORD)
            .env_remove("RESTIC_REPOSITORY_FILE")
            .env_remove("RESTIC_PASSWORD_FILE")
            .env_remove("RESTIC_PASSWORD_COMMAND")
            .env_remove("RESTIC_COMPRESSION")
            .env_remove("RESTIC_PACK_SIZE");
        c
    };
    let version = tool_version("restic", Command::new("restic").arg("version"));

    run("restic", restic().args(["init", "--repository-version", "2"]))?;
    let t = Instant::now();
    run(
        "restic",
        restic().args(["backup", "--compression", "auto"]).args(&images),
    )?;
    let ingest_s = t.elapsed().as_secs_f64();
    let stored = dir_bytes(&repo);

    let t = Instant::now();
    run(
        "restic",
        restic()
            .args(["restore", "latest", "--target"])
            .arg(&out_dir)
            .arg("--include")
            .arg(&restore),
    )?;
    let out = out_dir.join(restore.strip_prefix("/").unwrap_or(&restore));
    sync_file(&out)?;
    let restore_s = t.elapsed().as_secs_f64();
    let identical = files_identical(&restore, &out)?;

    Ok(ToolResult::new(
        version,
        "one snapshot of all images, repository v2, --compression auto; restore --include".into(),
        stored,
        ingest_s,
        logical,
        restore_s,
        identical,
    ))
}

/// Flushes a restored file to disk. Every tool's restore time includes it, as Shoal's export
/// syncs what it writes: a restore is done when the image is on disk.
pub fn sync_file(p: &Path) -> anyhow::Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", p.display()))
}

/// Whether two files have the same length and bytes (streamed, 1 MiB at a time).
pub fn files_identical(a: &Path, b: &Path) -> anyhow::Result<bool> {
    const BUF: usize = 1 << 20;
    let open = |p: &Path| File::open(p).with_context(|| format!("opening {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let len = fa.metadata()?.len();
    if len != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; BUF], vec![0u8; BUF]);
    let mut left = len;
    while left > 0 {
        let n = left.min(BUF as u64) as usize;
        fa.read_exact(&mut ba[..n])
            .with_context(|| format!("reading {}", a.display()))?;
        fb.read_exact(&mut bb[..n])
            .with_context(|| format!("reading {}", b.display()))?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    // Both must end here (neither grew while being read).
    Ok(fa.read(&mut ba[..1])? == 0 && fb.read(&mut bb[..1])? == 0)
}

/// Allocated bytes (`st_blocks * 512`) of everything under `dir`, itself included; symlinks are
/// not followed, unreadable entries count as 0.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let mut total = md.blocks() * 512;
    if md.is_dir() {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                total += dir_bytes(&e.path());
            }
        }
    }
    total
}

/// A directory `work/<name>`, emptied when created and removed when dropped (also on errors).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(work: &Path, name: &str) -> anyhow::Result<Scratch> {
        let p = std::path::absolute(work.join(name))?;
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("{name}: removing old {}", p.display()))?;
        }
        std::fs::create_dir_all(&p).with_context(|| format!("{name}: creating {}", p.display()))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` to completion; an error names the tool, the command line, the exit status and the
/// end of its stderr.
fn run(tool: &str, cmd: &mut Command) -> anyhow::Result<Output> {
    let line = command_line(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{tool}: could not start `{line}` (is it installed? see ensure_installed)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = {
            let t = err.trim_end();
            let start = t.char_indices().rev().nth(4000).map_or(0, |(i, _)| i);
            t[start..].to_string()
        };
        anyhow::bail!("{tool}: `{line}` failed ({}): {tail}", out.status);
    }
    Ok(out)
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// First line of the tool's version output, trimmed to "name x.y.z" (falls back to the name).
fn tool_version(tool: &str, cmd: &mut Command) -> String {
    run(tool, cmd)
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            let words: Vec<&str> = s.split_whitespace().take(2).collect();
            (words.len() == 2).then(|| words.join(" "))
        })
        .unwrap_or_else(|| tool.to_string())
}

fn absolute(images: &[PathBuf], restore: &Path) -> anyhow::Result<(Vec<PathBuf>, PathBuf)> {
    anyhow::ensure!(!images.is_empty(), "no images given");
    let abs = |p: &Path| std::fs::canonicalize(p).with_context(|| format!("image {}", p.display()));
    let images = images.iter().map(|p| abs(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let restore = abs(restore)?;
    anyhow::ensure!(
        images.contains(&restore),
        "{} is not one of the images",
        restore.display()
    );
    Ok((images, restore))
}

pub fn logical_bytes(images: &[PathBuf]) -> anyhow::Result<u64> {
    images
        .iter()
        .map(|p| {
            Ok(std::fs::metadata(p)
                .with_context(|| format!("image {}", p.display()))?
                .len())
        })
        .sum()
}

impl ToolResult {
    /// A result whose `ingest_mb_s` is computed from `logical_bytes` and `ingest_s`.
    pub fn new(
        tool: String,
        settings: String,
        stored_bytes: u64,
        ingest_s: f64,
        logical_bytes: u64,
        restore_s: f64,
        restored_identical: bool,
    ) -> ToolResult {
        ToolResult {
            tool,
            settings,
            stored_bytes,
            ingest_s,
            logical_bytes,
            ingest_mb_s: logical_bytes as f64 / 1e6 / ingest_s,
            restore_s,
            restored_identical,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn write(p: &Path, data: &[u8]) {
        std::fs::write(p, data).unwrap();
    }

    #[test]
    fn identical_files() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let data: Vec<u8> = (0..3 * (1u32 << 20) + 12345).map(|i| (i * 7 % 251) as u8).collect();
        write(&a, &data);
        write(&b, &data);
        assert!(files_identical(&a, &b).unwrap());

        // One byte differs in the last, partial buffer.
        let mut other = data.clone();
        *other.last_mut().unwrap() ^= 1;
        write(&b, &other);
        assert!(!files_identical(&a, &b).unwrap());

        // One byte differs in the first buffer.
        let mut other = data.clone();
        other[0] ^= 0x80;
        write(&b, &other);
        assert!(!files_identical(&a, &b).unwrap());

        // Different lengths, same prefix.
        write(&b, &data[..data.len() - 1]);
        assert!(!files_identical(&a, &b).unwrap());

        // Empty files.
        write(&a, b"");
        write(&b, b"");
        assert!(files_identical(&a, &b).unwrap());

        assert!(files_identical(&a, &d.path().join("missing")).is_err());
    }

    #[test]
    fn sparse_equals_dense_zeros() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("sparse"), d.path().join("dense"));
        let f = File::create(&a).unwrap();
        f.set_len(2 << 20).unwrap();
        write(&b, &vec![0u8; 2 << 20]);
        assert!(files_identical(&a, &b).unwrap());
    }

    #[test]
    fn dir_bytes_counts_allocated_blocks() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let empty = dir_bytes(d.path());
        assert!(empty > 0, "directories themselves take blocks");

        // 1 MiB of data: at least 1 MiB allocated.
        write(&sub.join("data"), &vec![1u8; 1 << 20]);
        let with_data = dir_bytes(d.path());
        assert!(with_data >= empty + (1 << 20), "{with_data} vs {empty}");

        // A 1 GiB hole with one 4 KiB block written in it adds far less than its apparent size.
        let mut f = File::create(sub.join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        f.seek(SeekFrom::Start(1 << 29)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        f.sync_all().unwrap();
        let with_sparse = dir_bytes(d.path());
        assert!(with_sparse >= with_data + 4096);
        assert!(with_sparse < with_data + (16 << 20), "{with_sparse} vs {with_data}");

        // Symlinks are not followed (a link to the tree itself would otherwise loop).
        std::os::unix::fs::symlink(d.path(), sub.join("loop")).unwrap();
        assert!(dir_bytes(d.path()) < with_sparse + (1 << 20));

        assert_eq!(dir_bytes(&d.path().join("missing")), 0);
        assert_eq!(
            dir_bytes(&sub.join("data")),
            std::fs::metadata(sub.join("data")).unwrap().blocks() * 512
        );
    }
}
