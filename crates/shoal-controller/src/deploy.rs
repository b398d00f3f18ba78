//! Deployment in four steps — prepare images, configure VMs, choose hosts, execute — and the
//! other cluster-level changes (scale, delete).
//!
//! The first three steps only compute, so they run inside the API request and end in ONE store
//! transaction that records the cluster, its VMs with their identities and hosts, the address
//! allocations and the host claims together: a cluster is either wholly planned or not at all,
//! and a controller restart finds nothing half-written. The fourth step, telling every host what
//! to run, is the reconciler's ([`crate::reconcile`]), which resumes it after any restart.

use std::collections::{BTreeMap, HashMap, HashSet};

use shoal_model::api::CreateCluster;
use shoal_model::{
    format_mib, now_ms, validate_name, Cluster, ClusterState, MacAddr, Operation, OperationKind, OperationState,
    OperationStep, Profile, StepState, Vm, VmShape, VmState, DEPLOY_STEPS,
};
use shoal_policy::{GangRequest, Placer};
use shoal_store::{Compare, Op, Txn};
use uuid::Uuid;

use crate::db::{self, put, Claim, HostRecord, TemplateRecord, Versioned};
use crate::error::{ApiError, ApiResult};
use crate::{ipam, Controller};

/// Largest cluster one request may ask for.
pub const MAX_CLUSTER_SIZE: u32 = 65_000;

/// Resolves a profile through its parents; the nearest definition of each field wins.
pub fn resolve_profile(profiles: &HashMap<String, Profile>, name: &str) -> ApiResult<VmShape> {
    let mut chain = Vec::new();
    let mut cur = Some(name.to_string());
    while let Some(n) = cur {
        if chain.iter().any(|p: &&Profile| p.name == n) {
            return Err(ApiError::Invalid(format!(
                "profile {name:?} inherits from itself through {n:?}"
            )));
        }
        let p = profiles
            .get(&n)
            .ok_or_else(|| ApiError::not_found("profile", n.clone()))?;
        chain.push(p);
        cur = p.parent.clone();
    }
    let pick = |f: &dyn Fn(&Profile) -> bool| chain.iter().find(|p| f(p)).copied();
    let missing = |what: &str| {
        ApiError::Invalid(format!(
            "profile {name:?} does not set {what}, nor does any profile it inherits from"
        ))
    };
    Ok(VmShape {
        template: pick(&|p| p.template.is_some())
            .and_then(|p| p.template.clone())
            .ok_or_else(|| missing("a template"))?,
        cpus: pick(&|p| p.cpus.is_some())
            .and_then(|p| p.cpus)
            .ok_or_else(|| missing("cpus"))?,
        memory_mib: pick(&|p| p.memory_mib.is_some())
            .and_then(|p| p.memory_mib)
            .ok_or_else(|| missing("memory"))?,
        disk_mib: pick(&|p| p.disk_mib.is_some()).and_then(|p| p.disk_mib),
        network: pick(&|p| p.network.is_some()).and_then(|p| p.network.clone()),
        user_data: pick(&|p| p.user_data.is_some()).and_then(|p| p.user_data.clone()),
    })
}

pub async fn profile_map(ctl: &Controller) -> ApiResult<HashMap<String, Profile>> {
    Ok(ctl
        .db
        .profiles()
        .await?
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect())
}

pub(crate) fn new_operation(kind: OperationKind, target: &str, steps: &[&str], previous_size: u32) -> Operation {
    Operation {
        id: Uuid::new_v4(),
        kind,
        target: target.to_string(),
        state: OperationState::Running,
        steps: steps
            .iter()
            .map(|s| OperationStep {
                name: s.to_string(),
                state: StepState::Pending,
                done: 0,
                total: 0,
                message: String::new(),
            })
            .collect(),
        vms: Vec::new(),
        previous_size,
        error: None,
        created_unix_ms: now_ms(),
        finished_unix_ms: None,
    }
}

fn step_done(op: &mut Operation, name: &str, n: u64, message: String) {
    if let Some(s) = op.step_mut(name) {
        s.state = StepState::Done;
        s.done = n;
        s.total = n;
        s.message = message;
    }
}

/// The hosts as placement sees them, with the claim revisions to compare against at commit.
pub(crate) struct HostSnapshot {
    /// Hosts, and the VMs of the cluster being placed (for its affinity rules).
    pub snapshot: shoal_policy::Snapshot,
    /// Per host (same order), what its claim holds: `[vCPU, memory MiB, disk MiB]`.
    pub usage: Vec<[u64; 3]>,
    pub claims: Vec<(Claim, u64)>,
}

