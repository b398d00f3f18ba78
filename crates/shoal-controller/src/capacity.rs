//! The one capacity rule. A host's [`Claim`] is what the VMs placed on it hold; [`ClaimChanges`]
//! adds and releases VMs' claims and writes the result compared on what was read; a
//! [`HostSnapshot`] is the hosts as the policy core sees them (state, capacity with overcommit
//! and reservations, usage from the claims), built in one place and used by deployment, scaling,
//! re-placement, plans, consolidation and resume, so that whether a VM fits is decided by the
//! policy's filters and nowhere else.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use shoal_model::power::PowerState;
use shoal_model::{Cluster, HostState, Vm, VmState};
use shoal_policy::{GangRequest, Placer};

use crate::datastore::{Claims, HostMark, HostRecord, Tx};
use crate::error::ApiResult;
use crate::Controller;

/// Resources claimed on a host by the VMs placed there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub cpus: u32,
    pub memory_mib: u64,
    pub vms: u32,
}

impl Claim {
    /// What one VM holds.
    pub fn of(vm: &Vm) -> Claim {
        Claim {
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            vms: 1,
        }
    }

    pub fn add(&mut self, other: Claim) {
        self.cpus += other.cpus;
        self.memory_mib += other.memory_mib;
        self.vms += other.vms;
    }

    /// Gives `other` back; never below zero (a claim is never negative, even after a repair).
    pub fn release(&mut self, other: Claim) {
        self.cpus = self.cpus.saturating_sub(other.cpus);
        self.memory_mib = self.memory_mib.saturating_sub(other.memory_mib);
        self.vms = self.vms.saturating_sub(other.vms);
    }

    /// As the policy core counts usage: `[vCPU, memory MiB, disk MiB]`.
    pub fn usage(&self) -> [u64; 3] {
        [self.cpus as u64, self.memory_mib, 0]
    }
}

/// Claims taken and given back per host, written as one part of a transaction.
#[derive(Clone, Debug, Default)]
pub struct ClaimChanges {
    by_host: BTreeMap<String, (Claim, Claim)>,
}

impl ClaimChanges {
    pub fn take(&mut self, host: &str, c: Claim) {
        self.by_host.entry(host.to_string()).or_default().0.add(c);
    }
    pub fn give_back(&mut self, host: &str, c: Claim) {
        self.by_host.entry(host.to_string()).or_default().1.add(c);
    }
    /// Each changed host's new claim, from the claims as read.
    pub fn applied(&self, claims: &Claims) -> BTreeMap<String, Claim> {
        self.by_host
            .iter()
            .map(|(h, (take, back))| {
                let mut c = claims.get(h);
                c.add(*take);
                c.release(*back);
                (h.clone(), c)
            })
            .collect()
    }
    /// Adds the new claims to `tx`, each compared on the revision it was read at.
    pub fn write(&self, claims: &Claims, mut tx: Tx) -> Tx {
        for (h, c) in self.applied(claims) {
            tx = tx.set_claim(&h, claims.revision(&h), &c);
        }
        tx
    }
}

/// The placement request for `count` VMs of a cluster.
pub fn gang_request(cluster: &Cluster, count: u32) -> GangRequest {
    GangRequest::for_cluster(
        &cluster.name,
        count,
        cluster.shape.cpus,
        cluster.shape.memory_mib,
        Some(&cluster.shape.template),
        cluster.placement,
        cluster.anti_affinity.domain(),
    )
}

/// What the store says of hosts besides their records: the marks that keep placement off them.
pub struct HostMarks {
    pub draining: HashSet<String>,
    pub maintenance: HashSet<String>,
    /// Hosts not on (switched off, or switched on and not heard from since).
    pub powered_off: HashSet<String>,
    /// Powered-off hosts that placement may count on: booting already, or with a power-on command.
    pub switchable_on: HashSet<String>,
    /// Hosts declared failed (`/failures/`): nothing is placed there until they rejoin.
    pub failed: HashSet<String>,
}

