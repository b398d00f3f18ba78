//! Virtual networks: one isolated L2 segment (a VXLAN VNI) with its subnet, spanning every host
//! that runs one of its VMs. A virtual cluster gets its own network by default, or joins a named one.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::net::Ipv4Subnet;

/// VXLAN network identifiers are 24 bits.
pub const VNI_MAX: u32 = (1 << 24) - 1;
/// Where automatically chosen VNIs start; lower ones are left for operators.
pub const VNI_AUTO_START: u32 = 10_000;
/// The MTU guests get when the underlay can carry it (underlay MTU at least 1550).
pub const GUEST_MTU: u32 = 1500;
/// What VXLAN over IPv4 adds to every frame (outer IPv4, UDP, VXLAN and Ethernet headers).
pub const VXLAN_OVERHEAD: u32 = 50;

/// A virtual network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub name: String,
    #[schema(value_type = String, example = "10.200.0.0/24")]
    pub subnet: Ipv4Subnet,
    /// The VXLAN network identifier, unique among networks.
    pub vni: u32,
    /// The cluster that made this network for itself (deleted with it); `None` for a network an
    /// operator created, which clusters join by name.
    pub owner: Option<String>,
    /// Outbound access: one host of the network takes the subnet's gateway address on its
    /// bridge and masquerades the guests' traffic out through its own address.
    #[serde(default)]
    pub nat: bool,
    /// DNS servers the guests are told to use (their seed's `nameservers`); none by default.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<Ipv4Addr>,
    pub created_unix_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateNetwork {
    pub name: String,
    /// IPv4 CIDR; cut from the controller's pool when not given.
    pub subnet: Option<String>,
    /// VXLAN network identifier (1..=16777215); the lowest free one from 10000 when not given.
    pub vni: Option<u32>,
    /// Give the network outbound access through a gateway on one of its hosts.
    #[serde(default)]
    pub nat: bool,
    /// DNS servers for the guests (IPv4 addresses, at most three).
    #[serde(default)]
    pub dns: Vec<String>,
}

/// The most DNS servers a guest's resolver uses (glibc's MAXNS).
pub const DNS_MAX: usize = 3;

/// DNS server addresses as given, or why not.
pub fn parse_dns(given: &[String]) -> Result<Vec<Ipv4Addr>, String> {
    if given.len() > DNS_MAX {
        return Err(format!(
            "{} DNS servers given ({}): guests use at most {DNS_MAX}",
            given.len(),
            given.join(", ")
        ));
    }
    given
        .iter()
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("invalid DNS server {s:?}: expected an IPv4 address"))
        })
        .collect()
}

/// Changes to a network (`PATCH /v1/networks/{name}`); absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpdateNetwork {
    pub nat: Option<bool>,
    /// Replaces the DNS servers (an empty list: none). Guests read them when they boot.
    pub dns: Option<Vec<String>>,
}

/// A network and who uses it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetworkView {
    #[serde(flatten)]
    pub network: Network,
    /// Clusters on this network.
    pub clusters: Vec<String>,
    /// Hosts that run at least one of its VMs.
    pub hosts: Vec<String>,
    pub vms: u32,
    /// With `nat`: the host that is the network's gateway now (one of `hosts` with the bridge
    /// driver; none while no such host runs one of its VMs).
    pub gateway_host: Option<String>,
    /// With `nat`: the address guests route through (the subnet's first).
    #[schema(value_type = Option<String>)]
    pub gateway_ip: Option<Ipv4Addr>,
}

/// What a host needs to connect a VM to its virtual network (part of the VM's spec), and what
/// the controller sends when the network's other hosts change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmNetwork {
    pub name: String,
    pub vni: u32,
    /// The guests' MTU on this network.
    pub mtu: u32,
    /// Underlay addresses of the other hosts running VMs of this network (the remote VTEPs).
    #[schema(value_type = Vec<String>)]
    pub peers: Vec<Ipv4Addr>,
    /// Set only for the host that is the network's NAT gateway: the subnet whose first address
    /// it takes on the network's bridge and whose outbound traffic it masquerades.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub gateway: Option<Ipv4Subnet>,
    /// DNS servers for the guests' seeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<Ipv4Addr>,
}

/// The remote VTEPs of every network a host takes part in (controller → agent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkPeers {
    pub networks: Vec<VmNetwork>,
}

/// A VNI out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid VNI {0}: must be between 1 and {VNI_MAX}")]
pub struct VniError(pub u32);

/// A VNI in range, or why not.
pub fn validate_vni(vni: u32) -> Result<(), VniError> {
    if vni == 0 || vni > VNI_MAX {
        return Err(VniError(vni));
    }
    Ok(())
}
