//! Host failure: detect on two channels, fence, restart the VMs elsewhere, take the host back
//! empty. A task of its own (fencing runs a power command that may take a while), every half
//! second:
//!
//! 1. *Detect* (`decide::classify`): a host whose heartbeats stopped and that no heard peer
//!    reaches for the host timeout, and that can be fenced, gets `/failures/<host>`.
//! 2. *Fence* (`decide::fencing`): its power-off command; else (or when that fails) waiting its
//!    lease out when its own watchdog is certain to have stopped its VMs. Nothing restarts before.
//! 3. *Evacuate*: one `host_evacuate` operation; each pass places the VMs still on the host
//!    (higher `--ha-priority` first, the cluster's rules kept) and moves their records there in
//!    one transaction, each from its newest checkpoint held in two places (or its template); the
//!    reconciler then starts them. A VM that fits nowhere stays, said `unplaced`, until capacity
//!    returns. Everything is in the store, so a restarted controller carries on.
//! 4. *Rejoin*: a failed host heard again has every VM it still has removed (the reconciler
//!    does it) and, once it lists none, the failure record goes: it takes VMs again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use shoal_model::{
    now_ms, plural, Cluster, Fencing, HostFailure, Operation, OperationKind, OperationState, Power, StepState, Vm,
    VmState,
};
use tokio::sync::watch;

use crate::capacity::{gang_request, policy_vm, Claim, ClaimChanges, HostSnapshot};
use crate::datastore::{Tx, Versioned};
use crate::error::ApiResult;
use crate::Controller;

pub(crate) mod decide;
use decide::{FenceStep, Verdict};

/// How often the detector and the evacuations run.
const EVERY: Duration = Duration::from_millis(500);
/// The steps of an evacuation.
pub const STEP_FENCE: &str = "fence";
pub const STEP_RESTART: &str = "restart";

