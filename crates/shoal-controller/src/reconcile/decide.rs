//! What the reconciler does about each VM, decided from the VM's record and how its host looks,
//! with no I/O: the executor in [`super`] reads the state, asks [`vm_step`] for every VM, and
//! carries the steps out. Unit-tested over every VM state × host look × wanted power state.

use shoal_model::{Power, VmState};

/// How a VM's host looks to the reconciler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostLook {
    /// Heard from within the host timeout.
    Up,
    /// Not heard from, or not known at all.
    Down,
    /// Switched on by its power command and not heard from yet: its VMs wait for it.
    Booting,
}

/// What to do about one VM in this pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStep {
    Nothing,
    /// Send its host "ensure" with the VM's spec: it is new, or its host must carry out a change.
    Ensure,
    /// Send "ensure" again only if the last one for the same wanted state is a while ago: the
    /// host is already working on it.
    EnsureIfDue,
    /// Tell its host to remove it.
    Remove,
    /// It never started and its host is gone: place it elsewhere.
    Replace,
    /// It is being deleted and its host is gone: forget it (the host, if it comes back, has it
    /// removed as an orphan).
    Forget,
}

/// The step for a VM in `state` wanted `desired`, on a host that looks like `host`.
pub fn vm_step(state: VmState, host: HostLook, desired: Power) -> VmStep {
    match (host, state) {
        // Only ever shown, never stored; nothing can be decided from it.
        (_, VmState::Unknown) => VmStep::Nothing,
        (HostLook::Booting, _) => VmStep::Nothing,
        (HostLook::Down, VmState::Pending) => VmStep::Replace,
        (HostLook::Down, VmState::Deleting) => VmStep::Forget,
        (HostLook::Down, _) => VmStep::Nothing,
        (HostLook::Up, VmState::Pending) => VmStep::Ensure,
        (HostLook::Up, VmState::Deleting) => VmStep::Remove,
        // A failed VM stays failed until an operator starts it again (that makes it pending).
        (HostLook::Up, VmState::Failed) => VmStep::Nothing,
        (HostLook::Up, s) if s == desired.target() => VmStep::Nothing,
        (HostLook::Up, _) => VmStep::EnsureIfDue,
    }
}

/// What to send a VM's host, if anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Ensure,
    Remove,
}

/// The command for a VM's step; `due` says whether a repeated "ensure" is due (asked only for
/// [`VmStep::EnsureIfDue`], since asking records the send). Re-placing and forgetting are
/// store changes, not commands.
pub fn command(step: VmStep, due: impl FnOnce() -> bool) -> Option<Command> {
    match step {
        VmStep::Ensure => Some(Command::Ensure),
        VmStep::EnsureIfDue if due() => Some(Command::Ensure),
        VmStep::Remove => Some(Command::Remove),
        VmStep::EnsureIfDue | VmStep::Nothing | VmStep::Replace | VmStep::Forget => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [VmState; 8] = [
        VmState::Pending,
        VmState::Creating,
        VmState::Running,
        VmState::Stopped,
        VmState::Suspended,
        VmState::Failed,
        VmState::Deleting,
        VmState::Unknown,
    ];
    const POWERS: [Power; 3] = [Power::Running, Power::Stopped, Power::Suspended];

    /// The whole table, written out: every VM state × host look × wanted state.
    fn expected(state: VmState, host: HostLook, desired: Power) -> VmStep {
        use VmStep::*;
        let at_target = matches!(
            (state, desired),
            (VmState::Running, Power::Running)
                | (VmState::Stopped, Power::Stopped)
                | (VmState::Suspended, Power::Suspended)
        );
        match host {
            HostLook::Booting => Nothing,
            HostLook::Down => match state {
                VmState::Pending => Replace,
                VmState::Deleting => Forget,
                _ => Nothing,
            },
            HostLook::Up => match state {
                VmState::Pending => Ensure,
                VmState::Deleting => Remove,
                VmState::Failed | VmState::Unknown => Nothing,
                VmState::Creating => EnsureIfDue,
                _ if at_target => Nothing,
                _ => EnsureIfDue,
            },
        }
    }

    #[test]
    fn every_vm_state_host_look_and_wanted_state() {
        let mut n = 0;
        for state in STATES {
            for host in [HostLook::Up, HostLook::Down, HostLook::Booting] {
                for desired in POWERS {
                    assert_eq!(
                        vm_step(state, host, desired),
                        expected(state, host, desired),
                        "{state:?} on a host {host:?}, wanted {desired:?}"
                    );
                    n += 1;
                }
            }
        }
        assert_eq!(n, 72);
    }

    #[test]
    fn a_booting_vm_not_due_is_left_alone_never_removed() {
        assert_eq!(command(VmStep::EnsureIfDue, || false), None);
        assert_eq!(command(VmStep::EnsureIfDue, || true), Some(Command::Ensure));
        assert_eq!(command(VmStep::Ensure, || panic!("not asked")), Some(Command::Ensure));
        assert_eq!(command(VmStep::Remove, || panic!("not asked")), Some(Command::Remove));
        for step in [VmStep::Nothing, VmStep::Replace, VmStep::Forget] {
            assert_eq!(command(step, || panic!("not asked")), None, "{step:?}");
        }
    }

    #[test]
    fn a_few_rows_spelled_out() {
        assert_eq!(
            vm_step(VmState::Running, HostLook::Up, Power::Stopped),
            VmStep::EnsureIfDue
        );
        assert_eq!(vm_step(VmState::Running, HostLook::Up, Power::Running), VmStep::Nothing);
        assert_eq!(
            vm_step(VmState::Pending, HostLook::Down, Power::Running),
            VmStep::Replace
        );
        assert_eq!(
            vm_step(VmState::Pending, HostLook::Booting, Power::Running),
            VmStep::Nothing
        );
        assert_eq!(
            vm_step(VmState::Deleting, HostLook::Down, Power::Running),
            VmStep::Forget
        );
        assert_eq!(vm_step(VmState::Failed, HostLook::Up, Power::Running), VmStep::Nothing);
    }
}
