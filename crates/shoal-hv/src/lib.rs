//! The hypervisor boundary. The agent drives VMs only through [`Hypervisor`]; each driver is one
//! module: [`sim`] keeps VMs as records (for scale tests, demos without QEMU and the simulator),
//! [`qemu`] runs each VM as a QEMU process driven over QMP.

use std::path::Path;

use async_trait::async_trait;
use shoal_model::agent::{
    CheckpointDisk, ConsoleChunk, DiskCheckpoint, DiskSnapshot, IncomingVm, MigrateOut, MigrationProgress, VmSpec,
    VmStatus,
};
use uuid::Uuid;

pub mod error;
pub mod qemu;
pub mod sim;

pub use error::{ErrorKind, HvError, SimLoadError, SourceError, VmNetError};
pub use qemu::{QemuConfig, QemuDriver};
pub use sim::{SimDriver, SimLoad};

/// Connects VMs to their virtual networks: the host agent's network driver, as the QEMU driver
/// sees it. Without one, every VM gets QEMU's user-mode networking.
#[async_trait]
pub trait VmNet: Send + Sync {
    /// Readies the host side of the VM's network; returns QEMU's `-netdev` value (id `net0`),
    /// or `None` for user-mode networking.
    async fn netdev(&self, spec: &VmSpec) -> Result<Option<String>, VmNetError>;
    /// QEMU started: connects what it made for the VM (its tap).
    async fn connect(&self, spec: &VmSpec) -> Result<(), VmNetError>;
    /// A VM found running when the driver opened.
    async fn adopt(&self, spec: &VmSpec);
    /// The VM left the host.
    async fn release(&self, uuid: Uuid);
}

/// A host's VMs. Errors are [`HvError`]s, and their [`HvError::kind`] says what the caller
/// should do: a failure in a background transition shows instead in the VM's state and reason,
/// decided the same way. `tests/conformance.rs` holds what every implementation must do.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Driver name as reported to the controller (`sim`, `qemu/tcg`, `qemu/kvm`).
    fn driver(&self) -> String;
    /// Makes sure the VM exists and moves it toward `spec.power`. Idempotent. Answers with the
    /// VM's status now; long transitions (boot, shutdown, suspend) continue in the background and
    /// show in later calls and in [`Hypervisor::list`].
    async fn ensure(&self, spec: &VmSpec) -> Result<VmStatus, HvError>;
    /// Removes the VM and everything the host kept for it. Removing an unknown VM succeeds.
    async fn remove(&self, uuid: Uuid) -> Result<(), HvError>;
    /// Every VM the host has.
    async fn list(&self) -> Vec<VmStatus>;
    /// Up to `max` bytes of the VM's serial console from `offset`.
    async fn console(&self, uuid: Uuid, offset: u64, max: usize) -> Result<ConsoleChunk, HvError>;
    /// Images (manifest ids, hex) this host holds whole, for image-locality placement.
    async fn cached_images(&self) -> Vec<String> {
        Vec::new()
    }
    /// Records the VM's disk, as it is now, as an image in the controller's store (crash-consistent:
    /// a running VM is paused while its disk is read).
    async fn snapshot(&self, uuid: Uuid) -> Result<DiskSnapshot, HvError> {
        Err(HvError::NoDisks {
            vm: uuid,
            driver: self.driver(),
        })
    }

    /// Records the VM's disk as a checkpoint in the image store while the guest runs
    /// (crash-consistent, point in time): only the blocks written since `req.since` when the
    /// host tracked them, else the overlay's blocks laid over `req.base`.
    async fn checkpoint(&self, uuid: Uuid, req: &CheckpointDisk) -> Result<DiskCheckpoint, HvError> {
        let _ = req;
        Err(HvError::NoDisks {
            vm: uuid,
            driver: self.driver(),
        })
    }

    /// Keeps the image `manifest` (hex) of the controller's store whole in this host's chunk
    /// cache: a second copy of a checkpoint. Idempotent.
    async fn hold_image(&self, manifest: &str) -> Result<(), HvError> {
        Err(HvError::NoImageCache {
            manifest: manifest.to_string(),
            driver: self.driver(),
        })
    }

    /// Self-fencing: stops every VM's process at once (no guest shutdown), keeping its disk,
    /// because the controller may already be restarting them elsewhere. Returns how many it
    /// stopped.
    async fn fence(&self) -> usize;

    // Live migration, shared-nothing, in the order the controller calls it: the destination
    // prepares, the source sends, the destination runs the VM; or, on any failure, the source's
    // migration is cancelled and the destination's VM removed. Until `finish_incoming` the
    // destination's guest never runs, and once the source's migration completed its guest never
    // runs again unless `cancel_migration` resumes it: there are never two copies running.

    /// Destination: readies an incoming VM for `spec` (its template, an empty overlay, the seed,
    /// QEMU waiting for the memory stream with its guest paused, and an NBD server exporting the
    /// overlay on `listen`). Idempotent: asked again, answers with the same endpoints.
    async fn prepare_incoming(&self, spec: &VmSpec, listen: std::net::Ipv4Addr) -> Result<IncomingVm, HvError> {
        let _ = listen;
        Err(HvError::MigrationUnsupported {
            vm: spec.uuid,
            driver: self.driver(),
        })
    }

    /// Source: starts sending the running VM to a prepared destination (its overlay's blocks
    /// over NBD, then its memory) in the background. Idempotent while that migration runs.
    async fn migrate_out(&self, uuid: Uuid, req: &MigrateOut) -> Result<MigrationProgress, HvError> {
        let _ = req;
        Err(HvError::MigrationUnsupported {
            vm: uuid,
            driver: self.driver(),
        })
    }

    /// Source: the progress of the VM's outgoing migration ([`HvError::NotMigrating`] if none).
    async fn migration(&self, uuid: Uuid) -> Result<MigrationProgress, HvError> {
        Err(HvError::NotMigrating(uuid))
    }

    /// Source: cancels the VM's outgoing migration, whatever its phase (a completed one too),
    /// and lets the VM run on here. Idempotent; a VM with no migration is left as it is.
    async fn cancel_migration(&self, uuid: Uuid) -> Result<VmStatus, HvError> {
        Err(HvError::NotMigrating(uuid))
    }

    /// Destination: the memory arrived (the source's migration completed): stops the NBD
    /// export, runs the guest and announces its MAC on the network. Idempotent.
    async fn finish_incoming(&self, uuid: Uuid) -> Result<VmStatus, HvError> {
        Err(HvError::NotMigrating(uuid))
    }
}

