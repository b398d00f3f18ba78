//! What the controller and a host agent say to each other.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::disk::DiskFormat;
use crate::net::MacAddr;
use crate::objects::{KernelBoot, Power, VmState};

/// Everything a host needs to run one VM. Sent whole so that "ensure" is idempotent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    pub uuid: Uuid,
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: Option<u64>,
    pub template: String,
    /// Content hash of the template image (a [`crate::TemplateDisk`] as text), so the host can
    /// tell a renamed or replaced image.
    pub template_hash: String,
    /// The format of the template's disk on the host.
    #[serde(default)]
    #[schema(value_type = String)]
    pub template_format: DiskFormat,
    #[serde(default)]
    pub kernel_boot: Option<KernelBoot>,
    #[serde(default, alias = "ready_pattern", deserialize_with = "crate::Readiness::compat")]
    pub ready: crate::Readiness,
    /// The state the host must bring the VM to.
    #[serde(default)]
    pub power: Power,
    /// Stop without waiting for the guest to power off (pulls the plug).
    #[serde(default)]
    pub force_stop: bool,
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    #[schema(value_type = String)]
    pub gateway: Ipv4Addr,
    #[schema(value_type = String)]
    pub mac: MacAddr,
    pub user_data: Option<String>,
    /// The login user to add to the guest, with `ssh_keys`.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// The virtual network to connect the VM to; `None` (or a host without a network driver):
    /// QEMU's user-mode networking.
    #[serde(default)]
    pub network: Option<crate::network::VmNetwork>,
    /// The image the VM's overlay sits on when it is not the template's (`manifest:<hex>`, a
    /// disk checkpoint the VM was restarted from after its host failed). The template still
    /// gives the kernel and initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_base: Option<String>,
}

impl VmSpec {
    /// What the VM's overlay sits on: its checkpoint base, else the template's disk.
    pub fn disk_base(&self) -> &str {
        self.disk_base.as_deref().unwrap_or(&self.template_hash)
    }
}

impl VmSpec {
    /// A running 1-vCPU, 128 MiB VM named `name` at 10.200.0.2/24 (gateway .1) with a fresh
    /// UUID, on no network, that counts as ready once QEMU runs: the base of tests and examples,
    /// which override what matters to them (`VmSpec { cpus: 2, ..VmSpec::example("a") }`).
    pub fn example(name: &str) -> VmSpec {
        VmSpec {
            uuid: Uuid::new_v4(),
            name: name.into(),
            cpus: 1,
            memory_mib: 128,
            disk_mib: None,
            disk_base: None,
            template: "t".into(),
            template_hash: crate::TemplateDisk::File("0".repeat(64)).to_string(),
            template_format: DiskFormat::Raw,
            kernel_boot: None,
            ready: crate::Readiness::Running,
            power: Power::Running,
            force_stop: false,
            ip: Ipv4Addr::new(10, 200, 0, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 200, 0, 1),
            mac: MacAddr::qemu(1),
            user_data: None,
            user: None,
            ssh_keys: Vec::new(),
            network: None,
        }
    }
}

/// A VM as its host sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    pub uuid: Uuid,
    pub name: String,
    pub state: VmState,
    pub reason: Option<String>,
    /// Increases with every change of the VM on its host.
    #[serde(default)]
    pub seq: u64,
    /// CPU time the VM has used on this host so far, s (all vCPUs; restarts from 0 when the
    /// VM's process does). What the controller's energy accounting and consolidator measure.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Bytes the VM's own disk data takes on the host (its copy-on-write overlay), for drivers
    /// that keep disks: what a migration copies besides memory.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

/// A slice of a VM's serial console.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConsoleChunk {
    /// Byte offset of `data` in the console log.
    pub offset: u64,
    /// Offset to ask for next.
    pub next: u64,
    /// Console bytes, lossily decoded as UTF-8.
    pub data: String,
}

