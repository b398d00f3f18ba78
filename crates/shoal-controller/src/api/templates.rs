use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use futures::StreamExt;
use shoal_model::{now_ms, validate_name, Template};
use shoal_store::{Compare, Op, Txn};
use tokio::io::AsyncWriteExt;

use crate::db::{put, template_key, TemplateRecord};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Uploads an image file as a new template. The body is the image, streamed; it is hashed on the
/// way in and becomes visible only once complete.
#[utoipa::path(put, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The image (raw or qcow2)"),
    responses((status = 201, body = Template), (status = 400, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn import_template(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Template>)> {
    validate_name("template", &name)?;
    let key = template_key(&name);
    if ctl.db.store.get(&key).await?.is_some() {
        return Err(ApiError::exists("template", &name));
    }
    let dir = ctl.config.data_dir.join("templates");
    let file = dir.join(format!("{name}-{}.img", uuid::Uuid::new_v4().simple()));
    let tmp = file.with_extension("partial");
    let result = receive(body, &tmp).await;
    let (size, hash, head) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    if size == 0 {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(ApiError::Invalid(format!("template {name:?}: the image is empty")));
    }
    let template = Template {
        name: name.clone(),
        format: if head.starts_with(b"QFI\xfb") { "qcow2" } else { "raw" }.into(),
        size_bytes: size,
        hash: format!("blake3:{hash}"),
        created_unix_ms: now_ms(),
    };
    let rec = TemplateRecord {
        template: template.clone(),
        file: file.display().to_string(),
    };
    let committed = async {
        tokio::fs::rename(&tmp, &file)
            .await
            .map_err(|e| ApiError::Internal(format!("storing template {name:?}: {e}")))?;
        let r = ctl
            .db
            .store
            .txn(Txn::new().when(Compare::Version(key.clone(), 0)).then(put(key, &rec)))
            .await?;
        if !r.succeeded {
            return Err(ApiError::exists("template", &name));
        }
        Ok(())
    }
    .await;
    if let Err(e) = committed {
        let _ = tokio::fs::remove_file(&tmp).await;
        let _ = tokio::fs::remove_file(&file).await;
        return Err(e);
    }
    Ok((StatusCode::CREATED, Json(template)))
}

/// Writes the body to `path`, returning its size, BLAKE3 hex and first bytes.
async fn receive(body: Body, path: &std::path::Path) -> ApiResult<(u64, String, Vec<u8>)> {
    let io = |e: std::io::Error| ApiError::Internal(format!("writing {}: {e}", path.display()));
    let mut f = tokio::fs::File::create(path).await.map_err(io)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut head = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::Invalid(format!("upload interrupted after {size} bytes: {e}")))?;
        if head.len() < 8 {
            head.extend_from_slice(&chunk[..chunk.len().min(8 - head.len())]);
        }
        hasher.update(&chunk);
        f.write_all(&chunk).await.map_err(io)?;
        size += chunk.len() as u64;
    }
    f.sync_all().await.map_err(io)?;
    Ok((size, hasher.finalize().to_hex().to_string(), head))
}

#[utoipa::path(get, path = "/v1/templates", tag = "templates", responses((status = 200, body = [Template])))]
pub async fn list_templates(State(ctl): State<Controller>) -> ApiResult<Json<Vec<Template>>> {
    Ok(Json(ctl.db.templates().await?.into_iter().map(|t| t.template).collect()))
}

#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, body = Template), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_template(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<Template>> {
    ctl.db
        .get::<TemplateRecord>(&template_key(&name))
        .await?
        .map(|v| Json(v.value.template))
        .ok_or_else(|| ApiError::not_found("template", name))
}

/// Deletes a template no profile or cluster uses.
#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn delete_template(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<()>> {
    let _guard = ctl.write_lock.lock().await;
    let key = template_key(&name);
    let rec = ctl
        .db
        .get::<TemplateRecord>(&key)
        .await?
        .ok_or_else(|| ApiError::not_found("template", &name))?;
    let profiles: Vec<String> = ctl
        .db
        .profiles()
        .await?
        .into_iter()
        .filter(|p| p.template.as_deref() == Some(name.as_str()))
        .map(|p| p.name)
        .collect();
    let clusters: Vec<String> = ctl
        .db
        .clusters()
        .await?
        .into_iter()
        .filter(|c| c.shape.template == name)
        .map(|c| c.name)
        .collect();
    if !profiles.is_empty() || !clusters.is_empty() {
        return Err(ApiError::InUse(format!(
            "template {name:?} is in use by profiles [{}] and clusters [{}]",
            profiles.join(", "),
            clusters.join(", ")
        )));
    }
    let r = ctl
        .db
        .store
        .txn(Txn::new().when(Compare::ModRevision(key.clone(), rec.mod_revision)).then(Op::Delete(key)))
        .await?;
    if !r.succeeded {
        return Err(ApiError::Conflict(format!("template {name:?} changed while being deleted; try again")));
    }
    if let Err(e) = tokio::fs::remove_file(&rec.value.file).await {
        tracing::warn!("template {name}: removing {}: {e}", rec.value.file);
    }
    Ok(Json(()))
}
