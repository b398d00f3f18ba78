//! HTTP clients: [`Client`] for the controller's REST API (the CLI, tests and benchmarks use it)
//! and [`AgentClient`] for a host agent's command API (the controller uses it).

mod images;

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_model::agent::{
    BatchResult, ConsoleChunk, EnsureVms, Heartbeat, IncomingVm, MigrateOut, MigrationProgress, PrepareIncoming,
    RegisterRequest, RegisterResponse, RemoveVms, UnderlayProbe, UnderlayProbeResult, VmStatus,
};
use shoal_model::api::{ClusterView, CreateCluster, CreateProfile, ErrorBody, ProfileView, ScaleCluster};
use shoal_model::{Host, Operation, OperationState, Template, Vm};
use thiserror::Error;
use uuid::Uuid;

#[derive(Debug, Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{message}")]
    Api { status: u16, code: String, message: String },
    #[error("cannot reach {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("operation {id} failed: {message}")]
    OperationFailed { id: Uuid, message: String },
    /// The local image store, or an image that failed its checks.
    #[error("image: {0}")]
    Image(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A string that cannot be the base URL of a [`Client`].
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{url:?} is not a valid URL ({reason}); expected one like http://127.0.0.1:7700")]
pub struct BadUrl {
    pub url: String,
    pub reason: String,
}

/// Checks that `url` can be a [`Client`]'s base URL: absolute, `http` or `https`, with a host.
/// [`Client::new`] takes any string; a bad one fails at the first request, with reqwest's
/// less telling message.
pub fn check_base_url(url: &str) -> Result<(), BadUrl> {
    let bad = |reason: String| BadUrl {
        url: url.to_string(),
        reason,
    };
    let u = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad(format!("the scheme is {}, not http or https", u.scheme())));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    Ok(())
}

/// Shared plumbing: base URL, optional bearer token, JSON in and out, errors decoded.
#[derive(Clone)]
struct Http {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Http {
    fn new(base: &str, token: Option<String>, timeout: Duration) -> Http {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(8)
            .build()
            .expect("HTTP client builds");
        Http {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T, ClientError> {
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Transport {
            url: self.base.clone(),
            source,
        })?;
        if status.is_success() {
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body).map_err(|e| ClientError::Api {
                status: status.as_u16(),
                code: "bad_response".into(),
                message: format!("unexpected response from {}: {e}", self.base),
            });
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ClientError::Api {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: default_code(status).into(),
                message: format!(
                    "{} answered {status}: {}",
                    self.base,
                    String::from_utf8_lossy(&bytes).trim()
                ),
            },
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.request(Method::GET, path)).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.send(self.request(Method::PUT, path).json(body)).await
    }

    async fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.send(self.request(Method::PATCH, path).json(body)).await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.request(Method::DELETE, path)).await
    }
}

fn default_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::NOT_FOUND => "not_found",
        _ => "http_error",
    }
}

/// Client of the controller's REST API.
#[derive(Clone)]
pub struct Client {
    http: Http,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Client {
        Client {
            http: Http::new(url, token, Duration::from_secs(120)),
        }
    }

    pub fn url(&self) -> &str {
        &self.http.base
    }

    pub async fn hosts(&self) -> Result<Vec<Host>, ClientError> {
        self.http.get("/v1/hosts").await
    }

    /// Creates a one-time token with which an agent can join.
    pub async fn create_join_token(&self) -> Result<String, ClientError> {
        let v: serde_json::Value = self.http.post("/v1/hosts/join-tokens", &()).await?;
        Ok(v["token"].as_str().unwrap_or_default().to_string())
    }

    /// Uploads a template: its disk image and, for direct kernel boot, kernel, initrd and
    /// command line. Files are streamed, not read into memory.
    /// Uploads a template with its whole disk file; the controller chunks it into its store.
    pub async fn import_template(&self, name: &str, files: &TemplateFiles) -> Result<Template, ClientError> {
        self.template_upload(name, None, files).await
    }

    /// Creates a template whose disk is image `manifest`, already pushed to the controller's
    /// store (`push_image`); `format` is the format of the file it came from. Only the kernel and
    /// initrd of `files` are sent.
    pub async fn create_template(
        &self,
        name: &str,
        manifest: &shoal_image::ManifestId,
        format: &str,
        files: &TemplateFiles,
    ) -> Result<Template, ClientError> {
        self.template_upload(name, Some((manifest, format)), files).await
    }

