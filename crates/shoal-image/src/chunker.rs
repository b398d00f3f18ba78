//! Block-aligned content-defined chunking.
//!
//! Disk images hold filesystems, and filesystems place file data on block boundaries (ext4, XFS
//! and btrfs on 4 KiB). Byte-granular CDC (FastCDC, casync's buzhash) pays for finding cut points
//! anywhere, and still cuts most chunks across file boundaries. Shoal cuts only at 4 KiB-aligned
//! guest offsets and lets the *content* of each block decide whether a chunk ends after it: a chunk
//! ends after block `b` when it holds at least `min_blocks` blocks and the top bits of a fast
//! 64-bit hash of `b` are zero, or when it holds `max_blocks`. An edit therefore changes only the
//! chunk it falls into, and the chunking resynchronises at the next cut after it, like CDC, while
//! identical files at different places in two images still produce identical chunks. All-zero
//! blocks are never stored: they end the chunk before them and become zero extents of the manifest.
//!
//! The parameters are part of the on-disk format ([`ChunkParams::V1`]) and pinned by golden
//! vectors in `tests/golden.rs`; changing them is a new format version.

use serde::{Deserialize, Serialize};

/// Chunks start and end on multiples of this many bytes of guest offset (except at extent edges).
pub const BLOCK: usize = 4096;

/// Parameters of the chunker. Part of the manifest format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    /// A chunk is not cut before it holds this many blocks.
    pub min_blocks: u32,
    /// A chunk is always cut when it holds this many blocks.
    pub max_blocks: u32,
    /// After `min_blocks`, each block ends the chunk with probability `2^-mask_bits`.
    pub mask_bits: u32,
}

impl ChunkParams {
    /// Format version 1: 8 KiB minimum, 16 KiB average, 64 KiB maximum. Chosen by measurement on
    /// the seven-image Debian corpus (see the crate README): smaller chunks stored more metadata
    /// than they saved, larger ones lost sharing and compressed no better.
    pub const V1: ChunkParams = ChunkParams {
        min_blocks: 2,
        max_blocks: 16,
        mask_bits: 1,
    };

    fn mask(&self) -> u64 {
        (1u64 << self.mask_bits) - 1
    }
}

/// One piece of a buffer, as byte offsets into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub start: usize,
    pub end: usize,
    /// The piece is all zeros (a run of zero blocks): recorded, not stored.
    pub zero: bool,
}

/// Splits `buf`, whose first byte sits at guest offset `base`, into chunks and zero runs.
///
/// When `last` is false the tail after the final cut is left for the caller to carry over into the
/// next call (prefixed to the next read); the return value is where that tail starts. When `last`
/// is true every byte is covered and the return value is `buf.len()`.
pub fn split(params: &ChunkParams, buf: &[u8], base: u64, last: bool, cuts: &mut Vec<Cut>) -> usize {
    use rayon::prelude::*;
    let mask = params.mask();
    // Block edges: the first block runs to the next aligned guest offset, the rest are whole;
    // an unfinished block at the end waits for the next call unless this is the last.
    if buf.is_empty() {
        return 0;
    }
    let first = BLOCK - (base % BLOCK as u64) as usize;
    let mut edges = vec![0usize];
    let mut at = first;
    while at < buf.len() {
        edges.push(at);
        at += BLOCK;
    }
    if at == buf.len() || last {
        edges.push(buf.len());
    }
    // Hashing the blocks is the bulk of the work: in parallel; the cut decisions are sequential.
    let hashes: Vec<(u64, bool)> = edges
        .par_windows(2)
        .with_min_len(64)
        .map(|w| block_hash(&buf[w[0]..w[1]]))
        .collect();
    let mut start = 0usize;
    let mut blocks = 0u32;
    for (w, &(hash, zero)) in edges.windows(2).zip(&hashes) {
        let (pos, end) = (w[0], w[1]);
        if zero {
            if start < pos {
                cuts.push(Cut {
                    start,
                    end: pos,
                    zero: false,
                });
            }
            match cuts.last_mut() {
                Some(c) if c.zero && c.end == pos => c.end = end,
                _ => cuts.push(Cut {
                    start: pos,
                    end,
                    zero: true,
                }),
            }
            start = end;
            blocks = 0;
        } else {
            blocks += 1;
            if blocks >= params.max_blocks || (blocks >= params.min_blocks && (hash >> 40) & mask == 0) {
                cuts.push(Cut {
                    start,
                    end,
                    zero: false,
                });
                start = end;
                blocks = 0;
            }
        }
    }
    if last && start < buf.len() {
        cuts.push(Cut {
            start,
            end: buf.len(),
            zero: false,
        });
        start = buf.len();
    }
    start
}

