//! Plans over the live state: a snapshot of hosts and VMs for the policy core, placement
//! previews with explanations, rebalancing and drains, and their execution.
//!
//! A migration is executed as one transaction, like a deployment's claims: the VM record moves
//! to its new host as `pending` while the old host's claim shrinks and the new host's grows,
//! comparing the VM's and both claims' revisions. The reconciler then ensures the VM on the new
//! host and removes it from the old one as an orphan (the simulated driver's "live migration";
//! QEMU pre-copy will replace it behind the same record change).

use std::collections::HashMap;

use shoal_model::api::CreateCluster;
use shoal_model::{Cluster, Vm, VmState};
use shoal_policy::rebalance::{self, Move, RebalanceOptions, RebalancePlan};
use shoal_policy::{Explanation, GangRequest, Snapshot};

use crate::capacity::{Claim, ClaimChanges, HostSnapshot};
use crate::datastore::{HostMark, Tx, WriteGuard};
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
    let clusters: HashMap<String, Cluster> = ctl
        .db
        .clusters()
        .await?
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    let vms = ctl.db.vms().await?;
    let mut snap = HostSnapshot::read(ctl).await?.with_vms(
        vms.iter()
            .filter(|v| v.claimed && v.state != VmState::Deleting)
            .map(|v| (v, clusters.get(&v.cluster))),
    );
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
        check_movable(ctl, &plan.moves).await?;
        ctl.db.commit(Tx::new().mark(HostMark::Draining, host, true)).await?;
        execute(ctl, &plan.moves, guard).await?;
    }
    Ok(plan)
}

/// Puts a host back in service after a drain.
pub async fn undrain(ctl: &Controller, host: &str) -> ApiResult<()> {
    let _guard = ctl.db.lock().await;
    ctl.db.known_host(host).await?;
    ctl.db.commit(Tx::new().mark(HostMark::Draining, host, false)).await
}

/// Refuses moves off QEMU hosts: a move restarts the VM on its new host (there is no live
/// migration yet), which is harmless for the simulated driver but would leave a QEMU VM's disk
/// behind.
async fn check_movable(ctl: &Controller, moves: &[Move]) -> ApiResult<()> {
    let hosts = ctl.db.hosts().await?;
    if let Some(m) = moves
        .iter()
        .find(|m| hosts.iter().any(|h| h.name == m.from && h.runs_qemu()))
    {
        return Err(ApiError::Conflict(format!(
            "VM {} runs on QEMU host {}: moving it would restart it elsewhere without its disk (live \
             migration is not built yet); nothing was moved",
            m.vm, m.from
        )));
    }
    Ok(())
}

/// Executes a plan wave by wave, as the plan's concurrency limit says: the moves of a wave are
/// committed together (each one transaction over the VM and both hosts' claims), and the next
/// wave starts once every VM of this one runs on its new host. Returns when the last wave is
/// done. The controller's write lock (`guard`, taken while planning) is held while a wave is
/// committed, not while its VMs move.
///
/// A move restarts the VM on its new host (there is no live migration yet). That is harmless for
/// the simulated driver but would leave a QEMU VM's disk behind, so moves off QEMU hosts are
/// refused before anything moves.
pub(crate) async fn execute(ctl: &Controller, moves: &[Move], guard: WriteGuard) -> ApiResult<()> {
    check_movable(ctl, moves).await?;
    let mut waves: Vec<Vec<Move>> = vec![];
    for m in moves {
        let w = m.wave as usize;
        if waves.len() <= w {
            waves.resize(w + 1, vec![]);
        }
        waves[w].push(m.clone());
    }
    waves.retain(|w| !w.is_empty());
    let mut guard = Some(guard);
    for wave in waves {
        let _held = match guard.take() {
            Some(g) => g,
            None => ctl.db.lock().await,
        };
        move_wave(ctl, &wave).await?;
        drop(_held);
        wait_moved(ctl, &wave).await?;
    }
    Ok(())
}

/// Waits until every VM of `moves` runs on its new host.
async fn wait_moved(ctl: &Controller, moves: &[Move]) -> ApiResult<()> {
    let deadline = tokio::time::Instant::now() + ctl.config.operation_timeout;
    loop {
        let vms: Vec<Vm> = ctl.db.vms().await?;
        let waiting: Vec<&Move> = moves
            .iter()
            .filter(|m| {
                !vms.iter()
                    .any(|v| v.name == m.vm && v.host == m.to && v.state == VmState::Running)
            })
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ApiError::Unavailable(format!(
                "{} of the wave's VMs did not come up on their new hosts within {:?}, first {}",
                waiting.len(),
                ctl.config.operation_timeout,
                waiting[0].vm
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Commits the moves of one wave: each one transaction that moves the VM record to its new
/// host as `pending` and its claim from one host to the other, compared on all three revisions.
async fn move_wave(ctl: &Controller, moves: &[Move]) -> ApiResult<()> {
    for m in moves {
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
        let claims = ctl.db.claims().await?;
        let mut changes = ClaimChanges::default();
        changes.give_back(&m.from, Claim::of(&v.value));
        changes.take(&m.to, Claim::of(&v.value));
        let mut vm = v.value.clone();
        vm.host = m.to.clone();
        vm.state = VmState::Pending;
        vm.observed_seq = 0;
        let tx = changes.write(&claims, Tx::new().update_vm(v.mod_revision, &vm));
        if !ctl.db.try_commit(tx).await? {
            return Err(ApiError::Conflict(format!(
                "moving VM {} from {} to {}: the state changed meanwhile; plan again",
                m.vm, m.from, m.to
            )));
        }
        tracing::info!(vm = %m.vm, from = %m.from, to = %m.to, wave = m.wave, "migrating");
    }
    ctl.wake.notify_one();
    Ok(())
}
