//! Live migration between real hosts under TCG: three hosts in network namespaces (as `make
//! test-net` does) with the bridge driver, a cluster of two demo guests on one host, one busy
//! (a counter kept in memory and on disk, checked against each other with the page cache
//! dropped) and one pinging it. `host drain` moves both, `vm migrate` moves the busy one again
//! in `auto` mode (pause, under TCG), and each fault rolls back or resolves: the destination's
//! QEMU killed mid-copy, the controller killed mid-copy, the destination's link cut.

mod common;
mod netlab;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use netlab::Lab;

/// The guests' user data: `*-0` counts (RAM and disk, verified with the page cache dropped,
/// `MISMATCH` on any difference), `*-1` pings `*-0` five times a second.
fn workload(target: &str) -> String {
    format!(
        r#"#!/bin/sh
case "$(hostname)" in
*-0)
  i=$(cat /var/lib/count 2>/dev/null || echo 0)
  while :; do
    i=$((i + 1))
    echo "$i" > /tmp/count
    echo "$i" > /var/lib/count
    sync
    echo 3 > /proc/sys/vm/drop_caches
    d=$(cat /var/lib/count); r=$(cat /tmp/count)
    [ "$d" = "$i" ] && [ "$r" = "$i" ] || echo "MISMATCH ram $r disk $d want $i"
    echo "count $i"
    sleep 0.2
  done ;;
*-1)
  ping -i 0.2 {target} ;;
esac
"#
    )
}

/// The `count N` values on a console, in order (the demo guest prefixes its scripts' lines
/// with `user-data: `).
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim_end().rsplit_once("count ")?.1.parse().ok())
        .collect()
}

/// The ping sequence numbers answered, in order.
fn pongs(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.split("seq=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

fn host_of(lab: &Lab, vm: &str) -> String {
    lab.json(&["vm", "show", vm])["host"].as_str().unwrap().to_string()
}

fn console(lab: &Lab, vm: &str) -> String {
    lab.ok(&["vm", "console", vm])
}

/// Waits until the busy guest's console (on its current host) shows a count above `after`.
fn counting_past(lab: &Lab, after: u64) -> Vec<u64> {
    let mut c = vec![];
    eventually(Duration::from_secs(120), "the counter to go on", || {
        c = counts(&console(lab, "mig-0"));
        c.last().is_some_and(|l| *l > after)
    });
    c
}

/// QEMU processes of `vm` (by the `-name` QEMU gets) of this lab's hosts, with their command lines.
fn qemus(lab: &Lab, vm: &str) -> Vec<(u32, String)> {
    let data = lab.data().display().to_string();
    let o = Command::new("pgrep").args(["-af", "qemu-system"]).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains(&format!("-name {vm} ")) && l.contains(&data))
        .filter_map(|l| {
            let (pid, cmd) = l.split_once(' ')?;
            Some((pid.parse().ok()?, cmd.to_string()))
        })
        .collect()
}

/// Starts `vm migrate` and returns the operation id, once its copy is under way.
fn start_migration(lab: &Lab, args: &[&str]) -> String {
    let mut a = vec!["vm", "migrate", "mig-0"];
    a.extend_from_slice(args);
    let op = lab.json(&a);
    let id = op["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(120), "the copy to start", || {
        let op = lab.json(&["operation", "show", &id]);
        op["steps"][1]["state"] == "running" || op["state"] != "running"
    });
    id
}

fn wait_op(lab: &Lab, id: &str) -> serde_json::Value {
    let mut op = serde_json::Value::Null;
    eventually(Duration::from_secs(300), "the operation to end", || {
        op = lab.json(&["operation", "show", id]);
        op["state"] != "running"
    });
    op
}

