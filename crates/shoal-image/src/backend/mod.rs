//! Where chunk blobs live. The image store talks to a [`ChunkBackend`]; the local pack directory
//! ([`PackBackend`]) is the one for disks, [`MemoryBackend`] is for tests and scratch, and an
//! S3-compatible object store can follow behind the same trait. `tests/conformance.rs` runs one
//! suite against every backend.
//!
//! Writes go through a [`ChunkWriter`] session: nothing it wrote is visible until `commit`, and a
//! session dropped without committing leaves the backend exactly as it was. That is what makes an
//! interrupted or failed import (disk full, corrupt input, a cut transfer) change nothing.

mod memory;
mod pack;

pub use memory::MemoryBackend;
pub use pack::PackBackend;

use crate::id::ChunkId;
use crate::Error;

/// Totals of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Chunks held.
    pub chunks: u64,
    /// Bytes of their blobs (compressed).
    pub blob_bytes: u64,
    /// Bytes the backend occupies, including garbage not yet compacted and its index.
    pub stored_bytes: u64,
}

/// Storage of chunk blobs by id.
pub trait ChunkBackend: Send + Sync {
    /// Starts a write session.
    fn writer(&self) -> Result<Box<dyn ChunkWriter + '_>, Error>;
    /// The blob of a committed chunk, if held.
    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, Error>;
    /// Whether a committed chunk is held.
    fn contains(&self, id: &ChunkId) -> bool;
    /// The length of a committed chunk's blob, without reading it.
    fn size(&self, id: &ChunkId) -> Option<u64>;
    /// Every committed chunk id (unordered).
    fn list(&self) -> Vec<ChunkId>;
    /// Forgets the given chunks (ids not held are ignored). Space is reclaimed by `compact`.
    fn remove(&self, ids: &[ChunkId]) -> Result<(), Error>;
    /// Reclaims space of removed chunks; returns the bytes freed.
    fn compact(&self) -> Result<u64, Error>;
    fn usage(&self) -> Usage;
}

/// A write session; see the module documentation.
pub trait ChunkWriter: Send {
    /// Adds a chunk. Returns false when the backend or this session already holds it (nothing written).
    fn put(&mut self, id: &ChunkId, blob: &[u8]) -> Result<bool, Error>;
    /// Whether this session or the backend holds the chunk.
    fn contains(&self, id: &ChunkId) -> bool;
    /// Makes every chunk of the session durable and visible.
    fn commit(self: Box<Self>) -> Result<(), Error>;
}
