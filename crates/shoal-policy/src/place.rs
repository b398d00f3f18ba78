//! Gang placement: filter → score → pick, one VM after another, for all VMs of a request or
//! none.
//!
//! A [`Placer`] holds the free capacity of every host in a tree indexed by position (hosts
//! ordered largest first), each node keeping the largest free vCPU, memory and disk and the
//! largest free share below it. Finding hosts that fit is then a walk that skips every subtree
//! too full for the VM, so one placement costs O(k log hosts) rather than a scan:
//!
//! - *pack* takes the first `k` hosts that pass every filter in position order (first fit over
//!   large hosts first, which fills hosts before opening new ones);
//! - *spread* takes the `k` hosts with the largest free share (best first over the tree);
//! - hosts holding most of the template's image and, with soft affinity, hosts already holding
//!   the cluster's VMs join the candidates;
//!
//! then every candidate is scored in full and the best wins, ties going to the earlier position.
//! Like Nomad's limited candidate iterator and Kubernetes' `percentageOfNodesToScore`, only `k`
//! hosts are scored; with at most [`EXHAUSTIVE_HOSTS`] hosts every host is a candidate, so the
//! pick is the exact best. Explanations use the very same pick, and add every host's verdict.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};
use shoal_model::Placement;
use thiserror::Error;

use crate::filter::{capacity_filter, state_accepts, static_filter, GangRequest, Reject};
use crate::score::{free_share, score, Facts, ScoreBreakdown};
use crate::snapshot::Snapshot;

/// Up to this many hosts, every host that passes the filters is scored.
pub const EXHAUSTIVE_HOSTS: usize = 256;
/// Hosts scored per VM on larger snapshots, besides locality and affinity candidates.
pub const DEFAULT_CANDIDATES: usize = 8;
/// Hosts with most of the template cached that join the candidates.
const LOCALITY_CANDIDATES: usize = 8;

/// Why a gang does not fit, naming the binding constraint.
#[derive(Clone, Debug, Error, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum PlacementError {
    #[error("no host is up{}", states_suffix(.states))]
    NoHostUp { states: String },
    #[error("no host passes the filters: {rejected}")]
    NoHostMatches { rejected: String },
    #[error("needs {missing} vCPU more than free on {hosts} hosts ({free} free, {needed} needed)")]
    Cpu {
        missing: u64,
        free: u64,
        needed: u64,
        hosts: usize,
    },
    #[error("needs {missing} MiB of memory more than free on {hosts} hosts ({free} MiB free, {needed} MiB needed)")]
    Memory {
        missing: u64,
        free: u64,
        needed: u64,
        hosts: usize,
    },
    #[error("needs {missing} MiB of disk more than free on {hosts} hosts ({free} MiB free, {needed} MiB needed)")]
    Disk {
        missing: u64,
        free: u64,
        needed: u64,
        hosts: usize,
    },
    #[error("one VM needs {cpus} vCPU and {memory_mib} MiB, more than any single up host has in total")]
    VmTooLarge { cpus: u32, memory_mib: u64 },
    #[error(
        "anti-affinity by {domain}: needs {needed} {domain}s with room for one VM ({cpus} vCPU, {memory_mib} MiB) and no VM of the cluster, only {available} have"
    )]
    AntiAffinity {
        domain: String,
        needed: u32,
        available: u32,
        cpus: u32,
        memory_mib: u64,
    },
    #[error(
        "affinity by {domain}: no {domain} has room for all {needed} VMs ({cpus} vCPU, {memory_mib} MiB each); at most {best} fit in one"
    )]
    Affinity {
        domain: String,
        needed: u32,
        best: u64,
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

fn states_suffix(states: &str) -> String {
    if states.is_empty() {
        String::new()
    } else {
        format!(" ({states})")
    }
}

/// One VM of a gang and where it goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Assignment {
    /// Position of the VM within the request, from 0.
    pub vm: u32,
    pub host: String,
    pub score: ScoreBreakdown,
}

/// How VMs are counted per failure domain for one rule of one request.
struct DomainCounts {
    key: String,
    counts: HashMap<String, u32>,
    total: u32,
}

/// Per-request state while a gang is being placed.
struct Ctx {
    need: [u64; 3],
    anti: Option<DomainCounts>,
    affinity: Option<(String, String)>,
    soft_anti: Option<DomainCounts>,
    soft_aff: Option<DomainCounts>,
    locality: Option<Vec<f64>>,
    locality_top: Vec<usize>,
}

/// Placement state over one snapshot: free capacity per host, indexed for fast searches.
/// Successful [`Placer::place`] calls commit, so a sequence of requests sees earlier ones.
pub struct Placer<'s> {
    snap: &'s Snapshot,
    cap: Vec<[u64; 3]>,
    free: Vec<[i64; 3]>,
    order: Vec<usize>,
    pos: Vec<usize>,
    leaves: usize,
    /// Capacity relative to the largest host's, 0..=1.
    size: Vec<f64>,
    mx: Vec<[i64; 3]>,
    share: Vec<f64>,
    clusters: HashMap<String, HashMap<usize, u32>>,
    /// Hosts scored per VM on snapshots larger than [`EXHAUSTIVE_HOSTS`].
    pub candidates: usize,
}

const NONE: i64 = i64::MIN / 4;

