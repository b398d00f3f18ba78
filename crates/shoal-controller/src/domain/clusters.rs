//! Deployment in four steps — prepare images, configure VMs, choose hosts, execute — and the
//! other cluster-level changes (scale, delete).
//!
//! The first three steps only compute, so they run inside the API request and end in ONE store
//! transaction that records the cluster, its VMs with their identities and hosts, the address
//! allocations and the host claims together: a cluster is either wholly planned or not at all,
//! and a controller restart finds nothing half-written. The fourth step, telling every host what
//! to run, is the reconciler's ([`crate::reconcile`]), which resumes it after any restart.

use std::collections::{BTreeSet, HashMap, HashSet};

use shoal_model::api::{ClusterView, CreateCluster};
use shoal_model::{
    format_mib, now_ms, plural, validate_name, Cluster, ClusterState, DeployStep, Operation, OperationKind,
    OperationState, OperationStep, StepState, Vm, VmState, DEPLOY_STEPS,
};
use uuid::Uuid;

use crate::capacity::{gang_request, Claim, ClaimChanges, HostSnapshot};
use crate::datastore::{TemplateRecord, Tx, Versioned};
use crate::domain::profiles::{profile_map, resolve_profile};
use crate::error::{ApiError, ApiResult};
use crate::{ipam, Controller};

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
        migration: None,
    }
}

fn step_done(op: &mut Operation, step: DeployStep, n: u64, message: String) {
    if let Some(s) = op.deploy_step_mut(step) {
        s.state = StepState::Done;
        s.done = n;
        s.total = n;
        s.message = message;
    }
}

/// What steps 1–3 decided for new VMs: the transaction that records them, and the
/// switched-off hosts that must be switched on for them.
pub(crate) struct NewVms {
    pub tx: Tx,
    pub power_on: Vec<String>,
}

/// Plans VMs `indices` of `cluster` through steps 1–3 and returns what records them, with the
/// operation's steps filled in.
async fn plan_new_vms(
    ctl: &Controller,
    cluster: &Cluster,
    indices: &[u32],
    existing: &[Vm],
    op: &mut Operation,
) -> ApiResult<NewVms> {
    let n = indices.len();
    // Step 1: prepare images. The template must be present; each VM disk is a copy-on-write
    // clone of it, which costs nothing until the host materialises it.
    let template: TemplateRecord = ctl
        .db
        .template(&cluster.shape.template)
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
        DeployStep::PrepareImages,
        n as u64,
        format!(
            "template {} ({} bytes, {}): {}",
            template.template.name,
            template.template.size_bytes,
            &template.template.hash[..template.template.hash.len().min(19)],
            plural(n, "copy-on-write disk clone")
        ),
    );

    // Step 2: configure VMs: fresh identity for each.
    let macs = ipam::allocate_macs(n, &ctl.db.taken_macs().await?);
    let taken_ips: HashSet<std::net::Ipv4Addr> = ctl
        .db
        .taken_ips()
        .await?
        .into_iter()
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
            disk_base: None,
        })
        .collect();
    step_done(
        op,
        DeployStep::ConfigureVms,
        n as u64,
        match (vms.first(), vms.last()) {
            (Some(a), Some(b)) => format!(
                "{} {}..{} with addresses {}..{} on {}",
                plural(n, "VM"),
                a.name,
                b.name,
                a.ip,
                b.ip,
                cluster.subnet
            ),
            _ => "no VMs".into(),
        },
    );

    // Step 3: choose hosts, all VMs or none. With the consolidator on, hosts it switched off
    // count too, when they can be switched on again.
    let mut snap = HostSnapshot::read(ctl)
        .await?
        .with_vms(existing.iter().map(|v| (v, None)));
    crate::domain::plans::add_locality(ctl, &mut snap.snapshot, &cluster.shape.template).await?;
    let mut req = gang_request(cluster, n as u32);
    req.allow_power_on = ctl.config.consolidate;
    let plan = snap.place(&req).map_err(|e| {
        ApiError::Capacity(format!(
            "cannot place {} of {} vCPU and {} for cluster {:?}: {e}",
            plural(n, "VM"),
            req.cpus,
            format_mib(req.memory_mib),
            cluster.name
        ))
    })?;
    let mut claims = ClaimChanges::default();
    let mut hosts: BTreeSet<usize> = BTreeSet::new();
    for (vm, &h) in vms.iter_mut().zip(&plan) {
        vm.host = snap.name(h).to_string();
        claims.take(&vm.host, Claim::of(vm));
        hosts.insert(h);
    }
    let power_on: Vec<String> = hosts
        .iter()
        .filter(|&&h| snap.is_off(h))
        .map(|&h| snap.name(h).to_string())
        .collect();
    step_done(
        op,
        DeployStep::ChooseHosts,
        n as u64,
        format!(
            "{} on {} ({} placement){}",
            plural(n, "VM"),
            plural(hosts.len(), "host"),
            match cluster.placement {
                shoal_model::Placement::Spread => "spread",
                shoal_model::Placement::Pack => "pack",
            },
            if power_on.is_empty() {
                String::new()
            } else {
                format!("; switching on {}", power_on.join(", "))
            }
        ),
    );
    if let Some(s) = op.deploy_step_mut(DeployStep::Execute) {
        s.state = StepState::Running;
        s.total = n as u64;
        s.message = format!("starting {} on {}", plural(n, "VM"), plural(hosts.len(), "host"));
    }
    op.vms = vms.iter().map(|v| v.name.clone()).collect();

    let mut tx = claims.write(&snap.claims, Tx::new());
    for vm in &vms {
        tx = tx.create_vm(vm);
    }
    Ok(NewVms { tx, power_on })
}

