//! Green consolidation: which VMs to live-migrate and which hosts to switch off or on, from the
//! hosts' measured CPU demand. The controller's consolidator and the simulator's `shoal` policy
//! both call [`Consolidator::decide`]; only the way they fill in [`Host`] and [`Vm`] differs
//! (MIPS and a trace in the simulator, vCPUs and the agents' CPU accounting in the controller).
//!
//! Designed from the PlanetLab data, where a VM's CPU demand averages ~12 % of its size, is noisy
//! from one 5-minute sample to the next, and moves with a daily swing of about ±15 % in total:
//!
//! - **Sizes from recent peaks, not the last sample.** A VM is sized at the peak of its last few
//!   samples (`short_window`) for relieving hosts, and at the peak of the last hour (`long_window`)
//!   when packing it away to empty a host, so that a VM moved to save energy does not have to move
//!   back at the next burst.
//! - **Migrations are costed.** A migration takes RAM / bandwidth and costs both ends; the VM
//!   chosen off a busy host is the cheapest one (migration time × demand) that relieves it, and
//!   every VM has a cool-down after it moved, except to relieve an overloaded host.
//! - **Hysteresis.** A host is emptied only after it has been lightly loaded for several steps
//!   in a row, never just after it received VMs, and only when all its VMs fit elsewhere below a
//!   packing limit that leaves head-room under the overload limit.
//! - **Hosts are really switched off and on.** An on host draws idle power even when empty, so
//!   empty hosts are switched off at once; an off host is switched on (most power-efficient
//!   first) only when a busy host cannot be relieved otherwise.
//! - **Hosts whose cores are too small** for a VM (a 2500-MIPS VM on a 1860-MIPS core) are used
//!   for it only when nothing else fits, as the VM would be capped there.
//! - **Hard limits** the caller knows of (memory, anti-affinity, VMs that must not move) are never
//!   broken: a target must have the VM's memory free and hold no VM of its anti-affinity group.

/// A host's power state as the consolidator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Off,
    /// Switched on, not taking VMs yet.
    Booting,
    On,
}

#[derive(Debug, Clone)]
pub struct Host<'a> {
    /// CPU capacity, in the unit of [`Vm::size`].
    pub capacity: f64,
    /// One core's capacity: a VM bigger than a core is capped on this host.
    pub core: f64,
    /// Power at full load, W: `full_load_w / capacity` ranks hosts by efficiency.
    pub full_load_w: f64,
    pub power: Power,
    /// The VMs on the host (indices into the VM slice), including those migrating in.
    pub vms: &'a [u32],
    /// The VMs' summed demand now, uncapped.
    pub requested: f64,
    /// Memory free for incoming VMs, in the unit of [`Vm::memory`] (`f64::INFINITY` when not
    /// modelled).
    pub memory_free: f64,
    /// vCPUs placement may still hand out on the host (`f64::INFINITY` when not modelled).
    pub cpus_free: f64,
    /// Whether the host can be switched off (and on): only then is it emptied to save energy.
    pub switchable: bool,
}

#[derive(Debug, Clone)]
pub struct Vm<'a> {
    /// CPU size (what demand fractions are fractions of).
    pub size: f64,
    /// Demand now, absolute.
    pub demand: f64,
    /// Demand fractions at past decision steps, most recent first.
    pub history: &'a [f64],
    /// Predicted duration of a live migration, s (memory / bandwidth).
    pub migration_s: f64,
    pub memory: f64,
    /// vCPUs the VM holds of its host's allocation.
    pub cpus: f64,
    pub in_migration: bool,
    /// Decision step of the VM's last migration.
    pub last_migrated: Option<usize>,
    /// The VM has finished and sits on no host.
    pub gone: bool,
    /// Never moved (placement rules the consolidator does not evaluate).
    pub pinned: bool,
    /// Hard anti-affinity: no two VMs of one group on a host.
    pub group: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// (VM, target host), to start in this order.
    pub migrations: Vec<(u32, u32)>,
    pub power_on: Vec<u32>,
    /// Hosts to switch off once empty.
    pub power_off: Vec<u32>,
}

/// The policy's parameters, and the little it remembers between steps (how long each host has
/// been lightly loaded, and when it last received VMs). Keep one per cluster of hosts; host
/// indices must stay stable from one step to the next.
#[derive(Debug, Clone)]
pub struct Consolidator {
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
    low_streak: Vec<u32>,
    last_received: Vec<Option<usize>>,
}

impl Default for Consolidator {
    fn default() -> Self {
        Consolidator {
            overload: 0.95,
            pack: 0.85,
            underload: 0.5,
            underload_steps: 3,
            short_window: 3,
            long_window: 12,
            cooldown: 12,
            max_drains: 2,
            low_streak: Vec::new(),
            last_received: Vec::new(),
        }
    }
}

