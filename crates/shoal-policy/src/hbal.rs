//! Ganeti hbal's cluster score ("CV"), reproduced exactly for Shoal's model, so that Shoal's
//! rebalancer and `hbal` can be judged by one yardstick.
//!
//! From Ganeti 3.0's `Cluster/Metrics.hs`: the score is a weighted sum, over online hosts, of
//! population standard deviations (and a few counts). With every VM running, no DRBD
//! secondaries, no tags and no forthcoming instances, the terms that can be non-zero are:
//!
//! | hbal term | weight | per-host value |
//! |---|---|---|
//! | `free_mem_cv` + `_forth` | 0.5 + 0.5 | (memory − reserved − VMs' memory) / memory |
//! | `free_disk_cv` + `_forth` | 0.5 + 0.5 | (disk − local VM disks) / disk (1 without disk) |
//! | `vcpu_ratio_cv` + `_forth` | 0.5 + 0.5 | (reserved vCPU + VMs' vCPU) / cores |
//! | `cpu/mem/disk/net_load_cv` | 1 each | VMs on the host (each VM's load is 1 without a utilisation file; 0 with `--ignore-dynu`) |
//! | `spindles_cv` + `_forth` | 0.5 + 0.5 | local-disk VMs / (32 × 1 spindle) |
//! | `offline_all_cnt`, `offline_pri_cnt` | 4, 16 | VMs left on hosts that are down or powered off |
//!
//! Down and powered-off hosts are hbal's offline nodes; every other host is online.

use serde::{Deserialize, Serialize};

use crate::snapshot::{HostState, Snapshot};

/// hbal's spindle ratio default (instance spindles per host spindle).
const SPINDLE_RATIO: f64 = 32.0;

/// Number of per-host statistics the score takes the standard deviation of.
pub(crate) const STATS: usize = 5;
/// Indices into the per-host statistics.
pub(crate) const MEM: usize = 0;
pub(crate) const DISK: usize = 1;
pub(crate) const CPU: usize = 2;
pub(crate) const LOAD: usize = 3;
pub(crate) const SPINDLES: usize = 4;

/// The score's terms, each the statistic before weighting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HbalScore {
    pub free_mem_cv: f64,
    pub free_disk_cv: f64,
    pub vcpu_ratio_cv: f64,
    /// Standard deviation of the per-host load (VM count); counted four times (cpu, mem,
    /// disk, net load), or not at all with `ignore_dynu`.
    pub load_cv: f64,
    pub spindles_cv: f64,
    pub offline_all_cnt: f64,
    pub offline_pri_cnt: f64,
    pub total: f64,
}

/// The weights of the per-host statistics `[mem, disk, cpu, load, spindles]`.
pub(crate) fn weights(ignore_dynu: bool) -> [f64; STATS] {
    [1.0, 1.0, 1.0, if ignore_dynu { 0.0 } else { 4.0 }, 1.0]
}

/// Whether hbal counts the host as online.
pub(crate) fn online(state: HostState) -> bool {
    !matches!(state, HostState::Down | HostState::PoweredOff)
}

/// Per-host figures the statistics are computed from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostTotals {
    pub memory: f64,
    pub disk: f64,
    pub cores: f64,
}

impl HostTotals {
    pub fn of(h: &crate::snapshot::Host) -> HostTotals {
        HostTotals {
            memory: h.memory_mib as f64,
            disk: h.disk_mib as f64,
            cores: h.cpus as f64,
        }
    }
}

/// What one VM adds to each statistic of a host with totals `t`.
pub(crate) fn vm_delta(
    t: &HostTotals,
    memory_mib: u64,
    disk_mib: u64,
    cpus: u32,
    local_disk: bool,
    ignore_dynu: bool,
) -> [f64; STATS] {
    [
        -(memory_mib as f64) / t.memory,
        if local_disk && t.disk > 0.0 {
            -(disk_mib as f64) / t.disk
        } else {
            0.0
        },
        cpus as f64 / t.cores,
        if ignore_dynu { 0.0 } else { 1.0 },
        if local_disk { 1.0 / SPINDLE_RATIO } else { 0.0 },
    ]
}

/// A host's statistics with no VM on it.
pub(crate) fn empty_stats(h: &crate::snapshot::Host) -> [f64; STATS] {
    let t = HostTotals::of(h);
    [
        (t.memory - h.reserved_memory_mib as f64) / t.memory,
        1.0,
        h.reserved_cpus as f64 / t.cores,
        0.0,
        0.0,
    ]
}

