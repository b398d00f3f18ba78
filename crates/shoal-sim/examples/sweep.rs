//! Sensitivity of Shoal's policy to its parameters, against `lr-mmt:1.2`, in the reference model
//! and with every VM running all day: the defaults were set a priori, and the targets should not
//! hinge on any one of them. `cargo run --release -p shoal-sim --example sweep [DAY-DIR]`

use shoal_sim::shoal::ShoalPolicy;
fn main() {
    let day = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "../shared/bench/planetlab/20110303".into());
    let mut w = shoal_sim::load_planetlab(std::path::Path::new(&day), 800).expect("the PlanetLab day");
    for full in [false, true] {
        w.reference_quirks = !full;
        let lr = shoal_sim::simulate(&w, shoal_sim::policy("lr-mmt:1.2").unwrap().as_mut()).unwrap();
        let variants: Vec<(&str, ShoalPolicy)> = vec![
            ("default", ShoalPolicy::default()),
            ("pack 0.80", {
                let mut p = ShoalPolicy::default();
                p.consolidator.pack = 0.80;
                p
            }),
            ("pack 0.90", {
                let mut p = ShoalPolicy::default();
                p.consolidator.pack = 0.90;
                p.consolidator.overload = 0.98;
                p
            }),
            (
                "overcommit 2",
                ShoalPolicy {
                    overcommit: 2.0,
                    ..Default::default()
                },
            ),
            (
                "overcommit 8",
                ShoalPolicy {
                    overcommit: 8.0,
                    ..Default::default()
                },
            ),
            ("boot 300 s", {
                let mut p = ShoalPolicy::default();
                p.power.boot_s = 300.0;
                p
            }),
            ("no cooldown", {
                let mut p = ShoalPolicy::default();
                p.consolidator.cooldown = 0;
                p
            }),
            ("windows 1/1", {
                let mut p = ShoalPolicy::default();
                p.consolidator.short_window = 1;
                p.consolidator.long_window = 1;
                p
            }),
            ("underload 1 step", {
                let mut p = ShoalPolicy::default();
                p.consolidator.underload_steps = 1;
                p
            }),
        ];
        for (name, mut p) in variants {
            let r = shoal_sim::simulate(&w, &mut p).unwrap();
            println!(
                "{:>5} {:<18} {:>7.2} kWh  ESV {:>6.1}% of lr  migr {:>5} ({:>4.1}%)  SLATAH {:.2}%",
                if full { "full" } else { "ref" },
                name,
                r.energy_kwh,
                r.esv / lr.esv * 100.0,
                r.migrations,
                r.migrations as f64 / lr.migrations as f64 * 100.0,
                r.slatah * 100.0
            );
        }
        println!("      lr-mmt:1.2 {:.2} kWh", lr.energy_kwh);
    }
}
