//! The controller: the REST API operators use, the endpoint agents report to, and the
//! reconcilers that drive hosts toward the declared virtual clusters. All durable state lives in
//! the state store; what is only in memory (heartbeats, in-flight commands) is rebuilt after a
//! restart from the agents' next reports.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_client::AgentClient;
use shoal_model::agent::VmStatus;
use shoal_model::{now_ms, HostState, Ipv4Subnet};
use shoal_store::{FileStore, Store};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub mod api;
pub mod auth;
pub mod capacity;
pub mod datastore;
pub mod domain;
pub mod error;
pub(crate) mod failover;
mod ipam;
pub mod locality;
mod migrate;
mod reconcile;

pub use datastore::Datastore;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Pool the clusters' subnets are cut from.
    pub subnet_pool: Ipv4Subnet,
    /// Prefix length of a cluster's subnet (a larger cluster gets the shortest prefix that fits).
    pub subnet_prefix: u8,
    /// A host with no heartbeat for this long is down; its agent's lease (it stops its VMs
    /// when it has not heard from the controller for this long and reaches few of its peers).
    pub host_timeout: Duration,
    /// How long after a failed host's lease certainly ran out its VMs may restart elsewhere,
    /// when its power-off command did not fence it: at least the agents' heartbeat interval
    /// plus a second (`docs/ha.md`).
    pub fence_margin: Duration,
    /// How often the reconciler runs when nothing wakes it.
    pub reconcile_interval: Duration,
    /// An operation whose VMs have not all started by then fails and is rolled back.
    pub operation_timeout: Duration,
    /// HTTP timeout of one command to an agent.
    pub agent_timeout: Duration,
    /// Time between samples of the hosts' CPU use (energy accounting, record, consolidation).
    pub sample_interval: Duration,
    /// Run the consolidator at every sample.
    pub consolidate: bool,
    /// Write every VM's CPU use as a PlanetLab-format trace into this directory.
    pub record: Option<PathBuf>,
    /// Finished operations are forgotten after this long...
    pub operation_retention: Duration,
    /// ...and beyond this many (the newest are kept).
    pub operations_kept: usize,
}

impl ControllerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            listen,
            data_dir,
            subnet_pool: "10.200.0.0/16".parse().expect("valid default pool"),
            subnet_prefix: 24,
            host_timeout: Duration::from_secs(10),
            fence_margin: Duration::from_secs(3),
            reconcile_interval: Duration::from_millis(500),
            operation_timeout: Duration::from_secs(600),
            agent_timeout: Duration::from_secs(300),
            sample_interval: Duration::from_secs(300),
            consolidate: false,
            record: None,
            operation_retention: Duration::from_secs(7 * 24 * 3600),
            operations_kept: 1000,
        }
    }
}

/// Hosts that may be peers, with their agents' `host:port`.
pub type PeerCandidates = Arc<Vec<(String, String)>>;

/// What the controller last heard from a host's agent.
#[derive(Clone, Debug)]
pub struct Liveness {
    pub seen: Instant,
    pub seen_unix_ms: u64,
    pub vms: Vec<VmStatus>,
    /// Images (manifest ids, hex) the host's cache holds whole.
    pub images: Vec<String>,
    /// The peers the host reached, with when (unix ms): the failure detector's second channel.
    pub reached: std::collections::BTreeMap<String, u64>,
    /// The peers the host checks (the list it last got): those it needs a majority of to keep
    /// its VMs running without the controller.
    pub peers: Vec<String>,
}

