//! Live migration between two QEMU drivers ("hosts" in their own directories) over 127.0.0.1,
//! under TCG, with the demo guest: a busy guest moved paused with its disk, an idle one moved
//! live and back, a migration cut half-way by a dead destination, cancelled or removed, a
//! completed one cancelled, agents restarted on either side, a destination whose disk is full
//! and one that cannot listen.
//! Each test boots one guest (5-25 s under TCG) and checks several things with it.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{
    boot, console, counter_spec, counts, dead, driver, fixture, no_qemu_under, numbers, qemu_img_compare, spec, status,
    wait_count, wait_number, Fixture, COUNTER,
};
use shoal_hv::qemu::qmp::Qmp;
use shoal_hv::{HvError, Hypervisor, QemuDriver};
use shoal_model::agent::{MigrateOut, MigrationMode, MigrationParams, MigrationPhase, MigrationProgress, VmSpec};
use shoal_model::{Power, VmState};
use uuid::Uuid;

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const MIGRATION: Duration = Duration::from_secs(180);

/// Two hosts sharing the fixture's template source.
async fn hosts(f: &Fixture) -> (Arc<QemuDriver>, Arc<QemuDriver>) {
    (open(f, "a").await, open(f, "b").await)
}

async fn open(f: &Fixture, host: &str) -> Arc<QemuDriver> {
    driver(f, |c| c.dir = host_dir(f, host)).await
}

fn host_dir(f: &Fixture, host: &str) -> PathBuf {
    f.root.join(host)
}

fn vm_dir(f: &Fixture, host: &str, uuid: Uuid) -> PathBuf {
    host_dir(f, host).join("vms").join(uuid.to_string())
}

/// Waits until the migration is over (completed, failed or cancelled).
async fn wait_over(d: &QemuDriver, uuid: Uuid) -> MigrationProgress {
    wait_progress(d, uuid, |p| p.phase.is_over()).await
}

