//! The host agent. It joins the controller, reports its capacity and VMs in heartbeats, and
//! carries out the controller's idempotent commands ("ensure these VMs run", "remove these")
//! through a hypervisor driver.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal_client::{Client, ClientError};
use shoal_hv::{ErrorKind, HvError, Hypervisor, SourceError, TemplateFile, TemplateSource};
use shoal_model::agent::{BatchResult, ConsoleChunk, EnsureVms, Heartbeat, RegisterRequest, RemoveVms, VmStatus};
use shoal_model::api::{ErrorBody, ErrorDetail};
use shoal_model::VmState;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod checkpoint;
pub mod fence_guard;
mod migrate;
pub mod net;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Address the controller should use, when `listen` is a wildcard or behind NAT.
    pub advertise: Option<String>,
    pub controller_url: String,
    pub data_dir: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    pub join_token: Option<String>,
    pub heartbeat_interval: Duration,
    /// Failure domains and properties to register (`zone=a`, `rack=r12`).
    pub labels: std::collections::BTreeMap<String, String>,
    pub allocation: shoal_model::Allocation,
}

/// What the agent keeps between restarts to prove who it is and who may command it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Credentials {
    credential: Option<String>,
    controller_token_hash: Option<String>,
}

impl Credentials {
    fn path(dir: &Path) -> PathBuf {
        dir.join("credentials.json")
    }

    fn load(dir: &Path) -> anyhow::Result<Credentials> {
        match std::fs::read(Self::path(dir)) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("corrupt {}", Self::path(dir).display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Credentials::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", Self::path(dir).display())),
        }
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        restrict(&tmp);
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Makes a secret file readable by its owner only.
fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[derive(Clone)]
pub(crate) struct AgentState {
    hv: Arc<dyn Hypervisor>,
    /// The host's virtual networks, when it has a network driver.
    net: Option<Arc<shoal_net::NetManager>>,
    /// Hash of the token the controller must present; `None` on a loopback listener.
    require: Option<String>,
}

/// A started agent. Dropping it does not stop it; call [`RunningAgent::stop`].
pub struct RunningAgent {
    pub name: String,
    pub address: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    /// Stops serving and heartbeating. VMs keep running (a real hypervisor's processes outlive
    /// the agent; the next agent start re-adopts them).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Vanishes at once, as a crashed host would: no goodbye, no more answers.
    pub fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds the listener, registers with the controller (waiting for it to come up), then serves
/// commands and sends heartbeats in the background.
pub async fn start(config: AgentConfig, hv: Arc<dyn Hypervisor>) -> anyhow::Result<RunningAgent> {
    start_with_network(config, hv, None).await
}

/// [`start`], with a network driver for virtual networks (its underlay address and guest MTU
/// are registered with the controller).
pub async fn start_with_network(
    config: AgentConfig,
    hv: Arc<dyn Hypervisor>,
    net: Option<Arc<shoal_net::NetManager>>,
) -> anyhow::Result<RunningAgent> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("agent {}: cannot listen on {}", config.name, config.listen))?;
    let local = listener.local_addr()?;
    let address = config.advertise.clone().unwrap_or_else(|| format!("http://{local}"));
    let loopback = local.ip().is_loopback();

    let mut creds = Credentials::load(&config.data_dir)?;
    // Other hosts must reach the underlay address: the controller checks it at registration by
    // connecting to it. The API listener answers there when it covers the address; otherwise a
    // beacon that only accepts connections does.
    let mut beacon = None;
    let net_info = match &net {
        None => None,
        Some(n) => {
            let ip = n.driver().underlay_ip();
            let underlay_port = if local.ip().is_unspecified() || local.ip() == std::net::IpAddr::V4(ip) {
                local.port()
            } else {
                let l = tokio::net::TcpListener::bind((ip, 0))
                    .await
                    .with_context(|| format!("agent {}: cannot listen on underlay address {ip}", config.name))?;
                let port = l.local_addr()?.port();
                beacon = Some(l);
                port
            };
            Some(NetInfo {
                driver: n.driver().name().to_string(),
                underlay_ip: ip,
                underlay_port,
                guest_mtu: n.driver().guest_mtu(),
            })
        }
    };
    // The watchdog runs before registration: an agent restarted while cut off from the
    // controller must still stop its VMs once the lease it last had ran out.
    let loaded = Standing::load(&config.data_dir);
    if loaded.ran_out_while_away() {
        let n = hv.fence().await;
        tracing::error!(agent = %config.name, vms = n, "the lease ran out while the agent was away: its VMs were stopped (self-fenced)");
    }
    let standing = Arc::new(std::sync::Mutex::new(loaded));
    let peers = standing.lock().expect("standing").peers.clone();
    probe_peers(&peers, &standing).await;
    let watchdog = tokio::spawn(fence_watchdog(config.name.clone(), hv.clone(), standing.clone()));
    if let Err(e) = register(&config, &address, hv.as_ref(), net_info.as_ref(), &mut creds).await {
        watchdog.abort();
        return Err(e);
    }
    if !loopback && creds.controller_token_hash.is_none() {
        bail!(
            "agent {} listens on {local} (not loopback) but the controller gave it no token to check commands with; \
             start the controller on a non-loopback address too",
            config.name
        );
    }

    let state = AgentState {
        hv: hv.clone(),
        net,
        require: if loopback {
            None
        } else {
            creds.controller_token_hash.clone()
        },
    };
    let app = router(state);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut rx = stop_rx.clone();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!("agent server: {e}");
        }
    });
    let mut tasks = vec![server];
    if let Some(l) = beacon {
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = l.accept() => {}
                    _ = rx.wait_for(|s| *s) => return,
                }
            }
        }));
    }
    tasks.push(tokio::spawn(heartbeat_loop(
        config.clone(),
        address.clone(),
        hv,
        net_info,
        creds,
        Watchdog {
            standing,
            task: watchdog,
        },
        stop_rx,
    )));
    tracing::info!(agent = %config.name, %address, "agent started");
    Ok(RunningAgent {
        name: config.name,
        address,
        stop: stop_tx,
        tasks,
    })
}

