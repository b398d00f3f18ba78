//! An in-process Shoal for tests: a controller on a loopback port and simulated host agents,
//! talking real HTTP to each other.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use shoal_agent::AgentConfig;
use shoal_client::Client;
use shoal_controller::{ControllerConfig, RunningController};
use shoal_hv::SimDriver;
use shoal_model::api::{CreateCluster, CreateProfile};
use shoal_model::{AntiAffinity, Placement};

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub ctl: Option<RunningController>,
    pub agents: Vec<Option<Agent>>,
    pub client: Client,
    pub config: ControllerConfig,
}

pub struct Opts {
    pub hosts: usize,
    pub cpus: u32,
    pub memory_mib: u64,
    pub boot: Duration,
    pub host_timeout: Duration,
    /// Spread the hosts over this many zones (label `zone`), round robin; 0: no labels.
    pub zones: usize,
    /// Overcommit and reservations every host registers.
    pub allocation: shoal_model::Allocation,
    /// Simulated VMs outlive their agent (as QEMU processes do).
    pub persistent: bool,
    /// How long after a failed host's lease ran out its VMs restart elsewhere.
    pub fence_margin: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            hosts: 3,
            cpus: 8,
            memory_mib: 16384,
            boot: Duration::ZERO,
            host_timeout: Duration::from_secs(10),
            zones: 0,
            allocation: Default::default(),
            persistent: false,
            fence_margin: Duration::from_millis(500),
        }
    }
}

impl Harness {
    pub async fn start(o: Opts) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ControllerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("controller"));
        config.host_timeout = o.host_timeout;
        config.fence_margin = o.fence_margin;
        config.reconcile_interval = Duration::from_millis(100);
        let ctl = shoal_controller::start(config.clone()).await.unwrap();
        config.listen = ctl.url.trim_start_matches("http://").parse().unwrap();
        let client = Client::new(&ctl.url, None);
        let mut agents = Vec::new();
        for i in 1..=o.hosts {
            let ac = agent_config(&ctl.url, dir.path(), i, &o);
            agents.push(Some(if o.persistent {
                Agent::start_persistent(ac, o.boot).await
            } else {
                Agent::start(ac, o.boot).await
            }));
        }
        Harness {
            dir,
            ctl: Some(ctl),
            agents,
            client,
            config,
        }
    }

    /// Stops the controller and starts a new one on the same port and data dir.
    pub async fn restart_controller(&mut self) {
        self.ctl.take().unwrap().stop().await;
        // Commands the old controller had under way end shortly after it; until then they hold
        // its state store open.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match shoal_controller::start(self.config.clone()).await {
                Ok(c) => break self.ctl = Some(c),
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("controller restart: {e:#}"),
            }
        }
    }

    /// Waits until every live host reports reaching all the others: what the failure detector
    /// needs to tell a failed host from a cut-off one.
    pub async fn wait_peers(&self) {
        let live = self.agents.iter().filter(|a| a.is_some()).count();
        wait_for("every host to reach its peers", Duration::from_secs(10), async || {
            let l = self.controller().liveness();
            let fresh = shoal_model::now_ms().saturating_sub(1000);
            let ok = l.len() >= live
                && l.values().filter(|h| h.seen_unix_ms >= fresh).all(|h| {
                    h.peers.len() + 1 >= live && h.reached.values().filter(|t| **t >= fresh).count() + 1 >= live
                });
            ok.then_some(())
        })
        .await;
    }

    pub fn controller(&self) -> &shoal_controller::Controller {
        &self.ctl.as_ref().unwrap().controller
    }

    /// Every key under `prefix` in the controller's state store.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.controller().db.keys(prefix).await.unwrap()
    }

    pub async fn template(&self, name: &str) {
        let f = self.dir.path().join(format!("{name}.img"));
        let mut disk = vec![7u8; 4096];
        disk[510..512].copy_from_slice(&[0x55, 0xAA]); // an MBR boot signature: a disk image
        std::fs::write(&f, disk).unwrap();
        self.client
            .import_template(name, &shoal_client::TemplateFiles::disk(&f))
            .await
            .unwrap();
    }

    pub async fn profile(&self, name: &str, template: &str, cpus: u32, memory: &str) {
        self.client
            .create_profile(&CreateProfile {
                name: name.into(),
                template: Some(template.into()),
                cpus: Some(cpus),
                memory: Some(memory.into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// The configuration of test host `host<i>`, reporting to the controller at `url`.
pub fn agent_config(url: &str, dir: &std::path::Path, i: usize, o: &Opts) -> AgentConfig {
    let name = format!("host{i}");
    AgentConfig {
        name: name.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        controller_url: url.to_string(),
        data_dir: dir.join(&name),
        cpus: o.cpus,
        memory_mib: o.memory_mib,
        join_token: None,
        heartbeat_interval: Duration::from_millis(200),
        allocation: o.allocation.clone(),
        labels: if o.zones > 0 {
            [("zone".to_string(), format!("z{}", (i - 1) % o.zones + 1))].into()
        } else {
            Default::default()
        },
    }
}

/// Polls `f` until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn cluster(name: &str, profile: &str, size: u32) -> CreateCluster {
    CreateCluster {
        name: name.into(),
        profile: profile.into(),
        size,
        placement: Placement::Spread,
        anti_affinity: AntiAffinity::None,
        network: None,
        nat: false,
        ..Default::default()
    }
}

/// A simulated host agent on a runtime of its own, so that killing it is a real vanishing: every
/// task it had, open connections included, dies at once.
pub struct Agent {
    pub address: String,
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    pub async fn start(config: AgentConfig, boot: Duration) -> Agent {
        Self::start_with(config, boot, false).await
    }

    /// An agent whose simulated VMs outlive it (kept in its data dir), as QEMU processes do.
    pub async fn start_persistent(config: AgentConfig, boot: Duration) -> Agent {
        Self::start_with(config, boot, true).await
    }

    async fn start_with(config: AgentConfig, boot: Duration, persistent: bool) -> Agent {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let running = rt.block_on(async {
                let hv = Arc::new(if persistent {
                    SimDriver::open(&config.data_dir.join("sim"), boot).unwrap()
                } else {
                    SimDriver::ephemeral(boot)
                });
                shoal_agent::start(config, hv).await.unwrap()
            });
            let _ = addr_tx.send(running.address.clone());
            let _ = kill_rx.recv();
            rt.shutdown_background();
        });
        Agent {
            address: addr_rx.await.unwrap(),
            kill: Some(kill_tx),
            thread: Some(thread),
        }
    }

    pub fn kill(mut self) {
        drop(self.kill.take());
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}
