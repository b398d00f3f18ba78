//! The image store end to end on real files: round trips, sharing, and every kind of bad input.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use shoal_image::{Error, ImageFormat, ImageStore, ImportOptions};

const MIB: u64 = 1 << 20;

fn import(s: &ImageStore, p: &Path, name: &str) -> shoal_image::ImportReport {
    s.import_path(
        p,
        &ImportOptions {
            ref_name: Some(name),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn raw_round_trip_is_bit_identical_and_holes_are_neither_read_nor_stored() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.raw");
    raw_image(
        &img,
        64 * MIB,
        &[(MIB, 3 * MIB as usize, 1), (40 * MIB + 1234, 70_000, 2)],
    );
    let s = ImageStore::open(&d.path().join("store")).unwrap();
    let r = import(&s, &img, "a");
    assert_eq!(r.logical_bytes, 64 * MIB);
    assert!(
        r.read_bytes < 5 * MIB,
        "read {} bytes of a 64 MiB image with ~3 MiB of data",
        r.read_bytes
    );
    let st = s.stats().unwrap();
    assert!(st.stored_bytes < 4 * MIB, "stored {}", st.stored_bytes);
    assert_eq!(st.logical_bytes, 64 * MIB);
    let out = d.path().join("out.raw");
    s.export(&r.manifest, &out, ImageFormat::Raw, None).unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), std::fs::read(&out).unwrap());
    assert!(
        allocated(&out) < 8 * MIB,
        "export is sparse: {} allocated",
        allocated(&out)
    );
    // same content, same manifest: importing again adds nothing
    let again = s.import_path(&img, &ImportOptions::default()).unwrap();
    assert_eq!(again.manifest, r.manifest);
    assert_eq!(again.new_chunks, 0);
}

#[test]
fn qcow2_imports_to_the_same_manifest_as_its_raw_twin_and_exports_identically() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("a.raw");
    raw_image(&raw, 32 * MIB, &[(0, 200_000, 5), (10 * MIB, 2 * MIB as usize, 6)]);
    let q = d.path().join("a.qcow2");
    let qc = d.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qc.to_str().unwrap(),
    ]);
    let s = ImageStore::open(&d.path().join("store")).unwrap();
    let r_raw = import(&s, &raw, "raw");
    let r_q = import(&s, &q, "q");
    let r_c = import(&s, &qc, "compressed");
    assert_eq!(r_q.format, ImageFormat::Qcow2);
    assert_eq!(
        r_q.manifest, r_raw.manifest,
        "qcow2 and raw of one disk share one manifest"
    );
    assert_eq!(r_c.manifest, r_raw.manifest, "compressed qcow2 too");
    assert_eq!(r_q.new_chunks, 0);
    let out = d.path().join("out.qcow2");
    s.export(&r_q.manifest, &out, ImageFormat::Qcow2, None).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        out.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let mut head = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(&out).unwrap(), &mut head).unwrap();
    assert_eq!(&head, b"QFI\xfb");
}

#[test]
fn a_derived_image_stores_only_what_changed() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    let derived = d.path().join("derived.raw");
    let regions = [(MIB, 8 * MIB as usize, 11)];
    raw_image(&base, 32 * MIB, &regions);
    raw_image(
        &derived,
        32 * MIB,
        &[
            (MIB, 8 * MIB as usize, 11),
            (3 * MIB + 8192, 4096, 12),
            (20 * MIB, 256 * 1024, 13),
        ],
    );
    let s = ImageStore::open(&d.path().join("store")).unwrap();
    let b = import(&s, &base, "base");
    let r = import(&s, &derived, "derived");
    let new_raw = r.new_chunks as f64 * 16384.0;
    assert!(
        new_raw < 0.1 * 8.0 * MIB as f64,
        "derived image added {} chunks ({} bytes compressed)",
        r.new_chunks,
        r.new_stored_bytes
    );
    // and a second store holding base receives only those chunks
    let other = ImageStore::open(&d.path().join("host")).unwrap();
    ImageStore::transfer(&s, &other, &b.manifest).unwrap();
    let t = ImageStore::transfer(&s, &other, &r.manifest).unwrap();
    assert_eq!(t.chunks_sent, r.new_chunks);
    let out = d.path().join("out.raw");
    other.export(&r.manifest, &out, ImageFormat::Raw, None).unwrap();
    assert_eq!(std::fs::read(&derived).unwrap(), std::fs::read(&out).unwrap());
}