/// The agent's HTTP API: every route but `/healthz` needs the controller's token when the agent
/// listens off loopback.
fn router(state: AgentState) -> Router {
    Router::new()
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/ensure", post(ensure_vms))
        .route("/v1/vms/remove", post(remove_vms))
        .route("/v1/vms/{uuid}/console", get(console))
        .route("/v1/vms/{uuid}/snapshot", post(snapshot))
        .route("/v1/vms/{uuid}/checkpoint", post(checkpoint::checkpoint))
        .route("/v1/images/hold", post(checkpoint::hold))
        .route("/v1/migrations/incoming", post(migrate::prepare_incoming))
        .route(
            "/v1/vms/{uuid}/migration",
            post(migrate::migrate_out).get(migrate::progress),
        )
        .route("/v1/vms/{uuid}/migration/cancel", post(migrate::cancel))
        .route("/v1/vms/{uuid}/migration/finish", post(migrate::finish))
        .route("/v1/networks/peers", post(net::set_peers))
        .route("/v1/underlay/probe", post(net::probe_underlay))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// An error answer, in the API's one error shape.
pub(crate) fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message,
        },
    };
    (status, Json(body)).into_response()
}

/// A request the agent cannot read: 400, saying what was wrong with it.
pub(crate) fn bad_request(rejection: impl std::fmt::Display) -> Response {
    error_response(StatusCode::BAD_REQUEST, "invalid", rejection.to_string())
}

/// What an agent with a network driver registers about it.
#[derive(Clone, Debug)]
struct NetInfo {
    driver: String,
    underlay_ip: std::net::Ipv4Addr,
    underlay_port: u16,
    guest_mtu: u32,
}

