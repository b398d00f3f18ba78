//! The demo template: a small bootable VM image built in seconds from Debian packages already on
//! the machine (`linux-image-cloud-amd64`, `busybox-static`, `e2fsprogs`), so that Shoal can run
//! real QEMU VMs without downloading a cloud image.
//!
//! [`build_demo_template`] writes three files into its output directory:
//!
//! * `vmlinux`: the uncompressed kernel (ELF), extracted from the newest `/boot/vmlinuz-*` and
//!   booted by QEMU through PVH (`-kernel vmlinux`);
//! * `initrd.cpio`: an uncompressed newc initramfs with busybox, the kernel modules the guest needs
//!   (virtio block/net/pci, vfat, ISO9660, ACPI button, evdev) and a `/init` that mounts `/dev/vda`;
//! * `disk.raw`: a 64 MiB raw ext4 filesystem (no partition table) with busybox and the guest's
//!   `/sbin/init`.
//!
//! The guest reads a NoCloud seed on a second disk, configures its NIC, prints
//! `ready <hostname> <ipv4>` on the serial console, then `alive <n>` every second; the ACPI power
//! button powers it off. The guest scripts are in `crates/shoal-demo/guest/`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

pub mod debian;

/// `/init` of the initramfs.
const INITRAMFS_INIT: &str = include_str!("../guest/initramfs-init");
/// `/sbin/init` of the root filesystem.
const ROOT_INIT: &str = include_str!("../guest/init");
/// Run by busybox `acpid` on the ACPI power button (`/etc/acpi/PWRF/00000080`).
const POWEROFF_HANDLER: &str = include_str!("../guest/poweroff");

/// The kernel command line the demo template boots with.
pub const DEMO_CMDLINE: &str = "console=ttyS0 quiet panic=-1 rw";
/// What the guest prints on the serial console once configured: `ready <hostname> <ipv4>`.
pub const READY_PATTERN: &str = "ready ";
/// Size of the root filesystem image.
pub const DISK_SIZE: &str = "64M";
/// Volume label of the root filesystem.
pub const DISK_LABEL: &str = "shoal-demo";

/// Kernel modules the guest loads from its initramfs (their dependencies are added and ordered
/// from `modules.dep`). Modules the kernel has built in (`modules.builtin`) are skipped.
pub const DEMO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "fat",
    "vfat",
    "nls_cp437",
    "nls_ascii", // vfat's default iocharset in Debian's kernel
    "nls_iso8859-1",
    "isofs",
    "button",
    "evdev",
];

/// A built demo template; every path is inside the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoTemplate {
    /// Raw disk image: an ext4 root filesystem (busybox), 64 MiB, no partition table.
    pub disk: PathBuf,
    /// Uncompressed vmlinux (ELF), booted via PVH.
    pub kernel: PathBuf,
    /// Uncompressed newc cpio initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
}

/// Where the builder takes its inputs from; [`DemoSources::default`] is the machine's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSources {
    /// Directory holding `vmlinuz-<version>` (`/boot`).
    pub boot_dir: PathBuf,
    /// Directory holding `<version>/modules.dep` (`/lib/modules`).
    pub modules_root: PathBuf,
    /// A statically linked busybox (`/bin/busybox` from busybox-static).
    pub busybox: PathBuf,
}

