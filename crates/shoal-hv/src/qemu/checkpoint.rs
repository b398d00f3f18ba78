//! Disk checkpoints while the guest runs ([`crate::Hypervisor::checkpoint`]).
//!
//! QEMU's backup job copies the VM's disk as of one point in time into a temporary image while
//! the guest goes on writing (crash-consistent, no pause), and the dirty bitmap `shoal-cp` on the
//! overlay's node records what the guest writes from that point on, so that the next checkpoint
//! copies only those blocks. A full checkpoint removes any old bitmap, then starts a new one and
//! a `sync: top` backup (the overlay's own clusters) in one transaction; an incremental one backs
//! up what the bitmap holds, and QEMU clears from it what it copied once the job succeeded.
//!
//! `checkpoint.json` names the checkpoint the bitmap counts from, and exists only while that is
//! true: it is removed before each job and written again only once the new checkpoint is stored,
//! or after QEMU failed the job and put the bitmap back. Whatever goes wrong — an agent that dies
//! half-way included — the next checkpoint is full, never one that misses writes. The bitmap
//! lives in QEMU's memory: it survives an agent restart (the QEMU is adopted) but not QEMU's.
//!
//! The temporary image holds only the changed clusters: `qemu-img map` tells which (new data or
//! zeros), and the image store lays them over the parent image.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_model::agent::{CheckpointDisk, DiskCheckpoint};
use shoal_model::{TemplateDisk, VmState};
use tokio::process::Command;

use super::disk::{output, run};
use super::migrate::disk_node;
use super::qmp::QmpError;
use super::transition::power_held;
use super::{QemuDriver, Vm};
use crate::{DiskChange, HvError};

/// Fixed names, so that what an interrupted checkpoint left in QEMU is found from QMP alone.
const BITMAP: &str = "shoal-cp";
const JOB: &str = "shoal-cp";
const TARGET_NODE: &str = "shoal-cp-target";
/// Files in the VM's directory: the checkpoint the bitmap counts from, and the temporary copies.
pub(super) const RECORD: &str = "checkpoint.json";
pub(super) const TEMP_IMAGE: &str = "checkpoint.qcow2";
pub(super) const TEMP_RAW: &str = "checkpoint.raw";
/// How long the backup job may take (a whole overlay under TCG, on a loaded host).
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a cancelled job may take to end.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// What `checkpoint.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// Manifest (hex) of the checkpoint the bitmap's writes are relative to.
    since: String,
}

/// How a checkpoint reads the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Only the blocks the bitmap holds, laid over `since`.
    Incremental,
    /// The overlay's own blocks, laid over the base.
    Full,
}

/// Incremental only when the bitmap exists, counts from exactly the checkpoint the caller
/// names, and no earlier checkpoint was left half-done in QEMU (its job may have cleared the
/// bitmap after the record was last written).
fn choose(since: Option<&str>, recorded: Option<&str>, bitmap: bool, leftovers: bool) -> Mode {
    match (since, recorded) {
        (Some(s), Some(r)) if s == r && bitmap && !leftovers => Mode::Incremental,
        _ => Mode::Full,
    }
}

/// What QEMU shows of the VM's disk before a checkpoint.
#[derive(Debug, PartialEq, Eq)]
struct DiskState {
    run_state: String,
    /// The overlay's node, and its virtual size.
    node: String,
    size: u64,
    bitmap: bool,
    /// The status of a backup job an earlier checkpoint left, if any.
    leftover_job: Option<String>,
    /// Whether the target node of an earlier checkpoint is still there.
    leftover_target: bool,
}

impl DiskState {
    fn leftovers(&self) -> bool {
        self.leftover_job.is_some() || self.leftover_target
    }
}

/// Reads `query-named-block-nodes` (flat) and `query-jobs`.
fn disk_state(run_state: String, node: String, nodes: &Value, jobs: &Value) -> Option<DiskState> {
    let nodes = nodes.as_array()?;
    let disk = nodes.iter().find(|n| n["node-name"] == node.as_str())?;
    let size = disk["image"]["virtual-size"].as_u64()?;
    let bitmap = disk["dirty-bitmaps"]
        .as_array()
        .is_some_and(|b| b.iter().any(|b| b["name"] == BITMAP));
    Some(DiskState {
        run_state,
        node,
        size,
        bitmap,
        leftover_job: backup_job(jobs).map(|j| j.status),
        leftover_target: nodes.iter().any(|n| n["node-name"] == TARGET_NODE),
    })
}

