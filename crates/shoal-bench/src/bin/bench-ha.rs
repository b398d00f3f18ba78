//! `make bench-ha`: how long a host's death takes to repair, and what a disk checkpoint costs.
//!
//! 1. *Simulated*: an in-process controller and 100 simulated agents (1,000 one-vCPU VMs in ten
//!    clusters of 100, spread), heartbeats every 5 s, host timeout 10 s, fence margin 6 s. Each
//!    agent runs on a runtime thread of its own, so that killing one drops every task and socket
//!    it had at once, as a dead host would (its VMs die with it). One host holding ~10 VMs is
//!    killed at T0; from the controller's store: detection (the failure record's
//!    `detected_unix_ms` − T0), fencing (`fenced_unix_ms` − detected) and restart (every one of
//!    its VMs `running` on another host − fenced). Alternately fenced by a power-off command
//!    (`true`) and by the lease (no command), a different host each time; afterwards every live
//!    agent is asked what it runs, and no VM may run twice.
//! 2. *Real guests under TCG*: `shoal server` and three `shoal agent` processes (QEMU driver,
//!    heartbeat 1 s, host timeout 10 s, fence margin 3 s), a cluster of three demo guests
//!    checkpointed every 10 s. Lease mode: the agent and its QEMUs are killed (SIGKILL) at T0.
//!    Power-off mode: only the agent is killed; its guests run on until the power-off command
//!    (this program, `--kill-qemus-under DIR`) stops them, so fencing is what really stops them.
//!    Detection and fencing come from the server's log lines, restart from polling the API.
//! 3. *Checkpoint cost*: a demo guest with a 1 GiB disk, one full checkpoint, then for 1 %, 10 %
//!    and 50 % of the disk's 64 KiB clusters: that many distinct random clusters written with
//!    random data through the guest's own QEMU (`human-monitor-command` `qemu-io`, so that QEMU's
//!    dirty bitmap sees them), then side by side on the same overlay: `qemu-img convert` of the
//!    overlay alone (`-B`: its own clusters), a full copy (`cp --sparse=never` of the whole disk
//!    as a fully allocated raw file, made beforehand) and `shoal vm checkpoint`.
//!
//! Prints a table per part and, as its last line, one JSON object with every figure and whether
//! each target was met: simulated host loss to all VMs running elsewhere ≤ 15 s; real guests
//! ≤ 60 s; an incremental checkpoint of 1 % changed blocks reads and sends ≤ 2 % of the disk.
//!
//! Usage: bench-ha PATH-TO-SHOAL [--only sim|tcg|checkpoint] [--sim-runs N] [--sim-hosts N]
//!        [--sim-vms N] [--work-dir DIR (parts 2 and 3 keep their logs and data there)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use serde::Serialize;
use shoal_agent::AgentConfig;
use shoal_bench::{free_port, print_table, spawn, until, Proc};
use shoal_client::{AgentClient, Client};
use shoal_controller::{Controller, ControllerConfig};
use shoal_hv::SimDriver;
use shoal_model::api::{CreateCluster, CreateProfile};
use shoal_model::power::HostPowerConfig;
use shoal_model::{now_ms, AntiAffinity, OperationKind, OperationState, Placement, Vm, VmState};

/// Simulated part: the agents' heartbeat interval, the controller's host timeout (two missed
/// heartbeats) and fence margin (at least a heartbeat plus a second, `docs/ha.md`).
const SIM_HEARTBEAT: Duration = Duration::from_secs(5);
const SIM_HOST_TIMEOUT: Duration = Duration::from_secs(10);
const SIM_FENCE_MARGIN: Duration = Duration::from_secs(6);
/// Real-guest part: the same settings, as `shoal server` and `shoal agent` flags.
const TCG_HEARTBEAT_S: &str = "1";
const TCG_HOST_TIMEOUT_S: &str = "10";
const TCG_FENCE_MARGIN_S: &str = "3";
const TCG_CHECKPOINT_INTERVAL: &str = "10s";

/// How each part measures, printed under its table and kept in the JSON.
fn sim_notes() -> String {
    format!(
        "each agent on a runtime thread of its own (1 worker); killed = its runtime dropped: listener, \
         connections, tasks and its (ephemeral) simulated VMs gone at once; detection and fencing from the \
         failure record, restart from the store polled every 50 ms; the lease cannot fence sooner than host \
         timeout + fence margin ({} s) after the last sign of life, so lease mode cannot meet {SIM_TARGET_S} s \
         with these settings",
        (SIM_HOST_TIMEOUT + SIM_FENCE_MARGIN).as_secs()
    )
}
const TCG_NOTES: &str = "lease: the agent and its QEMUs are SIGKILLed at T0; power_off: only the agent is \
    SIGKILLed at T0 and its guests run on until the power-off command (this program, --kill-qemus-under DIR) \
    kills them; detection and fencing from the server log's timestamps, restart from the API polled every \
    100 ms; running twice: live QEMU processes per VM uuid afterwards";
const CHECKPOINT_NOTES: &str = "writes: distinct random 64 KiB clusters past the template's 64 MiB file system, \
    fresh random data each (nothing deduplicates or compresses), by HMP qemu-io on the VM's QMP socket, then \
    flushed; shoal read = bytes read from the changed blocks' file (QEMU's backup job and qemu-img convert \
    read them before, on the host), sent = to the controller (a second host then pulls as much again, in \
    the API time); convert = qemu-img convert -U -B of the overlay alone, read = its own data (qemu-img map); \
    full copy = cp --sparse=never of the whole disk as a fully allocated raw file made beforehand; all from \
    a warm page cache";

const SIM_TARGET_S: f64 = 15.0;
const TCG_TARGET_S: f64 = 60.0;
/// The 1 % checkpoint may read and send at most this share of the disk.
const CHECKPOINT_TARGET_SHARE: f64 = 0.02;

const CLUSTER: u64 = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Fence {
    PowerOff,
    Lease,
}

impl Fence {
    fn as_str(self) -> &'static str {
        match self {
            Fence::PowerOff => "power_off",
            Fence::Lease => "lease",
        }
    }
}

