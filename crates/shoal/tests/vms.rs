//! Real VMs under TCG, end to end: `shoal up --driver qemu` with two hosts, the demo template,
//! a 2-VM virtual cluster. Checks what each guest printed, suspend and resume, a QEMU killed
//! under the agent, and that deleting the cluster leaves no process or file behind.

mod common;

use std::time::Duration;

use common::*;

fn qemu_processes_of(uuid: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|p| {
            std::fs::read(p.path().join("cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(uuid)
                })
                .unwrap_or(false)
        })
        .count()
}

/// QEMU outlives its agent by design, so a test that fails half-way would leave its guests
/// running: on the way out, kill every QEMU whose command line names the test's directory.
struct KillGuests(std::path::PathBuf);

impl Drop for KillGuests {
    fn drop(&mut self) {
        let dir = self.0.display().to_string();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("qemu-system") && cmd.contains(&dir) {
                let _ = std::process::Command::new("kill").arg("-9").arg(p.file_name()).status();
            }
        }
    }
}

fn console(url: &str, vm: &str) -> String {
    ok(url, &["vm", "console", vm])
}

/// The highest `alive N` the guest printed.
fn alive(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("alive ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_two_vm_cluster_of_real_guests_boots_suspends_resumes_and_survives_a_crash() {
    assert!(
        std::path::Path::new("/usr/bin/qemu-system-x86_64").exists(),
        "qemu-system-x86_64 is not installed: run scripts/install-deps.sh (make test does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let _guests = KillGuests(dir.path().to_path_buf());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("data");
    let _up = Daemon::spawn(
        &[
            "up",
            "--hosts",
            "2",
            "--driver",
            "qemu",
            "--accel",
            "tcg",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--host-cpus",
            "2",
            "--host-memory",
            "2048",
            "--ready-timeout",
            "180",
            "--stop-timeout",
            "20",
        ],
        &dir.path().join("up.log"),
    );
    wait_ready(&url, &_up);
    eventually(Duration::from_secs(30), "2 hosts", || {
        json(&url, &["host", "list"]).as_array().unwrap().len() == 2
    });
    assert_eq!(json(&url, &["host", "list"])[0]["driver"], "qemu/tcg");

    ok(&url, &["template", "build-demo", "demo"]);
    let t = json(&url, &["template", "list"]);
    assert!(t[0]["kernel_boot"]["cmdline"]
        .as_str()
        .unwrap()
        .contains("console=ttyS0"));
    ok(
        &url,
        &[
            "profile",
            "create",
            "tiny",
            "--template",
            "demo",
            "--cpus",
            "1",
            "--memory",
            "128MiB",
        ],
    );
    let o = cli(
        &url,
        &[],
        &["cluster", "create", "lab", "--profile", "tiny", "--size", "2", "--wait"],
    );
    assert!(o.status.success(), "{}\n{}", stderr(&o), _up.log());

    // Each guest configured itself from its seed: the name and address Shoal assigned.
    let vms = json(&url, &["vm", "list", "--cluster", "lab"]);
    let vms = vms.as_array().unwrap();
    let hosts: std::collections::HashSet<&str> = vms.iter().map(|v| v["host"].as_str().unwrap()).collect();
    assert_eq!(hosts.len(), 2, "spread over both hosts");
    for v in vms {
        let name = v["name"].as_str().unwrap();
        let ip = v["ip"].as_str().unwrap();
        let text = console(&url, name);
        assert!(text.contains(&format!("ready {name} {ip}")), "{name} printed:\n{text}");
        assert_eq!(v["state"], "running");
    }

    // Suspend and resume: the console goes on from where it stopped, without a new boot.
    eventually(Duration::from_secs(30), "lab-0 to tick", || {
        alive(&console(&url, "lab-0")) >= 2
    });
    let o = cli(&url, &[], &["vm", "suspend", "lab-0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&url, &["vm", "show", "lab-0"])["state"], "suspended");
    let before = alive(&console(&url, "lab-0"));
    let host0 = vms.iter().find(|v| v["name"] == "lab-0").unwrap()["host"]
        .as_str()
        .unwrap()
        .to_string();
    let h = json(&url, &["host", "list"]);
    let h = h
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == host0.as_str())
        .unwrap()
        .clone();
    assert_eq!(h["used_cpus"], 0, "a suspended VM gives its vCPU back: {h}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(alive(&console(&url, "lab-0")), before, "a suspended guest must not run");
    let o = cli(&url, &[], &["vm", "resume", "lab-0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    eventually(Duration::from_secs(30), "lab-0 to tick after resume", || {
        alive(&console(&url, "lab-0")) > before
    });
    let text = console(&url, "lab-0");
    assert_eq!(
        text.matches("ready lab-0").count(),
        1,
        "the guest booted again instead of resuming:\n{text}"
    );
    let after = alive(&text);
    assert!(
        after <= before + 5,
        "the counter jumped from {before} to {after}: not a resume"
    );

    // The disk of a running VM into the image store: it shares nearly every chunk with its
    // template, and the guest goes on after the pause.
    let snap = json(&url, &["vm", "snapshot", "lab-0"]);
    let (data_bytes, shared) = (
        snap["data_bytes"].as_u64().unwrap(),
        snap["shared_with_template_bytes"].as_u64().unwrap(),
    );
    assert!(
        data_bytes > 0 && shared * 10 >= data_bytes * 9,
        "the snapshot shares too little with its template: {snap}"
    );
    assert!(snap["image"].as_str().unwrap().starts_with("vm/lab-0/"), "{snap}");
    let ticks = alive(&console(&url, "lab-0"));
    eventually(Duration::from_secs(30), "lab-0 to tick after the snapshot", || {
        alive(&console(&url, "lab-0")) > ticks
    });
    // Published as a template, that disk boots a new VM, which configures itself as its own.
    let published = json(&url, &["template", "publish", "lab-0", "demo2"]);
    assert!(
        published["hash"].as_str().unwrap().starts_with("manifest:"),
        "{published}"
    );
    ok(
        &url,
        &[
            "profile",
            "create",
            "tiny2",
            "--template",
            "demo2",
            "--cpus",
            "1",
            "--memory",
            "128MiB",
        ],
    );
    let o = cli(
        &url,
        &[],
        &[
            "cluster",
            "create",
            "lab2",
            "--profile",
            "tiny2",
            "--size",
            "1",
            "--wait",
        ],
    );
    assert!(o.status.success(), "{}\n{}", stderr(&o), _up.log());
    let ip2 = json(&url, &["vm", "show", "lab2-0"])["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let text = console(&url, "lab2-0");
    assert!(text.contains(&format!("ready lab2-0 {ip2}")), "lab2-0 printed:\n{text}");
    let uuid2 = json(&url, &["vm", "show", "lab2-0"])["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&url, &["cluster", "delete", "lab2", "--wait"]);
    assert_eq!(qemu_processes_of(&uuid2), 0);

    // A QEMU killed behind the agent's back: that VM fails, the host and the other VM go on.
    let lab1 = json(&url, &["vm", "show", "lab-1"]);
    let uuid1 = lab1["uuid"].as_str().unwrap().to_string();
    let pidfile = data
        .join("agents")
        .join(lab1["host"].as_str().unwrap())
        .join("qemu/vms")
        .join(&uuid1)
        .join("qemu.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    eventually(Duration::from_secs(20), "lab-1 to be failed", || {
        json(&url, &["vm", "show", "lab-1"])["state"] == "failed"
    });
    let reason = json(&url, &["vm", "show", "lab-1"])["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("killed by signal 9"), "{reason}");
    assert_eq!(json(&url, &["cluster", "show", "lab"])["state"], "degraded");
    assert_eq!(json(&url, &["vm", "show", "lab-0"])["state"], "running");
    assert!(json(&url, &["host", "list"])
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["state"] == "up"));
    let t0 = alive(&console(&url, "lab-0"));
    eventually(Duration::from_secs(20), "lab-0 to keep running", || {
        alive(&console(&url, "lab-0")) > t0
    });
    // It can be started again from its disk.
    let o = cli(&url, &[], &["vm", "start", "lab-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(console(&url, "lab-1").matches("ready lab-1").count(), 2);

    // Deleting the cluster leaves nothing on the hosts.
    let uuid0 = json(&url, &["vm", "show", "lab-0"])["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&url, &["cluster", "delete", "lab", "--wait"]);
    assert_eq!(qemu_processes_of(&uuid0) + qemu_processes_of(&uuid1), 0);
    for h in ["host1", "host2"] {
        let vms_dir = data.join("agents").join(h).join("qemu/vms");
        let left: Vec<_> = std::fs::read_dir(&vms_dir).unwrap().collect();
        assert!(left.is_empty(), "{h} kept {left:?}");
    }
}