impl HostMarks {
    pub async fn read(ctl: &Controller) -> ApiResult<HostMarks> {
        let powers = ctl.db.powers().await?;
        let off = || powers.iter().filter(|p| p.state != PowerState::On);
        Ok(HostMarks {
            draining: ctl.db.marked(HostMark::Draining).await?,
            maintenance: ctl.db.marked(HostMark::Maintenance).await?,
            powered_off: off().map(|p| p.host.clone()).collect(),
            switchable_on: off()
                .filter(|p| p.state == PowerState::Booting || p.config.power_on_command.is_some())
                .map(|p| p.host.clone())
                .collect(),
            failed: ctl.db.failures().await?.into_iter().map(|f| f.value.host).collect(),
        })
    }
}

/// A host as the policy core sees it: capacity, allocation rules, labels and state.
pub fn policy_host(ctl: &Controller, h: &HostRecord, marks: &HostMarks) -> shoal_policy::Host {
    let mut host = shoal_policy::Host::new(&h.name, h.cpus, h.memory_mib, 0);
    host.labels = h.labels.clone();
    host.cpu_overcommit = h.allocation.cpu_overcommit;
    host.memory_overcommit = h.allocation.memory_overcommit;
    host.reserved_cpus = h.allocation.reserved_cpus;
    host.reserved_memory_mib = h.allocation.reserved_memory_mib;
    host.state = service_state(ctl, &h.name, marks);
    host
}

/// Whether a host takes VMs: its power first, then liveness, then the operator's marks. The
/// one rule placement decides by and `host list` shows.
pub fn service_state(ctl: &Controller, host: &str, marks: &HostMarks) -> shoal_policy::HostState {
    if marks.powered_off.contains(host) {
        shoal_policy::HostState::PoweredOff
    } else if marks.failed.contains(host) || ctl.host_state(host).0 != HostState::Up {
        shoal_policy::HostState::Down
    } else if marks.draining.contains(host) {
        shoal_policy::HostState::Draining
    } else if marks.maintenance.contains(host) {
        shoal_policy::HostState::Maintenance
    } else {
        shoal_policy::HostState::Up
    }
}

/// A VM as the policy core sees it; `cluster` gives its anti-affinity rule.
pub fn policy_vm(v: &Vm, cluster: Option<&Cluster>) -> shoal_policy::Vm {
    shoal_policy::Vm {
        name: v.name.clone(),
        cluster: v.cluster.clone(),
        host: v.host.clone(),
        cpus: v.cpus,
        memory_mib: v.memory_mib,
        disk_mib: 0,
        template: Some(v.template.clone()),
        dirty_mib_s: None,
        overlay_mib: 0,
        anti_affinity: cluster.and_then(|c| c.anti_affinity.domain()).map(str::to_string),
    }
}

/// The hosts as placement sees them, with the claims read (and their revisions, to compare
/// against at commit).
pub struct HostSnapshot {
    /// Hosts, and the VMs that count for affinity.
    pub snapshot: shoal_policy::Snapshot,
    /// Per host (same order), what its claim holds.
    pub usage: Vec<[u64; 3]>,
    pub claims: Claims,
    pub records: Vec<HostRecord>,
    pub marks: HostMarks,
}

impl HostSnapshot {
    /// Reads hosts, marks and claims; no VMs yet (see [`HostSnapshot::with_vms`]).
    pub async fn read(ctl: &Controller) -> ApiResult<HostSnapshot> {
        let claims = ctl.db.claims().await?;
        let mut records = ctl.db.hosts().await?;
        records.sort_by(|a, b| a.name.cmp(&b.name));
        let marks = HostMarks::read(ctl).await?;
        let mut snapshot = shoal_policy::Snapshot::default();
        let mut usage = Vec::with_capacity(records.len());
        for h in &records {
            snapshot.hosts.push(policy_host(ctl, h, &marks));
            usage.push(claims.get(&h.name).usage());
        }
        Ok(HostSnapshot {
            snapshot,
            usage,
            claims,
            records,
            marks,
        })
    }

