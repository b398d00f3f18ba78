//! A real Debian cloud template (`shoal template build-debian`): a Debian root filesystem built
//! with `debootstrap` from a Debian mirror, booted like the demo template (uncompressed `vmlinux`
//! through PVH, the Debian initrd, `root=/dev/vda`), configured at first boot by cloud-init from
//! Shoal's NoCloud seed.
//!
//! # Recipe
//!
//! 1. `debootstrap --variant=minbase SUITE` into a directory (in a private mount namespace, so
//!    that an interrupted build leaves no `/proc` mounted anywhere).
//! 2. In a chroot: `apt-get dist-upgrade` against `SUITE`, `SUITE-updates` and `SUITE-security`,
//!    then `apt-get install --no-install-recommends` of [`BASE_PACKAGES`] and the extra packages.
//!    apt, not `debootstrap --include`, resolves the dependencies: debootstrap's resolver does not
//!    follow virtual packages (cloud-init's `python3-cryptography` needs `python3-cffi-backend-api-*`
//!    and fails to configure).
//! 3. Configuration: `/etc/fstab` (root is `/dev/vda`, ext4, no partition table), a serial getty
//!    on `ttyS0`, cloud-init limited to NoCloud (`/etc/cloud/cloud.cfg.d/99-shoal.cfg`), and
//!    nothing of the build machine or of one particular instance: no `/etc/hostname`, an empty
//!    `/etc/machine-id` (systemd makes one at first boot), no SSH host keys (cloud-init's `ssh`
//!    module generates them before `ssh.service` starts), no apt lists or package cache.
//! 4. `mkfs.ext4 -d ROOT disk.raw SIZE`: a sparse raw ext4 image, used size plus a margin, made
//!    without a loop mount. Larger VM disks are grown by cloud-init's `resizefs` at boot.
//! 5. `vmlinux` extracted from the chroot's `/boot/vmlinuz-*`, the chroot's `initrd.img-*` copied
//!    as `initrd`, after checking that it holds the modules `root=/dev/vda` needs.
//!
//! # Networking: systemd-networkd and systemd-resolved
//!
//! cloud-init renders the seed's `network-config` with its `networkd` renderer into
//! `/etc/systemd/network/10-cloud-init-eth0.network`: address, gateway route, `MTUBytes` and `DNS`
//! per link, written before the network comes up. systemd-networkd ships with `systemd`; the
//! resolver is the `systemd-resolved` package (its own package since bookworm), which points
//! `/etc/resolv.conf` at its stub (127.0.0.53) and takes the per-link DNS servers from networkd.
//! So this costs one small package; ifupdown + resolvconf (cloud-init's `eni` renderer) would be
//! two more and was not tried. The renderer is pinned to `networkd`, so that an extra package
//! (ifupdown, netplan.io) cannot change it.
//!
//! The seed must be network config v1, or v2 without `to: default` routes: cloud-init's own v2
//! parser (22.4 in bookworm, 25.1 in trixie) rejects `default` ("Address default is not a valid
//! ip address"; only its netplan renderer passes v2 through), fails `init-local` and leaves the
//! NIC unconfigured. v2 with `to: 0.0.0.0/0` is fine.
//!
//! The kernel command line has `net.ifnames=0`: the NIC keeps the kernel's name `eth0`, which is
//! what the seed calls it (matched by MAC), so cloud-init does not have to rename an `ens2`.
//!
//! # Kernel
//!
//! Shoal boots the template's `vmlinux` and `initrd`, not the disk's `/boot`, so the guest has to
//! keep that kernel's modules: the kernel packages are held (`apt-mark hold`), so that an
//! in-guest upgrade neither installs a kernel that would never boot nor lets `autoremove` take the
//! running kernel's modules. A new kernel comes with a new template build (`--rebuild`).
//!
//! # Cache
//!
//! A build takes minutes, so the finished files are kept in
//! `CACHE/debian-SUITE-HASH/` (HASH covers [`RECIPE_VERSION`], the suite, the packages and the
//! mirrors) and reused. A build goes into a temporary directory next to it that is renamed into
//! place when complete, so an interrupted build never leaves a half cache entry. Downloaded
//! `.deb` files are kept in `CACHE/debs/` for the next build (never pruned: delete it at will).
//! The entry also holds `build.log` and `packages.txt` (every installed package and version).
//!
//! # Boot times under TCG (2 vCPUs, 1 GiB)
//!
//! From QEMU's start: bookworm's sshd answers after 31–57 s and cloud-init is done after 41–80 s
//! (the spread is the machine's load; most of it is cloud-init's Python under TCG); trixie's
//! after about 31 s and 37 s.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{extract_vmlinux, find_kernel, io_err, module_key, module_name, remove_path, write_atomically};
use super::{DemoError, DemoTemplate};

