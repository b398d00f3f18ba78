//! Rebalancing and draining: plans of live migrations that lower hbal's cluster score
//! ([`crate::hbal`]), each gaining more than its predicted cost.
//!
//! The rebalancer is greedy like hbal (the best single move, again and again) but does not try
//! every VM on every host. The score is a weighted sum of standard deviations of per-host
//! statistics, so the effect of taking a VM off host `a` and of putting it on host `b` are,
//! to second order, separate terms. For each VM *shape* (memory, vCPU, disk) it ranks sources
//! and targets by those terms, then scores the best `candidates` × `candidates` pairs exactly
//! and keeps the best move over all shapes. A step costs O(shapes × hosts), not O(VMs × hosts).
//!
//! A move's predicted cost is the time its pre-copy takes, `memory / (bandwidth − dirty rate)`
//! (plus the disk when storage is local), priced at [`RebalanceOptions::cost_per_second`] per
//! host; a
//! move is taken only when its gain exceeds both that cost and [`RebalanceOptions::min_gain`].
//! For small clusters ([`QUALITY_MAX_HOSTS`]) the plan is refined: greedy cannot reach a score
//! in fewer moves than it takes, so the moves up to greedy's stopping point are chosen again
//! together, keeping the fewest moved VMs that still reach its score ([`plan`]).
//!
//! Moves are grouped into waves of at most `max_concurrent` migrations with no host in two
//! migrations of a wave, so the moves of one wave can run at once in any order.

// Statistics and resources are indexed in step across several arrays; index loops read best.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hbal::{self, HbalScore, HostTotals, STATS};
use crate::snapshot::{HostState, Snapshot, SnapshotError};

/// How the rebalancer trades balance against migrations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct RebalanceOptions {
    /// hbal's `--ignore-dynu`: balance memory and vCPU only, not the VM count.
    #[serde(default)]
    pub ignore_dynu: bool,
    /// A move must lower the score by more than this.
    pub min_gain: f64,
    /// Stop after this many moves (hbal's `-l`).
    #[serde(default)]
    pub max_moves: Option<usize>,
    /// Migrations that may run at once.
    pub max_concurrent: usize,
    /// Migration bandwidth for hosts that do not state theirs.
    pub bandwidth_mib_s: f64,
    /// Score a second of migration must buy back, times the number of hosts (a move's gain
    /// shrinks as 1/hosts).
    pub cost_per_second: f64,
    /// Sources and targets scored exactly per VM shape and step.
    pub candidates: usize,
}

impl Default for RebalanceOptions {
    fn default() -> Self {
        RebalanceOptions {
            ignore_dynu: false,
            min_gain: 1e-9,
            max_moves: None,
            max_concurrent: 4,
            bandwidth_mib_s: 1250.0,
            cost_per_second: 0.01,
            candidates: 16,
        }
    }
}

/// One live migration of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// How much the score drops with this move.
    pub gain: f64,
    /// Predicted migration time.
    pub seconds: f64,
    /// The cluster score once the move is done.
    pub score_after: f64,
    /// Moves of one wave run at once; wave `n + 1` starts when wave `n` is done.
    pub wave: u32,
}

/// A plan of migrations with the scores before and after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RebalancePlan {
    pub before: HbalScore,
    pub after: HbalScore,
    pub moves: Vec<Move>,
    pub waves: u32,
    /// Why planning stopped.
    pub stopped: String,
}

/// Why no plan could be made, naming the offending value.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RebalanceError {
    #[error("invalid snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("host {0:?} is not in the snapshot")]
    UnknownHost(String),
    #[error(
        "cannot drain host {host:?}: VM {vm:?} ({cpus} vCPU, {memory_mib} MiB) fits on no other host that is up{why}"
    )]
    NoRoom {
        host: String,
        vm: String,
        cpus: u32,
        memory_mib: u64,
        why: String,
    },
}

/// Incremental balance state: per-host statistics, their sums, free capacity and VM shapes.
#[derive(Clone)]
struct Balance<'s> {
    snap: &'s Snapshot,
    totals: Vec<HostTotals>,
    /// Per host, its statistics (`None` when offline).
    stats: Vec<Option<[f64; STATS]>>,
    s1: [f64; STATS],
    s2: [f64; STATS],
    online: f64,
    w: [f64; STATS],
    free: Vec<[i64; 3]>,
    target_ok: Vec<bool>,
    vm_host: Vec<usize>,
    on_host: Vec<Vec<usize>>,
    /// Per VM, its shape index.
    shape: Vec<usize>,
    shapes: Vec<(u64, u32, u64)>,
    /// Per host × shape, how many VMs of the shape it holds.
    shape_count: Vec<u32>,
    /// VMs of clusters with hard anti-affinity, per (cluster, domain value).
    spread: HashMap<(String, String), u32>,
    opts: RebalanceOptions,
}

