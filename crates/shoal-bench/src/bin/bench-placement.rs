//! `make bench-placement`: the policy core on its own, no controller.
//!
//! 1. Throughput: 100,000 VMs arriving as virtual clusters of 1–64 VMs (a quarter of them with
//!    hard anti-affinity by host) placed onto 10,000 heterogeneous hosts, explanations off, one
//!    core; in pack and in spread mode.
//! 2. Quality: hosts used by pack mode against a lower bound (per resource, the fewest hosts
//!    whose capacities, largest first, hold the total demand), on the big run and on random
//!    mixes, without and with hard anti-affinity (which that bound ignores).
//! 3. Rebalancing side by side with Ganeti's `hbal` on the states `gen.py --all` writes (20, 200
//!    and 2,000 hosts), every result scored by `score.py`, with and without `--ignore-dynu`.
//!
//! Usage: bench-placement [--hosts N] [--vms N] [--seed S] [--no-hbal] [--hbal-max-hosts N]
//! The yardstick is read from `$SHOAL_HBAL_BENCH` or `../shared/bench/hbal` (from the repository).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use shoal_bench::print_table;
use shoal_model::Placement;
use shoal_policy::rebalance::{self, RebalanceOptions};
use shoal_policy::{hbal, GangRequest, Host, Placer, Snapshot, Vm};

/// SplitMix64: a small deterministic generator, so every run places the same VMs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn weighted<'a, T>(&mut self, items: &'a [(T, u64)]) -> &'a T {
        let total: u64 = items.iter().map(|i| i.1).sum();
        let mut x = self.below(total);
        for (it, w) in items {
            if x < *w {
                return it;
            }
            x -= w;
        }
        &items[items.len() - 1].0
    }
}

/// gen.py's host kinds: (memory GiB, cores, local disk GiB), weight.
const HOST_TYPES: [((u64, u32, u64), u64); 5] = [
    ((64, 16, 960), 2),
    ((128, 32, 1920), 3),
    ((256, 48, 3840), 3),
    ((384, 64, 3840), 2),
    ((512, 128, 7680), 1),
];
/// gen.py's flavours: (vCPU, memory GiB, disk GiB), weight.
const FLAVOURS: [((u32, u64, u64), u64); 8] = [
    ((1, 1, 10), 10),
    ((1, 2, 20), 14),
    ((2, 4, 40), 20),
    ((4, 8, 80), 16),
    ((8, 16, 160), 10),
    ((4, 32, 100), 5),
    ((8, 32, 320), 4),
    ((16, 64, 500), 2),
];

fn hosts(n: usize, rng: &mut Rng) -> Snapshot {
    let mut s = Snapshot::default();
    for i in 0..n {
        let &(mem, cpus, disk) = rng.weighted(&HOST_TYPES);
        let mut h = Host::new(format!("host{i:05}"), cpus, mem * 1024, disk * 1024);
        h.cpu_overcommit = 4.0;
        h.reserved_cpus = 1;
        h.reserved_memory_mib = if mem <= 128 { 2048 } else { 4096 };
        h.labels
            .insert("zone".into(), format!("zone-{}", (b'a' + (i % 3) as u8) as char));
        h.labels.insert("rack".into(), format!("r{:03}", i / 40));
        s.hosts.push(h);
    }
    s
}

/// Gangs of 1–64 VMs of one flavour; with `anti_affinity`, a quarter of those of at most 32
/// VMs want one VM per host.
fn gangs(vms: usize, mode: Placement, anti_affinity: bool, rng: &mut Rng) -> Vec<GangRequest> {
    let mut out = Vec::new();
    let mut left = vms;
    while left > 0 {
        let size = (1 + rng.below(64) as usize).min(left);
        let &(cpus, mem, disk) = rng.weighted(&FLAVOURS);
        let mut r = GangRequest::new(format!("vc{:06}", out.len()), size as u32, cpus, mem * 1024);
        r.disk_mib = disk * 1024;
        r.placement = mode;
        if rng.below(4) == 0 && size <= 32 && anti_affinity {
            r.rules.anti_affinity = Some("host".into());
        }
        out.push(r);
        left -= size;
    }
    out
}

