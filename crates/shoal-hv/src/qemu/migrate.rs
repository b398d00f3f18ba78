//! Live migration with no shared storage, over QMP.
//!
//! The destination ([`QemuDriver::prepare`]) starts QEMU with the VM's usual command line,
//! paused and waiting for the memory stream, and exports its empty overlay over NBD. The source
//! ([`QemuDriver::send`], a background [`Job`]) mirrors its overlay's own blocks into that
//! export, then sends its memory; once that completed it finishes the mirror and drops its NBD
//! node, and stays paused. The destination ([`QemuDriver::finish`]) closes the export and runs
//! the guest. Every way back — a failed step, `cancel_migration` — goes through [`next_undo`],
//! which decides from what QEMU shows alone, so it also works after an agent restart.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shoal_model::agent::{
    IncomingVm, MigrateOut, MigrationMode, MigrationParams, MigrationPhase, MigrationProgress, VmSpec, VmStatus,
};
use shoal_model::VmState;
use uuid::Uuid;

use super::process::{kill9, Launch};
use super::qmp::{Qmp, QmpError};
use super::{ms, seed, QemuDriver, Record, Vm};
use crate::{HvError, Hypervisor};

/// Fixed names, so that what a migration made is found from QMP alone.
const NBD_NODE: &str = "shoal-mig-nbd";
const MIRROR_JOB: &str = "shoal-mig";
const EXPORT_ID: &str = "shoal-mig-export";
/// The export's name on the destination's NBD server.
const EXPORT_NAME: &str = "disk0";

const POLL: Duration = Duration::from_millis(100);
/// How often QEMU is looked at while the guest is (or may soon be) paused for the move: every
/// look's delay adds to the pause.
const PAUSED_POLL: Duration = Duration::from_millis(10);
/// A copy that moves no byte for this long has stalled.
const STALL: Duration = Duration::from_secs(120);
/// How long putting the source back as it was may take.
const UNDO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination waits for its export to close.
const EXPORT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries at a listening port before giving up (another process may take the probed one).
const PORT_TRIES: u32 = 5;
/// QEMU 7.2 caps the memory stream at 32 MiB/s unless told otherwise.
const UNLIMITED_BYTES_PER_S: u64 = 100 << 30;
const MIB: u64 = 1 << 20;
/// What the source's VM says while it waits, paused, for the move to be committed or undone.
const MIGRATED: &str = "migrated; paused until the move is committed";
const INCOMING: &str = "incoming migration";

/// An outgoing migration: its progress, and the task that carries it out.
pub(super) struct Job {
    progress: Mutex<MigrationProgress>,
    started: Instant,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The destination's NBD server and memory listener, whose connections an undo cuts.
    endpoints: Vec<Endpoint>,
}

impl Job {
    fn new(mode: MigrationMode, endpoints: Vec<Endpoint>) -> Job {
        Job {
            progress: Mutex::new(MigrationProgress::starting(mode)),
            started: Instant::now(),
            task: Mutex::new(None),
            endpoints,
        }
    }

    pub(super) fn phase(&self) -> MigrationPhase {
        self.progress.lock().expect("progress").phase
    }

    fn progress(&self) -> MigrationProgress {
        let mut p = self.progress.lock().expect("progress").clone();
        if !p.phase.is_over() {
            p.elapsed_ms = self.started.elapsed().as_millis() as u64;
        }
        p
    }

    fn update(&self, f: impl FnOnce(&mut MigrationProgress)) {
        f(&mut self.progress.lock().expect("progress"));
    }

    fn end(&self, phase: MigrationPhase, error: Option<String>) -> MigrationProgress {
        let mut p = self.progress.lock().expect("progress");
        p.phase = phase;
        p.error = error;
        p.elapsed_ms = self.started.elapsed().as_millis() as u64;
        p.clone()
    }

