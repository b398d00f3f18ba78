//! Real `shoal` processes for end-to-end tests: started on free loopback ports, killed on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A background `shoal` process; killed (SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(args: &[&str], log: &Path) -> Daemon {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new(SHOAL)
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by name (INT, TERM) and waits for the exit status.
    pub fn signal_and_wait(&mut self, sig: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits until the process exits by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the CLI against `url`, with extra environment.
pub fn cli(url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(SHOAL);
    c.arg("--url").arg(url).args(args);
    c.env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_URL")
        .env("SHOAL_CONFIG", "/nonexistent");
    // One local image cache per controller under test, not the user's.
    let cache: String = url
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    c.env(
        "SHOAL_IMAGE_CACHE",
        std::env::temp_dir().join(format!("shoal-test-image-cache-{cache}")),
    );
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the CLI and demands success, returning stdout.
pub fn ok(url: &str, args: &[&str]) -> String {
    let o = cli(url, &[], args);
    assert!(o.status.success(), "shoal {args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// Runs the CLI with `--output json` and parses stdout.
pub fn json(url: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--output", "json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(url, &a)).unwrap()
}

/// Runs the CLI expecting failure; returns stderr.
pub fn fails(url: &str, args: &[&str]) -> String {
    let o = cli(url, &[], args);
    assert!(!o.status.success(), "shoal {args:?} should have failed: {}", stdout(&o));
    stderr(&o)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the controller at `url` answers: generously, since a real guest booting under
/// TCG next to the test (the Debian tests) was seen to slow a debug controller's start past 30 s.
pub fn wait_ready(url: &str, d: &Daemon) {
    eventually(Duration::from_secs(120), "controller to answer", || {
        cli(url, &[], &["host", "list"]).status.success() || {
            // Authentication errors mean it answers.
            let o = cli(url, &[], &["host", "list"]);
            let e = stderr(&o);
            assert!(!e.contains("panicked"), "{}", d.log());
            e.contains("token")
        }
    });
}

/// A small template image file.
pub fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    let mut disk = vec![0x5au8; 64 * 1024];
    disk[510..512].copy_from_slice(&[0x55, 0xAA]); // an MBR boot signature: a disk image
    std::fs::write(&p, disk).unwrap();
    p
}
