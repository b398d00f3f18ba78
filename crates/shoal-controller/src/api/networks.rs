//! `/v1/networks`: virtual networks that clusters join by name.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use shoal_model::network::{CreateNetwork, NetworkView, UpdateNetwork};

use crate::error::ApiResult;
use crate::{domain::networks, Controller};

/// Creates a network; its subnet and VNI are allocated when not given.
#[utoipa::path(post, path = "/v1/networks", tag = "networks", request_body = CreateNetwork,
    responses((status = 201, body = NetworkView), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn create_network(
    State(ctl): State<Controller>,
    Json(req): Json<CreateNetwork>,
) -> ApiResult<(StatusCode, Json<NetworkView>)> {
    Ok((StatusCode::CREATED, Json(networks::create(&ctl, &req).await?)))
}

#[utoipa::path(get, path = "/v1/networks", tag = "networks", params(crate::api::Page), responses((status = 200, body = [NetworkView])))]
pub async fn list_networks(
    State(ctl): State<Controller>,
    axum::extract::Query(page): axum::extract::Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<NetworkView>> {
    page.of(networks::list(&ctl).await?)
}

#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network name")),
    responses((status = 200, body = NetworkView), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_network(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<NetworkView>> {
    Ok(Json(networks::show(&ctl, &name).await?))
}

/// Changes a network's settings: `nat` switches its outbound access on or off (the reconciler
/// then sets up or removes the gateway on its host); `dns` replaces the guests' DNS servers,
/// which VMs created from then on get in their seeds.
#[utoipa::path(patch, path = "/v1/networks/{name}", tag = "networks", request_body = UpdateNetwork,
    params(("name" = String, Path, description = "Network name")),
    responses((status = 200, body = NetworkView), (status = 404, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn update_network(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<UpdateNetwork>,
) -> ApiResult<Json<NetworkView>> {
    Ok(Json(networks::update(&ctl, &name, &req).await?))
}

/// Deletes a network no cluster is on.
#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network name")),
    responses((status = 200), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn delete_network(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<()>> {
    networks::delete(&ctl, &name).await?;
    Ok(Json(()))
}
