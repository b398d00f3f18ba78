//! The consolidator on real hosts: at each sample, the same policy as the simulator's `shoal`
//! (`shoal_policy::consolidate`) decides from the measured demand which VMs to live-migrate and
//! which hosts to switch off or on; this module feeds it and carries its plan out: hosts first
//! switched on (and waited for), then the moves in waves (`plan::execute`), then the emptied
//! hosts switched off through their power commands.
//!
//! What the policy may not touch is pinned: VMs not running, VMs of clusters with zone or rack
//! anti-affinity or label rules it does not evaluate, VMs on hosts draining or in maintenance,
//! and VMs that are migrating already. Hosts without both power commands are never emptied to save energy: nothing could
//! switch them off.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use shoal_model::power::{ConsolidationPlan, HostPower, PlannedMove, PowerState};
use shoal_model::{AntiAffinity, VmState};
use shoal_policy::consolidate::{self, Consolidator};
use shoal_policy::rebalance::Move;

use shoal_model::now_ms;

use crate::capacity::HostSnapshot;
use crate::datastore::HostRecord;
use crate::domain::energy;
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Live-migration bandwidth assumed for costing moves, MiB/s (half of 1 Gbit/s).
pub const MIGRATION_MIB_S: f64 = 59.6;
/// How long a switched-on host may take to be heard from again.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a power command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// A host switched on is not emptied and switched off again for this many samples, and never
/// sooner than [`POWER_ON_HOLD_MIN`]: an operator who switched it on meant it.
pub const POWER_ON_HOLD_SAMPLES: u32 = 3;
pub const POWER_ON_HOLD_MIN: Duration = Duration::from_secs(60);
/// Moves per wave, and moves per host within a wave.
const WAVE: usize = 4;
const PER_HOST: usize = 2;

