//! The CLI contract, end to end: a real `shoal up` process and the CLI run as separate processes.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn cli_contract_from_template_to_deleted_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("data");
    let mut up = Daemon::spawn(
        &[
            "up",
            "--hosts",
            "3",
            "--driver",
            "sim",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--host-cpus",
            "4",
            "--host-memory",
            "8192",
        ],
        &dir.path().join("up.log"),
    );
    wait_ready(&url, &up);
    eventually(Duration::from_secs(10), "3 hosts", || {
        json(&url, &["host", "list"]).as_array().unwrap().len() == 3
    });

    let hosts = json(&url, &["host", "list"]);
    for key in ["name", "state", "cpus", "memory_mib", "used_cpus", "used_memory_mib"] {
        assert!(hosts[0].get(key).is_some(), "host JSON lacks {key}: {hosts}");
    }
    assert_eq!(hosts[0]["state"], "up");
    assert_eq!(hosts[0]["cpus"], 4);

    let img = image(dir.path());
    ok(&url, &["template", "import", "deb", img.to_str().unwrap()]);
    let t = json(&url, &["template", "list"]);
    assert_eq!(t[0]["name"], "deb");
    assert_eq!(t[0]["size_bytes"], 64 * 1024);
    let hash = t[0]["hash"].as_str().unwrap().to_string();
    assert!(hash.starts_with("manifest:"), "{hash}");
    // The disk is in the image store: it exports bit-identical, and a second import of the
    // same disk uploads no chunk.
    let back = dir.path().join("back.img");
    ok(&url, &["template", "export", "deb", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&img).unwrap(), std::fs::read(&back).unwrap());
    let o = cli(&url, &[], &["template", "export", "deb", back.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("--force"), "{}", stderr(&o));
    let o = cli(&url, &[], &["template", "import", "deb2", img.to_str().unwrap()]);
    assert!(
        o.status.success() && stderr(&o).contains("uploaded 0 of"),
        "{}",
        stderr(&o)
    );
    let stats = json(&url, &["image", "stats"]);
    for key in ["logical_bytes", "stored_bytes", "chunks"] {
        assert!(stats[key].as_u64().is_some(), "image stats lacks {key}: {stats}");
    }
    assert_eq!(
        stats["logical_bytes"],
        64 * 1024,
        "two templates of one disk are one image"
    );
    ok(&url, &["template", "delete", "deb2"]);
    assert_eq!(
        json(&url, &["image", "gc"])["chunks_removed"],
        0,
        "deb still holds the chunks"
    );

    ok(
        &url,
        &[
            "profile",
            "create",
            "small",
            "--template",
            "deb",
            "--cpus",
            "1",
            "--memory",
            "512MiB",
        ],
    );
    ok(
        &url,
        &[
            "profile", "create", "big", "--parent", "small", "--cpus", "2", "--disk", "2GiB",
        ],
    );
    let big = json(&url, &["profile", "show", "big"]);
    assert_eq!(big["effective"]["memory_mib"], 512);
    assert_eq!(big["effective"]["cpus"], 2);
    assert_eq!(big["effective"]["disk_mib"], 2048);
    assert_eq!(big["effective"]["template"], "deb");
    let table = ok(&url, &["profile", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("big") && table.contains("small"));

    // --wait shows the four steps and the table of the finished operation.
    let o = cli(
        &url,
        &[],
        &["cluster", "create", "lab", "--profile", "big", "--size", "5", "--wait"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    for (i, step) in ["prepare_images", "configure_vms", "choose_hosts", "execute"]
        .iter()
        .enumerate()
    {
        assert!(
            err.contains(&format!("[{}/4] {step}", i + 1)),
            "progress lacks {step}: {err}"
        );
    }
    assert!(stdout(&o).contains("succeeded"));

    let vms = json(&url, &["vm", "list", "--cluster", "lab"]);
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 5);
    for key in [
        "name",
        "uuid",
        "cluster",
        "host",
        "state",
        "ip",
        "mac",
        "cpus",
        "memory_mib",
    ] {
        assert!(vms[0].get(key).is_some(), "VM JSON lacks {key}");
    }
    assert!(vms.iter().all(|v| v["state"] == "running" && v["cpus"] == 2));
    // The simulated driver has no disks: a snapshot is refused, naming why, and stores nothing.
    let o = cli(&url, &[], &["vm", "snapshot", "lab-3"]);
    assert!(
        !o.status.success() && stderr(&o).contains("keeps no disks"),
        "{}",
        stderr(&o)
    );
    let o = cli(&url, &[], &["template", "publish", "lab-3", "copy"]);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(json(&url, &["template", "list"])
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["name"] != "copy"));
    let vm = json(&url, &["vm", "show", "lab-3"]);
    assert_eq!(vm["name"], "lab-3");
    assert_eq!(vm["cluster"], "lab");
    let c = json(&url, &["cluster", "show", "lab"]);
    assert_eq!((c["size"].as_u64(), c["vms_running"].as_u64()), (Some(5), Some(5)));
    assert_eq!(c["state"], "ready");
    let vm_table = ok(&url, &["vm", "list"]);
    assert!(vm_table
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .eq(["NAME", "CLUSTER", "HOST", "STATE", "IP", "MAC", "CPUS", "MEMORY"]));
    assert_eq!(vm_table.lines().count(), 6);

    // Failures exit non-zero with the reason on stderr.
    let e = fails(&url, &["cluster", "create", "huge", "--profile", "big", "--size", "10"]);
    assert!(
        e.contains("needs 18 vCPU more than free on 3 hosts (2 free, 20 needed)"),
        "{e}"
    );
    assert!(fails(&url, &["cluster", "show", "ghost"]).contains("cluster \"ghost\" not found"));
    assert!(fails(
        &url,
        &[
            "profile",
            "create",
            "x",
            "--template",
            "deb",
            "--cpus",
            "1",
            "--memory",
            "12XB"
        ]
    )
    .contains("invalid size \"12XB\""));
    assert!(fails(&url, &["cluster", "create", "lab", "--profile", "big", "--size", "1"]).contains("already exists"));
    assert!(fails(&url, &["template", "delete", "deb"]).contains("in use"));
    assert!(fails(&url, &["operation", "show", "nope"]).contains("invalid operation id"));

    let o = cli(&url, &[], &["cluster", "scale", "lab", "--size", "2", "--wait"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&url, &["vm", "list"]).as_array().unwrap().len(), 2);
    let ops = json(&url, &["operation", "list"]);
    let ops = ops.as_array().unwrap();
    assert_eq!(ops.len(), 2);
    let id = ops[1]["id"].as_str().unwrap();
    let op = json(&url, &["operation", "show", id]);
    assert_eq!(op["kind"], "cluster_scale");
    assert_eq!(op["state"], "succeeded");

    ok(&url, &["cluster", "delete", "lab", "--wait"]);
    assert!(json(&url, &["cluster", "list"]).as_array().unwrap().is_empty());
    ok(&url, &["profile", "delete", "big"]);
    ok(&url, &["profile", "delete", "small"]);
    ok(&url, &["template", "delete", "deb"]);

    // Ctrl-C stops `shoal up` cleanly.
    let status = up
        .signal_and_wait("INT", Duration::from_secs(15))
        .expect("shoal up did not stop on SIGINT");
    assert!(status.success(), "exit {status:?}: {}", up.log());
}

#[test]
fn state_survives_a_restart_of_shoal_up() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("data");
    let args = [
        "up",
        "--hosts",
        "2",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        data.to_str().unwrap(),
        "--host-cpus",
        "4",
        "--host-memory",
        "4096",
    ];
    let args: Vec<&str> = args.to_vec();
    let mut up = Daemon::spawn(&args, &dir.path().join("up1.log"));
    wait_ready(&url, &up);
    let img = image(dir.path());
    ok(&url, &["template", "import", "deb", img.to_str().unwrap()]);
    ok(
        &url,
        &[
            "profile",
            "create",
            "small",
            "--template",
            "deb",
            "--cpus",
            "1",
            "--memory",
            "256MiB",
        ],
    );
    ok(
        &url,
        &[
            "cluster",
            "create",
            "lab",
            "--profile",
            "small",
            "--size",
            "3",
            "--wait",
        ],
    );
    let before = json(&url, &["vm", "list"]);
    up.signal_and_wait("TERM", Duration::from_secs(15)).expect("stop");

    let up = Daemon::spawn(&args, &dir.path().join("up2.log"));
    wait_ready(&url, &up);
    let after = json(&url, &["vm", "list"]);
    assert_eq!(before, after, "VMs changed across a restart");
    assert_eq!(json(&url, &["cluster", "show", "lab"])["state"], "ready");
    // It keeps working after the restart.
    ok(&url, &["cluster", "scale", "lab", "--size", "4", "--wait"]);
    let ips: std::collections::HashSet<String> = json(&url, &["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["ip"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), 4);
}

/// `shoal plan …` on a snapshot file needs no controller; on the live state it matches what
/// `cluster create --dry-run`, `host rebalance --plan` and `host drain --plan` print.
#[test]
fn plans_offline_on_a_snapshot_and_live() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap.json");
    let hosts: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            serde_json::json!({"name": format!("h{i}"), "cpus": 8, "memory_mib": 16384,
                                    "labels": {"zone": format!("z{}", i % 2)}})
        })
        .collect();
    let vms: Vec<serde_json::Value> = (0..6)
        .map(|i| serde_json::json!({"name": format!("v{i}"), "cluster": "c", "host": "h0", "cpus": 1, "memory_mib": 2048}))
        .collect();
    std::fs::write(&snap, serde_json::json!({"hosts": hosts, "vms": vms}).to_string()).unwrap();
    let s = snap.to_str().unwrap();
    // Nothing listens on port 1: these never talk to a controller.
    let dead = "http://127.0.0.1:1";
    let out = ok(
        dead,
        &[
            "plan",
            "place",
            "--snapshot",
            s,
            "--size",
            "2",
            "--cpus",
            "1",
            "--memory",
            "1GiB",
            "--anti-affinity",
            "zone",
            "--explain",
        ],
    );
    assert!(out.contains("plan: 2 VMs") && out.contains("chosen"), "{out}");
    let e = fails(
        dead,
        &[
            "plan",
            "place",
            "--snapshot",
            s,
            "--size",
            "3",
            "--cpus",
            "1",
            "--memory",
            "1GiB",
            "--anti-affinity",
            "zone",
        ],
    );
    assert!(
        e.contains("anti-affinity by zone: needs 3 zones") && e.contains("only 2 have"),
        "{e}"
    );
    let out = ok(
        dead,
        &[
            "plan",
            "place",
            "--snapshot",
            s,
            "--size",
            "2",
            "--cpus",
            "1",
            "--memory",
            "1GiB",
            "--require",
            "zone=z1",
            "--explain",
        ],
    );
    assert!(out.contains("rejected by labels: zone=z0, needs zone=z1"), "{out}");
    let plan = json(dead, &["plan", "rebalance", "--snapshot", s]);
    assert!(
        plan["after"]["total"].as_f64().unwrap() < plan["before"]["total"].as_f64().unwrap(),
        "{plan}"
    );
    assert!(!plan["moves"].as_array().unwrap().is_empty());
    let table = ok(dead, &["plan", "drain", "h0", "--snapshot", s]);
    assert!(table.starts_with("cluster score (Ganeti hbal's)"), "{table}");
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 6, "{table}");
    assert!(
        rows.iter().all(|l| l.split_whitespace().nth(2) == Some("h0")),
        "{table}"
    );

    // Live: the same commands against a running controller.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let up = Daemon::spawn(
        &[
            "up",
            "--hosts",
            "3",
            "--driver",
            "sim",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--host-cpus",
            "4",
            "--host-memory",
            "8192",
        ],
        &dir.path().join("up.log"),
    );
    wait_ready(&url, &up);
    eventually(Duration::from_secs(10), "3 hosts", || {
        json(&url, &["host", "list"]).as_array().unwrap().len() == 3
    });
    ok(
        &url,
        &["template", "import", "deb", image(dir.path()).to_str().unwrap()],
    );
    ok(
        &url,
        &[
            "profile",
            "create",
            "small",
            "--template",
            "deb",
            "--cpus",
            "1",
            "--memory",
            "512MiB",
        ],
    );
    let out = ok(
        &url,
        &[
            "cluster",
            "create",
            "lab",
            "--profile",
            "small",
            "--size",
            "4",
            "--placement",
            "pack",
            "--dry-run",
            "--explain",
        ],
    );
    assert!(out.contains("plan: 4 VMs") && out.contains("chosen"), "{out}");
    assert!(
        json(&url, &["cluster", "list"]).as_array().unwrap().is_empty(),
        "a dry run creates nothing"
    );
    ok(
        &url,
        &[
            "cluster",
            "create",
            "lab",
            "--profile",
            "small",
            "--size",
            "4",
            "--placement",
            "pack",
            "--wait",
        ],
    );
    let live = dir.path().join("live.json");
    ok(&url, &["plan", "snapshot", live.to_str().unwrap()]);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&live).unwrap()).unwrap();
    assert_eq!(written["hosts"].as_array().unwrap().len(), 3);
    assert_eq!(written["vms"].as_array().unwrap().len(), 4);
    let offline = json(dead, &["plan", "rebalance", "--snapshot", live.to_str().unwrap()]);
    let online = json(&url, &["host", "rebalance", "--plan"]);
    assert_eq!(offline["moves"], online["moves"], "the same plan offline and live");
    assert!(!online["moves"].as_array().unwrap().is_empty());
    let drain = json(
        &url,
        &["host", "drain", "--plan", online["moves"][0]["from"].as_str().unwrap()],
    );
    assert!(!drain["moves"].as_array().unwrap().is_empty());
}

