//! Golden vectors pinning format version 1: the chunker's cut points, chunk ids and the manifest
//! encoding. If one of these fails, the change breaks every stored image: make a new format
//! version instead of updating the vectors.

use shoal_image::chunker::{block_hash, split, Cut};
use shoal_image::{ChunkId, ChunkParams, Extent, Manifest};

/// A deterministic input: xorshift bytes with a zero run and an unaligned start.
fn input() -> Vec<u8> {
    let mut x = 0x5eed_u64;
    let mut v: Vec<u8> = (0..1_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    v[300_000..340_000].fill(0);
    v
}

fn digest_of_cuts(buf: &[u8], cuts: &[Cut]) -> String {
    let mut h = blake3::Hasher::new();
    for c in cuts {
        h.update(&(c.start as u64).to_le_bytes());
        h.update(&(c.end as u64).to_le_bytes());
        h.update(&[c.zero as u8]);
        if !c.zero {
            h.update(&ChunkId::of(&buf[c.start..c.end]).0);
        }
    }
    h.finalize().to_hex().to_string()
}

#[test]
fn v1_parameters() {
    assert_eq!(
        ChunkParams::V1,
        ChunkParams {
            min_blocks: 2,
            max_blocks: 16,
            mask_bits: 1
        }
    );
}

#[test]
fn v1_block_hash() {
    assert_eq!(block_hash(&[0u8; 4096]), (GOLDEN_HASH_ZERO, true));
    let b: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    assert_eq!(block_hash(&b), (GOLDEN_HASH_PATTERN, false));
}

#[test]
fn v1_cuts_and_chunk_ids() {
    let buf = input();
    let mut cuts = vec![];
    // guest offset 1000: the first block is short, the rest are aligned
    split(&ChunkParams::V1, &buf, 1000, true, &mut cuts);
    assert_eq!(cuts.len(), GOLDEN_CUTS);
    assert_eq!(digest_of_cuts(&buf, &cuts), GOLDEN_CUT_DIGEST);
}

#[test]
fn v1_manifest_encoding() {
    let m = Manifest {
        params: ChunkParams::V1,
        size: 4096 + 8192,
        extents: vec![
            Extent::Chunk {
                id: ChunkId::of(b"shoal"),
                len: 4096,
            },
            Extent::Zero { len: 8192 },
        ],
    };
    let enc = m.encode();
    assert_eq!(hex::encode(&enc), GOLDEN_MANIFEST_HEX);
    assert_eq!(m.id().to_hex(), GOLDEN_MANIFEST_ID);
    assert_eq!(Manifest::decode(&enc).unwrap(), m);
    // damage is detected
    assert!(Manifest::decode(&enc[..enc.len() - 1]).is_err());
    let mut bad = enc.clone();
    bad[8] = 2;
    assert!(Manifest::decode(&bad).unwrap_err().to_string().contains("version 2"));
}

const GOLDEN_HASH_ZERO: u64 = 13172374747362769952;
const GOLDEN_HASH_PATTERN: u64 = 16863754433009560228;
const GOLDEN_CUTS: usize = 87;
const GOLDEN_CUT_DIGEST: &str = "282c1b7fe91e84139fa95c517f4a0a61a2e402a04787b8e4808116535148121c";
const GOLDEN_MANIFEST_HEX: &str = "53484f414c4d460001000200000010000000010000000030000000000000020000000000000001001000000000000086ed170f3f7aa67d8724f82063ed31e791643d20060ba22ad5fb2e77248c71e9000020000000000000";
const GOLDEN_MANIFEST_ID: &str = "57c59d2b41c724d2b403fe473b6c12b9ad4d875a14c58fad9f682baa440afbe4";