    async fn template_upload(
        &self,
        name: &str,
        manifest: Option<(&shoal_image::ManifestId, &str)>,
        files: &TemplateFiles,
    ) -> Result<Template, ClientError> {
        let mut form = reqwest::multipart::Form::new().text("name", name.to_string());
        match manifest {
            Some((id, format)) => form = form.text("manifest", id.to_hex()).text("format", format.to_string()),
            None => form = form.part("disk", file_part(&files.disk).await?),
        }
        if let Some(k) = &files.kernel {
            form = form.part("kernel", file_part(k).await?);
        }
        if let Some(i) = &files.initrd {
            form = form.part("initrd", file_part(i).await?);
        }
        if let Some(c) = &files.cmdline {
            form = form.text("cmdline", c.clone());
        }
        form = match &files.ready {
            shoal_model::Readiness::Report => form.text("ready", "report"),
            shoal_model::Readiness::Running => form.text("ready", "running"),
            shoal_model::Readiness::Pattern(p) => form.text("ready_pattern", p.clone()),
        };
        let rb = self
            .http
            .request(Method::POST, "/v1/templates")
            .timeout(Duration::from_secs(3600))
            .multipart(form);
        self.http.send(rb).await
    }

    pub async fn publish_template(&self, vm: &str, name: &str) -> Result<Template, ClientError> {
        let req = shoal_model::api::PublishTemplate {
            vm: vm.into(),
            name: name.into(),
        };
        let rb = self
            .http
            .request(Method::POST, "/v1/templates/publish")
            .timeout(Duration::from_secs(3600))
            .json(&req);
        self.http.send(rb).await
    }

    /// Records a VM's disk in the image store.
    pub async fn snapshot_vm(&self, name: &str) -> Result<shoal_model::api::VmSnapshot, ClientError> {
        let rb = self
            .http
            .request(Method::POST, &format!("/v1/vms/{}/snapshot", seg(name)))
            .timeout(Duration::from_secs(3600));
        self.http.send(rb).await
    }

    /// Checkpoints a VM's disk into the image store now.
    pub async fn checkpoint_vm(&self, name: &str) -> Result<shoal_model::ha::CheckpointBlocks, ClientError> {
        let rb = self
            .http
            .request(Method::POST, &format!("/v1/vms/{}/checkpoint", seg(name)))
            .timeout(Duration::from_secs(3600));
        self.http.send(rb).await
    }

    /// A VM's block profile, checkpoint by checkpoint.
    pub async fn vm_blocks(&self, name: &str) -> Result<shoal_model::ha::VmBlocks, ClientError> {
        self.http.get(&format!("/v1/vms/{}/blocks", seg(name))).await
    }

    /// A cluster's block profile: each VM's latest checkpoint and their sum.
    pub async fn cluster_blocks(&self, name: &str) -> Result<shoal_model::ha::ClusterBlocks, ClientError> {
        self.http.get(&format!("/v1/clusters/{}/blocks", seg(name))).await
    }

    pub async fn templates(&self) -> Result<Vec<Template>, ClientError> {
        self.http.get("/v1/templates").await
    }

    pub async fn delete_template(&self, name: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/v1/templates/{}", seg(name))).await
    }

    pub async fn create_profile(&self, req: &CreateProfile) -> Result<ProfileView, ClientError> {
        self.http.post("/v1/profiles", req).await
    }

    pub async fn profiles(&self) -> Result<Vec<ProfileView>, ClientError> {
        self.http.get("/v1/profiles").await
    }

    pub async fn profile(&self, name: &str) -> Result<ProfileView, ClientError> {
        self.http.get(&format!("/v1/profiles/{}", seg(name))).await
    }

    pub async fn delete_profile(&self, name: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/v1/profiles/{}", seg(name))).await
    }

    pub async fn create_cluster(&self, req: &CreateCluster) -> Result<Operation, ClientError> {
        self.http.post("/v1/clusters", req).await
    }

