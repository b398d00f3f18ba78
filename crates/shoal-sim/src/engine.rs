//! The simulation engine: a pure function from a workload and a policy to a report.
//!
//! Time advances from instant to instant: the decision instants (one per sample interval) and the
//! instants where migrations end or booting hosts come up. At every instant each host's CPU is
//! shared out among its VMs (the model's time-shared scheduler with over-subscription), energy is
//! integrated since the previous instant, and the SLA bookkeeping of hosts and VMs is advanced; the
//! policy is asked for a plan at decision instants only. The accounting follows CloudSim 3.0.3's
//! `PowerDatacenter` / `HostDynamicWorkload` so that the published baselines land on their
//! published figures (see `MODEL.md` beside the traces).

use std::collections::BinaryHeap;

use crate::model::Workload;
use crate::report::{Report, StepSample};

/// How many past samples a VM carries (the reference's `PowerVm.HISTORY_LENGTH`).
pub const HISTORY_LEN: usize = 30;

/// Explicit host power management, for policies that switch hosts off and on themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerControl {
    /// Seconds from the power-on command to a host that accepts VMs.
    pub boot_s: f64,
    /// Average draw while booting, W.
    pub boot_w: f64,
    /// Seconds of idle draw spent shutting down.
    pub shutdown_s: f64,
}

/// How hosts' power is accounted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PowerMode {
    /// The reference model: a host whose utilisation was 0 at the start of an interval draws
    /// nothing during it, and switches on instantly and for free.
    Implicit,
    /// Hosts are off, booting or on; an on host draws at least its idle power, even when empty;
    /// booting costs time and energy.
    Explicit(PowerControl),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPower {
    Off,
    Booting,
    On,
}

#[derive(Debug, Clone)]
pub struct HostState {
    pub ty: usize,
    /// VMs on the host, in arrival order, including those migrating in.
    pub vms: Vec<u32>,
    /// VMs migrating in (also in `vms`).
    pub incoming: Vec<u32>,
    /// CPU utilisation (allocated MIPS / capacity) at the last update.
    pub util: f64,
    /// Demanded MIPS (uncapped) at the last update.
    pub requested_mips: f64,
    pub power: HostPower,
    /// When a booting host comes up.
    pub ready_at: f64,
    /// Power off as soon as the last VM has left.
    pub off_when_empty: bool,
}

#[derive(Debug, Clone)]
pub struct VmState {
    /// The host the VM runs on (the source while it migrates).
    pub host: u32,
    pub in_migration: bool,
    /// Demand fractions at past decision instants, most recent first, at most `HISTORY_LEN`.
    pub history: Vec<f64>,
    /// Decision step of the VM's last migration start.
    pub last_migrated: Option<usize>,
    /// The VM has finished (reference quirk: its demand read 0) and is on no host any more.
    pub gone: bool,
}

/// What a policy sees at a decision instant.
pub struct View<'a> {
    pub workload: &'a Workload,
    pub t: f64,
    /// 0 for the initial placement, then 1, 2, … for the decision instants.
    pub step: usize,
    pub hosts: &'a [HostState],
    pub vms: &'a [VmState],
    /// Demanded MIPS of every VM now (uncapped).
    pub demand: &'a [f64],
}

impl View<'_> {
    pub fn capacity(&self, h: usize) -> f64 {
        self.workload.host_types[self.hosts[h].ty].mips()
    }
    pub fn core_mips(&self, h: usize) -> f64 {
        self.workload.host_types[self.hosts[h].ty].mips_per_core
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// (VM, target host), started in this order.
    pub migrations: Vec<(u32, u32)>,
    pub power_on: Vec<u32>,
    /// Hosts to switch off once empty (explicit power mode only).
    pub power_off: Vec<u32>,
}

