//! Shoal's content-addressed image store.
//!
//! Every image (a template, a VM disk snapshot) is a [`Manifest`]: its logical size and an ordered
//! list of extents, each a run of zeros or a chunk named by the BLAKE3 hash of its bytes. Chunks
//! are cut by block-aligned content-defined chunking ([`chunker`]), compressed one by one with
//! zstd ([`blob`]) and kept once, however many images hold them, in a [`ChunkBackend`]. Named refs
//! are the roots that garbage collection keeps. Between two stores (controller and host cache)
//! only the chunks the receiver lacks travel.
//!
//! Start at [`ImageStore`].

pub mod backend;
pub mod blob;
pub mod chunker;
mod id;
pub mod manifest;
mod profile;
pub mod source;
mod splice;
mod store;
pub mod wire;

pub use backend::{ChunkBackend, ChunkWriter, MemoryBackend, PackBackend, Usage};
pub use chunker::ChunkParams;
pub use id::{ChunkId, ManifestId};
pub use manifest::{Extent, Manifest, MANIFEST_VERSION};
pub use profile::{profile, BlockProfile};
pub use source::ImageFormat;
pub use splice::{Change, SpliceReport};
pub use store::{
    check_ref_name, ExportReport, GcReport, ImageStore, ImportOptions, ImportReport, Progress, Stats, TransferReport,
    VerifyReport,
};

/// Errors of the image store. Messages name the offending file, chunk or value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: not an image, a refused format, a bad name.
    #[error("{0}")]
    Invalid(String),
    /// Stored data that fails its checks.
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String, std::io::ErrorKind),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Chunks needed but not held.
    #[error("{} chunk(s) missing, first {}", .0.len(), .0.first().map(|c| c.to_hex()).unwrap_or_default())]
    Missing(Vec<ChunkId>),
    /// An external tool (qemu-img) is absent or failed.
    #[error("{0}")]
    Tool(String),
}
