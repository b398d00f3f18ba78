//! Splicing: a new image made of a held one with some runs replaced, reading only those runs.
//!
//! A VM disk's checkpoint is stored this way: QEMU names the clusters written since the previous
//! checkpoint, their data sits in a sparse file at the same guest offsets, and the rest of the disk
//! is the previous checkpoint's (or the template's) extents as they are, neither read nor hashed.
//! A change that cuts into a chunk of the parent is widened to that chunk's edges, the bytes it
//! did not change read back from the chunk: a chunk is never cut in two, so every chunk a change
//! does not touch keeps its id and stays shared with the parent. Widened runs that meet are
//! chunked as one, so no cut is forced where they touch.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::id::{ChunkId, ManifestId};
use crate::manifest::{Extent, Manifest};
use crate::store::{check_ref_name, io_err, ImageStore, NewImage, READ_STEP};
use crate::Error;

/// A run of an image that changed: new data (read from the data file at `offset`) or zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub offset: u64,
    pub len: u64,
    pub zero: bool,
}

impl Change {
    /// Where the change ends; only for changes checked not to overflow.
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// What a splice did.
#[derive(Clone, Debug, Serialize)]
pub struct SpliceReport {
    pub manifest: ManifestId,
    /// Bytes read from the data file: the data changes' bytes and nothing else.
    pub read_bytes: u64,
    /// Bytes the changes cover, data and zeros.
    pub changed_bytes: u64,
    /// Distinct chunks of the new image.
    pub chunks: u64,
    /// Chunks the store lacked, and their compressed bytes.
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
    pub seconds: f64,
}

/// A splice decided from the parent's manifest and the changes, before anything is read.
#[derive(Debug, PartialEq)]
struct Plan {
    /// Size of the new image: the parent's, or larger when asked (grown with zeros).
    size: u64,
    /// The changes in order, the empty ones dropped.
    changes: Vec<Change>,
    /// The new image in order: extents of the parent kept as they are, and runs chunked anew.
    pieces: Vec<Piece>,
}

#[derive(Debug, PartialEq)]
enum Piece {
    Keep(Extent),
    Run(Run),
}

/// A stretch of the new image to chunk: one or more changes, widened to the edges of the parent
/// chunks they cut into.
#[derive(Debug, PartialEq)]
struct Run {
    offset: u64,
    len: u64,
    /// The changes inside it, as indices into `Plan::changes`.
    changes: Range<usize>,
    /// Parent chunks inside it (guest offset, id, length) that its changes do not wholly
    /// replace: read back for the bytes the changes leave as they were.
    fills: Vec<(u64, ChunkId, u64)>,
}

/// Checks the changes and decides the splice.
fn plan(parent: &Manifest, changes: &[Change], size: Option<u64>) -> Result<Plan, Error> {
    let size = parent.size.max(size.unwrap_or(0));
    let mut changes: Vec<Change> = changes.iter().copied().filter(|c| c.len > 0).collect();
    changes.sort_by_key(|c| c.offset);
    for c in &changes {
        if c.offset.checked_add(c.len).is_none_or(|end| end > size) {
            return Err(Error::Invalid(format!(
                "the change at offset {} ({} bytes) runs past the end of the image ({size} bytes)",
                c.offset, c.len
            )));
        }
    }
    for w in changes.windows(2) {
        if w[0].end() > w[1].offset {
            return Err(Error::Invalid(format!(
                "the changes at offsets {} and {} overlap",
                w[0].offset, w[1].offset
            )));
        }
    }
    // The parent's extents at their offsets, then the growth as zeros.
    let mut base: Vec<(u64, Extent)> = Vec::with_capacity(parent.extents.len() + 1);
    let mut at = 0;
    let growth = Extent::Zero {
        len: size - parent.size,
    };
    for e in parent.extents.iter().copied().chain(std::iter::once(growth)) {
        if !e.is_empty() {
            base.push((at, e));
            at += e.len();
        }
    }
    // The extent holding byte `off` (< size, so there is one).
    let holding = |off: u64| base.partition_point(|&(start, _)| start <= off) - 1;

    let mut runs: Vec<(u64, u64, Range<usize>)> = vec![];
    for (i, c) in changes.iter().enumerate() {
        let (mut start, mut stop) = (c.offset, c.end());
        if let (at, Extent::Chunk { .. }) = base[holding(start)] {
            start = at;
        }
        if let (at, e @ Extent::Chunk { .. }) = base[holding(stop - 1)] {
            stop = at + e.len();
        }
        match runs.last_mut() {
            Some(r) if r.1 >= start => {
                r.1 = r.1.max(stop);
                r.2.end = i + 1;
            }
            _ => runs.push((start, stop, i..i + 1)),
        }
    }

    let mut pieces = vec![];
    let mut kept_to = 0;
    for (start, stop, range) in runs {
        keep(&base, kept_to, start, &mut pieces);
        let within = &changes[range.clone()];
        let fills = base[holding(start)..]
            .iter()
            .take_while(|&&(at, _)| at < stop)
            .filter_map(|&(at, e)| match e {
                Extent::Chunk { id, len } if covered(within, at, at + len) < len => Some((at, id, len)),
                _ => None,
            })
            .collect();
        pieces.push(Piece::Run(Run {
            offset: start,
            len: stop - start,
            changes: range,
            fills,
        }));
        kept_to = stop;
    }
    keep(&base, kept_to, size, &mut pieces);
    Ok(Plan { size, changes, pieces })
}

/// Adds the parent's extents between `from` and `to` as they are; zero extents are cut at the
/// edges, chunks never are (runs end on chunk edges).
fn keep(base: &[(u64, Extent)], from: u64, to: u64, pieces: &mut Vec<Piece>) {
    if from >= to {
        return;
    }
    let first = base.partition_point(|&(at, e)| at + e.len() <= from);
    for &(at, e) in base[first..].iter().take_while(|&&(at, _)| at < to) {
        match e {
            Extent::Zero { len } => pieces.push(Piece::Keep(Extent::Zero {
                len: (at + len).min(to) - at.max(from),
            })),
            Extent::Chunk { len, .. } => {
                assert!(
                    at >= from && at + len <= to,
                    "a kept chunk lies wholly outside the runs"
                );
                pieces.push(Piece::Keep(e));
            }
        }
    }
}

/// How many bytes of `from..to` the sorted, disjoint `changes` cover.
fn covered(changes: &[Change], from: u64, to: u64) -> u64 {
    let first = changes.partition_point(|c| c.end() <= from);
    changes[first..]
        .iter()
        .take_while(|c| c.offset < to)
        .map(|c| c.end().min(to) - c.offset.max(from))
        .sum()
}

impl ImageStore {
    /// Makes a new image from the held image `parent` with `changes` laid over it, each one's
    /// bytes read from `data` at its own offset, or zeros; grown with zeros to `size` if that is
    /// larger. Only the changed runs of `data` are read, and of the parent only the chunks a
    /// change cuts into; every other extent of the parent is kept as it is. Names the new image
    /// `ref_name` if given, replacing what that named. On any error the store is as it was.
    pub fn splice(
        &self,
        parent: &ManifestId,
        changes: &[Change],
        data: &Path,
        size: Option<u64>,
        ref_name: Option<&str>,
    ) -> Result<SpliceReport, Error> {
        let started = Instant::now();
        if let Some(name) = ref_name {
            check_ref_name(name)?;
        }
        // Holds the GC lock until the new manifest is named: the parent's chunks it keeps stay.
        let mut image = self.new_image()?;
        let base = self.manifest(parent)?;
        if base.params != self.params() {
            return Err(Error::Invalid(format!(
                "image {parent} was chunked with {:?}, this store chunks with {:?}: cannot splice into it",
                base.params,
                self.params()
            )));
        }
        let plan = plan(&base, changes, size)?;
        let data_end = plan.changes.iter().filter(|c| !c.zero).map(Change::end).max();
        let file = match data_end {
            None => None,
            Some(need) => {
                let f = File::open(data).map_err(io_err("opening", data))?;
                let len = f.metadata().map_err(io_err("reading", data))?.len();
                if len < need {
                    return Err(Error::Invalid(format!(
                        "{} is truncated: it ends at byte {len}, the changed data runs to {need}",
                        data.display()
                    )));
                }
                Some(f)
            }
        };
        let mut read_bytes = 0;
        let mut buf = vec![];
        for piece in &plan.pieces {
            match piece {
                Piece::Keep(e) => image.push(*e),
                Piece::Run(run) => {
                    let changes = &plan.changes[run.changes.clone()];
                    read_bytes += self.chunk_run(&mut image, run, changes, file.as_ref(), data, &mut buf)?;
                }
            }
        }
        let chunks = image.manifest().distinct_chunks().len() as u64;
        let (new_chunks, new_stored_bytes) = (image.new_chunks, image.new_stored_bytes);
        let manifest = image.finish(plan.size, ref_name, true)?;
        Ok(SpliceReport {
            manifest,
            read_bytes,
            changed_bytes: plan.changes.iter().map(|c| c.len).sum(),
            chunks,
            new_chunks,
            new_stored_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Chunks one run into `image`, a read step at a time: zeros, the parent's chunks over them,
    /// the changes over those. Returns the bytes read from the data file.
    fn chunk_run(
        &self,
        image: &mut NewImage<'_>,
        run: &Run,
        changes: &[Change],
        file: Option<&File>,
        path: &Path,
        buf: &mut Vec<u8>,
    ) -> Result<u64, Error> {
        // Nothing of the parent shows through and nothing is written: the chunker would find
        // only zero blocks, and a large discard is not worth hashing.
        if run.fills.is_empty() && changes.iter().all(|c| c.zero) {
            image.push(Extent::Zero { len: run.len });
            return Ok(0);
        }
        let slack = image.slack();
        let step = READ_STEP.min(run.len) as usize;
        if buf.len() < slack + step {
            buf.resize(slack + step, 0);
        }
        let mut read = 0;
        let mut done = 0;
        while done < run.len {
            let n = READ_STEP.min(run.len - done);
            let (from, to) = (run.offset + done, run.offset + done + n);
            let piece = &mut buf[slack..slack + n as usize];
            piece.fill(0);
            // A chunk across two steps is read for each: rare, and simpler than keeping it.
            let first = run.fills.partition_point(|&(at, _, len)| at + len <= from);
            let fills: Vec<(u64, ChunkId, u64)> = run.fills[first..].iter().take_while(|f| f.0 < to).copied().collect();
            let contents = fills
                .par_iter()
                .map(|&(_, id, len)| self.chunk_data(&id, len))
                .collect::<Result<Vec<_>, Error>>()?;
            for (&(at, _, len), content) in fills.iter().zip(&contents) {
                let (s, e) = (at.max(from), (at + len).min(to));
                piece[(s - from) as usize..(e - from) as usize]
                    .copy_from_slice(&content[(s - at) as usize..(e - at) as usize]);
            }
            let first = changes.partition_point(|c| c.end() <= from);
            for c in changes[first..].iter().take_while(|c| c.offset < to) {
                let (s, e) = (c.offset.max(from), c.end().min(to));
                let dst = &mut piece[(s - from) as usize..(e - from) as usize];
                if c.zero {
                    dst.fill(0);
                } else {
                    let f = file.expect("the data file is open when a change has data");
                    f.read_exact_at(dst, s).map_err(io_err("reading", path))?;
                    read += e - s;
                }
            }
            image.feed(buf, n as usize, from, done + n == run.len)?;
            done += n;
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::ChunkParams;

    const K: u64 = 1024;

    fn chunk(n: u8, len: u64) -> Extent {
        Extent::Chunk {
            id: ChunkId([n; 32]),
            len,
        }
    }

    fn data(offset: u64, len: u64) -> Change {
        Change {
            offset,
            len,
            zero: false,
        }
    }

    fn zeros(offset: u64, len: u64) -> Change {
        Change {
            offset,
            len,
            zero: true,
        }
    }

    /// A (0..16K), zeros (16K..48K), B (48K..64K), C (64K..80K).
    fn parent() -> Manifest {
        Manifest {
            params: ChunkParams::V1,
            size: 80 * K,
            extents: vec![
                chunk(1, 16 * K),
                Extent::Zero { len: 32 * K },
                chunk(2, 16 * K),
                chunk(3, 16 * K),
            ],
        }
    }

    #[test]
    fn runs_widen_to_the_chunks_they_cut_and_merge_where_they_meet() {
        let changes = [
            data(90 * K, 5 * K),  // in the growth
            data(64 * K, 16 * K), // all of C: touches the widened run before it
            data(4 * K, 4 * K),   // inside A
            zeros(20 * K, 4 * K), // inside the zeros
            data(0, 0),           // empty: ignored
            data(44 * K, 8 * K),  // from the zeros into B
        ];
        let p = plan(&parent(), &changes, Some(100 * K)).unwrap();
        assert_eq!(p.size, 100 * K);
        assert_eq!(p.changes.len(), 5);
        let run = |offset, len, changes, fills| {
            Piece::Run(Run {
                offset,
                len,
                changes,
                fills,
            })
        };
        let id = |n| ChunkId([n; 32]);
        assert_eq!(
            p.pieces,
            vec![
                run(0, 16 * K, 0..1, vec![(0, id(1), 16 * K)]),
                Piece::Keep(Extent::Zero { len: 4 * K }),
                run(20 * K, 4 * K, 1..2, vec![]),
                Piece::Keep(Extent::Zero { len: 20 * K }),
                // C is wholly replaced: not read
                run(44 * K, 36 * K, 2..4, vec![(48 * K, id(2), 16 * K)]),
                Piece::Keep(Extent::Zero { len: 10 * K }),
                run(90 * K, 5 * K, 4..5, vec![]),
                Piece::Keep(Extent::Zero { len: 5 * K }),
            ]
        );
    }

    #[test]
    fn no_changes_keep_the_parent_as_it_is() {
        let p = plan(&parent(), &[], None).unwrap();
        let kept: Vec<Extent> = p
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Keep(e) => *e,
                Piece::Run(r) => panic!("unexpected run {r:?}"),
            })
            .collect();
        assert_eq!(kept, parent().extents);
    }

    #[test]
    fn changes_on_chunk_edges_read_nothing_back() {
        let p = plan(&parent(), &[data(48 * K, 16 * K)], None).unwrap();
        assert_eq!(
            p.pieces[2],
            Piece::Run(Run {
                offset: 48 * K,
                len: 16 * K,
                changes: 0..1,
                fills: vec![],
            })
        );
        assert_eq!(p.pieces[3], Piece::Keep(chunk(3, 16 * K)));
    }

    #[test]
    fn bad_changes_are_refused_naming_them() {
        let err = |changes: &[Change], size| plan(&parent(), changes, size).unwrap_err().to_string();
        let e = err(&[data(70 * K, 4 * K), data(8 * K, 4 * K), data(72 * K, 1)], None);
        assert!(
            e.contains("71680") && e.contains("73728") && e.contains("overlap"),
            "{e}"
        );
        let e = err(&[data(78 * K, 4 * K)], None);
        assert!(e.contains("79872") && e.contains("past the end"), "{e}");
        assert!(plan(&parent(), &[data(78 * K, 4 * K)], Some(82 * K)).is_ok());
        let e = err(&[zeros(u64::MAX - 1, 4)], Some(u64::MAX));
        assert!(e.contains(&(u64::MAX - 1).to_string()), "{e}");
    }

    #[test]
    fn covered_counts_only_the_overlap() {
        let cs = [data(0, 10), data(20, 10), data(40, 10)];
        assert_eq!(covered(&cs, 5, 45), 5 + 10 + 5);
        assert_eq!(covered(&cs, 10, 20), 0);
        assert_eq!(covered(&cs, 0, 50), 30);
    }
}
