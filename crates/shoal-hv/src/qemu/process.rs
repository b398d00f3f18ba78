//! The QEMU process: its command line and spawn, watching it exit, re-adopting the QEMUs a
//! previous agent left running, and killing it.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shoal_model::agent::VmSpec;
use shoal_model::{Power, VmState};
use tokio::process::Command;
use tokio::sync::watch;
use uuid::Uuid;

use super::template::Base;
use super::{log_tail, Process, QemuDriver, Record, Vm};
use crate::HvError;

impl QemuDriver {
    /// Takes over the VMs a previous agent left: running QEMU processes are watched again,
    /// vanished ones are marked failed.
    pub(super) fn adopt(self: &Arc<Self>) -> Result<(), HvError> {
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
            let vm = Arc::new(Vm::new(dir.clone(), record));
            let alive = alive_pid(&dir, uuid);
            let meant_to_run = vm.record.lock().expect("vm record").spec.power == Power::Running;
            match (vm.state(), alive) {
                // Still arriving: it stays paused until `finish_incoming`.
                (_, Some(pid)) if vm.incoming() => {
                    tracing::info!(vm = %uuid, pid, "re-adopting the QEMU of an incoming migration");
                    self.watch_adopted(&vm, pid);
                }
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

    /// An adopted VM may have been paused by a suspend that never finished: let it run, unless
    /// a migration paused it ([`on_adopt`]).
    fn unpause(self: &Arc<Self>, vm: &Arc<Vm>) {
        let (driver, vm) = (self.clone(), vm.clone());
        tokio::spawn(async move {
            let Ok(mut q) = driver.qmp(&vm).await else { return };
            let Ok(run_state) = q.status().await else { return };
            let migration = match q.execute("query-migrate", None).await {
                Ok(m) => m["status"].as_str().map(str::to_string),
                Err(_) => return,
            };
            match on_adopt(&run_state, migration.as_deref()) {
                Adopt::Leave => {}
                Adopt::Cont => {
                    let _ = q.execute("cont", None).await;
                }
                Adopt::Hold(reason) => {
                    tracing::warn!(vm = %vm.uuid, "{reason}");
                    vm.set(VmState::Running, Some(reason));
                }
            }
        });
    }

    /// The resolvers the seed gives a guest: its network's, else on QEMU's user-mode network
    /// that network's DNS forwarder, else this host's own.
    pub(super) fn resolvers(&self, spec: &VmSpec) -> Vec<std::net::Ipv4Addr> {
        match &spec.network {
            Some(n) if !n.dns.is_empty() => n.dns.clone(),
            Some(_) if self.net.get().is_some() => super::seed::host_resolvers(),
            _ => super::seed::user_mode_resolver(spec).into_iter().collect(),
        }
    }

    /// Starts QEMU for `vm`, the same machine whatever `how`: a migration stream must find the
    /// devices it was saved from.
    pub(super) async fn launch(&self, vm: &Arc<Vm>, spec: &VmSpec, base: &Base, how: Launch) -> Result<(), HvError> {
        let sock = vm.path("qmp.sock");
        if sock.as_os_str().len() > 100 {
            return Err(HvError::SocketPathTooLong(sock));
        }
        for p in [vm.path("console.log"), vm.path("disk.qcow2")] {
            if p.to_string_lossy().contains(',') {
                return Err(HvError::CommaInPath(p));
            }
        }
        let _ = tokio::fs::remove_file(&sock).await;
        let _ = tokio::fs::remove_file(vm.path("qemu.pid")).await;
        let log_path = vm.path("qemu.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(HvError::file("opening", &log_path))?;
        let log_err = log.try_clone().map_err(HvError::file("opening", &log_path))?;
        let netdev = match self.net.get() {
            Some(n) => n.netdev(spec).await.map_err(HvError::Network)?,
            None => None,
        };
        let on_network = netdev.is_some();
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
            .arg(netdev.unwrap_or_else(|| super::seed::user_mode_netdev(spec)))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=net0,mac={}", spec.mac));
        if let (Some(k), Some(kb)) = (&base.kernel, &spec.kernel_boot) {
            cmd.arg("-kernel").arg(k).arg("-append").arg(&kb.cmdline);
            if let Some(i) = &base.initrd {
                cmd.arg("-initrd").arg(i);
            }
        }
        match how {
            Launch::Boot => {}
            Launch::Resume => {
                cmd.arg("-incoming")
                    .arg(format!("exec:cat {}", vm.path("memory.state").display()));
            }
            // `defer`: the listening address is chosen over QMP, where a port in use can be
            // retried. `-S` keeps the guest paused after the memory arrived.
            Launch::Incoming => {
                cmd.args(["-S", "-incoming", "defer"]);
            }
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: QEMU must outlive the agent and not get its Ctrl-C.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| HvError::Spawn {
            what: self.cfg.qemu.display().to_string(),
            source,
        })?;
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
        if let (Some(n), true) = (self.net.get(), on_network) {
            if let Err(e) = n.connect(spec).await {
                vm.expect_exit.store(true, Ordering::SeqCst);
                kill9(pid);
                return Err(HvError::Network(e));
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
}

/// How QEMU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Launch {
    /// Boots the guest.
    Boot,
    /// Loads the guest's memory from `memory.state` (a suspended VM).
    Resume,
    /// Waits, paused, for a migration stream (`migrate-incoming` over QMP).
    Incoming,
}

/// What the agent does with an adopted QEMU that is alive, from its run state and its
/// migration's status (`query-migrate`, `None` when it never migrated).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Adopt {
    Leave,
    /// Paused by a suspend the previous agent did not finish: run it again.
    Cont,
    /// Paused by a migration: running it could make a second copy of a guest that runs
    /// elsewhere, so it waits for the migration to be cancelled or the VM removed (the reason).
    Hold(String),
}

pub(super) fn on_adopt(run_state: &str, migration: Option<&str>) -> Adopt {
    // `completed` counts: the guest may run on the destination already.
    let migrated = matches!(migration, Some(s) if !matches!(s, "none" | "failed" | "cancelled"));
    let migration_state = matches!(run_state, "inmigrate" | "postmigrate" | "finish-migrate");
    match run_state {
        "running" => Adopt::Leave,
        _ if migrated || migration_state => Adopt::Hold(format!(
            "QEMU is {run_state} (migration {}): held paused until the migration is cancelled or the VM removed",
            migration.unwrap_or("none")
        )),
        "paused" => Adopt::Cont,
        _ => Adopt::Leave,
    }
}

/// Records how QEMU ended; an exit nobody asked for fails the VM with the reason from its log.
fn exited(vm: &Vm, how: String, tx: watch::Sender<Option<String>>) {
    let expected = vm.expect_exit.load(Ordering::SeqCst) || vm.removed.load(Ordering::SeqCst);
    // An incoming VM's QEMU exits by itself when the migration stream breaks.
    if !expected && (vm.state() == VmState::Running || vm.incoming()) {
        let reason = format!("{how} unexpectedly{}", log_tail(&vm.path("qemu.log")));
        tracing::warn!(vm = %vm.uuid, "{reason}");
        vm.set(VmState::Failed, Some(reason));
    }
    let _ = tx.send(Some(how));
}

pub(super) fn kill9(pid: u32) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills (`SIGKILL`) every live QEMU of the VMs under the driver directory `dir`, without an
/// agent: what a host's fence guard does when the agent's lease ran out. Returns how many.
pub fn kill_all(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir.join("vms")) else {
        return 0;
    };
    let mut killed = 0;
    for e in entries.flatten() {
        let vm = e.path();
        let Ok(bytes) = std::fs::read(vm.join("vm.json")) else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
            continue;
        };
        if let Some(pid) = alive_pid(&vm, record.spec.uuid) {
            kill9(pid);
            killed += 1;
        }
    }
    killed
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

pub(super) fn find_in_path(bin: &Path) -> bool {
    if bin.components().count() > 1 {
        return bin.exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
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

#[cfg(test)]
mod tests {
    use super::{on_adopt, Adopt};

    #[test]
    fn an_adopted_vm_is_run_again_only_when_no_migration_paused_it() {
        assert_eq!(on_adopt("running", None), Adopt::Leave);
        assert_eq!(on_adopt("running", Some("active")), Adopt::Leave);
        assert_eq!(on_adopt("paused", None), Adopt::Cont, "an unfinished suspend");
        assert_eq!(on_adopt("paused", Some("failed")), Adopt::Cont);
        assert_eq!(on_adopt("paused", Some("cancelled")), Adopt::Cont);
        for (run, migration) in [
            ("postmigrate", Some("completed")),
            ("paused", Some("active")),
            ("paused", Some("completed")),
            ("finish-migrate", Some("device")),
            ("inmigrate", None),
            ("postmigrate", None),
        ] {
            match on_adopt(run, migration) {
                Adopt::Hold(reason) => assert!(reason.contains(run), "{reason}"),
                other => panic!("{run} {migration:?}: {other:?}"),
            }
        }
        assert_eq!(on_adopt("shutdown", None), Adopt::Leave);
    }

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