    /// What creating the cluster would do, with every host's verdict when `explain`.
    pub async fn plan_place(
        &self,
        req: &CreateCluster,
        explain: bool,
    ) -> Result<shoal_policy::Explanation, ClientError> {
        self.http.post(&format!("/v1/plan/place?explain={explain}"), req).await
    }

    /// The live hosts and VMs as a policy snapshot.
    pub async fn plan_snapshot(&self) -> Result<shoal_policy::Snapshot, ClientError> {
        self.http.get("/v1/plan/snapshot").await
    }

    /// Plans a rebalance, and executes it when `apply`.
    pub async fn rebalance(
        &self,
        options: &shoal_policy::rebalance::RebalanceOptions,
        apply: bool,
    ) -> Result<shoal_policy::rebalance::RebalancePlan, ClientError> {
        let body = serde_json::json!({ "apply": apply, "options": options });
        self.http.post("/v1/plan/rebalance", &body).await
    }

    /// Plans moving every VM off `host`; when `apply`, marks it draining and executes the plan.
    pub async fn drain_host(
        &self,
        host: &str,
        options: &shoal_policy::rebalance::RebalanceOptions,
        apply: bool,
    ) -> Result<shoal_policy::rebalance::RebalancePlan, ClientError> {
        let body = serde_json::json!({ "apply": apply, "options": options });
        self.http.post(&format!("/v1/hosts/{}/drain", seg(host)), &body).await
    }

    /// Puts a drained host back in service.
    /// Puts a host into maintenance (`on`) or takes it out.
    pub async fn host_maintenance(&self, host: &str, on: bool) -> Result<(), ClientError> {
        let path = format!("/v1/hosts/{}/maintenance", seg(host));
        let rb = self.http.request(if on { Method::POST } else { Method::DELETE }, &path);
        self.http.send::<()>(rb).await
    }

    pub async fn energy(&self) -> Result<shoal_model::power::EnergyReport, ClientError> {
        self.http.get("/v1/energy").await
    }

    pub async fn host_power(&self, host: &str) -> Result<shoal_model::power::HostPower, ClientError> {
        self.http.get(&format!("/v1/hosts/{}/power", seg(host))).await
    }

    pub async fn configure_host_power(
        &self,
        host: &str,
        config: &shoal_model::power::HostPowerConfig,
    ) -> Result<shoal_model::power::HostPower, ClientError> {
        self.http.put(&format!("/v1/hosts/{}/power", seg(host)), config).await
    }

    /// Switches a host on or off with its power command.
    pub async fn switch_host(&self, host: &str, on: bool) -> Result<shoal_model::power::HostPower, ClientError> {
        let state = if on { "on" } else { "off" };
        self.http
            .post(
                &format!("/v1/hosts/{}/power/{state}", seg(host)),
                &serde_json::json!({}),
            )
            .await
    }

    pub async fn consolidate(&self, apply: bool) -> Result<shoal_model::power::ConsolidationPlan, ClientError> {
        self.http
            .post("/v1/plan/consolidate", &serde_json::json!({ "apply": apply }))
            .await
    }

    pub async fn undrain_host(&self, host: &str) -> Result<(), ClientError> {
        self.http
            .post(&format!("/v1/hosts/{}/undrain", seg(host)), &serde_json::json!({}))
            .await
    }

    pub async fn clusters(&self) -> Result<Vec<ClusterView>, ClientError> {
        self.http.get("/v1/clusters").await
    }

    pub async fn cluster(&self, name: &str) -> Result<ClusterView, ClientError> {
        self.http.get(&format!("/v1/clusters/{}", seg(name))).await
    }

    pub async fn scale_cluster(&self, name: &str, size: u32) -> Result<Operation, ClientError> {
        self.http
            .post(&format!("/v1/clusters/{}/scale", seg(name)), &ScaleCluster { size })
            .await
    }

    pub async fn delete_cluster(&self, name: &str) -> Result<Operation, ClientError> {
        self.http.delete(&format!("/v1/clusters/{}", seg(name))).await
    }

    pub async fn create_network(
        &self,
        req: &shoal_model::network::CreateNetwork,
    ) -> Result<shoal_model::network::NetworkView, ClientError> {
        self.http.post("/v1/networks", req).await
    }