/// The fewest hosts that could hold the demand: per resource, largest capacities first.
fn lower_bound(s: &Snapshot, demand: [u64; 3]) -> usize {
    (0..3)
        .map(|r| {
            let mut caps: Vec<u64> = s.hosts.iter().map(|h| h.capacity()[r]).collect();
            caps.sort_unstable_by(|a, b| b.cmp(a));
            let mut sum = 0;
            caps.iter()
                .take_while(|&&c| {
                    let short = sum < demand[r];
                    sum += c;
                    short
                })
                .count()
        })
        .max()
        .unwrap_or(0)
}

struct Run {
    placed: usize,
    failed: usize,
    secs: f64,
    hosts_used: usize,
    lower_bound: usize,
}

fn run(s: &Snapshot, reqs: &[GangRequest], candidates: usize) -> Run {
    let mut p = Placer::new(s);
    p.candidates = candidates;
    let (mut placed, mut failed) = (0, 0);
    let mut demand = [0u64; 3];
    let t = Instant::now();
    for r in reqs {
        match p.place(r) {
            Ok(plan) => {
                placed += plan.len();
                demand[0] += r.cpus as u64 * plan.len() as u64;
                demand[1] += r.memory_mib * plan.len() as u64;
                demand[2] += r.disk_mib * plan.len() as u64;
            }
            Err(_) => failed += 1,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let hosts_used = (0..s.hosts.len())
        .filter(|&h| {
            let cap = s.hosts[h].capacity();
            let f = p.free(h);
            (0..3).any(|r| f[r] < cap[r] as i64)
        })
        .count();
    Run {
        placed,
        failed,
        secs,
        hosts_used,
        lower_bound: lower_bound(s, demand),
    }
}

struct Args {
    hosts: usize,
    vms: usize,
    seed: u64,
    hbal: bool,
    /// Largest state hbal is run on (hbal takes ~5 minutes per move at 200 hosts).
    hbal_max_hosts: usize,
    candidates: usize,
    rebalance: RebalanceOptions,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        hosts: 10_000,
        vms: 100_000,
        seed: 1,
        hbal: true,
        hbal_max_hosts: 200,
        candidates: shoal_policy::place::DEFAULT_CANDIDATES,
        rebalance: RebalanceOptions::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-hbal" {
            a.hbal = false;
            continue;
        }
        let v = it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--hosts" => a.hosts = v.parse()?,
            "--vms" => a.vms = v.parse()?,
            "--seed" => a.seed = v.parse()?,
            "--candidates" => a.candidates = v.parse()?,
            "--hbal-max-hosts" => a.hbal_max_hosts = v.parse()?,
            "--min-gain" => a.rebalance.min_gain = v.parse()?,
            "--cost-per-second" => a.rebalance.cost_per_second = v.parse()?,
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let mut result = serde_json::Map::new();

    // 1 and 2: throughput and packing quality.
    let mut rng = Rng(a.seed);
    let snap = hosts(a.hosts, &mut rng);
    let mut rows = Vec::new();
    let mut pack_run = None;
    for mode in [Placement::Pack, Placement::Spread] {
        let reqs = gangs(a.vms, mode, true, &mut Rng(a.seed + 1));
        let r = run(&snap, &reqs, a.candidates);
        rows.push(vec![
            format!("{mode:?}").to_lowercase(),
            format!("{}", a.hosts),
            format!("{}", reqs.len()),
            format!("{}", r.placed),
            format!("{}", r.failed),
            format!("{:.3}", r.secs),
            format!("{:.0}", r.placed as f64 / r.secs),
            format!("{}", r.hosts_used),
            format!("{}", r.lower_bound),
            format!("{:+.2}%", 100.0 * (r.hosts_used as f64 / r.lower_bound as f64 - 1.0)),
        ]);
        if mode == Placement::Pack {
            pack_run = Some(r);
        } else {
            result.insert(
                "spread_placements_per_sec".into(),
                (r.placed as f64 / r.secs).round().into(),
            );
        }
    }
    println!(
        "placement: {} VMs in virtual clusters of 1-64 onto {} heterogeneous hosts, one core",
        a.vms, a.hosts
    );
    print_table(
        &[
            "mode",
            "hosts",
            "clusters",
            "placed",
            "failed gangs",
            "seconds",
            "placements/s",
            "hosts used",
            "lower bound",
            "over bound",
        ],
        &rows,
    );
    let pack = pack_run.expect("pack ran");
    result.insert(
        "placements_per_sec".into(),
        (pack.placed as f64 / pack.secs).round().into(),
    );
    result.insert("vms_placed".into(), pack.placed.into());
    result.insert("hosts_used".into(), pack.hosts_used.into());
    result.insert("lower_bound".into(), pack.lower_bound.into());

    // Explaining one request over every host.
    let mut p = Placer::new(&snap);
    let mut r = GangRequest::new("explained", 16, 4, 8192);
    r.rules.anti_affinity = Some("rack".into());
    let t = Instant::now();
    let e = p.explain(&r);
    let explain_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "\nexplain: one 16-VM request over {} hosts in {explain_ms:.1} ms ({} rejected, plan: {})",
        a.hosts,
        e.hosts.iter().filter(|h| h.rejected.is_some()).count(),
        e.error.clone().unwrap_or_else(|| format!("{} VMs", e.plan.len()))
    );
    result.insert("explain_ms".into(), ((explain_ms * 10.0).round() / 10.0).into());

    // Random mixes: pack quality on other seeds and host counts, without and with hard
    // anti-affinity (which the lower bound ignores, so it is no longer tight there).
    let mut rows = Vec::new();
    let (mut worst, mut worst_aa): (f64, f64) = (0.0, 0.0);
    for seed in 11..16u64 {
        let mut row = Vec::new();
        for aa in [false, true] {
            let mut rng = Rng(seed);
            let n = 500 + rng.below(2000) as usize;
            let s = hosts(n, &mut rng);
            let vms = n * (6 + rng.below(5) as usize);
            let reqs = gangs(vms, Placement::Pack, aa, &mut rng);
            let r = run(&s, &reqs, a.candidates);
            let over = r.hosts_used as f64 / r.lower_bound as f64 - 1.0;
            if aa {
                worst_aa = worst_aa.max(over);
            } else {
                worst = worst.max(over);
                row.extend([
                    format!("{seed}"),
                    format!("{n}"),
                    format!("{}", r.placed),
                    format!("{}", r.lower_bound),
                ]);
            }
            row.extend([
                format!("{}", r.hosts_used),
                format!("{:+.2}%", 100.0 * over),
                format!("{}", r.failed),
            ]);
        }
        rows.push(row);
    }
    println!(
        "\npack quality on random mixes (lower bound: fewest hosts, largest first, holding each resource's demand)"
    );
    print_table(
        &[
            "seed",
            "hosts",
            "vms",
            "lower bound",
            "hosts used",
            "over bound",
            "failed gangs",
            "with anti-affinity: hosts used",
            "over bound",
            "failed gangs",
        ],
        &rows,
    );
    result.insert(
        "pack_worst_over_bound_pct".into(),
        ((worst * 1e4).round() / 100.0).into(),
    );
    result.insert(
        "pack_worst_over_bound_pct_with_anti_affinity".into(),
        ((worst_aa * 1e4).round() / 100.0).into(),
    );

    // 3: rebalancing against hbal.
    let reb = rebalancing(a.hbal, a.hbal_max_hosts, &a.rebalance)?;
    result.insert("rebalance".into(), reb);

    println!("{}", serde_json::Value::Object(result));
    Ok(())
}