impl<'s> Balance<'s> {
    fn new(snap: &'s Snapshot, opts: &RebalanceOptions) -> Result<Balance<'s>, RebalanceError> {
        snap.validate()?;
        let idx = snap.host_index();
        let n = snap.hosts.len();
        let mut shapes: Vec<(u64, u32, u64)> = Vec::new();
        let mut shape_of: HashMap<(u64, u32, u64), usize> = HashMap::new();
        let mut shape = Vec::with_capacity(snap.vms.len());
        let mut vm_host = Vec::with_capacity(snap.vms.len());
        let mut on_host = vec![Vec::new(); n];
        for (i, v) in snap.vms.iter().enumerate() {
            let key = (v.memory_mib, v.cpus, if snap.shared_storage { 0 } else { v.disk_mib });
            let s = *shape_of.entry(key).or_insert_with(|| {
                shapes.push(key);
                shapes.len() - 1
            });
            shape.push(s);
            let h = idx[v.host.as_str()];
            vm_host.push(h);
            on_host[h].push(i);
        }
        let mut shape_count = vec![0u32; n * shapes.len().max(1)];
        for (i, &h) in vm_host.iter().enumerate() {
            shape_count[h * shapes.len() + shape[i]] += 1;
        }
        let usage = snap.usage();
        let free = snap
            .hosts
            .iter()
            .zip(&usage)
            .map(|(h, u)| {
                let c = h.capacity();
                let mut f = [0i64; 3];
                for r in 0..3 {
                    f[r] = c[r] as i64 - u[r] as i64;
                }
                if snap.shared_storage {
                    f[2] = i64::MAX / 4;
                }
                f
            })
            .collect();
        let mut spread = HashMap::new();
        for (i, v) in snap.vms.iter().enumerate() {
            if let Some(key) = &v.anti_affinity {
                if let Some(d) = snap.hosts[vm_host[i]].domain(key) {
                    *spread.entry((v.cluster.clone(), d.to_string())).or_default() += 1;
                }
            }
        }
        let mut b = Balance {
            snap,
            totals: snap.hosts.iter().map(HostTotals::of).collect(),
            stats: hbal::host_stats(snap, opts.ignore_dynu),
            s1: [0.0; STATS],
            s2: [0.0; STATS],
            online: 0.0,
            w: hbal::weights(opts.ignore_dynu),
            free,
            target_ok: snap.hosts.iter().map(|h| h.state == HostState::Up).collect(),
            vm_host,
            on_host,
            shape,
            shapes,
            shape_count,
            spread,
            opts: opts.clone(),
        };
        b.resum();
        Ok(b)
    }

    /// Recomputes the sums from the per-host statistics (against floating-point drift).
    fn resum(&mut self) {
        self.s1 = [0.0; STATS];
        self.s2 = [0.0; STATS];
        self.online = 0.0;
        for s in self.stats.iter().flatten() {
            self.online += 1.0;
            for c in 0..STATS {
                self.s1[c] += s[c];
                self.s2[c] += s[c] * s[c];
            }
        }
    }

    fn sd(&self, s1: f64, s2: f64) -> f64 {
        if self.online == 0.0 {
            return 0.0;
        }
        let m = s1 / self.online;
        (s2 / self.online - m * m).max(0.0).sqrt()
    }

    /// The score's balance part (offline VMs are counted separately as a constant per VM).
    fn score(&self) -> f64 {
        (0..STATS).map(|c| self.w[c] * self.sd(self.s1[c], self.s2[c])).sum()
    }

    fn delta(&self, vm: usize, h: usize) -> [f64; STATS] {
        let v = &self.snap.vms[vm];
        hbal::vm_delta(
            &self.totals[h],
            v.memory_mib,
            v.disk_mib,
            v.cpus,
            !self.snap.shared_storage,
            self.opts.ignore_dynu,
        )
    }

    /// Exact score after moving `vm` to `b` (balance part plus offline VMs' penalty change).
    fn gain(&self, vm: usize, b: usize) -> f64 {
        let a = self.vm_host[vm];
        let (mut s1, mut s2) = (self.s1, self.s2);
        let mut offline_gain = 0.0;
        match &self.stats[a] {
            Some(xa) => {
                let d = self.delta(vm, a);
                for c in 0..STATS {
                    let y = xa[c] - d[c];
                    s1[c] += -d[c];
                    s2[c] += y * y - xa[c] * xa[c];
                }
            }
            None => offline_gain = 20.0,
        }
        let Some(xb) = &self.stats[b] else {
            return f64::NEG_INFINITY;
        };
        let d = self.delta(vm, b);
        for c in 0..STATS {
            let y = xb[c] + d[c];
            s1[c] += d[c];
            s2[c] += y * y - xb[c] * xb[c];
        }
        let after: f64 = (0..STATS).map(|c| self.w[c] * self.sd(s1[c], s2[c])).sum();
        self.score() - after + offline_gain
    }

    fn need(&self, vm: usize) -> [i64; 3] {
        let v = &self.snap.vms[vm];
        [
            v.cpus as i64,
            v.memory_mib as i64,
            if self.snap.shared_storage { 0 } else { v.disk_mib as i64 },
        ]
    }

    fn fits(&self, vm: usize, b: usize) -> bool {
        if !self.target_ok[b] || self.vm_host[vm] == b {
            return false;
        }
        let need = self.need(vm);
        if (0..3).any(|r| self.free[b][r] < need[r]) {
            return false;
        }
        let v = &self.snap.vms[vm];
        if let Some(key) = &v.anti_affinity {
            match self.snap.hosts[b].domain(key) {
                None => return false,
                Some(d) => {
                    let here = self.snap.hosts[self.vm_host[vm]].domain(key) == Some(d);
                    let n = self
                        .spread
                        .get(&(v.cluster.clone(), d.to_string()))
                        .copied()
                        .unwrap_or(0);
                    if n > 0 && !here {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// What `seconds` of migration cost in score: one move shifts a standard deviation over
    /// `n` hosts by about 1/n, so the price is per host, keeping it meaningful at any size.
    fn cost(&self, seconds: f64) -> f64 {
        self.opts.cost_per_second * seconds / self.online.max(1.0)
    }

    /// Predicted migration time of `vm` to `b`, `None` when pre-copy cannot converge.
    fn seconds(&self, vm: usize, b: usize) -> Option<f64> {
        let v = &self.snap.vms[vm];
        let a = self.vm_host[vm];
        let bw = [self.snap.hosts[a].migration_mib_s, self.snap.hosts[b].migration_mib_s]
            .into_iter()
            .flatten()
            .fold(self.opts.bandwidth_mib_s, f64::min);
        let rate = bw - v.dirty_mib_s.unwrap_or(0.0);
        if rate <= 0.0 {
            return None;
        }
        let disk = v.copied_disk_mib(self.snap.shared_storage);
        Some(v.memory_mib as f64 / rate + disk as f64 / bw)
    }

    fn do_move(&mut self, vm: usize, b: usize) {
        let a = self.vm_host[vm];
        let need = self.need(vm);
        let da = self.delta(vm, a);
        let db = self.delta(vm, b);
        if let Some(x) = &mut self.stats[a] {
            for c in 0..STATS {
                self.s2[c] -= x[c] * x[c];
                x[c] -= da[c];
                self.s2[c] += x[c] * x[c];
                self.s1[c] -= da[c];
            }
        }
        if let Some(x) = &mut self.stats[b] {
            for c in 0..STATS {
                self.s2[c] -= x[c] * x[c];
                x[c] += db[c];
                self.s2[c] += x[c] * x[c];
                self.s1[c] += db[c];
            }
        }
        for r in 0..3 {
            self.free[a][r] += need[r];
            self.free[b][r] -= need[r];
        }
        let ns = self.shapes.len();
        self.shape_count[a * ns + self.shape[vm]] -= 1;
        self.shape_count[b * ns + self.shape[vm]] += 1;
        self.on_host[a].retain(|&x| x != vm);
        self.on_host[b].push(vm);
        self.vm_host[vm] = b;
        let v = &self.snap.vms[vm];
        if let Some(key) = &v.anti_affinity {
            for (h, sign) in [(a, -1i64), (b, 1)] {
                if let Some(d) = self.snap.hosts[h].domain(key) {
                    let e = self.spread.entry((v.cluster.clone(), d.to_string())).or_default();
                    *e = (*e as i64 + sign) as u32;
                }
            }
        }
    }

    /// The best exchange of two VMs of different shapes between two hosts, among the hosts
    /// furthest from the mean: (vm on a, vm on b, gain).
    fn best_swap(&mut self) -> Option<(usize, usize, f64)> {
        let n = self.snap.hosts.len();
        let mut far: Vec<(f64, usize)> = (0..n)
            .filter(|&h| self.target_ok[h] && self.stats[h].is_some())
            .map(|h| {
                let x = self.stats[h].unwrap_or_default();
                let d: f64 = (0..STATS)
                    .map(|c| {
                        let sd = self.sd(self.s1[c], self.s2[c]).max(1e-6);
                        self.w[c] * (x[c] - self.s1[c] / self.online).abs() / sd
                    })
                    .sum();
                (-d, h)
            })
            .collect();
        smallest(&mut far, 2 * self.opts.candidates.max(1));
        let base = self.score();
        let mut best: Option<(usize, usize, f64)> = None;
        for (i, &(_, a)) in far.iter().enumerate() {
            for &(_, b) in &far[i + 1..] {
                let (va, vb) = (self.one_per_shape(a), self.one_per_shape(b));
                for &v1 in &va {
                    for &v2 in &vb {
                        if self.shape[v1] == self.shape[v2] {
                            continue;
                        }
                        // Live migration needs room at every instant: move first whichever fits.
                        let (x, xt, y, yt) = if self.fits(v1, b) {
                            (v1, b, v2, a)
                        } else {
                            (v2, a, v1, b)
                        };
                        if !self.fits(x, xt) {
                            continue;
                        }
                        let from = self.vm_host[x];
                        self.do_move(x, xt);
                        let gain = if self.fits(y, yt) {
                            base - (self.score() - self.gain(y, yt))
                        } else {
                            f64::NEG_INFINITY
                        };
                        self.do_move(x, from);
                        let (Some(s1), Some(s2)) = (self.seconds(v1, b), self.seconds(v2, a)) else {
                            continue;
                        };
                        if gain > self.opts.min_gain
                            && gain > self.cost(s1 + s2)
                            && best.is_none_or(|(_, _, g)| gain > g)
                        {
                            best = Some((v1, v2, gain));
                        }
                    }
                }
            }
        }
        best
    }

    /// One VM of each kind on host `h`: VMs of one shape, cluster rule and dirty rate are alike.
    fn one_per_shape(&self, h: usize) -> Vec<usize> {
        let mut seen = std::collections::HashSet::new();
        let mut vms: Vec<usize> = self.on_host[h].clone();
        vms.sort_unstable();
        vms.into_iter()
            .filter(|&v| {
                let x = &self.snap.vms[v];
                let rule = x.anti_affinity.as_ref().map(|k| (k.as_str(), x.cluster.as_str()));
                seen.insert((self.shape[v], rule, x.dirty_mib_s.map(f64::to_bits), x.overlay_mib))
            })
            .collect()
    }

    /// Second-order estimate of the score change when stats of host `h` change by `d`
    /// (`sign` +1 adds the VM, −1 removes it), used only to rank candidates.
    fn approx(&self, h: usize, d: &[f64; STATS], sign: f64, inv2sd: &[f64; STATS]) -> f64 {
        let Some(x) = &self.stats[h] else {
            // Leaving an offline host gains its penalty.
            return if sign < 0.0 { -20.0 } else { f64::INFINITY };
        };
        let n = self.online;
        let mut s = 0.0;
        for c in 0..STATS {
            let dd = sign * d[c];
            let dvar = (2.0 * x[c] * dd + dd * dd) / n - (2.0 * self.s1[c] * dd + dd * dd) / (n * n);
            s += self.w[c] * dvar * inv2sd[c];
        }
        s
    }

    /// The best move of this step: (vm, target, gain, seconds).
    fn best_move(&self) -> Option<Step> {
        self.ranked_moves(1).pop()
    }

    /// The `m` best moves of this step, best first: (vm, target, gain, seconds), ranked by gain
    /// net of cost, ties by (vm, target).
    fn ranked_moves(&self, m: usize) -> Vec<Step> {
        let n = self.snap.hosts.len();
        let ns = self.shapes.len();
        let k = self.opts.candidates.max(1);
        let mut inv2sd = [0.0; STATS];
        for c in 0..STATS {
            inv2sd[c] = 1.0 / (2.0 * self.sd(self.s1[c], self.s2[c]).max(1e-6));
        }
        let mut found: Vec<(f64, usize, usize, f64, f64)> = Vec::new();
        let mut srcs: Vec<(f64, usize)> = Vec::new();
        let mut dsts: Vec<(f64, usize)> = Vec::new();
        for s in 0..ns {
            let (mem, cpus, disk) = self.shapes[s];
            let need = [cpus as i64, mem as i64, disk as i64];
            srcs.clear();
            dsts.clear();
            for h in 0..n {
                let d = hbal::vm_delta(
                    &self.totals[h],
                    mem,
                    disk,
                    cpus,
                    !self.snap.shared_storage,
                    self.opts.ignore_dynu,
                );
                if self.shape_count[h * ns + s] > 0 {
                    srcs.push((self.approx(h, &d, -1.0, &inv2sd), h));
                }
                if self.target_ok[h] && (0..3).all(|r| self.free[h][r] >= need[r]) {
                    dsts.push((self.approx(h, &d, 1.0, &inv2sd), h));
                }
            }
            smallest(&mut srcs, k);
            smallest(&mut dsts, k);
            for &(_, a) in &srcs {
                for &(_, b) in &dsts {
                    if a == b {
                        continue;
                    }
                    // Any VM of the shape on `a` gains the same; take the cheapest that may go.
                    let mut pick: Option<(usize, f64)> = None;
                    for &vm in &self.on_host[a] {
                        if self.shape[vm] != s || !self.fits(vm, b) {
                            continue;
                        }
                        if let Some(sec) = self.seconds(vm, b) {
                            if pick.is_none_or(|(_, p)| sec < p) {
                                pick = Some((vm, sec));
                            }
                        }
                    }
                    let Some((vm, sec)) = pick else { continue };
                    let gain = self.gain(vm, b);
                    if gain <= self.opts.min_gain || gain <= self.cost(sec) {
                        continue;
                    }
                    found.push((gain - self.cost(sec), vm, b, gain, sec));
                }
            }
        }
        let cmp = |x: &(f64, usize, usize, f64, f64), y: &(f64, usize, usize, f64, f64)| {
            y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2)))
        };
        if found.len() > m && m > 0 {
            found.select_nth_unstable_by(m - 1, cmp);
            found.truncate(m);
        }
        found.sort_by(cmp);
        found.dedup_by(|x, y| (x.1, x.2) == (y.1, y.2));
        found.into_iter().map(|(_, vm, b, g, s)| (vm, b, g, s)).collect()
    }
}

/// Keeps the `k` entries with the smallest first element (ties: smaller host), sorted.
fn smallest(v: &mut Vec<(f64, usize)>, k: usize) {
    let cmp = |x: &(f64, usize), y: &(f64, usize)| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1));
    if v.len() > k {
        v.select_nth_unstable_by(k - 1, cmp);
        v.truncate(k);
    }
    v.sort_by(cmp);
}

/// Assigns waves: after every earlier move touching the same hosts, at most `max` per wave.
fn assign_waves(snap: &Snapshot, moves: &mut [Move], max: usize) -> u32 {
    let idx = snap.host_index();
    let mut last = vec![0u32; snap.hosts.len()];
    let mut per_wave: Vec<usize> = Vec::new();
    for m in moves.iter_mut() {
        let (a, b) = (idx[m.from.as_str()], idx[m.to.as_str()]);
        let mut w = last[a].max(last[b]) + 1;
        while per_wave.get(w as usize).copied().unwrap_or(0) >= max.max(1) {
            w += 1;
        }
        if per_wave.len() <= w as usize {
            per_wave.resize(w as usize + 1, 0);
        }
        per_wave[w as usize] += 1;
        m.wave = w;
        last[a] = w;
        last[b] = w;
    }
    per_wave.len().saturating_sub(1) as u32
}

/// A planned move: (VM, target host, gain, predicted seconds).
type Step = (usize, usize, f64, f64);

/// Greedy single moves from `start` (hbal's algorithm) until none gains or `limit` is reached.
fn greedy_moves(start: &Balance, limit: Option<usize>) -> Vec<Step> {
    let mut b = start.clone();
    let mut out = Vec::new();
    while limit.is_none_or(|l| out.len() < l) {
        let Some(m) = b.best_move() else { break };
        b.do_move(m.0, m.1);
        if out.len() % 512 == 511 {
            b.resum();
        }
        out.push(m);
    }
    out
}

/// Predicted migration time of `vm` from host `a` to host `b`.
fn seconds_between(b: &Balance, vm: usize, from: usize, to: usize) -> Option<f64> {
    let v = &b.snap.vms[vm];
    let bw = [b.snap.hosts[from].migration_mib_s, b.snap.hosts[to].migration_mib_s]
        .into_iter()
        .flatten()
        .fold(b.opts.bandwidth_mib_s, f64::min);
    let rate = bw - v.dirty_mib_s.unwrap_or(0.0);
    if rate <= 0.0 {
        return None;
    }
    let disk = v.copied_disk_mib(b.snap.shared_storage);
    Some(v.memory_mib as f64 / rate + disk as f64 / bw)
}

/// The best placement found that moves at most the VMs `prefix` moves (as many or fewer), as a
/// sequence of one migration per moved VM in which every state is valid, with its score net
/// of cost; `None` when the moves cannot be ordered (a cycle of full hosts).
///
/// Local search from the state after `prefix`, keeping the number of moved VMs: a moved VM may
/// go to another host, or go home while one VM of another kind not yet moved takes its place;
/// a moved VM also goes home alone when that lowers the score. Greedy chooses each move for
/// the step it is in; this chooses the moves together, so the same score takes fewer moves.
fn refine(start: &Balance, prefix: &[Step]) -> Option<(f64, Vec<Step>)> {
    let orig = &start.vm_host;
    let mut b = start.clone();
    for &(vm, to, _, _) in prefix {
        b.do_move(vm, to);
    }
    b.resum();
    let n = b.snap.hosts.len();
    let cost_at = |b: &Balance, vm: usize, h: usize| -> Option<f64> {
        if h == orig[vm] {
            Some(0.0)
        } else {
            seconds_between(b, vm, orig[vm], h).map(|s| b.cost(s))
        }
    };
    for _pass in 0..64 {
        let mut improved = false;
        let mut moved: Vec<usize> = (0..orig.len()).filter(|&v| b.vm_host[v] != orig[v]).collect();
        moved.sort_unstable();
        for &v in &moved {
            let here = b.vm_host[v];
            if here == orig[v] {
                continue;
            }
            let home = orig[v];
            let c_here = cost_at(&b, v, here).unwrap_or(0.0);
            // Home alone, or to another host.
            let mut best: Option<(f64, usize)> = None;
            for c in 0..n {
                if c == here || !b.fits(v, c) {
                    continue;
                }
                let Some(cc) = cost_at(&b, v, c) else { continue };
                let net = b.gain(v, c) - (cc - c_here);
                if net > 1e-12 && best.is_none_or(|(g, _)| net > g) {
                    best = Some((net, c));
                }
            }
            if let Some((_, c)) = best {
                b.do_move(v, c);
                improved = true;
                continue;
            }
            // Home, while a VM of another kind that has not moved takes its place.
            if !b.fits(v, home) {
                continue;
            }
            let base = b.score();
            b.do_move(v, home);
            let mut best: Option<(f64, usize)> = None;
            for a in 0..n {
                if a == here {
                    continue;
                }
                for u in b.one_per_shape(a) {
                    if b.vm_host[u] != orig[u] || u == v || !b.fits(u, here) {
                        continue;
                    }
                    let Some(cu) = cost_at(&b, u, here) else { continue };
                    let net = base - (b.score() - b.gain(u, here)) - (cu - c_here);
                    if net > 1e-12 && best.is_none_or(|(g, _)| net > g) {
                        best = Some((net, u));
                    }
                }
            }
            match best {
                Some((_, u)) => {
                    b.do_move(u, here);
                    improved = true;
                }
                None => b.do_move(v, here),
            }
        }
        b.resum();
        if !improved {
            break;
        }
    }
    // One migration per moved VM, each time the one that gains most among those that fit.
    let mut pending: Vec<(usize, usize)> = (0..orig.len())
        .filter(|&v| b.vm_host[v] != orig[v])
        .map(|v| (v, b.vm_host[v]))
        .collect();
    let mut e = start.clone();
    e.target_ok = vec![true; n];
    let mut out = Vec::with_capacity(pending.len());
    let mut obj = 0.0;
    while !pending.is_empty() {
        let mut pick: Option<(f64, usize)> = None;
        for (i, &(vm, to)) in pending.iter().enumerate() {
            if !e.fits(vm, to) {
                continue;
            }
            let g = e.gain(vm, to);
            if pick.is_none_or(|(pg, _)| g > pg) {
                pick = Some((g, i));
            }
        }
        let (gain, i) = pick?;
        let (vm, to) = pending.remove(i);
        let sec = e.seconds(vm, to)?;
        obj -= gain - e.cost(sec);
        e.do_move(vm, to);
        out.push((vm, to, gain, sec));
    }
    Some((obj, out))
}

/// Plan quality (as few moves as reach greedy's score) up to this many hosts
/// that are up; its cost grows faster than greedy's, which plans larger clusters alone.
pub const QUALITY_MAX_HOSTS: usize = 50;

/// Plans migrations that lower the cluster score, each worth more than it costs.
///
/// Up to [`QUALITY_MAX_HOSTS`] hosts the moves up to where single moves stop are chosen
/// together, so greedy's (hbal's) score there is reached in fewer moves; beyond, and with
/// [`plan_greedy`], those moves are hbal's own, move for move.
pub fn plan(snap: &Snapshot, opts: &RebalanceOptions) -> Result<RebalancePlan, RebalanceError> {
    plan_with(snap, opts, QUALITY_MAX_HOSTS)
}

/// [`plan`] without plan quality: greedy best moves as hbal makes them, then exchanges.
pub fn plan_greedy(snap: &Snapshot, opts: &RebalanceOptions) -> Result<RebalancePlan, RebalanceError> {
    plan_with(snap, opts, 0)
}

fn plan_with(
    snap: &Snapshot,
    opts: &RebalanceOptions,
    quality_max_hosts: usize,
) -> Result<RebalancePlan, RebalanceError> {
    let mut b = Balance::new(snap, opts)?;
    let before = hbal::score(snap, opts.ignore_dynu);
    let mut moves = Vec::new();
    let mut offline_left = before.offline_pri_cnt;
    let mut record = |b: &mut Balance, vm: usize, to: usize, gain: f64, seconds: f64, moves: &mut Vec<Move>| {
        let from = b.vm_host[vm];
        if b.stats[from].is_none() {
            offline_left -= 1.0;
        }
        b.do_move(vm, to);
        if moves.len() % 512 == 511 {
            b.resum();
        }
        moves.push(Move {
            vm: snap.vms[vm].name.clone(),
            from: snap.hosts[from].name.clone(),
            to: snap.hosts[to].name.clone(),
            gain,
            seconds,
            score_after: b.score() + 20.0 * offline_left,
            wave: 0,
        });
    };
    // Moves up to hbal's stopping point (single moves only) are kept as planned (hbal's own
    // without plan quality, else the fewest moves found to reach the same score); what
    // follows is compressed.
    let mut first_phase: Option<usize> = None;
    let online = snap.hosts.iter().filter(|h| h.state == HostState::Up).count();
    if online <= quality_max_hosts {
        // Plan quality: where single moves stop (hbal's stopping point), as few moves as get
        // there. The fewest moved VMs whose refined placement scores as well is searched
        // downwards from the sequence's length.
        let seq = greedy_moves(&b, opts.max_moves);
        let target: f64 = seq.iter().map(|m| -(m.2 - b.cost(m.3))).sum();
        // Whether `k` moved VMs suffice: galloping down from the length, then bisection.
        let mut tried: HashMap<usize, Option<Vec<Step>>> = HashMap::new();
        let mut ok = |k: usize| -> bool {
            tried
                .entry(k)
                .or_insert_with(|| {
                    refine(&b, &seq[..k])
                        .filter(|(obj, _)| *obj <= target + 1e-12)
                        .map(|r| r.1)
                })
                .is_some()
        };
        let (mut lo, mut hi) = (0, seq.len());
        let mut step = 1;
        while hi > lo + 1 {
            let k = hi.saturating_sub(step).max(lo + 1);
            if ok(k) {
                hi = k;
                step *= 2;
            } else {
                lo = k;
                break;
            }
        }
        while hi > lo + 1 {
            let k = (lo + hi) / 2;
            if ok(k) {
                hi = k;
            } else {
                lo = k;
            }
        }
        let chosen = match tried.remove(&hi) {
            Some(Some(ms)) if ms.len() < seq.len() => ms,
            _ => seq,
        };
        for (vm, to, gain, seconds) in chosen {
            record(&mut b, vm, to, gain, seconds, &mut moves);
        }
    }
    let stopped = loop {
        if opts.max_moves.is_some_and(|m| moves.len() >= m) {
            break format!("reached the limit of {} moves", moves.len());
        }
        if let Some((vm, to, gain, seconds)) = b.best_move() {
            record(&mut b, vm, to, gain, seconds, &mut moves);
            continue;
        }
        // Past hbal's stopping point: exchanging two VMs finds gains no single move has.
        if opts.max_moves.is_some() {
            break "no move gains more than its cost".to_string();
        }
        if first_phase.is_none() {
            first_phase = Some(moves.len());
        }
        let Some((v1, v2, gain)) = b.best_swap() else {
            break "no move or exchange gains more than its cost".to_string();
        };
        let (h1, h2) = (b.vm_host[v1], b.vm_host[v2]);
        let (s1, s2) = (b.seconds(v1, h2).unwrap_or(0.0), b.seconds(v2, h1).unwrap_or(0.0));
        // Live migration needs room at every instant: first whichever fits.
        let ((x, xt, xs), (y, yt, ys)) = if b.fits(v1, h2) {
            ((v1, h2, s1), (v2, h1, s2))
        } else {
            ((v2, h1, s2), (v1, h2, s1))
        };
        let g1 = b.gain(x, xt);
        record(&mut b, x, xt, g1, xs, &mut moves);
        record(&mut b, y, yt, gain - g1, ys, &mut moves);
    };
    let mut moves = match first_phase {
        Some(k) if k < moves.len() => {
            let rest = moves.split_off(k);
            let mid = apply(snap, &moves);
            let rest = compress(&mid, &rest, opts).unwrap_or(rest);
            moves.extend(rest);
            moves
        }
        _ => moves,
    };
    let waves = assign_waves(snap, &mut moves, opts.max_concurrent);
    let after = hbal::score(&apply(snap, &moves), opts.ignore_dynu);
    Ok(RebalancePlan {
        before,
        after,
        moves,
        waves,
        stopped,
    })
}

/// One migration per VM that ends elsewhere (planning may move a VM twice, or back home),
/// from where it is to where its last move takes it, in order of first appearance wherever its
/// target has room. `None` when no such order exists (a cycle
/// of full hosts); the plan's own sequence is then kept.
fn compress(snap: &Snapshot, seq: &[Move], opts: &RebalanceOptions) -> Option<Vec<Move>> {
    let idx = snap.host_index();
    let vm_idx: HashMap<&str, usize> = snap.vms.iter().enumerate().map(|(i, v)| (v.name.as_str(), i)).collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut first: Vec<usize> = Vec::new();
    for m in seq {
        if last.insert(m.vm.as_str(), idx[m.to.as_str()]).is_none() {
            first.push(vm_idx[m.vm.as_str()]);
        }
    }
    let mut pending: Vec<(usize, usize)> = first
        .into_iter()
        .map(|vm| (vm, last[snap.vms[vm].name.as_str()]))
        .filter(|&(vm, to)| idx[snap.vms[vm].host.as_str()] != to)
        .collect();
    let mut b = Balance::new(snap, opts).ok()?;
    // Targets were chosen in planning; here only capacity and anti-affinity matter.
    b.target_ok = vec![true; snap.hosts.len()];
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let i = pending.iter().position(|&(vm, to)| b.fits(vm, to))?;
        let (vm, to) = pending.remove(i);
        let from = b.vm_host[vm];
        let gain = b.gain(vm, to);
        let seconds = b.seconds(vm, to).unwrap_or(0.0);
        b.do_move(vm, to);
        out.push(Move {
            vm: snap.vms[vm].name.clone(),
            from: snap.hosts[from].name.clone(),
            to: snap.hosts[to].name.clone(),
            gain,
            seconds,
            score_after: b.score(),
            wave: 0,
        });
    }
    Some(out)
}

