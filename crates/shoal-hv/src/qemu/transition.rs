//! Power transitions over QMP: create, start, stop, suspend and resume, one at a time per VM
//! in the background, and what a failed one leaves the VM in ([`after_failure`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shoal_model::agent::{MigrationPhase, VmSpec};
use shoal_model::guest::{GUEST_FAILED, GUEST_READY};
use shoal_model::{Power, Readiness, VmState};

use super::disk::cleanup_dir;
use super::process::{kill9, Launch};
use super::qmp::{Qmp, QmpError};
use super::template::Base;
use super::{console_len, console_tail, log_tail, ms, read_from, seed, QemuDriver, Vm};
use crate::{ErrorKind, HvError};

/// How long a guest's memory may take to save.
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long QEMU may take to reach a run state after it started.
const STATUS_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Create,
    Start,
    Stop,
    Suspend,
    Resume,
}

impl Step {
    /// The step that takes a VM in `state` toward `power`, if any is needed.
    fn toward(state: VmState, power: Power, has_disk: bool) -> Option<Step> {
        Some(match (state, power) {
            (VmState::Creating, _) => Step::Create,
            (VmState::Failed, Power::Running) if !has_disk => Step::Create,
            (VmState::Running, Power::Stopped) => Step::Stop,
            (VmState::Running, Power::Suspended) => Step::Suspend,
            (VmState::Stopped | VmState::Failed, Power::Running) => Step::Start,
            (VmState::Suspended, Power::Running) => Step::Resume,
            _ => return None,
        })
    }

    fn boots(self) -> bool {
        matches!(self, Step::Create | Step::Start | Step::Resume)
    }
}

/// Whether a VM's power must not change: while it arrives by migration (only
/// `finish_incoming` runs it), and while it is being sent away or has been (its guest is paused
/// or copied: stopping or starting it now would lose or duplicate it). A migration that failed
/// or was cancelled holds nothing.
pub(super) fn power_held(incoming: bool, migration: Option<MigrationPhase>) -> bool {
    incoming || matches!(migration, Some(p) if !matches!(p, MigrationPhase::Failed | MigrationPhase::Cancelled))
}

/// What a failed step leaves behind.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct AfterFailure {
    /// Kill the VM's QEMU.
    kill: bool,
    /// Remove the overlay and seed (a VM that never came up leaves nothing).
    cleanup: bool,
    state: VmState,
    reason: String,
}

/// Decides what a step that failed with `e` leaves: `before` is the VM's state before the step,
/// `alive` whether its QEMU still runs. A QEMU that no longer answers is fenced and a VM that
/// did not come up does not stay; a retryable failure leaves the VM as it was, for the next
/// `ensure` to try again; other failures fail the VM, except that a VM whose resume failed
/// keeps its saved memory and stays suspended, and one that failed to stop or suspend runs on.
pub(super) fn after_failure(step: Step, before: VmState, alive: bool, e: &HvError) -> AfterFailure {
    let kind = e.kind();
    let fence = alive && kind == ErrorKind::Dead;
    let retry = kind == ErrorKind::Retryable;
    let (state, reason) = match step {
        Step::Create if retry => (VmState::Creating, e.reason()),
        Step::Create => (VmState::Failed, e.reason()),
        _ if fence => (VmState::Failed, format!("{e}; QEMU was killed")),
        Step::Resume => (VmState::Suspended, format!("resume failed: {}", e.reason())),
        Step::Stop | Step::Suspend if alive => (VmState::Running, e.reason()),
        _ if retry => (before, e.reason()),
        _ => (VmState::Failed, e.reason()),
    };
    AfterFailure {
        kill: alive && (fence || step.boots()),
        cleanup: step == Step::Create,
        state,
        reason,
    }
}

