use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use shoal_model::api::{CreateProfile, ProfileView};

use crate::domain::profiles;
use crate::error::ApiResult;
use crate::Controller;

#[utoipa::path(post, path = "/v1/profiles", tag = "profiles", request_body = CreateProfile,
    responses((status = 201, body = ProfileView), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn create_profile(
    State(ctl): State<Controller>,
    Json(req): Json<CreateProfile>,
) -> ApiResult<(StatusCode, Json<ProfileView>)> {
    Ok((StatusCode::CREATED, Json(profiles::create(&ctl, &req).await?)))
}

#[utoipa::path(get, path = "/v1/profiles", tag = "profiles", params(crate::api::Page), responses((status = 200, body = [ProfileView])))]
pub async fn list_profiles(
    State(ctl): State<Controller>,
    axum::extract::Query(page): axum::extract::Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<ProfileView>> {
    page.of(profiles::list(&ctl).await?)
}

#[utoipa::path(get, path = "/v1/profiles/{name}", tag = "profiles",
    params(("name" = String, Path, description = "Profile name")),
    responses((status = 200, body = ProfileView), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_profile(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<ProfileView>> {
    Ok(Json(profiles::show(&ctl, &name).await?))
}

/// Deletes a profile no cluster and no other profile uses.
#[utoipa::path(delete, path = "/v1/profiles/{name}", tag = "profiles",
    params(("name" = String, Path, description = "Profile name")),
    responses((status = 200), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn delete_profile(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<()>> {
    profiles::delete(&ctl, &name).await?;
    Ok(Json(()))
}
