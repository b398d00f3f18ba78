//! What the reconciler does about each VM, decided from the VM's record and how its host looks,
//! with no I/O: the executor in [`super`] reads the state, asks [`vm_step`] for every VM, and
//! carries the steps out. Unit-tested over every VM state × host look × wanted power state.

use std::collections::HashSet;
use std::time::Duration;

use shoal_model::{
    plural, Cluster, DeployStep, Operation, OperationKind, OperationState, Power, StepState, Vm, VmState,
};
use uuid::Uuid;

/// How a VM's host looks to the reconciler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostLook {
    /// Heard from within the host timeout.
    Up,
    /// Not heard from, or not known at all.
    Down,
    /// Switched on by its power command and not heard from yet: its VMs wait for it.
    Booting,
    /// Declared failed: its VMs are the failover task's to restart, and whatever it still
    /// has is removed when it is heard again.
    Failed,
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
        (HostLook::Failed, VmState::Deleting) => VmStep::Forget,
        (HostLook::Failed, _) => VmStep::Nothing,
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

/// The VMs to remove from hosts as orphans, from what each host last reported (`reports`: the
/// host, whether it is heard now, the VMs it listed): those the store does not place there
/// (`known`: VM and host pairs, migrations' destinations included), and everything a failed
/// host has (it rejoins empty). Only hosts heard now are asked: one that is not would not
/// answer, and its last report still lists what it had (a failed host's VMs, restarted elsewhere
/// under the same uuids).
pub fn orphans<'a>(
    reports: &'a [(&'a str, bool, Vec<Uuid>)],
    known: &HashSet<(Uuid, &str)>,
    failed: &HashSet<String>,
) -> Vec<(&'a str, Uuid)> {
    reports
        .iter()
        .filter(|(_, heard, _)| *heard)
        .flat_map(|(host, _, vms)| vms.iter().map(move |u| (*host, *u)))
        .filter(|(host, uuid)| failed.contains(*host) || !known.contains(&(*uuid, *host)))
        .collect()
}

/// A running operation moved on, and whether what it created must be rolled back.
#[derive(Debug, PartialEq)]
pub struct Advanced {
    pub op: Operation,
    pub roll_back: bool,
}

