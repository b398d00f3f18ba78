//! Filters: the hard rules a host must pass to take one more VM of a request. Each rejection
//! names the rule and the offending value, so that explanations and errors can quote it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use shoal_model::Placement;
use utoipa::ToSchema;

use crate::snapshot::{Host, HostState};

/// Placement rules of a request. Domains are `host` or a host label key such as `zone` or `rack`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rules {
    /// Hard anti-affinity: at most one VM of the cluster per domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    /// Hard affinity: every VM of the cluster in one domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// Soft anti-affinity: prefer domains holding fewer VMs of the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_anti_affinity: Option<String>,
    /// Soft affinity: prefer domains already holding VMs of the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_affinity: Option<String>,
    /// Labels a host must carry, with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub required_labels: BTreeMap<String, String>,
    /// When not empty, only these hosts may be used (hard affinity by host name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only_hosts: Vec<String>,
    /// Hosts that must not be used (hard anti-affinity by host name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid_hosts: Vec<String>,
}

/// Relative weights of the score terms; each term is normalised to 0..=1 before weighting.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Weights {
    pub fit: f64,
    pub fragmentation: f64,
    pub locality: f64,
    pub affinity: f64,
    pub power: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            fit: 1.0,
            fragmentation: 0.25,
            locality: 0.5,
            affinity: 0.5,
            power: 0.25,
        }
    }
}

/// `count` identical VMs of virtual cluster `cluster` to place together, all or none.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GangRequest {
    pub cluster: String,
    pub count: u32,
    pub cpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disk_mib: u64,
    /// For image locality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub rules: Rules,
    #[serde(default)]
    pub weights: Weights,
    /// Powered-off hosts may be switched on to take VMs.
    #[serde(default)]
    pub allow_power_on: bool,
}

impl GangRequest {
    /// A request with default rules and weights.
    pub fn new(cluster: impl Into<String>, count: u32, cpus: u32, memory_mib: u64) -> GangRequest {
        GangRequest {
            cluster: cluster.into(),
            count,
            cpus,
            memory_mib,
            disk_mib: 0,
            template: None,
            placement: Placement::Spread,
            rules: Rules::default(),
            weights: Weights::default(),
            allow_power_on: false,
        }
    }

    /// The request for `count` VMs of `cpus` and `memory_mib` of a virtual cluster, from
    /// `template`, placed by `placement` with hard anti-affinity over `anti_affinity` (`host`, or
    /// the label naming the failure domain). The controller builds every deployment's, scale's,
    /// resume's and preview's request with it, and `shoal plan place` offline too.
    pub fn for_cluster(
        cluster: impl Into<String>,
        count: u32,
        cpus: u32,
        memory_mib: u64,
        template: Option<&str>,
        placement: Placement,
        anti_affinity: Option<&str>,
    ) -> GangRequest {
        let mut req = GangRequest::new(cluster, count, cpus, memory_mib);
        req.placement = placement;
        req.template = template.map(str::to_string);
        req.rules.anti_affinity = anti_affinity.map(str::to_string);
        req
    }
}

/// Why a host cannot take one more VM of the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "filter", rename_all = "snake_case")]
pub enum Reject {
    State {
        state: HostState,
    },
    NotListed,
    Avoided,
    Label {
        key: String,
        want: String,
        have: Option<String>,
    },
    Cpu {
        free: i64,
        need: u64,
    },
    Memory {
        free: i64,
        need: u64,
    },
    Disk {
        free: i64,
        need: u64,
    },
    AntiAffinity {
        domain: String,
        value: String,
        vms: u32,
    },
    Affinity {
        domain: String,
        want: String,
        have: Option<String>,
    },
}

impl Reject {
    /// The filter's short name, for counting rejections.
    pub fn filter(&self) -> &'static str {
        match self {
            Reject::State { .. } => "state",
            Reject::NotListed => "host list",
            Reject::Avoided => "avoided",
            Reject::Label { .. } => "labels",
            Reject::Cpu { .. } => "cpu",
            Reject::Memory { .. } => "memory",
            Reject::Disk { .. } => "disk",
            Reject::AntiAffinity { .. } => "anti-affinity",
            Reject::Affinity { .. } => "affinity",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::State { state } => write!(f, "state: host is {}", state.as_phrase()),
            Reject::NotListed => write!(f, "host list: not among the requested hosts"),
            Reject::Avoided => write!(f, "avoided: the request excludes this host"),
            Reject::Label { key, want, have } => match have {
                Some(h) => write!(f, "labels: {key}={h}, needs {key}={want}"),
                None => write!(f, "labels: no label {key}, needs {key}={want}"),
            },
            Reject::Cpu { free, need } => write!(f, "cpu: {free} vCPU free, needs {need}"),
            Reject::Memory { free, need } => write!(f, "memory: {free} MiB free, needs {need}"),
            Reject::Disk { free, need } => write!(f, "disk: {free} MiB free, needs {need}"),
            Reject::AntiAffinity { domain, value, vms } => write!(
                f,
                "anti-affinity by {domain}: {domain} {value} already holds {vms} VM(s) of the cluster"
            ),
            Reject::Affinity { domain, want, have } => write!(
                f,
                "affinity by {domain}: the cluster is in {domain} {want}, this host is in {}",
                have.as_deref().unwrap_or("none")
            ),
        }
    }
}

/// Whether the host's state lets new VMs land on it.
pub fn state_accepts(state: HostState, allow_power_on: bool) -> bool {
    match state {
        HostState::Up => true,
        HostState::PoweredOff => allow_power_on,
        HostState::Draining | HostState::Maintenance | HostState::Down => false,
    }
}

/// The rules that depend only on the host and the request, not on what is placed: state, host
/// lists, labels.
pub fn static_filter(host: &Host, req: &GangRequest) -> Option<Reject> {
    if !state_accepts(host.state, req.allow_power_on) {
        return Some(Reject::State { state: host.state });
    }
    let r = &req.rules;
    if !r.only_hosts.is_empty() && !r.only_hosts.contains(&host.name) {
        return Some(Reject::NotListed);
    }
    if r.avoid_hosts.contains(&host.name) {
        return Some(Reject::Avoided);
    }
    for (key, want) in &r.required_labels {
        let have = host.labels.get(key);
        if have != Some(want) {
            return Some(Reject::Label {
                key: key.clone(),
                want: want.clone(),
                have: have.cloned(),
            });
        }
    }
    None
}

/// Capacity: `free` is what is left of the host's capacity, `need` one VM's demand.
pub fn capacity_filter(free: [i64; 3], need: [u64; 3]) -> Option<Reject> {
    if free[0] < need[0] as i64 {
        return Some(Reject::Cpu {
            free: free[0],
            need: need[0],
        });
    }
    if free[1] < need[1] as i64 {
        return Some(Reject::Memory {
            free: free[1],
            need: need[1],
        });
    }
    if free[2] < need[2] as i64 {
        return Some(Reject::Disk {
            free: free[2],
            need: need[2],
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_rejection_reads_as_english() {
        for (state, text) in [
            (HostState::Maintenance, "state: host is in maintenance"),
            (HostState::PoweredOff, "state: host is powered off"),
            (HostState::Draining, "state: host is draining"),
            (HostState::Down, "state: host is down"),
        ] {
            assert_eq!(Reject::State { state }.to_string(), text);
        }
    }
}