/// Sent by an agent to join: with a one-time join token the first time, with its own credential after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterRequest {
    pub name: String,
    /// Base URL the controller reaches the agent on.
    pub address: String,
    pub driver: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The address other hosts reach this host's VXLAN endpoint on, when it has a network driver.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub underlay_ip: Option<Ipv4Addr>,
    /// The network driver (`bridge`), if any.
    #[serde(default)]
    pub network_driver: Option<String>,
    /// A TCP port the agent accepts connections on at `underlay_ip`, so that the controller can
    /// check that other hosts reach that address before admitting the host.
    #[serde(default)]
    pub underlay_port: Option<u16>,
    /// The MTU guests can have over this host's underlay.
    #[serde(default)]
    pub guest_mtu: Option<u32>,
    /// One-time join token (first registration on an authenticated controller).
    pub join_token: Option<String>,
    /// Failure domains and properties (`zone=a`, `rack=r12`), for placement rules.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// How placement may use the host: overcommit and what stays reserved for the host itself.
    #[serde(default)]
    pub allocation: crate::objects::Allocation,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterResponse {
    /// The agent's own credential for heartbeats, when the controller requires one. Keep it secret.
    pub credential: Option<String>,
    /// The token the controller presents on its commands to this agent. Keep it secret.
    pub controller_token: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub cpus: u32,
    pub memory_mib: u64,
    pub vms: Vec<VmStatus>,
    /// Images (manifest ids, hex) whole in the host's chunk cache: for image-locality placement.
    #[serde(default)]
    pub images: Vec<String>,
    /// The host's peers it reached (a TCP connection to their underlay or agent address), each
    /// with the last time it did (unix ms): the failure detector's second channel.
    #[serde(default)]
    pub reached: std::collections::BTreeMap<String, u64>,
    /// The peers the host probes (the last list the controller gave it).
    #[serde(default)]
    pub peers: Vec<String>,
}

/// Controller → agent, in answer to a heartbeat: how long the host may run VMs without hearing
/// from the controller again, and which other hosts it checks it can reach.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReply {
    /// Past this long without an answered heartbeat, the agent stops its VMs itself, unless it
    /// still reaches a strict majority of its peers (self-fencing; see `docs/ha.md`).
    pub lease_ms: u64,
    pub peers: Vec<PeerAddress>,
}

/// Where a host's peers check that it is reachable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PeerAddress {
    pub host: String,
    /// `ip:port`: the underlay address and port it registered, else its agent's address.
    pub address: String,
}

/// Controller → agent: keep an image of the controller's store in this host's chunk cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HoldImage {
    pub manifest: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnsureVms {
    pub vms: Vec<VmSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RemoveVms {
    pub uuids: Vec<Uuid>,
}

/// Per-VM outcome of a batch command; a failure of one VM never fails the batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchResult {
    pub vms: Vec<VmStatus>,
}

/// A VM disk recorded in the image store (`shoal vm snapshot`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskSnapshot {
    /// Manifest id (hex) of the disk's image.
    pub manifest: String,
    pub logical_bytes: u64,
    /// Distinct chunks of the image.
    pub chunks: u64,
    /// Chunks the controller did not have yet, and their compressed bytes.
    pub chunks_sent: u64,
    pub bytes_sent: u64,
}

/// Controller → agent: record the VM's disk as it is now as a checkpoint in the image store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointDisk {
    /// The image the VM's overlay sits on (manifest hex): its template's disk, or the checkpoint
    /// it was restarted from. A full checkpoint is this image with the overlay's blocks laid over.
    pub base: String,
    /// The VM's latest checkpoint (manifest hex). When the host tracked the VM's writes since
    /// exactly this checkpoint, only those blocks are read (incremental); otherwise the
    /// checkpoint is full.
    #[serde(default)]
    pub since: Option<String>,
}

/// Agent → controller: a checkpoint taken ([`CheckpointDisk`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskCheckpoint {
    /// Manifest id (hex) of the whole disk as of the checkpoint.
    pub manifest: String,
    /// The manifest the changes were laid over: `since` for an incremental checkpoint, `base`
    /// for a full one.
    pub parent: String,
    /// Only the blocks written since `parent` were read (QEMU's dirty bitmap).
    pub incremental: bool,
    /// The disk's size.
    pub disk_bytes: u64,
    /// Bytes of the disk that changed (written data and zeroed runs).
    pub changed_bytes: u64,
    /// Bytes read from the VM's disk to make it.
    pub read_bytes: u64,
    /// Distinct chunks of the checkpoint's image, and those the controller lacked (sent).
    pub chunks: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
}

/// Asks a host whether it reaches another host's underlay address (controller → agent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UnderlayProbe {
    #[schema(value_type = String)]
    pub address: Ipv4Addr,
    pub port: u16,
}

/// Whether the probed address answered, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UnderlayProbeResult {
    pub reachable: bool,
    pub error: Option<String>,
}

/// How a running VM moves to another host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMode {
    /// `live` where the accelerator tracks dirty memory reliably (KVM, the simulated driver),
    /// else `pause` ([`MigrationMode::resolve`]).
    #[default]
    Auto,
    /// Pre-copy: the guest runs while its memory is copied, then pauses for the last pages
    /// (QEMU's downtime limit, bandwidth cap and auto-converge).
    Live,
    /// The guest pauses, its memory is copied, and it continues on the destination.
    Pause,
}