impl QemuDriver {
    /// Starts the transition `spec.power` asks for, unless one is under way or none is needed.
    /// While a VM boots (created, started, resumed) it reports `creating`; while it stops or
    /// suspends, `running`. Either way the reason of an earlier failure is cleared, so that it is
    /// not taken for this attempt's.
    pub(super) fn transition(self: &Arc<Self>, vm: Arc<Vm>, spec: VmSpec) {
        let driver = self.clone();
        tokio::spawn(async move {
            let Ok(_g) = vm.busy.try_lock() else { return };
            if vm.removed.load(Ordering::SeqCst) || power_held(vm.incoming(), vm.migration_phase()) {
                return;
            }
            let before = vm.state();
            let Some(step) = Step::toward(before, spec.power, vm.path("disk.qcow2").exists()) else {
                return;
            };
            if step.boots() {
                vm.set(VmState::Creating, None);
            } else {
                vm.set(VmState::Running, None);
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
            tracing::warn!(vm = %spec.name, kind = e.kind().as_str(), "{step:?} failed: {e}");
            let alive = vm.process().map(|p| p.exited.borrow().is_none()).unwrap_or(false);
            let after = after_failure(step, before, alive, &e);
            if after.kill {
                vm.expect_exit.store(true, Ordering::SeqCst);
                if let Some(p) = vm.process() {
                    kill9(p.pid);
                }
            }
            if after.cleanup {
                cleanup_dir(&vm.dir).await;
            }
            vm.set(after.state, Some(after.reason));
        });
    }

    /// Creates the disk and seed, boots the VM and waits until it is ready.
    async fn create(&self, vm: &Arc<Vm>, spec: &VmSpec) -> Result<(), HvError> {
        if !self.qemu_found {
            return Err(HvError::QemuMissing(self.cfg.qemu.clone()));
        }
        let base = self.template(spec).await?;
        self.create_overlay(vm, spec, &base).await?;
        let t = std::time::Instant::now();
        seed::write_seed(spec, &self.resolvers(spec), &vm.path("seed.img")).await?;
        vm.record_timing("seed_ms", ms(t));
        self.boot(vm, spec, &base).await
    }

    /// Boots an existing VM again from its disk.
    async fn start(&self, vm: &Arc<Vm>, spec: &VmSpec) -> Result<(), HvError> {
        let base = self.template(spec).await?;
        self.boot(vm, spec, &base).await
    }

    /// Launches QEMU and waits until it runs and, when the template says how, until the guest
    /// is ready.
    async fn boot(&self, vm: &Arc<Vm>, spec: &VmSpec, base: &Base) -> Result<(), HvError> {
        let offset = console_len(vm).await;
        let t = std::time::Instant::now();
        self.launch(vm, spec, base, Launch::Boot).await?;
        self.wait_status(vm, &["running"]).await?;
        vm.record_timing("qemu_start_ms", ms(t));
        if spec.ready != Readiness::Running {
            self.wait_ready(vm, &spec.ready, offset).await?;
            vm.record_timing("ready_ms", ms(t));
        }
        Ok(())
    }

    /// A QMP connection to the VM's QEMU, waiting for its socket to appear.
    pub(super) async fn qmp(&self, vm: &Vm) -> Result<Qmp, HvError> {
        let sock = vm.path("qmp.sock");
        let deadline = tokio::time::Instant::now() + self.cfg.qmp_timeout;
        loop {
            if let Some(p) = vm.process() {
                if let Some(how) = p.exited.borrow().clone() {
                    return Err(HvError::QemuExited {
                        how,
                        log: log_tail(&vm.path("qemu.log")),
                    });
                }
            }
            if sock.exists() {
                match Qmp::connect(&sock, self.cfg.qmp_timeout).await {
                    // QEMU binds the socket a moment before it listens on it: under load a
                    // connect can fall in between. Try again until the deadline.
                    Err(QmpError::Connect { source, .. })
                        if source.kind() == std::io::ErrorKind::ConnectionRefused
                            && tokio::time::Instant::now() < deadline => {}
                    r => return r.map_err(HvError::from),
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HvError::NoQmpSocket {
                    path: sock,
                    timeout: self.cfg.qmp_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until QEMU reports one of `states`.
    pub(super) async fn wait_status(&self, vm: &Vm, states: &[&str]) -> Result<String, HvError> {
        let mut q = self.qmp(vm).await?;
        let deadline = tokio::time::Instant::now() + STATUS_TIMEOUT;
        loop {
            let s = q.status().await?;
            if states.contains(&s.as_str()) {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HvError::UnexpectedStatus {
                    state: s,
                    expected: states.iter().map(|s| s.to_string()).collect(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the guest to say on its console (after `offset`) that it is ready, as `ready`
    /// tells; a guest that reports failure fails with its reason.
    async fn wait_ready(&self, vm: &Vm, ready: &Readiness, offset: u64) -> Result<(), HvError> {
        let deadline = tokio::time::Instant::now() + self.cfg.ready_timeout;
        let exited = vm.process().map(|p| p.exited);
        loop {
            let text = read_from(&vm.path("console.log"), offset).await;
            // The serial port writes byte by byte: only a whole line counts.
            for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
                if let Some(at) = line.find(GUEST_FAILED) {
                    return Err(HvError::GuestFailed {
                        reason: line[at + GUEST_FAILED.len()..].trim().to_string(),
                    });
                }
                let done = match ready {
                    Readiness::Report => line.contains(GUEST_READY),
                    Readiness::Pattern(p) => line.contains(p.as_str()),
                    Readiness::Running => true,
                };
                if done {
                    return Ok(());
                }
            }
            if let Some(how) = exited.as_ref().and_then(|e| e.borrow().clone()) {
                return Err(HvError::ExitedBeforeReady {
                    how,
                    log: log_tail(&vm.path("qemu.log")),
                    console: console_tail(&text),
                });
            }
            if vm.removed.load(Ordering::SeqCst) {
                return Err(HvError::Removed);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HvError::NotReady {
                    waited_for: match ready {
                        Readiness::Pattern(p) => format!("{p:?}"),
                        _ => format!("{GUEST_READY:?}"),
                    },
                    timeout: self.cfg.ready_timeout,
                    console: console_tail(&text),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes QEMU exit: ACPI power button first unless `hard`, then `quit`, then SIGKILL.
    pub(super) async fn shut_down(&self, vm: &Vm, hard: bool) -> Result<(), HvError> {
        let Some(p) = vm.process() else { return Ok(()) };
        vm.expect_exit.store(true, Ordering::SeqCst);
        let mut exited = p.exited.clone();
        let gone = |timeout: Duration| {
            let mut e = exited.clone();
            async move { tokio::time::timeout(timeout, e.wait_for(|x| x.is_some())).await.is_ok() }
        };
        if !hard {
            // Only a QEMU that no longer answers stops the shutdown here: one that exits or
            // refuses the button is stopped with `quit` below.
            match self.qmp(vm).await {
                Ok(mut q) => {
                    if let Err(e @ QmpError::Timeout { .. }) = q.execute("system_powerdown", None).await {
                        return Err(e.into());
                    }
                }
                Err(e @ HvError::QmpSilent { .. }) => return Err(e),
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
    async fn suspend(&self, vm: &Vm) -> Result<(), HvError> {
        let mut q = self.qmp(vm).await?;
        let tmp = vm.path("memory.state.partial");
        q.execute("stop", None).await?;
        let saved = async {
            // A migration's bandwidth cap stays with QEMU, as does 7.2's default of 32 MiB/s.
            q.execute("migrate-set-parameters", Some(super::migrate::unlimited()))
                .await?;
            q.execute(
                "migrate",
                Some(json!({ "uri": format!("exec:cat > {}", tmp.display()) })),
            )
            .await?;
            let deadline = tokio::time::Instant::now() + SAVE_TIMEOUT;
            loop {
                let m = q.execute("query-migrate", None).await?;
                match m["status"].as_str() {
                    Some("completed") => break,
                    Some("failed") | Some("cancelled") => {
                        return Err(HvError::SaveFailed(m["error-desc"].as_str().unwrap_or("?").to_string()))
                    }
                    _ if tokio::time::Instant::now() > deadline => return Err(HvError::SaveTimeout(SAVE_TIMEOUT)),
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            let state = vm.path("memory.state");
            tokio::fs::rename(&tmp, &state)
                .await
                .map_err(HvError::file("storing", &state))
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

    async fn resume(&self, vm: &Arc<Vm>, spec: &VmSpec) -> Result<(), HvError> {
        let base = self.template(spec).await?;
        self.launch(vm, spec, &base, Launch::Resume).await?;
        self.wait_status(vm, &["paused", "running"]).await?;
        let mut q = self.qmp(vm).await?;
        if q.status().await? == "paused" {
            q.execute("cont", None).await?;
        }
        let _ = tokio::fs::remove_file(vm.path("memory.state")).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SourceError;

    fn silent() -> HvError {
        HvError::from(QmpError::Timeout {
            path: "/q".into(),
            what: "stop".into(),
            timeout: Duration::from_secs(3),
        })
    }

    fn unreachable() -> HvError {
        HvError::Fetch {
            template: "demo".into(),
            file: crate::TemplateFile::Disk,
            source: SourceError::Unreachable {
                what: "controller".into(),
                source: "connection refused".into(),
            },
        }
    }

    fn bad_input() -> HvError {
        HvError::DiskTooSmall {
            template: "demo".into(),
            mib: 1,
            base_mib: 64,
        }
    }

    #[test]
    fn steps_go_toward_the_wanted_power() {
        use Power::*;
        use VmState as S;
        assert_eq!(Step::toward(S::Creating, Running, false), Some(Step::Create));
        assert_eq!(Step::toward(S::Failed, Running, false), Some(Step::Create));
        assert_eq!(Step::toward(S::Failed, Running, true), Some(Step::Start));
        assert_eq!(Step::toward(S::Running, Stopped, true), Some(Step::Stop));
        assert_eq!(Step::toward(S::Running, Suspended, true), Some(Step::Suspend));
        assert_eq!(Step::toward(S::Suspended, Running, true), Some(Step::Resume));
        assert_eq!(Step::toward(S::Stopped, Suspended, true), None);
        assert_eq!(Step::toward(S::Running, Running, true), None);
    }

    #[test]
    fn migrations_hold_the_power_where_a_change_would_lose_or_duplicate_the_guest() {
        use MigrationPhase::*;
        assert!(!power_held(false, None));
        assert!(
            power_held(true, None),
            "an incoming VM runs only through finish_incoming"
        );
        for phase in [Disk, Memory, Completed] {
            assert!(power_held(false, Some(phase)), "{phase:?}");
        }
        assert!(!power_held(false, Some(Failed)));
        assert!(!power_held(false, Some(Cancelled)));
    }

    #[test]
    fn a_silent_qemu_is_fenced_and_fails_its_vm() {
        let a = after_failure(Step::Suspend, VmState::Running, true, &silent());
        assert!(a.kill && !a.cleanup);
        assert_eq!(a.state, VmState::Failed);
        assert!(a.reason.starts_with("QMP stopped answering") && a.reason.ends_with("; QEMU was killed"));
        // A QEMU already gone is not said to have been killed.
        let gone = HvError::QemuExited {
            how: "QEMU exited".into(),
            log: String::new(),
        };
        let a = after_failure(Step::Stop, VmState::Running, false, &gone);
        assert_eq!(
            (a.kill, a.state, a.reason.as_str()),
            (false, VmState::Failed, "QEMU exited")
        );
    }

    #[test]
    fn a_retryable_failure_leaves_the_vm_as_it_was() {
        let a = after_failure(Step::Start, VmState::Stopped, false, &unreachable());
        assert_eq!((a.kill, a.cleanup, a.state), (false, false, VmState::Stopped));
        assert!(
            a.reason.contains("connection refused") && a.reason.ends_with("will retry"),
            "{a:?}"
        );
        let a = after_failure(Step::Create, VmState::Creating, false, &unreachable());
        assert_eq!((a.cleanup, a.state), (true, VmState::Creating));
        let a = after_failure(Step::Resume, VmState::Suspended, false, &unreachable());
        assert_eq!(a.state, VmState::Suspended, "the saved memory is kept");
    }

    #[test]
    fn bad_input_fails_the_vm_naming_the_value() {
        for step in [Step::Create, Step::Start] {
            let a = after_failure(step, VmState::Stopped, false, &bad_input());
            assert_eq!(a.state, VmState::Failed);
            assert!(
                a.reason
                    .contains("disk of 1 MiB is smaller than template demo's 64 MiB"),
                "{a:?}"
            );
        }
        // A boot that failed while QEMU runs does not leave it running.
        let a = after_failure(Step::Start, VmState::Stopped, true, &bad_input());
        assert!(a.kill);
        let a = after_failure(Step::Stop, VmState::Running, true, &bad_input());
        assert_eq!((a.kill, a.state), (false, VmState::Running));
    }
}
