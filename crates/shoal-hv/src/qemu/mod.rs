//! The QEMU driver: each VM is a `qemu-system-x86_64` process of its own, driven over QMP.
//!
//! Per VM, a directory `vms/<uuid>/` holds `vm.json` (spec, state, sequence number),
//! `disk.qcow2` (a copy-on-write overlay on the host's base image of the template), `seed.img`
//! (the NoCloud seed), `console.log` (the serial console, appended across restarts),
//! `qemu.log` (QEMU's own messages), `qmp.sock`, `qemu.pid`, while suspended `memory.state`,
//! and once its disk was checkpointed `checkpoint.json` (the checkpoint QEMU's dirty bitmap
//! counts from, `checkpoint.rs`). Templates, and the checkpoints VMs restart from, are
//! materialised once per host under `templates/<hash>/`.
//!
//! Live migration (`migrate.rs`) moves a running VM between two such drivers with no shared
//! storage: the destination's QEMU waits for the memory stream and exports its empty overlay
//! over NBD, the source mirrors its overlay into that export, then sends its memory.
//!
//! QEMU runs in its own process group, so it outlives the agent; a restarted agent re-adopts
//! running VMs from their pid files. Transitions (boot, shutdown, suspend, resume) run one at a
//! time per VM in the background; `ensure` only starts them and reports the state.

pub mod accel;
mod checkpoint;
mod disk;
mod migrate;
mod process;
pub mod qmp;
pub mod seed;
mod template;
mod transition;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shoal_model::agent::{
    CheckpointDisk, ConsoleChunk, DiskCheckpoint, DiskSnapshot, IncomingVm, MigrateOut, MigrationProgress, VmSpec,
    VmStatus,
};
use shoal_model::VmState;
use tokio::sync::watch;
use uuid::Uuid;

pub use accel::Accel;
pub use process::kill_all;
pub use process::process_cpu_seconds;

use crate::{HvError, Hypervisor, TemplateSource, VmNet};

#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// Where VMs and materialised templates live.
    pub dir: PathBuf,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    /// Forced accelerator; `None` probes KVM and falls back to TCG.
    pub accel: Option<Accel>,
    /// How long a guest gets to power off after the ACPI button before QEMU is stopped hard.
    pub stop_timeout: Duration,
    /// How long a guest gets to print its template's ready pattern.
    pub ready_timeout: Duration,
    /// How long QMP gets to answer one command.
    pub qmp_timeout: Duration,
}

impl QemuConfig {
    pub fn new(dir: PathBuf) -> QemuConfig {
        QemuConfig {
            dir,
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            accel: None,
            stop_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(300),
            qmp_timeout: Duration::from_secs(10),
        }
    }
}

/// What `vm.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    spec: VmSpec,
    state: VmState,
    reason: Option<String>,
    seq: u64,
    /// How long the last of each step took, in milliseconds (`clone`, `seed`, `qemu_start`,
    /// `ready`, `suspend`, `resume`, `prepare_incoming`, `migrate`, `downtime`,
    /// `finish_incoming`), and the size of the last saved memory (`state_bytes`) and of the
    /// last migration's copies (`migrate_ram_bytes`, `migrate_disk_bytes`).
    #[serde(default)]
    timings: std::collections::BTreeMap<String, f64>,
    /// The VM is arriving by migration: its QEMU waits for the source's memory and runs only
    /// through `finish_incoming`.
    #[serde(default)]
    incoming: bool,
    /// Where the source sends it, once prepared.
    #[serde(default)]
    incoming_vm: Option<IncomingVm>,
}

impl Record {
    fn new(spec: &VmSpec) -> Record {
        Record {
            spec: spec.clone(),
            state: VmState::Creating,
            reason: None,
            seq: 1,
            timings: Default::default(),
            incoming: false,
            incoming_vm: None,
        }
    }
}

