//! The demo template: what the builder writes (kernel, initramfs, disk), its errors, and real boots
//! under QEMU/TCG against the guest contract (Shoal's NoCloud seed, `shoal-guest: ready|failed`, `alive <n>`, the
//! ACPI power button). The boot tests need qemu-system-x86_64, qemu-img, mkfs.vfat and mcopy; when
//! one is missing they fail with a message naming it, they never skip.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_demo::{
    build_demo_template, build_demo_template_from, extract_vmlinux, module_load_order, DemoError, DemoSources,
    DemoTemplate, DEMO_CMDLINE, DEMO_MODULES,
};

const MAC: &str = "52:54:00:ab:cd:ef";

fn build(dir: &Path) -> (DemoTemplate, Duration) {
    let started = Instant::now();
    let template = build_demo_template(dir).unwrap_or_else(|e| panic!("building the demo template: {e}"));
    (template, started.elapsed())
}

// --- a tiny newc cpio reader ------------------------------------------------------------------------

struct CpioEntry {
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

fn read_cpio(archive: &[u8]) -> BTreeMap<String, CpioEntry> {
    let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    let align = |n: usize| (n + 3) & !3;
    let mut entries = BTreeMap::new();
    let mut pos = 0;
    loop {
        let h = &archive[pos..pos + 110];
        assert_eq!(&h[..6], b"070701", "newc magic at offset {pos}");
        let field = |i: usize| hex(&h[6 + i * 8..14 + i * 8]);
        let (mode, size, rdev, namesize) = (field(1), field(6) as usize, (field(9), field(10)), field(11) as usize);
        let name_start = pos + 110;
        let name = std::str::from_utf8(&archive[name_start..name_start + namesize - 1])
            .unwrap()
            .to_string();
        assert_eq!(archive[name_start + namesize - 1], 0, "NUL after the name {name}");
        let data_start = align(name_start + namesize);
        let data = archive[data_start..data_start + size].to_vec();
        pos = align(data_start + size);
        if name == "TRAILER!!!" {
            assert!(archive[pos..].iter().all(|&b| b == 0), "only padding after the trailer");
            return entries;
        }
        assert!(
            entries.insert(name.clone(), CpioEntry { mode, rdev, data }).is_none(),
            "{name} twice"
        );
    }
}

#[test]
fn builds_a_demo_template_in_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let (t, took) = build(dir.path());
    eprintln!("demo template built in {took:.2?}");
    assert!(took < Duration::from_secs(60), "building took {took:?}");
    assert_eq!(t.cmdline, DEMO_CMDLINE);
    for p in [&t.disk, &t.kernel, &t.initrd] {
        assert!(
            p.starts_with(dir.path()),
            "{} outside the output directory",
            p.display()
        );
    }
    // Nothing but the three files is left behind (no staging directory, no temporary files).
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["disk.raw", "initrd.cpio", "vmlinux"]);

    // Kernel: an x86_64 ELF executable.
    let kernel = std::fs::read(&t.kernel).unwrap();
    assert_eq!(&kernel[..4], b"\x7fELF", "vmlinux is not an ELF file");
    assert_eq!(kernel[4], 2, "vmlinux is not a 64-bit ELF");
    assert_eq!(
        u16::from_le_bytes([kernel[18], kernel[19]]),
        62,
        "vmlinux is not x86_64"
    );

    // Initramfs: /init, a static busybox, the console node and the modules in dependency order.
    let cpio = read_cpio(&std::fs::read(&t.initrd).unwrap());
    let init = &cpio["init"];
    assert_eq!(init.mode, 0o100755);
    assert!(init.data.starts_with(b"#!/bin/busybox sh\n"));
    let busybox = &cpio["bin/busybox"];
    assert_eq!(busybox.mode, 0o100755);
    assert_eq!(busybox.data, std::fs::read("/bin/busybox").unwrap());
    let console = &cpio["dev/console"];
    assert_eq!((console.mode & 0o170000, console.rdev), (0o020000, (5, 1)));
    assert!(
        cpio["etc/acpi/PWRF/00000080"].mode & 0o111 != 0,
        "power button handler not executable"
    );
    let order: Vec<String> = String::from_utf8(cpio["etc/modules"].data.clone())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    eprintln!("module load order: {}", order.join(" "));
    for m in &order {
        let ko = &cpio[&format!("lib/modules/{m}.ko")];
        assert!(ko.data.starts_with(b"\x7fELF"), "{m}.ko is not an ELF object");
    }
    for wanted in DEMO_MODULES {
        assert!(order.iter().any(|m| m == wanted), "{wanted} missing from the initramfs");
    }
    let at = |m: &str| {
        order
            .iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("{m} not loaded"))
    };
    assert!(at("virtio_ring") < at("virtio"));
    assert!(at("virtio") < at("virtio_pci"));
    assert!(at("virtio_pci") < at("virtio_blk"));
    assert!(at("failover") < at("net_failover"));
    assert!(at("net_failover") < at("virtio_net"));
    assert!(at("fat") < at("vfat"));
    assert!(at("cdrom") < at("isofs"));
    // Every module after all of its dependencies, as modules.dep says.
    let version = std::fs::read_dir("/lib/modules")
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("modules.dep").exists())
        .expect("a /lib/modules/<version>/modules.dep");
    let computed = module_load_order(&version, DEMO_MODULES).unwrap();
    assert_eq!(computed.iter().map(|m| m.name.clone()).collect::<Vec<_>>(), order);

    // Disk: 64 MiB raw ext4 (superblock magic 0xEF53 at 1080) labelled shoal-demo.
    let disk = std::fs::read(&t.disk).unwrap();
    assert_eq!(disk.len(), 64 << 20);
    assert_eq!(u16::from_le_bytes([disk[1080], disk[1081]]), 0xEF53, "not ext4");
    assert_eq!(&disk[1024 + 120..1024 + 130], b"shoal-demo");

    // Building again into the same directory replaces the files.
    let (again, _) = build(dir.path());
    assert_eq!(again, t);
    assert_eq!(std::fs::read(&again.kernel).unwrap(), kernel);
}

