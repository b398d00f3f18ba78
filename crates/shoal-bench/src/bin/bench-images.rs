//! `make bench-images`: Shoal's image store against the tools a user would pick instead, on the VM
//! disk image corpus of `../shared/bench/make-corpus.sh` (seven 2 GiB Debian images).
//!
//! 1. The data of every image is read once so that all the tools read the same files from the
//!    page cache.
//! 2. Each tool, one after the other in this run, ingests all the images into a fresh repository
//!    (timed; ingest MB/s = logical bytes / time), then restores `base+python.raw` (timed) and the
//!    result is compared with the original byte for byte. Stored = allocated bytes of the
//!    repository (for Shoal, of the store directory; the store's own figure is printed too).
//! 3. Transfer: a host whose store holds only `base` deploys `python` (built separately) and
//!    `base+python` (derived from base): the compressed bytes that would cross the wire, against
//!    the image's size; the host's copy is then exported and checked byte for byte.
//!
//! Usage: bench-images [--corpus DIR] [--images a,b,..] [--restore NAME] [--only shoal,borg,casync,restic]
//!                     [--work DIR (absent or empty; removed at the end)]
//! The corpus is DIR/raw/NAME.raw; DIR defaults to `$SHOAL_CORPUS`, else `/var/tmp/shoal-corpus/corpus`.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use serde_json::{json, Value};
use shoal_bench::competitors::{self, dir_bytes, files_identical, Scratch, ToolResult};
use shoal_bench::print_table;
use shoal_image::{ImageFormat, ImageStore, ImportOptions, ManifestId};

/// The corpus, in the order every tool ingests it.
const IMAGES: [&str; 7] = ["base", "python", "build", "java", "pgsql", "base+python", "base+java"];
const TOOLS: [&str; 4] = ["shoal", "borg", "casync", "restic"];
const DEFAULT_CORPUS: &str = "/var/tmp/shoal-corpus/corpus";
const DEFAULT_WORK: &str = "/var/tmp/shoal-bench-work";

/// Figures measured earlier on this machine class (`../shared/bench/README.md`), used as targets
/// when the tool did not run in this run.
const REF_CASYNC_STORED: f64 = 704e6;
const REF_BORG_INGEST_MB_S: f64 = 317.0;
const REF_BORG_RESTORE_S: f64 = 5.8;
/// Target for the bytes sent to a host that holds `base`, as a share of the image's size.
const TRANSFER_TARGET: f64 = 0.05;

struct Args {
    corpus: PathBuf,
    images: Vec<String>,
    restore: String,
    tools: Vec<String>,
    work: PathBuf,
}

fn usage() -> &'static str {
    "usage: bench-images [--corpus DIR] [--images a,b,..] [--restore NAME] [--only shoal,borg,casync,restic] [--work DIR]"
}

fn args() -> anyhow::Result<Args> {
    let list = |v: &str| {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let mut a = Args {
        corpus: std::env::var_os("SHOAL_CORPUS").map_or_else(|| PathBuf::from(DEFAULT_CORPUS), PathBuf::from),
        images: IMAGES.iter().map(|s| s.to_string()).collect(),
        restore: "base+python".into(),
        tools: TOOLS.iter().map(|s| s.to_string()).collect(),
        work: PathBuf::from(DEFAULT_WORK),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{}", usage());
            std::process::exit(0);
        }
        let v = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{}", usage()))?;
        match flag.as_str() {
            "--corpus" => a.corpus = PathBuf::from(v),
            "--images" => a.images = list(&v),
            "--restore" => a.restore = v,
            "--only" => a.tools = list(&v),
            "--work" => a.work = PathBuf::from(v),
            _ => anyhow::bail!("unknown flag {flag}\n{}", usage()),
        }
    }
    for t in &a.tools {
        anyhow::ensure!(
            TOOLS.contains(&t.as_str()),
            "--only: unknown tool {t:?} (known: {})",
            TOOLS.join(", ")
        );
    }
    anyhow::ensure!(!a.images.is_empty(), "--images: no image given");
    anyhow::ensure!(
        a.images.contains(&a.restore),
        "--restore {}: not among the ingested images ({})",
        a.restore,
        a.images.join(", ")
    );
    Ok(a)
}

