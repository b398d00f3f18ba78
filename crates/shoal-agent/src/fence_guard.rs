//! The fence guard: a small process of its own, next to a QEMU agent, that kills the host's
//! QEMUs once the agent's lease has run out, whether or not the agent is still alive to do it
//! (what a kernel watchdog does for Proxmox HA). The agent writes the moment its lease runs
//! out to `DATA_DIR/lease-deadline` (unix ms) whenever it changes; the guard reads it five
//! times a second. An agent that crashed, hung or was stopped for longer than its lease thus
//! leaves no VM running that the controller may be restarting elsewhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the agent writes its lease deadline.
pub fn deadline_path(data_dir: &Path) -> PathBuf {
    data_dir.join("lease-deadline")
}

fn pid_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fence-guard.pid")
}

/// Records the lease deadline for the guard (`None`: not armed, the host has no lease to run
/// out or no peers that could run its VMs). Written atomically; a failure (a full disk) is
/// logged, and the guard keeps the last deadline it read, which only makes it fence sooner.
pub fn write_deadline(data_dir: &Path, deadline_unix_ms: Option<u64>) {
    let path = deadline_path(data_dir);
    let result = match deadline_unix_ms {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(ms) => {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, ms.to_string()).and_then(|()| std::fs::rename(&tmp, &path))
        }
    };
    if let Err(e) = result {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

fn read_deadline(data_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(deadline_path(data_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs the guard for the agent in `data_dir`, whose QEMU driver keeps its VMs under
/// `qemu_dir`, until that data dir is gone. Blocking.
pub fn run(data_dir: &Path, qemu_dir: &Path) {
    tracing::info!(dir = %data_dir.display(), "fence guard watching the agent's lease");
    while data_dir.exists() {
        if let Some(deadline) = read_deadline(data_dir) {
            if shoal_model::now_ms() > deadline {
                let n = shoal_hv::qemu::kill_all(qemu_dir);
                tracing::error!(
                    vms = n,
                    "the agent's lease ran out with most peers out of reach: killed every QEMU of the host"
                );
                // Once: the agent arms it again when the controller renews its lease.
                write_deadline(data_dir, None);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts the guard for the agent in `data_dir` as a detached process (`exe fence-guard
/// --data-dir DIR`), unless one runs already. It outlives the agent on purpose.
pub fn ensure_running(exe: &Path, data_dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::process::CommandExt;
    let pidfile = pid_path(data_dir);
    if let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("fence-guard") && cmdline.contains(&*data_dir.to_string_lossy()) {
            return Ok(());
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("fence-guard.log"))
        .with_context(|| format!("opening {}/fence-guard.log", data_dir.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("fence-guard")
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting the fence guard ({})", exe.display()))?;
    std::fs::write(&pidfile, child.id().to_string()).with_context(|| format!("writing {}", pidfile.display()))?;
    Ok(())
}
