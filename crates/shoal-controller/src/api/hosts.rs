use axum::extract::State;
use axum::Json;
use shoal_model::Host;

use crate::error::ApiResult;
use crate::Controller;

/// Every host, with its liveness and what is claimed on it.
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", params(crate::api::Page), responses((status = 200, body = [Host])))]
pub async fn list_hosts(
    State(ctl): State<Controller>,
    axum::extract::Query(page): axum::extract::Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<Host>> {
    page.of(crate::domain::hosts::list(&ctl).await?)
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct JoinToken {
    /// Shown once; good for one agent registration.
    pub token: String,
}

/// A one-time token with which a new agent joins (`shoal agent --join-token`).
#[utoipa::path(post, path = "/v1/hosts/join-tokens", tag = "hosts", responses((status = 200, body = JoinToken)))]
pub async fn create_join_token(State(ctl): State<Controller>) -> ApiResult<Json<JoinToken>> {
    Ok(Json(JoinToken {
        token: ctl.mint_join_token().await?,
    }))
}
