//! Disk checkpoints and block profiles. A checkpoint is the VM's whole disk as an image of the
//! store, made by its host from the blocks written since the VM's previous checkpoint (or from
//! its overlay's blocks laid over its base image), named `checkpoint/<vm>/<seq>` while it is
//! kept, and held by one other host's chunk cache too before it counts as safe to restart from.
//! The scheduler takes one per `--checkpoint-interval`; `vm checkpoint` takes one now.

use std::collections::HashMap;
use std::time::Duration;

use shoal_model::agent::CheckpointDisk;
use shoal_model::ha::{BlockCounts, CheckpointBlocks, ClusterBlocks, ClusterVmBlocks, VmBlocks};
use shoal_model::{now_ms, Checkpoint, CheckpointChain, HostState, TemplateDisk, Vm, VmState};
use tokio::sync::watch;

use crate::api::images::blocking;
use crate::datastore::{keys, Tx};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// The controller's own store, as a replica's name.
pub const CONTROLLER: &str = "controller";
/// Checkpoints the scheduler runs at once.
const CONCURRENT: usize = 4;
/// A scheduled checkpoint that failed is tried again after this long at the soonest.
const RETRY: Duration = Duration::from_secs(15);

/// `vm checkpoint NAME`: checkpoints the VM's disk now.
pub async fn checkpoint_vm(ctl: &Controller, name: &str) -> ApiResult<CheckpointBlocks> {
    let vm = ctl.db.known_vm(name).await?.value;
    if let Some(why) = crate::domain::vms::unknown_because(ctl, &vm) {
        return Err(ApiError::Unavailable(format!(
            "VM {name} cannot be checkpointed now: {why}"
        )));
    }
    if vm.state != VmState::Running {
        return Err(ApiError::Conflict(format!(
            "VM {name} is {}; checkpoints are taken of running VMs",
            vm.state.as_str()
        )));
    }
    if ctl.db.migration(name).await?.is_some() {
        return Err(ApiError::Conflict(format!(
            "VM {name} is migrating; checkpoint it once it has moved"
        )));
    }
    let base = base_manifest(ctl, &vm).await?;
    let _busy = Busy::take(ctl, name)?;
    let chain = chain_of(ctl, &vm).await?;
    let host = crate::domain::vms::vm_host(ctl, &vm).await?;
    let req = CheckpointDisk {
        base,
        since: chain.checkpoints.last().map(|c| c.manifest.clone()),
    };
    let taken = ctl
        .agent(&host.address)
        .checkpoint(vm.uuid, &req)
        .await
        .map_err(|e| match e.status() {
            Some(404) => ApiError::not_found("VM on its host", name),
            Some(409) => ApiError::Conflict(format!("host {} could not checkpoint {name}: {e}", vm.host)),
            _ => ApiError::Unavailable(format!("host {} could not checkpoint {name}: {e}", vm.host)),
        })?;
    let id: shoal_image::ManifestId = taken.manifest.parse().map_err(ApiError::from)?;
    if !ctl.images.has_manifest(&id) {
        return Err(ApiError::Unavailable(format!(
            "host {} reported checkpoint {} of {name}, which the image store does not hold",
            vm.host, taken.manifest
        )));
    }
    let seq = chain.last_seq + 1;
    // Named before it is recorded, so that gc never takes it in between.
    let image = keys::checkpoint_image(name, seq);
    blocking(ctl, move |s| s.set_ref(&image, &id)).await?;
    let mut replicas = vec![CONTROLLER.to_string()];
    match replicate(ctl, &vm, &taken.manifest).await {
        Some(h) => replicas.push(h),
        None => tracing::warn!(
            vm = %name,
            seq,
            "checkpoint held by the controller only: no other host took a copy, so it is not safe to restart from"
        ),
    }
    let cp = Checkpoint {
        seq,
        manifest: taken.manifest.clone(),
        parent: taken.parent.clone(),
        incremental: taken.incremental,
        host: vm.host.clone(),
        taken_unix_ms: now_ms(),
        disk_bytes: taken.disk_bytes,
        changed_bytes: taken.changed_bytes,
        read_bytes: taken.read_bytes,
        bytes_sent: taken.bytes_sent,
        seconds: taken.seconds,
        replicas,
    };
    let dropped = record(ctl, &vm, cp.clone()).await?;
    forget_images(ctl, name, &dropped).await;
    tracing::info!(
        vm = %name,
        seq,
        incremental = cp.incremental,
        changed = cp.changed_bytes,
        read = cp.read_bytes,
        sent = cp.bytes_sent,
        seconds = cp.seconds,
        "checkpoint taken"
    );
    let previous = chain.checkpoints.last().map(|c| c.manifest.as_str());
    let blocks = counts(ctl, &vm.template, previous, &[&cp.manifest]).await?.remove(0);
    Ok(CheckpointBlocks {
        safe: cp.safe(),
        checkpoint: cp,
        blocks,
    })
}

