use axum::extract::{Path, State};
use axum::Json;
use shoal_model::Operation;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Every operation, oldest first.
#[utoipa::path(get, path = "/v1/operations", tag = "operations", responses((status = 200, body = [Operation])))]
pub async fn list_operations(State(ctl): State<Controller>) -> ApiResult<Json<Vec<Operation>>> {
    let mut ops = ctl.db.operations().await?;
    ops.sort_by_key(|o| (o.created_unix_ms, o.id));
    Ok(Json(ops))
}

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "operations",
    params(("id" = String, Path, description = "Operation id")),
    responses((status = 200, body = Operation), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_operation(State(ctl): State<Controller>, Path(id): Path<String>) -> ApiResult<Json<Operation>> {
    let uuid: Uuid = id
        .parse()
        .map_err(|_| ApiError::Invalid(format!("invalid operation id {id:?}: expected a UUID")))?;
    ctl.db
        .operation(&uuid)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("operation", id))
}
