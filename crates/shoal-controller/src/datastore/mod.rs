//! The datastore layer: the only code that knows the state store's key space ([`keys`]) and
//! writes transactions. Above it, the domain layer reads typed records and describes changes
//! with a [`Tx`]; [`Datastore::commit`] applies one and always checks its outcome, so a change
//! whose compares failed is an error (nothing written), never a silent no-op.
//!
//! It also owns the write lock that serialises read-decide-commit sequences in this process;
//! compare-and-swap on every record read keeps them safe against any other writer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_model::power::HostPower;
use shoal_model::{
    CheckpointChain, Cluster, HostFailure, Ipv4Subnet, MacAddr, Migration, Network, Operation, Profile, Template, Vm,
};
use shoal_store::{Compare, Op, Store, Txn};
use uuid::Uuid;

use crate::auth::TokenRecord;
use crate::capacity::Claim;
use crate::error::{ApiError, ApiResult};

pub mod keys;

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
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub allocation: shoal_model::Allocation,
    /// Where other hosts reach its VXLAN endpoint (hosts with a network driver only).
    #[serde(default)]
    pub underlay_ip: Option<Ipv4Addr>,
    /// The MTU guests can have over its underlay.
    #[serde(default)]
    pub guest_mtu: Option<u32>,
    /// Its network driver (`bridge`, `udp`), if any.
    #[serde(default)]
    pub network_driver: Option<String>,
}

impl HostRecord {
    /// Whether its VMs are QEMU processes (with disks that stay on the host).
    pub fn runs_qemu(&self) -> bool {
        self.driver.starts_with("qemu")
    }
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

/// A host's energy account as stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EnergyAccount {
    pub joules: f64,
    pub since_unix_ms: u64,
}

/// Marks an operator puts on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostMark {
    /// Nothing new is placed on it while its VMs are moved off.
    Draining,
    /// It keeps its VMs and takes nothing new.
    Maintenance,
}

impl HostMark {
    fn prefix(self) -> &'static str {
        match self {
            HostMark::Draining => keys::DRAINING,
            HostMark::Maintenance => keys::MAINTENANCE,
        }
    }
    fn key(self, host: &str) -> String {
        match self {
            HostMark::Draining => keys::draining(host),
            HostMark::Maintenance => keys::maintenance(host),
        }
    }
    fn value(self) -> &'static [u8] {
        match self {
            HostMark::Draining => b"draining",
            HostMark::Maintenance => b"maintenance",
        }
    }
}

/// A decoded value with the revision it was read at, for compare-and-swap.
#[derive(Clone, Debug)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: u64,
}

/// Every host's claim with its revision (0: none written yet).
#[derive(Clone, Debug, Default)]
pub struct Claims {
    by_host: HashMap<String, (Claim, u64)>,
}

impl Claims {
    pub fn get(&self, host: &str) -> Claim {
        self.by_host.get(host).map(|c| c.0).unwrap_or_default()
    }
    pub fn revision(&self, host: &str) -> u64 {
        self.by_host.get(host).map(|c| c.1).unwrap_or_default()
    }
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state objects serialise")
}

fn dec<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::Internal(format!("state store key {key} holds unreadable data: {e}")))
}

/// A change to the state, built up by the domain layer and applied whole by
/// [`Datastore::commit`]: every compare must hold, or nothing is written.
#[derive(Debug, Default)]
#[must_use = "a transaction does nothing until it is committed"]
pub struct Tx {
    txn: Txn,
}

impl Tx {
    pub fn new() -> Tx {
        Tx::default()
    }

    /// Adds another transaction's compares and writes to this one.
    pub fn merge(mut self, other: Tx) -> Tx {
        self.txn.compare.extend(other.txn.compare);
        self.txn.success.extend(other.txn.success);
        self
    }

    fn put_if<T: Serialize>(mut self, key: String, revision: u64, v: &T) -> Tx {
        self.txn = self
            .txn
            .when(Compare::ModRevision(key.clone(), revision))
            .then(Op::Put(key, enc(v)));
        self
    }

    fn create<T: Serialize>(mut self, key: String, v: &T) -> Tx {
        self.txn = self
            .txn
            .when(Compare::Version(key.clone(), 0))
            .then(Op::Put(key, enc(v)));
        self
    }

    fn create_text(mut self, key: String, text: &str) -> Tx {
        self.txn = self
            .txn
            .when(Compare::Version(key.clone(), 0))
            .then(Op::Put(key, text.as_bytes().to_vec()));
        self
    }

