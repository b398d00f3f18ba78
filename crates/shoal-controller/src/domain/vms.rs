//! VMs as operators see them. A VM's record keeps the last state its host reported; when that
//! host is not heard from, the record's state would be a guess, so every view of a VM (`vm
//! list`, `vm show`, the counts of `cluster list`) shows `unknown` instead, with the reason.

use shoal_model::agent::ConsoleChunk;
use shoal_model::{HostState, Vm, VmState};

use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// The VM as shown: `unknown` when its host is down and its state is one the host reports.
pub fn observed(ctl: &Controller, mut vm: Vm) -> Vm {
    if let Some(reason) = unknown_because(ctl, &vm) {
        vm.state = VmState::Unknown;
        vm.reason = Some(reason);
    }
    vm
}

/// Why the VM's state is not known, if it is not: its host is down. A VM still pending (not
/// yet on any host) or being deleted is what the store says it is.
pub fn unknown_because(ctl: &Controller, vm: &Vm) -> Option<String> {
    if matches!(vm.state, VmState::Pending | VmState::Deleting) {
        return None;
    }
    match ctl.host_state(&vm.host) {
        (HostState::Up, _) => None,
        (_, Some(seen)) => Some(format!(
            "host {} is down: not heard from for {} s; last reported {}",
            vm.host,
            shoal_model::now_ms().saturating_sub(seen) / 1000,
            vm.state.as_str()
        )),
        (_, None) => Some(format!(
            "host {} is down: not heard from since the controller started; last reported {}",
            vm.host,
            vm.state.as_str()
        )),
    }
}

/// `vm list`, optionally of one cluster.
/// Each VM's own disk data on its host (its overlay), MiB, as the hosts last reported it: what
/// moving the VM copies besides its memory. VMs not reported count 0.
pub fn overlay_mib(ctl: &Controller) -> std::collections::HashMap<uuid::Uuid, u64> {
    ctl.liveness()
        .values()
        .flat_map(|l| l.vms.iter())
        .filter_map(|r| Some((r.uuid, r.disk_bytes?.div_ceil(1 << 20))))
        .collect()
}

pub async fn list(ctl: &Controller, cluster: Option<&str>) -> ApiResult<Vec<Vm>> {
    let vms = match cluster {
        Some(c) => {
            if ctl.db.cluster(c).await?.is_none() {
                return Err(ApiError::not_found("cluster", c));
            }
            ctl.db.cluster_vms(c).await?.into_iter().map(|v| v.value).collect()
        }
        None => ctl.db.vms().await?,
    };
    Ok(vms.into_iter().map(|v| observed(ctl, v)).collect())
}

/// `vm show`.
pub async fn show(ctl: &Controller, name: &str) -> ApiResult<Vm> {
    let vm = ctl.db.vm(name).await?.ok_or_else(|| ApiError::not_found("VM", name))?;
    Ok(observed(ctl, vm.value))
}

/// The host record of the host a VM is on.
pub(crate) async fn vm_host(ctl: &Controller, vm: &shoal_model::Vm) -> ApiResult<crate::datastore::HostRecord> {
    ctl.db
        .host(&vm.host)
        .await?
        .ok_or_else(|| ApiError::Unavailable(format!("VM {}'s host {} is unknown", vm.name, vm.host)))
}

/// Up to `max` bytes of the VM's serial console from `offset`, read from its host.
pub async fn console(ctl: &Controller, name: &str, offset: u64, max: usize) -> ApiResult<ConsoleChunk> {
    let vm = show(ctl, name).await?;
    let host = vm_host(ctl, &vm).await?;
    ctl.agent(&host.address)
        .console(vm.uuid, offset, max)
        .await
        .map_err(|e| match e.status() {
            Some(404) => ApiError::not_found("console of VM", name),
            _ => ApiError::Unavailable(format!("host {} did not return the console of {name}: {e}", vm.host)),
        })
}

/// Snapshots VM `name`: asks its host to send the disk's missing chunks and manifest, then names
/// the image `vm/NAME/UNIX_MS` so that gc keeps it.
pub async fn snapshot(ctl: &Controller, name: &str) -> ApiResult<(shoal_model::Vm, shoal_model::api::VmSnapshot)> {
    let vm = show(ctl, name).await?;
    if matches!(
        vm.state,
        VmState::Pending | VmState::Creating | VmState::Deleting | VmState::Failed | VmState::Unknown
    ) {
        return Err(ApiError::Conflict(format!(
            "VM {name} is {}; snapshot it once it runs or is stopped",
            vm.state.as_str()
        )));
    }
    let host = vm_host(ctl, &vm).await?;
    let disk = ctl
        .agent(&host.address)
        .snapshot(vm.uuid)
        .await
        .map_err(|e| match e.status() {
            Some(404) => ApiError::not_found("VM on its host", name),
            Some(409) => ApiError::Conflict(e.to_string()),
            _ => ApiError::Unavailable(format!("host {} could not snapshot {name}: {e}", vm.host)),
        })?;
    let id: shoal_image::ManifestId = disk.manifest.parse().map_err(ApiError::from)?;
    let image = format!("vm/{name}/{}", shoal_model::now_ms());
    let template = ctl.db.template(&vm.template).await?.and_then(|t| {
        t.value
            .template
            .disk()
            .ok()
            .and_then(|d| d.manifest()?.parse::<shoal_image::ManifestId>().ok())
    });
    let img = image.clone();
    let (data, shared) = crate::api::images::blocking(ctl, move |s| {
        s.set_ref(&img, &id)?;
        let m = s.manifest(&id)?;
        let tmpl: std::collections::HashSet<shoal_image::ChunkId> = match template {
            Some(t) => s.manifest(&t)?.chunks().map(|c| c.1).collect(),
            None => Default::default(),
        };
        let shared = m.chunks().filter(|c| tmpl.contains(&c.1)).map(|c| c.2).sum();
        Ok((m.data_bytes(), shared))
    })
    .await?;
    let snap = shoal_model::api::VmSnapshot {
        vm: name.to_string(),
        image,
        manifest: disk.manifest,
        logical_bytes: disk.logical_bytes,
        data_bytes: data,
        shared_with_template_bytes: shared,
        chunks: disk.chunks,
        chunks_sent: disk.chunks_sent,
        bytes_sent: disk.bytes_sent,
    };
    Ok((vm, snap))
}