impl Default for DemoSources {
    fn default() -> Self {
        DemoSources {
            boot_dir: PathBuf::from("/boot"),
            modules_root: PathBuf::from("/lib/modules"),
            busybox: PathBuf::from("/bin/busybox"),
        }
    }
}

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("no kernel in {} (install linux-image-cloud-amd64)", .0.display())]
    NoKernel(PathBuf),
    #[error(
        "kernel {version} has no modules in {} (reinstall linux-image-{version})",
        dir.display()
    )]
    NoModules { version: String, dir: PathBuf },
    #[error("kernel module {module} is neither in {} nor built in", modules_dep.display())]
    MissingModule { module: String, modules_dep: PathBuf },
    #[error("cannot extract vmlinux from {}: {reason}", path.display())]
    Kernel { path: PathBuf, reason: String },
    #[error("busybox-static not installed ({} missing or not static)", path.display())]
    Busybox { path: PathBuf },
    #[error("{tool} not found (install {package})")]
    ToolMissing { tool: String, package: String },
    #[error("{tool} failed: {stderr}")]
    ToolFailed { tool: String, stderr: String },
    #[error("unknown Debian suite {suite:?} (supported: {known})")]
    UnknownSuite { suite: String, known: String },
    #[error("invalid Debian package name {0:?}")]
    BadPackage(String),
    #[error("mirror {0:?} is not an http:// or https:// URL")]
    BadMirror(String),
    #[error("{0} needs root (debootstrap, chroot, mounts)")]
    NotRoot(String),
    #[error("the initrd {} has no {module} module, so root=/dev/vda would not mount", initrd.display())]
    InitrdLacksModule { module: String, initrd: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DemoError {
    /// Why `tool` (from `package`) could not be started: missing, or another reason.
    pub(crate) fn cannot_start<'a>(tool: &'a str, package: &'a str) -> impl FnOnce(std::io::Error) -> DemoError + 'a {
        move |e| match e.kind() {
            std::io::ErrorKind::NotFound => DemoError::ToolMissing {
                tool: tool.to_string(),
                package: package.to_string(),
            },
            _ => DemoError::ToolFailed {
                tool: tool.to_string(),
                stderr: format!("cannot start: {e}"),
            },
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the demo template from the machine's own kernel and busybox into `out_dir` (created if
/// missing; files of an earlier build there are replaced).
pub fn build_demo_template(out_dir: &Path) -> Result<DemoTemplate, DemoError> {
    build_demo_template_from(&DemoSources::default(), out_dir)
}

/// [`build_demo_template`] with explicit inputs.
pub fn build_demo_template_from(sources: &DemoSources, out_dir: &Path) -> Result<DemoTemplate, DemoError> {
    // Check everything that can be missing before the slow steps.
    let busybox = check_static_busybox(&sources.busybox)?;
    let kernel = find_kernel(&sources.boot_dir, &sources.modules_root)?;
    let modules = module_load_order(&kernel.modules_dir, DEMO_MODULES)?;
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;

    // Kernel.
    let vmlinuz = std::fs::read(&kernel.vmlinuz).map_err(io_err(&kernel.vmlinuz))?;
    let vmlinux = extract_vmlinux(&vmlinuz, &kernel.vmlinuz)?;
    drop(vmlinuz);
    let kernel_path = out_dir.join("vmlinux");
    write_atomically(&kernel_path, &vmlinux, 0o644)?;
    drop(vmlinux);

    // Initramfs.
    let initrd_path = out_dir.join("initrd.cpio");
    let initrd = build_initramfs(&busybox, &modules)?;
    write_atomically(&initrd_path, &initrd, 0o644)?;

    // Root filesystem.
    let disk_path = out_dir.join("disk.raw");
    build_rootfs_image(&sources.busybox, &busybox, out_dir, &disk_path)?;

    Ok(DemoTemplate {
        disk: disk_path,
        kernel: kernel_path,
        initrd: initrd_path,
        cmdline: DEMO_CMDLINE.to_string(),
    })
}

// --- kernel ---------------------------------------------------------------------------------------

/// The kernel the template is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

/// The newest `vmlinuz-<version>` in `boot_dir` and its `modules_root/<version>`.
pub fn find_kernel(boot_dir: &Path, modules_root: &Path) -> Result<HostKernel, DemoError> {
    let mut versions = Vec::new();
    match std::fs::read_dir(boot_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(io_err(boot_dir))?;
                let name = entry.file_name();
                let Some(version) = name.to_str().and_then(|n| n.strip_prefix("vmlinuz-")) else {
                    continue;
                };
                if !version.is_empty() && entry.path().is_file() {
                    versions.push(version.to_string());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(boot_dir)(e)),
    }
    versions.sort_by_key(|v| version_key(v));
    let version = versions
        .pop()
        .ok_or_else(|| DemoError::NoKernel(boot_dir.to_path_buf()))?;
    let modules_dir = modules_root.join(&version);
    if !modules_dir.join("modules.dep").is_file() {
        return Err(DemoError::NoModules {
            version,
            dir: modules_dir,
        });
    }
    Ok(HostKernel {
        vmlinuz: boot_dir.join(format!("vmlinuz-{version}")),
        version,
        modules_dir,
    })
}

/// Sort key for kernel versions: runs of digits compare as numbers (`6.1.0-56` > `6.1.0-9`).
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut chars = v.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_digit() {
            let mut n = 0u64;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(d as u64);
                chars.next();
            }
            key.push((n, String::new()));
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek().filter(|c| !c.is_ascii_digit()) {
                s.push(c);
                chars.next();
            }
            key.push((0, s));
        }
    }
    key
}

const ELF_MAGIC: &[u8] = b"\x7fELF";
const LZ4_LEGACY_MAGIC: &[u8] = &[0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Extracts the uncompressed ELF kernel from a bzImage (`source` only names it in errors). An
/// image that already is an ELF is returned as is. LZ4 (legacy format) payloads are decompressed
/// in-process; gzip, xz and zstd ones through `gzip -dc`, `xz -dc` and `zstd -dc`.
pub fn extract_vmlinux(bzimage: &[u8], source: &Path) -> Result<Vec<u8>, DemoError> {
    let bad = |reason: String| DemoError::Kernel {
        path: source.to_path_buf(),
        reason,
    };
    if bzimage.starts_with(ELF_MAGIC) {
        return Ok(bzimage.to_vec());
    }
    if bzimage.len() < 0x250 || &bzimage[0x202..0x206] != b"HdrS" {
        return Err(bad("not a bzImage (no HdrS header at 0x202)".into()));
    }
    let u32_at = |off: usize| u32::from_le_bytes(bzimage[off..off + 4].try_into().unwrap());
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let code_start = (setup_sects + 1) * 512;
    let payload_offset = u32_at(0x248) as usize;
    let payload_length = u32_at(0x24c) as usize;
    let start = code_start + payload_offset;
    let payload = start
        .checked_add(payload_length)
        .and_then(|end| bzimage.get(start..end))
        .filter(|p| p.len() >= 8)
        .ok_or_else(|| {
            bad(format!(
                "payload {start:#x}+{payload_length:#x} outside the {:#x}-byte image",
                bzimage.len()
            ))
        })?;

    let vmlinux = if payload.starts_with(LZ4_LEGACY_MAGIC) {
        lz4_legacy_decompress(&payload[4..]).map_err(bad)?
    } else {
        // The kernel build appends the uncompressed size (4 bytes) to every payload.
        let stream = &payload[..payload.len() - 4];
        let (tool, args, package): (&str, &[&str], &str) = if payload.starts_with(&[0x1f, 0x8b]) {
            ("gzip", &["-dc"], "gzip")
        } else if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            ("xz", &["-dc", "--single-stream"], "xz-utils")
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            ("zstd", &["-dc"], "zstd")
        } else {
            return Err(bad(format!(
                "unsupported payload compression (magic {:02x?}); supported: lz4, gzip, xz, zstd",
                &payload[..4]
            )));
        };
        run_tool(tool, args, package, Some(stream))?
    };
    if !vmlinux.starts_with(ELF_MAGIC) {
        return Err(bad("the decompressed payload is not an ELF file".into()));
    }
    Ok(vmlinux)
}

/// LZ4 legacy frame body (after the magic): `[u32 LE compressed size][block]...`, each block
/// decompressing to at most 8 MiB. Stops at the end, at a trailing word too short for a block
/// header, or at an implausible block size (the appended uncompressed size); a repeated magic
/// (concatenated frames) is skipped.
fn lz4_legacy_decompress(mut data: &[u8]) -> Result<Vec<u8>, String> {
    // Worst-case compressed size of an 8 MiB block.
    let max_block = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;
    let mut out = Vec::with_capacity(64 << 20);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while data.len() >= 4 {
        let size = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        if data[..4] == *LZ4_LEGACY_MAGIC {
            data = &data[4..];
            continue;
        }
        if size == 0 || size > max_block || size > data.len() - 4 {
            break;
        }
        let n = lz4_flex::block::decompress_into(&data[4..4 + size], &mut block)
            .map_err(|e| format!("LZ4 block at payload offset {}: {e}", out.len()))?;
        out.extend_from_slice(&block[..n]);
        data = &data[4 + size..];
    }
    if out.is_empty() {
        return Err("the LZ4 payload holds no block".into());
    }
    Ok(out)
}

// --- busybox --------------------------------------------------------------------------------------

/// Reads `path` and checks that it is a statically linked ELF (no `PT_INTERP`).
fn check_static_busybox(path: &Path) -> Result<Vec<u8>, DemoError> {
    let missing = || DemoError::Busybox {
        path: path.to_path_buf(),
    };
    let bytes = std::fs::read(path).map_err(|_| missing())?;
    if is_static_elf64(&bytes) {
        Ok(bytes)
    } else {
        Err(missing())
    }
}

fn is_static_elf64(elf: &[u8]) -> bool {
    // 64-bit little-endian ELF only (the demo is x86_64).
    if elf.len() < 64 || !elf.starts_with(ELF_MAGIC) || elf[4] != 2 || elf[5] != 1 {
        return false;
    }
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes(elf[0x36..0x38].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[0x38..0x3a].try_into().unwrap()) as usize;
    if phentsize < 4 || phnum == 0 {
        return false;
    }
    (0..phnum).all(|i| {
        let off = phoff + i * phentsize;
        match elf.get(off..off + 4) {
            Some(t) => u32::from_le_bytes(t.try_into().unwrap()) != 3, // PT_INTERP
            None => false,
        }
    })
}

// --- kernel modules -------------------------------------------------------------------------------

/// One kernel module to load, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelModule {
    /// Name as the file is called, without `.ko` (`nls_iso8859-1`).
    pub name: String,
    /// The module file under the modules directory (may be `.ko.xz`/`.ko.zst`/`.ko.gz`).
    pub path: PathBuf,
}

