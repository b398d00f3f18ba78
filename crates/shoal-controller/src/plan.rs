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
use shoal_model::{Cluster, HostState, Vm, VmState};
use shoal_policy::rebalance::{self, Move, RebalanceOptions, RebalancePlan};
use shoal_policy::{Explanation, GangRequest, Placer, Snapshot};
use shoal_store::{Compare, Txn};

use crate::db::{self, put, Claim, HostRecord, TemplateRecord, Versioned};
use crate::deploy::{host_snapshot, profile_map, resolve_profile};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Key marking a host as draining: nothing new is placed on it.
pub fn draining_key(host: &str) -> String {
    format!("/draining/{host}")
}

/// The hosts marked draining.
pub async fn draining(ctl: &Controller) -> ApiResult<std::collections::HashSet<String>> {
    marked(ctl, "/draining/").await
}

/// The hosts with a marker key under `prefix`.
async fn marked(ctl: &Controller, prefix: &str) -> ApiResult<std::collections::HashSet<String>> {
    Ok(ctl
        .db
        .keys(prefix)
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
        .collect())
}

/// Key marking a host as in maintenance: it keeps its VMs but takes nothing new.
pub fn maintenance_key(host: &str) -> String {
    format!("/maintenance/{host}")
}

/// The hosts in maintenance.
pub async fn in_maintenance(ctl: &Controller) -> ApiResult<std::collections::HashSet<String>> {
    marked(ctl, "/maintenance/").await
}

/// Puts a host into maintenance or takes it out.
pub async fn set_maintenance(ctl: &Controller, host: &str, on: bool) -> ApiResult<()> {
    if ctl.db.store.get(&db::host_key(host)).await?.is_none() {
        return Err(ApiError::not_found("host", host));
    }
    let op = if on {
        shoal_store::Op::Put(maintenance_key(host), b"maintenance".to_vec())
    } else {
        shoal_store::Op::Delete(maintenance_key(host))
    };
    ctl.db.store.txn(Txn::new().then(op)).await?;
    Ok(())
}

