//! A lab of test "hosts" on one machine: each host is a network namespace whose underlay
//! address sits on a veth pair into a bridge in the root namespace, where the controller listens.
//! Everything is made by the test and removed when the lab is dropped, even on panic: agents and
//! their QEMUs first (by pid), then the namespaces, then the bridge. Shelling out to `ip` is fine
//! here: the product itself uses netlink.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::common::*;

static LABS: AtomicU32 = AtomicU32::new(0);

pub fn ip(args: &[&str]) -> String {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub struct Lab {
    /// Short and unique to this lab: names of namespaces, veths and the bridge derive from it.
    pub tag: String,
    /// The lab's underlay is 10.251.<octet>.0/24; the root namespace has .1.
    pub octet: u8,
    pub bridge: String,
    pub namespaces: Vec<String>,
    pub dir: tempfile::TempDir,
    pub ctl: Option<Daemon>,
    pub agents: Vec<Daemon>,
    pub url: String,
    pub admin: String,
    /// The controller's `--host-timeout` and `--fence-margin`, seconds.
    pub host_timeout: &'static str,
    pub fence_margin: &'static str,
}

impl Lab {
    /// A lab of `hosts` namespaces with underlay MTU 1600 and a controller on the bridge.
    pub fn new(hosts: usize) -> Lab {
        assert!(
            is_root(),
            "the network tests make namespaces, bridges and VXLAN devices: run them as root"
        );
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid & 0xfff);
        let octet = (100 + (pid as u64 * 7 + n as u64 * 31) % 150) as u8;
        let dir = tempfile::tempdir().unwrap();
        let mut lab = Lab {
            bridge: format!("slb{tag}"),
            namespaces: Vec::new(),
            tag: tag.clone(),
            octet,
            dir,
            ctl: None,
            agents: Vec::new(),
            url: String::new(),
            admin: String::new(),
            host_timeout: "20",
            fence_margin: "3",
        };
        ip(&["link", "add", &lab.bridge, "mtu", "1600", "type", "bridge"]);
        ip(&["addr", "add", &format!("10.251.{octet}.1/24"), "dev", &lab.bridge]);
        ip(&["link", "set", &lab.bridge, "up"]);
        for i in 0..hosts {
            let ns = format!("sln{tag}{i}");
            let veth = format!("slv{tag}{i}");
            ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &veth, "mtu", "1600", "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &lab.bridge, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.underlay(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "mtu", "1600", "up"]);
        }
        lab
    }

    /// A namespace on the underlay that is no host: an "outside" address (.200) that guests
    /// can reach only through a NAT gateway, since it has no route back to any guest subnet.
    pub fn outside(&mut self) -> String {
        let (ns, veth) = (format!("sln{}o", self.tag), format!("slv{}o", self.tag));
        let addr = format!("10.251.{}.200", self.octet);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&[
            "link", "add", &veth, "mtu", "1600", "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &veth, "master", &self.bridge, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "mtu", "1600", "up"]);
        addr
    }

    /// `nft list ruleset` in namespace `i` (what NAT gateways Shoal installed there).
    pub fn nft_ruleset(&self, i: usize) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[i], "nft", "list", "ruleset"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "nft list ruleset: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The IPv4 addresses on link `dev` in namespace `i`.
    pub fn addresses(&self, i: usize, dev: &str) -> String {
        ip(&["-n", &self.namespaces[i], "-4", "-o", "addr", "show", "dev", dev])
    }

    pub fn underlay(&self, host: usize) -> String {
        format!("10.251.{}.{}", self.octet, 11 + host)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the controller on the lab bridge (tokens required off loopback).
    pub fn start_controller(&mut self) {
        let port = free_port();
        self.url = format!("http://10.251.{}.1:{port}", self.octet);
        self.spawn_controller("ctl.log");
    }

    /// Kills the controller (`kill -9`) and starts it again on the same address and data.
    pub fn restart_controller(&mut self) {
        if let Some(mut c) = self.ctl.take() {
            c.kill9();
        }
        self.spawn_controller("ctl-restarted.log");
    }

    fn spawn_controller(&mut self, log: &str) {
        let listen = self.url.trim_start_matches("http://").to_string();
        let d = Daemon::spawn(
            &[
                "server",
                "--listen",
                &listen,
                "--data-dir",
                self.data().join("ctl").to_str().unwrap(),
                "--host-timeout",
                self.host_timeout,
                "--fence-margin",
                self.fence_margin,
            ],
            &self.dir.path().join(log),
        );
        eventually(Duration::from_secs(30), "the admin token", || {
            self.data().join("ctl/admin.token").exists()
        });
        std::thread::sleep(Duration::from_millis(100));
        self.admin = std::fs::read_to_string(self.data().join("ctl/admin.token"))
            .unwrap()
            .trim()
            .to_string();
        self.ctl = Some(d);
        eventually(Duration::from_secs(30), "the controller to answer", || {
            self.cli(&["host", "list"]).status.success()
        });
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli(&self.url, &[("SHOAL_TOKEN", &self.admin)], args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "shoal {args:?} failed: {}\n{}",
            stderr(&o),
            self.logs()
        );
        stdout(&o)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// The `shoal agent` command line for host `i`, run inside its namespace.
    pub fn agent_args(&self, i: usize, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "netns",
            "exec",
            &self.namespaces[i],
            SHOAL,
            "agent",
            "--name",
            &format!("h{i}"),
            "--controller",
            &self.url,
            "--listen",
            &format!("{}:0", self.underlay(i)),
            "--data-dir",
            self.data().join(format!("h{i}")).to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Starts an agent with network driver `net` in namespace `i`; the `udp` driver's agent runs
    /// without CAP_NET_ADMIN, to show that it needs none.
    pub fn start_agent(&mut self, i: usize, net: &str) {
        self.start_agent_sized(i, net, "2048", "240");
    }

    /// [`Lab::start_agent`] with the host's memory (MiB) and the guests' ready timeout (s).
    pub fn start_agent_sized(&mut self, i: usize, net: &str, memory_mib: &str, ready_timeout_s: &str) {
        let token = self.ok(&["host", "join-token"]).trim().to_string();
        let under = self.underlay(i);
        let mut args = self.agent_args(
            i,
            &[
                "--join-token",
                &token,
                "--driver",
                "qemu",
                "--accel",
                "tcg",
                "--net",
                net,
                "--underlay-ip",
                &under,
                "--host-cpus",
                "2",
                "--host-memory",
                memory_mib,
                "--ready-timeout",
                ready_timeout_s,
                "--stop-timeout",
                "10",
            ],
        );
        if net == "udp" {
            let at = args.iter().position(|a| a == SHOAL).unwrap();
            for (k, a) in [
                "setpriv",
                "--bounding-set",
                "-net_admin",
                "--inh-caps",
                "-net_admin",
                "--",
            ]
            .iter()
            .enumerate()
            {
                args.insert(at + k, a.to_string());
            }
        }
        let log = self.dir.path().join(format!("h{i}.log"));
        self.agents.push(spawn_ip(&args, &log));
    }

    /// Host `i` loses its power: every process in its namespace (agent, QEMUs) is killed at once.
    pub fn kill_host(&self, i: usize) {
        let pids = ip(&["netns", "pids", &self.namespaces[i]]);
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }

    /// Host `i`'s underlay link, cut (`false`) or restored (`true`) on the lab's side.
    pub fn set_link(&self, i: usize, up: bool) {
        let veth = format!("slv{}{i}", self.tag);
        ip(&["link", "set", &veth, if up { "up" } else { "down" }]);
    }

    /// The controller and `hosts` QEMU agents with the bridge driver, all joined, and the demo
    /// template built.
    pub fn start_demo_hosts(&mut self, hosts: usize) {
        self.start_controller();
        for i in 0..hosts {
            self.start_agent(i, "bridge");
        }
        eventually(Duration::from_secs(60), "every host to join", || {
            self.json(&["host", "list"]).as_array().map(|a| a.len()) == Some(hosts)
        });
        self.ok(&["template", "build-demo", "demo"]);
    }

    /// Network `net` on 10.`a`.<lab octet>.0/24 with VNI `vni`, and profile `profile` (demo
    /// template, 1 vCPU, 128 MiB) on it whose guests run the user data `workload(first
    /// address)`; returns that first address (the cluster's `*-0`).
    pub fn demo_network(&self, net: &str, a: u8, vni: u32, profile: &str, workload: impl Fn(&str) -> String) -> String {
        let o = self.octet;
        self.ok(&[
            "network",
            "create",
            net,
            "--subnet",
            &format!("10.{a}.{o}.0/24"),
            "--vni",
            &vni.to_string(),
        ]);
        let first = format!("10.{a}.{o}.2");
        let ud = self.dir.path().join(format!("{profile}.sh"));
        std::fs::write(&ud, workload(&first)).unwrap();
        self.ok(&[
            "profile",
            "create",
            profile,
            "--template",
            "demo",
            "--cpus",
            "1",
            "--memory",
            "128MiB",
            "--network",
            net,
            "--user-data",
            ud.to_str().unwrap(),
        ]);
        first
    }

    /// Every link in namespace `i`, by name.
    pub fn links(&self, i: usize) -> Vec<String> {
        ip(&["-n", &self.namespaces[i], "-o", "link", "show"])
            .lines()
            .filter_map(|l| Some(l.split(':').nth(1)?.trim().split('@').next()?.to_string()))
            .collect()
    }

    /// Links Shoal made in namespace `i` (bridges, VXLAN devices, taps).
    pub fn shoal_links(&self, i: usize) -> Vec<String> {
        self.links(i).into_iter().filter(|l| l.starts_with("sh")).collect()
    }

    pub fn fdb(&self, i: usize, dev: &str) -> String {
        let o = Command::new("bridge")
            .args(["-n", &self.namespaces[i], "fdb", "show", "dev", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for f in ["ctl.log", "ctl-restarted.log", "h0.log", "h1.log", "h2.log"] {
            if let Ok(t) = std::fs::read_to_string(self.dir.path().join(f)) {
                let tail: Vec<&str> = t.lines().rev().take(40).collect();
                out.push_str(&format!(
                    "--- {f}\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        out
    }
}

/// `ip ARGS` as a background daemon (for `ip netns exec NS shoal agent ...`).
pub fn spawn_ip(args: &[String], log: &Path) -> Daemon {
    let f = std::fs::File::create(log).unwrap();
    let child = Command::new("ip")
        .args(args)
        .env("SHOAL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    Daemon {
        child,
        log: log.to_path_buf(),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Pids of processes whose command line mentions `needle` (this lab's QEMUs).
pub fn pids_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read(p.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&c).contains(needle).then_some(pid)
        })
        .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.agents.clear();
        self.ctl = None;
        // QEMUs outlive their agent by design; these are this lab's own.
        let needle = self.data().display().to_string();
        for pid in pids_with(&needle) {
            if pid != std::process::id() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for ns in &self.namespaces {
            ip_quiet(&["netns", "del", ns]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
    }
}

/// Fails unless a dropped lab left nothing behind. The kernel frees a deleted namespace (and
/// with it the root end of its veth) in the background, and only once the namespace's TCP
/// connections have left TIME_WAIT: a lab whose host made SSH connections was seen to take two
/// minutes. This allows it three.
pub fn assert_no_leftovers(tag: &str) {
    let end = std::time::Instant::now() + Duration::from_secs(180);
    while !leftovers(tag).is_empty() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(leftovers(tag).is_empty(), "left behind: {:?}", leftovers(tag));
}

/// Namespaces and root links a lab with this tag left behind.
pub fn leftovers(tag: &str) -> Vec<String> {
    let mut v: Vec<String> = ip(&["netns", "list"])
        .lines()
        .filter(|l| l.starts_with(&format!("sln{tag}")))
        .map(str::to_string)
        .collect();
    v.extend(
        ip(&["-o", "link", "show"])
            .lines()
            .filter(|l| l.contains(&format!("slb{tag}")) || l.contains(&format!("slv{tag}")))
            .map(str::to_string),
    );
    v
}