/// Per online host, the statistics of the snapshot as it is; `None` for offline hosts.
pub(crate) fn host_stats(snap: &Snapshot, ignore_dynu: bool) -> Vec<Option<[f64; STATS]>> {
    let mut stats: Vec<Option<[f64; STATS]>> = snap
        .hosts
        .iter()
        .map(|h| online(h.state).then(|| empty_stats(h)))
        .collect();
    let idx = snap.host_index();
    for v in &snap.vms {
        let Some(&h) = idx.get(v.host.as_str()) else { continue };
        if let Some(s) = &mut stats[h] {
            let d = vm_delta(
                &HostTotals::of(&snap.hosts[h]),
                v.memory_mib,
                v.disk_mib,
                v.cpus,
                !snap.shared_storage,
                ignore_dynu,
            );
            for (x, dx) in s.iter_mut().zip(d) {
                *x += dx;
            }
        }
    }
    stats
}

/// Population standard deviation, two-pass like hbal's (0 for no values).
fn pstdev(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let (n, sum) = xs.clone().fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    if n == 0 {
        return 0.0;
    }
    let m = sum / n as f64;
    (xs.map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64).sqrt()
}

/// hbal's cluster score of a snapshot, term by term. `ignore_dynu` is hbal's `--ignore-dynu`.
pub fn score(snap: &Snapshot, ignore_dynu: bool) -> HbalScore {
    let stats = host_stats(snap, ignore_dynu);
    let online_stats: Vec<[f64; STATS]> = stats.iter().flatten().copied().collect();
    let sd = |k: usize| pstdev(online_stats.iter().map(move |s| s[k]));
    let idx = snap.host_index();
    let offline = snap
        .vms
        .iter()
        .filter(|v| idx.get(v.host.as_str()).is_some_and(|&h| stats[h].is_none()))
        .count() as f64;
    let mut s = HbalScore {
        free_mem_cv: sd(MEM),
        free_disk_cv: sd(DISK),
        vcpu_ratio_cv: sd(CPU),
        load_cv: sd(LOAD),
        spindles_cv: sd(SPINDLES),
        offline_all_cnt: offline,
        offline_pri_cnt: offline,
        total: 0.0,
    };
    let w = weights(ignore_dynu);
    s.total = w[MEM] * s.free_mem_cv
        + w[DISK] * s.free_disk_cv
        + w[CPU] * s.vcpu_ratio_cv
        + w[LOAD] * s.load_cv
        + w[SPINDLES] * s.spindles_cv
        + 4.0 * s.offline_all_cnt
        + 16.0 * s.offline_pri_cnt;
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Host, Vm};

    fn vm(name: &str, host: &str, cpus: u32, gib: u64) -> Vm {
        Vm {
            name: name.into(),
            cluster: String::new(),
            host: host.into(),
            cpus,
            memory_mib: gib * 1024,
            disk_mib: gib * 10240,
            template: None,
            dirty_mib_s: None,
            overlay_mib: 0,
            anti_affinity: None,
        }
    }

    /// Three hosts of gen.py's kinds; figures computed with score.py on the same JSON.
    fn snap() -> Snapshot {
        let mut hosts = vec![
            Host::new("node0001", 16, 65536, 960 * 1024),
            Host::new("node0002", 32, 131072, 1920 * 1024),
            Host::new("node0003", 48, 262144, 3840 * 1024),
        ];
        for h in &mut hosts {
            h.reserved_cpus = 1;
            h.reserved_memory_mib = if h.memory_mib <= 131072 { 2048 } else { 4096 };
        }
        Snapshot {
            hosts,
            vms: vec![
                vm("a", "node0001", 4, 8),
                vm("b", "node0001", 2, 4),
                vm("c", "node0001", 8, 16),
                vm("d", "node0002", 1, 1),
                vm("e", "node0003", 4, 32),
            ],
            shared_storage: true,
            image_locality: Default::default(),
        }
    }

    #[test]
    fn matches_score_py() {
        // python3 score.py three.json                  -> 4.36272737
        // python3 score.py three.json --ignore-dynu    -> 0.59149120
        // python3 score.py three.json --template plain -> 4.51309630 (local disks)
        let mut s = snap();
        assert!(
            (score(&s, false).total - 4.36272737).abs() < 5e-9,
            "{:?}",
            score(&s, false)
        );
        assert!(
            (score(&s, true).total - 0.59149120).abs() < 5e-9,
            "{:?}",
            score(&s, true)
        );
        s.shared_storage = false;
        assert!(
            (score(&s, false).total - 4.51309630).abs() < 5e-9,
            "{:?}",
            score(&s, false)
        );
    }

    #[test]
    fn offline_hosts_count_their_vms() {
        let mut s = snap();
        let online = score(&s, true).total;
        s.hosts[1].state = HostState::Down;
        let sc = score(&s, true);
        assert_eq!(sc.offline_pri_cnt, 1.0);
        assert!(sc.total > online + 19.9, "{sc:?}");
    }
}