/// The image the VM's overlay sits on, as a manifest id: its restart checkpoint, else its
/// template's disk, which must be in the image store.
async fn base_manifest(ctl: &Controller, vm: &Vm) -> ApiResult<String> {
    let hash = match &vm.disk_base {
        Some(b) => b.clone(),
        None => {
            ctl.db
                .template(&vm.template)
                .await?
                .ok_or_else(|| ApiError::not_found("template", &vm.template))?
                .value
                .template
                .hash
        }
    };
    match TemplateDisk::parse(&hash).map_err(|e| ApiError::Invalid(e.to_string()))? {
        TemplateDisk::Manifest(m) => Ok(m),
        _ => Err(ApiError::Invalid(format!(
            "template {} is a plain file ({hash}), not an image of the store: checkpoints are laid over \
             store images; import it with `shoal template import`",
            vm.template
        ))),
    }
}

/// The VM's chain; a chain left by an earlier VM of the same name does not count.
async fn chain_of(ctl: &Controller, vm: &Vm) -> ApiResult<CheckpointChain> {
    Ok(match ctl.db.checkpoints(&vm.name).await? {
        Some(c) if c.value.uuid == vm.uuid => c.value,
        Some(c) => CheckpointChain {
            vm: vm.name.clone(),
            uuid: vm.uuid,
            last_seq: c.value.last_seq,
            checkpoints: Vec::new(),
        },
        None => CheckpointChain {
            vm: vm.name.clone(),
            uuid: vm.uuid,
            ..Default::default()
        },
    })
}

/// Has one other host that is heard keep the checkpoint in its chunk cache: the host the VM's
/// name ranks first (so that a cluster's copies spread), else the next.
async fn replicate(ctl: &Controller, vm: &Vm, manifest: &str) -> Option<String> {
    let hosts = ctl.db.hosts().await.ok()?;
    let marks = crate::capacity::HostMarks::read(ctl).await.ok()?;
    let mut candidates: Vec<_> = hosts
        .into_iter()
        .filter(|h| {
            h.name != vm.host
                && ctl.host_state(&h.name).0 == HostState::Up
                && !marks.failed.contains(&h.name)
                && !marks.powered_off.contains(&h.name)
        })
        .collect();
    candidates.sort_by_key(|h| {
        blake3::hash(format!("{}/{}", vm.name, h.name).as_bytes())
            .to_hex()
            .to_string()
    });
    for h in candidates.into_iter().take(3) {
        match ctl.agent(&h.address).hold_image(manifest).await {
            Ok(()) => return Some(h.name),
            Err(e) => tracing::warn!(vm = %vm.name, host = %h.name, "copying a checkpoint to another host failed: {e}"),
        }
    }
    None
}

