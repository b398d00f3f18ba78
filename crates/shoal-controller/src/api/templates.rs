use shoal_model::Readiness;
use std::path::{Path, PathBuf};

use axum::extract::{Multipart, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use shoal_model::Template;
use tokio::io::AsyncWriteExt;

use crate::domain::templates::{self, Received, Upload};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// The multipart form of a template upload, for the API document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct TemplateUpload {
    /// Template name; send it first, so that a taken name is refused before the upload.
    name: String,
    /// The disk image (raw or qcow2), chunked into the image store on arrival; or instead:
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    disk: Option<Vec<u8>>,
    /// The id of an image already uploaded to the store (`/v1/images/...`): chunks, then manifest.
    manifest: Option<String>,
    /// With `manifest`: the format of the file it came from (`raw` or `qcow2`), for display.
    format: Option<String>,
    /// Kernel for direct kernel boot (vmlinux ELF or bzImage).
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    kernel: Option<Vec<u8>>,
    /// Initial ramdisk for direct kernel boot.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    initrd: Option<Vec<u8>>,
    /// Kernel command line.
    cmdline: Option<String>,
    /// How Shoal learns a VM is configured: `report` (the default: the guest reports through
    /// Shoal's seed, as cloud-init images and the demo guest do) or `running` (a running QEMU
    /// counts as ready).
    ready: Option<String>,
    /// Instead of `ready`: console text the guest prints once configured.
    ready_pattern: Option<String>,
}

