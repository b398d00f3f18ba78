//! A VM disk's block profile: how much of it is zeros, how much it shares with the template it was
//! cloned from, how much is its own, and how much of its own is new since the previous
//! checkpoint. That says what a checkpoint costs to keep and to send, and what a host that holds
//! the template (and the previous checkpoint) still has to fetch to run the VM.

use std::collections::HashSet;

use serde::Serialize;

use crate::id::ChunkId;
use crate::manifest::{Extent, Manifest};

/// Logical bytes count every extent where it occurs; chunks are counted once each. The bytes of
/// the four kinds add up to `size`: `zero_bytes + template_bytes + own_bytes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlockProfile {
    pub size: u64,
    pub zero_bytes: u64,
    /// Chunks the template holds too.
    pub template_chunks: u64,
    pub template_bytes: u64,
    /// Chunks the template does not hold.
    pub own_chunks: u64,
    pub own_bytes: u64,
    /// Own chunks the previous checkpoint does not hold either (all own ones without one).
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// The block profile of `image`, a VM disk cloned from `template`, against its `previous`
/// checkpoint if it has one.
pub fn profile(template: &Manifest, previous: Option<&Manifest>, image: &Manifest) -> BlockProfile {
    let ids = |m: &Manifest| m.chunks().map(|(_, id, _)| id).collect::<HashSet<ChunkId>>();
    let in_template = ids(template);
    let in_previous = previous.map(ids).unwrap_or_default();
    let mut p = BlockProfile {
        size: image.size,
        ..Default::default()
    };
    let mut seen = HashSet::new();
    for e in &image.extents {
        match *e {
            Extent::Zero { len } => p.zero_bytes += len,
            Extent::Chunk { id, len } => {
                let first = u64::from(seen.insert(id));
                if in_template.contains(&id) {
                    p.template_chunks += first;
                    p.template_bytes += len;
                } else {
                    p.own_chunks += first;
                    p.own_bytes += len;
                    if !in_previous.contains(&id) {
                        p.new_chunks += first;
                        p.new_bytes += len;
                    }
                }
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::ChunkParams;

    fn chunk(n: u8, len: u64) -> Extent {
        Extent::Chunk {
            id: ChunkId([n; 32]),
            len,
        }
    }

    fn manifest(extents: Vec<Extent>) -> Manifest {
        Manifest {
            params: ChunkParams::V1,
            size: extents.iter().map(|e| e.len()).sum(),
            extents,
        }
    }

    /// Template: chunks 1 and 2. Previous checkpoint: 1, 3, 4. The image: 1, 3, 5 twice, zeros,
    /// 2, 6.
    fn images() -> (Manifest, Manifest, Manifest) {
        let template = manifest(vec![chunk(1, 100), chunk(2, 200), Extent::Zero { len: 1000 }]);
        let previous = manifest(vec![chunk(1, 100), chunk(3, 300), chunk(4, 400)]);
        let image = manifest(vec![
            chunk(1, 100),
            chunk(3, 300),
            chunk(5, 50),
            chunk(5, 50),
            Extent::Zero { len: 700 },
            chunk(2, 200),
            chunk(6, 60),
        ]);
        (template, previous, image)
    }

    #[test]
    fn bytes_count_every_occurrence_and_chunks_count_once() {
        let (template, previous, image) = images();
        let p = profile(&template, Some(&previous), &image);
        assert_eq!(
            p,
            BlockProfile {
                size: 1460,
                zero_bytes: 700,
                template_chunks: 2,
                template_bytes: 300,
                own_chunks: 3,
                own_bytes: 300 + 50 + 50 + 60,
                new_chunks: 2,
                new_bytes: 50 + 50 + 60,
            }
        );
        assert_eq!(p.zero_bytes + p.template_bytes + p.own_bytes, p.size);
    }

    #[test]
    fn without_a_previous_checkpoint_every_own_chunk_is_new() {
        let (template, _, image) = images();
        let p = profile(&template, None, &image);
        assert_eq!((p.new_chunks, p.new_bytes), (p.own_chunks, p.own_bytes));
        assert_eq!((p.own_chunks, p.own_bytes), (3, 460));
    }

    #[test]
    fn a_fresh_clone_is_all_template() {
        let (template, _, _) = images();
        let p = profile(&template, None, &template);
        assert_eq!(
            (p.template_chunks, p.template_bytes, p.own_bytes, p.zero_bytes),
            (2, 300, 0, 1000)
        );
    }
}
