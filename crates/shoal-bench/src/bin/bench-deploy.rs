//! `make bench-deploy`: deploys a 1,000-VM virtual cluster onto 100 simulated hosts through the
//! API, from request to every VM running, then fills the controller to 10,000 VMs and reads its
//! memory. The controller and each of the 100 agents are separate processes talking HTTP, as in
//! production; the agents use the simulated hypervisor driver.
//!
//! Usage: bench-deploy PATH-TO-SHOAL [--hosts N] [--clusters N] [--size N]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_bench::{free_port, print_table, rss_mib, spawn, until, Proc};
use shoal_client::Client;
use shoal_model::api::{CreateCluster, CreateProfile};
use shoal_model::{AntiAffinity, OperationState, Placement};

struct Args {
    shoal: PathBuf,
    hosts: usize,
    clusters: usize,
    size: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let shoal =
        PathBuf::from(it.next().ok_or_else(|| {
            anyhow::anyhow!("usage: bench-deploy PATH-TO-SHOAL [--hosts N] [--clusters N] [--size N]")
        })?);
    let mut a = Args {
        shoal,
        hosts: 100,
        clusters: 10,
        size: 1000,
    };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--hosts" => a.hosts = v.parse()?,
            "--clusters" => a.clusters = v.parse()?,
            "--size" => a.size = v.parse()?,
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("controller");
    let server = spawn(
        &a.shoal,
        &["server", "--listen", &listen, "--data-dir", data.to_str().unwrap()],
        &dir.path().join("server.log"),
    )?;
    let client = Client::new(&url, None);
    until(Duration::from_secs(30), "the controller", || async {
        client.hosts().await.ok()
    })
    .await?;

    let t = Instant::now();
    let mut agents: Vec<Proc> = Vec::new();
    for i in 0..a.hosts {
        let name = format!("host{i:03}");
        let d = dir.path().join(&name);
        agents.push(spawn(
            &a.shoal,
            &[
                "agent",
                "--name",
                &name,
                "--controller",
                &url,
                "--data-dir",
                d.to_str().unwrap(),
                "--host-cpus",
                "128",
                "--host-memory",
                "524288",
                "--heartbeat",
                "2",
            ],
            &dir.path().join(format!("{name}.log")),
        )?);
    }
    let hosts = a.hosts;
    until(Duration::from_secs(120), "every agent to register", || async {
        client.hosts().await.ok().filter(|h| h.len() == hosts).map(|_| ())
    })
    .await?;
    let join_s = t.elapsed().as_secs_f64();

    let img = dir.path().join("base.img");
    // 1 MiB with an MBR boot signature: the controller refuses files that are no disk image.
    let mut disk = vec![1u8; 1 << 20];
    disk[510..512].copy_from_slice(&[0x55, 0xAA]);
    std::fs::write(&img, disk)?;
    client
        .import_template("base", &shoal_client::TemplateFiles::disk(&img))
        .await?;
    client
        .create_profile(&CreateProfile {
            name: "small".into(),
            template: Some("base".into()),
            cpus: Some(1),
            memory: Some("512MiB".into()),
            ..Default::default()
        })
        .await?;

    let mut rows = Vec::new();
    let mut first = None;
    let mut last = 0.0;
    for c in 0..a.clusters {
        let req = CreateCluster {
            name: format!("c{c}"),
            profile: "small".into(),
            size: a.size,
            placement: Placement::Spread,
            anti_affinity: AntiAffinity::None,
            network: None,
            nat: false,
            ..Default::default()
        };
        let t = Instant::now();
        let op = client.create_cluster(&req).await?;
        let planned = t.elapsed().as_secs_f64();
        let op = until(Duration::from_secs(300), "the deployment", || async {
            client
                .operation(op.id)
                .await
                .ok()
                .filter(|o| o.state != OperationState::Running)
        })
        .await?;
        let total = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            op.state == OperationState::Succeeded,
            "deployment failed: {:?}",
            op.error
        );
        let running = client.cluster(&req.name).await?.vms_running;
        anyhow::ensure!(running == a.size, "only {running} of {} VMs running", a.size);
        first.get_or_insert(total);
        last = total;
        rows.push(vec![
            format!("{}", c + 1),
            format!("{}", (c + 1) * a.size as usize),
            format!("{planned:.3}"),
            format!("{:.3}", total - planned),
            format!("{total:.3}"),
        ]);
    }
    let vms = a.clusters * a.size as usize;
    // Let a few heartbeat rounds and reconcile passes run at full size before reading memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, peak) = rss_mib(server.0.id());
    let deploy = first.unwrap_or(f64::NAN);

    println!(
        "Deploying {}-VM virtual clusters onto {} simulated hosts (separate agent processes), through the API",
        a.size, a.hosts
    );
    print_table(
        &[
            "cluster",
            "vms in total",
            "plan (steps 1-3) s",
            "execute (step 4) s",
            "request to all running s",
        ],
        &rows,
    );
    println!();
    print_table(
        &["measure", "shoal", "target"],
        &[
            vec![
                format!("deploy {} VMs on {} hosts (s)", a.size, a.hosts),
                format!("{deploy:.3}"),
                "< 2".into(),
            ],
            vec![
                format!("deploy at {} VMs already (s)", vms - a.size as usize),
                format!("{last:.3}"),
                "-".into(),
            ],
            vec![
                format!("controller RSS with {vms} VMs (MiB)"),
                format!("{rss:.1}"),
                "< 200".into(),
            ],
            vec!["controller peak RSS (MiB)".into(), format!("{peak:.1}"), "-".into()],
            vec![
                format!("{} agents joined (s)", a.hosts),
                format!("{join_s:.2}"),
                "-".into(),
            ],
        ],
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "deploy",
            "hosts": a.hosts,
            "vms": vms,
            "deploy_1000_s": deploy,
            "deploy_last_s": last,
            "rss_mib_10000_vms": rss,
            "peak_rss_mib": peak,
        })
    );
    drop(agents);
    drop(server);
    Ok(())
}
