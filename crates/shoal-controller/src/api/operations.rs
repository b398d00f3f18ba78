use axum::extract::{Path, State};
use axum::Json;
use shoal_model::Operation;

use crate::domain::operations;
use crate::error::ApiResult;
use crate::Controller;

/// Operations, oldest first: those still running and finished ones within the retention
/// (`--operation-retention`, at most `--operations-kept` of them).
#[utoipa::path(get, path = "/v1/operations", tag = "operations", params(crate::api::Page), responses((status = 200, body = [Operation])))]
pub async fn list_operations(
    State(ctl): State<Controller>,
    axum::extract::Query(page): axum::extract::Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<Operation>> {
    page.of(operations::list(&ctl).await?)
}

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "operations",
    params(("id" = String, Path, description = "Operation id")),
    responses((status = 200, body = Operation), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_operation(State(ctl): State<Controller>, Path(id): Path<String>) -> ApiResult<Json<Operation>> {
    Ok(Json(operations::show(&ctl, &id).await?))
}
