//! How results reach people (aligned tables, key/value sheets) and scripts (`--output json`).

// The renderers take `&Vec<T>` because `emit` hands them exactly what it serialises.
#![allow(clippy::ptr_arg)]

use serde::Serialize;
use shoal_model::api::{ClusterView, ProfileView};
use shoal_model::{format_mib, plural, Host, Operation, Template, Vm};

use crate::cli::Output;

/// An aligned table with an upper-case header row.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
    out
}

/// `key: value` lines for one object.
pub fn sheet(pairs: Vec<(&str, String)>) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .into_iter()
        .map(|(k, v)| format!("{:<w$} {v}\n", format!("{k}:")))
        .collect()
}

pub fn emit<T: Serialize>(output: Output, value: &T, human: impl FnOnce(&T) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).expect("API values serialise")),
        Output::Table => print!("{}", human(value)),
    }
}

/// The outcome of a command that changes something and shows no record: `value` on stdout for
/// scripts, or `sentence` on stderr for people (stdout stays empty, as for a deletion).
pub fn done<T: Serialize>(output: Output, value: &T, sentence: &str) {
    match output {
        Output::Json => emit(output, value, |_| String::new()),
        Output::Table => eprintln!("{sentence}"),
    }
}

/// What `… delete` reports: `{"kind": "template", "name": "deb", "deleted": true}`.
#[derive(Serialize)]
struct Deleted<'a> {
    kind: &'a str,
    name: &'a str,
    deleted: bool,
}

pub fn deleted(output: Output, kind: &str, name: &str) {
    let d = Deleted {
        kind,
        name,
        deleted: true,
    };
    done(output, &d, &format!("{kind} {name} deleted"));
}

/// A placement plan: the per-host verdicts when explained, then where each VM goes.
pub fn explanation(e: &shoal_policy::Explanation) -> String {
    if !e.hosts.is_empty() {
        return e.render();
    }
    if let Some(err) = &e.error {
        return format!("no plan: {err}\n");
    }
    let mut per_host: Vec<(String, u32)> = Vec::new();
    for a in &e.plan {
        match per_host.iter_mut().find(|(h, _)| *h == a.host) {
            Some(x) => x.1 += 1,
            None => per_host.push((a.host.clone(), 1)),
        }
    }
    let mut s = format!(
        "plan: {} on {}\n",
        plural(e.plan.len(), "VM"),
        plural(per_host.len(), "host")
    );
    s.push_str(&table(
        &["host", "vms"],
        per_host.into_iter().map(|(h, n)| vec![h, n.to_string()]).collect(),
    ));
    s
}

/// A rebalance or drain plan: scores before and after, then one row per migration.
pub fn rebalance(p: &shoal_policy::rebalance::RebalancePlan) -> String {
    let mut s = format!(
        "cluster score (Ganeti hbal's): {:.8} -> {:.8}; {} in {} ({})\n",
        p.before.total,
        p.after.total,
        plural(p.moves.len(), "migration"),
        plural(p.waves, "wave"),
        p.stopped
    );
    if !p.moves.is_empty() {
        s.push_str(&table(
            &["wave", "vm", "from", "to", "gain", "seconds", "score after"],
            p.moves
                .iter()
                .map(|m| {
                    vec![
                        m.wave.to_string(),
                        m.vm.clone(),
                        m.from.clone(),
                        m.to.clone(),
                        format!("{:.6}", m.gain),
                        format!("{:.1}", m.seconds),
                        format!("{:.6}", m.score_after),
                    ]
                })
                .collect(),
        ));
    }
    s
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn json_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn hosts(hosts: &Vec<Host>) -> String {
    table(
        &[
            "name",
            "state",
            "power",
            "driver",
            "cpus",
            "used cpus",
            "memory",
            "used memory",
            "vms",
            "address",
            "reason",
        ],
        hosts
            .iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    json_name(&h.state),
                    h.power.as_str().to_string(),
                    h.driver.clone(),
                    h.cpus.to_string(),
                    h.used_cpus.to_string(),
                    format_mib(h.memory_mib),
                    format_mib(h.used_memory_mib),
                    h.vms.to_string(),
                    h.address.clone(),
                    opt(&h.reason),
                ]
            })
            .collect(),
    )
}

pub fn host_power(p: &shoal_model::power::HostPower) -> String {
    let watts: Vec<String> = p.config.model.watts.iter().map(|w| format!("{w}")).collect();
    sheet(vec![
        ("host", p.host.clone()),
        ("state", p.state.as_str().to_string()),
        ("model", format!("{} W (idle to full load)", watts.join(", "))),
        (
            "on command",
            p.config.power_on_command.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "off command",
            p.config.power_off_command.clone().unwrap_or_else(|| "-".into()),
        ),
        ("last error", p.last_error.clone().unwrap_or_else(|| "-".into())),
    ])
}