#[test]
fn errors_name_the_missing_piece() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let empty_boot = dir.path().join("boot");
    std::fs::create_dir(&empty_boot).unwrap();
    let real = DemoSources::default();

    let e = build_demo_template_from(
        &DemoSources {
            boot_dir: empty_boot.clone(),
            ..real.clone()
        },
        &out,
    )
    .unwrap_err();
    assert!(matches!(e, DemoError::NoKernel(_)));
    assert_eq!(
        e.to_string(),
        format!(
            "no kernel in {} (install linux-image-cloud-amd64)",
            empty_boot.display()
        )
    );

    // A kernel without modules.
    std::fs::write(empty_boot.join("vmlinuz-9.9.9-test"), b"not a kernel").unwrap();
    let modules = dir.path().join("modules");
    let e = build_demo_template_from(
        &DemoSources {
            boot_dir: empty_boot.clone(),
            modules_root: modules.clone(),
            ..real.clone()
        },
        &out,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains(&modules.join("9.9.9-test").display().to_string()),
        "{e}"
    );

    // A busybox that is dynamically linked (/bin/sh is dash) or missing.
    for busybox in [PathBuf::from("/bin/sh"), dir.path().join("no-busybox")] {
        let e = build_demo_template_from(
            &DemoSources {
                busybox: busybox.clone(),
                ..real.clone()
            },
            &out,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "busybox-static not installed ({} missing or not static)",
                busybox.display()
            )
        );
    }

    // A module the kernel does not have.
    std::fs::create_dir_all(modules.join("9.9.9-test")).unwrap();
    std::fs::write(modules.join("9.9.9-test/modules.dep"), "kernel/fs/fat/fat.ko:\n").unwrap();
    let e = module_load_order(&modules.join("9.9.9-test"), &["fat", "vfat"]).unwrap_err();
    assert!(
        e.to_string().contains("vfat") && e.to_string().contains("modules.dep"),
        "{e}"
    );

    // Not a bzImage.
    let e = extract_vmlinux(&[0u8; 4096], Path::new("/boot/vmlinuz-x")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot extract vmlinux from /boot/vmlinuz-x: "),
        "{e}"
    );

    // Nothing was written on failure.
    assert!(!out.join("disk.raw").exists());
}

// --- real boots -------------------------------------------------------------------------------------

