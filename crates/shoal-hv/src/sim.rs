//! The simulated driver: VMs are records that "boot" after a configurable delay. Its state lives
//! in one JSON file so that an agent restart re-adopts its VMs, like the QEMU driver will.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shoal_model::agent::{
    CheckpointDisk, ConsoleChunk, DiskCheckpoint, IncomingVm, MigrateOut, MigrationMode, MigrationPhase,
    MigrationProgress, VmSpec, VmStatus,
};
use shoal_model::{Power, VmState};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::{HvError, Hypervisor, SimLoadError};

pub struct SimDriver {
    state_file: Option<PathBuf>,
    boot_delay: Duration,
    vms: Mutex<BTreeMap<Uuid, VmStatus>>,
    load: SimLoad,
    started: Instant,
    /// CPU time used by each running VM so far, and its vCPUs.
    meters: std::sync::Mutex<HashMap<Uuid, Meter>>,
    /// Outgoing migrations, in memory only: like QEMU's, they do not survive the agent.
    migrations: std::sync::Mutex<HashMap<Uuid, SimMigration>>,
    /// Images held for the controller (checkpoint replicas), in memory only.
    held: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Each VM's disk size as its last `ensure` gave it, bytes (0 until then after a reopen).
    disks: std::sync::Mutex<HashMap<Uuid, u64>>,
}

/// An outgoing migration of the simulated driver: it completes `boot_delay` after it started.
struct SimMigration {
    started: Instant,
    progress: MigrationProgress,
}

/// What a simulated incoming VM says while it waits for its memory.
const INCOMING: &str = "incoming migration";

struct Meter {
    cpus: u32,
    cpu_seconds: f64,
    at: Instant,
}

/// How busy the simulated VMs' vCPUs are, for the controller's energy accounting and
/// consolidator to measure.
#[derive(Clone, Debug, PartialEq)]
pub enum SimLoad {
    /// Every VM uses this share of its vCPUs.
    Constant(f64),
    /// CPU utilisation traces (fractions, one sample per `step`, repeating): a VM follows the
    /// trace its name hashes to.
    Trace { traces: Vec<Vec<f64>>, step: Duration },
}

impl Default for SimLoad {
    fn default() -> Self {
        SimLoad::Constant(0.1)
    }
}

impl SimLoad {
    /// A directory of PlanetLab-style traces: one file per VM, one CPU percentage per line.
    pub fn from_trace_dir(dir: &Path, step: Duration) -> Result<SimLoad, SimLoadError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| SimLoadError::Read {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let mut traces = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|source| SimLoadError::Read {
                path: f.clone(),
                source,
            })?;
            let mut samples = Vec::new();
            for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: f64 = l
                    .trim()
                    .parse()
                    .ok()
                    .filter(|v| (0.0..=100.0).contains(v))
                    .ok_or_else(|| SimLoadError::Sample {
                        path: f.clone(),
                        line: i + 1,
                        value: l.trim().to_string(),
                    })?;
                samples.push(v / 100.0);
            }
            if !samples.is_empty() {
                traces.push(samples);
            }
        }
        if traces.is_empty() {
            return Err(SimLoadError::Empty(dir.to_path_buf()));
        }
        if step.is_zero() {
            return Err(SimLoadError::ZeroStep);
        }
        Ok(SimLoad::Trace { traces, step })
    }

    /// The share of its vCPUs VM `name` uses `elapsed` after the driver started.
    pub fn at(&self, name: &str, elapsed: Duration) -> f64 {
        match self {
            SimLoad::Constant(f) => f.clamp(0.0, 1.0),
            SimLoad::Trace { traces, step } => {
                // FNV-1a: stable across runs and platforms.
                let h = name
                    .bytes()
                    .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
                let t = &traces[(h % traces.len() as u64) as usize];
                t[(elapsed.as_nanos() / step.as_nanos().max(1)) as usize % t.len()]
            }
        }
    }
}

