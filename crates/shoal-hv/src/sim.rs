//! The simulated driver: VMs are records that "boot" after a configurable delay. Its state lives
//! in one JSON file so that an agent restart re-adopts its VMs, like the QEMU driver will.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use shoal_model::agent::{VmSpec, VmStatus};
use shoal_model::VmState;
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
    fn driver(&self) -> &'static str {
        "sim"
    }

    async fn ensure(&self, spec: &VmSpec) -> Result<VmStatus, HvError> {
        if let Some(v) = self.vms.lock().await.get(&spec.uuid) {
            return Ok(v.clone());
        }
        if !self.boot_delay.is_zero() {
            tokio::time::sleep(self.boot_delay).await;
        }
        let status = VmStatus {
            uuid: spec.uuid,
            name: spec.name.clone(),
            state: VmState::Running,
            reason: None,
        };
        let mut vms = self.vms.lock().await;
        let status = vms.entry(spec.uuid).or_insert(status).clone();
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
            ip: "10.200.0.2".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.200.0.1".parse().unwrap(),
            mac: shoal_model::MacAddr::qemu(1),
            user_data: None,
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
