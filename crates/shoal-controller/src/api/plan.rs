//! Plans: the live snapshot, placement previews with explanations, rebalancing and drains.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use shoal_model::api::CreateCluster;
use shoal_policy::rebalance::{RebalanceOptions, RebalancePlan};
use shoal_policy::{Explanation, Snapshot};
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiResult;
use crate::{domain::plans, Controller};

/// The live hosts and the VMs holding resources on them, in the snapshot format of
/// `docs/snapshot.md` (what `shoal plan snapshot` writes).
#[utoipa::path(get, path = "/v1/plan/snapshot", tag = "plan", responses((status = 200, body = Snapshot)))]
pub async fn snapshot(State(ctl): State<Controller>) -> ApiResult<Json<Snapshot>> {
    Ok(Json(plans::snapshot(&ctl).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ExplainQuery {
    /// Include every host's verdict (the filter that rejected it, or its score).
    #[serde(default)]
    pub explain: bool,
}

/// What creating this cluster would do, committing nothing: the plan (or the binding
/// constraint) and, with `explain`, every host's verdict.
#[utoipa::path(post, path = "/v1/plan/place", tag = "plan", request_body = CreateCluster, params(ExplainQuery),
    responses((status = 200, body = Explanation), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn place(
    State(ctl): State<Controller>,
    Query(q): Query<ExplainQuery>,
    Json(req): Json<CreateCluster>,
) -> ApiResult<Json<Explanation>> {
    Ok(Json(plans::preview_create(&ctl, &req, q.explain).await?))
}

/// A rebalance or drain request.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct PlanRequest {
    /// Execute the plan; otherwise only return it.
    #[serde(default)]
    pub apply: bool,
    #[serde(default)]
    pub options: RebalanceOptions,
}

/// Plans live migrations that lower the cluster's imbalance (hbal's score) and, with `apply`,
/// executes them.
#[utoipa::path(post, path = "/v1/plan/rebalance", tag = "plan", request_body = PlanRequest,
    responses((status = 200, body = RebalancePlan), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn rebalance(State(ctl): State<Controller>, Json(req): Json<PlanRequest>) -> ApiResult<Json<RebalancePlan>> {
    Ok(Json(plans::rebalance(&ctl, &req.options, req.apply).await?))
}

/// Plans moving every VM off the host and, with `apply`, marks it draining (nothing new lands
/// on it) and executes the plan.
#[utoipa::path(post, path = "/v1/hosts/{name}/drain", tag = "hosts", request_body = PlanRequest,
    params(("name" = String, Path, description = "Host name")),
    responses((status = 200, body = RebalancePlan), (status = 404, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn drain(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<PlanRequest>,
) -> ApiResult<Json<RebalancePlan>> {
    Ok(Json(plans::drain(&ctl, &name, &req.options, req.apply).await?))
}

/// Puts a host into maintenance: it keeps its VMs and takes nothing new (drain it to empty it).
#[utoipa::path(post, path = "/v1/hosts/{name}/maintenance", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses((status = 204), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn enter_maintenance(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    plans::set_maintenance(&ctl, &name, true).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Takes a host out of maintenance.
#[utoipa::path(delete, path = "/v1/hosts/{name}/maintenance", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses((status = 204), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn leave_maintenance(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    plans::set_maintenance(&ctl, &name, false).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Puts a drained host back in service.
#[utoipa::path(post, path = "/v1/hosts/{name}/undrain", tag = "hosts",
    params(("name" = String, Path, description = "Host name")), responses((status = 204)))]
pub async fn undrain(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<axum::http::StatusCode> {
    plans::undrain(&ctl, &name).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
