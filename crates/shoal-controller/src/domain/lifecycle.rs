//! Power changes of running VMs — stop, start, suspend, resume — for one VM or a whole virtual
//! cluster as one operation. The API records the wanted power state (`Vm::desired`) in one
//! transaction; the reconciler sends each host an "ensure" with it, and the operation ends when
//! every VM reports the target state.
//!
//! A suspended VM gives its vCPUs and memory back to its host (the reconciler releases the claim
//! when the host reports the VM suspended); resuming claims them again, here, atomically.

use std::collections::BTreeMap;

use shoal_model::PowerAction;
use shoal_model::{
    format_mib, plural, Cluster, ClusterState, DeployStep, Operation, OperationKind, OperationState, StepState, Vm,
    VmState,
};
use shoal_policy::GangRequest;

use crate::capacity::{gang_request, Claim, ClaimChanges, HostSnapshot};
use crate::datastore::{Tx, Versioned};
use crate::domain::clusters::{busy, busy_error, commit, new_operation};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// The power actions, as the domain applies them.
pub type Action = PowerAction;

/// What an action needs of a VM's state.
trait Applies {
    fn applies(self, vm: &Vm) -> ApiResult<bool>;
}

impl Applies for PowerAction {
    /// Whether `vm` can take this action; `Ok(false)` when it is already done.
    fn applies(self, vm: &Vm) -> ApiResult<bool> {
        let refuse = |why: &str| {
            Err(ApiError::Conflict(format!(
                "cannot {} VM {}: {why}",
                self.as_str(),
                vm.name
            )))
        };
        match (self, vm.state) {
            (_, VmState::Deleting) => refuse("it is being deleted"),
            (_, VmState::Pending | VmState::Creating) => refuse("it is still being created"),
            (Action::Stop { .. }, VmState::Stopped) => Ok(false),
            (Action::Stop { .. }, VmState::Suspended) => refuse("it is suspended; resume it first"),
            (Action::Stop { .. }, _) => Ok(true),
            (Action::Start, VmState::Running) => Ok(false),
            (Action::Start, VmState::Suspended) => refuse("it is suspended; use resume"),
            (Action::Start, _) => Ok(true),
            (Action::Suspend, VmState::Suspended) => Ok(false),
            (Action::Suspend, VmState::Running) => Ok(true),
            (Action::Suspend, s) => refuse(&format!("it is {}", s.as_str())),
            (Action::Resume, VmState::Running) => Ok(false),
            (Action::Resume, VmState::Suspended) => Ok(true),
            (Action::Resume, s) => refuse(&format!("it is {}, not suspended", s.as_str())),
        }
    }
}

/// Applies `action` to one VM.
pub async fn vm_action(ctl: &Controller, name: &str, action: Action) -> ApiResult<Operation> {
    let _guard = ctl.db.lock().await;
    let vm = ctl.db.vm(name).await?.ok_or_else(|| ApiError::not_found("VM", name))?;
    let cluster = vm.value.cluster.clone();
    let ops = ctl.db.operations().await?;
    if let Some(op) = busy(&ops, &cluster).or_else(|| busy(&ops, name)) {
        return Err(busy_error(&cluster, &op));
    }
    let kind = match action {
        Action::Stop { .. } => OperationKind::VmStop,
        Action::Start => OperationKind::VmStart,
        Action::Suspend => OperationKind::VmSuspend,
        Action::Resume => OperationKind::VmResume,
    };
    apply(ctl, kind, name, None, vec![vm], action).await
}

/// Applies `action` to every VM of a virtual cluster, as one operation.
pub async fn cluster_action(ctl: &Controller, name: &str, action: Action) -> ApiResult<Operation> {
    let _guard = ctl.db.lock().await;
    let c = ctl.db.known_cluster(name).await?;
    if c.value.state == ClusterState::Deleting {
        return Err(ApiError::Conflict(format!("cluster {name:?} is being deleted")));
    }
    let ops = ctl.db.operations().await?;
    if let Some(op) = busy(&ops, name) {
        return Err(busy_error(name, &op));
    }
    let vms = ctl.db.cluster_vms(name).await?;
    if let Some(op) = vms.iter().find_map(|v| busy(&ops, &v.value.name)) {
        return Err(busy_error(name, &op));
    }
    let kind = match action {
        Action::Stop { .. } => OperationKind::ClusterStop,
        Action::Start => OperationKind::ClusterStart,
        Action::Suspend => OperationKind::ClusterSuspend,
        Action::Resume => OperationKind::ClusterResume,
    };
    apply(ctl, kind, name, Some(c), vms, action).await
}