/// One host killed and repaired.
#[derive(Clone, Debug, Serialize)]
struct Failover {
    mode: Fence,
    host: String,
    vms: usize,
    detection_s: f64,
    fencing_s: f64,
    restart_s: f64,
    total_s: f64,
    /// VMs found running on more than one live host afterwards.
    running_twice: usize,
    /// How the evacuation said its VMs restarted: from a checkpoint, from their template.
    from_checkpoint: usize,
    from_template: usize,
    /// What the evacuation's restart step said once it finished.
    #[serde(skip)]
    restart_message: String,
}

impl Failover {
    /// From T0 (unix ms), the failure record's times and when the last VM ran elsewhere.
    fn new(mode: Fence, host: &str, vms: usize, t0: u64, detected: u64, fenced: u64, done: u64) -> Failover {
        let s = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1000.0;
        Failover {
            mode,
            host: host.to_string(),
            vms,
            detection_s: s(t0, detected),
            fencing_s: s(detected, fenced),
            restart_s: s(fenced, done),
            total_s: s(t0, done),
            running_twice: 0,
            from_checkpoint: 0,
            from_template: 0,
            restart_message: String::new(),
        }
    }

    /// Reads the evacuation's restart step once the operation finished.
    async fn read_evacuation(&mut self, client: &Client) -> anyhow::Result<()> {
        let host = self.host.clone();
        let op = until(Duration::from_secs(30), "the evacuation to finish", || async {
            client
                .operations()
                .await
                .ok()?
                .into_iter()
                .filter(|o| o.kind == OperationKind::HostEvacuate && o.target == host)
                .max_by_key(|o| o.created_unix_ms)
                .filter(|o| o.state != OperationState::Running)
        })
        .await?;
        ensure!(
            op.state == OperationState::Succeeded,
            "the evacuation of {host} ended {:?}: {:?}",
            op.state,
            op.error
        );
        self.restart_message = op.steps.get(1).map(|s| s.message.clone()).unwrap_or_default();
        self.from_checkpoint = self.restart_message.matches("from checkpoint #").count();
        self.from_template = self.restart_message.matches("from its template").count();
        Ok(())
    }
}

/// Median and maximum of each phase over one fencing mode's runs.
#[derive(Clone, Debug, Serialize)]
struct Summary {
    mode: Fence,
    runs: usize,
    detection_median_s: f64,
    detection_max_s: f64,
    fencing_median_s: f64,
    fencing_max_s: f64,
    restart_median_s: f64,
    restart_max_s: f64,
    total_median_s: f64,
    total_max_s: f64,
    target_s: f64,
    /// Every run's total within the target.
    target_met: bool,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn summarize(runs: &[Failover], mode: Fence, target_s: f64) -> Option<Summary> {
    let r: Vec<&Failover> = runs.iter().filter(|r| r.mode == mode).collect();
    if r.is_empty() {
        return None;
    }
    let col = |f: fn(&Failover) -> f64| r.iter().map(|x| f(x)).collect::<Vec<f64>>();
    let (d, f, s, t) = (
        col(|x| x.detection_s),
        col(|x| x.fencing_s),
        col(|x| x.restart_s),
        col(|x| x.total_s),
    );
    Some(Summary {
        mode,
        runs: r.len(),
        detection_median_s: median(&d),
        detection_max_s: max(&d),
        fencing_median_s: median(&f),
        fencing_max_s: max(&f),
        restart_median_s: median(&s),
        restart_max_s: max(&s),
        total_median_s: median(&t),
        total_max_s: max(&t),
        target_s,
        target_met: max(&t) <= target_s,
    })
}

fn print_failovers(runs: &[Failover], summaries: &[Summary]) {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.mode.as_str().into(),
                r.host.clone(),
                r.vms.to_string(),
                format!("{:.2}", r.detection_s),
                format!("{:.2}", r.fencing_s),
                format!("{:.2}", r.restart_s),
                format!("{:.2}", r.total_s),
                format!("{} / {}", r.from_checkpoint, r.from_template),
                r.running_twice.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "fencing",
            "host",
            "VMs",
            "detect s",
            "fence s",
            "restart s",
            "total s",
            "from checkpoint / template",
            "running twice",
        ],
        &rows,
    );
    println!();
    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|s| {
            vec![
                s.mode.as_str().into(),
                s.runs.to_string(),
                format!("{:.2} / {:.2}", s.detection_median_s, s.detection_max_s),
                format!("{:.2} / {:.2}", s.fencing_median_s, s.fencing_max_s),
                format!("{:.2} / {:.2}", s.restart_median_s, s.restart_max_s),
                format!("{:.2} / {:.2}", s.total_median_s, s.total_max_s),
                format!(
                    "≤ {:.0} s: {}",
                    s.target_s,
                    if s.target_met { "met" } else { "NOT met" }
                ),
            ]
        })
        .collect();
    print_table(
        &[
            "fencing",
            "runs",
            "detect med/max s",
            "fence med/max s",
            "restart med/max s",
            "total med/max s",
            "target",
        ],
        &rows,
    );
}

// --- 1. simulated hosts -----------------------------------------------------------------------

