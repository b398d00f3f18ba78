//! Where agents join and report. Authenticated by join token or the agent's own credential, not
//! by the admin token.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use shoal_model::agent::{Heartbeat, RegisterRequest, RegisterResponse};
use shoal_model::{now_ms, validate_name};

use crate::auth::{self, TokenKind, TokenRecord};
use crate::datastore::{HostRecord, Tx};
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
    validate_name("host", &req.name)?;
    if req.cpus == 0 || req.memory_mib == 0 {
        return Err(ApiError::Invalid(format!(
            "host {:?} reports {} vCPU and {} MiB: both must be positive",
            req.name, req.cpus, req.memory_mib
        )));
    }
    req.allocation
        .check(req.cpus, req.memory_mib)
        .map_err(|e| ApiError::Invalid(format!("host {:?}: {e}", req.name)))?;
    let existing = ctl.db.host(&req.name).await?;
    let record = HostRecord {
        name: req.name.clone(),
        address: req.address.clone(),
        driver: req.driver.clone(),
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        joined_unix_ms: existing.as_ref().map(|e| e.joined_unix_ms).unwrap_or_else(now_ms),
        labels: req.labels.clone(),
        allocation: req.allocation.clone(),
        underlay_ip: req.underlay_ip,
        guest_mtu: req.guest_mtu,
        network_driver: req.network_driver.clone(),
    };
    let mut tx = Tx::new().put_host(&record);
    let mut credential = None;
    if ctl.auth_required() {
        let presented = auth::bearer(&headers).map(str::to_string);
        let by_credential = match &presented {
            Some(t) => auth::require_agent(&ctl, &headers, &req.name).await.is_ok() && !t.is_empty(),
            None => false,
        };
        if !by_credential {
            // A join token is spent in the same transaction that admits the host.
            let Some(join) = &req.join_token else {
                return Err(ApiError::Unauthorized(format!(
                    "host {:?} must join with a join token (shoal host join-token) or its credential",
                    req.name
                )));
            };
            let (rec, rev) = match auth::lookup(&ctl.db, join).await? {
                Some((r, rev)) if r.kind == TokenKind::Join => (r, rev),
                _ => return Err(ApiError::Unauthorized("invalid or already used join token".into())),
            };
            let _ = rec;
            let cred = auth::new_token();
            let agent_rec = TokenRecord {
                kind: TokenKind::Agent,
                host: Some(req.name.clone()),
                created_unix_ms: now_ms(),
            };
            tx = tx
                .spend_token(&auth::hash(join), rev)
                .create_token(&auth::hash(&cred), &agent_rec);
            credential = Some(cred);
        }
    }
    if let (Some(ip), Some(port)) = (req.underlay_ip, req.underlay_port) {
        // Before anything is written: a refused host joins nothing and keeps its join token.
        crate::network::check_underlay(&ctl, &req.name, ip, port).await?;
    }
    if !ctl.db.try_commit(tx).await? {
        return Err(ApiError::Unauthorized("invalid or already used join token".into()));
    }
    ctl.record_heartbeat(&req.name, Vec::new(), Vec::new());
    // A restarted agent has forgotten its networks' peers: send them again.
    ctl.peers_sent.lock().expect("peers_sent lock").remove(&req.name);
    tracing::info!(host = %req.name, address = %req.address, "host registered");
    ctl.wake.notify_one();
    Ok(Json(RegisterResponse {
        credential,
        controller_token: Some(ctl.controller_token().to_string()),
    }))
}

#[utoipa::path(post, path = "/v1/agents/{name}/heartbeat", tag = "agents", request_body = Heartbeat,
    params(("name" = String, Path, description = "Host name")),
    responses((status = 200), (status = 401, body = shoal_model::api::ErrorBody), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn heartbeat(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(hb): Json<Heartbeat>,
) -> ApiResult<Json<()>> {
    auth::require_agent(&ctl, &headers, &name).await?;
    ctl.db.known_host(&name).await?;
    ctl.record_heartbeat(&name, hb.vms, hb.images);
    Ok(Json(()))
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
