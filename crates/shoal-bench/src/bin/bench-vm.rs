//! `make bench-vm`: what one real VM costs, step by step, on this machine.
//!
//! 1. Cloning a VM disk: a qcow2 overlay on the template (what Shoal does) against a full copy
//!    of the template (what a copy-based deployment does), for the demo template and for a
//!    1 GiB template full of data, with the bytes each clone occupies.
//! 2. Per VM, through the QEMU driver: clone, seed, QEMU start (spawn to QMP "running"), guest
//!    ready (spawn to the `ready` console line), suspend (with the state file's size), resume.
//! 3. The same demo template deployed as a 3-VM virtual cluster through the controller API,
//!    split into steps 1–3 (the API call) and step 4 (hosts boot the VMs).
//!
//! Usage: bench-vm PATH-TO-SHOAL [--vms N]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_bench::{free_port, print_table, spawn, until};
use shoal_client::Client;
use shoal_demo::{build_demo_template, DemoTemplate};
use shoal_hv::{Hypervisor, QemuConfig, QemuDriver, SourceError, TemplateFile, TemplateSource};
use shoal_model::agent::VmSpec;
use shoal_model::api::{CreateCluster, CreateProfile};
use shoal_model::{
    AntiAffinity, DiskFormat, KernelBoot, MacAddr, OperationState, Placement, Power, TemplateDisk, VmState,
};

struct LocalSource(DemoTemplate);

#[async_trait::async_trait]
impl TemplateSource for LocalSource {
    async fn fetch(&self, _t: &str, file: TemplateFile, dest: &Path) -> Result<(), SourceError> {
        let src = match file {
            TemplateFile::Disk => &self.0.disk,
            TemplateFile::Kernel => &self.0.kernel,
            TemplateFile::Initrd => &self.0.initrd,
        };
        tokio::fs::copy(src, dest)
            .await
            .map(|_| ())
            .map_err(|source| SourceError::Io {
                path: dest.to_path_buf(),
                source,
            })
    }
}

fn hash(p: &Path) -> anyhow::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p)?)?;
    Ok(TemplateDisk::File(h.finalize().to_hex().to_string()).to_string())
}

/// Bytes a file occupies on disk (not its apparent size).
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn mib(b: f64) -> f64 {
    b / 1048576.0
}

/// Median time and allocated bytes of `runs` overlays and of `runs` full copies of `base`.
fn clone_costs(base: &Path, dir: &Path, runs: usize) -> anyhow::Result<[(f64, f64); 2]> {
    let (mut ov, mut cp, mut ov_b, mut cp_b) = (vec![], vec![], 0.0, 0.0);
    for i in 0..runs {
        let o = dir.join(format!("overlay{i}.qcow2"));
        let t = Instant::now();
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(&o)
            .status()?;
        anyhow::ensure!(st.success(), "qemu-img create failed");
        ov.push(t.elapsed().as_secs_f64() * 1000.0);
        ov_b = allocated(&o) as f64;
        let c = dir.join(format!("copy{i}.raw"));
        let t = Instant::now();
        let st = std::process::Command::new("cp")
            .arg("--sparse=never")
            .arg(base)
            .arg(&c)
            .status()?;
        anyhow::ensure!(st.success(), "cp failed");
        // A copy is only done once it is on disk, as an overlay's metadata is.
        std::fs::File::open(&c)?.sync_all()?;
        cp.push(t.elapsed().as_secs_f64() * 1000.0);
        cp_b = allocated(&c) as f64;
        std::fs::remove_file(&o)?;
        std::fs::remove_file(&c)?;
    }
    Ok([(median(ov), ov_b), (median(cp), cp_b)])
}