    pub async fn networks(&self) -> Result<Vec<shoal_model::network::NetworkView>, ClientError> {
        self.http.get("/v1/networks").await
    }

    pub async fn network(&self, name: &str) -> Result<shoal_model::network::NetworkView, ClientError> {
        self.http.get(&format!("/v1/networks/{}", seg(name))).await
    }

    pub async fn update_network(
        &self,
        name: &str,
        req: &shoal_model::network::UpdateNetwork,
    ) -> Result<shoal_model::network::NetworkView, ClientError> {
        self.http.patch(&format!("/v1/networks/{}", seg(name)), req).await
    }

    pub async fn delete_network(&self, name: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self.http.delete(&format!("/v1/networks/{}", seg(name))).await?;
        Ok(())
    }

    pub async fn vms(&self, cluster: Option<&str>) -> Result<Vec<Vm>, ClientError> {
        match cluster {
            Some(c) => self.http.get(&format!("/v1/vms?cluster={}", seg(c))).await,
            None => self.http.get("/v1/vms").await,
        }
    }

    pub async fn vm(&self, name: &str) -> Result<Vm, ClientError> {
        self.http.get(&format!("/v1/vms/{}", seg(name))).await
    }

    /// `action` is `stop`, `start`, `suspend` or `resume`.
    pub async fn vm_action(&self, name: &str, action: &str, force: bool) -> Result<Operation, ClientError> {
        self.http
            .post(&format!("/v1/vms/{}/{}?force={force}", seg(name), seg(action)), &())
            .await
    }

    /// Starts moving a running VM to another host.
    pub async fn migrate_vm(&self, name: &str, req: &shoal_model::MigrateVm) -> Result<Operation, ClientError> {
        self.http.post(&format!("/v1/vms/{}/migrate", seg(name)), req).await
    }

    /// Moves every VM of a cluster off the hosts it is on.
    pub async fn migrate_cluster(
        &self,
        name: &str,
        req: &shoal_model::MigrateCluster,
    ) -> Result<Operation, ClientError> {
        self.http
            .post(&format!("/v1/clusters/{}/migrate", seg(name)), req)
            .await
    }

    /// Where a VM would migrate, with every host's verdict when `explain`.
    pub async fn plan_migrate(
        &self,
        vm: &str,
        to: Option<&str>,
        explain: bool,
    ) -> Result<shoal_policy::Explanation, ClientError> {
        self.http
            .post(
                &format!("/v1/plan/migrate?explain={explain}"),
                &serde_json::json!({ "vm": vm, "to": to }),
            )
            .await
    }

    /// The migrations under way.
    pub async fn migrations(&self) -> Result<Vec<shoal_model::Migration>, ClientError> {
        self.http.get("/v1/migrations").await
    }

    pub async fn cluster_action(&self, name: &str, action: &str) -> Result<Operation, ClientError> {
        self.http
            .post(&format!("/v1/clusters/{}/{}", seg(name), seg(action)), &())
            .await
    }

    pub async fn console(&self, name: &str, offset: u64) -> Result<ConsoleChunk, ClientError> {
        self.http
            .get(&format!("/v1/vms/{}/console?offset={offset}", seg(name)))
            .await
    }

    pub async fn operations(&self) -> Result<Vec<Operation>, ClientError> {
        self.http.get("/v1/operations").await
    }

    pub async fn operation(&self, id: Uuid) -> Result<Operation, ClientError> {
        self.http.get(&format!("/v1/operations/{id}")).await
    }

