//! Virtual networks in the store: creation with a subnet and VNI of their own (both allocated
//! when not given, overlaps and duplicates refused), the network a new cluster gets or joins, the
//! keys a deleted cluster's own network releases, and the per-host view the reconciler sends:
//! each network's VNI, guest MTU and remote VTEPs.
//!
//! Keys: `/networks/<name>` ([`Network`]), `/ipam/subnets/<cidr>` (value: the network's name),
//! `/ipam/vnis/<vni>` (value: the network's name), all created with "must not exist".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use shoal_model::network::{
    parse_dns, validate_vni, CreateNetwork, NetworkPeers, NetworkView, UpdateNetwork, GUEST_MTU, VNI_AUTO_START,
    VNI_MAX,
};
use shoal_model::{now_ms, validate_name, Cluster, Ipv4Subnet, Network, Vm, VmNetwork, VmState};

use crate::datastore::{HostRecord, Tx, Versioned};
use crate::error::{ApiError, ApiResult};
use crate::{ipam, Controller};

pub async fn networks(ctl: &Controller) -> ApiResult<Vec<Network>> {
    ctl.db.networks().await
}

/// The lowest free VNI from [`VNI_AUTO_START`].
pub fn allocate_vni(taken: &BTreeMap<u32, String>) -> ApiResult<u32> {
    (VNI_AUTO_START..=VNI_MAX)
        .find(|v| !taken.contains_key(v))
        .ok_or_else(|| ApiError::Capacity("no free VNI left".into()))
}

/// Plans a new network: validates, allocates what was not given, and returns it with the
/// transaction ops and compares that record it. The caller holds the write lock.
pub async fn plan_network(
    ctl: &Controller,
    req: &CreateNetwork,
    owner: Option<&str>,
    guests: u32,
) -> ApiResult<(Network, Tx)> {
    validate_name("network", &req.name)?;
    if ctl.db.network(&req.name).await?.is_some() {
        return Err(match owner {
            Some(c) => ApiError::Conflict(format!(
                "a network named {:?} exists already; join it with --network {} or give cluster {c:?} another name",
                req.name, req.name
            )),
            None => ApiError::exists("network", &req.name),
        });
    }
    let subnets: Vec<(Ipv4Subnet, String)> = ctl.db.taken_subnets().await?;
    let subnet = match &req.subnet {
        Some(s) => {
            let s: Ipv4Subnet = s.parse().map_err(|e| ApiError::Invalid(format!("{e}")))?;
            if s.prefix() > 29 {
                return Err(ApiError::Invalid(format!(
                    "subnet {s} is too small for a network: the prefix must be /29 or shorter"
                )));
            }
            if let Some((t, by)) = subnets.iter().find(|(t, _)| t.overlaps(&s)) {
                return Err(ApiError::Conflict(format!(
                    "subnet {s} overlaps {t}, which {by:?} uses"
                )));
            }
            s
        }
        None => {
            let taken: Vec<Ipv4Subnet> = subnets.iter().map(|(s, _)| *s).collect();
            ipam::allocate_subnet(&ctl.config, guests.max(1), &taken)?
        }
    };
    let vnis: BTreeMap<u32, String> = ctl.db.taken_vnis().await?;
    let vni = match req.vni {
        Some(v) => {
            validate_vni(v).map_err(|e| ApiError::Invalid(e.to_string()))?;
            if let Some(by) = vnis.get(&v) {
                return Err(ApiError::Conflict(format!("VNI {v} is in use by network {by:?}")));
            }
            v
        }
        None => allocate_vni(&vnis)?,
    };
    let net = Network {
        name: req.name.clone(),
        subnet,
        vni,
        owner: owner.map(str::to_string),
        nat: req.nat,
        dns: parse_dns(&req.dns).map_err(ApiError::Invalid)?,
        created_unix_ms: now_ms(),
    };
    let tx = Tx::new().create_network(&net);
    Ok((net, tx))
}

/// What a new cluster is on: the named network (which must exist), or a new one of its own.
/// Returns the network and, for a new one, the transaction part that records it.
pub async fn network_for_cluster(
    ctl: &Controller,
    cluster: &str,
    wanted: Option<&str>,
    size: u32,
    nat: bool,
) -> ApiResult<(Network, Option<Tx>)> {
    match wanted {
        Some(name) => {
            let v = ctl.db.network(name).await?.ok_or_else(|| {
                ApiError::Invalid(format!("network {name:?} does not exist (shoal network create {name})"))
            })?;
            if nat && !v.value.nat {
                return Err(ApiError::Invalid(format!(
                    "cluster {cluster:?} joins network {name:?}, which has no outbound access: that is the \
                     network's own setting (shoal network set {name} --nat true)"
                )));
            }
            Ok((v.value, None))
        }
        None => {
            let req = CreateNetwork {
                name: cluster.to_string(),
                subnet: None,
                vni: None,
                nat,
                dns: Vec::new(),
            };
            let (net, txn) = plan_network(ctl, &req, Some(cluster), size).await?;
            Ok((net, Some(txn)))
        }
    }
}

