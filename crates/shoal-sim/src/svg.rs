//! A small SVG writer for the per-step series: three stacked panels (hosts powered on, power,
//! share of active hosts short of CPU) over the day, one line per policy.

use std::fmt::Write;

use crate::report::{Report, StepSample};

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const W: f64 = 900.0;
const PANEL_H: f64 = 190.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const GAP: f64 = 45.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Rounds `max` up to a "nice" axis maximum (1, 2 or 5 times a power of ten).
fn nice(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&v| v >= max)
        .unwrap_or(10.0 * p)
}

pub fn plot(reports: &[Report]) -> String {
    type Metric = fn(&StepSample) -> f64;
    let panels: [(&str, Metric); 3] = [
        ("hosts powered on", |s| s.powered_on as f64),
        ("power (kW)", |s| s.power_w / 1000.0),
        ("active hosts short of CPU (%)", |s| s.sla_violation * 100.0),
    ];
    let h = TOP + panels.len() as f64 * (PANEL_H + GAP);
    let t_max = reports
        .iter()
        .flat_map(|r| r.series.iter().map(|s| s.t))
        .fold(0.0, f64::max)
        .max(1.0);
    let hours = t_max / 3600.0;
    let pw = W - LEFT - RIGHT;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = reports
        .first()
        .map(|r| format!("{} — {} VMs on {} hosts", r.workload, r.vms, r.hosts))
        .unwrap_or_default();
    let _ = writeln!(out, r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#, esc(&title));
    for (i, (label, metric)) in panels.iter().enumerate() {
        let y0 = TOP + i as f64 * (PANEL_H + GAP);
        let vmax = nice(
            reports
                .iter()
                .flat_map(|r| r.series.iter().map(metric))
                .fold(0.0, f64::max),
        );
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{y0}" width="{pw}" height="{PANEL_H}" fill="none" stroke="#888"/>"##
        );
        let _ = writeln!(out, r#"<text x="{LEFT}" y="{}">{}</text>"#, y0 - 6.0, esc(label));
        for k in 0..=4 {
            let v = vmax * k as f64 / 4.0;
            let y = y0 + PANEL_H - PANEL_H * k as f64 / 4.0;
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/>"##,
                LEFT + pw
            );
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                trim(v)
            );
        }
        let step_h = if hours > 12.0 { 3.0 } else { 1.0 };
        let mut x_h = 0.0;
        while x_h <= hours + 1e-9 {
            let x = LEFT + pw * x_h / hours;
            let _ = writeln!(
                out,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}h</text>"#,
                y0 + PANEL_H + 15.0,
                x_h
            );
            x_h += step_h;
        }
        for (j, r) in reports.iter().enumerate() {
            let mut pts = String::new();
            for s in &r.series {
                let x = LEFT + pw * s.t / t_max;
                let y = y0 + PANEL_H - PANEL_H * (metric(s) / vmax).clamp(0.0, 1.0);
                let _ = write!(pts, "{x:.1},{y:.1} ");
            }
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.4" points="{}"/>"#,
                COLOURS[j % COLOURS.len()],
                pts.trim_end()
            );
        }
    }
    for (j, r) in reports.iter().enumerate() {
        let y = TOP + 10.0 + j as f64 * 18.0;
        let x = W - RIGHT + 15.0;
        let c = COLOURS[j % COLOURS.len()];
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{c}" stroke-width="3"/>"#,
            x + 20.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">{}</text>"#,
            x + 26.0,
            y + 4.0,
            esc(&r.policy)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn trim(v: f64) -> String {
    if v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(7.3), 10.0);
        assert_eq!(nice(130.0), 200.0);
        assert_eq!(nice(0.04), 0.05);
    }
}
