//! A network driver that records what it would do, for tests without privileges.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use async_trait::async_trait;
use shoal_model::Ipv4Subnet;

use crate::{NetDriver, NetError};

/// Taps attached to a simulated network, and its peers.
pub type SimNetwork = (BTreeSet<String>, Vec<Ipv4Addr>);

#[derive(Default)]
pub struct SimNet {
    pub underlay: Option<Ipv4Addr>,
    /// VNI → (taps attached, peers).
    pub nets: Mutex<BTreeMap<u32, SimNetwork>>,
    /// VNI → the subnet this host is the gateway of.
    pub gateways: Mutex<BTreeMap<u32, Ipv4Subnet>>,
    /// Fail every gateway change, as a host without nf_tables would.
    pub no_gateways: bool,
    /// Every call, in order, for tests to inspect.
    pub log: Mutex<Vec<String>>,
}

impl SimNet {
    fn log(&self, s: String) {
        self.log.lock().expect("log").push(s);
    }
}

#[async_trait]
impl NetDriver for SimNet {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay.unwrap_or(Ipv4Addr::LOCALHOST)
    }
    fn guest_mtu(&self) -> u32 {
        1500
    }
    async fn create(&self, vni: u32) -> Result<(), NetError> {
        self.log(format!("create {vni}"));
        self.nets.lock().expect("nets").entry(vni).or_default();
        Ok(())
    }
    async fn set_peers(&self, vni: u32, peers: &[Ipv4Addr]) -> Result<(), NetError> {
        self.log(format!("peers {vni} {peers:?}"));
        if let Some(n) = self.nets.lock().expect("nets").get_mut(&vni) {
            n.1 = peers.to_vec();
        }
        Ok(())
    }
    async fn attach(&self, vni: u32, tap: &str) -> Result<(), NetError> {
        self.log(format!("attach {vni} {tap}"));
        if let Some(n) = self.nets.lock().expect("nets").get_mut(&vni) {
            n.0.insert(tap.to_string());
        }
        Ok(())
    }
    async fn destroy(&self, vni: u32) -> Result<(), NetError> {
        self.log(format!("destroy {vni}"));
        self.nets.lock().expect("nets").remove(&vni);
        self.gateways.lock().expect("gateways").remove(&vni);
        Ok(())
    }
    async fn set_gateway(&self, vni: u32, subnet: Option<Ipv4Subnet>) -> Result<(), NetError> {
        self.log(format!("gateway {vni} {subnet:?}"));
        if self.no_gateways {
            return Err(NetError::Gateway {
                vni,
                source: std::io::Error::from_raw_os_error(93),
            });
        }
        let mut g = self.gateways.lock().expect("gateways");
        match subnet {
            Some(s) => g.insert(vni, s),
            None => g.remove(&vni),
        };
        Ok(())
    }
}