async fn register(
    config: &AgentConfig,
    address: &str,
    hv: &dyn Hypervisor,
    net: Option<&NetInfo>,
    creds: &mut Credentials,
) -> anyhow::Result<()> {
    let req = RegisterRequest {
        name: config.name.clone(),
        address: address.to_string(),
        driver: hv.driver(),
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        labels: config.labels.clone(),
        allocation: config.allocation.clone(),
        underlay_ip: net.map(|n| n.underlay_ip),
        network_driver: net.map(|n| n.driver.clone()),
        underlay_port: net.map(|n| n.underlay_port),
        guest_mtu: net.map(|n| n.guest_mtu),
        join_token: if creds.credential.is_some() {
            None
        } else {
            config.join_token.clone()
        },
    };
    let client = Client::new(&config.controller_url, creds.credential.clone());
    let mut delay = Duration::from_millis(100);
    loop {
        match client.register_agent(&req).await {
            Ok(resp) => {
                let before = creds.clone();
                if resp.credential.is_some() {
                    creds.credential = resp.credential;
                }
                if let Some(t) = resp.controller_token {
                    creds.controller_token_hash = Some(hash_token(&t));
                }
                // Written only when it changed: a restart on a full disk must not fail here.
                if *creds != before {
                    creds.save(&config.data_dir)?;
                }
                return Ok(());
            }
            Err(e @ ClientError::Transport { .. }) => {
                tracing::warn!(agent = %config.name, "controller not reachable yet: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => bail!("agent {}: the controller refused to register it: {e}", config.name),
        }
    }
}

/// What the agent knows about its standing with the controller and its peers: the lease the
/// controller gave and when it was last renewed, and when each peer was last reached. The
/// watchdog (`fence_watchdog`) decides from it.
#[derive(Debug, Default)]
struct Standing {
    /// When the last heartbeat the controller answered was sent, monotonic and unix ms.
    acked: Option<std::time::Instant>,
    acked_unix_ms: u64,
    lease: Option<Duration>,
    peers: Vec<shoal_model::agent::PeerAddress>,
    /// When each peer was last reached, monotonic and unix ms.
    reached: std::collections::BTreeMap<String, (std::time::Instant, u64)>,
    /// The VMs were stopped by the watchdog and the lease not renewed since.
    fenced: bool,
}

/// The self-fencing watchdog's task and the standing it watches.
struct Watchdog {
    standing: Arc<std::sync::Mutex<Standing>>,
    task: JoinHandle<()>,
}

/// What of [`Standing`] outlives the agent (`standing.json`), so that a restarted agent knows
/// its lease, when it was last renewed and whom to ask.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedStanding {
    acked_unix_ms: u64,
    lease_ms: u64,
    peers: Vec<shoal_model::agent::PeerAddress>,
}

impl Standing {
    fn path(dir: &Path) -> PathBuf {
        dir.join("standing.json")
    }

    /// The standing the agent had when it stopped (none the first time).
    fn load(dir: &Path) -> Standing {
        let Ok(bytes) = std::fs::read(Self::path(dir)) else {
            return Standing::default();
        };
        let Ok(saved) = serde_json::from_slice::<SavedStanding>(&bytes) else {
            tracing::warn!("ignoring an unreadable {}", Self::path(dir).display());
            return Standing::default();
        };
        let ago = Duration::from_millis(shoal_model::now_ms().saturating_sub(saved.acked_unix_ms));
        Standing {
            acked: std::time::Instant::now().checked_sub(ago),
            acked_unix_ms: saved.acked_unix_ms,
            lease: (saved.lease_ms > 0).then(|| Duration::from_millis(saved.lease_ms)),
            peers: saved.peers,
            ..Default::default()
        }
    }

    /// Written after every answered heartbeat (to a temporary file, then renamed). A failure
    /// (a full disk) is only logged: the standing in memory is what the watchdog uses.
    fn save(&self, dir: &Path, acked_unix_ms: u64) {
        let saved = SavedStanding {
            acked_unix_ms,
            lease_ms: self.lease.map_or(0, |l| l.as_millis() as u64),
            peers: self.peers.clone(),
        };
        let path = Self::path(dir);
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::debug!("saving {}: {e}", path.display());
        }
    }

    /// The moment (unix ms) the lease runs out unless renewed: the last answered heartbeat, or
    /// the last moment a strict majority of peers was reached, plus the lease. `None` when
    /// there is nothing to run out (no lease yet, or no peers). What the fence guard acts on.
    fn deadline_unix_ms(&self) -> Option<u64> {
        let lease = self.lease?.as_millis() as u64;
        if self.peers.is_empty() || self.acked_unix_ms == 0 {
            return None;
        }
        let mut reached: Vec<u64> = self
            .peers
            .iter()
            .filter_map(|p| self.reached.get(&p.host).map(|(_, ms)| *ms))
            .collect();
        reached.sort_unstable_by(|a, b| b.cmp(a));
        let majority = reached.get(self.peers.len() / 2).copied().unwrap_or(0);
        Some(self.acked_unix_ms.max(majority) + lease)
    }

    /// The lease it had when it stopped ran out while the agent was away: the controller may
    /// have restarted its VMs elsewhere meanwhile, whatever the peers say now.
    fn ran_out_while_away(&self) -> bool {
        self.deadline_unix_ms().is_some_and(|d| shoal_model::now_ms() > d)
    }

    /// Whether the host must stop its VMs: no answered heartbeat for longer than the lease, and
    /// at most half of its peers reached within it. A host with no peers never fences: no other
    /// host could run its VMs (see `docs/ha.md` for why this keeps a VM from running twice).
    fn must_fence(&self) -> bool {
        let (Some(acked), Some(lease)) = (self.acked, self.lease) else {
            return false;
        };
        if self.fenced || acked.elapsed() <= lease || self.peers.is_empty() {
            return false;
        }
        let reached = self
            .peers
            .iter()
            .filter(|p| self.reached.get(&p.host).is_some_and(|(at, _)| at.elapsed() <= lease))
            .count();
        reached * 2 <= self.peers.len()
    }
}