/// One image of the corpus.
struct Image {
    name: String,
    path: PathBuf,
    logical: u64,
    allocated: u64,
}

/// What identifies an image's content cheaply: a rebuild of the corpus during the run changes it.
fn fingerprint(images: &[Image]) -> Vec<(i64, i64, u64, u64)> {
    images
        .iter()
        .map(|i| std::fs::metadata(&i.path).map_or((0, 0, 0, 0), |m| (m.mtime(), m.mtime_nsec(), m.len(), m.blocks())))
        .collect()
}

/// The images, or a loud error saying how to build the corpus.
fn corpus(dir: &Path, names: &[String]) -> anyhow::Result<Vec<Image>> {
    let missing: Vec<String> = names
        .iter()
        .map(|n| dir.join("raw").join(format!("{n}.raw")))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        let bar = "=".repeat(100);
        eprintln!("{bar}");
        eprintln!("ERROR: no VM image corpus at {}", dir.display());
        eprintln!("  missing: {}", missing.join(", "));
        eprintln!("Build it once (root, about 11 minutes, about 15 GB under /var/tmp/shoal-corpus):");
        eprintln!("    sudo ../shared/bench/make-corpus.sh");
        eprintln!(
            "(`make bench-images` builds it when absent), or point --corpus DIR / SHOAL_CORPUS at a built corpus."
        );
        eprintln!("{bar}");
        anyhow::bail!("no corpus at {}", dir.display());
    }
    // make-corpus.sh writes sizes.tsv once every raw image is written (and the qcow2 copies this
    // benchmark does not read): without it an image may be half-written.
    let sizes = dir.join("manifests/sizes.tsv");
    if !sizes.is_file() {
        eprintln!(
            "WARNING: {} is missing: the corpus build did not finish (or is still running); \
             the raw images may be incomplete. `make bench-images` completes it.",
            sizes.display()
        );
    }
    names
        .iter()
        .map(|n| {
            let path = std::fs::canonicalize(dir.join("raw").join(format!("{n}.raw")))?;
            let md = std::fs::metadata(&path)?;
            Ok(Image {
                name: n.clone(),
                path,
                logical: md.len(),
                allocated: md.blocks() * 512,
            })
        })
        .collect()
}

/// Reads the data of every image once (holes are not cached, nor read from disk by anyone) so that
/// no tool pays for the first read from disk.
fn warm_page_cache(images: &[Image]) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut buf = vec![0u8; 4 << 20];
    for img in images {
        let f = std::fs::File::open(&img.path).with_context(|| format!("opening {}", img.path.display()))?;
        for (mut at, end) in data_extents(&f, img.logical) {
            while at < end {
                let want = (end - at).min(buf.len() as u64) as usize;
                let n = f.read_at(&mut buf[..want], at)?;
                if n == 0 {
                    break;
                }
                at += n as u64;
            }
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The (start, end) ranges of `f` that hold data, by SEEK_DATA/SEEK_HOLE; the whole file where the
/// filesystem cannot tell.
fn data_extents(f: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let data = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break,
            Err(_) => return vec![(0, size)],
        };
        let hole = lseek(fd, data as i64, Whence::SeekHole)
            .map_or(size, |h| h as u64)
            .min(size);
        out.push((data, hole));
        at = hole;
    }
    out
}

/// The 1-minute load average: the machine is shared, and other work skews single runs.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn mb(b: f64) -> f64 {
    b / 1e6
}

/// What Shoal measured besides the common figures.
struct ShoalRun {
    result: ToolResult,
    store_stats: Value,
    store_stored_bytes: u64,
    imports: Vec<Vec<String>>,
    transfer: Option<(Vec<Vec<String>>, Value)>,
}