impl HostSnapshot {
    pub fn name(&self, h: usize) -> &str {
        &self.snapshot.hosts[h].name
    }

    /// Places a gang against the claims read, all VMs or an error naming the binding constraint.
    pub fn place(&self, req: &GangRequest) -> Result<Vec<usize>, shoal_policy::PlacementError> {
        Placer::with_usage(&self.snapshot, &self.usage).place(req)
    }
}

/// The placement request for `count` VMs of a cluster.
pub(crate) fn gang_request(cluster: &Cluster, count: u32) -> GangRequest {
    let mut req = GangRequest::new(&cluster.name, count, cluster.shape.cpus, cluster.shape.memory_mib);
    req.placement = cluster.placement;
    req.template = Some(cluster.shape.template.clone());
    req.rules.anti_affinity = cluster.anti_affinity.domain().map(str::to_string);
    req
}

/// Plans VMs `indices` of `cluster` through steps 1–3 and returns the transaction that records
/// them, with the operation's steps filled in.
async fn plan_new_vms(
    ctl: &Controller,
    cluster: &Cluster,
    indices: &[u32],
    existing: &[Vm],
    op: &mut Operation,
) -> ApiResult<(Vec<Vm>, Txn)> {
    let n = indices.len();
    // Step 1: prepare images. The template must be present; each VM disk is a copy-on-write
    // clone of it, which costs nothing until the host materialises it.
    let template: TemplateRecord = ctl
        .db
        .get(&db::template_key(&cluster.shape.template))
        .await?
        .map(|v| v.value)
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "profile {:?} refers to template {:?}, which does not exist",
                cluster.profile, cluster.shape.template
            ))
        })?;
    step_done(
        op,
        "prepare_images",
        n as u64,
        format!(
            "template {} ({} bytes, {}): {n} copy-on-write disk clones",
            template.template.name,
            template.template.size_bytes,
            &template.template.hash[..template.template.hash.len().min(19)]
        ),
    );

    // Step 2: configure VMs: fresh identity for each.
    let taken_macs: HashSet<MacAddr> = ctl
        .db
        .keys("/ipam/macs/")
        .await?
        .iter()
        .filter_map(|k| k.rsplit('/').next()?.parse().ok())
        .collect();
    let macs = ipam::allocate_macs(n, &taken_macs);
    let taken_ips: HashSet<std::net::Ipv4Addr> = ctl
        .db
        .keys("/ipam/ips/")
        .await?
        .iter()
        .filter_map(|k| k.rsplit('/').next()?.parse().ok())
        .filter(|ip| cluster.subnet.contains(*ip))
        .collect();
    let ips = ipam::allocate_ips(&cluster.subnet, indices, &taken_ips).ok_or_else(|| {
        ApiError::Capacity(format!(
            "network subnet {} of cluster {:?} has no room for {n} more VMs ({} addresses in use)",
            cluster.subnet,
            cluster.name,
            taken_ips.len()
        ))
    })?;
    let now = now_ms();
    let mut vms: Vec<Vm> = indices
        .iter()
        .zip(macs)
        .zip(ips)
        .map(|((&index, mac), ip)| Vm {
            name: format!("{}-{index}", cluster.name),
            uuid: Uuid::new_v4(),
            cluster: cluster.name.clone(),
            index,
            host: String::new(),
            state: VmState::Pending,
            ip,
            mac,
            cpus: cluster.shape.cpus,
            memory_mib: cluster.shape.memory_mib,
            disk_mib: cluster.shape.disk_mib,
            template: cluster.shape.template.clone(),
            desired: shoal_model::Power::Running,
            force_stop: false,
            reason: None,
            claimed: true,
            observed_seq: 0,
            created_unix_ms: now,
        })
        .collect();
    step_done(
        op,
        "configure_vms",
        n as u64,
        match (vms.first(), vms.last()) {
            (Some(a), Some(b)) => format!(
                "{n} VMs {}..{} with addresses {}..{} on {}",
                a.name, b.name, a.ip, b.ip, cluster.subnet
            ),
            _ => "no VMs".into(),
        },
    );

    // Step 3: choose hosts, all VMs or none.
    let mut snap = host_snapshot(ctl, existing).await?;
    crate::plan::add_locality(ctl, &mut snap.snapshot, &cluster.shape.template).await?;
    let req = gang_request(cluster, n as u32);
    let plan = snap.place(&req).map_err(|e| {
        ApiError::Capacity(format!(
            "cannot place {n} VMs of {} vCPU and {} for cluster {:?}: {e}",
            req.cpus,
            format_mib(req.memory_mib),
            cluster.name
        ))
    })?;
    let mut new_claims: BTreeMap<usize, Claim> = BTreeMap::new();
    for (vm, &h) in vms.iter_mut().zip(&plan) {
        vm.host = snap.name(h).to_string();
        let c = new_claims.entry(h).or_insert(snap.claims[h].0);
        c.cpus += vm.cpus;
        c.memory_mib += vm.memory_mib;
        c.vms += 1;
    }
    step_done(
        op,
        "choose_hosts",
        n as u64,
        format!(
            "{n} VMs on {} hosts ({} placement)",
            new_claims.len(),
            match cluster.placement {
                shoal_model::Placement::Spread => "spread",
                shoal_model::Placement::Pack => "pack",
            }
        ),
    );
    if let Some(s) = op.step_mut("execute") {
        s.state = StepState::Running;
        s.total = n as u64;
        s.message = format!("starting {n} VMs on {} hosts", new_claims.len());
    }
    op.vms = vms.iter().map(|v| v.name.clone()).collect();

    let mut txn = Txn::new();
    for (h, claim) in new_claims {
        let key = db::claim_key(snap.name(h));
        txn = txn
            .when(Compare::ModRevision(key.clone(), snap.claims[h].1))
            .then(put(key, &claim));
    }
    for vm in &vms {
        let (vk, ik, mk) = (
            db::vm_key(&vm.cluster, vm.index),
            db::ip_key(&vm.ip),
            db::mac_key(&vm.mac),
        );
        txn = txn
            .when(Compare::Version(vk.clone(), 0))
            .when(Compare::Version(ik.clone(), 0))
            .when(Compare::Version(mk.clone(), 0))
            .then(put(vk, vm))
            .then(Op::Put(ik, vm.name.clone().into_bytes()))
            .then(Op::Put(mk, vm.name.clone().into_bytes()));
    }
    Ok((vms, txn))
}

