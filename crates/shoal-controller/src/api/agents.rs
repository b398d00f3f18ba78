//! Where agents join and report. Authenticated by join token or the agent's own credential, not
//! by the admin token.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use shoal_model::agent::{Heartbeat, HeartbeatReply, RegisterRequest, RegisterResponse};

use crate::auth;
use crate::domain::agents;
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// An agent joins (with a one-time join token) or re-registers (with its credential).
#[utoipa::path(post, path = "/v1/agents/register", tag = "agents", request_body = RegisterRequest,
    responses((status = 200, body = RegisterResponse), (status = 401, body = shoal_model::api::ErrorBody)))]
pub async fn register(
    State(ctl): State<Controller>,
    headers: HeaderMap,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<Json<RegisterResponse>> {
    Ok(Json(agents::register(&ctl, auth::bearer(&headers), req).await?))
}

#[utoipa::path(post, path = "/v1/agents/{name}/heartbeat", tag = "agents", request_body = Heartbeat,
    params(("name" = String, Path, description = "Host name")),
    responses((status = 200, body = HeartbeatReply), (status = 401, body = shoal_model::api::ErrorBody), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn heartbeat(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(hb): Json<Heartbeat>,
) -> ApiResult<Json<HeartbeatReply>> {
    Ok(Json(agents::heartbeat(&ctl, auth::bearer(&headers), &name, hb).await?))
}

/// Streams one file of a template to an agent materialising it.
#[utoipa::path(get, path = "/v1/agents/{name}/templates/{template}/{file}", tag = "agents",
    params(("name" = String, Path, description = "Host name"), ("template" = String, Path, description = "Template name"),
           ("file" = String, Path, description = "`disk`, `kernel` or `initrd`")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = shoal_model::api::ErrorBody), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn template_file(
    State(ctl): State<Controller>,
    Path((name, template, file)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<axum::response::Response> {
    auth::require_agent(&ctl, &headers, &name).await?;
    let rec = ctl
        .db
        .template(&template)
        .await?
        .ok_or_else(|| ApiError::not_found("template", &template))?
        .value;
    let path = match file.as_str() {
        "disk" if rec.file.is_empty() => {
            return Err(ApiError::Invalid(format!(
                "the disk of template {template:?} is in the image store ({}): fetch its chunks",
                rec.template.hash
            )))
        }
        "disk" => Some(rec.file),
        "kernel" => rec.kernel_file,
        "initrd" => rec.initrd_file,
        _ => {
            return Err(ApiError::Invalid(format!(
                "unknown template file {file:?}: expected disk, kernel or initrd"
            )))
        }
    }
    .ok_or_else(|| ApiError::not_found("template file", format!("{template}/{file}")))?;
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("opening {path}: {e}")))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20));
    Ok(axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
        .header(axum::http::header::CONTENT_LENGTH, len)
        .body(body)
        .expect("valid response"))
}
