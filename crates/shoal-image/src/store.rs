//! The image store: chunks in a backend, manifests by id, named refs, and the operations on them.
//!
//! ```text
//! ROOT/chunks/       the pack backend (see backend/pack.rs)
//! ROOT/manifests/    one file per manifest, named by its id
//! ROOT/refs.json     name -> manifest id: the roots the garbage collector keeps
//! ROOT/quarantine/   blobs that failed verification, named by the id they claimed
//! ```
//! Imports and uploads hold the store's GC lock shared; `gc` holds it exclusively, so a chunk an
//! import found already present cannot be collected before the import's manifest is named.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::{ChunkBackend, ChunkWriter, PackBackend};
use crate::blob;
use crate::chunker::{split, ChunkParams, Cut, BLOCK};
use crate::id::{ChunkId, ManifestId};
use crate::manifest::{Extent, Manifest};
use crate::source::{self, ImageFormat, Layout, Segment};
use crate::Error;

/// Bytes read from the image per step of an import or a splice.
pub(crate) const READ_STEP: u64 = 8 << 20;

/// A progress callback: (bytes done, bytes in all).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// How to import.
#[derive(Default, Clone, Copy)]
pub struct ImportOptions<'a> {
    /// Take the file as this format instead of recognising it.
    pub format: Option<ImageFormat>,
    /// Read a qcow2 overlay through its backing chain (for VM disks) instead of refusing it.
    pub flatten: bool,
    /// Name the imported image with this ref, atomically; fails, changing nothing, if it exists.
    pub ref_name: Option<&'a str>,
    pub progress: Option<Progress<'a>>,
}

/// What an import did.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    pub manifest: ManifestId,
    pub format: ImageFormat,
    pub logical_bytes: u64,
    /// Bytes read from the file (holes and unallocated clusters are not read).
    pub read_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    /// Compressed bytes the import added to the store.
    pub new_stored_bytes: u64,
    pub seconds: f64,
}

/// What an export did.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub logical_bytes: u64,
    /// Bytes written (zero extents are left as holes).
    pub written_bytes: u64,
    pub seconds: f64,
}

/// What a transfer between two stores moved.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TransferReport {
    pub chunks_total: u64,
    pub chunks_sent: u64,
    /// Compressed bytes sent.
    pub bytes_sent: u64,
}

/// Totals of a store (`shoal image stats`).
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// Sum of the logical sizes of every manifest.
    pub logical_bytes: u64,
    /// Bytes the store occupies: packs (with garbage not yet compacted), indexes and manifests.
    pub stored_bytes: u64,
    pub chunks: u64,
    /// Compressed bytes of the chunks held.
    pub chunk_bytes: u64,
    pub manifests: u64,
    pub refs: u64,
}

/// What `gc` removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub manifests_removed: u64,
    pub chunks_removed: u64,
    pub bytes_freed: u64,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    /// Chunks whose content did not hash to their id: moved to quarantine.
    pub corrupt: Vec<ChunkId>,
    /// Chunks that manifests name but the store lacks (including the quarantined ones).
    pub missing: Vec<ChunkId>,
    /// Refs whose images are damaged by the above.
    pub damaged_refs: Vec<String>,
}

pub struct ImageStore {
    /// Held for the store's lifetime: one process at a time owns a store directory.
    _lock: nix::fcntl::Flock<File>,
    root: PathBuf,
    backend: Box<dyn ChunkBackend>,
    params: ChunkParams,
    gc_lock: RwLock<()>,
    refs_lock: Mutex<()>,
}

pub(crate) fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let m = format!("{what} {}", path.display());
    move |e| Error::Io(format!("{m}: {e}"), e.kind())
}

/// Writes a file atomically: temporary, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    let r = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("writing", &tmp)(e));
    }
    fs::rename(&tmp, path).map_err(io_err("renaming into", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", dir))?;
    }
    Ok(())
}

/// Takes the store's lock file, waiting while another process holds it.
fn lock_dir(root: &Path) -> Result<nix::fcntl::Flock<File>, Error> {
    let path = root.join("lock");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((_, nix::Error::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err((_, e)) => {
                return Err(Error::Conflict(format!(
                    "image store {} is in use by another process ({e})",
                    root.display()
                )))
            }
        }
    }
}