/// Modules are matched with `-` and `_` equivalent, as modprobe does.
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(rel_path: &str) -> &str {
    let file = rel_path.rsplit('/').next().unwrap_or(rel_path);
    file.split(".ko").next().unwrap_or(file)
}

/// The modules in `wanted` plus their dependencies, ordered so that every module comes after the
/// modules it depends on (from `modules_dir/modules.dep`). Modules listed in `modules.builtin` are
/// left out.
pub fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<KernelModule>, DemoError> {
    let dep_path = modules_dir.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path).map_err(io_err(&dep_path))?;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep_text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let module = module.trim();
        let requires = rest.split_whitespace().map(|d| module_key(module_name(d))).collect();
        deps.insert(module_key(module_name(module)), (module.to_string(), requires));
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(|l| module_key(module_name(l.trim())))
        .collect();

    fn visit(
        key: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        modules_dir: &Path,
        done: &mut BTreeSet<String>,
        on_path: &mut Vec<String>,
        order: &mut Vec<KernelModule>,
    ) {
        if done.contains(key) || on_path.iter().any(|k| k == key) {
            return;
        }
        let Some((rel, requires)) = deps.get(key) else {
            return;
        };
        on_path.push(key.to_string());
        for dep in requires {
            visit(dep, deps, modules_dir, done, on_path, order);
        }
        on_path.pop();
        done.insert(key.to_string());
        order.push(KernelModule {
            name: module_name(rel).to_string(),
            path: modules_dir.join(rel),
        });
    }

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for name in wanted {
        let key = module_key(name);
        if !deps.contains_key(&key) {
            if builtin.contains(&key) {
                continue;
            }
            return Err(DemoError::MissingModule {
                module: name.to_string(),
                modules_dep: dep_path,
            });
        }
        visit(&key, &deps, modules_dir, &mut done, &mut Vec::new(), &mut order);
    }
    Ok(order)
}