pub trait Policy {
    fn name(&self) -> String;
    fn power_mode(&self) -> PowerMode {
        PowerMode::Implicit
    }
    /// Host of every VM at t = 0, when each VM asks for all its MIPS. In explicit power mode the
    /// chosen hosts are on from the start.
    fn initial_placement(&mut self, view: &View) -> Result<Vec<u32>, SimError>;
    fn decide(&mut self, view: &View) -> Plan;
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SimError {
    #[error("no host can take VM {vm} at t = 0")]
    Unplaceable { vm: usize },
    #[error("policy {policy}: {what}")]
    BadPlan { policy: String, what: String },
    #[error("unknown policy {0:?} (known: shoal, thr-mmt:T, iqr-mmt:S, mad-mmt:S, lr-mmt:S, dvfs)")]
    UnknownPolicy(String),
    #[error("the workload has no VMs")]
    NoVms,
}

#[derive(Clone, Copy)]
struct Entry {
    t: f64,
    alloc: f64,
    req: f64,
    flag: bool,
}

#[derive(Default)]
struct Acc {
    active_s: f64,
    violated_s: f64,
    vm_req: f64,
    vm_alloc: f64,
    vm_under_migration: f64,
}

#[derive(Clone, Copy, PartialEq)]
struct Key(f64, u64);
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap is a max-heap and the earliest event comes first.
        o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
    }
}

enum Event {
    Decide(usize),
    MigrationEnd { vm: u32, target: u32 },
    HostReady(u32),
}

struct Sim<'w> {
    w: &'w Workload,
    mode: PowerMode,
    hosts: Vec<HostState>,
    vms: Vec<VmState>,
    demand: Vec<f64>,
    host_last: Vec<Option<Entry>>,
    vm_last: Vec<Option<Entry>>,
    acc: Acc,
    energy_j: f64,
    boot_energy_j: f64,
    last_t: f64,
    migrations: u64,
    boots: u64,
    events: BinaryHeap<(Key, usize)>,
    event_store: Vec<Option<Event>>,
    seq: u64,
    /// Migrations waiting for their booting target.
    deferred: Vec<(u32, u32)>,
    // Scratch for allocation.
    alloc: Vec<f64>,
}

impl<'w> Sim<'w> {
    fn push(&mut self, t: f64, e: Event) {
        self.seq += 1;
        self.event_store.push(Some(e));
        self.events.push((Key(t, self.seq), self.event_store.len() - 1));
    }

    fn record(last: &mut Option<Entry>, e: Entry, host: bool, acc: &mut Acc) {
        if let Some(p) = *last {
            if e.t > p.t {
                let dt = e.t - p.t;
                if host {
                    if p.flag {
                        acc.active_s += dt;
                        if p.alloc < p.req {
                            acc.violated_s += dt;
                        }
                    }
                } else {
                    acc.vm_req += p.req * dt;
                    acc.vm_alloc += p.alloc * dt;
                    if p.alloc < p.req && p.flag {
                        acc.vm_under_migration += (p.req - p.alloc) * dt;
                    }
                }
            }
        }
        *last = Some(e);
    }

    /// Shares host `h`'s CPU among its VMs at time `t`, records the SLA entries, and returns the
    /// utilisation before and after.
    fn update_host(&mut self, h: usize, t: f64) -> (f64, f64) {
        let ht = &self.w.host_types[self.hosts[h].ty];
        let pe = ht.mips_per_core;
        let total = ht.mips();
        let host = &self.hosts[h];
        let mut required = 0.0;
        for &v in &host.vms {
            let capped = self.demand[v as usize].min(pe);
            required += if host.incoming.contains(&v) {
                capped * 0.1
            } else {
                capped
            };
        }
        let over = required > total;
        let scale = if over { total / required } else { 1.0 };
        let mut util_mips = 0.0;
        let mut req_total = 0.0;
        self.alloc.clear();
        for &v in &host.vms {
            let req = self.demand[v as usize];
            let capped = req.min(pe);
            let incoming = host.incoming.contains(&v);
            let out = self.vms[v as usize].in_migration && !incoming;
            let a = if over {
                if out {
                    (capped * scale * 0.9).floor()
                } else if incoming {
                    (capped * 0.1 * scale).floor()
                } else {
                    (capped * scale).floor()
                }
            } else if out {
                capped * 0.9
            } else if incoming {
                capped * 0.1
            } else {
                capped
            };
            self.alloc.push(a);
            util_mips += if out { a / 0.9 } else { a };
            req_total += req;
        }
        for (i, &v) in self.hosts[h].vms.iter().enumerate() {
            if self.hosts[h].incoming.contains(&v) {
                continue;
            }
            let e = Entry {
                t,
                alloc: self.alloc[i],
                req: self.demand[v as usize],
                flag: self.vms[v as usize].in_migration,
            };
            Self::record(&mut self.vm_last[v as usize], e, false, &mut self.acc);
        }
        // The model's invariant: the scheduler never hands out more than the host has.
        debug_assert!(
            util_mips <= total * (1.0 + 1e-9),
            "host {h} allocates {util_mips} of {total} MIPS"
        );
        let e = Entry {
            t,
            alloc: util_mips,
            req: req_total,
            flag: util_mips > 0.0,
        };
        Self::record(&mut self.host_last[h], e, true, &mut self.acc);
        let before = self.hosts[h].util;
        self.hosts[h].util = util_mips / total;
        self.hosts[h].requested_mips = req_total;
        (before, self.hosts[h].util)
    }

