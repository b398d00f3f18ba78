//! Host power and energy: every `sample_interval` the controller turns the CPU time its agents
//! report per VM (`VmStatus::cpu_seconds`) into each VM's demand over the interval and each
//! host's utilisation, prices that with the host's power model, adds it to the host's energy
//! account (`/energy/<host>`, so a restart keeps the total), appends it to the record when one is
//! kept, and hands the step to the consolidator when it runs.
//!
//! Power configuration and state live in `/power/<host>` ([`HostPower`]): a host is `on` unless
//! the controller switched it off; one it switched on is `booting` until its agent is heard
//! from again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use shoal_model::power::{EnergyReport, HostEnergy, HostPower, HostPowerConfig, PowerState};
use shoal_model::{now_ms, HostState};
use tokio::sync::watch;
use uuid::Uuid;

use crate::datastore::{EnergyAccount as Account, HostRecord, Tx};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Demand samples kept per VM for the consolidator.
pub const HISTORY_LEN: usize = 30;

/// What the sampler knows of one VM.
#[derive(Clone, Debug, Default)]
pub(crate) struct VmMeter {
    /// The last CPU counter read and when its host sent it.
    last: Option<(f64, Instant)>,
    /// CPUs busy over the last interval.
    pub rate: f64,
    /// Demand as a share of the VM's vCPUs, one per sample, most recent first.
    pub history: Vec<f64>,
}

#[derive(Clone, Debug, Default)]
struct HostMeter {
    util: f64,
    power_w: f64,
    account: Account,
}

/// Samples, energy accounts and the consolidator's memory, behind one lock.
#[derive(Default)]
pub struct Meter {
    pub(crate) vms: HashMap<Uuid, VmMeter>,
    hosts: BTreeMap<String, HostMeter>,
    last_sample: Option<Instant>,
    /// Samples taken since the controller started.
    pub(crate) step: usize,
    /// The hosts the consolidator's memory is indexed by, and the consolidator.
    pub(crate) consolidator: Option<(Vec<String>, shoal_policy::consolidate::Consolidator)>,
    /// Sample at which the consolidator last moved each VM.
    pub(crate) last_migrated: HashMap<Uuid, usize>,
    recorder: Option<Recorder>,
}

/// The power record of each of `hosts`; hosts without one are on with the default model.
pub async fn power_records(ctl: &Controller, hosts: &[HostRecord]) -> ApiResult<HashMap<String, HostPower>> {
    let mut stored: HashMap<String, HostPower> = ctl
        .db
        .powers()
        .await?
        .into_iter()
        .map(|p| (p.host.clone(), p))
        .collect();
    Ok(hosts
        .iter()
        .map(|h| {
            let p = stored.remove(&h.name).unwrap_or_else(|| HostPower {
                host: h.name.clone(),
                ..Default::default()
            });
            (h.name.clone(), p)
        })
        .collect())
}

pub async fn power_record(ctl: &Controller, host: &str) -> ApiResult<HostPower> {
    ctl.db.known_host(host).await?;
    Ok(ctl.db.power(host).await?.unwrap_or_else(|| HostPower {
        host: host.to_string(),
        ..Default::default()
    }))
}

/// Sets a host's power model and commands; its state stays as it is.
pub async fn configure(ctl: &Controller, host: &str, config: HostPowerConfig) -> ApiResult<HostPower> {
    config.model.validate().map_err(|e| ApiError::Invalid(e.to_string()))?;
    for (flag, c) in [
        ("power_on_command", &config.power_on_command),
        ("power_off_command", &config.power_off_command),
    ] {
        if c.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err(ApiError::Invalid(format!("{flag} is empty; leave it out for none")));
        }
    }
    let mut p = power_record(ctl, host).await?;
    p.config = config;
    ctl.db.commit(Tx::new().put_power(&p)).await?;
    Ok(p)
}

pub(crate) async fn set_state(
    ctl: &Controller,
    mut p: HostPower,
    state: PowerState,
    error: Option<String>,
) -> ApiResult<HostPower> {
    if p.state != state {
        p.since_unix_ms = now_ms();
    }
    p.state = state;
    p.last_error = error;
    ctl.db.commit(Tx::new().put_power(&p)).await?;
    Ok(p)
}