/// Reads hosts and their claims, keyed by host name, with the claims' revisions.
pub(crate) async fn host_snapshot(ctl: &Controller, cluster_vms: &[Vm]) -> ApiResult<HostSnapshot> {
    let kvs = ctl.db.store.range("/claims/").await?.kvs;
    let mut claims: HashMap<String, (Claim, u64)> = HashMap::new();
    for kv in kvs {
        let host = kv.key.trim_start_matches("/claims/").to_string();
        let c: Claim =
            serde_json::from_slice(&kv.value).map_err(|e| ApiError::Internal(format!("claim {}: {e}", kv.key)))?;
        claims.insert(host, (c, kv.mod_revision));
    }
    let hosts: Vec<HostRecord> = ctl.db.values("/hosts/").await?;
    let marks = crate::plan::host_marks(ctl).await?;
    let mut snapshot = shoal_policy::Snapshot::default();
    let mut usage = Vec::with_capacity(hosts.len());
    let mut revs = Vec::with_capacity(hosts.len());
    for h in hosts {
        let (claim, rev) = claims.get(&h.name).copied().unwrap_or_default();
        let host = crate::plan::policy_host(ctl, &h, &marks);
        snapshot.hosts.push(host);
        usage.push([claim.cpus as u64, claim.memory_mib, 0]);
        revs.push((claim, rev));
    }
    snapshot.vms = cluster_vms
        .iter()
        // The cluster's own rule comes with the request, not from its VMs.
        .map(|v| crate::plan::policy_vm(v, None))
        .filter(|v| snapshot.hosts.iter().any(|h| h.name == v.host))
        .collect();
    Ok(HostSnapshot {
        snapshot,
        usage,
        claims: revs,
    })
}

pub(crate) fn busy(ops: &[Operation], cluster: &str) -> Option<Operation> {
    ops.iter()
        .find(|o| o.target == cluster && o.state == OperationState::Running)
        .cloned()
}

pub(crate) fn busy_error(cluster: &str, op: &Operation) -> ApiError {
    ApiError::Conflict(format!(
        "cluster {cluster:?} is busy with operation {} ({:?}); wait for it (shoal operation show {})",
        op.id, op.kind, op.id
    ))
}