/// Ref names: letters, digits and `._-@/:`, not starting with `/` or `.`, at most 200 bytes.
pub fn check_ref_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with(['/', '.'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@/:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{name:?} is not a valid image name (letters, digits and ._-@/: only)"
        )))
    }
}

impl ImageStore {
    /// Opens (creating if needed) a store with the local pack backend under `root`. Waits up to
    /// a minute while another process has it open.
    pub fn open(root: &Path) -> Result<ImageStore, Error> {
        fs::create_dir_all(root).map_err(io_err("creating", root))?;
        let lock = lock_dir(root)?;
        let backend = PackBackend::open(&root.join("chunks"))?;
        drop(lock);
        Self::with_backend(root, Box::new(backend))
    }

    /// Opens a store keeping manifests and refs under `root` and chunks in `backend`.
    pub fn with_backend(root: &Path, backend: Box<dyn ChunkBackend>) -> Result<ImageStore, Error> {
        fs::create_dir_all(root.join("manifests")).map_err(io_err("creating", root))?;
        let lock = lock_dir(root)?;
        Ok(ImageStore {
            _lock: lock,
            root: root.to_path_buf(),
            backend,
            params: ChunkParams::V1,
            gc_lock: RwLock::new(()),
            refs_lock: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn backend(&self) -> &dyn ChunkBackend {
        &*self.backend
    }

    // ---------------------------------------------------------------- import

    /// Imports an image file (raw or qcow2): chunks it, stores the chunks the store lacks, writes
    /// its manifest and, if asked, names it. On any error the store is as it was.
    pub fn import_path(&self, path: &Path, opts: &ImportOptions<'_>) -> Result<ImportReport, Error> {
        let layout = if opts.flatten {
            source::flattened_layout(path)?
        } else {
            source::layout(path, opts.format)?
        };
        self.import_layout(&layout, opts)
    }

    fn import_layout(&self, layout: &Layout, opts: &ImportOptions<'_>) -> Result<ImportReport, Error> {
        let started = Instant::now();
        if let Some(name) = opts.ref_name {
            check_ref_name(name)?;
            if self.get_ref(name)?.is_some() {
                return Err(Error::Conflict(format!("image {name:?} already exists")));
            }
        }
        let mut image = self.new_image()?;
        let mut report = ImportReport {
            manifest: ManifestId([0; 32]),
            format: layout.format,
            logical_bytes: layout.size,
            read_bytes: 0,
            chunks: 0,
            new_chunks: 0,
            new_stored_bytes: 0,
            seconds: 0.0,
        };
        let file = File::open(&layout.file).map_err(io_err("opening", &layout.file))?;
        let file_len = file.metadata().map_err(io_err("reading", &layout.file))?.len();
        enum Piece {
            Zero(u64),
            /// `n` bytes at `buf[slack..]`; the room before them takes the previous tail.
            Data {
                guest: u64,
                buf: Vec<u8>,
                n: usize,
                last: bool,
            },
            Failed(Error),
        }
        let (tx, rx) = sync_channel::<Piece>(3);
        // Read buffers go back to the reader once absorbed: no allocating and zeroing per read.
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let slack = image.slack();
        std::thread::scope(|s| -> Result<(), Error> {
            let segments = &layout.segments;
            let (file, name) = (&file, &layout.file);
            s.spawn(move || {
                for seg in segments {
                    match *seg {
                        Segment::Zero { len, .. } => {
                            if tx.send(Piece::Zero(len)).is_err() {
                                return;
                            }
                        }
                        Segment::Data {
                            guest,
                            len,
                            file_offset,
                        } => {
                            let mut done = 0;
                            while done < len {
                                let n = READ_STEP.min(len - done);
                                let mut buf = free_rx
                                    .try_recv()
                                    .unwrap_or_else(|_| vec![0u8; slack + READ_STEP as usize]);
                                let piece = if file_offset + done + n > file_len {
                                    Piece::Failed(Error::Invalid(format!(
                                        "{} is truncated: it ends at byte {file_len}, its data continues to {}",
                                        name.display(),
                                        file_offset + len
                                    )))
                                } else {
                                    match file.read_exact_at(&mut buf[slack..slack + n as usize], file_offset + done) {
                                        Ok(()) => Piece::Data {
                                            guest: guest + done,
                                            buf,
                                            n: n as usize,
                                            last: done + n == len,
                                        },
                                        Err(e) => Piece::Failed(io_err("reading", name)(e)),
                                    }
                                };
                                let failed = matches!(piece, Piece::Failed(_));
                                if tx.send(piece).is_err() || failed {
                                    return;
                                }
                                done += n;
                            }
                        }
                    }
                }
            });
            let mut done = 0u64;
            for piece in rx {
                match piece {
                    Piece::Failed(e) => return Err(e),
                    Piece::Zero(len) => {
                        image.push(Extent::Zero { len });
                        done += len;
                    }
                    Piece::Data {
                        guest,
                        mut buf,
                        n,
                        last,
                    } => {
                        report.read_bytes += n as u64;
                        image.feed(&mut buf, n, guest, last)?;
                        let _ = free_tx.send(buf);
                        done += n as u64;
                    }
                }
                if let Some(p) = opts.progress {
                    p(done, layout.size);
                }
            }
            Ok(())
        })?;
        report.chunks = image.chunks;
        report.new_chunks = image.new_chunks;
        report.new_stored_bytes = image.new_stored_bytes;
        report.manifest = image.finish(layout.size, opts.ref_name, false)?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Starts a new image: see [`NewImage`].
    pub(crate) fn new_image(&self) -> Result<NewImage<'_>, Error> {
        let gc = self.gc_lock.read().expect("gc lock");
        let writer = self.backend.writer()?;
        Ok(NewImage {
            store: self,
            _gc: gc,
            writer,
            manifest: Manifest {
                params: self.params,
                size: 0,
                extents: vec![],
            },
            new_ids: vec![],
            chunks: 0,
            new_chunks: 0,
            new_stored_bytes: 0,
            carry: vec![],
            carry_base: 0,
        })
    }

    /// The chunking parameters this store cuts new images with.
    pub(crate) fn params(&self) -> ChunkParams {
        self.params
    }

    /// The content of the held chunk `id`, verified against its id and against the length `len`
    /// a manifest gives it.
    pub(crate) fn chunk_data(&self, id: &ChunkId, len: u64) -> Result<Vec<u8>, Error> {
        let b = self.backend.get(id)?.ok_or_else(|| Error::Missing(vec![*id]))?;
        let data = blob::open_verified(id, &b)?;
        if data.len() as u64 != len {
            return Err(Error::Corrupt(format!(
                "chunk {id} holds {} bytes, the manifest says {len}",
                data.len()
            )));
        }
        Ok(data)
    }

    // ---------------------------------------------------------------- export

    /// Writes the image `id` to `dest` as raw (sparse: zero extents stay holes) or qcow2, through
    /// a temporary renamed into place. Every chunk is verified against its id on the way.
    pub fn export(
        &self,
        id: &ManifestId,
        dest: &Path,
        format: ImageFormat,
        progress: Option<Progress<'_>>,
    ) -> Result<ExportReport, Error> {
        let started = Instant::now();
        let m = self.manifest(id)?;
        let part = PathBuf::from(format!("{}.part", dest.display()));
        let result = match format {
            ImageFormat::Raw => self.write_raw(&m, &part, progress),
            ImageFormat::Qcow2 => {
                let raw = PathBuf::from(format!("{}.raw.part", dest.display()));
                let r = self
                    .write_raw(&m, &raw, progress)
                    .and_then(|w| source::raw_to_qcow2(&raw, &part).map(|_| w));
                let _ = fs::remove_file(&raw);
                r
            }
        };
        let written = match result {
            Ok(w) => w,
            Err(e) => {
                let _ = fs::remove_file(&part);
                return Err(e);
            }
        };
        fs::rename(&part, dest).map_err(io_err("renaming into", dest))?;
        Ok(ExportReport {
            logical_bytes: m.size,
            written_bytes: written,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn write_raw(&self, m: &Manifest, path: &Path, progress: Option<Progress<'_>>) -> Result<u64, Error> {
        let f = File::create(path).map_err(io_err("creating", path))?;
        f.set_len(m.size).map_err(io_err("sizing", path))?;
        let chunks: Vec<(u64, ChunkId, u64)> = m.chunks().collect();
        let done = AtomicU64::new(0);
        let total = m.data_bytes();
        chunks.par_iter().try_for_each(|&(off, id, len)| -> Result<(), Error> {
            let data = self.chunk_data(&id, len)?;
            f.write_all_at(&data, off).map_err(io_err("writing", path))?;
            let d = done.fetch_add(len, Ordering::Relaxed) + len;
            if let Some(p) = progress {
                p(d, total);
            }
            Ok(())
        })?;
        f.sync_all().map_err(io_err("syncing", path))?;
        Ok(total)
    }

    // ---------------------------------------------------------------- manifests and chunks

    fn manifest_path(&self, id: &ManifestId) -> PathBuf {
        self.root.join("manifests").join(id.to_hex())
    }

    pub fn has_manifest(&self, id: &ManifestId) -> bool {
        self.manifest_path(id).exists()
    }

    /// The encoded manifest, checked against its id.
    pub fn manifest_bytes(&self, id: &ManifestId) -> Result<Vec<u8>, Error> {
        let p = self.manifest_path(id);
        let b = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("image manifest {id}")))
            }
            Err(e) => return Err(io_err("reading", &p)(e)),
        };
        if ManifestId::of(&b) != *id {
            return Err(Error::Corrupt(format!("manifest {id} does not hash to its name")));
        }
        Ok(b)
    }

    pub fn manifest(&self, id: &ManifestId) -> Result<Manifest, Error> {
        Manifest::decode(&self.manifest_bytes(id)?)
    }

    /// Every manifest id held.
    pub fn manifests(&self) -> Result<Vec<ManifestId>, Error> {
        let dir = self.root.join("manifests");
        let mut out = vec![];
        for e in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let e = e.map_err(io_err("listing", &dir))?;
            if let Some(id) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The distinct chunks of `m` this store lacks, in image order.
    pub fn missing(&self, m: &Manifest) -> Vec<ChunkId> {
        m.distinct_chunks()
            .into_iter()
            .filter(|id| !self.backend.contains(id))
            .collect()
    }

    /// The share of `m`'s data bytes whose chunks this store holds (image locality).
    pub fn present_share(&self, m: &Manifest) -> f64 {
        let total = m.data_bytes();
        if total == 0 {
            return 1.0;
        }
        let have: u64 = m
            .chunks()
            .filter(|(_, id, _)| self.backend.contains(id))
            .map(|(_, _, l)| l)
            .sum();
        have as f64 / total as f64
    }

    pub fn get_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, Error> {
        self.backend.get(id)
    }

    /// A held chunk's stored (compressed) length, without reading it.
    pub fn blob_size(&self, id: &ChunkId) -> Option<u64> {
        self.backend.size(id)
    }

    /// Stores blobs received from elsewhere, each verified against its id first; all or none.
    /// Returns the number that were new.
    pub fn put_blobs(&self, blobs: &[(ChunkId, Vec<u8>)]) -> Result<u64, Error> {
        blobs
            .par_iter()
            .try_for_each(|(id, b)| blob::open_verified(id, b).map(|_| ()))?;
        let _gc = self.gc_lock.read().expect("gc lock");
        let mut w = self.backend.writer()?;
        let mut new = 0;
        for (id, b) in blobs {
            if w.put(id, b)? {
                new += 1;
            }
        }
        w.commit()?;
        Ok(new)
    }

    /// Stores an encoded manifest received from elsewhere, once every chunk it names is here.
    pub fn put_manifest(&self, bytes: &[u8]) -> Result<ManifestId, Error> {
        let m = Manifest::decode(bytes)?;
        let _gc = self.gc_lock.read().expect("gc lock");
        let missing = self.missing(&m);
        if !missing.is_empty() {
            return Err(Error::Missing(missing));
        }
        let id = ManifestId::of(bytes);
        if !self.has_manifest(&id) {
            write_atomic(&self.manifest_path(&id), bytes)?;
        }
        Ok(id)
    }

    /// Copies image `id` from `src` into `dst`, sending only the chunks `dst` lacks.
    pub fn transfer(src: &ImageStore, dst: &ImageStore, id: &ManifestId) -> Result<TransferReport, Error> {
        let bytes = src.manifest_bytes(id)?;
        let m = Manifest::decode(&bytes)?;
        let missing = dst.missing(&m);
        let mut rep = TransferReport {
            chunks_total: m.distinct_chunks().len() as u64,
            ..Default::default()
        };
        for batch in missing.chunks(256) {
            let blobs = batch
                .iter()
                .map(|id| Ok((*id, src.get_blob(id)?.ok_or_else(|| Error::Missing(vec![*id]))?)))
                .collect::<Result<Vec<_>, Error>>()?;
            rep.bytes_sent += blobs.iter().map(|b| b.1.len() as u64).sum::<u64>();
            rep.chunks_sent += blobs.len() as u64;
            dst.put_blobs(&blobs)?;
        }
        dst.put_manifest(&bytes)?;
        Ok(rep)
    }

    // ---------------------------------------------------------------- refs

    fn read_refs(&self) -> Result<BTreeMap<String, ManifestId>, Error> {
        let p = self.root.join("refs.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Corrupt(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err("reading", &p)(e)),
        }
    }

    fn write_refs(&self, refs: &BTreeMap<String, ManifestId>) -> Result<(), Error> {
        let b = serde_json::to_vec_pretty(refs).expect("refs serialise");
        write_atomic(&self.root.join("refs.json"), &b)
    }

    pub fn refs(&self) -> Result<BTreeMap<String, ManifestId>, Error> {
        let _g = self.refs_lock.lock().expect("refs lock");
        self.read_refs()
    }

    pub fn get_ref(&self, name: &str) -> Result<Option<ManifestId>, Error> {
        Ok(self.refs()?.get(name).copied())
    }

    /// Points `name` at manifest `id` (which must be held), replacing what it named.
    pub fn set_ref(&self, name: &str, id: &ManifestId) -> Result<(), Error> {
        check_ref_name(name)?;
        // Shared GC lock: a concurrent gc either sees this ref or ran before the manifest check.
        let _gc = self.gc_lock.read().expect("gc lock");
        self.manifest(id)?;
        let _g = self.refs_lock.lock().expect("refs lock");
        let mut refs = self.read_refs()?;
        refs.insert(name.to_string(), *id);
        self.write_refs(&refs)
    }

    /// Names manifest `id` (which must be held) `name`, failing if the name is taken.
    pub fn create_ref(&self, name: &str, id: &ManifestId) -> Result<(), Error> {
        check_ref_name(name)?;
        let _gc = self.gc_lock.read().expect("gc lock");
        self.manifest(id)?;
        let _g = self.refs_lock.lock().expect("refs lock");
        let mut refs = self.read_refs()?;
        if refs.contains_key(name) {
            return Err(Error::Conflict(format!("image {name:?} already exists")));
        }
        refs.insert(name.to_string(), *id);
        self.write_refs(&refs)
    }

    /// Removes a ref; returns whether it existed. Its chunks go at the next `gc`.
    pub fn delete_ref(&self, name: &str) -> Result<bool, Error> {
        let _g = self.refs_lock.lock().expect("refs lock");
        let mut refs = self.read_refs()?;
        let had = refs.remove(name).is_some();
        if had {
            self.write_refs(&refs)?;
        }
        Ok(had)
    }

    // ---------------------------------------------------------------- maintenance

    /// Removes every manifest no ref names and every chunk no remaining manifest uses, then
    /// compacts. Waits for running imports and uploads; they wait for it.
    pub fn gc(&self) -> Result<GcReport, Error> {
        let _gc = self.gc_lock.write().expect("gc lock");
        let refs = self.refs()?;
        let live_manifests: HashSet<ManifestId> = refs.values().copied().collect();
        let mut report = GcReport::default();
        let mut live = HashSet::new();
        for id in self.manifests()? {
            if live_manifests.contains(&id) {
                let m = self.manifest(&id)?;
                live.extend(m.chunks().map(|c| c.1));
            } else {
                let p = self.manifest_path(&id);
                let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&p).map_err(io_err("removing", &p))?;
                report.manifests_removed += 1;
                report.bytes_freed += len;
            }
        }
        let dead: Vec<ChunkId> = self.backend.list().into_iter().filter(|c| !live.contains(c)).collect();
        let before = self.backend.usage().stored_bytes;
        self.backend.remove(&dead)?;
        self.backend.compact()?;
        report.chunks_removed = dead.len() as u64;
        report.bytes_freed += before.saturating_sub(self.backend.usage().stored_bytes);
        Ok(report)
    }

    /// Re-hashes every chunk; moves corrupt ones to quarantine and names the refs they damage.
    /// The chunks of image `id` that are missing or do not match their id (read and hashed,
    /// nothing changed): empty when the image can be exported whole. What a restart checks
    /// before it relies on an image.
    pub fn damaged(&self, id: &ManifestId) -> Result<Vec<ChunkId>, Error> {
        let m = self.manifest(id)?;
        let _gc = self.gc_lock.read().expect("gc lock");
        let mut bad: Vec<ChunkId> = m
            .distinct_chunks()
            .par_iter()
            .filter(|c| match self.backend.get(c) {
                Ok(Some(b)) => blob::open_verified(c, &b).is_err(),
                Ok(None) | Err(_) => true,
            })
            .copied()
            .collect();
        bad.sort();
        Ok(bad)
    }

    pub fn verify(&self) -> Result<VerifyReport, Error> {
        let _gc = self.gc_lock.write().expect("gc lock");
        let ids = self.backend.list();
        let corrupt: Vec<(ChunkId, Option<Vec<u8>>)> = ids
            .par_iter()
            .filter_map(|id| match self.backend.get(id) {
                Ok(Some(b)) => blob::open_verified(id, &b).err().map(|_| (*id, Some(b))),
                Ok(None) => None,
                Err(_) => Some((*id, None)),
            })
            .collect();
        let qdir = self.root.join("quarantine");
        for (id, b) in &corrupt {
            if let Some(b) = b {
                fs::create_dir_all(&qdir).map_err(io_err("creating", &qdir))?;
                write_atomic(&qdir.join(id.to_hex()), b)?;
            }
            tracing::warn!(chunk = %id, "corrupt chunk quarantined");
        }
        let bad: Vec<ChunkId> = corrupt.iter().map(|c| c.0).collect();
        self.backend.remove(&bad)?;
        let mut report = VerifyReport {
            chunks_checked: ids.len() as u64,
            corrupt: bad,
            ..Default::default()
        };
        let mut missing = HashSet::new();
        let refs = self.refs()?;
        for (name, id) in &refs {
            let damaged = match self.manifest(id) {
                Ok(m) => {
                    let lack = self.missing(&m);
                    let d = !lack.is_empty();
                    missing.extend(lack);
                    d
                }
                Err(_) => true,
            };
            if damaged {
                report.damaged_refs.push(name.clone());
            }
        }
        report.missing = missing.into_iter().collect();
        report.missing.sort();
        Ok(report)
    }

    pub fn stats(&self) -> Result<Stats, Error> {
        let u = self.backend.usage();
        let mut logical = 0;
        let mut manifest_bytes = 0;
        let ids = self.manifests()?;
        for id in &ids {
            let b = self.manifest_bytes(id)?;
            manifest_bytes += b.len() as u64;
            logical += Manifest::decode(&b)?.size;
        }
        Ok(Stats {
            logical_bytes: logical,
            stored_bytes: u.stored_bytes + manifest_bytes,
            chunks: u.chunks,
            chunk_bytes: u.blob_bytes,
            manifests: ids.len() as u64,
            refs: self.refs()?.len() as u64,
        })
    }
}

/// An image being written. New chunks go into a write session and extents into its manifest,
/// under the store's shared GC lock, so that a chunk found already held (or a kept extent of
/// another image) cannot be collected before the manifest is named. Nothing is visible before
/// [`NewImage::finish`]; dropped, it leaves the store as it was. Import and splice both build
/// images through it, so both chunk alike.
pub(crate) struct NewImage<'s> {
    store: &'s ImageStore,
    _gc: RwLockReadGuard<'s, ()>,
    writer: Box<dyn ChunkWriter + 's>,
    manifest: Manifest,
    /// Chunks this session wrote: removed again if naming the manifest fails after the commit.
    new_ids: Vec<ChunkId>,
    /// Chunk extents cut (not distinct).
    pub(crate) chunks: u64,
    /// Chunks the store lacked, and their compressed bytes.
    pub(crate) new_chunks: u64,
    pub(crate) new_stored_bytes: u64,
    /// The unfinished tail of the last piece fed, and its guest offset.
    carry: Vec<u8>,
    carry_base: u64,
}

impl NewImage<'_> {
    /// Room a piece's buffer keeps before its bytes, for the tail carried over from the piece
    /// before (less than the largest chunk).
    pub(crate) fn slack(&self) -> usize {
        (self.store.params.max_blocks as usize + 1) * BLOCK
    }

