//! Virtual networks across hosts, for real: each test host is a `shoal agent` with the bridge
//! network driver in a network namespace of its own, joined to the others by an underlay of veth
//! pairs (MTU 1600) into a bridge of the test. Guests under TCG ping each other across hosts over
//! VXLAN; a guest of another network on the same hosts cannot reach them; a network with NAT
//! reaches an address outside through its gateway host, one without does not; bad input is
//! refused and leaves no bridge, VXLAN device, tap, FDB entry or nftables table behind.
//! `make test-net` runs these alone.

mod common;
mod netlab;

use std::time::Duration;

use common::*;
use netlab::Lab;

/// A guest script: after the guest is configured, ping each target until it answers or its
/// tries run out, and report `reach <ip> ok|fail` (plus the RTT summary) on the console.
fn pinger(prelude: &str, targets: &[(&str, u32)]) -> String {
    let mut s = format!("#!/bin/sh\n{prelude}\n");
    for (ip, tries) in targets {
        s.push_str(&format!(
            "ip={ip}; n=0; res=fail\nwhile [ $n -lt {tries} ]; do\n  n=$((n+1))\n  if ping -c 1 -W 1 $ip >/dev/null 2>&1; then res=ok; break; fi\ndone\necho \"reach $ip $res after $n\"\n[ $res = ok ] && ping -c 3 $ip | tail -n 1\n"
        ));
    }
    s
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

    // Network n1 (VNI 4242, with NAT) with a 2-VM cluster, one VM per host, each pinging the
    // other and then an address outside, which only a gateway's masquerade can reach.
    let o = lab.octet;
    let outside = lab.outside();
    // Its guests are told a DNS server (the outside address) and print their resolver.
    lab.ok(&[
        "network",
        "create",
        "n1",
        "--subnet",
        &format!("10.77.{o}.0/24"),
        "--vni",
        "4242",
        "--nat",
        "--dns",
        &outside,
    ]);
    lab.ok(&[
        "network",
        "create",
        "n2",
        "--subnet",
        &format!("10.78.{o}.0/24"),
        "--vni",
        "4343",
    ]);
    let peers = [format!("10.77.{o}.2"), format!("10.77.{o}.3")];
    let ud1 = lab.dir.path().join("ud1.sh");
    let out_tries = if bridge { 60 } else { 8 };
    std::fs::write(
        &ud1,
        pinger(
            "cat /etc/resolv.conf",
            &[(&peers[0], 90), (&peers[1], 90), (&outside, out_tries)],
        ),
    )
    .unwrap();
    // The intruder claims an address in n1's subnet on its own network: if the segments were
    // one, it would reach them. Its network has no NAT: it reaches nothing outside either.
    let ud2 = lab.dir.path().join("ud2.sh");
    let intruder = pinger(
        &format!("ip addr add 10.77.{o}.200/24 dev eth0"),
        &[(&peers[0], 15), (&peers[1], 15), (&outside, 10)],
    );
    std::fs::write(&ud2, intruder).unwrap();
    lab.ok(&[
        "profile",
        "create",
        "p1",
        "--template",
        "demo",
        "--cpus",
        "1",
        "--memory",
        "128MiB",
        "--network",
        "n1",
        "--user-data",
        ud1.to_str().unwrap(),
    ]);
    lab.ok(&[
        "profile",
        "create",
        "p2",
        "--template",
        "demo",
        "--cpus",
        "1",
        "--memory",
        "128MiB",
        "--user-data",
        ud2.to_str().unwrap(),
    ]);
    lab.ok(&[
        "cluster",
        "create",
        "c1",
        "--profile",
        "p1",
        "--size",
        "2",
        "--anti-affinity",
        "host",
        "--wait",
    ]);
    lab.ok(&[
        "cluster",
        "create",
        "c2",
        "--profile",
        "p2",
        "--size",
        "1",
        "--network",
        "n2",
        "--wait",
    ]);

    let vms = lab.json(&["vm", "list", "--cluster", "c1"]);
    let vms = vms.as_array().unwrap();
    let on: std::collections::HashSet<&str> = vms.iter().map(|v| v["host"].as_str().unwrap()).collect();
    assert_eq!(on.len(), 2, "one VM per host: {vms:?}");

    // On each host: the bridge, the VXLAN device and the VM's tap; the VXLAN device's FDB sends
    // flooded traffic to the other host's underlay address.
    for i in (0..2).filter(|_| bridge) {
        let links = lab.shoal_links(i);
        assert!(
            links.contains(&"shbr4242".to_string()) && links.contains(&"shvx4242".to_string()),
            "host {i}: {links:?}"
        );
        assert!(links.iter().any(|l| l.starts_with("sht")), "host {i}: {links:?}");
        let other = lab.underlay(1 - i);
        let fdb = lab.fdb(i, "shvx4242");
        assert!(
            fdb.contains(&format!("00:00:00:00:00:00 dst {other}")),
            "host {i} FDB:\n{fdb}"
        );
        let mtu = netlab::ip(&["-n", &lab.namespaces[i], "-o", "link", "show", "shvx4242"]);
        assert!(mtu.contains("mtu 1500"), "{mtu}");
    }

    // The UDP driver makes no device at all.
    for i in (0..2).filter(|_| !bridge) {
        assert!(lab.shoal_links(i).is_empty(), "{:?}", lab.shoal_links(i));
    }
    // NAT: with the bridge driver one of n1's hosts is its gateway: the subnet's first address
    // on its bridge and a masquerade; the other host has neither. The UDP driver routes nothing.
    let n1 = lab.json(&["network", "show", "n1"]);
    let gw_host = n1["gateway_host"].as_str().map(str::to_string);
    assert_eq!(n1["gateway_ip"], format!("10.77.{o}.1"), "{n1}");
    let gw = if bridge {
        let h = gw_host
            .clone()
            .unwrap_or_else(|| panic!("a bridge host should be n1's gateway: {n1}"));
        let gw: usize = h.trim_start_matches('h').parse().unwrap();
        eventually(Duration::from_secs(20), "the gateway's masquerade", || {
            lab.nft_ruleset(gw).contains("masquerade")
        });
        let rules = lab.nft_ruleset(gw);
        assert!(
            rules.contains("table ip shoal_gw_4242") && rules.contains(&format!("ip saddr 10.77.{o}.0/24")),
            "{rules}"
        );
        assert!(
            lab.addresses(gw, "shbr4242").contains(&format!("10.77.{o}.1/24")),
            "{}",
            lab.addresses(gw, "shbr4242")
        );
        assert!(
            !lab.nft_ruleset(1 - gw).contains("shoal_gw"),
            "only the gateway masquerades"
        );
        assert!(
            lab.addresses(1 - gw, "shbr4242").is_empty(),
            "{}",
            lab.addresses(1 - gw, "shbr4242")
        );
        assert!(lab.ok(&["network", "list"]).contains(&format!("via {h} (10.77.{o}.1)")));
        Some(gw)
    } else {
        assert_eq!(gw_host, None, "the udp driver cannot be a gateway: {n1}");
        assert!(lab.ok(&["network", "list"]).contains("no gateway host yet"));
        None
    };
    // Each guest reaches the other across hosts.
    for (vm, peer) in [("c1-0", &peers[1]), ("c1-1", &peers[0])] {
        eventually(Duration::from_secs(180), &format!("{vm} to report on {peer}"), || {
            console(&lab, vm).contains(&format!("reach {peer} "))
        });
        let text = console(&lab, vm);
        assert!(
            text.contains(&format!("reach {peer} ok")),
            "{vm} could not reach {peer}:\n{text}\n{}",
            lab.logs()
        );
    }
    // Both guests reach the outside address through the gateway (the one on the other host
    // over VXLAN to it) with the bridge driver; with the UDP driver, neither does.
    let want = if bridge { "ok" } else { "fail" };
    for vm in ["c1-0", "c1-1"] {
        eventually(
            Duration::from_secs(180),
            &format!("{vm} to report on {outside}"),
            || console(&lab, vm).contains(&format!("reach {outside} ")),
        );
        let text = console(&lab, vm);
        assert!(
            text.contains(&format!("reach {outside} {want}")),
            "{vm} to {outside}: expected {want}:\n{text}\n{}",
            lab.logs()
        );
        assert!(
            text.contains(&format!("nameserver {outside}")),
            "{vm} was not told n1's DNS server:\n{text}"
        );
    }
    // The guest of the other network reaches neither them nor, without NAT, the outside.
    eventually(Duration::from_secs(180), "c2-0 to report", || {
        console(&lab, "c2-0").matches("reach ").count() >= 3
    });
    let text = console(&lab, "c2-0");
    for p in peers.iter().chain([&outside]) {
        assert!(text.contains(&format!("reach {p} fail")), "c2-0 reached {p}:\n{text}");
    }

    // Scaling c1 down to one VM: the host that loses its last VM of n1 drops the network's
    // devices, and the other host's VXLAN device forgets it as a peer.
    let gone = vms.iter().find(|v| v["name"] == "c1-1").unwrap()["host"]
        .as_str()
        .unwrap()
        .to_string();
    let (gone, kept): (usize, usize) = if gone == "h0" { (0, 1) } else { (1, 0) };
    lab.ok(&["cluster", "scale", "c1", "--size", "1", "--wait"]);
    if bridge {
        eventually(Duration::from_secs(20), "the emptied host to drop n1", || {
            !lab.shoal_links(gone).contains(&"shbr4242".to_string())
        });
        assert!(
            lab.shoal_links(gone).iter().all(|l| !l.ends_with("4242")),
            "{:?}",
            lab.shoal_links(gone)
        );
        let other = lab.underlay(gone);
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while lab.fdb(kept, "shvx4242").contains(&format!("dst {other}")) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        let fdb = lab.fdb(kept, "shvx4242");
        assert!(
            !fdb.contains(&format!("dst {other}")),
            "the remaining host still sends to {other}:\n{fdb}\n{}",
            lab.logs()
        );
        assert!(lab.shoal_links(kept).contains(&"shvx4242".to_string()));
    }
    let n1 = lab.json(&["network", "show", "n1"]);
    assert_eq!(n1["hosts"].as_array().unwrap().len(), 1, "{n1}");
    if let Some(gw) = gw {
        // The gateway is now on the host that kept n1 (moved there if it was on the other),
        // and NAT switched off takes the masquerade and the address away.
        assert_eq!(n1["gateway_host"], format!("h{kept}"), "{n1}");
        eventually(Duration::from_secs(20), "the kept host to be the gateway", || {
            lab.nft_ruleset(kept).contains("shoal_gw_4242")
        });
        if gw != kept {
            assert!(!lab.nft_ruleset(gw).contains("shoal_gw"), "{}", lab.nft_ruleset(gw));
        }
        let off = lab.json(&["network", "set", "n1", "--nat", "false"]);
        assert_eq!(off["gateway_host"], serde_json::Value::Null, "{off}");
        eventually(Duration::from_secs(20), "the masquerade to go", || {
            !lab.nft_ruleset(kept).contains("shoal_gw")
        });
        eventually(Duration::from_secs(20), "the gateway address to go", || {
            lab.addresses(kept, "shbr4242").is_empty()
        });
        lab.ok(&["network", "set", "n1", "--nat", "true"]);
        eventually(Duration::from_secs(20), "the masquerade to come back", || {
            lab.nft_ruleset(kept).contains("shoal_gw_4242")
        });
    }

    // Deleting the clusters removes every bridge, VXLAN device, tap and FDB entry on both hosts.
    lab.ok(&["cluster", "delete", "c2", "--wait"]);
    lab.ok(&["cluster", "delete", "c1", "--wait"]);
    for i in 0..2 {
        eventually(
            Duration::from_secs(20),
            &format!("host {i} to drop its network devices"),
            || lab.shoal_links(i).is_empty(),
        );
        assert!(
            !lab.nft_ruleset(i).contains("shoal_gw"),
            "host {i}: {}",
            lab.nft_ruleset(i)
        );
    }
    lab.ok(&["network", "delete", "n1"]);
    lab.ok(&["network", "delete", "n2"]);
    drop(lab);
    netlab::assert_no_leftovers(&tag);
}

