use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use shoal_model::api::{ClusterView, CreateCluster, ScaleCluster};
use shoal_model::Operation;

use crate::domain::clusters;
use crate::error::ApiResult;
use crate::Controller;

/// Plans the whole cluster (prepare images, configure VMs, choose hosts) and records it, or
/// refuses with nothing created; the hosts then start their VMs. Returns the operation.
#[utoipa::path(post, path = "/v1/clusters", tag = "clusters", request_body = CreateCluster,
    responses((status = 202, body = Operation), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn create_cluster(
    State(ctl): State<Controller>,
    Json(req): Json<CreateCluster>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    Ok((StatusCode::ACCEPTED, Json(clusters::create_cluster(&ctl, req).await?)))
}

#[utoipa::path(get, path = "/v1/clusters", tag = "clusters", params(crate::api::Page), responses((status = 200, body = [ClusterView])))]
pub async fn list_clusters(
    State(ctl): State<Controller>,
    axum::extract::Query(page): axum::extract::Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<ClusterView>> {
    page.of(clusters::list(&ctl).await?)
}

#[utoipa::path(get, path = "/v1/clusters/{name}", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses((status = 200, body = ClusterView), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_cluster(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<ClusterView>> {
    Ok(Json(clusters::show(&ctl, &name).await?))
}

#[utoipa::path(post, path = "/v1/clusters/{name}/scale", tag = "clusters", request_body = ScaleCluster,
    params(("name" = String, Path, description = "Cluster name")),
    responses((status = 202, body = Operation), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn scale_cluster(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<ScaleCluster>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(clusters::scale_cluster(&ctl, &name, req.size).await?),
    ))
}

#[utoipa::path(delete, path = "/v1/clusters/{name}", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses((status = 202, body = Operation), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn delete_cluster(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    Ok((StatusCode::ACCEPTED, Json(clusters::delete_cluster(&ctl, &name).await?)))
}

/// Stops, starts, suspends or resumes every VM of a virtual cluster as one operation.
#[utoipa::path(post, path = "/v1/clusters/{name}/{action}", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name"),
           ("action" = String, Path, description = "`stop`, `start`, `suspend` or `resume`"), crate::api::vms::ActionQuery),
    responses((status = 202, body = Operation), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn cluster_action(
    State(ctl): State<Controller>,
    Path((name, verb)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<crate::api::vms::ActionQuery>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let a = crate::api::vms::action(&verb, q.force)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::domain::lifecycle::cluster_action(&ctl, &name, a).await?),
    ))
}