/// A simulated host agent on a runtime of its own (one worker thread): killing it drops every
/// task it had, its listener and open connections included, at once. Its VMs are the
/// ephemeral simulated driver's: they die with it, as a dead host's do.
struct SimAgent {
    address: String,
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimAgent {
    async fn start(config: AgentConfig) -> anyhow::Result<SimAgent> {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<anyhow::Result<String>>();
        let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name(config.name.clone()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = addr_tx.send(Err(e.into()));
                    return;
                }
            };
            let started = rt.block_on(shoal_agent::start(
                config,
                std::sync::Arc::new(SimDriver::ephemeral(Duration::ZERO)),
            ));
            match started {
                Ok(running) => {
                    let _ = addr_tx.send(Ok(running.address.clone()));
                    let _ = kill_rx.recv();
                }
                Err(e) => {
                    let _ = addr_tx.send(Err(e));
                }
            }
            rt.shutdown_background();
        })?;
        let address = addr_rx.await.map_err(|_| anyhow!("agent thread ended"))??;
        Ok(SimAgent {
            address,
            kill: Some(kill_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        drop(self.kill.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until every live host reports, in a fresh heartbeat, its peers (up to
/// `shoal_controller::domain::agents::PEERS` of the other live hosts, none gone) and reaching each
/// of them: what lets the detector tell a dead host from a cut-off one.
async fn wait_peers(ctl: &Controller, live: &[String]) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(90);
    let window = 2 * SIM_HEARTBEAT.as_millis() as u64 + 1000;
    loop {
        let l = ctl.liveness();
        let fresh = now_ms().saturating_sub(window);
        let ok = live.iter().all(|h| {
            l.get(h).is_some_and(|x| {
                x.seen_unix_ms >= fresh
                    && x.peers.len() == (live.len() - 1).min(shoal_controller::domain::agents::PEERS)
                    && x.peers.iter().all(|p| live.contains(p))
                    && x.peers.iter().all(|p| x.reached.get(p).is_some_and(|t| *t >= fresh))
            })
        });
        if ok {
            return Ok(());
        }
        ensure!(
            Instant::now() < end,
            "timed out waiting for every host to reach its peers"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many VMs run on more than one of the agents at `addresses`, and how many run in all.
async fn running_copies<'a>(addresses: impl Iterator<Item = &'a str>) -> anyhow::Result<(usize, usize)> {
    let mut copies: HashMap<uuid::Uuid, usize> = HashMap::new();
    for a in addresses {
        let c = AgentClient::new(a, None, Duration::from_secs(30));
        for v in c.list().await?.vms {
            if v.state == VmState::Running {
                *copies.entry(v.uuid).or_default() += 1;
            }
        }
    }
    Ok((copies.values().filter(|n| **n > 1).count(), copies.len()))
}

#[derive(Debug, Serialize)]
struct SimResult {
    hosts: usize,
    vms: usize,
    heartbeat_s: f64,
    host_timeout_s: f64,
    fence_margin_s: f64,
    deploy_s: f64,
    runs: Vec<Failover>,
    summaries: Vec<Summary>,
    /// VMs running after the last run, over every live agent.
    running_at_end: usize,
}

async fn sim(hosts: usize, vms: usize, runs_per_mode: usize) -> anyhow::Result<SimResult> {
    let dir = tempfile::tempdir()?;
    let mut config = ControllerConfig::new("127.0.0.1:0".parse()?, dir.path().join("controller"));
    config.host_timeout = SIM_HOST_TIMEOUT;
    config.fence_margin = SIM_FENCE_MARGIN;
    let running = shoal_controller::start(config).await?;
    let ctl = running.controller.clone();
    let client = Client::new(&running.url, None);

    // Room for each host's share and one dead host's VMs on top, several times over.
    let per_host = vms.div_ceil(hosts) as u32;
    let cpus = (per_host * 8 / 5).max(per_host + 2);
    let mut agents: BTreeMap<String, SimAgent> = BTreeMap::new();
    for i in 1..=hosts {
        let name = format!("host{i:03}");
        let config = AgentConfig {
            name: name.clone(),
            listen: "127.0.0.1:0".parse()?,
            advertise: None,
            controller_url: running.url.clone(),
            data_dir: dir.path().join(&name),
            cpus,
            memory_mib: cpus as u64 * 1024,
            join_token: None,
            heartbeat_interval: SIM_HEARTBEAT,
            labels: Default::default(),
            allocation: Default::default(),
        };
        agents.insert(name, SimAgent::start(config).await?);
    }
    let disk = dir.path().join("t.img");
    let mut bytes = vec![7u8; 4096];
    bytes[510..512].copy_from_slice(&[0x55, 0xAA]); // an MBR boot signature: a disk image
    std::fs::write(&disk, bytes)?;
    client
        .import_template("t", &shoal_client::TemplateFiles::disk(&disk))
        .await?;
    client
        .create_profile(&CreateProfile {
            name: "p1".into(),
            template: Some("t".into()),
            cpus: Some(1),
            memory: Some("256MiB".into()),
            ..Default::default()
        })
        .await?;
    let clusters = (vms / 100).max(1);
    let t = Instant::now();
    for c in 0..clusters {
        let size = (vms / clusters + usize::from(c < vms % clusters)) as u32;
        let op = client
            .create_cluster(&CreateCluster {
                name: format!("c{c:02}"),
                profile: "p1".into(),
                size,
                placement: Placement::Spread,
                anti_affinity: AntiAffinity::None,
                ..Default::default()
            })
            .await?;
        let op = client.wait(op.id, |_| {}).await?;
        ensure!(op.state == OperationState::Succeeded, "cluster c{c:02}: {:?}", op.error);
    }
    let deploy_s = t.elapsed().as_secs_f64();
    eprintln!("sim: {vms} VMs on {hosts} hosts in {deploy_s:.1} s; waiting for every host to reach its peers");
    wait_peers(&ctl, &agents.keys().cloned().collect::<Vec<_>>()).await?;

    let mut runs = Vec::new();
    for i in 0..2 * runs_per_mode {
        let mode = if i % 2 == 0 { Fence::PowerOff } else { Fence::Lease };
        // The live host whose VM count is closest to the average share.
        let victim = client
            .hosts()
            .await?
            .into_iter()
            .filter(|h| agents.contains_key(&h.name))
            .min_by_key(|h| (h.vms.abs_diff(per_host), h.name.clone()))
            .ok_or_else(|| anyhow!("no live host left"))?
            .name;
        if mode == Fence::PowerOff {
            client
                .configure_host_power(
                    &victim,
                    &HostPowerConfig {
                        power_off_command: Some("true".into()),
                        ..Default::default()
                    },
                )
                .await?;
        }
        let names: Vec<String> = ctl
            .db
            .vms()
            .await?
            .into_iter()
            .filter(|v| v.host == victim)
            .map(|v| v.name)
            .collect();
        let agent = agents.remove(&victim).expect("a live host");
        let t0 = now_ms();
        drop(agent);

        let end = Instant::now() + Duration::from_secs(120);
        let (failure, done) = loop {
            let f = ctl.db.failures().await?.into_iter().find(|f| f.value.host == victim);
            if let Some(f) = f.filter(|f| f.value.fenced_unix_ms.is_some()) {
                let mut all = true;
                for n in &names {
                    let moved = ctl
                        .db
                        .vm(n)
                        .await?
                        .is_some_and(|v| v.value.state == VmState::Running && v.value.host != victim);
                    if !moved {
                        all = false;
                        break;
                    }
                }
                if all {
                    break (f.value, now_ms());
                }
            }
            ensure!(
                Instant::now() < end,
                "{victim}'s {} VMs were not all running elsewhere 120 s after it died",
                names.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let fenced = failure.fenced_unix_ms.unwrap_or(done);
        let mut r = Failover::new(mode, &victim, names.len(), t0, failure.detected_unix_ms, fenced, done);
        r.read_evacuation(&client).await?;
        let how = failure.fenced.map(|f| format!("{f:?}")).unwrap_or_default();
        r.running_twice = running_copies(agents.values().map(|a| a.address.as_str())).await?.0;
        eprintln!(
            "sim run {}: {} ({how}) {} VMs: detect {:.2} s, fence {:.2} s, restart {:.2} s, total {:.2} s",
            i + 1,
            victim,
            r.vms,
            r.detection_s,
            r.fencing_s,
            r.restart_s,
            r.total_s
        );
        runs.push(r);
        if i + 1 < 2 * runs_per_mode {
            wait_peers(&ctl, &agents.keys().cloned().collect::<Vec<_>>()).await?;
        }
    }
    let (_, running_at_end) = running_copies(agents.values().map(|a| a.address.as_str())).await?;
    drop(agents);
    running.stop().await;
    let summaries: Vec<Summary> = [Fence::PowerOff, Fence::Lease]
        .into_iter()
        .filter_map(|m| summarize(&runs, m, SIM_TARGET_S))
        .collect();
    Ok(SimResult {
        hosts,
        vms,
        heartbeat_s: SIM_HEARTBEAT.as_secs_f64(),
        host_timeout_s: SIM_HOST_TIMEOUT.as_secs_f64(),
        fence_margin_s: SIM_FENCE_MARGIN.as_secs_f64(),
        deploy_s,
        runs,
        summaries,
        running_at_end,
    })
}

// --- QEMU processes ---------------------------------------------------------------------------

/// The QEMU processes whose command line mentions `dir`, with their VM's uuid (`-uuid`).
fn qemus_under(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_qemu = args.first().is_some_and(|a| a.contains("qemu-system"));
            if !is_qemu || !args.iter().any(|a| a.contains(&needle)) {
                return None;
            }
            let uuid = args
                .iter()
                .position(|a| a == "-uuid")
                .and_then(|i| args.get(i + 1))
                .cloned()
                .unwrap_or_default();
            Some((pid, uuid))
        })
        .collect()
}

/// SIGKILLs every QEMU under `dir`; returns how many.
fn kill_qemus_under(dir: &Path) -> usize {
    let pids = qemus_under(dir);
    for (pid, _) in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    pids.len()
}

/// Kills the QEMUs left under a directory when dropped: they outlive their agents by design.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_qemus_under(&self.0);
    }
}

// --- 2. real guests under TCG -----------------------------------------------------------------

/// `shoal server` and its `shoal agent`s, each a process of its own.
struct Lab {
    shoal: PathBuf,
    dir: PathBuf,
    url: String,
    client: Client,
    server_log: PathBuf,
    _server: Proc,
    agents: BTreeMap<String, (u16, Option<Proc>)>,
    starts: usize,
}

impl Lab {
    async fn start(shoal: &Path, dir: &Path, hosts: usize) -> anyhow::Result<Lab> {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let server_log = dir.join("server.log");
        let server = spawn(
            shoal,
            &[
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
                dir.join("controller").to_str().unwrap(),
                "--host-timeout",
                TCG_HOST_TIMEOUT_S,
                "--fence-margin",
                TCG_FENCE_MARGIN_S,
            ],
            &server_log,
        )?;
        let client = Client::new(&url, None);
        until(Duration::from_secs(30), "the controller", || async {
            client.hosts().await.ok()
        })
        .await?;
        let mut lab = Lab {
            shoal: shoal.to_path_buf(),
            dir: dir.to_path_buf(),
            url,
            client,
            server_log,
            _server: server,
            agents: BTreeMap::new(),
            starts: 0,
        };
        for i in 1..=hosts {
            lab.start_agent(&format!("host{i}"))?;
        }
        lab.wait_up(hosts).await?;
        Ok(lab)
    }

    fn data(&self, host: &str) -> PathBuf {
        self.dir.join(host)
    }

    /// Starts (or starts again, on the same port and data dir) a QEMU agent.
    fn start_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let port = self.agents.get(name).map_or_else(free_port, |a| a.0);
        self.starts += 1;
        let log = self.dir.join(format!("{name}-{}.log", self.starts));
        let p = spawn(
            &self.shoal,
            &[
                "agent",
                "--name",
                name,
                "--controller",
                &self.url,
                "--data-dir",
                self.data(name).to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--heartbeat",
                TCG_HEARTBEAT_S,
                "--driver",
                "qemu",
                "--accel",
                "tcg",
                "--host-cpus",
                "4",
                "--host-memory",
                "2048",
            ],
            &log,
        )?;
        self.agents.insert(name.to_string(), (port, Some(p)));
        Ok(())
    }

    /// Kills an agent process with SIGKILL (its QEMUs run on); returns when it is gone.
    fn kill_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let a = self
            .agents
            .get_mut(name)
            .and_then(|a| a.1.take())
            .ok_or_else(|| anyhow!("no agent {name} running"))?;
        drop(a);
        Ok(())
    }

    async fn wait_up(&self, n: usize) -> anyhow::Result<()> {
        until(Duration::from_secs(60), "the hosts to be up", || async {
            let hosts = self.client.hosts().await.ok()?;
            (hosts.iter().filter(|h| h.state == shoal_model::HostState::Up).count() >= n).then_some(())
        })
        .await
    }

    /// When the server logged `what` about `host` (unix ms), the last time it did.
    fn logged(&self, what: &str, host: &str) -> Option<u64> {
        let log = std::fs::read_to_string(&self.server_log).ok()?;
        let field = format!("host={host}");
        log.lines()
            .filter(|l| l.contains(what) && l.split_whitespace().any(|w| w == field))
            .filter_map(|l| rfc3339_ms(l.split_whitespace().next()?))
            .next_back()
    }

    async fn vms(&self, cluster: &str) -> anyhow::Result<Vec<Vm>> {
        Ok(self.client.vms(Some(cluster)).await?)
    }
}

/// `2025-01-02T03:04:05.678901Z` (tracing's timestamps) as unix ms.
fn rfc3339_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let ms = (days * 86400 + h * 3600 + min * 60) * 1000 + (sec * 1000.0).round() as i64;
    u64::try_from(ms).ok()
}

#[derive(Debug, Serialize)]
struct TcgResult {
    hosts: usize,
    heartbeat_s: f64,
    host_timeout_s: f64,
    fence_margin_s: f64,
    checkpoint_interval: &'static str,
    /// Booting the three guests, and until each had a safe checkpoint.
    deploy_s: f64,
    first_checkpoints_s: f64,
    runs: Vec<Failover>,
    summaries: Vec<Summary>,
    /// The lease-fenced host started again: how long until it rejoined (`None`: not in 90 s).
    rejoin_s: Option<f64>,
    rejoin: String,
}

/// Kills one host of the lab as `mode` says and measures the repair.
async fn tcg_failover(lab: &mut Lab, mode: Fence, victim: &str, cluster: &str) -> anyhow::Result<Failover> {
    let names: Vec<String> = lab
        .vms(cluster)
        .await?
        .into_iter()
        .filter(|v| v.host == victim)
        .map(|v| v.name)
        .collect();
    ensure!(!names.is_empty(), "{victim} holds no VM of {cluster}");
    let victim_dir = lab.data(victim);
    if mode == Fence::PowerOff {
        let exe = std::env::current_exe()?;
        let cmd = format!(
            "'{}' --kill-qemus-under '{}'",
            exe.display(),
            victim_dir.join("qemu").display()
        );
        lab.client
            .configure_host_power(
                victim,
                &HostPowerConfig {
                    power_off_command: Some(cmd),
                    ..Default::default()
                },
            )
            .await?;
    }
    let t0 = now_ms();
    lab.kill_agent(victim)?;
    if mode == Fence::Lease {
        kill_qemus_under(&victim_dir);
    }
    let end = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let vms = lab.vms(cluster).await?;
        let moved = names.iter().all(|n| {
            vms.iter()
                .any(|v| &v.name == n && v.state == VmState::Running && v.host != victim)
        });
        if moved {
            break now_ms();
        }
        ensure!(
            Instant::now() < end,
            "{victim}'s VMs {names:?} were not running elsewhere 300 s after it died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let detected = lab
        .logged("host failed:", victim)
        .filter(|t| *t >= t0)
        .ok_or_else(|| anyhow!("the server logged no failure of {victim}"))?;
    let fenced = lab
        .logged("failed host fenced", victim)
        .filter(|t| *t >= t0)
        .ok_or_else(|| anyhow!("the server logged no fencing of {victim}"))?;
    let mut r = Failover::new(mode, victim, names.len(), t0, detected, fenced, done);
    r.read_evacuation(&lab.client).await?;
    // Every guest of the cluster runs in exactly one QEMU, and none is left under the victim.
    let qemus = qemus_under(&lab.dir);
    let mut per_uuid: HashMap<&str, usize> = HashMap::new();
    for (_, u) in &qemus {
        *per_uuid.entry(u.as_str()).or_default() += 1;
    }
    r.running_twice = per_uuid.values().filter(|n| **n > 1).count();
    let left = qemus_under(&victim_dir).len();
    ensure!(left == 0, "{left} QEMU processes of the dead host {victim} still run");
    eprintln!(
        "tcg {}: {victim}: detect {:.2} s, fence {:.2} s, restart {:.2} s, total {:.2} s; {}",
        mode.as_str(),
        r.detection_s,
        r.fencing_s,
        r.restart_s,
        r.total_s,
        r.restart_message
    );
    Ok(r)
}

async fn demo_profile(lab: &Lab, name: &str, disk: Option<&str>, interval: Option<&str>) -> anyhow::Result<()> {
    lab.client
        .create_profile(&CreateProfile {
            name: name.into(),
            template: Some("demo".into()),
            cpus: Some(1),
            memory: Some("128MiB".into()),
            disk: disk.map(str::to_string),
            checkpoint_interval: interval.map(str::to_string),
            ..Default::default()
        })
        .await?;
    Ok(())
}

async fn deploy(lab: &Lab, name: &str, profile: &str, size: u32) -> anyhow::Result<Vec<Vm>> {
    let op = lab
        .client
        .create_cluster(&CreateCluster {
            name: name.into(),
            profile: profile.into(),
            size,
            placement: Placement::Spread,
            anti_affinity: AntiAffinity::None,
            ..Default::default()
        })
        .await?;
    let op = lab.client.wait(op.id, |_| {}).await?;
    ensure!(op.state == OperationState::Succeeded, "cluster {name}: {:?}", op.error);
    lab.vms(name).await
}

async fn tcg(lab: &mut Lab) -> anyhow::Result<TcgResult> {
    demo_profile(lab, "ha", None, Some(TCG_CHECKPOINT_INTERVAL)).await?;
    let t = Instant::now();
    let vms = deploy(lab, "ha", "ha", 3).await?;
    let deploy_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for v in &vms {
        until(Duration::from_secs(180), "a safe checkpoint of each guest", || async {
            let b = lab.client.vm_blocks(&v.name).await.ok()?;
            b.checkpoints.iter().any(|c| c.safe).then_some(())
        })
        .await?;
    }
    let first_checkpoints_s = t.elapsed().as_secs_f64();
    eprintln!("tcg: 3 guests running in {deploy_s:.1} s, each with a safe checkpoint {first_checkpoints_s:.1} s later");

    let mut runs = Vec::new();
    let lease_victim = vms[0].host.clone();
    runs.push(tcg_failover(lab, Fence::Lease, &lease_victim, "ha").await?);
    // The live host holding the most guests now.
    let now = lab.vms("ha").await?;
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for v in &now {
        if v.host != lease_victim {
            *count.entry(v.host.clone()).or_default() += 1;
        }
    }
    let power_victim = count
        .iter()
        .max_by_key(|(h, n)| (**n, std::cmp::Reverse((*h).clone())))
        .map(|(h, _)| h.clone())
        .ok_or_else(|| anyhow!("no live host holds a guest"))?;
    runs.push(tcg_failover(lab, Fence::PowerOff, &power_victim, "ha").await?);
    let summaries = [Fence::Lease, Fence::PowerOff]
        .into_iter()
        .filter_map(|m| summarize(&runs, m, TCG_TARGET_S))
        .collect();

    // The lease-fenced host comes back (its guests were killed with it): it rejoins empty, so
    // that checkpoints have a second host to be held on in part 3.
    lab.start_agent(&lease_victim)?;
    let t = Instant::now();
    let back = until(Duration::from_secs(90), "the dead host to rejoin", || async {
        let hosts = lab.client.hosts().await.ok()?;
        hosts
            .iter()
            .find(|h| h.name == lease_victim && h.state == shoal_model::HostState::Up)
            .map(|_| ())
    })
    .await;
    let rejoin_s = back.is_ok().then(|| t.elapsed().as_secs_f64());
    // What it still holds of its guests (the controller has it remove them all before it rejoins).
    let stale_vms = std::fs::read_dir(lab.data(&lease_victim).join("qemu/vms")).map_or(0, |d| d.count());
    let rejoin = match rejoin_s {
        Some(s) => format!("{lease_victim}, started again, rejoined empty in {s:.1} s"),
        None => {
            let states: Vec<String> = lab
                .client
                .hosts()
                .await?
                .iter()
                .map(|h| format!("{} {:?}", h.name, h.state))
                .collect();
            lab.start_agent("host4")?;
            lab.wait_up(2).await?;
            format!(
                "{lease_victim}, started again, had not rejoined 90 s later (hosts: {}; it still holds {}); host4 \
                 added instead",
                states.join(", "),
                shoal_model::plural(stale_vms as u64, "VM")
            )
        }
    };
    eprintln!("tcg: {rejoin}");
    Ok(TcgResult {
        hosts: 3,
        heartbeat_s: TCG_HEARTBEAT_S.parse()?,
        host_timeout_s: TCG_HOST_TIMEOUT_S.parse()?,
        fence_margin_s: TCG_FENCE_MARGIN_S.parse()?,
        checkpoint_interval: TCG_CHECKPOINT_INTERVAL,
        deploy_s,
        first_checkpoints_s,
        runs,
        summaries,
        rejoin_s,
        rejoin,
    })
}

// --- 3. checkpoint cost -----------------------------------------------------------------------

/// A small deterministic generator (splitmix64) for picking clusters.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `n` distinct values of `from..to`, in random order (a partial Fisher-Yates shuffle).
    fn distinct(&mut self, from: u64, to: u64, n: usize) -> Vec<u64> {
        let mut all: Vec<u64> = (from..to).collect();
        let n = n.min(all.len());
        for i in 0..n {
            let j = i + (self.next() % (all.len() - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(n);
        all
    }
}

/// Writes 64 KiB of fresh random data (distinct per cluster: no deduplication or compression
/// helps any side) at each cluster index through the guest's QEMU, so that its dirty bitmap
/// records them. One QMP connection per batch, so that the agent's own QMP commands (one
/// connection each) get their turn in between.
async fn write_clusters(qmp: &Path, pattern: &Path, clusters: &[u64], salt: u64) -> anyhow::Result<()> {
    let mut buf = vec![0u8; CLUSTER as usize];
    for batch in clusters.chunks(256) {
        let mut q = shoal_hv::qemu::qmp::Qmp::connect(qmp, Duration::from_secs(30)).await?;
        for c in batch {
            let mut h = blake3::Hasher::new();
            h.update(&salt.to_le_bytes()).update(&c.to_le_bytes());
            h.finalize_xof().fill(&mut buf);
            std::fs::write(pattern, &buf)?;
            let line = format!(
                "qemu-io virtio0 \"write -q -s {} {} {}\"",
                pattern.display(),
                c * CLUSTER,
                CLUSTER
            );
            let out = q
                .execute(
                    "human-monitor-command",
                    Some(serde_json::json!({ "command-line": line })),
                )
                .await?;
            let out = out.as_str().unwrap_or_default();
            ensure!(out.trim().is_empty(), "qemu-io write at cluster {c}: {out}");
        }
    }
    // QEMU keeps the overlay's cluster tables in memory: until they are flushed, a tool reading
    // the file beside it (`qemu-img -U`) sees the overlay as it was before these writes.
    let mut q = shoal_hv::qemu::qmp::Qmp::connect(qmp, Duration::from_secs(30)).await?;
    let out = q
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": "qemu-io virtio0 flush" })),
        )
        .await?;
    let out = out.as_str().unwrap_or_default();
    ensure!(out.trim().is_empty(), "qemu-io flush: {out}");
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// Bytes of data the overlay holds itself (not its backing file), from `qemu-img map`.
fn overlay_data_bytes(overlay: &Path) -> anyhow::Result<u64> {
    let map: serde_json::Value = serde_json::from_slice(&run(Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f", "qcow2"])
        .arg(overlay))?)?;
    Ok(map
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .filter_map(|e| e["length"].as_u64())
        .sum())
}

#[derive(Debug, Serialize)]
struct Cost {
    seconds: f64,
    read_bytes: u64,
    sent_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct CheckpointRow {
    fraction: f64,
    clusters_written: usize,
    /// Writing them through QMP (not a figure of Shoal's).
    write_s: f64,
    shoal_incremental: bool,
    shoal_changed_bytes: u64,
    /// The agent's own time (QEMU's backup job, listing the changes, storing and sending them).
    shoal: Cost,
    /// The API call's whole time: the agent's, plus a second host taking a copy, plus the
    /// block counts.
    shoal_api_s: f64,
    /// `qemu-img convert -B`: the overlay's own clusters into a new qcow2.
    convert: Cost,
    /// `cp --sparse=never` of the whole disk as a raw file.
    full_copy: Cost,
    read_share: f64,
    sent_share: f64,
}

#[derive(Debug, Serialize)]
struct CheckpointResult {
    disk_bytes: u64,
    full_checkpoint: Cost,
    full_checkpoint_changed_bytes: u64,
    rows: Vec<CheckpointRow>,
    /// The 1 % row reads and sends at most 2 % of the disk.
    target_met: bool,
}

async fn checkpoint_cost(lab: &Lab) -> anyhow::Result<CheckpointResult> {
    demo_profile(lab, "big", Some("1GiB"), None).await?;
    let vm = deploy(lab, "big", "big", 1).await?.remove(0);
    let vm_dir = lab.data(&vm.host).join("qemu/vms").join(vm.uuid.to_string());
    let (overlay, qmp) = (vm_dir.join("disk.qcow2"), vm_dir.join("qmp.sock"));
    let info: serde_json::Value = serde_json::from_slice(&run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(&overlay))?)?;
    let disk_bytes = info["virtual-size"]
        .as_u64()
        .ok_or_else(|| anyhow!("qemu-img info shows no size for {}", overlay.display()))?;
    let backing = PathBuf::from(
        info["full-backing-filename"]
            .as_str()
            .ok_or_else(|| anyhow!("{} has no backing file", overlay.display()))?,
    );
    let backing_format = info["backing-filename-format"].as_str().unwrap_or("raw").to_string();
    // The template's file system fills the start of the disk: writes go past it, so that the
    // running guest's own data is left alone.
    let first = std::fs::metadata(&backing)?.len().div_ceil(CLUSTER);
    let total = disk_bytes / CLUSTER;

    let full = lab.client.checkpoint_vm(&vm.name).await?;
    ensure!(!full.checkpoint.incremental, "the first checkpoint was incremental");
    eprintln!(
        "checkpoint: {} full in {:.2} s, read {} MiB",
        vm.name,
        full.checkpoint.seconds,
        full.checkpoint.read_bytes >> 20
    );
    let work = lab.dir.join("checkpoint-work");
    std::fs::create_dir_all(&work)?;
    let pattern = work.join("pattern");
    let mut rng = Rng(0x5eed_4a11);
    let mut rows = Vec::new();
    for (round, fraction) in [0.01, 0.10, 0.50].into_iter().enumerate() {
        let n = (fraction * total as f64).round() as usize;
        let clusters = rng.distinct(first, total, n);
        let t = Instant::now();
        write_clusters(&qmp, &pattern, &clusters, round as u64).await?;
        let write_s = t.elapsed().as_secs_f64();

        // qemu-img convert of the overlay alone: what it reads is the overlay's own data.
        let convert_read = overlay_data_bytes(&overlay)?;
        let out = work.join("convert.qcow2");
        let t = Instant::now();
        run(Command::new("qemu-img")
            .args([
                "convert",
                "-U",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                "-F",
                &backing_format,
                "-B",
            ])
            .arg(&backing)
            .arg(&overlay)
            .arg(&out))?;
        let convert_s = t.elapsed().as_secs_f64();
        std::fs::remove_file(&out)?;

        // A full copy: the whole disk as a fully allocated raw file (made untimed), copied.
        let whole = work.join("whole.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw", "-S", "0"])
            .arg(&overlay)
            .arg(&whole))?;
        let copy = work.join("copy.raw");
        let t = Instant::now();
        run(Command::new("cp").arg("--sparse=never").arg(&whole).arg(&copy))?;
        let copy_s = t.elapsed().as_secs_f64();
        std::fs::remove_file(&whole)?;
        std::fs::remove_file(&copy)?;

        let t = Instant::now();
        let cp = lab.client.checkpoint_vm(&vm.name).await?;
        let api_s = t.elapsed().as_secs_f64();
        let c = &cp.checkpoint;
        eprintln!(
            "checkpoint {:.0} %: {} clusters written in {write_s:.1} s; shoal {:.2} s, convert {convert_s:.2} s, copy {copy_s:.2} s",
            fraction * 100.0,
            clusters.len(),
            c.seconds
        );
        rows.push(CheckpointRow {
            fraction,
            clusters_written: clusters.len(),
            write_s,
            shoal_incremental: c.incremental,
            shoal_changed_bytes: c.changed_bytes,
            shoal: Cost {
                seconds: c.seconds,
                read_bytes: c.read_bytes,
                sent_bytes: Some(c.bytes_sent),
            },
            shoal_api_s: api_s,
            convert: Cost {
                seconds: convert_s,
                read_bytes: convert_read,
                sent_bytes: None,
            },
            full_copy: Cost {
                seconds: copy_s,
                read_bytes: disk_bytes,
                sent_bytes: None,
            },
            read_share: c.read_bytes as f64 / disk_bytes as f64,
            sent_share: c.bytes_sent as f64 / disk_bytes as f64,
        });
    }
    let _ = std::fs::remove_dir_all(&work);
    let one = &rows[0];
    let target_met =
        one.shoal_incremental && one.read_share <= CHECKPOINT_TARGET_SHARE && one.sent_share <= CHECKPOINT_TARGET_SHARE;
    Ok(CheckpointResult {
        disk_bytes,
        full_checkpoint: Cost {
            seconds: full.checkpoint.seconds,
            read_bytes: full.checkpoint.read_bytes,
            sent_bytes: Some(full.checkpoint.bytes_sent),
        },
        full_checkpoint_changed_bytes: full.checkpoint.changed_bytes,
        rows,
        target_met,
    })
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / 1048576.0)
}

fn print_checkpoints(r: &CheckpointResult) {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                format!("{:.0} %", x.fraction * 100.0),
                x.clusters_written.to_string(),
                mib(x.shoal_changed_bytes),
                format!("{:.2}", x.shoal.seconds),
                format!("{:.2}", x.shoal_api_s),
                mib(x.shoal.read_bytes),
                mib(x.shoal.sent_bytes.unwrap_or(0)),
                format!("{:.2} / {:.2}", 100.0 * x.read_share, 100.0 * x.sent_share),
                format!("{:.2}", x.convert.seconds),
                mib(x.convert.read_bytes),
                format!("{:.2}", x.full_copy.seconds),
                mib(x.full_copy.read_bytes),
            ]
        })
        .collect();
    print_table(
        &[
            "changed",
            "clusters",
            "shoal changed MiB",
            "shoal s",
            "shoal API s",
            "shoal read MiB",
            "shoal sent MiB",
            "read/sent % of disk",
            "convert s",
            "convert read MiB",
            "full copy s",
            "full copy read MiB",
        ],
        &rows,
    );
    println!(
        "full checkpoint #1 before: {:.2} s, read {} MiB, sent {} MiB; 1 % reads and sends ≤ 2 % of the disk: {}",
        r.full_checkpoint.seconds,
        mib(r.full_checkpoint.read_bytes),
        mib(r.full_checkpoint.sent_bytes.unwrap_or(0)),
        if r.target_met { "met" } else { "NOT met" }
    );
}