/// Bump when the recipe changes, so that cached builds of the old recipe are not reused.
pub const RECIPE_VERSION: u32 = 1;

/// The suites the recipe is known to work with; the first is the default.
pub const SUITES: &[&str] = &["bookworm", "trixie"];

/// The kernel command line Debian templates boot with.
pub const DEBIAN_CMDLINE: &str = "root=/dev/vda rw console=ttyS0 net.ifnames=0";

/// Used when the machine's apt configuration names no Debian mirror.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Used when the machine's apt configuration names no Debian security mirror.
pub const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// Where finished builds are kept.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/shoal/templates";

/// What every Debian template has, on top of debootstrap's minbase.
pub const BASE_PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64", // virtio drivers, small; its initrd is built by initramfs-tools
    "systemd-sysv",            // systemd as /sbin/init
    "udev",
    "dbus",             // hostnamectl (cloud-init sets the hostname through it), resolvectl
    "systemd-resolved", // DNS from the seed (networkd hands it the per-link servers)
    "iproute2",         // cloud-init's networking code calls `ip`
    "cloud-init",
    "openssh-server",
    "sudo",
    "e2fsprogs", // resize2fs: cloud-init grows the root filesystem to the VM's disk
    "ca-certificates",
];

/// Kernel modules the initrd must hold (or the kernel have built in) to mount `root=/dev/vda`.
const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];

/// `/etc/cloud/cloud.cfg.d/99-shoal.cfg`: read after Debian's own files, so it wins.
const CLOUD_CFG: &str = "\
# Shoal: the seed is a NoCloud volume (label CIDATA); do not probe any cloud's metadata service.
datasource_list: [ NoCloud, None ]
# /etc/hosts maps the instance's hostname (sudo and others look it up).
manage_etc_hosts: true
# Always present, so no locale-gen at first boot (en_US.UTF-8, cloud-init's default, is not).
locale: C.UTF-8
# No DSA (sshd does not load it); every key generated is seconds of first boot under TCG.
ssh_genkeytypes: [ ed25519, ecdsa, rsa ]
# There is no GRUB: the kernel is booted directly.
grub_dpkg:
  enabled: false
system_info:
  network:
    renderers: [ networkd ]
";

/// How to build a Debian template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianOptions {
    /// One of [`SUITES`].
    pub suite: String,
    /// Installed on top of [`BASE_PACKAGES`].
    pub packages: Vec<String>,
    /// The Debian archive (`…/debian`).
    pub mirror: String,
    /// The security archive (`…/debian-security`); `None` builds without security updates.
    pub security_mirror: Option<String>,
    /// Finished builds are kept in subdirectories of this.
    pub cache_dir: PathBuf,
    /// Build even if the cache holds a build of the same recipe.
    pub rebuild: bool,
}

impl Default for DebianOptions {
    /// The first of [`SUITES`], no extra packages, the machine's own mirrors (see
    /// [`detect_mirrors`]) and [`DEFAULT_CACHE_DIR`].
    fn default() -> Self {
        let mirrors = detect_mirrors(Path::new("/etc/apt"));
        DebianOptions {
            suite: SUITES[0].to_string(),
            packages: Vec::new(),
            mirror: mirrors.main.unwrap_or_else(|| DEFAULT_MIRROR.to_string()),
            security_mirror: Some(mirrors.security.unwrap_or_else(|| DEFAULT_SECURITY_MIRROR.to_string())),
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            rebuild: false,
        }
    }
}

/// A Debian template, built now or taken from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianTemplate {
    /// Its files, all in `dir`.
    pub template: DemoTemplate,
    /// The cache entry.
    pub dir: PathBuf,
    /// Taken from the cache rather than built.
    pub cached: bool,
}

/// Checks the options, naming the first bad value.
pub fn validate(opts: &DebianOptions) -> Result<(), DemoError> {
    if !SUITES.contains(&opts.suite.as_str()) {
        return Err(DemoError::UnknownSuite {
            suite: opts.suite.clone(),
            known: SUITES.join(", "),
        });
    }
    for p in &opts.packages {
        if !valid_package_name(p) {
            return Err(DemoError::BadPackage(p.clone()));
        }
    }
    for m in std::iter::once(&opts.mirror).chain(&opts.security_mirror) {
        let rest = m.strip_prefix("http://").or_else(|| m.strip_prefix("https://"));
        if !rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace)) {
            return Err(DemoError::BadMirror(m.clone()));
        }
    }
    Ok(())
}