    /// Polls an operation until it ends, calling `progress` whenever it changes. A failed
    /// operation is an error carrying its message.
    pub async fn wait(&self, id: Uuid, mut progress: impl FnMut(&Operation)) -> Result<Operation, ClientError> {
        let mut last: Option<Operation> = None;
        let mut delay = Duration::from_millis(20);
        loop {
            let op = self.operation(id).await?;
            if last.as_ref() != Some(&op) {
                progress(&op);
            }
            match op.state {
                OperationState::Succeeded => return Ok(op),
                OperationState::Failed => {
                    return Err(ClientError::OperationFailed {
                        id,
                        message: op.error.clone().unwrap_or_else(|| "unknown error".into()),
                    })
                }
                OperationState::Running => {}
            }
            last = Some(op);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// Raw GET, for documents that have no typed method (`/openapi.json`).
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.http.get(path).await
    }

    /// An agent's registration (agents use this; the token is the join token or credential).
    pub async fn register_agent(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        self.http.post("/v1/agents/register", req).await
    }

    /// Streams a template file (`disk`, `kernel`, `initrd`) to `dest` (agents use this).
    pub async fn download_template_file(
        &self,
        host: &str,
        template: &str,
        file: &str,
        dest: &Path,
    ) -> Result<(), ClientError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let url = format!("/v1/agents/{}/templates/{}/{}", seg(host), seg(template), seg(file));
        let resp = self
            .http
            .request(Method::GET, &url)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.http.base.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            return self.http.send::<()>(self.http.request(Method::GET, &url)).await;
        }
        let io = |source| ClientError::File {
            path: dest.display().to_string(),
            source,
        };
        let mut f = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| ClientError::Transport {
                url: self.http.base.clone(),
                source,
            })?;
            f.write_all(&chunk).await.map_err(io)?;
        }
        f.sync_all().await.map_err(io)?;
        Ok(())
    }

    pub async fn heartbeat(
        &self,
        host: &str,
        hb: &Heartbeat,
    ) -> Result<shoal_model::agent::HeartbeatReply, ClientError> {
        self.http.post(&format!("/v1/agents/{}/heartbeat", seg(host)), hb).await
    }
}

/// The files of a template to upload.
#[derive(Clone, Debug, Default)]
pub struct TemplateFiles {
    pub disk: std::path::PathBuf,
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
    pub cmdline: Option<String>,
    /// How VMs of it count as ready (the guest's report unless said otherwise).
    pub ready: shoal_model::Readiness,
}

impl TemplateFiles {
    pub fn disk(path: &Path) -> TemplateFiles {
        TemplateFiles {
            disk: path.to_path_buf(),
            ..Default::default()
        }
    }
}

async fn file_part(path: &Path) -> Result<reqwest::multipart::Part, ClientError> {
    let err = |source| ClientError::File {
        path: path.display().to_string(),
        source,
    };
    let f = tokio::fs::File::open(path).await.map_err(err)?;
    let len = f.metadata().await.map_err(err)?.len();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20);
    Ok(
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
            .file_name(
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
            .mime_str("application/octet-stream")
            .expect("valid MIME type"),
    )
}

/// Client of one host agent's command API.
#[derive(Clone)]
pub struct AgentClient {
    http: Http,
}

impl AgentClient {
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> AgentClient {
        AgentClient {
            http: Http::new(url, token, timeout),
        }
    }

    pub async fn ensure(&self, req: &EnsureVms) -> Result<BatchResult, ClientError> {
        self.http.post("/v1/vms/ensure", req).await
    }

    /// Tells the host the remote VTEPs of each of its networks.
    pub async fn set_network_peers(&self, req: &shoal_model::network::NetworkPeers) -> Result<(), ClientError> {
        let _: serde_json::Value = self.http.post("/v1/networks/peers", req).await?;
        Ok(())
    }

    /// Asks the host whether it reaches another host's underlay address.
    pub async fn probe_underlay(&self, req: &UnderlayProbe) -> Result<UnderlayProbeResult, ClientError> {
        self.http.post("/v1/underlay/probe", req).await
    }

    pub async fn remove(&self, req: &RemoveVms) -> Result<BatchResult, ClientError> {
        self.http.post("/v1/vms/remove", req).await
    }

    pub async fn list(&self) -> Result<BatchResult, ClientError> {
        self.http.get("/v1/vms").await
    }

    pub async fn console(&self, uuid: Uuid, offset: u64, max: usize) -> Result<ConsoleChunk, ClientError> {
        self.http
            .get(&format!("/v1/vms/{uuid}/console?offset={offset}&max={max}"))
            .await
    }

    /// Destination: prepares to receive a running VM; the answer says where to send it.
    pub async fn prepare_incoming(&self, req: &PrepareIncoming) -> Result<IncomingVm, ClientError> {
        // Fetching the template's chunks and starting QEMU can take a while on a busy host.
        let rb = self
            .http
            .request(Method::POST, "/v1/migrations/incoming")
            .timeout(Duration::from_secs(600))
            .json(req);
        self.http.send(rb).await
    }