/// Starts `shoal up` with two simulated hosts; returns it, its URL and its directory.
fn up_two_hosts() -> (Daemon, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let up = Daemon::spawn(
        &[
            "up",
            "--hosts",
            "2",
            "--driver",
            "sim",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--host-cpus",
            "4",
            "--host-memory",
            "4096",
        ],
        &dir.path().join("up.log"),
    );
    wait_ready(&url, &up);
    eventually(Duration::from_secs(10), "2 hosts", || {
        json(&url, &["host", "list"]).as_array().unwrap().len() == 2
    });
    (up, url, dir)
}

/// A daemon's log that goes to a file (not a terminal) carries no colour codes.
#[test]
fn logs_to_a_file_are_plain_text() {
    let (up, url, _dir) = up_two_hosts();
    ok(&url, &["host", "list"]);
    let log = up.log();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a log file: {log:?}");
}

/// Every command that reports something prints JSON with `--output json`, including those
/// that only change a mark or delete something.
#[test]
fn commands_that_change_things_report_json() {
    let (_up, url, dir) = up_two_hosts();

    let m = json(&url, &["host", "maintenance", "host1"]);
    assert_eq!(
        (&m["host"], &m["maintenance"], &m["state"]),
        (&"host1".into(), &true.into(), &"maintenance".into()),
        "{m}"
    );
    let m = json(&url, &["host", "maintenance", "host1", "--off"]);
    assert_eq!((&m["maintenance"], &m["state"]), (&false.into(), &"up".into()), "{m}");
    // Out of maintenance but still draining: the state says the host still takes nothing.
    ok(&url, &["host", "drain", "host2"]);
    ok(&url, &["host", "maintenance", "host2"]);
    let m = json(&url, &["host", "maintenance", "host2", "--off"]);
    assert_eq!(
        (&m["maintenance"], &m["state"]),
        (&false.into(), &"draining".into()),
        "{m}"
    );
    let u = json(&url, &["host", "undrain", "host2"]);
    assert_eq!(
        (&u["host"], &u["draining"], &u["state"]),
        (&"host2".into(), &false.into(), &"up".into()),
        "{u}"
    );
    assert!(fails(&url, &["host", "undrain", "ghost"]).contains("host \"ghost\" not found"));

    let img = image(dir.path());
    ok(&url, &["template", "import", "deb", img.to_str().unwrap()]);
    let back = dir.path().join("back.img");
    let e = json(&url, &["template", "export", "deb", back.to_str().unwrap()]);
    assert_eq!((&e["template"], &e["format"]), (&"deb".into(), &"raw".into()), "{e}");
    assert_eq!(e["logical_bytes"], std::fs::metadata(&img).unwrap().len(), "{e}");
    let snap = dir.path().join("snap.json");
    let s = json(&url, &["plan", "snapshot", snap.to_str().unwrap()]);
    assert_eq!(s["hosts"], 2, "{s}");
    assert!(snap.exists());

    ok(
        &url,
        &[
            "profile",
            "create",
            "small",
            "--template",
            "deb",
            "--cpus",
            "1",
            "--memory",
            "256MiB",
        ],
    );
    ok(
        &url,
        &[
            "cluster",
            "create",
            "lab",
            "--profile",
            "small",
            "--size",
            "1",
            "--wait",
        ],
    );
    let c = json(&url, &["vm", "console", "lab-0"]);
    assert_eq!(c["vm"], "lab-0", "{c}");
    let text = ok(&url, &["vm", "console", "lab-0"]);
    assert!(!text.is_empty());
    assert_eq!(c["data"], text.as_str(), "the same console in JSON and as text");
    ok(&url, &["cluster", "delete", "lab", "--wait"]);

    ok(
        &url,
        &["network", "create", "n1", "--subnet", "10.9.0.0/24", "--dns", "1.1.1.1"],
    );
    for (kind, name) in [("profile", "small"), ("template", "deb"), ("network", "n1")] {
        let d = json(&url, &[kind, "delete", name]);
        assert_eq!(
            (&d["kind"], &d["name"], &d["deleted"]),
            (&kind.into(), &name.into(), &true.into()),
            "{d}"
        );
    }
}