    /// The extents so far.
    pub(crate) fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Appends an extent as it is: zeros, or a chunk the store holds. Only between stretches of
    /// fed data, never inside one.
    pub(crate) fn push(&mut self, e: Extent) {
        debug_assert!(self.carry.is_empty(), "an extent pushed inside a stretch of data");
        self.manifest.push(e);
    }

    /// Chunks the `n` bytes at `buf[slack..]`, the first at guest offset `guest`. A stretch of
    /// data may come in several pieces, in order; `last` ends the stretch: every byte of it is
    /// then in the manifest and nothing is carried.
    pub(crate) fn feed(&mut self, buf: &mut [u8], n: usize, guest: u64, last: bool) -> Result<(), Error> {
        let slack = self.slack();
        // The previous piece's unfinished tail goes right before this piece's bytes.
        let base = if self.carry.is_empty() { guest } else { self.carry_base };
        let start = slack
            .checked_sub(self.carry.len())
            .expect("a tail is shorter than the largest chunk");
        buf[start..slack].copy_from_slice(&self.carry);
        let work = &buf[start..slack + n];
        let mut cuts = vec![];
        let rest = split(&self.store.params, work, base, last, &mut cuts);
        self.absorb(work, &cuts)?;
        self.carry.clear();
        if rest < work.len() {
            self.carry.extend_from_slice(&work[rest..]);
            self.carry_base = base + rest as u64;
        }
        Ok(())
    }

