use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use shoal_model::agent::ConsoleChunk;
use shoal_model::Vm;

use crate::error::{ApiError, ApiResult};
use crate::lifecycle::{self, Action};
use crate::Controller;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct VmFilter {
    /// Only the VMs of this cluster.
    pub cluster: Option<String>,
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(VmFilter),
    responses((status = 200, body = [Vm]), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn list_vms(State(ctl): State<Controller>, Query(f): Query<VmFilter>) -> ApiResult<Json<Vec<Vm>>> {
    match f.cluster {
        Some(c) => {
            if ctl.db.store.get(&crate::db::cluster_key(&c)).await?.is_none() {
                return Err(ApiError::not_found("cluster", c));
            }
            Ok(Json(ctl.db.cluster_vms(&c).await?.into_iter().map(|v| v.value).collect()))
        }
        None => Ok(Json(ctl.db.vms().await?)),
    }
}

#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name, `<cluster>-<index>`")),
    responses((status = 200, body = Vm), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_vm(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<Vm>> {
    let found = match name.rsplit_once('-') {
        Some((cluster, index)) => match index.parse::<u32>() {
            Ok(i) if i.to_string() == index => ctl.db.get::<Vm>(&crate::db::vm_key(cluster, i)).await?,
            _ => None,
        },
        None => None,
    };
    found.map(|v| Json(v.value)).ok_or_else(|| ApiError::not_found("VM", name))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ActionQuery {
    /// With `stop`: pull the plug instead of pressing the power button.
    #[serde(default)]
    pub force: bool,
}

pub(crate) fn action(name: &str, force: bool) -> ApiResult<Action> {
    Ok(match name {
        "stop" => Action::Stop { force },
        "start" => Action::Start,
        "suspend" => Action::Suspend,
        "resume" => Action::Resume,
        other => {
            return Err(ApiError::Invalid(format!(
                "unknown action {other:?}: expected stop, start, suspend or resume"
            )))
        }
    })
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
    let Json(vm) = show_vm(State(ctl.clone()), Path(name.clone())).await?;
    let host = ctl
        .db
        .get::<crate::db::HostRecord>(&crate::db::host_key(&vm.host))
        .await?
        .ok_or_else(|| ApiError::Unavailable(format!("VM {name}'s host {} is unknown", vm.host)))?
        .value;
    ctl.agent(&host.address)
        .console(vm.uuid, q.offset, q.max.unwrap_or(1 << 20))
        .await
        .map(Json)
        .map_err(|e| match e.status() {
            Some(404) => ApiError::not_found("console of VM", name),
            _ => ApiError::Unavailable(format!("host {} did not return the console of {name}: {e}", vm.host)),
        })
}
