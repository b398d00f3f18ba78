use axum::extract::{Path, State};
use axum::Json;
use shoal_model::Operation;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Operations, oldest first: those still running and finished ones within the retention
/// (`--operation-retention`, at most `--operations-kept` of them).
#[utoipa::path(get, path = "/v1/operations", tag = "operations", params(crate::api::Page), responses((status = 200, body = [Operation])))]
pub async fn list_operations(
    State(ctl): State<Controller>,
    axum::extract::Query(page): axum::extract::Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<Operation>> {
    let mut ops = ctl.db.operations().await?;
    ops.sort_by_key(|o| (o.created_unix_ms, o.id));
    page.of(ops)
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