/// `cluster create`: steps 1–3 now, step 4 by the reconciler.
pub async fn create_cluster(ctl: &Controller, req: CreateCluster) -> ApiResult<Operation> {
    validate_name("cluster", &req.name)?;
    if req.size == 0 || req.size > MAX_CLUSTER_SIZE {
        return Err(ApiError::Invalid(format!(
            "invalid cluster size {}: must be between 1 and {MAX_CLUSTER_SIZE}",
            req.size
        )));
    }
    let _guard = ctl.write_lock.lock().await;
    let key = db::cluster_key(&req.name);
    if ctl.db.store.get(&key).await?.is_some() {
        return Err(ApiError::exists("cluster", &req.name));
    }
    let shape = resolve_profile(&profile_map(ctl).await?, &req.profile)?;
    let wanted = req.network.as_deref().or(shape.network.as_deref());
    let (net, net_txn) = crate::network::network_for_cluster(ctl, &req.name, wanted, req.size, req.nat).await?;
    let subnet = net.subnet;
    let cluster = Cluster {
        name: req.name.clone(),
        profile: req.profile.clone(),
        shape,
        size: req.size,
        placement: req.placement,
        anti_affinity: req.anti_affinity,
        subnet,
        network: Some(net.name.clone()),
        state: ClusterState::Converging,
        created_unix_ms: now_ms(),
    };
    let mut op = new_operation(OperationKind::ClusterCreate, &req.name, &DEPLOY_STEPS, 0);
    let indices: Vec<u32> = (0..req.size).collect();
    let (_vms, mut txn) = plan_new_vms(ctl, &cluster, &indices, &[], &mut op).await?;
    if let Some(n) = net_txn {
        txn.compare.extend(n.compare);
        txn.success.extend(n.success);
    }
    let txn = txn
        .when(Compare::Version(key.clone(), 0))
        .then(put(key, &cluster))
        .then(put(db::operation_key(&op.id), &op));
    commit(ctl, txn, &req.name).await?;
    ctl.wake.notify_one();
    Ok(op)
}

pub(crate) async fn commit(ctl: &Controller, txn: Txn, cluster: &str) -> ApiResult<()> {
    if !ctl.db.store.txn(txn).await?.succeeded {
        // Only another writer (another controller, or a race this process's lock did not
        // cover) can get here; nothing was written.
        return Err(ApiError::Conflict(format!(
            "cluster {cluster:?} changed while this request was planned; nothing was changed, try again"
        )));
    }
    Ok(())
}

/// `cluster scale`: grows through steps 1–3 like a create, or shrinks by removing the VMs with
/// the highest indices.
pub async fn scale_cluster(ctl: &Controller, name: &str, size: u32) -> ApiResult<Operation> {
    if size > MAX_CLUSTER_SIZE {
        return Err(ApiError::Invalid(format!(
            "invalid cluster size {size}: must be at most {MAX_CLUSTER_SIZE}"
        )));
    }
    let _guard = ctl.write_lock.lock().await;
    let ck = db::cluster_key(name);
    let Versioned {
        value: mut cluster,
        mod_revision: crev,
    } = ctl
        .db
        .get::<Cluster>(&ck)
        .await?
        .ok_or_else(|| ApiError::not_found("cluster", name))?;
    if cluster.state == ClusterState::Deleting {
        return Err(ApiError::Conflict(format!("cluster {name:?} is being deleted")));
    }
    if let Some(op) = busy(&ctl.db.operations().await?, name) {
        return Err(busy_error(name, &op));
    }
    let vms = ctl.db.cluster_vms(name).await?;
    let live: Vec<&Versioned<Vm>> = vms.iter().filter(|v| v.value.state != VmState::Deleting).collect();
    let current = live.len() as u32;
    let previous = cluster.size;
    cluster.size = size;
    cluster.state = ClusterState::Converging;
    let mut txn = Txn::new().when(Compare::ModRevision(ck.clone(), crev));
    let op = if size > current {
        let used: HashSet<u32> = vms.iter().map(|v| v.value.index).collect();
        let indices: Vec<u32> = (0..)
            .filter(|i| !used.contains(i))
            .take((size - current) as usize)
            .collect();
        let existing: Vec<Vm> = live.iter().map(|v| v.value.clone()).collect();
        let mut op = new_operation(OperationKind::ClusterScale, name, &DEPLOY_STEPS, previous);
        let (_new, plan) = plan_new_vms(ctl, &cluster, &indices, &existing, &mut op).await?;
        txn.compare.extend(plan.compare);
        txn.success.extend(plan.success);
        op
    } else {
        let mut op = new_operation(OperationKind::ClusterScale, name, &["execute"], previous);
        let mut doomed: Vec<&Versioned<Vm>> = live.clone();
        doomed.sort_by_key(|v| std::cmp::Reverse(v.value.index));
        doomed.truncate((current - size) as usize);
        for v in &doomed {
            let mut vm = v.value.clone();
            vm.state = VmState::Deleting;
            let k = db::vm_key(&vm.cluster, vm.index);
            txn = txn
                .when(Compare::ModRevision(k.clone(), v.mod_revision))
                .then(put(k, &vm));
            op.vms.push(vm.name);
        }
        if let Some(s) = op.step_mut("execute") {
            s.state = StepState::Running;
            s.total = doomed.len() as u64;
            s.message = format!("removing {} VMs", doomed.len());
        }
        op
    };
    let txn = txn.then(put(ck, &cluster)).then(put(db::operation_key(&op.id), &op));
    commit(ctl, txn, name).await?;
    ctl.wake.notify_one();
    Ok(op)
}

