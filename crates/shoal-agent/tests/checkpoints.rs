//! A host storing a VM disk's checkpoint (`ControllerTemplates::store_changes`) against a stand-in
//! for the controller: the five image routes an agent uses, over a real image store. The host's
//! cache pulls a parent it lacks, splices the changes reading only their data, keeps the new
//! image as the next parent, and sends the controller only what it lacks.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use shoal_agent::ControllerTemplates;
use shoal_hv::{DiskChange, SourceError, TemplateSource};
use shoal_image::{wire, ChunkId, ImageFormat, ImageStore, ImportOptions, ManifestId};
use shoal_model::api::{ChunkList, ChunkUpload, ErrorBody, ErrorDetail, ManifestRef};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

#[derive(Clone)]
struct Controller {
    store: Arc<ImageStore>,
    /// Manifests the host asked for: its pulls.
    pulls: Arc<AtomicUsize>,
}

fn failed(status: StatusCode, e: impl std::fmt::Display) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: "stand_in".into(),
            message: e.to_string(),
        },
    };
    (status, Json(body)).into_response()
}

fn ids(list: &ChunkList) -> Vec<ChunkId> {
    list.chunks.iter().map(|c| c.parse().unwrap()).collect()
}

async fn missing(State(c): State<Controller>, Json(list): Json<ChunkList>) -> Json<ChunkList> {
    let chunks = ids(&list)
        .into_iter()
        .filter(|id| !c.store.backend().contains(id))
        .map(|id| id.to_hex())
        .collect();
    Json(ChunkList { chunks })
}

async fn upload(State(c): State<Controller>, body: Bytes) -> Response {
    let blobs = match wire::decode_batch(&body) {
        Ok(b) => b,
        Err(e) => return failed(StatusCode::BAD_REQUEST, e),
    };
    match c.store.put_blobs(&blobs) {
        Ok(new) => Json(ChunkUpload {
            received: blobs.len() as u64,
            new,
        })
        .into_response(),
        Err(e) => failed(StatusCode::BAD_REQUEST, e),
    }
}

async fn put_manifest(State(c): State<Controller>, body: Bytes) -> Response {
    match c.store.put_manifest(&body) {
        Ok(id) => Json(ManifestRef { manifest: id.to_hex() }).into_response(),
        Err(e) => failed(StatusCode::CONFLICT, e),
    }
}

async fn get_manifest(State(c): State<Controller>, UrlPath((_, id)): UrlPath<(String, String)>) -> Response {
    c.pulls.fetch_add(1, Ordering::Relaxed);
    let id: ManifestId = id.parse().unwrap();
    match c.store.manifest_bytes(&id) {
        Ok(b) => b.into_response(),
        Err(e) => failed(StatusCode::NOT_FOUND, e),
    }
}

async fn fetch(State(c): State<Controller>, Json(list): Json<ChunkList>) -> Response {
    let blobs: Vec<(ChunkId, Vec<u8>)> = ids(&list)
        .into_iter()
        .map(|id| (id, c.store.get_blob(&id).unwrap().unwrap()))
        .collect();
    wire::encode_batch(&blobs).into_response()
}

async fn start(c: Controller) -> String {
    let app = Router::new()
        .route(
            "/v1/agents/{name}/images/manifests/{id}",
            get(get_manifest).put(put_manifest),
        )
        .route("/v1/agents/{name}/images/chunks/fetch", post(fetch))
        .route("/v1/agents/{name}/images/chunks", post(upload))
        .route("/v1/agents/{name}/images/missing", post(missing))
        .layer(DefaultBodyLimit::disable())
        .with_state(c);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    url
}

fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes the changes' data at their offsets into a file of `size` bytes; returns the disk as it
/// now is: `disk` grown to `size` with the changes applied.
fn apply(path: &Path, disk: &[u8], size: u64, changes: &[DiskChange], seed: u64) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut out = disk.to_vec();
    out.resize(size as usize, 0);
    for (i, c) in changes.iter().enumerate() {
        let r = c.offset as usize..(c.offset + c.len) as usize;
        if c.zero {
            out[r].fill(0);
        } else {
            let d = pseudo(c.len as usize, seed + i as u64);
            f.write_all_at(&d, c.offset).unwrap();
            out[r].copy_from_slice(&d);
        }
    }
    out
}

