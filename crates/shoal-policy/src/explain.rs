//! Explanations: for one request, every host's verdict (the filter that rejected it, or its
//! score term by term) and the plan, as data for the API and as a table for the CLI.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::filter::{GangRequest, Reject};
use crate::place::{Assignment, PlacementError};
use crate::score::ScoreBreakdown;

/// One host's verdict for the request's first VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostVerdict {
    pub host: String,
    /// The first filter that rejected the host, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Reject>,
    /// The host's score, when it passed every filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<ScoreBreakdown>,
    /// VMs of the plan that land on this host.
    pub vms: u32,
}

/// Why a plan is what it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Explanation {
    pub request: GangRequest,
    /// Every host's verdict; empty when explanations were not asked for.
    pub hosts: Vec<HostVerdict>,
    /// Where each VM goes; empty when the gang does not fit.
    pub plan: Vec<Assignment>,
    /// The binding constraint, when the gang does not fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Explanation {
    pub(crate) fn new(
        request: GangRequest,
        hosts: Vec<HostVerdict>,
        plan: Result<Vec<Assignment>, PlacementError>,
    ) -> Explanation {
        let (plan, error) = match plan {
            Ok(p) => (p, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        Explanation {
            request,
            hosts,
            plan,
            error,
        }
    }

    /// The explanation as text: a line per host, then the plan.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let r = &self.request;
        let _ = writeln!(
            s,
            "placing {} VMs of {} vCPU, {} MiB{} for cluster {:?} ({:?})",
            r.count,
            r.cpus,
            r.memory_mib,
            if r.disk_mib > 0 {
                format!(", {} MiB disk", r.disk_mib)
            } else {
                String::new()
            },
            r.cluster,
            r.placement
        );
        let w = self.hosts.iter().map(|h| h.host.len()).max().unwrap_or(4).max(4);
        let _ = writeln!(
            s,
            "{:<w$}  {:>4}  {:>6}  {:>5}  {:>5}  {:>5}  {:>5}  {:>5}  VERDICT",
            "HOST", "VMS", "SCORE", "FIT", "FRAG", "LOCAL", "AFF", "POWER"
        );
        for h in &self.hosts {
            match (&h.rejected, &h.score) {
                (Some(rej), _) => {
                    let _ = writeln!(
                        s,
                        "{:<w$}  {:>4}  {:>6}  {:>5}  {:>5}  {:>5}  {:>5}  {:>5}  rejected by {rej}",
                        h.host, h.vms, "-", "-", "-", "-", "-", "-"
                    );
                }
                (None, Some(sc)) => {
                    let _ = writeln!(
                        s,
                        "{:<w$}  {:>4}  {:>6.3}  {:>5.2}  {:>5.2}  {:>5.2}  {:>5.2}  {:>5.2}  {}",
                        h.host,
                        h.vms,
                        sc.total,
                        sc.fit,
                        sc.fragmentation,
                        sc.locality,
                        sc.affinity,
                        sc.power,
                        if h.vms > 0 { "chosen" } else { "eligible" }
                    );
                }
                (None, None) => {
                    let _ = writeln!(s, "{:<w$}  {:>4}  not scored", h.host, h.vms);
                }
            }
        }
        match &self.error {
            None => {
                let _ = writeln!(s, "plan: {} VMs", self.plan.len());
                for a in &self.plan {
                    let _ = writeln!(s, "  vm {:>3} -> {} (score {:.3})", a.vm, a.host, a.score.total);
                }
            }
            Some(e) => {
                let _ = writeln!(s, "no plan: {e}");
            }
        }
        s
    }
}
