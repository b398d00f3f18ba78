//! Shoal's consolidation policy: the one the controller's consolidator runs on real hosts.
//!
//! Designed from the PlanetLab data, where a VM's CPU demand averages ~12 % of its size, is noisy
//! from one 5-minute sample to the next, and moves with a daily swing of about ±15 % in total:
//!
//! - **Sizes from recent peaks, not the last sample.** A VM is sized at the peak of its last few
//!   samples (`short_window`) for relieving hosts, and at the peak of the last hour (`long_window`)
//!   when packing it away to empty a host, so that a VM moved to save energy does not have to move
//!   back at the next burst.
//! - **Migrations are costed.** A migration takes RAM / bandwidth and costs both ends (the source
//!   gives 10 % of the VM's demand to it, the target reserves 10 %); the VM chosen off a busy host
//!   is the cheapest one (RAM × demand) that relieves it, and every VM has a cool-down after it
//!   moved, except to relieve an overloaded host.
//! - **Hysteresis.** A host is emptied only after it has been lightly loaded for several steps
//!   in a row, never just after it received VMs, and only when all its VMs fit elsewhere below a
//!   packing limit that leaves head-room under the overload limit.
//! - **Hosts are really switched off and on.** Booting takes time and energy
//!   (`PowerMode::Explicit`); a VM sent to a booting host starts to migrate once the host is up.
//!   An on host draws idle power even when empty, so empty hosts are switched off at once.
//! - **Hosts whose cores are too small** for a VM's size (a 2500-MIPS VM on a 1860-MIPS core) are
//!   used for it only when nothing else fits, as the VM would be capped there.
//! - **Initial placement** packs VMs by their nominal size divided by an over-commit ratio (at
//!   t = 0 nothing is known of their demand), onto the most power-efficient hosts first.

use crate::engine::{HostPower, Plan, Policy, PowerControl, PowerMode, SimError, View};

#[derive(Debug, Clone)]
pub struct ShoalPolicy {
    /// A host whose predicted demand exceeds this share of its capacity is relieved.
    pub overload: f64,
    /// Relieving stops, and packing stops, at this share.
    pub pack: f64,
    /// A host below this share for `underload_steps` steps in a row is emptied.
    pub underload: f64,
    pub underload_steps: u32,
    /// Samples in the short and long demand peaks.
    pub short_window: usize,
    pub long_window: usize,
    /// Steps during which a migrated VM is not moved again to save energy.
    pub cooldown: usize,
    /// Hosts emptied per step at most.
    pub max_drains: usize,
    /// Nominal size / this ratio is what a new VM is assumed to use.
    pub overcommit: f64,
    pub power: PowerControl,
    low_streak: Vec<u32>,
    last_received: Vec<Option<usize>>,
}

impl Default for ShoalPolicy {
    fn default() -> Self {
        ShoalPolicy {
            overload: 0.95,
            pack: 0.85,
            underload: 0.5,
            underload_steps: 3,
            short_window: 3,
            long_window: 12,
            cooldown: 12,
            max_drains: 2,
            overcommit: 4.0,
            power: PowerControl { boot_s: 120.0, boot_w: 135.0, shutdown_s: 30.0 },
            low_streak: Vec::new(),
            last_received: Vec::new(),
        }
    }
}

fn peak(history: &[f64], n: usize) -> f64 {
    history.iter().take(n.max(1)).fold(0.0, |a: f64, &b| a.max(b))
}

/// Watts per MIPS at full load: lower is better.
fn efficiency(view: &View, h: usize) -> f64 {
    let ht = &view.workload.host_types[view.hosts[h].ty];
    ht.power(1.0) / ht.mips()
}

struct Pack<'a> {
    view: &'a View<'a>,
    load: Vec<f64>,
    /// Hosts usable as targets now (on), or booting because of this plan.
    usable: Vec<bool>,
    /// Hosts that must not receive VMs (being relieved or emptied).
    closed: Vec<bool>,
    /// Off hosts in the order they are switched on: most efficient first.
    spare: Vec<usize>,
}