async fn wait_progress(d: &QemuDriver, uuid: Uuid, until: impl Fn(&MigrationProgress) -> bool) -> MigrationProgress {
    let end = tokio::time::Instant::now() + MIGRATION;
    loop {
        let p = d.migration(uuid).await.unwrap();
        if until(&p) {
            return p;
        }
        assert!(!p.phase.is_over(), "over before expected: {p:?}");
        assert!(tokio::time::Instant::now() < end, "migration stuck: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn params(mode: MigrationMode) -> MigrationParams {
    MigrationParams {
        mode,
        ..Default::default()
    }
}

/// QEMU's own run state, asked directly.
async fn run_state(f: &Fixture, host: &str, uuid: Uuid) -> String {
    let sock = vm_dir(f, host, uuid).join("qmp.sock");
    let mut q = Qmp::connect(&sock, Duration::from_secs(10)).await.unwrap();
    q.status().await.unwrap()
}

fn qemu_pid(f: &Fixture, host: &str, uuid: Uuid) -> i32 {
    std::fs::read_to_string(vm_dir(f, host, uuid).join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Removes the VM from the host and checks that nothing of it stays there.
async fn remove_all(f: &Fixture, d: &QemuDriver, host: &str, uuid: Uuid) {
    let pid = std::fs::read_to_string(vm_dir(f, host, uuid).join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    d.remove(uuid).await.unwrap();
    assert!(d.list().await.iter().all(|v| v.uuid != uuid));
    let dir = vm_dir(f, host, uuid);
    assert!(!dir.exists(), "{} left behind", dir.display());
    if let Some(pid) = pid {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(dead(pid), "QEMU {pid} of {uuid} on {host} still runs");
    }
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_guest_moves_paused_with_its_disk_and_counts_on() {
    let f = fixture();
    let (a, b) = hosts(&f).await;
    let s = counter_spec(&f, "mig-0");
    let uuid = s.uuid;
    boot(&a, &s).await;
    wait_count(&a, uuid, 3).await;

    // What cannot be asked.
    assert!(matches!(a.prepare_incoming(&s, LOCALHOST).await, Err(HvError::AlreadyHere(u)) if u == uuid));
    let ghost = Uuid::new_v4();
    let nowhere = MigrateOut {
        to: shoal_model::agent::IncomingVm {
            nbd: "127.0.0.1:1".into(),
            export: "disk0".into(),
            memory_uri: "tcp:127.0.0.1:1".into(),
        },
        params: params(MigrationMode::Pause),
    };
    assert!(matches!(a.migrate_out(ghost, &nowhere).await, Err(HvError::NotFound(u)) if u == ghost));

    // The destination prepares, once however often asked.
    let to = b.prepare_incoming(&s, LOCALHOST).await.unwrap();
    assert!(
        to.nbd.starts_with("127.0.0.1:") && to.memory_uri.starts_with("tcp:127.0.0.1:"),
        "{to:?}"
    );
    assert_eq!(b.prepare_incoming(&s, LOCALHOST).await.unwrap(), to);
    let st = status(&b, uuid).await;
    assert_eq!(
        (st.state, st.reason.as_deref()),
        (VmState::Creating, Some("incoming migration"))
    );
    match b.finish_incoming(uuid).await {
        Err(e @ HvError::NotArrived { .. }) => assert!(e.to_string().contains("inmigrate"), "{e}"),
        other => panic!("finish before the memory arrived: {other:?}"),
    }
    match b.migrate_out(uuid, &nowhere).await {
        Err(HvError::NotRunning { state, .. }) => assert_eq!(state, "creating"),
        other => panic!("migrating an incoming VM on: {other:?}"),
    }
    // `ensure` does not boot it while it waits.
    b.ensure(&s).await.unwrap();

    // The destination's agent restarts: the VM stays incoming, its QEMU waiting.
    drop(b);
    let b = open(&f, "b").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = status(&b, uuid).await;
    assert_eq!(
        (st.state, st.reason.as_deref()),
        (VmState::Creating, Some("incoming migration"))
    );
    assert_eq!(run_state(&f, "b", uuid).await, "inmigrate");
    assert_eq!(b.prepare_incoming(&s, LOCALHOST).await.unwrap(), to);

    // Paused, then sent.
    let req = MigrateOut {
        to: to.clone(),
        params: params(MigrationMode::Pause),
    };
    let first = a.migrate_out(uuid, &req).await.unwrap();
    assert_eq!((first.mode, first.error.as_deref()), (MigrationMode::Pause, None));
    assert!(!first.phase.is_over(), "{first:?}");
    let again = a.migrate_out(uuid, &req).await.unwrap();
    assert_eq!(again.mode, MigrationMode::Pause);
    let p = wait_over(&a, uuid).await;
    assert_eq!(
        (p.phase, p.error.as_deref()),
        (MigrationPhase::Completed, None),
        "{p:?}"
    );
    assert!(
        p.disk_sent_bytes > 0 && p.disk_sent_bytes == p.disk_total_bytes,
        "{p:?}"
    );
    assert!(p.ram_total_bytes >= 128 << 20 && p.ram_sent_bytes > 0, "{p:?}");
    assert!(p.downtime_ms.is_some_and(|d| d > 0), "{p:?}");
    let timings = a.timings(uuid).unwrap();
    assert!(
        timings.contains_key("migrate_ms") && timings.contains_key("downtime_ms"),
        "{timings:?}"
    );
    assert!(b.timings(uuid).unwrap().contains_key("prepare_incoming_ms"));
    eprintln!("pause mode, busy guest: {p:?}");

    // Both paused; the source waits for the move to be committed.
    assert_eq!(run_state(&f, "a", uuid).await, "postmigrate");
    assert_eq!(run_state(&f, "b", uuid).await, "paused");
    let st = status(&a, uuid).await;
    assert_eq!(st.state, VmState::Running);
    assert!(st.reason.as_deref().unwrap_or("").contains("migrated"), "{st:?}");
    // No power change on a migrated VM: a stop now would lose the guest if the move is undone.
    a.ensure(&VmSpec {
        power: Power::Stopped,
        ..s.clone()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&a, uuid).await.state, VmState::Running);
    assert_eq!(run_state(&f, "a", uuid).await, "postmigrate");

    // The guest sees the same disk on both sides.
    let (same, out) = qemu_img_compare(
        &vm_dir(&f, "a", uuid).join("disk.qcow2"),
        &vm_dir(&f, "b", uuid).join("disk.qcow2"),
    );
    assert!(same, "the disks differ: {out}");

    // The destination runs it, once however often asked, and it counts on from where it was.
    let last_here = *counts(&console(&a, uuid).await).last().unwrap();
    let before = status(&b, uuid).await.seq;
    let st = b.finish_incoming(uuid).await.unwrap();
    assert_eq!((st.state, st.reason.as_deref()), (VmState::Running, None));
    assert!(st.seq > before, "{st:?}");
    assert_eq!(b.finish_incoming(uuid).await.unwrap().seq, st.seq);
    wait_count(&b, uuid, last_here + 3).await;
    let there = counts(&console(&b, uuid).await);
    // The serial line may have been cut mid-line by the pause: one count may show on neither side.
    assert!(
        there[0] > last_here && there[0] <= last_here + 2,
        "the source stopped at {last_here}, the destination went on with {:?}",
        &there[..there.len().min(5)]
    );
    assert!(there.windows(2).all(|w| w[1] == w[0] + 1), "{there:?}");
    let there_timings = b.timings(uuid).unwrap();
    assert!(there_timings.contains_key("finish_incoming_ms"), "{there_timings:?}");
    eprintln!(
        "pause mode, busy guest: source {:?}, destination {there_timings:?}",
        a.timings(uuid).unwrap()
    );

    // The source goes; the destination runs on.
    remove_all(&f, &a, "a", uuid).await;
    let n = *counts(&console(&b, uuid).await).last().unwrap();
    wait_count(&b, uuid, n).await;
    remove_all(&f, &b, "b", uuid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_guest_moves_live_and_back_and_a_completed_move_is_undone() {
    let f = fixture();
    let (a, b) = hosts(&f).await;
    let s = spec(&f.template, "mig-1");
    let uuid = s.uuid;
    boot(&a, &s).await;
    let alive = |d: Arc<QemuDriver>, above: u64| async move {
        wait_number(&d, uuid, "alive ", above, Duration::from_secs(60)).await
    };
    alive(a.clone(), 1).await;

    let to = b.prepare_incoming(&s, LOCALHOST).await.unwrap();
    let req = MigrateOut {
        to,
        params: MigrationParams {
            mode: MigrationMode::Live,
            max_downtime_ms: Some(500),
            bandwidth_mib: None,
        },
    };
    a.migrate_out(uuid, &req).await.unwrap();
    let p = wait_over(&a, uuid).await;
    eprintln!("live mode, idle guest: {p:?}");
    assert_eq!(
        (p.phase, p.mode, p.error.as_deref()),
        (MigrationPhase::Completed, MigrationMode::Live, None),
        "{p:?}"
    );
    // The guest's 128 MiB, zero pages sent as markers only.
    assert!(p.ram_total_bytes >= 128 << 20, "{p:?}");
    assert!(p.ram_sent_bytes >= 16 << 20, "{p:?}");
    assert!(p.downtime_ms.is_some(), "{p:?}");
    let last_here = *numbers(&console(&a, uuid).await, "alive ").last().unwrap();
    b.finish_incoming(uuid).await.unwrap();
    let there = alive(b.clone(), last_here + 2).await;
    assert!(there > last_here + 2);
    remove_all(&f, &a, "a", uuid).await;

    // Back to the first host, paused; then the move is undone after it completed: the guest
    // runs on where it was, and the other host's copy goes.
    let to = a.prepare_incoming(&s, LOCALHOST).await.unwrap();
    let req = MigrateOut {
        to,
        params: params(MigrationMode::Pause),
    };
    b.migrate_out(uuid, &req).await.unwrap();
    let p = wait_over(&b, uuid).await;
    assert_eq!(
        (p.phase, p.error.as_deref()),
        (MigrationPhase::Completed, None),
        "{p:?}"
    );
    assert_eq!(run_state(&f, "b", uuid).await, "postmigrate");
    let stopped_at = *numbers(&console(&b, uuid).await, "alive ").last().unwrap();
    // The source's agent restarts meanwhile: the guest stays paused, and with no migration in
    // memory any more, the cancel works from what QEMU shows.
    drop(b);
    let b = open(&f, "b").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(run_state(&f, "b", uuid).await, "postmigrate");
    let st = status(&b, uuid).await;
    assert_eq!(st.state, VmState::Running);
    assert!(st.reason.as_deref().unwrap_or("").contains("postmigrate"), "{st:?}");
    assert!(matches!(b.migration(uuid).await, Err(HvError::NotMigrating(_))));
    let st = b.cancel_migration(uuid).await.unwrap();
    assert_eq!((st.state, st.reason.as_deref()), (VmState::Running, None), "{st:?}");
    assert_eq!(run_state(&f, "b", uuid).await, "running");
    assert!(matches!(b.migration(uuid).await, Err(HvError::NotMigrating(_))));
    let again = b.cancel_migration(uuid).await.unwrap();
    assert_eq!(
        (again.state, again.seq),
        (st.state, st.seq),
        "cancelling twice changes nothing"
    );
    alive(b.clone(), stopped_at + 2).await;
    remove_all(&f, &a, "a", uuid).await;
    remove_all(&f, &b, "b", uuid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_cut_or_cancelled_half_way_leaves_the_source_running() {
    let f = fixture();
    let (a, b) = hosts(&f).await;
    let s = counter_spec(&f, "mig-2");
    let uuid = s.uuid;
    boot(&a, &s).await;
    wait_count(&a, uuid, 3).await;
    // 8 MiB/s: the memory takes seconds to copy.
    let slow = |to| MigrateOut {
        to,
        params: MigrationParams {
            mode: MigrationMode::Auto,
            max_downtime_ms: None,
            bandwidth_mib: Some(8),
        },
    };
    let copying = |p: &MigrationProgress| p.phase == MigrationPhase::Memory && p.ram_sent_bytes > 4 << 20;

    // The destination dies while the memory copies.
    let to = b.prepare_incoming(&s, LOCALHOST).await.unwrap();
    let first = a.migrate_out(uuid, &slow(to)).await.unwrap();
    assert_eq!(first.mode, MigrationMode::Pause, "auto is pause under TCG");
    wait_progress(&a, uuid, copying).await;
    kill9(qemu_pid(&f, "b", uuid));
    let p = wait_over(&a, uuid).await;
    assert_eq!(p.phase, MigrationPhase::Failed, "{p:?}");
    let reason = p.error.unwrap();
    assert!(reason.contains("copying the"), "{reason}");
    let st = status(&a, uuid).await;
    assert_eq!((st.state, st.reason.as_deref()), (VmState::Running, None), "{st:?}");
    assert_eq!(run_state(&f, "a", uuid).await, "running");
    let n = *counts(&console(&a, uuid).await).last().unwrap();
    wait_count(&a, uuid, n + 2).await;
    // The destination saw its QEMU die, and leaves nothing once removed.
    let st = status(&b, uuid).await;
    assert_eq!(st.state, VmState::Failed, "{st:?}");
    remove_all(&f, &b, "b", uuid).await;

    // Tried again, and cancelled while the memory copies.
    let to = b.prepare_incoming(&s, LOCALHOST).await.unwrap();
    a.migrate_out(uuid, &slow(to)).await.unwrap();
    wait_progress(&a, uuid, copying).await;
    let st = a.cancel_migration(uuid).await.unwrap();
    assert_eq!((st.state, st.reason.as_deref()), (VmState::Running, None), "{st:?}");
    assert_eq!(run_state(&f, "a", uuid).await, "running");
    let n = *counts(&console(&a, uuid).await).last().unwrap();
    wait_count(&a, uuid, n + 2).await;
    remove_all(&f, &b, "b", uuid).await;

    // Removed while the memory copies: the job ends with it, and nothing stays on the source;
    // the destination's QEMU sees the stream break.
    let to = b.prepare_incoming(&s, LOCALHOST).await.unwrap();
    a.migrate_out(uuid, &slow(to)).await.unwrap();
    wait_progress(&a, uuid, copying).await;
    remove_all(&f, &a, "a", uuid).await;
    let st = common::settle(b.as_ref(), uuid, VmState::Creating, Duration::from_secs(60)).await;
    assert_eq!(st.state, VmState::Failed, "{st:?}");
    remove_all(&f, &b, "b", uuid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_destination_disk_fails_the_migration_and_leaves_nothing_there() {
    let f = fixture();
    let (a, b) = hosts(&f).await;
    // 16 MiB of the guest's own data: more than the destination has room for.
    let s = VmSpec {
        user_data: Some(format!(
            "#!/bin/sh\ndd if=/dev/urandom of=/var/lib/shoal/big bs=1M count=16 2>/dev/null\nsync\necho written\n{}",
            COUNTER.trim_start_matches("#!/bin/sh\n")
        )),
        ..spec(&f.template, "mig-3")
    };
    let uuid = s.uuid;
    boot(&a, &s).await;
    wait_count(&a, uuid, 3).await;
    assert!(console(&a, uuid).await.contains("user-data: written"));

    // The destination's VMs on a 4 MiB filesystem: room for the empty overlay and the seed.
    let vms = host_dir(&f, "b").join("vms");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&vms)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a small tmpfs needs root (tests run as root in CI)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(vms.clone());

    let to = b.prepare_incoming(&s, LOCALHOST).await.unwrap();
    a.migrate_out(
        uuid,
        &MigrateOut {
            to,
            params: params(MigrationMode::Pause),
        },
    )
    .await
    .unwrap();
    let p = wait_over(&a, uuid).await;
    assert_eq!(p.phase, MigrationPhase::Failed, "{p:?}");
    let reason = p.error.unwrap();
    assert!(reason.contains("No space left on device"), "{reason}");
    let st = status(&a, uuid).await;
    assert_eq!((st.state, st.reason.as_deref()), (VmState::Running, None), "{st:?}");
    let n = *counts(&console(&a, uuid).await).last().unwrap();
    wait_count(&a, uuid, n + 2).await;

    remove_all(&f, &b, "b", uuid).await;
    assert_eq!(
        std::fs::read_dir(&vms).unwrap().count(),
        0,
        "something left on the destination"
    );

    // A preparation that fails leaves nothing either: here, an address not on this host.
    let elsewhere = Ipv4Addr::new(192, 0, 2, 1);
    match b.prepare_incoming(&s, elsewhere).await {
        Err(e @ HvError::Listen { .. }) => assert!(e.to_string().contains("192.0.2.1"), "{e}"),
        other => panic!("listening on a foreign address: {other:?}"),
    }
    assert!(b.list().await.iter().all(|v| v.uuid != uuid));
    assert!(!vm_dir(&f, "b", uuid).exists());
    no_qemu_under(&host_dir(&f, "b"));

    // Only a running VM migrates.
    a.ensure(&VmSpec {
        power: Power::Stopped,
        force_stop: true,
        ..s.clone()
    })
    .await
    .unwrap();
    common::settle(a.as_ref(), uuid, VmState::Running, Duration::from_secs(60)).await;
    let to = b.prepare_incoming(&s, LOCALHOST).await.unwrap();
    let req = MigrateOut {
        to,
        params: params(MigrationMode::Pause),
    };
    match a.migrate_out(uuid, &req).await {
        Err(e @ HvError::NotRunning { .. }) => assert!(e.to_string().contains("stopped"), "{e}"),
        other => panic!("migrating a stopped VM: {other:?}"),
    }
    remove_all(&f, &b, "b", uuid).await;
    remove_all(&f, &a, "a", uuid).await;
}
