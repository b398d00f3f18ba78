//! Host side of Shoal's virtual networks.
//!
//! A [`NetDriver`] makes the devices of one network on this host: for the bridge driver
//! ([`bridge::BridgeDriver`]) a Linux bridge `shbr<VNI>` and a VXLAN device `shvx<VNI>` on the
//! underlay, with one all-zeros FDB entry per remote host (head-end replication, no multicast),
//! all over netlink. [`NetManager`] keeps which VMs use which network, creates a network with its
//! first VM on the host and removes it with its last, and applies the remote VTEPs (and, on the
//! one host the controller picks for a network with NAT, the gateway: [`nftables`]) that the
//! controller sends. [`sim::SimNet`] records instead of touching the kernel, for tests.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;
use shoal_model::agent::VmSpec;
use shoal_model::network::NetworkPeers;
use shoal_model::Ipv4Subnet;
use uuid::Uuid;

pub mod bridge;
pub mod nftables;
pub mod sim;
pub mod udp;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the bridge network driver needs CAP_NET_ADMIN, which this agent does not have (run it as root, or without --net bridge)")]
    NoNetAdmin,
    #[error("underlay address {0} is not an address of any interface of this host (its network namespace); give --underlay-ip one of its own addresses")]
    UnderlayNotLocal(Ipv4Addr),
    #[error("the tap {0} of the VM did not appear")]
    TapMissing(String),
    #[error("the {0} network driver cannot be a network's NAT gateway (only the bridge driver can)")]
    NoGateway(&'static str),
    #[error("setting up the gateway of network {vni}: {source}")]
    Gateway {
        vni: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Devices of virtual networks on one host. Every method is idempotent.
#[async_trait]
pub trait NetDriver: Send + Sync {
    fn name(&self) -> &'static str;
    /// The address remote hosts send this host's VXLAN traffic to.
    fn underlay_ip(&self) -> Ipv4Addr;
    /// The MTU guests can have over this host's underlay.
    fn guest_mtu(&self) -> u32;
    /// Makes network `vni`'s devices on this host.
    async fn create(&self, vni: u32) -> Result<(), NetError>;
    /// Makes `peers` exactly the remote VTEPs of network `vni`.
    async fn set_peers(&self, vni: u32, peers: &[Ipv4Addr]) -> Result<(), NetError>;
    /// Connects a VM's tap (made by QEMU) to network `vni`.
    async fn attach(&self, vni: u32, tap: &str) -> Result<(), NetError>;
    /// Removes network `vni`'s devices (and with them its FDB entries and its gateway).
    async fn destroy(&self, vni: u32) -> Result<(), NetError>;
    /// Makes this host network `vni`'s NAT gateway for `subnet` (its first address on the
    /// network's bridge, forwarding, masquerade), or, with `None`, no longer its gateway.
    async fn set_gateway(&self, _vni: u32, subnet: Option<Ipv4Subnet>) -> Result<(), NetError> {
        match subnet {
            Some(_) => Err(NetError::NoGateway(self.name())),
            None => Ok(()),
        }
    }
    /// QEMU's `-netdev` (id `net0`) for VM `uuid` on network `vni`: by default a tap QEMU makes,
    /// which [`NetDriver::attach`] then connects.
    fn netdev(&self, _vni: u32, uuid: Uuid) -> Result<String, NetError> {
        Ok(format!("tap,id=net0,ifname={},script=no,downscript=no", tap_name(uuid)))
    }
    /// VM `uuid` left network `vni` on this host.
    fn release_vm(&self, _vni: u32, _uuid: Uuid) {}
}

pub fn bridge_name(vni: u32) -> String {
    format!("shbr{vni}")
}
pub fn vxlan_name(vni: u32) -> String {
    format!("shvx{vni}")
}
/// The tap QEMU makes for a VM: unique per VM, within the 15 characters of an interface name.
pub fn tap_name(uuid: Uuid) -> String {
    format!("sht{}", &uuid.simple().to_string()[..11])
}

/// How one network is wired on this host beyond its devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Wiring {
    /// Remote VTEPs.
    peers: BTreeSet<Ipv4Addr>,
    /// The subnet this host is the NAT gateway of.
    gateway: Option<Ipv4Subnet>,
    /// Whether `gateway` was applied since this agent started: a network adopted from before a
    /// restart may still carry a gateway this host no longer is, so it is applied once anyway.
    gateway_applied: bool,
}

impl Wiring {
    fn of(n: &shoal_model::VmNetwork) -> Wiring {
        Wiring {
            peers: n.peers.iter().copied().collect(),
            gateway: n.gateway,
            gateway_applied: false,
        }
    }
}

#[derive(Default)]
struct State {
    /// VM → the VNI of its network.
    vms: HashMap<Uuid, u32>,
    /// Networks with devices on this host, and how they are wired.
    nets: HashMap<u32, Wiring>,
    /// What the controller last said each network's wiring is.
    wanted: HashMap<u32, Wiring>,
}

/// Which VMs use which network on this host; creates and removes networks with their VMs.
pub struct NetManager {
    driver: Arc<dyn NetDriver>,
    state: tokio::sync::Mutex<State>,
}

impl NetManager {
    pub fn new(driver: Arc<dyn NetDriver>) -> NetManager {
        NetManager {
            driver,
            state: Default::default(),
        }
    }

    pub fn driver(&self) -> &Arc<dyn NetDriver> {
        &self.driver
    }

    /// Readies the network of `spec` (when it has one) and returns QEMU's `-netdev` for the VM.
    pub async fn netdev(&self, spec: &VmSpec) -> Result<Option<String>, NetError> {
        let Some(n) = &spec.network else { return Ok(None) };
        let mut st = self.state.lock().await;
        if let std::collections::hash_map::Entry::Vacant(v) = st.nets.entry(n.vni) {
            if let Err(e) = self.driver.create(n.vni).await {
                // Nothing half-made stays behind.
                let _ = self.driver.destroy(n.vni).await;
                return Err(e);
            }
            v.insert(Wiring::default());
        }
        st.vms.insert(spec.uuid, n.vni);
        let wiring = st.wanted.get(&n.vni).cloned().unwrap_or_else(|| Wiring::of(n));
        self.program(&mut st, n.vni, wiring).await?;
        Ok(Some(self.driver.netdev(n.vni, spec.uuid)?))
    }

    /// Connects the tap QEMU made for `spec`.
    pub async fn connect(&self, spec: &VmSpec) -> Result<(), NetError> {
        let Some(n) = &spec.network else { return Ok(()) };
        self.driver.attach(n.vni, &tap_name(spec.uuid)).await
    }

    /// A VM that runs since before this agent started: count it on its network again.
    pub async fn adopt(&self, spec: &VmSpec) {
        if let Some(n) = &spec.network {
            let mut st = self.state.lock().await;
            st.vms.insert(spec.uuid, n.vni);
            st.nets.entry(n.vni).or_default();
        }
    }

    /// The VM left this host: its network goes with the host's last VM on it.
    pub async fn release(&self, uuid: Uuid) -> Result<(), NetError> {
        let mut st = self.state.lock().await;
        let Some(vni) = st.vms.remove(&uuid) else { return Ok(()) };
        self.driver.release_vm(vni, uuid);
        if st.vms.values().any(|v| *v == vni) {
            return Ok(());
        }
        st.nets.remove(&vni);
        self.driver.destroy(vni).await
    }

    /// The controller's view of every network this host takes part in.
    pub async fn set_peers(&self, peers: &NetworkPeers) -> Result<(), NetError> {
        let mut st = self.state.lock().await;
        st.wanted = peers.networks.iter().map(|n| (n.vni, Wiring::of(n))).collect();
        let mut vnis: Vec<u32> = st.nets.keys().copied().collect();
        vnis.sort();
        // Every network gets its turn; the first failure is reported.
        let mut first = Ok(());
        for vni in vnis {
            let want = st.wanted.get(&vni).cloned().unwrap_or_default();
            if let Err(e) = self.program(&mut st, vni, want).await {
                tracing::error!(vni, "wiring network: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    async fn program(&self, st: &mut State, vni: u32, want: Wiring) -> Result<(), NetError> {
        let peers: BTreeSet<Ipv4Addr> = want
            .peers
            .into_iter()
            .filter(|p| *p != self.driver.underlay_ip())
            .collect();
        let have = st.nets.get(&vni).cloned().unwrap_or_default();
        if have.peers != peers {
            let list: Vec<Ipv4Addr> = peers.iter().copied().collect();
            self.driver.set_peers(vni, &list).await?;
            st.nets.entry(vni).or_default().peers = peers;
        }
        if have.gateway != want.gateway || !have.gateway_applied {
            match self.driver.set_gateway(vni, want.gateway).await {
                // Clearing a gateway this host was never told it has is housekeeping: a host that
                // cannot do it (a kernel without nf_tables) still runs the network.
                Err(e) if want.gateway.is_none() && have.gateway.is_none() => {
                    tracing::warn!(vni, "clearing any stale gateway: {e}")
                }
                r => r?,
            }
            let w = st.nets.entry(vni).or_default();
            (w.gateway, w.gateway_applied) = (want.gateway, true);
        }
        Ok(())
    }

    /// Networks with devices on this host, with their peers and the subnet this host is the
    /// gateway of.
    pub async fn networks(&self) -> Vec<(u32, Vec<Ipv4Addr>, Option<Ipv4Subnet>)> {
        let st = self.state.lock().await;
        let mut v: Vec<_> = st
            .nets
            .iter()
            .map(|(k, w)| (*k, w.peers.iter().copied().collect(), w.gateway))
            .collect();
        v.sort();
        v
    }
}

/// Whether this process has CAP_NET_ADMIN in its effective set.
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_model::VmNetwork;

    fn spec(vni: u32, peers: &[&str]) -> VmSpec {
        VmSpec {
            template_hash: String::new(),
            power: Default::default(),
            ip: "10.0.0.2".parse().unwrap(),
            gateway: "10.0.0.1".parse().unwrap(),
            network: Some(VmNetwork {
                name: "n".into(),
                vni,
                mtu: 1500,
                peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
                gateway: None,
                dns: Vec::new(),
            }),
            ..VmSpec::example("vm")
        }
    }

    #[tokio::test]
    async fn a_network_lives_from_its_first_vm_on_the_host_to_its_last() {
        let sim = Arc::new(sim::SimNet {
            underlay: Some("10.9.0.1".parse().unwrap()),
            ..Default::default()
        });
        let m = NetManager::new(sim.clone());
        let (a, b) = (spec(7, &["10.9.0.2"]), spec(7, &["10.9.0.2"]));
        let netdev = m.netdev(&a).await.unwrap().unwrap();
        assert!(
            netdev.starts_with("tap,id=net0,ifname=sht") && netdev.contains("script=no"),
            "{netdev}"
        );
        m.connect(&a).await.unwrap();
        m.netdev(&b).await.unwrap();
        assert_eq!(
            sim.log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with("create"))
                .count(),
            1
        );
        assert_eq!(m.networks().await, vec![(7, vec!["10.9.0.2".parse().unwrap()], None)]);

        // The controller's peers replace the spec's; this host's own address is never a peer.
        let peers = NetworkPeers {
            networks: vec![VmNetwork {
                name: "n".into(),
                vni: 7,
                mtu: 1500,
                peers: vec!["10.9.0.3".parse().unwrap(), "10.9.0.1".parse().unwrap()],
                gateway: None,
                dns: Vec::new(),
            }],
        };
        m.set_peers(&peers).await.unwrap();
        assert_eq!(
            sim.nets.lock().unwrap()[&7].1,
            vec!["10.9.0.3".parse::<Ipv4Addr>().unwrap()]
        );

        // Made the network's gateway, then no longer: the driver is told each change once.
        let mut gw = peers.clone();
        gw.networks[0].gateway = Some("10.0.0.0/24".parse().unwrap());
        let gateway_calls = || {
            sim.log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with("gateway"))
                .count()
        };
        let applied = gateway_calls();
        assert_eq!(applied, 1, "the network's first wiring applies its gateway (none) once");
        m.set_peers(&gw).await.unwrap();
        m.set_peers(&gw).await.unwrap();
        assert_eq!(
            sim.gateways.lock().unwrap().get(&7),
            Some(&"10.0.0.0/24".parse().unwrap())
        );
        m.set_peers(&peers).await.unwrap();
        assert!(sim.gateways.lock().unwrap().is_empty());
        assert_eq!(gateway_calls(), applied + 2);

        m.release(a.uuid).await.unwrap();
        assert!(sim.nets.lock().unwrap().contains_key(&7), "b still uses it");
        m.release(b.uuid).await.unwrap();
        assert!(sim.nets.lock().unwrap().is_empty());
        assert!(m.networks().await.is_empty());
        // A VM without a network: user-mode networking, nothing made.
        let mut plain = spec(8, &[]);
        plain.network = None;
        assert_eq!(m.netdev(&plain).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_host_that_cannot_be_a_gateway_still_runs_networks_and_says_why_it_cannot_route() {
        let sim = Arc::new(sim::SimNet {
            underlay: Some("10.9.0.1".parse().unwrap()),
            no_gateways: true,
            ..Default::default()
        });
        let m = NetManager::new(sim.clone());
        let a = spec(7, &["10.9.0.2"]);
        m.netdev(&a).await.expect("the network comes up without a gateway");
        let mut gw = NetworkPeers {
            networks: vec![a.network.clone().unwrap()],
        };
        gw.networks[0].gateway = Some("10.0.0.0/24".parse().unwrap());
        let e = m.set_peers(&gw).await.unwrap_err();
        assert!(e.to_string().contains("gateway of network 7"), "{e}");
        assert!(sim.nets.lock().unwrap().contains_key(&7), "the network itself stays");
    }
}
