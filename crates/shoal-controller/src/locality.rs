//! Image locality: for a template, the share of its bytes each host's chunk cache already holds,
//! from the images the hosts report in their heartbeats. Placement prefers hosts where a new VM's
//! template is (mostly) there already: fewer chunks to send, a faster first boot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use shoal_image::{ChunkId, ManifestId};

use crate::Controller;

/// Chunk sets of manifests, kept between placements (manifests never change).
#[derive(Default)]
pub struct ChunkSets {
    sets: Mutex<HashMap<ManifestId, Arc<HashSet<ChunkId>>>>,
}

/// At most this many manifests' chunk sets are kept.
const KEEP: usize = 64;

impl ChunkSets {
    fn get(&self, store: &shoal_image::ImageStore, id: &ManifestId) -> Option<Arc<HashSet<ChunkId>>> {
        if let Some(s) = self.sets.lock().expect("chunk sets").get(id) {
            return Some(s.clone());
        }
        let m = store.manifest(id).ok()?;
        let set: Arc<HashSet<ChunkId>> = Arc::new(m.chunks().map(|c| c.1).collect());
        let mut sets = self.sets.lock().expect("chunk sets");
        if sets.len() >= KEEP {
            sets.clear();
        }
        sets.insert(*id, set.clone());
        Some(set)
    }
}

/// Per host (by name): the share, 0..=1, of template image `template`'s data bytes held in the
/// images that host reported. Hosts that reported nothing are absent (share 0).
pub async fn image_locality(ctl: &Controller, template: ManifestId) -> BTreeMap<String, f64> {
    let reports: Vec<(String, Vec<ManifestId>)> = ctl
        .liveness()
        .into_iter()
        .map(|(h, l)| {
            (
                h,
                l.images
                    .iter()
                    .filter_map(|i| i.parse().ok())
                    .collect::<Vec<ManifestId>>(),
            )
        })
        .filter(|(_, ims)| !ims.is_empty())
        .collect();
    if reports.is_empty() {
        return BTreeMap::new();
    }
    let c = ctl.clone();
    tokio::task::spawn_blocking(move || {
        let store = &c.images;
        let Ok(m) = store.manifest(&template) else {
            return BTreeMap::new();
        };
        let total = m.data_bytes().max(1) as f64;
        let mut out = BTreeMap::new();
        for (host, ims) in reports {
            let share = if ims.contains(&template) {
                1.0
            } else {
                let sets: Vec<_> = ims.iter().filter_map(|i| c.chunk_sets.get(store, i)).collect();
                let have: u64 = m
                    .chunks()
                    .filter(|(_, id, _)| sets.iter().any(|s| s.contains(id)))
                    .map(|c| c.2)
                    .sum();
                have as f64 / total
            };
            out.insert(host, share);
        }
        out
    })
    .await
    .unwrap_or_default()
}