pub struct Inner {
    pub db: Datastore,
    pub config: ControllerConfig,
    auth_required: bool,
    controller_token: String,
    started: Instant,
    live: Mutex<HashMap<String, Liveness>>,
    /// Wakes the reconciler early.
    pub wake: Notify,
    /// VMs with a command on its way to their host, not to be sent again meanwhile.
    inflight: Mutex<HashSet<(Uuid, String)>>,
    /// When "ensure" was last sent for a VM and wanted power state: a VM still on its way is
    /// asked again only now and then.
    ensure_sent: Throttle<(Uuid, shoal_model::Power)>,
    /// When each orphan was last asked to go: its host lists it until its next heartbeat.
    orphans_sent: Throttle<(Uuid, String)>,
    /// The remote VTEPs last sent to each host, so that only changes are sent.
    pub(crate) peers_sent: Mutex<HashMap<String, shoal_model::network::NetworkPeers>>,
    /// One HTTP client per agent address, so connections are reused.
    agents: Mutex<HashMap<String, AgentClient>>,
    /// The image store: templates and VM snapshots as manifests of deduplicated chunks.
    pub images: Arc<shoal_image::ImageStore>,
    /// Chunk sets of manifests, for image locality.
    pub chunk_sets: locality::ChunkSets,
    /// CPU samples, energy accounts and the consolidator's memory.
    pub energy: tokio::sync::Mutex<domain::energy::Meter>,
    /// VMs whose disk is being checkpointed now.
    pub(crate) checkpointing: Mutex<HashSet<String>>,
    /// Checkpoint images already checked whole (every chunk present and matching its id) or
    /// found damaged, by manifest: an image never changes.
    pub(crate) checked_images: Mutex<HashMap<String, bool>>,
    /// The hosts that may be peers (on, not failed) with their `host:port`, and when they were
    /// read: every heartbeat's answer needs them, and they change rarely.
    peer_candidates: tokio::sync::Mutex<Option<(Instant, PeerCandidates)>>,
    /// Why each host that is not up is what it is, as the failure detector last concluded.
    pub(crate) host_notes: Mutex<HashMap<String, String>>,
    /// VMs whose migration has an executor task in this process.
    migrating: Mutex<HashSet<String>>,
    /// Operations driven by a task of this process (moves in waves): one found running without
    /// its task was cut short by a restart.
    driving: Mutex<HashSet<Uuid>>,
    /// Per host, the bandwidth its last committed migration achieved, MiB/s: what plans price
    /// the next moves to or from it with.
    pub(crate) migration_mib_s: Mutex<HashMap<String, f64>>,
    /// Turns true when the controller stops: its background tasks end without writing more.
    stopped: watch::Receiver<bool>,
}

/// Commands repeated at most every [`Throttle::EVERY`] per key. Keys not seen for a minute are
/// forgotten (swept once a minute, not on every call: this runs once per VM per pass), so the
/// map does not grow with every VM that ever existed.
struct Throttle<K>(Mutex<(HashMap<K, Instant>, Instant)>);

impl<K> Default for Throttle<K> {
    fn default() -> Self {
        Throttle(Mutex::new((HashMap::new(), Instant::now())))
    }
}

impl<K: std::hash::Hash + Eq> Throttle<K> {
    const EVERY: Duration = Duration::from_secs(5);
    const FORGET: Duration = Duration::from_secs(60);

    /// True (and the send recorded) unless `key` was sent within the last few seconds.
    fn due(&self, key: K) -> bool {
        let mut guard = self.0.lock().expect("throttle lock");
        let (sent, swept) = &mut *guard;
        if swept.elapsed() >= Self::FORGET {
            sent.retain(|_, at| at.elapsed() < Self::FORGET);
            *swept = Instant::now();
        }
        match sent.get(&key) {
            Some(at) if at.elapsed() < Self::EVERY => false,
            _ => {
                sent.insert(key, Instant::now());
                true
            }
        }
    }
}

#[derive(Clone)]
pub struct Controller(Arc<Inner>);

impl Deref for Controller {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Controller {
    pub fn auth_required(&self) -> bool {
        self.auth_required
    }

    pub fn controller_token(&self) -> &str {
        &self.controller_token
    }

    /// Up when heard from within the host timeout. Right after a controller start nobody has
    /// been heard from yet: hosts get one timeout of grace instead of all being declared down.
    pub fn host_state(&self, name: &str) -> (HostState, Option<u64>) {
        let timeout = self.config.host_timeout;
        match self.live.lock().expect("liveness lock").get(name) {
            Some(l) if l.seen.elapsed() < timeout => (HostState::Up, Some(l.seen_unix_ms)),
            Some(l) => (HostState::Down, Some(l.seen_unix_ms)),
            None if self.started.elapsed() < timeout => (HostState::Up, None),
            None => (HostState::Down, None),
        }
    }

    /// A heartbeat from the host arrived within the host timeout. Unlike [`Self::host_state`],
    /// no grace after a controller start: what the failure detector and fencing go by.
    pub fn heard(&self, host: &str) -> bool {
        self.live
            .lock()
            .expect("liveness lock")
            .get(host)
            .is_some_and(|l| l.seen.elapsed() < self.config.host_timeout)
    }