/// The module's object code, decompressed if the kernel ships compressed modules.
fn read_module(module: &KernelModule) -> Result<Vec<u8>, DemoError> {
    let path = &module.path;
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let name = path.to_string_lossy();
    if name.ends_with(".ko") {
        return Ok(bytes);
    }
    let (tool, package) = if name.ends_with(".ko.xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".ko.zst") {
        ("zstd", "zstd")
    } else if name.ends_with(".ko.gz") {
        ("gzip", "gzip")
    } else {
        return Err(DemoError::Io {
            path: path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "unknown kernel module format (expected .ko, .ko.xz, .ko.zst or .ko.gz)",
            ),
        });
    };
    let out = run_tool(tool, &["-dc"], package, Some(&bytes))?;
    if !out.starts_with(ELF_MAGIC) {
        return Err(DemoError::Io {
            path: path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "decompressed kernel module is not an ELF file",
            ),
        });
    }
    Ok(out)
}

// --- initramfs ------------------------------------------------------------------------------------

/// Writer of a newc ("070701") cpio archive.
struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: reproducible archives
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.pad_to(4);
    }

    fn pad_to(&mut self, align: usize) {
        let len = self.out.len();
        self.out.resize(len.div_ceil(align) * align, 0);
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, 2, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, 1, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, 1, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        // Round up to 512 bytes like cpio(1) does.
        self.pad_to(512);
        self.out
    }
}