    fn put<T: Serialize>(mut self, key: String, v: &T) -> Tx {
        self.txn = self.txn.then(Op::Put(key, enc(v)));
        self
    }

    fn delete(mut self, key: String) -> Tx {
        self.txn = self.txn.then(Op::Delete(key));
        self
    }

    fn delete_if(mut self, key: String, revision: u64) -> Tx {
        self.txn = self
            .txn
            .when(Compare::ModRevision(key.clone(), revision))
            .then(Op::Delete(key));
        self
    }

    // Hosts and their claims.

    pub fn put_host(self, h: &HostRecord) -> Tx {
        self.put(keys::host(&h.name), h)
    }
    /// Sets a host's claim, compared on the revision it was read at.
    pub fn set_claim(self, host: &str, read_at: u64, c: &Claim) -> Tx {
        self.put_if(keys::claim(host), read_at, c)
    }
    pub fn mark(mut self, mark: HostMark, host: &str, on: bool) -> Tx {
        self.txn = self.txn.then(if on {
            Op::Put(mark.key(host), mark.value().to_vec())
        } else {
            Op::Delete(mark.key(host))
        });
        self
    }
    pub fn put_power(self, p: &HostPower) -> Tx {
        self.put(keys::power(&p.host), p)
    }
    pub fn put_energy(self, host: &str, a: &EnergyAccount) -> Tx {
        self.put(keys::energy(host), a)
    }

    // Templates and profiles.

    pub fn create_template(self, t: &TemplateRecord) -> Tx {
        self.create(keys::template(&t.template.name), t)
    }
    pub fn delete_template(self, name: &str, read_at: u64) -> Tx {
        self.delete_if(keys::template(name), read_at)
    }
    pub fn create_profile(self, p: &Profile) -> Tx {
        self.create(keys::profile(&p.name), p)
    }
    pub fn delete_profile(self, name: &str, read_at: u64) -> Tx {
        self.delete_if(keys::profile(name), read_at)
    }
    /// Requires that no profile `name` is created meanwhile (a profile's parent or template must
    /// not appear or go while it is checked).
    pub fn require_template(mut self, name: &str, read_at: u64) -> Tx {
        self.txn = self.txn.when(Compare::ModRevision(keys::template(name), read_at));
        self
    }
    pub fn require_profile(mut self, name: &str, read_at: u64) -> Tx {
        self.txn = self.txn.when(Compare::ModRevision(keys::profile(name), read_at));
        self
    }

    // Clusters, VMs, operations.

    pub fn create_cluster(self, c: &Cluster) -> Tx {
        self.create(keys::cluster(&c.name), c)
    }
    pub fn update_cluster(self, read_at: u64, c: &Cluster) -> Tx {
        self.put_if(keys::cluster(&c.name), read_at, c)
    }
    pub fn delete_cluster(self, name: &str, read_at: u64) -> Tx {
        self.delete_if(keys::cluster(name), read_at)
    }
    /// A new VM with its address and MAC, none of which may exist yet.
    pub fn create_vm(self, vm: &Vm) -> Tx {
        self.create(keys::vm(&vm.cluster, vm.index), vm)
            .create_text(keys::ip(&vm.ip), &vm.name)
            .create_text(keys::mac(&vm.mac), &vm.name)
    }
    pub fn update_vm(self, read_at: u64, vm: &Vm) -> Tx {
        self.put_if(keys::vm(&vm.cluster, vm.index), read_at, vm)
    }
    /// Deletes a VM and frees its address and MAC (its claim is the caller's: see
    /// [`crate::capacity::ClaimChanges`]).
    pub fn delete_vm(self, vm: &Vm) -> Tx {
        self.delete(keys::vm(&vm.cluster, vm.index))
            .delete(keys::ip(&vm.ip))
            .delete(keys::mac(&vm.mac))
    }
    pub fn put_operation(self, op: &Operation) -> Tx {
        self.put(keys::operation(&op.id), op)
    }
    pub fn delete_operation(self, id: &Uuid) -> Tx {
        self.delete(keys::operation(id))
    }
    /// A migration of a VM that has none under way.
    pub fn create_migration(self, m: &Migration) -> Tx {
        self.create(keys::migration(&m.vm), m)
    }
    pub fn update_migration(self, read_at: u64, m: &Migration) -> Tx {
        self.put_if(keys::migration(&m.vm), read_at, m)
    }
    pub fn delete_migration(self, vm: &str, read_at: u64) -> Tx {
        self.delete_if(keys::migration(vm), read_at)
    }

