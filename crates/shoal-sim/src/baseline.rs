//! The published baselines (Beloglazov & Buyya, CCPE 2012), reproduced from CloudSim 3.0.3's
//! `power` package, quirks included, because the point of a baseline is to be the baseline:
//!
//! - overload detection THR / IQR / MAD / LR on the host's *virtual* history (the summed histories
//!   of the VMs on it now), with the fall-backs to THR 0.7;
//! - VM selection MMT (smallest RAM first, in the host's VM order) until the host is not overloaded;
//! - power-aware best-fit decreasing placement, where the power before is read at the host's last
//!   measured utilisation (so an empty host costs nothing extra to fill), overloaded hosts are
//!   excluded, and a non-empty host must not be overloaded after the VM joins;
//! - under-load: every active host, least utilised first, is emptied all or nothing onto hosts not
//!   yet considered; hosts that failed to empty are not targets either;
//! - `dvfs`: first fit at full demand at t = 0 and never a migration.

use crate::engine::{HostState, Plan, Policy, SimError, View, HISTORY_LEN};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detector {
    Thr(f64),
    Iqr(f64),
    Mad(f64),
    Lr(f64),
}

#[derive(Debug, Clone)]
pub struct CloudSimPolicy {
    pub detector: Detector,
}

/// First fit at full demand, no migration: the reference's "DVFS" run.
#[derive(Debug, Clone, Default)]
pub struct Dvfs;

/// Planning copy of the hosts: VM lists and the sums the reference's checks read.
struct Planner<'a> {
    view: &'a View<'a>,
    vms: Vec<Vec<u32>>,
    /// Demand per VM used to allocate (MIPS, uncapped).
    req_alloc: Vec<f64>,
    /// Demand per VM as the overload checks read it.
    req_check: Vec<f64>,
    ram_used: Vec<u32>,
    check_ram: bool,
    /// Fraction of VM v's MIPS in its history, aligned: `hist[v][i]`, most recent first.
    detector: Detector,
}

impl<'a> Planner<'a> {
    fn new(view: &'a View<'a>, detector: Detector, initial: bool) -> Self {
        let hosts: &[HostState] = view.hosts;
        let vms: Vec<Vec<u32>> = hosts.iter().map(|h| h.vms.clone()).collect();
        let req_alloc: Vec<f64> = view.demand.to_vec();
        let req_check = req_alloc.clone();
        let ram_used = vec![0; hosts.len()];
        Planner {
            view,
            vms,
            req_alloc,
            req_check,
            ram_used,
            check_ram: initial,
            detector,
        }
    }

    fn total(&self, h: usize) -> f64 {
        self.view.capacity(h)
    }

    fn sum_capped(&self, h: usize) -> f64 {
        let pe = self.view.core_mips(h);
        self.vms[h].iter().map(|&v| self.req_alloc[v as usize].min(pe)).sum()
    }

    fn available(&self, h: usize) -> f64 {
        let s = self.sum_capped(h);
        let total = self.total(h);
        if s <= total {
            total - s
        } else {
            0.0
        }
    }

    /// Allocated MIPS on the host (the reference's `getUtilizationOfCpuMips`).
    fn allocated(&self, h: usize) -> f64 {
        let s = self.sum_capped(h);
        let total = self.total(h);
        if s <= total {
            return s;
        }
        let pe = self.view.core_mips(h);
        let scale = total / s;
        self.vms[h]
            .iter()
            .map(|&v| (self.req_alloc[v as usize].min(pe) * scale).floor())
            .sum()
    }

    fn suitable(&self, h: usize, v: usize) -> bool {
        let req = self.req_alloc[v];
        if self.view.core_mips(h) < req || self.available(h) < req {
            return false;
        }
        !self.check_ram
            || self.ram_used[h] + self.view.workload.vms[v].ram_mb
                <= self.view.workload.host_types[self.view.hosts[h].ty].ram_mb
    }

    fn add(&mut self, h: usize, v: usize) {
        self.vms[h].push(v as u32);
        self.ram_used[h] += self.view.workload.vms[v].ram_mb;
    }

    fn remove(&mut self, h: usize, v: usize) {
        self.vms[h].retain(|&x| x as usize != v);
        self.ram_used[h] = self.ram_used[h].saturating_sub(self.view.workload.vms[v].ram_mb);
    }

    fn utilization_requested(&self, h: usize) -> f64 {
        self.vms[h].iter().map(|&v| self.req_check[v as usize]).sum::<f64>() / self.total(h)
    }

