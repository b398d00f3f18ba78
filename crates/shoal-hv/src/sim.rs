//! The simulated driver: VMs are records that "boot" after a configurable delay. Its state lives
//! in one JSON file so that an agent restart re-adopts its VMs, like the QEMU driver will.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use shoal_model::agent::{ConsoleChunk, VmSpec, VmStatus};
use shoal_model::{Power, VmState};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::{HvError, Hypervisor};

pub struct SimDriver {
    state_file: Option<PathBuf>,
    boot_delay: Duration,
    vms: Mutex<BTreeMap<Uuid, VmStatus>>,
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
        })
    }

    /// A driver that forgets everything when dropped.
    pub fn ephemeral(boot_delay: Duration) -> SimDriver {
        SimDriver {
            state_file: None,
            boot_delay,
            vms: Mutex::new(BTreeMap::new()),
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
        Ok(status)
    }

    async fn remove(&self, uuid: Uuid) -> Result<(), HvError> {
        let mut vms = self.vms.lock().await;
        if vms.remove(&uuid).is_some() {
            self.persist(&vms).await?;
        }
        Ok(())
    }

    async fn list(&self) -> Vec<VmStatus> {
        self.vms.lock().await.values().cloned().collect()
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
            uuid: Uuid::new_v4(),
            name: name.into(),
            cpus: 1,
            memory_mib: 128,
            disk_mib: None,
            template: "t".into(),
            template_hash: "blake3:00".into(),
            template_format: "raw".into(),
            kernel_boot: None,
            ready_pattern: None,
            power: Power::Running,
            force_stop: false,
            ip: "10.200.0.2".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.200.0.1".parse().unwrap(),
            mac: shoal_model::MacAddr::qemu(1),
            user_data: None,
            network: None,
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
        assert_eq!(d.ensure(&stopped).await.unwrap().state, VmState::Stopped, "a stopped VM cannot be suspended");
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