/// Appends the checkpoint to the VM's chain, dropping the oldest beyond the cluster's `keep`;
/// returns the dropped ones. Refused when the VM was deleted or replaced meanwhile.
async fn record(ctl: &Controller, vm: &Vm, cp: Checkpoint) -> ApiResult<Vec<Checkpoint>> {
    let _g = ctl.db.lock().await;
    let current = ctl.db.vm(&vm.name).await?;
    if current.as_ref().is_none_or(|c| c.value.uuid != vm.uuid) {
        forget_images(ctl, &vm.name, std::slice::from_ref(&cp)).await;
        return Err(ApiError::Conflict(format!(
            "VM {} was deleted during its checkpoint",
            vm.name
        )));
    }
    let keep = ctl
        .db
        .cluster(&vm.cluster)
        .await?
        .map_or(shoal_model::ha::DEFAULT_KEEP, |c| c.value.shape.ha.keep) as usize;
    let stored = ctl.db.checkpoints(&vm.name).await?;
    let read_at = stored.as_ref().map_or(0, |s| s.mod_revision);
    let mut chain = chain_of(ctl, vm).await?;
    chain.last_seq = chain.last_seq.max(cp.seq);
    chain.checkpoints.push(cp);
    let excess = chain.checkpoints.len().saturating_sub(keep.max(1));
    let dropped: Vec<Checkpoint> = chain.checkpoints.drain(..excess).collect();
    ctl.db.commit(Tx::new().put_checkpoints(read_at, &chain)).await?;
    Ok(dropped)
}

/// Removes the store's names of dropped checkpoints: gc may then take their chunks.
async fn forget_images(ctl: &Controller, vm: &str, dropped: &[Checkpoint]) {
    for c in dropped {
        let image = keys::checkpoint_image(vm, c.seq);
        if let Err(e) = blocking(ctl, move |s| s.delete_ref(&image)).await {
            tracing::warn!(%vm, seq = c.seq, "dropping a checkpoint's image name: {e}");
        }
    }
}

/// Block counts of checkpoint images (`chain`, oldest first), each against the VM's template
/// and the image before it (`before` for the first): every manifest read once.
async fn counts(ctl: &Controller, template: &str, before: Option<&str>, chain: &[&str]) -> ApiResult<Vec<BlockCounts>> {
    let template = ctl
        .db
        .template(template)
        .await?
        .and_then(|t| t.value.template.disk().ok())
        .and_then(|d| d.manifest().map(str::to_string));
    let parse = |m: &str| m.parse::<shoal_image::ManifestId>().map_err(ApiError::from);
    let template = template.as_deref().map(parse).transpose()?;
    let before = before.map(parse).transpose()?;
    let chain: Vec<shoal_image::ManifestId> = chain.iter().map(|m| parse(m)).collect::<ApiResult<_>>()?;
    blocking(ctl, move |s| {
        let t = match template {
            Some(t) => s.manifest(&t)?,
            None => shoal_image::Manifest {
                params: shoal_image::ChunkParams::V1,
                size: 0,
                extents: Vec::new(),
            },
        };
        let mut previous = before.map(|p| s.manifest(&p)).transpose()?;
        let mut out = Vec::with_capacity(chain.len());
        for id in &chain {
            let m = s.manifest(id)?;
            let b = shoal_image::profile(&t, previous.as_ref(), &m);
            out.push(BlockCounts {
                size: b.size,
                zero_bytes: b.zero_bytes,
                template_chunks: b.template_chunks,
                template_bytes: b.template_bytes,
                own_chunks: b.own_chunks,
                own_bytes: b.own_bytes,
                new_chunks: b.new_chunks,
                new_bytes: b.new_bytes,
            });
            previous = Some(m);
        }
        Ok(out)
    })
    .await
}

