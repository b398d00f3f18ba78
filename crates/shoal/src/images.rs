//! The CLI's side of the image store: templates are chunked here, into a local cache, and only
//! the chunks the controller lacks are uploaded; exports fetch only the chunks the cache lacks.
//! The cache is `$SHOAL_IMAGE_CACHE`, else `$XDG_CACHE_HOME/shoal/images`, else
//! `~/.cache/shoal/images`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use shoal_client::{Client, TemplateFiles};
use shoal_image::{ImageFormat, ImageStore, ImportOptions, ManifestId};
use shoal_model::{plural, Template};

/// Opens the CLI's local image cache.
pub fn cache() -> anyhow::Result<Arc<ImageStore>> {
    let dir = match (
        std::env::var_os("SHOAL_IMAGE_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    ) {
        (Some(d), _, _) => PathBuf::from(d),
        (None, Some(x), _) => PathBuf::from(x).join("shoal/images"),
        (None, None, Some(h)) => PathBuf::from(h).join(".cache/shoal/images"),
        _ => anyhow::bail!("no image cache: set SHOAL_IMAGE_CACHE or HOME"),
    };
    Ok(Arc::new(ImageStore::open(&dir).with_context(|| {
        format!("opening the image cache {}", dir.display())
    })?))
}

/// A bytes bar with throughput, drawn only on a terminal.
fn bar(prefix: &str) -> ProgressBar {
    let b = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    b.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_prefix(prefix.to_string());
    b
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// Chunks `file` into the cache, uploads what the controller lacks, and creates the template.
pub async fn import_template(
    client: &Client,
    name: &str,
    files: &TemplateFiles,
    format: Option<ImageFormat>,
) -> anyhow::Result<Template> {
    shoal_model::validate_name("template", name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = cache()?;
    let chunking = bar("chunking");
    let started = Instant::now();
    let rep = {
        let (store, file, b) = (store.clone(), files.disk.clone(), chunking.clone());
        tokio::task::spawn_blocking(move || {
            let progress = |done: u64, total: u64| {
                b.set_length(total);
                b.set_position(done);
            };
            store.import_path(
                &file,
                &ImportOptions {
                    format,
                    progress: Some(&progress),
                    ..Default::default()
                },
            )
        })
        .await?
        .with_context(|| format!("importing {}", files.disk.display()))?
    };
    chunking.finish_and_clear();
    eprintln!(
        "chunked {} ({:?}, {:.0} MB logical, {:.0} MB read) in {:.1} s: {}, {} new here",
        files.disk.display(),
        rep.format,
        mb(rep.logical_bytes),
        mb(rep.read_bytes),
        started.elapsed().as_secs_f64(),
        plural(rep.chunks, "chunk"),
        rep.new_chunks
    );
    let uploading = bar("uploading");
    let started = Instant::now();
    let t = {
        let u = uploading.clone();
        client
            .push_image(None, store.clone(), rep.manifest, &move |done, total| {
                u.set_length(total);
                u.set_position(done);
            })
            .await?
    };
    uploading.finish_and_clear();
    eprintln!(
        "uploaded {} of {} ({:.1} MB) in {:.1} s; the controller had the rest",
        t.chunks_sent,
        plural(t.chunks_total, "chunk"),
        mb(t.bytes_sent),
        started.elapsed().as_secs_f64()
    );
    let fmt = format!("{:?}", rep.format).to_lowercase();
    let template = client.create_template(name, &rep.manifest, &fmt, files).await?;
    // Keep the local copy named, so a re-import or an export of it moves nothing.
    let local = store.clone();
    let id = rep.manifest;
    let name = format!("template/{name}");
    tokio::task::spawn_blocking(move || local.set_ref(&name, &id)).await??;
    Ok(template)
}

/// What `template export` did.
#[derive(Debug, serde::Serialize)]
pub struct Exported {
    pub template: String,
    pub file: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    pub logical_bytes: u64,
    pub written_bytes: u64,
    /// Chunks fetched from the controller; the local cache had the rest.
    pub chunks_fetched: u64,
    pub chunks_total: u64,
}

/// Writes template `name`'s disk to `dest` as raw or qcow2, fetching the chunks the cache lacks.
pub async fn export_template(
    client: &Client,
    name: &str,
    dest: &Path,
    format: ImageFormat,
    force: bool,
) -> anyhow::Result<Exported> {
    if dest.exists() && !force {
        anyhow::bail!("{} exists; pass --force to overwrite it", dest.display());
    }
    let t = client.templates().await?.into_iter().find(|t| t.name == name);
    let t = t.ok_or_else(|| anyhow::anyhow!("template {name:?} not found"))?;
    let disk = t.disk()?;
    let hex = disk.manifest().ok_or_else(|| {
        anyhow::anyhow!(
            "template {name:?} predates the image store (hash {}); re-import it",
            t.hash
        )
    })?;
    let id: ManifestId = hex.parse()?;
    let store = cache()?;
    let fetching = bar("fetching");
    let started = Instant::now();
    let f = fetching.clone();
    let rep = client
        .pull_image(None, store.clone(), id, &move |done, total| {
            f.set_length(total);
            f.set_position(done);
        })
        .await?;
    fetching.finish_and_clear();
    eprintln!(
        "fetched {} of {} ({:.1} MB) in {:.1} s",
        rep.chunks_sent,
        plural(rep.chunks_total, "chunk"),
        mb(rep.bytes_sent),
        started.elapsed().as_secs_f64()
    );
    let writing = bar("writing");
    let started = Instant::now();
    let (w, d) = (writing.clone(), dest.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        let progress = |done: u64, total: u64| {
            w.set_length(total);
            w.set_position(done);
        };
        store.export(&id, &d, format, Some(&progress))
    })
    .await?
    .with_context(|| format!("writing {}", dest.display()))?;
    writing.finish_and_clear();
    eprintln!(
        "wrote {} ({:?}, {:.0} MB logical, {:.0} MB of data) in {:.1} s",
        dest.display(),
        format,
        mb(out.logical_bytes),
        mb(out.written_bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(Exported {
        template: name.to_string(),
        file: dest.to_path_buf(),
        format: format!("{format:?}").to_lowercase(),
        logical_bytes: out.logical_bytes,
        written_bytes: out.written_bytes,
        chunks_fetched: rep.chunks_sent,
        chunks_total: rep.chunks_total,
    })
}
