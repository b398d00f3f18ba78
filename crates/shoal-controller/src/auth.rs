//! Authentication. On a loopback listener only local processes can connect, so requests are
//! trusted. On any other address every API request needs the admin bearer token, agents join with
//! a one-time join token and then use their own credential. Only hashes of tokens are stored.

use std::path::Path;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use shoal_model::now_ms;

use crate::datastore::{Datastore, Tx};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    Admin,
    /// Good for one agent registration, then deleted.
    Join,
    /// An agent's own credential, bound to its host name.
    Agent,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub kind: TokenKind,
    pub host: Option<String>,
    pub created_unix_ms: u64,
}

pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub fn hash(token: &str) -> String {
    hex::encode(blake3::hash(token.as_bytes()).as_bytes())
}

/// Reads a secret from `path`, creating it the first time. Returns the secret.
pub fn load_or_create_secret(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = new_token();
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(token)
}

/// Makes sure the store knows the hash of the admin token.
pub async fn register_token(db: &Datastore, token: &str, kind: TokenKind, host: Option<String>) -> ApiResult<()> {
    let rec = TokenRecord {
        kind,
        host,
        created_unix_ms: now_ms(),
    };
    // Already known (the same admin token after a restart): nothing to write.
    let _known = db.try_commit(Tx::new().create_token(&hash(token), &rec)).await?;
    Ok(())
}

pub async fn lookup(db: &Datastore, token: &str) -> ApiResult<Option<(TokenRecord, u64)>> {
    Ok(db.token(&hash(token)).await?.map(|v| (v.value, v.mod_revision)))
}

pub fn bearer(req: &axum::http::HeaderMap) -> Option<&str> {
    req.get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Guards the operator API: the admin token, when the listener is not loopback.
pub async fn require_admin(State(ctl): State<Controller>, req: Request, next: Next) -> Response {
    if ctl.auth_required() {
        let ok = match bearer(req.headers()) {
            Some(t) => matches!(lookup(&ctl.db, t).await, Ok(Some((r, _))) if r.kind == TokenKind::Admin),
            None => false,
        };
        if !ok {
            return ApiError::Unauthorized(
                "missing or invalid API token: pass it as 'Authorization: Bearer TOKEN' (the CLI reads $SHOAL_TOKEN)"
                    .into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Checks an agent's own credential for `host`, when authentication is required.
pub async fn require_agent(ctl: &Controller, headers: &axum::http::HeaderMap, host: &str) -> ApiResult<()> {
    check_agent(ctl, bearer(headers), host).await
}

/// Checks that `presented` is `host`'s own credential, when authentication is required.
pub async fn check_agent(ctl: &Controller, presented: Option<&str>, host: &str) -> ApiResult<()> {
    if !ctl.auth_required() {
        return Ok(());
    }
    let Some(t) = presented else {
        return Err(ApiError::Unauthorized(format!("agent {host:?} sent no credential")));
    };
    match lookup(&ctl.db, t).await? {
        Some((r, _)) if r.kind == TokenKind::Agent && r.host.as_deref() == Some(host) => Ok(()),
        _ => Err(ApiError::Unauthorized(format!("invalid credential for agent {host:?}"))),
    }
}