/// `network show` is a sheet of `key: value` lines; its JSON is the network's record.
#[test]
fn network_show_is_a_details_view() {
    let (_up, url, _dir) = up_two_hosts();
    ok(
        &url,
        &[
            "network",
            "create",
            "n1",
            "--subnet",
            "10.9.0.0/24",
            "--vni",
            "4242",
            "--dns",
            "1.1.1.1,9.9.9.9",
        ],
    );
    let text = ok(&url, &["network", "show", "n1"]);
    let pairs: Vec<(&str, &str)> = text
        .lines()
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("not key: value: {l:?} in {text}"));
            (k, v.trim())
        })
        .collect();
    let get = |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1);
    assert_eq!(get("name"), Some("n1"), "{text}");
    assert_eq!(get("subnet"), Some("10.9.0.0/24"), "{text}");
    assert_eq!(get("vni"), Some("4242"), "{text}");
    assert_eq!(get("dns"), Some("1.1.1.1, 9.9.9.9"), "{text}");
    assert_eq!(get("nat"), Some("no"), "{text}");
    let j = json(&url, &["network", "show", "n1"]);
    assert_eq!(
        (&j["name"], &j["vni"], &j["subnet"]),
        (&"n1".into(), &4242.into(), &"10.9.0.0/24".into())
    );
    assert!(j["clusters"].as_array().unwrap().is_empty(), "{j}");
}