/// A QEMU process the driver watches: its pid, and how it ended once it has.
#[derive(Clone)]
struct Process {
    pid: u32,
    exited: watch::Receiver<Option<String>>,
}

struct Vm {
    uuid: Uuid,
    dir: PathBuf,
    record: Mutex<Record>,
    /// One transition at a time.
    busy: tokio::sync::Mutex<()>,
    process: Mutex<Option<Process>>,
    /// Set while the driver itself makes QEMU exit (stop, suspend, remove).
    expect_exit: AtomicBool,
    removed: AtomicBool,
    /// The VM's outgoing migration, from `migrate_out` until it is cancelled.
    migration: Mutex<Option<Arc<migrate::Job>>>,
}

impl Vm {
    fn new(dir: PathBuf, record: Record) -> Vm {
        Vm {
            uuid: record.spec.uuid,
            dir,
            record: Mutex::new(record),
            busy: tokio::sync::Mutex::new(()),
            process: Mutex::new(None),
            expect_exit: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            migration: Mutex::new(None),
        }
    }

    fn status(&self) -> VmStatus {
        let pid = self.process.lock().expect("process").as_ref().map(|p| p.pid);
        let r = self.record.lock().expect("vm record");
        VmStatus {
            uuid: self.uuid,
            name: r.spec.name.clone(),
            state: r.state,
            reason: r.reason.clone(),
            seq: r.seq,
            cpu_seconds: pid
                .filter(|_| r.state == VmState::Running)
                .and_then(process_cpu_seconds),
            disk_bytes: disk::allocated_bytes(&self.dir.join("disk.qcow2")),
        }
    }

    fn state(&self) -> VmState {
        self.record.lock().expect("vm record").state
    }

    fn incoming(&self) -> bool {
        self.record.lock().expect("vm record").incoming
    }

    fn set(&self, state: VmState, reason: Option<String>) {
        let mut r = self.record.lock().expect("vm record");
        if r.state == state && r.reason == reason {
            return;
        }
        r.state = state;
        r.reason = reason;
        r.seq += 1;
        self.persist(&r);
    }

    fn record_timing(&self, what: &str, value: f64) {
        let mut r = self.record.lock().expect("vm record");
        r.timings.insert(what.to_string(), value);
        self.persist(&r);
    }

    fn set_spec(&self, spec: &VmSpec) {
        let mut r = self.record.lock().expect("vm record");
        if &r.spec != spec {
            r.spec = spec.clone();
            self.persist(&r);
        }
    }