/// The backup job as `query-jobs` shows it.
#[derive(Debug, PartialEq, Eq)]
struct BackupJob {
    status: String,
    error: Option<String>,
}

fn backup_job(jobs: &Value) -> Option<BackupJob> {
    let j = jobs.as_array()?.iter().find(|j| j["id"] == JOB)?;
    Some(BackupJob {
        status: j["status"].as_str().unwrap_or("?").to_string(),
        error: j["error"].as_str().map(str::to_string),
    })
}

/// The changed runs of a temporary image, from its `qemu-img map --output=json`: allocated data
/// is new data, a zero cluster is zeros, anything unallocated did not change. Adjacent runs of
/// the same kind are merged.
fn changes(map: &Value) -> Vec<DiskChange> {
    let mut out: Vec<DiskChange> = Vec::new();
    for e in map.as_array().into_iter().flatten() {
        let flag = |k: &str| e[k].as_bool().unwrap_or(false);
        let (Some(offset), Some(len)) = (e["start"].as_u64(), e["length"].as_u64()) else {
            continue;
        };
        if !flag("present") || len == 0 {
            continue;
        }
        let zero = flag("zero") && !flag("data");
        match out.last_mut() {
            Some(last) if last.zero == zero && last.offset + last.len == offset => last.len += len,
            _ => out.push(DiskChange { offset, len, zero }),
        }
    }
    out
}

/// How a failed copy left the bitmap.
enum CopyError {
    /// Nothing was copied, or QEMU failed the job and put the bitmap back: it still holds every
    /// write since the checkpoint it counted from.
    BitmapKept(HvError),
    /// The job may have succeeded and cleared the bitmap.
    BitmapSpent(HvError),
}

impl QemuDriver {
    /// Records the VM's disk in the image store while it runs: see the module's comment.
    pub(super) async fn checkpoint_disk(&self, vm: &Vm, req: &CheckpointDisk) -> Result<DiskCheckpoint, HvError> {
        let t = Instant::now();
        // Held throughout: no power transition, migration, snapshot or second checkpoint meanwhile.
        let Ok(_busy) = vm.busy.try_lock() else {
            return Err(HvError::Busy {
                vm: vm.uuid,
                what: "a power transition, migration step, snapshot or checkpoint is under way",
            });
        };
        if let Some(state) = not_checkpointable(vm) {
            return Err(HvError::NotCheckpointable { vm: vm.uuid, state });
        }
        let spec = vm.record.lock().expect("vm record").spec.clone();
        if let Ok(TemplateDisk::Manifest(disk_base)) = TemplateDisk::parse(spec.disk_base()) {
            if disk_base != req.base {
                return Err(HvError::WrongCheckpointBase {
                    vm: vm.uuid,
                    base: req.base.clone(),
                    disk_base,
                });
            }
        }
        let result = self.take_checkpoint(vm, &spec.name, req, t).await;
        for f in [TEMP_IMAGE, TEMP_RAW] {
            let _ = tokio::fs::remove_file(vm.path(f)).await;
        }
        if let Err(e) = &result {
            tracing::warn!(vm = %spec.name, kind = e.kind().as_str(), "disk checkpoint failed: {e}");
        }
        result
    }