fn run_shoal(images: &[Image], restore: &Image, work: &Path) -> anyhow::Result<ShoalRun> {
    let dir = Scratch::new(work, "shoal")?;
    let store_dir = dir.0.join("store");
    let store = ImageStore::open(&store_dir).with_context(|| format!("opening a store at {}", store_dir.display()))?;

    let mut manifests = BTreeMap::<String, ManifestId>::new();
    let mut imports = Vec::new();
    let t = Instant::now();
    for img in images {
        let ti = Instant::now();
        // The corpus is raw by construction: no format sniffing, as the other tools do none.
        // Ref names have no '+': base+python is named base-python.
        let ref_name = img.name.replace('+', "-");
        let opts = ImportOptions {
            format: Some(ImageFormat::Raw),
            ref_name: Some(&ref_name),
            ..Default::default()
        };
        let rep = store
            .import_path(&img.path, &opts)
            .with_context(|| format!("importing {}", img.path.display()))?;
        let s = ti.elapsed().as_secs_f64();
        imports.push(vec![
            img.name.clone(),
            format!("{:.0}", mb(rep.logical_bytes as f64)),
            format!("{:.0}", mb(rep.read_bytes as f64)),
            format!("{}", rep.new_chunks),
            format!("{:.1}", mb(rep.new_stored_bytes as f64)),
            format!("{s:.2}"),
            format!("{:.0}", mb(rep.logical_bytes as f64) / s),
        ]);
        manifests.insert(img.name.clone(), rep.manifest);
    }
    let ingest_s = t.elapsed().as_secs_f64();
    let stats = store.stats()?;
    let stored = dir_bytes(&store_dir);

    let out = dir.0.join("restored.raw");
    let t = Instant::now();
    store.export(&manifests[&restore.name], &out, ImageFormat::Raw, None)?;
    let restore_s = t.elapsed().as_secs_f64();
    let identical = files_identical(&restore.path, &out)?;
    std::fs::remove_file(&out)?;

    let transfer = match images.iter().find(|i| i.name == "base") {
        Some(base) => Some(transfers(&store, &manifests, base, images, &dir.0)?),
        None => None,
    };
    let logical: u64 = images.iter().map(|i| i.logical).sum();
    Ok(ShoalRun {
        result: ToolResult::new(
            format!("shoal {}", env!("CARGO_PKG_VERSION")),
            shoal_settings(),
            stored,
            ingest_s,
            logical,
            restore_s,
            identical,
        ),
        store_stats: serde_json::to_value(&stats)?,
        store_stored_bytes: stats.stored_bytes,
        imports,
        transfer,
    })
}

/// The store's format, from the crate's own constants.
fn shoal_settings() -> String {
    let p = shoal_image::ChunkParams::V1;
    let kib = |blocks: u32| blocks as usize * shoal_image::chunker::BLOCK / 1024;
    format!(
        "one manifest per image; 4 KiB-aligned CDC {}..{} KiB, cut p=2^-{}/block, BLAKE3, zstd -{} per chunk, packs; export raw",
        kib(p.min_blocks),
        kib(p.max_blocks),
        p.mask_bits,
        shoal_image::blob::ZSTD_LEVEL
    )
}

