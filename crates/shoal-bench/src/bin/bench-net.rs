//! `make bench-net`: what Shoal's virtual networks cost and carry on this machine (root needed).
//!
//! 1. Setting up and tearing down one network on a host through the bridge driver (netlink):
//!    bridge + VXLAN device + one FDB entry, then removal; median of N runs, measured inside a
//!    fresh network namespace.
//! 2. Guest to guest, real VMs under TCG: ping round trip and HTTP (TCP) throughput between two
//!    guests on two hosts over the VXLAN overlay, and between the same kind of guests on one
//!    host's bridge. Each host is a `shoal agent --net bridge` in a namespace of its own on a veth
//!    underlay (MTU 1600). The guests measure themselves and print the figures on their console.
//!
//! Usage: bench-net PATH-TO-SHOAL [--runs N] [--mib M]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_bench::{free_port, print_table};

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Inside a namespace: create and destroy a network `runs` times through the bridge driver.
fn inner(underlay: &str, runs: usize) -> anyhow::Result<()> {
    use shoal_net::NetDriver;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let d = shoal_net::bridge::BridgeDriver::open(underlay.parse()?).await?;
        let peer: std::net::Ipv4Addr = "10.250.0.99".parse()?;
        let subnet: shoal_model::Ipv4Subnet = "10.249.0.0/24".parse()?;
        let (mut up, mut down, mut gw_up, mut gw_down, mut cli) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let vni = 5000 + i as u32;
            let t = Instant::now();
            d.create(vni).await?;
            d.set_peers(vni, &[peer]).await?;
            up.push(t.elapsed().as_secs_f64() * 1000.0);
            // The NAT gateway: address, forwarding and the nf_tables table over netlink...
            let t = Instant::now();
            d.set_gateway(vni, Some(subnet)).await?;
            gw_up.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            d.set_gateway(vni, None).await?;
            gw_down.push(t.elapsed().as_secs_f64() * 1000.0);
            // ...and the same table through the nft command, as Incus and LXD install theirs.
            if let Some(ms) = nft_cli(vni, subnet)? {
                cli.push(ms);
            }
            let t = Instant::now();
            d.destroy(vni).await?;
            down.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "{}",
            serde_json::json!({ "setup_ms": median(up), "teardown_ms": median(down), "gateway_ms": median(gw_up),
                                "gateway_off_ms": median(gw_down), "nft_cli_ms": median(cli) })
        );
        anyhow::Ok(())
    })
}

/// Installs network `vni`'s gateway table with `nft -f -` (and removes it again); the time of
/// the install, or `None` (said on stderr) when the nft command is not installed.
fn nft_cli(vni: u32, subnet: shoal_model::Ipv4Subnet) -> anyhow::Result<Option<f64>> {
    use std::io::Write;
    let br = shoal_net::bridge_name(vni);
    let table = shoal_net::nftables::table_name(vni);
    let ruleset = format!(
        "add table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n\
         chain postrouting {{ type nat hook postrouting priority 100; policy accept;\n\
           ip saddr {subnet} oifname != \"{br}\" masquerade; }}\n\
         chain forward {{ type filter hook forward priority 0; policy accept;\n\
           iifname \"{br}\" oifname \"{br}\" accept\n\
           oifname \"{br}\" ct state established,related accept\n\
           oifname \"{br}\" drop; }}\n\
         chain input {{ type filter hook input priority 0; policy accept;\n\
           iifname \"{br}\" ct state established,related accept\n\
           iifname \"{br}\" ip protocol icmp accept\n\
           iifname \"{br}\" drop; }}\n}}\n"
    );
    let t = Instant::now();
    let mut child = match Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench-net: no nft command ({e}): the nft column stays empty");
            return Ok(None);
        }
    };
    child.stdin.take().expect("stdin").write_all(ruleset.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "nft -f failed on:\n{ruleset}");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    shoal_net::nftables::remove_gateway(vni)?;
    Ok(Some(ms))
}

struct Lab {
    tag: String,
    octet: u8,
    namespaces: Vec<String>,
    dir: tempfile::TempDir,
    procs: Vec<std::process::Child>,
    url: String,
    admin: String,
    shoal: PathBuf,
}

