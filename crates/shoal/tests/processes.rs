//! Separate controller and agent processes: authentication off loopback, joining with one-time
//! tokens, and a controller killed with SIGKILL in the middle of a deployment.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_non_loopback_controller_requires_tokens_and_agents_join_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Bound to every address (so authentication is on), reached over loopback only.
    let url = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("ctl");
    let server = Daemon::spawn(
        &[
            "server",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &dir.path().join("server.log"),
    );
    wait_ready(&url, &server);
    let admin = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(admin.len(), 64);

    // No token, a wrong token: 401 and nothing changes.
    let e = fails(&url, &["host", "list"]);
    assert!(e.contains("API token"), "{e}");
    let http = reqwest::blocking::Client::new();
    let body = serde_json::json!({"name": "p", "template": "t", "cpus": 1, "memory": "1GiB"});
    for auth in [None, Some("Bearer wrong"), Some("Basic abc")] {
        let mut rb = http.post(format!("{url}/v1/profiles")).json(&body);
        if let Some(a) = auth {
            rb = rb.header("Authorization", a);
        }
        let r = rb.send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "{auth:?}");
        let j: serde_json::Value = r.json().unwrap();
        assert_eq!(j["error"]["code"], "unauthorized");
    }
    let with_env = |args: &[&str]| cli(&url, &[("SHOAL_TOKEN", &admin)], args);
    let o = with_env(&["--output", "json", "profile", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "[]", "a refused request created something");

    // The config file works too.
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, format!("# shoal\ntoken = \"{admin}\"\n")).unwrap();
    let o = cli(&url, &[("SHOAL_CONFIG", cfg.to_str().unwrap())], &["host", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // An agent without a join token is refused; with one, it joins.
    let agent_args = |name: &str, d: &str| -> Vec<String> {
        [
            "agent",
            "--name",
            name,
            "--controller",
            &url,
            "--data-dir",
            d,
            "--host-cpus",
            "2",
            "--host-memory",
            "2048",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a0dir = dir.path().join("a0");
    let a0 = agent_args("a0", a0dir.to_str().unwrap());
    let mut refused = Daemon::spawn(
        &a0.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("a0.log"),
    );
    let st = refused
        .wait_exit(Duration::from_secs(20))
        .expect("agent without token should exit");
    assert!(!st.success());
    assert!(refused.log().contains("join token"), "{}", refused.log());

    let o = with_env(&["host", "join-token"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let token = stdout(&o).trim().to_string();
    let a1dir = dir.path().join("a1");
    let mut a1_args = agent_args("a1", a1dir.to_str().unwrap());
    a1_args.extend(["--join-token".to_string(), token.clone()]);
    let mut a1 = Daemon::spawn(
        &a1_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("a1.log"),
    );
    eventually(Duration::from_secs(20), "a1 to join", || {
        stdout(&with_env(&["host", "list"])).contains("a1")
    });

    // The same join token does not admit a second host.
    let a2dir = dir.path().join("a2");
    let mut a2_args = agent_args("a2", a2dir.to_str().unwrap());
    a2_args.extend(["--join-token".to_string(), token.clone()]);
    let mut a2 = Daemon::spawn(
        &a2_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("a2.log"),
    );
    let st = a2
        .wait_exit(Duration::from_secs(20))
        .expect("second use of a join token should fail");
    assert!(!st.success());
    assert!(a2.log().contains("already used"), "{}", a2.log());
    assert!(!stdout(&with_env(&["host", "list"])).contains("a2"));

    // a1 restarts with its own credential, no join token needed, and keeps heartbeating.
    a1.kill9();
    let a1_again = agent_args("a1", a1dir.to_str().unwrap());
    let _a1 = Daemon::spawn(
        &a1_again.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("a1b.log"),
    );
    eventually(Duration::from_secs(20), "a1 to heartbeat again", || {
        let v: serde_json::Value =
            serde_json::from_str(&stdout(&with_env(&["--output", "json", "host", "list"]))).unwrap();
        v[0]["name"] == "a1" && v[0]["state"] == "up" && v[0]["last_heartbeat_unix_ms"].is_u64()
    });

    // Only hashes are stored: no token appears in the state store's files.
    let credential = std::fs::read_to_string(a1dir.join("credentials.json")).unwrap();
    let credential: serde_json::Value = serde_json::from_str(&credential).unwrap();
    let credential = credential["credential"].as_str().unwrap().to_string();
    for entry in std::fs::read_dir(data.join("state")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for secret in [&admin, &token, &credential] {
            assert!(!text.contains(secret.as_str()), "a token is stored in clear");
        }
    }
}

#[test]
fn a_controller_killed_mid_deployment_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("ctl");
    let server_args = [
        "server",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut server = Daemon::spawn(&server_args, &dir.path().join("server1.log"));
    wait_ready(&url, &server);
    let mut agents = Vec::new();
    for name in ["h1", "h2"] {
        let d = dir.path().join(name);
        agents.push(Daemon::spawn(
            &[
                "agent",
                "--name",
                name,
                "--controller",
                &url,
                "--data-dir",
                d.to_str().unwrap(),
                "--host-cpus",
                "4",
                "--host-memory",
                "4096",
                "--sim-boot-ms",
                "2500",
            ],
            &dir.path().join(format!("{name}.log")),
        ));
    }
    eventually(Duration::from_secs(20), "two hosts", || {
        json(&url, &["host", "list"]).as_array().unwrap().len() == 2
    });
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
    let op = json(&url, &["cluster", "create", "lab", "--profile", "small", "--size", "6"]);
    let id = op["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        json(&url, &["operation", "show", &id])["state"],
        "running",
        "deployment finished too early to test"
    );
    server.kill9();

    let _server = Daemon::spawn(&server_args, &dir.path().join("server2.log"));
    wait_ready(&url, &_server);
    eventually(Duration::from_secs(60), "the deployment to finish", || {
        json(&url, &["operation", "show", &id])["state"] == "succeeded"
    });
    let vms = json(&url, &["vm", "list"]);
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 6);
    assert!(vms.iter().all(|v| v["state"] == "running"));
    // Each host runs exactly the VMs the controller placed there, once.
    let mut total = 0;
    for name in ["h1", "h2"] {
        let f = dir.path().join(name).join("sim/sim-vms.json");
        let on_host: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let placed = vms.iter().filter(|v| v["host"] == name).count();
        assert_eq!(on_host.as_array().unwrap().len(), placed, "{name}");
        total += placed;
    }
    assert_eq!(total, 6);
    drop(agents);
}

/// Unmounts the test's tmpfs however the test ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn on_a_full_disk_shoal_up_starts_serves_reads_and_refuses_writes_with_507() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test needs root to mount a small tmpfs (a real full disk); mount failed: {mounted}"
    );
    let _unmount = Mount(mnt.clone());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = mnt.join("data");
    let args = [
        "up",
        "--hosts",
        "2",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut up = Daemon::spawn(&args, &dir.path().join("up1.log"));
    wait_ready(&url, &up);
    ok(&url, &["network", "create", "n1"]);
    up.signal_and_wait("TERM", Duration::from_secs(20))
        .expect("shoal up stops on SIGTERM");

    // Fill the disk to the last byte.
    use std::io::Write;
    let mut fill = std::fs::File::create(mnt.join("fill")).unwrap();
    while fill.write_all(&[0u8; 65536]).is_ok() {}
    while fill.write_all(&[0u8]).is_ok() {}
    drop(fill);

    let up = Daemon::spawn(&args, &dir.path().join("up2.log"));
    wait_ready(&url, &up);
    eventually(Duration::from_secs(10), "both hosts", || {
        json(&url, &["host", "list"]).as_array().unwrap().len() == 2
    });
    let nets = json(&url, &["network", "list"]);
    assert_eq!(nets[0]["name"], "n1", "{nets}");
    let img = image(dir.path());
    let e = fails(&url, &["template", "import", "t", img.to_str().unwrap()]);
    assert!(e.contains("disk is full"), "{e}");
    assert!(json(&url, &["template", "list"]).as_array().unwrap().is_empty());
    drop(up);
}