/// A host whose store holds only `base` receives `python`, then (afresh) `base+python`, from `src`.
fn transfers(
    src: &ImageStore,
    manifests: &BTreeMap<String, ManifestId>,
    base: &Image,
    images: &[Image],
    dir: &Path,
) -> anyhow::Result<(Vec<Vec<String>>, Value)> {
    let mut rows = Vec::new();
    let mut out = serde_json::Map::new();
    out.insert("host_holds".into(), json!("base"));
    for img in images.iter().filter(|i| i.name == "python" || i.name == "base+python") {
        let host_dir = dir.join(format!("host-{}", img.name));
        let host = ImageStore::open(&host_dir)?;
        host.import_path(
            &base.path,
            &ImportOptions {
                format: Some(ImageFormat::Raw),
                ..Default::default()
            },
        )?;
        let t = Instant::now();
        let tr = ImageStore::transfer(src, &host, &manifests[&img.name])?;
        let secs = t.elapsed().as_secs_f64();
        // The host must now be able to materialise the image by itself.
        let restored = host_dir.join("check.raw");
        let identical = match host.export(&manifests[&img.name], &restored, ImageFormat::Raw, None) {
            Ok(_) => files_identical(&img.path, &restored)?,
            Err(e) => {
                eprintln!("transfer of {}: the host cannot export it afterwards: {e}", img.name);
                false
            }
        };
        drop(host);
        let _ = std::fs::remove_dir_all(&host_dir);
        let pct = |of: u64| 100.0 * tr.bytes_sent as f64 / of as f64;
        rows.push(vec![
            img.name.clone(),
            format!("{}/{}", tr.chunks_sent, tr.chunks_total),
            format!("{:.1}", mb(tr.bytes_sent as f64)),
            format!("{:.0}", mb(img.logical as f64)),
            format!("{:.2} %", pct(img.logical)),
            format!("{:.0}", mb(img.allocated as f64)),
            format!("{:.1} %", pct(img.allocated)),
            format!("{secs:.2}"),
            if identical { "yes".into() } else { "NO".into() },
        ]);
        out.insert(
            img.name.clone(),
            json!({
                "bytes_sent": tr.bytes_sent,
                "chunks_sent": tr.chunks_sent,
                "chunks_total": tr.chunks_total,
                "image_bytes": img.logical,
                "image_allocated_bytes": img.allocated,
                "sent_pct_of_image": pct(img.logical),
                "sent_pct_of_allocated": pct(img.allocated),
                "transfer_s": secs,
                "identical": identical,
            }),
        );
    }
    Ok((rows, Value::Object(out)))
}