/// Switches on, in the background, the hosts a committed placement counted on.
fn power_on_for_placement(ctl: &Controller, hosts: Vec<String>) {
    for host in hosts {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::domain::consolidate::switch(&ctl, &host, true).await {
                tracing::warn!(%host, "switching on a host for new VMs failed: {e}");
            }
        });
    }
}

/// One rule for the size of a cluster, for create and scale alike (the CLI checks the same).
pub fn validate_size(size: u32) -> ApiResult<()> {
    shoal_model::check_cluster_size(size.into()).map_err(|e| ApiError::Invalid(e.to_string()))?;
    Ok(())
}

/// Clusters with how many of their VMs run (a VM whose host is down does not).
async fn views(ctl: &Controller, clusters: Vec<Cluster>) -> ApiResult<Vec<ClusterView>> {
    let mut counts: HashMap<String, (u32, u32)> = HashMap::new();
    for vm in ctl.db.vms().await? {
        let vm = super::vms::observed(ctl, vm);
        let e = counts.entry(vm.cluster).or_default();
        e.1 += 1;
        if vm.state == VmState::Running {
            e.0 += 1;
        }
    }
    Ok(clusters
        .into_iter()
        .map(|c| {
            let (running, total) = counts.get(&c.name).copied().unwrap_or_default();
            ClusterView {
                cluster: c,
                vms_running: running,
                vms_total: total,
            }
        })
        .collect())
}

/// `cluster list`.
pub async fn list(ctl: &Controller) -> ApiResult<Vec<ClusterView>> {
    let clusters = ctl.db.clusters().await?;
    views(ctl, clusters).await
}

/// `cluster show`.
pub async fn show(ctl: &Controller, name: &str) -> ApiResult<ClusterView> {
    let c = ctl.db.known_cluster(name).await?;
    Ok(views(ctl, vec![c.value]).await?.remove(0))
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
    validate_size(req.size)?;
    shoal_model::guest::check_guest_settings(req.user_data.as_deref(), req.user.as_deref(), &req.ssh_keys)?;
    let _guard = ctl.db.lock().await;
    if ctl.db.cluster(&req.name).await?.is_some() {
        return Err(ApiError::exists("cluster", &req.name));
    }
    let mut shape = resolve_profile(&profile_map(ctl).await?, &req.profile)?;
    // The cluster's own guest settings: user data and user in place of the profile's, keys added.
    if req.user_data.is_some() {
        shape.user_data = req.user_data.clone();
    }
    if req.user.is_some() {
        shape.user = req.user.clone();
    }
    shape.ssh_keys = crate::domain::profiles::merge_keys(shape.ssh_keys.iter().chain(&req.ssh_keys));
    shape.ha = crate::domain::profiles::apply_ha(
        shape.ha,
        req.checkpoint_interval.as_deref(),
        req.keep_checkpoints,
        req.ha_priority,
    )?;
    let wanted = req.network.as_deref().or(shape.network.as_deref());
    let (net, net_tx) = crate::domain::networks::network_for_cluster(ctl, &req.name, wanted, req.size, req.nat).await?;
    let cluster = Cluster {
        name: req.name.clone(),
        profile: req.profile.clone(),
        shape,
        size: req.size,
        placement: req.placement,
        anti_affinity: req.anti_affinity,
        subnet: net.subnet,
        network: Some(net.name.clone()),
        state: ClusterState::Converging,
        created_unix_ms: now_ms(),
    };
    let mut op = new_operation(OperationKind::ClusterCreate, &req.name, &DEPLOY_STEPS, 0);
    let indices: Vec<u32> = (0..req.size).collect();
    let new = plan_new_vms(ctl, &cluster, &indices, &[], &mut op).await?;
    let mut tx = new.tx.create_cluster(&cluster).put_operation(&op);
    if let Some(n) = net_tx {
        tx = tx.merge(n);
    }
    commit(ctl, tx, &req.name).await?;
    power_on_for_placement(ctl, new.power_on);
    ctl.wake.notify_one();
    Ok(op)
}

