//! Moving running VMs between hosts: the checks and the destination's choice, then one
//! transaction that records the migration (`/migrations/<vm>`), takes the destination's claim
//! and creates the operation. The executor (`crate::migrate`) carries it out from there. Every
//! plan that moves VMs (rebalance, drain, consolidation, `cluster migrate`) starts its moves here.

use shoal_model::agent::MigrationParams;
use shoal_model::{
    now_ms, HostState, MigrateVm, Migration, MigrationStep, Operation, OperationKind, StepState, Vm, VmState,
};
use shoal_policy::{Explanation, GangRequest};

use crate::capacity::{gang_request, Claim, ClaimChanges, HostSnapshot};
use crate::datastore::{HostRecord, Tx, Versioned};
use crate::domain::clusters::{busy, busy_error, new_operation};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// The steps of a VM migration's operation, in order.
pub const STEPS: [&str; 3] = ["prepare", "copy", "switch"];

/// `vm migrate`: starts moving the VM (to `req.to`, or where placement says).
pub async fn migrate_vm(ctl: &Controller, name: &str, req: &MigrateVm) -> ApiResult<Operation> {
    let _guard = ctl.db.lock().await;
    begin(ctl, name, req.to.as_deref(), req.params, None).await
}

/// `vm migrate --dry-run`: where the VM would go and, with `explain`, every host's verdict.
pub async fn preview(ctl: &Controller, name: &str, to: Option<&str>, explain: bool) -> ApiResult<Explanation> {
    let vm = stored_vm(ctl, name).await?.value;
    if let Some(to) = to {
        ctl.db.known_host(to).await?;
    }
    let (snap, req) = destination_request(ctl, &vm, to).await?;
    let mut e = snap.placer().explain(&req);
    if !explain {
        e.hosts.clear();
    }
    Ok(e)
}

/// The migrations under way.
pub async fn list(ctl: &Controller) -> ApiResult<Vec<Migration>> {
    Ok(ctl.db.migrations().await?.into_iter().map(|m| m.value).collect())
}

async fn stored_vm(ctl: &Controller, name: &str) -> ApiResult<Versioned<Vm>> {
    ctl.db.vm(name).await?.ok_or_else(|| ApiError::not_found("VM", name))
}

/// Placement's request for one more copy of `vm` elsewhere: its cluster's rules against its
/// siblings, never its own host, only `to` when given.
async fn destination_request(ctl: &Controller, vm: &Vm, to: Option<&str>) -> ApiResult<(HostSnapshot, GangRequest)> {
    let (snap, clusters, _) = HostSnapshot::read_with_placed(ctl, Some(vm.uuid)).await?;
    let mut req = match clusters.get(&vm.cluster) {
        Some(c) => gang_request(c, 1),
        None => GangRequest::new(&vm.cluster, 1, vm.cpus, vm.memory_mib),
    };
    req.cpus = vm.cpus;
    req.memory_mib = vm.memory_mib;
    req.rules.avoid_hosts.push(vm.host.clone());
    if let Some(to) = to {
        req.rules.only_hosts = vec![to.to_string()];
    }
    Ok((snap, req))
}

/// Why a VM in this state cannot migrate, if it cannot.
fn refusal(vm: &Vm) -> Option<String> {
    let why = match vm.state {
        VmState::Running if vm.desired == shoal_model::Power::Running => return None,
        VmState::Running => "it is being stopped or suspended".to_string(),
        VmState::Stopped => "it is stopped: only a running VM migrates; start it first, or leave it where it is".into(),
        VmState::Suspended => {
            "it is suspended: its memory is saved on its host; resume it first, then migrate it".into()
        }
        VmState::Pending | VmState::Creating => "it is still being created".into(),
        VmState::Deleting => "it is being deleted".into(),
        VmState::Failed => "it has failed; start it again first".into(),
        VmState::Unknown => "its state is not known".into(),
    };
    Some(format!("cannot migrate VM {}: {why}", vm.name))
}

