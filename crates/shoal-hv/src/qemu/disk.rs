//! A VM's disks: the copy-on-write overlay on its template's base image, the snapshot of that
//! overlay into the image store (the seed is in `seed.rs`), and what a VM leaves behind.

use std::path::Path;

use shoal_model::agent::{DiskSnapshot, VmSpec};
use shoal_model::{DiskFormat, VmState};
use tokio::process::Command;

use super::template::Base;
use super::{ms, QemuDriver, Vm};
use crate::HvError;

impl QemuDriver {
    /// Creates `disk.qcow2`, a copy-on-write overlay on the VM's base image (its template's
    /// disk, or the checkpoint it restarts from), grown to the spec's disk size.
    pub(super) async fn create_overlay(&self, vm: &Vm, spec: &VmSpec, base: &Base) -> Result<(), HvError> {
        let mut img = Command::new(&self.cfg.qemu_img);
        img.args(["create", "-q", "-f", "qcow2", "-F", base.format.as_str(), "-b"])
            .arg(&base.disk)
            .arg(vm.path("disk.qcow2"));
        if let Some(mib) = spec.disk_mib {
            let base_mib = tokio::fs::metadata(&base.disk)
                .await
                .map(|m| m.len() / (1 << 20))
                .unwrap_or(0);
            if base.format == DiskFormat::Raw && mib < base_mib {
                return Err(HvError::DiskTooSmall {
                    template: spec.template.clone(),
                    mib,
                    base_mib,
                });
            }
            img.arg(format!("{mib}M"));
        }
        let t = std::time::Instant::now();
        run(&mut img, "qemu-img create (copy-on-write overlay)").await?;
        vm.record_timing("clone_ms", ms(t));
        Ok(())
    }

    /// Records the VM's disk in the image store. A running guest is paused while its disk is
    /// read, so that the copy is crash-consistent.
    pub(super) async fn snapshot_disk(&self, vm: &Vm) -> Result<DiskSnapshot, HvError> {
        let name = vm.status().name;
        let in_vm = |what: &'static str| {
            let vm = name.clone();
            move |e: HvError| HvError::Vm {
                vm,
                what,
                source: Box::new(e),
            }
        };
        let _busy = vm.busy.lock().await;
        let raw = vm.path("snapshot.raw.partial");
        let mut paused = false;
        if vm.state() == VmState::Running {
            let mut q = self.qmp(vm).await.map_err(in_vm("pausing for the snapshot"))?;
            let pause = |e: crate::qemu::qmp::QmpError| in_vm("pausing for the snapshot")(e.into());
            // A guest a migration paused stays paused: running it after the copy could make a
            // second copy of a guest that runs elsewhere.
            if q.status().await.map_err(pause)? == "running" {
                q.execute("stop", None).await.map_err(pause)?;
                paused = true;
            }
        }
        let mut convert = Command::new(&self.cfg.qemu_img);
        // -U: QEMU holds the image's write lock; reading a paused guest's disk is safe.
        convert
            .args(["convert", "-U", "-O", "raw", "-S", "4k"])
            .arg(vm.path("disk.qcow2"))
            .arg(&raw);
        let read = run(&mut convert, "qemu-img convert").await;
        if paused {
            let resumed = match self.qmp(vm).await {
                Ok(mut q) => q.execute("cont", None).await.map(|_| ()).map_err(HvError::from),
                Err(e) => Err(e),
            };
            if let Err(e) = resumed {
                tracing::error!(vm = %name, "resuming after the snapshot: {e}");
            }
        }
        let result = match read {
            Ok(()) => self
                .source
                .store_image(&raw)
                .await
                .map_err(|e| in_vm("storing the disk")(HvError::Store(e))),
            Err(e) => Err(in_vm("reading the disk")(e)),
        };
        let _ = tokio::fs::remove_file(&raw).await;
        result
    }
}

/// Removes what a VM had on the host, but for its console and QEMU logs.
pub(super) async fn cleanup_dir(dir: &Path) {
    for f in [
        "disk.qcow2",
        "seed.img",
        "qmp.sock",
        "qemu.pid",
        "memory.state",
        "memory.state.partial",
        super::checkpoint::RECORD,
        super::checkpoint::TEMP_IMAGE,
        super::checkpoint::TEMP_RAW,
    ] {
        let _ = tokio::fs::remove_file(dir.join(f)).await;
    }
}

/// Runs a host tool (`qemu-img`, `mkfs.vfat`, `mcopy`) to completion; its stderr is the reason
/// when it fails.
pub(super) async fn run(cmd: &mut Command, what: &str) -> Result<(), HvError> {
    output(cmd, what).await.map(|_| ())
}

/// Runs a host tool to completion and returns what it printed.
pub(super) async fn output(cmd: &mut Command, what: &str) -> Result<Vec<u8>, HvError> {
    let out = cmd.output().await.map_err(|source| HvError::Spawn {
        what: what.to_string(),
        source,
    })?;
    if !out.status.success() {
        return Err(HvError::Tool {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// The bytes a file takes on disk (its allocated blocks, not its apparent size): an overlay's
/// own data.
pub(super) fn allocated_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}
