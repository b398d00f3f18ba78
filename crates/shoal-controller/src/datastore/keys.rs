//! The key space of the state store: every prefix the controller writes, in one place. Values are
//! JSON unless said otherwise. Nothing outside the datastore layer names a key.
//!
//! | prefix | value | written by |
//! |---|---|---|
//! | `/hosts/<name>` | [`super::HostRecord`] | agent registration |
//! | `/claims/<host>` | [`crate::capacity::Claim`] | every change of the VMs holding resources on the host, compared on its revision |
//! | `/draining/<host>` | `draining` | `host drain` (nothing new is placed there) |
//! | `/maintenance/<host>` | `maintenance` | `host maintenance` (keeps its VMs, takes nothing new) |
//! | `/power/<host>` | [`shoal_model::power::HostPower`] | power model, commands and state |
//! | `/energy/<host>` | [`super::EnergyAccount`] | the sampler, every sample |
//! | `/templates/<name>` | [`super::TemplateRecord`] | template import / publish |
//! | `/profiles/<name>` | [`shoal_model::Profile`] | profile create |
//! | `/clusters/<name>` | [`shoal_model::Cluster`] | cluster create, scale, power changes, the reconciler |
//! | `/vms/<cluster>/<index, 6 digits>` | [`shoal_model::Vm`] | deployment, power changes, moves, the reconciler |
//! | `/migrations/<vm>` | [`shoal_model::Migration`] | `vm migrate` and every plan that moves VMs; the migration executor at each step; deleted when the move is committed or undone |
//! | `/checkpoints/<vm>` | [`shoal_model::CheckpointChain`] | `vm checkpoint` and the checkpoint scheduler; the image store names each checkpoint `checkpoint/<vm>/<seq>` while it is kept |
//! | `/failures/<host>` | [`shoal_model::HostFailure`] | the failure detector (a host declared failed, its fencing, its evacuation); deleted when the host rejoins |
//! | `/operations/<id>` | [`shoal_model::Operation`] | every asynchronous request; pruned by age and count |
//! | `/networks/<name>` | [`shoal_model::Network`] | network create / set, a cluster's own network |
//! | `/ipam/subnets/<cidr>` | the network's (or cluster's) name, text | network create |
//! | `/ipam/vnis/<vni>` | the network's name, text | network create |
//! | `/ipam/ips/<ip>` | the VM's name, text | deployment |
//! | `/ipam/macs/<mac>` | the VM's name, text | deployment |
//! | `/auth/tokens/<blake3 of token>` | [`crate::auth::TokenRecord`] | tokens, stored hashed |
//!
//! Every identity key (`/ipam/…`, `/vms/…` on creation, tokens) is created with "must not exist",
//! so two writers can never hand out the same one.

use std::net::Ipv4Addr;

use shoal_model::{Ipv4Subnet, MacAddr};
use uuid::Uuid;

pub const HOSTS: &str = "/hosts/";
pub const CLAIMS: &str = "/claims/";
pub const DRAINING: &str = "/draining/";
pub const MAINTENANCE: &str = "/maintenance/";
pub const POWER: &str = "/power/";
pub const ENERGY: &str = "/energy/";
pub const TEMPLATES: &str = "/templates/";
pub const PROFILES: &str = "/profiles/";
pub const CLUSTERS: &str = "/clusters/";
pub const VMS: &str = "/vms/";
pub const OPERATIONS: &str = "/operations/";
pub const MIGRATIONS: &str = "/migrations/";
pub const CHECKPOINTS: &str = "/checkpoints/";
pub const FAILURES: &str = "/failures/";
pub const NETWORKS: &str = "/networks/";
pub const SUBNETS: &str = "/ipam/subnets/";
pub const VNIS: &str = "/ipam/vnis/";
pub const IPS: &str = "/ipam/ips/";
pub const MACS: &str = "/ipam/macs/";
pub const TOKENS: &str = "/auth/tokens/";

pub fn host(name: &str) -> String {
    format!("{HOSTS}{name}")
}
pub fn claim(host: &str) -> String {
    format!("{CLAIMS}{host}")
}
pub fn draining(host: &str) -> String {
    format!("{DRAINING}{host}")
}
pub fn maintenance(host: &str) -> String {
    format!("{MAINTENANCE}{host}")
}
pub fn power(host: &str) -> String {
    format!("{POWER}{host}")
}
pub fn energy(host: &str) -> String {
    format!("{ENERGY}{host}")
}
pub fn template(name: &str) -> String {
    format!("{TEMPLATES}{name}")
}
pub fn profile(name: &str) -> String {
    format!("{PROFILES}{name}")
}
pub fn cluster(name: &str) -> String {
    format!("{CLUSTERS}{name}")
}
pub fn cluster_vms(cluster: &str) -> String {
    format!("{VMS}{cluster}/")
}
pub fn vm(cluster: &str, index: u32) -> String {
    format!("{VMS}{cluster}/{index:06}")
}
pub fn operation(id: &Uuid) -> String {
    format!("{OPERATIONS}{id}")
}
pub fn migration(vm: &str) -> String {
    format!("{MIGRATIONS}{vm}")
}
pub fn checkpoints(vm: &str) -> String {
    format!("{CHECKPOINTS}{vm}")
}

/// The image store's name of a kept checkpoint: a root the garbage collector keeps.
pub fn checkpoint_image(vm: &str, seq: u64) -> String {
    format!("checkpoint/{vm}/{seq}")
}

pub fn failure(host: &str) -> String {
    format!("{FAILURES}{host}")
}

pub fn network(name: &str) -> String {
    format!("{NETWORKS}{name}")
}
pub fn subnet(subnet: &Ipv4Subnet) -> String {
    format!("{SUBNETS}{subnet}")
}
pub fn vni(vni: u32) -> String {
    format!("{VNIS}{vni}")
}
pub fn ip(ip: &Ipv4Addr) -> String {
    format!("{IPS}{ip}")
}
pub fn mac(mac: &MacAddr) -> String {
    format!("{MACS}{mac}")
}
pub fn token(hash: &str) -> String {
    format!("{TOKENS}{hash}")
}
