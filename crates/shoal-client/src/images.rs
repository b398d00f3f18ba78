//! Moving images between a local image store (the CLI's cache, a host's cache) and the
//! controller's: only the chunks the receiver lacks travel, in parallel batches, each verified by
//! the receiver before it stores any of it. A transfer cut half-way resumes where it stopped:
//! every batch that arrived is kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use reqwest::Method;
use shoal_image::{wire, ChunkId, ImageStore, Manifest, ManifestId, TransferReport};
use shoal_model::api::{ChunkList, ChunkUpload, ImageGc, ImageStats, ImageVerify, ManifestRef};

use crate::{seg, Client, ClientError};

/// Chunks per request.
const BATCH: usize = 256;
/// Requests in flight at once.
const PARALLEL: usize = 4;

fn image_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Image(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, shoal_image::Error> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(image_err)?
        .map_err(image_err)
}

impl Client {
    /// `/v1/images` for an operator, `/v1/agents/HOST/images` for a host agent.
    fn images_base(&self, host: Option<&str>) -> String {
        match host {
            Some(h) => format!("/v1/agents/{}/images", seg(h)),
            None => "/v1/images".into(),
        }
    }

    async fn bytes(&self, rb: reqwest::RequestBuilder) -> Result<Vec<u8>, ClientError> {
        let resp = rb
            .try_clone()
            .expect("no streaming body")
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.http.base.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            return self.http.send::<()>(rb).await.map(|_| vec![]);
        }
        Ok(resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.http.base.clone(),
                source,
            })?
            .to_vec())
    }

    /// Which of `ids` the controller lacks.
    pub async fn images_missing(&self, host: Option<&str>, ids: &[ChunkId]) -> Result<Vec<ChunkId>, ClientError> {
        let mut out = vec![];
        for part in ids.chunks(BATCH * 64) {
            let req = ChunkList {
                chunks: part.iter().map(|c| c.to_hex()).collect(),
            };
            let got: ChunkList = self
                .http
                .post(&format!("{}/missing", self.images_base(host)), &req)
                .await?;
            for c in got.chunks {
                out.push(c.parse().map_err(image_err)?);
            }
        }
        Ok(out)
    }

    pub async fn upload_chunks(&self, host: Option<&str>, batch: Vec<u8>) -> Result<ChunkUpload, ClientError> {
        let rb = self
            .http
            .request(Method::POST, &format!("{}/chunks", self.images_base(host)))
            .header("content-type", "application/octet-stream")
            .body(batch);
        self.http.send(rb).await
    }

    pub async fn put_manifest(
        &self,
        host: Option<&str>,
        id: &ManifestId,
        bytes: Vec<u8>,
    ) -> Result<ManifestRef, ClientError> {
        let rb = self
            .http
            .request(Method::PUT, &format!("{}/manifests/{id}", self.images_base(host)))
            .header("content-type", "application/octet-stream")
            .body(bytes);
        self.http.send(rb).await
    }

    pub async fn get_manifest(&self, host: Option<&str>, id: &ManifestId) -> Result<Vec<u8>, ClientError> {
        let b = self
            .bytes(
                self.http
                    .request(Method::GET, &format!("{}/manifests/{id}", self.images_base(host))),
            )
            .await?;
        if ManifestId::of(&b) != *id {
            return Err(ClientError::Image(format!(
                "the controller sent a manifest that does not hash to {id}"
            )));
        }
        Ok(b)
    }

    pub async fn fetch_chunks(
        &self,
        host: Option<&str>,
        ids: &[ChunkId],
    ) -> Result<Vec<(ChunkId, Vec<u8>)>, ClientError> {
        let req = ChunkList {
            chunks: ids.iter().map(|c| c.to_hex()).collect(),
        };
        let rb = self
            .http
            .request(Method::POST, &format!("{}/chunks/fetch", self.images_base(host)))
            .timeout(Duration::from_secs(600))
            .json(&req);
        let b = self.bytes(rb).await?;
        wire::decode_batch(&b).map_err(image_err)
    }

    pub async fn image_stats(&self) -> Result<ImageStats, ClientError> {
        self.http.get("/v1/images/stats").await
    }

    pub async fn image_gc(&self) -> Result<ImageGc, ClientError> {
        self.http.post("/v1/images/gc", &()).await
    }

    pub async fn image_verify(&self) -> Result<ImageVerify, ClientError> {
        let rb = self
            .http
            .request(Method::POST, "/v1/images/verify")
            .timeout(Duration::from_secs(3600))
            .json(&());
        self.http.send(rb).await
    }

    /// Sends image `id` from `store` to the controller: the chunks it lacks, then the manifest.
    /// `progress(bytes sent, bytes to send)`.
    pub async fn push_image(
        &self,
        host: Option<&str>,
        store: Arc<ImageStore>,
        id: ManifestId,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<TransferReport, ClientError> {
        let (bytes, m) = {
            let s = store.clone();
            blocking(move || {
                let b = s.manifest_bytes(&id)?;
                let m = Manifest::decode(&b)?;
                Ok((b, m))
            })
            .await?
        };
        let distinct = m.distinct_chunks();
        let missing = self.images_missing(host, &distinct).await?;
        let total: u64 = missing.iter().filter_map(|id| store.blob_size(id)).sum();
        let sent = AtomicU64::new(0);
        progress(0, total);
        futures::stream::iter(batches(&missing))
            .map(|part| {
                let store = store.clone();
                let sent = &sent;
                async move {
                    let batch = blocking(move || {
                        let mut blobs = Vec::with_capacity(part.len());
                        for id in part {
                            let b = store
                                .get_blob(&id)?
                                .ok_or_else(|| shoal_image::Error::Missing(vec![id]))?;
                            blobs.push((id, b));
                        }
                        Ok(wire::encode_batch(&blobs))
                    })
                    .await?;
                    let n = batch.len() as u64;
                    self.upload_chunks(host, batch).await?;
                    progress(sent.fetch_add(n, Ordering::Relaxed) + n, total);
                    Ok::<_, ClientError>(())
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        self.put_manifest(host, &id, bytes).await?;
        Ok(TransferReport {
            chunks_total: distinct.len() as u64,
            chunks_sent: missing.len() as u64,
            bytes_sent: sent.load(Ordering::Relaxed),
        })
    }

    /// Brings image `id` from the controller into `store`: the chunks it lacks (each verified),
    /// then the manifest. `progress(chunks received, chunks to receive)`.
    pub async fn pull_image(
        &self,
        host: Option<&str>,
        store: Arc<ImageStore>,
        id: ManifestId,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<TransferReport, ClientError> {
        let bytes = self.get_manifest(host, &id).await?;
        let (m, missing) = {
            let (s, b) = (store.clone(), bytes.clone());
            blocking(move || {
                let m = Manifest::decode(&b)?;
                let missing = s.missing(&m);
                Ok((m, missing))
            })
            .await?
        };
        let total = missing.len() as u64;
        let got = AtomicU64::new(0);
        let bytes_got = AtomicU64::new(0);
        progress(0, total);
        futures::stream::iter(batches(&missing))
            .map(|part| {
                let store = store.clone();
                let (got, bytes_got) = (&got, &bytes_got);
                async move {
                    let blobs = self.fetch_chunks(host, &part).await?;
                    let n = blobs.len() as u64;
                    if n != part.len() as u64 {
                        return Err(ClientError::Image(format!(
                            "asked for {}, received {n}",
                            shoal_model::plural(part.len(), "chunk")
                        )));
                    }
                    bytes_got.fetch_add(blobs.iter().map(|b| b.1.len() as u64).sum(), Ordering::Relaxed);
                    blocking(move || store.put_blobs(&blobs)).await?;
                    progress(got.fetch_add(n, Ordering::Relaxed) + n, total);
                    Ok::<_, ClientError>(())
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        blocking(move || store.put_manifest(&bytes)).await?;
        Ok(TransferReport {
            chunks_total: m.distinct_chunks().len() as u64,
            chunks_sent: total,
            bytes_sent: bytes_got.load(Ordering::Relaxed),
        })
    }
}

fn batches(ids: &[ChunkId]) -> Vec<Vec<ChunkId>> {
    ids.chunks(BATCH).map(<[ChunkId]>::to_vec).collect()
}
