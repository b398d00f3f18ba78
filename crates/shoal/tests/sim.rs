//! `shoal sim` end to end: a small trace written on the fly, several policies, JSON and a plot.

mod common;

use std::process::Command;

use common::SHOAL;

fn trace(dir: &std::path::Path) -> std::path::PathBuf {
    let day = dir.join("day");
    std::fs::create_dir_all(&day).unwrap();
    for i in 0..40 {
        let samples: Vec<String> = (0..24).map(|k| ((i * 7 + k * 13) % 60 + 1).to_string()).collect();
        std::fs::write(day.join(format!("vm{i:02}")), samples.join("\n") + "\n").unwrap();
    }
    day
}

#[test]
fn sim_runs_policies_and_writes_json_and_a_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let day = trace(tmp.path());
    let svg = tmp.path().join("out.svg");
    let o = Command::new(SHOAL)
        .args([
            "--output",
            "json",
            "sim",
            "--trace",
            day.to_str().unwrap(),
            "--hosts",
            "40",
        ])
        .args([
            "--policy",
            "shoal",
            "--policy",
            "lr-mmt:1.2",
            "--plot",
            svg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let reports = v.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0]["policy"], "shoal");
    assert_eq!(reports[1]["policy"], "lr-mmt:1.2");
    for r in reports {
        for key in [
            "energy_kwh",
            "slatah",
            "pdm",
            "slav",
            "esv",
            "migrations",
            "hosts_powered_off_max",
        ] {
            assert!(r[key].is_number(), "{key} missing in {r}");
        }
        // 24 samples: decisions at the 2nd to the 24th (the reference model's last instant).
        assert_eq!(r["series"].as_array().unwrap().len(), 23);
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
    assert_eq!(
        plot.matches("<polyline").count(),
        6,
        "three panels, one line per policy"
    );

    let o = Command::new(SHOAL)
        .args(["sim", "--trace", day.to_str().unwrap(), "--policy", "nope"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown policy"));
}