impl MigrationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::Auto => "auto",
            MigrationMode::Live => "live",
            MigrationMode::Pause => "pause",
        }
    }

    /// The mode a migration between hosts running `source` and `destination` (their drivers as
    /// hosts report them: `sim`, `qemu/kvm`, `qemu/tcg`) really uses. `auto` is `live` only
    /// when both sides track dirty memory reliably: QEMU 7.2 under TCG lost dirty pages of a
    /// busy guest with two vCPUs in 11 of 32 live runs (none in 58 with one vCPU; QEMU 10.0.2
    /// lost none: docs/migration.md), so any TCG side makes it `pause`.
    pub fn resolve(self, source: &str, destination: &str) -> MigrationMode {
        let tracks_dirty_pages = |d: &str| !d.ends_with("/tcg");
        match self {
            MigrationMode::Auto if tracks_dirty_pages(source) && tracks_dirty_pages(destination) => MigrationMode::Live,
            MigrationMode::Auto => MigrationMode::Pause,
            m => m,
        }
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [MigrationMode::Auto, MigrationMode::Live, MigrationMode::Pause]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown migration mode {s:?} (auto, live or pause)"))
    }
}

/// How a migration runs. Limits left out take QEMU's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationParams {
    #[serde(default)]
    pub mode: MigrationMode,
    /// Longest pause allowed at the end of a live migration, ms.
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Cap on the migration stream (memory and disk each), MiB/s.
    #[serde(default)]
    pub bandwidth_mib: Option<u64>,
}

/// Controller → destination agent: prepare to receive a running VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrepareIncoming {
    pub spec: VmSpec,
    /// The destination's own address the source connects to (its underlay address).
    #[schema(value_type = String)]
    pub listen: Ipv4Addr,
}

/// What the destination prepared: where the source sends the VM's disk and memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingVm {
    /// The NBD server exporting the destination's empty overlay, `ADDRESS:PORT`.
    pub nbd: String,
    /// The export's name on that server.
    pub export: String,
    /// QEMU's migration URI the destination listens on (`tcp:ADDRESS:PORT`).
    pub memory_uri: String,
}

/// Controller → source agent: send the VM to the destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrateOut {
    pub to: IncomingVm,
    pub params: MigrationParams,
}

/// Where an outgoing migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The VM's own disk blocks are copied to the destination.
    Disk,
    /// Its memory is copied.
    Memory,
    /// All of it arrived; the source is paused and waits to be removed (or resumed if the
    /// move is rolled back).
    Completed,
    Failed,
    /// Cancelled; the source runs on.
    Cancelled,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Disk => "disk",
            MigrationPhase::Memory => "memory",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
        }
    }

    pub fn is_over(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }
}

/// An outgoing migration's progress, as the source host reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    pub phase: MigrationPhase,
    /// The mode really used (never `auto`).
    pub mode: MigrationMode,
    /// Bytes of the VM's own disk data (its overlay) to copy, and copied so far.
    pub disk_total_bytes: u64,
    pub disk_sent_bytes: u64,
    /// The guest's memory, bytes sent so far (with re-sent dirty pages) and still to send.
    pub ram_total_bytes: u64,
    pub ram_sent_bytes: u64,
    pub ram_remaining_bytes: u64,
    /// Pages the guest dirties per second, as QEMU measures it.
    pub dirty_pages_per_s: u64,
    /// QEMU's estimate of the final pause while the copy runs; the measured pause once done.
    pub expected_downtime_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// Time since the migration started, ms.
    pub elapsed_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
}

impl MigrationProgress {
    /// A migration that is just starting.
    pub fn starting(mode: MigrationMode) -> MigrationProgress {
        MigrationProgress {
            phase: MigrationPhase::Disk,
            mode,
            disk_total_bytes: 0,
            disk_sent_bytes: 0,
            ram_total_bytes: 0,
            ram_sent_bytes: 0,
            ram_remaining_bytes: 0,
            dirty_pages_per_s: 0,
            expected_downtime_ms: None,
            downtime_ms: None,
            elapsed_ms: 0,
            error: None,
        }
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    #[test]
    fn auto_is_live_only_where_both_sides_track_dirty_pages() {
        use MigrationMode::*;
        assert_eq!(Auto.resolve("qemu/kvm", "qemu/kvm"), Live);
        assert_eq!(Auto.resolve("sim", "sim"), Live);
        assert_eq!(Auto.resolve("qemu/tcg", "qemu/kvm"), Pause);
        assert_eq!(Auto.resolve("qemu/kvm", "qemu/tcg"), Pause);
        assert_eq!(Live.resolve("qemu/tcg", "qemu/tcg"), Live, "asked for, not chosen");
        assert_eq!(Pause.resolve("sim", "sim"), Pause);
        assert_eq!("live".parse::<MigrationMode>(), Ok(Live));
        assert!("fast".parse::<MigrationMode>().unwrap_err().contains("\"fast\""));
    }
}