/// Plans moving every VM off `host` (which takes nothing new meanwhile), each to the host that
/// leaves the cluster best balanced. Fails, naming the VM, when one fits nowhere.
pub fn drain(snap: &Snapshot, host: &str, opts: &RebalanceOptions) -> Result<RebalancePlan, RebalanceError> {
    let h = *snap
        .host_index()
        .get(host)
        .ok_or_else(|| RebalanceError::UnknownHost(host.to_string()))?;
    let mut marked = snap.clone();
    if marked.hosts[h].state == HostState::Up {
        marked.hosts[h].state = HostState::Draining;
    }
    let mut b = Balance::new(&marked, opts)?;
    let before = hbal::score(&marked, opts.ignore_dynu);
    let mut vms = b.on_host[h].clone();
    // Largest first: they have the fewest places to go.
    vms.sort_by(|&x, &y| {
        let (vx, vy) = (&marked.vms[x], &marked.vms[y]);
        vy.memory_mib
            .cmp(&vx.memory_mib)
            .then(vy.cpus.cmp(&vx.cpus))
            .then(vx.name.cmp(&vy.name))
    });
    let mut moves = Vec::new();
    for vm in vms {
        let mut best: Option<(usize, f64)> = None;
        for t in 0..marked.hosts.len() {
            if !b.fits(vm, t) || b.seconds(vm, t).is_none() {
                continue;
            }
            let g = b.gain(vm, t);
            if best.is_none_or(|(_, bg)| g > bg) {
                best = Some((t, g));
            }
        }
        let Some((to, gain)) = best else {
            let v = &marked.vms[vm];
            let why = if v.anti_affinity.is_some() {
                format!(
                    " without breaking its cluster's anti-affinity by {}",
                    v.anti_affinity.as_deref().unwrap_or("")
                )
            } else {
                String::new()
            };
            return Err(RebalanceError::NoRoom {
                host: host.to_string(),
                vm: v.name.clone(),
                cpus: v.cpus,
                memory_mib: v.memory_mib,
                why,
            });
        };
        let seconds = b.seconds(vm, to).unwrap_or(0.0);
        b.do_move(vm, to);
        moves.push(Move {
            vm: marked.vms[vm].name.clone(),
            from: host.to_string(),
            to: marked.hosts[to].name.clone(),
            gain,
            seconds,
            score_after: b.score(),
            wave: 0,
        });
    }
    let waves = assign_waves(&marked, &mut moves, opts.max_concurrent);
    let after = hbal::score(&apply(&marked, &moves), opts.ignore_dynu);
    Ok(RebalancePlan {
        before,
        after,
        moves,
        waves,
        stopped: format!("host {host} is empty"),
    })
}

