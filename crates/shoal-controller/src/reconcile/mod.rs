//! The reconciler: step 4 of every deployment and everything that keeps hosts matching the
//! store. Each pass reads the state under the write lock, settles what can be settled in the
//! store (re-placing VMs stranded on a down host, advancing or rolling back operations, finishing
//! deletions), then sends the hosts their commands in parallel without holding the lock. All
//! commands are idempotent, so a pass interrupted by a crash is simply run again after restart.

use std::collections::{BTreeMap, HashMap, HashSet};

use shoal_model::agent::{EnsureVms, RemoveVms, VmSpec, VmStatus};
use shoal_model::{
    format_mib, now_ms, Cluster, ClusterState, HostState, Operation, OperationKind, OperationState, Vm, VmState,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::capacity::{gang_request, Claim, ClaimChanges, HostSnapshot};
use crate::datastore::{HostRecord, TemplateRecord, Tx, Versioned};
use crate::error::ApiResult;
use crate::Controller;

mod decide;
use decide::{advance, command, vm_step, Command, HostLook, VmStep};

pub async fn run(ctl: Controller, mut stop: watch::Receiver<bool>) {
    let mut pruned: Option<std::time::Instant> = None;
    loop {
        if let Err(e) = pass(&ctl, &stop).await {
            tracing::warn!("reconcile pass failed: {e}");
        }
        if pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            pruned = Some(std::time::Instant::now());
            if let Err(e) = prune_operations(&ctl).await {
                tracing::warn!("pruning operations failed: {e}");
            }
        }
        tokio::select! {
            _ = ctl.wake.notified() => {}
            _ = tokio::time::sleep(ctl.config.reconcile_interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// How often finished operations are pruned.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Most operations deleted in one transaction.
const PRUNE_BATCH: usize = 1000;

/// The finished operations to forget: older than `retention`, or beyond the `kept` newest.
/// Running operations are never pruned.
pub(crate) fn operations_to_prune(ops: &[Operation], now_ms: u64, retention_ms: u64, kept: usize) -> Vec<Uuid> {
    let mut finished: Vec<&Operation> = ops.iter().filter(|o| o.state != OperationState::Running).collect();
    finished.sort_by_key(|o| std::cmp::Reverse((o.finished_unix_ms.unwrap_or(o.created_unix_ms), o.id)));
    finished
        .iter()
        .enumerate()
        .filter(|(i, o)| {
            *i >= kept || now_ms.saturating_sub(o.finished_unix_ms.unwrap_or(o.created_unix_ms)) > retention_ms
        })
        .map(|(_, o)| o.id)
        .take(PRUNE_BATCH)
        .collect()
}

async fn prune_operations(ctl: &Controller) -> ApiResult<()> {
    let ops = ctl.db.operations().await?;
    let doomed = operations_to_prune(
        &ops,
        now_ms(),
        ctl.config.operation_retention.as_millis() as u64,
        ctl.config.operations_kept,
    );
    if doomed.is_empty() {
        return Ok(());
    }
    let tx = doomed.iter().fold(Tx::new(), |tx, id| tx.delete_operation(id));
    ctl.db.commit(tx).await?;
    tracing::info!(count = doomed.len(), "pruned finished operations");
    Ok(())
}

/// Commands one pass decided to send: per host, its address and the VMs with their records
/// (an orphan, unknown to the store, has none: only its uuid and the name its host gave).
#[derive(Default)]
struct Commands {
    ensure: BTreeMap<String, HostBatch<(Vm, VmSpec)>>,
    /// Remote VTEPs for the hosts whose networks' membership changed.
    peers: BTreeMap<String, (String, shoal_model::network::NetworkPeers)>,
    remove: BTreeMap<String, HostBatch<Removal>>,
}

/// A VM to remove from a host: one the store is deleting, or an orphan.
struct Removal {
    vm: Option<Vm>,
    uuid: Uuid,
    name: String,
}

/// A host's address and what to send it.
type HostBatch<T> = (String, Vec<T>);

async fn pass(ctl: &Controller, stop: &watch::Receiver<bool>) -> ApiResult<()> {
    let commands = {
        let _guard = ctl.db.lock().await;
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
    /// Hosts switched on and not heard from yet.
    booting: HashSet<String>,
    clusters: HashMap<String, Versioned<Cluster>>,
    vms: Vec<Versioned<Vm>>,
    templates: HashMap<String, TemplateRecord>,
    ops: Vec<Operation>,
    networks: HashMap<String, shoal_model::Network>,
    /// Migrations under way: their VMs are also on the destination, for the network and for
    /// orphans.
    migrations: Vec<Versioned<shoal_model::Migration>>,
    /// Hosts declared failed (`failover`).
    failed: HashSet<String>,
}

async fn read(ctl: &Controller) -> ApiResult<Snapshot> {
    Ok(Snapshot {
        booting: ctl
            .db
            .powers()
            .await?
            .into_iter()
            .filter(|p| p.state == shoal_model::power::PowerState::Booting)
            .map(|p| p.host)
            .collect(),
        hosts: ctl.db.hosts().await?.into_iter().map(|h| (h.name.clone(), h)).collect(),
        clusters: ctl
            .db
            .clusters_versioned()
            .await?
            .into_iter()
            .map(|c| (c.value.name.clone(), c))
            .collect(),
        vms: ctl.db.vms_versioned().await?,
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
        networks: crate::domain::networks::networks(ctl)
            .await?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect(),
        migrations: ctl.db.migrations().await?,
        failed: ctl.db.failures().await?.into_iter().map(|f| f.value.host).collect(),
    })
}

/// How `host` looks to the reconciler now.
fn look(ctl: &Controller, s: &Snapshot, host: &str) -> HostLook {
    if s.failed.contains(host) {
        HostLook::Failed
    } else if s.hosts.contains_key(host) && ctl.host_state(host).0 == HostState::Up {
        HostLook::Up
    } else if s.booting.contains(host) {
        HostLook::Booting
    } else {
        HostLook::Down
    }
}

async fn settle(ctl: &Controller) -> ApiResult<Commands> {
    let mut s = read(ctl).await?;
    let up = |h: &str| ctl.host_state(h).0 == HostState::Up;

    let step = |v: &Vm| vm_step(v.state, look(ctl, &s, &v.host), v.desired);
    let stranded: Vec<Versioned<Vm>> = s
        .vms
        .iter()
        .filter(|v| step(&v.value) == VmStep::Replace)
        .cloned()
        .collect();
    let forgotten: Vec<Vm> = s
        .vms
        .iter()
        .filter(|v| step(&v.value) == VmStep::Forget)
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

    crate::migrate::resume(ctl, &s.migrations);
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
    let mut known: HashSet<(Uuid, &str)> = s
        .migrations
        .iter()
        .map(|m| (m.value.uuid, m.value.to.as_str()))
        .collect();
    for v in &s.vms {
        let vm = &v.value;
        known.insert((vm.uuid, vm.host.as_str()));
        let Some(host) = s.hosts.get(&vm.host) else { continue };
        let step = vm_step(vm.state, look(ctl, &s, &vm.host), vm.desired);
        match command(step, || ctl.ensure_due(vm.uuid, vm.desired)) {
            Some(Command::Ensure) => {
                let Some(spec) = spec_for(&s, &topo, vm) else { continue };
                cmds.ensure
                    .entry(host.name.clone())
                    .or_insert_with(|| (host.address.clone(), Vec::new()))
                    .1
                    .push((vm.clone(), spec));
            }
            Some(Command::Remove) => cmds
                .remove
                .entry(host.name.clone())
                .or_insert_with(|| (host.address.clone(), Vec::new()))
                .1
                .push(Removal {
                    vm: Some(vm.clone()),
                    uuid: vm.uuid,
                    name: vm.name.clone(),
                }),
            // Re-placing and forgetting were carried out above, before the state was read again.
            None => {}
        }
    }
    // Orphans: VMs a host runs that the store does not place there (a rolled-back deployment
    // whose host was unreachable, a VM re-placed away from a host that came back).
    let reports: Vec<(&str, bool, Vec<Uuid>)> = live
        .iter()
        .filter(|(host, _)| s.hosts.contains_key(host.as_str()))
        .map(|(host, l)| (host.as_str(), ctl.heard(host), l.vms.iter().map(|r| r.uuid).collect()))
        .collect();
    for (host, uuid) in decide::orphans(&reports, &known, &s.failed) {
        // A removal just sent shows in heartbeats until the host's next one: not again yet.
        if !ctl.orphan_due(uuid, host) {
            continue;
        }
        let (Some(rec), Some(r)) = (
            s.hosts.get(host),
            live.get(host).and_then(|l| l.vms.iter().find(|r| r.uuid == uuid)),
        ) else {
            continue;
        };
        cmds.remove
            .entry(host.to_string())
            .or_insert_with(|| (rec.address.clone(), Vec::new()))
            .1
            .push(Removal {
                vm: None,
                uuid,
                name: r.name.clone(),
            });
    }
    Ok(cmds)
}

/// Which hosts take part in which network: those with the network's VMs, and the destinations
/// of its VMs' migrations (their copy joins the network before it runs there).
fn topology(s: &Snapshot) -> crate::domain::networks::Topology {
    let network_of = |c: &str| s.clusters.get(c).and_then(|c| c.value.network.as_deref());
    let arriving: Vec<Vm> = s
        .migrations
        .iter()
        .filter_map(|m| {
            let v = s.vms.iter().find(|v| v.value.uuid == m.value.uuid)?;
            Some(Vm {
                host: m.value.to.clone(),
                ..v.value.clone()
            })
        })
        .collect();
    crate::domain::networks::Topology::new(
        network_of,
        s.vms.iter().map(|v| &v.value).chain(arriving.iter()),
        &s.hosts,
    )
}

/// The spec `vm` gets on `host`: what a migration's destination prepares.
pub(crate) async fn spec_at(ctl: &Controller, vm: &Vm, host: &str) -> ApiResult<Option<VmSpec>> {
    let s = read(ctl).await?;
    let topo = topology(&s);
    let at = Vm {
        host: host.to_string(),
        ..vm.clone()
    };
    Ok(spec_for(&s, &topo, &at))
}

fn spec_for(s: &Snapshot, topo: &crate::domain::networks::Topology, vm: &Vm) -> Option<VmSpec> {
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
        ready: template.template.ready.clone(),
        power: vm.desired,
        force_stop: vm.force_stop,
        ip: vm.ip,
        prefix_len: cluster.subnet.prefix(),
        gateway: cluster.subnet.gateway(),
        mac: vm.mac,
        user_data: cluster.shape.user_data.clone(),
        user: cluster.shape.user.clone(),
        ssh_keys: cluster.shape.ssh_keys.clone(),
        network,
        disk_base: vm.disk_base.clone(),
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
        let (vms, specs): (Vec<Vm>, Vec<VmSpec>) = batch.into_iter().filter(|(_, s)| uuids.contains(&s.uuid)).unzip();
        let ctl = ctl.clone();
        spawn_until_stopped(stop, async move {
            match ctl.agent(&address).ensure(&EnsureVms { vms: specs }).await {
                Ok(r) => {
                    if let Err(e) = record_started(&ctl, &host, &vms, &r.vms).await {
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
        let uuids = ctl.claim_inflight(&host, batch.iter().map(|r| r.uuid));
        if uuids.is_empty() {
            continue;
        }
        let batch: Vec<Removal> = batch.into_iter().filter(|r| uuids.contains(&r.uuid)).collect();
        for r in batch.iter().filter(|r| r.vm.is_none()) {
            tracing::info!(vm = %r.name, %host, "removing orphan VM");
        }
        let vms: Vec<Vm> = batch.into_iter().filter_map(|r| r.vm).collect();
        let ctl = ctl.clone();
        spawn_until_stopped(stop, async move {
            let result = ctl.agent(&address).remove(&RemoveVms { uuids: uuids.clone() }).await;
            match result {
                Ok(r) => {
                    let failed: HashSet<Uuid> = r.vms.iter().map(|v| v.uuid).collect();
                    for f in &r.vms {
                        tracing::warn!(%host, vm = %f.uuid, "remove failed: {:?}", f.reason);
                    }
                    if let Err(e) = record_removed(&ctl, &host, &vms, &failed).await {
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

/// The records, as they are now, of those of `vms` still on `host`.
async fn batch_vms(ctl: &Controller, host: &str, vms: &[Vm]) -> ApiResult<Vec<Versioned<Vm>>> {
    let mut out = Vec::with_capacity(vms.len());
    for vm in vms {
        if let Some(v) = ctl.db.reread_vm(vm).await? {
            if v.value.host == host {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// Writes what a host answered to "ensure".
async fn record_started(ctl: &Controller, host: &str, sent: &[Vm], reports: &[VmStatus]) -> ApiResult<()> {
    let _guard = ctl.db.lock().await;
    let by_uuid: HashMap<Uuid, &VmStatus> = reports.iter().map(|r| (r.uuid, r)).collect();
    let vms = batch_vms(ctl, host, sent).await?;
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
/// Compared on every record read: when another writer got there first, nothing is written and
/// the next pass reads again.
async fn write_updates(ctl: &Controller, updates: &[(&Versioned<Vm>, Vm)]) -> ApiResult<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut tx = Tx::new();
    let mut freed = ClaimChanges::default();
    for (old, new) in updates {
        let mut new = new.clone();
        if new.state == VmState::Suspended && new.claimed {
            new.claimed = false;
            freed.give_back(&old.value.host, Claim::of(&new));
        }
        tx = tx.update_vm(old.mod_revision, &new);
    }
    let tx = freed.write(&ctl.db.claims().await?, tx);
    commit_or_retry(ctl, tx, "recording VM states").await
}

/// Commits a reconciler write. A compare that failed means the state moved on since it was
/// read: nothing was written, and the next pass decides again on fresh state.
async fn commit_or_retry(ctl: &Controller, tx: Tx, what: &str) -> ApiResult<()> {
    if !ctl.db.try_commit(tx).await? {
        tracing::debug!("{what}: the state changed meanwhile; deciding again next pass");
        ctl.wake.notify_one();
    }
    Ok(())
}

/// Deletes the records of VMs their host confirmed removed, freeing their addresses and claims.
async fn record_removed(ctl: &Controller, host: &str, sent: &[Vm], failed: &HashSet<Uuid>) -> ApiResult<()> {
    let _guard = ctl.db.lock().await;
    let vms: Vec<Vm> = batch_vms(ctl, host, sent)
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
    let mut freed = ClaimChanges::default();
    let mut tx = Tx::new();
    for vm in vms {
        if vm.claimed {
            freed.give_back(&vm.host, Claim::of(vm));
        }
        tx = tx.delete_vm(vm);
    }
    let tx = freed.write(&ctl.db.claims().await?, tx);
    commit_or_retry(ctl, tx, "releasing deleted VMs").await
}

async fn set_state(ctl: &Controller, v: &Versioned<Vm>, state: VmState, reason: Option<String>) -> ApiResult<()> {
    let mut vm = v.value.clone();
    vm.state = state;
    vm.reason = reason;
    commit_or_retry(ctl, Tx::new().update_vm(v.mod_revision, &vm), "setting a VM's state").await
}

/// Why a VM that never started fails when its host went down and no other host can take it:
/// its deployment then rolls back.
pub(crate) fn stranded_reason(host: &str, vm: &Vm, placement_error: &str) -> String {
    format!(
        "host {host} went down before the VM started, and no other host can take it ({} vCPU, {}): {placement_error}",
        vm.cpus,
        format_mib(vm.memory_mib)
    )
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
    let snap = HostSnapshot::read(ctl)
        .await?
        .with_vms(siblings.iter().map(|v| (v, None)));
    let mut req = gang_request(&cluster.value, 1);
    req.cpus = v.value.cpus;
    req.memory_mib = v.value.memory_mib;
    match snap.place(&req) {
        Ok(plan) => {
            let new_host = snap.name(plan[0]).to_string();
            tracing::warn!(vm = %v.value.name, from = %old, to = %new_host, "host down before the VM started; placing it elsewhere");
            let mut vm = v.value.clone();
            vm.host = new_host.clone();
            let mut changes = ClaimChanges::default();
            changes.take(&new_host, Claim::of(&vm));
            if snap.index(&old).is_some() {
                changes.give_back(&old, Claim::of(&vm));
            }
            let tx = changes.write(&snap.claims, Tx::new().update_vm(v.mod_revision, &vm));
            commit_or_retry(ctl, tx, "re-placing a VM").await?;
        }
        Err(e) => {
            let reason = stranded_reason(&old, &v.value, &e.to_string());
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
        let tx = Tx::new().delete_cluster(&c.value.name, c.mod_revision);
        let tx = crate::domain::networks::release(ctl, &c.value, tx).await?;
        if ctl.db.try_commit(tx).await? {
            tracing::info!(cluster = %c.value.name, "cluster deleted");
        }
    }
    Ok(())
}

/// Moves operations on; returns whether one finished (the cluster states then change too).
async fn advance_operations(ctl: &Controller, s: &Snapshot) -> ApiResult<bool> {
    let mut finished = false;
    let by_name: HashMap<&str, &Vm> = s.vms.iter().map(|v| (v.value.name.as_str(), &v.value)).collect();
    for op in &s.ops {
        let driven = ctl.driving.lock().expect("driving lock").contains(&op.id);
        if let Some(failed) = decide::abandoned(op, driven, now_ms()) {
            ctl.db.commit(Tx::new().put_operation(&failed)).await?;
            finished = true;
            continue;
        }
        let vms: Vec<&Vm> = op.vms.iter().filter_map(|n| by_name.get(n.as_str()).copied()).collect();
        let cluster = s.clusters.get(&op.target).map(|c| &c.value);
        let step = advance(op, &vms, cluster, now_ms(), ctl.config.operation_timeout);
        if step.roll_back {
            roll_back(ctl, s, op).await?;
        }
        if step.op != *op {
            finished |= step.op.state != op.state;
            ctl.db.commit(Tx::new().put_operation(&step.op)).await?;
        }
    }
    Ok(finished)
}

/// Undoes a failed create or scale-up: its VMs are removed and the cluster returns to its
/// previous size (a failed create deletes the cluster).
async fn roll_back(ctl: &Controller, s: &Snapshot, op: &Operation) -> ApiResult<()> {
    let Some(c) = s.clusters.get(&op.target) else {
        return Ok(());
    };
    let mut cluster = c.value.clone();
    if op.kind == OperationKind::ClusterCreate {
        cluster.size = 0;
        cluster.state = ClusterState::Deleting;
    } else {
        cluster.size = op.previous_size;
    }
    let mut tx = Tx::new().update_cluster(c.mod_revision, &cluster);
    let names: HashSet<&str> = op.vms.iter().map(String::as_str).collect();
    for v in &s.vms {
        let doomed = v.value.cluster == op.target
            && (op.kind == OperationKind::ClusterCreate || names.contains(v.value.name.as_str()));
        if doomed && v.value.state != VmState::Deleting {
            let mut vm = v.value.clone();
            vm.state = VmState::Deleting;
            tx = tx.update_vm(v.mod_revision, &vm);
        }
    }
    commit_or_retry(ctl, tx, "rolling back").await
}

/// What a cluster's VMs amount to, for [`cluster_state`].
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct VmCounts {
    /// VMs (not being deleted) by state; VMs whose host is down count as `unknown`.
    pub by_state: HashMap<VmState, u32>,
    /// An operation runs on the cluster or one of its VMs.
    pub busy: bool,
}

impl VmCounts {
    fn get(&self, st: VmState) -> u32 {
        self.by_state.get(&st).copied().unwrap_or(0)
    }
    fn total(&self) -> u32 {
        self.by_state.values().sum()
    }
}

/// A cluster's state from its VMs: degraded when one failed or its host is down (whatever else
/// goes on), converging while an operation or a VM is under way, else what all its VMs are.
pub(crate) fn cluster_state(size: u32, n: &VmCounts) -> ClusterState {
    let total = n.total();
    let all = |st: VmState| total == size && n.get(st) == total;
    if n.get(VmState::Failed) > 0 || n.get(VmState::Unknown) > 0 {
        ClusterState::Degraded
    } else if n.busy || n.get(VmState::Pending) > 0 {
        ClusterState::Converging
    } else if all(VmState::Running) {
        ClusterState::Ready
    } else if all(VmState::Stopped) {
        ClusterState::Stopped
    } else if all(VmState::Suspended) {
        ClusterState::Suspended
    } else if total == size
        && n.by_state
            .keys()
            .all(|st| matches!(st, VmState::Running | VmState::Stopped | VmState::Suspended))
    {
        // Some VMs stopped or suspended on their own request: not all is running.
        ClusterState::Degraded
    } else {
        ClusterState::Converging
    }
}

async fn update_cluster_states(ctl: &Controller, s: &Snapshot) -> ApiResult<()> {
    let busy: HashSet<&str> = s.ops.iter().map(|o| o.target.as_str()).collect();
    let mut counts: HashMap<&str, VmCounts> = HashMap::new();
    for v in &s.vms {
        let n = counts.entry(v.value.cluster.as_str()).or_default();
        let state = match crate::domain::vms::unknown_because(ctl, &v.value) {
            Some(_) => VmState::Unknown,
            None => v.value.state,
        };
        *n.by_state.entry(state).or_default() += 1;
        // A VM operation keeps its cluster converging too.
        n.busy |= busy.contains(v.value.name.as_str());
    }
    let mut tx = Tx::new();
    for c in s.clusters.values() {
        if c.value.state == ClusterState::Deleting {
            continue;
        }
        let mut n = counts.remove(c.value.name.as_str()).unwrap_or_default();
        n.busy |= busy.contains(c.value.name.as_str());
        let state = cluster_state(c.value.size, &n);
        if state != c.value.state {
            let mut cluster = c.value.clone();
            cluster.state = state;
            tx = tx.update_cluster(c.mod_revision, &cluster);
        }
    }
    commit_or_retry(ctl, tx, "updating cluster states").await
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_model::DeployStep;

    fn op(id: u128, state: OperationState, finished: Option<u64>) -> Operation {
        let mut o = crate::domain::clusters::new_operation(
            OperationKind::ClusterCreate,
            "c",
            &[DeployStep::Execute.as_str()],
            0,
        );
        o.id = Uuid::from_u128(id);
        o.state = state;
        o.created_unix_ms = 0;
        o.finished_unix_ms = finished;
        o
    }

    #[test]
    fn pruning_keeps_running_and_the_newest_finished_within_retention() {
        let ops = vec![
            op(1, OperationState::Succeeded, Some(100)),
            op(2, OperationState::Failed, Some(900)),
            op(3, OperationState::Running, None),
            op(4, OperationState::Succeeded, Some(950)),
            op(5, OperationState::Succeeded, Some(990)),
        ];
        // Retention 500 ms at t=1000: op 1 is too old. Keep 2: ops 5 and 4 stay, op 2 goes.
        let mut gone = operations_to_prune(&ops, 1000, 500, 2);
        gone.sort();
        assert_eq!(gone, vec![Uuid::from_u128(1), Uuid::from_u128(2)]);
        // A generous policy prunes nothing, and a running operation is never pruned.
        assert!(operations_to_prune(&ops, 1000, 10_000, 10).is_empty());
        assert!(!operations_to_prune(&ops, 1_000_000, 1, 0).contains(&Uuid::from_u128(3)));
    }

    fn counts(states: &[(VmState, u32)], busy: bool) -> VmCounts {
        VmCounts {
            by_state: states.iter().copied().collect(),
            busy,
        }
    }

    /// A row: cluster size, its VMs by state, whether an operation runs, the state wanted.
    type Row = (u32, &'static [(VmState, u32)], bool, ClusterState);

    /// Every VM state mix that matters × busy or not → the cluster's state.
    #[test]
    fn cluster_state_table() {
        use ClusterState::*;
        use VmState as V;
        let table: &[Row] = &[
            (3, &[(V::Running, 3)], false, Ready),
            (3, &[(V::Running, 3)], true, Converging),
            (3, &[(V::Running, 2)], false, Converging),
            (3, &[(V::Running, 2), (V::Pending, 1)], false, Converging),
            (3, &[(V::Running, 2), (V::Creating, 1)], false, Converging),
            (3, &[(V::Running, 2), (V::Failed, 1)], false, Degraded),
            (3, &[(V::Running, 2), (V::Failed, 1)], true, Degraded),
            (3, &[(V::Running, 2), (V::Unknown, 1)], false, Degraded),
            (3, &[(V::Pending, 2), (V::Unknown, 1)], true, Degraded),
            (3, &[(V::Stopped, 3)], false, Stopped),
            (3, &[(V::Suspended, 3)], false, Suspended),
            (3, &[(V::Running, 1), (V::Stopped, 2)], false, Degraded),
            (3, &[(V::Running, 1), (V::Suspended, 2)], false, Degraded),
            (2, &[(V::Running, 2), (V::Deleting, 1)], false, Converging),
            (1, &[], false, Converging),
        ];
        for (size, states, busy, want) in table {
            assert_eq!(
                cluster_state(*size, &counts(states, *busy)),
                *want,
                "size {size}, {states:?}, busy {busy}"
            );
        }
    }
}