fn assert_refused(s: &ImageStore, store_dir: &Path, file: &Path, opts: &ImportOptions, expect: &str) {
    let before = tree(store_dir);
    let err = s.import_path(file, opts).expect_err("import must fail").to_string();
    assert!(err.contains(expect), "error {err:?} should mention {expect:?}");
    assert_eq!(tree(store_dir), before, "a refused import changed the store");
}

#[test]
fn bad_input_is_refused_with_the_reason_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let sd = d.path().join("store");
    let s = ImageStore::open(&sd).unwrap();
    let good = d.path().join("good.raw");
    raw_image(&good, 8 * MIB, &[(0, MIB as usize, 1)]);
    import(&s, &good, "good");
    let o = ImportOptions::default();

    let text = d.path().join("notes.txt");
    std::fs::write(&text, "hello, this is not a disk\n".repeat(100)).unwrap();
    assert_refused(&s, &sd, &text, &o, "does not look like a disk image");

    let odd = d.path().join("odd.raw");
    std::fs::copy(&good, &odd).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&odd)
        .unwrap()
        .set_len(8 * MIB - 100)
        .unwrap();
    assert_refused(&s, &sd, &odd, &o, "not a whole number of 512-byte sectors");

    let empty = d.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    assert_refused(&s, &sd, &empty, &o, "is empty");

    let vmdk = d.path().join("disk.vmdk");
    std::fs::write(&vmdk, [b"KDMV".as_slice(), &[0u8; 1020]].concat()).unwrap();
    assert_refused(&s, &sd, &vmdk, &o, "VMDK");

    let base = d.path().join("base.qcow2");
    let overlay = d.path().join("overlay.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        good.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
    ]);
    assert_refused(&s, &sd, &overlay, &o, "backing file");

    let truncated = d.path().join("truncated.qcow2");
    std::fs::copy(&base, &truncated).unwrap();
    let len = std::fs::metadata(&base).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let before = tree(&sd);
    let err = s.import_path(&truncated, &o).expect_err("truncated qcow2").to_string();
    assert!(
        err.contains("truncated") || err.contains("damaged") || err.contains("not a readable qcow2"),
        "{err}"
    );
    assert_eq!(tree(&sd), before);

    let garbage_qcow2 = d.path().join("garbage.qcow2");
    std::fs::write(&garbage_qcow2, [b"QFI\xfb".as_slice(), &pseudo(4096, 3)].concat()).unwrap();
    assert_refused(&s, &sd, &garbage_qcow2, &o, "qcow2");

    assert_refused(&s, &sd, &d.path().join("absent.raw"), &o, "absent.raw");
    assert_refused(
        &s,
        &sd,
        &good,
        &ImportOptions {
            ref_name: Some("good"),
            ..Default::default()
        },
        "already exists",
    );
    assert_refused(
        &s,
        &sd,
        &good,
        &ImportOptions {
            ref_name: Some("../x"),
            ..Default::default()
        },
        "not a valid image name",
    );

    // forcing raw takes a file that is no recognisable image
    let forced = d.path().join("blob.bin");
    std::fs::write(&forced, pseudo(8192, 9)).unwrap();
    s.import_path(
        &forced,
        &ImportOptions {
            format: Some(ImageFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
}

#[test]
fn a_corrupt_chunk_is_found_quarantined_and_named_and_export_refuses_it() {
    let d = tempfile::tempdir().unwrap();
    let sd = d.path().join("store");
    let img = d.path().join("a.raw");
    raw_image(&img, 8 * MIB, &[(0, 2 * MIB as usize, 21)]);
    let r = {
        let s = ImageStore::open(&sd).unwrap();
        import(&s, &img, "victim")
    };
    // flip bytes in the middle of the pack
    let pack = std::fs::read_dir(sd.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&pack, bytes).unwrap();
    let s = ImageStore::open(&sd).unwrap();
    let err = s
        .export(&r.manifest, &d.path().join("out.raw"), ImageFormat::Raw, None)
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
    assert!(
        !d.path().join("out.raw").exists() && !d.path().join("out.raw.part").exists(),
        "no half-written export"
    );
    // The image's own check finds it too, and changes nothing.
    let damaged = s.damaged(&r.manifest).unwrap();
    assert!(!damaged.is_empty());
    assert_eq!(
        s.damaged(&r.manifest).unwrap(),
        damaged,
        "nothing quarantined by the check"
    );
    let v = s.verify().unwrap();
    let mut corrupt = v.corrupt.clone();
    corrupt.sort();
    assert_eq!(corrupt, damaged, "the check names exactly the corrupt chunks");
    assert!(!v.corrupt.is_empty());
    assert_eq!(v.damaged_refs, vec!["victim".to_string()]);
    for c in &v.corrupt {
        assert!(sd.join("quarantine").join(c.to_hex()).exists());
        assert!(v.missing.contains(c));
    }
    // re-importing the original heals the store
    let healed = s.import_path(&img, &ImportOptions::default()).unwrap();
    assert_eq!(healed.new_chunks as usize, v.corrupt.len());
    let v2 = s.verify().unwrap();
    assert!(v2.corrupt.is_empty() && v2.damaged_refs.is_empty());
    assert!(s.damaged(&r.manifest).unwrap().is_empty(), "healed");
    s.export(&r.manifest, &d.path().join("out.raw"), ImageFormat::Raw, None)
        .unwrap();
    assert_eq!(
        std::fs::read(&img).unwrap(),
        std::fs::read(d.path().join("out.raw")).unwrap()
    );
}

#[test]
fn a_transfer_cut_half_way_resumes_with_only_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.raw");
    raw_image(&img, 16 * MIB, &[(0, 4 * MIB as usize, 31)]);
    let src = ImageStore::open(&d.path().join("src")).unwrap();
    let dst = ImageStore::open(&d.path().join("dst")).unwrap();
    let r = import(&src, &img, "a");
    let bytes = src.manifest_bytes(&r.manifest).unwrap();
    let m = src.manifest(&r.manifest).unwrap();
    let missing = dst.missing(&m);
    let half: Vec<_> = missing[..missing.len() / 2]
        .iter()
        .map(|id| (*id, src.get_blob(id).unwrap().unwrap()))
        .collect();
    dst.put_blobs(&half).unwrap();
    // the cut: the manifest cannot be stored while chunks are missing
    match dst.put_manifest(&bytes) {
        Err(Error::Missing(m)) => assert_eq!(m.len(), missing.len() - half.len()),
        other => panic!("expected missing chunks, got {other:?}"),
    }
    assert!(!dst.has_manifest(&r.manifest));
    // a tampered blob in the resumed batch is refused and nothing of the batch is stored
    let rest = dst.missing(&m);
    let mut bad: Vec<_> = rest
        .iter()
        .map(|id| (*id, src.get_blob(id).unwrap().unwrap()))
        .collect();
    let last = bad.len() - 1;
    let n = bad[last].1.len();
    bad[last].1[n - 1] ^= 1;
    assert!(dst.put_blobs(&bad).is_err());
    assert_eq!(dst.missing(&m).len(), rest.len());
    let t = ImageStore::transfer(&src, &dst, &r.manifest).unwrap();
    assert_eq!(t.chunks_sent as usize, rest.len());
    dst.export(&r.manifest, &d.path().join("out.raw"), ImageFormat::Raw, None)
        .unwrap();
    assert_eq!(
        std::fs::read(&img).unwrap(),
        std::fs::read(d.path().join("out.raw")).unwrap()
    );
}

#[test]
fn two_imports_of_one_name_at_once_name_exactly_one_and_leave_nothing_of_the_other() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    raw_image(&a, 16 * MIB, &[(0, 6 * MIB as usize, 41)]);
    raw_image(&b, 16 * MIB, &[(0, 6 * MIB as usize, 42)]);
    let s = Arc::new(ImageStore::open(&d.path().join("store")).unwrap());
    let results: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|p| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.import_path(
                    &p,
                    &ImportOptions {
                        ref_name: Some("same"),
                        ..Default::default()
                    },
                )
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 1, "exactly one import names it: {results:?}");
    let err = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(err.to_string().contains("already exists"), "{err}");
    let winner = ok[0];
    assert_eq!(s.get_ref("same").unwrap(), Some(winner.manifest));
    assert_eq!(
        s.stats().unwrap().chunks,
        winner.chunks,
        "the loser's chunks are not in the store"
    );
    assert_eq!(s.manifests().unwrap(), vec![winner.manifest]);
}

