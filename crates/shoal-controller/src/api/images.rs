//! The controller's image store over HTTP: clients upload the chunks it lacks and then the
//! manifest; hosts fetch the chunks they lack. Chunk batches use the wire format of
//! `shoal_image::wire`; every blob is verified against its id before it is stored.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use shoal_image::{wire, ChunkId, ImageStore, ManifestId};
use shoal_model::api::{ChunkList, ChunkUpload, ImageGc, ImageStats, ImageVerify, ManifestRef};

use crate::auth;
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// The most chunks one request may ask for or carry.
pub const MAX_BATCH: usize = 4096;

impl From<shoal_image::Error> for ApiError {
    fn from(e: shoal_image::Error) -> ApiError {
        use shoal_image::Error as E;
        match e {
            E::Invalid(m) => ApiError::Invalid(m),
            E::Conflict(m) => ApiError::Conflict(m),
            E::NotFound(what) => ApiError::NotFound {
                kind: "image",
                name: what,
            },
            E::Missing(ids) => ApiError::Invalid(format!(
                "{} missing from the store, first {}: upload them first",
                shoal_model::plural(ids.len(), "chunk"),
                ids.first().map(|c| c.to_hex()).unwrap_or_default()
            )),
            E::Io(m, std::io::ErrorKind::StorageFull) => {
                ApiError::StorageFull(format!("the controller's disk is full: {m}; nothing was stored"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Runs blocking image-store work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    ctl: &Controller,
    f: impl FnOnce(&ImageStore) -> Result<T, shoal_image::Error> + Send + 'static,
) -> ApiResult<T> {
    let images = ctl.images.clone();
    tokio::task::spawn_blocking(move || f(&images))
        .await
        .map_err(|e| ApiError::Internal(format!("image store task: {e}")))?
        .map_err(ApiError::from)
}

fn parse_ids(list: &ChunkList) -> ApiResult<Vec<ChunkId>> {
    if list.chunks.len() > MAX_BATCH * 64 {
        return Err(ApiError::Invalid(format!(
            "{} chunk ids in one request; at most {}",
            list.chunks.len(),
            MAX_BATCH * 64
        )));
    }
    list.chunks
        .iter()
        .map(|c| c.parse::<ChunkId>().map_err(ApiError::from))
        .collect()
}

fn parse_manifest_id(id: &str) -> ApiResult<ManifestId> {
    id.parse().map_err(ApiError::from)
}

/// Which of the given chunks the controller's store lacks.
#[utoipa::path(post, path = "/v1/images/missing", tag = "images", request_body = ChunkList,
    responses((status = 200, body = ChunkList), (status = 400, body = shoal_model::api::ErrorBody)))]
pub async fn missing(State(ctl): State<Controller>, Json(list): Json<ChunkList>) -> ApiResult<Json<ChunkList>> {
    let ids = parse_ids(&list)?;
    let missing = blocking(&ctl, move |s| {
        Ok(ids
            .into_iter()
            .filter(|id| !s.backend().contains(id))
            .map(|id| id.to_hex())
            .collect())
    })
    .await?;
    Ok(Json(ChunkList { chunks: missing }))
}

/// Stores a batch of chunks (`id | u32 length | blob` records); all are verified or none is stored.
#[utoipa::path(post, path = "/v1/images/chunks", tag = "images",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ChunkUpload), (status = 400, body = shoal_model::api::ErrorBody)))]
pub async fn upload_chunks(State(ctl): State<Controller>, body: Bytes) -> ApiResult<Json<ChunkUpload>> {
    store_chunks(&ctl, body).await
}

async fn store_chunks(ctl: &Controller, body: Bytes) -> ApiResult<Json<ChunkUpload>> {
    let blobs = wire::decode_batch(&body)?;
    if blobs.len() > MAX_BATCH {
        return Err(ApiError::Invalid(format!(
            "{} chunks in one batch; at most {MAX_BATCH}",
            blobs.len()
        )));
    }
    let received = blobs.len() as u64;
    let new = blocking(ctl, move |s| {
        s.put_blobs(&blobs).map_err(|e| match e {
            shoal_image::Error::Corrupt(m) => shoal_image::Error::Invalid(format!("refused the batch: {m}")),
            e => e,
        })
    })
    .await?;
    Ok(Json(ChunkUpload { received, new }))
}

/// Stores a manifest once every chunk it names is stored.
#[utoipa::path(put, path = "/v1/images/manifests/{id}", tag = "images",
    params(("id" = String, Path, description = "Manifest id (BLAKE3 of its bytes, hex)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ManifestRef), (status = 400, body = shoal_model::api::ErrorBody)))]
pub async fn put_manifest(
    State(ctl): State<Controller>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ManifestRef>> {
    store_manifest(&ctl, &id, body).await
}

async fn store_manifest(ctl: &Controller, id: &str, body: Bytes) -> ApiResult<Json<ManifestRef>> {
    let want = parse_manifest_id(id)?;
    if ManifestId::of(&body) != want {
        return Err(ApiError::Invalid(format!("manifest body does not hash to {id}")));
    }
    let got = blocking(ctl, move |s| s.put_manifest(&body)).await?;
    Ok(Json(ManifestRef { manifest: got.to_hex() }))
}

/// An encoded manifest.
#[utoipa::path(get, path = "/v1/images/manifests/{id}", tag = "images",
    params(("id" = String, Path, description = "Manifest id (hex)")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn get_manifest(State(ctl): State<Controller>, Path(id): Path<String>) -> ApiResult<Vec<u8>> {
    let id = parse_manifest_id(&id)?;
    blocking(&ctl, move |s| s.manifest_bytes(&id)).await
}

/// The blobs of the given chunks, as a chunk batch; unknown ids are an error.
#[utoipa::path(post, path = "/v1/images/chunks/fetch", tag = "images", request_body = ChunkList,
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn fetch_chunks(State(ctl): State<Controller>, Json(list): Json<ChunkList>) -> ApiResult<Vec<u8>> {
    send_chunks(&ctl, list).await
}

async fn send_chunks(ctl: &Controller, list: ChunkList) -> ApiResult<Vec<u8>> {
    let ids = parse_ids(&list)?;
    if ids.len() > MAX_BATCH {
        return Err(ApiError::Invalid(format!(
            "{} chunks asked for at once; at most {MAX_BATCH}",
            ids.len()
        )));
    }
    blocking(ctl, move |s| {
        let mut blobs = Vec::with_capacity(ids.len());
        for id in ids {
            let b = s
                .get_blob(&id)?
                .ok_or_else(|| shoal_image::Error::NotFound(format!("chunk {id}")))?;
            blobs.push((id, b));
        }
        Ok(wire::encode_batch(&blobs))
    })
    .await
}

#[utoipa::path(get, path = "/v1/images/stats", tag = "images", responses((status = 200, body = ImageStats)))]
pub async fn stats(State(ctl): State<Controller>) -> ApiResult<Json<ImageStats>> {
    let s = blocking(&ctl, |s| s.stats()).await?;
    Ok(Json(ImageStats {
        logical_bytes: s.logical_bytes,
        stored_bytes: s.stored_bytes,
        chunks: s.chunks,
        chunk_bytes: s.chunk_bytes,
        manifests: s.manifests,
        refs: s.refs,
    }))
}

/// Removes images no template or snapshot names, and the chunks only they used.
#[utoipa::path(post, path = "/v1/images/gc", tag = "images", responses((status = 200, body = ImageGc)))]
pub async fn gc(State(ctl): State<Controller>) -> ApiResult<Json<ImageGc>> {
    let g = blocking(&ctl, |s| s.gc()).await?;
    Ok(Json(ImageGc {
        manifests_removed: g.manifests_removed,
        chunks_removed: g.chunks_removed,
        bytes_freed: g.bytes_freed,
    }))
}

/// Re-hashes every chunk; corrupt ones go to quarantine and the images they damage are named.
#[utoipa::path(post, path = "/v1/images/verify", tag = "images", responses((status = 200, body = ImageVerify)))]
pub async fn verify(State(ctl): State<Controller>) -> ApiResult<Json<ImageVerify>> {
    let v = blocking(&ctl, |s| s.verify()).await?;
    Ok(Json(ImageVerify {
        chunks_checked: v.chunks_checked,
        corrupt: v.corrupt.iter().map(|c| c.to_hex()).collect(),
        missing: v.missing.iter().map(|c| c.to_hex()).collect(),
        damaged: v.damaged_refs,
    }))
}

// ------------------------------------------------------------------ the same for agents

#[utoipa::path(get, path = "/v1/agents/{name}/images/manifests/{id}", tag = "agents",
    params(("name" = String, Path, description = "Host name"), ("id" = String, Path, description = "Manifest id (hex)")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = shoal_model::api::ErrorBody)))]
pub async fn agent_get_manifest(
    State(ctl): State<Controller>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Vec<u8>> {
    auth::require_agent(&ctl, &headers, &name).await?;
    let id = parse_manifest_id(&id)?;
    blocking(&ctl, move |s| s.manifest_bytes(&id)).await
}

#[utoipa::path(post, path = "/v1/agents/{name}/images/chunks/fetch", tag = "agents", request_body = ChunkList,
    params(("name" = String, Path, description = "Host name")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = shoal_model::api::ErrorBody)))]
pub async fn agent_fetch_chunks(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(list): Json<ChunkList>,
) -> ApiResult<Vec<u8>> {
    auth::require_agent(&ctl, &headers, &name).await?;
    send_chunks(&ctl, list).await
}

#[utoipa::path(post, path = "/v1/agents/{name}/images/missing", tag = "agents", request_body = ChunkList,
    params(("name" = String, Path, description = "Host name")),
    responses((status = 200, body = ChunkList), (status = 401, body = shoal_model::api::ErrorBody)))]
pub async fn agent_missing(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(list): Json<ChunkList>,
) -> ApiResult<Json<ChunkList>> {
    auth::require_agent(&ctl, &headers, &name).await?;
    missing(State(ctl), Json(list)).await
}

#[utoipa::path(post, path = "/v1/agents/{name}/images/chunks", tag = "agents",
    params(("name" = String, Path, description = "Host name")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ChunkUpload), (status = 401, body = shoal_model::api::ErrorBody)))]
pub async fn agent_upload_chunks(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<ChunkUpload>> {
    auth::require_agent(&ctl, &headers, &name).await?;
    store_chunks(&ctl, body).await
}

#[utoipa::path(put, path = "/v1/agents/{name}/images/manifests/{id}", tag = "agents",
    params(("name" = String, Path, description = "Host name"), ("id" = String, Path, description = "Manifest id (hex)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ManifestRef), (status = 401, body = shoal_model::api::ErrorBody)))]
pub async fn agent_put_manifest(
    State(ctl): State<Controller>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<ManifestRef>> {
    auth::require_agent(&ctl, &headers, &name).await?;
    store_manifest(&ctl, &id, body).await
}
