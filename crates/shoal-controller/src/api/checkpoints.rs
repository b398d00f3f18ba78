//! Disk checkpoints and block profiles.

use axum::extract::{Path, State};
use axum::Json;
use shoal_model::ha::{CheckpointBlocks, ClusterBlocks, VmBlocks};

use crate::domain::checkpoints;
use crate::error::ApiResult;
use crate::Controller;

/// Checkpoints the VM's disk into the image store now: its host reads only the blocks written
/// since the VM's last checkpoint and sends the chunks the store lacks; the guest keeps running.
#[utoipa::path(post, path = "/v1/vms/{name}/checkpoint", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = CheckpointBlocks), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody),
              (status = 503, body = shoal_model::api::ErrorBody)))]
pub async fn checkpoint_vm(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> ApiResult<Json<CheckpointBlocks>> {
    Ok(Json(checkpoints::checkpoint_vm(&ctl, &name).await?))
}

/// The VM's block profile: per kept checkpoint, the blocks it shares with its template, those
/// the VM created, and those new since the checkpoint before.
#[utoipa::path(get, path = "/v1/vms/{name}/blocks", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmBlocks), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn vm_blocks(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<VmBlocks>> {
    Ok(Json(checkpoints::vm_blocks(&ctl, &name).await?))
}

/// The cluster's block profile: each VM's latest checkpoint and their sum.
#[utoipa::path(get, path = "/v1/clusters/{name}/blocks", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses((status = 200, body = ClusterBlocks), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn cluster_blocks(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<ClusterBlocks>> {
    Ok(Json(checkpoints::cluster_blocks(&ctl, &name).await?))
}
