//! The unprivileged driver: for agents that may not create links. Each VM's QEMU talks to the
//! agent over a loopback UDP socket (`-netdev socket,udp=…,localaddr=…`), and the agent switches
//! its frames in user space: a learning switch per network, whose remote ports are the other
//! hosts, reached over UDP on the underlay with a 4-byte VNI in front of each frame. Flooded
//! frames from a local VM go to every peer (head-end replication, as with VXLAN); frames from a
//! peer are never sent to another peer. No device is made on the host, so nothing needs
//! CAP_NET_ADMIN; throughput is the agent's to carry.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{NetDriver, NetError};

/// Where agents of the UDP driver listen for each other's frames.
pub const UDP_PORT: u16 = 4790;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Port {
    Local(SocketAddr),
    Remote(Ipv4Addr),
}

struct Net {
    vni: u32,
    /// The switch's end for this network's VMs, on loopback.
    local: Arc<UdpSocket>,
    /// VM → the loopback address its QEMU sends from and listens on.
    vms: Mutex<HashMap<Uuid, SocketAddr>>,
    peers: Mutex<Vec<Ipv4Addr>>,
    fdb: Mutex<HashMap<[u8; 6], Port>>,
    task: JoinHandle<()>,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct UdpDriver {
    underlay: Ipv4Addr,
    port: u16,
    remote: Arc<UdpSocket>,
    nets: Arc<Mutex<HashMap<u32, Arc<Net>>>>,
    task: JoinHandle<()>,
}

impl Drop for UdpDriver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mac(frame: &[u8], at: usize) -> Option<[u8; 6]> {
    frame.get(at..at + 6)?.try_into().ok()
}

impl UdpDriver {
    /// Binds the underlay socket (`underlay:port`); fails when the address is not the host's.
    pub async fn open(underlay: Ipv4Addr, port: u16) -> Result<UdpDriver, NetError> {
        let remote = UdpSocket::bind((underlay, port)).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                NetError::UnderlayNotLocal(underlay)
            } else {
                NetError::Io(e)
            }
        })?;
        let remote = Arc::new(remote);
        let nets: Arc<Mutex<HashMap<u32, Arc<Net>>>> = Default::default();
        let (sock, table) = (remote.clone(), nets.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let SocketAddr::V4(from) = from else { continue };
                if n < 4 + 14 {
                    continue;
                }
                let vni = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let net = table.lock().expect("nets").get(&vni).cloned();
                if let Some(net) = net {
                    net.switch_remote(*from.ip(), &buf[4..n]).await;
                }
            }
        });
        Ok(UdpDriver {
            underlay,
            port,
            remote,
            nets,
            task,
        })
    }

    fn net(&self, vni: u32) -> Option<Arc<Net>> {
        self.nets.lock().expect("nets").get(&vni).cloned()
    }

    /// Reserves a loopback port for a VM's QEMU and returns QEMU's `-netdev` for it.
    pub fn netdev_for(&self, vni: u32, uuid: Uuid) -> Result<String, NetError> {
        let net = self
            .net(vni)
            .ok_or_else(|| NetError::TapMissing(format!("network {vni}")))?;
        // QEMU binds this port itself; the probe socket only picks a free one.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let vm = probe.local_addr()?;
        drop(probe);
        let switch = net.local.local_addr()?;
        net.vms.lock().expect("vms").insert(uuid, vm);
        Ok(format!("socket,id=net0,udp={switch},localaddr={vm}"))
    }

    pub fn forget_vm(&self, vni: u32, uuid: Uuid) {
        if let Some(net) = self.net(vni) {
            let gone = net.vms.lock().expect("vms").remove(&uuid);
            if let Some(addr) = gone {
                net.fdb.lock().expect("fdb").retain(|_, p| *p != Port::Local(addr));
            }
        }
    }
}

impl Net {
    async fn send_remote(&self, remote: &UdpSocket, port: u16, peer: Ipv4Addr, frame: &[u8]) {
        let mut pkt = Vec::with_capacity(frame.len() + 4);
        pkt.extend_from_slice(&self.vni.to_be_bytes());
        pkt.extend_from_slice(frame);
        let _ = remote.send_to(&pkt, (peer, port)).await;
    }

