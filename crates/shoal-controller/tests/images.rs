//! The image store over the API: uploads of only the missing chunks, refusal of tampered or
//! incomplete uploads, templates made from uploaded images, and image locality.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Harness, Opts};
use shoal_image::{wire, ImageStore, ImportOptions, ManifestId};

/// A raw disk image (MBR signature) with `mib` MiB of pseudo-random, half-compressible data.
fn disk(path: &Path, mib: usize, seed: u64) {
    let mut x = seed | 1;
    let mut d: Vec<u8> = (0..mib << 20)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 64) % 2 == 0 {
                (x as u8) & 0x0f
            } else {
                x as u8
            }
        })
        .collect();
    d[510] = 0x55;
    d[511] = 0xAA;
    std::fs::write(path, d).unwrap();
}

fn local(dir: &Path, file: &Path) -> (Arc<ImageStore>, ManifestId) {
    let s = Arc::new(ImageStore::open(dir).unwrap());
    let id = s.import_path(file, &ImportOptions::default()).unwrap().manifest;
    (s, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_send_only_missing_chunks_and_refuse_tampering() {
    let h = Harness::start(Opts {
        hosts: 1,
        ..Default::default()
    })
    .await;
    let d = h.dir.path();
    disk(&d.join("a.raw"), 4, 1);
    let (store, id) = local(&d.join("cache"), &d.join("a.raw"));
    let files = shoal_client::TemplateFiles::disk(&d.join("a.raw"));

    // A template naming an image the controller does not have is refused.
    let e = h.client.create_template("early", &id, "raw", &files).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid"), "{e}");
    assert!(e.to_string().contains("not in the store"), "{e}");
    // A manifest whose chunks are missing is refused, naming how many.
    let bytes = store.manifest_bytes(&id).unwrap();
    let e = h.client.put_manifest(None, &id, bytes.clone()).await.unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    // A batch with one tampered blob is refused whole.
    let m = store.manifest(&id).unwrap();
    let some: Vec<_> = m
        .chunks()
        .take(8)
        .map(|c| (c.1, store.get_blob(&c.1).unwrap().unwrap()))
        .collect();
    let mut bad = some.clone();
    let last = bad.len() - 1;
    bad[last].1[10] ^= 0xff;
    let e = h
        .client
        .upload_chunks(None, wire::encode_batch(&bad))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("invalid"), "{e}");
    let e = h
        .client
        .upload_chunks(None, wire::encode_batch(&some)[..100].to_vec())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cut short"), "{e}");
    assert_eq!(
        h.client.image_stats().await.unwrap().chunks,
        0,
        "refused uploads stored nothing"
    );

    // The real thing: everything once, nothing the second time.
    let first = h.client.push_image(None, store.clone(), id, &|_, _| {}).await.unwrap();
    assert_eq!(first.chunks_sent, first.chunks_total);
    let again = h.client.push_image(None, store.clone(), id, &|_, _| {}).await.unwrap();
    assert_eq!(again.chunks_sent, 0);
    let t = h.client.create_template("a", &id, "raw", &files).await.unwrap();
    assert_eq!(t.hash, format!("manifest:{id}"));
    assert_eq!(t.size_bytes, 4 << 20);
    let e = h.client.create_template("a", &id, "raw", &files).await.unwrap_err();
    assert_eq!(e.code(), Some("already_exists"));

    // An image derived from it sends only what changed.
    let mut b = std::fs::read(d.join("a.raw")).unwrap();
    b[(1 << 20)..(1 << 20) + 8192].fill(0x42);
    std::fs::write(d.join("b.raw"), &b).unwrap();
    let idb = store
        .import_path(&d.join("b.raw"), &ImportOptions::default())
        .unwrap()
        .manifest;
    let t2 = h.client.push_image(None, store.clone(), idb, &|_, _| {}).await.unwrap();
    assert!(
        t2.chunks_sent <= 2,
        "{} chunks sent for one changed 8 KiB",
        t2.chunks_sent
    );

    // A pull into another store writes back the very same bytes.
    let other = Arc::new(ImageStore::open(&d.join("other")).unwrap());
    h.client.pull_image(None, other.clone(), idb, &|_, _| {}).await.unwrap();
    other
        .export(&idb, &d.join("b.out"), shoal_image::ImageFormat::Raw, None)
        .unwrap();
    assert_eq!(std::fs::read(d.join("b.out")).unwrap(), b);

    // Deleting the template and collecting garbage frees what only it used.
    h.client.delete_template("a").await.unwrap();
    let g = h.client.image_gc().await.unwrap();
    assert_eq!(g.manifests_removed, 2, "a's image and the unnamed b: {g:?}");
    assert_eq!(h.client.image_stats().await.unwrap().chunks, 0);
    let v = h.client.image_verify().await.unwrap();
    assert!(v.corrupt.is_empty() && v.damaged.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_is_the_share_of_a_template_a_host_already_holds() {
    let h = Harness::start(Opts {
        hosts: 1,
        ..Default::default()
    })
    .await;
    let d = h.dir.path();
    disk(&d.join("a.raw"), 4, 7);
    let mut b = std::fs::read(d.join("a.raw")).unwrap();
    let half = b.len() / 2;
    let noise: Vec<u8> = (0..half).map(|i| (i * 7 + 3) as u8 ^ (i >> 9) as u8).collect();
    b[half..].copy_from_slice(&noise);
    std::fs::write(d.join("b.raw"), &b).unwrap();
    let (store, a) = local(&d.join("cache"), &d.join("a.raw"));
    let bid = store
        .import_path(&d.join("b.raw"), &ImportOptions::default())
        .unwrap()
        .manifest;
    for id in [a, bid] {
        h.client.push_image(None, store.clone(), id, &|_, _| {}).await.unwrap();
    }
    let ctl = h.controller().clone();
    // Hosts that do not heartbeat here, so the simulated agents' empty reports do not interfere.
    ctl.record_heartbeat(
        "holds-a",
        shoal_model::agent::Heartbeat {
            images: vec![a.to_hex()],
            ..Default::default()
        },
    );
    ctl.record_heartbeat("holds-nothing", Default::default());
    let la = shoal_controller::locality::image_locality(&ctl, a).await;
    assert_eq!(la.get("holds-a"), Some(&1.0));
    assert!(!la.contains_key("holds-nothing"));
    let lb = shoal_controller::locality::image_locality(&ctl, bid).await;
    let share = lb["holds-a"];
    assert!(
        (0.4..0.6).contains(&share),
        "b shares half its bytes with a, locality says {share}"
    );
}