    /// A VM's checkpoints: created when `read_at` is 0, else compared on it.
    pub fn put_checkpoints(self, read_at: u64, c: &CheckpointChain) -> Tx {
        if read_at == 0 {
            self.create(keys::checkpoints(&c.vm), c)
        } else {
            self.put_if(keys::checkpoints(&c.vm), read_at, c)
        }
    }
    pub fn delete_checkpoints(self, vm: &str, read_at: u64) -> Tx {
        self.delete_if(keys::checkpoints(vm), read_at)
    }
    /// A host declared failed: created when `read_at` is 0, else compared on it.
    pub fn put_failure(self, read_at: u64, f: &HostFailure) -> Tx {
        if read_at == 0 {
            self.create(keys::failure(&f.host), f)
        } else {
            self.put_if(keys::failure(&f.host), read_at, f)
        }
    }
    pub fn delete_failure(self, host: &str, read_at: u64) -> Tx {
        self.delete_if(keys::failure(host), read_at)
    }

    // Networks and their identities.

    /// A new network with its subnet and VNI, none of which may exist yet.
    pub fn create_network(self, n: &Network) -> Tx {
        self.create(keys::network(&n.name), n)
            .create_text(keys::subnet(&n.subnet), &n.name)
            .create_text(keys::vni(n.vni), &n.name)
    }
    pub fn update_network(self, read_at: u64, n: &Network) -> Tx {
        self.put_if(keys::network(&n.name), read_at, n)
    }
    /// Deletes a network and frees its subnet and VNI.
    pub fn delete_network(self, n: &Network, read_at: u64) -> Tx {
        self.delete_if(keys::network(&n.name), read_at)
            .delete(keys::subnet(&n.subnet))
            .delete(keys::vni(n.vni))
    }
    /// Frees a subnet held by a cluster from before networks existed.
    pub fn free_subnet(self, s: &Ipv4Subnet) -> Tx {
        self.delete(keys::subnet(s))
    }

    // Tokens, by hash.

    pub fn create_token(self, hash: &str, t: &TokenRecord) -> Tx {
        self.create(keys::token(hash), t)
    }
    /// Deletes a token, which must still be as it was read (a join token is spent once).
    pub fn spend_token(self, hash: &str, read_at: u64) -> Tx {
        self.delete_if(keys::token(hash), read_at)
    }
}