    /// Stops the task and waits until it has stopped.
    pub(super) async fn abort(&self) {
        let task = self.task.lock().expect("task").take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Vm {
    pub(super) fn migration_phase(&self) -> Option<MigrationPhase> {
        self.migration.lock().expect("migration").as_ref().map(|j| j.phase())
    }

    fn job(&self) -> Option<Arc<Job>> {
        self.migration.lock().expect("migration").clone()
    }

    pub(super) fn alive(&self) -> bool {
        self.process().is_some_and(|p| p.exited.borrow().is_none())
    }

    /// The memory arrived and the guest runs here now.
    fn arrived(&self) {
        let mut r = self.record.lock().expect("vm record");
        r.incoming = false;
        r.incoming_vm = None;
        r.state = VmState::Running;
        r.reason = None;
        r.seq += 1;
        self.persist(&r);
    }
}

impl QemuDriver {
    /// Destination: readies the incoming VM, or answers with the endpoints it already has.
    pub(super) async fn prepare(&self, spec: &VmSpec, listen: Ipv4Addr) -> Result<IncomingVm, HvError> {
        loop {
            let vm = match self.vm(spec.uuid) {
                Some(vm) if !vm.incoming() => return Err(HvError::AlreadyHere(spec.uuid)),
                Some(vm) => vm,
                None => {
                    let dir = self.cfg.dir.join("vms").join(spec.uuid.to_string());
                    let mut record = Record::new(spec);
                    record.incoming = true;
                    record.reason = Some(INCOMING.into());
                    let vm = Arc::new(Vm::new(dir, record));
                    let mut vms = self.vms.lock().expect("vms");
                    if vms.contains_key(&spec.uuid) {
                        continue;
                    }
                    vms.insert(spec.uuid, vm.clone());
                    vm
                }
            };
            let _busy = vm.busy.lock().await;
            let current = self.vm(spec.uuid);
            if vm.removed.load(std::sync::atomic::Ordering::SeqCst) || !current.is_some_and(|c| Arc::ptr_eq(&c, &vm)) {
                // Removed while we waited: start again once it is gone.
                drop(_busy);
                tokio::time::sleep(POLL).await;
                continue;
            }
            let prepared = vm.record.lock().expect("vm record").incoming_vm.clone();
            match (prepared, vm.alive()) {
                (Some(endpoints), true) => return Ok(endpoints),
                (None, false) => {}
                // Its QEMU is gone, and the endpoints with it; or a QEMU from a preparation an
                // agent restart interrupted: prepare afresh.
                _ => {
                    self.discard(&vm).await;
                    continue;
                }
            }
            let t = Instant::now();
            return match self.set_up_incoming(&vm, spec, listen).await {
                Ok(endpoints) => {
                    let mut r = vm.record.lock().expect("vm record");
                    r.incoming_vm = Some(endpoints.clone());
                    r.timings.insert("prepare_incoming_ms".into(), ms(t));
                    vm.persist(&r);
                    tracing::info!(vm = %spec.name, ?endpoints, "ready for the incoming migration");
                    Ok(endpoints)
                }
                Err(e) => {
                    tracing::warn!(vm = %spec.name, "preparing the incoming migration failed: {e}");
                    self.discard(&vm).await;
                    Err(e)
                }
            };
        }
    }

    async fn set_up_incoming(&self, vm: &Arc<Vm>, spec: &VmSpec, listen: Ipv4Addr) -> Result<IncomingVm, HvError> {
        if !self.qemu_found {
            return Err(HvError::QemuMissing(self.cfg.qemu.clone()));
        }
        tokio::fs::create_dir_all(&vm.dir)
            .await
            .map_err(HvError::file("creating", &vm.dir))?;
        {
            let r = vm.record.lock().expect("vm record");
            vm.persist(&r);
        }
        let base = self.template(spec).await?;
        // Empty: the source's mirror fills in what its overlay holds; the rest is the base.
        self.create_overlay(vm, spec, &base).await?;
        let t = Instant::now();
        seed::write_seed(spec, &self.resolvers(spec), &vm.path("seed.img")).await?;
        vm.record_timing("seed_ms", ms(t));
        self.launch(vm, spec, &base, Launch::Incoming).await?;
        self.wait_status(vm, &["inmigrate"]).await?;
        let mut q = self.qmp(vm).await?;
        let node = disk_node(&mut q, &vm.path("disk.qcow2")).await?;
        let nbd_port = start_listener(&mut q, Listener::Nbd, listen).await?;
        q.execute(
            "block-export-add",
            Some(json!({
                "type": "nbd",
                "id": EXPORT_ID,
                "node-name": node,
                "name": EXPORT_NAME,
                "writable": true,
            })),
        )
        .await?;
        let memory_port = start_listener(&mut q, Listener::Memory, listen).await?;
        Ok(IncomingVm {
            nbd: format!("{listen}:{nbd_port}"),
            export: EXPORT_NAME.into(),
            memory_uri: format!("tcp:{listen}:{memory_port}"),
        })
    }

    /// Ends an incoming VM that will not arrive: its QEMU, its directory, its record.
    async fn discard(&self, vm: &Arc<Vm>) {
        use std::sync::atomic::Ordering;
        vm.removed.store(true, Ordering::SeqCst);
        vm.expect_exit.store(true, Ordering::SeqCst);
        if let Some(p) = vm.process() {
            if p.exited.borrow().is_none() {
                kill9(p.pid);
                let mut exited = p.exited.clone();
                let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|x| x.is_some())).await;
            }
        }
        if let Some(n) = self.net.get() {
            n.release(vm.uuid).await;
        }
        if let Err(e) = tokio::fs::remove_dir_all(&vm.dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(vm = %vm.uuid, "removing {}: {e}", vm.dir.display());
            }
        }
        let mut vms = self.vms.lock().expect("vms");
        if vms.get(&vm.uuid).is_some_and(|v| Arc::ptr_eq(v, vm)) {
            vms.remove(&vm.uuid);
        }
    }

    /// Source: starts sending the VM, or answers with the progress of the migration under way.
    pub(super) async fn send(self: &Arc<Self>, uuid: Uuid, req: &MigrateOut) -> Result<MigrationProgress, HvError> {
        let vm = self.vm(uuid).ok_or(HvError::NotFound(uuid))?;
        if let Some(p) = ongoing(&vm) {
            return Ok(p);
        }
        let nbd = Endpoint::parse(&req.to.nbd).ok_or_else(|| HvError::BadEndpoint {
            vm: uuid,
            value: req.to.nbd.clone(),
        })?;
        // Under `busy`, so that no power transition starts between this check and the job's
        // registration (transitions do not start while a job is registered).
        let Ok(_busy) = vm.busy.try_lock() else {
            return Err(HvError::NotRunning {
                vm: uuid,
                state: format!(
                    "{} and changing (a power transition, snapshot or checkpoint is under way)",
                    vm.state().as_str()
                ),
            });
        };
        if let Some(p) = ongoing(&vm) {
            return Ok(p);
        }
        let state = vm.state();
        if state != VmState::Running || vm.incoming() || !vm.alive() {
            return Err(HvError::NotRunning {
                vm: uuid,
                state: state.as_str().into(),
            });
        }
        let run_state = self.qmp(&vm).await?.status().await?;
        if run_state != "running" {
            return Err(HvError::NotRunning {
                vm: uuid,
                state: format!("paused (QEMU is {run_state})"),
            });
        }
        let mode = req.params.mode.resolve(&self.driver(), &self.driver());
        let memory = req.to.memory_uri.strip_prefix("tcp:").and_then(Endpoint::parse);
        let job = Arc::new(Job::new(
            mode,
            [Some(nbd.clone()), memory].into_iter().flatten().collect(),
        ));
        let first = job.progress();
        let task = tokio::spawn({
            let (driver, vm, job, req) = (self.clone(), vm.clone(), job.clone(), req.clone());
            async move { driver.run(&vm, &job, &req, nbd, mode).await }
        });
        *job.task.lock().expect("task") = Some(task);
        *vm.migration.lock().expect("migration") = Some(job);
        tracing::info!(vm = %uuid, mode = mode.as_str(), to = %req.to.memory_uri, "migration started");
        Ok(first)
    }

    async fn run(&self, vm: &Vm, job: &Job, req: &MigrateOut, nbd: Endpoint, mode: MigrationMode) {
        let t = Instant::now();
        match self.migrate(vm, job, req, nbd, mode).await {
            Ok(()) => {
                let p = job.progress();
                vm.record_timing("migrate_ms", ms(t));
                if let Some(d) = p.downtime_ms {
                    vm.record_timing("downtime_ms", d as f64);
                }
                vm.record_timing("migrate_ram_bytes", p.ram_sent_bytes as f64);
                vm.record_timing("migrate_disk_bytes", p.disk_sent_bytes as f64);
                // Before the phase: whoever sees `completed` sees the VM say why it is paused.
                vm.set(VmState::Running, Some(MIGRATED.into()));
                job.end(MigrationPhase::Completed, None);
                tracing::info!(vm = %vm.uuid, ms = ms(t), downtime_ms = ?p.downtime_ms, "migration completed");
            }
            Err(e) => {
                let mut reason = match e {
                    HvError::MigrationFailed { reason, .. } => reason,
                    e => e.to_string(),
                };
                tracing::warn!(vm = %vm.uuid, "migration failed: {reason}");
                cut_connections(vm, &job.endpoints).await;
                if let Err(u) = self.undo(vm).await {
                    reason.push_str(&format!("; putting the source back failed too: {u}"));
                }
                job.end(MigrationPhase::Failed, Some(reason));
            }
        }
    }

    /// The steps of a migration, from the disk to the source's clean-up once the memory arrived.
    async fn migrate(
        &self,
        vm: &Vm,
        job: &Job,
        req: &MigrateOut,
        nbd: Endpoint,
        mode: MigrationMode,
    ) -> Result<(), HvError> {
        let failed = |reason: String| HvError::MigrationFailed { vm: vm.uuid, reason };
        {
            let mut q = self.qmp(vm).await?;
            let node = disk_node(&mut q, &vm.path("disk.qcow2")).await?;
            q.execute(
                "blockdev-add",
                Some(json!({
                    "driver": "nbd",
                    "node-name": NBD_NODE,
                    "server": { "type": "inet", "host": nbd.host, "port": nbd.port.to_string() },
                    "export": req.to.export,
                })),
            )
            .await?;
            q.execute("blockdev-mirror", Some(mirror_arguments(&node, &req.params)))
                .await?;
        }
        let mut stall = Stall::new();
        loop {
            let jobs = self.qmp(vm).await?.execute("query-jobs", None).await?;
            let mirror = mirror_job(&jobs);
            job.update(|p| mirror.iter().for_each(|m| m.report(p)));
            match mirror {
                Some(m) if m.status == "ready" => break,
                Some(m) if m.alive() => {}
                m => return Err(failed(format!("copying the disk: {}", MirrorJob::why(m.as_ref())))),
            }
            if stall.stuck(job.progress().disk_sent_bytes) {
                return Err(failed(format!("copying the disk: no progress for {STALL:?}")));
            }
            tokio::time::sleep(POLL).await;
        }

        let paused_at;
        {
            let mut q = self.qmp(vm).await?;
            q.execute("migrate-set-parameters", Some(memory_parameters(&req.params)))
                .await?;
            q.execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [
                    { "capability": "auto-converge", "state": mode == MigrationMode::Live },
                ]})),
            )
            .await?;
            let t = Instant::now();
            if mode == MigrationMode::Pause {
                q.execute("stop", None).await?;
            }
            job.update(|p| p.phase = MigrationPhase::Memory);
            q.execute("migrate", Some(json!({ "uri": req.to.memory_uri }))).await?;
            paused_at = (mode == MigrationMode::Pause).then(|| t.elapsed());
        }
        let mut stall = Stall::new();
        loop {
            let (m, jobs) = {
                let mut q = self.qmp(vm).await?;
                (
                    q.execute("query-migrate", None).await?,
                    q.execute("query-jobs", None).await?,
                )
            };
            let mirror = mirror_job(&jobs);
            job.update(|p| mirror.iter().for_each(|m| m.report(p)));
            // A mirror that stopped copying leaves the destination's disk behind the memory.
            if !mirror.as_ref().is_some_and(MirrorJob::alive) {
                return Err(failed(format!("copying the disk: {}", MirrorJob::why(mirror.as_ref()))));
            }
            let mut outcome = Outcome::Going;
            job.update(|p| outcome = memory_progress(p, &m, paused_at));
            match outcome {
                Outcome::Done => break,
                Outcome::Failed(why) => return Err(failed(format!("copying the memory: {why}"))),
                Outcome::Going => {}
            }
            if stall.stuck(job.progress().ram_sent_bytes) {
                return Err(failed(format!("copying the memory: no progress for {STALL:?}")));
            }
            tokio::time::sleep(PAUSED_POLL).await;
        }

        // Cancelled without force, a ready mirror completes without switching the source to
        // the copy, after copying whatever is still dirty; the export closes only once this
        // node is gone, so the destination cannot run before its disk is whole.
        self.qmp(vm)
            .await?
            .execute("block-job-cancel", Some(json!({ "device": MIRROR_JOB })))
            .await?;
        let mut stall = Stall::new();
        loop {
            let jobs = self.qmp(vm).await?.execute("query-jobs", None).await?;
            let mirror = mirror_job(&jobs);
            job.update(|p| mirror.iter().for_each(|m| m.report(p)));
            match mirror {
                Some(m) if m.status == "concluded" => {
                    self.qmp(vm)
                        .await?
                        .execute("job-dismiss", Some(json!({ "id": MIRROR_JOB })))
                        .await?;
                    if let Some(e) = m.error {
                        return Err(failed(format!("copying the last disk blocks: {e}")));
                    }
                    break;
                }
                Some(m) if m.alive() || m.status == "aborting" => {}
                m => {
                    return Err(failed(format!(
                        "copying the last disk blocks: {}",
                        MirrorJob::why(m.as_ref())
                    )))
                }
            }
            if stall.stuck(job.progress().disk_sent_bytes) {
                return Err(failed(format!(
                    "copying the last disk blocks: no progress for {STALL:?}"
                )));
            }
            tokio::time::sleep(PAUSED_POLL).await;
        }
        self.qmp(vm)
            .await?
            .execute("blockdev-del", Some(json!({ "node-name": NBD_NODE })))
            .await?;
        Ok(())
    }

    /// Puts the source back as it was before the migration, whatever the migration's phase:
    /// memory copy cancelled, mirror gone, NBD node gone, guest running. Returns whether there
    /// was anything to undo.
    async fn undo(&self, vm: &Vm) -> Result<bool, HvError> {
        let deadline = Instant::now() + UNDO_TIMEOUT;
        let mut q = self.qmp(vm).await?;
        let mut did = false;
        loop {
            let seen = observe(&mut q).await?;
            let Some(step) = next_undo(&seen) else { return Ok(did) };
            if Instant::now() > deadline {
                return Err(HvError::MigrationFailed {
                    vm: vm.uuid,
                    reason: format!("not undone within {UNDO_TIMEOUT:?}: QEMU still shows {seen:?}"),
                });
            }
            did = true;
            let (command, arguments) = match step {
                Undo::Wait => {
                    tokio::time::sleep(POLL / 2).await;
                    continue;
                }
                Undo::CancelMemory => ("migrate_cancel", None),
                Undo::CancelMirror => ("block-job-cancel", Some(json!({ "device": MIRROR_JOB, "force": true }))),
                Undo::DismissMirror => ("job-dismiss", Some(json!({ "id": MIRROR_JOB }))),
                Undo::DeleteNode => ("blockdev-del", Some(json!({ "node-name": NBD_NODE }))),
                Undo::Cont => ("cont", None),
            };
            tracing::info!(vm = %vm.uuid, "undoing the migration: {command}");
            match q.execute(command, arguments).await {
                // QEMU moved on between the look and the step (a job that concluded meanwhile):
                // look again.
                Err(QmpError::Command { desc, .. }) => {
                    tracing::debug!(vm = %vm.uuid, "{command}: {desc}");
                    tokio::time::sleep(POLL / 2).await;
                }
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
        }
    }

    pub(super) fn migration_progress(&self, uuid: Uuid) -> Result<MigrationProgress, HvError> {
        let vm = self.vm(uuid).ok_or(HvError::NotFound(uuid))?;
        vm.job().map(|j| j.progress()).ok_or(HvError::NotMigrating(uuid))
    }

    /// Source: stops the migration wherever it is and lets the guest run here again.
    pub(super) async fn cancel_outgoing(&self, uuid: Uuid) -> Result<VmStatus, HvError> {
        let vm = self.vm(uuid).ok_or(HvError::NotFound(uuid))?;
        let job = vm.migration.lock().expect("migration").take();
        if let Some(j) = &job {
            j.abort().await;
            j.end(MigrationPhase::Cancelled, None);
            cut_connections(&vm, &j.endpoints).await;
        }
        let _busy = vm.busy.lock().await;
        if vm.incoming() || !vm.alive() {
            return Ok(vm.status());
        }
        let undone = self.undo(&vm).await?;
        if (undone || job.is_some()) && vm.state() == VmState::Running {
            vm.set(VmState::Running, None);
        }
        tracing::info!(vm = %uuid, undone, "migration cancelled");
        Ok(vm.status())
    }

    /// Destination: the memory arrived; closes the export and runs the guest.
    pub(super) async fn finish(&self, uuid: Uuid) -> Result<VmStatus, HvError> {
        let vm = self.vm(uuid).ok_or(HvError::NotFound(uuid))?;
        let _busy = vm.busy.lock().await;
        if !vm.incoming() {
            return Ok(vm.status());
        }
        let t = Instant::now();
        let mut q = self.qmp(&vm).await?;
        let status = q.status().await?;
        match status.as_str() {
            "inmigrate" => return Err(HvError::NotArrived { vm: uuid, status }),
            "paused" | "running" => {}
            _ => {
                return Err(HvError::UnexpectedStatus {
                    state: status,
                    expected: vec!["paused".into()],
                })
            }
        }
        if has_export(&mut q).await? {
            // Safe mode: refused while the source is connected, since its last writes may
            // still be on their way.
            if let Err(e) = q.execute("block-export-del", Some(json!({ "id": EXPORT_ID }))).await {
                return Err(match e {
                    QmpError::Command { desc, .. } if desc.contains("in use") => HvError::NotArrived {
                        vm: uuid,
                        status: format!("{status}, and the source still writes to its disk"),
                    },
                    e => e.into(),
                });
            }
            let deadline = Instant::now() + EXPORT_CLOSE_TIMEOUT;
            while has_export(&mut q).await? {
                if Instant::now() > deadline {
                    return Err(HvError::NotArrived {
                        vm: uuid,
                        status: format!("{status}, and its disk export did not close within {EXPORT_CLOSE_TIMEOUT:?}"),
                    });
                }
                tokio::time::sleep(PAUSED_POLL).await;
            }
        }
        match q.execute("nbd-server-stop", None).await {
            // Stopped already (a finish that was interrupted).
            Ok(_) | Err(QmpError::Command { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if status == "paused" {
            q.execute("cont", None).await?;
        }
        // Switches learn where the guest's MAC went. QEMU 7.2 wants every parameter.
        q.execute(
            "announce-self",
            Some(json!({ "initial": 50, "max": 550, "rounds": 5, "step": 100 })),
        )
        .await?;
        vm.arrived();
        vm.record_timing("finish_incoming_ms", ms(t));
        tracing::info!(vm = %uuid, "incoming migration finished; the guest runs here");
        Ok(vm.status())
    }
}

/// The progress of a migration that is not over, or completed (a completed one is not started
/// again: its guest waits here, paused, for the move to be committed or undone).
fn ongoing(vm: &Vm) -> Option<MigrationProgress> {
    vm.job()
        .filter(|j| !matches!(j.phase(), MigrationPhase::Failed | MigrationPhase::Cancelled))
        .map(|j| j.progress())
}

/// Cuts this host's TCP connections to the destination's endpoints (`ss -K`), so that QEMU's
/// NBD client and migration stream fail at once: to a destination that vanished without a reset
/// (a cut link) QEMU 7.2 would otherwise block, its main loop and QMP with it, until TCP gives
/// up minutes later, and the guest could not be resumed. Each endpoint belongs to this one
/// migration (its ports were chosen for it). Needs CAP_NET_ADMIN; without it, the undo waits.
async fn cut_connections(vm: &Vm, endpoints: &[Endpoint]) {
    for e in endpoints {
        let port = e.port.to_string();
        let out = tokio::process::Command::new("ss")
            .args(["-K", "dst", &e.host, "dport", "=", &port])
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                tracing::debug!(vm = %vm.uuid, "ss -K {}:{port}: {}", e.host, String::from_utf8_lossy(&o.stderr).trim())
            }
            Err(err) => tracing::debug!(vm = %vm.uuid, "ss -K {}:{port}: {err}", e.host),
        }
    }
}

/// An `ADDRESS:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(s: &str) -> Option<Endpoint> {
        let (host, port) = s.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then_some(())?;
        Some(Endpoint {
            host: host.to_string(),
            port: port.parse().ok().filter(|p| *p != 0)?,
        })
    }
}