/// Debian policy: lower-case letters, digits, `+`, `-` and `.`, at least two characters, starting
/// with a letter or digit. This also keeps a name from being taken for an apt option.
fn valid_package_name(p: &str) -> bool {
    p.len() >= 2
        && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// The packages installed on top of minbase: [`BASE_PACKAGES`] and the extra ones, sorted, once.
fn all_packages(opts: &DebianOptions) -> Vec<String> {
    let mut all: Vec<String> = BASE_PACKAGES.iter().map(|p| p.to_string()).collect();
    all.extend(opts.packages.iter().cloned());
    all.sort();
    all.dedup();
    all
}

/// Name of the cache entry for `opts`: `debian-SUITE-HASH`, HASH over everything that changes
/// what is built (the order in which packages are given does not).
pub fn cache_key(opts: &DebianOptions) -> String {
    let recipe = format!(
        "recipe {RECIPE_VERSION}\nsuite {}\nmirror {}\nsecurity {}\npackages {}\ncmdline {DEBIAN_CMDLINE}\n",
        opts.suite,
        opts.mirror.trim_end_matches('/'),
        opts.security_mirror.as_deref().unwrap_or("none").trim_end_matches('/'),
        all_packages(opts).join(" "),
    );
    let hash = blake3::hash(recipe.as_bytes()).to_hex();
    format!("debian-{}-{}", opts.suite, &hash[..12])
}

// --- mirror detection -----------------------------------------------------------------------------

/// The Debian archives the machine's apt uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirrors {
    /// The first `deb` source for a Debian release (`bookworm`, `stable`, `sid`, …).
    pub main: Option<String>,
    /// The first `deb` source for a Debian security suite (`bookworm-security`).
    pub security: Option<String>,
}

/// Debian release names and aliases a source's suite is recognised by (other repositories on
/// the machine, such as a vendor's `nodistro`, are skipped).
const DEBIAN_RELEASES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// One `deb` source: its URIs and suites.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AptSource {
    uris: Vec<String>,
    suites: Vec<String>,
}

/// Reads `APT_DIR/sources.list` and then `APT_DIR/sources.list.d/*.list` and `*.sources` in
/// name order (as apt does) and picks the Debian mirrors. Unreadable files are skipped.
pub fn detect_mirrors(apt_dir: &Path) -> Mirrors {
    let mut sources = Vec::new();
    if let Ok(text) = std::fs::read_to_string(apt_dir.join("sources.list")) {
        sources.extend(parse_one_line_sources(&text));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(apt_dir.join("sources.list.d"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("list") => sources.extend(parse_one_line_sources(&text)),
            Some("sources") => sources.extend(parse_deb822_sources(&text)),
            _ => {} // e.g. `*.disabled`: apt ignores these too
        }
    }
    pick_mirrors(&sources)
}

fn pick_mirrors(sources: &[AptSource]) -> Mirrors {
    let is_release = |s: &str| DEBIAN_RELEASES.contains(&s);
    let is_security = |s: &str| {
        s.strip_suffix("-security")
            .or_else(|| s.strip_suffix("/updates"))
            .is_some_and(is_release)
    };
    let first = |pred: &dyn Fn(&str) -> bool| {
        sources
            .iter()
            .find(|src| src.suites.iter().any(|s| pred(s)))
            .and_then(|src| src.uris.first())
            .map(|u| u.trim_end_matches('/').to_string())
    };
    Mirrors {
        main: first(&is_release),
        security: first(&is_security),
    }
}

/// `deb [options] URI SUITE COMPONENT…` lines; `deb-src` and comments are skipped.
fn parse_one_line_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut words = words.peekable();
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            // Options: `[arch=amd64 signed-by=…]`, possibly one word.
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(AptSource {
                uris: vec![uri.to_string()],
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Enabled:`), separated by blank lines; lines
/// starting with `#` are comments, lines starting with white space continue a field.
fn parse_deb822_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut flush = |fields: &mut Vec<(String, String)>| {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .unwrap_or_default()
        };
        let enabled = !get("Enabled").trim().eq_ignore_ascii_case("no");
        if enabled && get("Types").split_whitespace().any(|t| t == "deb") {
            let words = |name: &str| get(name).split_whitespace().map(str::to_string).collect::<Vec<_>>();
            let (uris, suites) = (words("URIs"), words("Suites"));
            if !uris.is_empty() && !suites.is_empty() {
                out.push(AptSource { uris, suites });
            }
        }
        fields.clear();
    };
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut fields);
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = fields.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            fields.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    flush(&mut fields);
    out
}