async fn apply(
    ctl: &Controller,
    kind: OperationKind,
    target: &str,
    cluster: Option<Versioned<Cluster>>,
    vms: Vec<Versioned<Vm>>,
    action: Action,
) -> ApiResult<Operation> {
    let mut op = new_operation(
        kind,
        target,
        &[DeployStep::Execute.as_str()],
        cluster.as_ref().map_or(0, |c| c.value.size),
    );
    let mut tx = Tx::new();
    let mut changing = Vec::new();
    for v in &vms {
        if action.applies(&v.value)? {
            changing.push(v);
        }
    }
    // Resuming takes the VMs' resources back on their hosts, all or none, through the same
    // filters as placement (state, overcommit, reservations, anti-affinity): a suspended VM's
    // memory is on its host, so each host is asked to take back exactly its own VMs.
    if action == Action::Resume {
        tx = resume_claims(ctl, &changing, tx).await?;
    }
    for v in &changing {
        let mut vm = v.value.clone();
        vm.desired = action.power();
        vm.force_stop = action.force();
        vm.reason = None;
        if action == Action::Resume {
            vm.claimed = true;
        }
        // A failed VM is started again from its disk, like a new one.
        if vm.state == VmState::Failed {
            vm.state = VmState::Pending;
        }
        tx = tx.update_vm(v.mod_revision, &vm);
    }
    op.vms = changing.iter().map(|v| v.value.name.clone()).collect();
    let n = op.vms.len();
    if let Some(s) = op.deploy_step_mut(DeployStep::Execute) {
        s.total = n as u64;
        s.state = StepState::Running;
        s.message = format!("{} {}", action.as_str(), plural(n, "VM"));
    }
    if op.vms.is_empty() {
        op.state = OperationState::Succeeded;
        op.finished_unix_ms = Some(op.created_unix_ms);
        if let Some(s) = op.deploy_step_mut(DeployStep::Execute) {
            s.state = StepState::Done;
            s.message = format!("nothing to {}", action.as_str());
        }
    }
    if let Some(c) = &cluster {
        let mut cl = c.value.clone();
        cl.state = ClusterState::Converging;
        tx = tx.update_cluster(c.mod_revision, &cl);
    }
    commit(ctl, tx.put_operation(&op), target).await?;
    ctl.wake.notify_one();
    Ok(op)
}

/// Adds to `tx` the claims that resuming `vms` takes back, after placement's filters agreed that
/// each VM's host can take it again; refuses naming the host and the binding constraint.
async fn resume_claims(ctl: &Controller, vms: &[&Versioned<Vm>], tx: Tx) -> ApiResult<Tx> {
    let unclaimed: Vec<&Vm> = vms.iter().map(|v| &v.value).filter(|v| !v.claimed).collect();
    if unclaimed.is_empty() {
        return Ok(tx);
    }
    let (snap, clusters, _) = HostSnapshot::read_with_placed(ctl, None).await?;
    let mut placer = snap.placer();
    let mut groups: BTreeMap<(&str, &str, u32, u64), u32> = BTreeMap::new();
    for v in &unclaimed {
        *groups
            .entry((v.host.as_str(), v.cluster.as_str(), v.cpus, v.memory_mib))
            .or_default() += 1;
    }
    let mut changes = ClaimChanges::default();
    for ((host, cluster, cpus, memory_mib), count) in groups {
        if snap.index(host).is_none() {
            return Err(ApiError::Conflict(format!(
                "host {host} is gone; its suspended VMs cannot be resumed"
            )));
        }
        let mut req = match clusters.get(cluster) {
            Some(c) => gang_request(c, count),
            None => GangRequest::new(cluster, count, cpus, memory_mib),
        };
        req.cpus = cpus;
        req.memory_mib = memory_mib;
        req.rules.only_hosts = vec![host.to_string()];
        placer.place(&req).map_err(|e| {
            ApiError::Capacity(format!(
                "host {host} cannot take back {} of cluster {cluster} ({} vCPU, {} each) to resume them: {e}",
                plural(count as usize, "VM"),
                cpus,
                format_mib(memory_mib)
            ))
        })?;
        for v in unclaimed.iter().filter(|v| v.host == host && v.cluster == cluster) {
            changes.take(host, Claim::of(v));
        }
    }
    Ok(changes.write(&snap.claims, tx))
}