fn peak(history: &[f64], n: usize) -> f64 {
    history.iter().take(n.max(1)).fold(0.0, |a: f64, &b| a.max(b))
}

/// Watts per unit of capacity at full load: lower is better.
pub fn efficiency(h: &Host) -> f64 {
    h.full_load_w / h.capacity
}

struct Pack<'a> {
    hosts: &'a [Host<'a>],
    vms: &'a [Vm<'a>],
    load: Vec<f64>,
    memory_free: Vec<f64>,
    cpus_free: Vec<f64>,
    /// Anti-affinity groups present on each host (empty when no VM has a group).
    groups: Vec<Vec<u32>>,
    /// Hosts usable as targets now (on), or booting because of this plan.
    usable: Vec<bool>,
    /// Hosts that must not receive VMs (being relieved or emptied).
    closed: Vec<bool>,
    /// Off hosts in the order they are switched on: most efficient last (popped).
    spare: Vec<usize>,
}

impl Pack<'_> {
    fn fits_core(&self, h: usize, v: usize, size: f64) -> bool {
        let core = self.hosts[h].core;
        self.vms[v].size <= core || size <= 0.8 * core
    }

    fn allowed(&self, h: usize, v: usize) -> bool {
        let vm = &self.vms[v];
        vm.memory <= self.memory_free[h]
            && vm.cpus <= self.cpus_free[h]
            && vm.group.is_none_or(|g| !self.groups[h].contains(&g))
    }

    /// Best fit: the usable host with the least room left after taking `size`, under `limit`.
    fn best_fit(&self, v: usize, size: f64, limit: f64, exclude: usize) -> Option<usize> {
        let mut best: Option<(bool, f64, usize)> = None;
        for h in 0..self.load.len() {
            if h == exclude || !self.usable[h] || self.closed[h] {
                continue;
            }
            let room = limit * self.hosts[h].capacity - self.load[h] - size;
            if room < 0.0 || !self.allowed(h, v) {
                continue;
            }
            let key = (!self.fits_core(h, v, size), room, h);
            if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                best = Some(key);
            }
        }
        best.map(|b| b.2)
    }

    /// The first spare host that can take `v` at all, switched on for it.
    fn boot_for(&mut self, v: usize) -> Option<usize> {
        let i = self.spare.iter().rposition(|&h| self.allowed(h, v))?;
        let h = self.spare.remove(i);
        self.usable[h] = true;
        Some(h)
    }

    fn assign(&mut self, v: usize, to: usize, size: f64) {
        self.load[to] += size;
        self.memory_free[to] -= self.vms[v].memory;
        self.cpus_free[to] -= self.vms[v].cpus;
        if let Some(g) = self.vms[v].group {
            self.groups[to].push(g);
        }
    }

    fn unassign(&mut self, v: usize, from: usize, size: f64) {
        self.load[from] -= size;
        self.memory_free[from] += self.vms[v].memory;
        self.cpus_free[from] += self.vms[v].cpus;
        if let Some(g) = self.vms[v].group {
            if let Some(i) = self.groups[from].iter().position(|&x| x == g) {
                self.groups[from].swap_remove(i);
            }
        }
    }
}

impl Consolidator {
    fn sizes(&self, vms: &[Vm], window: usize) -> Vec<f64> {
        vms.iter()
            .map(|vm| {
                if vm.gone {
                    0.0
                } else if vm.history.is_empty() {
                    vm.demand
                } else {
                    peak(vm.history, window).max(0.0) * vm.size
                }
            })
            .collect()
    }