// --- build ----------------------------------------------------------------------------------------

/// Builds the template described by `opts`, or takes it from the cache. `progress` is told what
/// happens (one line per step; a build takes minutes).
pub fn build_debian_template(
    opts: &DebianOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<DebianTemplate, DemoError> {
    validate(opts)?;
    let key = cache_key(opts);
    let dir = opts.cache_dir.join(&key);
    if !opts.rebuild {
        if let Some(template) = cached(&dir)? {
            progress(&format!(
                "using cached build {} (--rebuild to build it again)",
                dir.display()
            ));
            return Ok(DebianTemplate {
                template,
                dir,
                cached: true,
            });
        }
    }

    // Check what can be missing before the slow steps.
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if uid != 0 {
        return Err(DemoError::NotRoot(format!("building a Debian template (uid {uid})")));
    }
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("unshare", "util-linux"),
        ("chroot", "coreutils"),
    ] {
        if !super::find_tool(tool).is_file() {
            return Err(DemoError::ToolMissing {
                tool: tool.to_string(),
                package: package.to_string(),
            });
        }
    }
    std::fs::create_dir_all(&opts.cache_dir).map_err(io_err(&opts.cache_dir))?;
    // One build of a key at a time (two tests, or two operators, asking at once): the second
    // waits, then takes the first one's result from the cache.
    let lock_path = opts.cache_dir.join(format!(".{key}.lock"));
    let lock = std::fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    if !opts.rebuild {
        if let Some(template) = cached(&dir)? {
            progress(&format!("using the build another process just made: {}", dir.display()));
            return Ok(DebianTemplate {
                template,
                dir,
                cached: true,
            });
        }
    }
    remove_stale_builds(&opts.cache_dir, &key)?;

    let build = Build::new(&opts.cache_dir, &key);
    remove_path(&build.tmp)?;
    std::fs::create_dir_all(&build.root).map_err(io_err(&build.root))?;
    let result = build.run(opts, progress).and_then(|()| build.install(&dir));
    match result {
        Ok(template) => {
            let _ = std::fs::remove_file(&build.failed_log);
            Ok(DebianTemplate {
                template,
                dir,
                cached: false,
            })
        }
        Err(e) => {
            // Keep the log for a look; everything else goes.
            let _ = std::fs::rename(&build.log, &build.failed_log);
            let _ = remove_path(&build.tmp);
            Err(e)
        }
    }
}

/// The files a finished build leaves in its cache entry.
const DISK: &str = "disk.raw";
const KERNEL: &str = "vmlinux";
const INITRD: &str = "initrd";
const CMDLINE: &str = "cmdline";

/// The cache entry in `dir`, if it is complete. Entries are renamed into place only when
/// complete, so a missing file means someone deleted it: then the entry is built again.
fn cached(dir: &Path) -> Result<Option<DemoTemplate>, DemoError> {
    if ![DISK, KERNEL, INITRD, CMDLINE].iter().all(|f| dir.join(f).is_file()) {
        return Ok(None);
    }
    let cmdline_path = dir.join(CMDLINE);
    let cmdline = std::fs::read_to_string(&cmdline_path).map_err(io_err(&cmdline_path))?;
    Ok(Some(template_in(dir, cmdline.trim().to_string())))
}

fn template_in(dir: &Path, cmdline: String) -> DemoTemplate {
    DemoTemplate {
        disk: dir.join(DISK),
        kernel: dir.join(KERNEL),
        initrd: dir.join(INITRD),
        cmdline,
    }
}

/// Removes what builds of `key` that were interrupted left behind: `.KEY.tmp.PID` (and
/// `.KEY.tmp.PID.old`) directories whose process is gone. (A running build's mounts are in its own mount namespace, so there is
/// nothing mounted below these.)
fn remove_stale_builds(cache_dir: &Path, key: &str) -> Result<(), DemoError> {
    let prefix = format!(".{key}.tmp.");
    let entries = std::fs::read_dir(cache_dir).map_err(io_err(cache_dir))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let alive = pid
            .split('.')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            remove_path(&entry.path())?;
        }
    }
    Ok(())
}

/// One build in progress: everything happens in `tmp`, renamed to the cache entry at the end.
struct Build {
    tmp: PathBuf,
    root: PathBuf,
    log: PathBuf,
    failed_log: PathBuf,
    debs: PathBuf,
}