    /// The hosts with every VM that holds resources on them (claimed, not being deleted) but
    /// `except`, each with its cluster's rules: what placement, plans and resumes decide
    /// against. Also the clusters by name and all VMs, as read.
    pub async fn read_with_placed(
        ctl: &Controller,
        except: Option<uuid::Uuid>,
    ) -> ApiResult<(HostSnapshot, HashMap<String, Cluster>, Vec<Vm>)> {
        let clusters = ctl.db.clusters_by_name().await?;
        let vms = ctl.db.vms().await?;
        let snap = HostSnapshot::read(ctl).await?.with_vms(
            vms.iter()
                .filter(|v| v.claimed && v.state != VmState::Deleting && Some(v.uuid) != except)
                .map(|v| (v, clusters.get(&v.cluster))),
        );
        Ok((snap, clusters, vms))
    }

    /// Adds VMs that count for affinity (on known hosts only), with their clusters' rules.
    pub fn with_vms<'a>(mut self, vms: impl IntoIterator<Item = (&'a Vm, Option<&'a Cluster>)>) -> HostSnapshot {
        let known: HashSet<&str> = self.records.iter().map(|h| h.name.as_str()).collect();
        let vms: Vec<shoal_policy::Vm> = vms
            .into_iter()
            .filter(|(v, _)| known.contains(v.host.as_str()))
            .map(|(v, c)| policy_vm(v, c))
            .collect();
        self.snapshot.vms.extend(vms);
        self
    }

    pub fn name(&self, h: usize) -> &str {
        &self.snapshot.hosts[h].name
    }

    pub fn index(&self, host: &str) -> Option<usize> {
        self.snapshot.hosts.iter().position(|h| h.name == host)
    }

    pub fn placer(&self) -> Placer<'_> {
        Placer::with_usage(&self.snapshot, &self.usage)
    }

    /// The request placement runs for `req`. When it allows switching hosts on, the hosts that
    /// are on are tried first, then with one switched-off host more at a time (only those with
    /// a power-on command, or booting already), so that no more hosts are switched on than the
    /// gang needs: the first of these that places the gang, else the last.
    pub fn request_for(&self, req: &GangRequest) -> GangRequest {
        if !req.allow_power_on {
            return req.clone();
        }
        let mut switchable: Vec<&String> = self.marks.switchable_on.iter().collect();
        switchable.sort();
        let attempt = |k: usize| {
            let mut r = req.clone();
            r.allow_power_on = k > 0;
            r.rules.avoid_hosts.extend(
                self.marks
                    .powered_off
                    .iter()
                    .filter(|h| !switchable[..k].contains(h))
                    .cloned(),
            );
            r
        };
        (0..switchable.len())
            .map(attempt)
            .find(|r| self.placer().place(r).is_ok())
            .unwrap_or_else(|| attempt(switchable.len()))
    }

    /// Places a gang against the claims read, all VMs or an error naming the binding constraint.
    pub fn place(&self, req: &GangRequest) -> Result<Vec<usize>, shoal_policy::PlacementError> {
        self.placer().place(&self.request_for(req))
    }

    /// Whether host `h` is switched off, so that VMs placed there need it switched on.
    pub fn is_off(&self, h: usize) -> bool {
        self.snapshot.hosts[h].state == shoal_policy::HostState::PoweredOff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_add_and_give_back_without_going_negative() {
        let mut c = Claim::default();
        c.add(Claim {
            cpus: 2,
            memory_mib: 512,
            vms: 1,
        });
        c.add(Claim {
            cpus: 1,
            memory_mib: 128,
            vms: 1,
        });
        assert_eq!(c.usage(), [3, 640, 0]);
        c.release(Claim {
            cpus: 4,
            memory_mib: 128,
            vms: 1,
        });
        assert_eq!(
            c,
            Claim {
                cpus: 0,
                memory_mib: 512,
                vms: 1
            }
        );
    }

    #[test]
    fn changes_apply_to_the_claims_read() {
        let claims = Claims::default();
        let mut ch = ClaimChanges::default();
        let one = Claim {
            cpus: 1,
            memory_mib: 100,
            vms: 1,
        };
        ch.take("a", one);
        ch.take("a", one);
        ch.give_back("b", one);
        let out = ch.applied(&claims);
        assert_eq!(out["a"].usage(), [2, 200, 0]);
        assert_eq!(out["b"], Claim::default());
    }
}
