//! The QEMU driver against real QEMU under TCG, for the ways VM creation and management go
//! wrong: no QEMU, a corrupt template, a bad template hash, a template source out of reach, a
//! guest that never becomes ready, a QMP socket that stops answering, a full disk. Each must end
//! in a VM with a clear reason and nothing left behind: no process, no overlay, no seed. What
//! every driver does when things go right is in `conformance.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{driver, driver_with, fixture, nothing_left, settle, spec, LocalSource};
use shoal_hv::Hypervisor;
use shoal_model::{Power, VmState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_qemu_binary_the_vm_fails_clearly() {
    let f = fixture();
    let d = driver(&f, |c| c.qemu = "/nonexistent/qemu-system-x86_64".into()).await;
    let s = spec(&f.template, "a-0");
    d.ensure(&s).await.unwrap();
    let st = settle(d.as_ref(), s.uuid, VmState::Creating, Duration::from_secs(30)).await;
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
    s.template_hash = shoal_model::TemplateDisk::File("0".repeat(64)).to_string();
    d.ensure(&s).await.unwrap();
    let st = settle(d.as_ref(), s.uuid, VmState::Creating, Duration::from_secs(60)).await;
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
    s.ready = shoal_model::Readiness::Pattern("a line this guest never prints".into());
    d.ensure(&s).await.unwrap();
    let st = settle(d.as_ref(), s.uuid, VmState::Creating, Duration::from_secs(90)).await;
    assert_eq!(st.state, VmState::Failed);
    let reason = st.reason.unwrap();
    assert!(
        reason.contains("did not report within 20s: no \"a line this guest never prints\" on its console"),
        "{reason}"
    );
    // The reason shows what the guest did print.
    assert!(reason.contains("console ends with"), "{reason}");
    nothing_left(&f.root, s.uuid);
    d.remove(s.uuid).await.unwrap();
    assert!(!f.root.join("vms").join(s.uuid.to_string()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_reports_failure_fails_with_its_reason() {
    let f = fixture();
    let d = driver(&f, |_| {}).await;
    let mut s = spec(&f.template, "a-0");
    // An address the guest cannot configure: the demo guest reports it as cloud-init's reporter
    // would report cloud-init's errors.
    s.prefix_len = 33;
    d.ensure(&s).await.unwrap();
    let st = settle(d.as_ref(), s.uuid, VmState::Creating, Duration::from_secs(120)).await;
    assert_eq!(st.state, VmState::Failed, "{st:?}");
    let reason = st.reason.unwrap();
    assert!(
        reason.contains("the guest's configuration failed: cannot add address 10.200.0.2/33"),
        "{reason}"
    );
    d.remove(s.uuid).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_whose_qmp_stops_answering_is_fenced() {
    let f = fixture();
    let d = driver(&f, |c| c.qmp_timeout = Duration::from_secs(3)).await;
    let s = spec(&f.template, "a-0");
    d.ensure(&s).await.unwrap();
    let st = settle(d.as_ref(), s.uuid, VmState::Creating, Duration::from_secs(150)).await;
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
    let st = settle(d.as_ref(), s.uuid, VmState::Running, Duration::from_secs(60)).await;
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
    let st = settle(d.as_ref(), s.uuid, VmState::Creating, Duration::from_secs(60)).await;
    assert_eq!(st.state, VmState::Failed);
    assert!(
        st.reason.as_deref().unwrap().contains("No space left on device"),
        "{st:?}"
    );
    nothing_left(&f.root, s.uuid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_template_hash_fails_the_vm_naming_it() {
    let f = fixture();
    let d = driver(&f, |_| {}).await;
    let mut s = spec(&f.template, "a-0");
    s.template_hash = "sha1:da39a3ee".into();
    d.ensure(&s).await.unwrap();
    let st = settle(d.as_ref(), s.uuid, VmState::Creating, Duration::from_secs(30)).await;
    assert_eq!(st.state, VmState::Failed);
    assert!(st.reason.as_deref().unwrap().contains("\"sha1:da39a3ee\""), "{st:?}");
    nothing_left(&f.root, s.uuid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_template_source_is_retried_on_the_next_ensure() {
    let f = fixture();
    let source = Arc::new(LocalSource::new(f.template.clone()));
    source.unreachable.store(1, Ordering::SeqCst);
    let d = driver_with(&f, source.clone(), |_| {}).await;
    let s = spec(&f.template, "a-0");
    d.ensure(&s).await.unwrap();
    // The failure keeps the VM creating, with the reason, and leaves nothing behind.
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = d.list().await.into_iter().find(|v| v.uuid == s.uuid).unwrap();
        if st.reason.is_some() {
            break st;
        }
        assert!(tokio::time::Instant::now() < end, "no failure reported: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(st.state, VmState::Creating, "{st:?}");
    let reason = st.reason.unwrap();
    assert!(
        reason.contains("connection refused (simulated)") && reason.ends_with("will retry"),
        "{reason}"
    );
    nothing_left(&f.root, s.uuid);
    assert_eq!(source.unreachable.load(Ordering::SeqCst), 0);
    d.ensure(&s).await.unwrap();
    let st = settle(d.as_ref(), s.uuid, VmState::Creating, Duration::from_secs(150)).await;
    assert_eq!((st.state, st.reason.as_deref()), (VmState::Running, None), "{st:?}");
    d.remove(s.uuid).await.unwrap();
    nothing_left(&f.root, s.uuid);
}
