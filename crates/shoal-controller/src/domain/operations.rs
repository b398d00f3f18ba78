//! Operations: what asynchronous requests report, step by step. The reconciler moves them on
//! and prunes finished ones (see `reconcile::operations_to_prune`).

use shoal_model::Operation;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// `operation list`, oldest first.
pub async fn list(ctl: &Controller) -> ApiResult<Vec<Operation>> {
    let mut ops = ctl.db.operations().await?;
    ops.sort_by_key(|o| (o.created_unix_ms, o.id));
    Ok(ops)
}

/// `operation show`.
pub async fn show(ctl: &Controller, id: &str) -> ApiResult<Operation> {
    let uuid: Uuid = id
        .parse()
        .map_err(|_| ApiError::Invalid(format!("invalid operation id {id:?}: expected a UUID")))?;
    ctl.db
        .operation(&uuid)
        .await?
        .ok_or_else(|| ApiError::not_found("operation", id))
}