pub fn energy(r: &shoal_model::power::EnergyReport) -> String {
    let mut s = table(
        &["host", "power", "cpu", "draw", "energy"],
        r.hosts
            .iter()
            .map(|h| {
                vec![
                    h.host.clone(),
                    h.state.as_str().to_string(),
                    format!("{:.0}%", h.cpu_util * 100.0),
                    format!("{:.0} W", h.power_w),
                    format!("{:.4} kWh", h.energy_kwh),
                ]
            })
            .collect(),
    );
    s.push_str(&format!("total: {:.0} W now, {:.4} kWh\n", r.power_w, r.energy_kwh));
    s
}

pub fn consolidation(p: &shoal_model::power::ConsolidationPlan) -> String {
    let mut s = String::new();
    for h in &p.power_on {
        s.push_str(&format!("switch on  {h}\n"));
    }
    for m in &p.moves {
        s.push_str(&format!("migrate    {} {} -> {}\n", m.vm, m.from, m.to));
    }
    for h in &p.power_off {
        s.push_str(&format!("switch off {h}\n"));
    }
    if s.is_empty() {
        s.push_str("nothing to do\n");
    }
    s
}

pub fn templates(ts: &Vec<Template>) -> String {
    table(
        &["name", "format", "size", "hash"],
        ts.iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    t.format.clone(),
                    format!("{} B", t.size_bytes),
                    t.hash.chars().take(23).collect(),
                ]
            })
            .collect(),
    )
}

pub fn template(t: &Template) -> String {
    sheet(vec![
        ("name", t.name.clone()),
        ("format", t.format.clone()),
        ("size", plural(t.size_bytes, "byte")),
        ("hash", t.hash.clone()),
        (
            "ready when",
            match &t.ready {
                shoal_model::Readiness::Report => "the guest reports its configuration succeeded".into(),
                shoal_model::Readiness::Pattern(p) => format!("the guest prints {p:?}"),
                shoal_model::Readiness::Running => "QEMU runs".into(),
            },
        ),
    ])
}

/// What a VM shape gives the guest: user, keys and user data, one line each.
fn guest_rows(s: &shoal_model::VmShape) -> Vec<(&'static str, String)> {
    vec![
        (
            "checkpoints",
            match s.ha.checkpoint_interval_s {
                Some(_) => format!(
                    "every {}, {} kept",
                    shoal_model::ha::format_interval(s.ha.checkpoint_interval_s),
                    s.ha.keep
                ),
                None => "off".into(),
            },
        ),
        ("ha priority", s.ha.priority.to_string()),
        ("user", s.user.clone().unwrap_or_else(|| "the image's default".into())),
        ("ssh keys", plural(s.ssh_keys.len(), "key")),
        (
            "user data",
            s.user_data
                .as_ref()
                .map(|u| plural(u.len(), "byte"))
                .unwrap_or_else(|| "-".into()),
        ),
    ]
}

pub fn profiles(ps: &Vec<ProfileView>) -> String {
    table(
        &["name", "parent", "template", "cpus", "memory", "disk"],
        ps.iter()
            .map(|p| {
                vec![
                    p.profile.name.clone(),
                    opt(&p.profile.parent),
                    p.effective.template.clone(),
                    p.effective.cpus.to_string(),
                    format_mib(p.effective.memory_mib),
                    p.effective
                        .disk_mib
                        .map(format_mib)
                        .unwrap_or_else(|| "template".into()),
                ]
            })
            .collect(),
    )
}

pub fn profile(p: &ProfileView) -> String {
    let inherited = |own: bool| if own { "" } else { " (inherited)" };
    let e = &p.effective;
    let o = &p.profile;
    sheet(
        vec![
            ("name", o.name.clone()),
            ("parent", opt(&o.parent)),
            ("template", format!("{}{}", e.template, inherited(o.template.is_some()))),
            ("cpus", format!("{}{}", e.cpus, inherited(o.cpus.is_some()))),
            (
                "memory",
                format!("{}{}", format_mib(e.memory_mib), inherited(o.memory_mib.is_some())),
            ),
            (
                "disk",
                format!(
                    "{}{}",
                    e.disk_mib.map(format_mib).unwrap_or_else(|| "template's size".into()),
                    inherited(o.disk_mib.is_some())
                ),
            ),
            ("network", opt(&e.network)),
        ]
        .into_iter()
        .chain(guest_rows(e))
        .collect(),
    )
}

pub fn clusters(cs: &Vec<ClusterView>) -> String {
    table(
        &["name", "profile", "size", "running", "state", "subnet", "placement"],
        cs.iter()
            .map(|c| {
                vec![
                    c.cluster.name.clone(),
                    c.cluster.profile.clone(),
                    c.cluster.size.to_string(),
                    c.vms_running.to_string(),
                    json_name(&c.cluster.state),
                    c.cluster.subnet.to_string(),
                    format!(
                        "{}/{}",
                        json_name(&c.cluster.placement),
                        json_name(&c.cluster.anti_affinity)
                    ),
                ]
            })
            .collect(),
    )
}

