//! Gang placement of a virtual cluster: filter hosts, score them, pick one per VM, for all VMs
//! or none.

use shoal_model::{AntiAffinity, Placement};
use thiserror::Error;

/// What placement needs to know about a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    pub up: bool,
    pub cpus: u32,
    pub memory_mib: u64,
    pub used_cpus: u32,
    pub used_memory_mib: u64,
    /// VMs of the cluster being placed that already run on this host (for anti-affinity on growth).
    pub cluster_vms: u32,
}

impl HostView {
    fn free_cpus(&self) -> u32 {
        self.cpus.saturating_sub(self.used_cpus)
    }
    fn free_memory(&self) -> u64 {
        self.memory_mib.saturating_sub(self.used_memory_mib)
    }
}

/// `count` identical VMs to place together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GangRequest {
    pub count: u32,
    pub cpus: u32,
    pub memory_mib: u64,
    pub placement: Placement,
    pub anti_affinity: AntiAffinity,
}

/// Why a gang does not fit, naming the binding constraint.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("no host is up")]
    NoHostUp,
    #[error("needs {missing} vCPU more than free on {hosts} hosts ({free} free, {needed} needed)")]
    Cpu {
        missing: u64,
        free: u64,
        needed: u64,
        hosts: usize,
    },
    #[error(
        "needs {missing} MiB of memory more than free on {hosts} hosts ({free} MiB free, {needed} MiB needed)"
    )]
    Memory {
        missing: u64,
        free: u64,
        needed: u64,
        hosts: usize,
    },
    #[error("one VM needs {cpus} vCPU and {memory_mib} MiB, more than any single up host has in total")]
    VmTooLarge { cpus: u32, memory_mib: u64 },
    #[error(
        "anti-affinity by host: needs {needed} hosts with room for one VM ({cpus} vCPU, {memory_mib} MiB) and no VM of the cluster, only {available} have"
    )]
    AntiAffinity {
        needed: u32,
        available: u32,
        cpus: u32,
        memory_mib: u64,
    },
    #[error(
        "free capacity is fragmented: {placed} of {count} VMs fit ({cpus} vCPU, {memory_mib} MiB each); no up host has room for another"
    )]
    Fragmented {
        placed: u32,
        count: u32,
        cpus: u32,
        memory_mib: u64,
    },
}

