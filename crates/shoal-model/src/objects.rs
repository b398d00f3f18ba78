//! The objects Shoal manages. Each is stored as JSON under its own key in the state store and
//! served as-is by the API, so the stored form and the API form are one type.

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::net::{Ipv4Subnet, MacAddr};

/// Milliseconds since the Unix epoch, the timestamp unit of every stored object.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeats arrive on time.
    Up,
    /// No heartbeat within the host timeout; nothing new is placed there.
    Down,
    /// Heard from, but being emptied (`host drain`): nothing new is placed there.
    Draining,
    /// Heard from, keeps its VMs, takes nothing new (`host maintenance`).
    Maintenance,
    /// Switched off (or switched on and not heard from since) by its power command.
    Off,
    /// Its agent's heartbeats stopped, but other hosts still reach it: its VMs are left alone.
    Isolated,
    /// Neither its heartbeats nor other hosts reach it: it is fenced, then its VMs restart
    /// elsewhere. It rejoins empty.
    Failed,
}

/// A physical host, as the controller knows it: what the agent registered plus what is claimed on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub name: String,
    pub state: HostState,
    /// Base URL of the host's agent.
    pub address: String,
    /// Hypervisor driver the agent runs (`sim` or `qemu`).
    pub driver: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub used_cpus: u32,
    pub used_memory_mib: u64,
    /// VMs placed on the host.
    pub vms: u32,
    pub joined_unix_ms: u64,
    /// Last heartbeat seen by this controller process, if any since it started.
    pub last_heartbeat_unix_ms: Option<u64>,
    /// Failure domains and properties the agent registered (`zone=a`, `rack=r12`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub allocation: Allocation,
    /// Where other hosts reach its VXLAN endpoint, when it has a network driver.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub underlay_ip: Option<Ipv4Addr>,
    /// Whether the host is switched on (the consolidator and `shoal host power` switch it).
    #[serde(default)]
    pub power: crate::power::PowerState,
    /// Why it is `down`, `isolated` or `failed`: how long it has been silent, whether it is
    /// fenced and how, or why it cannot be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How placement may use a host's capacity: vCPUs per core and memory it may hand out beyond the
/// physical amount, and what stays reserved for the host's own processes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Allocation {
    #[serde(default = "one")]
    pub cpu_overcommit: f64,
    #[serde(default = "one")]
    pub memory_overcommit: f64,
    #[serde(default)]
    pub reserved_cpus: u32,
    #[serde(default)]
    pub reserved_memory_mib: u64,
}

fn one() -> f64 {
    1.0
}

impl Default for Allocation {
    fn default() -> Self {
        Allocation {
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            reserved_cpus: 0,
            reserved_memory_mib: 0,
        }
    }
}

/// Why an [`Allocation`] does not fit its host.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AllocationError {
    #[error("{what} {value} is outside 1..=64")]
    Overcommit { what: &'static str, value: f64 },
    #[error("reserving {reserved} of {cpus} vCPUs leaves none for VMs")]
    ReservedCpus { reserved: u32, cpus: u32 },
    #[error("reserving {reserved} of {memory_mib} MiB leaves none for VMs")]
    ReservedMemory { reserved: u64, memory_mib: u64 },
}

impl Allocation {
    /// Checks the ratios and reservations against a host of `cpus` and `memory_mib`.
    pub fn check(&self, cpus: u32, memory_mib: u64) -> Result<(), AllocationError> {
        for (what, value) in [
            ("cpu overcommit", self.cpu_overcommit),
            ("memory overcommit", self.memory_overcommit),
        ] {
            if !value.is_finite() || !(1.0..=64.0).contains(&value) {
                return Err(AllocationError::Overcommit { what, value });
            }
        }
        if self.reserved_cpus >= cpus {
            return Err(AllocationError::ReservedCpus {
                reserved: self.reserved_cpus,
                cpus,
            });
        }
        if self.reserved_memory_mib >= memory_mib {
            return Err(AllocationError::ReservedMemory {
                reserved: self.reserved_memory_mib,
                memory_mib,
            });
        }
        Ok(())
    }
}