    async fn switch_local(&self, remote: &UdpSocket, port: u16, from: SocketAddr, frame: &[u8]) {
        let (Some(dst), Some(src)) = (mac(frame, 0), mac(frame, 6)) else {
            return;
        };
        if !self.vms.lock().expect("vms").values().any(|a| *a == from) {
            return;
        }
        let known = {
            let mut fdb = self.fdb.lock().expect("fdb");
            fdb.insert(src, Port::Local(from));
            fdb.get(&dst).copied()
        };
        match known {
            Some(Port::Local(a)) => {
                let _ = self.local.send_to(frame, a).await;
            }
            Some(Port::Remote(ip)) => self.send_remote(remote, port, ip, frame).await,
            None => {
                let locals: Vec<SocketAddr> = self
                    .vms
                    .lock()
                    .expect("vms")
                    .values()
                    .copied()
                    .filter(|a| *a != from)
                    .collect();
                for a in locals {
                    let _ = self.local.send_to(frame, a).await;
                }
                let peers = self.peers.lock().expect("peers").clone();
                for p in peers {
                    self.send_remote(remote, port, p, frame).await;
                }
            }
        }
    }

    async fn switch_remote(&self, from: Ipv4Addr, frame: &[u8]) {
        let (Some(dst), Some(src)) = (mac(frame, 0), mac(frame, 6)) else {
            return;
        };
        if !self.peers.lock().expect("peers").contains(&from) {
            return;
        }
        let known = {
            let mut fdb = self.fdb.lock().expect("fdb");
            fdb.insert(src, Port::Remote(from));
            fdb.get(&dst).copied()
        };
        let targets: Vec<SocketAddr> = match known {
            Some(Port::Local(a)) => vec![a],
            Some(Port::Remote(_)) => Vec::new(),
            None => self.vms.lock().expect("vms").values().copied().collect(),
        };
        for a in targets {
            let _ = self.local.send_to(frame, a).await;
        }
    }
}

#[async_trait]
impl NetDriver for UdpDriver {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay
    }

    fn guest_mtu(&self) -> u32 {
        shoal_model::network::GUEST_MTU
    }

    async fn create(&self, vni: u32) -> Result<(), NetError> {
        if self.net(vni).is_some() {
            return Ok(());
        }
        let local = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let net = Arc::new_cyclic(|me: &std::sync::Weak<Net>| {
            let (me, sock, remote, port) = (me.clone(), local.clone(), self.remote.clone(), self.port);
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                        continue;
                    };
                    let Some(net) = me.upgrade() else { return };
                    net.switch_local(&remote, port, from, &buf[..n]).await;
                }
            });
            Net {
                vni,
                local,
                vms: Default::default(),
                peers: Default::default(),
                fdb: Default::default(),
                task,
            }
        });
        self.nets.lock().expect("nets").insert(vni, net);
        Ok(())
    }

    async fn set_peers(&self, vni: u32, peers: &[Ipv4Addr]) -> Result<(), NetError> {
        if let Some(net) = self.net(vni) {
            *net.peers.lock().expect("peers") = peers.to_vec();
            net.fdb.lock().expect("fdb").retain(|_, p| match p {
                Port::Remote(ip) => peers.contains(ip),
                Port::Local(_) => true,
            });
        }
        Ok(())
    }

    async fn attach(&self, _vni: u32, _tap: &str) -> Result<(), NetError> {
        Ok(())
    }

    async fn destroy(&self, vni: u32) -> Result<(), NetError> {
        self.nets.lock().expect("nets").remove(&vni);
        Ok(())
    }

    fn netdev(&self, vni: u32, uuid: Uuid) -> Result<String, NetError> {
        self.netdev_for(vni, uuid)
    }

    fn release_vm(&self, vni: u32, uuid: Uuid) {
        self.forget_vm(vni, uuid)
    }
}