impl Lab {
    fn new(shoal: &Path, hosts: usize) -> anyhow::Result<Lab> {
        let pid = std::process::id();
        let tag = format!("{:x}", pid & 0xffff);
        let octet = (100 + pid % 150) as u8;
        let mut lab = Lab {
            tag: tag.clone(),
            octet,
            namespaces: Vec::new(),
            dir: tempfile::tempdir()?,
            procs: Vec::new(),
            url: String::new(),
            admin: String::new(),
            shoal: shoal.to_path_buf(),
        };
        let br = format!("sbb{tag}");
        ip(&["link", "add", &br, "mtu", "1600", "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.251.{octet}.1/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..hosts {
            let ns = format!("sbn{tag}{i}");
            ip(&["netns", "add", &ns])?;
            lab.namespaces.push(ns.clone());
            let veth = format!("sbv{tag}{i}");
            ip(&[
                "link", "add", &veth, "mtu", "1600", "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &br, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.underlay(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "mtu", "1600", "up"])?;
        }
        Ok(lab)
    }

    fn underlay(&self, i: usize) -> String {
        format!("10.251.{}.{}", self.octet, 11 + i)
    }

    fn spawn(&mut self, prog: &str, args: &[String], log: &str) -> anyhow::Result<()> {
        let f = std::fs::File::create(self.dir.path().join(log))?;
        let c = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?;
        self.procs.push(c);
        Ok(())
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = Command::new(&self.shoal)
            .arg("--url")
            .arg(&self.url)
            .args(args)
            .env("SHOAL_TOKEN", &self.admin)
            .env("SHOAL_CONFIG", "/nonexistent")
            .env("SHOAL_IMAGE_CACHE", self.dir.path().join("cache"))
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "shoal {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let port = free_port();
        let data = self.dir.path().join("data");
        self.url = format!("http://10.251.{}.1:{port}", self.octet);
        let shoal = self.shoal.display().to_string();
        self.spawn(
            &shoal,
            &[
                "server".into(),
                "--listen".into(),
                format!("10.251.{}.1:{port}", self.octet),
                "--data-dir".into(),
                data.join("ctl").display().to_string(),
            ],
            "ctl.log",
        )?;
        until(Duration::from_secs(30), || data.join("ctl/admin.token").exists())?;
        std::thread::sleep(Duration::from_millis(200));
        self.admin = std::fs::read_to_string(data.join("ctl/admin.token"))?
            .trim()
            .to_string();
        until(Duration::from_secs(30), || self.cli(&["host", "list"]).is_ok())?;
        for i in 0..self.namespaces.len() {
            let token = self.cli(&["host", "join-token"])?.trim().to_string();
            let args: Vec<String> = [
                "netns",
                "exec",
                &self.namespaces[i],
                &shoal,
                "agent",
                "--name",
                &format!("h{i}"),
                "--controller",
                &self.url,
                "--listen",
                &format!("{}:0", self.underlay(i)),
                "--data-dir",
                &data.join(format!("h{i}")).display().to_string(),
                "--join-token",
                &token,
                "--driver",
                "qemu",
                "--accel",
                "tcg",
                "--net",
                "bridge",
                "--underlay-ip",
                &self.underlay(i),
                "--host-cpus",
                "2",
                "--host-memory",
                "2048",
                "--ready-timeout",
                "300",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            self.spawn("ip", &args, &format!("h{i}.log"))?;
        }
        let n = self.namespaces.len();
        until(Duration::from_secs(60), || {
            self.cli(&["--output", "json", "host", "list"])
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v.as_array().map(|a| a.len()))
                == Some(n)
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let needle = self.dir.path().display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmd).contains(&needle) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &format!("sbb{}", self.tag)]);
    }
}

fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while !f() {
        anyhow::ensure!(Instant::now() < end, "timed out");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The guests' script: VM 0 serves a file over HTTP; VM 1 waits for it, pings it 20 times and
/// fetches the file, and prints `bench rtt ...` and `bench http <bytes> <t0> <t1>` (uptime).
fn guest_script(server: &str, mib: u32) -> String {
    format!(
        r#"#!/bin/sh
case $(hostname) in
*-0)
  mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/blob bs=1048576 count={mib} 2>/dev/null
  httpd -p 8080 -h /tmp/www
  echo "bench serving"
  ;;
*)
  n=0
  while ! ping -c 1 -W 1 {server} >/dev/null 2>&1 && [ $n -lt 240 ]; do n=$((n+1)); done
  sleep 3
  echo "bench rtt $(ping -c 20 {server} | tail -n 1)"
  t0=$(cut -d' ' -f1 /proc/uptime)
  if wget -q -O /dev/null http://{server}:8080/blob; then
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "bench http {bytes} $t0 $t1"
  else
    echo "bench http failed"
  fi
  ;;
esac
"#,
        bytes = mib as u64 * 1048576
    )
}

struct Guests {
    rtt_ms: f64,
    mbit_s: f64,
}

/// Deploys the 2-VM cluster `name` and reads what its guests measured.
fn measure(lab: &Lab, name: &str, net: &str, placement: &[&str], mib: u32) -> anyhow::Result<Guests> {
    let o = lab.octet;
    let subnet = format!("10.{}.{o}.0/24", if name == "cross" { 81 } else { 82 });
    lab.cli(&["network", "create", net, "--subnet", &subnet])?;
    let server = format!("10.{}.{o}.2", if name == "cross" { 81 } else { 82 });
    let ud = lab.dir.path().join(format!("{name}.sh"));
    std::fs::write(&ud, guest_script(&server, mib))?;
    lab.cli(&[
        "profile",
        "create",
        name,
        "--template",
        "demo",
        "--cpus",
        "1",
        "--memory",
        "128MiB",
        "--network",
        net,
        "--user-data",
        ud.to_str().unwrap_or_default(),
    ])?;
    let mut args = vec!["cluster", "create", name, "--profile", name, "--size", "2", "--wait"];
    args.extend_from_slice(placement);
    lab.cli(&args)?;
    let vm = format!("{name}-1");
    let mut text = String::new();
    until(Duration::from_secs(600), || {
        text = lab.cli(&["vm", "console", &vm]).unwrap_or_default();
        text.contains("bench http")
    })?;
    // The guest prefixes what its user-data script prints with `user-data: `.
    let line = |what: &str| {
        text.lines()
            .find_map(|l| Some(l.split_once(what)?.1.trim().to_string()))
    };
    let rtt = line("bench rtt")
        .and_then(|l| l.split('=').nth(1).map(str::to_string))
        .and_then(|s| s.trim().split('/').nth(1).map(str::to_string))
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let http: Vec<f64> = line("bench http ")
        .map(|l| l.split_whitespace().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_default();
    if rtt.is_nan() || http.len() != 3 {
        eprintln!("{vm} printed:\n{text}");
    }
    let mbit = if http.len() == 3 && http[2] > http[1] {
        http[0] * 8.0 / 1e6 / (http[2] - http[1])
    } else {
        f64::NAN
    };
    lab.cli(&["cluster", "delete", name, "--wait"])?;
    Ok(Guests {
        rtt_ms: rtt,
        mbit_s: mbit,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--inner") {
        return inner(&args[2], args[3].parse()?);
    }
    let shoal = PathBuf::from(
        args.get(1)
            .ok_or_else(|| anyhow::anyhow!("usage: bench-net PATH-TO-SHOAL [--runs N] [--mib M]"))?,
    );
    let flag = |name: &str, default: u32| -> u32 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let (runs, mib) = (flag("--runs", 20) as usize, flag("--mib", 32));
    let me = std::env::current_exe()?;

    let lab = Lab::new(&shoal, 2)?;
    // 1. Network set-up and tear-down on one host, in its namespace.
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.namespaces[0]])
        .arg(&me)
        .args(["--inner", &lab.underlay(0), &runs.to_string()])
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "set-up bench: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let num = |k: &str| st[k].as_f64().unwrap_or(f64::NAN);
    let (setup, teardown) = (num("setup_ms"), num("teardown_ms"));
    let (gateway, gateway_off, nft_cli) = (num("gateway_ms"), num("gateway_off_ms"), num("nft_cli_ms"));

    // 2. Guests across hosts and on one bridge.
    let mut lab = lab;
    lab.start()?;
    lab.cli(&["template", "build-demo", "demo"])?;
    let t = Instant::now();
    let cross = measure(&lab, "cross", "ncross", &["--anti-affinity", "host"], mib)?;
    let local = measure(&lab, "local", "nlocal", &["--placement", "pack"], mib)?;
    let total = t.elapsed().as_secs_f64();
    drop(lab);

    print_table(
        &["measure", "value"],
        &[
            vec![
                format!("network set-up on a host (bridge+VXLAN+1 FDB entry, median of {runs})"),
                format!("{setup:.2} ms"),
            ],
            vec![
                format!("network tear-down on a host (median of {runs})"),
                format!("{teardown:.2} ms"),
            ],
            vec![
                format!("NAT gateway on (address+forwarding+nf_tables over netlink, median of {runs})"),
                format!("{gateway:.2} ms"),
            ],
            vec![
                format!("NAT gateway off (median of {runs})"),
                format!("{gateway_off:.2} ms"),
            ],
            vec![
                format!("the same nf_tables table via `nft -f` (as Incus/LXD do, median of {runs})"),
                format!("{nft_cli:.2} ms"),
            ],
            vec![
                "guest RTT across hosts over VXLAN (ping, avg of 20)".into(),
                format!("{:.3} ms", cross.rtt_ms),
            ],
            vec![
                "guest RTT on one host's bridge (ping, avg of 20)".into(),
                format!("{:.3} ms", local.rtt_ms),
            ],
            vec![
                format!("guest TCP (HTTP GET {mib} MiB) across hosts over VXLAN"),
                format!("{:.1} Mbit/s", cross.mbit_s),
            ],
            vec![
                format!("guest TCP (HTTP GET {mib} MiB) on one host's bridge"),
                format!("{:.1} Mbit/s", local.mbit_s),
            ],
        ],
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "net",
            "setup_ms": setup,
            "teardown_ms": teardown,
            "gateway_ms": gateway,
            "gateway_off_ms": gateway_off,
            "nft_cli_ms": nft_cli,
            "rtt_ms_overlay": cross.rtt_ms,
            "rtt_ms_bridge": local.rtt_ms,
            "tcp_mbit_s_overlay": cross.mbit_s,
            "tcp_mbit_s_bridge": local.mbit_s,
            "tcp_bytes": mib as u64 * 1048576,
            "guests_seconds": total,
            "accel": "tcg",
        })
    );
    Ok(())
}