/// Adds to `tx` what frees what a deleted cluster held: its own network with its subnet and
/// VNI, or, for a cluster from before networks, its subnet. A shared network stays.
pub async fn release(ctl: &Controller, cluster: &Cluster, tx: Tx) -> ApiResult<Tx> {
    let Some(name) = &cluster.network else {
        return Ok(tx.free_subnet(&cluster.subnet));
    };
    Ok(match ctl.db.network(name).await? {
        Some(n) if n.value.owner.as_deref() == Some(cluster.name.as_str()) => {
            tx.delete_network(&n.value, n.mod_revision)
        }
        _ => tx,
    })
}

/// `network create`: a network of its own subnet and VNI, allocated when not given.
pub async fn create(ctl: &Controller, req: &CreateNetwork) -> ApiResult<NetworkView> {
    let _guard = ctl.db.lock().await;
    let (net, tx) = plan_network(ctl, req, None, 1).await?;
    if !ctl.db.try_commit(tx).await? {
        return Err(ApiError::Conflict(format!(
            "network {:?}, its subnet {} or its VNI {} was taken meanwhile; nothing was changed",
            net.name, net.subnet, net.vni
        )));
    }
    // A new network has no VMs yet, so no hosts and no gateway.
    let none = Topology::new(|_| None, &[], &Default::default());
    Ok(view(net, &[], &[], &none))
}

/// Network `name` as stored, or not found.
async fn stored(ctl: &Controller, name: &str) -> ApiResult<Versioned<Network>> {
    ctl.db
        .network(name)
        .await?
        .ok_or_else(|| ApiError::not_found("network", name))
}

/// `network show`.
pub async fn show(ctl: &Controller, name: &str) -> ApiResult<NetworkView> {
    let net = stored(ctl, name).await?.value;
    let (clusters, vms, topo) = topology_now(ctl).await?;
    Ok(view(net, &clusters, &vms, &topo))
}

/// `network list`.
pub async fn list(ctl: &Controller) -> ApiResult<Vec<NetworkView>> {
    let (clusters, vms, topo) = topology_now(ctl).await?;
    Ok(networks(ctl)
        .await?
        .into_iter()
        .map(|n| view(n, &clusters, &vms, &topo))
        .collect())
}

/// `network set`: `nat` switches outbound access on or off (the reconciler then sets up or
/// removes the gateway); `dns` replaces the guests' DNS servers for VMs created from then on.
pub async fn update(ctl: &Controller, name: &str, req: &UpdateNetwork) -> ApiResult<NetworkView> {
    let _guard = ctl.db.lock().await;
    let v = stored(ctl, name).await?;
    let mut net = v.value;
    if let Some(nat) = req.nat {
        net.nat = nat;
    }
    if let Some(dns) = &req.dns {
        net.dns = parse_dns(dns).map_err(ApiError::Invalid)?;
    }
    if !ctl
        .db
        .try_commit(Tx::new().update_network(v.mod_revision, &net))
        .await?
    {
        return Err(ApiError::Conflict(format!(
            "network {name:?} changed meanwhile; nothing was changed"
        )));
    }
    ctl.wake.notify_one();
    let (clusters, vms, topo) = topology_now(ctl).await?;
    Ok(view(net, &clusters, &vms, &topo))
}

/// `network delete`: only a network no cluster is on.
pub async fn delete(ctl: &Controller, name: &str) -> ApiResult<()> {
    let _guard = ctl.db.lock().await;
    let v = stored(ctl, name).await?;
    check_deletable(&v.value, &ctl.db.clusters().await?)?;
    if !ctl
        .db
        .try_commit(Tx::new().delete_network(&v.value, v.mod_revision))
        .await?
    {
        return Err(ApiError::Conflict(format!(
            "network {name:?} changed meanwhile; nothing was changed"
        )));
    }
    Ok(())
}