// --- main -------------------------------------------------------------------------------------

struct Args {
    shoal: Option<PathBuf>,
    only: Option<String>,
    sim_runs: usize,
    sim_hosts: usize,
    sim_vms: usize,
    /// Parts 2 and 3 work here and leave it (logs, data dirs) instead of in a temporary dir.
    work_dir: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let usage = "usage: bench-ha PATH-TO-SHOAL [--only sim|tcg|checkpoint] [--sim-runs N] [--sim-hosts N] [--sim-vms N] [--work-dir DIR]";
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        shoal: None,
        only: None,
        sim_runs: 3,
        sim_hosts: 100,
        sim_vms: 1000,
        work_dir: None,
    };
    while let Some(arg) = it.next() {
        if !arg.starts_with("--") {
            a.shoal = Some(PathBuf::from(arg));
            continue;
        }
        let v = it.next().ok_or_else(|| anyhow!("{arg} needs a value; {usage}"))?;
        match arg.as_str() {
            // The power-off command of part 2: what switching a host off does to its guests.
            "--kill-qemus-under" => {
                let n = kill_qemus_under(Path::new(&v));
                eprintln!("killed {n} QEMU processes under {v}");
                std::process::exit(0);
            }
            "--only" if ["sim", "tcg", "checkpoint"].contains(&v.as_str()) => a.only = Some(v),
            "--sim-runs" => a.sim_runs = v.parse()?,
            "--sim-hosts" => a.sim_hosts = v.parse()?,
            "--sim-vms" => a.sim_vms = v.parse()?,
            "--work-dir" => a.work_dir = Some(PathBuf::from(v)),
            _ => bail!("unknown flag {arg} {v}; {usage}"),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let part = |p: &str| a.only.as_deref().is_none_or(|o| o == p);
    let mut json = serde_json::json!({ "bench": "ha" });
    let mut targets = serde_json::Map::new();

    if part("sim") {
        println!(
            "== 1. simulated: {} hosts, {} VMs, heartbeat {} s, host timeout {} s, fence margin {} s",
            a.sim_hosts,
            a.sim_vms,
            SIM_HEARTBEAT.as_secs(),
            SIM_HOST_TIMEOUT.as_secs(),
            SIM_FENCE_MARGIN.as_secs()
        );
        let r = sim(a.sim_hosts, a.sim_vms, a.sim_runs).await?;
        print_failovers(&r.runs, &r.summaries);
        let twice: usize = r.runs.iter().map(|x| x.running_twice).sum();
        println!(
            "deploy {:.1} s; VMs running twice after any run: {twice}; running at the end: {} of {}",
            r.deploy_s, r.running_at_end, r.vms
        );
        for s in &r.summaries {
            targets.insert(format!("sim_{}_le_15s", s.mode.as_str()), s.target_met.into());
        }
        targets.insert("sim_no_vm_running_twice".into(), (twice == 0).into());
        json["sim"] = serde_json::to_value(&r)?;
        json["sim"]["notes"] = sim_notes().into();
        println!("notes: {}\n", sim_notes());
    }

    if part("tcg") || part("checkpoint") {
        let shoal = a
            .shoal
            .clone()
            .ok_or_else(|| anyhow!("parts 2 and 3 need PATH-TO-SHOAL"))?;
        let temp = tempfile::tempdir()?;
        let dir = match &a.work_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                d.canonicalize()?
            }
            None => temp.path().to_path_buf(),
        };
        let _reaper = Reaper(dir.clone());
        let template = shoal_demo::build_demo_template(&dir.join("template"))?;
        let mut lab = Lab::start(&shoal, &dir, 3).await?;
        shoal_bench::import_demo(&lab.client, &template).await?;
        if part("tcg") {
            println!(
                "== 2. real guests under TCG: 3 QEMU hosts, heartbeat {TCG_HEARTBEAT_S} s, host timeout \
                 {TCG_HOST_TIMEOUT_S} s, fence margin {TCG_FENCE_MARGIN_S} s, checkpoints every {TCG_CHECKPOINT_INTERVAL}"
            );
            let r = tcg(&mut lab).await?;
            print_failovers(&r.runs, &r.summaries);
            for x in &r.runs {
                println!("{} on {}: {}", x.mode.as_str(), x.host, x.restart_message);
            }
            println!("{}", r.rejoin);
            for s in &r.summaries {
                targets.insert(format!("tcg_{}_le_60s", s.mode.as_str()), s.target_met.into());
            }
            let twice: usize = r.runs.iter().map(|x| x.running_twice).sum();
            targets.insert("tcg_no_vm_running_twice".into(), (twice == 0).into());
            json["tcg"] = serde_json::to_value(&r)?;
            json["tcg"]["notes"] = TCG_NOTES.into();
            println!("notes: {TCG_NOTES}\n");
        }
        if part("checkpoint") {
            println!("== 3. checkpoint cost: demo guest with a 1 GiB disk (TCG), random 64 KiB clusters written through QEMU");
            let r = checkpoint_cost(&lab).await?;
            print_checkpoints(&r);
            targets.insert("checkpoint_1pct_le_2pct".into(), r.target_met.into());
            json["checkpoint"] = serde_json::to_value(&r)?;
            json["checkpoint"]["notes"] = CHECKPOINT_NOTES.into();
            println!("notes: {CHECKPOINT_NOTES}\n");
        }
        // The reaper then kills the guests, which outlive their agents by design.
        drop(lab);
    }

    let all = targets.values().all(|v| v.as_bool() == Some(true));
    json["targets"] = serde_json::Value::Object(targets);
    json["targets_met"] = all.into();
    println!("{json}");
    Ok(())
}