impl Build {
    fn new(cache_dir: &Path, key: &str) -> Build {
        let tmp = cache_dir.join(format!(".{key}.tmp.{}", std::process::id()));
        Build {
            root: tmp.join("root"),
            log: tmp.join("build.log"),
            failed_log: cache_dir.join(format!("{key}.failed.log")),
            debs: cache_dir.join("debs"),
            tmp,
        }
    }

    /// Builds the files of a cache entry in `tmp` (and `build.log` there).
    fn run(&self, opts: &DebianOptions, progress: &mut dyn FnMut(&str)) -> Result<(), DemoError> {
        let root = &self.root;
        std::fs::create_dir_all(&self.debs).map_err(io_err(&self.debs))?;

        progress(&format!(
            "debootstrap {} (minbase) from {} into {}",
            opts.suite,
            opts.mirror,
            self.tmp.display()
        ));
        let mut cmd = Command::new(super::find_tool("unshare"));
        cmd.args(["--mount", "--propagation", "private"])
            .arg(super::find_tool("debootstrap"))
            .args(["--variant=minbase", "--include=ca-certificates"]) // for an https mirror
            .arg(format!("--cache-dir={}", self.debs.display()))
            .arg(&opts.suite)
            .arg(root)
            .arg(&opts.mirror);
        if let Err(e) = self.exec(&mut cmd, "debootstrap", "debootstrap") {
            // debootstrap's own log says which package failed; keep it with ours.
            let own = root.join("debootstrap/debootstrap.log");
            if let Ok(text) = std::fs::read(&own) {
                self.append_log(&format!("\n--- {} ---\n", own.display()));
                self.append_log(&String::from_utf8_lossy(&text));
            }
            return Err(e);
        }

        let packages = all_packages(opts);
        progress(&format!(
            "apt-get dist-upgrade, then install {} packages: {}",
            packages.len(),
            packages.join(" ")
        ));
        self.write(
            "etc/apt/sources.list",
            0o644,
            &sources_list(&opts.suite, &opts.mirror, opts.security_mirror.as_deref()),
        )?;
        // Keep package scripts from starting services in the chroot (debootstrap put this in
        // place while it ran and removed it afterwards).
        self.write("usr/sbin/policy-rc.d", 0o755, "#!/bin/sh\nexit 101\n")?;
        let archives = root.join("var/cache/apt/archives");
        link_debs(&self.debs, &archives)?;
        // apt needs /proc in the chroot; the mounts live and die with this mount namespace.
        let script = r#"set -e
root=$1; shift
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
apt="apt-get -q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
chroot "$root" $apt update
chroot "$root" $apt dist-upgrade
chroot "$root" $apt install --no-install-recommends "$@"
"#;
        let mut cmd = Command::new(super::find_tool("unshare"));
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(root)
            .args(&packages);
        self.exec(&mut cmd, "apt-get in the chroot", "apt")?;
        link_debs(&archives, &self.debs)?;

        let kernel = find_kernel(&root.join("boot"), &root.join("lib/modules"))?;
        progress("configuring the guest");
        self.configure(&kernel.version)?;
        let versions = self.chroot_output(&["dpkg-query", "-W", "-f", "${Package} ${Version}\n"])?;
        std::fs::write(self.tmp.join("packages.txt"), versions).map_err(io_err(&self.tmp))?;

        // Kernel and initrd.
        let initrd_in_root = root.join(format!("boot/initrd.img-{}", kernel.version));
        self.check_initrd(&initrd_in_root, &kernel.modules_dir, &kernel.version)?;
        let vmlinuz = std::fs::read(&kernel.vmlinuz).map_err(io_err(&kernel.vmlinuz))?;
        let vmlinux = extract_vmlinux(&vmlinuz, &kernel.vmlinuz)?;
        drop(vmlinuz);
        write_atomically(&self.tmp.join(KERNEL), &vmlinux, 0o644)?;
        drop(vmlinux);
        let initrd = self.tmp.join(INITRD);
        std::fs::copy(&initrd_in_root, &initrd).map_err(io_err(&initrd))?;

        // Disk: the tree's allocated size, plus a quarter and 256 MiB for ext4's own metadata
        // and for the first boot's writes (logs, SSH keys, `apt-get update`).
        let used = tree_bytes(root)?;
        let mib = (used + used / 4 + (256 << 20)).div_ceil(16 << 20) * 16;
        progress(&format!(
            "mkfs.ext4 -d: {} MiB used, image {mib} MiB (kernel {})",
            used >> 20,
            kernel.version
        ));
        let disk = self.tmp.join(DISK);
        let mut cmd = Command::new(super::find_tool("mkfs.ext4"));
        cmd.args(["-q", "-F", "-L", "debian-root", "-d"])
            .arg(root)
            .arg(&disk)
            .arg(format!("{mib}M"));
        self.exec(&mut cmd, "mkfs.ext4", "e2fsprogs")?;
        remove_path(root)?;
        self.write_file(&self.tmp.join(CMDLINE), &format!("{DEBIAN_CMDLINE}\n"))
    }