/// `cluster delete`: every VM is removed from its host, then the cluster and its subnet go.
/// A deployment still under way is superseded (its operation fails, naming this one).
pub async fn delete_cluster(ctl: &Controller, name: &str) -> ApiResult<Operation> {
    let _guard = ctl.write_lock.lock().await;
    let ck = db::cluster_key(name);
    let Versioned {
        value: mut cluster,
        mod_revision: crev,
    } = ctl
        .db
        .get::<Cluster>(&ck)
        .await?
        .ok_or_else(|| ApiError::not_found("cluster", name))?;
    let ops = ctl.db.operations().await?;
    if let Some(op) = ops
        .iter()
        .find(|o| o.target == name && o.state == OperationState::Running && o.kind == OperationKind::ClusterDelete)
    {
        return Ok(op.clone());
    }
    let vms = ctl.db.cluster_vms(name).await?;
    let mut op = new_operation(OperationKind::ClusterDelete, name, &["execute"], cluster.size);
    cluster.size = 0;
    cluster.state = ClusterState::Deleting;
    let mut txn = Txn::new()
        .when(Compare::ModRevision(ck.clone(), crev))
        .then(put(ck, &cluster));
    for mut superseded in ops
        .into_iter()
        .filter(|o| o.target == name && o.state == OperationState::Running)
    {
        superseded.state = OperationState::Failed;
        superseded.error = Some(format!("superseded by delete operation {}", op.id));
        superseded.finished_unix_ms = Some(now_ms());
        txn = txn.then(put(db::operation_key(&superseded.id), &superseded));
    }
    for v in &vms {
        op.vms.push(v.value.name.clone());
        if v.value.state != VmState::Deleting {
            let mut vm = v.value.clone();
            vm.state = VmState::Deleting;
            let k = db::vm_key(&vm.cluster, vm.index);
            txn = txn
                .when(Compare::ModRevision(k.clone(), v.mod_revision))
                .then(put(k, &vm));
        }
    }
    if let Some(s) = op.step_mut("execute") {
        s.state = StepState::Running;
        s.total = vms.len() as u64;
        s.message = format!("removing {} VMs", vms.len());
    }
    let txn = txn.then(put(db::operation_key(&op.id), &op));
    commit(ctl, txn, name).await?;
    ctl.wake.notify_one();
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str, parent: Option<&str>) -> Profile {
        Profile {
            name: name.into(),
            parent: parent.map(Into::into),
            template: None,
            cpus: None,
            memory_mib: None,
            disk_mib: None,
            network: None,
            user_data: None,
            created_unix_ms: 0,
        }
    }

    #[test]
    fn child_overrides_parent_and_inherits_the_rest() {
        let mut base = profile("base", None);
        base.template = Some("debian".into());
        base.cpus = Some(1);
        base.memory_mib = Some(512);
        base.user_data = Some("#cloud-config\n".into());
        let mut big = profile("big", Some("base"));
        big.cpus = Some(4);
        let map: HashMap<_, _> = [base, big].into_iter().map(|p| (p.name.clone(), p)).collect();
        let s = resolve_profile(&map, "big").unwrap();
        assert_eq!((s.template.as_str(), s.cpus, s.memory_mib), ("debian", 4, 512));
        assert_eq!(s.user_data.as_deref(), Some("#cloud-config\n"));
    }

    #[test]
    fn missing_fields_and_cycles_are_errors() {
        let a = profile("a", Some("b"));
        let b = profile("b", Some("a"));
        let map: HashMap<_, _> = [a, b].into_iter().map(|p| (p.name.clone(), p)).collect();
        assert!(resolve_profile(&map, "a")
            .unwrap_err()
            .to_string()
            .contains("inherits from itself"));
        let lone: HashMap<_, _> = [("c".to_string(), profile("c", None))].into();
        assert!(resolve_profile(&lone, "c")
            .unwrap_err()
            .to_string()
            .contains("template"));
        assert!(matches!(resolve_profile(&lone, "zz"), Err(ApiError::NotFound { .. })));
    }
}