/// Starts one migration, as part of operation `parent` if it has one (whose target is then not
/// busy for it). The caller holds the write lock. Refuses, changing nothing, a VM that
/// is not running, is busy or already moving, a destination that is unknown, the source itself,
/// down, draining, in maintenance, switched off or without room (placement's own filters), and a
/// move between hosts of different drivers.
pub(crate) async fn begin(
    ctl: &Controller,
    name: &str,
    to: Option<&str>,
    params: MigrationParams,
    parent: Option<uuid::Uuid>,
) -> ApiResult<Operation> {
    let vm = stored_vm(ctl, name).await?;
    let vm = &vm.value;
    if let Some(why) = refusal(vm) {
        return Err(ApiError::Conflict(why));
    }
    if let Some(m) = ctl.db.migration(name).await? {
        return Err(ApiError::Conflict(format!(
            "VM {name} is already migrating from {} to {} (operation {})",
            m.value.from, m.value.to, m.value.operation
        )));
    }
    let ops: Vec<Operation> = ctl
        .db
        .operations()
        .await?
        .into_iter()
        .filter(|o| Some(o.id) != parent)
        .collect();
    if let Some(op) = busy(&ops, name).or_else(|| busy(&ops, &vm.cluster)) {
        return Err(busy_error(&vm.cluster, &op));
    }
    if let Some(to) = to {
        ctl.db.known_host(to).await?;
        if to == vm.host {
            return Err(ApiError::Invalid(format!("VM {name} already runs on host {to}")));
        }
    }
    let source = ctl.db.known_host(&vm.host).await?;
    if ctl.host_state(&source.name).0 != HostState::Up {
        return Err(ApiError::Conflict(format!(
            "cannot migrate VM {name}: its host {} is down",
            source.name
        )));
    }
    let (snap, req) = destination_request(ctl, vm, to).await?;
    let plan = snap.place(&req).map_err(|e| {
        ApiError::Capacity(match to {
            // The host asked for says why it refuses, not the hosts the request left out.
            Some(to) => {
                let why = snap
                    .placer()
                    .explain(&req)
                    .hosts
                    .into_iter()
                    .find(|v| v.host == to)
                    .and_then(|v| v.rejected)
                    .map_or_else(|| e.to_string(), |r| r.to_string());
                format!("host {to} cannot take VM {name}: {why}")
            }
            None => format!("no host can take VM {name}: {e}"),
        })
    })?;
    let dest_name = snap.name(plan[0]).to_string();
    if snap.is_off(plan[0]) {
        return Err(ApiError::Conflict(format!(
            "host {dest_name} is switched off; switch it on first (shoal host power-on {dest_name})"
        )));
    }
    let dest = snap
        .records
        .iter()
        .find(|h| h.name == dest_name)
        .cloned()
        .ok_or_else(|| ApiError::not_found("host", &dest_name))?;
    check_drivers(name, &source, &dest)?;
    let params = MigrationParams {
        mode: params.mode.resolve(&source.driver, &dest.driver),
        ..params
    };
    let mut op = new_operation(OperationKind::VmMigrate, name, &STEPS, 0);
    op.vms = vec![name.to_string()];
    if let Some(s) = op.step_mut(STEPS[0]) {
        s.state = StepState::Running;
        s.message = format!(
            "{} ({} mode): host {} prepares to receive it",
            name,
            params.mode.as_str(),
            dest.name
        );
    }
    let m = Migration {
        vm: name.to_string(),
        uuid: vm.uuid,
        from: source.name.clone(),
        to: dest.name.clone(),
        params,
        step: MigrationStep::Prepare,
        incoming: None,
        progress: None,
        operation: op.id,
        started_unix_ms: now_ms(),
    };
    let mut claims = ClaimChanges::default();
    claims.take(&dest.name, Claim::of(vm));
    let tx = claims.write(&snap.claims, Tx::new().create_migration(&m).put_operation(&op));
    if !ctl.db.try_commit(tx).await? {
        return Err(ApiError::Conflict(format!(
            "migrating VM {name}: the state changed meanwhile; try again"
        )));
    }
    tracing::info!(vm = %name, from = %m.from, to = %m.to, mode = m.params.mode.as_str(), "migration started");
    crate::migrate::spawn(ctl, name);
    ctl.wake.notify_one();
    Ok(op)
}

/// Checks, before a plan changes anything, that each of its moves can start: the VM runs, and
/// both hosts run the same driver. Capacity is the plan's own business.
pub(crate) async fn check_moves(ctl: &Controller, moves: &[shoal_policy::rebalance::Move]) -> ApiResult<()> {
    for m in moves {
        let vm = stored_vm(ctl, &m.vm).await?.value;
        if let Some(why) = refusal(&vm) {
            return Err(ApiError::Conflict(format!("{why}; nothing was moved")));
        }
        let (from, to) = (ctl.db.known_host(&m.from).await?, ctl.db.known_host(&m.to).await?);
        check_drivers(&m.vm, &from, &to)?;
    }
    Ok(())
}

/// Both hosts must run VMs the same way: a simulated VM cannot become a QEMU one.
fn check_drivers(vm: &str, source: &HostRecord, dest: &HostRecord) -> ApiResult<()> {
    let family = |d: &str| d.split('/').next().unwrap_or(d).to_string();
    if family(&source.driver) != family(&dest.driver) {
        return Err(ApiError::Invalid(format!(
            "cannot migrate VM {vm} from host {} ({}) to host {} ({}): both hosts must run the same driver",
            source.name, source.driver, dest.name, dest.driver
        )));
    }
    Ok(())
}