/// A network with who uses it, from the topology of the same moment.
pub fn view(net: Network, clusters: &[Cluster], vms: &[Vm], topo: &Topology) -> NetworkView {
    let on: Vec<&Cluster> = clusters
        .iter()
        .filter(|c| c.network.as_deref() == Some(net.name.as_str()))
        .collect();
    let names: BTreeSet<&str> = on.iter().map(|c| c.name.as_str()).collect();
    NetworkView {
        clusters: on.iter().map(|c| c.name.clone()).collect(),
        hosts: topo.hosts.get(&net.name).into_iter().flatten().cloned().collect(),
        vms: vms.iter().filter(|v| names.contains(v.cluster.as_str())).count() as u32,
        gateway_host: topo.gateway(&net),
        gateway_ip: net.nat.then(|| net.subnet.gateway()),
        network: net,
    }
}

/// The clusters, VMs and network topology as the store has them now.
pub async fn topology_now(ctl: &Controller) -> ApiResult<(Vec<Cluster>, Vec<Vm>, Topology)> {
    let (clusters, vms) = (ctl.db.clusters().await?, ctl.db.vms().await?);
    let hosts: HashMap<String, HostRecord> = ctl.db.hosts().await?.into_iter().map(|h| (h.name.clone(), h)).collect();
    let network_of: HashMap<&str, &str> = clusters
        .iter()
        .filter_map(|c| Some((c.name.as_str(), c.network.as_deref()?)))
        .collect();
    let topo = Topology::new(|c| network_of.get(c).copied(), &vms, &hosts);
    Ok((clusters, vms, topo))
}

/// Refuses to delete a network a cluster is on, or one a cluster made for itself.
pub fn check_deletable(net: &Network, clusters: &[Cluster]) -> ApiResult<()> {
    if let Some(owner) = &net.owner {
        return Err(ApiError::InUse(format!(
            "network {:?} belongs to cluster {owner:?} and goes when that cluster is deleted",
            net.name
        )));
    }
    let users: Vec<&str> = clusters
        .iter()
        .filter(|c| c.network.as_deref() == Some(net.name.as_str()))
        .map(|c| c.name.as_str())
        .collect();
    if !users.is_empty() {
        return Err(ApiError::InUse(format!(
            "network {:?} is in use by clusters [{}]; delete them first",
            net.name,
            users.join(", ")
        )));
    }
    Ok(())
}

/// Refuses host `name` when its underlay address is another host's, or not reachable: up to
/// three other hosts with a network driver that are heard from try to connect to `ip:port` at
/// once (the controller itself when there are none, or none of them answers), and one success
/// admits the host. The address is the host's own by then (its agent checks that), but it may
/// sit on an interface no other host reaches; VXLAN would then lose every frame without a word.
pub async fn check_underlay(ctl: &Controller, name: &str, ip: Ipv4Addr, port: u16) -> ApiResult<()> {
    use shoal_model::agent::UnderlayProbe;
    use shoal_model::HostState;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(3);
    let hosts: Vec<HostRecord> = ctl.db.hosts().await?;
    if let Some(other) = hosts.iter().find(|h| h.name != name && h.underlay_ip == Some(ip)) {
        return Err(ApiError::Conflict(format!(
            "host {name:?}: underlay address {ip} is host {:?}'s already; every host needs its own",
            other.name
        )));
    }
    let mut probers: Vec<HostRecord> = hosts
        .into_iter()
        .filter(|h| h.name != name && h.underlay_ip.is_some())
        .filter(|h| matches!(ctl.host_state(&h.name), (HostState::Up, Some(_))))
        .collect();
    probers.sort_by(|a, b| a.name.cmp(&b.name));
    probers.truncate(3);
    let probe = UnderlayProbe { address: ip, port };
    let answers = futures::future::join_all(probers.iter().map(|h| {
        let (agent, probe) = (ctl.agent(&h.address), probe.clone());
        async move { tokio::time::timeout(WAIT * 2, agent.probe_underlay(&probe)).await }
    }))
    .await;
    let mut failures = Vec::new();
    for (h, a) in probers.iter().zip(answers) {
        match a {
            Ok(Ok(r)) if r.reachable => return Ok(()),
            Ok(Ok(r)) => failures.push(format!("from host {}: {}", h.name, r.error.unwrap_or_default())),
            // The prober did not answer: no verdict from it.
            _ => {}
        }
    }
    if failures.is_empty() {
        let r = shoal_client::probe_underlay(ip, port, WAIT).await;
        if r.reachable {
            return Ok(());
        }
        failures.push(format!("from the controller: {}", r.error.unwrap_or_default()));
    }
    Err(ApiError::Invalid(format!(
        "host {name:?}: its underlay address {ip} is unreachable ({}); the other hosts would send its \
         virtual networks' traffic there: give --underlay-ip an address they reach",
        failures.join("; ")
    )))
}

