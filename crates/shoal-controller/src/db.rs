//! Where each object lives in the state store, and typed reads over it.
//!
//! Layout (values are JSON):
//! - `/hosts/<name>` [`HostRecord`]; `/claims/<host>` [`Claim`]: resources claimed on the host,
//!   updated in the same transaction as the VMs that claim them, with a compare on its revision.
//! - `/templates/<name>`, `/profiles/<name>`, `/clusters/<name>`, `/operations/<id>`.
//! - `/vms/<cluster>/<index, 6 digits>`: the VM.
//! - `/ipam/subnets/<cidr>`, `/ipam/ips/<ip>`, `/ipam/macs/<mac>`: one key per allocated
//!   identity, created with "must not exist" so that two writers can never hand out the same one.
//! - `/auth/tokens/<blake3 of token>`: hashed tokens.
//! - `/networks/<name>`, `/ipam/vnis/<vni>`: virtual networks (see [`crate::network`]).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_model::{Cluster, Operation, Profile, Template, Vm};
use shoal_store::{Op, Store};

use crate::error::{ApiError, ApiResult};

pub fn host_key(name: &str) -> String {
    format!("/hosts/{name}")
}
pub fn claim_key(host: &str) -> String {
    format!("/claims/{host}")
}
pub fn template_key(name: &str) -> String {
    format!("/templates/{name}")
}
pub fn profile_key(name: &str) -> String {
    format!("/profiles/{name}")
}
pub fn cluster_key(name: &str) -> String {
    format!("/clusters/{name}")
}
pub fn cluster_vms_prefix(cluster: &str) -> String {
    format!("/vms/{cluster}/")
}
pub fn vm_key(cluster: &str, index: u32) -> String {
    format!("/vms/{cluster}/{index:06}")
}
pub fn operation_key(id: &uuid::Uuid) -> String {
    format!("/operations/{id}")
}
pub fn subnet_key(subnet: &shoal_model::Ipv4Subnet) -> String {
    format!("/ipam/subnets/{subnet}")
}
pub fn ip_key(ip: &std::net::Ipv4Addr) -> String {
    format!("/ipam/ips/{ip}")
}
pub fn mac_key(mac: &shoal_model::MacAddr) -> String {
    format!("/ipam/macs/{mac}")
}
pub fn token_key(hash: &str) -> String {
    format!("/auth/tokens/{hash}")
}

/// What an agent registered. Usage comes from its [`Claim`], liveness from heartbeats.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub address: String,
    pub driver: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub joined_unix_ms: u64,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub allocation: shoal_model::Allocation,
    /// Where other hosts reach its VXLAN endpoint (hosts with a network driver only).
    #[serde(default)]
    pub underlay_ip: Option<std::net::Ipv4Addr>,
    /// The MTU guests can have over its underlay.
    #[serde(default)]
    pub guest_mtu: Option<u32>,
    /// Its network driver (`bridge`, `udp`), if any.
    #[serde(default)]
    pub network_driver: Option<String>,
}

/// Resources claimed on a host by the VMs placed there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub cpus: u32,
    pub memory_mib: u64,
    pub vms: u32,
}

/// A template record: the public object plus where its files are.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TemplateRecord {
    #[serde(flatten)]
    pub template: Template,
    /// The disk image as a plain file; empty for templates whose disk is in the image store
    /// (the template's hash is then `manifest:<id>`).
    #[serde(default)]
    pub file: String,
    #[serde(default)]
    pub kernel_file: Option<String>,
    #[serde(default)]
    pub initrd_file: Option<String>,
}

impl TemplateRecord {
    pub fn files(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.file)
            .filter(|f| !f.is_empty())
            .chain(self.kernel_file.iter())
            .chain(self.initrd_file.iter())
    }
}

/// Typed access to the state store.
#[derive(Clone)]
pub struct Db {
    pub store: Arc<dyn Store>,
}

/// A decoded value with the revision it was read at, for compare-and-swap.
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: u64,
}

pub fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state objects serialise")
}

pub fn put<T: Serialize>(key: String, v: &T) -> Op {
    Op::Put(key, enc(v))
}

fn dec<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::Internal(format!("state store key {key} holds unreadable data: {e}")))
}

impl Db {
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> ApiResult<Option<Versioned<T>>> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some(Versioned {
                value: dec(key, &kv.value)?,
                mod_revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    pub async fn list<T: DeserializeOwned>(&self, prefix: &str) -> ApiResult<Vec<Versioned<T>>> {
        self.store
            .range(prefix)
            .await?
            .kvs
            .iter()
            .map(|kv| {
                Ok(Versioned {
                    value: dec(&kv.key, &kv.value)?,
                    mod_revision: kv.mod_revision,
                })
            })
            .collect()
    }

    /// Values under `prefix` by the rest of their key (`/claims/h1` → `h1`).
    pub async fn by_name<T: DeserializeOwned>(&self, prefix: &str) -> ApiResult<std::collections::HashMap<String, T>> {
        self.store
            .range(prefix)
            .await?
            .kvs
            .iter()
            .map(|kv| Ok((kv.key.trim_start_matches(prefix).to_string(), dec(&kv.key, &kv.value)?)))
            .collect()
    }

    pub async fn values<T: DeserializeOwned>(&self, prefix: &str) -> ApiResult<Vec<T>> {
        Ok(self.list(prefix).await?.into_iter().map(|v| v.value).collect())
    }

    pub async fn keys(&self, prefix: &str) -> ApiResult<Vec<String>> {
        Ok(self
            .store
            .range(prefix)
            .await?
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect())
    }

    pub async fn clusters(&self) -> ApiResult<Vec<Cluster>> {
        self.values("/clusters/").await
    }
    pub async fn profiles(&self) -> ApiResult<Vec<Profile>> {
        self.values("/profiles/").await
    }
    pub async fn templates(&self) -> ApiResult<Vec<TemplateRecord>> {
        self.values("/templates/").await
    }
    pub async fn vms(&self) -> ApiResult<Vec<Vm>> {
        self.values("/vms/").await
    }
    pub async fn cluster_vms(&self, cluster: &str) -> ApiResult<Vec<Versioned<Vm>>> {
        self.list(&cluster_vms_prefix(cluster)).await
    }
    pub async fn operations(&self) -> ApiResult<Vec<Operation>> {
        self.values("/operations/").await
    }
}