/// The path of `tool` (from `PATH`, else the sbin directories, which an ordinary user's `PATH` on
/// Debian lacks); panics naming the package to install when it is nowhere.
fn tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} not found: this test needs it (install the {package} package)"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The NoCloud seed Shoal's QEMU driver writes for a VM named `hostname` at 10.200.0.2/24 (the
/// driver's own renderer, so the guest is tested against the real contract), as a vfat volume.
fn make_seed(path: &Path, hostname: &str, user_data: &str) {
    let spec = shoal_model::agent::VmSpec {
        uuid: "0b9f3c9e-5a0e-4c41-9d7e-2f4f6a1b2c3d".parse().unwrap(),
        template: "demo".into(),
        template_hash: String::new(),
        ready: shoal_model::Readiness::Report,
        power: Default::default(),
        mac: MAC.parse().unwrap(),
        user_data: Some(user_data.to_string()).filter(|u| !u.is_empty()),
        ..shoal_model::agent::VmSpec::example(hostname)
    };
    let seed = shoal_hv::qemu::seed::SeedFiles::render(&spec, &["10.200.0.254".parse().unwrap()]);
    let dir = path.with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, content) in seed.files() {
        std::fs::write(dir.join(name), content).unwrap();
    }
    run(Command::new(tool("mkfs.vfat", "dosfstools"))
        .args(["-n", "CIDATA", "-C"])
        .arg(path)
        .arg("1024"));
    run(Command::new(tool("mcopy", "mtools"))
        .arg("-i")
        .arg(path)
        .arg(dir.join("meta-data"))
        .arg(dir.join("network-config"))
        .arg(dir.join("user-data"))
        .arg("::/"));
}