/// Places `req.count` VMs onto `hosts`, returning the index (into `hosts`) of each VM's host, or
/// the reason the whole gang does not fit. Deterministic: ties go to the earlier host.
pub fn place_gang(hosts: &[HostView], req: &GangRequest) -> Result<Vec<usize>, PlacementError> {
    let up: Vec<usize> = (0..hosts.len()).filter(|&i| hosts[i].up).collect();
    if req.count == 0 {
        return Ok(Vec::new());
    }
    if up.is_empty() {
        return Err(PlacementError::NoHostUp);
    }
    if !up
        .iter()
        .any(|&i| hosts[i].cpus >= req.cpus && hosts[i].memory_mib >= req.memory_mib)
    {
        return Err(PlacementError::VmTooLarge {
            cpus: req.cpus,
            memory_mib: req.memory_mib,
        });
    }
    // Aggregate shortfalls are the clearest reason, so check them before trying host by host.
    let free_cpus: u64 = up.iter().map(|&i| hosts[i].free_cpus() as u64).sum();
    let free_mem: u64 = up.iter().map(|&i| hosts[i].free_memory()).sum();
    let need_cpus = req.cpus as u64 * req.count as u64;
    let need_mem = req.memory_mib * req.count as u64;
    if need_cpus > free_cpus {
        return Err(PlacementError::Cpu {
            missing: need_cpus - free_cpus,
            free: free_cpus,
            needed: need_cpus,
            hosts: up.len(),
        });
    }
    if need_mem > free_mem {
        return Err(PlacementError::Memory {
            missing: need_mem - free_mem,
            free: free_mem,
            needed: need_mem,
            hosts: up.len(),
        });
    }

    let mut free: Vec<(u32, u64)> = hosts
        .iter()
        .map(|h| (h.free_cpus(), h.free_memory()))
        .collect();
    let mut taken: Vec<bool> = hosts.iter().map(|h| h.cluster_vms > 0).collect();
    let mut out = Vec::with_capacity(req.count as usize);
    for placed in 0..req.count {
        let fits = |i: usize, free: &[(u32, u64)], taken: &[bool]| {
            free[i].0 >= req.cpus
                && free[i].1 >= req.memory_mib
                && !(req.anti_affinity == AntiAffinity::Host && taken[i])
        };
        let best = up
            .iter()
            .copied()
            .filter(|&i| fits(i, &free, &taken))
            .max_by(|&a, &b| {
                let (sa, sb) = (
                    score(req.placement, hosts, &free, a),
                    score(req.placement, hosts, &free, b),
                );
                // `max_by` keeps the last maximum; reverse the index order so ties go to the first.
                sa.total_cmp(&sb).then(b.cmp(&a))
            });
        let Some(i) = best else {
            if req.anti_affinity == AntiAffinity::Host {
                let available = up
                    .iter()
                    .filter(|&&i| {
                        hosts[i].cluster_vms == 0
                            && hosts[i].free_cpus() >= req.cpus
                            && hosts[i].free_memory() >= req.memory_mib
                    })
                    .count() as u32;
                return Err(PlacementError::AntiAffinity {
                    needed: req.count,
                    available,
                    cpus: req.cpus,
                    memory_mib: req.memory_mib,
                });
            }
            return Err(PlacementError::Fragmented {
                placed,
                count: req.count,
                cpus: req.cpus,
                memory_mib: req.memory_mib,
            });
        };
        free[i].0 -= req.cpus;
        free[i].1 -= req.memory_mib;
        taken[i] = true;
        out.push(i);
    }
    Ok(out)
}