fn tool_json(r: &ToolResult) -> Value {
    json!({
        "version": r.tool,
        "settings": r.settings,
        "stored_bytes": r.stored_bytes,
        "logical_bytes": r.logical_bytes,
        "ingest_s": r.ingest_s,
        "ingest_mb_s": r.ingest_mb_s,
        "restore_s": r.restore_s,
        "identical": r.restored_identical,
    })
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let images = corpus(&a.corpus, &a.images)?;
    let restore = images.iter().find(|i| i.name == a.restore).context("restore image")?;
    let logical: u64 = images.iter().map(|i| i.logical).sum();
    let allocated: u64 = images.iter().map(|i| i.allocated).sum();
    let paths: Vec<PathBuf> = images.iter().map(|i| i.path.clone()).collect();
    let runs = |t: &str| a.tools.iter().any(|x| x == t);
    if ["borg", "casync", "restic"].iter().any(|t| runs(t)) {
        competitors::ensure_installed()?;
    }
    // The work directory is removed at the end: refuse one that holds anything but a leftover of
    // an interrupted run in the default place.
    let leftover = std::fs::read_dir(&a.work).is_ok_and(|mut d| d.next().is_some());
    anyhow::ensure!(
        !leftover || a.work == Path::new(DEFAULT_WORK),
        "--work {}: not empty (it is removed at the end; give a new directory)",
        a.work.display()
    );
    std::fs::create_dir_all(&a.work).with_context(|| format!("creating {}", a.work.display()))?;
    let _work = Scratch(std::path::absolute(&a.work)?);
    let load_before = loadavg();
    let before = fingerprint(&images);
    let warm_s = warm_page_cache(&images)?;

    let mut results: Vec<(String, Result<ToolResult, String>)> = Vec::new();
    let mut shoal = None;
    for tool in TOOLS.iter().filter(|t| runs(t)) {
        eprintln!(
            "{tool}: ingesting {} images ({:.2} GB logical) and restoring {}",
            images.len(),
            logical as f64 / 1e9,
            restore.name
        );
        let r = match *tool {
            "shoal" => run_shoal(&images, restore, &a.work).map(|s| {
                let r = s.result.clone();
                shoal = Some(s);
                r
            }),
            "borg" => competitors::run_borg(&paths, &restore.path, &a.work),
            "casync" => competitors::run_casync(&paths, &restore.path, &a.work),
            "restic" => competitors::run_restic(&paths, &restore.path, &a.work),
            _ => unreachable!("tools are checked in args()"),
        };
        if let Err(e) = &r {
            eprintln!("{tool}: FAILED: {e:#}");
        }
        results.push((tool.to_string(), r.map_err(|e| format!("{e:#}"))));
    }

    let corpus_changed = fingerprint(&images) != before;
    let load_after = loadavg();
    if corpus_changed {
        let w = "WARNING: the corpus images changed during the run (a corpus build running?): these figures are void.";
        eprintln!("{w}");
        println!("{w}");
    }
    println!(
        "Corpus {}: {} images ({}), {:.2} GB logical, {:.2} GB allocated; restore of {}.raw",
        a.corpus.display(),
        images.len(),
        a.images.join(", "),
        logical as f64 / 1e9,
        allocated as f64 / 1e9,
        restore.name
    );
    println!(
        "Same files, same run, one tool after the other; images read from the page cache (their data all read once first, {warm_s:.1} s). \
         Stored = allocated bytes of the repository (caches outside it). Restore = to a file, fsync included. MB = 10^6 bytes."
    );
    println!(
        "Single runs; load average {load_before} before, {load_after} after ({} cores).",
        cores()
    );
    println!();
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(t, r)| match r {
            Ok(r) => vec![
                r.tool.clone(),
                r.settings.clone(),
                format!("{:.0}", mb(r.stored_bytes as f64)),
                format!("{:.0}", r.ingest_mb_s),
                format!("{:.2}", r.restore_s),
                if r.restored_identical {
                    "yes".into()
                } else {
                    "NO".into()
                },
            ],
            Err(e) => {
                let first: String = e.lines().next().unwrap_or_default().chars().take(100).collect();
                vec![
                    t.clone(),
                    format!("FAILED: {first}"),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]
            }
        })
        .collect();
    print_table(
        &["tool", "settings", "stored MB", "ingest MB/s", "restore s", "identical"],
        &rows,
    );

    let ok = |t: &str| results.iter().find(|(n, _)| n == t).and_then(|(_, r)| r.as_ref().ok());
    let mut out = serde_json::Map::new();
    out.insert("bench".into(), json!("images"));
    out.insert(
        "corpus".into(),
        json!({"dir": a.corpus, "images": a.images, "restore": restore.name, "logical_bytes": logical, "allocated_bytes": allocated,
               "changed_during_run": corpus_changed}),
    );
    out.insert(
        "machine".into(),
        json!({"cores": cores(), "loadavg_before": load_before, "loadavg_after": load_after}),
    );
    for (t, r) in &results {
        out.insert(t.clone(), r.as_ref().map_or_else(|e| json!({ "error": e }), tool_json));
    }

    if let (Some(s), Some(r)) = (&shoal, ok("shoal")) {
        println!();
        println!(
            "Shoal store: {:.1} MB by its own count, {:.1} MB allocated in its directory; stats {}",
            mb(s.store_stored_bytes as f64),
            mb(r.stored_bytes as f64),
            s.store_stats
        );
        println!();
        println!("Shoal import, image by image");
        print_table(
            &[
                "image",
                "logical MB",
                "read MB",
                "new chunks",
                "new stored MB",
                "s",
                "MB/s",
            ],
            &s.imports,
        );
        if let Some(o) = out.get_mut("shoal").and_then(Value::as_object_mut) {
            o.insert("store_stored_bytes".into(), json!(s.store_stored_bytes));
            o.insert("store_stats".into(), s.store_stats.clone());
        }
        if let Some((rows, v)) = &s.transfer {
            println!();
            println!("Transfer to a host whose store holds only base (compressed bytes that would cross the wire)");
            print_table(
                &[
                    "image",
                    "chunks sent",
                    "sent MB",
                    "image MB",
                    "sent / image",
                    "allocated MB",
                    "sent / allocated",
                    "s",
                    "identical",
                ],
                rows,
            );
            out.insert("transfer".into(), v.clone());
        }

        // Targets: against this run's figures when the tool ran (same machine, same moment), else
        // the README's.
        let pick = |t: &str, f: fn(&ToolResult) -> f64, reference: f64, show: &dyn Fn(f64) -> String| {
            ok(t).map_or((reference, "README figure".to_string()), |r| {
                (f(r), format!("this run; README {}", show(reference)))
            })
        };
        let (casync_stored, cs) = pick("casync", |r| r.stored_bytes as f64, REF_CASYNC_STORED, &|v| {
            format!("{:.0}", mb(v))
        });
        let (borg_ingest, bi) = pick("borg", |r| r.ingest_mb_s, REF_BORG_INGEST_MB_S, &|v| format!("{v:.0}"));
        let (borg_restore, br) = pick("borg", |r| r.restore_s, REF_BORG_RESTORE_S, &|v| format!("{v:.1}"));
        let yes = |b: bool| if b { "yes" } else { "NO" }.to_string();
        let mut targets = vec![
            vec![
                "stored MB".into(),
                format!("{:.0}", mb(r.stored_bytes as f64)),
                format!("< casync's {:.0} ({cs})", mb(casync_stored)),
                yes((r.stored_bytes as f64) < casync_stored),
            ],
            vec![
                "ingest MB/s".into(),
                format!("{:.0}", r.ingest_mb_s),
                format!(">= 3 x borg's {borg_ingest:.0} ({bi})"),
                yes(r.ingest_mb_s >= 3.0 * borg_ingest),
            ],
            vec![
                "restore s".into(),
                format!("{:.2}", r.restore_s),
                format!("< borg's {borg_restore:.2} ({br})"),
                yes(r.restore_s < borg_restore),
            ],
        ];
        if let Some(p) = s
            .transfer
            .as_ref()
            .and_then(|(_, v)| v["python"]["sent_pct_of_image"].as_f64())
        {
            targets.push(vec![
                "python to a host with base, sent / image".into(),
                format!("{p:.2} %"),
                format!("< {:.0} %", TRANSFER_TARGET * 100.0),
                yes(p < TRANSFER_TARGET * 100.0),
            ]);
        }
        println!();
        print_table(&["target", "shoal", "goal", "met"], &targets);
    }
    println!("{}", Value::Object(out));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn data_extents_skip_holes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse.raw");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(16 << 20)).unwrap();
        f.write_all(&[1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let ext = data_extents(&std::fs::File::open(&p).unwrap(), 64 << 20);
        let data: u64 = ext.iter().map(|(s, e)| e - s).sum();
        assert!(ext.iter().any(|&(s, e)| s <= 16 << 20 && e >= 17 << 20), "{ext:?}");
        assert!(data < 8 << 20, "holes are skipped: {ext:?}");
    }

    #[test]
    fn missing_corpus_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(corpus(d.path(), &["base".into()]).is_err());
        std::fs::create_dir(d.path().join("raw")).unwrap();
        std::fs::write(d.path().join("raw/base.raw"), [0u8; 4096]).unwrap();
        let imgs = corpus(d.path(), &["base".into()]).unwrap();
        assert_eq!((imgs[0].name.as_str(), imgs[0].logical), ("base", 4096));
        assert!(corpus(d.path(), &["base".into(), "python".into()]).is_err());
    }
}