impl SimDriver {
    /// A driver whose VMs survive restarts in `dir/sim-vms.json`.
    pub fn open(dir: &Path, boot_delay: Duration) -> Result<SimDriver, HvError> {
        let path = dir.join("sim-vms.json");
        let io = |source| HvError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let vms = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Vec<VmStatus>>(&bytes)
                .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?
                .into_iter()
                .map(|v| (v.uuid, v))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e)),
        };
        Ok(SimDriver {
            state_file: Some(path),
            boot_delay,
            vms: Mutex::new(vms),
            load: SimLoad::default(),
            started: Instant::now(),
            meters: Default::default(),
            migrations: Default::default(),
            held: Default::default(),
            disks: Default::default(),
        })
    }

    /// A driver that forgets everything when dropped.
    pub fn ephemeral(boot_delay: Duration) -> SimDriver {
        SimDriver {
            state_file: None,
            boot_delay,
            vms: Mutex::new(BTreeMap::new()),
            load: SimLoad::default(),
            started: Instant::now(),
            meters: Default::default(),
            migrations: Default::default(),
            held: Default::default(),
            disks: Default::default(),
        }
    }

    /// Sets how busy the VMs are.
    pub fn with_load(mut self, load: SimLoad) -> SimDriver {
        self.load = load;
        self
    }

    /// Advances every running VM's CPU meter to now and writes it into its status.
    fn meter(&self, vms: &mut [VmStatus]) {
        let now = Instant::now();
        let mut meters = self.meters.lock().expect("meters");
        for v in vms.iter_mut() {
            if v.state != VmState::Running {
                // A stopped VM's process is gone: its CPU time starts again from 0.
                if let Some(m) = meters.get_mut(&v.uuid) {
                    m.cpu_seconds = 0.0;
                    m.at = now;
                }
                continue;
            }
            let m = meters.entry(v.uuid).or_insert(Meter {
                cpus: 1,
                cpu_seconds: 0.0,
                at: now,
            });
            let share = self.load.at(&v.name, now.duration_since(self.started));
            m.cpu_seconds += share * m.cpus as f64 * now.duration_since(m.at).as_secs_f64();
            m.at = now;
            v.cpu_seconds = Some(m.cpu_seconds);
        }
    }

    async fn persist(&self, vms: &BTreeMap<Uuid, VmStatus>) -> Result<(), HvError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let io = |source| HvError::Io {
            path: path.display().to_string(),
            source,
        };
        let list: Vec<&VmStatus> = vms.values().collect();
        let bytes = serde_json::to_vec(&list).expect("VmStatus serialises");
        let tmp = path.with_extension("json.tmp");
        tokio::fs::write(&tmp, bytes).await.map_err(io)?;
        tokio::fs::rename(&tmp, path).await.map_err(io)
    }
}

#[async_trait]
impl Hypervisor for SimDriver {
    fn driver(&self) -> String {
        "sim".into()
    }

    /// Power transitions are instant; only the first boot takes the configured delay.
    async fn ensure(&self, spec: &VmSpec) -> Result<VmStatus, HvError> {
        let known = self.vms.lock().await.contains_key(&spec.uuid);
        if !known && !self.boot_delay.is_zero() {
            tokio::time::sleep(self.boot_delay).await;
        }
        let mut vms = self.vms.lock().await;
        let status = vms.entry(spec.uuid).or_insert_with(|| VmStatus {
            uuid: spec.uuid,
            name: spec.name.clone(),
            state: VmState::Running,
            reason: None,
            seq: 1,
            cpu_seconds: None,
            disk_bytes: None,
        });
        let target = spec.power.target();
        let allowed = match (status.state, spec.power) {
            (VmState::Stopped, Power::Suspended) => false,
            (_, Power::Running) => true,
            (s, _) => s == VmState::Running || s == target,
        };
        if allowed && status.state != target {
            status.state = target;
            status.reason = None;
            status.seq += 1;
        }
        let status = status.clone();
        self.persist(&vms).await?;
        let now = Instant::now();
        self.meters
            .lock()
            .expect("meters")
            .entry(spec.uuid)
            .or_insert(Meter {
                cpus: 0,
                cpu_seconds: 0.0,
                at: now,
            })
            .cpus = spec.cpus;
        self.disks
            .lock()
            .expect("disks")
            .insert(spec.uuid, spec.disk_mib.unwrap_or(0) << 20);
        Ok(status)
    }