/// A host switched on is back (`on`) once its agent is heard from after the command.
pub(crate) async fn settle_boot(ctl: &Controller, p: HostPower) -> ApiResult<HostPower> {
    if p.state != PowerState::Booting {
        return Ok(p);
    }
    let (_, seen) = ctl.host_state(&p.host);
    if seen.is_some_and(|ms| ms > p.since_unix_ms) {
        return set_state(ctl, p, PowerState::On, None).await;
    }
    Ok(p)
}

/// Each host's power and energy now.
pub async fn report(ctl: &Controller) -> ApiResult<EnergyReport> {
    let hosts: Vec<HostRecord> = ctl.db.hosts().await?;
    let powers = power_records(ctl, &hosts).await?;
    let accounts: HashMap<String, Account> = ctl.db.energy_accounts().await?;
    let meter = ctl.energy.lock().await;
    let mut hosts: Vec<HostEnergy> = powers
        .values()
        .map(|p| {
            let m = meter.hosts.get(&p.host);
            let account = m
                .map(|m| m.account.clone())
                .or_else(|| accounts.get(&p.host).cloned())
                .unwrap_or_default();
            HostEnergy {
                host: p.host.clone(),
                state: p.state,
                // A host switched off since the last sample draws nothing now.
                cpu_util: if p.state == PowerState::Off {
                    0.0
                } else {
                    m.map_or(0.0, |m| m.util)
                },
                power_w: if p.state == PowerState::Off {
                    0.0
                } else {
                    m.map_or(0.0, |m| m.power_w)
                },
                energy_kwh: account.joules / 3.6e6,
                since_unix_ms: account.since_unix_ms,
            }
        })
        .collect();
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(EnergyReport {
        power_w: hosts.iter().map(|h| h.power_w).sum(),
        energy_kwh: hosts.iter().map(|h| h.energy_kwh).sum(),
        hosts,
    })
}

/// Samples every `sample_interval` until stopped.
pub async fn run(ctl: Controller, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ctl.config.sample_interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = sample(&ctl).await {
            tracing::warn!("energy sample failed: {e}");
        }
        if ctl.config.consolidate {
            match crate::domain::consolidate::step(&ctl).await {
                Ok(p) if p != Default::default() => tracing::info!(
                    moves = p.moves.len(),
                    on = ?p.power_on,
                    off = ?p.power_off,
                    "consolidation step done"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("consolidation step failed: {e}"),
            }
        }
    }
}

/// One sample: VM demand, host utilisation and power, energy, record.
pub async fn sample(ctl: &Controller) -> ApiResult<()> {
    let live = ctl.liveness();
    let hosts: Vec<HostRecord> = ctl.db.hosts().await?;
    let vms: HashMap<Uuid, shoal_model::Vm> = ctl.db.vms().await?.into_iter().map(|v| (v.uuid, v)).collect();
    let mut powers = power_records(ctl, &hosts).await?;
    for p in powers.values_mut() {
        *p = settle_boot(ctl, p.clone()).await?;
    }
    let mut m = ctl.energy.lock().await;
    // Stored accounts are read once, when a host is first sampled by this process.
    let mut stored: HashMap<String, Account> = if hosts.iter().any(|h| !m.hosts.contains_key(&h.name)) {
        ctl.db.energy_accounts().await?
    } else {
        HashMap::new()
    };
    let now = Instant::now();
    let dt = m.last_sample.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
    m.last_sample = Some(now);
    let mut busy: HashMap<&str, f64> = HashMap::new();
    for (host, l) in &live {
        for st in &l.vms {
            let (Some(cpu), Some(vm)) = (st.cpu_seconds, vms.get(&st.uuid)) else {
                continue;
            };
            let vmm = m.vms.entry(st.uuid).or_default();
            let measured = match vmm.last {
                Some((c0, t0)) if cpu >= c0 && l.seen > t0 => {
                    vmm.rate = (cpu - c0) / l.seen.duration_since(t0).as_secs_f64();
                    true
                }
                // No newer report, or the VM's process restarted (moved, resumed): keep the rate.
                Some(_) => true,
                // The first reading: nothing to measure over yet.
                None => false,
            };
            vmm.last = Some((cpu, l.seen));
            if measured {
                let share = (vmm.rate / vm.cpus.max(1) as f64).clamp(0.0, 1.0);
                vmm.history.insert(0, share);
                vmm.history.truncate(HISTORY_LEN);
            }
            *busy.entry(host.as_str()).or_default() += vmm.rate;
        }
    }
    m.vms.retain(|u, _| vms.contains_key(u));

    let mut tx = Tx::new();
    for h in &hosts {
        let p = powers.remove(&h.name).unwrap_or_else(|| HostPower {
            host: h.name.clone(),
            ..Default::default()
        });
        let util = (busy.get(h.name.as_str()).copied().unwrap_or(0.0) / h.cpus.max(1) as f64).clamp(0.0, 1.0);
        let up = ctl.host_state(&h.name).0 == HostState::Up;
        let power_w = match p.state {
            PowerState::Off => 0.0,
            PowerState::Booting => p.config.model.at(0.0),
            // A host not heard from is not measured: its draw is unknown.
            PowerState::On if up => p.config.model.at(util),
            PowerState::On => 0.0,
        };
        let hm = m.hosts.entry(h.name.clone()).or_insert_with(|| HostMeter {
            account: stored.remove(&h.name).unwrap_or(Account {
                joules: 0.0,
                since_unix_ms: now_ms(),
            }),
            ..Default::default()
        });
        // Energy over the interval at the draw measured over it.
        hm.account.joules += power_w * dt;
        hm.util = util;
        hm.power_w = power_w;
        tx = tx.put_energy(&h.name, &hm.account);
    }
    ctl.db.commit(tx).await?;

    if let Some(dir) = &ctl.config.record {
        let shares: BTreeMap<String, f64> = m
            .vms
            .iter()
            .filter_map(|(u, vmm)| Some((vms.get(u)?.name.clone(), *vmm.history.first()?)))
            .collect();
        if m.recorder.is_none() {
            m.recorder =
                Some(Recorder::open(dir).map_err(|e| ApiError::Internal(format!("record {}: {e}", dir.display())))?);
        }
        let r = m.recorder.as_mut().expect("opened above");
        r.append(&shares)
            .map_err(|e| ApiError::Internal(format!("record {}: {e}", dir.display())))?;
    }
    m.step += 1;
    Ok(())
}