/// Errors say each cause once and name what is at fault; clap does not take a negative size for
/// a flag.
#[test]
fn errors_name_the_culprit_once() {
    let dead = "http://127.0.0.1:1";
    let e = fails(dead, &["sim", "--trace", "/nonexistent"]);
    assert!(e.contains("/nonexistent"), "{e}");
    assert_eq!(e.matches("No such file").count(), 1, "{e}");

    let e = fails(dead, &["host", "list"]);
    assert!(e.contains(dead), "{e}");
    assert_eq!(e.matches("error sending request").count(), 1, "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");

    for args in [
        &["cluster", "scale", "lab", "--size", "-1"][..],
        &["cluster", "create", "lab", "--profile", "p", "--size", "-1"],
        &["cluster", "scale", "lab", "--size", "0"],
        &["cluster", "create", "lab", "--profile", "p", "--size", "65001"],
    ] {
        let e = fails(dead, args);
        let size = args[args.len() - 1];
        assert!(e.contains(&format!("invalid cluster size {size}")), "{args:?}: {e}");
        assert!(e.contains("1 to 65000 VMs"), "{args:?}: {e}");
        assert!(!e.contains("-- -1"), "{args:?}: {e}");
    }
    for cmd in ["create", "scale"] {
        let help = ok(dead, &["cluster", cmd, "--help"]);
        assert!(
            help.contains("a cluster has 1 to 65000"),
            "cluster {cmd} --help: {help}"
        );
    }
    let help = ok(dead, &["cluster", "scale", "--help"]);
    assert!(help.contains("delete it to have none"), "{help}");
}

