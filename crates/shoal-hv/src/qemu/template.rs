//! Template materialisation: a template's files are fetched once per host into
//! `templates/<hex>/` and verified before any VM uses them; nothing unverified stays.

use std::path::{Path, PathBuf};

use shoal_model::agent::VmSpec;
use shoal_model::TemplateDisk;

use super::QemuDriver;
use crate::{HvError, TemplateFile};

/// A template's files on this host.
pub(super) struct Base {
    pub disk: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

impl QemuDriver {
    /// Files of the template on this host, fetched and verified once.
    pub(super) async fn template(&self, spec: &VmSpec) -> Result<Base, HvError> {
        let disk_hash = TemplateDisk::parse(&spec.template_hash)?;
        let hex = disk_hash.hex().to_string();
        let lock = self
            .template_locks
            .lock()
            .expect("template locks")
            .entry(hex.clone())
            .or_default()
            .clone();
        let _g = lock.lock().await;
        let dir = self.cfg.dir.join("templates").join(&hex);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(HvError::file("creating", &dir))?;
        let disk = dir.join(format!("disk.{}", spec.template_format));
        self.materialise(spec, TemplateFile::Disk, &disk, &disk_hash).await?;
        let (mut kernel, mut initrd) = (None, None);
        if let Some(kb) = &spec.kernel_boot {
            let k = dir.join("kernel");
            self.materialise(spec, TemplateFile::Kernel, &k, &TemplateDisk::parse(&kb.kernel_hash)?)
                .await?;
            kernel = Some(k);
            if let Some(h) = &kb.initrd_hash {
                let i = dir.join("initrd");
                self.materialise(spec, TemplateFile::Initrd, &i, &TemplateDisk::parse(h)?)
                    .await?;
                initrd = Some(i);
            }
        }
        Ok(Base { disk, kernel, initrd })
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
