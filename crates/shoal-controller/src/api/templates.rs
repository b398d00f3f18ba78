use std::path::{Path, PathBuf};

use axum::extract::{Multipart, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use shoal_model::{now_ms, validate_name, KernelBoot, Template};
use tokio::io::AsyncWriteExt;

use crate::datastore::{TemplateRecord, Tx};
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
    /// Console text the guest prints once configured.
    ready_pattern: Option<String>,
}

/// A file received from the upload: where it is, its size, hash and first bytes.
struct Received {
    path: PathBuf,
    size: u64,
    hash: String,
    head: Vec<u8>,
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
    let result = import(&ctl, &dir, multipart, &mut files).await;
    if result.is_err() {
        for f in &files {
            let _ = tokio::fs::remove_file(f).await;
        }
    }
    result.map(|t| (StatusCode::CREATED, Json(t)))
}

async fn import(ctl: &Controller, dir: &Path, mut form: Multipart, files: &mut Vec<PathBuf>) -> ApiResult<Template> {
    let bad = |e: axum::extract::multipart::MultipartError| ApiError::Invalid(format!("malformed upload: {e}"));
    let mut name: Option<String> = None;
    let (mut disk, mut kernel, mut initrd): (Option<Received>, Option<Received>, Option<Received>) = (None, None, None);
    let (mut cmdline, mut ready) = (None, None);
    let (mut manifest, mut source_format): (Option<String>, Option<String>) = (None, None);
    let id = uuid::Uuid::new_v4().simple().to_string();
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let field_name = field.name().unwrap_or_default().to_string();
        match field_name.as_str() {
            "name" => {
                let n = field.text().await.map_err(bad)?;
                validate_name("template", &n)?;
                if ctl.db.template(&n).await?.is_some() {
                    return Err(ApiError::exists("template", &n));
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
            "ready_pattern" => ready = Some(field.text().await.map_err(bad)?).filter(|s| !s.is_empty()),
            other => return Err(ApiError::Invalid(format!("unexpected upload field {other:?}"))),
        }
    }
    let name = name.ok_or_else(|| ApiError::Invalid("the upload has no template name".into()))?;
    if disk.is_some() == manifest.is_some() {
        return Err(ApiError::Invalid(format!(
            "template {name:?}: the upload needs either a disk image or the manifest id of an uploaded image"
        )));
    }
    if kernel.is_none() && (initrd.is_some() || cmdline.is_some()) {
        return Err(ApiError::Invalid(format!(
            "template {name:?}: an initrd or a kernel command line needs a kernel"
        )));
    }
    if let Some(k) = &kernel {
        let elf = k.head.starts_with(b"\x7fELF");
        let bz = k.head.len() >= 0x206 && &k.head[0x202..0x206] == b"HdrS";
        if !elf && !bz {
            return Err(ApiError::Invalid(format!(
                "template {name:?}: the kernel is neither an ELF vmlinux nor a bzImage"
            )));
        }
    }
    let kernel_boot = kernel.as_ref().map(|k| KernelBoot {
        kernel_hash: k.hash.clone(),
        kernel_size: k.size,
        initrd_hash: initrd.as_ref().map(|i| i.hash.clone()),
        initrd_size: initrd.as_ref().map(|i| i.size),
        cmdline: cmdline.clone().unwrap_or_else(|| "console=ttyS0".into()),
    });
    // The disk goes into the image store (or is there already): chunked, deduplicated, and
    // named `template/NAME` only if that name is free, so of two uploads of one name one wins.
    let image_ref = format!("template/{name}");
    let (manifest, format, size) = match (disk, manifest) {
        (Some(d), _) => {
            let (path, r) = (d.path.clone(), image_ref.clone());
            let rep = crate::api::images::blocking(ctl, move |s| {
                s.import_path(
                    &path,
                    &shoal_image::ImportOptions {
                        ref_name: Some(&r),
                        ..Default::default()
                    },
                )
            })
            .await
            .map_err(|e| match e {
                ApiError::Invalid(m) => ApiError::Invalid(format!("template {name:?}: {m}")),
                ApiError::Conflict(_) => ApiError::exists("template", &name),
                e => e,
            })?;
            let _ = tokio::fs::remove_file(&d.path).await;
            (
                rep.manifest,
                format!("{:?}", rep.format).to_lowercase(),
                rep.logical_bytes,
            )
        }
        (None, Some(m)) => {
            let id: shoal_image::ManifestId = m.parse().map_err(ApiError::from)?;
            let r = image_ref.clone();
            let size = crate::api::images::blocking(ctl, move |s| {
                let size = s.manifest(&id)?.size;
                s.create_ref(&r, &id)?;
                Ok(size)
            })
            .await
            .map_err(|e| match e {
                ApiError::NotFound { .. } => ApiError::Invalid(format!(
                    "template {name:?}: image manifest {m} is not in the store; upload its chunks and manifest first"
                )),
                ApiError::Conflict(_) => ApiError::exists("template", &name),
                e => e,
            })?;
            (id, source_format.clone().unwrap_or_else(|| "raw".into()), size)
        }
        (None, None) => unreachable!("checked above"),
    };
    let template = Template {
        name: name.clone(),
        format,
        size_bytes: size,
        hash: shoal_model::TemplateDisk::Manifest(manifest.to_hex()).to_string(),
        kernel_boot,
        ready_pattern: ready,
        created_unix_ms: now_ms(),
    };
    // Final names; the `.partial` files are renamed only once everything checked out.
    let final_path = |what: &str| dir.join(format!("{name}-{id}.{what}")).display().to_string();
    let rec = TemplateRecord {
        template: template.clone(),
        file: String::new(),
        kernel_file: kernel.as_ref().map(|_| final_path("kernel")),
        initrd_file: initrd.as_ref().map(|_| final_path("initrd")),
    };
    let moves = [
        (kernel.as_ref(), rec.kernel_file.as_ref()),
        (initrd.as_ref(), rec.initrd_file.as_ref()),
    ];
    for (r, f) in moves {
        if let (Some(r), Some(f)) = (r, f) {
            if let Err(e) = tokio::fs::rename(&r.path, f).await {
                let _ = ctl.images.delete_ref(&image_ref);
                return Err(ApiError::Internal(format!("storing template {name:?}: {e}")));
            }
            files.push(PathBuf::from(f));
        }
    }
    if !ctl.db.try_commit(Tx::new().create_template(&rec)).await? {
        let _ = ctl.images.delete_ref(&image_ref);
        return Err(ApiError::exists("template", &name));
    }
    Ok(template)
}

/// Writes one uploaded file to `path`, hashing it on the way.
async fn receive(mut field: axum::extract::multipart::Field<'_>, path: &Path) -> ApiResult<Received> {
    let io = |e: std::io::Error| ApiError::Internal(format!("writing {}: {e}", path.display()));
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
    page.of(ctl.db.templates().await?.into_iter().map(|t| t.template).collect())
}

#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, body = Template), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_template(State(ctl): State<Controller>, UrlPath(name): UrlPath<String>) -> ApiResult<Json<Template>> {
    ctl.db
        .template(&name)
        .await?
        .map(|v| Json(v.value.template))
        .ok_or_else(|| ApiError::not_found("template", name))
}

