//! Chunks packed into large append-only files with a compact index, in a local directory.
//!
//! ```text
//! DIR/00000001.pack   blobs back to back
//! DIR/00000001.idx    "SHOALIX1" then 44-byte records: chunk id (32), offset u64, length u32
//! ```
//! One write session writes one pack. Its index is written to a temporary file, synced and
//! renamed into place at commit: a pack without an index is an aborted session and is deleted
//! when the directory is next opened. Removing chunks rewrites the affected indexes (atomically,
//! by rename); `compact` copies the live blobs of mostly-dead packs into a new pack and deletes
//! the old ones. The whole index is held in memory: 48 bytes per chunk plus the map's overhead,
//! about 10 MB for a 1 TB store of 16 KiB chunks after compression.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{ChunkBackend, ChunkWriter, Usage};
use crate::id::ChunkId;
use crate::Error;

const IDX_MAGIC: &[u8; 8] = b"SHOALIX1";
const RECORD: usize = 44;
/// A pack whose live blobs are less than this share of it is rewritten by `compact`.
const COMPACT_BELOW: f64 = 0.5;

#[derive(Clone, Copy, Debug)]
struct Loc {
    pack: u32,
    offset: u64,
    len: u32,
}

#[derive(Default)]
struct Inner {
    index: HashMap<ChunkId, Loc>,
    /// Per pack: its file length and the bytes of its blobs still indexed.
    packs: BTreeMap<u32, (u64, u64)>,
    next_pack: u32,
    files: HashMap<u32, Arc<File>>,
}

pub struct PackBackend {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    let what = what.to_string();
    move |e| Error::Io(format!("{what} {path}: {e}"), e.kind())
}

impl PackBackend {
    /// Opens (creating if needed) a pack directory, deleting packs of aborted sessions.
    pub fn open(dir: &Path) -> Result<PackBackend, Error> {
        fs::create_dir_all(dir).map_err(io(dir, "creating"))?;
        let mut inner = Inner {
            next_pack: 1,
            ..Default::default()
        };
        let mut packs = vec![];
        for entry in fs::read_dir(dir).map_err(io(dir, "listing"))? {
            let path = entry.map_err(io(dir, "listing"))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.ends_with(".tmp") {
                fs::remove_file(&path).map_err(io(&path, "removing"))?;
            } else if let Some(seq) = name.strip_suffix(".pack").and_then(|s| s.parse::<u32>().ok()) {
                packs.push(seq);
            }
        }
        packs.sort_unstable();
        for seq in packs {
            inner.next_pack = inner.next_pack.max(seq + 1);
            let pack = pack_path(dir, seq);
            let idx = idx_path(dir, seq);
            if !idx.exists() {
                tracing::info!(pack = %pack.display(), "removing the pack of an aborted write session");
                fs::remove_file(&pack).map_err(io(&pack, "removing"))?;
                continue;
            }
            let pack_len = fs::metadata(&pack).map_err(io(&pack, "reading"))?.len();
            let mut live = 0u64;
            for (id, offset, len) in read_idx(&idx)? {
                if offset + len as u64 > pack_len {
                    tracing::warn!(pack = %pack.display(), chunk = %id, "index entry beyond the end of its pack: dropped");
                    continue;
                }
                if inner.index.insert(id, Loc { pack: seq, offset, len }).is_none() {
                    live += len as u64;
                }
            }
            inner.packs.insert(seq, (pack_len, live));
        }
        Ok(PackBackend {
            dir: dir.to_path_buf(),
            inner: Mutex::new(inner),
        })
    }

    fn file(&self, inner: &mut Inner, pack: u32) -> Result<Arc<File>, Error> {
        if let Some(f) = inner.files.get(&pack) {
            return Ok(f.clone());
        }
        let path = pack_path(&self.dir, pack);
        let f = Arc::new(File::open(&path).map_err(io(&path, "opening"))?);
        inner.files.insert(pack, f.clone());
        Ok(f)
    }

    /// Rewrites the index of `pack` from the in-memory index (after removals or moves).
    fn rewrite_idx(&self, inner: &Inner, pack: u32) -> Result<(), Error> {
        let mut records: Vec<(ChunkId, u64, u32)> = inner
            .index
            .iter()
            .filter(|(_, l)| l.pack == pack)
            .map(|(id, l)| (*id, l.offset, l.len))
            .collect();
        records.sort_by_key(|r| r.1);
        write_idx(&self.dir, pack, &records)
    }
}

fn pack_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:08}.pack"))
}

fn idx_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:08}.idx"))
}

