//! Virtual networks across hosts, for real: each test host is a `shoal agent` with the bridge
//! network driver in a network namespace of its own, joined to the others by an underlay of veth
//! pairs (MTU 1600) into a bridge of the test. Guests under TCG ping each other across hosts over
//! VXLAN; a guest of another network on the same hosts cannot reach them; bad input is refused
//! and leaves no bridge, VXLAN device, tap or FDB entry behind. `make test-net` runs these alone.

mod common;
mod netlab;

use std::time::Duration;

use common::*;
use netlab::{leftovers, Lab};

/// A guest script: after the guest is configured, ping each of PEERS until it answers or the
/// tries run out, and report `reach <ip> ok|fail` (plus the RTT summary) on the console.
fn pinger(prelude: &str, peers: &[String], tries: u32) -> String {
    format!(
        "#!/bin/sh\n{prelude}\nfor ip in {}; do\n  n=0; res=fail\n  while [ $n -lt {tries} ]; do\n    n=$((n+1))\n    if ping -c 1 -W 1 $ip >/dev/null 2>&1; then res=ok; break; fi\n  done\n  echo \"reach $ip $res after $n\"\n  [ $res = ok ] && ping -c 3 $ip | tail -n 1\ndone\n",
        peers.join(" ")
    )
}

fn console(lab: &Lab, vm: &str) -> String {
    lab.ok(&["vm", "console", vm])
}

#[test]
fn guests_on_two_hosts_reach_each_other_over_vxlan_and_other_networks_cannot() {
    across_two_hosts("bridge");
}

#[test]
fn guests_on_two_hosts_reach_each_other_with_the_unprivileged_udp_driver() {
    across_two_hosts("udp");
}

fn across_two_hosts(driver: &str) {
    let bridge = driver == "bridge";
    let mut lab = Lab::new(2);
    let tag = lab.tag.clone();
    lab.start_controller();
    lab.start_agent(0, driver);
    lab.start_agent(1, driver);
    eventually(Duration::from_secs(60), "2 hosts", || {
        lab.json(&["host", "list"]).as_array().map(|a| a.len()) == Some(2)
    });
    let hosts = lab.json(&["host", "list"]);
    for h in hosts.as_array().unwrap() {
        assert!(h["underlay_ip"].as_str().unwrap().starts_with("10.251."), "{h}");
    }
    lab.ok(&["template", "build-demo", "demo"]);

    // Network n1 (VNI 4242) with a 2-VM cluster, one VM per host, each pinging the other.
    let o = lab.octet;
    lab.ok(&["network", "create", "n1", "--subnet", &format!("10.77.{o}.0/24"), "--vni", "4242"]);
    lab.ok(&["network", "create", "n2", "--subnet", &format!("10.78.{o}.0/24"), "--vni", "4343"]);
    let peers = vec![format!("10.77.{o}.2"), format!("10.77.{o}.3")];
    let ud1 = lab.dir.path().join("ud1.sh");
    std::fs::write(&ud1, pinger("", &peers, 90)).unwrap();
    // The intruder claims an address in n1's subnet on its own network: if the segments were
    // one, it would reach them.
    let ud2 = lab.dir.path().join("ud2.sh");
    std::fs::write(&ud2, pinger(&format!("ip addr add 10.77.{o}.200/24 dev eth0"), &peers, 15)).unwrap();
    lab.ok(&["profile", "create", "p1", "--template", "demo", "--cpus", "1", "--memory", "128MiB", "--network", "n1",
             "--user-data", ud1.to_str().unwrap()]);
    lab.ok(&["profile", "create", "p2", "--template", "demo", "--cpus", "1", "--memory", "128MiB",
             "--user-data", ud2.to_str().unwrap()]);
    lab.ok(&["cluster", "create", "c1", "--profile", "p1", "--size", "2", "--anti-affinity", "host", "--wait"]);
    lab.ok(&["cluster", "create", "c2", "--profile", "p2", "--size", "1", "--network", "n2", "--wait"]);

    let vms = lab.json(&["vm", "list", "--cluster", "c1"]);
    let vms = vms.as_array().unwrap();
    let on: std::collections::HashSet<&str> = vms.iter().map(|v| v["host"].as_str().unwrap()).collect();
    assert_eq!(on.len(), 2, "one VM per host: {vms:?}");

    // On each host: the bridge, the VXLAN device and the VM's tap; the VXLAN device's FDB sends
    // flooded traffic to the other host's underlay address.
    for i in (0..2).filter(|_| bridge) {
        let links = lab.shoal_links(i);
        assert!(links.contains(&"shbr4242".to_string()) && links.contains(&"shvx4242".to_string()), "host {i}: {links:?}");
        assert!(links.iter().any(|l| l.starts_with("sht")), "host {i}: {links:?}");
        let other = lab.underlay(1 - i);
        let fdb = lab.fdb(i, "shvx4242");
        assert!(fdb.contains(&format!("00:00:00:00:00:00 dst {other}")), "host {i} FDB:\n{fdb}");
        let mtu = netlab::ip(&["-n", &lab.namespaces[i], "-o", "link", "show", "shvx4242"]);
        assert!(mtu.contains("mtu 1500"), "{mtu}");
    }

    // The UDP driver makes no device at all.
    for i in (0..2).filter(|_| !bridge) {
        assert!(lab.shoal_links(i).is_empty(), "{:?}", lab.shoal_links(i));
    }
    // Each guest reaches the other across hosts.
    for (vm, peer) in [("c1-0", &peers[1]), ("c1-1", &peers[0])] {
        eventually(Duration::from_secs(180), &format!("{vm} to report on {peer}"), || {
            console(&lab, vm).contains(&format!("reach {peer} "))
        });
        let text = console(&lab, vm);
        assert!(text.contains(&format!("reach {peer} ok")), "{vm} could not reach {peer}:\n{text}\n{}", lab.logs());
    }
    // The guest of the other network reaches neither.
    eventually(Duration::from_secs(180), "c2-0 to report", || console(&lab, "c2-0").matches("reach ").count() >= 2);
    let text = console(&lab, "c2-0");
    for p in &peers {
        assert!(text.contains(&format!("reach {p} fail")), "c2-0 reached {p} across networks:\n{text}");
    }

    // Scaling c1 down to one VM: the host that loses its last VM of n1 drops the network's
    // devices, and the other host's VXLAN device forgets it as a peer.
    let gone = vms.iter().find(|v| v["name"] == "c1-1").unwrap()["host"].as_str().unwrap().to_string();
    let (gone, kept): (usize, usize) = if gone == "h0" { (0, 1) } else { (1, 0) };
    lab.ok(&["cluster", "scale", "c1", "--size", "1", "--wait"]);
    if bridge {
        eventually(Duration::from_secs(20), "the emptied host to drop n1", || {
            !lab.shoal_links(gone).contains(&"shbr4242".to_string())
        });
        assert!(lab.shoal_links(gone).iter().all(|l| !l.ends_with("4242")), "{:?}", lab.shoal_links(gone));
        let other = lab.underlay(gone);
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while lab.fdb(kept, "shvx4242").contains(&format!("dst {other}")) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        let fdb = lab.fdb(kept, "shvx4242");
        assert!(!fdb.contains(&format!("dst {other}")), "the remaining host still sends to {other}:\n{fdb}\n{}", lab.logs());
        assert!(lab.shoal_links(kept).contains(&"shvx4242".to_string()));
    }
    let n1 = lab.json(&["network", "show", "n1"]);
    assert_eq!(n1["hosts"].as_array().unwrap().len(), 1, "{n1}");

    // Deleting the clusters removes every bridge, VXLAN device, tap and FDB entry on both hosts.
    lab.ok(&["cluster", "delete", "c2", "--wait"]);
    lab.ok(&["cluster", "delete", "c1", "--wait"]);
    for i in 0..2 {
        eventually(Duration::from_secs(20), &format!("host {i} to drop its network devices"), || lab.shoal_links(i).is_empty());
    }
    lab.ok(&["network", "delete", "n1"]);
    lab.ok(&["network", "delete", "n2"]);
    drop(lab);
    assert!(leftovers(&tag).is_empty(), "{:?}", leftovers(&tag));
}

