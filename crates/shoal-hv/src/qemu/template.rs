//! Template materialisation: a template's files, and the checkpoint images that restarted VMs
//! sit on, are fetched once per host into `templates/<hex>/` and verified before any VM uses
//! them; nothing unverified stays.

use std::path::{Path, PathBuf};

use shoal_model::agent::VmSpec;
use shoal_model::{DiskFormat, TemplateDisk};

use super::QemuDriver;
use crate::{HvError, TemplateFile};

/// A template's files on this host.
pub(super) struct Base {
    /// The image the VM's overlay sits on: the template's disk, or the VM's disk base.
    pub disk: PathBuf,
    pub format: DiskFormat,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

impl QemuDriver {
    /// Files of the template on this host, fetched and verified once, with the VM's disk base
    /// in place of the template's disk when it has one (a checkpoint it was restarted from).
    /// Each image is kept under `templates/<its own hex>/`, so a checkpoint's disk is fetched
    /// once for all the VMs on it, and the template's kernel and initrd stay where they were.
    pub(super) async fn template(&self, spec: &VmSpec) -> Result<Base, HvError> {
        let template = TemplateDisk::parse(&spec.template_hash)?;
        let (disk, format) = match &spec.disk_base {
            None => {
                let name = format!("disk.{}", spec.template_format);
                let disk = self
                    .template_file(spec, template.hex(), &name, TemplateFile::Disk, &template)
                    .await?;
                (disk, spec.template_format)
            }
            Some(value) => {
                let base = match TemplateDisk::parse(value) {
                    Ok(b @ TemplateDisk::Manifest(_)) => b,
                    _ => {
                        return Err(HvError::BadDiskBase {
                            vm: spec.uuid,
                            value: value.clone(),
                        })
                    }
                };
                // The image store's disks are raw.
                let disk = self
                    .template_file(spec, base.hex(), "disk.raw", TemplateFile::Disk, &base)
                    .await?;
                (disk, DiskFormat::Raw)
            }
        };
        let (mut kernel, mut initrd) = (None, None);
        if let Some(kb) = &spec.kernel_boot {
            let hash = TemplateDisk::parse(&kb.kernel_hash)?;
            kernel = Some(
                self.template_file(spec, template.hex(), "kernel", TemplateFile::Kernel, &hash)
                    .await?,
            );
            if let Some(h) = &kb.initrd_hash {
                let hash = TemplateDisk::parse(h)?;
                initrd = Some(
                    self.template_file(spec, template.hex(), "initrd", TemplateFile::Initrd, &hash)
                        .await?,
                );
            }
        }
        Ok(Base {
            disk,
            format,
            kernel,
            initrd,
        })
    }

    /// `templates/<dir>/<name>`, materialised from `file` of the spec's template unless it is
    /// there already; one fetch at a time per directory.
    async fn template_file(
        &self,
        spec: &VmSpec,
        dir: &str,
        name: &str,
        file: TemplateFile,
        hash: &TemplateDisk,
    ) -> Result<PathBuf, HvError> {
        let lock = self
            .template_locks
            .lock()
            .expect("template locks")
            .entry(dir.to_string())
            .or_default()
            .clone();
        let _g = lock.lock().await;
        let dir = self.cfg.dir.join("templates").join(dir);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(HvError::file("creating", &dir))?;
        let path = dir.join(name);
        self.materialise(spec, file, &path, hash).await?;
        Ok(path)
    }

    async fn materialise(
        &self,
        spec: &VmSpec,
        file: TemplateFile,
        dest: &Path,
        hash: &TemplateDisk,
    ) -> Result<(), HvError> {
        if dest.exists() {
            return Ok(());
        }
        let tmp = dest.with_extension("partial");
        let fetch_err = |source| HvError::Fetch {
            template: spec.template.clone(),
            file,
            source,
        };
        match (file, hash) {
            (TemplateFile::Disk, TemplateDisk::Manifest(manifest)) => {
                // From the image store: each chunk was verified against its id on arrival.
                self.source
                    .fetch_image(&spec.template, manifest, &tmp)
                    .await
                    .map_err(fetch_err)?;
            }
            _ => {
                self.source.fetch(&spec.template, file, &tmp).await.map_err(fetch_err)?;
                let got = hash_file(&tmp).await.map_err(HvError::file("hashing", &tmp))?;
                let got = TemplateDisk::File(got);
                if &got != hash {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(HvError::CorruptTemplate {
                        template: spec.template.clone(),
                        file,
                        got: got.to_string(),
                        expected: hash.to_string(),
                    });
                }
            }
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(HvError::file("storing", dest))
    }
}

/// The BLAKE3 hash (hex) of a file's bytes.
async fn hash_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(path)?)?;
        Ok(h.finalize().to_hex().to_string())
    })
    .await
    .expect("hashing task")
}
