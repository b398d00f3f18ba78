//! Plans over the live state: a snapshot of hosts and VMs for the policy core, placement
//! previews with explanations, rebalancing and drains, and their execution.
//!
//! Every move of a plan is a live migration started through [`migrations::begin`] and carried
//! out by the migration executor; plans run them in waves.

use std::collections::HashMap;

use shoal_model::agent::MigrationParams;
use shoal_model::api::CreateCluster;
use shoal_model::{
    plural, ClusterState, DeployStep, MigrateCluster, Operation, OperationKind, OperationState, StepState, Vm, VmState,
};
use shoal_policy::rebalance::{self, Move, RebalanceOptions, RebalancePlan};
use shoal_policy::{Explanation, GangRequest, Snapshot};
use uuid::Uuid;

use crate::capacity::{gang_request, HostSnapshot};
use crate::datastore::{HostMark, Tx, WriteGuard};
use crate::domain::clusters::{busy, busy_error, new_operation};
use crate::domain::migrations;
use crate::domain::profiles::{profile_map, resolve_profile};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Puts a host into maintenance or takes it out.
pub async fn set_maintenance(ctl: &Controller, host: &str, on: bool) -> ApiResult<()> {
    let _guard = ctl.db.lock().await;
    ctl.db.known_host(host).await?;
    ctl.db.commit(Tx::new().mark(HostMark::Maintenance, host, on)).await
}

/// Fills in, for `template`, the share of its image each host's chunk cache already holds, as
/// the image store reports it (nothing for templates whose disk is a plain file).
pub(crate) async fn add_locality(ctl: &Controller, snap: &mut Snapshot, template: &str) -> ApiResult<()> {
    let Some(t) = ctl.db.template(template).await? else {
        return Ok(());
    };
    let Some(id) = t
        .value
        .template
        .disk()
        .ok()
        .and_then(|d| d.manifest()?.parse::<shoal_image::ManifestId>().ok())
    else {
        return Ok(());
    };
    let shares = crate::locality::image_locality(ctl, id).await;
    if !shares.is_empty() {
        snap.image_locality.insert(template.to_string(), shares);
    }
    Ok(())
}

/// The live hosts and the VMs holding resources on them, as the policy core sees them.
pub async fn snapshot(ctl: &Controller) -> ApiResult<Snapshot> {
    let (mut snap, _, vms) = HostSnapshot::read_with_placed(ctl, None).await?;
    // Moves are priced by what they copy (memory and the overlay's blocks) over the bandwidth
    // the hosts' last migrations achieved.
    let measured = ctl.migration_mib_s.lock().expect("bandwidth lock").clone();
    for h in &mut snap.snapshot.hosts {
        if let Some(bw) = measured.get(&h.name) {
            h.migration_mib_s = Some(*bw);
        }
    }
    let overlay = crate::domain::vms::overlay_mib(ctl);
    let uuid_of: HashMap<&str, uuid::Uuid> = vms.iter().map(|v| (v.name.as_str(), v.uuid)).collect();
    for v in &mut snap.snapshot.vms {
        v.overlay_mib = uuid_of
            .get(v.name.as_str())
            .and_then(|u| overlay.get(u))
            .copied()
            .unwrap_or(0);
    }
    for t in ctl.db.templates().await? {
        add_locality(ctl, &mut snap.snapshot, &t.template.name).await?;
    }
    Ok(snap.snapshot)
}