    async fn hold_image(&self, manifest: &str) -> Result<(), HvError> {
        self.held.lock().expect("held").insert(manifest.to_string());
        Ok(())
    }

    async fn cached_images(&self) -> Vec<String> {
        self.held.lock().expect("held").iter().cloned().collect()
    }

    async fn fence(&self) -> usize {
        self.migrations.lock().expect("migrations").clear();
        let mut vms = self.vms.lock().await;
        let mut stopped = 0;
        for v in vms.values_mut() {
            if matches!(v.state, VmState::Running | VmState::Creating) {
                v.state = VmState::Stopped;
                v.reason = Some("fenced: the host lost the controller and its peers".into());
                v.seq += 1;
                stopped += 1;
            }
        }
        if let Err(e) = self.persist(&vms).await {
            tracing::error!("fencing: recording the stopped VMs: {e}");
        }
        stopped
    }

    async fn remove(&self, uuid: Uuid) -> Result<(), HvError> {
        self.meters.lock().expect("meters").remove(&uuid);
        self.migrations.lock().expect("migrations").remove(&uuid);
        self.disks.lock().expect("disks").remove(&uuid);
        let mut vms = self.vms.lock().await;
        if vms.remove(&uuid).is_some() {
            self.persist(&vms).await?;
        }
        Ok(())
    }

    async fn list(&self) -> Vec<VmStatus> {
        let mut vms: Vec<VmStatus> = self.vms.lock().await.values().cloned().collect();
        self.meter(&mut vms);
        vms
    }

    /// A simulated guest writes nothing: its checkpoint is the one it is taken since, or its
    /// base, and nothing was read.
    async fn checkpoint(&self, uuid: Uuid, req: &CheckpointDisk) -> Result<DiskCheckpoint, HvError> {
        let (state, incoming) = {
            let vms = self.vms.lock().await;
            let v = vms.get(&uuid).ok_or(HvError::NotFound(uuid))?;
            (v.state, v.reason.as_deref() == Some(INCOMING))
        };
        let migrating = self
            .migrations
            .lock()
            .expect("migrations")
            .get(&uuid)
            .map(|m| m.progress.phase)
            .filter(|p| !matches!(p, MigrationPhase::Failed | MigrationPhase::Cancelled));
        let refused = match (incoming, migrating) {
            (true, _) => Some("arriving by migration".to_string()),
            (_, Some(phase)) => Some(format!("migrating (phase {})", phase.as_str())),
            _ if state != VmState::Running => Some(state.as_str().to_string()),
            _ => None,
        };
        if let Some(state) = refused {
            return Err(HvError::NotCheckpointable { vm: uuid, state });
        }
        let manifest = req.since.clone().unwrap_or_else(|| req.base.clone());
        Ok(DiskCheckpoint {
            parent: manifest.clone(),
            manifest,
            incremental: req.since.is_some(),
            disk_bytes: self.disks.lock().expect("disks").get(&uuid).copied().unwrap_or(0),
            ..Default::default()
        })
    }

