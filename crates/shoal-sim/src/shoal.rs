//! Shoal's consolidation policy in the simulator: `shoal_policy::consolidate::Consolidator`, the
//! code the controller's consolidator runs on real hosts, fed from the simulated hosts and the
//! trace (see that module for the design), plus the power model and the initial placement the
//! simulator needs.
//!
//! - **Hosts are really switched off and on.** Booting takes time and energy
//!   (`PowerMode::Explicit`); a VM sent to a booting host starts to migrate once the host is up.
//! - **Initial placement** packs VMs by their nominal size divided by an over-commit ratio (at
//!   t = 0 nothing is known of their demand), onto the most power-efficient hosts first.
//! - Memory is not modelled by the reference model, so it is not limited here either.

use shoal_policy::consolidate::{self, Consolidator};

use crate::engine::{HostPower, Plan, Policy, PowerControl, PowerMode, SimError, View};

#[derive(Debug, Clone)]
pub struct ShoalPolicy {
    pub consolidator: Consolidator,
    /// Nominal size / this ratio is what a new VM is assumed to use.
    pub overcommit: f64,
    pub power: PowerControl,
}

impl Default for ShoalPolicy {
    fn default() -> Self {
        ShoalPolicy {
            consolidator: Consolidator::default(),
            overcommit: 4.0,
            power: PowerControl {
                boot_s: 120.0,
                boot_w: 135.0,
                shutdown_s: 30.0,
            },
        }
    }
}

/// Watts per MIPS at full load: lower is better.
fn efficiency(view: &View, h: usize) -> f64 {
    let ht = &view.workload.host_types[view.hosts[h].ty];
    ht.power(1.0) / ht.mips()
}

impl Policy for ShoalPolicy {
    fn name(&self) -> String {
        "shoal".into()
    }

    fn power_mode(&self) -> PowerMode {
        PowerMode::Explicit(self.power)
    }

    fn initial_placement(&mut self, view: &View) -> Result<Vec<u32>, SimError> {
        let pack = self.consolidator.pack;
        let n = view.hosts.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| efficiency(view, a).total_cmp(&efficiency(view, b)).then(a.cmp(&b)));
        let mut load = vec![0.0; n];
        let mut vms: Vec<usize> = (0..view.vms.len()).collect();
        vms.sort_by(|&a, &b| {
            view.workload.vms[b]
                .mips
                .total_cmp(&view.workload.vms[a].mips)
                .then(a.cmp(&b))
        });
        let mut out = vec![0u32; view.vms.len()];
        let mut opened = 0usize;
        for v in vms {
            let size = view.workload.vms[v].mips / self.overcommit;
            let mips = view.workload.vms[v].mips;
            let fits = |h: usize, load: &[f64]| load[h] + size <= pack * view.capacity(h) && mips <= view.core_mips(h);
            let h = match order[..opened]
                .iter()
                .copied()
                .filter(|&h| fits(h, &load))
                .min_by(|&a, &b| (pack * view.capacity(a) - load[a]).total_cmp(&(pack * view.capacity(b) - load[b])))
            {
                Some(h) => h,
                None => {
                    let i = order[opened..]
                        .iter()
                        .position(|&h| fits(h, &load))
                        .ok_or(SimError::Unplaceable { vm: v })?;
                    order.swap(opened, opened + i);
                    opened += 1;
                    order[opened - 1]
                }
            };
            load[h] += size;
            out[v] = h as u32;
        }
        Ok(out)
    }

    fn decide(&mut self, view: &View) -> Plan {
        let hosts: Vec<consolidate::Host> = view
            .hosts
            .iter()
            .enumerate()
            .map(|(h, s)| consolidate::Host {
                capacity: view.capacity(h),
                core: view.core_mips(h),
                full_load_w: view.workload.host_types[s.ty].power(1.0),
                power: match s.power {
                    HostPower::Off => consolidate::Power::Off,
                    HostPower::Booting => consolidate::Power::Booting,
                    HostPower::On => consolidate::Power::On,
                },
                vms: &s.vms,
                requested: s.requested_mips,
                memory_free: f64::INFINITY,
                cpus_free: f64::INFINITY,
                switchable: true,
            })
            .collect();
        let vms: Vec<consolidate::Vm> = view
            .vms
            .iter()
            .enumerate()
            .map(|(v, s)| {
                let spec = &view.workload.vms[v];
                consolidate::Vm {
                    size: spec.mips,
                    demand: view.demand[v],
                    history: &s.history,
                    migration_s: spec.migration_s(),
                    memory: 0.0,
                    cpus: 0.0,
                    in_migration: s.in_migration,
                    last_migrated: s.last_migrated,
                    gone: s.gone,
                    pinned: false,
                    group: None,
                }
            })
            .collect();
        let plan = self.consolidator.decide(view.step, &hosts, &vms);
        Plan {
            migrations: plan.migrations,
            power_on: plan.power_on,
            power_off: plan.power_off,
        }
    }
}
