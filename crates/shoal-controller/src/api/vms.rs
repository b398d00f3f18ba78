use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use shoal_model::agent::ConsoleChunk;
use shoal_model::Vm;

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

/// The VM's serial console from `offset`, read from its host.
#[utoipa::path(get, path = "/v1/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleQuery),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = shoal_model::api::ErrorBody), (status = 503, body = shoal_model::api::ErrorBody)))]
pub async fn console(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> ApiResult<Json<ConsoleChunk>> {
    Ok(Json(
        crate::domain::vms::console(&ctl, &name, q.offset, q.max.unwrap_or(1 << 20)).await?,
    ))
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
    let (_, snap) = crate::domain::vms::snapshot(&ctl, &name).await?;
    Ok(Json(snap))
}