/// Fills in, for `template`, the share of its image each host's chunk cache already holds, as
/// the image store reports it (nothing for templates whose disk is a plain file).
pub(crate) async fn add_locality(ctl: &Controller, snap: &mut Snapshot, template: &str) -> ApiResult<()> {
    let Some(t) = ctl.db.get::<TemplateRecord>(&db::template_key(template)).await? else {
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

/// What the store says of hosts besides their records: the marks that keep placement off them.
pub(crate) struct HostMarks {
    draining: std::collections::HashSet<String>,
    maintenance: std::collections::HashSet<String>,
    powered_off: std::collections::HashSet<String>,
}

pub(crate) async fn host_marks(ctl: &Controller) -> ApiResult<HostMarks> {
    Ok(HostMarks {
        draining: draining(ctl).await?,
        maintenance: in_maintenance(ctl).await?,
        powered_off: crate::energy::powered_off(ctl).await?,
    })
}

/// A host as the policy core sees it: capacity, allocation rules, labels and state.
pub(crate) fn policy_host(ctl: &Controller, h: &HostRecord, marks: &HostMarks) -> shoal_policy::Host {
    let mut host = shoal_policy::Host::new(&h.name, h.cpus, h.memory_mib, 0);
    host.labels = h.labels.clone();
    host.cpu_overcommit = h.allocation.cpu_overcommit;
    host.memory_overcommit = h.allocation.memory_overcommit;
    host.reserved_cpus = h.allocation.reserved_cpus;
    host.reserved_memory_mib = h.allocation.reserved_memory_mib;
    host.state = if marks.powered_off.contains(&h.name) {
        shoal_policy::HostState::PoweredOff
    } else if ctl.host_state(&h.name).0 != HostState::Up {
        shoal_policy::HostState::Down
    } else if marks.draining.contains(&h.name) {
        shoal_policy::HostState::Draining
    } else if marks.maintenance.contains(&h.name) {
        shoal_policy::HostState::Maintenance
    } else {
        shoal_policy::HostState::Up
    };
    host
}

/// The live hosts and the VMs holding resources on them, as the policy core sees them.
pub async fn snapshot(ctl: &Controller) -> ApiResult<Snapshot> {
    let hosts: Vec<HostRecord> = ctl.db.values("/hosts/").await?;
    let clusters: HashMap<String, Cluster> = ctl
        .db
        .values::<Cluster>("/clusters/")
        .await?
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    let marks = host_marks(ctl).await?;
    let mut snap = Snapshot::default();
    for h in &hosts {
        snap.hosts.push(policy_host(ctl, h, &marks));
    }
    let known: std::collections::HashSet<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    snap.vms = ctl
        .db
        .vms()
        .await?
        .iter()
        .filter(|v| v.claimed && v.state != VmState::Deleting && known.contains(v.host.as_str()))
        .map(|v| policy_vm(v, clusters.get(&v.cluster)))
        .collect();
    for t in ctl.db.values::<TemplateRecord>("/templates/").await? {
        add_locality(ctl, &mut snap, &t.template.name).await?;
    }
    Ok(snap)
}

pub(crate) fn policy_vm(v: &Vm, cluster: Option<&Cluster>) -> shoal_policy::Vm {
    shoal_policy::Vm {
        name: v.name.clone(),
        cluster: v.cluster.clone(),
        host: v.host.clone(),
        cpus: v.cpus,
        memory_mib: v.memory_mib,
        disk_mib: 0,
        template: Some(v.template.clone()),
        dirty_mib_s: None,
        anti_affinity: cluster.and_then(|c| c.anti_affinity.domain()).map(str::to_string),
    }
}

/// What `cluster create` would do: every host's verdict and the plan, committing nothing.
pub async fn preview_create(ctl: &Controller, req: &CreateCluster, explain: bool) -> ApiResult<Explanation> {
    shoal_model::validate_name("cluster", &req.name)?;
    let shape = resolve_profile(&profile_map(ctl).await?, &req.profile)?;
    let existing: Vec<Vm> = ctl
        .db
        .vms()
        .await?
        .into_iter()
        .filter(|v| v.cluster == req.name)
        .collect();
    let mut snap = host_snapshot(ctl, &existing).await?;
    add_locality(ctl, &mut snap.snapshot, &shape.template).await?;
    let mut g = GangRequest::new(&req.name, req.size, shape.cpus, shape.memory_mib);
    g.placement = req.placement;
    g.template = Some(shape.template.clone());
    g.rules.anti_affinity = req.anti_affinity.domain().map(str::to_string);
    let mut placer = Placer::with_usage(&snap.snapshot, &snap.usage);
    let mut e = placer.explain(&g);
    if !explain {
        e.hosts.clear();
    }
    Ok(e)
}

/// Plans a rebalance of the live state and, with `apply`, executes it.
pub async fn rebalance(ctl: &Controller, opts: &RebalanceOptions, apply: bool) -> ApiResult<RebalancePlan> {
    let guard = ctl.write_lock.lock().await;
    let snap = snapshot(ctl).await?;
    let plan = rebalance::plan(&snap, opts).map_err(|e| ApiError::Invalid(e.to_string()))?;
    if apply {
        execute(ctl, &plan.moves, guard).await?;
    }
    Ok(plan)
}

/// Marks the host draining (nothing new lands on it) and moves every VM off it.
pub async fn drain(ctl: &Controller, host: &str, opts: &RebalanceOptions, apply: bool) -> ApiResult<RebalancePlan> {
    let guard = ctl.write_lock.lock().await;
    if ctl.db.store.get(&db::host_key(host)).await?.is_none() {
        return Err(ApiError::not_found("host", host));
    }
    let snap = snapshot(ctl).await?;
    let plan = rebalance::drain(&snap, host, opts).map_err(|e| ApiError::Capacity(e.to_string()))?;
    if apply {
        ctl.db
            .store
            .txn(Txn::new().then(shoal_store::Op::Put(draining_key(host), b"draining".to_vec())))
            .await?;
        execute(ctl, &plan.moves, guard).await?;
    }
    Ok(plan)
}

/// Puts a host back in service after a drain.
pub async fn undrain(ctl: &Controller, host: &str) -> ApiResult<()> {
    ctl.db
        .store
        .txn(Txn::new().then(shoal_store::Op::Delete(draining_key(host))))
        .await?;
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
pub(crate) async fn execute(ctl: &Controller, moves: &[Move], guard: tokio::sync::MutexGuard<'_, ()>) -> ApiResult<()> {
    let hosts: Vec<db::HostRecord> = ctl.db.values("/hosts/").await?;
    if let Some(m) = moves
        .iter()
        .find(|m| hosts.iter().any(|h| h.name == m.from && h.driver.starts_with("qemu")))
    {
        return Err(ApiError::Conflict(format!(
            "VM {} runs on QEMU host {}: moving it would restart it elsewhere without its disk (live \
             migration is not built yet); nothing was moved",
            m.vm, m.from
        )));
    }
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
            None => ctl.write_lock.lock().await,
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

/// Commits the moves of one wave.
async fn move_wave(ctl: &Controller, moves: &[Move]) -> ApiResult<()> {
    for m in moves {
        let vms: Vec<Versioned<Vm>> = ctl.db.list("/vms/").await?;
        let v = vms
            .into_iter()
            .find(|v| v.value.name == m.vm)
            .ok_or_else(|| ApiError::not_found("VM", &m.vm))?;
        if v.value.host != m.from {
            return Err(ApiError::Conflict(format!(
                "VM {} is on {}, not on {} as planned; plan again",
                m.vm, v.value.host, m.from
            )));
        }
        let (fk, tk) = (db::claim_key(&m.from), db::claim_key(&m.to));
        let from: Option<Versioned<Claim>> = ctl.db.get(&fk).await?;
        let to: Option<Versioned<Claim>> = ctl.db.get(&tk).await?;
        let (mut fc, frev) = from.map(|c| (c.value, c.mod_revision)).unwrap_or_default();
        let (mut tc, trev) = to.map(|c| (c.value, c.mod_revision)).unwrap_or_default();
        fc.cpus = fc.cpus.saturating_sub(v.value.cpus);
        fc.memory_mib = fc.memory_mib.saturating_sub(v.value.memory_mib);
        fc.vms = fc.vms.saturating_sub(1);
        tc.cpus += v.value.cpus;
        tc.memory_mib += v.value.memory_mib;
        tc.vms += 1;
        let mut vm = v.value.clone();
        vm.host = m.to.clone();
        vm.state = VmState::Pending;
        vm.observed_seq = 0;
        let key = db::vm_key(&vm.cluster, vm.index);
        let txn = Txn::new()
            .when(Compare::ModRevision(key.clone(), v.mod_revision))
            .when(Compare::ModRevision(fk.clone(), frev))
            .when(Compare::ModRevision(tk.clone(), trev))
            .then(put(key, &vm))
            .then(put(fk, &fc))
            .then(put(tk, &tc));
        if !ctl.db.store.txn(txn).await?.succeeded {
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
