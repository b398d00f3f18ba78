//! The bridge driver: per network, a Linux bridge and a VXLAN device enslaved to it, the VMs'
//! taps on the bridge, and one all-zeros FDB entry per remote VTEP on the VXLAN device
//! (`bridge fdb append 00:00:00:00:00:00 dev shvxN dst PEER`): broadcast and unknown unicast go to
//! every peer by head-end replication, so the underlay needs no multicast. On the host that is a
//! network's NAT gateway, the bridge also holds the subnet's first address, the host forwards,
//! and [`crate::nftables`] masquerades the guests' outbound traffic. Everything is done over
//! (rt/nf)netlink; nothing shells out.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan};
use shoal_model::network::{GUEST_MTU, VXLAN_OVERHEAD};
use shoal_model::Ipv4Subnet;

use crate::{bridge_name, has_net_admin, nftables, vxlan_name, NetDriver, NetError};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

pub struct BridgeDriver {
    handle: Handle,
    underlay: Ipv4Addr,
    underlay_index: u32,
    underlay_mtu: u32,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

impl BridgeDriver {
    /// Opens a netlink connection and finds the interface that holds `underlay`.
    pub async fn open(underlay: Ipv4Addr) -> Result<BridgeDriver, NetError> {
        if !has_net_admin() {
            return Err(NetError::NoNetAdmin);
        }
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let addrs: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses"))?;
        let index = addrs
            .iter()
            .find(|a| {
                a.attributes.iter().any(|at| {
                    matches!(at, AddressAttribute::Address(IpAddr::V4(ip)) | AddressAttribute::Local(IpAddr::V4(ip)) if *ip == underlay)
                })
            })
            .map(|a| a.header.index)
            .ok_or(NetError::UnderlayNotLocal(underlay))?;
        let d = BridgeDriver {
            handle,
            underlay,
            underlay_index: index,
            underlay_mtu: 1500,
        };
        let mtu = d
            .link_by_index(index)
            .await?
            .and_then(|m| {
                m.attributes
                    .iter()
                    .find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None })
            })
            .unwrap_or(1500);
        Ok(BridgeDriver { underlay_mtu: mtu, ..d })
    }

    async fn link_by_index(&self, index: u32) -> Result<Option<netlink_packet_route::link::LinkMessage>, NetError> {
        match self.handle.link().get().match_index(index).execute().try_next().await {
            Ok(m) => Ok(m),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
            Err(e) => Err(nl(format!("reading link {index}"))(e)),
        }
    }

    /// The index of link `name`, if it exists.
    pub async fn index_of(&self, name: &str) -> Result<Option<u32>, NetError> {
        match self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
        {
            Ok(m) => Ok(m.map(|m| m.header.index)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
            Err(e) => Err(nl(format!("reading link {name}"))(e)),
        }
    }

    async fn up(&self, index: u32, controller: Option<u32>, what: &str) -> Result<(), NetError> {
        let mut m = LinkUnspec::new_with_index(index).up();
        if let Some(c) = controller {
            m = m.controller(c);
        }
        self.handle.link().set(m.build()).execute().await.map_err(nl(what))
    }

    /// The FDB entries of a VXLAN device that send to a remote VTEP: (MAC, destination). The
    /// all-zeros MAC is a programmed peer; others were learned from traffic.
    async fn fdb_entries(&self, vx: u32) -> Result<Vec<([u8; 6], Ipv4Addr)>, NetError> {
        let entries: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing FDB entries"))?;
        Ok(entries
            .iter()
            .filter(|m| m.header.ifindex == vx)
            .filter_map(|m| {
                let mac = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
                    _ => None,
                })?;
                let dst = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                    // In a bridge-family message the parser does not know NDA_DST's family: it
                    // comes as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    _ => None,
                })?;
                Some((mac, dst))
            })
            .collect())
    }

    fn fdb_message(vx: u32, peer: Ipv4Addr) -> NeighbourMessage {
        Self::fdb_message_for(vx, [0; 6], peer)
    }

    fn fdb_message_for(vx: u32, mac: [u8; 6], peer: Ipv4Addr) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = vx;
        m.header.state = netlink_packet_route::neighbour::NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(peer)));
        m
    }

    async fn fdb_append(&self, vx: u32, peer: Ipv4Addr) -> Result<(), NetError> {
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(Self::fdb_message(vx, peer)));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        let mut handle = self.handle.clone();
        let mut resp = handle
            .request(req)
            .map_err(nl(format!("adding FDB entry for {peer}")))?;
        while let Some(msg) = futures::StreamExt::next(&mut resp).await {
            if let NetlinkPayload::Error(e) = msg.payload {
                if e.code.is_some() {
                    return Err(nl(format!("adding FDB entry for {peer}"))(
                        rtnetlink::Error::NetlinkError(e),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The IPv4 addresses on link `index`, with their prefix lengths.
    async fn addresses_of(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("listing the addresses of link {index}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
                        Some((*ip, m.header.prefix_len))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// Takes `subnet`'s gateway address on network `vni`'s bridge, forwards, and installs the
    /// masquerade; `remove_gateway` undoes all but the forwarding.
    async fn add_gateway(&self, vni: u32, subnet: Ipv4Subnet) -> Result<(), NetError> {
        let br = bridge_name(vni);
        let index = self
            .index_of(&br)
            .await?
            .ok_or_else(|| NetError::TapMissing(br.clone()))?;
        let gw = subnet.gateway();
        let have = self.addresses_of(index).await?;
        for (ip, prefix) in have.iter().filter(|a| **a != (gw, subnet.prefix())) {
            self.del_address(index, *ip, *prefix).await?;
        }
        if !have.contains(&(gw, subnet.prefix())) {
            self.handle
                .address()
                .add(index, IpAddr::V4(gw), subnet.prefix())
                .execute()
                .await
                .map_err(nl(format!("adding {gw}/{} to {br}", subnet.prefix())))?;
        }
        // Forwarding is the host's (its network namespace's) setting; it stays on afterwards,
        // as other gateways on the host may rely on it.
        let fwd = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(fwd).map(|s| s.trim() != "1").unwrap_or(true) {
            std::fs::write(fwd, "1").map_err(|source| NetError::Gateway { vni, source })?;
        }
        nft(vni, move || nftables::install_gateway(vni, subnet)).await
    }

    async fn remove_gateway(&self, vni: u32) -> Result<(), NetError> {
        nft(vni, move || nftables::remove_gateway(vni)).await?;
        if let Some(index) = self.index_of(&bridge_name(vni)).await? {
            for (ip, prefix) in self.addresses_of(index).await? {
                self.del_address(index, ip, prefix).await?;
            }
        }
        Ok(())
    }

    async fn del_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let mut m = netlink_packet_route::address::AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.index = index;
        m.header.prefix_len = prefix;
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
        m.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
        match self.handle.address().del(m).execute().await {
            Ok(()) => Ok(()),
            // EADDRNOTAVAIL: gone already.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -99 => Ok(()),
            Err(e) => Err(nl(format!("removing {ip}/{prefix} from link {index}"))(e)),
        }
    }
}

/// Runs a (blocking) nf_tables exchange for network `vni`'s gateway off the async threads.
async fn nft(vni: u32, f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> Result<(), NetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| NetError::Gateway { vni, source })
}

/// ENODEV: what the kernel answers for a link that does not exist.
fn libc_enodev() -> i32 {
    19
}

#[async_trait]
impl NetDriver for BridgeDriver {
    fn name(&self) -> &'static str {
        "bridge"
    }

    fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay
    }

    fn guest_mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(VXLAN_OVERHEAD).min(GUEST_MTU)
    }

    async fn create(&self, vni: u32) -> Result<(), NetError> {
        let (br, vx) = (bridge_name(vni), vxlan_name(vni));
        let br_index = match self.index_of(&br).await? {
            Some(i) => i,
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(&br).mtu(self.guest_mtu()).build())
                    .execute()
                    .await
                    .map_err(nl(format!("creating bridge {br}")))?;
                self.index_of(&br)
                    .await?
                    .ok_or_else(|| NetError::TapMissing(br.clone()))?
            }
        };
        self.up(br_index, None, &format!("bringing {br} up")).await?;
        let vx_index = match self.index_of(&vx).await? {
            Some(i) => i,
            None => {
                let msg = LinkVxlan::new(&vx, vni)
                    .dev(self.underlay_index)
                    .local(self.underlay)
                    .port(VXLAN_PORT)
                    .learning(true)
                    .mtu(self.guest_mtu())
                    .build();
                self.handle
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("creating VXLAN device {vx} (VNI {vni})")))?;
                self.index_of(&vx)
                    .await?
                    .ok_or_else(|| NetError::TapMissing(vx.clone()))?
            }
        };
        self.up(vx_index, Some(br_index), &format!("attaching {vx} to {br}"))
            .await
    }

    async fn set_peers(&self, vni: u32, peers: &[Ipv4Addr]) -> Result<(), NetError> {
        let vx = vxlan_name(vni);
        let Some(vx_index) = self.index_of(&vx).await? else {
            return Ok(());
        };
        let entries = self.fdb_entries(vx_index).await?;
        let have: Vec<Ipv4Addr> = entries.iter().filter(|(m, _)| *m == [0; 6]).map(|(_, d)| *d).collect();
        // A host that left: its flood entry and what was learned behind it go.
        for (mac, old) in entries.iter().filter(|(_, d)| !peers.contains(d)) {
            match self
                .handle
                .neighbours()
                .del(Self::fdb_message_for(vx_index, *mac, *old))
                .execute()
                .await
            {
                Ok(()) => {}
                // A learned entry may age out meanwhile.
                Err(rtnetlink::Error::NetlinkError(e)) if *mac != [0; 6] && e.raw_code() == -2 => {}
                Err(e) => return Err(nl(format!("removing FDB entry for {old} from {vx}"))(e)),
            }
        }
        for new in peers.iter().filter(|p| !have.contains(p)) {
            self.fdb_append(vx_index, *new).await?;
        }
        Ok(())
    }

    async fn attach(&self, vni: u32, tap: &str) -> Result<(), NetError> {
        let br = bridge_name(vni);
        let br_index = self
            .index_of(&br)
            .await?
            .ok_or_else(|| NetError::TapMissing(br.clone()))?;
        // QEMU makes the tap while it starts; give it a few seconds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let tap_index = loop {
            if let Some(i) = self.index_of(tap).await? {
                break i;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(NetError::TapMissing(tap.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(tap_index).mtu(self.guest_mtu()).build())
            .execute()
            .await
            .map_err(nl(format!("setting the MTU of {tap}")))?;
        self.up(tap_index, Some(br_index), &format!("attaching {tap} to {br}"))
            .await
    }

    async fn set_gateway(&self, vni: u32, subnet: Option<Ipv4Subnet>) -> Result<(), NetError> {
        match subnet {
            Some(s) => {
                let r = self.add_gateway(vni, s).await;
                if r.is_err() {
                    // Nothing half-made stays behind.
                    let _ = self.remove_gateway(vni).await;
                }
                r
            }
            None => self.remove_gateway(vni).await,
        }
    }

    async fn destroy(&self, vni: u32) -> Result<(), NetError> {
        // A gateway table that cannot be removed (or looked up: a kernel without nf_tables never
        // had one) must not keep the network's devices alive.
        if let Err(e) = self.remove_gateway(vni).await {
            tracing::warn!(vni, "removing the network's gateway: {e}");
        }
        for name in [vxlan_name(vni), bridge_name(vni)] {
            if let Some(i) = self.index_of(&name).await? {
                match self.handle.link().del(i).execute().await {
                    Ok(()) => {}
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => {}
                    Err(e) => return Err(nl(format!("deleting {name}"))(e)),
                }
            }
        }
        Ok(())
    }
}
