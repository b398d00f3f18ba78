//! The QEMU driver: each VM is a `qemu-system-x86_64` process of its own, driven over QMP.
//!
//! Per VM, a directory `vms/<uuid>/` holds `vm.json` (spec, state, sequence number),
//! `disk.qcow2` (a copy-on-write overlay on the host's base image of the template), `seed.img`
//! (the NoCloud seed), `console.log` (the serial console, appended across restarts),
//! `qemu.log` (QEMU's own messages), `qmp.sock`, `qemu.pid` and, while suspended,
//! `memory.state`. Templates are materialised once per host under `templates/<hash>/`.
//!
//! QEMU runs in its own process group, so it outlives the agent; a restarted agent re-adopts
//! running VMs from their pid files. Transitions (boot, shutdown, suspend, resume) run one at a
//! time per VM in the background; `ensure` only starts them and reports the state.

pub mod accel;
pub mod qmp;
pub mod seed;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use shoal_model::agent::{ConsoleChunk, DiskSnapshot, VmSpec, VmStatus};
use shoal_model::{Power, VmState};
use tokio::process::Command;
use tokio::sync::watch;
use uuid::Uuid;

pub use accel::Accel;
use qmp::Qmp;

use crate::{HvError, Hypervisor, TemplateFile, TemplateSource, VmNet};

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
    /// `ready`, `suspend`, `resume`), and the size of the last saved memory (`state_bytes`).
    #[serde(default)]
    timings: std::collections::BTreeMap<String, f64>,
}

/// User and system CPU time of a process, s, from `/proc/PID/stat` (fields 14 and 15, in the
/// kernel's fixed 100 Hz user ticks).
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
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
}

