//! The migration commands (controller → agent), each one call of the driver's migration steps:
//! the destination prepares and finishes, the source sends, reports progress and cancels.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_hv::{ErrorKind, HvError};
use shoal_model::agent::{MigrateOut, PrepareIncoming};
use uuid::Uuid;

use crate::{bad_request, error_response, AgentState};

/// A driver's refusal or failure as an answer: the kind decides the status, the code names it.
fn hv_error(e: HvError) -> Response {
    let status = match e.kind() {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Invalid => StatusCode::CONFLICT,
        ErrorKind::Retryable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Dead | ErrorKind::Host => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, e.kind().as_str(), e.to_string())
}

fn answer<T: serde::Serialize>(r: Result<T, HvError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => hv_error(e),
    }
}

pub(crate) async fn prepare_incoming(
    State(state): State<AgentState>,
    req: Result<Json<PrepareIncoming>, JsonRejection>,
) -> Response {
    match req {
        Ok(Json(req)) => answer(state.hv.prepare_incoming(&req.spec, req.listen).await),
        Err(e) => bad_request(e),
    }
}

pub(crate) async fn migrate_out(
    State(state): State<AgentState>,
    uuid: Result<UrlPath<Uuid>, PathRejection>,
    req: Result<Json<MigrateOut>, JsonRejection>,
) -> Response {
    match (uuid, req) {
        (Ok(UrlPath(uuid)), Ok(Json(req))) => answer(state.hv.migrate_out(uuid, &req).await),
        (Err(e), _) => bad_request(e),
        (_, Err(e)) => bad_request(e),
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct ProgressQuery {
    /// Answer as soon as the migration is over, or after this long with its progress (at most
    /// 10 s): the controller learns of the end within milliseconds, and the guest's pause is not
    /// lengthened by a polling interval.
    #[serde(default)]
    wait_ms: u64,
}

/// How often a waiting progress request looks again.
const WATCH: std::time::Duration = std::time::Duration::from_millis(2);

pub(crate) async fn progress(
    State(state): State<AgentState>,
    uuid: Result<UrlPath<Uuid>, PathRejection>,
    q: Result<Query<ProgressQuery>, QueryRejection>,
) -> Response {
    let (UrlPath(uuid), Query(q)) = match (uuid, q) {
        (Ok(u), Ok(q)) => (u, q),
        (Err(e), _) => return bad_request(e),
        (_, Err(e)) => return bad_request(e),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(q.wait_ms.min(10_000));
    loop {
        let p = state.hv.migration(uuid).await;
        match &p {
            Ok(p) if !p.phase.is_over() && tokio::time::Instant::now() < deadline => tokio::time::sleep(WATCH).await,
            _ => return answer(p),
        }
    }
}

pub(crate) async fn cancel(State(state): State<AgentState>, uuid: Result<UrlPath<Uuid>, PathRejection>) -> Response {
    match uuid {
        Ok(UrlPath(uuid)) => answer(state.hv.cancel_migration(uuid).await),
        Err(e) => bad_request(e),
    }
}

pub(crate) async fn finish(State(state): State<AgentState>, uuid: Result<UrlPath<Uuid>, PathRejection>) -> Response {
    match uuid {
        Ok(UrlPath(uuid)) => answer(state.hv.finish_incoming(uuid).await),
        Err(e) => bad_request(e),
    }
}