/// The config file refuses what it does not know, naming the key or value and the file.
#[test]
fn a_bad_config_file_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let path = config.to_str().unwrap();
    let env = [("SHOAL_CONFIG", path)];
    let run = |text: &str| {
        std::fs::write(&config, text).unwrap();
        let o = cli("http://127.0.0.1:1", &env, &["host", "list"]);
        assert!(!o.status.success(), "{text:?} was accepted");
        stderr(&o)
    };
    let e = run("url = \"http://127.0.0.1:1\"\nurll = \"http://127.0.0.1:2\"\n");
    assert!(
        e.contains(path) && e.contains("line 2") && e.contains("unknown key \"urll\""),
        "{e}"
    );
    let e = run("url = 5\n");
    assert!(
        e.contains(path) && e.contains("the value of url must be a string"),
        "{e}"
    );
    assert!(!e.contains("builder error"), "{e}");
    let e = run("url = \"127.0.0.1:7700\"\n");
    assert!(
        e.contains(path) && e.contains("\"127.0.0.1:7700\" is not a valid URL"),
        "{e}"
    );
    let e = fails("5", &["host", "list"]);
    assert!(e.contains("--url") && e.contains("\"5\" is not a valid URL"), "{e}");
}

/// Help says how the consolidator, the rebalancer and drains move VMs: by live migration.
#[test]
fn help_says_vms_move_by_live_migration() {
    let dead = "http://127.0.0.1:1";
    for args in [
        &["server", "--help"][..],
        &["up", "--help"],
        &["host", "rebalance", "--help"],
        &["host", "drain", "--help"],
        &["host", "consolidate", "--help"],
    ] {
        let help = ok(dead, args).to_lowercase();
        assert!(
            help.contains("live migration") || help.contains("live-migrate"),
            "{args:?}: {help}"
        );
        assert!(
            !help.contains("restart"),
            "{args:?} still says VMs are moved by restarting: {help}"
        );
    }
    let help = ok(dead, &["vm", "migrate", "--help"]);
    for flag in [
        "--to",
        "--mode",
        "--max-downtime",
        "--bandwidth",
        "--wait",
        "--dry-run",
        "--explain",
    ] {
        assert!(help.contains(flag), "vm migrate --help lacks {flag}: {help}");
    }
}

