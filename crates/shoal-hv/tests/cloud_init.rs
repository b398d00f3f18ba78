//! The seeds Shoal writes, checked with the real cloud-init of every release users run (Debian 12
//! and 13, Ubuntu 22.04 and 24.04 with their -updates): each release's own user-data processor,
//! merge, schema validator, network-config parser and ENI/netplan/networkd renderers
//! (`scripts/cloud-init/`). Any error, warning or deprecation fails. The old seed form that left
//! Debian 12 guests without a network must fail too, or the checker proves nothing.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_hv::qemu::seed::SeedFiles;
use shoal_model::agent::VmSpec;
use shoal_model::{MacAddr, VmNetwork};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK5l ops@example";

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cloud-init")
}

/// Fetches (once; cached) every pinned cloud-init release, loudly failing when it cannot.
fn fetch() {
    let o = Command::new(scripts().join("fetch"))
        .output()
        .expect("running scripts/cloud-init/fetch");
    assert!(
        o.status.success(),
        "scripts/cloud-init/fetch could not get the cloud-init releases (the Debian and Ubuntu \
         archives must be reachable): {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs the checker on a seed directory: (exit code, everything it printed).
fn check(dir: &Path) -> (i32, String) {
    let o = Command::new("/usr/bin/python3")
        .arg(scripts().join("check.py"))
        .arg(dir)
        .output()
        .expect("running scripts/cloud-init/check.py");
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn spec(name: &str) -> VmSpec {
    VmSpec {
        uuid: "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap(),
        memory_mib: 512,
        template: "debian".into(),
        ready: shoal_model::Readiness::Report,
        ip: "10.200.3.7".parse().unwrap(),
        gateway: "10.200.3.1".parse().unwrap(),
        mac: MacAddr::qemu(0x30007),
        ..VmSpec::example(name)
    }
}

fn write(dir: &Path, seed: &SeedFiles) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, content) in seed.files() {
        std::fs::write(dir.join(name), content).unwrap();
    }
}

#[test]
fn every_seed_shoal_writes_passes_every_cloud_init_release() {
    fetch();
    let dir = tempfile::tempdir().unwrap();
    let net = VmNetwork {
        name: "lab".into(),
        vni: 4242,
        mtu: 1450,
        peers: Vec::new(),
        gateway: None,
        dns: vec!["10.1.1.1".parse().unwrap(), "9.9.9.9".parse().unwrap()],
    };
    let mut cases: Vec<(&str, VmSpec, Vec<Ipv4Addr>)> = Vec::new();
    // Nothing of the operator's, on QEMU's user-mode network (its resolver).
    cases.push(("plain", spec("web-0"), vec!["10.200.3.254".parse().unwrap()]));
    // A user with keys, a virtual network with its MTU and DNS servers.
    let mut s = spec("web-1");
    s.user = Some("ops".into());
    s.ssh_keys = vec![KEY.into()];
    s.network = Some(net.clone());
    cases.push(("user-keys-network", s, net.dns.clone()));
    // The operator's cloud-config with its own users and runcmd: merged, neither side dropped.
    let mut s = spec("db-0");
    s.ssh_keys = vec![KEY.into()];
    s.user_data = Some(
        "#cloud-config\nusers:\n  - default\n  - name: alice\n    shell: /bin/bash\nruncmd:\n  - [touch, /var/tmp/mine]\n"
            .into(),
    );
    cases.push(("their-cloud-config", s, vec!["10.200.3.254".parse().unwrap()]));
    // The operator's shell script, passed through as its own part.
    let mut s = spec("db-1");
    s.user = Some("ops".into());
    s.user_data = Some("#!/bin/sh\necho 'configured' > /var/tmp/mine\n".into());
    cases.push(("their-script", s, Vec::new()));
    for (what, spec, resolvers) in cases {
        let d = dir.path().join(what);
        write(&d, &SeedFiles::render(&spec, &resolvers));
        let (code, out) = check(&d);
        assert_eq!(code, 0, "{what}: cloud-init refused Shoal's seed:\n{out}");
        eprintln!("{what}: {}", out.lines().last().unwrap_or(""));
    }
}

#[test]
fn the_checker_fails_the_seed_that_broke_debian_12() {
    fetch();
    let dir = tempfile::tempdir().unwrap();
    let s = spec("web-0");
    let mut seed = SeedFiles::render(&s, &[]);
    // What Shoal wrote before: network config v2 with `to: default`, and an empty user-data.
    seed.network_config = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{}\"\n    set-name: eth0\n    \
         addresses:\n      - 10.200.3.7/24\n    routes:\n      - to: default\n        via: 10.200.3.1\n",
        s.mac
    );
    seed.user_data = String::new();
    write(dir.path(), &seed);
    let (code, out) = check(dir.path());
    assert_eq!(code, 1, "{out}");
    let debian12: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("debian-12") && l.contains("FAIL"))
        .collect();
    assert!(
        debian12.iter().any(|l| l.contains("not a valid ip")),
        "Debian 12's cloud-init must reject `to: default`:\n{out}"
    );
    assert!(
        debian12.iter().any(|l| l.contains("user-data")),
        "an empty user-data must fail:\n{out}"
    );
}