/// `vm blocks NAME`: the VM's block profile, checkpoint by checkpoint.
pub async fn vm_blocks(ctl: &Controller, name: &str) -> ApiResult<VmBlocks> {
    let vm = ctl.db.known_vm(name).await?.value;
    let ha = ctl
        .db
        .cluster(&vm.cluster)
        .await?
        .map(|c| c.value.shape.ha)
        .unwrap_or_default();
    let chain = chain_of(ctl, &vm).await?;
    let manifests: Vec<&str> = chain.checkpoints.iter().map(|c| c.manifest.as_str()).collect();
    let blocks = counts(ctl, &vm.template, None, &manifests).await?;
    let checkpoints = chain
        .checkpoints
        .iter()
        .zip(blocks)
        .map(|(c, blocks)| CheckpointBlocks {
            safe: c.safe(),
            checkpoint: c.clone(),
            blocks,
        })
        .collect();
    Ok(VmBlocks {
        vm: vm.name,
        template: vm.template,
        checkpoint_interval_s: ha.checkpoint_interval_s,
        keep: ha.keep,
        checkpoints,
    })
}

/// `cluster blocks NAME`: each VM's latest checkpoint and their sum.
pub async fn cluster_blocks(ctl: &Controller, name: &str) -> ApiResult<ClusterBlocks> {
    ctl.db.known_cluster(name).await?;
    let mut vms = Vec::new();
    let mut total = BlockCounts::default();
    for v in ctl.db.cluster_vms(name).await? {
        let profile = vm_blocks(ctl, &v.value.name).await?;
        let n = profile.checkpoints.len() as u32;
        let latest = profile.checkpoints.into_iter().last();
        if let Some(l) = &latest {
            total += &l.blocks;
        }
        vms.push(ClusterVmBlocks {
            vm: v.value.name,
            latest,
            checkpoints: n,
        });
    }
    Ok(ClusterBlocks {
        cluster: name.to_string(),
        vms,
        total,
    })
}

/// The checkpoints under way, so that a VM never has two at once.
struct Busy<'a> {
    ctl: &'a Controller,
    vm: String,
}