pub fn cluster(c: &ClusterView) -> String {
    let k = &c.cluster;
    sheet(
        vec![
            ("name", k.name.clone()),
            ("profile", k.profile.clone()),
            ("state", json_name(&k.state)),
            ("size", k.size.to_string()),
            ("vms", format!("{} running of {}", c.vms_running, c.vms_total)),
            ("subnet", k.subnet.to_string()),
            ("placement", json_name(&k.placement)),
            ("anti-affinity", json_name(&k.anti_affinity)),
            ("template", k.shape.template.clone()),
            (
                "vm shape",
                format!("{} vCPU, {}", k.shape.cpus, format_mib(k.shape.memory_mib)),
            ),
        ]
        .into_iter()
        .chain(guest_rows(&k.shape))
        .collect(),
    )
}

pub fn vms(vms: &Vec<Vm>) -> String {
    table(
        &["name", "cluster", "host", "state", "ip", "mac", "cpus", "memory"],
        vms.iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.cluster.clone(),
                    v.host.clone(),
                    v.state.as_str().into(),
                    v.ip.to_string(),
                    v.mac.to_string(),
                    v.cpus.to_string(),
                    format_mib(v.memory_mib),
                ]
            })
            .collect(),
    )
}

pub fn vm(v: &Vm) -> String {
    sheet(vec![
        ("name", v.name.clone()),
        ("uuid", v.uuid.to_string()),
        ("cluster", v.cluster.clone()),
        ("host", v.host.clone()),
        ("state", v.state.as_str().into()),
        ("ip", v.ip.to_string()),
        ("mac", v.mac.to_string()),
        ("cpus", v.cpus.to_string()),
        ("memory", format_mib(v.memory_mib)),
        ("template", v.template.clone()),
        (
            "disk",
            match &v.disk_base {
                Some(b) => format!("on checkpoint {b} (restarted after its host failed)"),
                None => "on its template".into(),
            },
        ),
        ("reason", opt(&v.reason)),
    ])
}

fn progress(o: &Operation) -> String {
    o.steps
        .iter()
        .map(|s| format!("{} {}/{}", s.name, s.done, s.total))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn operations(ops: &Vec<Operation>) -> String {
    table(
        &["id", "kind", "target", "state", "progress", "error"],
        ops.iter()
            .map(|o| {
                vec![
                    o.id.to_string(),
                    json_name(&o.kind),
                    o.target.clone(),
                    json_name(&o.state),
                    progress(o),
                    opt(&o.error),
                ]
            })
            .collect(),
    )
}

pub fn operation(o: &Operation) -> String {
    let mut out = sheet(vec![
        ("id", o.id.to_string()),
        ("kind", json_name(&o.kind)),
        ("target", o.target.clone()),
        ("state", json_name(&o.state)),
        ("error", opt(&o.error)),
    ]);
    out.push_str(&table(
        &["step", "state", "done", "message"],
        o.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                vec![
                    format!("{}. {}", i + 1, s.name),
                    json_name(&s.state),
                    format!("{}/{}", s.done, s.total),
                    s.message.clone(),
                ]
            })
            .collect(),
    ));
    out
}

pub fn image_stats(s: &shoal_model::api::ImageStats) -> String {
    let ratio = if s.stored_bytes > 0 {
        s.logical_bytes as f64 / s.stored_bytes as f64
    } else {
        0.0
    };
    sheet(vec![
        ("logical", plural(s.logical_bytes, "byte")),
        (
            "stored",
            format!("{} ({ratio:.1}x smaller)", plural(s.stored_bytes, "byte")),
        ),
        ("chunks", s.chunks.to_string()),
        ("images", s.manifests.to_string()),
        ("named", s.refs.to_string()),
    ])
}

pub fn image_gc(g: &shoal_model::api::ImageGc) -> String {
    format!(
        "removed {} and {}, freed {}\n",
        plural(g.manifests_removed, "image"),
        plural(g.chunks_removed, "chunk"),
        plural(g.bytes_freed, "byte")
    )
}

pub fn image_verify(v: &shoal_model::api::ImageVerify) -> String {
    let mut s = format!(
        "checked {}: {} corrupt (quarantined)\n",
        plural(v.chunks_checked, "chunk"),
        v.corrupt.len()
    );
    for d in &v.damaged {
        s.push_str(&format!("damaged: {d} (re-import it to repair)\n"));
    }
    s
}