    /// Updates every host at `t`, integrating energy since the last instant.
    fn update_all(&mut self, t: f64, decision: bool) {
        for (v, spec) in self.w.vms.iter().enumerate() {
            if self.vms[v].gone {
                continue;
            }
            let f = spec.demand_fraction(t, self.w.interval_s);
            self.demand[v] = f * spec.mips;
            if decision {
                let h = &mut self.vms[v].history;
                h.insert(0, f);
                h.truncate(HISTORY_LEN);
            }
        }
        let dt = t - self.last_t;
        for h in 0..self.hosts.len() {
            let (before, after) = self.update_host(h, t);
            if dt > 0.0 {
                let ht = &self.w.host_types[self.hosts[h].ty];
                let counts = match self.mode {
                    PowerMode::Implicit => before > 0.0,
                    PowerMode::Explicit(_) => self.hosts[h].power == HostPower::On,
                };
                if counts {
                    self.energy_j += (ht.power(before) + ht.power(after)) / 2.0 * dt;
                }
            }
        }
        self.last_t = t;
        if self.w.reference_quirks {
            for h in 0..self.hosts.len() {
                let host = &mut self.hosts[h];
                let vms = &mut self.vms;
                let demand = &self.demand;
                host.vms.retain(|&v| {
                    let done = !vms[v as usize].in_migration && demand[v as usize] == 0.0;
                    if done {
                        vms[v as usize].gone = true;
                    }
                    !done
                });
            }
        }
    }

    fn start_migration(&mut self, t: f64, vm: u32, target: u32, step: usize) {
        let v = vm as usize;
        self.vms[v].in_migration = true;
        self.vms[v].last_migrated = Some(step);
        let host = &mut self.hosts[target as usize];
        if !host.incoming.contains(&vm) {
            host.incoming.push(vm);
            host.vms.push(vm);
        }
        let end = t + self.w.vms[v].migration_s();
        self.push(end, Event::MigrationEnd { vm, target });
    }

    fn end_migration(&mut self, vm: u32, target: u32) -> [usize; 2] {
        let v = vm as usize;
        let src = self.vms[v].host as usize;
        self.hosts[src].vms.retain(|&x| x != vm);
        let tgt = &mut self.hosts[target as usize];
        tgt.incoming.retain(|&x| x != vm);
        tgt.vms.retain(|&x| x != vm);
        tgt.vms.push(vm);
        self.vms[v].host = target;
        self.vms[v].in_migration = false;
        [src, target as usize]
    }

    fn maybe_power_off(&mut self, h: usize) {
        if let PowerMode::Explicit(pc) = self.mode {
            let host = &mut self.hosts[h];
            if host.off_when_empty && host.power == HostPower::On && host.vms.is_empty() {
                host.power = HostPower::Off;
                host.off_when_empty = false;
                let idle = self.w.host_types[host.ty].power(0.0);
                self.boot_energy_j += idle * pc.shutdown_s;
            }
        }
    }

    fn view(&self, t: f64, step: usize) -> View<'_> {
        View {
            workload: self.w,
            t,
            step,
            hosts: &self.hosts,
            vms: &self.vms,
            demand: &self.demand,
        }
    }
}