/// Plans one consolidation step from the samples so far. `commit` advances the consolidator's
/// memory (as the loop does); a preview decides on a copy.
pub async fn plan(ctl: &Controller, commit: bool) -> ApiResult<ConsolidationPlan> {
    let snap = HostSnapshot::read(ctl).await?;
    let hosts: &[HostRecord] = &snap.records;
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let powers = energy::power_records(ctl, hosts).await?;
    let clusters = ctl.db.clusters_by_name().await?;
    // Up to placement: not down, draining, in maintenance or powered off.
    let in_service: Vec<bool> = snap
        .snapshot
        .hosts
        .iter()
        .map(|h| h.state == shoal_policy::HostState::Up)
        .collect();
    let hold_ms = (ctl.config.sample_interval * POWER_ON_HOLD_SAMPLES)
        .max(POWER_ON_HOLD_MIN)
        .as_millis() as u64;
    let vms: Vec<shoal_model::Vm> = ctl
        .db
        .vms()
        .await?
        .into_iter()
        .filter(|v| v.claimed && v.state != VmState::Deleting && index.contains_key(v.host.as_str()))
        .collect();
    let overlay = crate::domain::vms::overlay_mib(ctl);
    let migrating: std::collections::HashSet<String> =
        ctl.db.migrations().await?.into_iter().map(|m| m.value.vm).collect();

    let mut guard = ctl.energy.lock().await;
    let meter = &mut *guard;
    let step = meter.step;
    let (vm_meters, last_migrated, slot) = (&meter.vms, &meter.last_migrated, &mut meter.consolidator);
    let mut on_host: Vec<Vec<u32>> = vec![Vec::new(); hosts.len()];
    let mut groups: HashMap<&str, u32> = HashMap::new();
    let mut cvms = Vec::with_capacity(vms.len());
    for (i, v) in vms.iter().enumerate() {
        let h = index[v.host.as_str()];
        on_host[h].push(i as u32);
        let vm_meter = vm_meters.get(&v.uuid);
        let cluster = clusters.get(&v.cluster);
        let rule = cluster.map(|c| c.anti_affinity).unwrap_or_default();
        let pinned = v.state != VmState::Running
            || matches!(rule, AntiAffinity::Zone | AntiAffinity::Rack)
            || migrating.contains(&v.name)
            || !in_service[h]
            || vm_meter.is_none_or(|m| m.history.is_empty());
        let next = groups.len() as u32;
        let group = (rule == AntiAffinity::Host).then(|| *groups.entry(v.cluster.as_str()).or_insert(next));
        cvms.push(consolidate::Vm {
            size: v.cpus as f64,
            demand: vm_meter.map_or(0.0, |m| m.rate),
            history: vm_meter.map_or(&[][..], |m| &m.history),
            migration_s: (v.memory_mib + overlay.get(&v.uuid).copied().unwrap_or(0)) as f64 / MIGRATION_MIB_S,
            memory: v.memory_mib as f64,
            cpus: v.cpus as f64,
            in_migration: migrating.contains(&v.name),
            last_migrated: last_migrated.get(&v.uuid).copied(),
            gone: false,
            pinned,
            group,
        });
    }
    let placer = snap.placer();
    let chosts: Vec<consolidate::Host> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let p = &powers[&h.name];
            let free = placer.free(i);
            // Switched on lately (by hand, by placement or by this loop): not emptied again yet.
            let held = p.state == PowerState::On && now_ms().saturating_sub(p.since_unix_ms) < hold_ms;
            consolidate::Host {
                capacity: h.cpus as f64,
                core: h.cpus as f64,
                full_load_w: p.config.model.at(1.0),
                power: match p.state {
                    PowerState::Off => consolidate::Power::Off,
                    PowerState::On if in_service[i] => consolidate::Power::On,
                    // Booting, down, draining or in maintenance: takes nothing now.
                    _ => consolidate::Power::Booting,
                },
                vms: &on_host[i],
                requested: on_host[i].iter().map(|&v| cvms[v as usize].demand).sum(),
                memory_free: free[1] as f64,
                cpus_free: free[0] as f64,
                switchable: p.config.power_on_command.is_some() && p.config.power_off_command.is_some() && !held,
            }
        })
        .collect();
    if slot.as_ref().is_none_or(|(n, _)| *n != names) {
        *slot = Some((names.clone(), Consolidator::default()));
    }
    let (_, c) = slot.as_mut().expect("set above");
    let decided = if commit {
        c.decide(step, &chosts, &cvms)
    } else {
        c.clone().decide(step, &chosts, &cvms)
    };
    Ok(ConsolidationPlan {
        power_on: decided.power_on.iter().map(|&h| names[h as usize].clone()).collect(),
        moves: decided
            .migrations
            .iter()
            .map(|&(v, h)| PlannedMove {
                vm: vms[v as usize].name.clone(),
                from: vms[v as usize].host.clone(),
                to: names[h as usize].clone(),
            })
            .collect(),
        power_off: decided.power_off.iter().map(|&h| names[h as usize].clone()).collect(),
    })
}

/// One step of the loop: plan with the consolidator's memory, then carry the plan out.
pub async fn step(ctl: &Controller) -> ApiResult<ConsolidationPlan> {
    let p = plan(ctl, true).await?;
    apply(ctl, &p).await?;
    Ok(p)
}

/// Carries a plan out: hosts switched on and waited for, moves in waves, emptied hosts off.
pub async fn apply(ctl: &Controller, p: &ConsolidationPlan) -> ApiResult<()> {
    for h in &p.power_on {
        switch(ctl, h, true).await?;
        wait_booted(ctl, h).await?;
    }
    if !p.moves.is_empty() {
        let mut load: Vec<HashMap<&str, usize>> = Vec::new();
        let mut moves = Vec::with_capacity(p.moves.len());
        for m in &p.moves {
            // The first wave with room for both ends.
            let w = (0..)
                .find(|&w| {
                    load.get(w).is_none_or(|l: &HashMap<&str, usize>| {
                        l.values().sum::<usize>() / 2 < WAVE
                            && l.get(m.from.as_str()).copied().unwrap_or(0) < PER_HOST
                            && l.get(m.to.as_str()).copied().unwrap_or(0) < PER_HOST
                    })
                })
                .expect("an empty wave always has room");
            if load.len() <= w {
                load.resize(w + 1, HashMap::new());
            }
            *load[w].entry(&m.from).or_default() += 1;
            *load[w].entry(&m.to).or_default() += 1;
            moves.push(Move {
                vm: m.vm.clone(),
                from: m.from.clone(),
                to: m.to.clone(),
                gain: 0.0,
                seconds: 0.0,
                score_after: 0.0,
                wave: w as u32,
            });
        }
        let guard = ctl.db.lock().await;
        crate::domain::plans::execute(ctl, &moves, guard).await?;
        let vms = ctl.db.vms().await?;
        let mut meter = ctl.energy.lock().await;
        let step = meter.step;
        for m in &p.moves {
            if let Some(v) = vms.iter().find(|v| v.name == m.vm) {
                meter.last_migrated.insert(v.uuid, step);
            }
        }
    }
    for h in &p.power_off {
        switch(ctl, h, false).await?;
    }
    Ok(())
}