    /// The changes to the installed system; see the module documentation.
    fn configure(&self, kernel_version: &str) -> Result<(), DemoError> {
        self.write("etc/fstab", 0o644, "/dev/vda / ext4 rw,discard,errors=remount-ro 0 1\n")?;
        self.write("etc/cloud/cloud.cfg.d/99-shoal.cfg", 0o644, CLOUD_CFG)?;
        self.write("etc/default/locale", 0o644, "LANG=C.UTF-8\n")?;
        // cloud-init adds the hostname (manage_etc_hosts); these stay.
        self.write(
            "etc/hosts",
            0o644,
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
        )?;
        // systemd also starts a getty on the console= device by itself; enabling it explicitly
        // keeps the serial login when the command line changes.
        self.chroot(&[
            "systemctl",
            "enable",
            "systemd-networkd.service",
            "serial-getty@ttyS0.service",
        ])?;
        // The kernel is booted from outside the disk (the template's vmlinux and initrd), so the
        // guest must keep this kernel's modules: an upgrade to a new kernel ABI would install
        // modules the running kernel cannot use and let `autoremove` delete the ones it needs.
        // A new kernel comes with a new template build.
        self.chroot(&[
            "apt-mark",
            "hold",
            "linux-image-cloud-amd64",
            &format!("linux-image-{kernel_version}"),
        ])?;
        self.chroot(&["apt-get", "clean"])?;

        // Nothing of the build machine, and nothing that must differ between instances.
        let root = &self.root;
        remove_path(&root.join("var/lib/apt/lists"))?;
        std::fs::create_dir_all(root.join("var/lib/apt/lists/partial")).map_err(io_err(root))?;
        for rel in ["usr/sbin/policy-rc.d", "etc/hostname", "var/lib/dbus/machine-id"] {
            remove_path(&root.join(rel))?;
        }
        let ssh = root.join("etc/ssh");
        for entry in std::fs::read_dir(&ssh).map_err(io_err(&ssh))?.filter_map(|e| e.ok()) {
            if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
                remove_path(&entry.path())?;
            }
        }
        // Empty: systemd generates the ID at boot and writes it here (machine-id(5)).
        self.write("etc/machine-id", 0o444, "")?;
        // debootstrap copied the build machine's resolv.conf; systemd-resolved's package
        // replaced it with its stub. Make sure that is what the image has.
        let resolv = root.join("etc/resolv.conf");
        remove_path(&resolv)?;
        std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &resolv).map_err(io_err(&resolv))?;
        Ok(())
    }

    /// Fails unless the initrd holds (or the kernel has built in) every module of
    /// [`ROOT_MODULES`].
    fn check_initrd(&self, initrd: &Path, modules_dir: &Path, version: &str) -> Result<(), DemoError> {
        let listing = self.chroot_output(&["lsinitramfs", &format!("/boot/initrd.img-{version}")])?;
        let listing = String::from_utf8_lossy(&listing);
        let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
        let has = |text: &str, module: &str| {
            text.lines()
                .any(|l| l.contains(".ko") && module_key(module_name(l.trim())) == module_key(module))
        };
        for module in ROOT_MODULES {
            if !has(&listing, module) && !has(&builtin, module) {
                return Err(DemoError::InitrdLacksModule {
                    module: module.to_string(),
                    initrd: initrd.to_path_buf(),
                });
            }
        }
        Ok(())
    }

    /// Renames the finished build to `dir`, replacing an older build there (`--rebuild`). If a
    /// concurrent build of the same recipe got there first, its files are taken instead.
    fn install(&self, dir: &Path) -> Result<DemoTemplate, DemoError> {
        let mut old = self.tmp.clone().into_os_string();
        old.push(".old");
        let old = PathBuf::from(old);
        if dir.symlink_metadata().is_ok() {
            std::fs::rename(dir, &old).map_err(io_err(dir))?;
        }
        let renamed = std::fs::rename(&self.tmp, dir);
        remove_path(&old)?;
        if let Err(e) = renamed {
            if cached(dir)?.is_none() {
                return Err(io_err(dir)(e));
            }
            remove_path(&self.tmp)?;
        }
        cached(dir)?.ok_or_else(|| DemoError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the build vanished from the cache"),
        })
    }

    /// Runs `cmd` with its output appended to the build log; on failure the error holds the
    /// log's last lines and says where the whole log is kept.
    fn exec(&self, cmd: &mut Command, what: &str, package: &str) -> Result<(), DemoError> {
        self.append_log(&format!("\n$ {cmd:?}\n"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(&self.log))?;
        let log2 = log.try_clone().map_err(io_err(&self.log))?;
        let status = cmd
            // The chroot's tools, whatever the caller's PATH and locale.
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .status()
            .map_err(DemoError::cannot_start(what, package))?;
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        Err(DemoError::ToolFailed {
            tool: what.to_string(),
            stderr: format!(
                "{status}; last lines of its output:\n{tail}\n(whole log: {})",
                self.failed_log.display()
            ),
        })
    }

    fn append_log(&self, text: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.log) {
            let _ = f.write_all(text.as_bytes());
        }
    }

    /// Runs a command in the chroot (no `/proc` there: only for commands that do without).
    fn chroot(&self, args: &[&str]) -> Result<(), DemoError> {
        let mut cmd = Command::new(super::find_tool("chroot"));
        cmd.arg(&self.root).args(args);
        self.exec(&mut cmd, &format!("chroot {}", args.join(" ")), "coreutils")
    }

    /// Runs a command in the chroot and returns its standard output.
    fn chroot_output(&self, args: &[&str]) -> Result<Vec<u8>, DemoError> {
        let what = format!("chroot {}", args.join(" "));
        let out = Command::new(super::find_tool("chroot"))
            .arg(&self.root)
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| DemoError::ToolFailed {
                tool: what.clone(),
                stderr: format!("cannot start: {e}"),
            })?;
        if !out.status.success() {
            return Err(DemoError::ToolFailed {
                tool: what,
                stderr: format!("{} ({})", String::from_utf8_lossy(&out.stderr).trim(), out.status),
            });
        }
        Ok(out.stdout)
    }

    /// Writes `rel` (relative to the root) with `mode`, replacing what is there.
    fn write(&self, rel: &str, mode: u32, text: &str) -> Result<(), DemoError> {
        let path = self.root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        remove_path(&path)?;
        self.write_file(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io_err(&path))
    }

    fn write_file(&self, path: &Path, text: &str) -> Result<(), DemoError> {
        std::fs::write(path, text).map_err(io_err(path))
    }
}

