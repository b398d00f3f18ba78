//! Splicing changed runs into a held image: the result is the parent with the changes applied,
//! byte for byte; only the changed data is read; the chunks the changes do not touch are the
//! parent's; bad input changes nothing.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use proptest::prelude::*;
use shoal_image::{Change, ChunkId, Error, ImageFormat, ImageStore, ImportOptions, ManifestId};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// Imports `bytes` as a raw image (holes where the blocks are zero, as a sparse disk has them).
fn import_bytes(s: &ImageStore, path: &Path, bytes: &[u8]) -> ManifestId {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, (i * BLOCK) as u64).unwrap();
        }
    }
    f.sync_all().unwrap();
    s.import_path(
        path,
        &ImportOptions {
            format: Some(ImageFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap()
    .manifest
}

fn export(s: &ImageStore, id: &ManifestId, path: &Path) -> Vec<u8> {
    s.export(id, path, ImageFormat::Raw, None).unwrap();
    std::fs::read(path).unwrap()
}

/// A data file as QEMU leaves one: the changes' data at their offsets. Everything else is filled
/// with 0xEE, so a splice that read outside the changes would show it.
fn data_file(path: &Path, size: u64, changes: &[Change], seed: u64) -> Vec<Vec<u8>> {
    let f = std::fs::File::create(path).unwrap();
    f.write_all_at(&vec![0xEE; size as usize], 0).unwrap();
    let mut written = vec![];
    for (i, c) in changes.iter().enumerate() {
        let d = if c.zero {
            vec![]
        } else {
            pseudo(c.len as usize, seed + i as u64)
        };
        f.write_all_at(&d, c.offset).unwrap();
        written.push(d);
    }
    written
}

/// `base` grown with zeros to `size`, the changes applied.
fn applied(base: &[u8], size: u64, changes: &[Change], data: &[Vec<u8>]) -> Vec<u8> {
    let mut out = base.to_vec();
    out.resize(size as usize, 0);
    for (c, d) in changes.iter().zip(data) {
        let r = c.offset as usize..(c.offset + c.len) as usize;
        if c.zero {
            out[r].fill(0);
        } else {
            out[r].copy_from_slice(d);
        }
    }
    out
}

fn chunk_set(s: &ImageStore, id: &ManifestId) -> HashSet<(u64, ChunkId, u64)> {
    s.manifest(id).unwrap().chunks().collect()
}

#[derive(Clone, Debug)]
enum Region {
    Random {
        seed: u64,
        blocks: usize,
    },
    Zeros {
        blocks: usize,
    },
    /// One block repeated: identical chunks at several places.
    Repeated {
        seed: u64,
        blocks: usize,
    },
}

fn region() -> impl Strategy<Value = Region> {
    prop_oneof![
        (any::<u64>(), 1usize..96).prop_map(|(seed, blocks)| Region::Random { seed, blocks }),
        (1usize..64).prop_map(|blocks| Region::Zeros { blocks }),
        (any::<u64>(), 1usize..48).prop_map(|(seed, blocks)| Region::Repeated { seed, blocks }),
    ]
}

fn base_image(regions: &[Region], tail_sectors: usize) -> Vec<u8> {
    let mut out = vec![];
    for r in regions {
        match *r {
            Region::Random { seed, blocks } => out.extend(pseudo(blocks * BLOCK, seed)),
            Region::Zeros { blocks } => out.resize(out.len() + blocks * BLOCK, 0),
            Region::Repeated { seed, blocks } => {
                let b = pseudo(BLOCK, seed);
                for _ in 0..blocks {
                    out.extend_from_slice(&b);
                }
            }
        }
    }
    out.extend(pseudo(tail_sectors * 512, 77));
    out
}

/// A change as drawn: alignment (bytes, 4 KiB, 64 KiB), gap after the previous one and length in
/// that unit, data or zeros.
type Drawn = (u8, u64, u64, bool);

fn drawn() -> impl Strategy<Value = Drawn> {
    (0u8..3, 0u64..48, 1u64..24, any::<bool>()).prop_map(|(unit, gap, len, zero)| match unit {
        0 => (unit, gap * 4099, len * 5003, zero),
        1 => (unit, gap, len, zero),
        _ => (unit, gap / 8, len / 6 + 1, zero),
    })
}

/// Lays the drawn changes out in order without overlap, clipped to `size`.
fn lay_out(drawn: &[Drawn], size: u64) -> Vec<Change> {
    let mut out = vec![];
    let mut at = 0u64;
    for &(unit, gap, len, zero) in drawn {
        let (offset, len) = match unit {
            0 => (at + gap, len),
            1 => ((at + gap * 4 * KIB).next_multiple_of(4 * KIB), len * 4 * KIB),
            _ => ((at + gap * 64 * KIB).next_multiple_of(64 * KIB), len * 64 * KIB),
        };
        if offset >= size {
            break;
        }
        let len = len.min(size - offset);
        out.push(Change { offset, len, zero });
        at = offset + len;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn a_splice_is_the_parent_with_the_changes_applied(
        regions in prop::collection::vec(region(), 1..12),
        tail_sectors in 0usize..9,
        drawn in prop::collection::vec(drawn(), 0..14),
        grow in prop_oneof![Just(0u64), 1u64..300_000],
        reversed in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(&d.path().join("store")).unwrap();
        let base = base_image(&regions, tail_sectors);
        let parent = import_bytes(&s, &d.path().join("base.raw"), &base);
        let size = base.len() as u64 + grow;
        let changes = lay_out(&drawn, size);
        let data = d.path().join("data");
        let written = data_file(&data, size, &changes, seed);
        let expect = applied(&base, size, &changes, &written);

        let mut given = changes.clone();
        if reversed {
            given.reverse();
        }
        let r = s.splice(&parent, &given, &data, Some(size), None).unwrap();
        let got = export(&s, &r.manifest, &d.path().join("out.raw"));
        prop_assert!(got == expect, "the spliced image differs from the parent with the changes applied");
        prop_assert_eq!(s.manifest(&r.manifest).unwrap().size, size);
        let data_bytes: u64 = changes.iter().filter(|c| !c.zero).map(|c| c.len).sum();
        prop_assert_eq!(r.read_bytes, data_bytes);
        prop_assert_eq!(r.changed_bytes, changes.iter().map(|c| c.len).sum::<u64>());
        prop_assert_eq!(r.chunks, s.manifest(&r.manifest).unwrap().distinct_chunks().len() as u64);

        // every chunk of the parent no change touches is in the new image, at its place
        let new = chunk_set(&s, &r.manifest);
        for (at, id, len) in s.manifest(&parent).unwrap().chunks() {
            let touched = changes.iter().any(|c| c.offset < at + len && at < c.offset + c.len);
            prop_assert!(touched || new.contains(&(at, id, len)), "untouched chunk at {} lost", at);
        }

        // laying the parent's own bytes over it gives the parent back, chunk for chunk
        let own: Vec<Change> = changes
            .iter()
            .filter(|c| c.offset + c.len <= base.len() as u64)
            .map(|c| Change { zero: false, ..*c })
            .collect();
        let same = s.splice(&parent, &own, &d.path().join("base.raw"), None, None).unwrap();
        prop_assert_eq!(same.manifest, parent);
        prop_assert_eq!(same.new_chunks, 0);
    }
}

#[test]
fn a_one_percent_change_reads_only_the_changed_bytes_and_keeps_the_other_chunks() {
    let d = tempfile::tempdir().unwrap();
    let s = ImageStore::open(&d.path().join("store")).unwrap();
    let img = d.path().join("base.raw");
    raw_image(
        &img,
        64 * MIB,
        &[(0, 40 * MIB as usize, 1), (48 * MIB, 12 * MIB as usize, 2)],
    );
    let parent = s
        .import_path(
            &img,
            &ImportOptions {
                ref_name: Some("template/base"),
                ..Default::default()
            },
        )
        .unwrap()
        .manifest;
    // ten 64 KiB clusters, as QEMU's dirty bitmap reports them, and one zeroed
    let mut changes: Vec<Change> = (0..10u64)
        .map(|i| Change {
            offset: i * 6 * MIB + 3 * 64 * KIB,
            len: 64 * KIB,
            zero: false,
        })
        .collect();
    changes.push(Change {
        offset: 61 * MIB,
        len: 64 * KIB,
        zero: true,
    });
    let data = d.path().join("data");
    let written = data_file(&data, 64 * MIB, &changes, 50);
    let r = s
        .splice(&parent, &changes, &data, None, Some("checkpoint/vm-1"))
        .unwrap();
    assert_eq!(r.read_bytes, 10 * 64 * KIB, "only the changed data is read");
    assert_eq!(r.changed_bytes, 11 * 64 * KIB);
    assert!(
        r.new_chunks <= 10 * 8,
        "{} new chunks for ten changed clusters",
        r.new_chunks
    );
    let before = s.manifest(&parent).unwrap().distinct_chunks();
    let after: HashSet<ChunkId> = s.manifest(&r.manifest).unwrap().distinct_chunks().into_iter().collect();
    let shared = before.iter().filter(|c| after.contains(c)).count();
    assert!(
        shared as f64 >= 0.95 * before.len() as f64,
        "{shared} of the parent's {} chunks shared",
        before.len()
    );
    assert_eq!(s.get_ref("checkpoint/vm-1").unwrap(), Some(r.manifest));
    let base = std::fs::read(&img).unwrap();
    let got = export(&s, &r.manifest, &d.path().join("out.raw"));
    assert!(got == applied(&base, 64 * MIB, &changes, &written));

    // the same bytes laid over it again make the same image
    let again = s.splice(&r.manifest, &changes[..1], &data, None, None).unwrap();
    assert_eq!((again.manifest, again.new_chunks), (r.manifest, 0));
    // a second checkpoint on the first: the name moves to it
    let next = [Change {
        offset: 20 * MIB,
        len: 4 * KIB,
        zero: true,
    }];
    let second = s
        .splice(&r.manifest, &next, &data, None, Some("checkpoint/vm-1"))
        .unwrap();
    assert_ne!(second.manifest, r.manifest);
    assert_eq!(s.get_ref("checkpoint/vm-1").unwrap(), Some(second.manifest));
    assert_eq!(second.read_bytes, 0);
}

#[test]
fn no_changes_give_the_parent_and_growth_is_zeros() {
    let d = tempfile::tempdir().unwrap();
    let s = ImageStore::open(&d.path().join("store")).unwrap();
    let base = pseudo(MIB as usize, 4);
    let parent = import_bytes(&s, &d.path().join("base.raw"), &base);
    let absent = d.path().join("absent");
    let r = s.splice(&parent, &[], &absent, None, None).unwrap();
    assert_eq!((r.manifest, r.read_bytes, r.new_chunks), (parent, 0, 0));
    // zero changes only: the data file is not even opened
    let zero = [Change {
        offset: 64 * KIB,
        len: 64 * KIB,
        zero: true,
    }];
    let r = s.splice(&parent, &zero, &absent, Some(3 * MIB + 1), None).unwrap();
    let got = export(&s, &r.manifest, &d.path().join("out.raw"));
    assert!(got == applied(&base, 3 * MIB + 1, &zero, &[vec![]]));
    let m = s.manifest(&r.manifest).unwrap();
    assert_eq!(
        m.data_bytes(),
        MIB - 64 * KIB,
        "the growth and the zeroed cluster hold no chunks"
    );
}

#[test]
fn bad_input_is_refused_naming_it_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let sd = d.path().join("store");
    let s = ImageStore::open(&sd).unwrap();
    let parent = import_bytes(&s, &d.path().join("base.raw"), &pseudo(2 * MIB as usize, 8));
    let data = d.path().join("data");
    let change = |offset, len| Change {
        offset,
        len,
        zero: false,
    };
    data_file(&data, 2 * MIB, &[], 0);
    let refused = |parent: &ManifestId, changes: &[Change], data: &Path, size, name, expect: &[&str]| {
        let (stats, files) = (s.stats().unwrap(), tree(&sd));
        let err = s
            .splice(parent, changes, data, size, name)
            .expect_err("the splice must fail");
        let text = err.to_string();
        for e in expect {
            assert!(text.contains(e), "error {text:?} should mention {e:?}");
        }
        let after = s.stats().unwrap();
        assert_eq!(
            (after.chunks, after.manifests, after.refs, after.stored_bytes),
            (stats.chunks, stats.manifests, stats.refs, stats.stored_bytes)
        );
        assert_eq!(tree(&sd), files, "a refused splice changed the store");
        err
    };
    refused(
        &parent,
        &[change(MIB, 8192), change(0, 4096), change(MIB + 4096, 4096)],
        &data,
        None,
        None,
        &["1048576", "1052672", "overlap"],
    );
    refused(
        &parent,
        &[change(2 * MIB - 4096, 8192)],
        &data,
        None,
        None,
        &["2093056", "past the end"],
    );
    let unknown = ManifestId([7; 32]);
    let e = refused(&unknown, &[], &data, None, None, &[&unknown.to_hex()]);
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    refused(
        &parent,
        &[change(MIB, 4096)],
        &d.path().join("absent"),
        None,
        None,
        &["absent"],
    );
    // the data file ends before the changed data does
    refused(
        &parent,
        &[change(3 * MIB, 4096)],
        &data,
        Some(4 * MIB),
        None,
        &["truncated", "3149824"],
    );
    refused(
        &parent,
        &[change(0, 4096)],
        &data,
        None,
        Some("../x"),
        &["not a valid image name"],
    );
}

#[test]
fn a_run_longer_than_a_read_step_is_chunked_like_an_import() {
    // 4 KiB changes every 8 KiB: no chunk (8 KiB at least) fits between two, so widened to the
    // chunks they cut they meet, and make one run of 18 MiB, read and chunked in steps, with
    // parent chunks across the steps' edges.
    let d = tempfile::tempdir().unwrap();
    let s = ImageStore::open(&d.path().join("store")).unwrap();
    let base = pseudo(20 * MIB as usize, 9);
    let img = d.path().join("base.raw");
    let parent = import_bytes(&s, &img, &base);
    let changes: Vec<Change> = (0..18 * MIB / (8 * KIB))
        .map(|i| Change {
            offset: MIB + i * 8 * KIB + 4 * KIB,
            len: 4 * KIB,
            zero: i % 7 == 0,
        })
        .collect();
    let data = d.path().join("data");
    let written = data_file(&data, 20 * MIB, &changes, 3);
    let r = s.splice(&parent, &changes, &data, None, None).unwrap();
    let got = export(&s, &r.manifest, &d.path().join("out.raw"));
    assert!(got == applied(&base, 20 * MIB, &changes, &written));
    // the parent's own bytes over the same runs: exactly the parent, so the steps cut as an import does
    let own: Vec<Change> = changes.iter().map(|c| Change { zero: false, ..*c }).collect();
    let same = s.splice(&parent, &own, &img, None, None).unwrap();
    assert_eq!(same.manifest, parent);
}