/// Runs `policy` over `w`: the whole simulation, deterministic for a workload and a policy.
pub fn simulate(w: &Workload, policy: &mut dyn Policy) -> Result<Report, SimError> {
    let started = std::time::Instant::now();
    if w.vms.is_empty() {
        return Err(SimError::NoVms);
    }
    let mode = policy.power_mode();
    let n_hosts = w.hosts();
    let mut sim = Sim {
        w,
        mode,
        hosts: (0..n_hosts)
            .map(|h| HostState {
                ty: w.host_type_of[h],
                vms: Vec::new(),
                incoming: Vec::new(),
                util: 0.0,
                requested_mips: 0.0,
                power: match mode {
                    PowerMode::Implicit => HostPower::On,
                    PowerMode::Explicit(_) => HostPower::Off,
                },
                ready_at: 0.0,
                off_when_empty: false,
            })
            .collect(),
        vms: (0..w.vms.len())
            .map(|_| VmState {
                host: 0,
                in_migration: false,
                history: Vec::with_capacity(HISTORY_LEN + 1),
                last_migrated: None,
                gone: false,
            })
            .collect(),
        demand: w.vms.iter().map(|v| v.mips).collect(),
        host_last: vec![None; n_hosts],
        vm_last: vec![None; w.vms.len()],
        acc: Acc::default(),
        energy_j: 0.0,
        boot_energy_j: 0.0,
        last_t: 0.0,
        migrations: 0,
        boots: 0,
        events: BinaryHeap::new(),
        event_store: Vec::new(),
        seq: 0,
        deferred: Vec::new(),
        alloc: Vec::new(),
    };
    let name = policy.name();
    let bad = |what: String| SimError::BadPlan {
        policy: name.clone(),
        what,
    };

    let placement = policy.initial_placement(&sim.view(0.0, 0))?;
    if placement.len() != w.vms.len() {
        return Err(bad(format!(
            "initial placement names {} VMs, not {}",
            placement.len(),
            w.vms.len()
        )));
    }
    for (v, &h) in placement.iter().enumerate() {
        if h as usize >= n_hosts {
            return Err(bad(format!("VM {v} placed on host {h}, beyond {n_hosts}")));
        }
        sim.vms[v].host = h;
        sim.hosts[h as usize].vms.push(v as u32);
        sim.hosts[h as usize].power = HostPower::On;
    }
    // The reference's first update comes one interval in; before it every host reads 0 %, so the
    // day's energy is integrated from the first decision instant on, for every policy alike.
    // `decisions` says where the day ends.
    let offset = if w.reference_quirks { 0.1 } else { 0.0 };
    for k in 1..=w.decisions() {
        sim.push(k as f64 * w.interval_s + offset, Event::Decide(k));
    }

    let mut series: Vec<StepSample> = Vec::with_capacity(w.steps);
    let mut first = true;
    let mut step_migrations = 0u64;
    while let Some((Key(t, _), idx)) = sim.events.pop() {
        let ev = sim.event_store[idx].take().expect("each event is popped once");
        if first {
            // Energy before the first instant is not counted (see above).
            sim.last_t = t;
            first = false;
        }
        let decision = matches!(ev, Event::Decide(_));
        if t > sim.last_t || decision {
            sim.update_all(t, decision);
        }
        match ev {
            Event::MigrationEnd { vm, target } => {
                let [a, b] = sim.end_migration(vm, target);
                sim.update_host(a, t);
                sim.update_host(b, t);
                sim.maybe_power_off(a);
            }
            Event::HostReady(h) => {
                sim.hosts[h as usize].power = HostPower::On;
                let ready: Vec<(u32, u32)> = sim.deferred.iter().copied().filter(|&(_, tg)| tg == h).collect();
                sim.deferred.retain(|&(_, tg)| tg != h);
                let step = (t / w.interval_s) as usize;
                for (vm, tg) in ready {
                    let src = sim.vms[vm as usize].host as usize;
                    sim.start_migration(t, vm, tg, step);
                    sim.update_host(tg as usize, t);
                    sim.update_host(src, t);
                }
            }
            Event::Decide(k) => {
                let plan = policy.decide(&sim.view(t, k));
                let mut touched: Vec<usize> = Vec::new();
                for &h in &plan.power_on {
                    let h = h as usize;
                    let PowerMode::Explicit(pc) = mode else {
                        return Err(bad("powers a host on in implicit power mode".into()));
                    };
                    if h >= n_hosts {
                        return Err(bad(format!("powers on host {h}, beyond {n_hosts}")));
                    }
                    let host = &mut sim.hosts[h];
                    host.off_when_empty = false;
                    if host.power == HostPower::Off {
                        host.power = HostPower::Booting;
                        host.ready_at = t + pc.boot_s;
                        sim.boots += 1;
                        sim.boot_energy_j += pc.boot_w * pc.boot_s;
                        sim.push(t + pc.boot_s, Event::HostReady(h as u32));
                    }
                }
                for &(vm, tg) in &plan.migrations {
                    let (v, tgu) = (vm as usize, tg as usize);
                    if v >= w.vms.len() || tgu >= n_hosts {
                        return Err(bad(format!("migrates VM {vm} to host {tg}: no such VM or host")));
                    }
                    if sim.vms[v].host == tg && !sim.vms[v].in_migration {
                        return Err(bad(format!("migrates VM {vm} to the host it runs on ({tg})")));
                    }
                    sim.migrations += 1;
                    step_migrations += 1;
                    match sim.hosts[tgu].power {
                        HostPower::On => {
                            let src = sim.vms[v].host as usize;
                            sim.start_migration(t, vm, tg, k);
                            touched.push(tgu);
                            touched.push(src);
                        }
                        HostPower::Booting => sim.deferred.push((vm, tg)),
                        HostPower::Off => return Err(bad(format!("migrates VM {vm} to host {tg}, which is off"))),
                    }
                }
                for &h in &plan.power_off {
                    if !matches!(mode, PowerMode::Explicit(_)) {
                        return Err(bad("powers a host off in implicit power mode".into()));
                    }
                    if (h as usize) < n_hosts {
                        sim.hosts[h as usize].off_when_empty = true;
                        sim.maybe_power_off(h as usize);
                    }
                }
                touched.sort_unstable();
                touched.dedup();
                for h in touched {
                    sim.update_host(h, t);
                }
                series.push(sample(&sim, t, k, step_migrations));
                step_migrations = 0;
            }
        }
    }

    let slatah = if sim.acc.active_s > 0.0 {
        sim.acc.violated_s / sim.acc.active_s
    } else {
        0.0
    };
    let pdm = if sim.acc.vm_req > 0.0 {
        sim.acc.vm_under_migration / sim.acc.vm_req
    } else {
        0.0
    };
    let overall = if sim.acc.vm_req > 0.0 {
        (sim.acc.vm_req - sim.acc.vm_alloc) / sim.acc.vm_req
    } else {
        0.0
    };
    let energy_kwh = (sim.energy_j + sim.boot_energy_j) / 3.6e6;
    let slav = slatah * pdm;
    let hosts_powered_off_max = series.iter().map(|s| n_hosts - s.powered_on).max().unwrap_or(0);
    Ok(Report {
        policy: name,
        workload: w.name.clone(),
        vms: w.vms.len(),
        hosts: n_hosts,
        energy_kwh,
        boot_energy_kwh: sim.boot_energy_j / 3.6e6,
        slatah,
        pdm,
        slav,
        esv: energy_kwh * slav,
        sla_overall: overall,
        migrations: sim.migrations,
        host_boots: sim.boots,
        hosts_powered_off_max,
        sim_seconds: started.elapsed().as_secs_f64(),
        series,
    })
}

fn sample(sim: &Sim, t: f64, step: usize, migrations: u64) -> StepSample {
    let mut active = 0;
    let mut on = 0;
    let mut violated = 0;
    let mut power = 0.0;
    for h in &sim.hosts {
        let ht = &sim.w.host_types[h.ty];
        let is_on = match sim.mode {
            PowerMode::Implicit => h.util > 0.0,
            PowerMode::Explicit(_) => h.power != HostPower::Off,
        };
        if is_on {
            on += 1;
            power += ht.power(h.util);
        }
        if h.util > 0.0 {
            active += 1;
            if h.util * ht.mips() < h.requested_mips {
                violated += 1;
            }
        }
    }
    StepSample {
        step,
        t,
        active_hosts: active,
        powered_on: on,
        power_w: power,
        sla_violation: if active > 0 {
            violated as f64 / active as f64
        } else {
            0.0
        },
        migrations,
    }
}