#[test]
fn gc_runs_safely_beside_imports_and_frees_what_no_ref_names() {
    let d = tempfile::tempdir().unwrap();
    let s = Arc::new(ImageStore::open(&d.path().join("store")).unwrap());
    let imgs: Vec<_> = (0..4u64)
        .map(|i| {
            let p = d.path().join(format!("{i}.raw"));
            // images share their first 2 MiB
            raw_image(
                &p,
                16 * MIB,
                &[(0, 2 * MIB as usize, 50), (4 * MIB, MIB as usize, 60 + i)],
            );
            p
        })
        .collect();
    import(&s, &imgs[0], "img0");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.gc().unwrap();
                runs += 1;
            }
            runs
        })
    };
    for (i, p) in imgs.iter().enumerate().skip(1) {
        import(&s, p, &format!("img{i}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(gc.join().unwrap() > 0);
    for (i, p) in imgs.iter().enumerate() {
        let id = s.get_ref(&format!("img{i}")).unwrap().unwrap();
        let out = d.path().join(format!("out{i}.raw"));
        s.export(&id, &out, ImageFormat::Raw, None).unwrap();
        assert_eq!(
            std::fs::read(p).unwrap(),
            std::fs::read(&out).unwrap(),
            "image {i} intact after concurrent gc"
        );
    }
    let before = s.stats().unwrap();
    assert!(s.delete_ref("img3").unwrap());
    let g = s.gc().unwrap();
    assert_eq!(g.manifests_removed, 1);
    assert!(g.chunks_removed > 0);
    let after = s.stats().unwrap();
    assert!(after.stored_bytes < before.stored_bytes);
    // the shared chunks survived
    let id = s.get_ref("img0").unwrap().unwrap();
    s.export(&id, &d.path().join("again.raw"), ImageFormat::Raw, None)
        .unwrap();
    assert_eq!(
        std::fs::read(&imgs[0]).unwrap(),
        std::fs::read(d.path().join("again.raw")).unwrap()
    );
}

#[test]
fn disk_full_during_import_fails_cleanly_and_leaves_the_store_as_it_was() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test mounts a 4 MiB tmpfs to fill the disk and must run as root (make test runs as root)"
    );
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs failed");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&mnt);
    let sd = mnt.join("store");
    let s = ImageStore::open(&sd).unwrap();
    let small = d.path().join("small.raw");
    raw_image(&small, 4 * MIB, &[(0, 256 * 1024, 71)]);
    import(&s, &small, "small");
    let before = tree(&sd);
    let stats = s.stats().unwrap();
    // incompressible data, larger than the filesystem
    let big = d.path().join("big.raw");
    raw_image(&big, 16 * MIB, &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
    let mut x = 12345u64;
    let noise: Vec<u8> = (0..8 * MIB as usize)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &noise, MIB).unwrap();
    let err = s
        .import_path(
            &big,
            &ImportOptions {
                ref_name: Some("big"),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(tree(&sd), before, "the failed import left files behind");
    let again = s.stats().unwrap();
    assert_eq!((again.chunks, again.stored_bytes), (stats.chunks, stats.stored_bytes));
    assert!(s.get_ref("big").unwrap().is_none());
    // and the store still works
    let id = s.get_ref("small").unwrap().unwrap();
    s.export(&id, &d.path().join("out.raw"), ImageFormat::Raw, None)
        .unwrap();
    assert_eq!(
        std::fs::read(&small).unwrap(),
        std::fs::read(d.path().join("out.raw")).unwrap()
    );
}

#[test]
fn the_store_survives_reopening() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.raw");
    raw_image(&img, 8 * MIB, &[(0, MIB as usize, 81)]);
    let r = {
        let s = ImageStore::open(&d.path().join("store")).unwrap();
        import(&s, &img, "a")
    };
    let s = ImageStore::open(&d.path().join("store")).unwrap();
    assert_eq!(s.get_ref("a").unwrap(), Some(r.manifest));
    s.export(&r.manifest, &d.path().join("out.raw"), ImageFormat::Raw, None)
        .unwrap();
    assert_eq!(
        std::fs::read(&img).unwrap(),
        std::fs::read(d.path().join("out.raw")).unwrap()
    );
}