    /// The host's virtual utilisation history, most recent first, zero tail trimmed.
    fn history(&self, h: usize) -> Vec<f64> {
        let mut hist = [0.0; HISTORY_LEN];
        let total = self.total(h);
        for &v in &self.vms[h] {
            let mips = self.view.workload.vms[v as usize].mips;
            for (i, &u) in self.view.vms[v as usize].history.iter().enumerate() {
                hist[i] += u * mips / total;
            }
        }
        let mut n = HISTORY_LEN;
        while n > 0 && hist[n - 1] == 0.0 {
            n -= 1;
        }
        hist[..n.max(1)].to_vec()
    }

    fn overloaded(&self, h: usize) -> bool {
        let thr = |t: f64| self.utilization_requested(h) > t;
        match self.detector {
            Detector::Thr(t) => thr(t),
            Detector::Iqr(s) | Detector::Mad(s) => {
                let data = self.history(h);
                if data.len() < 12 {
                    return thr(0.7);
                }
                let spread = if matches!(self.detector, Detector::Iqr(_)) {
                    iqr(data)
                } else {
                    mad(&data)
                };
                thr(1.0 - s * spread)
            }
            Detector::Lr(s) => {
                let data = self.history(h);
                const N: usize = 10;
                if data.len() < N {
                    return thr(0.7);
                }
                let y: Vec<f64> = (0..N).map(|i| data[N - 1 - i]).collect();
                let (a, b) = least_squares(&y);
                // One migration (≤ 28 s) fits in one interval, so the prediction is one step ahead.
                let predicted = (a + b * (N as f64 + 1.0)) * s;
                predicted >= 1.0
            }
        }
    }

    fn power_before(&self, h: usize) -> f64 {
        self.view.workload.host_types[self.view.hosts[h].ty].power(self.view.hosts[h].util)
    }

    /// Power-aware best fit: the host whose power rises least, first in host order on ties.
    fn find_host(&mut self, v: usize, excluded: &[bool]) -> Option<usize> {
        let mut best = f64::MAX;
        let mut chosen = None;
        for (h, &skip) in excluded.iter().enumerate() {
            if skip || !self.suitable(h, v) {
                continue;
            }
            let alloc = self.allocated(h);
            let ht = &self.view.workload.host_types[self.view.hosts[h].ty];
            let after = ht.power((alloc + self.req_alloc[v]) / self.total(h));
            let diff = after - self.power_before(h);
            if diff >= best {
                continue;
            }
            if alloc != 0.0 {
                self.add(h, v);
                let over = self.overloaded(h);
                self.remove(h, v);
                if over {
                    continue;
                }
            }
            best = diff;
            chosen = Some(h);
        }
        chosen
    }

    fn sort_by_demand(&self, vms: &mut [u32]) {
        vms.sort_by(|&a, &b| self.req_alloc[b as usize].total_cmp(&self.req_alloc[a as usize]));
    }
}

fn iqr(mut data: Vec<f64>) -> f64 {
    data.sort_by(f64::total_cmp);
    let n = data.len() as f64;
    let q1 = ((0.25 * (n + 1.0) + 0.5).floor() as usize).saturating_sub(1);
    let q3 = ((0.75 * (n + 1.0) + 0.5).floor() as usize)
        .saturating_sub(1)
        .min(data.len() - 1);
    data[q3] - data[q1]
}

fn median(data: &[f64]) -> f64 {
    let mut d = data.to_vec();
    d.sort_by(f64::total_cmp);
    let n = d.len();
    if !n.is_multiple_of(2) {
        d[n / 2]
    } else {
        (d[n / 2 - 1] + d[n / 2]) / 2.0
    }
}

fn mad(data: &[f64]) -> f64 {
    let m = median(data);
    let dev: Vec<f64> = data.iter().map(|x| (m - x).abs()).collect();
    median(&dev)
}

/// Ordinary least squares of `y` against x = 1..=n: (intercept, slope).
pub fn least_squares(y: &[f64]) -> (f64, f64) {
    let n = y.len() as f64;
    let mx = (n + 1.0) / 2.0;
    let my = y.iter().sum::<f64>() / n;
    let mut sxy = 0.0;
    let mut sxx = 0.0;
    for (i, &yi) in y.iter().enumerate() {
        let dx = i as f64 + 1.0 - mx;
        sxy += dx * (yi - my);
        sxx += dx * dx;
    }
    let b = sxy / sxx;
    (my - b * mx, b)
}

impl CloudSimPolicy {
    pub fn new(detector: Detector) -> Self {
        CloudSimPolicy { detector }
    }
}

impl Policy for CloudSimPolicy {
    fn name(&self) -> String {
        match self.detector {
            Detector::Thr(p) => format!("thr-mmt:{p}"),
            Detector::Iqr(p) => format!("iqr-mmt:{p}"),
            Detector::Mad(p) => format!("mad-mmt:{p}"),
            Detector::Lr(p) => format!("lr-mmt:{p}"),
        }
    }

