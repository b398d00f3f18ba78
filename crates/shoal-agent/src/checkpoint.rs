//! Disk checkpoints on the host: the controller asks for one (the driver reads the blocks
//! written since the last and sends the chunks the controller lacks), and asks other hosts to
//! hold a copy of one in their chunk cache, so that it is kept in two places.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_hv::{ErrorKind, SourceError};
use shoal_model::agent::{CheckpointDisk, HoldImage};

use crate::{bad_request, error_response, AgentState, ControllerTemplates};

/// `POST /v1/vms/{uuid}/checkpoint`: 404 for an unknown VM, 409 when it cannot be checkpointed
/// now (not running, migrating, no disks), 503 when the store could not be reached.
pub(crate) async fn checkpoint(
    State(state): State<AgentState>,
    uuid: Result<UrlPath<uuid::Uuid>, PathRejection>,
    req: Result<Json<CheckpointDisk>, JsonRejection>,
) -> Response {
    let (UrlPath(uuid), Json(req)) = match (uuid, req) {
        (Ok(u), Ok(r)) => (u, r),
        (Err(e), _) => return bad_request(e),
        (_, Err(e)) => return bad_request(e),
    };
    match state.hv.checkpoint(uuid, &req).await {
        Ok(c) => Json(c).into_response(),
        Err(e) => match e.kind() {
            ErrorKind::NotFound => error_response(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            ErrorKind::Retryable => error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
            _ => error_response(StatusCode::CONFLICT, "checkpoint_failed", e.to_string()),
        },
    }
}

/// `POST /v1/images/hold`: pulls an image of the controller's store whole into this host's
/// chunk cache and keeps it there.
pub(crate) async fn hold(State(state): State<AgentState>, req: Result<Json<HoldImage>, JsonRejection>) -> Response {
    let Json(req) = match req {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    match state.hv.hold_image(&req.manifest).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => match e.kind() {
            ErrorKind::Invalid => error_response(StatusCode::CONFLICT, "hold_failed", e.to_string()),
            _ => error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
        },
    }
}

impl ControllerTemplates {
    /// Pulls `manifest` and the chunks this host lacks from the controller (each verified on
    /// arrival) and names it `held/<manifest>` in the cache, so that nothing here drops it.
    pub(crate) async fn hold(&self, manifest: &str) -> Result<(), SourceError> {
        let id: shoal_image::ManifestId = manifest.parse().map_err(|e: shoal_image::Error| SourceError::Missing {
            what: format!("image {manifest}"),
            reason: e.to_string(),
        })?;
        let images = self.images().await?;
        let rep = self
            .client()
            .await?
            .pull_image(Some(&self.host), images.clone(), id, &|_, _| {})
            .await
            .map_err(|e| crate::source_error(format!("fetching image {manifest}"), e))?;
        let name = format!("held/{manifest}");
        tokio::task::spawn_blocking(move || images.set_ref(&name, &id))
            .await
            .map_err(|e| crate::cache_error("naming the held image")(e.into()))?
            .map_err(|e| crate::cache_error("naming the held image")(e.into()))?;
        tracing::info!(
            manifest,
            chunks = rep.chunks_total,
            fetched = rep.chunks_sent,
            "holding an image for the controller"
        );
        Ok(())
    }
}