/// What `cluster create` would do: every host's verdict and the plan, committing nothing.
pub async fn preview_create(ctl: &Controller, req: &CreateCluster, explain: bool) -> ApiResult<Explanation> {
    shoal_model::validate_name("cluster", &req.name)?;
    let shape = resolve_profile(&profile_map(ctl).await?, &req.profile)?;
    let existing: Vec<Vm> = ctl
        .db
        .cluster_vms(&req.name)
        .await?
        .into_iter()
        .map(|v| v.value)
        .collect();
    let mut snap = HostSnapshot::read(ctl)
        .await?
        .with_vms(existing.iter().map(|v| (v, None)));
    add_locality(ctl, &mut snap.snapshot, &shape.template).await?;
    let mut g = GangRequest::for_cluster(
        &req.name,
        req.size,
        shape.cpus,
        shape.memory_mib,
        Some(&shape.template),
        req.placement,
        req.anti_affinity.domain(),
    );
    // As deployment does: switched-off hosts count only when the hosts that are on lack room.
    g.allow_power_on = ctl.config.consolidate;
    let g = snap.request_for(&g);
    let mut placer = snap.placer();
    let mut e = placer.explain(&g);
    if !explain {
        e.hosts.clear();
    }
    Ok(e)
}

/// Plans a rebalance of the live state and, with `apply`, executes it.
pub async fn rebalance(ctl: &Controller, opts: &RebalanceOptions, apply: bool) -> ApiResult<RebalancePlan> {
    let guard = ctl.db.lock().await;
    let snap = snapshot(ctl).await?;
    let plan = rebalance::plan(&snap, opts).map_err(|e| ApiError::Invalid(e.to_string()))?;
    if apply {
        execute(ctl, &plan.moves, guard).await?;
    }
    Ok(plan)
}

/// Marks the host draining (nothing new lands on it) and moves every VM off it. A drain that is
/// refused (no room elsewhere, VMs that cannot move) changes nothing: the host is marked only
/// once the plan is known to be executable.
pub async fn drain(ctl: &Controller, host: &str, opts: &RebalanceOptions, apply: bool) -> ApiResult<RebalancePlan> {
    let guard = ctl.db.lock().await;
    ctl.db.known_host(host).await?;
    let snap = snapshot(ctl).await?;
    let plan = rebalance::drain(&snap, host, opts).map_err(|e| ApiError::Capacity(e.to_string()))?;
    if apply {
        // Checked before the host is marked, so a refused drain leaves it in service.
        migrations::check_moves(ctl, &plan.moves).await?;
        ctl.db.commit(Tx::new().mark(HostMark::Draining, host, true)).await?;
        run_waves(ctl, &plan.moves, MigrationParams::default(), None, Some(guard)).await?;
    }
    Ok(plan)
}

/// Puts a host back in service after a drain.
pub async fn undrain(ctl: &Controller, host: &str) -> ApiResult<()> {
    let _guard = ctl.db.lock().await;
    ctl.db.known_host(host).await?;
    ctl.db.commit(Tx::new().mark(HostMark::Draining, host, false)).await
}

/// Executes a plan wave by wave, as the plan's concurrency limit says: the migrations of a
/// wave start together (each its own operation, through [`migrations::begin`]), and the next
/// wave starts once every one of them is committed. Returns when the last wave is done, or with
/// the first migration that failed (it was rolled back; those already committed stay). The
/// controller's write lock (`guard`, taken while planning) is held while a wave starts, not
/// while its VMs move.
pub(crate) async fn execute(ctl: &Controller, moves: &[Move], guard: WriteGuard) -> ApiResult<()> {
    migrations::check_moves(ctl, moves).await?;
    run_waves(ctl, moves, MigrationParams::default(), None, Some(guard)).await
}

/// The moves of a plan grouped by wave, in order.
fn waves(moves: &[Move]) -> Vec<Vec<Move>> {
    let mut waves: Vec<Vec<Move>> = vec![];
    for m in moves {
        let w = m.wave as usize;
        if waves.len() <= w {
            waves.resize(w + 1, vec![]);
        }
        waves[w].push(m.clone());
    }
    waves.retain(|w| !w.is_empty());
    waves
}