fn build_initramfs(busybox: &[u8], modules: &[KernelModule]) -> Result<Vec<u8>, DemoError> {
    let mut cpio = Cpio::new();
    for dir in [
        ".",
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "newroot",
        "etc",
        "etc/acpi",
        "etc/acpi/PWRF",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for /init before anything is mounted.
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("init", 0o755, INITRAMFS_INIT.as_bytes());
    cpio.file("bin/busybox", 0o755, busybox);
    cpio.file("etc/acpi/PWRF/00000080", 0o755, POWEROFF_HANDLER.as_bytes());
    let mut order = String::new();
    for module in modules {
        let bytes = read_module(module)?;
        cpio.file(&format!("lib/modules/{}.ko", module.name), 0o644, &bytes);
        order.push_str(&module.name);
        order.push('\n');
    }
    cpio.file("etc/modules", 0o644, order.as_bytes());
    Ok(cpio.finish())
}

// --- root filesystem ------------------------------------------------------------------------------

fn build_rootfs_image(busybox_path: &Path, busybox: &[u8], out_dir: &Path, disk: &Path) -> Result<(), DemoError> {
    let staging = out_dir.join(".demo-rootfs");
    remove_path(&staging)?;
    let result = stage_rootfs(busybox_path, busybox, &staging).and_then(|()| {
        let tmp = disk.with_extension("raw.tmp");
        remove_path(&tmp)?;
        let mut args = vec!["-q", "-F", "-L", DISK_LABEL, "-d"];
        let staging_s = staging.to_string_lossy().into_owned();
        let tmp_s = tmp.to_string_lossy().into_owned();
        args.extend([staging_s.as_str(), tmp_s.as_str(), DISK_SIZE]);
        let run = run_tool("mkfs.ext4", &args, "e2fsprogs", None);
        if let Err(e) = run {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, disk).map_err(io_err(disk))
    });
    let cleanup = remove_path(&staging);
    result.and(cleanup)
}

fn stage_rootfs(busybox_path: &Path, busybox: &[u8], root: &Path) -> Result<(), DemoError> {
    let mkdir = |rel: &str, mode: u32| -> Result<(), DemoError> {
        let p = root.join(rel);
        std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io_err(&p))
    };
    let write = |rel: &str, mode: u32, data: &[u8]| -> Result<(), DemoError> {
        let p = root.join(rel);
        std::fs::write(&p, data).map_err(io_err(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io_err(&p))
    };
    mkdir("", 0o755)?;
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "run",
        "etc",
        "etc/acpi",
        "etc/acpi/PWRF",
        "var",
        "var/lib",
        "var/lib/shoal",
        "var/log",
        "root",
        "mnt",
    ] {
        mkdir(dir, if dir == "root" { 0o700 } else { 0o755 })?;
    }
    mkdir("tmp", 0o1777)?;
    write("bin/busybox", 0o755, busybox)?;
    // Applet symlinks, so that the guest does not have to `busybox --install` on first boot.
    let list = run_tool(
        &busybox_path.to_string_lossy(),
        &["--list-full"],
        "busybox-static",
        None,
    )?;
    for applet in String::from_utf8_lossy(&list).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "sbin/init" || applet == "linuxrc" || applet.contains("..") {
            continue;
        }
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io_err(&link))?;
    }
    write("sbin/init", 0o755, ROOT_INIT.as_bytes())?;
    write("etc/acpi/PWRF/00000080", 0o755, POWEROFF_HANDLER.as_bytes())?;
    write("etc/hostname", 0o644, b"shoal-demo\n")?;
    write("etc/hosts", 0o644, b"127.0.0.1 localhost\n")?;
    write("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    write("etc/group", 0o644, b"root:x:0:\n")?;
    write(
        "etc/os-release",
        0o644,
        b"NAME=\"Shoal demo guest\"\nID=shoal-demo\nPRETTY_NAME=\"Shoal demo guest (busybox)\"\n",
    )?;
    Ok(())
}