    fn persist(&self, r: &Record) {
        if self.removed.load(Ordering::SeqCst) || !self.dir.exists() {
            return;
        }
        let path = self.dir.join("vm.json");
        let tmp = self.dir.join("vm.json.tmp");
        let ok = std::fs::write(&tmp, serde_json::to_vec_pretty(r).expect("JSON"))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = ok {
            tracing::error!("persisting {}: {e}", path.display());
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn process(&self) -> Option<Process> {
        self.process.lock().expect("process").clone()
    }
}

pub struct QemuDriver {
    /// This driver itself, for the background tasks that `&self` methods start.
    me: std::sync::Weak<QemuDriver>,
    cfg: QemuConfig,
    accel: Accel,
    qemu_found: bool,
    source: Arc<dyn TemplateSource>,
    vms: Mutex<HashMap<Uuid, Arc<Vm>>>,
    template_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The host's network driver, if it has one.
    net: std::sync::OnceLock<Arc<dyn VmNet>>,
}

impl QemuDriver {
    /// Opens the driver: chooses the accelerator and re-adopts the VMs found in `cfg.dir`.
    pub async fn open(cfg: QemuConfig, source: Arc<dyn TemplateSource>) -> Result<Arc<QemuDriver>, HvError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| HvError::Io { path, source }
        };
        for d in ["vms", "templates"] {
            let p = cfg.dir.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let qemu_found = process::find_in_path(&cfg.qemu);
        let accel = match cfg.accel {
            Some(a) => a,
            None if !qemu_found => Accel::Tcg,
            None => {
                if accel::kvm_works(&cfg.qemu, &cfg.dir, Duration::from_secs(2)).await {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
        };
        if !qemu_found {
            tracing::warn!(
                "QEMU binary {} not found: VMs will fail until it is installed",
                cfg.qemu.display()
            );
        }
        tracing::info!(accel = accel.as_str(), "QEMU driver ready");
        let driver = Arc::new_cyclic(|me| QemuDriver {
            me: me.clone(),
            cfg,
            accel,
            qemu_found,
            source,
            vms: Mutex::new(HashMap::new()),
            template_locks: Mutex::new(HashMap::new()),
            net: std::sync::OnceLock::new(),
        });
        driver.adopt()?;
        Ok(driver)
    }

    /// Connects VMs to virtual networks through `net` from now on, counting the VMs already
    /// running on theirs.
    pub async fn set_network(&self, net: Arc<dyn VmNet>) {
        let specs: Vec<VmSpec> = self
            .vms
            .lock()
            .expect("vms")
            .values()
            .map(|v| v.record.lock().expect("vm record").spec.clone())
            .collect();
        for s in &specs {
            net.adopt(s).await;
        }
        let _ = self.net.set(net);
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn self_arc(&self) -> Arc<QemuDriver> {
        self.me.upgrade().expect("the driver outlives its calls")
    }

    fn vm(&self, uuid: Uuid) -> Option<Arc<Vm>> {
        self.vms.lock().expect("vms").get(&uuid).cloned()
    }

    /// Timings of the VM's last create, boot, suspend and resume (see `vm.json`).
    pub fn timings(&self, uuid: Uuid) -> Option<std::collections::BTreeMap<String, f64>> {
        self.vm(uuid)
            .map(|v| v.record.lock().expect("vm record").timings.clone())
    }
}

fn ms(since: std::time::Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

async fn console_len(vm: &Vm) -> u64 {
    tokio::fs::metadata(vm.path("console.log"))
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

async fn read_from(path: &Path, offset: u64) -> String {
    match tokio::fs::read(path).await {
        Ok(b) => String::from_utf8_lossy(&b[(offset as usize).min(b.len())..]).into_owned(),
        Err(_) => String::new(),
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let t = tail_lines(&text, 3);
    if t.is_empty() {
        String::new()
    } else {
        format!(": {t}")
    }
}

fn console_tail(text: &str) -> String {
    let t = tail_lines(text, 3);
    if t.is_empty() {
        "; the console stayed empty".into()
    } else {
        format!("; console ends with: {t}")
    }
}

#[async_trait]
impl Hypervisor for QemuDriver {
    fn driver(&self) -> String {
        format!("qemu/{}", self.accel.as_str())
    }

    async fn ensure(&self, spec: &VmSpec) -> Result<VmStatus, HvError> {
        let this = self.self_arc();
        let vm = match self.vm(spec.uuid) {
            Some(vm) => vm,
            None => {
                let dir = self.cfg.dir.join("vms").join(spec.uuid.to_string());
                tokio::fs::create_dir_all(&dir).await.map_err(|source| HvError::Io {
                    path: dir.display().to_string(),
                    source,
                })?;
                let vm = Arc::new(Vm::new(dir, Record::new(spec)));
                {
                    let r = vm.record.lock().expect("vm record");
                    vm.persist(&r);
                }
                self.vms.lock().expect("vms").insert(spec.uuid, vm.clone());
                vm
            }
        };
        vm.set_spec(spec);
        let wanted = spec.power.target();
        if vm.state() != wanted {
            this.transition(vm.clone(), spec.clone());
        }
        Ok(vm.status())
    }

    async fn remove(&self, uuid: Uuid) -> Result<(), HvError> {
        let Some(vm) = self.vm(uuid) else { return Ok(()) };
        vm.removed.store(true, Ordering::SeqCst);
        let job = vm.migration.lock().expect("migration").take();
        if let Some(job) = job {
            job.abort().await;
        }
        vm.expect_exit.store(true, Ordering::SeqCst);
        if let Some(p) = vm.process() {
            if p.exited.borrow().is_none() {
                let _ = self.shut_down(&vm, true).await;
            }
        }
        // A transition under way notices `removed` and stops; wait for it so that it does not
        // write into the directory after it is gone.
        let _g = tokio::time::timeout(Duration::from_secs(30), vm.busy.lock()).await;
        if let Some(n) = self.net.get() {
            n.release(uuid).await;
        }
        tokio::fs::remove_dir_all(&vm.dir)
            .await
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|source| HvError::Io {
                path: vm.dir.display().to_string(),
                source,
            })?;
        self.vms.lock().expect("vms").remove(&uuid);
        Ok(())
    }

    async fn list(&self) -> Vec<VmStatus> {
        let vms: Vec<Arc<Vm>> = self.vms.lock().expect("vms").values().cloned().collect();
        vms.iter().map(|v| v.status()).collect()
    }

    async fn cached_images(&self) -> Vec<String> {
        self.source.cached_images().await
    }

    async fn snapshot(&self, uuid: Uuid) -> Result<DiskSnapshot, HvError> {
        let vm = self.vm(uuid).ok_or(HvError::NotFound(uuid))?;
        self.snapshot_disk(&vm).await
    }

    async fn checkpoint(&self, uuid: Uuid, req: &CheckpointDisk) -> Result<DiskCheckpoint, HvError> {
        let vm = self.vm(uuid).ok_or(HvError::NotFound(uuid))?;
        self.checkpoint_disk(&vm, req).await
    }

    async fn console(&self, uuid: Uuid, offset: u64, max: usize) -> Result<ConsoleChunk, HvError> {
        let vm = self.vm(uuid).ok_or(HvError::NotFound(uuid))?;
        let bytes = tokio::fs::read(vm.path("console.log")).await.unwrap_or_default();
        let start = (offset as usize).min(bytes.len());
        let end = (start + max).min(bytes.len());
        Ok(ConsoleChunk {
            offset: start as u64,
            next: end as u64,
            data: String::from_utf8_lossy(&bytes[start..end]).into_owned(),
        })
    }

    async fn hold_image(&self, manifest: &str) -> Result<(), HvError> {
        self.source.hold_image(manifest).await.map_err(HvError::Store)
    }

    async fn fence(&self) -> usize {
        let vms: Vec<Arc<Vm>> = self.vms.lock().expect("vms").values().cloned().collect();
        let mut stopped = 0;
        for vm in vms {
            let job = vm.migration.lock().expect("migration").take();
            if let Some(job) = job {
                job.abort().await;
            }
            let alive = vm.process().is_some_and(|p| p.exited.borrow().is_none());
            if alive {
                if let Err(e) = self.shut_down(&vm, true).await {
                    tracing::error!(vm = %vm.uuid, "fencing: stopping QEMU: {e}");
                }
                stopped += 1;
            }
        }
        stopped
    }

    async fn prepare_incoming(&self, spec: &VmSpec, listen: std::net::Ipv4Addr) -> Result<IncomingVm, HvError> {
        self.prepare(spec, listen).await
    }

    async fn migrate_out(&self, uuid: Uuid, req: &MigrateOut) -> Result<MigrationProgress, HvError> {
        self.self_arc().send(uuid, req).await
    }

    async fn migration(&self, uuid: Uuid) -> Result<MigrationProgress, HvError> {
        self.migration_progress(uuid)
    }

    async fn cancel_migration(&self, uuid: Uuid) -> Result<VmStatus, HvError> {
        self.cancel_outgoing(uuid).await
    }

    async fn finish_incoming(&self, uuid: Uuid) -> Result<VmStatus, HvError> {
        self.finish(uuid).await
    }
}