    pub fn record_heartbeat(&self, host: &str, hb: shoal_model::agent::Heartbeat) {
        self.live.lock().expect("liveness lock").insert(
            host.to_string(),
            Liveness {
                seen: Instant::now(),
                seen_unix_ms: now_ms(),
                vms: hb.vms,
                images: hb.images,
                reached: hb.reached,
                peers: hb.peers,
            },
        );
    }

    /// The hosts that may be peers: switched on and not failed, with their agents' `host:port`,
    /// read at most once a second.
    pub async fn peer_candidates(&self) -> error::ApiResult<PeerCandidates> {
        let mut cached = self.peer_candidates.lock().await;
        if let Some((at, c)) = cached.as_ref() {
            if at.elapsed() < Duration::from_secs(1) {
                return Ok(c.clone());
            }
        }
        let marks = capacity::HostMarks::read(self).await?;
        let c: PeerCandidates = Arc::new(
            self.db
                .hosts()
                .await?
                .into_iter()
                .filter(|h| !marks.powered_off.contains(&h.name) && !marks.failed.contains(&h.name))
                .map(|h| (h.name.clone(), domain::agents::authority(&h.address).to_string()))
                .collect(),
        );
        *cached = Some((Instant::now(), c.clone()));
        Ok(c)
    }

    /// When the controller started (unix ms): nothing it heard before counts after a restart.
    pub fn started_unix_ms(&self) -> u64 {
        now_ms().saturating_sub(self.started.elapsed().as_millis() as u64)
    }

    /// The last time a host that is heard now reported reaching `host` (unix ms): the failure
    /// detector's second channel.
    pub fn peer_seen(&self, host: &str) -> Option<u64> {
        self.peers_seen().get(host).copied()
    }

    /// [`Self::peer_seen`] of every host at once, in one pass over the heard hosts' reports.
    pub fn peers_seen(&self) -> HashMap<String, u64> {
        let timeout = self.config.host_timeout;
        let mut seen: HashMap<String, u64> = HashMap::new();
        for (peer, l) in self.live.lock().expect("liveness lock").iter() {
            if l.seen.elapsed() >= timeout {
                continue;
            }
            for (host, at) in &l.reached {
                if host != peer {
                    let e = seen.entry(host.clone()).or_default();
                    *e = (*e).max(*at);
                }
            }
        }
        seen
    }

    /// Not heard from, but reached by a heard peer within the host timeout.
    pub fn isolated(&self, host: &str) -> bool {
        self.host_state(host).0 != HostState::Up
            && self
                .peer_seen(host)
                .is_some_and(|t| now_ms().saturating_sub(t) <= self.config.host_timeout.as_millis() as u64)
    }

    pub fn liveness(&self) -> HashMap<String, Liveness> {
        self.live.lock().expect("liveness lock").clone()
    }

    /// Creates a one-time join token for an agent.
    pub async fn mint_join_token(&self) -> error::ApiResult<String> {
        let t = auth::new_token();
        auth::register_token(&self.db, &t, auth::TokenKind::Join, None).await?;
        Ok(t)
    }

    /// Marks `uuids` as having a command under way to `host`; returns those that were not already.
    fn claim_inflight(&self, host: &str, uuids: impl IntoIterator<Item = Uuid>) -> Vec<Uuid> {
        let mut set = self.inflight.lock().expect("inflight lock");
        uuids
            .into_iter()
            .filter(|u| set.insert((*u, host.to_string())))
            .collect()
    }

    fn release_inflight(&self, host: &str, uuids: &[Uuid]) {
        let mut set = self.inflight.lock().expect("inflight lock");
        for u in uuids {
            set.remove(&(*u, host.to_string()));
        }
    }

    /// Whether to send "ensure" for a VM that is not yet where it should be: at once when what
    /// is wanted changed, else every few seconds.
    fn ensure_due(&self, uuid: Uuid, power: shoal_model::Power) -> bool {
        self.ensure_sent.due((uuid, power))
    }

