use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use shoal_model::Vm;

use crate::error::{ApiError, ApiResult};
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
