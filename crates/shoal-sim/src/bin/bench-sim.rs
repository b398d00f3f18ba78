//! `make bench-sim`: every baseline and Shoal's policy on a PlanetLab day, side by side with the
//! reference figures (CloudSim 3.0.3, MODEL.md), whether each baseline is reproduced (within 5 %
//! of the reference energy and migrations) and whether Shoal meets the targets against
//! `lr-mmt:1.2`. Prints a table and, as its last line, one JSON object.
//!
//! Usage: bench-sim [--trace DIR] [--hosts N] [--full-day] [--plot FILE.svg]

use std::path::PathBuf;

use serde_json::json;
use shoal_sim::report::{reference, table, Targets};
use shoal_sim::{load_planetlab, policy, simulate, BASELINES};

fn main() {
    if let Err(e) = run() {
        eprintln!("bench-sim: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut trace = PathBuf::from("../shared/bench/planetlab/20110303");
    let mut hosts = 800;
    let mut full_day = false;
    let mut plot: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--full-day" => full_day = true,
            "--trace" | "--hosts" | "--plot" => {
                let v = it.next().ok_or(format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--trace" => trace = v.into(),
                    "--hosts" => hosts = v.parse()?,
                    _ => plot = Some(v.into()),
                }
            }
            _ => {
                return Err(format!(
                    "unknown flag {flag}; usage: bench-sim [--trace DIR] [--hosts N] [--full-day] [--plot FILE]"
                )
                .into())
            }
        }
    }
    let mut w = load_planetlab(&trace, hosts)?;
    w.reference_quirks = !full_day;
    println!(
        "bench-sim: {} ({} VMs, {} hosts, {} steps){}",
        trace.display(),
        w.vms.len(),
        w.hosts(),
        w.steps,
        if full_day { ", every VM all day" } else { "" }
    );

    let mut reports = Vec::new();
    for name in BASELINES.iter().copied().chain(["shoal"]) {
        reports.push(simulate(&w, policy(name)?.as_mut())?);
    }
    print!("{}", table(&reports));

    // Reference comparison (only meaningful for the reference day and model).
    let comparable = !full_day && w.name == "20110303" && hosts == 800;
    println!();
    println!(
        "{:<12}  {:>10}  {:>10}  {:>9}  {:>10}  {:>10}  {:>9}  reproduced",
        "policy", "energy", "reference", "Δ energy", "migrations", "reference", "Δ migr."
    );
    let mut rows = Vec::new();
    for r in &reports {
        let Some(want) = reference(&r.policy) else { continue };
        let de = r.energy_kwh / want.energy_kwh - 1.0;
        let dm = if want.migrations == 0 {
            r.migrations as f64
        } else {
            r.migrations as f64 / want.migrations as f64 - 1.0
        };
        let ok = de.abs() <= 0.05 && dm.abs() <= 0.05;
        println!(
            "{:<12}  {:>10.2}  {:>10.2}  {:>8.1}%  {:>10}  {:>10}  {:>8.1}%  {}",
            r.policy,
            r.energy_kwh,
            want.energy_kwh,
            de * 100.0,
            r.migrations,
            want.migrations,
            dm * 100.0,
            if !comparable {
                "n/a"
            } else if ok {
                "yes"
            } else {
                "NO"
            }
        );
        rows.push(json!({
            "policy": r.policy, "energy_kwh": r.energy_kwh, "reference_energy_kwh": want.energy_kwh,
            "migrations": r.migrations, "reference_migrations": want.migrations,
            "slatah": r.slatah, "reference_slatah": want.slatah, "pdm": r.pdm, "reference_pdm": want.pdm,
            "slav": r.slav, "reference_slav": want.slav, "esv": r.esv, "reference_esv": want.esv,
            "sim_seconds": r.sim_seconds, "within_5_percent": comparable && ok,
        }));
    }

    let lr = reports
        .iter()
        .find(|r| r.policy == "lr-mmt:1.2")
        .ok_or("no lr-mmt run")?;
    let shoal = reports.iter().find(|r| r.policy == "shoal").ok_or("no shoal run")?;
    let t = Targets::check(shoal, lr);
    let mark = |b: bool| if b { "met" } else { "MISSED" };
    println!();
    println!("shoal vs lr-mmt:1.2 (same run):");
    println!(
        "  energy      {:>9.2} kWh  vs {:>9.2}   no more            {}",
        shoal.energy_kwh,
        lr.energy_kwh,
        mark(t.energy_ok)
    );
    println!(
        "  ESV         {:>9.3e}      vs {:>9.3e}   at most 30 %       {} ({:.1} %)",
        shoal.esv,
        lr.esv,
        mark(t.esv_ok),
        shoal.esv / lr.esv * 100.0
    );
    println!(
        "  migrations  {:>9}      vs {:>9}   at most a tenth    {} ({:.1} %)",
        shoal.migrations,
        lr.migrations,
        mark(t.migrations_ok),
        shoal.migrations as f64 / lr.migrations as f64 * 100.0
    );
    println!(
        "  sim time    {:>9.3} s    (reference toolkit: ~63 s idle)   under 1 s          {}",
        shoal.sim_seconds,
        mark(t.time_ok)
    );

    if let Some(p) = &plot {
        std::fs::write(p, shoal_sim::svg::plot(&reports))?;
        println!("plot: {}", p.display());
    }
    let result = json!({
        "bench": "sim",
        "trace": trace.display().to_string(),
        "vms": w.vms.len(),
        "hosts": w.hosts(),
        "full_day": full_day,
        "baselines": rows,
        "shoal": {
            "energy_kwh": shoal.energy_kwh, "slatah": shoal.slatah, "pdm": shoal.pdm, "slav": shoal.slav,
            "esv": shoal.esv, "migrations": shoal.migrations, "host_boots": shoal.host_boots,
            "hosts_powered_off_max": shoal.hosts_powered_off_max, "sim_seconds": shoal.sim_seconds,
        },
        "targets": {
            "energy": t.energy_ok, "esv": t.esv_ok, "migrations": t.migrations_ok, "sim_time": t.time_ok, "all": t.all(),
        },
    });
    println!("{result}");
    Ok(())
}