/// A QEMU process that is killed when the test ends, however it ends.
struct Qemu {
    child: Child,
    console: PathBuf,
    qmp: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn start(t: &DemoTemplate, dir: &Path, seed: Option<&Path>, nic: bool) -> Qemu {
        let qemu = tool("qemu-system-x86_64", "qemu-system-x86");
        let qemu_img = tool("qemu-img", "qemu-utils");
        let overlay = dir.join("overlay.qcow2");
        run(Command::new(qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&t.disk)
            .arg(&overlay));
        let console = dir.join("console.log");
        let qmp = dir.join("qmp.sock");
        let mut cmd = Command::new(qemu);
        cmd.args(["-machine", "pc", "-accel", "tcg", "-m", "128", "-display", "none"])
            .args(["-no-reboot", "-nodefaults"])
            .arg("-kernel")
            .arg(&t.kernel)
            .arg("-initrd")
            .arg(&t.initrd)
            .arg("-append")
            .arg(&t.cmdline)
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()));
        if let Some(seed) = seed {
            cmd.arg("-drive")
                .arg(format!("file={},if=virtio,format=raw", seed.display()));
        }
        if nic {
            cmd.args(["-netdev", "user,id=n0", "-device"])
                .arg(format!("virtio-net-pci,netdev=n0,mac={MAC}"));
        }
        cmd.arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.stderr")).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting qemu-system-x86_64: {e}"));
        Qemu { child, console, qmp }
    }

    /// The console's complete lines: the serial port writes a byte at a time, so the last line
    /// may still be growing (`ready web-0 10.2`) and is left out until its newline arrives.
    fn console(&self) -> String {
        let mut text = String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned();
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        text
    }

    /// Waits until `done` holds for the console's lines; panics with the console after `timeout`
    /// or if QEMU exits.
    fn wait_console(&mut self, what: &str, timeout: Duration, done: impl Fn(&[&str]) -> bool) -> Duration {
        let started = Instant::now();
        loop {
            let text = self.console();
            if done(&text.lines().collect::<Vec<_>>()) {
                return started.elapsed();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("QEMU exited ({status}) before {what}; console:\n{text}");
            }
            if started.elapsed() > timeout {
                panic!("no {what} within {timeout:?}; console:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn qmp(&self, commands: &[&str]) {
        let stream = UnixStream::connect(&self.qmp).unwrap_or_else(|e| panic!("QMP {}: {e}", self.qmp.display()));
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("QMP"), "QMP greeting: {line}");
        for c in ["qmp_capabilities"].iter().chain(commands) {
            writeln!(writer, "{{\"execute\":\"{c}\"}}").unwrap();
            loop {
                line.clear();
                assert!(reader.read_line(&mut line).unwrap() > 0, "QMP closed during {c}");
                if line.contains("\"return\"") {
                    break;
                }
                assert!(!line.contains("\"error\""), "QMP {c}: {line}");
            }
        }
    }

    fn powerdown_and_wait(&mut self, timeout: Duration) -> Duration {
        self.qmp(&["system_powerdown"]);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "QEMU exited with {status}");
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                panic!(
                    "QEMU still runs {timeout:?} after system_powerdown; console:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn boots_under_tcg_configures_itself_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _) = build(&dir.path().join("template"));
    let seed = dir.path().join("seed.img");
    make_seed(
        &seed,
        "web-0",
        "#!/bin/sh\necho hello from $(hostname)\nip -4 -o addr show dev eth0\ncat /etc/resolv.conf\n",
    );

    let mut vm = Qemu::start(&t, dir.path(), Some(&seed), true);
    let ready = vm.wait_console("report", Duration::from_secs(120), |lines| {
        lines.iter().any(|l| l.starts_with("shoal-guest: "))
    });
    eprintln!("boot to ready: {ready:.2?}");
    let console = vm.console();
    let lines: Vec<&str> = console.lines().collect();
    assert!(lines.contains(&"ready web-0 10.200.0.2"), "console:\n{console}");
    assert!(lines.contains(&shoal_model::guest::GUEST_READY), "console:\n{console}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("ready")).count(),
        1,
        "console:\n{console}"
    );

    // Console output continues after ready; the user-data script (a part of the MIME user data
    // the seed makes of it) ran once, after networking, with the resolver the seed gave.
    vm.wait_console("alive 2 after ready", Duration::from_secs(30), |lines| {
        let ready = lines.iter().position(|l| *l == "ready web-0 10.200.0.2").unwrap();
        lines[ready..].contains(&"alive 2")
    });
    vm.wait_console("user-data output", Duration::from_secs(30), |lines| {
        lines.contains(&"user-data: hello from web-0")
            && lines
                .iter()
                .any(|l| l.starts_with("user-data: ") && l.contains("inet 10.200.0.2/24"))
            && lines.contains(&"user-data: nameserver 10.200.0.254")
    });

    let off = vm.powerdown_and_wait(Duration::from_secs(30));
    eprintln!("system_powerdown to QEMU exit: {off:.2?}");
    assert!(
        vm.console().lines().any(|l| l == "powering off"),
        "console:\n{}",
        vm.console()
    );
}

#[test]
fn without_seed_or_nic_it_says_not_ready_and_still_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _) = build(&dir.path().join("template"));
    let mut vm = Qemu::start(&t, dir.path(), None, false);
    let took = vm.wait_console("failure report", Duration::from_secs(120), |lines| {
        lines
            .iter()
            .any(|l| l.starts_with("ready ") || l.starts_with("shoal-guest: "))
    });
    eprintln!("boot to failure report: {took:.2?}");
    vm.wait_console("alive 1", Duration::from_secs(30), |lines| lines.contains(&"alive 1"));
    let console = vm.console();
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("shoal-guest: failed: no NoCloud seed")),
        "console:\n{console}"
    );
    assert!(!console.lines().any(|l| l.starts_with("ready")), "console:\n{console}");
    vm.powerdown_and_wait(Duration::from_secs(30));
}

#[test]
fn without_its_nic_it_reports_failure_naming_the_mac() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _) = build(&dir.path().join("template"));
    let seed = dir.path().join("seed.img");
    make_seed(&seed, "db-1", "#cloud-config\npackages: [nginx]\n");
    let mut vm = Qemu::start(&t, dir.path(), Some(&seed), false);
    vm.wait_console("report", Duration::from_secs(120), |lines| {
        lines
            .iter()
            .any(|l| l.starts_with("ready ") || l.starts_with("shoal-guest: "))
    });
    vm.wait_console("alive 1", Duration::from_secs(30), |lines| lines.contains(&"alive 1"));
    let console = vm.console();
    let lines: Vec<&str> = console.lines().collect();
    assert!(
        lines.contains(&format!("shoal-guest: failed: no interface with MAC {MAC}").as_str()),
        "console:\n{console}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("ready") || *l == "shoal-guest: ready"),
        "console:\n{console}"
    );
    vm.powerdown_and_wait(Duration::from_secs(30));
}
