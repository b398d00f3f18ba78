//! The honest check that the reference model is reproduced: on day 20110303 every baseline lands
//! within 5 % of the published energy and migrations (MODEL.md), and Shoal's policy meets the
//! issue's targets against `lr-mmt:1.2` on the day and on each half of its VMs.

mod common;

use shoal_sim::model::PLANETLAB_VM_TYPES;
use shoal_sim::report::{reference, Targets};
use shoal_sim::{load_planetlab, policy, simulate, Report, Workload, BASELINES};

fn run(w: &Workload, name: &str) -> Report {
    simulate(w, policy(name).unwrap().as_mut()).unwrap()
}

#[test]
fn baselines_match_the_reference_figures() {
    let w = load_planetlab(&common::day(), 800).unwrap();
    assert_eq!(w.vms.len(), 1052);
    let mut failures = Vec::new();
    for name in BASELINES {
        let r = run(&w, name);
        let want = reference(name).unwrap();
        let e = (r.energy_kwh - want.energy_kwh).abs() / want.energy_kwh;
        let m = if want.migrations == 0 {
            r.migrations as f64
        } else {
            (r.migrations as f64 - want.migrations as f64).abs() / want.migrations as f64
        };
        eprintln!(
            "{name}: {:.2} kWh ({:+.1} %), {} migrations ({:+.1} %)",
            r.energy_kwh,
            e * 100.0,
            r.migrations,
            m * 100.0
        );
        if e > 0.05 || m > 0.05 {
            failures.push(format!(
                "{name}: {:.2} kWh vs {}, {} migrations vs {}",
                r.energy_kwh, want.energy_kwh, r.migrations, want.migrations
            ));
        }
        if want.slatah > 0.0 {
            // SLA metrics are not part of the 5 % contract but must be of the same kind.
            assert!(
                (r.slatah / want.slatah - 1.0).abs() < 0.25,
                "{name}: SLATAH {} vs {}",
                r.slatah,
                want.slatah
            );
            assert!(
                (r.pdm / want.pdm - 1.0).abs() < 0.25,
                "{name}: PDM {} vs {}",
                r.pdm,
                want.pdm
            );
        }
    }
    assert!(failures.is_empty(), "outside 5 % of the reference: {failures:#?}");
}

fn assert_targets(w: &Workload, what: &str) {
    let lr = run(w, "lr-mmt:1.2");
    let shoal = run(w, "shoal");
    let t = Targets::check(&shoal, &lr);
    eprintln!(
        "{what}: shoal {:.2} kWh, ESV {:.3e}, {} migrations vs lr-mmt {:.2} kWh, ESV {:.3e}, {} migrations",
        shoal.energy_kwh, shoal.esv, shoal.migrations, lr.energy_kwh, lr.esv, lr.migrations
    );
    assert!(
        t.energy_ok && t.esv_ok && t.migrations_ok,
        "{what}: targets missed: {t:?}"
    );
}

#[test]
fn shoal_meets_the_targets_on_the_day() {
    assert_targets(&load_planetlab(&common::day(), 800).unwrap(), "whole day");
}

#[test]
fn shoal_meets_the_targets_on_held_out_halves() {
    // Each half of the VMs on half the hosts: a workload the policy was not designed on alone.
    let w = load_planetlab(&common::day(), 800).unwrap();
    assert_targets(&w.clone().subset(|i| i % 2 == 0).with_hosts(400), "even VMs");
    assert_targets(&w.subset(|i| i % 2 == 1).with_hosts(400), "odd VMs");
}

#[test]
fn shoal_meets_the_targets_when_every_vm_runs_all_day() {
    let mut w = load_planetlab(&common::day(), 800).unwrap();
    w.reference_quirks = false;
    assert_targets(&w, "no VM leaves");
}

/// VM types by index, as the reference assigns them on any day.
fn retype(w: &mut Workload) {
    let per_type = w.vms.len().div_ceil(4);
    for (i, v) in w.vms.iter_mut().enumerate() {
        v.vm_type = (i / per_type) as u32;
        (v.mips, v.ram_mb) = PLANETLAB_VM_TYPES[v.vm_type as usize];
    }
}

#[test]
fn shoal_meets_the_targets_on_a_smaller_day() {
    // The smallest day of the trace set has 898 VMs: a spread-out subset of this one's.
    let mut w = load_planetlab(&common::day(), 800).unwrap();
    let keep: Vec<_> = (0..898).map(|i| w.vms[i * 7919 % 1052].clone()).collect();
    w.vms = keep;
    retype(&mut w);
    assert_targets(&w, "898 VMs");
}

#[test]
fn shoal_meets_the_targets_on_a_larger_day() {
    // The other days of the trace set have up to 1,516 VMs. Only one day is here, so a bigger
    // one is made from it: 464 more VMs whose samples are the day's shifted by 12 hours.
    let mut w = load_planetlab(&common::day(), 800).unwrap();
    let extra: Vec<_> = w.vms[..464]
        .iter()
        .map(|v| {
            let mut v = v.clone();
            let n = v.samples.len() - 1;
            v.samples.truncate(n);
            v.samples.rotate_left(n / 2);
            v.samples.push(v.samples[n - 1]);
            v.name.push_str("+12h");
            v
        })
        .collect();
    w.vms.extend(extra);
    assert_eq!(w.vms.len(), 1516);
    retype(&mut w);
    assert_targets(&w, "1,516 VMs");
}

#[test]
fn simulation_is_deterministic() {
    let w = load_planetlab(&common::day(), 800).unwrap();
    for name in ["shoal", "iqr-mmt:1.5"] {
        let mut a = run(&w, name);
        let mut b = run(&w, name);
        a.sim_seconds = 0.0;
        b.sim_seconds = 0.0;
        assert_eq!(a, b, "{name} differs between two runs");
    }
}

#[test]
fn initial_placement_spreads_like_the_reference() {
    // MODEL.md: power-aware best fit at full demand puts the 1,052 VMs on all 800 hosts, 548 with
    // one VM and 252 with two.
    use shoal_sim::engine::{HostPower, HostState, View, VmState};
    let w = load_planetlab(&common::day(), 800).unwrap();
    let hosts: Vec<HostState> = w
        .host_type_of
        .iter()
        .map(|&ty| HostState {
            ty,
            vms: Vec::new(),
            incoming: Vec::new(),
            util: 0.0,
            requested_mips: 0.0,
            power: HostPower::On,
            ready_at: 0.0,
            off_when_empty: false,
        })
        .collect();
    let vms: Vec<VmState> = w
        .vms
        .iter()
        .map(|_| VmState {
            host: 0,
            in_migration: false,
            history: Vec::new(),
            last_migrated: None,
            gone: false,
        })
        .collect();
    let demand: Vec<f64> = w.vms.iter().map(|v| v.mips).collect();
    let view = View {
        workload: &w,
        t: 0.0,
        step: 0,
        hosts: &hosts,
        vms: &vms,
        demand: &demand,
    };
    let placement = policy("lr-mmt:1.2").unwrap().initial_placement(&view).unwrap();
    let mut per_host = vec![0; 800];
    for h in placement {
        per_host[h as usize] += 1;
    }
    let count = |n: usize| per_host.iter().filter(|&&c| c == n).count();
    assert_eq!((count(0), count(1), count(2)), (0, 548, 252));
}
