//! Model invariants on synthetic workloads (no trace files needed).

use shoal_sim::engine::{Plan, Policy, SimError, View};
use shoal_sim::model::{planetlab_host_types, VmSpec, PLANETLAB_VM_TYPES};
use shoal_sim::{policy, simulate, Workload, BASELINES};

/// A deterministic pseudo-random day: bursty demand around a per-VM mean.
fn synthetic(vms: usize, hosts: usize, seed: u64) -> Workload {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) as f64 / (1u64 << 31) as f64
    };
    let steps = 48;
    let vms = (0..vms)
        .map(|i| {
            let ty = i * 4 / vms;
            let mean = next() * 0.4;
            let mut samples: Vec<f64> = (0..steps)
                .map(|_| {
                    if next() < 0.1 {
                        0.0
                    } else {
                        (mean + (next() - 0.5) * 0.5).clamp(0.0, 0.99)
                    }
                })
                .collect();
            samples.push(samples[steps - 1]);
            let (mips, ram_mb) = PLANETLAB_VM_TYPES[ty];
            VmSpec {
                name: format!("vm{i}"),
                vm_type: ty as u32,
                mips,
                ram_mb,
                samples,
            }
        })
        .collect();
    Workload {
        name: format!("synthetic-{seed}"),
        vms,
        host_types: planetlab_host_types(),
        host_type_of: Vec::new(),
        interval_s: 300.0,
        steps,
        reference_quirks: seed.is_multiple_of(2),
    }
    .with_hosts(hosts)
}

#[test]
fn every_policy_keeps_the_model_invariants() {
    for seed in 0..4 {
        let w = synthetic(120, 100, seed);
        for name in BASELINES.iter().copied().chain(["shoal"]) {
            // The engine asserts (debug builds) that no host ever allocates more than it has.
            let r = simulate(&w, policy(name).unwrap().as_mut()).unwrap();
            assert!(
                r.energy_kwh.is_finite() && r.energy_kwh > 0.0,
                "{name}/{seed}: energy {}",
                r.energy_kwh
            );
            assert!((0.0..=1.0).contains(&r.slatah), "{name}/{seed}: SLATAH {}", r.slatah);
            assert!((0.0..=1.0).contains(&r.pdm), "{name}/{seed}: PDM {}", r.pdm);
            assert_eq!(
                r.series.len(),
                w.decisions(),
                "{name}/{seed}: one sample per decision step"
            );
            assert!(r
                .series
                .iter()
                .all(|s| s.powered_on <= w.hosts() && s.active_hosts <= s.powered_on.max(s.active_hosts)));
            assert_eq!(
                r.series.iter().map(|s| s.migrations).sum::<u64>(),
                r.migrations,
                "{name}/{seed}"
            );
            if name == "dvfs" {
                assert_eq!(r.migrations, 0);
            }
        }
    }
}

/// Puts VM 0 on host 0, the rest on host 1, and moves VM 0 to host 2 at step 1.
struct OneMove;
impl Policy for OneMove {
    fn name(&self) -> String {
        "one-move".into()
    }
    fn initial_placement(&mut self, view: &View) -> Result<Vec<u32>, SimError> {
        Ok((0..view.vms.len()).map(|v| if v == 0 { 0 } else { 1 }).collect())
    }
    fn decide(&mut self, view: &View) -> Plan {
        let mut p = Plan::default();
        if view.step == 1 {
            p.migrations.push((0, 3));
        }
        p
    }
}

#[test]
fn a_migration_costs_what_the_model_says() {
    let (mips, ram_mb) = PLANETLAB_VM_TYPES[2];
    let vm = VmSpec {
        name: "a".into(),
        vm_type: 2,
        mips,
        ram_mb,
        samples: vec![0.5; 5],
    };
    let w = Workload {
        name: "one".into(),
        vms: vec![vm],
        host_types: planetlab_host_types(),
        host_type_of: Vec::new(),
        interval_s: 300.0,
        steps: 4,
        reference_quirks: false,
    }
    .with_hosts(4);
    let r = simulate(&w, &mut OneMove).unwrap();
    assert_eq!(r.migrations, 1);
    // 1740 MB at 62.5 MB/s = 27.84 s at 10 % degradation, over 3 intervals of 500 MIPS.
    let pdm = 0.1 * 27.84 / 900.0;
    assert!((r.pdm - pdm).abs() < 1e-9, "PDM {} vs {pdm}", r.pdm);
    // The target counts the migration as violation time: 27.84 s of the active host time.
    assert!(r.slatah > 0.0 && r.slatah < 0.1, "SLATAH {}", r.slatah);
    // G4 at 500/3720 MIPS, then G5 (host 3) at 500/5320, both linear between the points.
    let g4 = &w.host_types[0];
    let g5 = &w.host_types[1];
    let before = g4.power(500.0 / 3720.0) * 300.0;
    assert!(r.energy_kwh * 3.6e6 > before, "energy counts both hosts");
    let _ = g5;
}

#[test]
fn bad_plans_are_refused() {
    struct Bad;
    impl Policy for Bad {
        fn name(&self) -> String {
            "bad".into()
        }
        fn initial_placement(&mut self, view: &View) -> Result<Vec<u32>, SimError> {
            Ok(vec![0; view.vms.len()])
        }
        fn decide(&mut self, _view: &View) -> Plan {
            Plan {
                migrations: vec![(0, 0)],
                ..Plan::default()
            }
        }
    }
    let w = synthetic(4, 4, 1);
    assert!(matches!(simulate(&w, &mut Bad), Err(SimError::BadPlan { .. })));
    assert!(matches!(policy("nope:1"), Err(SimError::UnknownPolicy(_))));
}
