//! A host dies under real guests (TCG): three hosts in network namespaces with the bridge
//! driver, a cluster of two demo guests on two hosts, one counting on its disk and one pinging
//! it. The counting guest is checkpointed, its host's namespace is killed whole (agent and
//! QEMU), and it comes up on the third host from the checkpoint: its counter resumes from the
//! value on disk at the checkpoint, its address is the same and the peer's pings come back.
//! The dead host's agent restarts and rejoins empty. Then the guest's new host is cut off from
//! every other host and the controller: its own agent stops the guest (self-fencing) before the
//! guest is restarted elsewhere, so that there is never more than one copy, and it rejoins
//! empty when its link returns.

mod common;
mod netlab;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use netlab::Lab;

/// `*-0` counts on its disk, resuming from the value there at every boot (user data runs once
/// per instance, so the counter installs itself as a per-boot script, as a real guest's service
/// would); `*-1` pings `*-0`.
fn workload(target: &str) -> String {
    format!(
        r#"#!/bin/sh
case "$(hostname)" in
*-0)
  mkdir -p /var/lib/cloud/scripts/per-boot
  cat > /var/lib/cloud/scripts/per-boot/count <<'END'
#!/bin/sh
i=$(cat /var/lib/count 2>/dev/null || echo 0)
echo "resumed $i"
while :; do
  i=$((i + 1))
  echo "$i" > /var/lib/count
  sync
  echo "count $i"
  sleep 0.2
done
END
  chmod 0755 /var/lib/cloud/scripts/per-boot/count
  sync
  exec /var/lib/cloud/scripts/per-boot/count ;;
*-1)
  ping -i 0.2 {target} ;;
esac
"#
    )
}

fn numbers(console: &str, prefix: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim_end().rsplit_once(prefix)?.1.parse().ok())
        .collect()
}

fn pongs(console: &str) -> usize {
    console.lines().filter(|l| l.contains("seq=")).count()
}

fn host_of(lab: &Lab, vm: &str) -> String {
    lab.json(&["vm", "show", vm])["host"].as_str().unwrap().to_string()
}

fn console(lab: &Lab, vm: &str) -> String {
    let o = lab.cli(&["vm", "console", vm]);
    if o.status.success() {
        stdout(&o)
    } else {
        String::new()
    }
}

/// Running QEMU processes of `vm` among this lab's hosts.
fn qemus(lab: &Lab, vm: &str) -> Vec<u32> {
    let data = lab.data().display().to_string();
    let o = Command::new("pgrep").args(["-af", "qemu-system"]).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains(&format!("-name {vm} ")) && l.contains(&data))
        .filter_map(|l| l.split_once(' ')?.0.parse().ok())
        .collect()
}

fn stdout_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn index(host: &str) -> usize {
    host.trim_start_matches('h').parse().unwrap()
}

fn evacuation(lab: &Lab, host: &str) -> Option<serde_json::Value> {
    lab.json(&["operation", "list"])
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|o| o["kind"] == "host_evacuate" && o["target"] == host)
        .cloned()
}