    async fn take_checkpoint(
        &self,
        vm: &Vm,
        name: &str,
        req: &CheckpointDisk,
        t: Instant,
    ) -> Result<DiskCheckpoint, HvError> {
        let in_vm = |what: &'static str| {
            let vm = name.to_string();
            move |e: HvError| HvError::Vm {
                vm,
                what,
                source: Box::new(e),
            }
        };
        let disk = self.look(vm).await.map_err(in_vm("looking at its disk"))?;
        if !matches!(disk.run_state.as_str(), "running" | "paused") {
            return Err(HvError::NotCheckpointable {
                vm: vm.uuid,
                state: format!("running, but QEMU is {}", disk.run_state),
            });
        }
        if disk.leftovers() {
            tracing::warn!(vm = %name, job = ?disk.leftover_job, "clearing what an interrupted checkpoint left in QEMU");
            self.clear_leftovers(vm, &disk)
                .await
                .map_err(in_vm("clearing what an earlier checkpoint left"))?;
        }
        let recorded = read_record(vm).await;
        let mode = choose(req.since.as_deref(), recorded.as_deref(), disk.bitmap, disk.leftovers());
        let parent = match (mode, &req.since) {
            (Mode::Incremental, Some(since)) => since.clone(),
            _ => req.base.clone(),
        };
        // From here until the new checkpoint is stored, the record would name the wrong one.
        remove_record(vm)
            .await
            .map_err(in_vm("forgetting its last checkpoint"))?;
        let keep_record = || async {
            if let (Mode::Incremental, Some(since)) = (mode, &req.since) {
                if let Err(e) = write_record(vm, since).await {
                    tracing::warn!(vm = %name, "{e}; the next checkpoint will be full");
                }
            }
        };

        let image = vm.path(TEMP_IMAGE);
        let raw = vm.path(TEMP_RAW);
        for f in [&image, &raw] {
            let _ = tokio::fs::remove_file(f).await;
        }
        let mut create = Command::new(&self.cfg.qemu_img);
        create
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(disk.size.to_string());
        if let Err(e) = run(&mut create, "qemu-img create (checkpoint image)").await {
            keep_record().await;
            return Err(in_vm("creating the checkpoint image")(e));
        }
        match self.copy(vm, &disk, mode, &image).await {
            Ok(()) => {}
            Err(CopyError::BitmapKept(e)) => {
                keep_record().await;
                return Err(in_vm("copying its disk")(e));
            }
            Err(CopyError::BitmapSpent(e)) => {
                self.drop_bitmap(vm, &disk.node).await;
                return Err(in_vm("copying its disk")(e));
            }
        }