fn read_idx(path: &Path) -> Result<Vec<(ChunkId, u64, u32)>, Error> {
    let b = fs::read(path).map_err(io(path, "reading"))?;
    if b.len() < 8 || &b[..8] != IDX_MAGIC || (b.len() - 8) % RECORD != 0 {
        return Err(Error::Corrupt(format!("pack index {} is damaged", path.display())));
    }
    Ok(b[8..]
        .chunks_exact(RECORD)
        .map(|r| {
            (
                ChunkId(r[..32].try_into().expect("32")),
                u64::from_le_bytes(r[32..40].try_into().expect("8")),
                u32::from_le_bytes(r[40..44].try_into().expect("4")),
            )
        })
        .collect())
}

/// Writes an index atomically (temporary file, fsync, rename, fsync of the directory).
fn write_idx(dir: &Path, seq: u32, records: &[(ChunkId, u64, u32)]) -> Result<(), Error> {
    let path = idx_path(dir, seq);
    if records.is_empty() {
        return match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, "removing")(e)),
        };
    }
    let tmp = dir.join(format!("{seq:08}.idx.tmp"));
    let mut buf = Vec::with_capacity(8 + records.len() * RECORD);
    buf.extend_from_slice(IDX_MAGIC);
    for (id, off, len) in records {
        buf.extend_from_slice(&id.0);
        buf.extend_from_slice(&off.to_le_bytes());
        buf.extend_from_slice(&len.to_le_bytes());
    }
    let mut f = File::create(&tmp).map_err(io(&tmp, "creating"))?;
    f.write_all(&buf).map_err(io(&tmp, "writing"))?;
    f.sync_all().map_err(io(&tmp, "syncing"))?;
    fs::rename(&tmp, &path).map_err(io(&path, "renaming into"))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "syncing"))
}

impl ChunkBackend for PackBackend {
    fn writer(&self) -> Result<Box<dyn ChunkWriter + '_>, Error> {
        Ok(Box::new(PackWriter {
            backend: self,
            out: None,
            records: vec![],
            seen: HashSet::new(),
            len: 0,
        }))
    }

    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, Error> {
        let (loc, file) = {
            let mut inner = self.inner.lock().expect("lock");
            let Some(loc) = inner.index.get(id).copied() else {
                return Ok(None);
            };
            (loc, self.file(&mut inner, loc.pack)?)
        };
        let mut buf = vec![0u8; loc.len as usize];
        let path = pack_path(&self.dir, loc.pack);
        file.read_exact_at(&mut buf, loc.offset).map_err(io(&path, "reading"))?;
        Ok(Some(buf))
    }

    fn contains(&self, id: &ChunkId) -> bool {
        self.inner.lock().expect("lock").index.contains_key(id)
    }

    fn size(&self, id: &ChunkId) -> Option<u64> {
        self.inner.lock().expect("lock").index.get(id).map(|l| l.len as u64)
    }

    fn list(&self) -> Vec<ChunkId> {
        self.inner.lock().expect("lock").index.keys().copied().collect()
    }

    fn remove(&self, ids: &[ChunkId]) -> Result<(), Error> {
        let mut inner = self.inner.lock().expect("lock");
        let mut touched = HashSet::new();
        for id in ids {
            if let Some(loc) = inner.index.remove(id) {
                touched.insert(loc.pack);
                if let Some(p) = inner.packs.get_mut(&loc.pack) {
                    p.1 -= loc.len as u64;
                }
            }
        }
        for pack in touched {
            self.rewrite_idx(&inner, pack)?;
        }
        Ok(())
    }

    fn compact(&self) -> Result<u64, Error> {
        let mut inner = self.inner.lock().expect("lock");
        let victims: Vec<u32> = inner
            .packs
            .iter()
            .filter(|(_, &(len, live))| (live as f64) < COMPACT_BELOW * len as f64)
            .map(|(&seq, _)| seq)
            .collect();
        if victims.is_empty() {
            return Ok(0);
        }
        let mut freed = 0u64;
        // Copy the survivors of every victim into one new pack.
        let seq = inner.next_pack;
        inner.next_pack += 1;
        let new_path = pack_path(&self.dir, seq);
        let mut moved: Vec<(ChunkId, u64, u32)> = vec![];
        {
            let mut out = BufWriter::new(File::create(&new_path).map_err(io(&new_path, "creating"))?);
            let mut at = 0u64;
            let live: Vec<(ChunkId, Loc)> = inner
                .index
                .iter()
                .filter(|(_, l)| victims.contains(&l.pack))
                .map(|(i, l)| (*i, *l))
                .collect();
            for (id, loc) in live {
                let f = self.file(&mut inner, loc.pack)?;
                let mut buf = vec![0u8; loc.len as usize];
                f.read_exact_at(&mut buf, loc.offset)
                    .map_err(io(&pack_path(&self.dir, loc.pack), "reading"))?;
                out.write_all(&buf).map_err(io(&new_path, "writing"))?;
                moved.push((id, at, loc.len));
                at += loc.len as u64;
            }
            let f = out.into_inner().map_err(|e| io(&new_path, "writing")(e.into_error()))?;
            f.sync_all().map_err(io(&new_path, "syncing"))?;
        }
        if moved.is_empty() {
            fs::remove_file(&new_path).map_err(io(&new_path, "removing"))?;
        } else {
            write_idx(&self.dir, seq, &moved)?;
            let len: u64 = moved.iter().map(|m| m.2 as u64).sum();
            inner.packs.insert(seq, (len, len));
            for (id, offset, len) in &moved {
                inner.index.insert(
                    *id,
                    Loc {
                        pack: seq,
                        offset: *offset,
                        len: *len,
                    },
                );
            }
        }
        for v in victims {
            let (len, _) = inner.packs.remove(&v).unwrap_or_default();
            inner.files.remove(&v);
            write_idx(&self.dir, v, &[])?;
            let p = pack_path(&self.dir, v);
            fs::remove_file(&p).map_err(io(&p, "removing"))?;
            freed += len;
        }
        let added: u64 = moved.iter().map(|m| m.2 as u64).sum();
        Ok(freed.saturating_sub(added))
    }

    fn usage(&self) -> Usage {
        let inner = self.inner.lock().expect("lock");
        let blob_bytes = inner.index.values().map(|l| l.len as u64).sum();
        let files: u64 = inner.packs.values().map(|p| p.0).sum();
        let idx = inner.index.len() as u64 * RECORD as u64 + inner.packs.len() as u64 * 8;
        Usage {
            chunks: inner.index.len() as u64,
            blob_bytes,
            stored_bytes: files + idx,
        }
    }
}