fn bench_dir() -> PathBuf {
    std::env::var_os("SHOAL_HBAL_BENCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/bench/hbal"))
}

/// A gen.py state as a snapshot: shared storage, 4 vCPU per core as hbal's default `--max-cpu`.
fn from_gen(v: &serde_json::Value) -> anyhow::Result<Snapshot> {
    let num = |x: &serde_json::Value, k: &str| -> anyhow::Result<u64> {
        x[k].as_u64().ok_or_else(|| anyhow::anyhow!("{k} missing in {x}"))
    };
    let mut s = Snapshot {
        shared_storage: true,
        ..Default::default()
    };
    let ratio = v["vcpu_ratio"].as_f64().unwrap_or(4.0);
    for h in v["hosts"].as_array().into_iter().flatten() {
        let mut host = Host::new(
            h["name"].as_str().unwrap_or_default(),
            num(h, "cpus")? as u32,
            num(h, "memory_mib")?,
            num(h, "disk_gib")? * 1024,
        );
        host.reserved_memory_mib = num(h, "os_memory_mib").unwrap_or(0);
        host.reserved_cpus = num(h, "os_cpus").unwrap_or(1) as u32;
        host.cpu_overcommit = ratio;
        if let Some(z) = h["zone"].as_str() {
            host.labels.insert("zone".into(), z.into());
        }
        s.hosts.push(host);
    }
    for x in v["vms"].as_array().into_iter().flatten() {
        s.vms.push(Vm {
            name: x["name"].as_str().unwrap_or_default().into(),
            cluster: String::new(),
            host: x["host"].as_str().unwrap_or_default().into(),
            cpus: num(x, "cpus")? as u32,
            memory_mib: num(x, "memory_mib")?,
            disk_mib: num(x, "disk_gib")? * 1024,
            template: None,
            dirty_mib_s: None,
            overlay_mib: 0,
            anti_affinity: None,
        });
    }
    s.validate()?;
    Ok(s)
}

