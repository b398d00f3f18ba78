//! Measures chunking parameters on a set of images: unique bytes before and after per-chunk zstd,
//! and chunk counts, for block-aligned CDC at several sizes, fixed-size chunks, and byte-granular
//! FastCDC. How `ChunkParams::V1` was chosen:
//!
//!     cargo run --release -p shoal-image --example chunk_params -- /var/tmp/shoal-corpus/corpus/raw/*.raw

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use shoal_image::chunker::{split, Cut};
use shoal_image::source::{data_segments, Segment};
use shoal_image::{blob, ChunkId, ChunkParams};

/// A way of cutting a buffer (at a guest offset) into pieces.
type Chunking = dyn Fn(&[u8], u64, &mut Vec<Cut>);

#[derive(Default)]
struct Tally {
    seen: HashMap<ChunkId, u64>,
    unique: u64,
    chunks: u64,
}

fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    assert!(!files.is_empty(), "usage: chunk_params IMAGE...");
    let configs: Vec<(String, Box<Chunking>)> = vec![
        ("fixed 4 KiB".into(), Box::new(|b, base, c| fixed(b, base, 4096, c))),
        ("fixed 64 KiB".into(), Box::new(|b, base, c| fixed(b, base, 65536, c))),
        (
            "aligned 8K/16K/64K (V1)".into(),
            Box::new(|b, base, c| {
                split(&ChunkParams::V1, b, base, true, c);
            }),
        ),
        (
            "aligned 4K/8K/32K".into(),
            Box::new(|b, base, c| {
                split(
                    &ChunkParams {
                        min_blocks: 1,
                        max_blocks: 8,
                        mask_bits: 0,
                    },
                    b,
                    base,
                    true,
                    c,
                );
            }),
        ),
        (
            "aligned 4K/12K/64K".into(),
            Box::new(|b, base, c| {
                split(
                    &ChunkParams {
                        min_blocks: 1,
                        max_blocks: 16,
                        mask_bits: 1,
                    },
                    b,
                    base,
                    true,
                    c,
                );
            }),
        ),
        (
            "aligned 16K/32K/128K".into(),
            Box::new(|b, base, c| {
                split(
                    &ChunkParams {
                        min_blocks: 4,
                        max_blocks: 32,
                        mask_bits: 2,
                    },
                    b,
                    base,
                    true,
                    c,
                );
            }),
        ),
        (
            "aligned 32K/64K/256K".into(),
            Box::new(|b, base, c| {
                split(
                    &ChunkParams {
                        min_blocks: 8,
                        max_blocks: 64,
                        mask_bits: 3,
                    },
                    b,
                    base,
                    true,
                    c,
                );
            }),
        ),
        (
            "fastcdc 8/16/64K".into(),
            Box::new(|b, _, c| {
                for ch in fastcdc::v2020::FastCDC::new(b, 8192, 16384, 65536) {
                    c.push(Cut {
                        start: ch.offset,
                        end: ch.offset + ch.length,
                        zero: false,
                    });
                }
            }),
        ),
    ];
    let mut tallies: Vec<Tally> = configs.iter().map(|_| Tally::default()).collect();
    let mut logical = 0u64;
    for path in &files {
        let f = File::open(path).unwrap();
        let size = f.metadata().unwrap().len();
        logical += size;
        for seg in data_segments(&f, size).unwrap() {
            let Segment::Data {
                guest,
                len,
                file_offset,
            } = seg
            else {
                continue;
            };
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, file_offset).unwrap();
            for ((_, cut), t) in configs.iter().zip(tallies.iter_mut()) {
                let mut cuts = vec![];
                cut(&buf, guest, &mut cuts);
                for c in cuts.iter().filter(|c| !c.zero) {
                    let d = &buf[c.start..c.end];
                    if d.iter().all(|&x| x == 0) {
                        continue;
                    }
                    t.chunks += 1;
                    let id = ChunkId::of(d);
                    if !t.seen.contains_key(&id) {
                        t.unique += d.len() as u64;
                        t.seen.insert(id, blob::encode(d).len() as u64);
                    }
                }
            }
        }
        eprintln!("done {path}");
    }
    println!(
        "{:<26} {:>12} {:>14} {:>10} {:>10}",
        "chunking", "unique MB", "compressed MB", "chunks", "unique"
    );
    for ((name, _), t) in configs.iter().zip(&tallies) {
        let comp: u64 = t.seen.values().sum();
        println!(
            "{:<26} {:>12.1} {:>14.1} {:>10} {:>10}",
            name,
            t.unique as f64 / 1e6,
            comp as f64 / 1e6,
            t.chunks,
            t.seen.len()
        );
    }
    println!("logical {:.1} GB", logical as f64 / 1e9);
}

fn fixed(b: &[u8], base: u64, size: usize, cuts: &mut Vec<Cut>) {
    let mut at = 0;
    while at < b.len() {
        let end = (at + size - ((base as usize + at) % size)).min(b.len());
        cuts.push(Cut {
            start: at,
            end,
            zero: false,
        });
        at = end;
    }
}