pub async fn run(ctl: Controller, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = pass(&ctl).await {
            tracing::warn!("failover pass failed: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn pass(ctl: &Controller) -> ApiResult<()> {
    detect(ctl).await?;
    let failures = ctl.db.failures().await?;
    let failed: HashSet<String> = failures.iter().map(|f| f.value.host.clone()).collect();
    for f in failures {
        if *ctl.stopped.borrow() {
            return Ok(());
        }
        handle(ctl, f).await?;
    }
    // An evacuation whose host rejoined meanwhile: its VMs left waiting there restart there;
    // it finishes once they run.
    for op in ctl.db.operations().await? {
        if op.kind == OperationKind::HostEvacuate && op.state == OperationState::Running && !failed.contains(&op.target)
        {
            let host = op.target.clone();
            evacuate(ctl, &host, op, false).await?;
        }
    }
    Ok(())
}

/// What `host list` says of a failed host.
pub fn describe(f: &HostFailure) -> String {
    let ago = |ms: u64| format!("{:.0} s ago", now_ms().saturating_sub(ms) as f64 / 1000.0);
    let mut s = format!(
        "failed {} (last seen {})",
        ago(f.detected_unix_ms),
        ago(f.last_seen_unix_ms)
    );
    match (f.fenced, &f.waiting) {
        (Some(Fencing::PowerOff), _) => s.push_str("; fenced by its power-off command"),
        (Some(Fencing::Lease), _) => s.push_str("; fenced: its lease ran out"),
        (None, Some(w)) => s.push_str(&format!("; not fenced yet: {w}")),
        (None, None) => s.push_str("; being fenced"),
    }
    if let Some(op) = f.operation {
        s.push_str(&format!("; its VMs restart elsewhere (operation {op})"));
    }
    s
}

/// What `host list` says of an isolated host.
pub fn isolated_note(ctl: &Controller, host: &str) -> String {
    match ctl.host_state(host).1 {
        Some(seen) => format!(
            "not heard from for {:.0} s, but its peers reach it: its VMs are left alone",
            now_ms().saturating_sub(seen) as f64 / 1000.0
        ),
        None => "not heard from since the controller started, but its peers reach it: its VMs are left alone".into(),
    }
}

/// Declares failed the hosts that are.
async fn detect(ctl: &Controller) -> ApiResult<()> {
    let hosts = ctl.db.hosts().await?;
    let failed: HashSet<String> = ctl.db.failures().await?.into_iter().map(|f| f.value.host).collect();
    let powers: HashMap<String, shoal_model::power::HostPower> = ctl
        .db
        .powers()
        .await?
        .into_iter()
        .map(|p| (p.host.clone(), p))
        .collect();
    let live = ctl.liveness();
    let heard_hosts: HashSet<&str> = hosts.iter().map(|h| h.name.as_str()).filter(|h| ctl.heard(h)).collect();
    let (now, timeout) = (now_ms(), ctl.config.host_timeout.as_millis() as u64);
    let peers_seen = ctl.peers_seen();
    for h in &hosts {
        let power = powers.get(&h.name);
        // A host switched off (or not on yet) is not failing.
        let on = power.is_none_or(|p| p.state == shoal_model::power::PowerState::On);
        if failed.contains(&h.name) || !on {
            continue;
        }
        let l = live.get(&h.name);
        let evidence = decide::Evidence {
            heard: heard_hosts.contains(h.name.as_str()),
            heartbeat_ms: l.map(|l| l.seen_unix_ms),
            peer_seen_ms: peers_seen.get(&h.name).copied(),
            peers: l.map(|l| l.peers.as_slice()),
            power_off: power.is_some_and(|p| p.config.power_off_command.is_some()),
        };
        let verdict = decide::classify(&evidence, &heard_hosts, now, timeout, ctl.started_unix_ms());
        let note = match &verdict {
            Verdict::Silent(why) => Some(why.clone()),
            _ => None,
        };
        {
            let mut notes = ctl.host_notes.lock().expect("host notes");
            match note {
                Some(n) => notes.insert(h.name.clone(), n),
                None => notes.remove(&h.name),
            };
        }
        if let Verdict::Failed {
            last_seen_ms,
            lease_safe,
        } = verdict
        {
            let record = HostFailure {
                host: h.name.clone(),
                detected_unix_ms: now,
                last_seen_unix_ms: last_seen_ms,
                fenced: None,
                fenced_unix_ms: None,
                lease_safe,
                power_off_failed: false,
                waiting: None,
                operation: None,
            };
            let _g = ctl.db.lock().await;
            if ctl.db.try_commit(Tx::new().put_failure(0, &record)).await? {
                tracing::error!(
                    host = %h.name,
                    silent_ms = now - last_seen_ms,
                    lease_safe,
                    "host failed: no heartbeat and no peer reaches it; fencing it"
                );
                ctl.wake.notify_one();
            }
        }
    }
    Ok(())
}

/// Moves one failed host on: rejoin, fence, evacuate.
async fn handle(ctl: &Controller, f: Versioned<HostFailure>) -> ApiResult<()> {
    let host = f.value.host.clone();
    if f.value.fenced.is_none() {
        // Heard again before it was fenced: nothing of it was restarted, it simply comes back.
        if ctl.heard(&host) {
            return rejoin(ctl, &f).await;
        }
        return fence(ctl, &f).await;
    }
    let Some(op_id) = f.value.operation else {
        return start_evacuation(ctl, &f).await;
    };
    // Its VMs are restarted from their checkpoints even if it is heard again meanwhile.
    if let Some(op) = ctl.db.operation(&op_id).await? {
        if op.state == OperationState::Running {
            evacuate(ctl, &host, op, true).await?;
        }
    }
    if ctl.heard(&host) {
        rejoin(ctl, &f).await?;
    }
    Ok(())
}

/// A failed host heard again: once it holds no VM (the reconciler removes them all), it
/// rejoins. One that was never fenced simply rejoins: nothing of it was restarted.
async fn rejoin(ctl: &Controller, f: &Versioned<HostFailure>) -> ApiResult<()> {
    let host = &f.value.host;
    let holds = ctl.liveness().get(host).map_or(0, |l| l.vms.len());
    if f.value.fenced.is_some() && holds > 0 {
        return Ok(());
    }
    let _g = ctl.db.lock().await;
    if ctl
        .db
        .try_commit(Tx::new().delete_failure(host, f.mod_revision))
        .await?
    {
        tracing::warn!(%host, fenced = f.value.fenced.is_some(), "failed host heard again: it rejoins empty");
        ctl.wake.notify_one();
    }
    Ok(())
}

async fn fence(ctl: &Controller, f: &Versioned<HostFailure>) -> ApiResult<()> {
    let host = &f.value.host;
    let power_off = ctl
        .db
        .power(host)
        .await?
        .is_some_and(|p| p.config.power_off_command.is_some());
    let lease_ms = ctl.config.host_timeout.as_millis() as u64;
    let margin_ms = ctl.config.fence_margin.as_millis() as u64;
    let now = now_ms();
    let new = match decide::fencing(&f.value, power_off, lease_ms, margin_ms) {
        FenceStep::Done => return Ok(()),
        FenceStep::PowerOff => match crate::domain::consolidate::fence_off(ctl, host).await? {
            Ok(true) => decide::fenced(&f.value, Fencing::PowerOff, now_ms()),
            Ok(false) | Err(_) => HostFailure {
                power_off_failed: true,
                waiting: Some(
                    ctl.db
                        .power(host)
                        .await?
                        .and_then(|p| p.last_error)
                        .unwrap_or_else(|| "its power-off command is gone".into()),
                ),
                ..f.value.clone()
            },
        },
        FenceStep::WaitLease { at_ms } if now >= at_ms => decide::fenced(&f.value, Fencing::Lease, now),
        FenceStep::WaitLease { at_ms } => {
            let waiting = Some(format!(
                "waiting {:.1} s more for its lease to run out (its agent stops its VMs then)",
                (at_ms - now) as f64 / 1000.0
            ));
            if f.value.waiting == waiting {
                return Ok(());
            }
            HostFailure {
                waiting,
                ..f.value.clone()
            }
        }
        FenceStep::Stuck => {
            let waiting = Some(
                "cannot be fenced: its power-off command failed and its lease is no guarantee (not every peer \
                 is heard); its VMs are not restarted until it is heard again or switched off"
                    .to_string(),
            );
            if f.value.waiting == waiting {
                return Ok(());
            }
            HostFailure {
                waiting,
                ..f.value.clone()
            }
        }
    };
    if let Some(how) = new.fenced {
        tracing::warn!(%host, ?how, "failed host fenced");
    }
    let _g = ctl.db.lock().await;
    ctl.db.try_commit(Tx::new().put_failure(f.mod_revision, &new)).await?;
    Ok(())
}

/// One operation for the whole evacuation, recorded with the failure so that it starts once.
async fn start_evacuation(ctl: &Controller, f: &Versioned<HostFailure>) -> ApiResult<()> {
    let host = &f.value.host;
    let _g = ctl.db.lock().await;
    let vms: Vec<String> = ctl
        .db
        .vms()
        .await?
        .into_iter()
        .filter(|v| &v.host == host && v.state != VmState::Deleting)
        .map(|v| v.name)
        .collect();
    let mut op =
        crate::domain::clusters::new_operation(OperationKind::HostEvacuate, host, &[STEP_FENCE, STEP_RESTART], 0);
    if let Some(s) = op.step_mut(STEP_FENCE) {
        s.state = StepState::Done;
        s.done = 1;
        s.total = 1;
        s.message = match f.value.fenced {
            Some(Fencing::PowerOff) => "switched off by its power-off command".into(),
            _ => "its lease ran out: its agent stopped its VMs".into(),
        };
    }
    if let Some(s) = op.step_mut(STEP_RESTART) {
        s.state = StepState::Running;
        s.total = vms.len() as u64;
        s.message = format!("{} to restart elsewhere", plural(vms.len() as u64, "VM"));
    }
    op.vms = vms;
    if op.vms.is_empty() {
        op.state = OperationState::Succeeded;
        op.finished_unix_ms = Some(now_ms());
        if let Some(s) = op.step_mut(STEP_RESTART) {
            s.state = StepState::Done;
            s.message = "it held no VMs".into();
        }
    }
    let record = HostFailure {
        operation: Some(op.id),
        ..f.value.clone()
    };
    let tx = Tx::new().put_failure(f.mod_revision, &record).put_operation(&op);
    if ctl.db.try_commit(tx).await? {
        tracing::warn!(%host, vms = op.vms.len(), operation = %op.id, "evacuating the failed host");
    }
    Ok(())
}

/// Places the VMs still on the failed host (`place`: it is still failed) and moves their
/// records there; reports progress.
async fn evacuate(ctl: &Controller, host: &str, mut op: Operation, place: bool) -> ApiResult<()> {
    let _g = ctl.db.lock().await;
    let (snap, clusters, all) = HostSnapshot::read_with_placed(ctl, None).await?;
    let versioned = ctl.db.vms_versioned().await?;
    let chains = ctl.db.checkpoint_chains().await?;
    let moving = ctl.db.migrating_vms().await?;
    let on_host: Vec<&Versioned<Vm>> = versioned
        .iter()
        .filter(|_| place)
        .filter(|v| v.value.host == host && v.value.state != VmState::Deleting)
        // A migration from or to the host is rolled back by its executor first.
        .filter(|v| !moving.contains(&v.value.name))
        .collect();
    // Whether each safe checkpoint's image can be restarted from: every chunk present and
    // matching its id in the controller's store (checked once per pass).
    let mut damaged: HashSet<String> = HashSet::new();
    for v in &on_host {
        let Some(c) = chains.get(&v.value.name).filter(|c| c.uuid == v.value.uuid) else {
            continue;
        };
        for k in c.checkpoints.iter().filter(|k| k.safe()) {
            let known = ctl
                .checked_images
                .lock()
                .expect("checked images")
                .get(&k.manifest)
                .copied();
            let whole = match known {
                Some(w) => w,
                None => {
                    let whole = match k.manifest.parse::<shoal_image::ManifestId>() {
                        Ok(id) => {
                            let bad = crate::api::images::blocking(ctl, move |s| s.damaged(&id)).await;
                            if !matches!(&bad, Ok(b) if b.is_empty()) {
                                tracing::error!(vm = %v.value.name, seq = k.seq, "checkpoint image damaged: {bad:?}");
                            }
                            matches!(&bad, Ok(b) if b.is_empty())
                        }
                        Err(_) => false,
                    };
                    ctl.checked_images
                        .lock()
                        .expect("checked images")
                        .insert(k.manifest.clone(), whole);
                    whole
                }
            };
            if !whole {
                damaged.insert(k.manifest.clone());
            }
        }
    }
    let order = decide::restarts(
        on_host.iter().map(|v| &v.value),
        |v| clusters.get(&v.cluster).map_or(0, |c| c.shape.ha.priority),
        |v| chains.get(&v.name),
        |k| !damaged.contains(&k.manifest),
    );
    let deploying: HashSet<String> = ctl
        .db
        .operations()
        .await?
        .into_iter()
        .filter(|o| {
            o.state == OperationState::Running
                && matches!(o.kind, OperationKind::ClusterCreate | OperationKind::ClusterScale)
        })
        .flat_map(|o| o.vms)
        .collect();
    let mut snap = snap;
    let mut claims = ClaimChanges::default();
    let mut tx = Tx::new();
    let mut notes = Vec::new();
    let mut unplaced = Vec::new();
    for r in &order {
        let Some(cluster) = clusters.get(&r.vm.cluster) else {
            continue;
        };
        let v = on_host.iter().find(|v| v.value.uuid == r.vm.uuid).expect("one of them");
        match place_one(&mut snap, cluster, r.vm) {
            Ok(to) => {
                let mut vm = r.vm.clone();
                vm.host = to.clone();
                vm.state = VmState::Pending;
                vm.observed_seq = 0;
                vm.disk_base = decide::disk_base(r);
                vm.reason = None;
                // The memory of a suspended VM was on the failed host: it comes back stopped.
                if vm.desired == Power::Suspended {
                    vm.desired = Power::Stopped;
                }
                if r.vm.claimed {
                    claims.give_back(host, Claim::of(r.vm));
                }
                vm.claimed = true;
                claims.take(&to, Claim::of(&vm));
                notes.push(decide::restart_note(r, &to));
                tx = tx.update_vm(v.mod_revision, &vm);
            }
            // One its deployment is still waiting for fails, so that the deployment rolls
            // back; the others wait for capacity.
            Err(e) if deploying.contains(&r.vm.name) => {
                let vm = Vm {
                    state: VmState::Failed,
                    reason: Some(crate::reconcile::stranded_reason(host, r.vm, &e)),
                    ..r.vm.clone()
                };
                tx = tx.update_vm(v.mod_revision, &vm);
            }
            // It waits, pending where it was, until capacity returns (or its host does,
            // empty): it restarts from its checkpoint either way, never from the stale copy.
            Err(e) => {
                unplaced.push(format!("{} ({e})", r.vm.name));
                let vm = Vm {
                    state: VmState::Pending,
                    observed_seq: 0,
                    disk_base: decide::disk_base(r),
                    reason: Some(format!(
                        "unplaced after host {host} failed: {e}; restarts when capacity returns"
                    )),
                    ..r.vm.clone()
                };
                if vm != *r.vm {
                    tx = tx.update_vm(v.mod_revision, &vm);
                }
            }
        }
    }
    for n in &notes {
        tracing::warn!(%host, "restarting {n}");
    }
    // Progress: the operation's VMs running on a host that is not failed.
    let failed: HashSet<String> = ctl.db.failures().await?.into_iter().map(|f| f.value.host).collect();
    let by_name: HashMap<&str, &Vm> = all.iter().map(|v| (v.name.as_str(), v)).collect();
    let settled = |n: &String| {
        by_name.get(n.as_str()).is_none_or(|v| {
            matches!(v.state, VmState::Running | VmState::Stopped | VmState::Failed) && !failed.contains(&v.host)
        })
    };
    let done = op.vms.iter().filter(|n| settled(n)).count() as u64;
    let total = op.vms.len() as u64;
    let before = op.clone();
    if let Some(s) = op.step_mut(STEP_RESTART) {
        s.done = done;
        s.total = total;
        let mut msg = format!("{done} of {} restarted", plural(total, "VM"));
        if !notes.is_empty() {
            msg = format!("{msg}; placed {}", notes.join("; "));
        } else if let Some((_, rest)) = s.message.split_once("; placed ") {
            msg = format!("{msg}; placed {rest}");
        }
        if !unplaced.is_empty() {
            msg = format!(
                "{msg}; unplaced, retried when capacity returns: {}",
                unplaced.join(", ")
            );
        }
        s.message = msg;
    }
    if done == total && unplaced.is_empty() {
        let failed_vms: Vec<String> = op
            .vms
            .iter()
            .filter(|n| by_name.get(n.as_str()).is_some_and(|v| v.state == VmState::Failed))
            .cloned()
            .collect();
        op.state = if failed_vms.is_empty() {
            OperationState::Succeeded
        } else {
            op.error = Some(format!(
                "{} failed to start: {}",
                plural(failed_vms.len() as u64, "VM"),
                failed_vms.join(", ")
            ));
            OperationState::Failed
        };
        op.finished_unix_ms = Some(now_ms());
        if let Some(s) = op.step_mut(STEP_RESTART) {
            s.state = if failed_vms.is_empty() {
                StepState::Done
            } else {
                StepState::Failed
            };
        }
    }
    if op != before {
        tx = tx.put_operation(&op);
    }
    let tx = claims.write(&snap.claims, tx);
    if ctl.db.try_commit(tx).await? && !notes.is_empty() {
        ctl.wake.notify_one();
    }
    Ok(())
}

/// Places one VM with its cluster's rules against `snap`, and counts it there, so that the
/// next VM of the pass sees it.
fn place_one(snap: &mut HostSnapshot, cluster: &Cluster, vm: &Vm) -> Result<String, String> {
    let mut req = gang_request(cluster, 1);
    req.cpus = vm.cpus;
    req.memory_mib = vm.memory_mib;
    let plan = snap.place(&req).map_err(|e| e.to_string())?;
    let h = plan[0];
    let to = snap.name(h).to_string();
    snap.usage[h][0] += vm.cpus as u64;
    snap.usage[h][1] += vm.memory_mib;
    let placed = Vm {
        host: to.clone(),
        ..vm.clone()
    };
    snap.snapshot.vms.retain(|v| v.name != vm.name);
    snap.snapshot.vms.push(policy_vm(&placed, Some(cluster)));
    Ok(to)
}