#[test]
fn an_agent_without_cap_net_admin_is_refused_the_bridge_driver() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("setpriv")
        .args([
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
            "--",
            SHOAL,
            "agent",
            "--name",
            "x",
            "--driver",
            "qemu",
            "--net",
            "bridge",
            "--underlay-ip",
            "127.0.0.1",
            "--controller",
            "http://127.0.0.1:9",
            "--data-dir",
        ])
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
    let args = lab.agent_args(
        0,
        &[
            "--join-token",
            &token,
            "--driver",
            "qemu",
            "--net",
            "bridge",
            "--underlay-ip",
            &bogus,
        ],
    );
    let mut a = netlab::spawn_ip(&args, &lab.dir.path().join("h0.log"));
    let st = a
        .wait_exit(Duration::from_secs(30))
        .expect("the agent should refuse to start");
    assert!(!st.success());
    let log = a.log();
    assert!(
        log.contains(&bogus) && log.contains("not an address of any interface"),
        "{log}"
    );
    // Without --underlay-ip at all: refused too.
    let args = lab.agent_args(0, &["--join-token", &token, "--driver", "qemu", "--net", "bridge"]);
    let mut a = netlab::spawn_ip(&args, &lab.dir.path().join("h0b.log"));
    assert!(!a.wait_exit(Duration::from_secs(30)).expect("refused").success());
    assert!(a.log().contains("--underlay-ip"), "{}", a.log());
    assert_eq!(lab.links(0), before);
    assert!(
        lab.json(&["host", "list"]).as_array().unwrap().is_empty(),
        "a refused agent must not join"
    );
    drop(lab);
    netlab::assert_no_leftovers(&tag);
}