/// The snapshot after the moves, in order (moves of unknown VMs are skipped).
pub fn apply(snap: &Snapshot, moves: &[Move]) -> Snapshot {
    let mut out = snap.clone();
    let idx: HashMap<String, usize> = out.vms.iter().enumerate().map(|(i, v)| (v.name.clone(), i)).collect();
    for m in moves {
        if let Some(&i) = idx.get(&m.vm) {
            out.vms[i].host = m.to.clone();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Host, Vm};
    use proptest::prelude::*;

    fn vm(name: &str, host: &str, cpus: u32, mem: u64) -> Vm {
        Vm {
            name: name.into(),
            cluster: String::new(),
            host: host.into(),
            cpus,
            memory_mib: mem,
            disk_mib: 0,
            template: None,
            dirty_mib_s: None,
            overlay_mib: 0,
            anti_affinity: None,
        }
    }

    fn lopsided() -> Snapshot {
        let mut s = Snapshot {
            hosts: (0..4).map(|i| Host::new(format!("h{i}"), 16, 32768, 0)).collect(),
            shared_storage: true,
            ..Default::default()
        };
        for i in 0..8 {
            s.vms.push(vm(&format!("v{i}"), "h0", 2, 4096));
        }
        s
    }

    /// Every host within capacity and every anti-affinity rule kept.
    fn valid(s: &Snapshot) -> Result<(), String> {
        for (h, u) in s.hosts.iter().zip(s.usage()) {
            let c = h.capacity();
            if u[0] > c[0] || u[1] > c[1] {
                return Err(format!("{} overcommitted: {u:?} of {c:?}", h.name));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for v in &s.vms {
            if let Some(k) = &v.anti_affinity {
                let host = s.hosts.iter().find(|h| h.name == v.host).unwrap();
                if !seen.insert((v.cluster.clone(), host.domain(k).unwrap().to_string())) {
                    return Err(format!("{} breaks anti-affinity by {k}", v.name));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn spreads_a_loaded_host_and_lowers_the_score() {
        let s = lopsided();
        let p = plan(&s, &RebalanceOptions::default()).unwrap();
        assert!(p.after.total < p.before.total / 10.0, "{p:?}");
        let after = apply(&s, &p.moves);
        for h in &s.hosts {
            assert_eq!(after.vms.iter().filter(|v| v.host == h.name).count(), 2, "{p:?}");
        }
        assert_eq!(p.moves.len(), 6);
        // No host is in two migrations of one wave, and a wave holds at most 4.
        for w in 1..=p.waves {
            let m: Vec<&Move> = p.moves.iter().filter(|m| m.wave == w).collect();
            assert!(m.len() <= 4);
            let mut hosts = std::collections::HashSet::new();
            for x in m {
                assert!(hosts.insert(&x.from) && hosts.insert(&x.to), "{p:?}");
            }
        }
    }

    #[test]
    fn costly_migrations_are_not_worth_it() {
        let mut s = lopsided();
        for v in &mut s.vms {
            v.dirty_mib_s = Some(2000.0); // faster than the link: pre-copy never converges
        }
        assert!(plan(&s, &RebalanceOptions::default()).unwrap().moves.is_empty());
        let opts = RebalanceOptions {
            cost_per_second: 100.0,
            ..Default::default()
        };
        assert!(plan(&lopsided(), &opts).unwrap().moves.is_empty());
        let opts = RebalanceOptions {
            max_moves: Some(2),
            ..Default::default()
        };
        assert_eq!(plan(&lopsided(), &opts).unwrap().moves.len(), 2);
    }

    /// Without shared storage a move also copies the VM's own disk blocks: of VMs alike but for
    /// their overlays, the plan moves those with the least to copy, and prices them so.
    #[test]
    fn moves_copy_the_overlay_too_and_prefer_the_small_ones() {
        let mut s = lopsided();
        s.shared_storage = false;
        for (i, v) in s.vms.iter_mut().enumerate() {
            v.overlay_mib = if i % 2 == 0 { 40_000 } else { 10 };
        }
        let opts = RebalanceOptions {
            max_moves: Some(3),
            ..Default::default()
        };
        let p = plan(&s, &opts).unwrap();
        assert_eq!(p.moves.len(), 3, "{p:?}");
        for m in &p.moves {
            let v: usize = m.vm[1..].parse().unwrap();
            assert_eq!(v % 2, 1, "moved a VM with a 40 GB overlay: {m:?}");
            // 4096 MiB of memory and 10 MiB of disk at 1250 MiB/s.
            assert!((m.seconds - 4106.0 / 1250.0).abs() < 1e-9, "{m:?}");
        }
        assert_eq!(s.vms[0].copied_disk_mib(false), 40_000);
        assert_eq!(s.vms[0].copied_disk_mib(true), 0);
    }

    #[test]
    fn drain_empties_the_host_or_names_the_vm_that_fits_nowhere() {
        let mut s = lopsided();
        s.vms.push(vm("big", "h1", 8, 30000));
        let p = drain(&s, "h0", &RebalanceOptions::default()).unwrap();
        assert_eq!(p.moves.len(), 8);
        let after = apply(&s, &p.moves);
        assert!(after.vms.iter().all(|v| v.host != "h0"));
        assert!(
            after.vms.iter().all(|v| v.name == "big" || v.host != "h1"),
            "the full host takes nothing"
        );
        valid(&after).unwrap();
        s.hosts[2].state = HostState::Maintenance;
        s.hosts[3].state = HostState::Down;
        let e = drain(&s, "h1", &RebalanceOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot drain host \"h1\": VM \"big\" (8 vCPU, 30000 MiB) fits on no other host that is up"
        );
        assert_eq!(
            drain(&s, "nope", &RebalanceOptions::default()).unwrap_err(),
            RebalanceError::UnknownHost("nope".into())
        );
    }

    fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
        (
            2usize..10,
            prop::collection::vec((0usize..10, 1u32..6, 1u64..9, 0u8..4), 1..40),
        )
            .prop_map(|(n, vms)| {
                let mut s = Snapshot {
                    hosts: (0..n)
                        .map(|i| {
                            let mut h = Host::new(
                                format!("h{i}"),
                                8 + 4 * (i as u32 % 3),
                                16384 + 8192 * (i as u64 % 2),
                                0,
                            );
                            h.cpu_overcommit = 2.0;
                            h.labels.insert("zone".into(), format!("z{}", i % 3));
                            h
                        })
                        .collect(),
                    shared_storage: true,
                    ..Default::default()
                };
                let mut used = vec![[0u64; 2]; n];
                for (i, (h, c, m, cl)) in vms.into_iter().enumerate() {
                    let h = h % n;
                    let cap = s.hosts[h].capacity();
                    let mem = m * 1024;
                    if used[h][0] + c as u64 > cap[0] || used[h][1] + mem > cap[1] {
                        continue;
                    }
                    let mut v = vm(&format!("v{i}"), &format!("h{h}"), c, mem);
                    if cl == 0 {
                        v.cluster = "spread".into();
                        v.anti_affinity = Some("host".into());
                        if s.vms.iter().any(|o| o.cluster == "spread" && o.host == v.host) {
                            continue;
                        }
                    }
                    used[h][0] += c as u64;
                    used[h][1] += mem;
                    s.vms.push(v);
                }
                s
            })
    }

    proptest! {
        #[test]
        fn plans_keep_every_rule_are_deterministic_and_idempotent(s in arb_snapshot(), dynu in any::<bool>()) {
            let opts = RebalanceOptions { ignore_dynu: dynu, ..Default::default() };
            let p = plan(&s, &opts).unwrap();
            prop_assert_eq!(&p, &plan(&s, &opts).unwrap(), "deterministic");
            prop_assert!(p.after.total <= p.before.total + 1e-9, "{:?}", p);
            // Every intermediate state is valid, not only the last one.
            for k in 0..=p.moves.len() {
                if let Err(e) = valid(&apply(&s, &p.moves[..k])) {
                    return Err(TestCaseError::fail(format!("after {k} moves: {e}")));
                }
            }
            // Plan quality: greedy's (hbal's) score where single moves stop, in no more moves.
            let any_gain = RebalanceOptions { cost_per_second: 0.0, ..opts.clone() };
            let b = Balance::new(&s, &any_gain).unwrap();
            let seq = greedy_moves(&b, None);
            if !seq.is_empty() {
                let target = b.score() - seq.iter().map(|m| m.2).sum::<f64>();
                let q = plan(&s, &any_gain).unwrap();
                // Scores are sums of standard deviations: a variance that should be 0 and is off
                // by 1e-16 reads 1e-8 after the square root, so "reached" allows 1e-6.
                let reach = q.moves.iter().position(|m| m.score_after <= target + 1e-6).map_or(usize::MAX, |k| k + 1);
                prop_assert!(
                    reach <= seq.len(),
                    "{} moves to reach greedy's {:e} in {}: {:?}",
                    reach,
                    target,
                    seq.len(),
                    q.moves.iter().map(|m| m.score_after).collect::<Vec<_>>()
                );
            }
            let g = plan_greedy(&s, &opts).unwrap();
            prop_assert!(g.after.total <= g.before.total + 1e-9);
            let after = apply(&s, &p.moves);
            let again = plan(&after, &opts).unwrap();
            prop_assert!(again.moves.is_empty(), "applied twice: {:?}", again.moves);
            for h in &s.hosts {
                if let Ok(d) = drain(&s, &h.name, &opts) {
                    let drained = apply(&s, &d.moves);
                    prop_assert!(drained.vms.iter().all(|v| v.host != h.name));
                    if let Err(e) = valid(&drained) {
                        return Err(TestCaseError::fail(format!("drain {}: {e}", h.name)));
                    }
                    prop_assert!(drain(&drained, &h.name, &opts).unwrap().moves.is_empty());
                }
            }
        }
    }
}
