//! The embedded backend: an in-memory ordered map made durable by a write-ahead log and
//! periodic snapshots in one directory.
//!
//! Directory layout:
//! - `lock`: held with an exclusive advisory lock for as long as the store is open.
//! - `wal`: frames `[u32 len LE][u32 crc32 LE of payload][payload]`, one per applied transaction.
//! - `snapshot`: the whole map and its revision, replaced atomically by rename.
//! - `snapshot.tmp`: a snapshot being written; a leftover one is from a crash and is discarded.
//!
//! Writers are serialized by one mutex that also owns the WAL. A commit plans its changes under a
//! read lock on the state, makes them durable without holding any state lock, and only then
//! applies them under a short write lock, so readers never wait on an fsync and never see a write
//! that is not yet durable.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{
    Compare, EventKind, KeyValue, Op, RangeResponse, Store, StoreError, Txn, TxnResponse, WatchEvent, Watcher,
};

const LOCK_FILE: &str = "lock";
const WAL_FILE: &str = "wal";
const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TMP_FILE: &str = "snapshot.tmp";

const FRAME_HEADER_LEN: usize = 8;
const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

const SNAPSHOT_MAGIC: &[u8; 8] = b"SHOALSNP";
const SNAPSHOT_FORMAT: u32 = 1;
/// Magic, format, body length and body CRC.
const SNAPSHOT_HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Tuning knobs for [`FileStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Once the WAL is larger than this, the commit that grew it also writes a snapshot and
    /// restarts the WAL, bounding both disk use and recovery time.
    pub wal_limit_bytes: u64,
    /// How many recent events are kept so that watchers can resume from an older revision.
    pub history_limit: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            wal_limit_bytes: 64 * 1024 * 1024,
            history_limit: 100_000,
        }
    }
}

/// The embedded [`Store`]: in memory, optionally persisted to a directory.
///
/// Cloning is cheap and yields another handle to the same store; the directory lock is released
/// when the last handle is dropped.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    dir: Option<PathBuf>,
    options: Options,
    state: RwLock<State>,
    /// Held for the whole of a commit; `None` inside for an in-memory store.
    writer: Mutex<Option<Disk>>,
}

/// One key's data; the key itself is the map key, so it is not stored twice.
struct Stored {
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

impl Stored {
    fn to_kv(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
}

/// An effective write: what a transaction actually changes, after dropping no-op deletes and
/// expanding prefix deletes. This is what the WAL records, so replay never depends on
/// re-evaluating a transaction.
#[derive(Debug)]
enum Change {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

struct WatchSlot {
    prefix: String,
    after: u64,
    tx: mpsc::UnboundedSender<WatchEvent>,
}

struct State {
    entries: BTreeMap<String, Stored>,
    revision: u64,
    /// Recent events in revision order.
    history: VecDeque<WatchEvent>,
    /// Every event with a revision above this is in `history`.
    history_floor: u64,
    watchers: Vec<WatchSlot>,
}

impl State {
    fn new() -> Self {
        Self {
            entries: BTreeMap::new(),
            revision: 0,
            history: VecDeque::new(),
            history_floor: 0,
            watchers: Vec::new(),
        }
    }

    fn under_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Stored)> {
        self.entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::ModRevision(key, want) => self.entries.get(key).map_or(0, |e| e.mod_revision) == *want,
            Compare::Version(key, want) => self.entries.get(key).map_or(0, |e| e.version) == *want,
            Compare::Value(key, want) => self.entries.get(key).is_some_and(|e| e.value == *want),
        }
    }

    /// Resolves `ops` against the current state into the changes they make, in order.
    fn plan(&self, ops: Vec<Op>) -> Vec<Change> {
        // Earlier ops of the same transaction are not in the map yet; this records whether each
        // key they touched exists after them.
        let mut overlay: HashMap<String, bool> = HashMap::new();
        let mut changes = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put(key, value) => {
                    overlay.insert(key.clone(), true);
                    changes.push(Change::Put { key, value });
                }
                Op::Delete(key) => {
                    let exists = overlay
                        .get(&key)
                        .copied()
                        .unwrap_or_else(|| self.entries.contains_key(&key));
                    if exists {
                        overlay.insert(key.clone(), false);
                        changes.push(Change::Delete { key });
                    }
                }
                Op::DeletePrefix(prefix) => {
                    let mut doomed: BTreeSet<String> = self
                        .under_prefix(&prefix)
                        .filter(|(k, _)| overlay.get(k.as_str()) != Some(&false))
                        .map(|(k, _)| k.clone())
                        .collect();
                    doomed.extend(
                        overlay
                            .iter()
                            .filter(|(k, exists)| **exists && k.starts_with(&prefix))
                            .map(|(k, _)| k.clone()),
                    );
                    for key in doomed {
                        overlay.insert(key.clone(), false);
                        changes.push(Change::Delete { key });
                    }
                }
            }
        }
        changes
    }

    /// Applies `changes` as `revision`. Fails only if a delete names a missing key, which a
    /// planned transaction never does, so for replay it means the log disagrees with the state.
    fn apply(&mut self, revision: u64, changes: Vec<Change>, want_events: bool) -> Result<Vec<WatchEvent>, String> {
        let mut events = Vec::with_capacity(if want_events { changes.len() } else { 0 });
        for change in changes {
            match change {
                Change::Put { key, value } => {
                    if let Some(e) = self.entries.get_mut(&key) {
                        e.value = value;
                        e.mod_revision = revision;
                        e.version += 1;
                        if want_events {
                            events.push(WatchEvent {
                                kind: EventKind::Put,
                                kv: e.to_kv(&key),
                            });
                        }
                    } else {
                        let e = Stored {
                            value,
                            create_revision: revision,
                            mod_revision: revision,
                            version: 1,
                        };
                        if want_events {
                            events.push(WatchEvent {
                                kind: EventKind::Put,
                                kv: e.to_kv(&key),
                            });
                        }
                        self.entries.insert(key, e);
                    }
                }
                Change::Delete { key } => {
                    if self.entries.remove(&key).is_none() {
                        return Err(format!("deletes missing key {key:?}"));
                    }
                    if want_events {
                        events.push(WatchEvent {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key,
                                value: Vec::new(),
                                create_revision: 0,
                                mod_revision: revision,
                                version: 0,
                            },
                        });
                    }
                }
            }
        }
        self.revision = revision;
        Ok(events)
    }

    fn publish(&mut self, events: Vec<WatchEvent>, history_limit: usize) {
        self.watchers.retain(|w| !w.tx.is_closed());
        for event in events {
            for w in &self.watchers {
                if event.kv.mod_revision > w.after && event.kv.key.starts_with(&w.prefix) {
                    // A receiver dropped since the retain above is pruned on the next publish.
                    let _ = w.tx.send(event.clone());
                }
            }
            self.history.push_back(event);
        }
        while self.history.len() > history_limit {
            if let Some(old) = self.history.pop_front() {
                // Other events of this revision may remain, but the revision is now incomplete.
                self.history_floor = self.history_floor.max(old.kv.mod_revision);
            }
        }
    }

    fn register(&mut self, prefix: &str, after: u64) -> Result<Watcher, StoreError> {
        if after < self.history_floor {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: self.history_floor,
            });
        }
        self.watchers.retain(|w| !w.tx.is_closed());
        let (tx, rx) = mpsc::unbounded_channel();
        let start = self.history.partition_point(|e| e.kv.mod_revision <= after);
        for event in self.history.range(start..) {
            if event.kv.key.starts_with(prefix) {
                // The receiver is still in hand, so this cannot fail.
                let _ = tx.send(event.clone());
            }
        }
        self.watchers.push(WatchSlot {
            prefix: prefix.to_owned(),
            after,
            tx,
        });
        Ok(rx)
    }
}

/// The persistent half of a file-backed store, owned by the writer mutex.
struct Disk {
    dir: PathBuf,
    wal_path: PathBuf,
    wal: File,
    wal_len: u64,
    /// Set once the WAL's contents are uncertain (a failed fsync, or a partial frame that could
    /// not be cut off); appending after that could bury acknowledged data behind garbage.
    broken: Option<String>,
    _lock: File,
}

impl Disk {
    fn append(&mut self, frame: &[u8]) -> Result<(), StoreError> {
        if let Some(reason) = &self.broken {
            return Err(io_error(
                &self.wal_path,
                io::Error::other(format!("refusing writes after an earlier failure: {reason}")),
            ));
        }
        if let Err(e) = self.wal.write_all(frame) {
            if let Err(cut) = self.wal.set_len(self.wal_len) {
                self.broken = Some(format!("append failed ({e}) and cutting it off failed ({cut})"));
            }
            return Err(io_error(&self.wal_path, e));
        }
        if let Err(e) = self.wal.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty pages, so whether this
            // frame is on disk is unknown.
            self.broken = Some(format!("fsync failed ({e})"));
            return Err(io_error(&self.wal_path, e));
        }
        self.wal_len += frame.len() as u64;
        Ok(())
    }
}

fn io_error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, reason: String) -> StoreError {
    StoreError::Corrupt {
        path: path.display().to_string(),
        reason,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))
}

impl FileStore {
    /// Opens (creating if needed) a store persisted in `dir`, with default [`Options`].
    pub fn open(dir: impl AsRef<Path>) -> Result<FileStore, StoreError> {
        Self::open_with(dir, Options::default())
    }

    /// Opens (creating if needed) a store persisted in `dir`, recovering its state from the
    /// snapshot and the WAL. Fails with [`StoreError::Locked`] if another handle holds `dir`.
    pub fn open_with(dir: impl AsRef<Path>, options: Options) -> Result<FileStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;

        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_error(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.display().to_string(),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io_error(&lock_path, e)),
        }

        let tmp_path = dir.join(SNAPSHOT_TMP_FILE);
        match fs::remove_file(&tmp_path) {
            Ok(()) => {
                tracing::info!(path = %tmp_path.display(), "discarded an unfinished snapshot")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&tmp_path, e)),
        }

        let mut state = State::new();
        let snapshot_revision = load_snapshot(&dir.join(SNAPSHOT_FILE), &mut state)?;
        let wal_path = dir.join(WAL_FILE);
        let (wal, wal_len) = recover_wal(&wal_path, &mut state, snapshot_revision)?;
        // Makes the WAL's directory entry durable when this open created it.
        sync_dir(&dir)?;
        state.history_floor = state.revision;
        tracing::debug!(dir = %dir.display(), revision = state.revision, keys = state.entries.len(), "opened state store");

        let disk = Disk {
            dir: dir.clone(),
            wal_path,
            wal,
            wal_len,
            broken: None,
            _lock: lock,
        };
        Ok(FileStore {
            inner: Arc::new(Inner {
                dir: Some(dir),
                options,
                state: RwLock::new(state),
                writer: Mutex::new(Some(disk)),
            }),
        })
    }

    /// A store with no persistence, with default [`Options`].
    pub fn in_memory() -> FileStore {
        Self::in_memory_with(Options::default())
    }

    /// A store with no persistence; `wal_limit_bytes` is ignored.
    pub fn in_memory_with(options: Options) -> FileStore {
        FileStore {
            inner: Arc::new(Inner {
                dir: None,
                options,
                state: RwLock::new(State::new()),
                writer: Mutex::new(None),
            }),
        }
    }

    /// The directory this store persists to, or `None` for an in-memory store.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// How many watchers are registered. Dropped receivers are removed at the next write or
    /// watch registration, so this can briefly count them.
    pub fn watcher_count(&self) -> usize {
        self.inner.read().map_or(0, |s| s.watchers.len())
    }
}

impl Inner {
    fn read(&self) -> Result<RwLockReadGuard<'_, State>, StoreError> {
        // A poisoned lock means a panic mid-update; the state may be half-applied.
        self.state.read().map_err(|_| StoreError::Closed)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, State>, StoreError> {
        self.state.write().map_err(|_| StoreError::Closed)
    }

    fn commit(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut writer = self.writer.lock().map_err(|_| StoreError::Closed)?;
        // Only commits change the state and they are serialized by `writer`, so what is planned
        // here is still current when it is applied below.
        let (succeeded, changes, revision) = {
            let state = self.read()?;
            let succeeded = txn.compare.iter().all(|c| state.holds(c));
            let ops = if succeeded { txn.success } else { txn.failure };
            (succeeded, state.plan(ops), state.revision)
        };
        if changes.is_empty() {
            return Ok(TxnResponse { succeeded, revision });
        }
        let next = revision + 1;
        if let Some(disk) = writer.as_mut() {
            let frame = encode_frame(next, &changes).map_err(|e| io_error(&disk.wal_path, e))?;
            disk.append(&frame)?;
        }
        {
            let mut state = self.write()?;
            let events = state.apply(next, changes, true).map_err(|reason| {
                // Unreachable while planning and applying agree; reported rather than
                // panicking so that a bug cannot take the process down with the lock held.
                corrupt(
                    self.dir.as_deref().unwrap_or(Path::new("<memory>")),
                    format!("in-memory state diverged from its plan: {reason}"),
                )
            })?;
            state.publish(events, self.options.history_limit);
        }
        if let Some(disk) = writer.as_mut() {
            if disk.wal_len > self.options.wal_limit_bytes {
                // The transaction is already durable; a failed compaction only means the WAL
                // keeps growing until the next attempt.
                if let Err(e) = self.compact(disk) {
                    tracing::warn!(error = %e, "state store compaction failed");
                }
            }
        }
        Ok(TxnResponse {
            succeeded,
            revision: next,
        })
    }

    fn compact(&self, disk: &mut Disk) -> Result<(), StoreError> {
        let (snapshot, revision) = {
            let state = self.read()?;
            (encode_snapshot(&state), state.revision)
        };
        let tmp_path = disk.dir.join(SNAPSHOT_TMP_FILE);
        let path = disk.dir.join(SNAPSHOT_FILE);
        File::create(&tmp_path)
            .and_then(|mut f| {
                f.write_all(&snapshot)?;
                f.sync_all()
            })
            .map_err(|e| io_error(&tmp_path, e))?;
        fs::rename(&tmp_path, &path).map_err(|e| io_error(&path, e))?;
        // Until the rename is durable the WAL is the only copy of its records.
        sync_dir(&disk.dir)?;
        disk.wal.set_len(0).map_err(|e| io_error(&disk.wal_path, e))?;
        disk.wal_len = 0;
        // Records that survive an unsynced truncation are skipped on replay, as the snapshot
        // covers them, so a failure here costs nothing but space.
        disk.wal.sync_all().map_err(|e| io_error(&disk.wal_path, e))?;
        tracing::debug!(revision, bytes = snapshot.len(), "state store compacted");
        Ok(())
    }
}

#[async_trait]
impl Store for FileStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let state = self.inner.read()?;
        Ok(state.entries.get(key).map(|e| e.to_kv(key)))
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse, StoreError> {
        let state = self.inner.read()?;
        Ok(RangeResponse {
            kvs: state.under_prefix(prefix).map(|(k, e)| e.to_kv(k)).collect(),
            revision: state.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        if self.inner.dir.is_none() {
            // Nothing blocks without a disk, so a thread hop would only add latency.
            return self.inner.commit(txn);
        }
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || inner.commit(txn)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(StoreError::Closed),
        }
    }

    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<Watcher, StoreError> {
        // Under the write lock no commit can apply between the history replay and the
        // registration, so the watcher sees every revision exactly once.
        self.inner.write()?.register(prefix, after_revision)
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.inner.read()?.revision)
    }
}

// ---- Encoding -------------------------------------------------------------------------------

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a key or value of {} bytes exceeds the 4 GiB limit", bytes.len()),
        )
    })?;
    put_u32(buf, len);
    buf.extend_from_slice(bytes);
    Ok(())
}

/// A complete WAL frame for one transaction. Payload: `[u64 revision][u32 change count]`, then
/// per change `[u8 tag][u32 key len][key]`, followed for a put by `[u32 value len][value]`.
fn encode_frame(revision: u64, changes: &[Change]) -> io::Result<Vec<u8>> {
    let size: usize = changes
        .iter()
        .map(|c| match c {
            Change::Put { key, value } => 9 + key.len() + value.len(),
            Change::Delete { key } => 5 + key.len(),
        })
        .sum();
    let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + 12 + size);
    buf.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    put_u64(&mut buf, revision);
    let count = u32::try_from(changes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many operations in one transaction"))?;
    put_u32(&mut buf, count);
    for change in changes {
        match change {
            Change::Put { key, value } => {
                buf.push(TAG_PUT);
                put_bytes(&mut buf, key.as_bytes())?;
                put_bytes(&mut buf, value)?;
            }
            Change::Delete { key } => {
                buf.push(TAG_DELETE);
                put_bytes(&mut buf, key.as_bytes())?;
            }
        }
    }
    let payload = &buf[FRAME_HEADER_LEN..];
    let len = u32::try_from(payload.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "transaction exceeds the 4 GiB record limit",
        )
    })?;
    let crc = crc32fast::hash(payload);
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// Snapshot file: `["SHOALSNP"][u32 format][u64 body len][u32 crc32 of body][body]`; body:
/// `[u64 revision][u64 key count]`, then per key in order
/// `[u32 key len][key][u32 value len][value][u64 create_revision][u64 mod_revision][u64 version]`.
fn encode_snapshot(state: &State) -> Vec<u8> {
    let size: usize = state.entries.iter().map(|(k, e)| 32 + k.len() + e.value.len()).sum();
    let mut buf = Vec::with_capacity(SNAPSHOT_HEADER_LEN + 16 + size);
    buf.extend_from_slice(SNAPSHOT_MAGIC);
    put_u32(&mut buf, SNAPSHOT_FORMAT);
    buf.extend_from_slice(&[0; 12]);
    put_u64(&mut buf, state.revision);
    put_u64(&mut buf, state.entries.len() as u64);
    for (key, e) in &state.entries {
        // Lengths were bounded when each key and value was logged, so these cannot overflow.
        put_u32(&mut buf, key.len() as u32);
        buf.extend_from_slice(key.as_bytes());
        put_u32(&mut buf, e.value.len() as u32);
        buf.extend_from_slice(&e.value);
        put_u64(&mut buf, e.create_revision);
        put_u64(&mut buf, e.mod_revision);
        put_u64(&mut buf, e.version);
    }
    let body_len = (buf.len() - SNAPSHOT_HEADER_LEN) as u64;
    let crc = crc32fast::hash(&buf[SNAPSHOT_HEADER_LEN..]);
    buf[12..20].copy_from_slice(&body_len.to_le_bytes());
    buf[20..24].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// A bounds-checked cursor: every read returns `None` rather than panicking on short input.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = self.u32()? as usize;
        self.take(len).map(<[u8]>::to_vec)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }

    fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
}

fn decode_record(payload: &[u8]) -> Option<(u64, Vec<Change>)> {
    let mut r = Reader::new(payload);
    let revision = r.u64()?;
    let count = r.u32()? as usize;
    // The smallest change is 5 bytes; bounding by that keeps a corrupt count from allocating.
    let mut changes = Vec::with_capacity(count.min(payload.len() / 5));
    for _ in 0..count {
        let change = match r.u8()? {
            TAG_PUT => Change::Put {
                key: r.string()?,
                value: r.bytes()?,
            },
            TAG_DELETE => Change::Delete { key: r.string()? },
            _ => return None,
        };
        changes.push(change);
    }
    (r.done() && revision > 0).then_some((revision, changes))
}

/// The payload of an intact frame at `off` and the offset after it. Zero-length frames are
/// invalid, which keeps a zero-filled tail (common after a crash) from parsing as records.
fn frame_at(buf: &[u8], off: usize) -> Option<(&[u8], usize)> {
    let header = buf.get(off..off.checked_add(FRAME_HEADER_LEN)?)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len == 0 {
        return None;
    }
    let start = off + FRAME_HEADER_LEN;
    let end = start.checked_add(len)?;
    let payload = buf.get(start..end)?;
    (crc32fast::hash(payload) == crc).then_some((payload, end))
}

// ---- Recovery -------------------------------------------------------------------------------

/// Loads `path` into `state` and returns its revision (0 when there is no snapshot).
fn load_snapshot(path: &Path, state: &mut State) -> Result<u64, StoreError> {
    let buf = match fs::read(path) {
        Ok(buf) => buf,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error(path, e)),
    };
    // A snapshot only ever appears whole (it is renamed into place after an fsync), so any
    // defect is real damage, never a crash artefact.
    let bad = |what: &str| corrupt(path, format!("{what} (file is {} bytes)", buf.len()));
    let mut r = Reader::new(&buf);
    if r.take(8) != Some(SNAPSHOT_MAGIC.as_slice()) {
        return Err(bad("bad magic"));
    }
    match r.u32() {
        Some(SNAPSHOT_FORMAT) => {}
        Some(other) => return Err(bad(&format!("unsupported format {other}"))),
        None => return Err(bad("truncated header")),
    }
    let body_len = r.u64().ok_or_else(|| bad("truncated header"))?;
    let crc = r.u32().ok_or_else(|| bad("truncated header"))?;
    let body = &buf[SNAPSHOT_HEADER_LEN.min(buf.len())..];
    if body.len() as u64 != body_len {
        return Err(bad(&format!("body is {} bytes, header says {body_len}", body.len())));
    }
    if crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch"));
    }
    let mut r = Reader::new(body);
    let parsed = (|| {
        let revision = r.u64()?;
        let count = r.u64()?;
        for _ in 0..count {
            let key = r.string()?;
            let stored = Stored {
                value: r.bytes()?,
                create_revision: r.u64()?,
                mod_revision: r.u64()?,
                version: r.u64()?,
            };
            if state.entries.insert(key, stored).is_some() {
                return None;
            }
        }
        r.done().then_some(revision)
    })();
    let revision = parsed.ok_or_else(|| bad("malformed body"))?;
    state.revision = revision;
    Ok(revision)
}

/// Replays the WAL at `path` into `state`, cuts off a torn tail, and returns the file opened for
/// appending with its length.
fn recover_wal(path: &Path, state: &mut State, snapshot_revision: u64) -> Result<(File, u64), StoreError> {
    let mut wal = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    let mut buf = Vec::new();
    wal.read_to_end(&mut buf).map_err(|e| io_error(path, e))?;

    let mut off = 0;
    while off < buf.len() {
        let Some((payload, next)) = frame_at(&buf, off) else {
            // A crash mid-append leaves a bad frame with nothing valid after it; a bad frame
            // with acknowledged records after it is damage, and cutting there would lose them.
            if let Some(later) = (off + 1..buf.len()).find(|&p| {
                frame_at(&buf, p)
                    .and_then(|(payload, _)| decode_record(payload))
                    .is_some_and(|(rev, _)| rev > state.revision)
            }) {
                return Err(corrupt(
                    path,
                    format!("record at offset {off} is damaged (bad length or checksum) but a valid record follows at offset {later}"),
                ));
            }
            tracing::warn!(
                path = %path.display(),
                offset = off,
                discarded_bytes = buf.len() - off,
                "discarding a torn write at the end of the WAL"
            );
            wal.set_len(off as u64).map_err(|e| io_error(path, e))?;
            wal.sync_all().map_err(|e| io_error(path, e))?;
            return Ok((wal, off as u64));
        };
        let (revision, changes) = decode_record(payload).ok_or_else(|| {
            corrupt(
                path,
                format!("record at offset {off} has a valid checksum but cannot be decoded"),
            )
        })?;
        if revision <= snapshot_revision {
            // Left over from a compaction that crashed before restarting the WAL.
        } else if revision != state.revision + 1 {
            return Err(corrupt(
                path,
                format!(
                    "record at offset {off} has revision {revision}, expected {}",
                    state.revision + 1
                ),
            ));
        } else {
            state
                .apply(revision, changes, false)
                .map_err(|reason| corrupt(path, format!("record at offset {off} {reason}")))?;
        }
        off = next;
    }
    Ok((wal, buf.len() as u64))
}