#[test]
fn an_agent_whose_underlay_address_no_other_host_reaches_is_refused_and_makes_nothing() {
    let mut lab = Lab::new(2);
    let tag = lab.tag.clone();
    lab.start_controller();
    // Host 1's underlay address is its own (on its loopback), in the lab's subnet, but with
    // ARP answered only for addresses on the asking interface nobody else reaches it; all
    // probes stay on the lab's bridge.
    let hidden = format!("10.251.{}.99", lab.octet);
    let ns1 = lab.namespaces[1].clone();
    netlab::ip(&["-n", &ns1, "addr", "add", &format!("{hidden}/32"), "dev", "lo"]);
    let sysctl = std::process::Command::new("ip")
        .args(["netns", "exec", &ns1, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"])
        .status()
        .unwrap();
    assert!(sysctl.success());
    let before = lab.links(1);
    let token = lab.ok(&["host", "join-token"]).trim().to_string();
    let refused = |lab: &Lab, log: &str, underlay: &str| {
        let args = lab.agent_args(
            1,
            &[
                "--join-token",
                &token,
                "--driver",
                "qemu",
                "--accel",
                "tcg",
                "--net",
                "bridge",
                "--underlay-ip",
                underlay,
            ],
        );
        let mut a = netlab::spawn_ip(&args, &lab.dir.path().join(log));
        assert!(!a
            .wait_exit(Duration::from_secs(60))
            .expect("the agent should be refused")
            .success());
        a.log()
    };
    // The first host: nobody else to ask, so the controller tries.
    let log = refused(&lab, "h1a.log", &hidden);
    assert!(
        log.contains(&hidden) && log.contains("unreachable") && log.contains("from the controller"),
        "{log}"
    );
    // With a host already there, that host tries (and the join token was not spent meanwhile).
    lab.start_agent(0, "bridge");
    eventually(Duration::from_secs(60), "h0 to join", || {
        lab.json(&["host", "list"]).as_array().map(|a| a.len()) == Some(1)
    });
    let log = refused(&lab, "h1b.log", &hidden);
    assert!(
        log.contains(&hidden) && log.contains("unreachable") && log.contains("from host h0"),
        "{log}"
    );
    // Another host's underlay address, even when this host holds it too: refused by name.
    let h0 = lab.underlay(0);
    netlab::ip(&["-n", &ns1, "addr", "add", &format!("{h0}/32"), "dev", "lo"]);
    let log = refused(&lab, "h1c.log", &h0);
    assert!(
        log.contains(&format!("underlay address {h0} is host \"h0\"'s already")),
        "{log}"
    );
    netlab::ip(&["-n", &ns1, "addr", "del", &format!("{h0}/32"), "dev", "lo"]);
    let hosts = lab.json(&["host", "list"]);
    assert_eq!(
        hosts.as_array().unwrap().len(),
        1,
        "the refused host must not join: {hosts}"
    );
    assert_eq!(lab.links(1), before, "the refused agent made no device");
    // The same agent with its reachable address joins with the very same join token.
    let args = lab.agent_args(
        1,
        &[
            "--join-token",
            &token,
            "--driver",
            "qemu",
            "--accel",
            "tcg",
            "--net",
            "bridge",
            "--underlay-ip",
            &lab.underlay(1),
        ],
    );
    lab.agents.push(netlab::spawn_ip(&args, &lab.dir.path().join("h1.log")));
    eventually(Duration::from_secs(60), "h1 to join", || {
        lab.json(&["host", "list"]).as_array().map(|a| a.len()) == Some(2)
    });
    drop(lab);
    netlab::assert_no_leftovers(&tag);
}