        // The bitmap now counts from this checkpoint: whatever fails from here leaves no record,
        // so the next checkpoint is full.
        let stored = async {
            let mut map = Command::new(&self.cfg.qemu_img);
            map.args(["map", "--output=json", "-f", "qcow2"]).arg(&image);
            let map = output(&mut map, "qemu-img map (checkpoint image)")
                .await
                .map_err(in_vm("listing the changed blocks"))?;
            let map: Value = serde_json::from_slice(&map).map_err(|e| {
                in_vm("listing the changed blocks")(HvError::Tool {
                    what: "qemu-img map".into(),
                    stderr: format!("unreadable output: {e}"),
                })
            })?;
            let changes = changes(&map);
            let mut convert = Command::new(&self.cfg.qemu_img);
            convert
                .args(["convert", "-f", "qcow2", "-O", "raw", "-S", "4k"])
                .arg(&image)
                .arg(&raw);
            run(&mut convert, "qemu-img convert (checkpoint image)")
                .await
                .map_err(in_vm("reading the changed blocks"))?;
            let stored = self
                .source
                .store_changes(&parent, &changes, &raw, disk.size)
                .await
                .map_err(|e| in_vm("storing the checkpoint")(HvError::Store(e)))?;
            Ok::<_, HvError>((changes, stored))
        }
        .await;
        let (changes, stored) = match stored {
            Ok(s) => s,
            Err(e) => {
                self.drop_bitmap(vm, &disk.node).await;
                return Err(e);
            }
        };
        if let Err(e) = write_record(vm, &stored.manifest).await {
            tracing::warn!(vm = %name, "{e}; the next checkpoint will be full");
        }
        let cp = DiskCheckpoint {
            manifest: stored.manifest,
            parent,
            incremental: mode == Mode::Incremental,
            disk_bytes: disk.size,
            changed_bytes: changes.iter().map(|c| c.len).sum(),
            read_bytes: stored.read_bytes,
            chunks: stored.chunks,
            chunks_sent: stored.chunks_sent,
            bytes_sent: stored.bytes_sent,
            seconds: t.elapsed().as_secs_f64(),
        };
        tracing::info!(
            vm = %name,
            incremental = cp.incremental,
            changed = cp.changed_bytes,
            read = cp.read_bytes,
            seconds = cp.seconds,
            manifest = %cp.manifest,
            "disk checkpoint taken"
        );
        Ok(cp)
    }

    async fn look(&self, vm: &Vm) -> Result<DiskState, HvError> {
        let mut q = self.qmp(vm).await?;
        let run_state = q.status().await?;
        let node = disk_node(&mut q, &vm.path("disk.qcow2")).await?;
        let nodes = q
            .execute("query-named-block-nodes", Some(json!({ "flat": true })))
            .await?;
        let jobs = q.execute("query-jobs", None).await?;
        disk_state(run_state, node.clone(), &nodes, &jobs).ok_or_else(|| HvError::Tool {
            what: "query-named-block-nodes".into(),
            stderr: format!("QEMU shows no size for node {node}"),
        })
    }

    /// Ends the job and removes the node an interrupted checkpoint left.
    async fn clear_leftovers(&self, vm: &Vm, disk: &DiskState) -> Result<(), HvError> {
        if let Some(status) = &disk.leftover_job {
            if status != "concluded" {
                // It may have concluded meanwhile: a refusal is looked at below.
                let _ = self
                    .qmp(vm)
                    .await?
                    .execute("job-cancel", Some(json!({ "id": JOB })))
                    .await;
            }
            self.wait_job(vm, CANCEL_TIMEOUT).await?;
        }
        if disk.leftover_target {
            self.qmp(vm)
                .await?
                .execute("blockdev-del", Some(json!({ "node-name": TARGET_NODE })))
                .await?;
        }
        Ok(())
    }

    /// Copies the disk as of now into `image` (a fresh qcow2 of the disk's size).
    async fn copy(&self, vm: &Vm, disk: &DiskState, mode: Mode, image: &Path) -> Result<(), CopyError> {
        use CopyError::{BitmapKept, BitmapSpent};
        // A refused command changed nothing; one that got no answer may have.
        let started = |e: QmpError| match e {
            e @ QmpError::Command { .. } => BitmapKept(e.into()),
            e => BitmapSpent(e.into()),
        };
        let mut q = self.qmp(vm).await.map_err(BitmapKept)?;
        q.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": TARGET_NODE,
                "file": { "driver": "file", "filename": image.to_string_lossy() },
            })),
        )
        .await
        .map_err(started)?;
        let backup = |sync: &str| {
            json!({
                "job-id": JOB,
                "device": disk.node,
                "target": TARGET_NODE,
                "sync": sync,
                // A failed job stays, with its error, until dismissed.
                "auto-dismiss": false,
            })
        };
        let start = match mode {
            Mode::Incremental => {
                let mut args = backup("incremental");
                args["bitmap"] = json!(BITMAP);
                // QEMU clears what it copied only if the job succeeds: a failed job leaves
                // the bitmap holding everything since the last checkpoint.
                args["bitmap-mode"] = json!("on-success");
                q.execute("blockdev-backup", Some(args)).await
            }
            Mode::Full => {
                let removed = if disk.bitmap {
                    q.execute(
                        "block-dirty-bitmap-remove",
                        Some(json!({ "node": disk.node, "name": BITMAP })),
                    )
                    .await
                    .map(|_| ())
                } else {
                    Ok(())
                };
                match removed {
                    // One transaction: the bitmap starts at exactly the backup's point in time.
                    Ok(()) => {
                        q.execute(
                            "transaction",
                            Some(json!({ "actions": [
                                { "type": "block-dirty-bitmap-add",
                                  "data": { "node": disk.node, "name": BITMAP, "persistent": false } },
                                { "type": "blockdev-backup", "data": backup("top") },
                            ]})),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        drop(q);
        if let Err(e) = start {
            self.delete_target(vm).await;
            return Err(started(e));
        }
        match self.wait_job(vm, JOB_TIMEOUT).await {
            Ok(None) => {}
            Ok(Some(error)) => {
                self.delete_target(vm).await;
                return Err(BitmapKept(HvError::Tool {
                    what: "QEMU's backup job".into(),
                    stderr: error,
                }));
            }
            Err(e) => return Err(BitmapSpent(e)),
        }
        match self.qmp(vm).await {
            Ok(mut q) => q
                .execute("blockdev-del", Some(json!({ "node-name": TARGET_NODE })))
                .await
                .map(|_| ())
                .map_err(|e| BitmapSpent(e.into())),
            Err(e) => Err(BitmapSpent(e)),
        }
    }

    /// Waits until the backup job concluded and dismisses it: `None` if it succeeded, else
    /// QEMU's reason. A job still going at `timeout` is cancelled (and fails).
    async fn wait_job(&self, vm: &Vm, timeout: Duration) -> Result<Option<String>, HvError> {
        let mut deadline = Instant::now() + timeout;
        let mut cancelled = false;
        loop {
            let jobs = self.qmp(vm).await?.execute("query-jobs", None).await?;
            match backup_job(&jobs) {
                Some(j) if j.status == "concluded" => {
                    self.qmp(vm)
                        .await?
                        .execute("job-dismiss", Some(json!({ "id": JOB })))
                        .await?;
                    let timed_out = cancelled.then(|| format!("not done within {timeout:?}, cancelled"));
                    return Ok(j.error.or(timed_out));
                }
                Some(_) if Instant::now() > deadline && !cancelled => {
                    let _ = self
                        .qmp(vm)
                        .await?
                        .execute("job-cancel", Some(json!({ "id": JOB })))
                        .await;
                    cancelled = true;
                    deadline = Instant::now() + CANCEL_TIMEOUT;
                }
                Some(j) if Instant::now() > deadline => {
                    return Err(HvError::Tool {
                        what: "QEMU's backup job".into(),
                        stderr: format!("still {} {CANCEL_TIMEOUT:?} after it was cancelled", j.status),
                    })
                }
                Some(_) => {}
                // Nothing else dismisses it: someone else is at work on this VM's QEMU.
                None => {
                    return Err(HvError::Tool {
                        what: "QEMU's backup job".into(),
                        stderr: "the job vanished before it concluded".into(),
                    })
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Best effort: the next checkpoint clears what is left.
    async fn delete_target(&self, vm: &Vm) {
        if let Ok(mut q) = self.qmp(vm).await {
            let _ = q
                .execute("blockdev-del", Some(json!({ "node-name": TARGET_NODE })))
                .await;
        }
    }

    /// Best effort, for tidiness: without a record the bitmap is never used, and the next full
    /// checkpoint replaces it.
    async fn drop_bitmap(&self, vm: &Vm, node: &str) {
        if let Ok(mut q) = self.qmp(vm).await {
            let _ = q
                .execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({ "node": node, "name": BITMAP })),
                )
                .await;
        }
    }
}

/// Why the VM's disk cannot be checkpointed now (its state, as the error says it), if it cannot.
fn not_checkpointable(vm: &Vm) -> Option<String> {
    let state = vm.state();
    if vm.removed.load(std::sync::atomic::Ordering::SeqCst) {
        Some("being removed".into())
    } else if vm.incoming() {
        Some("arriving by migration".into())
    } else if let Some(phase) = vm.migration_phase().filter(|p| power_held(false, Some(*p))) {
        Some(format!("migrating (phase {})", phase.as_str()))
    } else if state != VmState::Running {
        Some(state.as_str().into())
    } else if !vm.alive() {
        Some("running, but its QEMU is gone".into())
    } else {
        None
    }
}

async fn read_record(vm: &Vm) -> Option<String> {
    let bytes = tokio::fs::read(vm.path(RECORD)).await.ok()?;
    serde_json::from_slice::<Record>(&bytes).ok().map(|r| r.since)
}

async fn write_record(vm: &Vm, since: &str) -> Result<(), HvError> {
    let path = vm.path(RECORD);
    let tmp = vm.path("checkpoint.json.tmp");
    let bytes = serde_json::to_vec(&Record { since: since.into() }).expect("JSON");
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(HvError::file("writing", &tmp))?;
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(HvError::file("writing", &path))
}

async fn remove_record(vm: &Vm) -> Result<(), HvError> {
    let path = vm.path(RECORD);
    match tokio::fs::remove_file(&path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HvError::file("removing", &path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bitmap_counting_from_the_asked_checkpoint_makes_it_incremental() {
        use Mode::*;
        assert_eq!(choose(Some("a"), Some("a"), true, false), Incremental);
        assert_eq!(choose(None, Some("a"), true, false), Full, "no checkpoint yet");
        assert_eq!(choose(Some("b"), Some("a"), true, false), Full, "another checkpoint");
        assert_eq!(choose(Some("a"), None, true, false), Full, "no record");
        assert_eq!(choose(Some("a"), Some("a"), false, false), Full, "QEMU restarted");
        assert_eq!(
            choose(Some("a"), Some("a"), true, true),
            Full,
            "an interrupted job may have cleared the bitmap"
        );
    }

    #[test]
    fn the_disk_its_bitmap_and_leftovers_are_read_from_qmp() {
        let nodes = json!([
            { "node-name": "#block301", "image": { "virtual-size": 67108864 } },
            { "node-name": "#block132", "image": { "virtual-size": 134217728 },
              "dirty-bitmaps": [{ "name": "shoal-cp", "recording": true, "persistent": false,
                                  "busy": false, "granularity": 65536, "count": 0 }] },
            { "node-name": "#block031", "image": { "virtual-size": 589824 } },
        ]);
        let d = disk_state("running".into(), "#block132".into(), &nodes, &json!([])).unwrap();
        assert_eq!(
            d,
            DiskState {
                run_state: "running".into(),
                node: "#block132".into(),
                size: 134217728,
                bitmap: true,
                leftover_job: None,
                leftover_target: false,
            }
        );
        assert!(!d.leftovers());
        let d = disk_state("paused".into(), "#block301".into(), &nodes, &json!([])).unwrap();
        assert!(!d.bitmap);

        let mut with_target = nodes.as_array().unwrap().clone();
        with_target.push(json!({ "node-name": TARGET_NODE, "image": { "virtual-size": 134217728 } }));
        let jobs = json!([
            { "id": "shoal-mig", "status": "running", "type": "mirror" },
            { "id": JOB, "status": "concluded", "type": "backup", "error": "No space left on device" },
        ]);
        let d = disk_state("running".into(), "#block132".into(), &json!(with_target), &jobs).unwrap();
        assert_eq!(
            (d.leftover_job.as_deref(), d.leftover_target, d.leftovers()),
            (Some("concluded"), true, true)
        );
        assert_eq!(
            backup_job(&jobs).unwrap().error.as_deref(),
            Some("No space left on device")
        );
        assert_eq!(disk_state("running".into(), "#nope".into(), &nodes, &json!([])), None);
    }

    /// What QEMU 7.2's `qemu-img map --output=json` shows of a backup target: a cluster the
    /// guest zeroed is present and zero without data, one it wrote is present with data.
    #[test]
    fn changes_are_the_present_runs_of_the_map_merged() {
        let map = json!([
            { "start": 0, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false },
            { "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false },
            { "start": 131072, "length": 1966080, "depth": 0, "present": false, "zero": true, "data": false },
            { "start": 2097152, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680 },
            { "start": 2228224, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 917504 },
            { "start": 2293760, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false },
            { "start": 2359296, "length": 64749568, "depth": 0, "present": false, "zero": true, "data": false },
        ]);
        assert_eq!(
            changes(&map),
            [
                DiskChange {
                    offset: 0,
                    len: 131072,
                    zero: true
                },
                DiskChange {
                    offset: 2097152,
                    len: 196608,
                    zero: false
                },
                DiskChange {
                    offset: 2293760,
                    len: 65536,
                    zero: true
                },
            ]
        );
        let nothing =
            json!([{ "start": 0, "length": 67108864, "depth": 0, "present": false, "zero": true, "data": false }]);
        assert_eq!(changes(&nothing), []);
        // Data that reads as zeros is still data: the data file holds it.
        let zero_data = json!([{ "start": 0, "length": 4096, "present": true, "zero": true, "data": true }]);
        assert_eq!(
            changes(&zero_data),
            [DiskChange {
                offset: 0,
                len: 4096,
                zero: false
            }]
        );
    }
}