/// Counts read as English: one VM, two VMs.
#[test]
fn counts_agree_with_their_nouns() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap.json");
    let hosts = serde_json::json!([
        {"name": "h0", "cpus": 8, "memory_mib": 16384},
        {"name": "h1", "cpus": 8, "memory_mib": 16384, "state": "maintenance"},
        {"name": "h2", "cpus": 8, "memory_mib": 16384, "state": "powered_off"},
    ]);
    std::fs::write(&snap, serde_json::json!({"hosts": hosts, "vms": []}).to_string()).unwrap();
    let s = snap.to_str().unwrap();
    let dead = "http://127.0.0.1:1";
    let place = |size: &str, explain: bool| {
        let mut a = vec![
            "plan",
            "place",
            "--snapshot",
            s,
            "--size",
            size,
            "--cpus",
            "1",
            "--memory",
            "1GiB",
        ];
        if explain {
            a.push("--explain");
        }
        ok(dead, &a)
    };
    assert!(
        place("1", false).starts_with("plan: 1 VM on 1 host\n"),
        "{}",
        place("1", false)
    );
    assert!(
        place("2", false).starts_with("plan: 2 VMs on 1 host\n"),
        "{}",
        place("2", false)
    );
    let out = place("1", true);
    assert!(out.contains("rejected by state: host is in maintenance"), "{out}");
    assert!(out.contains("rejected by state: host is powered off"), "{out}");
    let out = ok(dead, &["plan", "rebalance", "--snapshot", s]);
    assert!(out.contains("0 migrations in 0 waves"), "{out}");
}

