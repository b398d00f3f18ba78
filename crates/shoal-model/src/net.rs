//! IPv4 subnets and MAC addresses, as IPAM hands them out.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetError {
    #[error("invalid subnet {0:?}: expected an IPv4 CIDR such as 10.200.0.0/16")]
    BadSubnet(String),
    #[error("subnet {0} has host bits set (did you mean {1}?)")]
    HostBitsSet(String, String),
    #[error("invalid MAC address {0:?}")]
    BadMac(String),
}

/// An IPv4 network in CIDR form, always normalised (no host bits set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Subnet {
    base: u32,
    prefix: u8,
}

impl Ipv4Subnet {
    /// The subnet of prefix length `prefix` that holds `addr`.
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        if prefix > 32 {
            return Err(NetError::BadSubnet(format!("{addr}/{prefix}")));
        }
        Self::new(Ipv4Addr::from(u32::from(addr) & Self::mask_of(prefix)), prefix)
    }

    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        let s = format!("{addr}/{prefix}");
        if prefix > 32 {
            return Err(NetError::BadSubnet(s));
        }
        let base = u32::from(addr);
        let net = base & Self::mask_of(prefix);
        if net != base {
            return Err(NetError::HostBitsSet(s, format!("{}/{prefix}", Ipv4Addr::from(net))));
        }
        Ok(Ipv4Subnet { base, prefix })
    }

    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == self.base
    }

    pub fn overlaps(&self, other: &Ipv4Subnet) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The gateway address: the first usable address, kept for the network's router.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// The resolver address: the last before broadcast, kept for the DNS forwarder QEMU's
    /// user-mode network offers guests (it must differ from the gateway).
    pub fn resolver(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + (self.size().saturating_sub(2) as u32))
    }

    /// How many guest addresses the subnet offers: all but network, gateway, resolver and
    /// broadcast.
    pub fn guest_capacity(&self) -> u64 {
        self.size().saturating_sub(4)
    }

    /// The `n`-th guest address (0-based), after the gateway.
    pub fn guest_address(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.guest_capacity()).then(|| Ipv4Addr::from(self.base + 2 + n as u32))
    }

    /// Index of a guest address within the subnet, inverse of [`Self::guest_address`].
    pub fn guest_index(&self, ip: Ipv4Addr) -> Option<u64> {
        let off = u32::from(ip).checked_sub(self.base)? as u64;
        (self.contains(ip) && off >= 2 && off - 2 < self.guest_capacity()).then_some(off - 2)
    }

    /// The `i`-th child subnet of the given (longer) prefix.
    pub fn child(&self, prefix: u8, i: u64) -> Option<Ipv4Subnet> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let count = 1u64 << (prefix - self.prefix);
        (i < count).then(|| Ipv4Subnet {
            base: self.base + (i << (32 - prefix)) as u32,
            prefix,
        })
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::BadSubnet(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Ipv4Subnet::new(addr, prefix)
    }
}

impl Serialize for Ipv4Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A MAC address. Shoal assigns locally administered unicast addresses under QEMU's 52:54:00 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A MAC under 52:54:00 whose last three bytes are `suffix`'s low 24 bits.
    pub fn qemu(suffix: u32) -> MacAddr {
        let b = suffix.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, b[1], b[2], b[3]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(|| NetError::BadMac(s.into()))?;
            if p.len() != 2 {
                return Err(NetError::BadMac(s.into()));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| NetError::BadMac(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(NetError::BadMac(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parse_and_children() {
        let pool: Ipv4Subnet = "10.200.0.0/16".parse().unwrap();
        assert_eq!(pool.child(24, 3).unwrap().to_string(), "10.200.3.0/24");
        assert_eq!(pool.child(24, 256), None);
        assert_eq!(pool.child(22, 1).unwrap().to_string(), "10.200.4.0/22");
        let s = pool.child(24, 0).unwrap();
        assert_eq!(s.gateway().to_string(), "10.200.0.1");
        assert_eq!(s.guest_address(0).unwrap().to_string(), "10.200.0.2");
        assert_eq!(s.guest_address(251).unwrap().to_string(), "10.200.0.253");
        assert_eq!(s.guest_address(252), None);
        assert_eq!(s.resolver().to_string(), "10.200.0.254");
        assert_eq!(s.guest_index("10.200.0.7".parse().unwrap()), Some(5));
        assert_eq!(s.guest_index("10.200.1.7".parse().unwrap()), None);
        assert!(pool.overlaps(&s) && s.overlaps(&pool));
        assert!(!s.overlaps(&pool.child(24, 1).unwrap()));
    }

    #[test]
    fn subnet_errors_name_the_value() {
        assert!(matches!(
            "10.200.0.1/16".parse::<Ipv4Subnet>(),
            Err(NetError::HostBitsSet(..))
        ));
        assert!(matches!("10.200.0.0".parse::<Ipv4Subnet>(), Err(NetError::BadSubnet(s)) if s == "10.200.0.0"));
        assert!("10.200.0.0/33".parse::<Ipv4Subnet>().is_err());
    }

    #[test]
    fn mac_round_trip() {
        let m = MacAddr::qemu(0x00abcdef);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!("52:54:00:ab:cd:ef".parse::<MacAddr>().unwrap(), m);
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:ef:00".parse::<MacAddr>().is_err());
    }
}
