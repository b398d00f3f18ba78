//! Choosing the accelerator. `/dev/kvm` may exist and still not run guests (it hangs on these
//! machines), so KVM is used only when a probe VM actually executes code under it: a 512-byte
//! boot sector that writes one byte to the serial port. Otherwise TCG.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// `mov dx,0x3f8; mov al,'K'; out dx,al; cli; hlt; jmp $`, padded, with the boot signature.
fn probe_sector() -> Vec<u8> {
    let mut s = vec![0xBA, 0xF8, 0x03, 0xB0, b'K', 0xEE, 0xFA, 0xF4, 0xEB, 0xFE];
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}

/// Runs the probe under KVM in `dir`; true when the guest wrote its byte within `timeout`.
pub async fn kvm_works(qemu: &Path, dir: &Path, timeout: Duration) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let img = dir.join("kvm-probe.img");
    let out = dir.join("kvm-probe.out");
    if tokio::fs::write(&img, probe_sector()).await.is_err() {
        return false;
    }
    let _ = tokio::fs::remove_file(&out).await;
    let child = Command::new(qemu)
        .args([
            "-machine",
            "pc,accel=kvm",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", img.display()))
        .arg("-serial")
        .arg(format!("file:{}", out.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ok = false;
    while tokio::time::Instant::now() < deadline {
        if tokio::fs::read(&out).await.map(|b| b.contains(&b'K')).unwrap_or(false) {
            ok = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill().await;
    let _ = tokio::fs::remove_file(&img).await;
    let _ = tokio::fs::remove_file(&out).await;
    ok
}