    /// Whether to ask a host again to remove an orphan VM: at once the first time, then every
    /// few seconds while its heartbeats still list it.
    fn orphan_due(&self, uuid: Uuid, host: &str) -> bool {
        self.orphans_sent.due((uuid, host.to_string()))
    }

    pub(crate) fn agent(&self, address: &str) -> AgentClient {
        self.agents
            .lock()
            .expect("agents lock")
            .entry(address.to_string())
            .or_insert_with(|| {
                AgentClient::new(address, Some(self.controller_token.clone()), self.config.agent_timeout)
            })
            .clone()
    }
}

/// A controller serving on its listener, with its reconciler running.
pub struct RunningController {
    pub controller: Controller,
    /// Base URL of the API.
    pub url: String,
    /// The admin API token (also in `<data-dir>/admin.token`).
    pub admin_token: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningController {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

pub async fn start(config: ControllerConfig) -> anyhow::Result<RunningController> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(
        FileStore::open(config.data_dir.join("state"))
            .with_context(|| format!("opening the state store in {}", config.data_dir.display()))?,
    );
    start_with_store(config, store).await
}

pub async fn start_with_store(config: ControllerConfig, store: Arc<dyn Store>) -> anyhow::Result<RunningController> {
    std::fs::create_dir_all(config.data_dir.join("templates"))
        .with_context(|| format!("creating {}/templates", config.data_dir.display()))?;
    let admin_path = config.data_dir.join("admin.token");
    let admin_token =
        auth::load_or_create_secret(&admin_path).with_context(|| format!("admin token {}", admin_path.display()))?;
    let ctl_path = config.data_dir.join("controller.token");
    let controller_token =
        auth::load_or_create_secret(&ctl_path).with_context(|| format!("controller token {}", ctl_path.display()))?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("controller: cannot listen on {}", config.listen))?;
    let local = listener.local_addr()?;
    let db = Datastore::new(store);
    auth::register_token(&db, &admin_token, auth::TokenKind::Admin, None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let images_dir = config.data_dir.join("images");
    let images = tokio::task::spawn_blocking(move || shoal_image::ImageStore::open(&images_dir))
        .await?
        .map_err(|e| anyhow::anyhow!("opening the image store: {e}"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let controller = Controller(Arc::new(Inner {
        images: Arc::new(images),
        chunk_sets: Default::default(),
        db,
        auth_required: !local.ip().is_loopback(),
        controller_token,
        started: Instant::now(),
        live: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        inflight: Mutex::new(HashSet::new()),
        agents: Mutex::new(HashMap::new()),
        ensure_sent: Throttle::default(),
        orphans_sent: Throttle::default(),
        peers_sent: Mutex::new(HashMap::new()),
        energy: tokio::sync::Mutex::new(domain::energy::Meter::default()),
        migrating: Mutex::new(HashSet::new()),
        checkpointing: Mutex::new(HashSet::new()),
        checked_images: Mutex::new(HashMap::new()),
        host_notes: Mutex::new(HashMap::new()),
        peer_candidates: tokio::sync::Mutex::new(None),
        migration_mib_s: Mutex::new(HashMap::new()),
        driving: Mutex::new(HashSet::new()),
        stopped: stop_rx.clone(),
        config,
    }));

    let app = api::router(controller.clone());
    let mut rx = stop_rx.clone();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!("controller server: {e}");
        }
    });
    let reconciler = tokio::spawn(reconcile::run(controller.clone(), stop_rx.clone()));
    let failover = tokio::spawn(failover::run(controller.clone(), stop_rx.clone()));
    let checkpoints = tokio::spawn(domain::checkpoints::run(controller.clone(), stop_rx.clone()));
    let sampler = tokio::spawn(domain::energy::run(controller.clone(), stop_rx));
    let url = format!("http://{local}");
    tracing::info!(%url, auth = controller.auth_required, "controller started");
    Ok(RunningController {
        controller,
        url,
        admin_token,
        stop: stop_tx,
        tasks: vec![server, reconciler, failover, checkpoints, sampler],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_a_key_through_once_per_window_and_other_keys_at_once() {
        let t: Throttle<(u32, char)> = Throttle::default();
        assert!(t.due((1, 'a')));
        assert!(!t.due((1, 'a')), "sent a moment ago");
        assert!(t.due((1, 'b')), "another wanted state is a new command");
        assert!(t.due((2, 'a')));
    }
}