/// Which hosts take part in which network, from the VMs placed on them.
pub struct Topology {
    /// network → hosts running (or about to run) one of its VMs.
    pub hosts: HashMap<String, BTreeSet<String>>,
    /// host → underlay address, for hosts with a network driver.
    pub underlay: HashMap<String, Ipv4Addr>,
    /// Hosts that can be a network's NAT gateway (those with the bridge driver).
    pub routers: BTreeSet<String>,
    pub guest_mtu: u32,
}

/// The gateway of network `net` among `candidates`, by rendezvous hashing: the same host for as
/// long as it stays a candidate, and a host that joins takes over only the networks it wins,
/// so gateways (and the connections tracked on them) rarely move.
pub fn pick_gateway<'a>(net: &str, candidates: impl IntoIterator<Item = &'a String>) -> Option<String> {
    let weight = |host: &str| {
        // FNV-1a over "net/host": stable across processes and releases.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in net.bytes().chain([b'/']).chain(host.bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h
    };
    candidates
        .into_iter()
        .max_by_key(|h| (weight(h), std::cmp::Reverse((*h).clone())))
        .cloned()
}

impl Topology {
    /// From the VMs, the network of each VM's cluster (`network_of(cluster)`), and the hosts.
    pub fn new<'a>(
        network_of: impl Fn(&str) -> Option<&'a str>,
        vms: impl IntoIterator<Item = &'a Vm>,
        hosts: &HashMap<String, HostRecord>,
    ) -> Topology {
        let mut on: HashMap<String, BTreeSet<String>> = HashMap::new();
        for vm in vms {
            if vm.host.is_empty() || matches!(vm.state, VmState::Deleting) {
                continue;
            }
            let Some(net) = network_of(&vm.cluster) else { continue };
            on.entry(net.to_string()).or_default().insert(vm.host.clone());
        }
        let underlay = hosts
            .values()
            .filter_map(|h| Some((h.name.clone(), h.underlay_ip?)))
            .collect();
        let routers = hosts
            .values()
            .filter(|h| h.network_driver.as_deref() == Some("bridge") && h.underlay_ip.is_some())
            .map(|h| h.name.clone())
            .collect();
        let guest_mtu = hosts
            .values()
            .filter_map(|h| h.guest_mtu)
            .min()
            .unwrap_or(GUEST_MTU)
            .min(GUEST_MTU);
        Topology {
            hosts: on,
            underlay,
            routers,
            guest_mtu,
        }
    }

    /// The host that is network `net`'s NAT gateway now, if it has NAT and a host to be it.
    pub fn gateway(&self, net: &Network) -> Option<String> {
        if !net.nat {
            return None;
        }
        pick_gateway(
            &net.name,
            self.hosts.get(&net.name)?.iter().filter(|h| self.routers.contains(*h)),
        )
    }

    /// What `host` needs for network `net`: the other hosts' underlay addresses.
    pub fn vm_network(&self, net: &Network, host: &str) -> VmNetwork {
        let peers: BTreeSet<Ipv4Addr> = self
            .hosts
            .get(&net.name)
            .into_iter()
            .flatten()
            .filter(|h| h.as_str() != host)
            .filter_map(|h| self.underlay.get(h).copied())
            .filter(|ip| Some(ip) != self.underlay.get(host))
            .collect();
        VmNetwork {
            name: net.name.clone(),
            vni: net.vni,
            mtu: self.guest_mtu,
            peers: peers.into_iter().collect(),
            gateway: (self.gateway(net).as_deref() == Some(host)).then_some(net.subnet),
            dns: net.dns.clone(),
        }
    }

    /// For every host with a network driver, the networks it takes part in and their peers.
    pub fn peers_by_host(&self, networks: &HashMap<String, Network>) -> BTreeMap<String, NetworkPeers> {
        let mut out: BTreeMap<String, NetworkPeers> = BTreeMap::new();
        let mut names: Vec<&String> = self.hosts.keys().collect();
        names.sort();
        for name in names {
            let Some(net) = networks.get(name) else { continue };
            for host in &self.hosts[name] {
                if self.underlay.contains_key(host) {
                    out.entry(host.clone())
                        .or_default()
                        .networks
                        .push(self.vm_network(net, host));
                }
            }
        }
        // A host whose last VM of a network went still needs telling, so that it forgets the peers.
        for host in self.underlay.keys() {
            out.entry(host.clone()).or_default();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, ip: Option<&str>, mtu: Option<u32>) -> HostRecord {
        HostRecord {
            name: name.into(),
            address: String::new(),
            driver: "qemu/tcg".into(),
            cpus: 1,
            memory_mib: 1,
            joined_unix_ms: 0,
            underlay_ip: ip.map(|i| i.parse().unwrap()),
            guest_mtu: mtu,
            network_driver: ip.map(|_| "bridge".into()),
            labels: Default::default(),
            allocation: Default::default(),
        }
    }

    #[test]
    fn vni_allocation_skips_taken_ones() {
        let taken: BTreeMap<u32, String> = [(10_000, "a".into()), (10_001, "b".into()), (10_003, "c".into())].into();
        assert_eq!(allocate_vni(&taken).unwrap(), 10_002);
        assert_eq!(allocate_vni(&BTreeMap::new()).unwrap(), VNI_AUTO_START);
    }

    #[test]
    fn peers_are_the_other_hosts_of_the_network_with_an_underlay() {
        let net = Network {
            name: "n".into(),
            subnet: "10.1.0.0/24".parse().unwrap(),
            vni: 7,
            owner: None,
            nat: false,
            dns: Vec::new(),
            created_unix_ms: 0,
        };
        let t = Topology {
            hosts: [("n".to_string(), ["a", "b", "c"].iter().map(|s| s.to_string()).collect())].into(),
            underlay: [
                ("a".to_string(), "10.9.0.1".parse().unwrap()),
                ("b".to_string(), "10.9.0.2".parse().unwrap()),
            ]
            .into(),
            routers: BTreeSet::new(),
            guest_mtu: 1500,
        };
        let a = t.vm_network(&net, "a");
        assert_eq!(a.peers, vec!["10.9.0.2".parse::<Ipv4Addr>().unwrap()]);
        let by_host = t.peers_by_host(&[("n".to_string(), net)].into());
        assert_eq!(by_host.len(), 2, "only hosts with an underlay are told");
        assert_eq!(
            by_host["b"].networks[0].peers,
            vec!["10.9.0.1".parse::<Ipv4Addr>().unwrap()]
        );
    }

    #[test]
    fn one_host_of_a_nat_network_with_the_bridge_driver_is_its_gateway_and_stays_it() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
        let mut net = Network {
            name: "n".into(),
            subnet: "10.1.0.0/24".parse().unwrap(),
            vni: 7,
            owner: None,
            nat: true,
            dns: Vec::new(),
            created_unix_ms: 0,
        };
        let mut t = Topology {
            hosts: [("n".to_string(), names(&["a", "b", "u"]))].into(),
            underlay: ["a", "b", "u"]
                .iter()
                .enumerate()
                .map(|(i, h)| (h.to_string(), Ipv4Addr::new(10, 9, 0, i as u8 + 1)))
                .collect(),
            routers: names(&["a", "b"]),
            guest_mtu: 1500,
        };
        let gw = t.gateway(&net).expect("a gateway");
        assert!(gw == "a" || gw == "b", "{gw}: only bridge hosts route");
        let by_host = t.peers_by_host(&[("n".to_string(), net.clone())].into());
        let told: Vec<&String> = by_host
            .iter()
            .filter(|(_, p)| p.networks[0].gateway.is_some())
            .map(|(h, _)| h)
            .collect();
        assert_eq!(told, vec![&gw], "exactly the gateway is told, with the subnet");
        assert_eq!(by_host[&gw].networks[0].gateway, Some(net.subnet));
        // Hosts joining move the gateway only to a host that wins by the hash; the gateway
        // leaving hands it to another router.
        let mut before = gw.clone();
        for extra in ["c", "d", "e", "f"] {
            t.hosts.get_mut("n").unwrap().insert(extra.into());
            t.routers.insert(extra.into());
            let now = t.gateway(&net).unwrap();
            assert!(now == before || now == extra, "{before} -> {now} when {extra} joined");
            before = now;
        }
        let now = t.gateway(&net).unwrap();
        t.hosts.get_mut("n").unwrap().remove(&now);
        assert_ne!(t.gateway(&net).unwrap(), now);
        // No router among its hosts, or no NAT: no gateway.
        t.routers.clear();
        assert_eq!(t.gateway(&net), None);
        net.nat = false;
        t.routers = names(&["a"]);
        assert_eq!(t.gateway(&net), None);
    }

    #[test]
    fn the_guest_mtu_is_the_lowest_any_host_can_carry() {
        let hosts: HashMap<String, HostRecord> = [
            ("a".to_string(), host("a", Some("10.9.0.1"), Some(1450))),
            ("b".to_string(), host("b", Some("10.9.0.2"), Some(1500))),
        ]
        .into();
        assert_eq!(Topology::new(|_| None, &[], &hosts).guest_mtu, 1450);
        assert_eq!(Topology::new(|_| None, &[], &HashMap::new()).guest_mtu, 1500);
    }
}