/// Uploads a template: a disk image, and for direct kernel boot a kernel, an initrd and a
/// command line. Files are hashed on the way in; the template appears only once all is stored.
#[utoipa::path(post, path = "/v1/templates", tag = "templates",
    request_body(content = TemplateUpload, content_type = "multipart/form-data"),
    responses((status = 201, body = Template), (status = 400, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn import_template(
    State(ctl): State<Controller>,
    multipart: Multipart,
) -> ApiResult<(StatusCode, Json<Template>)> {
    let dir = ctl.config.data_dir.join("templates");
    let mut files: Vec<PathBuf> = Vec::new();
    let result = match read_upload(&ctl, &dir, multipart, &mut files).await {
        Ok(upload) => templates::import(&ctl, upload, &mut files).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        for f in &files {
            let _ = tokio::fs::remove_file(f).await;
        }
    }
    result.map(|t| (StatusCode::CREATED, Json(t)))
}

/// Reads the multipart form, streaming each file to `dir` (listed in `files`) as it arrives.
async fn read_upload(ctl: &Controller, dir: &Path, mut form: Multipart, files: &mut Vec<PathBuf>) -> ApiResult<Upload> {
    let bad = |e: axum::extract::multipart::MultipartError| ApiError::Invalid(format!("malformed upload: {e}"));
    let mut name: Option<String> = None;
    let (mut disk, mut kernel, mut initrd): (Option<Received>, Option<Received>, Option<Received>) = (None, None, None);
    let (mut cmdline, mut ready_kind, mut ready_pattern) = (None, None, None);
    let (mut manifest, mut source_format): (Option<String>, Option<String>) = (None, None);
    let id = uuid::Uuid::new_v4().simple().to_string();
    // A taken name is refused before any file is stored. The rest of a small upload is still
    // read, so that the client, which is still sending, gets the refusal rather than a reset
    // connection; past REFUSED_DRAIN the connection is dropped instead.
    const REFUSED_DRAIN: u64 = 4 << 20;
    let mut refused: Option<(ApiError, u64)> = None;
    while let Some(mut field) = form.next_field().await.map_err(bad)? {
        if let Some((_, drained)) = refused.as_mut() {
            while let Some(c) = field.chunk().await.map_err(bad)? {
                *drained += c.len() as u64;
                if *drained > REFUSED_DRAIN {
                    break;
                }
            }
            if *drained > REFUSED_DRAIN {
                break;
            }
            continue;
        }
        let field_name = field.name().unwrap_or_default().to_string();
        match field_name.as_str() {
            "name" => {
                let n = field.text().await.map_err(bad)?;
                if let Err(e) = templates::check_new_name(ctl, &n).await {
                    refused = Some((e, 0));
                    continue;
                }
                name = Some(n);
            }
            "disk" | "kernel" | "initrd" => {
                let path = dir.join(format!("{id}.{field_name}.partial"));
                files.push(path.clone());
                let r = receive(field, &path).await?;
                match field_name.as_str() {
                    "disk" => disk = Some(r),
                    "kernel" => kernel = Some(r),
                    _ => initrd = Some(r),
                }
            }
            "manifest" => manifest = Some(field.text().await.map_err(bad)?.trim().to_string()),
            "format" => source_format = Some(field.text().await.map_err(bad)?.trim().to_string()),
            "cmdline" => cmdline = Some(field.text().await.map_err(bad)?),
            "ready" => ready_kind = Some(field.text().await.map_err(bad)?.trim().to_string()),
            "ready_pattern" => ready_pattern = Some(field.text().await.map_err(bad)?).filter(|s| !s.is_empty()),
            other => refused = Some((ApiError::Invalid(format!("unexpected upload field {other:?}")), 0)),
        }
    }
    if let Some((e, _)) = refused {
        return Err(e);
    }
    let ready = match (ready_kind.as_deref(), ready_pattern) {
        (None | Some("report"), None) => Readiness::Report,
        (Some("running"), None) => Readiness::Running,
        (None | Some("pattern"), Some(p)) => Readiness::Pattern(p),
        (Some(k @ ("report" | "running")), Some(_)) => {
            return Err(ApiError::Invalid(format!(
                "ready {k:?} and a ready_pattern contradict each other: give one"
            )))
        }
        (Some(k), _) => {
            return Err(ApiError::Invalid(format!(
                "invalid ready {k:?}: report or running (or a ready_pattern)"
            )))
        }
    };
    Ok(Upload {
        id,
        name,
        disk,
        kernel,
        initrd,
        cmdline,
        ready,
        manifest,
        source_format,
    })
}

/// Writes one uploaded file to `path`, hashing it on the way.
async fn receive(mut field: axum::extract::multipart::Field<'_>, path: &Path) -> ApiResult<Received> {
    let io = |e: std::io::Error| ApiError::from_io(format!("writing {}", path.display()), e);
    let mut f = tokio::fs::File::create(path).await.map_err(io)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut head = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::Invalid(format!("upload interrupted after {size} bytes: {e}")))?
    {
        if head.len() < 1024 {
            head.extend_from_slice(&chunk[..chunk.len().min(1024 - head.len())]);
        }
        hasher.update(&chunk);
        f.write_all(&chunk).await.map_err(io)?;
        size += chunk.len() as u64;
    }
    f.sync_all().await.map_err(io)?;
    Ok(Received {
        path: path.to_path_buf(),
        size,
        hash: shoal_model::TemplateDisk::File(hasher.finalize().to_hex().to_string()).to_string(),
        head,
    })
}

#[utoipa::path(get, path = "/v1/templates", tag = "templates", params(crate::api::Page), responses((status = 200, body = [Template])))]
pub async fn list_templates(
    State(ctl): State<Controller>,
    axum::extract::Query(page): axum::extract::Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<Template>> {
    page.of(templates::list(&ctl).await?)
}

#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, body = Template), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_template(State(ctl): State<Controller>, UrlPath(name): UrlPath<String>) -> ApiResult<Json<Template>> {
    Ok(Json(templates::show(&ctl, &name).await?))
}

/// Deletes a template no profile or cluster uses.
#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn delete_template(State(ctl): State<Controller>, UrlPath(name): UrlPath<String>) -> ApiResult<Json<()>> {
    templates::delete(&ctl, &name).await?;
    Ok(Json(()))
}

/// Turns a VM's disk, as it is now, into a new template that boots like the VM's own template
/// (like `incus publish`). The image shares every unchanged chunk with the original.
#[utoipa::path(post, path = "/v1/templates/publish", tag = "templates", request_body = shoal_model::api::PublishTemplate,
    responses((status = 201, body = Template), (status = 400, body = shoal_model::api::ErrorBody), (status = 404, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn publish_template(
    State(ctl): State<Controller>,
    Json(req): Json<shoal_model::api::PublishTemplate>,
) -> ApiResult<(StatusCode, Json<Template>)> {
    Ok((StatusCode::CREATED, Json(templates::publish(&ctl, req).await?)))
}