    /// Source: starts sending the VM to a prepared destination.
    pub async fn migrate_out(&self, uuid: Uuid, req: &MigrateOut) -> Result<MigrationProgress, ClientError> {
        self.http.post(&format!("/v1/vms/{uuid}/migration"), req).await
    }

    /// Source: the progress of the VM's outgoing migration, as soon as it is over or after
    /// `wait` at the latest.
    pub async fn migration(&self, uuid: Uuid, wait: Duration) -> Result<MigrationProgress, ClientError> {
        self.http
            .get(&format!("/v1/vms/{uuid}/migration?wait_ms={}", wait.as_millis()))
            .await
    }

    /// Source: cancels the VM's migration (whatever its phase) and lets it run on there.
    pub async fn cancel_migration(&self, uuid: Uuid) -> Result<VmStatus, ClientError> {
        self.http
            .post(&format!("/v1/vms/{uuid}/migration/cancel"), &serde_json::json!({}))
            .await
    }

    /// Destination: runs the VM whose memory arrived.
    pub async fn finish_incoming(&self, uuid: Uuid) -> Result<VmStatus, ClientError> {
        self.http
            .post(&format!("/v1/vms/{uuid}/migration/finish"), &serde_json::json!({}))
            .await
    }

    /// Checkpoints the VM's disk into the controller's image store; may take minutes when
    /// much of a large disk changed.
    pub async fn checkpoint(
        &self,
        uuid: Uuid,
        req: &shoal_model::agent::CheckpointDisk,
    ) -> Result<shoal_model::agent::DiskCheckpoint, ClientError> {
        let rb = self
            .http
            .request(Method::POST, &format!("/v1/vms/{uuid}/checkpoint"))
            .timeout(Duration::from_secs(3600))
            .json(req);
        self.http.send(rb).await
    }

    /// Has the host keep an image of the controller's store whole in its chunk cache.
    pub async fn hold_image(&self, manifest: &str) -> Result<(), ClientError> {
        let rb = self
            .http
            .request(Method::POST, "/v1/images/hold")
            .timeout(Duration::from_secs(3600))
            .json(&shoal_model::agent::HoldImage {
                manifest: manifest.to_string(),
            });
        let _: serde_json::Value = self.http.send(rb).await?;
        Ok(())
    }

    /// Records the VM's disk in the image store; may take minutes for a large disk.
    pub async fn snapshot(&self, uuid: Uuid) -> Result<shoal_model::agent::DiskSnapshot, ClientError> {
        let rb = self
            .http
            .request(Method::POST, &format!("/v1/vms/{uuid}/snapshot"))
            .timeout(Duration::from_secs(3600));
        self.http.send(rb).await
    }
}

/// Percent-encodes one path segment (names are validated server-side, but a bad name must reach
/// the server intact to be refused with its own message).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Opens a TCP connection to `address:port` within `timeout`: the reachability check of an
/// underlay address, run by the controller and by agents.
pub async fn probe_underlay(address: std::net::Ipv4Addr, port: u16, timeout: Duration) -> UnderlayProbeResult {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((address, port))).await {
        Ok(Ok(_)) => UnderlayProbeResult {
            reachable: true,
            error: None,
        },
        Ok(Err(e)) => UnderlayProbeResult {
            reachable: false,
            error: Some(format!("connecting to {address}:{port}: {e}")),
        },
        Err(_) => UnderlayProbeResult {
            reachable: false,
            error: Some(format!(
                "connecting to {address}:{port}: no answer within {} s",
                timeout.as_secs()
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_absolute_http_with_a_host() {
        for good in ["http://127.0.0.1:7700", "https://shoal.example.org/", "http://[::1]:80"] {
            assert_eq!(check_base_url(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("5", "relative URL without a base"),
            ("127.0.0.1:7700", "relative URL without a base"),
            ("localhost:7700", "the scheme is localhost, not http or https"),
            ("ftp://example.org", "the scheme is ftp, not http or https"),
        ] {
            let e = check_base_url(bad).unwrap_err();
            assert_eq!(e.reason, why, "{bad}");
            assert!(e.to_string().starts_with(&format!("{bad:?} is not a valid URL")), "{e}");
        }
    }
}