impl Pack<'_> {
    fn fits_core(&self, h: usize, v: usize, size: f64) -> bool {
        let core = self.view.core_mips(h);
        self.view.workload.vms[v].mips <= core || size <= 0.8 * core
    }

    /// Best fit: the usable host with the least room left after taking `size`, under `limit`.
    fn best_fit(&self, v: usize, size: f64, limit: f64, exclude: usize) -> Option<usize> {
        let mut best: Option<(bool, f64, usize)> = None;
        for h in 0..self.load.len() {
            if h == exclude || !self.usable[h] || self.closed[h] {
                continue;
            }
            let cap = self.view.capacity(h);
            let room = limit * cap - self.load[h] - size;
            if room < 0.0 {
                continue;
            }
            let key = (!self.fits_core(h, v, size), room, h);
            if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                best = Some(key);
            }
        }
        best.map(|b| b.2)
    }
}

impl ShoalPolicy {
    fn sizes(&self, view: &View, window: usize) -> Vec<f64> {
        view.vms
            .iter()
            .enumerate()
            .map(|(v, s)| {
                if s.gone {
                    0.0
                } else if s.history.is_empty() {
                    view.demand[v]
                } else {
                    peak(&s.history, window).max(0.0) * view.workload.vms[v].mips
                }
            })
            .collect()
    }
}

impl Policy for ShoalPolicy {
    fn name(&self) -> String {
        "shoal".into()
    }

    fn power_mode(&self) -> PowerMode {
        PowerMode::Explicit(self.power)
    }