#[tokio::test]
async fn a_checkpoint_pulls_a_missing_parent_splices_and_sends_only_what_the_controller_lacks() {
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(&d.path().join("controller")).unwrap());
    let template = pseudo(8 * MIB as usize, 1);
    let raw = d.path().join("template.raw");
    std::fs::write(&raw, &template).unwrap();
    let parent = store
        .import_path(
            &raw,
            &ImportOptions {
                format: Some(ImageFormat::Raw),
                ..Default::default()
            },
        )
        .unwrap()
        .manifest;
    let pulls = Arc::new(AtomicUsize::new(0));
    let url = start(Controller {
        store: store.clone(),
        pulls: pulls.clone(),
    })
    .await;
    let host = ControllerTemplates::new(url, "host1".into(), d.path().join("host1"));

    // the first checkpoint: the host's cache lacks the template's image and pulls it
    let changes = [
        DiskChange {
            offset: 64 * KIB,
            len: 128 * KIB,
            zero: false,
        },
        DiskChange {
            offset: 4 * MIB,
            len: 64 * KIB,
            zero: true,
        },
        DiskChange {
            offset: 8 * MIB,
            len: 64 * KIB,
            zero: false,
        },
    ];
    let data = d.path().join("changes");
    let disk = apply(&data, &template, 9 * MIB, &changes, 10);
    let first = host
        .store_changes(&parent.to_hex(), &changes, &data, 9 * MIB)
        .await
        .unwrap();
    assert_eq!(pulls.load(Ordering::Relaxed), 1, "the parent was pulled once");
    assert_eq!(first.read_bytes, 192 * KIB, "only the changed data was read");
    assert!(
        first.chunks_sent > 0 && first.chunks_sent < first.chunks / 4,
        "sent {} of {} chunks",
        first.chunks_sent,
        first.chunks
    );
    let id: ManifestId = first.manifest.parse().unwrap();
    let out = d.path().join("out.raw");
    store.export(&id, &out, ImageFormat::Raw, None).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == disk,
        "the controller holds the disk as it is"
    );
    let cache = host.images().await.unwrap();
    assert_eq!(
        cache.get_ref(&format!("checkpoint/{}", first.manifest)).unwrap(),
        Some(id),
        "the host keeps the checkpoint as the next one's parent"
    );

    // the next checkpoint on it: nothing to pull
    let next = [DiskChange {
        offset: 2 * MIB + 4 * KIB,
        len: 4 * KIB,
        zero: false,
    }];
    let disk = apply(&data, &disk, 9 * MIB, &next, 20);
    let second = host
        .store_changes(&first.manifest, &next, &data, 9 * MIB)
        .await
        .unwrap();
    assert_eq!(pulls.load(Ordering::Relaxed), 1, "the parent was in the cache");
    assert_eq!(second.read_bytes, 4 * KIB);
    assert!(second.chunks_sent <= 4, "sent {} chunks", second.chunks_sent);
    store
        .export(&second.manifest.parse().unwrap(), &out, ImageFormat::Raw, None)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == disk);

    // parents that are not images, or that nobody holds
    let e = host.store_changes("zz", &next, &data, 0).await.unwrap_err();
    assert!(
        matches!(&e, SourceError::Missing { what, .. } if what.contains("zz")),
        "{e:?}"
    );
    let unknown = ManifestId([9; 32]).to_hex();
    let e = host.store_changes(&unknown, &next, &data, 0).await.unwrap_err();
    assert!(
        matches!(&e, SourceError::Missing { what, .. } if what.contains(&unknown)),
        "{e:?}"
    );
    // a bad change is the cache's refusal, naming it
    let past = [DiskChange {
        offset: 9 * MIB,
        len: 4 * KIB,
        zero: false,
    }];
    let e = host
        .store_changes(&first.manifest, &past, &data, 9 * MIB)
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&(9 * MIB).to_string()), "{e}");
}