/// A template: a disk image VMs are cloned from, and how to boot it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub name: String,
    /// `raw` or `qcow2`, detected from the content.
    pub format: String,
    pub size_bytes: u64,
    /// `blake3:<hex>` of the image bytes.
    // Or `manifest:<hex>` for a disk in the image store: [`crate::TemplateDisk`] parses both.
    // (The doc line above is the OpenAPI document's description, kept as it is published.)
    pub hash: String,
    /// Direct kernel boot; `None` boots from the disk itself (real cloud images).
    #[serde(default)]
    pub kernel_boot: Option<KernelBoot>,
    /// How Shoal learns a VM of this template is configured (templates made before this was
    /// kept had `ready_pattern`: read as a pattern, or as `running`).
    #[serde(default, alias = "ready_pattern", deserialize_with = "crate::Readiness::compat")]
    pub ready: crate::Readiness,
    pub created_unix_ms: u64,
}

impl Template {
    /// What `hash` names: an image-store manifest or a plain file.
    pub fn disk(&self) -> Result<crate::TemplateDisk, crate::TemplateDiskError> {
        crate::TemplateDisk::parse(&self.hash)
    }

    /// The format hosts get the disk in. A disk from the image store reaches them as a raw
    /// image, whatever it was uploaded as; a plain file as it was detected.
    pub fn host_format(&self) -> crate::DiskFormat {
        let detected = self.format.parse().unwrap_or_default();
        match self.disk() {
            Ok(d) => d.host_format(detected),
            Err(_) => detected,
        }
    }
}

/// The kernel, initrd and command line a template boots with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct KernelBoot {
    pub kernel_hash: String,
    pub kernel_size: u64,
    pub initrd_hash: Option<String>,
    pub initrd_size: Option<u64>,
    pub cmdline: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Put each VM on the host with the most room left: balances load.
    #[default]
    Spread,
    /// Put each VM on the fullest host it fits on: frees whole hosts.
    Pack,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AntiAffinity {
    #[default]
    None,
    /// At most one VM of the cluster per host.
    Host,
    /// At most one VM of the cluster per zone (hosts' `zone` label).
    Zone,
    /// At most one VM of the cluster per rack (hosts' `rack` label).
    Rack,
}

impl AntiAffinity {
    /// The placement rule's domain: `host` or the host label that names the failure domain.
    pub fn domain(&self) -> Option<&'static str> {
        match self {
            AntiAffinity::None => None,
            AntiAffinity::Host => Some("host"),
            AntiAffinity::Zone => Some("zone"),
            AntiAffinity::Rack => Some("rack"),
        }
    }
}

/// A reusable VM configuration. Fields left empty are inherited from the parent profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Profile {
    pub name: String,
    pub parent: Option<String>,
    pub template: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_mib: Option<u64>,
    pub network: Option<String>,
    /// cloud-init user data handed to every VM made from the profile.
    pub user_data: Option<String>,
    /// The login user Shoal adds to the guest (with the SSH keys and sudo).
    #[serde(default)]
    pub user: Option<String>,
    /// SSH public keys for the guest's login user (`user`, else the image's default user).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    pub created_unix_ms: u64,
    /// Seconds between disk checkpoints, `Some(0)` for off; `None`: the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha_priority: Option<i32>,
}

/// What a VM is made of once a profile and its ancestors are resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmShape {
    pub template: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Disk size; `None` keeps the template's size.
    pub disk_mib: Option<u64>,
    pub network: Option<String>,
    pub user_data: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Disk checkpoints and restart priority.
    #[serde(default)]
    pub ha: crate::HaSettings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClusterState {
    /// VMs are being created or removed to reach the requested size.
    Converging,
    /// Every VM runs.
    Ready,
    /// Some VMs failed.
    Degraded,
    /// Every VM stopped on request.
    Stopped,
    /// Every VM suspended on request: memory saved, hosts' resources given back.
    Suspended,
    /// Being deleted.
    Deleting,
}

