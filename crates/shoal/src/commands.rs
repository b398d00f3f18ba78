//! The client commands: each turns into one API call (plus polling for `--wait`).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use shoal_client::{Client, TemplateFiles};
use shoal_model::api::{CreateCluster, CreateProfile};
use shoal_model::{parse_size_mib, plural, AntiAffinity, Operation, Placement, Readiness, StepState};
use shoal_policy::rebalance::{self, RebalanceOptions};
use shoal_policy::{GangRequest, Placer, Snapshot};

use crate::cli::*;
use crate::{config, daemons, images, networks, output};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    match cli.command {
        Command::Server(a) => return daemons::server(a).await,
        Command::Agent(a) => return daemons::agent(a).await,
        Command::Up(a) => return daemons::up(a).await,
        Command::Sim(a) => return sim(a, out),
        Command::FenceGuard { data_dir } => return daemons::fence_guard(&data_dir),
        _ => {}
    }
    let client = connect(cli.url)?;
    match cli.command {
        Command::Server(_) | Command::Agent(_) | Command::Up(_) | Command::Sim(_) | Command::FenceGuard { .. } => {
            unreachable!("handled above")
        }
        Command::Host(HostCmd::List) => output::emit(out, &client.hosts().await?, output::hosts),
        Command::Host(HostCmd::Rebalance {
            plan: _,
            apply,
            options,
        }) => {
            let p = client.rebalance(&options.options(), apply).await?;
            output::emit(out, &p, output::rebalance);
            if apply && !p.moves.is_empty() {
                eprintln!("{} started", plural(p.moves.len(), "migration"));
            }
        }
        Command::Host(HostCmd::Drain { name, plan, options }) => {
            let p = client.drain_host(&name, &options.options(), !plan).await?;
            output::emit(out, &p, output::rebalance);
            if !plan {
                eprintln!(
                    "host {name} is draining; {} started",
                    plural(p.moves.len(), "migration")
                );
            }
        }
        Command::Host(HostCmd::Maintenance { name, off }) => {
            client.host_maintenance(&name, !off).await?;
            host_marked(&client, out, &name, HostMark::Maintenance(!off)).await?
        }
        Command::Host(HostCmd::Power {
            name,
            model,
            on_command,
            off_command,
        }) => {
            let mut p = client.host_power(&name).await?;
            if model.is_some() || on_command.is_some() || off_command.is_some() {
                let mut c = p.config.clone();
                c.model = model.unwrap_or(c.model);
                c.power_on_command = on_command.or(c.power_on_command);
                c.power_off_command = off_command.or(c.power_off_command);
                p = client.configure_host_power(&name, &c).await?;
            }
            output::emit(out, &p, output::host_power)
        }
        Command::Host(HostCmd::PowerOn { name }) => {
            output::emit(out, &client.switch_host(&name, true).await?, output::host_power)
        }
        Command::Host(HostCmd::PowerOff { name }) => {
            output::emit(out, &client.switch_host(&name, false).await?, output::host_power)
        }
        Command::Host(HostCmd::Energy) => output::emit(out, &client.energy().await?, output::energy),
        Command::Host(HostCmd::Consolidate { apply }) => {
            output::emit(out, &client.consolidate(apply).await?, output::consolidation)
        }
        Command::Host(HostCmd::Undrain { name }) => {
            client.undrain_host(&name).await?;
            host_marked(&client, out, &name, HostMark::Undrained).await?
        }
        Command::Plan(p) => plan(&client, out, p).await?,
        Command::Host(HostCmd::JoinToken) => {
            let token = client.create_join_token().await?;
            output::emit(out, &serde_json::json!({ "token": token }), |_| format!("{token}\n"))
        }
        Command::Image(i) => match i {
            ImageCmd::Stats => output::emit(out, &client.image_stats().await?, output::image_stats),
            ImageCmd::Gc => output::emit(out, &client.image_gc().await?, output::image_gc),
            ImageCmd::Verify => {
                let v = client.image_verify().await?;
                output::emit(out, &v, output::image_verify);
                if !v.corrupt.is_empty() || !v.damaged.is_empty() {
                    anyhow::bail!(
                        "the image store is damaged: {}, images {:?}",
                        plural(v.corrupt.len(), "corrupt chunk"),
                        v.damaged
                    );
                }
            }
        },
        Command::Template(t) => match t {
            TemplateCmd::Import {
                name,
                file,
                kernel,
                initrd,
                cmdline,
                ready,
                ready_pattern,
                format,
            } => {
                let ready = match (ready, ready_pattern) {
                    (_, Some(p)) => Readiness::Pattern(p),
                    (ReadyArg::Report, None) => Readiness::Report,
                    (ReadyArg::Running, None) => Readiness::Running,
                };
                let files = TemplateFiles {
                    disk: file,
                    kernel,
                    initrd,
                    cmdline,
                    ready,
                };
                let t = images::import_template(&client, &name, &files, format.map(Into::into)).await?;
                output::emit(out, &t, output::template)
            }
            TemplateCmd::Export {
                name,
                file,
                format,
                force,
            } => {
                let e = images::export_template(&client, &name, &file, format.into(), force).await?;
                // People have read what was written on stderr already.
                output::emit(out, &e, |_| String::new())
            }
            TemplateCmd::BuildDemo { name } => {
                let dir = tempfile::tempdir().context("creating a temporary directory")?;
                let started = std::time::Instant::now();
                let d = shoal_demo::build_demo_template(dir.path())?;
                eprintln!("built the demo template in {:.1} s", started.elapsed().as_secs_f64());
                let files = TemplateFiles {
                    disk: d.disk,
                    kernel: Some(d.kernel),
                    initrd: Some(d.initrd),
                    cmdline: Some(d.cmdline),
                    // The demo guest reports as cloud-init guests do.
                    ready: Readiness::Report,
                };
                let t = images::import_template(&client, &name, &files, None).await?;
                output::emit(out, &t, output::template)
            }
            TemplateCmd::BuildDebian {
                name,
                suite,
                packages,
                mirror,
                security_mirror,
                cache_dir,
                rebuild,
            } => {
                let defaults = shoal_demo::debian::DebianOptions::default();
                let opts = shoal_demo::debian::DebianOptions {
                    suite,
                    packages,
                    mirror: mirror.unwrap_or(defaults.mirror),
                    security_mirror: match security_mirror.as_deref() {
                        Some("none") => None,
                        Some(m) => Some(m.to_string()),
                        None => defaults.security_mirror,
                    },
                    cache_dir: cache_dir.unwrap_or(defaults.cache_dir),
                    rebuild,
                };
                let started = std::time::Instant::now();
                // Minutes of blocking work (debootstrap, apt, mkfs): off the async runtime.
                let d = tokio::task::spawn_blocking(move || {
                    shoal_demo::debian::build_debian_template(&opts, &mut |line| eprintln!("build-debian: {line}"))
                })
                .await??;
                if !d.cached {
                    eprintln!(
                        "built the Debian template in {:.1} s: {}",
                        started.elapsed().as_secs_f64(),
                        d.dir.display()
                    );
                }
                let files = TemplateFiles {
                    disk: d.template.disk,
                    kernel: Some(d.template.kernel),
                    initrd: Some(d.template.initrd),
                    cmdline: Some(d.template.cmdline),
                    // cloud-init reports through what Shoal adds to the seed.
                    ready: Readiness::Report,
                };
                let t = images::import_template(&client, &name, &files, None).await?;
                output::emit(out, &t, output::template)
            }
            TemplateCmd::List => output::emit(out, &client.templates().await?, output::templates),
            TemplateCmd::Show { name } => {
                let t = client.templates().await?.into_iter().find(|t| t.name == name);
                let t = t.ok_or_else(|| anyhow::anyhow!("template {name:?} not found"))?;
                output::emit(out, &t, output::template)
            }
            TemplateCmd::Publish { vm, name } => {
                output::emit(out, &client.publish_template(&vm, &name).await?, output::template)
            }
            TemplateCmd::Delete { name } => {
                client.delete_template(&name).await?;
                output::deleted(out, "template", &name)
            }
        },
        Command::Profile(p) => match p {
            ProfileCmd::Create {
                name,
                template,
                cpus,
                memory,
                disk,
                parent,
                network,
                guest,
                ha,
            } => {
                let Guest {
                    user_data,
                    user,
                    ssh_keys,
                } = read_guest_args(&guest)?;
                let req = CreateProfile {
                    checkpoint_interval: ha.checkpoint_interval,
                    keep_checkpoints: ha.keep,
                    ha_priority: ha.ha_priority,
                    name,
                    parent,
                    template,
                    cpus,
                    memory,
                    disk,
                    network,
                    user_data,
                    user,
                    ssh_keys,
                };
                output::emit(out, &client.create_profile(&req).await?, output::profile)
            }
            ProfileCmd::List => output::emit(out, &client.profiles().await?, output::profiles),
            ProfileCmd::Show { name } => output::emit(out, &client.profile(&name).await?, output::profile),
            ProfileCmd::Delete { name } => {
                client.delete_profile(&name).await?;
                output::deleted(out, "profile", &name)
            }
        },
        Command::Cluster(c) => match c {
            ClusterCmd::Blocks { name } => {
                output::emit(out, &client.cluster_blocks(&name).await?, output::cluster_blocks)
            }
            ClusterCmd::Create {
                name,
                profile,
                size,
                placement,
                anti_affinity,
                network,
                nat,
                wait,
                dry_run,
                explain,
                guest,
                ha,
            } => {
                let Guest {
                    user_data,
                    user,
                    ssh_keys,
                } = read_guest_args(&guest)?;
                let req = CreateCluster {
                    checkpoint_interval: ha.checkpoint_interval,
                    keep_checkpoints: ha.keep,
                    ha_priority: ha.ha_priority,
                    name,
                    profile,
                    size,
                    placement: match placement {
                        PlacementArg::Spread => Placement::Spread,
                        PlacementArg::Pack => Placement::Pack,
                    },
                    anti_affinity: match anti_affinity {
                        AntiAffinityArg::None => AntiAffinity::None,
                        AntiAffinityArg::Host => AntiAffinity::Host,
                        AntiAffinityArg::Zone => AntiAffinity::Zone,
                        AntiAffinityArg::Rack => AntiAffinity::Rack,
                    },
                    network,
                    nat,
                    user_data,
                    user,
                    ssh_keys,
                };
                if dry_run {
                    let e = client.plan_place(&req, explain).await?;
                    output::emit(out, &e, output::explanation);
                    if let Some(err) = e.error {
                        anyhow::bail!("the cluster would not fit: {err}");
                    }
                    return Ok(());
                }
                let op = client.create_cluster(&req).await?;
                finish(&client, out, op, wait).await?
            }
            ClusterCmd::List => output::emit(out, &client.clusters().await?, output::clusters),
            ClusterCmd::Show { name } => output::emit(out, &client.cluster(&name).await?, output::cluster),
            ClusterCmd::Scale { name, size, wait } => {
                let op = client.scale_cluster(&name, size).await?;
                finish(&client, out, op, wait).await?
            }
            ClusterCmd::Delete { name, wait } => {
                let op = client.delete_cluster(&name).await?;
                finish(&client, out, op, wait).await?
            }
            ClusterCmd::Migrate {
                name,
                how,
                max_concurrent,
            } => {
                let req = shoal_model::MigrateCluster {
                    params: how.params(),
                    max_concurrent: Some(max_concurrent),
                };
                let op = client.migrate_cluster(&name, &req).await?;
                finish(&client, out, op, how.wait).await?
            }
            ClusterCmd::Stop(a) => power(&client, out, &a, None, "stop", false).await?,
            ClusterCmd::Start(a) => power(&client, out, &a, None, "start", false).await?,
            ClusterCmd::Suspend(a) => power(&client, out, &a, None, "suspend", false).await?,
            ClusterCmd::Resume(a) => power(&client, out, &a, None, "resume", false).await?,
        },
        Command::Network(n) => networks::run(&client, out, n).await?,
        Command::Vm(VmCmd::List { cluster }) => output::emit(out, &client.vms(cluster.as_deref()).await?, output::vms),
        Command::Vm(VmCmd::Show { name }) => output::emit(out, &client.vm(&name).await?, output::vm),
        Command::Vm(VmCmd::Stop { vm, force }) => power(&client, out, &vm, Some(()), "stop", force).await?,
        Command::Vm(VmCmd::Start(a)) => power(&client, out, &a, Some(()), "start", false).await?,
        Command::Vm(VmCmd::Suspend(a)) => power(&client, out, &a, Some(()), "suspend", false).await?,
        Command::Vm(VmCmd::Resume(a)) => power(&client, out, &a, Some(()), "resume", false).await?,
        Command::Vm(VmCmd::Migrate {
            name,
            to,
            how,
            dry_run,
            explain,
        }) => {
            if dry_run {
                let e = client.plan_migrate(&name, to.as_deref(), explain).await?;
                output::emit(out, &e, output::explanation);
                if let Some(err) = e.error {
                    anyhow::bail!("VM {name} could not move: {err}");
                }
                return Ok(());
            }
            let req = shoal_model::MigrateVm {
                to,
                params: how.params(),
            };
            let op = client.migrate_vm(&name, &req).await?;
            finish(&client, out, op, how.wait).await?
        }
        Command::Vm(VmCmd::Console { name, follow }) => console(&client, out, &name, follow).await?,
        Command::Vm(VmCmd::Checkpoint { name }) => {
            output::emit(out, &client.checkpoint_vm(&name).await?, output::checkpoint)
        }
        Command::Vm(VmCmd::Blocks { name }) => output::emit(out, &client.vm_blocks(&name).await?, output::vm_blocks),
        Command::Vm(VmCmd::Snapshot { name }) => {
            output::emit(out, &client.snapshot_vm(&name).await?, output::vm_snapshot)
        }
        Command::Operation(OperationCmd::List) => output::emit(out, &client.operations().await?, output::operations),
        Command::Operation(OperationCmd::Show { id }) => {
            let id = id
                .parse()
                .map_err(|_| anyhow::anyhow!("invalid operation id {id:?}: expected a UUID"))?;
            output::emit(out, &client.operation(id).await?, output::operation)
        }
    }
    Ok(())
}

