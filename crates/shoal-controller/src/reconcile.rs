//! The reconciler: step 4 of every deployment and everything that keeps hosts matching the
//! store. Each pass reads the state under the write lock, settles what can be settled in the
//! store (re-placing VMs stranded on a down host, advancing or rolling back operations, finishing
//! deletions), then sends the hosts their commands in parallel without holding the lock. All
//! commands are idempotent, so a pass interrupted by a crash is simply run again after restart.

use std::collections::{BTreeMap, HashMap, HashSet};

use shoal_model::agent::{EnsureVms, RemoveVms, VmSpec, VmStatus};
use shoal_model::{
    format_mib, now_ms, Cluster, ClusterState, HostState, Operation, OperationKind, OperationState, StepState, Vm,
    VmState,
};
use shoal_store::{Compare, Op, Txn};
use tokio::sync::watch;
use uuid::Uuid;

use crate::db::{self, put, Claim, HostRecord, TemplateRecord, Versioned};
use crate::deploy::{gang_request, host_snapshot};
use crate::error::ApiResult;
use crate::Controller;

pub async fn run(ctl: Controller, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = pass(&ctl, &stop).await {
            tracing::warn!("reconcile pass failed: {e}");
        }
        tokio::select! {
            _ = ctl.wake.notified() => {}
            _ = tokio::time::sleep(ctl.config.reconcile_interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Commands one pass decided to send: per host, its address and the VMs with their store keys
/// (an orphan, unknown to the store, has no key).
#[derive(Default)]
struct Commands {
    ensure: BTreeMap<String, HostBatch<(String, VmSpec)>>,
    /// Remote VTEPs for the hosts whose networks' membership changed.
    peers: BTreeMap<String, (String, shoal_model::network::NetworkPeers)>,
    remove: BTreeMap<String, HostBatch<(Option<String>, Uuid)>>,
}

/// A host's address and what to send it.
type HostBatch<T> = (String, Vec<T>);

async fn pass(ctl: &Controller, stop: &watch::Receiver<bool>) -> ApiResult<()> {
    let commands = {
        let _guard = ctl.write_lock.lock().await;
        settle(ctl).await?
    };
    dispatch(ctl, commands, stop);
    Ok(())
}

/// Runs a command task until it ends or the controller stops, whichever is first: a stopped
/// controller writes nothing more.
fn spawn_until_stopped(stop: &watch::Receiver<bool>, task: impl std::future::Future<Output = ()> + Send + 'static) {
    let mut stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = task => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    });
}

/// Everything a pass decides from, read at one point.
struct Snapshot {
    hosts: HashMap<String, HostRecord>,
    clusters: HashMap<String, Versioned<Cluster>>,
    vms: Vec<Versioned<Vm>>,
    templates: HashMap<String, TemplateRecord>,
    ops: Vec<Operation>,
    networks: HashMap<String, shoal_model::Network>,
}

async fn read(ctl: &Controller) -> ApiResult<Snapshot> {
    Ok(Snapshot {
        hosts: ctl
            .db
            .values::<HostRecord>("/hosts/")
            .await?
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect(),
        clusters: ctl
            .db
            .list::<Cluster>("/clusters/")
            .await?
            .into_iter()
            .map(|c| (c.value.name.clone(), c))
            .collect(),
        vms: ctl.db.list("/vms/").await?,
        templates: ctl
            .db
            .templates()
            .await?
            .into_iter()
            .map(|t| (t.template.name.clone(), t))
            .collect(),
        ops: ctl
            .db
            .operations()
            .await?
            .into_iter()
            .filter(|o| o.state == OperationState::Running)
            .collect(),
        networks: crate::network::networks(ctl)
            .await?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect(),
    })
}

async fn settle(ctl: &Controller) -> ApiResult<Commands> {
    let mut s = read(ctl).await?;
    let up = |h: &str| ctl.host_state(h).0 == HostState::Up;

    // VMs whose host went down before confirming them never ran: place them elsewhere.
    let stranded: Vec<Versioned<Vm>> = s
        .vms
        .iter()
        .filter(|v| v.value.state == VmState::Pending && !up(&v.value.host))
        .map(|v| Versioned {
            value: v.value.clone(),
            mod_revision: v.mod_revision,
        })
        .collect();
    // VMs to delete from a host that is down cannot be told to go; forget them now. If the host
    // comes back, the orphan sweep below removes them then.
    let forgotten: Vec<Vm> = s
        .vms
        .iter()
        .filter(|v| v.value.state == VmState::Deleting && !up(&v.value.host))
        .map(|v| v.value.clone())
        .collect();
    let mut changed = false;
    for v in stranded {
        replace_stranded(ctl, &s, v).await?;
        changed = true;
    }
    if !forgotten.is_empty() {
        tracing::warn!(count = forgotten.len(), "forgetting VMs to delete on down hosts");
        release_vms(ctl, &forgotten).await?;
        changed = true;
    }
    // What the hosts report, where it is newer than what the store has.
    let live = ctl.liveness();
    let mut updates = Vec::new();
    for v in &s.vms {
        if v.value.state == VmState::Pending {
            continue;
        }
        let Some(l) = live.get(&v.value.host) else { continue };
        if let Some(new) = l
            .vms
            .iter()
            .find(|r| r.uuid == v.value.uuid)
            .and_then(|r| applied(&v.value, r))
        {
            updates.push((v, new));
        }
    }
    if !updates.is_empty() {
        write_updates(ctl, &updates).await?;
        changed = true;
    }
    if changed {
        s = read(ctl).await?;
    }

    finish_deleted_clusters(ctl, &s).await?;
    if advance_operations(ctl, &s).await? {
        // A cluster whose operation just finished is no longer busy: judge it on fresh state,
        // so that an operation never reads as done while its cluster still says converging.
        s = read(ctl).await?;
    }
    update_cluster_states(ctl, &s).await?;

    // Commands for the hosts.
    let mut cmds = Commands::default();
    let topo = topology(&s);
    {
        let sent = ctl.peers_sent.lock().expect("peers_sent lock");
        for (host, peers) in topo.peers_by_host(&s.networks) {
            let Some(rec) = s.hosts.get(&host) else { continue };
            if up(&host) && sent.get(&host) != Some(&peers) {
                cmds.peers.insert(host, (rec.address.clone(), peers));
            }
        }
    }
    let mut known: HashSet<(Uuid, &str)> = HashSet::new();
    for v in &s.vms {
        let vm = &v.value;
        known.insert((vm.uuid, vm.host.as_str()));
        let Some(host) = s.hosts.get(&vm.host) else { continue };
        if !up(&host.name) {
            continue;
        }
        let wants_ensure = match vm.state {
            VmState::Pending => true,
            VmState::Failed | VmState::Deleting => false,
            state => state != vm.desired.target() && ctl.ensure_due(vm.uuid, vm.desired),
        };
        match vm.state {
            _ if wants_ensure => {
                let Some(spec) = spec_for(&s, &topo, vm) else { continue };
                cmds.ensure
                    .entry(host.name.clone())
                    .or_insert_with(|| (host.address.clone(), Vec::new()))
                    .1
                    .push((db::vm_key(&vm.cluster, vm.index), spec));
            }
            VmState::Deleting => cmds
                .remove
                .entry(host.name.clone())
                .or_insert_with(|| (host.address.clone(), Vec::new()))
                .1
                .push((Some(db::vm_key(&vm.cluster, vm.index)), vm.uuid)),
            _ => {}
        }
    }
    // Orphans: VMs a host runs that the store does not place there (a rolled-back deployment
    // whose host was unreachable, a VM re-placed away from a host that came back).
    for (host, l) in &live {
        let Some(rec) = s.hosts.get(host) else { continue };
        for r in &l.vms {
            if !known.contains(&(r.uuid, host.as_str())) {
                tracing::info!(vm = %r.name, %host, "removing orphan VM");
                cmds.remove
                    .entry(host.clone())
                    .or_insert_with(|| (rec.address.clone(), Vec::new()))
                    .1
                    .push((None, r.uuid));
            }
        }
    }
    Ok(cmds)
}

fn topology(s: &Snapshot) -> crate::network::Topology {
    let network_of = |c: &str| s.clusters.get(c).and_then(|c| c.value.network.as_deref());
    crate::network::Topology::new(network_of, s.vms.iter().map(|v| &v.value), &s.hosts)
}

fn spec_for(s: &Snapshot, topo: &crate::network::Topology, vm: &Vm) -> Option<VmSpec> {
    let cluster = &s.clusters.get(&vm.cluster)?.value;
    let network = match &cluster.network {
        Some(n) => Some(topo.vm_network(s.networks.get(n)?, &vm.host)),
        None => None,
    };
    let template = s.templates.get(&vm.template)?;
    Some(VmSpec {
        uuid: vm.uuid,
        name: vm.name.clone(),
        cpus: vm.cpus,
        memory_mib: vm.memory_mib,
        disk_mib: vm.disk_mib,
        template: vm.template.clone(),
        template_hash: template.template.hash.clone(),
        template_format: template.template.host_format(),
        kernel_boot: template.template.kernel_boot.clone(),
        ready_pattern: template.template.ready_pattern.clone(),
        power: vm.desired,
        force_stop: vm.force_stop,
        ip: vm.ip,
        prefix_len: cluster.subnet.prefix(),
        gateway: cluster.subnet.gateway(),
        mac: vm.mac,
        user_data: cluster.shape.user_data.clone(),
        network,
    })
}

/// Sends every host its batch, all hosts at once. Results are written back as they arrive.
fn dispatch(ctl: &Controller, cmds: Commands, stop: &watch::Receiver<bool>) {
    for (host, (address, peers)) in cmds.peers {
        let ctl = ctl.clone();
        spawn_until_stopped(stop, async move {
            match ctl.agent(&address).set_network_peers(&peers).await {
                Ok(()) => {
                    ctl.peers_sent.lock().expect("peers_sent lock").insert(host, peers);
                }
                Err(e) => tracing::warn!(%host, "sending network peers failed: {e}"),
            }
        });
    }
    for (host, (address, batch)) in cmds.ensure {
        let uuids = ctl.claim_inflight(&host, batch.iter().map(|(_, s)| s.uuid));
        if uuids.is_empty() {
            continue;
        }
        let (keys, specs): (Vec<String>, Vec<VmSpec>) =
            batch.into_iter().filter(|(_, s)| uuids.contains(&s.uuid)).unzip();
        let ctl = ctl.clone();
        spawn_until_stopped(stop, async move {
            match ctl.agent(&address).ensure(&EnsureVms { vms: specs }).await {
                Ok(r) => {
                    if let Err(e) = record_started(&ctl, &host, &keys, &r.vms).await {
                        tracing::warn!(%host, "recording started VMs: {e}");
                    }
                }
                Err(e) => tracing::warn!(%host, "ensure failed: {e}"),
            }
            ctl.release_inflight(&host, &uuids);
            ctl.wake.notify_one();
        });
    }
    for (host, (address, batch)) in cmds.remove {
        let uuids = ctl.claim_inflight(&host, batch.iter().map(|(_, u)| *u));
        if uuids.is_empty() {
            continue;
        }
        let keys: Vec<String> = batch
            .into_iter()
            .filter(|(_, u)| uuids.contains(u))
            .filter_map(|(k, _)| k)
            .collect();
        let ctl = ctl.clone();
        spawn_until_stopped(stop, async move {
            let result = ctl.agent(&address).remove(&RemoveVms { uuids: uuids.clone() }).await;
            match result {
                Ok(r) => {
                    let failed: HashSet<Uuid> = r.vms.iter().map(|v| v.uuid).collect();
                    for f in &r.vms {
                        tracing::warn!(%host, vm = %f.uuid, "remove failed: {:?}", f.reason);
                    }
                    if let Err(e) = record_removed(&ctl, &host, &keys, &failed).await {
                        tracing::warn!(%host, "recording removed VMs: {e}");
                    }
                }
                Err(e) => tracing::warn!(%host, "remove failed: {e}"),
            }
            ctl.release_inflight(&host, &uuids);
            ctl.wake.notify_one();
        });
    }
}

/// Reads the VMs at `keys` that are still on `host`.
async fn batch_vms(ctl: &Controller, host: &str, keys: &[String]) -> ApiResult<Vec<Versioned<Vm>>> {
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        if let Some(v) = ctl.db.get::<Vm>(k).await? {
            if v.value.host == host {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// Writes what a host answered to "ensure".
async fn record_started(ctl: &Controller, host: &str, keys: &[String], reports: &[VmStatus]) -> ApiResult<()> {
    let _guard = ctl.write_lock.lock().await;
    let by_uuid: HashMap<Uuid, &VmStatus> = reports.iter().map(|r| (r.uuid, r)).collect();
    let vms = batch_vms(ctl, host, keys).await?;
    let updates: Vec<(&Versioned<Vm>, Vm)> = vms
        .iter()
        .filter_map(|v| Some((v, applied(&v.value, by_uuid.get(&v.value.uuid)?)?)))
        .collect();
    write_updates(ctl, &updates).await
}

/// The VM after a host's report, if the report is newer than what the store has and changes
/// something. A report without a sequence number (an "ensure" that failed outright) only
/// settles a VM still pending.
fn applied(vm: &Vm, r: &VmStatus) -> Option<Vm> {
    let newer = r.seq > vm.observed_seq || (vm.state == VmState::Pending && r.seq == 0);
    if vm.state == VmState::Deleting || !newer {
        return None;
    }
    let mut new = vm.clone();
    new.observed_seq = vm.observed_seq.max(r.seq);
    new.state = r.state;
    new.reason = r.reason.clone();
    (new != *vm).then_some(new)
}

/// Writes VM updates in one transaction. A VM that became suspended gives its claim back.
async fn write_updates(ctl: &Controller, updates: &[(&Versioned<Vm>, Vm)]) -> ApiResult<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut txn = Txn::new();
    let mut freed: BTreeMap<&str, Claim> = BTreeMap::new();
    for (old, new) in updates {
        let mut new = new.clone();
        if new.state == VmState::Suspended && new.claimed {
            new.claimed = false;
            let c = freed.entry(old.value.host.as_str()).or_default();
            c.cpus += new.cpus;
            c.memory_mib += new.memory_mib;
            c.vms += 1;
        }
        let k = db::vm_key(&new.cluster, new.index);
        txn = txn
            .when(Compare::ModRevision(k.clone(), old.mod_revision))
            .then(put(k, &new));
    }
    txn = release_claims(ctl, txn, &freed).await?;
    ctl.db.store.txn(txn).await?;
    Ok(())
}

/// Adds to `txn` the subtraction of `freed` from each host's claim, compared on its revision.
async fn release_claims(ctl: &Controller, mut txn: Txn, freed: &BTreeMap<&str, Claim>) -> ApiResult<Txn> {
    for (host, f) in freed {
        let key = db::claim_key(host);
        let cur = ctl.db.get::<Claim>(&key).await?;
        let (mut c, rev) = cur.map(|v| (v.value, v.mod_revision)).unwrap_or_default();
        c.cpus = c.cpus.saturating_sub(f.cpus);
        c.memory_mib = c.memory_mib.saturating_sub(f.memory_mib);
        c.vms = c.vms.saturating_sub(f.vms);
        txn = txn.when(Compare::ModRevision(key.clone(), rev)).then(put(key, &c));
    }
    Ok(txn)
}

/// Deletes the records of VMs their host confirmed removed, freeing their addresses and claims.
async fn record_removed(ctl: &Controller, host: &str, keys: &[String], failed: &HashSet<Uuid>) -> ApiResult<()> {
    let _guard = ctl.write_lock.lock().await;
    let vms: Vec<Vm> = batch_vms(ctl, host, keys)
        .await?
        .into_iter()
        .map(|v| v.value)
        .filter(|v| v.state == VmState::Deleting && !failed.contains(&v.uuid))
        .collect();
    release_vms(ctl, &vms).await
}

/// One transaction that deletes VMs and gives back everything they held.
async fn release_vms(ctl: &Controller, vms: &[Vm]) -> ApiResult<()> {
    if vms.is_empty() {
        return Ok(());
    }
    let mut freed: BTreeMap<&str, Claim> = BTreeMap::new();
    let mut txn = Txn::new();
    for vm in vms {
        if vm.claimed {
            let c = freed.entry(vm.host.as_str()).or_default();
            c.cpus += vm.cpus;
            c.memory_mib += vm.memory_mib;
            c.vms += 1;
        }
        txn = txn
            .then(Op::Delete(db::vm_key(&vm.cluster, vm.index)))
            .then(Op::Delete(db::ip_key(&vm.ip)))
            .then(Op::Delete(db::mac_key(&vm.mac)));
    }
    let txn = release_claims(ctl, txn, &freed).await?;
    ctl.db.store.txn(txn).await?;
    Ok(())
}

async fn set_state(ctl: &Controller, v: &Versioned<Vm>, state: VmState, reason: Option<String>) -> ApiResult<()> {
    let mut vm = v.value.clone();
    vm.state = state;
    vm.reason = reason;
    let k = db::vm_key(&vm.cluster, vm.index);
    ctl.db
        .store
        .txn(
            Txn::new()
                .when(Compare::ModRevision(k.clone(), v.mod_revision))
                .then(put(k, &vm)),
        )
        .await?;
    Ok(())
}

/// Moves a VM that never started off its down host, or fails it when no host can take it.
async fn replace_stranded(ctl: &Controller, s: &Snapshot, v: Versioned<Vm>) -> ApiResult<()> {
    let old = v.value.host.clone();
    let Some(cluster) = s.clusters.get(&v.value.cluster) else {
        return Ok(());
    };
    let siblings: Vec<Vm> = s
        .vms
        .iter()
        .filter(|o| o.value.cluster == v.value.cluster && o.value.uuid != v.value.uuid)
        .map(|o| o.value.clone())
        .collect();
    let snap = host_snapshot(ctl, &siblings).await?;
    let mut req = gang_request(&cluster.value, 1);
    req.cpus = v.value.cpus;
    req.memory_mib = v.value.memory_mib;
    let k = db::vm_key(&v.value.cluster, v.value.index);
    match snap.place(&req) {
        Ok(plan) => {
            let h = plan[0];
            let new_host = snap.name(h).to_string();
            tracing::warn!(vm = %v.value.name, from = %old, to = %new_host, "host down before the VM started; placing it elsewhere");
            let mut vm = v.value.clone();
            vm.host = new_host.clone();
            let mut txn = Txn::new()
                .when(Compare::ModRevision(k.clone(), v.mod_revision))
                .then(put(k, &vm));
            let (mut add, add_rev) = snap.claims[h];
            add.cpus += vm.cpus;
            add.memory_mib += vm.memory_mib;
            add.vms += 1;
            let ak = db::claim_key(&new_host);
            txn = txn.when(Compare::ModRevision(ak.clone(), add_rev)).then(put(ak, &add));
            if let Some(oi) = snap.snapshot.hosts.iter().position(|x| x.name == old) {
                let (mut sub, sub_rev) = snap.claims[oi];
                sub.cpus = sub.cpus.saturating_sub(vm.cpus);
                sub.memory_mib = sub.memory_mib.saturating_sub(vm.memory_mib);
                sub.vms = sub.vms.saturating_sub(1);
                let sk = db::claim_key(&old);
                txn = txn.when(Compare::ModRevision(sk.clone(), sub_rev)).then(put(sk, &sub));
            }
            ctl.db.store.txn(txn).await?;
        }
        Err(e) => {
            let reason = format!(
                "host {old} went down before the VM started, and no other host can take it ({} vCPU, {}): {e}",
                req.cpus,
                format_mib(req.memory_mib)
            );
            set_state(ctl, &v, VmState::Failed, Some(reason)).await?;
        }
    }
    Ok(())
}

async fn finish_deleted_clusters(ctl: &Controller, s: &Snapshot) -> ApiResult<()> {
    for c in s.clusters.values() {
        if c.value.state != ClusterState::Deleting || s.vms.iter().any(|v| v.value.cluster == c.value.name) {
            continue;
        }
        let ck = db::cluster_key(&c.value.name);
        let mut txn = Txn::new()
            .when(Compare::ModRevision(ck.clone(), c.mod_revision))
            .then(Op::Delete(ck));
        txn.success.extend(crate::network::release_ops(ctl, &c.value).await?);
        ctl.db.store.txn(txn).await?;
        tracing::info!(cluster = %c.value.name, "cluster deleted");
    }
    Ok(())
}

/// Moves operations on; returns whether one finished (the cluster states then change too).
async fn advance_operations(ctl: &Controller, s: &Snapshot) -> ApiResult<bool> {
    let mut finished = false;
    let by_name: HashMap<&str, &Versioned<Vm>> = s.vms.iter().map(|v| (v.value.name.as_str(), v)).collect();
    for op in &s.ops {
        let mut new = op.clone();
        let total = op.vms.len() as u64;
        let vms: Vec<&Versioned<Vm>> = op.vms.iter().filter_map(|n| by_name.get(n.as_str()).copied()).collect();
        let timed_out = now_ms().saturating_sub(op.created_unix_ms) > ctl.config.operation_timeout.as_millis() as u64;
        let waiting = |pred: &dyn Fn(&Vm) -> bool| -> String {
            vms.iter()
                .filter(|v| !pred(&v.value))
                .take(5)
                .map(|v| format!("{} ({} on {})", v.value.name, v.value.state.as_str(), v.value.host))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match op.kind {
            // Removals: done when the VMs (and, for a delete, the cluster) are gone.
            OperationKind::ClusterDelete | OperationKind::ClusterScale if op.steps.len() == 1 => {
                let left = vms.len() as u64;
                let cluster_gone = !s.clusters.contains_key(&op.target);
                set_execute(
                    &mut new,
                    total - left,
                    total,
                    format!("{} of {total} VMs removed", total - left),
                );
                if left == 0 && (op.kind != OperationKind::ClusterDelete || cluster_gone) {
                    finish(&mut new, None);
                }
            }
            // Deployments: done when every new VM runs; rolled back when one cannot.
            OperationKind::ClusterCreate | OperationKind::ClusterScale => {
                let running = vms.iter().filter(|v| v.value.state == VmState::Running).count() as u64;
                set_execute(&mut new, running, total, format!("{running} of {total} VMs running"));
                let failure = if let Some(f) = vms.iter().find(|v| v.value.state == VmState::Failed) {
                    Some(format!(
                        "VM {} failed on host {}: {}",
                        f.value.name,
                        f.value.host,
                        f.value.reason.as_deref().unwrap_or("no reason given")
                    ))
                } else if vms.len() < op.vms.len() {
                    Some("VMs of the operation disappeared before they started".to_string())
                } else if timed_out && running < total {
                    Some(format!(
                        "timed out after {:?} waiting for {} VMs: {}",
                        ctl.config.operation_timeout,
                        total - running,
                        waiting(&|v| v.state == VmState::Running)
                    ))
                } else {
                    None
                };
                if let Some(reason) = failure {
                    roll_back(ctl, s, op).await?;
                    if let Some(st) = new.step_mut("execute") {
                        st.state = StepState::Failed;
                    }
                    let what = if op.kind == OperationKind::ClusterCreate {
                        format!("cluster {} rolled back", op.target)
                    } else {
                        format!("cluster {} rolled back to {} VMs", op.target, op.previous_size)
                    };
                    finish(&mut new, Some(format!("{reason}; {what}")));
                } else if running == total {
                    finish(&mut new, None);
                }
            }
            // Power changes: done when every VM is where it is wanted.
            _ => {
                let at = |v: &Vm| v.state == v.desired.target();
                let done = vms.iter().filter(|v| at(&v.value)).count() as u64;
                set_execute(&mut new, done, total, format!("{done} of {total} VMs done"));
                let failure = if let Some(f) = vms
                    .iter()
                    .find(|v| v.value.state == VmState::Failed || (v.value.reason.is_some() && !at(&v.value)))
                {
                    Some(format!(
                        "VM {} on host {}: {}",
                        f.value.name,
                        f.value.host,
                        f.value.reason.as_deref().unwrap_or("failed")
                    ))
                } else if vms.len() < op.vms.len() {
                    Some("VMs of the operation were deleted".to_string())
                } else if timed_out && done < total {
                    Some(format!(
                        "timed out after {:?} waiting for {}",
                        ctl.config.operation_timeout,
                        waiting(&at)
                    ))
                } else {
                    None
                };
                if let Some(reason) = failure {
                    if let Some(st) = new.step_mut("execute") {
                        st.state = StepState::Failed;
                    }
                    finish(&mut new, Some(reason));
                } else if done == total {
                    finish(&mut new, None);
                }
            }
        }
        if &new != op {
            finished |= new.state != op.state;
            ctl.db.store.put(&db::operation_key(&op.id), db::enc(&new)).await?;
        }
    }
    Ok(finished)
}

fn set_execute(op: &mut Operation, done: u64, total: u64, message: String) {
    if let Some(st) = op.step_mut("execute") {
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
        if let Some(st) = op.step_mut("execute") {
            st.state = StepState::Done;
        }
    }
    op.error = error;
    op.finished_unix_ms = Some(now_ms());
}

/// Undoes a failed create or scale-up: its VMs are removed and the cluster returns to its
/// previous size (a failed create deletes the cluster).
async fn roll_back(ctl: &Controller, s: &Snapshot, op: &Operation) -> ApiResult<()> {
    let Some(c) = s.clusters.get(&op.target) else {
        return Ok(());
    };
    let ck = db::cluster_key(&c.value.name);
    let mut cluster = c.value.clone();
    if op.kind == OperationKind::ClusterCreate {
        cluster.size = 0;
        cluster.state = ClusterState::Deleting;
    } else {
        cluster.size = op.previous_size;
    }
    let mut txn = Txn::new()
        .when(Compare::ModRevision(ck.clone(), c.mod_revision))
        .then(put(ck, &cluster));
    let names: HashSet<&str> = op.vms.iter().map(String::as_str).collect();
    for v in &s.vms {
        let doomed = v.value.cluster == op.target
            && (op.kind == OperationKind::ClusterCreate || names.contains(v.value.name.as_str()));
        if doomed && v.value.state != VmState::Deleting {
            let mut vm = v.value.clone();
            vm.state = VmState::Deleting;
            let k = db::vm_key(&vm.cluster, vm.index);
            txn = txn
                .when(Compare::ModRevision(k.clone(), v.mod_revision))
                .then(put(k, &vm));
        }
    }
    ctl.db.store.txn(txn).await?;
    Ok(())
}

async fn update_cluster_states(ctl: &Controller, s: &Snapshot) -> ApiResult<()> {
    let busy: HashSet<&str> = s.ops.iter().map(|o| o.target.as_str()).collect();
    let mut counts: HashMap<&str, HashMap<VmState, u32>> = HashMap::new();
    for v in &s.vms {
        *counts
            .entry(v.value.cluster.as_str())
            .or_default()
            .entry(v.value.state)
            .or_default() += 1;
        // A VM operation keeps its cluster converging too.
        if busy.contains(v.value.name.as_str()) {
            counts
                .entry(v.value.cluster.as_str())
                .or_default()
                .insert(VmState::Pending, 1);
        }
    }
    for c in s.clusters.values() {
        if c.value.state == ClusterState::Deleting {
            continue;
        }
        let empty = HashMap::new();
        let n = counts.get(c.value.name.as_str()).unwrap_or(&empty);
        let total: u32 = n.values().sum();
        let all = |st: VmState| total == c.value.size && n.get(&st).copied().unwrap_or(0) == total;
        let state = if n.contains_key(&VmState::Failed) {
            ClusterState::Degraded
        } else if busy.contains(c.value.name.as_str()) || n.contains_key(&VmState::Pending) {
            ClusterState::Converging
        } else if all(VmState::Running) {
            ClusterState::Ready
        } else if all(VmState::Stopped) {
            ClusterState::Stopped
        } else if all(VmState::Suspended) {
            ClusterState::Suspended
        } else if n
            .keys()
            .all(|st| matches!(st, VmState::Running | VmState::Stopped | VmState::Suspended))
            && total == c.value.size
        {
            // Some VMs stopped or suspended on their own request: not all is running.
            ClusterState::Degraded
        } else {
            ClusterState::Converging
        };
        if state != c.value.state {
            let mut cluster = c.value.clone();
            cluster.state = state;
            let ck = db::cluster_key(&cluster.name);
            ctl.db
                .store
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(ck.clone(), c.mod_revision))
                        .then(put(ck, &cluster)),
                )
                .await?;
        }
    }
    Ok(())
}