// --- helpers --------------------------------------------------------------------------------------

fn remove_path(path: &Path) -> Result<(), DemoError> {
    let result = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io_err(path))
}

/// Writes `path` through a temporary file in the same directory, so that a reader never sees a
/// half-written file.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), DemoError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// `tool` from `PATH`, else from the sbin directories (an ordinary user's `PATH` on Debian lacks
/// `/usr/sbin`, where `mkfs.ext4` lives). A name that is found nowhere is returned as is, so that
/// spawning it reports it missing.
fn find_tool(tool: &str) -> PathBuf {
    if tool.contains('/') {
        return PathBuf::from(tool);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(tool))
}

/// Runs `tool args...`, feeding it `stdin`, and returns its stdout.
fn run_tool(tool: &str, args: &[&str], package: &str, stdin: Option<&[u8]>) -> Result<Vec<u8>, DemoError> {
    let mut child = Command::new(find_tool(tool))
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(DemoError::cannot_start(tool, package))?;
    let mut child_stdin = child.stdin.take();
    let mut child_stdout = child.stdout.take().expect("piped stdout");
    let mut child_stderr = child.stderr.take().expect("piped stderr");
    let (stdout, stderr) = std::thread::scope(|s| {
        if let (Some(mut pipe), Some(data)) = (child_stdin.take(), stdin) {
            // A tool that exits early closes the pipe: its exit status tells what went wrong.
            s.spawn(move || {
                let _ = pipe.write_all(data);
            });
        }
        let err = s.spawn(move || {
            let mut buf = Vec::new();
            let _ = child_stderr.read_to_end(&mut buf);
            buf
        });
        let mut out = Vec::new();
        let _ = child_stdout.read_to_end(&mut out);
        (out, err.join().unwrap_or_default())
    });
    let status = child.wait().map_err(|e| DemoError::ToolFailed {
        tool: tool.to_string(),
        stderr: format!("cannot wait: {e}"),
    })?;
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr).trim().to_string();
        return Err(DemoError::ToolFailed {
            tool: tool.to_string(),
            stderr: if stderr.is_empty() {
                format!("{status} (no error output)")
            } else {
                format!("{stderr} ({status})")
            },
        });
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "5.10.0-30-amd64"];
        v.sort_by_key(|v| version_key(v));
        assert_eq!(v, ["5.10.0-30-amd64", "6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64"]);
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/fs/nls/nls_iso8859-1.ko"), "nls_iso8859-1");
        assert_eq!(module_name("kernel/fs/fat/vfat.ko.xz"), "vfat");
        assert_eq!(module_key("nls_iso8859-1"), "nls_iso8859_1");
    }

    #[test]
    fn lz4_legacy_stops_at_the_appended_size() {
        // "hello" as one literal-only LZ4 block, then a 4-byte uncompressed size.
        let block = [0x50, b'h', b'e', b'l', b'l', b'o'];
        let mut data = (block.len() as u32).to_le_bytes().to_vec();
        data.extend_from_slice(&block);
        data.extend_from_slice(&(64u32 << 20).to_le_bytes());
        assert_eq!(lz4_legacy_decompress(&data).unwrap(), b"hello");
    }
}