struct PackWriter<'a> {
    backend: &'a PackBackend,
    out: Option<(u32, BufWriter<File>)>,
    records: Vec<(ChunkId, u64, u32)>,
    seen: HashSet<ChunkId>,
    len: u64,
}

impl ChunkWriter for PackWriter<'_> {
    fn put(&mut self, id: &ChunkId, blob: &[u8]) -> Result<bool, Error> {
        if self.contains(id) {
            return Ok(false);
        }
        if self.out.is_none() {
            let seq = {
                let mut inner = self.backend.inner.lock().expect("lock");
                inner.next_pack += 1;
                inner.next_pack - 1
            };
            let path = pack_path(&self.backend.dir, seq);
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io(&path, "creating"))?;
            self.out = Some((seq, BufWriter::with_capacity(1 << 20, f)));
        }
        let (seq, out) = self.out.as_mut().expect("opened");
        out.write_all(blob)
            .map_err(io(&pack_path(&self.backend.dir, *seq), "writing"))?;
        self.records.push((*id, self.len, blob.len() as u32));
        self.seen.insert(*id);
        self.len += blob.len() as u64;
        Ok(true)
    }

    fn contains(&self, id: &ChunkId) -> bool {
        self.seen.contains(id) || self.backend.contains(id)
    }

    fn commit(mut self: Box<Self>) -> Result<(), Error> {
        let Some((seq, out)) = self.out.take() else {
            return Ok(());
        };
        let dir = &self.backend.dir;
        let path = pack_path(dir, seq);
        let result = (|| {
            let f = out.into_inner().map_err(|e| io(&path, "writing")(e.into_error()))?;
            f.sync_all().map_err(io(&path, "syncing"))?;
            write_idx(dir, seq, &self.records)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(idx_path(dir, seq));
            return Err(e);
        }
        let mut inner = self.backend.inner.lock().expect("lock");
        let mut live = 0u64;
        for (id, offset, len) in self.records.drain(..) {
            if let std::collections::hash_map::Entry::Vacant(v) = inner.index.entry(id) {
                v.insert(Loc { pack: seq, offset, len });
                live += len as u64;
            }
        }
        inner.packs.insert(seq, (self.len, live));
        Ok(())
    }
}

impl Drop for PackWriter<'_> {
    fn drop(&mut self) {
        // Not committed: the session's pack goes away, nothing else was touched.
        if let Some((seq, out)) = self.out.take() {
            drop(out.into_parts());
            let _ = fs::remove_file(pack_path(&self.backend.dir, seq));
        }
    }
}
