//! The hypervisor boundary. The agent drives VMs only through [`Hypervisor`]; each driver is one
//! module: [`sim`] keeps VMs as records (for scale tests, demos without KVM and the simulator).

use async_trait::async_trait;
use shoal_model::agent::{VmSpec, VmStatus};
use thiserror::Error;
use uuid::Uuid;

pub mod sim;

pub use sim::SimDriver;

#[derive(Debug, Error)]
pub enum HvError {
    #[error("VM {name}: {reason}")]
    Vm { name: String, reason: String },
    #[error("hypervisor state in {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Driver name as reported to the controller (`sim`, `qemu`).
    fn driver(&self) -> &'static str;
    /// Makes sure the VM exists and runs. Idempotent: a VM that already runs is left alone.
    async fn ensure(&self, spec: &VmSpec) -> Result<VmStatus, HvError>;
    /// Removes the VM and everything the host kept for it. Removing an unknown VM succeeds.
    async fn remove(&self, uuid: Uuid) -> Result<(), HvError>;
    /// Every VM the host has.
    async fn list(&self) -> Vec<VmStatus>;
}