/// A power change of a VM (`vm` is `Some`) or of a whole cluster; waits unless `--no-wait`.
async fn power(
    client: &Client,
    out: Output,
    a: &PowerArgs,
    vm: Option<()>,
    action: &str,
    force: bool,
) -> anyhow::Result<()> {
    let op = match vm {
        Some(()) => client.vm_action(&a.name, action, force).await?,
        None => client.cluster_action(&a.name, action).await?,
    };
    finish(client, out, op, !a.no_wait).await
}

/// What `host maintenance` or `host undrain` changed.
#[derive(Clone, Copy)]
enum HostMark {
    /// Maintenance switched on (`true`) or off.
    Maintenance(bool),
    /// The draining mark removed.
    Undrained,
}

/// What `host maintenance|undrain` reports: the mark set and the state placement sees now (the
/// host list does not show marks), e.g. `{"host": "h1", "maintenance": false, "state": "draining"}`.
#[derive(serde::Serialize)]
struct HostMarked<'a> {
    host: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    maintenance: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    draining: Option<bool>,
    state: shoal_policy::HostState,
}

async fn host_marked(client: &Client, out: Output, name: &str, mark: HostMark) -> anyhow::Result<()> {
    let snap = client.plan_snapshot().await?;
    let state = snap
        .hosts
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.state)
        .ok_or_else(|| anyhow::anyhow!("host {name:?} not found"))?;
    let sentence = match (mark, state) {
        (HostMark::Maintenance(true), _) => {
            format!("host {name} is in maintenance: it keeps its VMs and takes no new ones")
        }
        (_, shoal_policy::HostState::Up) => format!("host {name} takes new VMs again"),
        (HostMark::Maintenance(false), s) => {
            format!(
                "host {name} is out of maintenance but takes no new VMs: it is {}",
                s.as_phrase()
            )
        }
        (HostMark::Undrained, s) => {
            format!(
                "host {name} is no longer draining but takes no new VMs: it is {}",
                s.as_phrase()
            )
        }
    };
    let (maintenance, draining) = match mark {
        HostMark::Maintenance(on) => (Some(on), None),
        HostMark::Undrained => (None, Some(false)),
    };
    let value = HostMarked {
        host: name,
        maintenance,
        draining,
        state,
    };
    output::done(out, &value, &sentence);
    Ok(())
}

