//! Address management: a subnet per virtual cluster cut from the pool, a guest address per VM
//! (index `i` gets the subnet's `i`-th guest address), a MAC per VM. Allocations are keys in the
//! store, created with "must not exist" in the same transaction as the VMs that hold them.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use rand::Rng;
use shoal_model::{Ipv4Subnet, MacAddr};

use crate::error::{ApiError, ApiResult};
use crate::ControllerConfig;

/// The first free subnet of the pool big enough for `size` guests, never smaller than the
/// configured prefix allows.
pub fn allocate_subnet(config: &ControllerConfig, size: u32, taken: &[Ipv4Subnet]) -> ApiResult<Ipv4Subnet> {
    let pool = config.subnet_pool;
    let mut prefix = config.subnet_prefix.max(pool.prefix());
    while prefix > pool.prefix() && pool.child(prefix, 0).map(|s| s.guest_capacity()).unwrap_or(0) < size as u64 {
        prefix -= 1;
    }
    let first = pool
        .child(prefix, 0)
        .ok_or_else(|| ApiError::Invalid(format!("subnet pool {pool} cannot hold /{prefix} subnets")))?;
    if first.guest_capacity() < size as u64 {
        return Err(ApiError::Capacity(format!(
            "a cluster of {} needs more addresses than the whole subnet pool {pool} has ({})",
            shoal_model::plural(size, "VM"),
            pool.guest_capacity()
        )));
    }
    let count = 1u64 << (prefix - pool.prefix());
    (0..count)
        .filter_map(|i| pool.child(prefix, i))
        .find(|s| !taken.iter().any(|t| t.overlaps(s)))
        .ok_or_else(|| {
            ApiError::Capacity(format!(
                "subnet pool {pool} has no free /{prefix} left ({} allocated)",
                shoal_model::plural(taken.len(), "subnet")
            ))
        })
}

/// A guest address for each VM index: the index-th address of the subnet when free, else the
/// lowest free one (clusters sharing a network share its subnet). `None` when they do not fit.
pub fn allocate_ips(subnet: &Ipv4Subnet, indices: &[u32], taken: &HashSet<Ipv4Addr>) -> Option<Vec<Ipv4Addr>> {
    let mut used: HashSet<Ipv4Addr> = taken.clone();
    let preferred: Vec<Option<Ipv4Addr>> = indices
        .iter()
        .map(|&i| subnet.guest_address(i as u64).filter(|ip| !taken.contains(ip)))
        .collect();
    used.extend(preferred.iter().flatten());
    let mut next = 0u64;
    let mut out = Vec::with_capacity(indices.len());
    for p in preferred {
        match p {
            Some(ip) => out.push(ip),
            None => loop {
                let ip = subnet.guest_address(next)?;
                next += 1;
                if used.insert(ip) {
                    out.push(ip);
                    break;
                }
            },
        }
    }
    Some(out)
}

/// `n` MACs not in `taken`, under QEMU's prefix.
pub fn allocate_macs(n: usize, taken: &HashSet<MacAddr>) -> Vec<MacAddr> {
    let mut rng = rand::thread_rng();
    let mut fresh = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mac = MacAddr::qemu(rng.gen::<u32>() & 0x00ff_ffff);
        if !taken.contains(&mac) && fresh.insert(mac) {
            out.push(mac);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ControllerConfig {
        ControllerConfig::new("127.0.0.1:0".parse().unwrap(), "/nonexistent".into())
    }

    #[test]
    fn small_clusters_get_a_24_large_ones_a_bigger_block() {
        let c = cfg();
        let a = allocate_subnet(&c, 3, &[]).unwrap();
        assert_eq!(a.to_string(), "10.200.0.0/24");
        let b = allocate_subnet(&c, 252, &[a]).unwrap();
        assert_eq!(b.to_string(), "10.200.1.0/24");
        let big = allocate_subnet(&c, 1000, &[a, b]).unwrap();
        assert_eq!(big.to_string(), "10.200.4.0/22");
        let next = allocate_subnet(&c, 1, &[a, b, big]).unwrap();
        assert_eq!(next.to_string(), "10.200.2.0/24");
    }

    #[test]
    fn exhausted_pool_is_an_error_naming_it() {
        let mut c = cfg();
        c.subnet_pool = "10.9.0.0/23".parse().unwrap();
        let a = allocate_subnet(&c, 1, &[]).unwrap();
        let b = allocate_subnet(&c, 1, &[a]).unwrap();
        let e = allocate_subnet(&c, 1, &[a, b]).unwrap_err();
        assert!(e.to_string().contains("10.9.0.0/23"), "{e}");
        let e = allocate_subnet(&c, 600, &[]).unwrap_err();
        assert!(e.to_string().contains("600 VMs"), "{e}");
    }

    #[test]
    fn ips_prefer_the_index_address_and_fill_holes_when_shared() {
        let s: Ipv4Subnet = "10.1.0.0/29".parse().unwrap();
        let ip = |x: &str| x.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            allocate_ips(&s, &[0, 1], &HashSet::new()).unwrap(),
            vec![ip("10.1.0.2"), ip("10.1.0.3")]
        );
        let taken: HashSet<_> = [ip("10.1.0.2"), ip("10.1.0.3")].into();
        assert_eq!(
            allocate_ips(&s, &[0, 2], &taken).unwrap(),
            vec![ip("10.1.0.5"), ip("10.1.0.4")]
        );
        // /29: five guest addresses.
        assert!(allocate_ips(&s, &[0, 1, 2, 3], &taken).is_none());
    }

    #[test]
    fn macs_are_unique() {
        let taken: HashSet<_> = (0..1000).map(MacAddr::qemu).collect();
        let macs = allocate_macs(5000, &taken);
        let set: HashSet<_> = macs.iter().collect();
        assert_eq!(set.len(), 5000);
        assert!(macs.iter().all(|m| !taken.contains(m)));
    }
}
