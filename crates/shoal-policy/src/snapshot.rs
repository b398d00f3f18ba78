//! The cluster snapshot every policy decides from: hosts with their capacity, state and labels,
//! the VMs on them, and what the image store knows about cached templates. It is also the JSON
//! format of `shoal plan snapshot FILE` (documented in `docs/snapshot.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether a host takes VMs, as placement sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = PolicyHostState)]
pub enum HostState {
    /// Running and accepting VMs.
    #[default]
    Up,
    /// Running its VMs, but nothing new lands on it (being emptied).
    Draining,
    /// Taken out of service by an operator: nothing new lands on it.
    Maintenance,
    /// Switched off to save energy; placement may power it on when allowed.
    PoweredOff,
    /// Not heard from: nothing lands on it.
    Down,
}

impl HostState {
    /// The state's name in the snapshot and in explanations.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Draining => "draining",
            HostState::Maintenance => "maintenance",
            HostState::PoweredOff => "powered_off",
            HostState::Down => "down",
        }
    }

    /// The state in words that follow "the host is": `in maintenance`, `powered off`, `draining`.
    pub fn as_phrase(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Draining => "draining",
            HostState::Maintenance => "in maintenance",
            HostState::PoweredOff => "powered off",
            HostState::Down => "down",
        }
    }
}

fn one() -> f64 {
    1.0
}

/// A physical host: raw capacity, what is held back for the host itself, overcommit ratios.
///
/// The capacity placement may hand out for a resource is `floor(raw × overcommit) − reserved`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = SnapshotHost)]
pub struct Host {
    pub name: String,
    #[serde(default)]
    pub state: HostState,
    /// Failure domains and other properties, e.g. `zone=a`, `rack=r12`, `gpu=yes`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Physical cores (hbal's `t_cpu`).
    pub cpus: u32,
    pub memory_mib: u64,
    /// Local disk for VM disks; 0 when VM disks live on shared storage.
    #[serde(default)]
    pub disk_mib: u64,
    /// vCPUs held back for the host's own processes (hbal's `os_cpus`).
    #[serde(default)]
    pub reserved_cpus: u32,
    /// Memory held back for the host itself (hbal's `n_mem`).
    #[serde(default)]
    pub reserved_memory_mib: u64,
    #[serde(default)]
    pub reserved_disk_mib: u64,
    /// vCPUs per physical core that may be handed out (hbal's `--max-cpu`, 4 by default there).
    #[serde(default = "one")]
    pub cpu_overcommit: f64,
    #[serde(default = "one")]
    pub memory_overcommit: f64,
    #[serde(default = "one")]
    pub disk_overcommit: f64,
    /// Bandwidth available to live migrations to or from this host; the rebalancer's default
    /// applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_mib_s: Option<f64>,
}

impl Host {
    /// A host that is up with no labels, reservations or overcommit.
    pub fn new(name: impl Into<String>, cpus: u32, memory_mib: u64, disk_mib: u64) -> Host {
        Host {
            name: name.into(),
            state: HostState::Up,
            labels: BTreeMap::new(),
            cpus,
            memory_mib,
            disk_mib,
            reserved_cpus: 0,
            reserved_memory_mib: 0,
            reserved_disk_mib: 0,
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            disk_overcommit: 1.0,
            migration_mib_s: None,
        }
    }

    /// What placement may hand out: `[vCPU, memory MiB, disk MiB]`.
    pub fn capacity(&self) -> [u64; 3] {
        let scaled =
            |raw: u64, ratio: f64, reserved: u64| ((raw as f64 * ratio).floor() as u64).saturating_sub(reserved);
        [
            scaled(self.cpus as u64, self.cpu_overcommit, self.reserved_cpus as u64),
            scaled(self.memory_mib, self.memory_overcommit, self.reserved_memory_mib),
            scaled(self.disk_mib, self.disk_overcommit, self.reserved_disk_mib),
        ]
    }

