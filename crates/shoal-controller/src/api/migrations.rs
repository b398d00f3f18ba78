//! Migrations: moving a VM (or a whole virtual cluster) to other hosts, its preview, and the
//! migrations under way.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use shoal_model::{MigrateCluster, MigrateVm, Migration, Operation};
use shoal_policy::Explanation;
use utoipa::ToSchema;

use crate::api::plan::ExplainQuery;
use crate::domain::migrations;
use crate::error::ApiResult;
use crate::Controller;

/// Starts moving a running VM to another host: to `to`, or where placement puts it (the same
/// filters and scores as deployment; its own host excluded). Shared-nothing: the VM's own disk
/// blocks go over NBD, then its memory; `mode` `auto` picks `pause` under TCG.
#[utoipa::path(post, path = "/v1/vms/{name}/migrate", tag = "vms", request_body = MigrateVm,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 202, body = Operation), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn migrate_vm(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<MigrateVm>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(migrations::migrate_vm(&ctl, &name, &req).await?),
    ))
}

/// Moves every VM of a virtual cluster off the hosts it is on, in waves.
#[utoipa::path(post, path = "/v1/clusters/{name}/migrate", tag = "clusters", request_body = MigrateCluster,
    params(("name" = String, Path, description = "cluster name")),
    responses((status = 202, body = Operation), (status = 404, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn migrate_cluster(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<MigrateCluster>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::domain::plans::migrate_cluster(&ctl, &name, &req).await?),
    ))
}

/// A VM migration to preview.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct MigratePreview {
    pub vm: String,
    #[serde(default)]
    pub to: Option<String>,
}

/// Where a VM would migrate, committing nothing: the destination (or the binding constraint)
/// and, with `explain`, every host's verdict.
#[utoipa::path(post, path = "/v1/plan/migrate", tag = "plan", request_body = MigratePreview, params(ExplainQuery),
    responses((status = 200, body = Explanation), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn preview(
    State(ctl): State<Controller>,
    Query(q): Query<ExplainQuery>,
    Json(req): Json<MigratePreview>,
) -> ApiResult<Json<Explanation>> {
    Ok(Json(
        migrations::preview(&ctl, &req.vm, req.to.as_deref(), q.explain).await?,
    ))
}

/// The migrations under way, with their step and the source's last progress report.
#[utoipa::path(get, path = "/v1/migrations", tag = "vms", params(crate::api::Page),
    responses((status = 200, body = [Migration])))]
pub async fn list(
    State(ctl): State<Controller>,
    Query(page): Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<Migration>> {
    page.of(migrations::list(&ctl).await?)
}