/// A fast 64-bit hash of one block (four independent multiply-rotate lanes) and whether the
/// block is all zeros, in one pass. Not cryptographic: it only chooses cut points.
pub fn block_hash(b: &[u8]) -> (u64, bool) {
    const P: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = [
        0x243F_6A88_85A3_08D3u64,
        0x1319_8A2E_0370_7344,
        0xA409_3822_299F_31D0,
        0x082E_FA98_EC4E_6C89,
    ];
    let mut or = 0u64;
    let mut words = b.chunks_exact(32);
    for c in &mut words {
        for (i, lane) in h.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            or |= w;
            *lane = (*lane ^ w).wrapping_mul(P).rotate_left(29);
        }
    }
    for (i, &byte) in words.remainder().iter().enumerate() {
        or |= byte as u64;
        h[i % 4] = (h[i % 4] ^ byte as u64).wrapping_mul(P).rotate_left(29);
    }
    let mut x = h[0] ^ h[1].rotate_left(17) ^ h[2].rotate_left(31) ^ h[3].rotate_left(47) ^ b.len() as u64;
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    (x, or == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn cuts_cover_the_buffer_in_order_on_block_boundaries() {
        let mut buf = pseudo(1 << 20, 7);
        buf[300_000..400_000].fill(0);
        let mut cuts = vec![];
        let end = split(&ChunkParams::V1, &buf, 0, true, &mut cuts);
        assert_eq!(end, buf.len());
        let mut at = 0;
        for c in &cuts {
            assert_eq!(c.start, at);
            assert!(c.end > c.start);
            at = c.end;
            if c.zero {
                assert!(buf[c.start..c.end].iter().all(|&b| b == 0));
            } else {
                assert!(c.end - c.start <= 16 * BLOCK);
                assert!(c.end % BLOCK == 0 || c.end == buf.len());
            }
        }
        assert_eq!(at, buf.len());
        // the zero run became zero pieces covering whole zero blocks
        let zero: usize = cuts.iter().filter(|c| c.zero).map(|c| c.end - c.start).sum();
        assert!(zero >= 100_000 - 2 * BLOCK, "zero bytes found {zero}");
    }

    #[test]
    fn splitting_in_pieces_with_carry_gives_the_same_cuts() {
        let buf = pseudo(3 << 20, 11);
        let mut whole = vec![];
        split(&ChunkParams::V1, &buf, 0, true, &mut whole);
        // feed in irregular reads, carrying the tail
        let mut got = vec![];
        let mut carry_start = 0usize;
        let mut fed = 0usize;
        for step in [100_000usize, 777_777, 1 << 20, 3 << 20] {
            fed = (fed + step).min(buf.len());
            let last = fed == buf.len();
            let mut cuts = vec![];
            let rest = split(
                &ChunkParams::V1,
                &buf[carry_start..fed],
                carry_start as u64,
                last,
                &mut cuts,
            );
            got.extend(cuts.iter().map(|c| Cut {
                start: c.start + carry_start,
                end: c.end + carry_start,
                zero: c.zero,
            }));
            carry_start += rest;
            if last {
                break;
            }
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() {
        let a = pseudo(2 << 20, 3);
        let mut b = a.clone();
        b[1_000_000..1_000_000 + BLOCK].copy_from_slice(&pseudo(BLOCK, 99));
        let ids = |buf: &[u8]| {
            let mut cuts = vec![];
            split(&ChunkParams::V1, buf, 0, true, &mut cuts);
            cuts.iter()
                .map(|c| blake3::hash(&buf[c.start..c.end]))
                .collect::<std::collections::HashSet<_>>()
        };
        let (ia, ib) = (ids(&a), ids(&b));
        let changed = ib.difference(&ia).count();
        assert!(changed <= 2, "{changed} chunks changed for one changed block");
    }
}
