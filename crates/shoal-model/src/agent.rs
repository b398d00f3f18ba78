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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub cpus: u32,
    pub memory_mib: u64,
    pub vms: Vec<VmStatus>,
    /// Images (manifest ids, hex) whole in the host's chunk cache: for image-locality placement.
    #[serde(default)]
    pub images: Vec<String>,
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
