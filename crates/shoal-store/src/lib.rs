//! The state store: versioned keys, compare-and-swap transactions, prefix scans and watches,
//! shaped like etcd's v3 API so that an etcd backend can replace the embedded one without
//! touching callers.
//!
//! Every successful write increments the store-wide `revision`; each key remembers the revision
//! that created it, the one that last modified it, and how many times it was written (`version`).
//! A transaction evaluates all its comparisons against one consistent state and applies either
//! its `success` or its `failure` operations atomically, as one revision.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::mpsc;

mod file;
pub use file::{FileStore, Options};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    /// Number of writes since the key was (last) created; 1 after the first put.
    pub version: u64,
}

/// A condition a transaction checks before choosing which branch to apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key's `mod_revision` equals this; `0` means "the key does not exist".
    ModRevision(String, u64),
    /// The key's `version` equals this; `0` means "the key does not exist".
    Version(String, u64),
    /// The key exists and holds exactly this value.
    Value(String, Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put(String, Vec<u8>),
    /// Deleting a missing key is not an error.
    Delete(String),
    DeletePrefix(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compare.push(c);
        self
    }
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }
    pub fn or_else(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every comparison held (and so `success` was applied).
    pub succeeded: bool,
    /// The store's revision after the transaction (unchanged when the applied branch was empty).
    pub revision: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// The store revision the range was read at.
    pub revision: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For a delete: the key with an empty value and `mod_revision` = the deleting revision.
    pub kv: KeyValue,
}

/// A stream of events for keys under a prefix, in revision order.
pub type Watcher = mpsc::UnboundedReceiver<WatchEvent>;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state store I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state store file {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("revision {requested} has been compacted (oldest available is {oldest})")]
    Compacted { requested: u64, oldest: u64 },
    #[error("state store is closed")]
    Closed,
    /// Another handle (in this or another process) has the store's directory open.
    #[error("state store {path} is in use by another process")]
    Locked { path: String },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// One key, or `None`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn range(&self, prefix: &str) -> Result<RangeResponse, StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;
    /// Events for keys under `prefix` with revision > `after_revision` (pass the revision a range
    /// was read at to miss nothing in between), then live events as they happen.
    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<Watcher, StoreError>;
    /// The current revision.
    async fn revision(&self) -> Result<u64, StoreError>;

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        Ok(self
            .txn(Txn::new().then(Op::Put(key.to_string(), value)))
            .await?
            .revision)
    }
    async fn delete(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self.txn(Txn::new().then(Op::Delete(key.to_string()))).await?.revision)
    }
}