/// A virtual cluster: N VMs from one profile, on their own subnet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Cluster {
    pub name: String,
    pub profile: String,
    /// The profile as resolved when the cluster was created; later profile edits do not touch it.
    pub shape: VmShape,
    /// Desired number of VMs.
    pub size: u32,
    pub placement: Placement,
    pub anti_affinity: AntiAffinity,
    #[schema(value_type = String, example = "10.200.0.0/24")]
    pub subnet: Ipv4Subnet,
    /// The virtual network the cluster's VMs are on (clusters made before networks: none).
    #[serde(default)]
    pub network: Option<String>,
    pub state: ClusterState,
    pub created_unix_ms: u64,
}

/// The most VMs a virtual cluster may have. The fewest is one: a cluster of none is deleted.
pub const MAX_CLUSTER_SIZE: u32 = 65_000;

/// A cluster size outside 1..=[`MAX_CLUSTER_SIZE`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid cluster size {size}: a cluster has 1 to {MAX_CLUSTER_SIZE} VMs (delete it to have none)")]
pub struct ClusterSizeError {
    pub size: i64,
}

/// `size` as a cluster's size, or why it cannot be one.
pub fn check_cluster_size(size: i64) -> Result<u32, ClusterSizeError> {
    match u32::try_from(size) {
        Ok(n) if (1..=MAX_CLUSTER_SIZE).contains(&n) => Ok(n),
        _ => Err(ClusterSizeError { size }),
    }
}

/// What an operator wants a VM to be doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Power {
    #[default]
    Running,
    Stopped,
    /// Memory saved to a file on the host, the VM's resources given back.
    Suspended,
}

impl Power {
    /// The state a VM reaches when it does what is wanted.
    pub fn target(self) -> VmState {
        match self {
            Power::Running => VmState::Running,
            Power::Stopped => VmState::Stopped,
            Power::Suspended => VmState::Suspended,
        }
    }
}

/// What an operator asks of a VM's power (`shoal vm stop|start|suspend|resume`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PowerAction {
    /// Power button, or with `force` pulling the plug.
    Stop {
        force: bool,
    },
    Start,
    Suspend,
    Resume,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown action {0:?}: expected stop, start, suspend or resume")]
pub struct PowerActionError(pub String);

impl PowerAction {
    /// The verb, as in the API's paths and the CLI (`force` is a separate flag).
    pub const fn as_str(self) -> &'static str {
        match self {
            PowerAction::Stop { .. } => "stop",
            PowerAction::Start => "start",
            PowerAction::Suspend => "suspend",
            PowerAction::Resume => "resume",
        }
    }

    /// The verb and, for `stop`, whether to force it.
    pub fn parse(verb: &str, force: bool) -> Result<PowerAction, PowerActionError> {
        Ok(match verb {
            "stop" => PowerAction::Stop { force },
            "start" => PowerAction::Start,
            "suspend" => PowerAction::Suspend,
            "resume" => PowerAction::Resume,
            other => return Err(PowerActionError(other.to_string())),
        })
    }

    /// The power the VM's host is then asked for.
    pub const fn power(self) -> Power {
        match self {
            PowerAction::Stop { .. } => Power::Stopped,
            PowerAction::Start | PowerAction::Resume => Power::Running,
            PowerAction::Suspend => Power::Suspended,
        }
    }

    pub const fn force(self) -> bool {
        matches!(self, PowerAction::Stop { force: true })
    }
}

impl std::fmt::Display for PowerAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Configured and placed; the host has not confirmed it yet.
    Pending,
    /// The host is creating it.
    Creating,
    Running,
    Stopped,
    Suspended,
    Failed,
    /// Being removed from its host.
    Deleting,
    /// Its host is not heard from, so what the VM is doing is not known. Only ever shown, never
    /// stored: the record keeps the last state the host reported.
    Unknown,
}

