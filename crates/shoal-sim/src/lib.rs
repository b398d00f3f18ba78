//! Trace-driven simulation of VM consolidation.
//!
//! `simulate(workload, policy) -> Report` is a pure, deterministic function: a day of per-VM CPU
//! samples (PlanetLab format: `model::load_planetlab`), a host pool with power curves, and a
//! consolidation policy go in; energy, SLA metrics, migrations and a per-step series come out.
//! The published baselines (`baseline`) reproduce the reference figures; `shoal` is Shoal's own
//! policy; `svg` draws the series.

pub mod baseline;
pub mod engine;
pub mod model;
pub mod report;
pub mod shoal;
pub mod svg;

pub use engine::{simulate, Plan, Policy, PowerMode, SimError, View};
pub use model::{load_planetlab, Workload};
pub use report::{Report, Targets};

/// The policies the CLI and the benchmark know, by name: `shoal`, `thr-mmt:T`, `iqr-mmt:S`,
/// `mad-mmt:S`, `lr-mmt:S`, `dvfs`. A missing parameter takes the reference value.
pub fn policy(spec: &str) -> Result<Box<dyn Policy>, SimError> {
    use baseline::{CloudSimPolicy, Detector, Dvfs};
    let (name, param) = match spec.split_once(':') {
        Some((n, p)) => (
            n,
            Some(p.parse::<f64>().map_err(|_| SimError::UnknownPolicy(spec.to_owned()))?),
        ),
        None => (spec, None),
    };
    let p = |d: f64| param.unwrap_or(d);
    Ok(match name {
        "shoal" => Box::new(shoal::ShoalPolicy::default()),
        "dvfs" => Box::new(Dvfs),
        "thr-mmt" => Box::new(CloudSimPolicy::new(Detector::Thr(p(0.8)))),
        "iqr-mmt" => Box::new(CloudSimPolicy::new(Detector::Iqr(p(1.5)))),
        "mad-mmt" => Box::new(CloudSimPolicy::new(Detector::Mad(p(2.5)))),
        "lr-mmt" => Box::new(CloudSimPolicy::new(Detector::Lr(p(1.2)))),
        _ => return Err(SimError::UnknownPolicy(spec.to_owned())),
    })
}

/// The baselines of the reference table, in its order.
pub const BASELINES: [&str; 5] = ["dvfs", "thr-mmt:0.8", "iqr-mmt:1.5", "mad-mmt:2.5", "lr-mmt:1.2"];