pub fn vm_snapshot(s: &shoal_model::api::VmSnapshot) -> String {
    let pct = |a: u64, b: u64| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
    sheet(vec![
        ("vm", s.vm.clone()),
        ("image", s.image.clone()),
        ("manifest", s.manifest.clone()),
        (
            "size",
            format!("{} ({} of data)", plural(s.logical_bytes, "byte"), s.data_bytes),
        ),
        (
            "shared",
            format!(
                "{} with its template ({:.1} %)",
                plural(s.shared_with_template_bytes, "byte"),
                pct(s.shared_with_template_bytes, s.data_bytes)
            ),
        ),
        (
            "sent",
            format!(
                "{}, {}",
                plural(s.chunks_sent, "new chunk"),
                plural(s.bytes_sent, "byte")
            ),
        ),
    ])
}

/// Bytes as people read them: binary units, one decimal.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn age(unix_ms: u64) -> String {
    let s = shoal_model::now_ms().saturating_sub(unix_ms) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

fn replicas(c: &shoal_model::Checkpoint) -> String {
    let safe = if c.safe() { "safe" } else { "NOT SAFE: one copy" };
    format!("{} ({safe})", c.replicas.join(", "))
}

/// `vm checkpoint`.
pub fn checkpoint(c: &shoal_model::ha::CheckpointBlocks) -> String {
    let k = &c.checkpoint;
    sheet(vec![
        ("checkpoint", format!("#{}", k.seq)),
        ("manifest", k.manifest.clone()),
        (
            "kind",
            if k.incremental {
                "incremental (blocks written since the last checkpoint)".into()
            } else {
                "full (the VM's own blocks over its base image)".into()
            },
        ),
        ("host", k.host.clone()),
        ("disk", size(k.disk_bytes)),
        ("changed", size(k.changed_bytes)),
        ("read", size(k.read_bytes)),
        ("sent", size(k.bytes_sent)),
        ("took", format!("{:.2} s", k.seconds)),
        ("held by", replicas(k)),
        (
            "blocks",
            format!(
                "{} shared with the template, {} the VM's own ({} new since the last checkpoint)",
                size(c.blocks.template_bytes),
                size(c.blocks.own_bytes),
                size(c.blocks.new_bytes)
            ),
        ),
    ])
}

fn blocks_row(seq: String, when: String, b: &shoal_model::ha::BlockCounts, extra: Vec<String>) -> Vec<String> {
    let mut row = vec![
        seq,
        when,
        format!("{} ({})", b.template_chunks, size(b.template_bytes)),
        format!("{} ({})", b.own_chunks, size(b.own_bytes)),
        format!("{} ({})", b.new_chunks, size(b.new_bytes)),
        size(b.zero_bytes),
    ];
    row.extend(extra);
    row
}

/// `vm blocks`.
pub fn vm_blocks(v: &shoal_model::ha::VmBlocks) -> String {
    let head = format!(
        "VM {} (template {}): checkpoints every {}, {} kept\n",
        v.vm,
        v.template,
        shoal_model::ha::format_interval(v.checkpoint_interval_s),
        v.keep
    );
    if v.checkpoints.is_empty() {
        return format!("{head}no checkpoint yet (`shoal vm checkpoint {}` takes one)\n", v.vm);
    }
    let rows = v
        .checkpoints
        .iter()
        .map(|c| {
            let k = &c.checkpoint;
            blocks_row(
                format!("#{}", k.seq),
                age(k.taken_unix_ms),
                &c.blocks,
                vec![
                    if k.incremental { "incremental" } else { "full" }.into(),
                    size(k.read_bytes),
                    replicas(k),
                ],
            )
        })
        .collect();
    head + &table(
        &[
            "checkpoint",
            "taken",
            "shared (template)",
            "own",
            "new",
            "zeros",
            "kind",
            "read",
            "held by",
        ],
        rows,
    )
}

/// `cluster blocks`.
pub fn cluster_blocks(c: &shoal_model::ha::ClusterBlocks) -> String {
    let mut rows: Vec<Vec<String>> = c
        .vms
        .iter()
        .map(|v| match &v.latest {
            Some(l) => blocks_row(
                format!("{} #{}", v.vm, l.checkpoint.seq),
                age(l.checkpoint.taken_unix_ms),
                &l.blocks,
                vec![v.checkpoints.to_string()],
            ),
            None => vec![
                v.vm.clone(),
                "never".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "0".into(),
            ],
        })
        .collect();
    rows.push(blocks_row("total".into(), String::new(), &c.total, vec![String::new()]));
    table(
        &[
            "vm (latest)",
            "taken",
            "shared (template)",
            "own",
            "new",
            "zeros",
            "kept",
        ],
        rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["name", "ip"],
            vec![
                vec!["web-0".into(), "10.200.0.2".into()],
                vec!["db-10".into(), "x".into()],
            ],
        );
        insta::assert_snapshot!(t, @r"
        NAME   IP
        web-0  10.200.0.2
        db-10  x
        ");
    }
}
