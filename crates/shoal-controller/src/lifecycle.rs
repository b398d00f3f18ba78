//! Power changes of running VMs — stop, start, suspend, resume — for one VM or a whole virtual
//! cluster as one operation. The API records the wanted power state (`Vm::desired`) in one
//! transaction; the reconciler sends each host an "ensure" with it, and the operation ends when
//! every VM reports the target state.
//!
//! A suspended VM gives its vCPUs and memory back to its host (the reconciler releases the claim
//! when the host reports the VM suspended); resuming claims them again, here, atomically.

use std::collections::HashMap;

use shoal_model::{
    format_mib, Cluster, ClusterState, Operation, OperationKind, OperationState, Power, StepState, Vm, VmState,
};
use shoal_store::{Compare, Txn};

use crate::db::{self, put, Claim, HostRecord, Versioned};
use crate::deploy::{busy, busy_error, commit, new_operation};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Stop { force: bool },
    Start,
    Suspend,
    Resume,
}

impl Action {
    fn power(self) -> Power {
        match self {
            Action::Stop { .. } => Power::Stopped,
            Action::Start | Action::Resume => Power::Running,
            Action::Suspend => Power::Suspended,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Stop { .. } => "stop",
            Action::Start => "start",
            Action::Suspend => "suspend",
            Action::Resume => "resume",
        }
    }

    /// Whether `vm` can take this action; `Ok(false)` when it is already done.
    fn applies(self, vm: &Vm) -> ApiResult<bool> {
        let refuse = |why: &str| {
            Err(ApiError::Conflict(format!(
                "cannot {} VM {}: {why}",
                self.verb(),
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
    let _guard = ctl.write_lock.lock().await;
    let (cluster, index) = name
        .rsplit_once('-')
        .and_then(|(c, i)| Some((c, i.parse::<u32>().ok().filter(|n| n.to_string() == i)?)))
        .ok_or_else(|| ApiError::not_found("VM", name))?;
    let vm = ctl
        .db
        .get::<Vm>(&db::vm_key(cluster, index))
        .await?
        .ok_or_else(|| ApiError::not_found("VM", name))?;
    let ops = ctl.db.operations().await?;
    if let Some(op) = busy(&ops, cluster).or_else(|| busy(&ops, name)) {
        return Err(busy_error(cluster, &op));
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
    let _guard = ctl.write_lock.lock().await;
    let c = ctl
        .db
        .get::<Cluster>(&db::cluster_key(name))
        .await?
        .ok_or_else(|| ApiError::not_found("cluster", name))?;
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
    let mut op = new_operation(kind, target, &["execute"], cluster.as_ref().map_or(0, |c| c.value.size));
    let mut txn = Txn::new();
    let mut changing = Vec::new();
    for v in &vms {
        if action.applies(&v.value)? {
            changing.push(v);
        }
    }
    // Resuming takes the VMs' resources back on their hosts, all or none.
    if action == Action::Resume {
        let mut need: HashMap<&str, Claim> = HashMap::new();
        for v in changing.iter().filter(|v| !v.value.claimed) {
            let c = need.entry(v.value.host.as_str()).or_default();
            c.cpus += v.value.cpus;
            c.memory_mib += v.value.memory_mib;
            c.vms += 1;
        }
        for (host, add) in need {
            let h = ctl
                .db
                .get::<HostRecord>(&db::host_key(host))
                .await?
                .ok_or_else(|| ApiError::Conflict(format!("host {host} is gone")))?
                .value;
            let key = db::claim_key(host);
            let (mut cur, rev) = ctl
                .db
                .get::<Claim>(&key)
                .await?
                .map(|v| (v.value, v.mod_revision))
                .unwrap_or_default();
            if cur.cpus + add.cpus > h.cpus || cur.memory_mib + add.memory_mib > h.memory_mib {
                return Err(ApiError::Capacity(format!(
                    "host {host} has no room to resume {} VMs ({} vCPU, {}): {} of {} vCPU and {} of {} free",
                    add.vms,
                    add.cpus,
                    format_mib(add.memory_mib),
                    h.cpus.saturating_sub(cur.cpus),
                    h.cpus,
                    format_mib(h.memory_mib.saturating_sub(cur.memory_mib)),
                    format_mib(h.memory_mib)
                )));
            }
            cur.cpus += add.cpus;
            cur.memory_mib += add.memory_mib;
            cur.vms += add.vms;
            txn = txn.when(Compare::ModRevision(key.clone(), rev)).then(put(key, &cur));
        }
    }
    for v in &changing {
        let mut vm = v.value.clone();
        vm.desired = action.power();
        vm.force_stop = matches!(action, Action::Stop { force: true });
        vm.reason = None;
        if action == Action::Resume {
            vm.claimed = true;
        }
        // A failed VM is started again from its disk, like a new one.
        if vm.state == VmState::Failed {
            vm.state = VmState::Pending;
        }
        let k = db::vm_key(&vm.cluster, vm.index);
        txn = txn
            .when(Compare::ModRevision(k.clone(), v.mod_revision))
            .then(put(k, &vm));
    }
    op.vms = changing.iter().map(|v| v.value.name.clone()).collect();
    let n = op.vms.len();
    if let Some(s) = op.step_mut("execute") {
        s.total = n as u64;
        s.state = StepState::Running;
        s.message = format!("{} {n} VMs", action.verb());
    }
    if op.vms.is_empty() {
        op.state = OperationState::Succeeded;
        op.finished_unix_ms = Some(op.created_unix_ms);
        if let Some(s) = op.step_mut("execute") {
            s.state = StepState::Done;
            s.message = format!("nothing to {}", action.verb());
        }
    }
    if let Some(c) = &cluster {
        let mut cl = c.value.clone();
        cl.state = ClusterState::Converging;
        let ck = db::cluster_key(&cl.name);
        txn = txn
            .when(Compare::ModRevision(ck.clone(), c.mod_revision))
            .then(put(ck, &cl));
    }
    txn = txn.then(put(db::operation_key(&op.id), &op));
    commit(ctl, txn, target).await?;
    ctl.wake.notify_one();
    Ok(op)
}