/// Writes `snap`'s placement back into gen.py's JSON, for score.py.
fn to_gen(orig: &serde_json::Value, snap: &Snapshot) -> serde_json::Value {
    let mut v = orig.clone();
    let hosts: std::collections::HashMap<&str, &str> =
        snap.vms.iter().map(|x| (x.name.as_str(), x.host.as_str())).collect();
    if let Some(vms) = v["vms"].as_array_mut() {
        for x in vms {
            let name = x["name"].as_str().unwrap_or_default().to_string();
            if let Some(h) = hosts.get(name.as_str()) {
                x["host"] = (*h).into();
            }
        }
    }
    v
}

fn score_py(dir: &Path, state: &Path, ignore_dynu: bool) -> anyhow::Result<f64> {
    let mut c = Command::new("python3");
    c.arg(dir.join("score.py")).arg(state);
    if ignore_dynu {
        c.arg("--ignore-dynu");
    }
    let out = c.output()?;
    anyhow::ensure!(
        out.status.success(),
        "score.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Installs Ganeti's htools when missing (idempotent); returns whether `hbal` is available.
fn ensure_hbal() -> bool {
    let have = || {
        Command::new("hbal")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have() {
        return true;
    }
    eprintln!("installing ganeti-htools for hbal …");
    let _ = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=600",
            "ganeti-htools",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    have()
}

/// Runs `hbal -t FILE` with `extra` options; returns (final score by score.py, moves, seconds).
fn run_hbal(
    dir: &Path,
    tmp: &Path,
    n: usize,
    orig: &serde_json::Value,
    ignore_dynu: bool,
    extra: &[&str],
) -> anyhow::Result<(f64, usize, f64)> {
    let txt = tmp.join(format!("cluster-{n}.txt"));
    let saved = tmp.join(format!("hbal-{n}-{ignore_dynu}"));
    let mut c = Command::new("hbal");
    c.arg("-t").arg(&txt).arg("-S").arg(&saved).args(extra);
    if ignore_dynu {
        c.arg("--ignore-dynu");
    }
    let t = Instant::now();
    let out = c.output()?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "hbal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // hbal ends with "Solution length=N".
    let moves = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Solution length=")?.parse::<usize>().ok())
        .ok_or_else(|| anyhow::anyhow!("no solution length in hbal's output: {stdout}"))?;
    let st = Command::new("python3")
        .arg(dir.join("ganeti2json.py"))
        .arg(format!("{}.balanced", saved.display()))
        .arg(tmp.join(format!("cluster-{n}.json")))
        .output()?;
    anyhow::ensure!(
        st.status.success(),
        "ganeti2json.py failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    // Score hbal's final placement with the original hosts (hbal's saved free memory is stale).
    let placed: serde_json::Value = serde_json::from_slice(&st.stdout)?;
    let mut merged = orig.clone();
    merged["vms"] = placed["vms"].clone();
    let scored = tmp.join(format!("hbal-{n}-{ignore_dynu}-scored.json"));
    std::fs::write(&scored, serde_json::to_vec(&merged)?)?;
    Ok((score_py(dir, &scored, ignore_dynu)?, moves, secs))
}

fn rebalancing(with_hbal: bool, hbal_max_hosts: usize, base: &RebalanceOptions) -> anyhow::Result<serde_json::Value> {
    let dir = bench_dir();
    anyhow::ensure!(
        dir.join("gen.py").exists(),
        "{} has no gen.py: set SHOAL_HBAL_BENCH to the hbal yardstick folder",
        dir.display()
    );
    let tmp = tempfile::tempdir()?;
    let st = Command::new("python3")
        .arg(dir.join("gen.py"))
        .args(["--all", "--out"])
        .arg(tmp.path())
        .output()?;
    anyhow::ensure!(
        st.status.success(),
        "gen.py failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let hbal_ok = with_hbal && ensure_hbal();
    let mut rows = Vec::new();
    let mut out = serde_json::Map::new();
    for n in [20usize, 200, 2000] {
        let path = tmp.path().join(format!("cluster-{n}.json"));
        let orig: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        let snap = from_gen(&orig)?;
        for ignore_dynu in [false, true] {
            let before_py = score_py(&dir, &path, ignore_dynu)?;
            let before = hbal::score(&snap, ignore_dynu).total;
            // hbal's own limits for comparison: 20 hosts run to the end; 200 hosts one move.
            let hbal_res = match n {
                _ if n > hbal_max_hosts => None,
                20 if hbal_ok => Some(run_hbal(&dir, tmp.path(), n, &orig, ignore_dynu, &[])?),
                200 if hbal_ok => Some(run_hbal(&dir, tmp.path(), n, &orig, ignore_dynu, &["-l", "1"])?),
                _ => None,
            };
            // hbal's objective (any gain) for the side-by-side, and the cost model as configured.
            let hbal_like = RebalanceOptions {
                ignore_dynu,
                cost_per_second: 0.0,
                min_gain: 1e-9,
                ..base.clone()
            };
            let costed = RebalanceOptions {
                ignore_dynu,
                ..base.clone()
            };
            let t = Instant::now();
            let plan = rebalance::plan(&snap, &hbal_like)?;
            let secs = t.elapsed().as_secs_f64();
            let scored = |moves: &[rebalance::Move], tag: &str| -> anyhow::Result<f64> {
                let path = tmp.path().join(format!("shoal-{n}-{ignore_dynu}-{tag}.json"));
                std::fs::write(
                    &path,
                    serde_json::to_vec(&to_gen(&orig, &rebalance::apply(&snap, moves)))?,
                )?;
                score_py(&dir, &path, ignore_dynu)
            };
            let after_py = scored(&plan.moves, "final")?;
            // After as many moves as hbal made (one when hbal was not run).
            let k = hbal_res.map(|h| h.1).unwrap_or(1);
            let at_k_py = scored(&plan.moves[..k.min(plan.moves.len())], "k")?;
            let t = Instant::now();
            let cplan = rebalance::plan(&snap, &costed)?;
            let csecs = t.elapsed().as_secs_f64();
            let cafter_py = scored(&cplan.moves, "costed")?;
            // The figure the target is about: moves until hbal's final score is reached, by the
            // plan (fewest moved VMs where plan quality is on) and by plain greedy (hbal's own
            // algorithm, which our plan follows move for move without it).
            let greedy = rebalance::plan_greedy(&snap, &hbal_like)?;
            let reach = |moves: &[rebalance::Move], tag: &str| -> anyhow::Result<Option<(usize, f64)>> {
                let Some((target, _, _)) = hbal_res else {
                    return Ok(None);
                };
                // Our score matches score.py to ~1e-12; confirm the prefix with score.py.
                let Some(k) = moves.iter().position(|m| m.score_after <= target + 1e-7) else {
                    return Ok(None);
                };
                let py = scored(&moves[..=k], tag)?;
                Ok(Some((k + 1, py)))
            };
            let reach_plan = reach(&plan.moves, "reach")?;
            let reach_greedy = reach(&greedy.moves, "reach-greedy")?;
            let key = format!("{n}{}", if ignore_dynu { "_ignore_dynu" } else { "" });
            rows.push(vec![
                format!("{n}"),
                if ignore_dynu {
                    "ignore-dynu".into()
                } else {
                    "default".into()
                },
                format!("{before_py:.4}"),
                format!("{:+.0e}", before - before_py),
                hbal_res.map_or("-".into(), |h| format!("{:.4} / {} / {:.1}s", h.0, h.1, h.2)),
                format!("{k}: {at_k_py:.4}"),
                format!("{after_py:.4} / {} / {:.3}s", plan.moves.len(), secs),
                format!(
                    "{cafter_py:.4} / {} / {:.3}s / {}",
                    cplan.moves.len(),
                    csecs,
                    cplan.waves
                ),
                match (hbal_res, reach_plan, reach_greedy) {
                    (Some(h), b, g) => {
                        let f = |r: Option<(usize, f64)>| {
                            r.map_or("never".to_string(), |r| format!("{} ({:.4})", r.0, r.1))
                        };
                        format!("{} / {} / {}", h.1, f(g), f(b))
                    }
                    _ => "-".into(),
                },
            ]);
            out.insert(
                key,
                serde_json::json!({
                    "initial": before_py,
                    "hbal_final": hbal_res.map(|h| h.0),
                    "hbal_moves": hbal_res.map(|h| h.1),
                    "hbal_seconds": hbal_res.map(|h| (h.2 * 100.0).round() / 100.0),
                    "shoal_at_hbal_moves": at_k_py,
                    "shoal_final": after_py,
                    "shoal_moves": plan.moves.len(),
                    "shoal_seconds": (secs * 1000.0).round() / 1000.0,
                    "shoal_costed_final": cafter_py,
                    "shoal_costed_moves": cplan.moves.len(),
                    "shoal_costed_seconds": (csecs * 1000.0).round() / 1000.0,
                    "moves_to_hbal_final": {
                        "hbal": hbal_res.map(|h| h.1),
                        "shoal_greedy": reach_greedy.map(|r| r.0),
                        "shoal_greedy_score": reach_greedy.map(|r| r.1),
                        "shoal": reach_plan.map(|r| r.0),
                        "shoal_score": reach_plan.map(|r| r.1),
                    },
                    "shoal_greedy_final": greedy.after.total,
                    "shoal_greedy_moves": greedy.moves.len(),
                }),
            );
        }
    }
    println!(
        "\nrebalancing vs hbal ({}), every score by score.py ({})",
        dir.display(),
        if hbal_ok {
            "20 hosts to the end, 200 hosts -l 1, 2,000 hosts not run"
        } else {
            "hbal not run"
        }
    );
    print_table(
        &[
            "hosts",
            "score",
            "initial",
            "ours - score.py",
            "hbal: final / moves / time",
            "shoal after K moves",
            "shoal, any gain: final / moves / time",
            "shoal, cost model: final / moves / time / waves",
            "moves to hbal's final: hbal / shoal greedy / shoal",
        ],
        &rows,
    );
    Ok(serde_json::Value::Object(out))
}