impl VmState {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Suspended => "suspended",
            VmState::Failed => "failed",
            VmState::Deleting => "deleting",
            VmState::Unknown => "unknown",
        }
    }
}

/// A virtual machine of a virtual cluster. Identity (uuid, name, MAC, IP) is always Shoal's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// `<cluster>-<index>`; also the guest's hostname.
    pub name: String,
    pub uuid: Uuid,
    pub cluster: String,
    pub index: u32,
    pub host: String,
    pub state: VmState,
    #[schema(value_type = String, example = "10.200.0.2")]
    pub ip: Ipv4Addr,
    #[schema(value_type = String, example = "52:54:00:12:34:56")]
    pub mac: MacAddr,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: Option<u64>,
    pub template: String,
    /// What the operator wants; `state` is what the host last reported.
    #[serde(default)]
    pub desired: Power,
    /// The last stop asked for is forced (no ACPI grace period).
    #[serde(default)]
    pub force_stop: bool,
    /// Why the VM is failed, when it is.
    pub reason: Option<String>,
    /// Whether the VM's vCPUs and memory are claimed on its host (not while suspended).
    #[serde(default = "yes")]
    pub claimed: bool,
    /// The host's sequence number of the last report applied, so that an older report never
    /// overwrites a newer one.
    #[serde(default)]
    pub observed_seq: u64,
    pub created_unix_ms: u64,
    /// The disk checkpoint (`manifest:<hex>`) the VM's overlay sits on since it was restarted
    /// from it after its host failed; `None`: its template's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_base: Option<String>,
}

impl Vm {
    /// A running 1-vCPU, 64 MiB VM `name` of cluster `c` on host `h`, with a fresh UUID: the base
    /// of tests, which override what matters to them (`Vm { host: "a".into(), ..Vm::example("x") }`).
    pub fn example(name: &str) -> Vm {
        Vm {
            name: name.into(),
            uuid: Uuid::new_v4(),
            cluster: "c".into(),
            index: 0,
            host: "h".into(),
            state: VmState::Running,
            ip: Ipv4Addr::new(10, 0, 0, 2),
            mac: MacAddr::qemu(1),
            cpus: 1,
            memory_mib: 64,
            disk_mib: None,
            template: "t".into(),
            desired: Power::Running,
            force_stop: false,
            reason: None,
            claimed: true,
            observed_seq: 0,
            created_unix_ms: 0,
            disk_base: None,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    ClusterCreate,
    ClusterScale,
    ClusterDelete,
    ClusterStop,
    ClusterStart,
    ClusterSuspend,
    ClusterResume,
    VmStop,
    VmStart,
    VmSuspend,
    VmResume,
    VmMigrate,
    ClusterMigrate,
    /// A failed host's VMs restarted elsewhere (`target` is the host).
    HostEvacuate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
}

/// The four steps of a deployment, in order. Deletions use only `Execute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeployStep {
    PrepareImages,
    ConfigureVms,
    ChooseHosts,
    Execute,
}

impl DeployStep {
    pub const ALL: [DeployStep; 4] = [
        DeployStep::PrepareImages,
        DeployStep::ConfigureVms,
        DeployStep::ChooseHosts,
        DeployStep::Execute,
    ];