/// Runs `moves` in their waves; `parent` is the operation they belong to (its VMs are not busy
/// for it), which counts the VMs moved after each wave.
async fn run_waves(
    ctl: &Controller,
    moves: &[Move],
    params: MigrationParams,
    parent: Option<Uuid>,
    mut guard: Option<WriteGuard>,
) -> ApiResult<()> {
    let mut done = 0;
    for wave in waves(moves) {
        let ops = {
            let _held = match guard.take() {
                Some(g) => g,
                None => ctl.db.lock().await,
            };
            let mut ops = Vec::with_capacity(wave.len());
            for m in &wave {
                let v = ctl
                    .db
                    .vm(&m.vm)
                    .await?
                    .ok_or_else(|| ApiError::not_found("VM", &m.vm))?;
                if v.value.host != m.from {
                    return Err(ApiError::Conflict(format!(
                        "VM {} is on {}, not on {} as planned; plan again",
                        m.vm, v.value.host, m.from
                    )));
                }
                tracing::info!(vm = %m.vm, from = %m.from, to = %m.to, wave = m.wave, "migrating");
                ops.push(migrations::begin(ctl, &m.vm, Some(&m.to), params, parent).await?);
            }
            ops
        };
        wait_migrated(ctl, &ops).await?;
        done += wave.len();
        if let Some(id) = parent {
            update_op(ctl, id, |op| {
                if let Some(s) = op.deploy_step_mut(DeployStep::Execute) {
                    s.done = done as u64;
                    s.message = format!("{done} of {} moved", plural(moves.len(), "VM"));
                }
            })
            .await?;
        }
    }
    Ok(())
}

/// Waits until every migration operation of `ops` has finished; the first that failed is the error.
async fn wait_migrated(ctl: &Controller, ops: &[Operation]) -> ApiResult<()> {
    let mut waiting: Vec<&Operation> = ops.iter().collect();
    while !waiting.is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut still = Vec::new();
        for op in waiting {
            match ctl.db.operation(&op.id).await? {
                Some(o) if o.state == OperationState::Running => still.push(op),
                Some(o) if o.state == OperationState::Failed => {
                    return Err(ApiError::Conflict(
                        o.error.unwrap_or_else(|| format!("migrating VM {} failed", o.target)),
                    ))
                }
                _ => {}
            }
        }
        waiting = still;
    }
    Ok(())
}