/// Moves a running operation on from its VMs as they are (`vms`: those of its VMs that still
/// exist) and its target cluster: progress, success, or failure with the reason — a failed
/// deployment also asks for its roll-back. `now_ms` and `timeout` decide when waiting ends.
pub fn advance(op: &Operation, vms: &[&Vm], cluster: Option<&Cluster>, now_ms: u64, timeout: Duration) -> Advanced {
    let mut new = op.clone();
    let mut roll_back = false;
    // A delete removes VMs; a scale removes them when it shrank the cluster, else deploys them.
    let removes = op.kind == OperationKind::ClusterDelete
        || (op.kind == OperationKind::ClusterScale && cluster.is_some_and(|c| c.size < op.previous_size));
    let total = op.vms.len() as u64;
    let timed_out = now_ms.saturating_sub(op.created_unix_ms) > timeout.as_millis() as u64;
    let waiting = |pred: &dyn Fn(&Vm) -> bool| -> String {
        vms.iter()
            .filter(|v| !pred(v))
            .take(5)
            .map(|v| format!("{} ({} on {})", v.name, v.state.as_str(), v.host))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match op.kind {
        // Moves and evacuations report their own progress (the migration executor, the wave
        // runner, the failover task).
        OperationKind::VmMigrate | OperationKind::ClusterMigrate | OperationKind::HostEvacuate => {}
        // Removals: done when the VMs (and, for a delete, the cluster) are gone.
        OperationKind::ClusterDelete | OperationKind::ClusterScale if removes => {
            let left = vms.len() as u64;
            let cluster_gone = cluster.is_none();
            set_execute(
                &mut new,
                total - left,
                total,
                format!("{} of {} removed", total - left, plural(total, "VM")),
            );
            if left == 0 && (op.kind != OperationKind::ClusterDelete || cluster_gone) {
                finish(&mut new, None);
            }
        }
        // Deployments: done when every new VM runs; rolled back when one cannot.
        OperationKind::ClusterCreate | OperationKind::ClusterScale => {
            let running = vms.iter().filter(|v| v.state == VmState::Running).count() as u64;
            set_execute(
                &mut new,
                running,
                total,
                format!("{running} of {} running", plural(total, "VM")),
            );
            let failure = if let Some(f) = vms.iter().find(|v| v.state == VmState::Failed) {
                Some(format!(
                    "VM {} failed on host {}: {}",
                    f.name,
                    f.host,
                    f.reason.as_deref().unwrap_or("no reason given")
                ))
            } else if vms.len() < op.vms.len() {
                Some("VMs of the operation disappeared before they started".to_string())
            } else if timed_out && running < total {
                Some(format!(
                    "timed out after {:?} waiting for {}: {}",
                    timeout,
                    plural(total - running, "VM"),
                    waiting(&|v| v.state == VmState::Running)
                ))
            } else {
                None
            };
            if let Some(reason) = failure {
                roll_back = true;
                if let Some(st) = new.deploy_step_mut(DeployStep::Execute) {
                    st.state = StepState::Failed;
                }
                let what = if op.kind == OperationKind::ClusterCreate {
                    format!("cluster {} rolled back", op.target)
                } else {
                    format!(
                        "cluster {} rolled back to {}",
                        op.target,
                        plural(op.previous_size, "VM")
                    )
                };
                finish(&mut new, Some(format!("{reason}; {what}")));
            } else if running == total {
                finish(&mut new, None);
            }
        }
        // Power changes: done when every VM is where it is wanted.
        _ => {
            let at = |v: &Vm| v.state == v.desired.target();
            let done = vms.iter().filter(|v| at(v)).count() as u64;
            set_execute(&mut new, done, total, format!("{done} of {} done", plural(total, "VM")));
            let failure = if let Some(f) = vms
                .iter()
                .find(|v| v.state == VmState::Failed || (v.reason.is_some() && !at(v)))
            {
                Some(format!(
                    "VM {} on host {}: {}",
                    f.name,
                    f.host,
                    f.reason.as_deref().unwrap_or("failed")
                ))
            } else if vms.len() < op.vms.len() {
                Some("VMs of the operation were deleted".to_string())
            } else if timed_out && done < total {
                Some(format!("timed out after {:?} waiting for {}", timeout, waiting(&at)))
            } else {
                None
            };
            if let Some(reason) = failure {
                if let Some(st) = new.deploy_step_mut(DeployStep::Execute) {
                    st.state = StepState::Failed;
                }
                finish(&mut new, Some(reason));
            } else if done == total {
                finish(&mut new, None);
            }
        }
    }
    Advanced { op: new, roll_back }
}

/// An operation whose driving task is gone (the controller restarted under it) ends, failed,
/// saying so; `driven`: a task of this process drives it. Only moves in waves have such a task.
pub fn abandoned(op: &Operation, driven: bool, now_ms: u64) -> Option<Operation> {
    if op.kind != OperationKind::ClusterMigrate || driven || op.state != OperationState::Running {
        return None;
    }
    let mut new = op.clone();
    if let Some(s) = new.steps.iter_mut().find(|s| s.state == StepState::Running) {
        s.state = StepState::Failed;
    }
    new.state = OperationState::Failed;
    new.finished_unix_ms = Some(now_ms);
    new.error = Some(
        "the controller restarted while the VMs moved: the moves finished so far stay; run the migration \
         again for the rest"
            .into(),
    );
    Some(new)
}

fn set_execute(op: &mut Operation, done: u64, total: u64, message: String) {
    if let Some(st) = op.deploy_step_mut(DeployStep::Execute) {
        st.done = done;
        st.total = total;
        st.message = message;
    }
}

fn finish(op: &mut Operation, error: Option<String>) {
    op.state = if error.is_some() {
        OperationState::Failed
    } else {
        OperationState::Succeeded
    };
    if error.is_none() {
        if let Some(st) = op.deploy_step_mut(DeployStep::Execute) {
            st.state = StepState::Done;
        }
    }
    op.error = error;
    op.finished_unix_ms = Some(shoal_model::now_ms());
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
            HostLook::Failed => match state {
                VmState::Deleting => Forget,
                _ => Nothing,
            },
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
    fn orphans_are_asked_of_heard_hosts_only_and_a_failed_host_loses_everything() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // `a` was restarted on h2 after h1 and then h3 failed; h3 is not heard, h1 is back.
        let reports = vec![
            ("h1", true, vec![a, c]),
            ("h2", true, vec![a, b]),
            ("h3", false, vec![a]),
        ];
        let known: HashSet<(Uuid, &str)> = [(a, "h2"), (b, "h2"), (c, "h1")].into();
        let failed: HashSet<String> = ["h1".to_string(), "h3".to_string()].into();
        let mut got = orphans(&reports, &known, &failed);
        got.sort();
        let mut want = vec![("h1", a), ("h1", c)];
        want.sort();
        assert_eq!(got, want, "h1 rejoins empty (c too), h3 is not asked, h2 keeps its own");
        let none: HashSet<String> = HashSet::new();
        assert_eq!(
            orphans(&reports, &known, &none),
            vec![("h1", a)],
            "only what the store does not place there"
        );
    }

    #[test]
    fn every_vm_state_host_look_and_wanted_state() {
        let mut n = 0;
        for state in STATES {
            for host in [HostLook::Up, HostLook::Down, HostLook::Booting, HostLook::Failed] {
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
        assert_eq!(n, 96);
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

    fn vm(name: &str, state: VmState, desired: Power, reason: Option<&str>) -> Vm {
        Vm {
            name: name.into(),
            uuid: uuid::Uuid::new_v4(),
            cluster: "c".into(),
            index: 0,
            host: "h1".into(),
            state,
            ip: "10.0.0.2".parse().unwrap(),
            mac: shoal_model::MacAddr::qemu(1),
            cpus: 1,
            memory_mib: 128,
            disk_mib: None,
            template: "t".into(),
            desired,
            force_stop: false,
            reason: reason.map(Into::into),
            claimed: true,
            observed_seq: 1,
            created_unix_ms: 0,
            disk_base: None,
        }
    }

    fn operation(kind: OperationKind, steps: &[&str], vms: &[&str], previous_size: u32) -> Operation {
        let mut op = crate::domain::clusters::new_operation(kind, "c", steps, previous_size);
        op.vms = vms.iter().map(|v| v.to_string()).collect();
        op.created_unix_ms = 1_000;
        op
    }

    fn cluster(size: u32) -> Cluster {
        serde_json::from_value(serde_json::json!({
            "name": "c", "profile": "p",
            "shape": {"template": "t", "cpus": 1, "memory_mib": 128, "disk_mib": null, "network": null, "user_data": null},
            "size": size, "placement": "spread", "anti_affinity": "none", "subnet": "10.0.0.0/24",
            "network": null, "state": "converging", "created_unix_ms": 0
        }))
        .unwrap()
    }

    const T: Duration = Duration::from_secs(60);

    /// What a row says: the case, the operation, its VMs as they are, its cluster, the time,
    /// and what must come of it: state, roll-back, a word of the error.
    type Row = (
        &'static str,
        Operation,
        Vec<Vm>,
        Option<Cluster>,
        u64,
        OperationState,
        bool,
        &'static str,
    );
    const DEPLOY: &[&str] = &["prepare_images", "configure_vms", "choose_hosts", "execute"];

    /// Every kind of operation against what its VMs did: the state it reaches, whether what it
    /// created is rolled back, and a word its error must contain.
    #[test]
    fn operations_advance_as_their_vms_do() {
        use OperationKind as K;
        use OperationState::{Failed, Running, Succeeded};
        use VmState as V;
        let up = Power::Running;
        let run = |n| vm(n, V::Running, up, None);
        let rows: Vec<Row> = vec![
            (
                "create: all run",
                operation(K::ClusterCreate, DEPLOY, &["a", "b"], 0),
                vec![run("a"), run("b")],
                Some(cluster(2)),
                2_000,
                Succeeded,
                false,
                "",
            ),
            (
                "create: one boots",
                operation(K::ClusterCreate, DEPLOY, &["a", "b"], 0),
                vec![run("a"), vm("b", V::Creating, up, None)],
                Some(cluster(2)),
                2_000,
                Running,
                false,
                "",
            ),
            (
                "create: one failed",
                operation(K::ClusterCreate, DEPLOY, &["a", "b"], 0),
                vec![run("a"), vm("b", V::Failed, up, Some("no kernel"))],
                Some(cluster(2)),
                2_000,
                Failed,
                true,
                "no kernel",
            ),
            (
                "create: one vanished",
                operation(K::ClusterCreate, DEPLOY, &["a", "b"], 0),
                vec![run("a")],
                Some(cluster(2)),
                2_000,
                Failed,
                true,
                "disappeared",
            ),
            (
                "create: timed out",
                operation(K::ClusterCreate, DEPLOY, &["a"], 0),
                vec![vm("a", V::Pending, up, None)],
                Some(cluster(1)),
                1_000 + 61_000,
                Failed,
                true,
                "timed out",
            ),
            (
                "scale up: runs",
                operation(K::ClusterScale, DEPLOY, &["c"], 2),
                vec![run("c")],
                Some(cluster(3)),
                2_000,
                Succeeded,
                false,
                "",
            ),
            (
                "scale down: VMs left",
                operation(K::ClusterScale, &["execute"], &["x"], 3),
                vec![vm("x", V::Deleting, up, None)],
                Some(cluster(2)),
                2_000,
                Running,
                false,
                "",
            ),
            (
                "scale down: done",
                operation(K::ClusterScale, &["execute"], &["x"], 3),
                vec![],
                Some(cluster(2)),
                2_000,
                Succeeded,
                false,
                "",
            ),
            (
                "delete: VMs gone, cluster not yet",
                operation(K::ClusterDelete, &["execute"], &["a"], 1),
                vec![],
                Some(cluster(0)),
                2_000,
                Running,
                false,
                "",
            ),
            (
                "delete: all gone",
                operation(K::ClusterDelete, &["execute"], &["a"], 1),
                vec![],
                None,
                2_000,
                Succeeded,
                false,
                "",
            ),
            (
                "stop: done",
                operation(K::ClusterStop, &["execute"], &["a"], 1),
                vec![vm("a", V::Stopped, Power::Stopped, None)],
                Some(cluster(1)),
                2_000,
                Succeeded,
                false,
                "",
            ),
            (
                "stop: refused by the host",
                operation(K::ClusterStop, &["execute"], &["a"], 1),
                vec![vm("a", V::Running, Power::Stopped, Some("QMP refused"))],
                Some(cluster(1)),
                2_000,
                Failed,
                false,
                "QMP refused",
            ),
            (
                "suspend: VM deleted",
                operation(K::VmSuspend, &["execute"], &["a"], 0),
                vec![],
                Some(cluster(1)),
                2_000,
                Failed,
                false,
                "deleted",
            ),
        ];
        for (what, op, vms, cluster, now, state, roll_back, word) in rows {
            let refs: Vec<&Vm> = vms.iter().collect();
            let a = advance(&op, &refs, cluster.as_ref(), now, T);
            assert_eq!(
                (a.op.state, a.roll_back),
                (state, roll_back),
                "{what}: {:?}",
                a.op.error
            );
            assert!(
                a.op.error.as_deref().unwrap_or_default().contains(word),
                "{what}: {:?}",
                a.op.error
            );
            assert_eq!(a.op.finished_unix_ms.is_some(), state != Running, "{what}");
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