    /// The step's name in operations (`OperationStep::name`) and progress output.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeployStep::PrepareImages => "prepare_images",
            DeployStep::ConfigureVms => "configure_vms",
            DeployStep::ChooseHosts => "choose_hosts",
            DeployStep::Execute => "execute",
        }
    }

    pub fn parse(s: &str) -> Option<DeployStep> {
        DeployStep::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

impl std::fmt::Display for DeployStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The names of [`DeployStep::ALL`], as operations list them.
pub const DEPLOY_STEPS: [&str; 4] = [
    DeployStep::PrepareImages.as_str(),
    DeployStep::ConfigureVms.as_str(),
    DeployStep::ChooseHosts.as_str(),
    DeployStep::Execute.as_str(),
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OperationStep {
    pub name: String,
    pub state: StepState,
    pub done: u64,
    pub total: u64,
    pub message: String,
}

/// A long-running change, with its progress. Returned by every asynchronous API call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: Uuid,
    pub kind: OperationKind,
    /// The cluster (or, for VM operations, the VM) the operation works on.
    pub target: String,
    pub state: OperationState,
    pub steps: Vec<OperationStep>,
    /// VMs the operation creates (create, scale up), removes (scale down, delete) or moves to
    /// another power state (stop, start, suspend, resume).
    pub vms: Vec<String>,
    /// The cluster size before the operation, to roll back to if it fails.
    pub previous_size: u32,
    pub error: Option<String>,
    pub created_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    /// A VM migration's progress as its source last reported it (bytes sent, dirty rate,
    /// expected and, once done, measured downtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::agent::MigrationProgress>,
}

impl Operation {
    pub fn step_mut(&mut self, name: &str) -> Option<&mut OperationStep> {
        self.steps.iter_mut().find(|s| s.name == name)
    }

    pub fn deploy_step_mut(&mut self, step: DeployStep) -> Option<&mut OperationStep> {
        self.step_mut(step.as_str())
    }
}

#[cfg(test)]
mod step_and_action_tests {
    use super::*;

    #[test]
    fn deploy_steps_are_named_in_order_and_parse_back() {
        assert_eq!(
            DEPLOY_STEPS,
            ["prepare_images", "configure_vms", "choose_hosts", "execute"]
        );
        for (s, name) in DeployStep::ALL.into_iter().zip(DEPLOY_STEPS) {
            assert_eq!(DeployStep::parse(name), Some(s));
            assert_eq!(s.to_string(), name);
        }
        assert!(DeployStep::ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(DeployStep::parse("execute "), None);
    }

    #[test]
    fn power_actions_parse_and_say_what_power_they_want() {
        for a in [
            PowerAction::Stop { force: false },
            PowerAction::Start,
            PowerAction::Suspend,
            PowerAction::Resume,
        ] {
            assert_eq!(PowerAction::parse(a.as_str(), false).unwrap(), a);
        }
        let forced = PowerAction::parse("stop", true).unwrap();
        assert_eq!((forced, forced.force()), (PowerAction::Stop { force: true }, true));
        assert!(
            !PowerAction::parse("start", true).unwrap().force(),
            "only stop is forced"
        );
        assert_eq!(forced.power(), Power::Stopped);
        assert_eq!(PowerAction::Resume.power(), Power::Running);
        assert_eq!(PowerAction::Suspend.power(), Power::Suspended);
        let e = PowerAction::parse("reboot", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown action \"reboot\": expected stop, start, suspend or resume"
        );
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn hosts_get_image_store_disks_raw_and_plain_files_as_detected() {
        let hex = "ab".repeat(32);
        let mut t = Template {
            name: "t".into(),
            format: "qcow2".into(),
            size_bytes: 1,
            hash: format!("manifest:{hex}"),
            kernel_boot: None,
            ready: Default::default(),
            created_unix_ms: 0,
        };
        assert_eq!(t.disk().unwrap(), crate::TemplateDisk::Manifest(hex.clone()));
        assert_eq!(t.host_format(), crate::DiskFormat::Raw);
        t.hash = format!("blake3:{hex}");
        assert_eq!(t.host_format(), crate::DiskFormat::Qcow2);
        t.hash = "md5:1".into();
        assert!(t.disk().unwrap_err().to_string().contains("md5:1"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_sizes_run_from_one_to_the_maximum() {
        assert_eq!(check_cluster_size(1), Ok(1));
        assert_eq!(check_cluster_size(MAX_CLUSTER_SIZE as i64), Ok(MAX_CLUSTER_SIZE));
        for bad in [-1, 0, MAX_CLUSTER_SIZE as i64 + 1, i64::MAX] {
            let e = check_cluster_size(bad).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("invalid cluster size {bad}: ")),
                "{e}"
            );
        }
    }
}