pub(crate) async fn commit(ctl: &Controller, tx: Tx, cluster: &str) -> ApiResult<()> {
    if !ctl.db.try_commit(tx).await? {
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
    validate_size(size)?;
    let _guard = ctl.db.lock().await;
    let Versioned {
        value: mut cluster,
        mod_revision: crev,
    } = ctl.db.known_cluster(name).await?;
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
    let mut power_on = Vec::new();
    let (op, mut tx) = if size > current {
        let used: HashSet<u32> = vms.iter().map(|v| v.value.index).collect();
        let indices: Vec<u32> = (0..)
            .filter(|i| !used.contains(i))
            .take((size - current) as usize)
            .collect();
        let existing: Vec<Vm> = live.iter().map(|v| v.value.clone()).collect();
        let mut op = new_operation(OperationKind::ClusterScale, name, &DEPLOY_STEPS, previous);
        let new = plan_new_vms(ctl, &cluster, &indices, &existing, &mut op).await?;
        power_on = new.power_on;
        (op, new.tx)
    } else {
        let mut op = new_operation(
            OperationKind::ClusterScale,
            name,
            &[DeployStep::Execute.as_str()],
            previous,
        );
        let mut doomed: Vec<&Versioned<Vm>> = live.clone();
        doomed.sort_by_key(|v| std::cmp::Reverse(v.value.index));
        doomed.truncate((current - size) as usize);
        let mut tx = Tx::new();
        for v in &doomed {
            let mut vm = v.value.clone();
            vm.state = VmState::Deleting;
            tx = tx.update_vm(v.mod_revision, &vm);
            op.vms.push(vm.name);
        }
        if let Some(s) = op.deploy_step_mut(DeployStep::Execute) {
            s.state = StepState::Running;
            s.total = doomed.len() as u64;
            s.message = format!("removing {}", plural(doomed.len(), "VM"));
        }
        (op, tx)
    };
    tx = tx.update_cluster(crev, &cluster).put_operation(&op);
    commit(ctl, tx, name).await?;
    power_on_for_placement(ctl, power_on);
    ctl.wake.notify_one();
    Ok(op)
}

/// `cluster delete`: every VM is removed from its host, then the cluster and its subnet go.
/// A deployment still under way is superseded (its operation fails, naming this one).
pub async fn delete_cluster(ctl: &Controller, name: &str) -> ApiResult<Operation> {
    let _guard = ctl.db.lock().await;
    let Versioned {
        value: mut cluster,
        mod_revision: crev,
    } = ctl.db.known_cluster(name).await?;
    let ops = ctl.db.operations().await?;
    if let Some(op) = ops
        .iter()
        .find(|o| o.target == name && o.state == OperationState::Running && o.kind == OperationKind::ClusterDelete)
    {
        return Ok(op.clone());
    }
    let vms = ctl.db.cluster_vms(name).await?;
    let mut op = new_operation(
        OperationKind::ClusterDelete,
        name,
        &[DeployStep::Execute.as_str()],
        cluster.size,
    );
    cluster.size = 0;
    cluster.state = ClusterState::Deleting;
    let mut tx = Tx::new().update_cluster(crev, &cluster);
    for mut superseded in ops
        .into_iter()
        .filter(|o| o.target == name && o.state == OperationState::Running)
    {
        superseded.state = OperationState::Failed;
        superseded.error = Some(format!("superseded by delete operation {}", op.id));
        superseded.finished_unix_ms = Some(now_ms());
        tx = tx.put_operation(&superseded);
    }
    for v in &vms {
        op.vms.push(v.value.name.clone());
        if v.value.state != VmState::Deleting {
            let mut vm = v.value.clone();
            vm.state = VmState::Deleting;
            tx = tx.update_vm(v.mod_revision, &vm);
        }
    }
    if let Some(s) = op.deploy_step_mut(DeployStep::Execute) {
        s.state = StepState::Running;
        s.total = vms.len() as u64;
        s.message = format!("removing {}", plural(vms.len(), "VM"));
    }
    commit(ctl, tx.put_operation(&op), name).await?;
    ctl.wake.notify_one();
    Ok(op)
}