#[test]
fn an_agent_without_cap_net_admin_is_refused_the_bridge_driver() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("setpriv")
        .args(["--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--", SHOAL, "agent", "--name", "x",
               "--driver", "qemu", "--net", "bridge", "--underlay-ip", "127.0.0.1", "--controller", "http://127.0.0.1:9",
               "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("CAP_NET_ADMIN"), "{e}");
}

#[test]
fn an_agent_whose_underlay_address_is_not_its_own_is_refused_and_makes_nothing() {
    let mut lab = Lab::new(1);
    let tag = lab.tag.clone();
    lab.start_controller();
    let token = lab.ok(&["host", "join-token"]).trim().to_string();
    let before = lab.links(0);
    let bogus = format!("10.251.{}.99", lab.octet);
    let args = lab.agent_args(0, &["--join-token", &token, "--driver", "qemu", "--net", "bridge", "--underlay-ip", &bogus]);
    let mut a = netlab::spawn_ip(&args, &lab.dir.path().join("h0.log"));
    let st = a.wait_exit(Duration::from_secs(30)).expect("the agent should refuse to start");
    assert!(!st.success());
    let log = a.log();
    assert!(log.contains(&bogus) && log.contains("not an address of any interface"), "{log}");
    // Without --underlay-ip at all: refused too.
    let args = lab.agent_args(0, &["--join-token", &token, "--driver", "qemu", "--net", "bridge"]);
    let mut a = netlab::spawn_ip(&args, &lab.dir.path().join("h0b.log"));
    assert!(!a.wait_exit(Duration::from_secs(30)).expect("refused").success());
    assert!(a.log().contains("--underlay-ip"), "{}", a.log());
    assert_eq!(lab.links(0), before);
    assert!(lab.json(&["host", "list"]).as_array().unwrap().is_empty(), "a refused agent must not join");
    drop(lab);
    assert!(leftovers(&tag).is_empty(), "{:?}", leftovers(&tag));
}
