//! Disk checkpoints of running guests with real QEMU under TCG, into a test image store
//! ([`common::ImageStore`]): a guest that keeps writing to its disk is checkpointed full, then
//! incrementally, and every checkpoint taken while it was paused is compared with its disk; a
//! checkpoint since another one, a store that fails after QEMU's job succeeded, an agent
//! restart, and what an agent that died half-way left in QEMU; a VM restarted from a checkpoint,
//! and migrated; what is refused.
//! Each test boots one or two guests (5-25 s each under TCG) and checks several things with them.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    boot, console, counter_spec, counts, driver_with, fixture, no_qemu_under, numbers, qemu_img_compare, settle, spec,
    wait_count, wait_number, Fixture, ImageStore, COUNTER,
};
use serde_json::{json, Value};
use shoal_hv::qemu::qmp::Qmp;
use shoal_hv::{ErrorKind, HvError, Hypervisor, QemuDriver, TemplateFile};
use shoal_model::agent::{
    CheckpointDisk, DiskCheckpoint, MigrateOut, MigrationMode, MigrationParams, MigrationPhase, VmSpec,
};
use shoal_model::{Power, VmState};
use uuid::Uuid;

const DISK_BYTES: u64 = 64 << 20;

fn vm_dir(f: &Fixture, uuid: Uuid) -> PathBuf {
    f.root.join("vms").join(uuid.to_string())
}

fn store(f: &Fixture) -> Arc<ImageStore> {
    Arc::new(ImageStore::new(f.template.clone(), &f.root.join("store")))
}

async fn open(f: &Fixture, store: &Arc<ImageStore>) -> Arc<QemuDriver> {
    driver_with(f, store.clone(), |_| {}).await
}

fn req(base: &str, since: Option<&str>) -> CheckpointDisk {
    CheckpointDisk {
        base: base.into(),
        since: since.map(Into::into),
    }
}

/// Runs one QMP command on the VM's QEMU behind the driver's back, as an operator would.
async fn qmp(f: &Fixture, uuid: Uuid, command: &str) {
    qmp_with(f, uuid, command, None).await;
}

async fn qmp_with(f: &Fixture, uuid: Uuid, command: &str, arguments: Option<Value>) -> Value {
    let mut q = Qmp::connect(&vm_dir(f, uuid).join("qmp.sock"), Duration::from_secs(10))
        .await
        .unwrap();
    q.execute(command, arguments).await.unwrap()
}

/// The checkpoint the driver recorded its dirty bitmap counts from.
fn recorded(f: &Fixture, uuid: Uuid) -> Option<String> {
    let bytes = std::fs::read(vm_dir(f, uuid).join("checkpoint.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    Some(v["since"].as_str().unwrap().to_string())
}

/// No temporary copy of a checkpoint is left in the VM's directory.
fn no_temporaries(f: &Fixture, uuid: Uuid) {
    for name in ["checkpoint.qcow2", "checkpoint.raw"] {
        assert!(!vm_dir(f, uuid).join(name).exists(), "{name} left behind");
    }
}

/// The checkpoint's image in the store is the VM's disk as it is now (the guest is paused).
fn same_as_disk(f: &Fixture, store: &ImageStore, uuid: Uuid, cp: &DiskCheckpoint) {
    let image = store.image(&cp.manifest);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), cp.disk_bytes);
    let (same, out) = qemu_img_compare(&image, &vm_dir(f, uuid).join("disk.qcow2"));
    assert!(same, "checkpoint {} is not the VM's disk: {out}", cp.manifest);
}

