//! The long-running commands: `server`, `agent`, and `up` (all-in-one).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_agent::AgentConfig;
use shoal_controller::ControllerConfig;
use shoal_hv::qemu::Accel;
use shoal_hv::{Hypervisor, QemuConfig, QemuDriver, SimDriver, SimLoad};

use crate::cli::{AccelArg, AgentArgs, ControllerOpts, Driver, HostOpts, NetDriverArg, ServerArgs, UpArgs};

/// Logs go to stderr, coloured only on a terminal: a log file or journal would keep the escape
/// codes as text.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn controller_config(listen: std::net::SocketAddr, o: &ControllerOpts) -> anyhow::Result<ControllerConfig> {
    let mut c = ControllerConfig::new(listen, o.data_dir.clone());
    c.subnet_pool = o
        .subnet_pool
        .parse()
        .map_err(|e| anyhow::anyhow!("--subnet-pool: {e}"))?;
    if o.subnet_prefix < c.subnet_pool.prefix() || o.subnet_prefix > 30 {
        bail!(
            "--subnet-prefix {}: must be between the pool's /{} and /30",
            o.subnet_prefix,
            c.subnet_pool.prefix()
        );
    }
    c.subnet_prefix = o.subnet_prefix;
    if o.host_timeout.is_nan() || o.host_timeout <= 0.0 {
        bail!("--host-timeout {}: must be positive", o.host_timeout);
    }
    c.host_timeout = Duration::from_secs_f64(o.host_timeout);
    c.fence_margin = seconds("--fence-margin", o.fence_margin)?;
    c.sample_interval = seconds("--sample-interval", o.sample_interval)?;
    c.consolidate = o.consolidate;
    c.record = o.record.clone();
    c.operation_retention = seconds("--operation-retention", o.operation_retention * 3600.0).map_err(|_| {
        anyhow::anyhow!(
            "--operation-retention {}: must be a positive number of hours",
            o.operation_retention
        )
    })?;
    if o.operations_kept == 0 {
        bail!("--operations-kept 0: keep at least one finished operation");
    }
    c.operations_kept = o.operations_kept;
    Ok(c)
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn server(a: ServerArgs) -> anyhow::Result<()> {
    init_logging();
    let running = shoal_controller::start(controller_config(a.listen, &a.controller)?).await?;
    eprintln!("shoal controller listening on {}", running.url);
    if running.controller.auth_required() {
        eprintln!(
            "authentication required: API token in {}",
            a.controller.data_dir.join("admin.token").display()
        );
    }
    stop_signal().await;
    eprintln!("stopping");
    running.stop().await;
    Ok(())
}

fn machine_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

