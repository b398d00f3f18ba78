//! Scores: how good a host that passed every filter is for one more VM. Each term is normalised
//! to 0..=1 (higher is better) and weighted by the request's [`Weights`].

use serde::{Deserialize, Serialize};
use shoal_model::Placement;
use utoipa::ToSchema;

use crate::filter::Weights;
use crate::snapshot::HostState;

/// One host's score for one VM, term by term, and the weighted total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScoreBreakdown {
    /// Pack: 0.5 plus half the host's utilisation after the VM lands for a host in use, half
    /// its size relative to the largest host for an empty one; spread: the share left free.
    pub fit: f64,
    /// How evenly the free vCPU and memory shares remain: lopsided leftovers (cores without
    /// memory, or the reverse) strand capacity that no large VM can use.
    pub fragmentation: f64,
    /// Share of the template's bytes already cached on the host.
    pub locality: f64,
    /// Soft affinity and anti-affinity to the cluster's other VMs (1 when neither is asked).
    pub affinity: f64,
    /// 1 for a host that is on, 0 for one that would have to be powered on.
    pub power: f64,
    pub total: f64,
}

/// What scoring needs to know about one host for one VM.
pub(crate) struct Facts {
    pub cap: [u64; 3],
    /// The host's capacity relative to the largest host's (0..=1).
    pub size: f64,
    pub free: [i64; 3],
    pub need: [u64; 3],
    pub state: HostState,
    pub locality: f64,
    pub affinity: f64,
}

/// Mean share of the host's capacity that is free, over the resources it has: the key the
/// spread index orders hosts by.
pub(crate) fn free_share(cap: [u64; 3], free: [i64; 3]) -> f64 {
    let (mut sum, mut n) = (0.0, 0u32);
    for r in 0..3 {
        if cap[r] > 0 {
            sum += free[r] as f64 / cap[r] as f64;
            n += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

pub(crate) fn score(mode: Placement, w: &Weights, f: &Facts) -> ScoreBreakdown {
    let after = [
        f.free[0] - f.need[0] as i64,
        f.free[1] - f.need[1] as i64,
        f.free[2] - f.need[2] as i64,
    ];
    let left = free_share(f.cap, after).clamp(0.0, 1.0);
    let empty = (0..3).all(|r| f.free[r] >= f.cap[r] as i64);
    let fit = match mode {
        // Any host in use beats every empty one; among empty hosts the largest wins, since
        // opening a small host for a VM that a large one would also take wastes hosts.
        Placement::Pack if empty => 0.5 * f.size,
        Placement::Pack => 0.5 + 0.5 * (1.0 - left),
        Placement::Spread => left,
    };
    let share = |r: usize| {
        if f.cap[r] == 0 {
            0.0
        } else {
            (after[r] as f64 / f.cap[r] as f64).clamp(0.0, 1.0)
        }
    };
    let fragmentation = 1.0 - (share(0) - share(1)).abs();
    let power = match f.state {
        HostState::PoweredOff => 0.0,
        _ => 1.0,
    };
    let total = w.fit * fit
        + w.fragmentation * fragmentation
        + w.locality * f.locality
        + w.affinity * f.affinity
        + w.power * power;
    ScoreBreakdown {
        fit,
        fragmentation,
        locality: f.locality,
        affinity: f.affinity,
        power,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(free: [i64; 3]) -> Facts {
        Facts {
            cap: [16, 16384, 0],
            size: 1.0,
            free,
            need: [2, 2048, 0],
            state: HostState::Up,
            locality: 0.0,
            affinity: 1.0,
        }
    }

    #[test]
    fn pack_prefers_the_fuller_host_and_spread_the_emptier() {
        let w = Weights::default();
        let full = facts([4, 4096, 0]);
        let empty = facts([16, 16384, 0]);
        assert!(score(Placement::Pack, &w, &full).total > score(Placement::Pack, &w, &empty).total);
        assert!(score(Placement::Spread, &w, &full).total < score(Placement::Spread, &w, &empty).total);
        // 2 of 16 vCPU and 2048 of 16384 MiB are left after the VM: an eighth free.
        let s = score(Placement::Pack, &w, &full);
        assert!((s.fit - (0.5 + 0.5 * (1.0 - 0.125))).abs() < 1e-9, "{s:?}");
        // An empty host scores by its size, below any host in use.
        let mut small = facts([16, 16384, 0]);
        small.size = 0.25;
        assert_eq!(score(Placement::Pack, &w, &small).fit, 0.125);
        assert_eq!(score(Placement::Pack, &w, &empty).fit, 0.5);
    }

    #[test]
    fn lopsided_leftovers_score_worse_on_fragmentation() {
        let w = Weights::default();
        let even = score(Placement::Pack, &w, &facts([8, 8192, 0]));
        let lopsided = score(Placement::Pack, &w, &facts([14, 4096, 0]));
        assert_eq!(even.fragmentation, 1.0);
        assert!(lopsided.fragmentation < 0.5, "{lopsided:?}");
    }

    #[test]
    fn powered_off_hosts_score_lower_on_power() {
        let w = Weights::default();
        let mut f = facts([16, 16384, 0]);
        assert_eq!(score(Placement::Pack, &w, &f).power, 1.0);
        f.state = HostState::PoweredOff;
        assert_eq!(score(Placement::Pack, &w, &f).power, 0.0);
    }
}