impl<'s> Placer<'s> {
    /// Placement state with usage summed from the snapshot's VMs.
    pub fn new(snap: &'s Snapshot) -> Placer<'s> {
        Placer::with_usage(snap, &snap.usage())
    }

    /// Placement state with usage given per host (`[vCPU, memory MiB, disk MiB]`), e.g. from
    /// the controller's claims; the snapshot's VMs then only count for (anti-)affinity.
    pub fn with_usage(snap: &'s Snapshot, usage: &[[u64; 3]]) -> Placer<'s> {
        let n = snap.hosts.len();
        let cap: Vec<[u64; 3]> = snap
            .hosts
            .iter()
            .map(|h| {
                let mut c = h.capacity();
                if snap.shared_storage {
                    c[2] = 0;
                }
                c
            })
            .collect();
        let free: Vec<[i64; 3]> = (0..n)
            .map(|i| {
                let u = usage.get(i).copied().unwrap_or_default();
                [
                    cap[i][0] as i64 - u[0] as i64,
                    cap[i][1] as i64 - u[1] as i64,
                    cap[i][2] as i64 - u[2] as i64,
                ]
            })
            .collect();
        // Largest hosts first: packing fills them before opening smaller ones.
        let maxc = (0..3).map(|r| cap.iter().map(|c| c[r]).max().unwrap_or(0).max(1) as f64);
        let maxc: Vec<f64> = maxc.collect();
        let size = |i: usize| -> f64 { (0..3).map(|r| cap[i][r] as f64 / maxc[r]).sum() };
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| size(b).total_cmp(&size(a)).then(a.cmp(&b)));
        let largest = order.first().map_or(1.0, |&h| size(h)).max(f64::MIN_POSITIVE);
        let sizes: Vec<f64> = (0..n).map(|h| size(h) / largest).collect();
        let mut pos = vec![0; n];
        for (p, &h) in order.iter().enumerate() {
            pos[h] = p;
        }
        let idx = snap.host_index();
        let mut clusters: HashMap<String, HashMap<usize, u32>> = HashMap::new();
        for v in &snap.vms {
            if let Some(&h) = idx.get(v.host.as_str()) {
                *clusters.entry(v.cluster.clone()).or_default().entry(h).or_default() += 1;
            }
        }
        let leaves = n.next_power_of_two().max(1);
        let mut p = Placer {
            snap,
            cap,
            free,
            order,
            pos,
            leaves,
            size: sizes,
            mx: vec![[NONE; 3]; 2 * leaves],
            share: vec![f64::NEG_INFINITY; 2 * leaves],
            clusters,
            candidates: DEFAULT_CANDIDATES,
        };
        for h in 0..n {
            p.set_leaf(h);
        }
        for i in (1..leaves).rev() {
            p.pull(i);
        }
        p
    }

    /// The snapshot this state started from.
    pub fn snapshot(&self) -> &'s Snapshot {
        self.snap
    }

    /// Free `[vCPU, memory MiB, disk MiB]` of host `h` (negative when overcommitted).
    pub fn free(&self, h: usize) -> [i64; 3] {
        self.free[h]
    }

    /// Places the gang and commits it: the index (into the snapshot's hosts) of each VM's
    /// host, or why the whole gang does not fit (then nothing changes).
    pub fn place(&mut self, req: &GangRequest) -> Result<Vec<usize>, PlacementError> {
        let plan = self.run(req, true, false)?;
        Ok(plan.into_iter().map(|(h, _)| h).collect())
    }

    /// Plans the gang without committing it, with each pick's score breakdown.
    pub fn plan(&mut self, req: &GangRequest) -> Result<Vec<Assignment>, PlacementError> {
        let plan = self.run(req, false, true)?;
        Ok(self.assignments(plan))
    }

    fn assignments(&self, plan: Vec<(usize, ScoreBreakdown)>) -> Vec<Assignment> {
        plan.into_iter()
            .enumerate()
            .map(|(i, (h, score))| Assignment {
                vm: i as u32,
                host: self.snap.hosts[h].name.clone(),
                score,
            })
            .collect()
    }

    /// Every host's verdict for the request's first VM (the filter that rejects it, or its
    /// score) and the plan for the whole gang. Commits nothing.
    pub fn explain(&mut self, req: &GangRequest) -> crate::explain::Explanation {
        let mut ctx = self.context(req);
        let mut hosts = Vec::with_capacity(self.snap.hosts.len());
        if let Err(e) = self.fix_affinity(req, &mut ctx) {
            let plan = Err(e);
            for h in 0..self.snap.hosts.len() {
                hosts.push(crate::explain::HostVerdict {
                    host: self.snap.hosts[h].name.clone(),
                    rejected: self.filter(req, &ctx, h),
                    score: None,
                    vms: 0,
                });
            }
            return crate::explain::Explanation::new(req.clone(), hosts, plan);
        }
        for h in 0..self.snap.hosts.len() {
            let rejected = self.filter(req, &ctx, h);
            let score = rejected.is_none().then(|| self.score(req, &ctx, h));
            hosts.push(crate::explain::HostVerdict {
                host: self.snap.hosts[h].name.clone(),
                rejected,
                score,
                vms: 0,
            });
        }
        let plan = self.run(req, false, true).map(|p| self.assignments(p));
        if let Ok(p) = &plan {
            let idx = self.snap.host_index();
            for a in p {
                hosts[idx[a.host.as_str()]].vms += 1;
            }
        }
        crate::explain::Explanation::new(req.clone(), hosts, plan)
    }

