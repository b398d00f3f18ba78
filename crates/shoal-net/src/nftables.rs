//! Just enough nf_tables, spoken over raw nfnetlink, for a network's gateway: one table per
//! network (`shoal_gw_<VNI>`) holding a masquerade for the subnet's outbound traffic and the
//! filter that keeps everything else out. A table is replaced in one atomic batch (add, delete,
//! add again: the idiom `nft -f` uses), so a host never runs half a rule set, and removed with
//! add-then-delete, which succeeds whether or not it existed.
//!
//! The rules, as `nft list table ip shoal_gw_<VNI>` prints them:
//!
//! ```text
//! chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr SUBNET oifname != "shbrVNI" masquerade }
//! chain forward { type filter hook forward priority filter; policy accept;
//!     iifname "shbrVNI" oifname "shbrVNI" accept
//!     oifname "shbrVNI" ct state established,related accept
//!     oifname "shbrVNI" drop }
//! chain input { type filter hook input priority filter; policy accept;
//!     iifname "shbrVNI" ct state established,related accept
//!     iifname "shbrVNI" ip protocol icmp accept
//!     iifname "shbrVNI" drop }
//! ```
//!
//! Guests start connections out (masqueraded to the host's address); nothing starts one in, not
//! from the underlay, not from another virtual network routed on the same host, and the host's
//! own services (the agent among them) answer guests nothing but ping.

use std::io;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use shoal_model::Ipv4Subnet;

use crate::bridge_name;

/// The table of network `vni`'s gateway.
pub fn table_name(vni: u32) -> String {
    format!("shoal_gw_{vni}")
}

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_IPV4: u8 = 2;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// Register 1 (of the classic 16-byte registers) holds every value the rules load; 0 is the verdict.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;

/// One expression of a rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// Load `len` bytes at `offset` of the network header.
    Network {
        offset: u32,
        len: u32,
    },
    /// Load the input (`iif`) or output interface's name.
    IfName {
        input: bool,
    },
    /// Load the packet's conntrack state bits.
    CtState,
    /// `reg & mask` (xor 0), over `mask.len()` bytes.
    And(Vec<u8>),
    /// Compare the register with `data` (over `data.len()` bytes).
    Cmp {
        eq: bool,
        data: Vec<u8>,
    },
    Verdict(u32),
    Masquerade,
}

/// An interface name as nf_tables compares it: IFNAMSIZ bytes, zero-padded.
fn ifname(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.resize(16, 0);
    b
}

fn iface_is(input: bool, name: &str, eq: bool) -> [Expr; 2] {
    [Expr::IfName { input }, Expr::Cmp { eq, data: ifname(name) }]
}

/// `ct state established,related` (the kernel's state bits: ESTABLISHED 2, RELATED 4).
fn established() -> [Expr; 3] {
    [
        Expr::CtState,
        Expr::And(6u32.to_ne_bytes().to_vec()),
        Expr::Cmp {
            eq: false,
            data: vec![0; 4],
        },
    ]
}

/// A base chain of the gateway's table.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    pub name: &'static str,
    /// The netfilter hook it sits on (`NF_INET_*`).
    pub hook: u32,
    pub priority: i32,
    /// `nat` or `filter`.
    pub kind: &'static str,
    pub rules: Vec<Vec<Expr>>,
}

/// The gateway's chains.
pub fn gateway_chains(vni: u32, subnet: Ipv4Subnet) -> Vec<Chain> {
    let br = bridge_name(vni);
    let mask = if subnet.prefix() == 0 {
        0
    } else {
        u32::MAX << (32 - subnet.prefix())
    };
    let saddr = vec![
        Expr::Network { offset: 12, len: 4 },
        Expr::And(mask.to_be_bytes().to_vec()),
        Expr::Cmp {
            eq: true,
            data: subnet.network().octets().to_vec(),
        },
    ];
    let cat = |parts: &[&[Expr]]| parts.iter().flat_map(|p| p.iter().cloned()).collect::<Vec<Expr>>();
    let accept = [Expr::Verdict(NF_ACCEPT)];
    let drop = [Expr::Verdict(NF_DROP)];
    let icmp = [
        Expr::Network { offset: 9, len: 1 },
        Expr::Cmp {
            eq: true,
            data: vec![1],
        },
    ];
    vec![
        Chain {
            name: "postrouting",
            hook: NF_INET_POST_ROUTING,
            priority: 100,
            kind: "nat",
            rules: vec![cat(&[&saddr, &iface_is(false, &br, false), &[Expr::Masquerade]])],
        },
        Chain {
            name: "forward",
            hook: NF_INET_FORWARD,
            priority: 0,
            kind: "filter",
            rules: vec![
                cat(&[&iface_is(true, &br, true), &iface_is(false, &br, true), &accept]),
                cat(&[&iface_is(false, &br, true), &established(), &accept]),
                cat(&[&iface_is(false, &br, true), &drop]),
            ],
        },
        Chain {
            name: "input",
            hook: NF_INET_LOCAL_IN,
            priority: 0,
            kind: "filter",
            rules: vec![
                cat(&[&iface_is(true, &br, true), &established(), &accept]),
                cat(&[&iface_is(true, &br, true), &icmp, &accept]),
                cat(&[&iface_is(true, &br, true), &drop]),
            ],
        },
    ]
}