/// Higher is better. Spread prefers the host with the largest free share of its scarcer
/// resource; pack prefers the smallest (best fit), so that whole hosts stay empty.
fn score(p: Placement, hosts: &[HostView], free: &[(u32, u64)], i: usize) -> f64 {
    let h = &hosts[i];
    let cpu = free[i].0 as f64 / h.cpus.max(1) as f64;
    let mem = free[i].1 as f64 / h.memory_mib.max(1) as f64;
    let share = cpu.min(mem);
    match p {
        Placement::Spread => share,
        Placement::Pack => -share,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(name: &str, cpus: u32, mem: u64) -> HostView {
        HostView {
            name: name.into(),
            up: true,
            cpus,
            memory_mib: mem,
            used_cpus: 0,
            used_memory_mib: 0,
            cluster_vms: 0,
        }
    }

    fn req(count: u32, cpus: u32, mem: u64, p: Placement, aa: AntiAffinity) -> GangRequest {
        GangRequest {
            count,
            cpus,
            memory_mib: mem,
            placement: p,
            anti_affinity: aa,
        }
    }

    #[test]
    fn spread_uses_every_host_and_pack_fills_one() {
        let hosts: Vec<_> = (0..4).map(|i| host(&format!("h{i}"), 8, 8192)).collect();
        let spread = place_gang(&hosts, &req(4, 1, 512, Placement::Spread, AntiAffinity::None)).unwrap();
        let mut s = spread.clone();
        s.sort();
        assert_eq!(s, vec![0, 1, 2, 3]);
        let pack = place_gang(&hosts, &req(4, 1, 512, Placement::Pack, AntiAffinity::None)).unwrap();
        assert_eq!(pack, vec![0, 0, 0, 0]);
    }

    #[test]
    fn shortfall_names_the_missing_vcpus() {
        let hosts: Vec<_> = (0..4).map(|i| host(&format!("h{i}"), 4, 65536)).collect();
        let e = place_gang(&hosts, &req(14, 2, 512, Placement::Spread, AntiAffinity::None)).unwrap_err();
        assert_eq!(e.to_string(), "needs 12 vCPU more than free on 4 hosts (16 free, 28 needed)");
    }

    #[test]
    fn anti_affinity_needs_distinct_hosts() {
        let hosts: Vec<_> = (0..3).map(|i| host(&format!("h{i}"), 16, 65536)).collect();
        let e = place_gang(&hosts, &req(4, 1, 512, Placement::Pack, AntiAffinity::Host)).unwrap_err();
        assert!(matches!(e, PlacementError::AntiAffinity { needed: 4, available: 3, .. }), "{e}");
        let ok = place_gang(&hosts, &req(3, 1, 512, Placement::Pack, AntiAffinity::Host)).unwrap();
        assert_eq!(ok, vec![0, 1, 2]);
    }

    #[test]
    fn down_hosts_and_oversized_vms() {
        let mut hosts = vec![host("a", 4, 4096)];
        assert_eq!(
            place_gang(&hosts, &req(1, 8, 512, Placement::Spread, AntiAffinity::None)),
            Err(PlacementError::VmTooLarge { cpus: 8, memory_mib: 512 })
        );
        hosts[0].up = false;
        assert_eq!(
            place_gang(&hosts, &req(1, 1, 512, Placement::Spread, AntiAffinity::None)),
            Err(PlacementError::NoHostUp)
        );
    }

    #[test]
    fn fragmentation_is_reported() {
        // 3 free vCPU in total but no host has 2.
        let mut hosts: Vec<_> = (0..3).map(|i| host(&format!("h{i}"), 2, 4096)).collect();
        for h in &mut hosts {
            h.used_cpus = 1;
        }
        let e = place_gang(&hosts, &req(1, 2, 512, Placement::Spread, AntiAffinity::None)).unwrap_err();
        assert!(matches!(e, PlacementError::Fragmented { placed: 0, .. }), "{e}");
    }

    fn arb_hosts() -> impl Strategy<Value = Vec<HostView>> {
        prop::collection::vec(
            (1u32..32, 1u64..64, 0u32..32, 0u64..64, any::<bool>(), 0u32..2),
            1..12,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (c, m, uc, um, up, cv))| HostView {
                    name: format!("h{i}"),
                    up: up || i == 0,
                    cpus: c,
                    memory_mib: m * 512,
                    used_cpus: uc.min(c),
                    used_memory_mib: (um * 512).min(m * 512),
                    cluster_vms: cv,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn never_overcommits_nor_breaks_anti_affinity(
            hosts in arb_hosts(),
            count in 1u32..20, cpus in 1u32..8, mem in 1u64..8,
            pack in any::<bool>(), aa in any::<bool>(),
        ) {
            let r = req(count, cpus, mem * 256,
                if pack { Placement::Pack } else { Placement::Spread },
                if aa { AntiAffinity::Host } else { AntiAffinity::None });
            let first = place_gang(&hosts, &r);
            prop_assert_eq!(&first, &place_gang(&hosts, &r), "deterministic");
            if let Ok(plan) = first {
                prop_assert_eq!(plan.len(), count as usize);
                let mut used: Vec<(u64, u64, u32)> = hosts.iter()
                    .map(|h| (h.used_cpus as u64, h.used_memory_mib, h.cluster_vms)).collect();
                for &i in &plan {
                    prop_assert!(hosts[i].up);
                    used[i].0 += cpus as u64;
                    used[i].1 += mem * 256;
                    used[i].2 += 1;
                }
                for (i, h) in hosts.iter().enumerate() {
                    if plan.contains(&i) {
                        prop_assert!(used[i].0 <= h.cpus as u64);
                        prop_assert!(used[i].1 <= h.memory_mib);
                        if aa { prop_assert!(used[i].2 == 1 && h.cluster_vms == 0); }
                    }
                }
            }
        }
    }
}