    /// The plan for decision step `step` (increasing by one per call).
    pub fn decide(&mut self, step: usize, hosts: &[Host], vms: &[Vm]) -> Plan {
        let n = hosts.len();
        self.low_streak.resize(n, 0);
        self.last_received.resize(n, None);
        let short = self.sizes(vms, self.short_window);
        let long = self.sizes(vms, self.long_window);
        let mut spare: Vec<usize> = (0..n).filter(|&h| hosts[h].power == Power::Off).collect();
        spare.sort_by(|&a, &b| efficiency(&hosts[a]).total_cmp(&efficiency(&hosts[b])).then(a.cmp(&b)));
        spare.reverse(); // popped from the end
        let any_group = vms.iter().any(|v| v.group.is_some());
        let mut p = Pack {
            hosts,
            vms,
            load: hosts
                .iter()
                .map(|h| h.vms.iter().map(|&v| short[v as usize]).sum())
                .collect(),
            memory_free: hosts.iter().map(|h| h.memory_free).collect(),
            cpus_free: hosts.iter().map(|h| h.cpus_free).collect(),
            groups: hosts
                .iter()
                .map(|h| {
                    if any_group {
                        h.vms.iter().filter_map(|&v| vms[v as usize].group).collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect(),
            usable: hosts.iter().map(|h| h.power == Power::On).collect(),
            closed: vec![false; n],
            spare,
        };
        let mut plan = Plan::default();
        let mut moved = vec![false; vms.len()];
        let in_cooldown = |v: usize| vms[v].last_migrated.is_some_and(|s| step < s + self.cooldown);
        let cost = |v: usize| vms[v].migration_s * (vms[v].demand + 1.0);

        // 1. Relieve hosts whose predicted demand is over the limit, or that are short now.
        let mut hot: Vec<usize> = (0..n)
            .filter(|&h| {
                let cap = hosts[h].capacity;
                p.load[h] > self.overload * cap || hosts[h].requested > cap
            })
            .collect();
        hot.sort_by(|&a, &b| (p.load[b] / hosts[b].capacity).total_cmp(&(p.load[a] / hosts[a].capacity)));
        for &h in &hot {
            p.closed[h] = true;
        }
        for &h in &hot {
            let cap = hosts[h].capacity;
            let mut candidates: Vec<usize> = hosts[h]
                .vms
                .iter()
                .map(|&v| v as usize)
                .filter(|&v| !vms[v].in_migration && !vms[v].pinned)
                .collect();
            while p.load[h] > self.pack * cap && !candidates.is_empty() {
                let excess = p.load[h] - self.pack * cap;
                // The cheapest VM that relieves the host alone; else the one relieving most per cost.
                let pick = candidates
                    .iter()
                    .copied()
                    .filter(|&v| short[v] >= excess)
                    .min_by(|&a, &b| {
                        (in_cooldown(a), cost(a))
                            .partial_cmp(&(in_cooldown(b), cost(b)))
                            .unwrap_or(std::cmp::Ordering::Equal)
                    })
                    .or_else(|| {
                        candidates
                            .iter()
                            .copied()
                            .max_by(|&a, &b| (short[a] / cost(a)).total_cmp(&(short[b] / cost(b))))
                    });
                let Some(v) = pick else { break };
                candidates.retain(|&x| x != v);
                if short[v] <= 0.0 {
                    continue;
                }
                let target = p.best_fit(v, short[v], self.pack, h).or_else(|| {
                    let new = p.boot_for(v)?;
                    plan.power_on.push(new as u32);
                    Some(new)
                });
                let Some(t) = target else { break };
                p.unassign(v, h, short[v]);
                p.assign(v, t, short[v]);
                moved[v] = true;
                self.last_received[t] = Some(step);
                plan.migrations.push((v as u32, t as u32));
            }
        }

        // 2. Empty hosts that have been lightly loaded for a while, if all their VMs fit elsewhere
        //    at their hour-long peaks.
        let mut cold: Vec<usize> = Vec::new();
        for (h, host) in hosts.iter().enumerate() {
            let on = host.power == Power::On && host.switchable && !host.vms.is_empty();
            let low = on && !p.closed[h] && p.load[h] < self.underload * host.capacity;
            self.low_streak[h] = if low { self.low_streak[h] + 1 } else { 0 };
            let settled = self.last_received[h].is_none_or(|s| step >= s + self.underload_steps as usize);
            if low && self.low_streak[h] >= self.underload_steps && settled {
                cold.push(h);
            }
        }
        cold.sort_by(|&a, &b| {
            (p.load[a] / hosts[a].capacity)
                .total_cmp(&(p.load[b] / hosts[b].capacity))
                .then(a.cmp(&b))
        });
        let mut drained = 0;
        for h in cold {
            if drained >= self.max_drains {
                break;
            }
            let here: Vec<usize> = hosts[h]
                .vms
                .iter()
                .map(|&v| v as usize)
                .filter(|&v| !moved[v])
                .collect();
            if here.len() != hosts[h].vms.len()
                || here
                    .iter()
                    .any(|&v| vms[v].in_migration || vms[v].pinned || in_cooldown(v))
            {
                continue;
            }
            p.closed[h] = true;
            let mut sorted = here;
            sorted.sort_by(|&a, &b| long[b].total_cmp(&long[a]));
            let mut placed: Vec<(usize, usize)> = Vec::new();
            let mut complete = true;
            for &v in &sorted {
                let size = long[v].max(short[v]);
                match p.best_fit(v, size, self.pack, h) {
                    Some(t) if hosts[t].power == Power::On => {
                        p.assign(v, t, size);
                        placed.push((v, t));
                    }
                    _ => {
                        complete = false;
                        break;
                    }
                }
            }
            if !complete {
                for &(v, t) in &placed {
                    p.unassign(v, t, long[v].max(short[v]));
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
        for (h, host) in hosts.iter().enumerate() {
            if host.power == Power::On
                && host.switchable
                && host.vms.is_empty()
                && !plan.migrations.iter().any(|&(_, t)| t as usize == h)
            {
                plan.power_off.push(h as u32);
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host<'a>(vms: &'a [u32], power: Power) -> Host<'a> {
        Host {
            capacity: 4.0,
            core: 4.0,
            full_load_w: 200.0,
            power,
            vms,
            requested: 0.0,
            memory_free: 8.0,
            cpus_free: 8.0,
            switchable: true,
        }
    }

    fn vm(history: &[f64]) -> Vm<'_> {
        Vm {
            size: 1.0,
            demand: history[0],
            history,
            migration_s: 10.0,
            memory: 2.0,
            cpus: 1.0,
            in_migration: false,
            last_migrated: None,
            gone: false,
            pinned: false,
            group: None,
        }
    }

    /// Two lightly loaded hosts: after `underload_steps` steps one is emptied onto the other and
    /// switched off; never before.
    #[test]
    fn a_lightly_loaded_host_is_emptied_after_the_streak_then_switched_off() {
        let low = [0.2; 12];
        let vms = [vm(&low), vm(&low)];
        let (a, b) = ([0u32], [1u32]);
        let hosts = [host(&a, Power::On), host(&b, Power::On)];
        let mut c = Consolidator::default();
        for step in 1..c.underload_steps as usize {
            assert_eq!(c.decide(step, &hosts, &vms), Plan::default(), "step {step}");
        }
        let plan = c.decide(3, &hosts, &vms);
        assert_eq!(plan.migrations, vec![(0, 1)]);
        assert_eq!(plan.power_off, vec![0]);
    }

    #[test]
    fn memory_and_anti_affinity_are_never_broken() {
        let low = [0.2; 12];
        let mut vms = [vm(&low), vm(&low)];
        let (a, b) = ([0u32], [1u32]);
        let mut hosts = [host(&a, Power::On), host(&b, Power::On)];
        hosts[1].memory_free = 1.0;
        hosts[0].memory_free = 1.0;
        let mut c = Consolidator::default();
        for step in 1..=5 {
            assert!(
                c.decide(step, &hosts, &vms).migrations.is_empty(),
                "no memory: nothing moves"
            );
        }
        hosts[0].memory_free = 8.0;
        hosts[1].memory_free = 8.0;
        vms[0].group = Some(7);
        vms[1].group = Some(7);
        let mut c = Consolidator::default();
        for step in 1..=5 {
            assert!(
                c.decide(step, &hosts, &vms).migrations.is_empty(),
                "anti-affinity: nothing moves"
            );
        }
        vms[1].group = None;
        vms[0].pinned = true;
        let mut c = Consolidator::default();
        let plan = (1..=5)
            .map(|s| c.decide(s, &hosts, &vms))
            .find(|p| !p.migrations.is_empty());
        assert_eq!(
            plan.map(|p| p.migrations),
            Some(vec![(1, 0)]),
            "the pinned VM stays; the other joins it"
        );
    }

    #[test]
    fn a_host_that_cannot_be_switched_off_is_not_emptied() {
        let low = [0.2; 12];
        let vms = [vm(&low), vm(&low)];
        let (a, b) = ([0u32], [1u32]);
        let mut hosts = [host(&a, Power::On), host(&b, Power::On), host(&[], Power::On)];
        hosts[0].switchable = false;
        hosts[1].switchable = false;
        hosts[2].switchable = false;
        let mut c = Consolidator::default();
        for step in 1..=5 {
            assert_eq!(c.decide(step, &hosts, &vms), Plan::default());
        }
        hosts[1].cpus_free = 0.0;
        hosts[2].cpus_free = 0.5;
        hosts[0].switchable = true;
        let mut c = Consolidator::default();
        assert!(
            (1..=5).all(|s| c.decide(s, &hosts, &vms).migrations.is_empty()),
            "no vCPU room on the only target"
        );
    }

    #[test]
    fn an_overloaded_host_is_relieved_onto_a_host_switched_on_for_it() {
        let hot = [1.0; 12];
        let vms = [vm(&hot), vm(&hot), vm(&hot), vm(&hot)];
        let all = [0u32, 1, 2, 3];
        let mut hosts = [host(&all, Power::On), host(&[], Power::Off)];
        hosts[0].requested = 4.0;
        let plan = Consolidator::default().decide(1, &hosts, &vms);
        assert_eq!(plan.power_on, vec![1]);
        assert_eq!(plan.migrations.len(), 1);
        assert_eq!(plan.migrations[0].1, 1);
    }
}