#[test]
fn running_guests_move_between_hosts_and_every_fault_rolls_back() {
    let mut lab = Lab::new(3);
    lab.start_demo_hosts(3);
    lab.demo_network("mn", 79, 4545, "busy", workload);
    lab.ok(&[
        "cluster",
        "create",
        "mig",
        "--profile",
        "busy",
        "--size",
        "2",
        "--placement",
        "pack",
        "--wait",
    ]);
    let first = host_of(&lab, "mig-0");
    assert_eq!(host_of(&lab, "mig-1"), first, "pack puts both guests on one host");
    let before = counting_past(&lab, 3);
    eventually(Duration::from_secs(60), "the peer's pings", || {
        pongs(&console(&lab, "mig-1")).len() > 3
    });

    // A drain moves both guests off their host; the counter and the pings go on.
    let t = Instant::now();
    lab.ok(&["host", "drain", &first]);
    eprintln!("drain of 2 busy guests: {:.1?}", t.elapsed());
    let (h0, h1) = (host_of(&lab, "mig-0"), host_of(&lab, "mig-1"));
    assert!(h0 != first && h1 != first, "{h0} {h1}");
    let vms = lab.json(&["vm", "list", "--cluster", "mig"]);
    assert!(vms.as_array().unwrap().iter().all(|v| v["state"] == "running"), "{vms}");
    let last_before = *before.last().unwrap();
    let after = counting_past(&lab, last_before);
    assert!(
        after[0] > last_before.min(before[0]),
        "the counter restarted: before {before:?}, after {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter jumped: {after:?}"
    );
    let c0 = console(&lab, "mig-0");
    assert!(
        !c0.contains("MISMATCH"),
        "memory and disk disagree after the move:\n{c0}"
    );
    eventually(Duration::from_secs(60), "the pings to resume", || {
        let p = pongs(&console(&lab, "mig-1"));
        p.len() > 10
    });
    lab.ok(&["host", "undrain", &first]);

    // `vm migrate` to a named host, following its progress; auto is pause under TCG.
    let dest = ["h0", "h1", "h2"]
        .into_iter()
        .find(|h| *h != host_of(&lab, "mig-0") && *h != host_of(&lab, "mig-1"))
        .unwrap();
    let seen = counts(&console(&lab, "mig-0")).last().copied().unwrap_or(0);
    let pongs_before = pongs(&console(&lab, "mig-1"));
    let t = Instant::now();
    let out = lab.ok(&["vm", "migrate", "mig-0", "--to", dest, "--wait"]);
    eprintln!("vm migrate: {:.1?}\n{out}", t.elapsed());
    assert!(out.contains("succeeded") && out.contains("pause mode"), "{out}");
    assert_eq!(host_of(&lab, "mig-0"), dest);
    let after = counting_past(&lab, seen);
    assert!(after[0] > seen, "{seen} then {after:?}");
    // The peer lost at most the pause's worth of pings, and they go on.
    let all = pongs(&console(&lab, "mig-1"));
    let new: Vec<u64> = all
        .iter()
        .copied()
        .filter(|s| *s > *pongs_before.last().unwrap())
        .collect();
    eventually(Duration::from_secs(60), "pings after the move", || {
        pongs(&console(&lab, "mig-1")).len() > all.len() + 5
    });
    if let (Some(a), Some(b)) = (new.first(), new.last()) {
        let lost = (b - a + 1) as usize - new.len();
        eprintln!("pings lost during the move: {lost} of {}", b - a + 1);
    }
    // The source's paused copy goes once its host reports it (an orphan now).
    eventually(Duration::from_secs(30), "the source's copy to go", || {
        qemus(&lab, "mig-0").len() == 1
    });

    // Fault: the destination's QEMU killed mid-copy → rolled back, the guest runs on.
    let src = host_of(&lab, "mig-0");
    let dest = ["h0", "h1", "h2"].into_iter().find(|h| *h != src).unwrap();
    let id = start_migration(&lab, &["--to", dest, "--bandwidth", "1"]);
    // A second migration of the same VM meanwhile is refused.
    let e = stderr(&lab.cli(&["vm", "migrate", "mig-0"]));
    assert!(e.contains("VM mig-0 is already migrating"), "{e}");
    // The destination's QEMU, by its data directory (a VM that arrived by migration keeps
    // `-incoming` on its command line, so that does not tell them apart).
    let at_dest = format!("/data/{dest}/qemu/");
    let incoming: Vec<(u32, String)> = qemus(&lab, "mig-0")
        .into_iter()
        .filter(|(_, c)| c.contains(&at_dest))
        .collect();
    assert_eq!(
        incoming.len(),
        1,
        "{incoming:?}: {}",
        lab.json(&["operation", "show", &id])
    );
    kill9(incoming[0].0);
    let op = wait_op(&lab, &id);
    assert_eq!(op["state"], "failed", "{op}");
    let err = op["error"].as_str().unwrap();
    assert!(err.contains("rolled back") && err.contains(&src), "{err}");
    assert_eq!(host_of(&lab, "mig-0"), src);
    let seen = counts(&console(&lab, "mig-0")).last().copied().unwrap_or(0);
    counting_past(&lab, seen);
    eventually(Duration::from_secs(30), "one QEMU of mig-0", || {
        qemus(&lab, "mig-0").len() == 1
    });

    // Fault: the controller killed mid-copy → after its restart the move completes or is
    // undone, exactly once.
    let id = start_migration(&lab, &["--to", dest, "--bandwidth", "8"]);
    lab.restart_controller();
    let op = wait_op(&lab, &id);
    let now = host_of(&lab, "mig-0");
    match op["state"].as_str() {
        Some("succeeded") => assert_eq!(now, dest, "{op}"),
        _ => assert_eq!(now, src, "{op}"),
    }
    eprintln!("after the controller's restart the migration {}", op["state"]);
    eventually(Duration::from_secs(60), "exactly one QEMU of mig-0", || {
        qemus(&lab, "mig-0").len() == 1
    });
    let seen = counts(&console(&lab, "mig-0")).last().copied().unwrap_or(0);
    counting_past(&lab, seen);

    // Fault: the destination's link cut mid-copy → the destination is down to the controller,
    // the move is undone, and the copy it left is removed once it is back.
    let src = host_of(&lab, "mig-0");
    let dest = ["h0", "h1", "h2"]
        .into_iter()
        .find(|h| *h != src && *h != host_of(&lab, "mig-1"))
        .unwrap();
    let di: usize = dest.trim_start_matches('h').parse().unwrap();
    let id = start_migration(&lab, &["--to", dest, "--bandwidth", "1"]);
    let veth = format!("slv{}{di}", lab.tag);
    netlab::ip(&["link", "set", &veth, "down"]);
    // Once the destination is down to the controller (the lab's host timeout, 20 s) the move
    // is undone, the link still cut: the source drops its connections to the vanished
    // destination and its guest runs on.
    let op = wait_op(&lab, &id);
    assert_eq!(op["state"], "failed", "{op}");
    assert!(op["error"].as_str().unwrap().contains(dest), "{op}");
    assert_eq!(host_of(&lab, "mig-0"), src);
    let seen = counts(&console(&lab, "mig-0")).last().copied().unwrap_or(0);
    counting_past(&lab, seen);
    // The link returns: the destination's copy is removed as an orphan.
    netlab::ip(&["link", "set", &veth, "up"]);
    eventually(Duration::from_secs(90), "the cut-off copy to be removed", || {
        qemus(&lab, "mig-0").len() == 1
    });
    // Cut off from everything for longer than its lease, it was declared failed (and fenced
    // itself); it rejoins once it holds nothing.
    eventually(Duration::from_secs(90), "the cut-off host to rejoin", || {
        lab.json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == dest && h["state"] == "up")
    });
    assert!(!console(&lab, "mig-0").contains("MISMATCH"));

    // Bad input through the CLI: named, nothing changed.
    let refused = |args: &[&str], words: &[&str]| {
        let mut a = vec!["vm", "migrate"];
        a.extend_from_slice(args);
        let o = lab.cli(&a);
        assert!(!o.status.success(), "{a:?} was not refused");
        let e = stderr(&o);
        for w in words {
            assert!(e.contains(w), "{a:?}: {e} lacks {w:?}");
        }
    };
    refused(&["nope-0"], &["VM \"nope-0\" not found"]);
    refused(&["mig-0", "--to", "h9"], &["host \"h9\" not found"]);
    refused(&["mig-0", "--to", &src], &["already runs on host", &src]);
    let other = ["h0", "h1", "h2"].into_iter().find(|h| *h != src).unwrap();
    lab.ok(&["host", "maintenance", other]);
    refused(&["mig-0", "--to", other], &[other, "maintenance"]);
    lab.ok(&["host", "maintenance", other, "--off"]);
    // A suspended or stopped guest does not migrate; it is told what to do instead.
    lab.ok(&["vm", "suspend", "mig-1"]);
    refused(&["mig-1"], &["suspended", "resume it first"]);
    lab.ok(&["vm", "resume", "mig-1"]);
    lab.ok(&["vm", "stop", "mig-1", "--force"]);
    refused(&["mig-1"], &["stopped", "start it first"]);
    lab.ok(&["vm", "start", "mig-1"]);
    assert_eq!(host_of(&lab, "mig-0"), src, "nothing moved");
    assert!(lab
        .json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["state"] == "running"));
    lab.ok(&["cluster", "delete", "mig", "--wait"]);
    drop(lab);
}

fn kill9(pid: u32) {
    let ok = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(ok.success());
}