/// Bytes of the overlay's own data clusters: what a full checkpoint reads.
fn overlay_data_bytes(f: &Fixture, uuid: Uuid) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["map", "-U", "--output=json"])
        .arg(vm_dir(f, uuid).join("disk.qcow2"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// The image an overlay sits on; it must be raw.
fn backing_file(overlay: &Path) -> PathBuf {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    PathBuf::from(info["backing-filename"].as_str().unwrap())
}

fn show(what: &str, cp: &DiskCheckpoint) {
    eprintln!(
        "{what}: incremental {}, changed {} B, read {} B of {} B, {:.3} s",
        cp.incremental, cp.changed_bytes, cp.read_bytes, cp.disk_bytes, cp.seconds
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_guest_is_checkpointed_whole_then_only_where_it_wrote() {
    let t = Instant::now();
    let f = fixture();
    let store = store(&f);
    let base = store.template_id();
    let d = open(&f, &store).await;
    // 8 MiB of its own data first, then the counter: a full checkpoint reads the 8 MiB, an
    // incremental one only what the counter wrote.
    let s = VmSpec {
        user_data: Some(format!(
            "#!/bin/sh\ndd if=/dev/urandom of=/var/lib/shoal/big bs=1M count=8 2>/dev/null\nsync\n{}",
            COUNTER.trim_start_matches("#!/bin/sh\n")
        )),
        ..spec(&f.template, "cp-0")
    };
    let uuid = s.uuid;
    boot(&d, &s).await;
    let n = wait_count(&d, uuid, 3).await;

    // The first checkpoint is whole: the overlay's blocks laid over the template's disk.
    let c1 = d.checkpoint(uuid, &req(&base, None)).await.unwrap();
    show("first", &c1);
    assert!(!c1.incremental && c1.parent == base, "{c1:?}");
    assert_eq!(c1.disk_bytes, DISK_BYTES);
    assert!(c1.changed_bytes > 0 && c1.read_bytes > 0, "the guest wrote: {c1:?}");
    assert!(
        c1.read_bytes <= c1.changed_bytes && c1.changed_bytes < DISK_BYTES,
        "{c1:?}"
    );
    assert!(c1.read_bytes >= 8 << 20, "{c1:?}");
    assert_eq!(c1.chunks, 64, "what the store made is reported");
    assert_eq!(recorded(&f, uuid).as_deref(), Some(c1.manifest.as_str()));
    no_temporaries(&f, uuid);

    // Then only what the guest wrote since: checked against its disk while it is paused.
    let n = wait_count(&d, uuid, n + 5).await;
    qmp(&f, uuid, "stop").await;
    let c2 = d.checkpoint(uuid, &req(&base, Some(&c1.manifest))).await.unwrap();
    show("incremental, paused", &c2);
    assert!(c2.incremental && c2.parent == c1.manifest, "{c2:?}");
    assert!(c2.changed_bytes > 0, "the guest wrote since the first: {c2:?}");
    assert!(c2.read_bytes < c1.read_bytes / 8, "{c2:?} after {c1:?}");
    same_as_disk(&f, &store, uuid, &c2);
    let overlay = overlay_data_bytes(&f, uuid);
    assert!(
        c2.changed_bytes <= overlay,
        "{c2:?} reads within the overlay's {overlay} B"
    );

    // A `since` that is not the checkpoint the host tracks from: whole again, and the same
    // image as the incremental one, since the disk did not change.
    let c3 = d.checkpoint(uuid, &req(&base, Some(&"0".repeat(64)))).await.unwrap();
    show("since another checkpoint, paused", &c3);
    assert!(!c3.incremental && c3.parent == base, "{c3:?}");
    assert_eq!(c3.manifest, c2.manifest, "full and incremental disagree");
    assert!(
        c3.read_bytes >= 8 << 20 && c3.read_bytes > 8 * c2.read_bytes,
        "{c3:?} {c2:?}"
    );
    assert!(
        c3.read_bytes <= overlay,
        "{c3:?} reads within the overlay's {overlay} B"
    );
    // Nothing written since: nothing read.
    let c4 = d.checkpoint(uuid, &req(&base, Some(&c3.manifest))).await.unwrap();
    assert!(c4.incremental && c4.parent == c3.manifest, "{c4:?}");
    assert_eq!((c4.changed_bytes, c4.read_bytes), (0, 0), "{c4:?}");
    assert_eq!(c4.manifest, c3.manifest);
    qmp(&f, uuid, "cont").await;

    // The store fails after QEMU's job succeeded (the bitmap was spent): the next checkpoint
    // is whole, and still the disk.
    let n = wait_count(&d, uuid, n + 5).await;
    qmp(&f, uuid, "stop").await;
    store.fail_store.store(1, Ordering::SeqCst);
    let e = d.checkpoint(uuid, &req(&base, Some(&c4.manifest))).await.unwrap_err();
    assert!(
        e.to_string().contains("cp-0") && e.to_string().contains("connection refused (simulated)"),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Retryable);
    assert_eq!(recorded(&f, uuid), None);
    no_temporaries(&f, uuid);
    let c5 = d.checkpoint(uuid, &req(&base, Some(&c4.manifest))).await.unwrap();
    show("after a failed store, paused", &c5);
    assert!(!c5.incremental && c5.parent == base, "{c5:?}");
    same_as_disk(&f, &store, uuid, &c5);
    qmp(&f, uuid, "cont").await;

    // A new agent adopts the VM: its bitmap lives on in QEMU, so checkpoints stay incremental.
    let n = wait_count(&d, uuid, n + 3).await;
    drop(d);
    let d = open(&f, &store).await;
    let n = wait_count(&d, uuid, n + 5).await;
    qmp(&f, uuid, "stop").await;
    let c6 = d.checkpoint(uuid, &req(&base, Some(&c5.manifest))).await.unwrap();
    show("after an agent restart, paused", &c6);
    assert!(
        c6.incremental && c6.parent == c5.manifest && c6.changed_bytes > 0,
        "{c6:?}"
    );
    same_as_disk(&f, &store, uuid, &c6);
    qmp(&f, uuid, "cont").await;
    // And while the guest runs on.
    wait_count(&d, uuid, n + 3).await;
    let c7 = d.checkpoint(uuid, &req(&base, Some(&c6.manifest))).await.unwrap();
    show("incremental, running", &c7);
    assert!(c7.incremental && c7.changed_bytes > 0, "{c7:?}");

    // An agent died right after QEMU's job concluded: the job, not dismissed, and its target
    // node are left; the record and the bitmap look current, but the job may have cleared the
    // bitmap. The next checkpoint clears them and is whole.
    qmp(&f, uuid, "stop").await;
    let leftover = vm_dir(&f, uuid).join("leftover.qcow2");
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&leftover)
        .arg(DISK_BYTES.to_string())
        .status()
        .unwrap();
    assert!(created.success());
    let node = json!({ "driver": "qcow2", "node-name": "shoal-cp-target",
                       "file": { "driver": "file", "filename": leftover } });
    qmp_with(&f, uuid, "blockdev-add", Some(node)).await;
    let job = json!({ "job-id": "shoal-cp", "device": "virtio0", "target": "shoal-cp-target",
                      "sync": "full", "auto-dismiss": false });
    qmp_with(&f, uuid, "blockdev-backup", Some(job)).await;
    let job_status = || async {
        let jobs = qmp_with(&f, uuid, "query-jobs", None).await;
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == "shoal-cp")
            .map(|j| j["status"].clone())
    };
    let end = Instant::now() + Duration::from_secs(60);
    while job_status().await != Some(json!("concluded")) {
        assert!(Instant::now() < end, "the leftover job did not conclude");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(recorded(&f, uuid).as_deref(), Some(c7.manifest.as_str()));
    let c8 = d.checkpoint(uuid, &req(&base, Some(&c7.manifest))).await.unwrap();
    show("after an interrupted checkpoint, paused", &c8);
    assert!(!c8.incremental && c8.parent == base, "{c8:?}");
    same_as_disk(&f, &store, uuid, &c8);
    assert_eq!(job_status().await, None);
    let nodes = qmp_with(&f, uuid, "query-named-block-nodes", Some(json!({ "flat": true }))).await;
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["node-name"] != "shoal-cp-target"),
        "{nodes}"
    );
    qmp(&f, uuid, "cont").await;

    // A stopped VM is refused, and nothing changes.
    d.ensure(&VmSpec {
        power: Power::Stopped,
        force_stop: true,
        ..s.clone()
    })
    .await
    .unwrap();
    let st = settle(d.as_ref(), uuid, VmState::Running, Duration::from_secs(60)).await;
    assert_eq!(st.state, VmState::Stopped, "{st:?}");
    match d.checkpoint(uuid, &req(&base, Some(&c8.manifest))).await {
        Err(e @ HvError::NotCheckpointable { .. }) => {
            assert!(
                e.to_string().contains(&uuid.to_string()) && e.to_string().contains("stopped"),
                "{e}"
            );
            assert_eq!(e.kind(), ErrorKind::Invalid);
        }
        other => panic!("checkpoint of a stopped VM: {other:?}"),
    }
    assert_eq!(recorded(&f, uuid).as_deref(), Some(c8.manifest.as_str()));
    no_temporaries(&f, uuid);

    d.remove(uuid).await.unwrap();
    assert!(!vm_dir(&f, uuid).exists());
    no_qemu_under(&f.root);
    eprintln!("test took {:.1} s", t.elapsed().as_secs_f64());
}

/// Prints the last count the guest's disk holds, then counts on from it.
const RESTORED: &str = "#!/bin/sh
n=$(tail -n 1 /var/lib/shoal/counts)
echo \"restored $n\"
while :; do
  n=$((n + 1))
  echo $n >>/var/lib/shoal/counts
  sync
  echo \"count $n\"
  sleep 1
done
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_restarts_from_a_checkpoint_with_the_disk_it_had() {
    let t = Instant::now();
    let f = fixture();
    let store = store(&f);
    let template = store.template_id();
    let d = open(&f, &store).await;
    let s = counter_spec(&f, "cp-src");
    boot(&d, &s).await;
    wait_count(&d, s.uuid, 5).await;

    // Unknown VMs are not found, and leave nothing.
    let ghost = Uuid::new_v4();
    match d.checkpoint(ghost, &req(&template, None)).await {
        Err(e @ HvError::NotFound(u)) if u == ghost => assert_eq!(e.kind(), ErrorKind::NotFound),
        other => panic!("checkpoint of an unknown VM: {other:?}"),
    }
    assert!(!vm_dir(&f, ghost).exists());

    // Checkpointed while paused, so that we know the last count it wrote.
    qmp(&f, s.uuid, "stop").await;
    let last = *counts(&console(&d, s.uuid).await).last().unwrap();
    let cp = d.checkpoint(s.uuid, &req(&template, None)).await.unwrap();
    show("source, paused", &cp);
    d.remove(s.uuid).await.unwrap();

    // A disk base that is not an image-store manifest fails the VM, naming it.
    let bad = VmSpec {
        disk_base: Some(common::hash(&f.template.disk)),
        ..spec(&f.template, "cp-bad")
    };
    d.ensure(&bad).await.unwrap();
    let st = settle(d.as_ref(), bad.uuid, VmState::Creating, Duration::from_secs(60)).await;
    assert_eq!(st.state, VmState::Failed, "{st:?}");
    let reason = st.reason.unwrap();
    assert!(
        reason.contains("disk base") && reason.contains(bad.disk_base.as_deref().unwrap()),
        "{reason}"
    );
    common::nothing_left(&f.root, bad.uuid);
    d.remove(bad.uuid).await.unwrap();

    // Restarted from the checkpoint: the overlay sits on it, the kernel and initrd are still
    // the template's (not fetched again), and the guest finds what it had written.
    let r = VmSpec {
        disk_base: Some(format!("manifest:{}", cp.manifest)),
        user_data: Some(RESTORED.into()),
        ..spec(&f.template, "cp-restored")
    };
    boot(&d, &r).await;
    let backing = f.root.join("templates").join(&cp.manifest).join("disk.raw");
    assert_eq!(backing_file(&vm_dir(&f, r.uuid).join("disk.qcow2")), backing);
    let (same, out) = qemu_img_compare(&backing, &store.image(&cp.manifest));
    assert!(same, "{out}");
    let fetched = store.fetched.lock().unwrap().clone();
    for file in [TemplateFile::Kernel, TemplateFile::Initrd, TemplateFile::Disk] {
        assert_eq!(
            fetched.iter().filter(|f| **f == file).count(),
            1,
            "{file:?} fetched once: {fetched:?}"
        );
    }
    let restored = wait_number(&d, r.uuid, "user-data: restored ", 0, Duration::from_secs(120)).await;
    // A count is printed only once it is on the disk; it may be on the disk and not printed
    // yet, and the last printed line may have been cut by the pause.
    assert!(
        (last..=last + 2).contains(&restored),
        "the source had counted to {last}, its checkpoint holds {restored}"
    );
    wait_count(&d, r.uuid, restored + 1).await;
    let c = numbers(&console(&d, r.uuid).await, "user-data: count ");
    assert_eq!(c[0], restored + 1, "{c:?}");

    // Its checkpoints are laid over the checkpoint it sits on, not the template.
    match d.checkpoint(r.uuid, &req(&template, None)).await {
        Err(e @ HvError::WrongCheckpointBase { .. }) => {
            assert!(e.to_string().contains(&cp.manifest), "{e}");
            assert_eq!(e.kind(), ErrorKind::Invalid);
        }
        other => panic!("a checkpoint over the template: {other:?}"),
    }
    qmp(&f, r.uuid, "stop").await;
    let next = d.checkpoint(r.uuid, &req(&cp.manifest, None)).await.unwrap();
    show("restarted VM, paused", &next);
    assert!(
        !next.incremental && next.parent == cp.manifest && next.changed_bytes > 0,
        "{next:?}"
    );
    same_as_disk(&f, &store, r.uuid, &next);
    qmp(&f, r.uuid, "cont").await;

    // It migrates like any VM: the destination fetches the checkpoint it sits on, and only the
    // overlay's blocks move.
    let b = driver_with(&f, store.clone(), |c| c.dir = f.root.join("b")).await;
    let to = b.prepare_incoming(&r, Ipv4Addr::LOCALHOST).await.unwrap();
    let out = MigrateOut {
        to,
        params: MigrationParams {
            mode: MigrationMode::Pause,
            ..Default::default()
        },
    };
    d.migrate_out(r.uuid, &out).await.unwrap();
    let end = Instant::now() + Duration::from_secs(180);
    let p = loop {
        let p = d.migration(r.uuid).await.unwrap();
        if p.phase.is_over() {
            break p;
        }
        assert!(Instant::now() < end, "migration stuck: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (p.phase, p.error.as_deref()),
        (MigrationPhase::Completed, None),
        "{p:?}"
    );
    match d.checkpoint(r.uuid, &req(&cp.manifest, None)).await {
        Err(e @ HvError::NotCheckpointable { .. }) => assert!(e.to_string().contains("migrating"), "{e}"),
        other => panic!("checkpoint of a migrated VM: {other:?}"),
    }
    let there = f.root.join("b").join("vms").join(r.uuid.to_string()).join("disk.qcow2");
    let (same, out) = qemu_img_compare(&vm_dir(&f, r.uuid).join("disk.qcow2"), &there);
    assert!(same, "the disks differ after the move: {out}");
    assert_eq!(
        backing_file(&there),
        f.root.join("b").join("templates").join(&cp.manifest).join("disk.raw")
    );
    b.finish_incoming(r.uuid).await.unwrap();
    let n = *counts(&console(&b, r.uuid).await).last().unwrap_or(&0);
    wait_count(&b, r.uuid, n + 1).await;

    d.remove(r.uuid).await.unwrap();
    b.remove(r.uuid).await.unwrap();
    assert!(!vm_dir(&f, r.uuid).exists() && !there.exists());
    no_qemu_under(&f.root);
    eprintln!("test took {:.1} s", t.elapsed().as_secs_f64());
}