/// Typed access to the state store.
#[derive(Clone)]
pub struct Datastore {
    store: Arc<dyn Store>,
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Held while a change is read, decided and committed.
pub type WriteGuard = tokio::sync::OwnedMutexGuard<()>;

impl Datastore {
    pub fn new(store: Arc<dyn Store>) -> Datastore {
        Datastore {
            store,
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Serialises read-decide-commit sequences in this process.
    pub async fn lock(&self) -> WriteGuard {
        self.write_lock.clone().lock_owned().await
    }

    /// Applies `tx` whole, or returns [`ApiError::Conflict`] when something it compared changed
    /// since it was read (then nothing was written).
    pub async fn commit(&self, tx: Tx) -> ApiResult<()> {
        if self.try_commit(tx).await? {
            Ok(())
        } else {
            Err(ApiError::Conflict(
                "the state changed while this request was decided; nothing was changed, try again".into(),
            ))
        }
    }

    /// Applies `tx` whole and says whether it was (false: a compare failed, nothing written).
    #[must_use = "a transaction whose compares failed wrote nothing"]
    pub async fn try_commit(&self, tx: Tx) -> ApiResult<bool> {
        if tx.txn.success.is_empty() && tx.txn.compare.is_empty() {
            return Ok(true);
        }
        Ok(self.store.txn(tx.txn).await?.succeeded)
    }

    /// The store's revision: it moves with every write, so an unchanged one proves nothing was
    /// written (the tests' "changes nothing").
    pub async fn revision(&self) -> ApiResult<u64> {
        Ok(self.store.revision().await?)
    }

    /// Every key under `prefix`, for inspection only (tests check that nothing was left behind);
    /// decisions read typed records.
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

    async fn get<T: DeserializeOwned>(&self, key: &str) -> ApiResult<Option<Versioned<T>>> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some(Versioned {
                value: dec(key, &kv.value)?,
                mod_revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    async fn list<T: DeserializeOwned>(&self, prefix: &str) -> ApiResult<Vec<Versioned<T>>> {
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

    async fn values<T: DeserializeOwned>(&self, prefix: &str) -> ApiResult<Vec<T>> {
        Ok(self.list(prefix).await?.into_iter().map(|v| v.value).collect())
    }

    /// The suffixes of the keys under `prefix`, parsed, with each key's text value.
    async fn index<K: std::str::FromStr>(&self, prefix: &str) -> ApiResult<Vec<(K, String)>> {
        Ok(self
            .store
            .range(prefix)
            .await?
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let k = kv.key.strip_prefix(prefix)?.parse().ok()?;
                Some((k, String::from_utf8_lossy(&kv.value).into_owned()))
            })
            .collect())
    }

    // Hosts.

    pub async fn host(&self, name: &str) -> ApiResult<Option<HostRecord>> {
        Ok(self.get(&keys::host(name)).await?.map(|v| v.value))
    }
    /// The host, or not found naming it.
    pub async fn known_host(&self, name: &str) -> ApiResult<HostRecord> {
        self.host(name).await?.ok_or_else(|| ApiError::not_found("host", name))
    }
    pub async fn hosts(&self) -> ApiResult<Vec<HostRecord>> {
        self.values(keys::HOSTS).await
    }
    pub async fn claims(&self) -> ApiResult<Claims> {
        let mut by_host = HashMap::new();
        for kv in self.store.range(keys::CLAIMS).await?.kvs {
            let host = kv.key[keys::CLAIMS.len()..].to_string();
            by_host.insert(host, (dec(&kv.key, &kv.value)?, kv.mod_revision));
        }
        Ok(Claims { by_host })
    }
    pub async fn marked(&self, mark: HostMark) -> ApiResult<HashSet<String>> {
        Ok(self
            .index::<String>(mark.prefix())
            .await?
            .into_iter()
            .map(|(h, _)| h)
            .collect())
    }
    pub async fn power(&self, host: &str) -> ApiResult<Option<HostPower>> {
        Ok(self.get(&keys::power(host)).await?.map(|v| v.value))
    }
    pub async fn powers(&self) -> ApiResult<Vec<HostPower>> {
        self.values(keys::POWER).await
    }
    pub async fn energy_accounts(&self) -> ApiResult<HashMap<String, EnergyAccount>> {
        self.store
            .range(keys::ENERGY)
            .await?
            .kvs
            .iter()
            .map(|kv| Ok((kv.key[keys::ENERGY.len()..].to_string(), dec(&kv.key, &kv.value)?)))
            .collect::<ApiResult<_>>()
    }

    // Templates and profiles.

    pub async fn template(&self, name: &str) -> ApiResult<Option<Versioned<TemplateRecord>>> {
        self.get(&keys::template(name)).await
    }
    pub async fn templates(&self) -> ApiResult<Vec<TemplateRecord>> {
        self.values(keys::TEMPLATES).await
    }
    pub async fn profile(&self, name: &str) -> ApiResult<Option<Versioned<Profile>>> {
        self.get(&keys::profile(name)).await
    }
    pub async fn profiles(&self) -> ApiResult<Vec<Profile>> {
        self.values(keys::PROFILES).await
    }

    // Clusters, VMs, operations.

    pub async fn cluster(&self, name: &str) -> ApiResult<Option<Versioned<Cluster>>> {
        self.get(&keys::cluster(name)).await
    }
    /// The cluster, or not found naming it.
    pub async fn known_cluster(&self, name: &str) -> ApiResult<Versioned<Cluster>> {
        self.cluster(name)
            .await?
            .ok_or_else(|| ApiError::not_found("cluster", name))
    }
    /// The VM, or not found naming it.
    pub async fn known_vm(&self, name: &str) -> ApiResult<Versioned<Vm>> {
        self.vm(name).await?.ok_or_else(|| ApiError::not_found("VM", name))
    }
    pub async fn clusters(&self) -> ApiResult<Vec<Cluster>> {
        self.values(keys::CLUSTERS).await
    }
    /// Every cluster, by name.
    pub async fn clusters_by_name(&self) -> ApiResult<HashMap<String, Cluster>> {
        Ok(self
            .clusters()
            .await?
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect())
    }
    pub async fn clusters_versioned(&self) -> ApiResult<Vec<Versioned<Cluster>>> {
        self.list(keys::CLUSTERS).await
    }
    /// A VM by its name, `<cluster>-<index>`.
    pub async fn vm(&self, name: &str) -> ApiResult<Option<Versioned<Vm>>> {
        let Some((cluster, index)) = name
            .rsplit_once('-')
            .and_then(|(c, i)| Some((c, i.parse::<u32>().ok().filter(|n| n.to_string() == i)?)))
        else {
            return Ok(None);
        };
        self.get(&keys::vm(cluster, index)).await
    }
    /// The VM as it is now, by the cluster and index of a copy read earlier.
    pub async fn reread_vm(&self, vm: &Vm) -> ApiResult<Option<Versioned<Vm>>> {
        self.get(&keys::vm(&vm.cluster, vm.index)).await
    }
    pub async fn vms(&self) -> ApiResult<Vec<Vm>> {
        self.values(keys::VMS).await
    }
    pub async fn vms_versioned(&self) -> ApiResult<Vec<Versioned<Vm>>> {
        self.list(keys::VMS).await
    }
    pub async fn cluster_vms(&self, cluster: &str) -> ApiResult<Vec<Versioned<Vm>>> {
        self.list(&keys::cluster_vms(cluster)).await
    }
    pub async fn operation(&self, id: &Uuid) -> ApiResult<Option<Operation>> {
        Ok(self.get(&keys::operation(id)).await?.map(|v| v.value))
    }
    pub async fn operations(&self) -> ApiResult<Vec<Operation>> {
        self.values(keys::OPERATIONS).await
    }

    // Migrations under way.

    pub async fn migration(&self, vm: &str) -> ApiResult<Option<Versioned<Migration>>> {
        self.get(&keys::migration(vm)).await
    }
    pub async fn migrations(&self) -> ApiResult<Vec<Versioned<Migration>>> {
        self.list(keys::MIGRATIONS).await
    }
    /// The VMs with a migration under way.
    pub async fn migrating_vms(&self) -> ApiResult<HashSet<String>> {
        Ok(self.migrations().await?.into_iter().map(|m| m.value.vm).collect())
    }

    // Checkpoints and failed hosts.

    pub async fn checkpoints(&self, vm: &str) -> ApiResult<Option<Versioned<CheckpointChain>>> {
        self.get(&keys::checkpoints(vm)).await
    }
    pub async fn all_checkpoints(&self) -> ApiResult<Vec<Versioned<CheckpointChain>>> {
        self.list(keys::CHECKPOINTS).await
    }
    /// Every VM's checkpoint chain, by VM name.
    pub async fn checkpoint_chains(&self) -> ApiResult<HashMap<String, CheckpointChain>> {
        Ok(self
            .all_checkpoints()
            .await?
            .into_iter()
            .map(|c| (c.value.vm.clone(), c.value))
            .collect())
    }
    pub async fn failure(&self, host: &str) -> ApiResult<Option<Versioned<HostFailure>>> {
        self.get(&keys::failure(host)).await
    }
    pub async fn failures(&self) -> ApiResult<Vec<Versioned<HostFailure>>> {
        self.list(keys::FAILURES).await
    }

    // Networks and address management.

    pub async fn network(&self, name: &str) -> ApiResult<Option<Versioned<Network>>> {
        self.get(&keys::network(name)).await
    }
    pub async fn networks(&self) -> ApiResult<Vec<Network>> {
        self.values(keys::NETWORKS).await
    }
    /// Allocated subnets, with who holds each.
    pub async fn taken_subnets(&self) -> ApiResult<Vec<(Ipv4Subnet, String)>> {
        self.index(keys::SUBNETS).await
    }
    /// Allocated VNIs, with the network holding each.
    pub async fn taken_vnis(&self) -> ApiResult<BTreeMap<u32, String>> {
        Ok(self.index(keys::VNIS).await?.into_iter().collect())
    }
    pub async fn taken_ips(&self) -> ApiResult<HashSet<Ipv4Addr>> {
        Ok(self.index(keys::IPS).await?.into_iter().map(|(k, _)| k).collect())
    }
    pub async fn taken_macs(&self) -> ApiResult<HashSet<MacAddr>> {
        Ok(self.index(keys::MACS).await?.into_iter().map(|(k, _)| k).collect())
    }

    // Tokens.

    pub async fn token(&self, hash: &str) -> ApiResult<Option<Versioned<TokenRecord>>> {
        self.get(&keys::token(hash)).await
    }
}
