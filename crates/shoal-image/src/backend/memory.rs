//! Chunks in a hash map: tests, benchmarks' scratch stores, and the reference for the conformance suite.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{ChunkBackend, ChunkWriter, Usage};
use crate::id::ChunkId;
use crate::Error;

#[derive(Default)]
pub struct MemoryBackend {
    chunks: Mutex<HashMap<ChunkId, Vec<u8>>>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ChunkBackend for MemoryBackend {
    fn writer(&self) -> Result<Box<dyn ChunkWriter + '_>, Error> {
        Ok(Box::new(MemoryWriter {
            backend: self,
            pending: HashMap::new(),
        }))
    }
    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.chunks.lock().expect("lock").get(id).cloned())
    }
    fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.lock().expect("lock").contains_key(id)
    }
    fn size(&self, id: &ChunkId) -> Option<u64> {
        self.chunks.lock().expect("lock").get(id).map(|b| b.len() as u64)
    }
    fn list(&self) -> Vec<ChunkId> {
        self.chunks.lock().expect("lock").keys().copied().collect()
    }
    fn remove(&self, ids: &[ChunkId]) -> Result<(), Error> {
        let mut c = self.chunks.lock().expect("lock");
        for id in ids {
            c.remove(id);
        }
        Ok(())
    }
    fn compact(&self) -> Result<u64, Error> {
        Ok(0)
    }
    fn usage(&self) -> Usage {
        let c = self.chunks.lock().expect("lock");
        let blob_bytes = c.values().map(|b| b.len() as u64).sum();
        Usage {
            chunks: c.len() as u64,
            blob_bytes,
            stored_bytes: blob_bytes,
        }
    }
}

struct MemoryWriter<'a> {
    backend: &'a MemoryBackend,
    pending: HashMap<ChunkId, Vec<u8>>,
}

impl ChunkWriter for MemoryWriter<'_> {
    fn put(&mut self, id: &ChunkId, blob: &[u8]) -> Result<bool, Error> {
        if self.contains(id) {
            return Ok(false);
        }
        self.pending.insert(*id, blob.to_vec());
        Ok(true)
    }
    fn contains(&self, id: &ChunkId) -> bool {
        self.pending.contains_key(id) || self.backend.contains(id)
    }
    fn commit(self: Box<Self>) -> Result<(), Error> {
        let mut c = self.backend.chunks.lock().expect("lock");
        for (id, blob) in self.pending {
            c.entry(id).or_insert(blob);
        }
        Ok(())
    }
}
