//! What the QEMU tests share: a demo template served as the controller would, VM specs for
//! it, a driver under TCG, and waiting for VMs to settle.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_demo::{build_demo_template, DemoTemplate};
use shoal_hv::qemu::Accel;
use shoal_hv::{Hypervisor, QemuConfig, QemuDriver, SourceError, TemplateFile, TemplateSource};
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

pub fn hash(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    TemplateDisk::File(h.finalize().to_hex().to_string()).to_string()
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