    fn run(
        &mut self,
        req: &GangRequest,
        commit: bool,
        scores: bool,
    ) -> Result<Vec<(usize, ScoreBreakdown)>, PlacementError> {
        if req.count == 0 {
            return Ok(Vec::new());
        }
        let mut ctx = self.context(req);
        self.fix_affinity(req, &mut ctx)?;
        let mut out: Vec<(usize, ScoreBreakdown)> = Vec::with_capacity(req.count as usize);
        let mut cands = Vec::new();
        for _ in 0..req.count {
            self.candidates_for(req, &ctx, &mut cands);
            let mut best: Option<(usize, ScoreBreakdown)> = None;
            for &h in &cands {
                let s = self.score(req, &ctx, h);
                let better = match &best {
                    None => true,
                    Some((b, bs)) => match s.total.total_cmp(&bs.total) {
                        Ordering::Greater => true,
                        Ordering::Equal => self.pos[h] < self.pos[*b],
                        Ordering::Less => false,
                    },
                };
                if better {
                    best = Some((h, s));
                }
            }
            let Some((h, s)) = best else {
                let placed = out.len() as u32;
                for &(h, _) in out.iter().rev() {
                    self.unapply(req, &mut ctx, h);
                }
                return Err(self.diagnose(req, placed));
            };
            self.apply(req, &mut ctx, h);
            out.push((h, if scores { s } else { ScoreBreakdown::default() }));
        }
        if !commit {
            for &(h, _) in out.iter().rev() {
                self.unapply(req, &mut ctx, h);
            }
        }
        Ok(out)
    }

    fn context(&self, req: &GangRequest) -> Ctx {
        let need = [
            req.cpus as u64,
            req.memory_mib,
            if self.snap.shared_storage { 0 } else { req.disk_mib },
        ];
        let counts = |key: &Option<String>| {
            key.as_ref().map(|key| {
                let mut counts: HashMap<String, u32> = HashMap::new();
                let mut total = 0;
                if let Some(m) = self.clusters.get(&req.cluster) {
                    for (&h, &c) in m {
                        if let Some(v) = self.snap.hosts[h].domain(key) {
                            *counts.entry(v.to_string()).or_default() += c;
                        }
                        total += c;
                    }
                }
                DomainCounts {
                    key: key.clone(),
                    counts,
                    total,
                }
            })
        };
        let (locality, locality_top) = match req.template.as_ref().and_then(|t| self.snap.image_locality.get(t)) {
            Some(m) if !m.is_empty() => {
                let idx = self.snap.host_index();
                let mut v = vec![0.0; self.snap.hosts.len()];
                let mut top: Vec<usize> = Vec::new();
                for (name, &f) in m {
                    if let Some(&h) = idx.get(name.as_str()) {
                        v[h] = f.clamp(0.0, 1.0);
                        top.push(h);
                    }
                }
                top.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
                top.truncate(LOCALITY_CANDIDATES);
                (Some(v), top)
            }
            _ => (None, Vec::new()),
        };
        Ctx {
            need,
            anti: counts(&req.rules.anti_affinity),
            affinity: None,
            soft_anti: counts(&req.rules.soft_anti_affinity),
            soft_aff: counts(&req.rules.soft_affinity),
            locality,
            locality_top,
        }
    }