impl Vm {
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
        }
    }

    fn state(&self) -> VmState {
        self.record.lock().expect("vm record").state
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

fn find_in_path(bin: &Path) -> bool {
    if bin.components().count() > 1 {
        return bin.exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
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
        let qemu_found = find_in_path(&cfg.qemu);
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

    /// Takes over the VMs a previous agent left: running QEMU processes are watched again,
    /// vanished ones are marked failed.
    fn adopt(self: &Arc<Self>) -> Result<(), HvError> {
        let vms_dir = self.cfg.dir.join("vms");
        let entries = std::fs::read_dir(&vms_dir).map_err(|source| HvError::Io {
            path: vms_dir.display().to_string(),
            source,
        })?;
        for e in entries.flatten() {
            let dir = e.path();
            let Ok(bytes) = std::fs::read(dir.join("vm.json")) else {
                tracing::warn!("{}: no vm.json, leaving it alone", dir.display());
                continue;
            };
            let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
                tracing::warn!("{}: unreadable vm.json, leaving it alone", dir.display());
                continue;
            };
            let uuid = record.spec.uuid;
            let vm = Arc::new(Vm {
                uuid,
                dir: dir.clone(),
                record: Mutex::new(record),
                busy: tokio::sync::Mutex::new(()),
                process: Mutex::new(None),
                expect_exit: AtomicBool::new(false),
                removed: AtomicBool::new(false),
            });
            let alive = alive_pid(&dir, uuid);
            let meant_to_run = vm.record.lock().expect("vm record").spec.power == Power::Running;
            match (vm.state(), alive) {
                (VmState::Running | VmState::Creating, Some(pid)) => {
                    tracing::info!(vm = %uuid, pid, "re-adopting running QEMU");
                    self.watch_adopted(&vm, pid);
                    vm.set(VmState::Running, None);
                    self.unpause(&vm);
                }
                (VmState::Running | VmState::Creating, None) => vm.set(
                    VmState::Failed,
                    Some(format!(
                        "QEMU exited while the agent was down{}",
                        log_tail(&dir.join("qemu.log"))
                    )),
                ),
                // A start or resume the previous agent did not see through: the VM runs.
                (_, Some(pid)) if meant_to_run => {
                    tracing::info!(vm = %uuid, pid, "re-adopting QEMU started by the previous agent");
                    self.watch_adopted(&vm, pid);
                    vm.set(VmState::Running, None);
                    self.unpause(&vm);
                }
                // A stop or suspend the previous agent did not finish: end it.
                (_, Some(pid)) => {
                    tracing::warn!(vm = %uuid, pid, "killing QEMU left over from an unfinished stop or suspend");
                    kill9(pid);
                }
                _ => {}
            }
            self.vms.lock().expect("vms").insert(uuid, vm);
        }
        Ok(())
    }

    /// An adopted VM may have been paused by a suspend that never finished: let it run.
    fn unpause(self: &Arc<Self>, vm: &Arc<Vm>) {
        let (driver, vm) = (self.clone(), vm.clone());
        tokio::spawn(async move {
            if let Ok(mut q) = driver.qmp(&vm).await {
                if q.status().await.ok().as_deref() == Some("paused") {
                    let _ = q.execute("cont", None).await;
                }
            }
        });
    }

    fn vm(&self, uuid: Uuid) -> Option<Arc<Vm>> {
        self.vms.lock().expect("vms").get(&uuid).cloned()
    }

    /// Files of the template on this host, fetched and verified once.
    async fn template(&self, spec: &VmSpec) -> Result<Base, String> {
        let hex = spec
            .template_hash
            .trim_start_matches("blake3:")
            .trim_start_matches("manifest:")
            .to_string();
        let lock = self
            .template_locks
            .lock()
            .expect("template locks")
            .entry(hex.clone())
            .or_default()
            .clone();
        let _g = lock.lock().await;
        let dir = self.cfg.dir.join("templates").join(&hex);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let disk = dir.join(format!("disk.{}", spec.template_format));
        self.materialise(spec, TemplateFile::Disk, &disk, &spec.template_hash)
            .await?;
        let (mut kernel, mut initrd) = (None, None);
        if let Some(kb) = &spec.kernel_boot {
            let k = dir.join("kernel");
            self.materialise(spec, TemplateFile::Kernel, &k, &kb.kernel_hash)
                .await?;
            kernel = Some(k);
            if let Some(h) = &kb.initrd_hash {
                let i = dir.join("initrd");
                self.materialise(spec, TemplateFile::Initrd, &i, h).await?;
                initrd = Some(i);
            }
        }
        Ok(Base { disk, kernel, initrd })
    }

    async fn materialise(&self, spec: &VmSpec, file: TemplateFile, dest: &Path, hash: &str) -> Result<(), String> {
        if dest.exists() {
            return Ok(());
        }
        let tmp = dest.with_extension("partial");
        if let (TemplateFile::Disk, Some(manifest)) = (file, hash.strip_prefix("manifest:")) {
            // From the image store: each chunk was verified against its id on arrival.
            self.source
                .fetch_image(&spec.template, manifest, &tmp)
                .await
                .map_err(|e| format!("fetching the disk of template {}: {e}", spec.template))?;
            return tokio::fs::rename(&tmp, dest)
                .await
                .map_err(|e| format!("storing {}: {e}", dest.display()));
        }
        self.source
            .fetch(&spec.template, file, &tmp)
            .await
            .map_err(|e| format!("fetching the {} of template {}: {e}", file.as_str(), spec.template))?;
        let got = hash_file(&tmp)
            .await
            .map_err(|e| format!("hashing {}: {e}", tmp.display()))?;
        if got != hash {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(format!(
                "the {} of template {} is corrupt or truncated: its hash is {got}, expected {hash}",
                file.as_str(),
                spec.template
            ));
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| format!("storing {}: {e}", dest.display()))
    }

    /// Creates the disk and seed, boots the VM and waits until it is ready.
    async fn create(self: &Arc<Self>, vm: &Arc<Vm>, spec: &VmSpec) -> Result<(), String> {
        if !self.qemu_found {
            return Err(format!(
                "QEMU binary {} not found (install qemu-system-x86)",
                self.cfg.qemu.display()
            ));
        }
        let base = self.template(spec).await?;
        let mut img = Command::new(&self.cfg.qemu_img);
        img.args(["create", "-q", "-f", "qcow2", "-F", &spec.template_format, "-b"])
            .arg(&base.disk)
            .arg(vm.path("disk.qcow2"));
        if let Some(mib) = spec.disk_mib {
            let base_mib = tokio::fs::metadata(&base.disk)
                .await
                .map(|m| m.len() / (1 << 20))
                .unwrap_or(0);
            if spec.template_format == "raw" && mib < base_mib {
                return Err(format!(
                    "disk of {mib} MiB is smaller than template {}'s {base_mib} MiB",
                    spec.template
                ));
            }
            img.arg(format!("{mib}M"));
        }
        let t = std::time::Instant::now();
        run(&mut img, "qemu-img create (copy-on-write overlay)").await?;
        vm.record_timing("clone_ms", ms(t));
        let t = std::time::Instant::now();
        seed::write_seed(spec, &vm.path("seed.img")).await?;
        vm.record_timing("seed_ms", ms(t));
        self.boot(vm, spec, &base).await
    }

    /// Launches QEMU and waits until it runs and, when the template says how, until the guest
    /// is ready.
    async fn boot(self: &Arc<Self>, vm: &Arc<Vm>, spec: &VmSpec, base: &Base) -> Result<(), String> {
        let offset = console_len(vm).await;
        let t = std::time::Instant::now();
        self.launch(vm, spec, base, false).await?;
        self.wait_status(vm, &["running"]).await?;
        vm.record_timing("qemu_start_ms", ms(t));
        if let Some(pattern) = &spec.ready_pattern {
            self.wait_ready(vm, pattern, offset).await?;
            vm.record_timing("ready_ms", ms(t));
        }
        Ok(())
    }

    /// Timings of the VM's last create, boot, suspend and resume (see `vm.json`).
    pub fn timings(&self, uuid: Uuid) -> Option<std::collections::BTreeMap<String, f64>> {
        self.vm(uuid)
            .map(|v| v.record.lock().expect("vm record").timings.clone())
    }

    /// Starts QEMU for `vm`; `incoming` resumes from `memory.state`.
    async fn launch(self: &Arc<Self>, vm: &Arc<Vm>, spec: &VmSpec, base: &Base, incoming: bool) -> Result<(), String> {
        let sock = vm.path("qmp.sock");
        if sock.as_os_str().len() > 100 {
            return Err(format!(
                "QMP socket path {} is too long for a unix socket; use a shorter data dir",
                sock.display()
            ));
        }
        for p in [vm.path("console.log"), vm.path("disk.qcow2")] {
            if p.to_string_lossy().contains(',') {
                return Err(format!(
                    "path {} contains a comma, which QEMU options cannot carry",
                    p.display()
                ));
            }
        }
        let _ = tokio::fs::remove_file(&sock).await;
        let _ = tokio::fs::remove_file(vm.path("qemu.pid")).await;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(vm.path("qemu.log"))
            .map_err(|e| format!("opening qemu.log: {e}"))?;
        let netdev = match self.net.get() {
            Some(n) => n.netdev(spec).await.map_err(|e| format!("virtual network: {e}"))?,
            None => None,
        };
        let mut cmd = Command::new(&self.cfg.qemu);
        cmd.arg("-name")
            .arg(&spec.name)
            .arg("-uuid")
            .arg(spec.uuid.to_string())
            .arg("-machine")
            .arg(format!("pc,accel={}", self.accel.as_str()))
            .arg("-m")
            .arg(spec.memory_mib.to_string())
            .arg("-smp")
            .arg(spec.cpus.to_string())
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-chardev")
            .arg(format!(
                "file,id=con0,path={},append=on",
                vm.path("console.log").display()
            ))
            .args(["-serial", "chardev:con0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .arg("-pidfile")
            .arg(vm.path("qemu.pid"))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2",
                vm.path("disk.qcow2").display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                vm.path("seed.img").display()
            ))
            .arg("-netdev")
            .arg(netdev.as_deref().unwrap_or("user,id=net0"))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=net0,mac={}", spec.mac));
        if let (Some(k), Some(kb)) = (&base.kernel, &spec.kernel_boot) {
            cmd.arg("-kernel").arg(k).arg("-append").arg(&kb.cmdline);
            if let Some(i) = &base.initrd {
                cmd.arg("-initrd").arg(i);
            }
        }
        if incoming {
            cmd.arg("-incoming")
                .arg(format!("exec:cat {}", vm.path("memory.state").display()));
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // Its own process group: QEMU must outlive the agent and not get its Ctrl-C.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.cfg.qemu.display()))?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = watch::channel(None);
        *vm.process.lock().expect("process") = Some(Process { pid, exited: rx });
        vm.expect_exit.store(false, Ordering::SeqCst);
        let vm2 = vm.clone();
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(st) => match (st.code(), st.signal()) {
                    (Some(0), _) => "QEMU exited".to_string(),
                    (Some(c), _) => format!("QEMU exited with status {c}"),
                    (None, Some(s)) => format!("QEMU was killed by signal {s}"),
                    _ => "QEMU ended".to_string(),
                },
                Err(e) => format!("waiting for QEMU: {e}"),
            };
            exited(&vm2, how, tx);
        });
        if let (Some(n), Some(_)) = (self.net.get(), &netdev) {
            if let Err(e) = n.connect(spec).await {
                vm.expect_exit.store(true, Ordering::SeqCst);
                kill9(pid);
                return Err(format!("virtual network: {e}"));
            }
        }
        Ok(())
    }

    /// Watches a QEMU this agent did not start, by polling its pid.
    fn watch_adopted(self: &Arc<Self>, vm: &Arc<Vm>, pid: u32) {
        let (tx, rx) = watch::channel(None);
        *vm.process.lock().expect("process") = Some(Process { pid, exited: rx });
        let vm2 = vm.clone();
        tokio::spawn(async move {
            while alive_pid(&vm2.dir, vm2.uuid) == Some(pid) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            exited(&vm2, "QEMU exited".into(), tx);
        });
    }

    async fn qmp(&self, vm: &Vm) -> Result<Qmp, String> {
        let sock = vm.path("qmp.sock");
        let deadline = tokio::time::Instant::now() + self.cfg.qmp_timeout;
        loop {
            if let Some(p) = vm.process() {
                if let Some(how) = p.exited.borrow().clone() {
                    return Err(format!("{how}{}", log_tail(&vm.path("qemu.log"))));
                }
            }
            if sock.exists() {
                match Qmp::connect(&sock, self.cfg.qmp_timeout).await {
                    // QEMU binds the socket a moment before it listens on it: under load a
                    // connect can fall in between. Try again until the deadline.
                    Err(qmp::QmpError::Connect { source, .. })
                        if source.kind() == std::io::ErrorKind::ConnectionRefused
                            && tokio::time::Instant::now() < deadline => {}
                    r => return r.map_err(qmp_err),
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "QMP socket {} did not appear within {:?}",
                    sock.display(),
                    self.cfg.qmp_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until QEMU reports one of `states`.
    async fn wait_status(&self, vm: &Vm, states: &[&str]) -> Result<String, String> {
        let mut q = self.qmp(vm).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let s = q.status().await.map_err(qmp_err)?;
            if states.contains(&s.as_str()) {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("QEMU stayed {s:?}, expected one of {states:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the guest to print `pattern` on its console after `offset`.
    async fn wait_ready(&self, vm: &Vm, pattern: &str, offset: u64) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.cfg.ready_timeout;
        let exited = vm.process().map(|p| p.exited);
        loop {
            let text = read_from(&vm.path("console.log"), offset).await;
            // The serial port writes byte by byte: only a whole line counts.
            if text
                .split_inclusive('\n')
                .any(|l| l.ends_with('\n') && l.contains(pattern))
            {
                return Ok(());
            }
            if let Some(how) = exited.as_ref().and_then(|e| e.borrow().clone()) {
                return Err(format!(
                    "{how} before the guest was ready{}{}",
                    log_tail(&vm.path("qemu.log")),
                    console_tail(&text)
                ));
            }
            if vm.removed.load(Ordering::SeqCst) {
                return Err("removed while booting".into());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "the guest did not print {pattern:?} on its console within {:?}{}",
                    self.cfg.ready_timeout,
                    console_tail(&text)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes QEMU exit: ACPI power button first unless `hard`, then `quit`, then SIGKILL.
    async fn shut_down(&self, vm: &Vm, hard: bool) -> Result<(), String> {
        let Some(p) = vm.process() else { return Ok(()) };
        vm.expect_exit.store(true, Ordering::SeqCst);
        let mut exited = p.exited.clone();
        let gone = |timeout: Duration| {
            let mut e = exited.clone();
            async move { tokio::time::timeout(timeout, e.wait_for(|x| x.is_some())).await.is_ok() }
        };
        if !hard {
            match self.qmp(vm).await {
                Ok(mut q) => {
                    if let Err(e) = q.execute("system_powerdown", None).await {
                        if matches!(e, qmp::QmpError::Timeout { .. }) {
                            return Err(qmp_err(e));
                        }
                    }
                }
                Err(e) if e.starts_with(QMP_DEAD) => return Err(e),
                Err(_) => {}
            }
            if gone(self.cfg.stop_timeout).await {
                return Ok(());
            }
            tracing::warn!(vm = %vm.uuid, "guest ignored the power button for {:?}; stopping QEMU", self.cfg.stop_timeout);
        }
        if let Ok(mut q) = self.qmp(vm).await {
            let _ = q.execute("quit", None).await;
        }
        if gone(Duration::from_secs(5)).await {
            return Ok(());
        }
        kill9(p.pid);
        let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|x| x.is_some())).await;
        Ok(())
    }

    /// Saves the VM's memory to `memory.state` and ends QEMU. The VM is paused first: under TCG,
    /// dirty-page tracking is unreliable, so only a still guest saves consistently.
    async fn suspend(&self, vm: &Vm) -> Result<(), String> {
        let mut q = self.qmp(vm).await?;
        let tmp = vm.path("memory.state.partial");
        q.execute("stop", None).await.map_err(qmp_err)?;
        let saved = async {
            q.execute(
                "migrate",
                Some(json!({ "uri": format!("exec:cat > {}", tmp.display()) })),
            )
            .await
            .map_err(qmp_err)?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            loop {
                let m = q.execute("query-migrate", None).await.map_err(qmp_err)?;
                match m["status"].as_str() {
                    Some("completed") => break,
                    Some("failed") | Some("cancelled") => {
                        return Err(format!(
                            "saving memory failed: {}",
                            m["error-desc"].as_str().unwrap_or("?")
                        ))
                    }
                    _ if tokio::time::Instant::now() > deadline => return Err("saving memory took over 300 s".into()),
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            tokio::fs::rename(&tmp, vm.path("memory.state"))
                .await
                .map_err(|e| format!("storing memory.state: {e}"))
        }
        .await;
        if let Err(e) = saved {
            let _ = tokio::fs::remove_file(&tmp).await;
            let _ = q.execute("cont", None).await;
            return Err(e);
        }
        // QMP serves one client at a time: let go before shutting down.
        drop(q);
        self.shut_down(vm, true).await
    }

    async fn resume(self: &Arc<Self>, vm: &Arc<Vm>, spec: &VmSpec) -> Result<(), String> {
        let base = self.template(spec).await?;
        self.launch(vm, spec, &base, true).await?;
        self.wait_status(vm, &["paused", "running"]).await?;
        let mut q = self.qmp(vm).await?;
        if q.status().await.map_err(qmp_err)? == "paused" {
            q.execute("cont", None).await.map_err(qmp_err)?;
        }
        let _ = tokio::fs::remove_file(vm.path("memory.state")).await;
        Ok(())
    }

    /// Starts the transition `spec.power` asks for, unless one is under way or none is needed.
    /// While a VM boots (created, started, resumed) it reports `creating`; while it stops or
    /// suspends, `running`. Either way the reason of an earlier failure is cleared, so that it is
    /// not taken for this attempt's.
    fn transition(self: &Arc<Self>, vm: Arc<Vm>, spec: VmSpec) {
        let driver = self.clone();
        tokio::spawn(async move {
            let Ok(_g) = vm.busy.try_lock() else { return };
            if vm.removed.load(Ordering::SeqCst) {
                return;
            }
            let has_disk = vm.path("disk.qcow2").exists();
            let step = match (vm.state(), spec.power) {
                (VmState::Creating, _) => Step::Create,
                (VmState::Failed, Power::Running) if !has_disk => Step::Create,
                (VmState::Running, Power::Stopped) => Step::Stop,
                (VmState::Running, Power::Suspended) => Step::Suspend,
                (VmState::Stopped | VmState::Failed, Power::Running) => Step::Start,
                (VmState::Suspended, Power::Running) => Step::Resume,
                _ => return,
            };
            match step {
                Step::Create | Step::Start | Step::Resume => vm.set(VmState::Creating, None),
                Step::Stop | Step::Suspend => vm.set(VmState::Running, None),
            }
            let result = match step {
                Step::Create => driver.create(&vm, &spec).await.map(|_| VmState::Running),
                Step::Start => driver.start(&vm, &spec).await.map(|_| VmState::Running),
                Step::Stop => driver.shut_down(&vm, spec.force_stop).await.map(|_| VmState::Stopped),
                Step::Suspend => {
                    let t = std::time::Instant::now();
                    let r = driver.suspend(&vm).await;
                    if r.is_ok() {
                        vm.record_timing("suspend_ms", ms(t));
                        let size = std::fs::metadata(vm.path("memory.state")).map(|m| m.len()).unwrap_or(0);
                        vm.record_timing("state_bytes", size as f64);
                    }
                    r.map(|_| VmState::Suspended)
                }
                Step::Resume => {
                    let t = std::time::Instant::now();
                    let r = driver.resume(&vm, &spec).await;
                    if r.is_ok() {
                        vm.record_timing("resume_ms", ms(t));
                    }
                    r.map(|_| VmState::Running)
                }
            };
            let e = match result {
                Ok(state) => return vm.set(state, None),
                Err(e) => e,
            };
            tracing::warn!(vm = %spec.name, "{step:?} failed: {e}");
            let alive = vm.process().map(|p| p.exited.borrow().is_none()).unwrap_or(false);
            let fence = e.starts_with(QMP_DEAD);
            if alive && (fence || matches!(step, Step::Create | Step::Start | Step::Resume)) {
                // A VM that did not come up, or a QEMU that no longer answers, does not stay.
                vm.expect_exit.store(true, Ordering::SeqCst);
                if let Some(p) = vm.process() {
                    kill9(p.pid);
                }
            }
            match step {
                Step::Create => {
                    // A VM that never came up leaves nothing behind.
                    cleanup_dir(&vm.dir).await;
                    vm.set(VmState::Failed, Some(e));
                }
                _ if fence => vm.set(VmState::Failed, Some(format!("{e}; QEMU was killed"))),
                // The saved memory is still there: the VM stays suspended, to be resumed again.
                Step::Resume => vm.set(VmState::Suspended, Some(format!("resume failed: {e}"))),
                Step::Stop | Step::Suspend if alive => vm.set(VmState::Running, Some(e)),
                _ => vm.set(VmState::Failed, Some(e)),
            }
        });
    }

    /// Boots an existing VM again from its disk.
    async fn start(self: &Arc<Self>, vm: &Arc<Vm>, spec: &VmSpec) -> Result<(), String> {
        let base = self.template(spec).await?;
        self.boot(vm, spec, &base).await
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Create,
    Start,
    Stop,
    Suspend,
    Resume,
}

/// A template's files on this host.
struct Base {
    disk: PathBuf,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
}

/// Records how QEMU ended; an exit nobody asked for fails the VM with the reason from its log.
fn exited(vm: &Vm, how: String, tx: watch::Sender<Option<String>>) {
    let expected = vm.expect_exit.load(Ordering::SeqCst) || vm.removed.load(Ordering::SeqCst);
    if !expected && vm.state() == VmState::Running {
        let reason = format!("{how} unexpectedly{}", log_tail(&vm.path("qemu.log")));
        tracing::warn!(vm = %vm.uuid, "{reason}");
        vm.set(VmState::Failed, Some(reason));
    }
    let _ = tx.send(Some(how));
}

/// How errors of a QEMU that stopped answering QMP begin; such a QEMU is fenced.
const QMP_DEAD: &str = "QMP stopped answering";

fn qmp_err(e: qmp::QmpError) -> String {
    match e {
        qmp::QmpError::Timeout { .. } => format!("{QMP_DEAD}: {e}"),
        e => e.to_string(),
    }
}

fn kill9(pid: u32) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The pid in `qemu.pid` if that process is alive and is this VM's QEMU (not a reused pid).
fn alive_pid(dir: &Path, uuid: Uuid) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie is dead for our purposes.
    let zombie = stat
        .rsplit(')')
        .next()
        .map(|s| s.trim_start().starts_with('Z'))
        .unwrap_or(false);
    (!zombie && String::from_utf8_lossy(&cmdline).contains(&uuid.to_string())).then_some(pid)
}

/// Removes what a VM had on the host, but for its console and QEMU logs.
async fn cleanup_dir(dir: &Path) {
    for f in [
        "disk.qcow2",
        "seed.img",
        "qmp.sock",
        "qemu.pid",
        "memory.state",
        "memory.state.partial",
    ] {
        let _ = tokio::fs::remove_file(dir.join(f)).await;
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

async fn hash_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(path)?)?;
        Ok(format!("blake3:{}", h.finalize().to_hex()))
    })
    .await
    .expect("hashing task")
}

async fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().await.map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
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
                let vm = Arc::new(Vm {
                    uuid: spec.uuid,
                    dir,
                    record: Mutex::new(Record {
                        spec: spec.clone(),
                        state: VmState::Creating,
                        reason: None,
                        seq: 1,
                        timings: Default::default(),
                    }),
                    busy: tokio::sync::Mutex::new(()),
                    process: Mutex::new(None),
                    expect_exit: AtomicBool::new(false),
                    removed: AtomicBool::new(false),
                });
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
        let name = vm.status().name;
        let err = |reason: String| HvError::Vm {
            name: name.clone(),
            reason,
        };
        let _busy = vm.busy.lock().await;
        let raw = vm.path("snapshot.raw.partial");
        // Pause a running guest so the disk does not change while it is read.
        let running = vm.state() == VmState::Running;
        let mut paused = false;
        if running {
            let mut q = self
                .qmp(&vm)
                .await
                .map_err(|e| err(format!("pausing for the snapshot: {e}")))?;
            q.execute("stop", None)
                .await
                .map_err(|e| err(format!("pausing for the snapshot: {}", qmp_err(e))))?;
            paused = true;
        }
        let out = Command::new(&self.cfg.qemu_img)
            // -U: QEMU holds the image's write lock; reading a paused guest's disk is safe.
            .args(["convert", "-U", "-O", "raw", "-S", "4k"])
            .arg(vm.path("disk.qcow2"))
            .arg(&raw)
            .output()
            .await;
        if paused {
            match self.qmp(&vm).await {
                Ok(mut q) => {
                    if let Err(e) = q.execute("cont", None).await {
                        tracing::error!(vm = %name, "resuming after the snapshot: {}", qmp_err(e));
                    }
                }
                Err(e) => tracing::error!(vm = %name, "resuming after the snapshot: {e}"),
            }
        }
        let result = match out {
            Ok(o) if o.status.success() => self.source.store_image(&raw).await.map_err(err),
            Ok(o) => Err(err(format!(
                "reading the disk: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))),
            Err(e) => Err(err(format!("cannot run {}: {e}", self.cfg.qemu_img.display()))),
        };
        let _ = tokio::fs::remove_file(&raw).await;
        result
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
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_cpu_time_is_read_and_grows() {
        let me = std::process::id();
        let before = super::process_cpu_seconds(me).expect("own /proc/PID/stat");
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = super::process_cpu_seconds(me).unwrap();
        assert!(after - before >= 0.1, "{before} -> {after}");
        assert_eq!(super::process_cpu_seconds(u32::MAX), None);
    }
}
