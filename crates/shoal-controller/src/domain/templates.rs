//! Templates: disk images (in the image store) with what they boot with. An upload's files
//! arrive as [`Upload`] (the HTTP layer streams them to disk, hashed); here they are checked,
//! the disk chunked into the image store and the template recorded, or everything undone.

use std::path::PathBuf;

use shoal_model::{now_ms, validate_name, KernelBoot, Template};

use crate::datastore::{TemplateRecord, Tx};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// A file received from an upload: where it is, its size, hash and first bytes.
pub struct Received {
    pub path: PathBuf,
    pub size: u64,
    pub hash: String,
    pub head: Vec<u8>,
}

/// What a template upload carried.
#[derive(Default)]
pub struct Upload {
    /// Names the upload's files (`<id>.<what>.partial`, then `<name>-<id>.<what>`).
    pub id: String,
    pub name: Option<String>,
    pub disk: Option<Received>,
    pub kernel: Option<Received>,
    pub initrd: Option<Received>,
    pub cmdline: Option<String>,
    pub ready: shoal_model::Readiness,
    pub manifest: Option<String>,
    pub source_format: Option<String>,
}

/// Whether `name` can be a new template's: valid, and not taken.
pub async fn check_new_name(ctl: &Controller, name: &str) -> ApiResult<()> {
    validate_name("template", name)?;
    if ctl.db.template(name).await?.is_some() {
        return Err(ApiError::exists("template", name));
    }
    Ok(())
}

/// `template import`: `files` collects every file written, for the caller to remove if this
/// fails.
pub async fn import(ctl: &Controller, upload: Upload, files: &mut Vec<PathBuf>) -> ApiResult<Template> {
    let dir = ctl.config.data_dir.join("templates");
    let Upload {
        id,
        name,
        disk,
        kernel,
        initrd,
        cmdline,
        ready,
        manifest,
        source_format,
    } = upload;
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
        ready,
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
                return Err(ApiError::from_io(format!("storing template {name:?}"), e));
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

/// `template list`.
pub async fn list(ctl: &Controller) -> ApiResult<Vec<Template>> {
    Ok(ctl.db.templates().await?.into_iter().map(|t| t.template).collect())
}

/// `template show`.
pub async fn show(ctl: &Controller, name: &str) -> ApiResult<Template> {
    ctl.db
        .template(name)
        .await?
        .map(|v| v.value.template)
        .ok_or_else(|| ApiError::not_found("template", name))
}

/// `template delete`: only a template no profile or cluster uses. VMs cloned from it keep
/// their hosts' base images; the image store keeps its chunks while anything names them.
pub async fn delete(ctl: &Controller, name: &str) -> ApiResult<()> {
    let _guard = ctl.db.lock().await;
    let rec = ctl
        .db
        .template(name)
        .await?
        .ok_or_else(|| ApiError::not_found("template", name))?;
    let profiles: Vec<String> = ctl
        .db
        .profiles()
        .await?
        .into_iter()
        .filter(|p| p.template.as_deref() == Some(name))
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
    super::refuse_in_use("template", name, &[("profiles", profiles), ("clusters", clusters)])?;
    if !ctl
        .db
        .try_commit(Tx::new().delete_template(name, rec.mod_revision))
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
    Ok(())
}

/// `template publish`: a VM's disk, as it is now, as a new template that boots like the VM's
/// own (like `incus publish`). The image shares every unchanged chunk with the original.
pub async fn publish(ctl: &Controller, req: shoal_model::api::PublishTemplate) -> ApiResult<Template> {
    let name = req.name;
    validate_name("template", &name)?;
    if ctl.db.template(&name).await?.is_some() {
        return Err(ApiError::exists("template", &name));
    }
    let (vm, snap) = super::vms::snapshot(ctl, &req.vm).await?;
    let source = ctl
        .db
        .template(&vm.template)
        .await?
        .ok_or_else(|| ApiError::not_found("template", &vm.template))?
        .value;
    let id: shoal_image::ManifestId = snap.manifest.parse().map_err(ApiError::from)?;
    let image_ref = format!("template/{name}");
    let r = image_ref.clone();
    crate::api::images::blocking(ctl, move |s| s.create_ref(&r, &id))
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
            .map_err(|e| ApiError::from_io(format!("copying {from} for template {name:?}"), e))?;
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
        ready: source.template.ready.clone(),
        created_unix_ms: now_ms(),
    };
    let rec = TemplateRecord {
        template: template.clone(),
        file: String::new(),
        kernel_file,
        initrd_file,
    };
    match ctl.db.try_commit(Tx::new().create_template(&rec)).await {
        Ok(true) => Ok(template),
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