/// The files a template is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateFile {
    Disk,
    Kernel,
    Initrd,
}

impl TemplateFile {
    pub fn as_str(&self) -> &'static str {
        match self {
            TemplateFile::Disk => "disk",
            TemplateFile::Kernel => "kernel",
            TemplateFile::Initrd => "initrd",
        }
    }
}

/// Where a host gets template files it does not have yet (the controller, for an agent).
#[async_trait]
pub trait TemplateSource: Send + Sync + 'static {
    /// Downloads the file to `dest`; the caller verifies its hash.
    async fn fetch(&self, template: &str, file: TemplateFile, dest: &Path) -> Result<(), SourceError>;

    /// Writes the disk of a template held in the image store (hash `manifest:<id>`) to `dest` as
    /// a raw image, fetching only the chunks this host lacks; every chunk is verified on arrival.
    async fn fetch_image(&self, template: &str, manifest: &str, dest: &Path) -> Result<(), SourceError> {
        let _ = dest;
        Err(SourceError::NoImageStore {
            template: template.to_string(),
            manifest: manifest.to_string(),
        })
    }

    /// Images (manifest ids, hex) this host's cache holds whole.
    async fn cached_images(&self) -> Vec<String> {
        Vec::new()
    }

    /// Adds the raw disk image at `raw` to the image store and sends what the controller lacks.
    async fn store_image(&self, raw: &Path) -> Result<DiskSnapshot, SourceError> {
        Err(SourceError::NoStore(raw.to_path_buf()))
    }

    /// Keeps the image `manifest` (hex) of the controller's store whole in this host's cache.
    async fn hold_image(&self, manifest: &str) -> Result<(), SourceError> {
        Err(SourceError::NoImageStore {
            template: String::new(),
            manifest: manifest.to_string(),
        })
    }

    /// Makes a new image from the image `parent` (manifest hex) with `changes` laid over it,
    /// their data read from `data` at the same offsets (a sparse file of the disk's size), grown
    /// to `size` bytes if larger; stores it and sends the controller what it lacks.
    async fn store_changes(
        &self,
        parent: &str,
        changes: &[DiskChange],
        data: &Path,
        size: u64,
    ) -> Result<StoredChanges, SourceError> {
        let _ = (parent, changes, size);
        Err(SourceError::NoStore(data.to_path_buf()))
    }
}

/// A run of a disk that changed: new data (read from the data file at `offset`) or zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskChange {
    pub offset: u64,
    pub len: u64,
    pub zero: bool,
}

/// What [`TemplateSource::store_changes`] made and sent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredChanges {
    /// Manifest id (hex) of the new image.
    pub manifest: String,
    /// Bytes read from the data file.
    pub read_bytes: u64,
    /// Distinct chunks of the new image, and those the controller lacked.
    pub chunks: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
}