    async fn prepare_incoming(&self, spec: &VmSpec, listen: std::net::Ipv4Addr) -> Result<IncomingVm, HvError> {
        let mut vms = self.vms.lock().await;
        match vms.get(&spec.uuid) {
            Some(v) if v.reason.as_deref() != Some(INCOMING) => return Err(HvError::AlreadyHere(spec.uuid)),
            Some(_) => {}
            None => {
                vms.insert(
                    spec.uuid,
                    VmStatus {
                        uuid: spec.uuid,
                        name: spec.name.clone(),
                        state: VmState::Creating,
                        reason: Some(INCOMING.into()),
                        seq: 1,
                        cpu_seconds: None,
                        disk_bytes: None,
                    },
                );
                self.persist(&vms).await?;
            }
        }
        Ok(IncomingVm {
            nbd: format!("{listen}:10809"),
            export: spec.uuid.to_string(),
            memory_uri: format!("sim:{listen}"),
        })
    }

    async fn migrate_out(&self, uuid: Uuid, req: &MigrateOut) -> Result<MigrationProgress, HvError> {
        let state = {
            let vms = self.vms.lock().await;
            vms.get(&uuid).ok_or(HvError::NotFound(uuid))?.state
        };
        if state != VmState::Running {
            return Err(HvError::NotRunning {
                vm: uuid,
                state: state.as_str().into(),
            });
        }
        let mut m = self.migrations.lock().expect("migrations");
        let mode = match req.params.mode {
            MigrationMode::Auto => MigrationMode::Auto.resolve("sim", "sim"),
            mode => mode,
        };
        let job = m.entry(uuid).or_insert_with(|| SimMigration {
            started: Instant::now(),
            progress: MigrationProgress::starting(mode),
        });
        Ok(job.progress.clone())
    }

    async fn migration(&self, uuid: Uuid) -> Result<MigrationProgress, HvError> {
        let mut m = self.migrations.lock().expect("migrations");
        let job = m.get_mut(&uuid).ok_or(HvError::NotMigrating(uuid))?;
        let p = &mut job.progress;
        p.elapsed_ms = job.started.elapsed().as_millis() as u64;
        if !p.phase.is_over() && job.started.elapsed() >= self.boot_delay {
            p.phase = MigrationPhase::Completed;
            p.downtime_ms = Some(0);
        }
        Ok(p.clone())
    }

    async fn cancel_migration(&self, uuid: Uuid) -> Result<VmStatus, HvError> {
        self.migrations.lock().expect("migrations").remove(&uuid);
        let vms = self.vms.lock().await;
        vms.get(&uuid).cloned().ok_or(HvError::NotFound(uuid))
    }

    async fn finish_incoming(&self, uuid: Uuid) -> Result<VmStatus, HvError> {
        let mut vms = self.vms.lock().await;
        let v = vms.get_mut(&uuid).ok_or(HvError::NotFound(uuid))?;
        if v.reason.as_deref() == Some(INCOMING) {
            v.state = VmState::Running;
            v.reason = None;
            v.seq += 1;
        }
        let v = v.clone();
        self.persist(&vms).await?;
        Ok(v)
    }

