//! Manifests: an image as an ordered list of extents, each a chunk (by id) or a run of zeros.
//!
//! Encoding, version 1 (little-endian):
//! ```text
//! magic  "SHOALMF\0"           8 bytes
//! version u16 = 1
//! params  min_blocks u32, max_blocks u32, mask_bits u32
//! size    u64                  logical size of the image in bytes
//! count   u64                  number of extents
//! extents count times: tag u8 (0 = zeros, 1 = chunk), length u64, then for a chunk its 32-byte id
//! ```
//! The manifest's id is the BLAKE3 hash of that encoding, so a manifest is verified by its name.

use crate::chunker::ChunkParams;
use crate::id::{ChunkId, ManifestId};
use crate::Error;

const MAGIC: &[u8; 8] = b"SHOALMF\0";
/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u16 = 1;

/// One extent of an image, in guest order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes of zeros (a hole or an all-zero region): nothing stored.
    Zero { len: u64 },
    /// `len` bytes held by the chunk `id`.
    Chunk { id: ChunkId, len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Zero { len } | Extent::Chunk { len, .. } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An image: its logical size and its extents, which cover it exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub params: ChunkParams,
    pub size: u64,
    pub extents: Vec<Extent>,
}

impl Manifest {
    /// Appends an extent, merging adjacent zero runs.
    pub fn push(&mut self, e: Extent) {
        if e.is_empty() {
            return;
        }
        if let (Extent::Zero { len }, Some(Extent::Zero { len: prev })) = (e, self.extents.last_mut()) {
            *prev += len;
            return;
        }
        self.extents.push(e);
    }

    /// The chunks with their guest offsets, in order.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, ChunkId, u64)> + '_ {
        let mut off = 0u64;
        self.extents.iter().filter_map(move |e| {
            let at = off;
            off += e.len();
            match *e {
                Extent::Chunk { id, len } => Some((at, id, len)),
                Extent::Zero { .. } => None,
            }
        })
    }

    /// Each chunk once, in the order of its first use.
    pub fn distinct_chunks(&self) -> Vec<ChunkId> {
        let mut seen = std::collections::HashSet::new();
        self.chunks()
            .map(|(_, id, _)| id)
            .filter(|id| seen.insert(*id))
            .collect()
    }

    /// Bytes held in chunks (the rest are zeros).
    pub fn data_bytes(&self) -> u64 {
        self.chunks().map(|(_, _, len)| len).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(42 + self.extents.len() * 41);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&self.params.min_blocks.to_le_bytes());
        out.extend_from_slice(&self.params.max_blocks.to_le_bytes());
        out.extend_from_slice(&self.params.mask_bits.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        for e in &self.extents {
            match e {
                Extent::Zero { len } => {
                    out.push(0);
                    out.extend_from_slice(&len.to_le_bytes());
                }
                Extent::Chunk { id, len } => {
                    out.push(1);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(&id.0);
                }
            }
        }
        out
    }

    pub fn id(&self) -> ManifestId {
        ManifestId::of(&self.encode())
    }

    /// Decodes and checks a manifest: magic, version, and that the extents cover `size` exactly.
    pub fn decode(b: &[u8]) -> Result<Manifest, Error> {
        let bad = |why: &str| Error::Corrupt(format!("manifest: {why}"));
        let mut r = Reader { b, at: 0 };
        if r.take(8).ok_or_else(|| bad("too short"))? != MAGIC {
            return Err(bad("bad magic (not a Shoal manifest)"));
        }
        let version = u16::from_le_bytes(r.take(2).ok_or_else(|| bad("too short"))?.try_into().expect("2"));
        if version != MANIFEST_VERSION {
            return Err(Error::Invalid(format!(
                "manifest format version {version} is not supported (this build reads {MANIFEST_VERSION})"
            )));
        }
        let params = ChunkParams {
            min_blocks: r.u32().ok_or_else(|| bad("too short"))?,
            max_blocks: r.u32().ok_or_else(|| bad("too short"))?,
            mask_bits: r.u32().ok_or_else(|| bad("too short"))?,
        };
        let size = r.u64().ok_or_else(|| bad("too short"))?;
        let count = r.u64().ok_or_else(|| bad("too short"))?;
        if count > (b.len() as u64) / 9 {
            return Err(bad("extent count larger than the manifest"));
        }
        let mut extents = Vec::with_capacity(count as usize);
        let mut total = 0u64;
        for i in 0..count {
            let tag = r.take(1).ok_or_else(|| bad("truncated"))?[0];
            let len = r.u64().ok_or_else(|| bad("truncated"))?;
            let e = match tag {
                0 => Extent::Zero { len },
                1 => {
                    let id = r.take(32).ok_or_else(|| bad("truncated"))?;
                    Extent::Chunk {
                        id: ChunkId(id.try_into().expect("32")),
                        len,
                    }
                }
                t => return Err(bad(&format!("extent {i} has unknown tag {t}"))),
            };
            total = total.checked_add(len).ok_or_else(|| bad("extent lengths overflow"))?;
            extents.push(e);
        }
        if r.at != b.len() {
            return Err(bad("trailing bytes"));
        }
        if total != size {
            return Err(bad(&format!("extents cover {total} bytes, size says {size}")));
        }
        Ok(Manifest { params, size, extents })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at + n)?;
        self.at += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}