async fn heartbeat_loop(
    config: AgentConfig,
    address: String,
    hv: Arc<dyn Hypervisor>,
    net: Option<NetInfo>,
    mut creds: Credentials,
    watchdog: Watchdog,
    mut stop: watch::Receiver<bool>,
) {
    let standing = watchdog.standing;
    let mut written_deadline = None;
    let mut client = Client::new(&config.controller_url, creds.credential.clone());
    // A heartbeat that hangs must not keep the watchdog's view stale: each has a deadline.
    let deadline = config.heartbeat_interval.max(Duration::from_secs(2));
    loop {
        let peers = standing.lock().expect("standing").peers.clone();
        probe_peers(&peers, &standing).await;
        let (reached, peer_names) = {
            let s = standing.lock().expect("standing");
            (
                s.reached.iter().map(|(h, (_, ms))| (h.clone(), *ms)).collect(),
                s.peers.iter().map(|p| p.host.clone()).collect(),
            )
        };
        let hb = Heartbeat {
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            vms: hv.list().await,
            images: hv.cached_images().await,
            reached,
            peers: peer_names,
        };
        let (sent, sent_unix_ms) = (std::time::Instant::now(), shoal_model::now_ms());
        let answer = tokio::time::timeout(deadline, client.heartbeat(&config.name, &hb)).await;
        match answer {
            Ok(Ok(reply)) => {
                let mut s = standing.lock().expect("standing");
                if s.fenced {
                    tracing::warn!(agent = %config.name, "the controller answers again; the fenced VMs stay stopped until it says otherwise");
                }
                s.acked = Some(sent);
                s.acked_unix_ms = sent_unix_ms;
                s.lease = (reply.lease_ms > 0).then(|| Duration::from_millis(reply.lease_ms));
                s.reached.retain(|h, _| reply.peers.iter().any(|p| &p.host == h));
                s.peers = reply.peers;
                s.fenced = false;
                s.save(&config.data_dir, sent_unix_ms);
            }
            // The controller no longer knows this host (its state was reset): join again.
            Ok(Err(e)) if e.status() == Some(404) => {
                tracing::warn!(agent = %config.name, "controller forgot this host, registering again");
                if let Err(e) = register(&config, &address, hv.as_ref(), net.as_ref(), &mut creds).await {
                    tracing::error!("{e:#}");
                }
                client = Client::new(&config.controller_url, creds.credential.clone());
            }
            Ok(Err(e)) => tracing::warn!(agent = %config.name, "heartbeat failed: {e}"),
            Err(_) => tracing::warn!(agent = %config.name, "heartbeat failed: no answer within {deadline:?}"),
        }
        let lease_deadline = standing.lock().expect("standing").deadline_unix_ms();
        if lease_deadline != written_deadline {
            fence_guard::write_deadline(&config.data_dir, lease_deadline);
            written_deadline = lease_deadline;
        }
        tokio::select! {
            _ = tokio::time::sleep(config.heartbeat_interval) => {}
            _ = stop.wait_for(|s| *s) => {
                watchdog.task.abort();
                return;
            }
        }
    }
}