    /// Hashes the chunks of one buffer in parallel, compresses and stores the new ones, and
    /// appends the buffer's extents to the manifest.
    fn absorb(&mut self, work: &[u8], cuts: &[Cut]) -> Result<(), Error> {
        let data: Vec<&Cut> = cuts.iter().filter(|c| !c.zero).collect();
        let ids: Vec<ChunkId> = data.par_iter().map(|c| ChunkId::of(&work[c.start..c.end])).collect();
        let mut seen = HashSet::new();
        let fresh: Vec<usize> = (0..ids.len())
            .filter(|&i| !self.writer.contains(&ids[i]) && seen.insert(ids[i]))
            .collect();
        let blobs: Vec<Vec<u8>> = fresh
            .par_iter()
            .map(|&i| blob::encode(&work[data[i].start..data[i].end]))
            .collect();
        for (&i, b) in fresh.iter().zip(&blobs) {
            if self.writer.put(&ids[i], b)? {
                self.new_chunks += 1;
                self.new_stored_bytes += b.len() as u64;
                self.new_ids.push(ids[i]);
            }
        }
        self.chunks += ids.len() as u64;
        let mut next = ids.iter();
        for c in cuts {
            let len = (c.end - c.start) as u64;
            if c.zero {
                self.manifest.push(Extent::Zero { len });
            } else {
                self.manifest.push(Extent::Chunk {
                    id: *next.next().expect("one id per data cut"),
                    len,
                });
            }
        }
        Ok(())
    }