    /// The value of a failure-domain key for this host: its name for `host`, else its label.
    pub fn domain(&self, key: &str) -> Option<&str> {
        if key == "host" {
            Some(&self.name)
        } else {
            self.labels.get(key).map(String::as_str)
        }
    }
}

/// A VM as policy sees it: its size, where it runs and what it costs to move.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = SnapshotVm)]
pub struct Vm {
    pub name: String,
    /// The virtual cluster it belongs to (anti-affinity and affinity are per cluster).
    #[serde(default)]
    pub cluster: String,
    pub host: String,
    pub cpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disk_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Recently measured memory dirty rate; a migration must out-copy it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_mib_s: Option<f64>,
    /// The disk data the VM wrote itself (its copy-on-write overlay, as its host measures it):
    /// what a shared-nothing migration copies besides memory ([`Vm::copied_disk_mib`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overlay_mib: u64,
    /// Hard anti-affinity of its cluster, kept when the rebalancer moves it (`host`, `zone`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Vm {
    /// The disk a migration of this VM copies, MiB: nothing on shared storage; else its own
    /// blocks (`overlay_mib`), or its whole disk when that is all that is known (`disk_mib`).
    pub fn copied_disk_mib(&self, shared_storage: bool) -> u64 {
        if shared_storage {
            0
        } else {
            self.disk_mib.max(self.overlay_mib)
        }
    }
}

/// Hosts, the VMs on them and image locality: everything a plan is computed from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub hosts: Vec<Host>,
    #[serde(default)]
    pub vms: Vec<Vm>,
    /// VM disks live on shared storage: they take no host disk and migrations copy memory only.
    #[serde(default)]
    pub shared_storage: bool,
    /// Per template, per host: the share (0..=1) of the template's bytes already cached there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub image_locality: BTreeMap<String, BTreeMap<String, f64>>,
}

/// A snapshot that does not hold together, naming the offending value.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("host {0:?} appears twice")]
    DuplicateHost(String),
    #[error("VM {vm:?} is on host {host:?}, which is not in the snapshot")]
    UnknownHost { vm: String, host: String },
    #[error("VM {0:?} appears twice")]
    DuplicateVm(String),
    #[error("host {host:?}: {field} is {value}, must be a finite number > 0")]
    BadRatio {
        host: String,
        field: &'static str,
        value: String,
    },
}

impl Snapshot {
    /// Checks names are unique, every VM's host exists and ratios are sane.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let mut names = std::collections::HashSet::new();
        for h in &self.hosts {
            if !names.insert(h.name.as_str()) {
                return Err(SnapshotError::DuplicateHost(h.name.clone()));
            }
            for (field, v) in [
                ("cpu_overcommit", h.cpu_overcommit),
                ("memory_overcommit", h.memory_overcommit),
                ("disk_overcommit", h.disk_overcommit),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(SnapshotError::BadRatio {
                        host: h.name.clone(),
                        field,
                        value: v.to_string(),
                    });
                }
            }
        }
        let mut vms = std::collections::HashSet::new();
        for v in &self.vms {
            if !names.contains(v.host.as_str()) {
                return Err(SnapshotError::UnknownHost {
                    vm: v.name.clone(),
                    host: v.host.clone(),
                });
            }
            if !vms.insert(v.name.as_str()) {
                return Err(SnapshotError::DuplicateVm(v.name.clone()));
            }
        }
        Ok(())
    }

    /// The index of each host by name.
    pub fn host_index(&self) -> std::collections::HashMap<&str, usize> {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), i))
            .collect()
    }

    /// Per host: `[vCPU, memory MiB, disk MiB]` the snapshot's VMs use on it.
    pub fn usage(&self) -> Vec<[u64; 3]> {
        let idx = self.host_index();
        let mut used = vec![[0u64; 3]; self.hosts.len()];
        for v in &self.vms {
            if let Some(&h) = idx.get(v.host.as_str()) {
                used[h][0] += v.cpus as u64;
                used[h][1] += v.memory_mib;
                if !self.shared_storage {
                    used[h][2] += v.disk_mib;
                }
            }
        }
        used
    }
}