/// `--ssh-key` takes a key or a file of keys, `--user-data` a file: what cannot be read or is not
/// valid is refused naming the file or value, and nothing is created.
#[test]
fn guest_flags_read_files_and_name_what_is_wrong() {
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK5l a@example";
    let (_up, url, dir) = up_two_hosts();
    let img = image(dir.path());
    ok(&url, &["template", "import", "deb", img.to_str().unwrap()]);
    let keys = dir.path().join("keys.pub");
    std::fs::write(&keys, format!("# the team\n{KEY}\n\n{KEY} second\n")).unwrap();
    let script = dir.path().join("setup.sh");
    std::fs::write(&script, "#!/bin/sh\necho configured > /var/tmp/x\n").unwrap();
    let base = [
        "profile",
        "create",
        "p",
        "--template",
        "deb",
        "--cpus",
        "1",
        "--memory",
        "256MiB",
    ];
    fn args<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        base.iter().chain(extra).copied().collect()
    }
    let p = json(
        &url,
        &args(
            &base,
            &[
                "--user",
                "ops",
                "--ssh-key",
                keys.to_str().unwrap(),
                "--user-data",
                script.to_str().unwrap(),
            ],
        ),
    );
    assert_eq!(p["effective"]["user"], "ops", "{p}");
    assert_eq!(p["effective"]["ssh_keys"].as_array().unwrap().len(), 2, "{p}");
    assert!(
        p["effective"]["user_data"].as_str().unwrap().starts_with("#!/bin/sh"),
        "{p}"
    );

    let garbage = dir.path().join("garbage.pub");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let empty = dir.path().join("empty.pub");
    std::fs::write(&empty, "# nothing here\n").unwrap();
    let yaml = dir.path().join("plain.yaml");
    std::fs::write(&yaml, "runcmd: [ls]\n").unwrap();
    let binary = dir.path().join("binary");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let big = dir.path().join("big.sh");
    std::fs::write(&big, format!("#!/bin/sh\n{}", "#".repeat(70_000))).unwrap();
    for (extra, want) in [
        (
            vec!["--ssh-key", "/nonexistent/id.pub"],
            "reading SSH key file /nonexistent/id.pub",
        ),
        (vec!["--ssh-key", garbage.to_str().unwrap()], "unknown key type \"not\""),
        (vec!["--ssh-key", empty.to_str().unwrap()], "no key in it"),
        (vec!["--ssh-key", "ssh-ed25519 AAAA"], "not a ssh-ed25519 key"),
        (vec!["--user", "Admin"], "invalid user name \"Admin\""),
        (
            vec!["--user-data", "/nonexistent/ud"],
            "reading user data /nonexistent/ud",
        ),
        (
            vec!["--user-data", yaml.to_str().unwrap()],
            "not a format cloud-init reads",
        ),
        (vec!["--user-data", binary.to_str().unwrap()], "is not UTF-8 text"),
        (vec!["--user-data", big.to_str().unwrap()], "over the limit"),
    ] {
        let mut a = args(&base, &extra);
        a[2] = "q";
        let e = fails(&url, &a);
        assert!(e.contains(want), "{extra:?}: want {want:?}, got {e}");
        let mut c = vec!["cluster", "create", "c", "--profile", "p", "--size", "1"];
        c.extend(extra.iter().copied());
        let e = fails(&url, &c);
        assert!(e.contains(want), "cluster {extra:?}: want {want:?}, got {e}");
    }
    let profiles = json(&url, &["profile", "list"]);
    assert_eq!(profiles.as_array().unwrap().len(), 1, "{profiles}");
    assert_eq!(json(&url, &["cluster", "list"]).as_array().unwrap().len(), 0);
}