/// Installs (or replaces) network `vni`'s gateway table, atomically.
pub fn install_gateway(vni: u32, subnet: Ipv4Subnet) -> io::Result<()> {
    let table = table_name(vni);
    let mut b = Batch::new();
    b.table(NFT_MSG_NEWTABLE, &table);
    b.table(NFT_MSG_DELTABLE, &table);
    b.table(NFT_MSG_NEWTABLE, &table);
    for c in gateway_chains(vni, subnet) {
        b.chain(&table, &c);
        for r in &c.rules {
            b.rule(&table, c.name, r);
        }
    }
    b.send()
}

/// Removes network `vni`'s gateway table if there is one. Looking first costs a fraction of a
/// deletion, which waits for the kernel to retire the old rules.
pub fn remove_gateway(vni: u32) -> io::Result<()> {
    let table = table_name(vni);
    if !table_exists(&table)? {
        return Ok(());
    }
    let mut b = Batch::new();
    b.table(NFT_MSG_NEWTABLE, &table);
    b.table(NFT_MSG_DELTABLE, &table);
    b.send()
}

/// Whether table `ip <table>` exists (a kernel without nf_tables has none).
pub fn table_exists(table: &str) -> io::Result<bool> {
    let mut get = Batch::request();
    get.nft(NFT_MSG_GETTABLE, false, format!("reading table ip {table}"), |a| {
        a.str(1, table)
    });
    match get.send() {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        // EPROTONOSUPPORT: no nfnetlink to open a socket to.
        Err(e) if e.raw_os_error() == Some(93) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Netlink attributes, written in place.
struct Attrs<'a>(&'a mut Vec<u8>);

impl Attrs<'_> {
    fn put(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
    fn str(&mut self, ty: u16, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(ty, &b);
    }
    /// nf_tables' 32-bit attributes are big-endian.
    fn u32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }
    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        f(&mut Attrs(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }
    /// NFTA_DATA_VALUE inside attribute `ty`.
    fn value(&mut self, ty: u16, data: &[u8]) {
        self.nest(ty, |a| a.put(1, data));
    }
}

fn expr(a: &mut Attrs, e: &Expr) {
    let name = match e {
        Expr::Network { .. } => "payload",
        Expr::IfName { .. } => "meta",
        Expr::CtState => "ct",
        Expr::And(_) => "bitwise",
        Expr::Cmp { .. } => "cmp",
        Expr::Verdict(_) => "immediate",
        Expr::Masquerade => "masq",
    };
    a.nest(1, |el| {
        el.str(1, name);
        el.nest(2, |d| match e {
            Expr::Network { offset, len } => {
                d.u32(1, REG_1);
                d.u32(2, 1); // NFT_PAYLOAD_NETWORK_HEADER
                d.u32(3, *offset);
                d.u32(4, *len);
            }
            Expr::IfName { input } => {
                d.u32(1, REG_1);
                d.u32(2, if *input { 6 } else { 7 }); // NFT_META_IIFNAME, NFT_META_OIFNAME
            }
            Expr::CtState => {
                d.u32(1, REG_1);
                d.u32(2, 0); // NFT_CT_STATE
            }
            Expr::And(mask) => {
                d.u32(1, REG_1);
                d.u32(2, REG_1);
                d.u32(3, mask.len() as u32);
                d.value(4, mask);
                d.value(5, &vec![0; mask.len()]);
            }
            Expr::Cmp { eq, data } => {
                d.u32(1, REG_1);
                d.u32(2, if *eq { 0 } else { 1 }); // NFT_CMP_EQ, NFT_CMP_NEQ
                d.value(3, data);
            }
            Expr::Verdict(code) => {
                d.u32(1, REG_VERDICT);
                d.nest(2, |data| data.nest(2, |v| v.u32(1, *code)));
            }
            Expr::Masquerade => {}
        });
    });
}

/// One nfnetlink transaction: every message is acknowledged, and the kernel applies all of
/// them or none. Unbatched, it carries a single request (a read).
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Sequence numbers of the messages in between, with what each does (for errors).
    msgs: Vec<(u32, String)>,
    batched: bool,
}

