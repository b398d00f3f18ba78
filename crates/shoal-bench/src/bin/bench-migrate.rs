//! `make bench-migrate`: moving a running VM between two hosts, through Shoal and with bare QEMU.
//!
//! 1. For an idle and a busy 128 MiB demo guest (`scripts/migration/workloads/`: a line
//!    `tick N` every ~10 ms; the busy one also rewrites and checks 32 MiB of memory), in `pause`
//!    and in `live` mode: one `shoal vm migrate` between the two QEMU hosts of a `shoal up`, and
//!    the same migration driven by `scripts/migration/bare-migrate.py` (QMP only, no Shoal: the
//!    anchor). Total time (Shoal: the operation's own start and end; bare: destination started
//!    to guest running), the pause the guest sees (host-stamped consoles: the source's last byte
//!    to the destination's first), QEMU's downtime, and the bytes moved per MiB of memory and of
//!    overlay.
//! 2. Busy guests migrated back and forth in `auto` mode (`pause` under TCG): how many came out
//!    corrupted (the guest's own check says `BAD`, or its counter does not go on).
//! 3. `host drain` of a host with four idle guests.
//!
//! Usage: bench-migrate PATH-TO-SHOAL [--busy-runs N] [--scripts DIR]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_bench::{free_port, print_table, spawn, until};
use shoal_client::Client;
use shoal_model::agent::{MigrationMode, MigrationParams};
use shoal_model::api::{CreateCluster, CreateProfile};
use shoal_model::{MigrateVm, OperationState, Placement, Vm};