/// What the destination listens for.
#[derive(Clone, Copy, Debug)]
enum Listener {
    Nbd,
    Memory,
}

impl Listener {
    fn command(self, addr: Ipv4Addr, port: u16) -> (&'static str, Value) {
        match self {
            Listener::Nbd => (
                "nbd-server-start",
                json!({ "addr": { "type": "inet", "data": { "host": addr.to_string(), "port": port.to_string() } } }),
            ),
            Listener::Memory => ("migrate-incoming", json!({ "uri": format!("tcp:{addr}:{port}") })),
        }
    }
}

/// Has QEMU listen on a free port of `addr`: a port the OS just handed out, tried again with
/// another if someone took it meanwhile.
async fn start_listener(q: &mut Qmp, what: Listener, addr: Ipv4Addr) -> Result<u16, HvError> {
    let mut tries = 0;
    loop {
        let port = std::net::TcpListener::bind((addr, 0))
            .and_then(|l| l.local_addr())
            .map_err(|source| HvError::Listen { addr, source })?
            .port();
        let (command, arguments) = what.command(addr, port);
        match q.execute(command, Some(arguments)).await {
            Ok(_) => return Ok(port),
            Err(QmpError::Command { desc, .. }) if desc.contains("in use") && tries + 1 < PORT_TRIES => {
                tracing::debug!("{command} on {addr}:{port}: {desc}; trying another port");
                tries += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The node of the VM's disk in QEMU: found by its file, because QEMU names the nodes of
/// `-drive` itself (VMs from older agents included); else the first virtio drive's.
pub(super) async fn disk_node(q: &mut Qmp, file: &Path) -> Result<String, HvError> {
    let blocks = q.execute("query-block", None).await?;
    pick_disk_node(&blocks, &file.to_string_lossy()).ok_or_else(|| HvError::Tool {
        what: "query-block".into(),
        stderr: format!("QEMU shows no block device for {}", file.display()),
    })
}

fn pick_disk_node(blocks: &Value, file: &str) -> Option<String> {
    let blocks = blocks.as_array()?;
    let node = |b: &Value| b["inserted"]["node-name"].as_str().map(str::to_string);
    blocks
        .iter()
        .find(|b| b["inserted"]["file"].as_str() == Some(file))
        .or_else(|| blocks.iter().find(|b| b["device"] == "virtio0"))
        .and_then(node)
}

async fn has_export(q: &mut Qmp) -> Result<bool, QmpError> {
    let exports = q.execute("query-block-exports", None).await?;
    Ok(exports
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["id"] == EXPORT_ID)))
}

fn mirror_arguments(node: &str, params: &MigrationParams) -> Value {
    let mut args = json!({
        "job-id": MIRROR_JOB,
        "device": node,
        "target": NBD_NODE,
        // The destination has the same base: only the overlay's own blocks move.
        "sync": "top",
        // Once in step, every guest write reaches the destination before it completes, so
        // nothing is left to copy when QEMU deactivates the source's disks at the switchover.
        "copy-mode": "write-blocking",
        // A failed job stays to be looked at (its error) until dismissed.
        "auto-dismiss": false,
    });
    if let Some(mib) = params.bandwidth_mib.filter(|m| *m > 0) {
        args["speed"] = json!(mib.saturating_mul(MIB));
    }
    args
}

/// The memory stream's parameters with no cap.
pub(super) fn unlimited() -> Value {
    memory_parameters(&MigrationParams::default())
}

fn memory_parameters(params: &MigrationParams) -> Value {
    let mut p = json!({
        "max-bandwidth": params
            .bandwidth_mib
            .filter(|m| *m > 0)
            .map_or(UNLIMITED_BYTES_PER_S, |m| m.saturating_mul(MIB)),
    });
    if let Some(ms) = params.max_downtime_ms {
        p["downtime-limit"] = json!(ms);
    }
    p
}

/// The mirror job as `query-jobs` shows it.
#[derive(Clone, Debug, PartialEq)]
struct MirrorJob {
    status: String,
    done: u64,
    total: u64,
    error: Option<String>,
}

impl MirrorJob {
    /// Still copying, or able to.
    pub(super) fn alive(&self) -> bool {
        matches!(
            self.status.as_str(),
            "created" | "running" | "paused" | "ready" | "standby" | "waiting" | "pending"
        )
    }

    fn why(m: Option<&MirrorJob>) -> String {
        match m {
            None => "the copy job vanished".into(),
            Some(m) => m
                .error
                .clone()
                .unwrap_or_else(|| format!("the copy job is {}", m.status)),
        }
    }

    fn report(&self, p: &mut MigrationProgress) {
        p.disk_total_bytes = self.total;
        p.disk_sent_bytes = self.done;
    }
}

fn mirror_job(jobs: &Value) -> Option<MirrorJob> {
    let j = jobs.as_array()?.iter().find(|j| j["id"] == MIRROR_JOB)?;
    Some(MirrorJob {
        status: j["status"].as_str().unwrap_or("?").to_string(),
        done: j["current-progress"].as_u64().unwrap_or(0),
        total: j["total-progress"].as_u64().unwrap_or(0),
        error: j["error"].as_str().map(str::to_string),
    })
}

/// Where the memory copy is.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Going,
    Done,
    Failed(String),
}

/// Reads `query-migrate`'s answer into `p`. `paused_for` is how long the guest had been paused
/// when the copy started (pause mode), so the downtime reported is the whole pause here.
fn memory_progress(p: &mut MigrationProgress, m: &Value, paused_for: Option<Duration>) -> Outcome {
    let ram = &m["ram"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    if ram.is_object() {
        p.ram_total_bytes = n(&ram["total"]);
        p.ram_sent_bytes = n(&ram["transferred"]);
        p.ram_remaining_bytes = n(&ram["remaining"]);
        p.dirty_pages_per_s = n(&ram["dirty-pages-rate"]);
    }
    p.expected_downtime_ms = m["expected-downtime"].as_u64().or(p.expected_downtime_ms);
    match m["status"].as_str() {
        Some("completed") => {
            p.ram_remaining_bytes = 0;
            p.downtime_ms = match paused_for {
                Some(before) => Some(before.as_millis() as u64 + n(&m["total-time"])),
                None => m["downtime"].as_u64(),
            };
            Outcome::Done
        }
        Some("failed") => Outcome::Failed(m["error-desc"].as_str().unwrap_or("QEMU gave no reason").to_string()),
        Some(s @ ("cancelled" | "cancelling")) => Outcome::Failed(format!("the copy was {s}")),
        _ => Outcome::Going,
    }
}

/// Notices a copy that stopped moving.
struct Stall {
    last: u64,
    since: Instant,
}

impl Stall {
    fn new() -> Stall {
        Stall {
            last: 0,
            since: Instant::now(),
        }
    }

    fn stuck(&mut self, value: u64) -> bool {
        if value != self.last {
            self.last = value;
            self.since = Instant::now();
        }
        self.since.elapsed() > STALL
    }
}

/// What QEMU shows of a migration on the source.
#[derive(Debug, Default)]
struct Observed {
    /// `query-status`.
    run_state: String,
    /// `query-migrate`'s status, if any.
    migration: Option<String>,
    /// The mirror job's status, if there is one.
    mirror: Option<String>,
    /// Whether the NBD client node exists.
    nbd_node: bool,
}

async fn observe(q: &mut Qmp) -> Result<Observed, QmpError> {
    let run_state = q.status().await?;
    let migration = q.execute("query-migrate", None).await?["status"]
        .as_str()
        .map(str::to_string);
    let mirror = mirror_job(&q.execute("query-jobs", None).await?).map(|m| m.status);
    let nodes = q
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await?;
    let nbd_node = nodes
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n["node-name"] == NBD_NODE));
    Ok(Observed {
        run_state,
        migration,
        mirror,
        nbd_node,
    })
}

