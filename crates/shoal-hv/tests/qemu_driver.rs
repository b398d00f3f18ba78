//! The QEMU driver against real QEMU under TCG, for the ways VM creation and management go
//! wrong: no QEMU, a corrupt template, a guest that never becomes ready, a QMP socket that stops
//! answering, a full disk. Each must end in a failed VM with a clear reason and nothing left
//! behind: no process, no overlay, no seed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_hv::demo_template::{build_demo_template, DemoTemplate};
use shoal_hv::qemu::Accel;
use shoal_hv::{Hypervisor, QemuConfig, QemuDriver, TemplateFile, TemplateSource};
use shoal_model::agent::{VmSpec, VmStatus};
use shoal_model::{KernelBoot, MacAddr, Power, VmState};
use uuid::Uuid;

/// Serves template files from a local directory, as the controller would.
struct LocalSource(DemoTemplate);

#[async_trait::async_trait]
impl TemplateSource for LocalSource {
    async fn fetch(&self, _t: &str, file: TemplateFile, dest: &Path) -> Result<(), String> {
        let src = match file {
            TemplateFile::Disk => &self.0.disk,
            TemplateFile::Kernel => &self.0.kernel,
            TemplateFile::Initrd => &self.0.initrd,
        };
        tokio::fs::copy(src, dest).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

fn hash(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    format!("blake3:{}", h.finalize().to_hex())
}

fn spec(t: &DemoTemplate, name: &str) -> VmSpec {
    VmSpec {
        uuid: Uuid::new_v4(),
        name: name.into(),
        cpus: 1,
        memory_mib: 128,
        disk_mib: None,
        template: "demo".into(),
        template_hash: hash(&t.disk),
        template_format: "raw".into(),
        kernel_boot: Some(KernelBoot {
            kernel_hash: hash(&t.kernel),
            kernel_size: 0,
            initrd_hash: Some(hash(&t.initrd)),
            initrd_size: None,
            cmdline: t.cmdline.clone(),
        }),
        ready_pattern: Some(t.ready_pattern.clone()),
        power: Power::Running,
        force_stop: false,
        ip: "10.200.0.2".parse().unwrap(),
        prefix_len: 24,
        gateway: "10.200.0.1".parse().unwrap(),
        mac: MacAddr::qemu(0x10203),
        user_data: None,
        network: None,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    template: DemoTemplate,
}

fn fixture() -> Fixture {
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

async fn driver(f: &Fixture, tweak: impl FnOnce(&mut QemuConfig)) -> Arc<QemuDriver> {
    let mut cfg = QemuConfig::new(f.root.clone());
    cfg.accel = Some(Accel::Tcg);
    cfg.ready_timeout = Duration::from_secs(120);
    tweak(&mut cfg);
    QemuDriver::open(cfg, Arc::new(LocalSource(f.template.clone())))
        .await
        .unwrap()
}

/// Waits until the VM leaves `creating`/the given state and returns its status.
async fn settle(d: &QemuDriver, uuid: Uuid, from: VmState, timeout: Duration) -> VmStatus {
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
fn nothing_left(root: &Path, uuid: Uuid) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_qemu_binary_the_vm_fails_clearly() {
    let f = fixture();
    let d = driver(&f, |c| c.qemu = "/nonexistent/qemu-system-x86_64".into()).await;
    let s = spec(&f.template, "a-0");
    d.ensure(&s).await.unwrap();
    let st = settle(&d, s.uuid, VmState::Creating, Duration::from_secs(30)).await;
    assert_eq!(st.state, VmState::Failed);
    assert!(
        st.reason
            .as_deref()
            .unwrap()
            .contains("QEMU binary /nonexistent/qemu-system-x86_64 not found"),
        "{st:?}"
    );
    nothing_left(&f.root, s.uuid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_template_is_caught_by_its_hash() {
    let f = fixture();
    let d = driver(&f, |_| {}).await;
    let mut s = spec(&f.template, "a-0");
    s.template_hash = format!("blake3:{}", "0".repeat(64));
    d.ensure(&s).await.unwrap();
    let st = settle(&d, s.uuid, VmState::Creating, Duration::from_secs(60)).await;
    assert_eq!(st.state, VmState::Failed);
    assert!(st.reason.as_deref().unwrap().contains("corrupt or truncated"), "{st:?}");
    nothing_left(&f.root, s.uuid);
    // Nothing unverified stays in the host's template cache either.
    let cached: Vec<_> = walk(&f.root.join("templates"));
    assert!(cached.iter().all(|p| !p.ends_with("disk.raw")), "{cached:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_becomes_ready_fails_and_leaves_nothing() {
    let f = fixture();
    let d = driver(&f, |c| c.ready_timeout = Duration::from_secs(20)).await;
    let mut s = spec(&f.template, "a-0");
    s.ready_pattern = Some("a line this guest never prints".into());
    d.ensure(&s).await.unwrap();
    let st = settle(&d, s.uuid, VmState::Creating, Duration::from_secs(90)).await;
    assert_eq!(st.state, VmState::Failed);
    let reason = st.reason.unwrap();
    assert!(
        reason.contains("did not print \"a line this guest never prints\" on its console within 20s"),
        "{reason}"
    );
    // The reason shows what the guest did print.
    assert!(reason.contains("console ends with"), "{reason}");
    nothing_left(&f.root, s.uuid);
    d.remove(s.uuid).await.unwrap();
    assert!(!f.root.join("vms").join(s.uuid.to_string()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_whose_qmp_stops_answering_is_fenced() {
    let f = fixture();
    let d = driver(&f, |c| c.qmp_timeout = Duration::from_secs(3)).await;
    let s = spec(&f.template, "a-0");
    d.ensure(&s).await.unwrap();
    let st = settle(&d, s.uuid, VmState::Creating, Duration::from_secs(150)).await;
    assert_eq!(st.state, VmState::Running, "{st:?}");
    let pid: i32 = std::fs::read_to_string(f.root.join("vms").join(s.uuid.to_string()).join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Freeze QEMU: its QMP socket accepts connections but never answers.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut suspend = s.clone();
    suspend.power = Power::Suspended;
    d.ensure(&suspend).await.unwrap();
    let st = settle(&d, s.uuid, VmState::Running, Duration::from_secs(60)).await;
    assert_eq!(st.state, VmState::Failed, "{st:?}");
    assert!(
        st.reason.as_deref().unwrap().contains("QMP stopped answering"),
        "{st:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z"),
        "QEMU {pid} still alive"
    );
    d.remove(s.uuid).await.unwrap();
    nothing_left(&f.root, s.uuid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_creating_the_overlay_fails_cleanly() {
    let f = fixture();
    let d = driver(&f, |_| {}).await;
    // The VMs' directory on a 64 KiB filesystem: the overlay and seed cannot fit.
    let vms = f.root.join("vms");
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&vms)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a small tmpfs needs root (tests run as root in CI)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(vms.clone());
    let s = spec(&f.template, "a-0");
    d.ensure(&s).await.unwrap();
    let st = settle(&d, s.uuid, VmState::Creating, Duration::from_secs(60)).await;
    assert_eq!(st.state, VmState::Failed);
    assert!(
        st.reason.as_deref().unwrap().contains("No space left on device"),
        "{st:?}"
    );
    nothing_left(&f.root, s.uuid);
}