/// A console file followed from a thread: each read that returned bytes, stamped with the
/// host's clock when it was seen.
struct Tail {
    reads: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Tail {
    fn follow(path: PathBuf) -> Tail {
        let reads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, s) = (reads.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::{Read, Seek};
            let mut offset = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut f) = std::fs::File::open(&path) {
                    let mut buf = Vec::new();
                    if f.seek(std::io::SeekFrom::Start(offset)).is_ok()
                        && f.read_to_end(&mut buf).is_ok()
                        && !buf.is_empty()
                    {
                        offset += buf.len() as u64;
                        r.lock()
                            .unwrap()
                            .push((Instant::now(), String::from_utf8_lossy(&buf).into_owned()));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Tail { reads, stop }
    }

    fn text(&self) -> String {
        self.reads.lock().unwrap().iter().map(|(_, t)| t.as_str()).collect()
    }

    fn first(&self) -> Option<Instant> {
        self.reads.lock().unwrap().first().map(|(t, _)| *t)
    }

    fn last(&self) -> Option<Instant> {
        self.reads.lock().unwrap().last().map(|(t, _)| *t)
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The values of `word N` lines, in order (the demo guest prefixes script output with `user-data: `).
fn numbers(text: &str, word: &str) -> Vec<u64> {
    let pat = format!("{word} ");
    text.lines()
        .filter_map(|l| {
            l.trim_end()
                .rsplit_once(&pat)?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// One migration's figures.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Run {
    total_s: f64,
    guest_downtime_ms: f64,
    qemu_downtime_ms: Option<u64>,
    ram_bytes: u64,
    disk_bytes: u64,
    /// The source's overlay as it took space on disk before the move.
    overlay_bytes: u64,
    counter_continues: bool,
    bad: bool,
}

struct Lab {
    client: Client,
    data: PathBuf,
    hosts: Vec<String>,
}

impl Lab {
    fn console(&self, host: &str, vm: &Vm) -> PathBuf {
        self.data
            .join("agents")
            .join(host)
            .join("qemu/vms")
            .join(vm.uuid.to_string())
            .join("console.log")
    }

    async fn cluster(&self, name: &str, profile: &str, size: u32, placement: Placement) -> anyhow::Result<Vec<Vm>> {
        let op = self
            .client
            .create_cluster(&CreateCluster {
                name: name.into(),
                profile: profile.into(),
                size,
                placement,
                ..Default::default()
            })
            .await?;
        let op = self.client.wait(op.id, |_| {}).await?;
        anyhow::ensure!(op.state == OperationState::Succeeded, "cluster {name}: {:?}", op.error);
        Ok(self.client.vms(Some(name)).await?)
    }

    async fn delete(&self, name: &str) -> anyhow::Result<()> {
        let op = self.client.delete_cluster(name).await?;
        self.client.wait(op.id, |_| {}).await?;
        Ok(())
    }

    /// Migrates `vm` to the other host in `mode`, following both consoles.
    async fn migrate(&self, vm: &Vm, mode: MigrationMode, settle: Duration) -> anyhow::Result<(Vm, Run)> {
        let vm = self.client.vm(&vm.name).await?;
        let to = self.hosts.iter().find(|h| **h != vm.host).unwrap().clone();
        let src = Tail::follow(self.console(&vm.host, &vm));
        until(Duration::from_secs(120), "the guest's ticks", || async {
            (numbers(&src.text(), "tick").len() > 5).then_some(())
        })
        .await?;
        tokio::time::sleep(settle).await;
        // A copy the destination kept from an earlier visit goes when its host reports it;
        // its console must not be taken for the new one's.
        let dst_console = self.console(&to, &vm);
        until(Duration::from_secs(60), "the destination's old copy to go", || async {
            (!dst_console.exists()).then_some(())
        })
        .await?;
        let overlay_bytes = {
            use std::os::unix::fs::MetadataExt;
            let disk = self.console(&vm.host, &vm).with_file_name("disk.qcow2");
            std::fs::metadata(disk).map(|m| m.blocks() * 512).unwrap_or(0)
        };
        let dst = Tail::follow(dst_console);
        let op = self
            .client
            .migrate_vm(
                &vm.name,
                &MigrateVm {
                    to: Some(to.clone()),
                    params: MigrationParams {
                        mode,
                        ..Default::default()
                    },
                },
            )
            .await?;
        let op = self.client.wait(op.id, |_| {}).await?;
        until(
            Duration::from_secs(30),
            "the guest's ticks on the destination",
            || async { (numbers(&dst.text(), "tick").len() > 2).then_some(()) },
        )
        .await?;
        let p = op
            .migration
            .clone()
            .ok_or_else(|| anyhow::anyhow!("operation {} has no migration progress", op.id))?;
        let (src_ticks, dst_ticks) = (numbers(&src.text(), "tick"), numbers(&dst.text(), "tick"));
        let last = src_ticks.last().copied().unwrap_or(0);
        let run = Run {
            total_s: (op.finished_unix_ms.unwrap_or(op.created_unix_ms) - op.created_unix_ms) as f64 / 1000.0,
            guest_downtime_ms: match (src.last(), dst.first()) {
                (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64() * 1000.0,
                _ => f64::NAN,
            },
            qemu_downtime_ms: p.downtime_ms,
            ram_bytes: p.ram_sent_bytes,
            disk_bytes: p.disk_sent_bytes,
            overlay_bytes,
            // A line cut by the pause may lose its number: the next one is last + 1 or + 2.
            counter_continues: dst_ticks.first().is_some_and(|f| *f > last && *f <= last + 2),
            bad: dst.text().contains("BAD") || src.text().contains("BAD"),
        };
        Ok((self.client.vm(&vm.name).await?, run))
    }
}

/// The bare-QEMU anchor: one migration by `bare-migrate.py`, its JSON line.
fn bare(
    scripts: &Path,
    t: &shoal_demo::DemoTemplate,
    workload: &str,
    mode: &str,
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let work = dir.join(format!("bare-{workload}-{mode}"));
    std::fs::create_dir_all(&work)?;
    let seed = work.join("seed.img");
    let st = std::process::Command::new("python3")
        .arg(scripts.join("mkseed.py"))
        .arg(&seed)
        .arg(scripts.join("workloads").join(format!("{workload}.sh")))
        .status()?;
    anyhow::ensure!(st.success(), "mkseed.py failed");
    let out = std::process::Command::new("python3")
        .arg(scripts.join("bare-migrate.py"))
        .args([
            "--kernel",
            t.kernel.to_str().unwrap(),
            "--initrd",
            t.initrd.to_str().unwrap(),
        ])
        .args([
            "--append",
            &t.cmdline,
            "--base",
            t.disk.to_str().unwrap(),
            "--seed",
            seed.to_str().unwrap(),
        ])
        .args([
            "--mode",
            mode,
            "--workload",
            workload,
            "--settle-s",
            "2",
            "--workdir",
            work.to_str().unwrap(),
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bare-migrate.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    Ok(serde_json::from_str(&line)?)
}

fn f(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.digits$}")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let shoal = PathBuf::from(
        args.get(1)
            .ok_or_else(|| anyhow::anyhow!("usage: bench-migrate PATH-TO-SHOAL [--busy-runs N] [--scripts DIR]"))?,
    );
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let busy_runs: usize = opt("--busy-runs").map(|v| v.parse()).transpose()?.unwrap_or(20);
    let scripts = PathBuf::from(opt("--scripts").unwrap_or_else(|| "scripts/migration".into()));
    anyhow::ensure!(
        scripts.join("bare-migrate.py").exists(),
        "no {}: run from the repository's root or pass --scripts",
        scripts.join("bare-migrate.py").display()
    );
    let dir = tempfile::tempdir()?;
    let template = shoal_demo::build_demo_template(&dir.path().join("template"))?;

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("up");
    let _up = spawn(
        &shoal,
        &[
            "up",
            "--hosts",
            "2",
            "--driver",
            "qemu",
            "--accel",
            "tcg",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--host-cpus",
            "8",
            "--host-memory",
            "4096",
        ],
        &dir.path().join("up.log"),
    )?;
    let client = Client::new(&url, None);
    let hosts = until(Duration::from_secs(60), "2 hosts", || async {
        client.hosts().await.ok().filter(|h| h.len() == 2)
    })
    .await?;
    let lab = Lab {
        client,
        data,
        hosts: hosts.into_iter().map(|h| h.name).collect(),
    };
    shoal_bench::import_demo(&lab.client, &template).await?;
    for w in ["idle", "busy"] {
        lab.client
            .create_profile(&CreateProfile {
                name: w.into(),
                template: Some("demo".into()),
                cpus: Some(1),
                memory: Some("128MiB".into()),
                user_data: Some(std::fs::read_to_string(
                    scripts.join("workloads").join(format!("{w}.sh")),
                )?),
                ..Default::default()
            })
            .await?;
    }

    // 1. Shoal and bare QEMU, side by side.
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut within = true;
    for w in ["idle", "busy"] {
        for (mode, m) in [("pause", MigrationMode::Pause), ("live", MigrationMode::Live)] {
            let name = format!("{w}-{mode}");
            let vm = lab.cluster(&name, w, 1, Placement::Spread).await?.remove(0);
            let (_, s) = lab.migrate(&vm, m, Duration::from_secs(2)).await?;
            lab.delete(&name).await?;
            let b = bare(&scripts, &template, w, mode, dir.path())?;
            let b_total = b["total_s"].as_f64().unwrap_or(f64::NAN);
            let b_down = b["guest_downtime_ms"].as_f64().unwrap_or(f64::NAN);
            let ram_mib = 128.0;
            let overlay_mib = (s.overlay_bytes as f64 / 1048576.0).max(f64::MIN_POSITIVE);
            within &= s.guest_downtime_ms <= b_down + 20.0 && s.total_s <= 1.2 * b_total;
            rows.push(vec![
                w.to_string(),
                mode.to_string(),
                f(s.total_s, 2),
                f(b_total, 2),
                f(s.total_s / b_total, 2),
                f(s.guest_downtime_ms, 0),
                f(b_down, 0),
                s.qemu_downtime_ms.map_or("-".into(), |d| d.to_string()),
                b["qemu_downtime_ms"].as_u64().map_or("-".into(), |d| d.to_string()),
                f(s.ram_bytes as f64 / 1048576.0 / ram_mib, 2),
                f(s.disk_bytes as f64 / 1048576.0 / overlay_mib, 2),
                format!("{}", s.counter_continues),
            ]);
            results.push(serde_json::json!({
                "workload": w, "mode": mode, "shoal": s, "bare": b,
            }));
        }
    }
    print_table(
        &[
            "guest",
            "mode",
            "shoal s",
            "bare s",
            "ratio",
            "shoal pause ms",
            "bare pause ms",
            "shoal qemu ms",
            "bare qemu ms",
            "RAM MiB/MiB",
            "disk MiB/MiB",
            "counter ok",
        ],
        &rows,
    );

    // 2. Busy guests back and forth in auto mode.
    let mut vm = lab.cluster("soak", "busy", 1, Placement::Spread).await?.remove(0);
    let (mut corrupted, mut downtimes) = (0usize, Vec::new());
    for i in 0..busy_runs {
        let (moved, r) = lab
            .migrate(&vm, MigrationMode::Auto, Duration::from_millis(500))
            .await?;
        if r.bad || !r.counter_continues {
            corrupted += 1;
            eprintln!("busy run {i}: corrupted or stalled guest: {r:?}");
        }
        downtimes.push(r.guest_downtime_ms);
        vm = moved;
    }
    lab.delete("soak").await?;
    downtimes.sort_by(f64::total_cmp);
    let median_down = downtimes.get(downtimes.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "\n{busy_runs} busy migrations in auto mode: {corrupted} corrupted, median guest pause {median_down:.0} ms"
    );

    // 3. A drain of a host with four idle guests.
    let four = lab.cluster("four", "idle", 4, Placement::Pack).await?;
    let from = four[0].host.clone();
    anyhow::ensure!(
        four.iter().all(|v| v.host == from),
        "pack put the four guests on one host"
    );
    let t = Instant::now();
    lab.client.drain_host(&from, &Default::default(), true).await?;
    let drain_s = t.elapsed().as_secs_f64();
    let moved = lab.client.vms(Some("four")).await?;
    anyhow::ensure!(moved.iter().all(|v| v.host != from), "the drain left VMs on {from}");
    println!("drain of a host with 4 idle guests: {drain_s:.2} s (target < 10 s)");
    // QEMU outlives `shoal up` by design: leave no guest behind.
    lab.delete("four").await?;

    let json = serde_json::json!({
        "bench": "migrate",
        "runs": results,
        "busy_runs": busy_runs,
        "busy_corrupted": corrupted,
        "busy_median_guest_pause_ms": median_down,
        "drain_4_idle_s": drain_s,
        "targets_met": within && corrupted == 0 && drain_s < 10.0,
    });
    println!("{json}");
    Ok(())
}
