//! A real Debian guest through Shoal, end to end under TCG: `template build-debian` (debootstrap,
//! cached between runs), a profile with a login user, an SSH key and user data, a cluster on a
//! virtual network with NAT (the host in its own network namespace, as `make test-net` does),
//! ready only once the guest reported that cloud-init succeeded. Then, from inside the guest over
//! SSH: its hostname, address, MTU, default route, resolver, the key's login and sudo, and the
//! user data's runcmd. The other test shows a guest whose cloud-init fails is `failed` with
//! cloud-init's reason.

mod common;
mod netlab;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use netlab::Lab;

/// A lab host with the bridge driver and room for a Debian guest; the guest gets 15 minutes to
/// report (TCG on a loaded 2-core machine).
fn debian_lab() -> Lab {
    let mut lab = Lab::new(1);
    // An underlay of MTU 1500, as most are: the guest must be told 1500 minus VXLAN's overhead.
    netlab::ip(&["-n", &lab.namespaces[0], "link", "set", "eth0", "mtu", "1500"]);
    lab.start_controller();
    lab.start_agent_sized(0, "bridge", "4096", "900");
    eventually(Duration::from_secs(60), "the host", || {
        lab.json(&["host", "list"]).as_array().map(|a| a.len()) == Some(1)
    });
    let t = Instant::now();
    lab.ok(&["template", "build-debian", "debian"]);
    eprintln!("template build-debian (or its cache) and upload: {:.1?}", t.elapsed());
    lab
}

/// Runs `cmd` in the guest at `ip` as `user` with `key`, from the host's namespace.
fn ssh(lab: &Lab, key: &Path, user: &str, ip: &str, cmd: &str) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &lab.namespaces[0], "ssh"])
        .args(["-i", key.to_str().unwrap()])
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"])
        .arg(format!("{user}@{ip}"))
        .arg(cmd)
        .output()
        .unwrap()
}

#[test]
fn a_debian_guest_is_configured_as_the_seed_says_and_reachable_over_ssh() {
    let lab = debian_lab();
    let tag = lab.tag.clone();
    let key = lab.dir.path().join("id_ed25519");
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "shoal-test", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "ssh-keygen: {}", stderr(&o));
    let user_data = lab.dir.path().join("user-data");
    std::fs::write(
        &user_data,
        "#cloud-config\nruncmd:\n  - [sh, -c, \"echo ran-as-$(id -un) > /var/tmp/runcmd-ran\"]\n",
    )
    .unwrap();
    let dns = format!("10.251.{}.1", lab.octet);
    lab.ok(&["network", "create", "dnet", "--nat", "--dns", &dns]);
    lab.ok(&[
        "profile",
        "create",
        "deb",
        "--template",
        "debian",
        "--cpus",
        "1",
        "--memory",
        "1GiB",
        "--user",
        "ops",
    ]);
    let t = Instant::now();
    lab.ok(&[
        "cluster",
        "create",
        "dlab",
        "--profile",
        "deb",
        "--size",
        "1",
        "--network",
        "dnet",
        "--ssh-key",
        key.with_extension("pub").to_str().unwrap(),
        "--user-data",
        user_data.to_str().unwrap(),
        "--wait",
    ]);
    eprintln!("cluster create to ready (the guest's report): {:.1?}", t.elapsed());
    let vm = lab.json(&["vm", "show", "dlab-0"]);
    assert_eq!(vm["state"], "running", "{vm}");
    let console = lab.ok(&["vm", "console", "dlab-0"]);
    assert!(console.contains("shoal-guest: ready"), "{console}");
    let ip = vm["ip"].as_str().unwrap().to_string();
    let net = lab.json(&["network", "show", "dnet"]);
    let subnet = net["subnet"].as_str().unwrap();
    let prefix = subnet.split('/').nth(1).unwrap();
    let gateway = format!("{}.1", ip.rsplit_once('.').unwrap().0);
    let mtu = 1500 - shoal_model::network::VXLAN_OVERHEAD;

    let run = |cmd: &str| {
        let o = ssh(&lab, &key, "ops", &ip, cmd);
        assert!(o.status.success(), "ssh ops@{ip} {cmd:?}: {}{}", stdout(&o), stderr(&o));
        stdout(&o)
    };
    assert_eq!(run("hostname").trim(), "dlab-0");
    let addr = run("ip -4 -o addr show dev eth0");
    assert!(addr.contains(&format!("inet {ip}/{prefix}")), "{addr}");
    assert_eq!(run("cat /sys/class/net/eth0/mtu").trim(), mtu.to_string());
    let route = run("ip -4 route show default");
    assert!(route.contains(&format!("default via {gateway}")), "{route}");
    let resolvers = run("cat /etc/resolv.conf; resolvectl dns 2>/dev/null || true");
    assert!(resolvers.contains(&dns), "resolver {dns} missing: {resolvers}");
    assert_eq!(run("cat /var/tmp/runcmd-ran").trim(), "ran-as-root");
    assert_eq!(run("sudo -n id -un").trim(), "root");
    let status = run("cloud-init status --long || true");
    assert!(status.contains("status: done"), "{status}");
    // The key is the only way in: another key is refused.
    let other = lab.dir.path().join("other");
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!ssh(&lab, &other, "ops", &ip, "true").status.success());

    lab.ok(&["cluster", "delete", "dlab", "--wait"]);
    lab.ok(&["network", "delete", "dnet"]);
    drop(lab);
    netlab::assert_no_leftovers(&tag);
}

#[test]
fn a_debian_guest_whose_cloud_init_fails_is_failed_with_its_reason() {
    let lab = debian_lab();
    let tag = lab.tag.clone();
    // A module that fails: cloud-init records the error and finishes; the guest reports it.
    let user_data = lab.dir.path().join("user-data");
    std::fs::write(
        &user_data,
        "#cloud-config\nwrite_files:\n  - path: /proc/shoal-cannot-write-here\n    content: x\n",
    )
    .unwrap();
    lab.ok(&[
        "profile",
        "create",
        "deb",
        "--template",
        "debian",
        "--cpus",
        "1",
        "--memory",
        "1GiB",
    ]);
    let o = lab.cli(&[
        "cluster",
        "create",
        "broken",
        "--profile",
        "deb",
        "--size",
        "1",
        "--user-data",
        user_data.to_str().unwrap(),
        "--wait",
    ]);
    // The deployment fails with the guest's own reason and is rolled back.
    let said = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success(), "{said}");
    assert!(
        said.contains("VM broken-0 failed on host h0: the guest's configuration failed: cloud-init:")
            && said.contains("write-files"),
        "{said}"
    );
    assert!(said.contains("rolled back"), "{said}");
    eventually(Duration::from_secs(60), "the rolled back cluster gone", || {
        lab.json(&["cluster", "list"]).as_array().is_some_and(|a| a.is_empty())
    });
    drop(lab);
    netlab::assert_no_leftovers(&tag);
}