impl<'a> Busy<'a> {
    fn take(ctl: &'a Controller, vm: &str) -> ApiResult<Busy<'a>> {
        if !ctl.checkpointing.lock().expect("checkpointing").insert(vm.to_string()) {
            return Err(ApiError::Conflict(format!("VM {vm} is being checkpointed already")));
        }
        Ok(Busy {
            ctl,
            vm: vm.to_string(),
        })
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.ctl.checkpointing.lock().expect("checkpointing").remove(&self.vm);
    }
}

/// The VMs whose scheduled checkpoint is due: running on a heard host, with an interval, not
/// migrating, not under way or recently failed, and the interval passed since their last.
pub fn due(
    vms: &[Vm],
    interval: impl Fn(&Vm) -> Option<u64>,
    last_taken: impl Fn(&Vm) -> Option<u64>,
    skip: impl Fn(&Vm) -> bool,
    now_ms: u64,
) -> Vec<&Vm> {
    let mut due: Vec<(&Vm, u64)> = vms
        .iter()
        .filter(|v| v.state == VmState::Running && !skip(v))
        .filter_map(|v| {
            let every = interval(v)? * 1000;
            let last = last_taken(v).unwrap_or(0);
            (now_ms.saturating_sub(last) >= every).then_some((v, last))
        })
        .collect();
    // The longest waiting first.
    due.sort_by_key(|(v, last)| (*last, v.name.clone()));
    due.into_iter().map(|(v, _)| v).collect()
}

/// The checkpoint scheduler: every second, starts the checkpoints that are due (at most
/// [`CONCURRENT`] at once); every ten, forgets the chains of VMs that are gone.
pub async fn run(ctl: Controller, mut stop: watch::Receiver<bool>) {
    let running = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT));
    let failed_at: std::sync::Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>> = Default::default();
    let mut swept = std::time::Instant::now();
    loop {
        if let Err(e) = schedule(&ctl, &running, &failed_at).await {
            tracing::warn!("checkpoint scheduler: {e}");
        }
        if swept.elapsed() >= Duration::from_secs(10) {
            swept = std::time::Instant::now();
            if let Err(e) = sweep(&ctl).await {
                tracing::warn!("forgetting checkpoints of deleted VMs: {e}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

type FailedAt = std::sync::Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>>;

async fn schedule(
    ctl: &Controller,
    running: &std::sync::Arc<tokio::sync::Semaphore>,
    failed_at: &FailedAt,
) -> ApiResult<()> {
    let clusters = ctl.db.clusters_by_name().await?;
    if clusters.values().all(|c| c.shape.ha.checkpoint_interval_s.is_none()) {
        return Ok(());
    }
    let vms = ctl.db.vms().await?;
    let chains = ctl.db.checkpoint_chains().await?;
    let moving = ctl.db.migrating_vms().await?;
    let busy = ctl.checkpointing.lock().expect("checkpointing").clone();
    let recently_failed = |v: &Vm| {
        failed_at
            .lock()
            .expect("failed_at")
            .get(&v.name)
            .is_some_and(|t| t.elapsed() < RETRY)
    };
    let due = due(
        &vms,
        |v| clusters.get(&v.cluster).and_then(|c| c.shape.ha.checkpoint_interval_s),
        |v| {
            chains
                .get(&v.name)
                .filter(|c| c.uuid == v.uuid)
                .and_then(|c| c.checkpoints.last())
                .map(|c| c.taken_unix_ms)
        },
        |v| {
            moving.contains(&v.name)
                || busy.contains(&v.name)
                || recently_failed(v)
                || ctl.host_state(&v.host).0 != HostState::Up
        },
        now_ms(),
    );
    for vm in due {
        let Ok(permit) = running.clone().try_acquire_owned() else {
            break;
        };
        let (ctl, name, failed_at) = (ctl.clone(), vm.name.clone(), failed_at.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match checkpoint_vm(&ctl, &name).await {
                Ok(_) => {
                    failed_at.lock().expect("failed_at").remove(&name);
                }
                Err(e) => {
                    tracing::warn!(vm = %name, "scheduled checkpoint failed: {e}");
                    failed_at
                        .lock()
                        .expect("failed_at")
                        .insert(name, std::time::Instant::now());
                }
            }
        });
    }
    Ok(())
}

/// Forgets the chains (and image names) of VMs that no longer exist.
async fn sweep(ctl: &Controller) -> ApiResult<()> {
    let vms: HashMap<String, uuid::Uuid> = ctl.db.vms().await?.into_iter().map(|v| (v.name, v.uuid)).collect();
    for c in ctl.db.all_checkpoints().await? {
        if vms.get(&c.value.vm) == Some(&c.value.uuid) {
            continue;
        }
        let _g = ctl.db.lock().await;
        if ctl
            .db
            .try_commit(Tx::new().delete_checkpoints(&c.value.vm, c.mod_revision))
            .await?
        {
            forget_images(ctl, &c.value.vm, &c.value.checkpoints).await;
            tracing::info!(vm = %c.value.vm, "forgot the checkpoints of a deleted VM");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, state: VmState) -> Vm {
        Vm {
            state,
            ..Vm::example(name)
        }
    }

    #[test]
    fn a_checkpoint_is_due_once_its_interval_passed_for_running_vms_not_skipped() {
        let vms = vec![
            vm("a", VmState::Running),
            vm("b", VmState::Running),
            vm("c", VmState::Stopped),
            vm("d", VmState::Running),
            vm("e", VmState::Running),
        ];
        let last = |v: &Vm| match v.name.as_str() {
            "a" => Some(50_000),
            "b" => Some(95_000),
            "e" => Some(10_000),
            _ => None,
        };
        let interval = |v: &Vm| (v.name != "e").then_some(30);
        let now_due = due(&vms, interval, last, |v| v.name == "d", 100_000);
        let names: Vec<&str> = now_due.iter().map(|v| v.name.as_str()).collect();
        // b is not due yet, c is stopped, d skipped, e has no interval; a waited longest.
        assert_eq!(names, ["a"]);
        // Never checkpointed: due at once, by name; a stopped VM never.
        let all = due(&vms, |_| Some(5), |_| None, |_| false, 1_000_000);
        let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "d", "e"]);
    }
}