/// Writes a PlanetLab-format trace: one file per VM, one CPU percentage per sample. Every file
/// has the same number of lines, as `shoal sim` wants: a VM that appears later is assumed to
/// have run at its first measured demand before; one that is gone reads 0 (which the replay, like
/// the reference toolkit, takes as "finished"); a running VM reads at least 1 % for the same
/// reason.
struct Recorder {
    dir: PathBuf,
    steps: usize,
    files: BTreeSet<String>,
}

impl Recorder {
    fn open(dir: &Path) -> std::io::Result<Recorder> {
        std::fs::create_dir_all(dir)?;
        let mut files = BTreeSet::new();
        let mut steps = 0;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                let text = std::fs::read_to_string(e.path())?;
                steps = steps.max(text.lines().filter(|l| !l.trim().is_empty()).count());
                files.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(Recorder {
            dir: dir.to_owned(),
            steps,
            files,
        })
    }

    fn append(&mut self, shares: &BTreeMap<String, f64>) -> std::io::Result<()> {
        let line = |share: f64| format!("{}\n", ((share * 100.0).round() as u32).clamp(1, 100));
        for (name, &share) in shares {
            if self.files.contains(name) {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.dir.join(name))?
                    .write_all(line(share).as_bytes())?;
            } else {
                std::fs::write(self.dir.join(name), line(share).repeat(self.steps + 1))?;
                self.files.insert(name.clone());
            }
        }
        for name in self.files.iter().filter(|n| !shares.contains_key(*n)) {
            std::fs::OpenOptions::new()
                .append(true)
                .open(self.dir.join(name))?
                .write_all(b"0\n")?;
        }
        self.steps += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_every_file_the_same_length() {
        let dir = std::env::temp_dir().join(format!("shoal-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut r = Recorder::open(&dir).unwrap();
        r.append(&BTreeMap::from([("a-0".to_string(), 0.25)])).unwrap();
        r.append(&BTreeMap::from([("a-0".to_string(), 0.001), ("b-0".to_string(), 0.5)]))
            .unwrap();
        r.append(&BTreeMap::from([("b-0".to_string(), 1.0)])).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        assert_eq!(read("a-0"), "25\n1\n0\n");
        assert_eq!(read("b-0"), "50\n50\n100\n");
        // Reopened, it goes on where it was.
        let mut r = Recorder::open(&dir).unwrap();
        assert_eq!(r.steps, 3);
        r.append(&BTreeMap::from([("c-0".to_string(), 0.1)])).unwrap();
        assert_eq!(read("c-0"), "10\n10\n10\n10\n");
        assert_eq!(read("a-0").lines().count(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
