//! What a simulation reports: the reference model's metrics and a per-step series for plots.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepSample {
    pub step: usize,
    /// Seconds since the start of the trace.
    pub t: f64,
    /// Hosts with a non-zero CPU utilisation.
    pub active_hosts: usize,
    /// Hosts drawing power (active hosts in the reference model; on or booting hosts otherwise).
    pub powered_on: usize,
    pub power_w: f64,
    /// Fraction of active hosts that cannot give their VMs all the MIPS they ask for.
    pub sla_violation: f64,
    /// Migrations started at this step.
    pub migrations: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub policy: String,
    pub workload: String,
    pub vms: usize,
    pub hosts: usize,
    pub energy_kwh: f64,
    /// Part of `energy_kwh` spent booting and shutting hosts down.
    pub boot_energy_kwh: f64,
    /// SLA violation time per active host (pooled over hosts).
    pub slatah: f64,
    /// Performance degradation due to migrations.
    pub pdm: f64,
    /// SLATAH × PDM.
    pub slav: f64,
    /// Energy × SLAV.
    pub esv: f64,
    /// Fraction of all demanded MIPS·s that was not allocated, for any reason.
    pub sla_overall: f64,
    pub migrations: u64,
    pub host_boots: u64,
    pub hosts_powered_off_max: usize,
    /// Wall-clock seconds the simulation took.
    pub sim_seconds: f64,
    pub series: Vec<StepSample>,
}

/// The reference figures of `MODEL.md` (CloudSim 3.0.3, day 20110303).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reference {
    pub policy: &'static str,
    pub energy_kwh: f64,
    pub slatah: f64,
    pub pdm: f64,
    pub slav: f64,
    pub esv: f64,
    pub migrations: u64,
}

pub const REFERENCE_20110303: [Reference; 5] = [
    Reference {
        policy: "dvfs",
        energy_kwh: 764.96,
        slatah: 0.0,
        pdm: 0.0,
        slav: 0.0,
        esv: 0.0,
        migrations: 0,
    },
    Reference {
        policy: "thr-mmt:0.8",
        energy_kwh: 198.08,
        slatah: 0.0500,
        pdm: 0.000714,
        slav: 3.567e-5,
        esv: 7.066e-3,
        migrations: 27_728,
    },
    Reference {
        policy: "iqr-mmt:1.5",
        energy_kwh: 193.63,
        slatah: 0.0502,
        pdm: 0.000681,
        slav: 3.418e-5,
        esv: 6.619e-3,
        migrations: 27_592,
    },
    Reference {
        policy: "mad-mmt:2.5",
        energy_kwh: 189.79,
        slatah: 0.0509,
        pdm: 0.000702,
        slav: 3.574e-5,
        esv: 6.783e-3,
        migrations: 27_781,
    },
    Reference {
        policy: "lr-mmt:1.2",
        energy_kwh: 167.83,
        slatah: 0.0572,
        pdm: 0.000755,
        slav: 4.318e-5,
        esv: 7.248e-3,
        migrations: 27_649,
    },
];

pub fn reference(policy: &str) -> Option<&'static Reference> {
    REFERENCE_20110303.iter().find(|r| r.policy == policy)
}

/// The targets for Shoal's policy against `lr-mmt:1.2` run on the same workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Targets {
    pub energy_ok: bool,
    pub esv_ok: bool,
    pub migrations_ok: bool,
    pub time_ok: bool,
}

impl Targets {
    pub fn check(shoal: &Report, lr: &Report) -> Self {
        Targets {
            energy_ok: shoal.energy_kwh <= lr.energy_kwh,
            esv_ok: shoal.esv <= 0.3 * lr.esv,
            migrations_ok: shoal.migrations * 10 <= lr.migrations,
            time_ok: shoal.sim_seconds < 1.0,
        }
    }
    pub fn all(&self) -> bool {
        self.energy_ok && self.esv_ok && self.migrations_ok && self.time_ok
    }
}

/// A human table, one row per report.
pub fn table(reports: &[Report]) -> String {
    let mut rows = vec![vec![
        "policy".to_string(),
        "energy kWh".into(),
        "SLATAH %".into(),
        "PDM %".into(),
        "SLAV ×1e-5".into(),
        "ESV ×1e-3".into(),
        "migrations".into(),
        "off max".into(),
        "sim s".into(),
    ]];
    for r in reports {
        rows.push(vec![
            r.policy.clone(),
            format!("{:.2}", r.energy_kwh),
            format!("{:.2}", r.slatah * 100.0),
            format!("{:.4}", r.pdm * 100.0),
            format!("{:.3}", r.slav * 1e5),
            format!("{:.3}", r.esv * 1e3),
            r.migrations.to_string(),
            r.hosts_powered_off_max.to_string(),
            format!("{:.3}", r.sim_seconds),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
