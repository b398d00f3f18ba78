use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use shoal_model::agent::ConsoleChunk;
use shoal_model::{Vm, VmState};

use crate::domain::lifecycle::{self, Action};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct VmFilter {
    /// Only the VMs of this cluster.
    pub cluster: Option<String>,
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(VmFilter, crate::api::Page),
    responses((status = 200, body = [Vm]), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn list_vms(
    State(ctl): State<Controller>,
    Query(f): Query<VmFilter>,
    Query(page): Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<Vm>> {
    page.of(crate::domain::vms::list(&ctl, f.cluster.as_deref()).await?)
}

#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name, `<cluster>-<index>`")),
    responses((status = 200, body = Vm), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_vm(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<Vm>> {
    Ok(Json(crate::domain::vms::show(&ctl, &name).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ActionQuery {
    /// With `stop`: pull the plug instead of pressing the power button.
    #[serde(default)]
    pub force: bool,
}

pub(crate) fn action(name: &str, force: bool) -> ApiResult<Action> {
    shoal_model::PowerAction::parse(name, force).map_err(|e| ApiError::Invalid(e.to_string()))
}

/// Stops (ACPI power button, forced after a timeout, or at once with `force`), starts, suspends
/// (memory to a file on the host, resources given back) or resumes a VM.
#[utoipa::path(post, path = "/v1/vms/{name}/{action}", tag = "vms",
    params(("name" = String, Path, description = "VM name"),
           ("action" = String, Path, description = "`stop`, `start`, `suspend` or `resume`"), ActionQuery),
    responses((status = 202, body = shoal_model::Operation), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn vm_action(
    State(ctl): State<Controller>,
    Path((name, verb)): Path<(String, String)>,
    Query(q): Query<ActionQuery>,
) -> ApiResult<(StatusCode, Json<shoal_model::Operation>)> {
    let a = action(&verb, q.force)?;
    Ok((StatusCode::ACCEPTED, Json(lifecycle::vm_action(&ctl, &name, a).await?)))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ConsoleQuery {
    /// Byte offset to read from.
    #[serde(default)]
    pub offset: u64,
    /// Most bytes to return (default 1 MiB).
    pub max: Option<usize>,
}

/// The host record of the host a VM is on.
async fn vm_host(ctl: &Controller, vm: &shoal_model::Vm) -> ApiResult<crate::datastore::HostRecord> {
    ctl.db
        .host(&vm.host)
        .await?
        .ok_or_else(|| ApiError::Unavailable(format!("VM {}'s host {} is unknown", vm.name, vm.host)))
}

/// The VM's serial console from `offset`, read from its host.
#[utoipa::path(get, path = "/v1/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleQuery),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = shoal_model::api::ErrorBody), (status = 503, body = shoal_model::api::ErrorBody)))]
pub async fn console(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> ApiResult<Json<ConsoleChunk>> {
    let Json(vm) = show_vm(State(ctl.clone()), Path(name.clone())).await?;
    let host = vm_host(&ctl, &vm).await?;
    ctl.agent(&host.address)
        .console(vm.uuid, q.offset, q.max.unwrap_or(1 << 20))
        .await
        .map(Json)
        .map_err(|e| match e.status() {
            Some(404) => ApiError::not_found("console of VM", name),
            _ => ApiError::Unavailable(format!("host {} did not return the console of {name}: {e}", vm.host)),
        })
}

/// Records the VM's disk as it is now (the guest paused meanwhile) as an image in the store,
/// sharing every unchanged chunk with its template.
#[utoipa::path(post, path = "/v1/vms/{name}/snapshot", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = shoal_model::api::VmSnapshot), (status = 404, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody), (status = 503, body = shoal_model::api::ErrorBody)))]
pub async fn snapshot_vm(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> ApiResult<Json<shoal_model::api::VmSnapshot>> {
    let (_, snap) = take_snapshot(&ctl, &name).await?;
    Ok(Json(snap))
}

/// Snapshots VM `name`: asks its host to send the disk's missing chunks and manifest, then names
/// the image `vm/NAME/UNIX_MS` so that gc keeps it.
pub async fn take_snapshot(ctl: &Controller, name: &str) -> ApiResult<(shoal_model::Vm, shoal_model::api::VmSnapshot)> {
    let Json(vm) = show_vm(State(ctl.clone()), Path(name.to_string())).await?;
    if matches!(
        vm.state,
        VmState::Pending | VmState::Creating | VmState::Deleting | VmState::Failed
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