fn machine_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    if v.is_nan() || v <= 0.0 {
        bail!("{flag} {v}: must be positive");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The network driver `--net` asks for, checked before anything else starts: a bridge driver
/// without CAP_NET_ADMIN or with an underlay address that is not this host's is refused.
async fn network(a: &AgentArgs) -> anyhow::Result<Option<Arc<shoal_net::NetManager>>> {
    let flag = match a.net {
        NetDriverArg::None => return Ok(None),
        NetDriverArg::Bridge => "bridge",
        NetDriverArg::Udp => "udp",
    };
    if a.host.driver != Driver::Qemu {
        bail!("--net {flag} needs --driver qemu");
    }
    let Some(ip) = a.underlay_ip else {
        bail!("--net {flag} needs --underlay-ip: the address other hosts reach this one's network traffic on");
    };
    let driver: Arc<dyn shoal_net::NetDriver> = match a.net {
        NetDriverArg::Bridge => Arc::new(
            shoal_net::bridge::BridgeDriver::open(ip)
                .await
                .with_context(|| format!("agent {}: network driver bridge", a.name))?,
        ),
        _ => Arc::new(
            shoal_net::udp::UdpDriver::open(ip, shoal_net::udp::UDP_PORT)
                .await
                .with_context(|| format!("agent {}: network driver udp", a.name))?,
        ),
    };
    Ok(Some(Arc::new(shoal_net::NetManager::new(driver))))
}

async fn hypervisor(h: &HostOpts, config: &AgentConfig) -> anyhow::Result<Arc<dyn Hypervisor>> {
    hypervisor_with_network(h, config, None).await
}

async fn hypervisor_with_network(
    h: &HostOpts,
    config: &AgentConfig,
    net: Option<Arc<shoal_net::NetManager>>,
) -> anyhow::Result<Arc<dyn Hypervisor>> {
    let dir = &config.data_dir;
    match h.driver {
        Driver::Sim => {
            let load = match &h.sim_trace {
                Some(t) => SimLoad::from_trace_dir(t, seconds("--sim-trace-step", h.sim_trace_step)?)
                    .map_err(|e| anyhow::anyhow!("--sim-trace: {e}"))?,
                None if (0.0..=1.0).contains(&h.sim_load) => SimLoad::Constant(h.sim_load),
                None => bail!("--sim-load {}: must be between 0 and 1", h.sim_load),
            };
            Ok(Arc::new(
                SimDriver::open(&dir.join("sim"), Duration::from_millis(h.sim_boot_ms))?.with_load(load),
            ))
        }
        Driver::Qemu => {
            let mut q = QemuConfig::new(qemu_dir(dir));
            q.qemu = h.qemu.clone();
            q.accel = match h.accel {
                AccelArg::Auto => None,
                AccelArg::Kvm => Some(Accel::Kvm),
                AccelArg::Tcg => Some(Accel::Tcg),
            };
            q.stop_timeout = seconds("--stop-timeout", h.stop_timeout)?;
            q.ready_timeout = seconds("--ready-timeout", h.ready_timeout)?;
            let source = Arc::new(shoal_agent::ControllerTemplates::new(
                config.controller_url.clone(),
                config.name.clone(),
                config.data_dir.clone(),
            ));
            let driver = QemuDriver::open(q, source).await?;
            if let Some(n) = net {
                driver.set_network(Arc::new(shoal_agent::net::HvNet(n))).await;
            }
            Ok(driver)
        }
    }
}

fn agent_config(
    name: String,
    controller: String,
    dir: std::path::PathBuf,
    h: &HostOpts,
) -> anyhow::Result<AgentConfig> {
    if h.heartbeat.is_nan() || h.heartbeat <= 0.0 {
        bail!("--heartbeat {}: must be positive", h.heartbeat);
    }
    let cpus = h.host_cpus.unwrap_or_else(machine_cpus);
    let memory_mib = h.host_memory.unwrap_or_else(machine_memory_mib);
    let allocation = shoal_model::Allocation {
        cpu_overcommit: h.cpu_overcommit,
        memory_overcommit: h.memory_overcommit,
        reserved_cpus: h.reserve_cpus,
        reserved_memory_mib: h.reserve_memory,
    };
    allocation
        .check(cpus, memory_mib)
        .map_err(|e| anyhow::anyhow!("host {name}: {e}"))?;
    Ok(AgentConfig {
        allocation,
        name,
        listen: "127.0.0.1:0".parse().expect("valid address"),
        advertise: None,
        controller_url: controller,
        data_dir: dir,
        cpus,
        memory_mib,
        join_token: None,
        heartbeat_interval: Duration::from_secs_f64(h.heartbeat),
        labels: h.labels.iter().cloned().collect(),
    })
}

pub async fn agent(a: AgentArgs) -> anyhow::Result<()> {
    init_logging();
    let mut config = agent_config(a.name.clone(), a.controller.clone(), a.data_dir.clone(), &a.host)?;
    config.listen = a.listen;
    config.advertise = a.advertise.clone();
    config.join_token = a.join_token.clone();
    let net = network(&a).await?;
    let hv = hypervisor_with_network(&a.host, &config, net.clone()).await?;
    // QEMU outlives the agent: a guard of its own stops it when the agent's lease runs out.
    if matches!(a.host.driver, Driver::Qemu) {
        std::fs::create_dir_all(&config.data_dir)?;
        let exe = std::env::current_exe().context("finding the shoal binary for the fence guard")?;
        shoal_agent::fence_guard::ensure_running(&exe, &config.data_dir)?;
    }
    let running = shoal_agent::start_with_network(config, hv, net).await?;
    eprintln!("shoal agent {} serving on {}", running.name, running.address);
    stop_signal().await;
    running.stop().await;
    Ok(())
}

/// Where an agent's QEMU driver keeps its templates and VMs.
fn qemu_dir(agent_data_dir: &std::path::Path) -> std::path::PathBuf {
    agent_data_dir.join("qemu")
}

/// `shoal fence-guard`: runs until the agent's data dir is gone.
pub fn fence_guard(data_dir: &std::path::Path) -> anyhow::Result<()> {
    init_logging();
    shoal_agent::fence_guard::run(data_dir, &qemu_dir(data_dir));
    Ok(())
}

pub async fn up(a: UpArgs) -> anyhow::Result<()> {
    init_logging();
    if a.hosts == 0 || a.hosts > 1000 {
        bail!("--hosts {}: must be between 1 and 1000", a.hosts);
    }
    let ctl = shoal_controller::start(controller_config(a.listen, &a.controller)?).await?;
    // Agents reach the controller on loopback even when it also listens elsewhere.
    let port = ctl.url.rsplit(':').next().unwrap_or("7700");
    let ctl_url = if a.listen.ip().is_unspecified() {
        format!("http://127.0.0.1:{port}")
    } else {
        ctl.url.clone()
    };
    // Agents start together: each probes its accelerator, which takes a moment.
    let zones = a.zones;
    let starts = (1..=a.hosts).map(|i| {
        let name = format!("host{i}");
        let dir = a.controller.data_dir.join("agents").join(&name);
        let (host, ctl_url, controller) = (&a.host, ctl_url.clone(), ctl.controller.clone());
        async move {
            let mut config = agent_config(name.clone(), ctl_url, dir.clone(), host)?;
            if zones > 0 {
                config.labels.insert("zone".into(), format!("z{}", (i - 1) % zones + 1));
            }
            if controller.auth_required() && !dir.join("credentials.json").exists() {
                config.join_token = Some(controller.mint_join_token().await.map_err(|e| anyhow::anyhow!("{e}"))?);
            }
            let hv = hypervisor(host, &config).await?;
            shoal_agent::start(config, hv)
                .await
                .with_context(|| format!("starting agent {name}"))
        }
    });
    let agents: Vec<_> = futures::future::try_join_all(starts).await?;
    eprintln!(
        "shoal up: controller at {} with {}; Ctrl-C to stop",
        ctl.url,
        shoal_model::plural(a.hosts, &format!("{:?} host", a.host.driver))
    );
    if ctl.controller.auth_required() {
        eprintln!(
            "authentication required: API token in {}",
            a.controller.data_dir.join("admin.token").display()
        );
    }
    stop_signal().await;
    eprintln!("stopping");
    for ag in agents {
        ag.stop().await;
    }
    ctl.stop().await;
    Ok(())
}