fn host_state(lab: &Lab, host: &str) -> String {
    lab.json(&["host", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == host)
        .map(|h| h["state"].as_str().unwrap().to_string())
        .unwrap()
}

#[test]
fn a_dead_hosts_guest_restarts_elsewhere_from_its_checkpoint_and_a_cut_off_host_fences_itself() {
    let mut lab = Lab::new(3);
    lab.host_timeout = "6";
    lab.fence_margin = "3";
    lab.start_demo_hosts(3);
    let target = lab.demo_network("fn", 78, 4546, "ha", workload);
    // Bad input first: refused, naming the value, nothing made.
    let e = lab.cli(&[
        "cluster",
        "create",
        "bad",
        "--profile",
        "ha",
        "--size",
        "1",
        "--checkpoint-interval",
        "2s",
    ]);
    assert!(!e.status.success());
    assert!(
        stderr(&e).contains("\"2s\"") && stderr(&e).contains("the shortest is 5s"),
        "{}",
        stderr(&e)
    );
    assert!(!lab.cli(&["cluster", "show", "bad"]).status.success());
    lab.ok(&[
        "cluster",
        "create",
        "fo",
        "--profile",
        "ha",
        "--size",
        "2",
        "--anti-affinity",
        "host",
        "--wait",
    ]);
    assert_eq!(lab.json(&["vm", "show", "fo-0"])["ip"], target.as_str());

    let mut c = vec![];
    eventually(Duration::from_secs(120), "the counter", || {
        c = numbers(&console(&lab, "fo-0"), "count ");
        c.len() > 5
    });
    eventually(Duration::from_secs(60), "the pings", || {
        pongs(&console(&lab, "fo-1")) > 3
    });
    // The checkpoint: what the counter was on disk then lies between these two.
    let lo = *numbers(&console(&lab, "fo-0"), "count ").last().unwrap();
    let cp = lab.json(&["vm", "checkpoint", "fo-0"]);
    let hi = *numbers(&console(&lab, "fo-0"), "count ").last().unwrap();
    assert_eq!(cp["seq"], 1, "{cp}");
    assert_eq!(cp["safe"], true, "held in two places: {cp}");
    assert!(cp["blocks"]["own_bytes"].as_u64().unwrap() > 0, "the guest wrote: {cp}");
    let blocks = lab.ok(&["vm", "blocks", "fo-0"]);
    assert!(blocks.contains("#1") && blocks.contains("safe"), "{blocks}");
    let blocks = lab.ok(&["cluster", "blocks", "fo"]);
    assert!(
        blocks.contains("fo-0 #1") && blocks.contains("fo-1") && blocks.contains("never") && blocks.contains("total"),
        "{blocks}"
    );
    // Counting goes on well past the checkpoint before the host dies.
    eventually(Duration::from_secs(60), "the counter to pass the checkpoint", || {
        numbers(&console(&lab, "fo-0"), "count ")
            .last()
            .is_some_and(|l| *l > hi + 15)
    });
    let before_death = *numbers(&console(&lab, "fo-0"), "count ").last().unwrap();

    let (first, peer) = (host_of(&lab, "fo-0"), host_of(&lab, "fo-1"));
    let third = (0..3)
        .map(|i| format!("h{i}"))
        .find(|h| *h != first && *h != peer)
        .unwrap();
    let t = Instant::now();
    lab.kill_host(index(&first));
    eventually(Duration::from_secs(120), "fo-0 to run on the third host", || {
        let v = lab.json(&["vm", "show", "fo-0"]);
        v["host"] == third.as_str() && v["state"] == "running"
    });
    let restart = t.elapsed();
    eprintln!("host death to the guest running elsewhere: {restart:.1?}");
    assert_eq!(host_state(&lab, &first), "failed");
    let op = evacuation(&lab, &first).unwrap();
    assert!(
        op["steps"][1]["message"]
            .as_str()
            .unwrap()
            .contains("from checkpoint #1"),
        "{op}"
    );
    let v = lab.json(&["vm", "show", "fo-0"]);
    assert_eq!(v["ip"], target.as_str(), "address kept");
    let mut resumed = vec![];
    let deadline = Instant::now() + Duration::from_secs(120);
    while resumed.is_empty() {
        let c = console(&lab, "fo-0");
        resumed = numbers(&c, "resumed ");
        assert!(
            Instant::now() < deadline,
            "the guest did not resume counting; its console:\n{c}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let from = resumed[0];
    assert!(
        lo <= from && from <= hi + 1 && from < before_death,
        "the disk is as of the checkpoint ({lo}..={hi}), not of the death ({before_death}): resumed from {from}"
    );
    let pings = pongs(&console(&lab, "fo-1"));
    eventually(Duration::from_secs(60), "the peer to reach it again", || {
        pongs(&console(&lab, "fo-1")) > pings + 5
    });
    assert_eq!(qemus(&lab, "fo-0").len(), 1);

    // The dead host comes back: its stale copy is removed, never run; it rejoins empty.
    lab.start_agent(index(&first), "bridge");
    eventually(Duration::from_secs(60), "the dead host to rejoin", || {
        host_state(&lab, &first) == "up"
    });
    let vms = lab.json(&["vm", "list"]);
    assert!(
        vms.as_array().unwrap().iter().all(|v| v["host"] != first.as_str()),
        "{vms}"
    );
    assert_eq!(qemus(&lab, "fo-0").len(), 1);
    assert!(
        !lab.data()
            .join(&first)
            .join("qemu/vms")
            .join(v["uuid"].as_str().unwrap())
            .exists(),
        "the stale VM's files are gone"
    );

    // The guest's new host is cut off from everything: its agent stops the guest itself, and
    // only then does the guest run again, on the host that came back.
    let old_qemu = qemus(&lab, "fo-0");
    lab.set_link(index(&third), false);
    let t = Instant::now();
    eventually(
        Duration::from_secs(120),
        "fo-0 to run on the host that came back",
        || {
            let v = lab.json(&["vm", "show", "fo-0"]);
            v["host"] == first.as_str() && v["state"] == "running"
        },
    );
    eprintln!("host cut off to the guest running elsewhere: {:.1?}", t.elapsed());
    assert!(
        old_qemu.iter().all(|p| !qemus(&lab, "fo-0").contains(p)),
        "the cut-off host's copy was stopped by its own agent"
    );
    let log = std::fs::read_to_string(lab.dir.path().join(format!("{third}.log"))).unwrap();
    assert!(log.contains("self-fenced"), "{log}");
    assert_eq!(qemus(&lab, "fo-0").len(), 1);
    lab.set_link(index(&third), true);
    eventually(Duration::from_secs(60), "the cut-off host to rejoin", || {
        host_state(&lab, &third) == "up"
    });
    eventually(Duration::from_secs(60), "its stale copy to go", || {
        lab.json(&["vm", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["host"] != third.as_str())
    });
    assert_eq!(qemus(&lab, "fo-0").len(), 1);

    // Only the agent dies; its host and the guest's QEMU live on. Its fence guard kills the
    // QEMU once the lease runs out, before the guest is restarted elsewhere.
    let host = host_of(&lab, "fo-0");
    let old_qemu = qemus(&lab, "fo-0");
    let agent = Command::new("pgrep")
        .args(["-f", &format!("agent --name {host} ")])
        .output()
        .unwrap();
    let agent_pids: Vec<String> = stdout_of(&agent).split_whitespace().map(str::to_string).collect();
    assert!(!agent_pids.is_empty(), "the agent of {host}");
    for pid in &agent_pids {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    let t = Instant::now();
    eventually(Duration::from_secs(120), "fo-0 to run elsewhere", || {
        let v = lab.json(&["vm", "show", "fo-0"]);
        v["host"] != host.as_str() && v["state"] == "running"
    });
    eprintln!("agent killed to the guest running elsewhere: {:.1?}", t.elapsed());
    assert!(
        old_qemu.iter().all(|p| !qemus(&lab, "fo-0").contains(p)),
        "the guard stopped the old copy"
    );
    assert_eq!(qemus(&lab, "fo-0").len(), 1);
    let guard = std::fs::read_to_string(lab.data().join(&host).join("fence-guard.log")).unwrap_or_default();
    assert!(guard.contains("killed every QEMU"), "{guard}");
    lab.ok(&["cluster", "delete", "fo", "--wait"]);
    eventually(Duration::from_secs(60), "no QEMU left", || {
        qemus(&lab, "fo-0").is_empty() && qemus(&lab, "fo-1").is_empty()
    });
}