/// The chroot's apt sources: the release, its updates and (if there is a security mirror) its
/// security updates. They stay in the image: cloud-init keeps them (`preserve_sources_list`).
fn sources_list(suite: &str, mirror: &str, security: Option<&str>) -> String {
    let mirror = mirror.trim_end_matches('/');
    let mut s = format!("deb {mirror} {suite} main\ndeb {mirror} {suite}-updates main\n");
    if let Some(sec) = security {
        s.push_str(&format!("deb {} {suite}-security main\n", sec.trim_end_matches('/')));
    }
    s
}

/// Hard-links the `.deb` files of `from` into `to` (both on the cache's filesystem), skipping
/// those `to` already has.
fn link_debs(from: &Path, to: &Path) -> Result<(), DemoError> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    for entry in std::fs::read_dir(from).map_err(io_err(from))?.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(".deb") {
            continue;
        }
        let target = to.join(&name);
        match std::fs::hard_link(entry.path(), &target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&target)(e)),
        }
    }
    Ok(())
}

/// Bytes allocated to everything below `root` (hard links counted once per name: a little over).
fn tree_bytes(root: &Path) -> Result<u64, DemoError> {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let meta = entry.path().symlink_metadata().map_err(io_err(&entry.path()))?;
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's `/etc/apt/sources.list.d/debian.sources`, with a disabled stanza added.
    const DEB822: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://disabled.example.org/debian
Suites: bookworm-security
Enabled: no

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBF…
 -----END PGP PUBLIC KEY BLOCK-----
";

    #[test]
    fn mirrors_from_deb822() {
        let m = pick_mirrors(&parse_deb822_sources(DEB822));
        assert_eq!(m.main.as_deref(), Some("http://deb.debian.org/debian"));
        assert_eq!(m.security.as_deref(), Some("http://deb.debian.org/debian-security"));
    }

    #[test]
    fn mirrors_from_one_line_sources_skip_other_repositories() {
        let text = "\
# deb http://commented.example.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/nodesource.gpg] https://deb.nodesource.com/node_20.x nodistro main
deb-src http://src.example.org/debian bookworm main
deb [signed-by=/k.gpg] http://ftp.de.debian.org/debian/ trixie main contrib
deb http://security.debian.org/debian-security trixie-security main
";
        let m = pick_mirrors(&parse_one_line_sources(text));
        assert_eq!(m.main.as_deref(), Some("http://ftp.de.debian.org/debian"));
        assert_eq!(
            m.security.as_deref(),
            Some("http://security.debian.org/debian-security")
        );
    }

    #[test]
    fn mirror_detection_reads_apt_dir_and_falls_back_to_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect_mirrors(dir.path()), Mirrors::default());
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(dir.path().join("sources.list.d/debian.sources"), DEB822).unwrap();
        // Not a sources file: apt ignores it, so do we.
        std::fs::write(
            dir.path().join("sources.list.d/a.list.disabled"),
            "deb http://other.example.org/debian bookworm main\n",
        )
        .unwrap();
        let m = detect_mirrors(dir.path());
        assert_eq!(m.main.as_deref(), Some("http://deb.debian.org/debian"));
        // sources.list comes first.
        std::fs::write(
            dir.path().join("sources.list"),
            "deb http://mirror.example.org/debian bookworm main\n",
        )
        .unwrap();
        let m = detect_mirrors(dir.path());
        assert_eq!(m.main.as_deref(), Some("http://mirror.example.org/debian"));
        assert_eq!(m.security.as_deref(), Some("http://deb.debian.org/debian-security"));
    }

    fn opts() -> DebianOptions {
        DebianOptions {
            suite: "bookworm".into(),
            packages: vec![],
            mirror: DEFAULT_MIRROR.into(),
            security_mirror: Some(DEFAULT_SECURITY_MIRROR.into()),
            cache_dir: PathBuf::from("/nonexistent"),
            rebuild: false,
        }
    }

    #[test]
    fn validation_names_the_bad_value() {
        assert!(validate(&opts()).is_ok());
        let err = validate(&DebianOptions {
            suite: "jessie".into(),
            ..opts()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown Debian suite \"jessie\" (supported: bookworm, trixie)"
        );
        let err = validate(&DebianOptions {
            packages: vec!["vim".into(), "--allow-unauthenticated".into()],
            ..opts()
        })
        .unwrap_err();
        assert!(err.to_string().contains("\"--allow-unauthenticated\""), "{err}");
        let err = validate(&DebianOptions {
            mirror: "ftp://ftp.debian.org/debian".into(),
            ..opts()
        })
        .unwrap_err();
        assert!(err.to_string().contains("\"ftp://ftp.debian.org/debian\""), "{err}");
        // An unknown suite is refused before anything is built or looked up.
        let err = build_debian_template(
            &DebianOptions {
                suite: "Bookworm".into(),
                ..opts()
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, DemoError::UnknownSuite { .. }), "{err}");
    }

    #[test]
    fn cache_key_covers_the_recipe_not_the_package_order() {
        let base = cache_key(&opts());
        assert!(base.starts_with("debian-bookworm-"), "{base}");
        let ab = DebianOptions {
            packages: vec!["vim".into(), "curl".into()],
            ..opts()
        };
        let ba = DebianOptions {
            packages: vec!["curl".into(), "vim".into(), "curl".into()],
            ..opts()
        };
        assert_eq!(cache_key(&ab), cache_key(&ba));
        assert_ne!(cache_key(&ab), base);
        // Naming a base package again changes nothing.
        let sudo = DebianOptions {
            packages: vec!["sudo".into()],
            ..opts()
        };
        assert_eq!(cache_key(&sudo), base);
        let mirror = DebianOptions {
            mirror: "http://ftp.de.debian.org/debian".into(),
            ..opts()
        };
        assert_ne!(cache_key(&mirror), base);
        let trixie = DebianOptions {
            suite: "trixie".into(),
            ..opts()
        };
        assert!(cache_key(&trixie).starts_with("debian-trixie-"));
    }

    #[test]
    fn sources_list_has_updates_and_security() {
        assert_eq!(
            sources_list(
                "trixie",
                "http://deb.debian.org/debian/",
                Some("http://deb.debian.org/debian-security")
            ),
            "deb http://deb.debian.org/debian trixie main\n\
             deb http://deb.debian.org/debian trixie-updates main\n\
             deb http://deb.debian.org/debian-security trixie-security main\n"
        );
    }
}