    fn initial_placement(&mut self, view: &View) -> Result<Vec<u32>, SimError> {
        let n = view.hosts.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| efficiency(view, a).total_cmp(&efficiency(view, b)).then(a.cmp(&b)));
        let mut load = vec![0.0; n];
        let mut vms: Vec<usize> = (0..view.vms.len()).collect();
        vms.sort_by(|&a, &b| view.workload.vms[b].mips.total_cmp(&view.workload.vms[a].mips).then(a.cmp(&b)));
        let mut out = vec![0u32; view.vms.len()];
        let mut opened = 0usize;
        for v in vms {
            let size = view.workload.vms[v].mips / self.overcommit;
            let mips = view.workload.vms[v].mips;
            let fits = |h: usize, load: &[f64]| load[h] + size <= self.pack * view.capacity(h) && mips <= view.core_mips(h);
            let h = match order[..opened].iter().copied().filter(|&h| fits(h, &load)).min_by(|&a, &b| {
                (self.pack * view.capacity(a) - load[a]).total_cmp(&(self.pack * view.capacity(b) - load[b]))
            }) {
                Some(h) => h,
                None => {
                    let i = order[opened..].iter().position(|&h| fits(h, &load)).ok_or(SimError::Unplaceable { vm: v })?;
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
        let n = view.hosts.len();
        let step = view.step;
        self.low_streak.resize(n, 0);
        self.last_received.resize(n, None);
        let short = self.sizes(view, self.short_window);
        let long = self.sizes(view, self.long_window);
        let mut spare: Vec<usize> = (0..n).filter(|&h| view.hosts[h].power == HostPower::Off).collect();
        spare.sort_by(|&a, &b| efficiency(view, a).total_cmp(&efficiency(view, b)).then(a.cmp(&b)));
        spare.reverse(); // popped from the end
        let mut p = Pack {
            view,
            load: vec![0.0; n],
            usable: (0..n).map(|h| view.hosts[h].power == HostPower::On).collect(),
            closed: vec![false; n],
            spare,
        };
        for h in 0..n {
            p.load[h] = view.hosts[h].vms.iter().map(|&v| short[v as usize]).sum();
        }
        let mut plan = Plan::default();
        let mut moved = vec![false; view.vms.len()];
        let in_cooldown = |v: usize| view.vms[v].last_migrated.is_some_and(|s| step < s + self.cooldown);

        // 1. Relieve hosts whose predicted demand is over the limit, or that are short now.
        let mut hot: Vec<usize> = (0..n)
            .filter(|&h| {
                let cap = view.capacity(h);
                p.load[h] > self.overload * cap || view.hosts[h].requested_mips > cap
            })
            .collect();
        hot.sort_by(|&a, &b| (p.load[b] / view.capacity(b)).total_cmp(&(p.load[a] / view.capacity(a))));
        for &h in &hot {
            p.closed[h] = true;
        }
        for &h in &hot {
            let cap = view.capacity(h);
            let mut candidates: Vec<usize> =
                view.hosts[h].vms.iter().map(|&v| v as usize).filter(|&v| !view.vms[v].in_migration).collect();
            while p.load[h] > self.pack * cap && !candidates.is_empty() {
                let excess = p.load[h] - self.pack * cap;
                let cost = |v: usize| view.workload.vms[v].migration_s() * (view.demand[v] + 1.0);
                // The cheapest VM that relieves the host alone; else the one relieving most per cost.
                let pick = candidates
                    .iter()
                    .copied()
                    .filter(|&v| short[v] >= excess)
                    .min_by(|&a, &b| (in_cooldown(a), cost(a)).partial_cmp(&(in_cooldown(b), cost(b))).unwrap_or(std::cmp::Ordering::Equal))
                    .or_else(|| {
                        candidates.iter().copied().max_by(|&a, &b| (short[a] / cost(a)).total_cmp(&(short[b] / cost(b))))
                    });
                let Some(v) = pick else { break };
                candidates.retain(|&x| x != v);
                if short[v] <= 0.0 {
                    continue;
                }
                let target = p.best_fit(v, short[v], self.pack, h).or_else(|| {
                    let new = p.spare.pop()?;
                    plan.power_on.push(new as u32);
                    p.usable[new] = true;
                    Some(new)
                });
                let Some(t) = target else { break };
                p.load[h] -= short[v];
                p.load[t] += short[v];
                moved[v] = true;
                self.last_received[t] = Some(step);
                plan.migrations.push((v as u32, t as u32));
            }
        }

        // 2. Empty hosts that have been lightly loaded for a while, if all their VMs fit elsewhere
        //    at their hour-long peaks.
        let mut cold: Vec<usize> = Vec::new();
        for h in 0..n {
            let on = view.hosts[h].power == HostPower::On && !view.hosts[h].vms.is_empty();
            let low = on && !p.closed[h] && p.load[h] < self.underload * view.capacity(h);
            self.low_streak[h] = if low { self.low_streak[h] + 1 } else { 0 };
            let settled = self.last_received[h].is_none_or(|s| step >= s + self.underload_steps as usize);
            if low && self.low_streak[h] >= self.underload_steps && settled {
                cold.push(h);
            }
        }
        cold.sort_by(|&a, &b| (p.load[a] / view.capacity(a)).total_cmp(&(p.load[b] / view.capacity(b))).then(a.cmp(&b)));
        let mut drained = 0;
        for h in cold {
            if drained >= self.max_drains {
                break;
            }
            let vms: Vec<usize> = view.hosts[h].vms.iter().map(|&v| v as usize).filter(|&v| !moved[v]).collect();
            if vms.len() != view.hosts[h].vms.len() || vms.iter().any(|&v| view.vms[v].in_migration || in_cooldown(v)) {
                continue;
            }
            p.closed[h] = true;
            let mut sorted = vms.clone();
            sorted.sort_by(|&a, &b| long[b].total_cmp(&long[a]));
            let mut placed: Vec<(usize, usize)> = Vec::new();
            for &v in &sorted {
                let size = long[v].max(short[v]);
                match p.best_fit(v, size, self.pack, h) {
                    Some(t) if view.hosts[t].power == HostPower::On => {
                        p.load[t] += size;
                        placed.push((v, t));
                    }
                    _ => {
                        placed.push((v, usize::MAX));
                        break;
                    }
                }
            }
            if placed.iter().any(|&(_, t)| t == usize::MAX) {
                for &(v, t) in &placed {
                    if t != usize::MAX {
                        p.load[t] -= long[v].max(short[v]);
                    }
                }
                p.closed[h] = false;
                continue;
            }
            for (v, t) in placed {
                moved[v] = true;
                self.last_received[t] = Some(step);
                plan.migrations.push((v as u32, t as u32));
            }
            p.load[h] = 0.0;
            plan.power_off.push(h as u32);
            drained += 1;
        }

        // 3. Switch off on hosts left empty.
        for h in 0..n {
            if view.hosts[h].power == HostPower::On && view.hosts[h].vms.is_empty() && !plan.migrations.iter().any(|&(_, t)| t as usize == h) {
                plan.power_off.push(h as u32);
            }
        }
        plan
    }
}