    fn initial_placement(&mut self, view: &View) -> Result<Vec<u32>, SimError> {
        let mut p = Planner::new(view, self.detector, true);
        // VMs created earlier no longer ask for anything until the first update: only the VM
        // being placed counts in the overload check (the reference's `isBeingInstantiated`).
        p.req_check.iter_mut().for_each(|r| *r = 0.0);
        let none = vec![false; view.hosts.len()];
        let mut out = Vec::with_capacity(view.vms.len());
        for v in 0..view.vms.len() {
            p.req_check[v] = p.req_alloc[v];
            let h = p.find_host(v, &none).ok_or(SimError::Unplaceable { vm: v })?;
            p.add(h, v);
            p.req_check[v] = 0.0;
            out.push(h as u32);
        }
        Ok(out)
    }

    fn decide(&mut self, view: &View) -> Plan {
        let n = view.hosts.len();
        let mut p = Planner::new(view, self.detector, false);
        let mut plan = Plan::default();

        // Over-loaded hosts, and the VMs MMT takes off them.
        let over: Vec<usize> = (0..n).filter(|&h| p.overloaded(h)).collect();
        let mut excluded = vec![false; n];
        let mut to_move: Vec<u32> = Vec::new();
        for &h in &over {
            excluded[h] = true;
            loop {
                let vm = p.vms[h]
                    .iter()
                    .copied()
                    .filter(|&v| !view.vms[v as usize].in_migration)
                    .fold(None::<u32>, |best, v| match best {
                        Some(b) if view.workload.vms[b as usize].ram_mb <= view.workload.vms[v as usize].ram_mb => {
                            Some(b)
                        }
                        _ => Some(v),
                    });
                let Some(vm) = vm else { break };
                p.remove(h, vm as usize);
                to_move.push(vm);
                if !p.overloaded(h) {
                    break;
                }
            }
        }
        p.sort_by_demand(&mut to_move);
        for vm in to_move {
            if let Some(h) = p.find_host(vm as usize, &excluded) {
                p.add(h, vm as usize);
                plan.migrations.push((vm, h as u32));
            }
        }

        // Under-loaded hosts, least utilised first (utilisation as last measured), all or nothing.
        let mut excl_src = excluded.clone();
        let mut excl_dst = excluded;
        for h in 0..n {
            if view.hosts[h].util == 0.0 {
                excl_src[h] = true;
                excl_dst[h] = true;
            }
        }
        let mut order: Vec<usize> = (0..n).filter(|&h| !excl_src[h] && view.hosts[h].util < 1.0).collect();
        order.sort_by(|&a, &b| view.hosts[a].util.total_cmp(&view.hosts[b].util).then(a.cmp(&b)));
        for h in order {
            if excl_src[h] || p.vms[h].is_empty() {
                continue;
            }
            excl_src[h] = true;
            excl_dst[h] = true;
            let mut vms: Vec<u32> = p.vms[h]
                .iter()
                .copied()
                .filter(|&v| !view.vms[v as usize].in_migration)
                .collect();
            if vms.is_empty() {
                continue;
            }
            p.sort_by_demand(&mut vms);
            let mut placed: Vec<(u32, usize)> = Vec::new();
            let mut ok = true;
            for &vm in &vms {
                match p.find_host(vm as usize, &excl_dst) {
                    Some(t) => {
                        p.add(t, vm as usize);
                        placed.push((vm, t));
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                for &(vm, t) in &placed {
                    p.remove(t, vm as usize);
                }
                continue;
            }
            for (vm, t) in placed {
                excl_src[t] = true;
                plan.migrations.push((vm, t as u32));
            }
        }
        plan
    }
}

impl Policy for Dvfs {
    fn name(&self) -> String {
        "dvfs".into()
    }

    fn initial_placement(&mut self, view: &View) -> Result<Vec<u32>, SimError> {
        let mut p = Planner::new(view, Detector::Thr(1.0), true);
        (0..view.vms.len())
            .map(|v| {
                let h = (0..view.hosts.len())
                    .find(|&h| p.suitable(h, v))
                    .ok_or(SimError::Unplaceable { vm: v })?;
                p.add(h, v);
                Ok(h as u32)
            })
            .collect()
    }

    fn decide(&mut self, _view: &View) -> Plan {
        Plan::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_the_reference_definitions() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(mad(&[1.0, 1.0, 2.0, 2.0, 4.0, 6.0, 9.0]), 1.0);
        // n = 12: q1 = round(3.25) - 1 = 2, q3 = round(9.75) - 1 = 9.
        let d: Vec<f64> = (0..12).map(|i| i as f64).collect();
        assert_eq!(iqr(d), 7.0);
        let (a, b) = least_squares(&[1.0, 3.0, 5.0, 7.0]);
        assert!((a + 1.0).abs() < 1e-12 && (b - 2.0).abs() < 1e-12);
    }
}