/// Connects to each peer's address (1 s each, all at once) and records those that answered.
async fn probe_peers(peers: &[shoal_model::agent::PeerAddress], standing: &std::sync::Mutex<Standing>) {
    let probes = peers.iter().map(|p| async move {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(&p.address)).await,
            Ok(Ok(_))
        );
        (p.host.clone(), ok)
    });
    let results = futures::future::join_all(probes).await;
    let mut s = standing.lock().expect("standing");
    for (host, ok) in results {
        if ok {
            s.reached
                .insert(host, (std::time::Instant::now(), shoal_model::now_ms()));
        }
    }
}

/// Self-fencing: checks the agent's standing every 200 ms and stops every VM once the lease
/// ran out with no majority of peers in reach ([`Standing::must_fence`]).
async fn fence_watchdog(name: String, hv: Arc<dyn Hypervisor>, standing: Arc<std::sync::Mutex<Standing>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fence = {
            let mut s = standing.lock().expect("standing");
            let f = s.must_fence();
            if f {
                s.fenced = true;
            }
            f
        };
        if fence {
            tracing::error!(agent = %name, "no answer from the controller within the lease and most peers out of reach: stopping every VM (self-fencing)");
            let n = hv.fence().await;
            tracing::error!(agent = %name, vms = n, "self-fenced");
        }
    }
}

pub fn hash_token(token: &str) -> String {
    hex::encode(blake3::hash(token.as_bytes()).as_bytes())
}

async fn authenticate(State(state): State<AgentState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.require {
        let presented = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented.map(hash_token).as_deref() != Some(expected.as_str()) {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid controller token".into(),
            );
        }
    }
    next.run(req).await
}

async fn list_vms(State(state): State<AgentState>) -> Json<BatchResult> {
    Json(BatchResult {
        vms: state.hv.list().await,
    })
}

