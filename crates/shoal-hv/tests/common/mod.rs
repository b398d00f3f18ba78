//! What the QEMU tests share: a demo template served as the controller would (with an image
//! store for checkpoints), VM specs for it, a driver under TCG, a guest that keeps writing, and
//! waiting for VMs to settle.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_demo::{build_demo_template, DemoTemplate};
use shoal_hv::qemu::Accel;
use shoal_hv::{
    DiskChange, Hypervisor, QemuConfig, QemuDriver, SourceError, StoredChanges, TemplateFile, TemplateSource,
};
use shoal_model::agent::{VmSpec, VmStatus};
use shoal_model::{KernelBoot, MacAddr, TemplateDisk, VmState};
use uuid::Uuid;

/// Serves template files from a local directory, as the controller would. The first
/// `unreachable` fetches fail as an unreachable controller's would.
pub struct LocalSource {
    pub template: DemoTemplate,
    pub unreachable: AtomicUsize,
}

impl LocalSource {
    pub fn new(template: DemoTemplate) -> LocalSource {
        LocalSource {
            template,
            unreachable: AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl TemplateSource for LocalSource {
    async fn fetch(&self, t: &str, file: TemplateFile, dest: &Path) -> Result<(), SourceError> {
        let failing = self
            .unreachable
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(SourceError::Unreachable {
                what: format!("template {t}"),
                source: "connection refused (simulated)".into(),
            });
        }
        let src = match file {
            TemplateFile::Disk => &self.template.disk,
            TemplateFile::Kernel => &self.template.kernel,
            TemplateFile::Initrd => &self.template.initrd,
        };
        tokio::fs::copy(src, dest)
            .await
            .map(|_| ())
            .map_err(|source| SourceError::Io {
                path: dest.to_path_buf(),
                source,
            })
    }
}

/// A controller's image store, as far as checkpoints need one: images are raw files named by
/// the BLAKE3 hash (hex) of their bytes, the template's disk the first of them. Template files
/// come from a [`LocalSource`]; `fetch_image` serves stored images; `store_changes` copies the
/// parent image and lays the changes over it. The first `fail_store` stores fail as an
/// unreachable controller's would.
pub struct ImageStore {
    local: LocalSource,
    dir: PathBuf,
    images: Mutex<HashMap<String, PathBuf>>,
    pub fail_store: AtomicUsize,
    /// Every template file fetched, in order.
    pub fetched: Mutex<Vec<TemplateFile>>,
}

impl ImageStore {
    pub fn new(template: DemoTemplate, dir: &Path) -> ImageStore {
        std::fs::create_dir_all(dir).unwrap();
        let images = HashMap::from([(disk_id(&template), template.disk.clone())]);
        ImageStore {
            local: LocalSource::new(template),
            dir: dir.to_path_buf(),
            images: Mutex::new(images),
            fail_store: AtomicUsize::new(0),
            fetched: Mutex::new(Vec::new()),
        }
    }

    /// The id of the template's disk.
    pub fn template_id(&self) -> String {
        disk_id(&self.local.template)
    }

    /// Where the image `id` is kept.
    pub fn image(&self, id: &str) -> PathBuf {
        self.images
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_else(|| panic!("no image {id} in the store"))
    }

    fn lay_over(parent: &Path, changes: &[DiskChange], data: &Path, size: u64, tmp: &Path) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        std::fs::copy(parent, tmp)?;
        let out = std::fs::OpenOptions::new().write(true).open(tmp)?;
        if out.metadata()?.len() < size {
            out.set_len(size)?;
        }
        let data = std::fs::File::open(data)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut read = 0;
        for c in changes {
            let mut at = c.offset;
            while at < c.offset + c.len {
                let n = (c.offset + c.len - at).min(buf.len() as u64) as usize;
                if c.zero {
                    buf[..n].fill(0);
                } else {
                    data.read_exact_at(&mut buf[..n], at)?;
                    read += n as u64;
                }
                out.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
        }
        Ok(read)
    }
}

/// The id of the template's disk in an [`ImageStore`].
pub fn disk_id(t: &DemoTemplate) -> String {
    blake3_hex(&t.disk)
}

fn blake3_hex(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

#[async_trait::async_trait]
impl TemplateSource for ImageStore {
    async fn fetch(&self, t: &str, file: TemplateFile, dest: &Path) -> Result<(), SourceError> {
        self.fetched.lock().unwrap().push(file);
        self.local.fetch(t, file, dest).await
    }

    async fn fetch_image(&self, template: &str, manifest: &str, dest: &Path) -> Result<(), SourceError> {
        let src = self.images.lock().unwrap().get(manifest).cloned();
        let src = src.ok_or_else(|| SourceError::Missing {
            what: format!("image {manifest} of template {template}"),
            reason: "not in the store".into(),
        })?;
        tokio::fs::copy(&src, dest)
            .await
            .map(|_| ())
            .map_err(|source| SourceError::Io {
                path: dest.to_path_buf(),
                source,
            })
    }

    async fn store_changes(
        &self,
        parent: &str,
        changes: &[DiskChange],
        data: &Path,
        size: u64,
    ) -> Result<StoredChanges, SourceError> {
        if self
            .fail_store
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SourceError::Unreachable {
                what: "the image store".into(),
                source: "connection refused (simulated)".into(),
            });
        }
        let parent_path = self.images.lock().unwrap().get(parent).cloned();
        let parent_path = parent_path.ok_or_else(|| SourceError::Missing {
            what: format!("parent image {parent}"),
            reason: "not in the store".into(),
        })?;
        let tmp = self.dir.join(format!("new-{}.raw", Uuid::new_v4()));
        let (changes, data, t) = (changes.to_vec(), data.to_path_buf(), tmp.clone());
        let read = tokio::task::spawn_blocking(move || Self::lay_over(&parent_path, &changes, &data, size, &t))
            .await
            .unwrap()
            .map_err(|source| SourceError::Io {
                path: tmp.clone(),
                source,
            })?;
        let manifest = blake3_hex(&tmp);
        let path = self.dir.join(format!("{manifest}.raw"));
        std::fs::rename(&tmp, &path).unwrap();
        self.images.lock().unwrap().insert(manifest.clone(), path);
        Ok(StoredChanges {
            manifest,
            read_bytes: read,
            chunks: size.div_ceil(1 << 20),
            chunks_sent: 0,
            bytes_sent: read,
        })
    }
}

pub fn hash(p: &Path) -> String {
    TemplateDisk::File(blake3_hex(p)).to_string()
}

pub fn spec(t: &DemoTemplate, name: &str) -> VmSpec {
    VmSpec {
        template: "demo".into(),
        template_hash: hash(&t.disk),
        kernel_boot: Some(KernelBoot {
            kernel_hash: hash(&t.kernel),
            kernel_size: 0,
            initrd_hash: Some(hash(&t.initrd)),
            initrd_size: None,
            cmdline: t.cmdline.clone(),
        }),
        ready: shoal_model::Readiness::Report,
        mac: MacAddr::qemu(0x10203),
        ..VmSpec::example(name)
    }
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub template: DemoTemplate,
}

/// A demo template in a temporary directory. Without QEMU the test fails saying so: these tests
/// never pass by skipping.
pub fn fixture() -> Fixture {
    assert!(
        Path::new("/usr/bin/qemu-system-x86_64").exists(),
        "qemu-system-x86_64 is not installed: run scripts/install-deps.sh (make test does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let template = build_demo_template(&dir.path().join("template")).expect("building the demo template");
    Fixture {
        root: dir.path().join("host"),
        _dir: dir,
        template,
    }
}

pub async fn driver(f: &Fixture, tweak: impl FnOnce(&mut QemuConfig)) -> Arc<QemuDriver> {
    driver_with(f, Arc::new(LocalSource::new(f.template.clone())), tweak).await
}

pub async fn driver_with(
    f: &Fixture,
    source: Arc<dyn TemplateSource>,
    tweak: impl FnOnce(&mut QemuConfig),
) -> Arc<QemuDriver> {
    let mut cfg = QemuConfig::new(f.root.clone());
    cfg.accel = Some(Accel::Tcg);
    cfg.ready_timeout = Duration::from_secs(120);
    tweak(&mut cfg);
    QemuDriver::open(cfg, source).await.unwrap()
}

/// Waits until the VM leaves state `from` and returns its status.
pub async fn settle(d: &dyn Hypervisor, uuid: Uuid, from: VmState, timeout: Duration) -> VmStatus {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let s = d.list().await.into_iter().find(|v| v.uuid == uuid).expect("VM listed");
        if s.state != from {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "VM stayed {from:?} for {timeout:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// No process of this VM runs, and its overlay and seed are gone.
pub fn nothing_left(root: &Path, uuid: Uuid) {
    let dir = root.join("vms").join(uuid.to_string());
    for f in ["disk.qcow2", "seed.img", "memory.state"] {
        assert!(!dir.join(f).exists(), "{f} left behind");
    }
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(p.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c);
            assert!(
                !(c.contains("qemu") && c.contains(&uuid.to_string())),
                "QEMU of {uuid} still runs: {c}"
            );
        }
    }
}

/// How long a demo guest may take to boot under TCG on a loaded host.
pub const BOOT: Duration = Duration::from_secs(240);

/// Counts in RAM (a file in the guest's tmpfs), appends each count to a file on its root disk
/// and syncs it, and prints it: a guest that keeps rewriting its memory and its disk.
pub const COUNTER: &str = "#!/bin/sh
n=0
while :; do
  n=$(( $(cat /tmp/count 2>/dev/null || echo 0) + 1 ))
  echo $n >/tmp/count
  echo $n >>/var/lib/shoal/counts
  sync
  echo \"count $n\"
done
";

pub fn counter_spec(f: &Fixture, name: &str) -> VmSpec {
    VmSpec {
        user_data: Some(COUNTER.into()),
        ..spec(&f.template, name)
    }
}

pub async fn status(d: &QemuDriver, uuid: Uuid) -> shoal_model::agent::VmStatus {
    d.list().await.into_iter().find(|v| v.uuid == uuid).expect("VM listed")
}

pub async fn boot(d: &QemuDriver, s: &VmSpec) {
    d.ensure(s).await.unwrap();
    let end = tokio::time::Instant::now() + BOOT;
    loop {
        let st = status(d, s.uuid).await;
        match st.state {
            VmState::Running => return,
            VmState::Creating => {}
            _ => panic!("boot failed: {st:?}"),
        }
        assert!(tokio::time::Instant::now() < end, "not running after {BOOT:?}: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn console(d: &QemuDriver, uuid: Uuid) -> String {
    d.console(uuid, 0, 64 << 20).await.unwrap().data
}

/// The values of the complete `PREFIX N` lines of a console, in order.
pub fn numbers(console: &str, prefix: &str) -> Vec<u64> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix(prefix)?.trim().parse().ok())
        .collect()
}

pub fn counts(console: &str) -> Vec<u64> {
    numbers(console, "user-data: count ")
}

/// Waits until the console shows a `PREFIX N` line with N above `above`; returns the last N.
pub async fn wait_number(d: &QemuDriver, uuid: Uuid, prefix: &str, above: u64, timeout: Duration) -> u64 {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let text = console(d, uuid).await;
        if let Some(&n) = numbers(&text, prefix).last().filter(|n| **n > above) {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no {prefix:?} above {above} within {timeout:?}; console ends with {:?}",
            &text[text.len().saturating_sub(300)..]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn wait_count(d: &QemuDriver, uuid: Uuid, above: u64) -> u64 {
    wait_number(d, uuid, "user-data: count ", above, Duration::from_secs(120)).await
}

/// The process is gone (or a zombie nobody reaped yet).
pub fn dead(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(true)
}

/// No QEMU runs with a file under `dir` on its command line.
pub fn no_qemu_under(dir: &Path) {
    let dir = dir.to_string_lossy();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(c) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&c);
        let pid = p.file_name().to_string_lossy().parse::<i32>().unwrap_or(0);
        assert!(
            !(c.contains("qemu-system") && c.contains(dir.as_ref())) || dead(pid),
            "a QEMU still runs under {dir}: {c}"
        );
    }
}

pub fn qemu_img_compare(a: &Path, b: &Path) -> (bool, String) {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