async fn wait_booted(ctl: &Controller, host: &str) -> ApiResult<()> {
    let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        let p = energy::settle_boot(ctl, energy::power_record(ctl, host).await?).await?;
        if p.state == PowerState::On {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ApiError::Unavailable(format!(
                "host {host} was switched on but not heard from within {BOOT_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Switches a host on or off with its power command. Switching off a host that still has VMs
/// is refused; a command that fails leaves the state as it was, with the error recorded.
pub async fn switch(ctl: &Controller, host: &str, on: bool) -> ApiResult<HostPower> {
    let p = energy::power_record(ctl, host).await?;
    let (want, cmd, flag) = if on {
        (PowerState::Booting, &p.config.power_on_command, "--on-command")
    } else {
        (PowerState::Off, &p.config.power_off_command, "--off-command")
    };
    if (on && p.state != PowerState::Off) || (!on && p.state == PowerState::Off) {
        return Ok(p);
    }
    let Some(cmd) = cmd.clone() else {
        return Err(ApiError::Invalid(format!(
            "host {host} has no power-{} command; set one with `shoal host power {host} {flag} CMD`",
            if on { "on" } else { "off" }
        )));
    };
    if !on {
        let claim = ctl.db.claims().await?.get(host);
        if claim.vms > 0 {
            return Err(ApiError::Conflict(format!(
                "host {host} still has {}; drain it first (`shoal host drain {host}`)",
                shoal_model::plural(claim.vms, "VM")
            )));
        }
    }
    tracing::info!(%host, on, %cmd, "running power command");
    match run_command(&cmd, host).await {
        Ok(()) => energy::set_state(ctl, p, want, None).await,
        Err(e) => {
            let msg = format!(
                "power-{} command for host {host} failed: {e}",
                if on { "on" } else { "off" }
            );
            let state = p.state;
            energy::set_state(ctl, p, state, Some(msg.clone())).await?;
            Err(ApiError::Unavailable(msg))
        }
    }
}

/// Fencing: runs a failed host's power-off command whatever VMs it holds (they are being
/// restarted elsewhere), and records it off. `Ok(false)`: it has no power-off command.
pub async fn fence_off(ctl: &Controller, host: &str) -> ApiResult<Result<bool, String>> {
    let p = energy::power_record(ctl, host).await?;
    let Some(cmd) = p.config.power_off_command.clone() else {
        return Ok(Ok(false));
    };
    tracing::warn!(%host, %cmd, "fencing: running the power-off command");
    Ok(match run_command(&cmd, host).await {
        Ok(()) => {
            energy::set_state(ctl, p, PowerState::Off, None).await?;
            Ok(true)
        }
        Err(e) => {
            let msg = format!("fencing: power-off command for host {host} failed: {e}");
            let state = p.state;
            energy::set_state(ctl, p, state, Some(msg.clone())).await?;
            Err(msg)
        }
    })
}

/// Why a power command did not succeed.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("cannot run sh: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("still running after {0:?}; killed")]
    Timeout(Duration),
    #[error("waiting for it: {0}")]
    Wait(#[source] std::io::Error),
    #[error("{status}: {stderr}")]
    Failed {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

async fn run_command(cmd: &str, host: &str) -> Result<(), CommandError> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("SHOAL_HOST", host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(CommandError::Spawn)?;
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| CommandError::Timeout(COMMAND_TIMEOUT))?
        .map_err(CommandError::Wait)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CommandError::Failed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