impl Batch {
    fn new() -> Batch {
        let mut b = Batch {
            batched: true,
            ..Batch::request()
        };
        b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, |_| {});
        b
    }

    /// A single request outside a transaction.
    fn request() -> Batch {
        Batch {
            buf: Vec::new(),
            seq: std::process::id().wrapping_mul(1000),
            msgs: Vec::new(),
            batched: false,
        }
    }

    /// Appends one message; `family` and `res_id` make its nfgenmsg.
    fn header(&mut self, ty: u16, flags: u16, family: u8, res_id: u16, f: impl FnOnce(&mut Attrs)) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]); // length, filled in below
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        f(&mut Attrs(&mut self.buf));
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.seq
    }

    fn nft(&mut self, msg: u16, create: bool, what: String, f: impl FnOnce(&mut Attrs)) {
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        let mut flags = NLM_F_REQUEST | NLM_F_ACK;
        if create {
            flags |= NLM_F_CREATE;
        }
        if msg == NFT_MSG_NEWRULE {
            flags |= NLM_F_APPEND;
        }
        let seq = self.header(ty, flags, NFPROTO_IPV4, 0, f);
        self.msgs.push((seq, what));
    }

    fn table(&mut self, msg: u16, table: &str) {
        let verb = if msg == NFT_MSG_DELTABLE { "deleting" } else { "adding" };
        self.nft(msg, msg == NFT_MSG_NEWTABLE, format!("{verb} table ip {table}"), |a| {
            a.str(1, table)
        });
    }

    fn chain(&mut self, table: &str, c: &Chain) {
        self.nft(
            NFT_MSG_NEWCHAIN,
            true,
            format!("adding chain {} to table ip {table}", c.name),
            |a| {
                a.str(1, table);
                a.str(3, c.name);
                a.nest(4, |h| {
                    h.u32(1, c.hook);
                    h.u32(2, c.priority as u32);
                });
                a.u32(5, NF_ACCEPT);
                a.str(7, c.kind);
            },
        );
    }

    fn rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) {
        self.nft(
            NFT_MSG_NEWRULE,
            true,
            format!("adding a rule to chain {chain} of table ip {table}"),
            |a| {
                a.str(1, table);
                a.str(2, chain);
                a.nest(4, |list| {
                    for e in exprs {
                        expr(list, e);
                    }
                });
            },
        );
    }

    /// Sends the batch and waits for every message's answer; the first error wins.
    fn send(mut self) -> io::Result<()> {
        if self.batched {
            self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, |_| {});
        }
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.set_non_blocking(true)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        sock.send_to(&self.buf, &SocketAddr::new(0, 0), 0)?;
        let mut pending: Vec<(u32, String)> = self.msgs;
        let mut first_error: Option<io::Error> = None;
        while !pending.is_empty() {
            let mut buf = vec![0u8; 65536];
            let n = match sock.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                // After a refused batch the kernel may not answer the messages it never ran.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(first_error
                        .unwrap_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "nf_tables did not answer")))
                }
                Err(e) => return Err(e),
            };
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
                if len < 16 || at + len > n {
                    break;
                }
                if ty == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap());
                    if let Some(i) = pending.iter().position(|(s, _)| *s == seq) {
                        let (_, what) = pending.remove(i);
                        if code != 0 && first_error.is_none() {
                            let e = io::Error::from_raw_os_error(-code);
                            first_error = Some(io::Error::new(e.kind(), format!("nf_tables: {what}: {e}")));
                        }
                    }
                }
                at += (len + 3) & !3;
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested_with_their_lengths() {
        let mut buf = Vec::new();
        let mut a = Attrs(&mut buf);
        a.nest(4, |n| n.str(1, "ab"));
        // Nested header (4) + inner header (4) + "ab\0" (3) padded to 4; the inner length
        // leaves the padding out, the nest's counts it.
        assert_eq!(buf.len(), 12);
        assert_eq!(u16::from_ne_bytes([buf[0], buf[1]]), 12);
        assert_eq!(u16::from_ne_bytes([buf[2], buf[3]]), 4 | NLA_F_NESTED);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 7);
        assert_eq!(&buf[8..11], b"ab\0");
    }

    #[test]
    fn the_masquerade_matches_the_subnet_and_not_the_bridge() {
        let chains = gateway_chains(4242, "10.77.8.0/22".parse().unwrap());
        let c = &chains[0];
        assert_eq!(
            (c.name, c.hook, c.priority, c.kind),
            ("postrouting", NF_INET_POST_ROUTING, 100, "nat")
        );
        let rules = &c.rules;
        assert_eq!(rules[0][1], Expr::And(vec![255, 255, 252, 0]));
        assert_eq!(
            rules[0][2],
            Expr::Cmp {
                eq: true,
                data: vec![10, 77, 8, 0]
            }
        );
        assert_eq!(
            rules[0][4],
            Expr::Cmp {
                eq: false,
                data: ifname("shbr4242")
            }
        );
        assert_eq!(rules[0].last(), Some(&Expr::Masquerade));
        // Every filter chain ends by dropping what is left for (or from) the bridge.
        for c in &chains[1..] {
            assert_eq!(c.rules.last().unwrap().last(), Some(&Expr::Verdict(NF_DROP)));
        }
    }
}