    /// Seals the image at `size` bytes, which its extents must cover exactly: commits its chunks,
    /// writes its manifest and, if asked, names it `ref_name`, replacing what that named when
    /// `replace`, else failing (leaving nothing behind) when the name is taken.
    pub(crate) fn finish(self, size: u64, ref_name: Option<&str>, replace: bool) -> Result<ManifestId, Error> {
        let NewImage {
            store,
            _gc,
            writer,
            mut manifest,
            new_ids,
            ..
        } = self;
        let covered: u64 = manifest.extents.iter().map(|e| e.len()).sum();
        if covered != size {
            return Err(Error::Corrupt(format!(
                "the image's extents cover {covered} of {size} bytes; refusing a partial image"
            )));
        }
        manifest.size = size;
        let bytes = manifest.encode();
        let id = ManifestId::of(&bytes);
        // Name check, commit, manifest and ref under the refs lock: of two imports of one name,
        // exactly one names it and the other leaves nothing behind.
        let _refs = store.refs_lock.lock().expect("refs lock");
        if let Some(name) = ref_name {
            if !replace && store.read_refs()?.contains_key(name) {
                return Err(Error::Conflict(format!("image {name:?} already exists")));
            }
        }
        writer.commit()?;
        let named = (|| {
            write_atomic(&store.manifest_path(&id), &bytes)?;
            if let Some(name) = ref_name {
                let mut refs = store.read_refs()?;
                refs.insert(name.to_string(), id);
                store.write_refs(&refs)?;
            }
            Ok(())
        })();
        if let Err(e) = named {
            let _ = store.backend.remove(&new_ids);
            return Err(e);
        }
        Ok(id)
    }
}