async fn ensure_vms(State(state): State<AgentState>, req: Result<Json<EnsureVms>, JsonRejection>) -> Response {
    let Json(req) = match req {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let results = futures::future::join_all(req.vms.iter().map(|spec| {
        let hv = state.hv.clone();
        async move {
            match hv.ensure(spec).await {
                Ok(s) => s,
                Err(e) => {
                    let now = hv.list().await.into_iter().find(|v| v.uuid == spec.uuid);
                    ensure_failed(spec, &e, now)
                }
            }
        }
    }))
    .await;
    Json(BatchResult { vms: results }).into_response()
}

/// What the agent reports for a VM whose `ensure` failed with `e`; `now` is the VM as the
/// driver holds it, if it does. A retryable failure keeps that state (a VM the driver does not
/// hold yet stays pending) and the controller's next `ensure` tries again; any other failure
/// fails the VM with the reason.
fn ensure_failed(spec: &shoal_model::agent::VmSpec, e: &HvError, now: Option<VmStatus>) -> VmStatus {
    let reason = Some(e.reason());
    match (e.kind(), now) {
        (ErrorKind::Retryable, Some(now)) => VmStatus { reason, ..now },
        (kind, _) => VmStatus {
            uuid: spec.uuid,
            name: spec.name.clone(),
            state: if kind == ErrorKind::Retryable {
                VmState::Pending
            } else {
                VmState::Failed
            },
            reason,
            // Not a state the driver holds: it only settles a VM still pending.
            seq: 0,
            cpu_seconds: None,
            disk_bytes: None,
        },
    }
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
    max: Option<usize>,
}

async fn console(
    State(state): State<AgentState>,
    uuid: Result<UrlPath<uuid::Uuid>, PathRejection>,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
) -> Response {
    let (UrlPath(uuid), Query(q)) = match (uuid, q) {
        (Ok(u), Ok(q)) => (u, q),
        (Err(e), _) => return bad_request(e),
        (_, Err(e)) => return bad_request(e),
    };
    match state
        .hv
        .console(uuid, q.offset, q.max.unwrap_or(1 << 20).min(4 << 20))
        .await
    {
        Ok(c) => Json::<ConsoleChunk>(c).into_response(),
        Err(e) => match e.kind() {
            ErrorKind::NotFound => error_response(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            _ => error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        },
    }
}

/// Records a VM's disk in the image store (the controller's, via this host's cache).
async fn snapshot(State(state): State<AgentState>, uuid: Result<UrlPath<uuid::Uuid>, PathRejection>) -> Response {
    let UrlPath(uuid) = match uuid {
        Ok(u) => u,
        Err(e) => return bad_request(e),
    };
    match state.hv.snapshot(uuid).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => match e.kind() {
            ErrorKind::NotFound => error_response(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            _ => error_response(StatusCode::CONFLICT, "snapshot_failed", e.to_string()),
        },
    }
}

/// Fetches template files from the controller with this agent's credential (read when needed,
/// since the agent gets it only when it registers).
pub struct ControllerTemplates {
    pub controller_url: String,
    pub host: String,
    pub data_dir: PathBuf,
    /// This host's chunk cache, opened on first use under `DATA_DIR/images`.
    pub images: tokio::sync::OnceCell<Arc<shoal_image::ImageStore>>,
}

impl ControllerTemplates {
    pub fn new(controller_url: String, host: String, data_dir: PathBuf) -> ControllerTemplates {
        ControllerTemplates {
            controller_url,
            host,
            data_dir,
            images: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<Client, SourceError> {
        let creds = Credentials::load(&self.data_dir).map_err(|e| SourceError::Failed {
            what: "reading the agent's credentials".into(),
            source: e.into(),
        })?;
        Ok(Client::new(&self.controller_url, creds.credential))
    }

    /// This host's image cache.
    pub async fn images(&self) -> Result<Arc<shoal_image::ImageStore>, SourceError> {
        let dir = self.data_dir.join("images");
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| SourceError::Failed {
            what: "opening the host's image cache".into(),
            source,
        };
        self.images
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || shoal_image::ImageStore::open(&dir))
                    .await
                    .map_err(|e| failed(e.into()))?
                    .map(Arc::new)
                    .map_err(|e| failed(e.into()))
            })
            .await
            .cloned()
    }
}

/// A controller's answer as a template source's: one out of reach, or answering that it is
/// unavailable, is worth another try; one that has no such thing is an input error.
fn source_error(what: String, e: ClientError) -> SourceError {
    match e.status() {
        _ if matches!(e, ClientError::Transport { .. }) => SourceError::Unreachable { what, source: e.into() },
        Some(404) => SourceError::Missing {
            what,
            reason: e.to_string(),
        },
        Some(502..=504) => SourceError::Unreachable { what, source: e.into() },
        _ => SourceError::Failed { what, source: e.into() },
    }
}

/// A failure of the host's own image cache while doing `what`.
fn cache_error(what: &'static str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> SourceError {
    move |source| SourceError::Failed {
        what: what.to_string(),
        source,
    }
}

#[async_trait::async_trait]
impl TemplateSource for ControllerTemplates {
    async fn fetch(&self, template: &str, file: TemplateFile, dest: &Path) -> Result<(), SourceError> {
        self.client()
            .await?
            .download_template_file(&self.host, template, file.as_str(), dest)
            .await
            .map_err(|e| source_error(format!("the controller's template {template}"), e))
    }

    async fn cached_images(&self) -> Vec<String> {
        let Ok(images) = self.images().await else {
            return Vec::new();
        };
        let refs = tokio::task::spawn_blocking(move || images.refs()).await;
        let mut ids: Vec<String> = match refs {
            Ok(Ok(r)) => r.values().map(|id| id.to_hex()).collect(),
            _ => Vec::new(),
        };
        ids.sort();
        ids.dedup();
        ids
    }

    async fn hold_image(&self, manifest: &str) -> Result<(), SourceError> {
        self.hold(manifest).await
    }

    async fn store_image(&self, raw: &Path) -> Result<shoal_model::agent::DiskSnapshot, SourceError> {
        let images = self.images().await?;
        let (store, path) = (images.clone(), raw.to_path_buf());
        let chunking = cache_error("chunking the disk");
        let rep = tokio::task::spawn_blocking(move || {
            // The VM's own disk: taken as raw whatever it holds.
            store.import_path(
                &path,
                &shoal_image::ImportOptions {
                    format: Some(shoal_image::ImageFormat::Raw),
                    ..Default::default()
                },
            )
        })
        .await
        .map_err(|e| chunking(e.into()))?
        .map_err(|e| chunking(e.into()))?;
        let t = self
            .client()
            .await?
            .push_image(Some(&self.host), images.clone(), rep.manifest, &|_, _| {})
            .await
            .map_err(|e| source_error("sending the disk image to the controller".into(), e))?;
        // The host's copy is not needed to run anything: let the cache's gc take it.
        Ok(shoal_model::agent::DiskSnapshot {
            manifest: rep.manifest.to_hex(),
            logical_bytes: rep.logical_bytes,
            chunks: t.chunks_total,
            chunks_sent: t.chunks_sent,
            bytes_sent: t.bytes_sent,
        })
    }

    async fn store_changes(
        &self,
        parent: &str,
        changes: &[shoal_hv::DiskChange],
        data: &Path,
        size: u64,
    ) -> Result<shoal_hv::StoredChanges, SourceError> {
        let id: shoal_image::ManifestId = parent.parse().map_err(|e: shoal_image::Error| SourceError::Missing {
            what: format!("parent image {parent}"),
            reason: e.to_string(),
        })?;
        let images = self.images().await?;
        // The parent is the previous checkpoint (kept under its checkpoint ref) or the template's
        // image; a cache without it whole (a new host, a quarantined chunk) gets what it lacks
        // from the controller first, since the new image keeps the parent's chunks by reference.
        let held = {
            let store = images.clone();
            let checking = cache_error("reading the parent image");
            tokio::task::spawn_blocking(move || store.manifest(&id).is_ok_and(|m| store.missing(&m).is_empty()))
                .await
                .map_err(|e| checking(e.into()))?
        };
        if !held {
            self.client()
                .await?
                .pull_image(Some(&self.host), images.clone(), id, &|_, _| {})
                .await
                .map_err(|e| source_error(format!("fetching parent image {parent}"), e))?;
        }
        let changes: Vec<shoal_image::Change> = changes
            .iter()
            .map(|c| shoal_image::Change {
                offset: c.offset,
                len: c.len,
                zero: c.zero,
            })
            .collect();
        let (store, path) = (images.clone(), data.to_path_buf());
        let splicing = cache_error("storing the disk's changes");
        let rep = tokio::task::spawn_blocking(move || {
            let rep = store.splice(&id, &changes, &path, Some(size), None)?;
            // Named in the cache so that its gc keeps it: it is the next checkpoint's parent.
            store.set_ref(&format!("checkpoint/{}", rep.manifest.to_hex()), &rep.manifest)?;
            Ok::<_, shoal_image::Error>(rep)
        })
        .await
        .map_err(|e| splicing(e.into()))?
        .map_err(|e| splicing(e.into()))?;
        let t = self
            .client()
            .await?
            .push_image(Some(&self.host), images.clone(), rep.manifest, &|_, _| {})
            .await
            .map_err(|e| source_error("sending the disk's changes to the controller".into(), e))?;
        tracing::info!(
            parent,
            manifest = %rep.manifest,
            read_bytes = rep.read_bytes,
            new_chunks = rep.new_chunks,
            sent = t.chunks_sent,
            seconds = rep.seconds,
            "disk checkpoint stored"
        );
        Ok(shoal_hv::StoredChanges {
            manifest: rep.manifest.to_hex(),
            read_bytes: rep.read_bytes,
            chunks: t.chunks_total,
            chunks_sent: t.chunks_sent,
            bytes_sent: t.bytes_sent,
        })
    }

    async fn fetch_image(&self, template: &str, manifest: &str, dest: &Path) -> Result<(), SourceError> {
        let id: shoal_image::ManifestId = manifest.parse().map_err(|e: shoal_image::Error| SourceError::Missing {
            what: format!("image {manifest} of template {template}"),
            reason: e.to_string(),
        })?;
        let images = self.images().await?;
        let started = std::time::Instant::now();
        let rep = self
            .client()
            .await?
            .pull_image(Some(&self.host), images.clone(), id, &|_, _| {})
            .await
            .map_err(|e| source_error(format!("fetching image {manifest}"), e))?;
        tracing::info!(
            template,
            chunks = rep.chunks_total,
            fetched = rep.chunks_sent,
            bytes = rep.bytes_sent,
            seconds = started.elapsed().as_secs_f64(),
            "template image in the host's cache"
        );
        // Named by what it is, not by the template: a VM restarted from a checkpoint sits on an
        // image of its own, and the template's image must keep its name beside it.
        let (dest, name) = (dest.to_path_buf(), format!("base/{manifest}"));
        let writing = cache_error("writing the base image");
        tokio::task::spawn_blocking(move || {
            images.set_ref(&name, &id)?;
            images.export(&id, &dest, shoal_image::ImageFormat::Raw, None)
        })
        .await
        .map_err(|e| writing(e.into()))?
        .map_err(|e| writing(e.into()))?;
        Ok(())
    }
}

/// Answers with the VMs that could not be removed (empty when all went).
async fn remove_vms(State(state): State<AgentState>, req: Result<Json<RemoveVms>, JsonRejection>) -> Response {
    let Json(req) = match req {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let mut failed = Vec::new();
    for uuid in req.uuids {
        if let Err(e) = state.hv.remove(uuid).await {
            failed.push(VmStatus {
                uuid,
                name: String::new(),
                state: VmState::Failed,
                reason: Some(e.to_string()),
                seq: 0,
                cpu_seconds: None,
                disk_bytes: None,
            });
        }
    }
    Json(BatchResult { vms: failed }).into_response()
}

#[cfg(test)]
mod tests;