/// Prints a VM's console; with `follow`, keeps printing what comes until interrupted. In JSON:
/// `{"vm", "data", "next"}` for what there is, or with `follow` one such line per piece.
async fn console(client: &Client, out: Output, name: &str, follow: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut offset = 0;
    let mut all = String::new();
    loop {
        let chunk = client.console(name, offset).await?;
        if !chunk.data.is_empty() {
            let mut so = std::io::stdout().lock();
            match out {
                Output::Table => so.write_all(chunk.data.as_bytes())?,
                Output::Json if follow => {
                    let line = serde_json::json!({ "vm": name, "data": chunk.data, "next": chunk.next });
                    writeln!(so, "{line}")?
                }
                Output::Json => all.push_str(&chunk.data),
            }
            so.flush()?;
        }
        let advanced = chunk.next > offset;
        offset = chunk.next;
        if !follow && !advanced {
            if out == Output::Json {
                output::emit(
                    out,
                    &serde_json::json!({ "vm": name, "data": all, "next": offset }),
                    |_| String::new(),
                );
            }
            return Ok(());
        }
        if !advanced {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
}

/// Prints the operation, or with `--wait` follows it to the end with a progress display.
async fn finish(client: &Client, out: Output, op: Operation, wait: bool) -> anyhow::Result<()> {
    if !wait {
        output::emit(out, &op, output::operation);
        return Ok(());
    }
    let done = follow(client, &op).await?;
    output::emit(out, &done, output::operation);
    Ok(())
}

/// Follows an operation: one line per finished step, a bar for the step under way.
pub async fn follow(client: &Client, op: &Operation) -> anyhow::Result<Operation> {
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let total_steps = op.steps.len();
    let mut printed = vec![false; total_steps];
    let say = |line: String| {
        if tty {
            bar.println(line)
        } else {
            eprintln!("{line}")
        }
    };
    let result = client
        .wait(op.id, |op| {
            for (i, s) in op.steps.iter().enumerate() {
                if s.state == StepState::Done && !printed[i] {
                    printed[i] = true;
                    say(format!("[{}/{total_steps}] {:<15} {}", i + 1, s.name, s.message));
                } else if s.state == StepState::Running {
                    bar.set_prefix(format!("[{}/{total_steps}] {}", i + 1, s.name));
                    bar.set_length(s.total);
                    bar.set_position(s.done);
                    bar.set_message(s.message.clone());
                }
            }
        })
        .await;
    bar.finish_and_clear();
    Ok(result?)
}

impl RebalanceArgs {
    pub fn options(&self) -> RebalanceOptions {
        RebalanceOptions {
            ignore_dynu: self.ignore_dynu,
            min_gain: self.min_gain,
            max_moves: self.max_moves,
            max_concurrent: self.max_concurrent,
            bandwidth_mib_s: self.bandwidth,
            cost_per_second: self.cost_per_second,
            ..RebalanceOptions::default()
        }
    }
}

/// The snapshot in `file`, or the live one from the controller.
async fn load_snapshot(client: &Client, file: Option<PathBuf>) -> anyhow::Result<Snapshot> {
    let snap: Snapshot = match file {
        Some(f) => {
            serde_json::from_slice(&std::fs::read(&f).with_context(|| format!("reading snapshot {}", f.display()))?)
                .with_context(|| format!("snapshot {} is not valid (format: docs/snapshot.md)", f.display()))?
        }
        None => client.plan_snapshot().await?,
    };
    snap.validate()?;
    Ok(snap)
}

/// `shoal plan …`: the policy core runs here, on a snapshot file or the live state.
async fn plan(client: &Client, out: Output, cmd: PlanCmd) -> anyhow::Result<()> {
    match cmd {
        PlanCmd::Snapshot { file } => {
            let snap = client.plan_snapshot().await?;
            std::fs::write(&file, serde_json::to_vec_pretty(&snap)?)
                .with_context(|| format!("writing {}", file.display()))?;
            output::done(
                out,
                &serde_json::json!({ "file": file, "hosts": snap.hosts.len(), "vms": snap.vms.len() }),
                &format!(
                    "wrote {} and {} to {}",
                    plural(snap.hosts.len(), "host"),
                    plural(snap.vms.len(), "VM"),
                    file.display()
                ),
            );
        }
        PlanCmd::Place(a) => {
            let snap = load_snapshot(client, a.snapshot.clone()).await?;
            let req = gang_request(&a)?;
            let mut e = Placer::new(&snap).explain(&req);
            if !a.explain {
                e.hosts.clear();
            }
            output::emit(out, &e, output::explanation);
            if let Some(err) = e.error {
                anyhow::bail!("the cluster would not fit: {err}");
            }
        }
        PlanCmd::Rebalance { snapshot, options } => {
            let snap = load_snapshot(client, snapshot).await?;
            output::emit(out, &rebalance::plan(&snap, &options.options())?, output::rebalance);
        }
        PlanCmd::Drain {
            host,
            snapshot,
            options,
        } => {
            let snap = load_snapshot(client, snapshot).await?;
            output::emit(
                out,
                &rebalance::drain(&snap, &host, &options.options())?,
                output::rebalance,
            );
        }
    }
    Ok(())
}

fn gang_request(a: &PlaceArgs) -> anyhow::Result<GangRequest> {
    let placement = match a.placement {
        PlacementArg::Spread => Placement::Spread,
        PlacementArg::Pack => Placement::Pack,
    };
    let mut r = GangRequest::for_cluster(
        &a.cluster,
        a.size,
        a.cpus,
        parse_size_mib(&a.memory)?,
        a.template.as_deref(),
        placement,
        a.anti_affinity.as_deref(),
    );
    r.disk_mib = a.disk.as_deref().map(parse_size_mib).transpose()?.unwrap_or(0);
    r.allow_power_on = a.allow_power_on;
    r.rules.affinity = a.affinity.clone();
    r.rules.soft_anti_affinity = a.soft_anti_affinity.clone();
    r.rules.soft_affinity = a.soft_affinity.clone();
    r.rules.only_hosts = a.only_hosts.clone();
    r.rules.avoid_hosts = a.avoid_hosts.clone();
    for kv in &a.require {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--require {kv:?}: expected KEY=VALUE"))?;
        r.rules.required_labels.insert(k.to_string(), v.to_string());
    }
    Ok(r)
}

/// The controller to talk to, and the token to present: `--url`, then `$SHOAL_URL`, then the
/// config file, then the default; the token from `$SHOAL_TOKEN`, then the config file.
fn connect(url: Option<String>) -> anyhow::Result<Client> {
    let config = config::load()?;
    let (url, from) = match (url, std::env::var("SHOAL_URL").ok().filter(|s| !s.is_empty())) {
        (Some(u), _) => (u, Some("--url")),
        (None, Some(u)) => (u, Some("$SHOAL_URL")),
        // The config file's URL was checked when it was read.
        (None, None) => (config.url.unwrap_or_else(|| "http://127.0.0.1:7700".into()), None),
    };
    if let Some(from) = from {
        shoal_client::check_base_url(&url).context(from)?;
    }
    let token = std::env::var("SHOAL_TOKEN")
        .ok()
        .filter(|s| !s.is_empty())
        .or(config.token);
    Ok(Client::new(&url, token))
}

/// `shoal sim`: loads the trace once and runs every policy on it, in order.
fn sim(a: SimArgs, out: Output) -> anyhow::Result<()> {
    let TraceFormat::Planetlab = a.format;
    let mut w = shoal_sim::load_planetlab(&a.trace, a.hosts)?;
    w.reference_quirks = !a.full_day;
    let mut reports = Vec::new();
    for spec in &a.policies {
        let mut policy = shoal_sim::policy(spec)?;
        reports.push(shoal_sim::simulate(&w, policy.as_mut())?);
    }
    if let Some(path) = &a.plot {
        std::fs::write(path, shoal_sim::svg::plot(&reports)).with_context(|| format!("writing {}", path.display()))?;
    }
    output::emit(out, &reports, |r| {
        let mut s = shoal_sim::report::table(r);
        let find = |name: &str| r.iter().find(|x| x.policy == name);
        if let (Some(shoal), Some(lr)) = (find("shoal"), find("lr-mmt:1.2")) {
            let t = shoal_sim::Targets::check(shoal, lr);
            s.push_str(&format!(
                "targets vs lr-mmt:1.2: energy {}, ESV <= 30 % {}, migrations <= 10 % {}, < 1 s {}\n",
                ok(t.energy_ok),
                ok(t.esv_ok),
                ok(t.migrations_ok),
                ok(t.time_ok)
            ));
        }
        s
    });
    Ok(())
}

fn ok(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "MISSED"
    }
}

/// What `--ssh-key`, `--user` and `--user-data` say, read and checked (the controller checks
/// again): a file that cannot be read or holds no valid key is named.
struct Guest {
    user_data: Option<String>,
    user: Option<String>,
    ssh_keys: Vec<String>,
}

fn read_guest_args(args: &GuestArgs) -> anyhow::Result<Guest> {
    use shoal_model::guest;
    let user_data = match &args.user_data {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading user data {}", path.display()))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("user data {} is not UTF-8 text", path.display()))?;
            guest::check_user_data(&text).with_context(|| format!("user data {}", path.display()))?;
            Some(text)
        }
        None => None,
    };
    if let Some(u) = &args.user {
        guest::check_user_name(u)?;
    }
    let mut ssh_keys = Vec::new();
    for arg in &args.ssh_keys {
        if guest::looks_like_ssh_key(arg) {
            ssh_keys.push(guest::check_ssh_key(arg)?);
        } else {
            let text = std::fs::read_to_string(arg).with_context(|| format!("reading SSH key file {arg}"))?;
            ssh_keys.extend(guest::parse_ssh_keys(&text).with_context(|| format!("SSH key file {arg}"))?);
        }
    }
    Ok(Guest {
        user_data,
        user: args.user.clone(),
        ssh_keys,
    })
}