/// One step of putting the source back.
#[derive(Debug, PartialEq, Eq)]
enum Undo {
    /// `migrate_cancel`.
    CancelMemory,
    /// Force-cancel the mirror (it does not complete: the source keeps its disk).
    CancelMirror,
    /// `job-dismiss` the concluded mirror.
    DismissMirror,
    /// `blockdev-del` the NBD client node.
    DeleteNode,
    /// `cont`: runs a guest the migration paused (and reactivates its disks after a completed one).
    Cont,
    /// QEMU is on its way to a state a step can act on.
    Wait,
}

/// The next step that puts the source back, in order: the memory copy first (it would
/// otherwise complete and pause the guest), then the mirror and its node, then the guest.
/// `None` once there is nothing left to undo.
fn next_undo(o: &Observed) -> Option<Undo> {
    match o.migration.as_deref() {
        Some("cancelling") => return Some(Undo::Wait),
        Some(s) if !matches!(s, "none" | "completed" | "failed" | "cancelled") => return Some(Undo::CancelMemory),
        _ => {}
    }
    if o.run_state == "finish-migrate" {
        return Some(Undo::Wait);
    }
    match o.mirror.as_deref() {
        Some("concluded") => return Some(Undo::DismissMirror),
        Some("aborting" | "null") => return Some(Undo::Wait),
        Some(_) => return Some(Undo::CancelMirror),
        None => {}
    }
    if o.nbd_node {
        return Some(Undo::DeleteNode);
    }
    matches!(o.run_state.as_str(), "paused" | "postmigrate").then_some(Undo::Cont)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(run_state: &str, migration: Option<&str>, mirror: Option<&str>, nbd_node: bool) -> Observed {
        Observed {
            run_state: run_state.into(),
            migration: migration.map(Into::into),
            mirror: mirror.map(Into::into),
            nbd_node,
        }
    }

    /// Applies the step as QEMU would, to walk `next_undo` to its end.
    fn apply(o: &mut Observed, step: &Undo) {
        match step {
            Undo::CancelMemory => o.migration = Some("cancelling".into()),
            Undo::Wait if o.migration.as_deref() == Some("cancelling") => o.migration = Some("cancelled".into()),
            Undo::Wait if o.run_state == "finish-migrate" => o.run_state = "postmigrate".into(),
            Undo::Wait | Undo::CancelMirror => o.mirror = Some("concluded".into()),
            Undo::DismissMirror => o.mirror = None,
            Undo::DeleteNode => o.nbd_node = false,
            Undo::Cont => o.run_state = "running".into(),
        }
    }

    fn walk(mut o: Observed) -> Vec<Undo> {
        let mut steps = Vec::new();
        while let Some(s) = next_undo(&o) {
            apply(&mut o, &s);
            steps.push(s);
            assert!(steps.len() < 20, "no end: {steps:?}");
        }
        assert_eq!(o.run_state, "running", "{steps:?}");
        steps
    }

    #[test]
    fn undo_cancels_the_memory_then_the_disk_then_runs_the_guest() {
        use Undo::*;
        // Pause mode, cancelled while the memory copies.
        assert_eq!(
            walk(seen("paused", Some("active"), Some("ready"), true)),
            [CancelMemory, Wait, CancelMirror, DismissMirror, DeleteNode, Cont]
        );
        // Completed: the source waits in postmigrate with its mirror still ready.
        assert_eq!(
            walk(seen("postmigrate", Some("completed"), Some("ready"), true)),
            [CancelMirror, DismissMirror, DeleteNode, Cont]
        );
        // Completed and cleaned up: only the guest is left to run.
        assert_eq!(walk(seen("postmigrate", Some("completed"), None, false)), [Cont]);
        // The destination died: QEMU failed the copy and ran the guest again (live mode); the
        // mirror failed too.
        assert_eq!(
            walk(seen("running", Some("failed"), Some("concluded"), true)),
            [DismissMirror, DeleteNode]
        );
        // Still copying the disk.
        assert_eq!(
            walk(seen("running", None, Some("running"), true)),
            [CancelMirror, DismissMirror, DeleteNode]
        );
        // Caught in the switchover.
        assert_eq!(
            walk(seen("finish-migrate", Some("device"), Some("ready"), true)),
            [CancelMemory, Wait, Wait, CancelMirror, DismissMirror, DeleteNode, Cont]
        );
    }

    #[test]
    fn a_vm_that_never_migrated_has_nothing_to_undo() {
        assert_eq!(next_undo(&seen("running", None, None, false)), None);
        // An arrived VM's QEMU keeps saying its incoming migration completed.
        assert_eq!(next_undo(&seen("running", Some("completed"), None, false)), None);
    }

    #[test]
    fn endpoints_are_address_and_port() {
        assert_eq!(
            Endpoint::parse("10.0.0.2:10809"),
            Some(Endpoint {
                host: "10.0.0.2".into(),
                port: 10809
            })
        );
        assert_eq!(Endpoint::parse("[::1]:80").map(|e| e.host), Some("::1".into()));
        for bad in ["10.0.0.2", ":80", "10.0.0.2:0", "10.0.0.2:http", "10.0.0.2:70000", ""] {
            assert_eq!(Endpoint::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_memory_stream_is_always_given_a_bandwidth() {
        let unlimited = memory_parameters(&MigrationParams::default());
        assert_eq!(unlimited, json!({ "max-bandwidth": UNLIMITED_BYTES_PER_S }));
        let capped = memory_parameters(&MigrationParams {
            bandwidth_mib: Some(8),
            max_downtime_ms: Some(300),
            ..Default::default()
        });
        assert_eq!(capped, json!({ "max-bandwidth": 8 << 20, "downtime-limit": 300 }));
        let mirror = mirror_arguments(
            "#block123",
            &MigrationParams {
                bandwidth_mib: Some(8),
                ..Default::default()
            },
        );
        assert_eq!(
            (mirror["speed"].as_u64(), mirror["sync"].as_str()),
            (Some(8 << 20), Some("top"))
        );
        assert!(mirror_arguments("n", &MigrationParams::default())
            .get("speed")
            .is_none());
    }

    #[test]
    fn the_memory_copy_reports_its_bytes_and_the_pause() {
        let mut p = MigrationProgress::starting(MigrationMode::Live);
        let active = json!({
            "status": "active", "expected-downtime": 300,
            "ram": { "total": 135012352, "transferred": 16826108, "remaining": 101654528, "dirty-pages-rate": 12 },
        });
        assert_eq!(memory_progress(&mut p, &active, None), Outcome::Going);
        assert_eq!(
            (
                p.ram_total_bytes,
                p.ram_sent_bytes,
                p.ram_remaining_bytes,
                p.dirty_pages_per_s
            ),
            (135012352, 16826108, 101654528, 12)
        );
        assert_eq!(p.expected_downtime_ms, Some(300));
        let done = json!({ "status": "completed", "downtime": 10, "total-time": 287, "ram": { "total": 1, "transferred": 2, "remaining": 0 } });
        assert_eq!(memory_progress(&mut p, &done, None), Outcome::Done);
        assert_eq!(p.downtime_ms, Some(10));
        // Paused first: the guest stood still for the whole copy, and a little before it.
        assert_eq!(
            memory_progress(&mut p, &done, Some(Duration::from_millis(3))),
            Outcome::Done
        );
        assert_eq!(p.downtime_ms, Some(290));
        let failed = json!({ "status": "failed", "error-desc": "Unable to write to socket: Broken pipe" });
        assert_eq!(
            memory_progress(&mut p, &failed, None),
            Outcome::Failed("Unable to write to socket: Broken pipe".into())
        );
    }

    #[test]
    fn the_mirror_is_read_from_the_job_list() {
        let jobs = json!([
            { "id": "other", "status": "running", "type": "backup" },
            { "id": MIRROR_JOB, "status": "concluded", "current-progress": 1584128, "total-progress": 2108416,
              "type": "mirror", "error": "Input/output error" },
        ]);
        let m = mirror_job(&jobs).unwrap();
        assert_eq!((m.done, m.total, m.alive()), (1584128, 2108416, false));
        assert_eq!(MirrorJob::why(Some(&m)), "Input/output error");
        assert_eq!(MirrorJob::why(None), "the copy job vanished");
        assert_eq!(mirror_job(&json!([])), None);
    }

    #[test]
    fn the_disk_node_is_found_by_its_file() {
        let blocks = json!([
            { "device": "virtio1", "inserted": { "file": "/v/seed.img", "node-name": "#block593" } },
            { "device": "virtio0", "inserted": { "file": "/v/disk.qcow2", "node-name": "#block182" } },
        ]);
        assert_eq!(pick_disk_node(&blocks, "/v/disk.qcow2").as_deref(), Some("#block182"));
        // Moved directory, same drive.
        assert_eq!(pick_disk_node(&blocks, "/w/disk.qcow2").as_deref(), Some("#block182"));
        assert_eq!(pick_disk_node(&json!([]), "/v/disk.qcow2"), None);
    }
}