    async fn console(&self, uuid: Uuid, offset: u64, max: usize) -> Result<ConsoleChunk, HvError> {
        let vms = self.vms.lock().await;
        let v = vms.get(&uuid).ok_or(HvError::NotFound(uuid))?;
        let text = format!("sim: {} is {}\n", v.name, v.state.as_str());
        let start = (offset as usize).min(text.len());
        let end = (start + max).min(text.len());
        Ok(ConsoleChunk {
            offset: start as u64,
            next: end as u64,
            data: text[start..end].to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            template_hash: "blake3:00".into(),
            ..VmSpec::example(name)
        }
    }

    #[tokio::test]
    async fn ensure_is_idempotent_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d = SimDriver::open(dir.path(), Duration::ZERO).unwrap();
        let s = spec("a-0");
        assert_eq!(d.ensure(&s).await.unwrap().state, VmState::Running);
        d.ensure(&s).await.unwrap();
        assert_eq!(d.list().await.len(), 1);
        let mut stopped = s.clone();
        stopped.power = Power::Stopped;
        let st = d.ensure(&stopped).await.unwrap();
        assert_eq!((st.state, st.seq), (VmState::Stopped, 2));
        stopped.power = Power::Suspended;
        assert_eq!(
            d.ensure(&stopped).await.unwrap().state,
            VmState::Stopped,
            "a stopped VM cannot be suspended"
        );
        assert_eq!(d.ensure(&s).await.unwrap().state, VmState::Running);
        drop(d);
        let d = SimDriver::open(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(d.list().await[0].uuid, s.uuid);
        d.remove(s.uuid).await.unwrap();
        d.remove(s.uuid).await.unwrap();
        assert!(d.list().await.is_empty());
        let d = SimDriver::open(dir.path(), Duration::ZERO).unwrap();
        assert!(d.list().await.is_empty());
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;

    #[tokio::test]
    async fn a_simulated_checkpoint_reads_nothing_and_waits_for_a_migration_to_end() {
        let d = SimDriver::ephemeral(Duration::ZERO);
        let s = VmSpec {
            disk_mib: Some(512),
            ..VmSpec::example("a-0")
        };
        d.ensure(&s).await.unwrap();
        let req = |since: Option<&str>| CheckpointDisk {
            base: "b".into(),
            since: since.map(Into::into),
        };
        let full = d.checkpoint(s.uuid, &req(None)).await.unwrap();
        assert_eq!(
            (
                full.manifest.as_str(),
                full.parent.as_str(),
                full.incremental,
                full.disk_bytes
            ),
            ("b", "b", false, 512 << 20)
        );
        let next = d.checkpoint(s.uuid, &req(Some("c"))).await.unwrap();
        assert_eq!(
            (next.manifest.as_str(), next.incremental, next.read_bytes),
            ("c", true, 0)
        );

        let out = MigrateOut {
            to: IncomingVm {
                nbd: "127.0.0.1:10809".into(),
                export: "disk0".into(),
                memory_uri: "sim:127.0.0.1".into(),
            },
            params: Default::default(),
        };
        d.migrate_out(s.uuid, &out).await.unwrap();
        let e = d.checkpoint(s.uuid, &req(None)).await.unwrap_err();
        assert!(e.to_string().contains("migrating"), "{e}");
        d.cancel_migration(s.uuid).await.unwrap();
        d.checkpoint(s.uuid, &req(None)).await.unwrap();
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;

    fn spec(name: &str, cpus: u32) -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "uuid": Uuid::new_v4(), "name": name, "cpus": cpus, "memory_mib": 256, "disk_mib": null,
            "template": "t", "template_hash": "h", "ip": "10.0.0.2", "prefix_len": 24,
            "gateway": "10.0.0.1", "mac": "52:54:00:00:00:01", "user_data": null
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn running_vms_use_their_share_of_their_vcpus() {
        let d = SimDriver::ephemeral(Duration::ZERO).with_load(SimLoad::Constant(0.5));
        d.ensure(&spec("a-0", 2)).await.unwrap();
        d.list().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let cpu = d.list().await[0].cpu_seconds.unwrap();
        // 2 vCPUs at 50 %: about one CPU-second per second.
        assert!((0.35..0.8).contains(&cpu), "{cpu}");
    }

    #[test]
    fn traces_are_read_validated_and_followed() {
        let dir = std::env::temp_dir().join(format!("shoal-simload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("only"), "10\n90\n").unwrap();
        let load = SimLoad::from_trace_dir(&dir, Duration::from_secs(1)).unwrap();
        assert_eq!(load.at("x", Duration::from_millis(500)), 0.1);
        assert_eq!(load.at("x", Duration::from_millis(1500)), 0.9);
        assert_eq!(load.at("x", Duration::from_millis(2500)), 0.1, "traces repeat");
        std::fs::write(dir.join("bad"), "10\n120\n").unwrap();
        let e = SimLoad::from_trace_dir(&dir, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("120"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