    /// With hard affinity, decides the one domain the whole cluster goes to: where its VMs
    /// already are, else the domain that fits the gang best (pack: least room, spread: most).
    fn fix_affinity(&self, req: &GangRequest, ctx: &mut Ctx) -> Result<(), PlacementError> {
        let Some(key) = &req.rules.affinity else {
            return Ok(());
        };
        if let Some(m) = self.clusters.get(&req.cluster) {
            let mut hosts: Vec<(&usize, &u32)> = m.iter().collect();
            hosts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            if let Some(v) = hosts.first().and_then(|(&h, _)| self.snap.hosts[h].domain(key)) {
                ctx.affinity = Some((key.clone(), v.to_string()));
                return Ok(());
            }
        }
        let per_host_cap = |h: usize| -> u64 {
            let f = self.free[h];
            let mut n = u64::MAX;
            for (free, need) in f.iter().zip(ctx.need) {
                if let Some(k) = (free.max(&0).unsigned_abs()).checked_div(need) {
                    n = n.min(k);
                }
            }
            if req.rules.anti_affinity.as_deref() == Some("host") {
                n = n.min(1);
            }
            n
        };
        let mut room: Vec<(String, u64, usize)> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for &h in &self.order {
            let host = &self.snap.hosts[h];
            if static_filter(host, req).is_some() {
                continue;
            }
            let Some(v) = host.domain(key) else { continue };
            let i = *seen.entry(v.to_string()).or_insert_with(|| {
                room.push((v.to_string(), 0, room.len()));
                room.len() - 1
            });
            room[i].1 = room[i].1.saturating_add(per_host_cap(h));
        }
        let fitting = room.iter().filter(|r| r.1 >= req.count as u64);
        let pick = match req.placement {
            Placement::Pack => fitting.min_by(|a, b| a.1.cmp(&b.1).then(a.2.cmp(&b.2))),
            Placement::Spread => fitting.max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2))),
        };
        match pick {
            Some((v, _, _)) => {
                ctx.affinity = Some((key.clone(), v.clone()));
                Ok(())
            }
            None if room.is_empty() => Err(self.diagnose(req, 0)),
            None => Err(PlacementError::Affinity {
                domain: key.clone(),
                needed: req.count,
                best: room.iter().map(|r| r.1).max().unwrap_or(0),
                cpus: req.cpus,
                memory_mib: req.memory_mib,
            }),
        }
    }

    /// Every rule for one more VM of the request on host `h`.
    fn filter(&self, req: &GangRequest, ctx: &Ctx, h: usize) -> Option<Reject> {
        let host = &self.snap.hosts[h];
        if let Some(r) = static_filter(host, req) {
            return Some(r);
        }
        if let Some(r) = capacity_filter(self.free[h], ctx.need) {
            return Some(r);
        }
        if let Some(d) = &ctx.anti {
            match host.domain(&d.key) {
                None => {
                    return Some(Reject::Label {
                        key: d.key.clone(),
                        want: "any value".into(),
                        have: None,
                    })
                }
                Some(v) => {
                    let vms = d.counts.get(v).copied().unwrap_or(0);
                    if vms > 0 {
                        return Some(Reject::AntiAffinity {
                            domain: d.key.clone(),
                            value: v.to_string(),
                            vms,
                        });
                    }
                }
            }
        }
        if let Some((key, want)) = &ctx.affinity {
            let have = host.domain(key);
            if have != Some(want.as_str()) {
                return Some(Reject::Affinity {
                    domain: key.clone(),
                    want: want.clone(),
                    have: have.map(str::to_string),
                });
            }
        }
        None
    }

    fn score(&self, req: &GangRequest, ctx: &Ctx, h: usize) -> ScoreBreakdown {
        let host = &self.snap.hosts[h];
        let share = |d: &DomainCounts| -> Option<f64> {
            if d.total == 0 {
                return None;
            }
            let c = host.domain(&d.key).and_then(|v| d.counts.get(v)).copied().unwrap_or(0);
            Some(c as f64 / d.total as f64)
        };
        let terms: Vec<f64> = [
            ctx.soft_aff.as_ref().map(|d| share(d).unwrap_or(1.0)),
            ctx.soft_anti.as_ref().map(|d| 1.0 - share(d).unwrap_or(0.0)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let affinity = if terms.is_empty() {
            1.0
        } else {
            terms.iter().sum::<f64>() / terms.len() as f64
        };
        score(
            req.placement,
            &req.weights,
            &Facts {
                cap: self.cap[h],
                size: self.size[h],
                free: self.free[h],
                need: ctx.need,
                state: host.state,
                locality: ctx.locality.as_ref().map_or(0.0, |l| l[h]),
                affinity,
            },
        )
    }

    /// Hosts to score for one more VM, each passing every filter, without duplicates.
    fn candidates_for(&self, req: &GangRequest, ctx: &Ctx, out: &mut Vec<usize>) {
        out.clear();
        let n = self.snap.hosts.len();
        if n <= EXHAUSTIVE_HOSTS {
            out.extend(
                self.order
                    .iter()
                    .copied()
                    .filter(|&h| self.filter(req, ctx, h).is_none()),
            );
            return;
        }
        let k = self.candidates.max(1);
        match req.placement {
            Placement::Pack => self.first_fit(req, ctx, k, out),
            Placement::Spread => self.most_free(req, ctx, k, out),
        }
        let extra = ctx.locality_top.iter().copied().chain(
            ctx.soft_aff
                .as_ref()
                .and_then(|_| self.clusters.get(&req.cluster))
                .into_iter()
                .flat_map(|m| m.keys().copied()),
        );
        for h in extra {
            if !out.contains(&h) && self.filter(req, ctx, h).is_none() {
                out.push(h);
            }
        }
    }

    fn fits_node(&self, node: usize, need: [u64; 3]) -> bool {
        let m = self.mx[node];
        m[0] >= need[0] as i64 && m[1] >= need[1] as i64 && m[2] >= need[2] as i64
    }

    /// The first `k` hosts in position order that pass every filter.
    fn first_fit(&self, req: &GangRequest, ctx: &Ctx, k: usize, out: &mut Vec<usize>) {
        let mut stack = vec![1usize];
        while let Some(node) = stack.pop() {
            if !self.fits_node(node, ctx.need) {
                continue;
            }
            if node >= self.leaves {
                let h = self.order[node - self.leaves];
                if self.filter(req, ctx, h).is_none() {
                    out.push(h);
                    if out.len() >= k {
                        return;
                    }
                }
            } else {
                stack.push(2 * node + 1);
                stack.push(2 * node);
            }
        }
    }

    /// The `k` hosts with the largest free share that pass every filter.
    fn most_free(&self, req: &GangRequest, ctx: &Ctx, k: usize, out: &mut Vec<usize>) {
        /// (share, leftmost leaf below the node, node): largest share first; among equal
        /// shares the leftmost leaf, and the deeper node, so that ties descend one path.
        #[derive(PartialEq)]
        struct Item(f64, usize, usize);
        impl Eq for Item {}
        impl PartialOrd for Item {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Item {
            fn cmp(&self, o: &Self) -> Ordering {
                self.0.total_cmp(&o.0).then(o.1.cmp(&self.1)).then(self.2.cmp(&o.2))
            }
        }
        let leftmost = |mut i: usize| {
            while i < self.leaves {
                i *= 2;
            }
            i
        };
        let mut heap = BinaryHeap::new();
        heap.push(Item(self.share[1], leftmost(1), 1));
        while let Some(Item(_, _, node)) = heap.pop() {
            if !self.fits_node(node, ctx.need) {
                continue;
            }
            if node >= self.leaves {
                let h = self.order[node - self.leaves];
                if self.filter(req, ctx, h).is_none() {
                    out.push(h);
                    if out.len() >= k {
                        return;
                    }
                }
            } else {
                for c in [2 * node, 2 * node + 1] {
                    heap.push(Item(self.share[c], leftmost(c), c));
                }
            }
        }
    }

    fn set_leaf(&mut self, h: usize) {
        let node = self.leaves + self.pos[h];
        let host = &self.snap.hosts[h];
        // Hosts that never take VMs in their state stay out of every search; powered-off hosts
        // stay in, and the state filter decides per request.
        if state_accepts(host.state, true) {
            self.mx[node] = self.free[h];
            self.share[node] = free_share(self.cap[h], self.free[h]);
        } else {
            self.mx[node] = [NONE; 3];
            self.share[node] = f64::NEG_INFINITY;
        }
    }

    fn pull(&mut self, i: usize) {
        let (a, b) = (self.mx[2 * i], self.mx[2 * i + 1]);
        self.mx[i] = [a[0].max(b[0]), a[1].max(b[1]), a[2].max(b[2])];
        self.share[i] = self.share[2 * i].max(self.share[2 * i + 1]);
    }

    fn update(&mut self, h: usize) {
        self.set_leaf(h);
        let mut i = (self.leaves + self.pos[h]) / 2;
        while i >= 1 {
            self.pull(i);
            i /= 2;
        }
    }

    fn apply(&mut self, req: &GangRequest, ctx: &mut Ctx, h: usize) {
        self.change(req, ctx, h, 1);
    }

    fn unapply(&mut self, req: &GangRequest, ctx: &mut Ctx, h: usize) {
        self.change(req, ctx, h, -1);
    }

    fn change(&mut self, req: &GangRequest, ctx: &mut Ctx, h: usize, sign: i64) {
        for r in 0..3 {
            self.free[h][r] -= sign * ctx.need[r] as i64;
        }
        let per_cluster = self.clusters.entry(req.cluster.clone()).or_default();
        let c = per_cluster.entry(h).or_default();
        *c = (*c as i64 + sign) as u32;
        if *c == 0 {
            per_cluster.remove(&h);
        }
        let host = &self.snap.hosts[h];
        for d in [&mut ctx.anti, &mut ctx.soft_anti, &mut ctx.soft_aff]
            .into_iter()
            .flatten()
        {
            if let Some(v) = host.domain(&d.key) {
                let c = d.counts.entry(v.to_string()).or_default();
                *c = (*c as i64 + sign) as u32;
            }
            d.total = (d.total as i64 + sign) as u32;
        }
        self.update(h);
    }

    /// The binding constraint, once a gang has failed (state as before the gang).
    fn diagnose(&self, req: &GangRequest, placed: u32) -> PlacementError {
        let hosts = &self.snap.hosts;
        let accepting: Vec<usize> = (0..hosts.len())
            .filter(|&h| state_accepts(hosts[h].state, req.allow_power_on))
            .collect();
        if accepting.is_empty() {
            return PlacementError::NoHostUp {
                states: count_by(hosts.iter().map(|h| h.state.as_str().to_string())),
            };
        }
        let mut rejected: Vec<String> = Vec::new();
        let ok: Vec<usize> = accepting
            .iter()
            .copied()
            .filter(|&h| match static_filter(&hosts[h], req) {
                Some(r) => {
                    rejected.push(r.to_string());
                    false
                }
                None => true,
            })
            .collect();
        if ok.is_empty() {
            return PlacementError::NoHostMatches {
                rejected: count_by(rejected.into_iter()),
            };
        }
        let need = [
            req.cpus as u64,
            req.memory_mib,
            if self.snap.shared_storage { 0 } else { req.disk_mib },
        ];
        if !ok.iter().any(|&h| (0..3).all(|r| self.cap[h][r] >= need[r])) {
            return PlacementError::VmTooLarge {
                cpus: req.cpus,
                memory_mib: req.memory_mib,
            };
        }
        let count = req.count as u64;
        for (r, need) in need.iter().enumerate() {
            let free: u64 = ok.iter().map(|&h| self.free[h][r].max(0) as u64).sum();
            let needed = need * count;
            if needed > free {
                let (missing, hosts) = (needed - free, ok.len());
                return match r {
                    0 => PlacementError::Cpu {
                        missing,
                        free,
                        needed,
                        hosts,
                    },
                    1 => PlacementError::Memory {
                        missing,
                        free,
                        needed,
                        hosts,
                    },
                    _ => PlacementError::Disk {
                        missing,
                        free,
                        needed,
                        hosts,
                    },
                };
            }
        }
        if let Some(key) = &req.rules.anti_affinity {
            let taken: std::collections::HashSet<&str> = self
                .clusters
                .get(&req.cluster)
                .into_iter()
                .flat_map(|m| m.keys())
                .filter_map(|&h| hosts[h].domain(key))
                .collect();
            let free_domains: std::collections::HashSet<&str> = ok
                .iter()
                .filter(|&&h| capacity_filter(self.free[h], need).is_none())
                .filter_map(|&h| hosts[h].domain(key))
                .filter(|v| !taken.contains(v))
                .collect();
            if (free_domains.len() as u32) < req.count {
                return PlacementError::AntiAffinity {
                    domain: key.clone(),
                    needed: req.count,
                    available: free_domains.len() as u32,
                    cpus: req.cpus,
                    memory_mib: req.memory_mib,
                };
            }
        }
        PlacementError::Fragmented {
            placed,
            count: req.count,
            cpus: req.cpus,
            memory_mib: req.memory_mib,
        }
    }
}

/// "3 down, 1 draining": how many times each text occurs, most frequent first.
fn count_by(items: impl Iterator<Item = String>) -> String {
    let mut m: HashMap<String, usize> = HashMap::new();
    for s in items {
        *m.entry(s).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter()
        .map(|(s, n)| format!("{n} × {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Places one gang on a snapshot: the index of each VM's host, or why it does not fit.
pub fn place_gang(snap: &Snapshot, req: &GangRequest) -> Result<Vec<usize>, PlacementError> {
    Placer::new(snap).place(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Rules;
    use crate::snapshot::{Host, HostState, Vm};
    use proptest::prelude::*;

    fn hosts(n: usize, cpus: u32, mem: u64) -> Snapshot {
        Snapshot {
            hosts: (0..n).map(|i| Host::new(format!("h{i}"), cpus, mem, 0)).collect(),
            ..Default::default()
        }
    }

    fn req(count: u32, cpus: u32, mem: u64, p: Placement) -> GangRequest {
        GangRequest {
            placement: p,
            ..GangRequest::new("c", count, cpus, mem)
        }
    }

    fn anti(mut r: GangRequest, key: &str) -> GangRequest {
        r.rules.anti_affinity = Some(key.into());
        r
    }

    #[test]
    fn spread_uses_every_host_and_pack_fills_one() {
        let s = hosts(4, 8, 8192);
        let mut spread = place_gang(&s, &req(4, 1, 512, Placement::Spread)).unwrap();
        spread.sort();
        assert_eq!(spread, vec![0, 1, 2, 3]);
        assert_eq!(
            place_gang(&s, &req(4, 1, 512, Placement::Pack)).unwrap(),
            vec![0, 0, 0, 0]
        );
    }

    #[test]
    fn shortfall_names_the_missing_vcpus() {
        let s = hosts(4, 4, 65536);
        let e = place_gang(&s, &req(14, 2, 512, Placement::Spread)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "needs 12 vCPU more than free on 4 hosts (16 free, 28 needed)"
        );
    }

    #[test]
    fn anti_affinity_needs_distinct_hosts() {
        let s = hosts(3, 16, 65536);
        let e = place_gang(&s, &anti(req(4, 1, 512, Placement::Pack), "host")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "anti-affinity by host: needs 4 hosts with room for one VM (1 vCPU, 512 MiB) and no VM of the cluster, only 3 have"
        );
        let ok = place_gang(&s, &anti(req(3, 1, 512, Placement::Pack), "host")).unwrap();
        assert_eq!(ok, vec![0, 1, 2]);
    }

    #[test]
    fn anti_affinity_counts_the_clusters_running_vms() {
        let mut s = hosts(3, 16, 65536);
        s.vms.push(Vm {
            name: "c-0".into(),
            cluster: "c".into(),
            host: "h1".into(),
            cpus: 1,
            memory_mib: 512,
            disk_mib: 0,
            template: None,
            dirty_mib_s: None,
            overlay_mib: 0,
            anti_affinity: Some("host".into()),
        });
        let plan = place_gang(&s, &anti(req(2, 1, 512, Placement::Pack), "host")).unwrap();
        assert_eq!(plan, vec![0, 2]);
        let e = place_gang(&s, &anti(req(3, 1, 512, Placement::Pack), "host")).unwrap_err();
        assert!(matches!(e, PlacementError::AntiAffinity { available: 2, .. }), "{e}");
    }

    fn zoned(n: usize) -> Snapshot {
        let mut s = hosts(n, 8, 16384);
        for (i, h) in s.hosts.iter_mut().enumerate() {
            h.labels.insert("zone".into(), format!("z{}", i % 3));
            h.labels.insert("rack".into(), format!("r{}", i / 2));
        }
        s
    }

    #[test]
    fn anti_affinity_by_zone_uses_each_zone_once() {
        let s = zoned(9);
        let plan = place_gang(&s, &anti(req(3, 1, 512, Placement::Pack), "zone")).unwrap();
        let mut zones: Vec<&str> = plan.iter().map(|&h| s.hosts[h].labels["zone"].as_str()).collect();
        zones.sort();
        assert_eq!(zones, vec!["z0", "z1", "z2"]);
        let e = place_gang(&s, &anti(req(4, 1, 512, Placement::Pack), "zone")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "anti-affinity by zone: needs 4 zones with room for one VM (1 vCPU, 512 MiB) and no VM of the cluster, only 3 have"
        );
    }

    #[test]
    fn affinity_keeps_the_gang_in_one_zone_or_names_the_shortfall() {
        let s = zoned(9); // three hosts of 8 vCPU per zone
        let mut r = req(20, 1, 512, Placement::Spread);
        r.rules.affinity = Some("zone".into());
        let plan = place_gang(&s, &r).unwrap();
        let zones: std::collections::BTreeSet<&str> =
            plan.iter().map(|&h| s.hosts[h].labels["zone"].as_str()).collect();
        assert_eq!(zones.len(), 1, "{plan:?}");
        r.count = 25;
        let e = place_gang(&s, &r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "affinity by zone: no zone has room for all 25 VMs (1 vCPU, 512 MiB each); at most 24 fit in one"
        );
    }

    #[test]
    fn states_and_labels_filter_hosts_and_errors_count_them() {
        let mut s = zoned(4);
        s.hosts[0].state = HostState::Draining;
        s.hosts[1].state = HostState::Maintenance;
        s.hosts[2].state = HostState::PoweredOff;
        let mut r = req(1, 1, 512, Placement::Pack);
        assert_eq!(place_gang(&s, &r).unwrap(), vec![3]);
        r.rules.required_labels.insert("zone".into(), "z1".into());
        let e = place_gang(&s, &r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no host passes the filters: 1 × labels: zone=z0, needs zone=z1"
        );
        r.allow_power_on = true;
        r.rules.required_labels.insert("zone".into(), "z2".into());
        assert_eq!(place_gang(&s, &r).unwrap(), vec![2]);
        s.hosts[3].state = HostState::Down;
        r.allow_power_on = false;
        let e = place_gang(&s, &r).unwrap_err();
        assert!(e.to_string().starts_with("no host is up ("), "{e}");
        assert!(e.to_string().contains("1 × down"), "{e}");
    }

    #[test]
    fn overcommit_and_reservations_set_the_capacity() {
        let mut s = hosts(1, 4, 8192);
        s.hosts[0].cpu_overcommit = 4.0;
        s.hosts[0].reserved_cpus = 2;
        s.hosts[0].reserved_memory_mib = 1024;
        // 4 × 4 − 2 = 14 vCPU, 7168 MiB.
        assert!(place_gang(&s, &req(14, 1, 512, Placement::Pack)).is_ok());
        let e = place_gang(&s, &req(15, 1, 256, Placement::Pack)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "needs 1 vCPU more than free on 1 hosts (14 free, 15 needed)"
        );
        let e = place_gang(&s, &req(8, 1, 1024, Placement::Pack)).unwrap_err();
        assert!(matches!(e, PlacementError::Memory { missing: 1024, .. }), "{e}");
    }

    #[test]
    fn local_disks_need_room_unless_storage_is_shared() {
        let mut s = Snapshot {
            hosts: vec![Host::new("a", 8, 8192, 10_000)],
            ..Default::default()
        };
        let mut r = req(2, 1, 512, Placement::Pack);
        r.disk_mib = 6000;
        let e = place_gang(&s, &r).unwrap_err();
        assert!(matches!(e, PlacementError::Disk { missing: 2000, .. }), "{e}");
        s.shared_storage = true;
        assert!(place_gang(&s, &r).is_ok());
    }

    #[test]
    fn image_locality_breaks_ties_between_equal_hosts() {
        let mut s = hosts(3, 8, 8192);
        s.image_locality
            .insert("debian".into(), [("h2".to_string(), 0.9)].into_iter().collect());
        let mut r = req(1, 1, 512, Placement::Spread);
        r.template = Some("debian".into());
        assert_eq!(place_gang(&s, &r).unwrap(), vec![2]);
        r.template = None;
        assert_eq!(place_gang(&s, &r).unwrap(), vec![0]);
    }

    #[test]
    fn down_hosts_and_oversized_vms() {
        let mut s = hosts(1, 4, 4096);
        assert_eq!(
            place_gang(&s, &req(1, 8, 512, Placement::Spread)),
            Err(PlacementError::VmTooLarge {
                cpus: 8,
                memory_mib: 512
            })
        );
        s.hosts[0].state = HostState::Down;
        assert_eq!(
            place_gang(&s, &req(1, 1, 512, Placement::Spread))
                .unwrap_err()
                .to_string(),
            "no host is up (1 × down)"
        );
    }

    #[test]
    fn fragmentation_is_reported() {
        // 3 free vCPU in total but no host has 2.
        let s = Snapshot {
            vms: (0..3)
                .map(|i| Vm {
                    name: format!("x{i}"),
                    cluster: "x".into(),
                    host: format!("h{i}"),
                    cpus: 1,
                    memory_mib: 1,
                    disk_mib: 0,
                    template: None,
                    dirty_mib_s: None,
                    overlay_mib: 0,
                    anti_affinity: None,
                })
                .collect(),
            ..hosts(3, 2, 4096)
        };
        let e = place_gang(&s, &req(1, 2, 512, Placement::Spread)).unwrap_err();
        assert!(matches!(e, PlacementError::Fragmented { placed: 0, .. }), "{e}");
    }

    #[test]
    fn explanation_names_each_hosts_filter_or_score() {
        let mut s = zoned(3);
        s.hosts[1].state = HostState::Draining;
        s.hosts[2].cpus = 1;
        let mut p = Placer::new(&s);
        let e = p.explain(&req(2, 2, 512, Placement::Pack));
        assert_eq!(e.hosts[0].vms, 2);
        assert!(e.hosts[0].score.is_some());
        assert_eq!(
            e.hosts[1].rejected,
            Some(Reject::State {
                state: HostState::Draining
            })
        );
        assert_eq!(e.hosts[2].rejected, Some(Reject::Cpu { free: 1, need: 2 }));
        let text = e.render();
        assert!(text.contains("rejected by state: host is draining"), "{text}");
        assert!(text.contains("rejected by cpu: 1 vCPU free, needs 2"), "{text}");
        assert!(text.contains("vm   1 -> h0"), "{text}");
        // Explaining commits nothing.
        assert_eq!(p.free(0), [8, 16384, 0]);
    }

    #[test]
    fn large_snapshots_pack_through_the_index() {
        let s = hosts(1000, 16, 65536);
        let mut p = Placer::new(&s);
        for i in 0..100 {
            let r = GangRequest {
                cluster: format!("c{i}"),
                ..req(8, 2, 8192, Placement::Pack)
            };
            p.place(&r).unwrap();
        }
        // 800 VMs of 2 vCPU / 8 GiB fill 100 hosts of 16 vCPU / 64 GiB exactly.
        let used = (0..1000).filter(|&h| p.free(h)[0] < 16).count();
        assert_eq!(used, 100);
    }

    // ---- properties ----

    fn arb_snapshot(max_hosts: usize) -> impl Strategy<Value = Snapshot> {
        prop::collection::vec(
            (1u32..32, 1u64..64, 0u32..32, 0u64..64, 0u8..6, 0u8..3, any::<bool>()),
            1..max_hosts,
        )
        .prop_map(|v| {
            let mut s = Snapshot::default();
            for (i, (c, m, uc, um, st, zone, oc)) in v.into_iter().enumerate() {
                let mut h = Host::new(format!("h{i}"), c, m * 512, 0);
                h.state = match st {
                    0 => HostState::Draining,
                    1 => HostState::PoweredOff,
                    _ => HostState::Up,
                };
                if oc {
                    h.cpu_overcommit = 2.0;
                }
                h.labels.insert("zone".into(), format!("z{zone}"));
                s.hosts.push(h);
                let (uc, um) = (uc.min(c), (um * 512).min(m * 512));
                if uc > 0 {
                    s.vms.push(Vm {
                        name: format!("old{i}"),
                        cluster: format!("c{}", i % 3),
                        host: format!("h{i}"),
                        cpus: uc,
                        memory_mib: um,
                        disk_mib: 0,
                        template: None,
                        dirty_mib_s: None,
                        overlay_mib: 0,
                        anti_affinity: None,
                    });
                }
            }
            s
        })
    }

    fn arb_request() -> impl Strategy<Value = GangRequest> {
        (1u32..20, 1u32..8, 1u64..8, any::<bool>(), 0u8..4, any::<bool>(), 0u8..3).prop_map(
            |(count, cpus, mem, pack, rule, power, cluster)| {
                let mut r = GangRequest::new(format!("c{cluster}"), count, cpus, mem * 256);
                r.placement = if pack { Placement::Pack } else { Placement::Spread };
                r.allow_power_on = power;
                r.rules = match rule {
                    0 => Rules::default(),
                    1 => Rules {
                        anti_affinity: Some("host".into()),
                        ..Default::default()
                    },
                    2 => Rules {
                        anti_affinity: Some("zone".into()),
                        ..Default::default()
                    },
                    _ => Rules {
                        affinity: Some("zone".into()),
                        ..Default::default()
                    },
                };
                r
            },
        )
    }

    /// Checks a committed plan against every hard rule, starting from `before`.
    fn check_plan(
        s: &Snapshot,
        before: &Placer,
        after: &Placer,
        r: &GangRequest,
        plan: &[usize],
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(plan.len(), r.count as usize);
        for &h in plan {
            let host = &s.hosts[h];
            prop_assert!(
                static_filter(host, r).is_none(),
                "host {} breaks a static rule",
                host.name
            );
            let f = after.free(h);
            prop_assert!(
                f[0] >= 0 && f[1] >= 0 && f[2] >= 0,
                "host {} overcommitted: {:?}",
                host.name,
                f
            );
        }
        for h in 0..s.hosts.len() {
            let n = plan.iter().filter(|&&x| x == h).count() as i64;
            prop_assert_eq!(before.free(h)[0] - after.free(h)[0], n * r.cpus as i64);
        }
        let existing = before.clusters.get(&r.cluster).cloned().unwrap_or_default();
        if let Some(key) = &r.rules.anti_affinity {
            let mut seen: std::collections::HashSet<&str> =
                existing.keys().filter_map(|&h| s.hosts[h].domain(key)).collect();
            for &h in plan {
                prop_assert!(seen.insert(s.hosts[h].domain(key).unwrap()), "two VMs in one {}", key);
            }
        }
        if let Some(key) = &r.rules.affinity {
            let doms: std::collections::HashSet<&str> = existing
                .keys()
                .chain(plan.iter())
                .filter_map(|&h| s.hosts[h].domain(key))
                .collect();
            prop_assert!(doms.len() <= 1 || !existing.is_empty(), "gang split over {:?}", doms);
        }
        Ok(())
    }

    fn run_sequence(
        s: &Snapshot,
        reqs: &[GangRequest],
    ) -> Result<Vec<Result<Vec<usize>, PlacementError>>, TestCaseError> {
        let mut p = Placer::new(s);
        let mut out = Vec::new();
        for r in reqs {
            let before = Placer {
                clusters: p.clusters.clone(),
                free: p.free.clone(),
                ..Placer::new(s)
            };
            let res = p.place(r);
            match &res {
                Ok(plan) => check_plan(s, &before, &p, r, plan)?,
                Err(_) => prop_assert_eq!(&before.free, &p.free, "a failed gang changed nothing"),
            }
            out.push(res);
        }
        Ok(out)
    }

    proptest! {
        #[test]
        fn small_snapshots_never_break_a_hard_rule(
            s in arb_snapshot(12), reqs in prop::collection::vec(arb_request(), 1..6),
        ) {
            let first = run_sequence(&s, &reqs)?;
            prop_assert_eq!(first, run_sequence(&s, &reqs)?, "deterministic");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn indexed_snapshots_never_break_a_hard_rule(
            s in arb_snapshot(600), reqs in prop::collection::vec(arb_request(), 1..20),
        ) {
            let first = run_sequence(&s, &reqs)?;
            prop_assert_eq!(first, run_sequence(&s, &reqs)?, "deterministic");
        }
    }
}