fn spec(t: &DemoTemplate, i: usize) -> anyhow::Result<VmSpec> {
    Ok(VmSpec {
        uuid: uuid::Uuid::new_v4(),
        name: format!("bench-{i}"),
        cpus: 1,
        memory_mib: 128,
        disk_mib: None,
        template: "demo".into(),
        template_hash: hash(&t.disk)?,
        template_format: DiskFormat::Raw,
        kernel_boot: Some(KernelBoot {
            kernel_hash: hash(&t.kernel)?,
            kernel_size: 0,
            initrd_hash: Some(hash(&t.initrd)?),
            initrd_size: None,
            cmdline: t.cmdline.clone(),
        }),
        ready: shoal_model::Readiness::Report,
        power: Power::Running,
        force_stop: false,
        ip: format!("10.200.0.{}", i + 2).parse()?,
        prefix_len: 24,
        gateway: "10.200.0.1".parse()?,
        mac: MacAddr::qemu(i as u32 + 1),
        user_data: None,
        user: None,
        ssh_keys: Vec::new(),
        disk_base: None,
        network: None,
    })
}

async fn wait_state(d: &QemuDriver, uuid: uuid::Uuid, want: VmState) -> anyhow::Result<()> {
    until(Duration::from_secs(300), "the VM", || async {
        let s = d.list().await.into_iter().find(|v| v.uuid == uuid)?;
        match s.state {
            s2 if s2 == want => Some(Ok(())),
            VmState::Failed => Some(Err(anyhow::anyhow!("VM failed: {:?}", s.reason))),
            _ => None,
        }
    })
    .await?
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let shoal = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: bench-vm PATH-TO-SHOAL [--vms N]"))?,
    );
    let vms: usize = match (args.next().as_deref(), args.next()) {
        (Some("--vms"), Some(n)) => n.parse()?,
        _ => 3,
    };
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let template = build_demo_template(&dir.path().join("template"))?;
    let build_s = t.elapsed().as_secs_f64();

    // 1. Clone: overlay against full copy.
    let big = dir.path().join("big.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big)?;
        let block: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for _ in 0..1024 {
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    let scratch = dir.path().join("clones");
    std::fs::create_dir_all(&scratch)?;
    let [(demo_ov, demo_ov_b), (demo_cp, demo_cp_b)] = clone_costs(&template.disk, &scratch, 5)?;
    let [(big_ov, big_ov_b), (big_cp, big_cp_b)] = clone_costs(&big, &scratch, 3)?;
    std::fs::remove_file(&big)?;

    // 2. Per VM through the driver, one VM at a time so the figures are the VM's own.
    let mut cfg = QemuConfig::new(dir.path().join("host"));
    cfg.ready_timeout = Duration::from_secs(300);
    let driver = QemuDriver::open(cfg, Arc::new(LocalSource(template.clone()))).await?;
    let accel = driver.accel().as_str();
    let mut rows = Vec::new();
    let mut per = std::collections::BTreeMap::<&str, Vec<f64>>::new();
    for i in 0..vms {
        let s = spec(&template, i)?;
        driver.ensure(&s).await?;
        wait_state(&driver, s.uuid, VmState::Running).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut sus = s.clone();
        sus.power = Power::Suspended;
        driver.ensure(&sus).await?;
        wait_state(&driver, s.uuid, VmState::Suspended).await?;
        driver.ensure(&s).await?;
        wait_state(&driver, s.uuid, VmState::Running).await?;
        let t = driver.timings(s.uuid).unwrap_or_default();
        let g = |k: &str| t.get(k).copied().unwrap_or(f64::NAN);
        for k in [
            "clone_ms",
            "seed_ms",
            "qemu_start_ms",
            "ready_ms",
            "suspend_ms",
            "resume_ms",
            "state_bytes",
        ] {
            per.entry(k).or_default().push(g(k));
        }
        rows.push(vec![
            s.name.clone(),
            format!("{:.0}", g("clone_ms")),
            format!("{:.0}", g("seed_ms")),
            format!("{:.0}", g("qemu_start_ms")),
            format!("{:.0}", g("ready_ms")),
            format!("{:.0}", g("suspend_ms")),
            format!("{:.1}", mib(g("state_bytes"))),
            format!("{:.0}", g("resume_ms")),
        ]);
        driver.remove(s.uuid).await?;
    }
    let m = |k: &str| median(per.get(k).cloned().unwrap_or_default());

    // 3. A 3-VM virtual cluster through the controller.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("up");
    let up = spawn(
        &shoal,
        &[
            "up",
            "--hosts",
            "3",
            "--driver",
            "qemu",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--host-cpus",
            "2",
            "--host-memory",
            "2048",
        ],
        &dir.path().join("up.log"),
    )?;
    let client = Client::new(&url, None);
    until(Duration::from_secs(60), "3 hosts", || async {
        client.hosts().await.ok().filter(|h| h.len() == 3)
    })
    .await?;
    shoal_bench::import_demo(&client, &template).await?;
    client
        .create_profile(&CreateProfile {
            name: "tiny".into(),
            template: Some("demo".into()),
            cpus: Some(1),
            memory: Some("128MiB".into()),
            ..Default::default()
        })
        .await?;
    let t = Instant::now();
    let op = client
        .create_cluster(&CreateCluster {
            name: "lab".into(),
            profile: "tiny".into(),
            size: 3,
            placement: Placement::Spread,
            anti_affinity: AntiAffinity::Host,
            network: None,
            nat: false,
            ..Default::default()
        })
        .await?;
    let plan_s = t.elapsed().as_secs_f64();
    let op = client.wait(op.id, |_| {}).await?;
    anyhow::ensure!(op.state == OperationState::Succeeded, "deployment failed");
    let deploy_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let op = client.cluster_action("lab", "suspend").await?;
    client.wait(op.id, |_| {}).await?;
    let csus_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let op = client.cluster_action("lab", "resume").await?;
    client.wait(op.id, |_| {}).await?;
    let cres_s = t.elapsed().as_secs_f64();
    let op = client.delete_cluster("lab").await?;
    client.wait(op.id, |_| {}).await?;
    drop(up);

    println!("Accelerator: {accel}. Demo template built in {build_s:.2} s.");
    println!();
    println!("Cloning a VM disk (median of runs)");
    print_table(
        &[
            "template",
            "overlay ms",
            "overlay MiB on disk",
            "full copy ms",
            "full copy MiB on disk",
            "copy / overlay time",
        ],
        &[
            vec![
                "demo (64 MiB ext4)".into(),
                format!("{demo_ov:.1}"),
                format!("{:.2}", mib(demo_ov_b)),
                format!("{demo_cp:.1}"),
                format!("{:.1}", mib(demo_cp_b)),
                format!("{:.0}x", demo_cp / demo_ov),
            ],
            vec![
                "1 GiB of data".into(),
                format!("{big_ov:.1}"),
                format!("{:.2}", mib(big_ov_b)),
                format!("{big_cp:.1}"),
                format!("{:.1}", mib(big_cp_b)),
                format!("{:.0}x", big_cp / big_ov),
            ],
        ],
    );
    println!();
    println!("Per VM through the QEMU driver (128 MiB, 1 vCPU, one VM at a time)");
    print_table(
        &[
            "vm",
            "clone ms",
            "seed ms",
            "qemu start ms",
            "ready ms",
            "suspend ms",
            "state MiB",
            "resume ms",
        ],
        &rows,
    );
    println!();
    println!("3-VM virtual cluster through the API (one VM per host)");
    print_table(
        &["measure", "seconds"],
        &[
            vec![
                "steps 1-3 (prepare, configure, choose; the API call)".into(),
                format!("{plan_s:.3}"),
            ],
            vec!["request to all 3 guests ready".into(), format!("{deploy_s:.2}")],
            vec!["cluster suspend".into(), format!("{csus_s:.2}")],
            vec!["cluster resume".into(), format!("{cres_s:.2}")],
        ],
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "vm",
            "accel": accel,
            "demo_build_s": build_s,
            "clone_overlay_ms": demo_ov, "clone_full_copy_ms": demo_cp,
            "clone_overlay_1gib_ms": big_ov, "clone_full_copy_1gib_ms": big_cp,
            "clone_overlay_bytes": demo_ov_b, "clone_full_copy_bytes": demo_cp_b,
            "seed_ms": m("seed_ms"),
            "qemu_start_ms": m("qemu_start_ms"),
            "ready_ms": m("ready_ms"),
            "suspend_ms": m("suspend_ms"),
            "resume_ms": m("resume_ms"),
            "state_file_mib": mib(m("state_bytes")),
            "deploy_3vm_plan_s": plan_s,
            "deploy_3vm_s": deploy_s,
            "cluster_suspend_s": csus_s,
            "cluster_resume_s": cres_s,
        })
    );
    Ok(())
}