/// `cluster migrate`: every VM of the cluster leaves the hosts the cluster is on, for hosts
/// placement chooses with the cluster's own rules, in waves of at most `max_concurrent` moves
/// (4 by default) with no host in more than two moves of a wave. Refused, changing nothing,
/// unless every VM runs and the hosts elsewhere can take them all.
pub async fn migrate_cluster(ctl: &Controller, name: &str, req: &MigrateCluster) -> ApiResult<Operation> {
    let guard = ctl.db.lock().await;
    let c = ctl.db.known_cluster(name).await?.value;
    if c.state == ClusterState::Deleting {
        return Err(ApiError::Conflict(format!("cluster {name:?} is being deleted")));
    }
    let ops = ctl.db.operations().await?;
    let vms: Vec<Vm> = ctl.db.cluster_vms(name).await?.into_iter().map(|v| v.value).collect();
    if let Some(op) = busy(&ops, name).or_else(|| vms.iter().find_map(|v| busy(&ops, &v.name))) {
        return Err(busy_error(name, &op));
    }
    if let Some(v) = vms.iter().find(|v| v.state != VmState::Running) {
        return Err(ApiError::Conflict(format!(
            "cannot migrate cluster {name}: VM {} is {}; only running VMs migrate",
            v.name,
            v.state.as_str()
        )));
    }
    if vms.is_empty() {
        return Err(ApiError::Conflict(format!("cluster {name} has no VMs to migrate")));
    }
    let snap = HostSnapshot::read(ctl).await?;
    let mut g = gang_request(&c, vms.len() as u32);
    g.rules.avoid_hosts = vms.iter().map(|v| v.host.clone()).collect();
    g.rules.avoid_hosts.dedup();
    let plan = snap.place(&g).map_err(|e| {
        ApiError::Capacity(format!(
            "the hosts cluster {name} is not on cannot take its {}: {e}",
            plural(vms.len(), "VM")
        ))
    })?;
    if let Some(h) = plan.iter().find(|h| snap.is_off(**h)) {
        return Err(ApiError::Conflict(format!(
            "cluster {name} would need host {} switched on; switch it on first",
            snap.name(*h)
        )));
    }
    let limit = req.max_concurrent.unwrap_or(4).max(1);
    let mut moves: Vec<Move> = Vec::with_capacity(vms.len());
    for (v, h) in vms.iter().zip(&plan) {
        let to = snap.name(*h).to_string();
        let busy_in = |w: u32| {
            let wave: Vec<&Move> = moves.iter().filter(|m| m.wave == w).collect();
            wave.len() >= limit
                || [&v.host, &to]
                    .iter()
                    .any(|host| wave.iter().filter(|m| &&m.from == host || &&m.to == host).count() >= 2)
        };
        let wave = (0..).find(|w| !busy_in(*w)).unwrap_or(0);
        moves.push(Move {
            vm: v.name.clone(),
            from: v.host.clone(),
            to,
            gain: 0.0,
            seconds: 0.0,
            score_after: 0.0,
            wave,
        });
    }
    let mut op = new_operation(
        OperationKind::ClusterMigrate,
        name,
        &[DeployStep::Execute.as_str()],
        c.size,
    );
    op.vms = vms.iter().map(|v| v.name.clone()).collect();
    let total = moves.len();
    let waves_n = moves.iter().map(|m| m.wave).max().unwrap_or(0) + 1;
    if let Some(s) = op.deploy_step_mut(DeployStep::Execute) {
        s.state = StepState::Running;
        s.total = total as u64;
        s.message = format!(
            "{} to move in {}",
            plural(total, "VM"),
            plural(waves_n as usize, "wave")
        );
    }
    // Registered before the operation exists, so that the reconciler never takes it for one
    // a restart cut short.
    ctl.driving.lock().expect("driving lock").insert(op.id);
    if let Err(e) = ctl.db.commit(Tx::new().put_operation(&op)).await {
        ctl.driving.lock().expect("driving lock").remove(&op.id);
        return Err(e);
    }
    let (ctl2, op2, params) = (ctl.clone(), op.clone(), req.params);
    let mut stop = ctl.stopped.clone();
    tokio::spawn(async move {
        let ctl = ctl2;
        let run = run_waves(&ctl, &moves, params, Some(op2.id), Some(guard));
        let result = tokio::select! {
            r = run => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        if let Some(r) = result {
            let _ = update_op(&ctl, op2.id, |op| {
                op.finished_unix_ms = Some(shoal_model::now_ms());
                let (state, step_state) = match &r {
                    Ok(()) => (OperationState::Succeeded, StepState::Done),
                    Err(e) => {
                        op.error = Some(e.to_string());
                        (OperationState::Failed, StepState::Failed)
                    }
                };
                op.state = state;
                if let Some(s) = op.deploy_step_mut(DeployStep::Execute) {
                    s.state = step_state;
                    if r.is_ok() {
                        s.done = total as u64;
                        s.message = format!("{} moved", plural(total, "VM"));
                    }
                }
            })
            .await;
        }
        ctl.driving.lock().expect("driving lock").remove(&op2.id);
        ctl.wake.notify_one();
    });
    Ok(op)
}

/// Reads, changes and writes an operation.
async fn update_op(ctl: &Controller, id: Uuid, f: impl FnOnce(&mut Operation)) -> ApiResult<()> {
    if let Some(mut op) = ctl.db.operation(&id).await? {
        f(&mut op);
        ctl.db.commit(Tx::new().put_operation(&op)).await?;
    }
    Ok(())
}