/// Deletes a template no profile or cluster uses.
#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn delete_template(State(ctl): State<Controller>, UrlPath(name): UrlPath<String>) -> ApiResult<Json<()>> {
    let _guard = ctl.db.lock().await;
    let rec = ctl
        .db
        .template(&name)
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
    if !ctl
        .db
        .try_commit(Tx::new().delete_template(&name, rec.mod_revision))
        .await?
    {
        return Err(ApiError::Conflict(format!(
            "template {name:?} changed while being deleted; try again"
        )));
    }
    if let Err(e) = ctl.images.delete_ref(&format!("template/{name}")) {
        tracing::warn!("template {name}: removing its image ref: {e}");
    }
    for f in rec.value.files() {
        if let Err(e) = tokio::fs::remove_file(f).await {
            tracing::warn!("template {name}: removing {f}: {e}");
        }
    }
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
    let name = req.name;
    validate_name("template", &name)?;
    if ctl.db.template(&name).await?.is_some() {
        return Err(ApiError::exists("template", &name));
    }
    let (vm, snap) = crate::api::vms::take_snapshot(&ctl, &req.vm).await?;
    let source = ctl
        .db
        .template(&vm.template)
        .await?
        .ok_or_else(|| ApiError::not_found("template", &vm.template))?
        .value;
    let id: shoal_image::ManifestId = snap.manifest.parse().map_err(ApiError::from)?;
    let image_ref = format!("template/{name}");
    let r = image_ref.clone();
    crate::api::images::blocking(&ctl, move |s| s.create_ref(&r, &id))
        .await
        .map_err(|e| match e {
            ApiError::Conflict(_) => ApiError::exists("template", &name),
            e => e,
        })?;
    // Kernel and initrd: linked (or copied) under the new template's name, so that deleting
    // either template leaves the other whole.
    let dir = ctl.config.data_dir.join("templates");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let mut made: Vec<PathBuf> = vec![];
    let mut link = |from: &Option<String>, what: &str| -> ApiResult<Option<String>> {
        let Some(from) = from else { return Ok(None) };
        let to = dir.join(format!("{name}-{suffix}.{what}"));
        std::fs::hard_link(from, &to)
            .or_else(|_| std::fs::copy(from, &to).map(|_| ()))
            .map_err(|e| ApiError::Internal(format!("copying {from} for template {name:?}: {e}")))?;
        made.push(to.clone());
        Ok(Some(to.display().to_string()))
    };
    let linked = link(&source.kernel_file, "kernel").and_then(|k| Ok((k, link(&source.initrd_file, "initrd")?)));
    let undo = |made: &[PathBuf]| {
        let _ = ctl.images.delete_ref(&image_ref);
        for f in made {
            let _ = std::fs::remove_file(f);
        }
    };
    let (kernel_file, initrd_file) = match linked {
        Ok(x) => x,
        Err(e) => {
            undo(&made);
            return Err(e);
        }
    };
    let template = Template {
        name: name.clone(),
        format: "raw".into(),
        size_bytes: snap.logical_bytes,
        hash: shoal_model::TemplateDisk::Manifest(snap.manifest.clone()).to_string(),
        kernel_boot: source.template.kernel_boot.clone(),
        ready_pattern: source.template.ready_pattern.clone(),
        created_unix_ms: now_ms(),
    };
    let rec = TemplateRecord {
        template: template.clone(),
        file: String::new(),
        kernel_file,
        initrd_file,
    };
    match ctl.db.try_commit(Tx::new().create_template(&rec)).await {
        Ok(true) => Ok((StatusCode::CREATED, Json(template))),
        Ok(false) => {
            undo(&made);
            Err(ApiError::exists("template", &name))
        }
        Err(e) => {
            undo(&made);
            Err(e)
        }
    }
}
