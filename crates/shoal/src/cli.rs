//! The command line, as the CLI contract fixes it: `shoal [--url URL] [--output table|json] NOUN VERB`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "shoal", version, about = "Virtual clusters of QEMU VMs on a pool of hosts")]
pub struct Cli {
    /// Controller URL [default: $SHOAL_URL, the config file, then http://127.0.0.1:7700]
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Output format of client commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller.
    Server(ServerArgs),
    /// Run a host agent.
    Agent(AgentArgs),
    /// All-in-one: a controller and N local host agents in one process.
    Up(UpArgs),
    /// Started by a QEMU agent: kills the host's QEMUs once the agent's lease runs out, even
    /// when the agent is gone (see docs/ha.md).
    #[command(hide = true)]
    FenceGuard {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Physical hosts.
    #[command(subcommand)]
    Host(HostCmd),
    /// Templates (disk images VMs are cloned from).
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Profiles (reusable VM configurations).
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Virtual clusters.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Virtual networks (an isolated L2 segment with its subnet, across hosts).
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Long-running operations and their progress.
    #[command(subcommand)]
    Operation(OperationCmd),
    /// Placement, rebalancing and drain plans, on the live state or offline on a snapshot file.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// The controller's image store (deduplicated chunks of templates and snapshots).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Replay a utilisation trace against consolidation policies (offline; no controller).
    Sim(SimArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TraceFormat {
    /// A directory with one file of CPU percentages (one per 5 minutes) per VM.
    Planetlab,
}

#[derive(Args, Debug)]
pub struct SimArgs {
    /// The trace: for planetlab, the day's directory (its `<dir>.vm-order.csv` is used if present).
    #[arg(long)]
    pub trace: PathBuf,
    #[arg(long, value_enum, default_value_t = TraceFormat::Planetlab)]
    pub format: TraceFormat,
    #[arg(long, default_value_t = 800)]
    pub hosts: usize,
    /// Policy NAME[:PARAM], repeatable: shoal, thr-mmt:0.8, iqr-mmt:1.5, mad-mmt:2.5, lr-mmt:1.2, dvfs.
    #[arg(long = "policy", default_value = "shoal")]
    pub policies: Vec<String>,
    /// Every VM runs the whole day (the reference toolkit drops a VM whose demand reads 0).
    #[arg(long)]
    pub full_day: bool,
    /// Write an SVG plot of hosts on, power and SLA violation over the day.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Totals: logical bytes of every image, bytes stored, chunks.
    Stats,
    /// Remove images nothing names any more, and the chunks only they used.
    Gc,
    /// Re-hash every chunk; quarantine corrupt ones and name the images they damage.
    Verify,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImageFormatArg {
    Raw,
    Qcow2,
}

impl From<ImageFormatArg> for shoal_image::ImageFormat {
    fn from(f: ImageFormatArg) -> Self {
        match f {
            ImageFormatArg::Raw => shoal_image::ImageFormat::Raw,
            ImageFormatArg::Qcow2 => shoal_image::ImageFormat::Qcow2,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ControllerOpts {
    /// Where the controller keeps its state, tokens and templates.
    #[arg(long, default_value = "/var/lib/shoal")]
    pub data_dir: PathBuf,
    /// Pool that virtual clusters' subnets are cut from.
    #[arg(long, default_value = "10.200.0.0/16")]
    pub subnet_pool: String,
    /// Prefix length of each cluster's subnet.
    #[arg(long, default_value_t = 24)]
    pub subnet_prefix: u8,
    /// Seconds without a heartbeat after which a host is down (and failed, if no peer reaches
    /// it either); also each agent's lease: an agent that has not heard from the controller for
    /// this long, and reaches at most half of its peers, stops its VMs.
    #[arg(long, default_value_t = 10.0)]
    pub host_timeout: f64,
    /// Seconds a failed host's VMs wait, after its lease certainly ran out, before they are
    /// started on other hosts, when no power-off command fenced it: at least the agents'
    /// heartbeat interval plus one (docs/ha.md).
    #[arg(long, default_value_t = 3.0)]
    pub fence_margin: f64,
    /// Seconds between samples of the hosts' CPU use: each sample adds to the energy account,
    /// the record and, with --consolidate, is one decision step of the consolidator.
    #[arg(long, default_value_t = 300.0)]
    pub sample_interval: f64,
    /// Run the consolidator: at each sample, empty lightly loaded hosts and switch them off, and
    /// switch hosts on when load grows (`shoal host power` sets the commands). VMs move by live
    /// migration (`auto` mode: paused while their memory is copied under TCG).
    #[arg(long)]
    pub consolidate: bool,
    /// Record every VM's CPU use, one percentage per sample, into this directory as a
    /// PlanetLab-format trace that `shoal sim --trace DIR --format planetlab` replays.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Hours a finished operation is kept (`operation list`, `operation show`).
    #[arg(long, default_value_t = 168.0)]
    pub operation_retention: f64,
    /// Most finished operations kept; the newest stay.
    #[arg(long, default_value_t = 1000)]
    pub operations_kept: usize,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Address of the API. Anything but loopback requires tokens.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub controller: ControllerOpts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Driver {
    /// Simulated VMs (no QEMU): for scale tests, demos and the simulator.
    Sim,
    /// Real QEMU virtual machines.
    Qemu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    /// KVM when a probe VM really runs under it, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Args, Debug, Clone)]
pub struct HostOpts {
    /// vCPUs the host offers to VMs [default: the machine's]
    #[arg(long)]
    pub host_cpus: Option<u32>,
    /// Memory the host offers to VMs, in MiB [default: the machine's]
    #[arg(long)]
    pub host_memory: Option<u64>,
    /// Hypervisor driver.
    #[arg(long, value_enum, default_value_t = Driver::Sim)]
    pub driver: Driver,
    /// Simulated driver: milliseconds a VM takes to boot.
    #[arg(long, default_value_t = 0)]
    pub sim_boot_ms: u64,
    /// Simulated driver: the share of its vCPUs every VM uses.
    #[arg(long, default_value_t = 0.1)]
    pub sim_load: f64,
    /// Simulated driver: CPU traces the VMs follow instead (a PlanetLab-format directory, one
    /// percentage per line); a VM follows the file its name hashes to.
    #[arg(long)]
    pub sim_trace: Option<PathBuf>,
    /// Simulated driver: seconds one trace sample lasts.
    #[arg(long, default_value_t = 300.0)]
    pub sim_trace_step: f64,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat: f64,
    /// QEMU driver: accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// QEMU driver: the emulator binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// QEMU driver: seconds a guest gets to power off after the ACPI button.
    #[arg(long, default_value_t = 30.0)]
    pub stop_timeout: f64,
    /// QEMU driver: seconds a guest gets to print its template's ready pattern.
    #[arg(long, default_value_t = 300.0)]
    pub ready_timeout: f64,
    /// A label for placement rules, `KEY=VALUE` (e.g. `zone=a`, `rack=r12`); repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// vCPUs placement may hand out per vCPU the host offers.
    #[arg(long, default_value_t = 1.0)]
    pub cpu_overcommit: f64,
    /// Memory placement may hand out per MiB the host offers.
    #[arg(long, default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// vCPUs kept for the host itself, never given to VMs.
    #[arg(long, default_value_t = 0)]
    pub reserve_cpus: u32,
    /// Memory kept for the host itself, in MiB.
    #[arg(long, default_value_t = 0)]
    pub reserve_memory: u64,
}

/// A `--size` of a cluster. Negative numbers reach this parser (clap would otherwise take `-1`
/// for a flag and suggest `-- -1`) so that the error names the value and the rule.
fn cluster_size(s: &str) -> Result<u32, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid cluster size {s:?}: expected a whole number of VMs"))?;
    shoal_model::check_cluster_size(n).map_err(|e| e.to_string())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))?;
    let ok =
        |x: &str| !x.is_empty() && x.len() <= 63 && x.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok(k) || !ok(v) {
        return Err(format!(
            "label {s:?}: key and value must be 1-63 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This host's name.
    #[arg(long)]
    pub name: String,
    /// Controller URL.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    pub controller: String,
    /// Address of the agent's command API. Anything but loopback requires the controller's token.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// URL the controller should use to reach this agent [default: from --listen]
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where the agent keeps its credential and VMs.
    #[arg(long, default_value = "/var/lib/shoal-agent")]
    pub data_dir: PathBuf,
    /// One-time join token (needed once, when the controller is not on loopback).
    #[arg(long, env = "SHOAL_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// Network driver for virtual networks.
    #[arg(long, value_enum, default_value_t = NetDriverArg::None)]
    pub net: NetDriverArg,
    /// The address other hosts reach this host's VXLAN endpoint on (one of its own addresses);
    /// needed by --net bridge.
    #[arg(long)]
    pub underlay_ip: Option<std::net::Ipv4Addr>,
    #[command(flatten)]
    pub host: HostOpts,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// How many local host agents to run.
    #[arg(long, default_value_t = 3)]
    pub hosts: u32,
    /// Spread the hosts over this many zones (label `zone=z1`, `z2`, …, round robin).
    #[arg(long, default_value_t = 0)]
    pub zones: u32,
    /// Address of the controller's API.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub controller: ControllerOpts,
    #[command(flatten)]
    pub host: HostOpts,
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// List hosts with their capacity and usage.
    List,
    /// Create a one-time token with which a new agent joins.
    JoinToken,
    /// Plan moves that even out the hosts' load (Ganeti hbal's score), and execute them as live
    /// migrations, in waves.
    Rebalance {
        /// Only print the plan (the default).
        #[arg(long, conflicts_with = "apply")]
        plan: bool,
        /// Execute the plan.
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        options: RebalanceArgs,
    },
    /// Mark a host draining (nothing new lands on it) and live-migrate every VM off it.
    Drain {
        name: String,
        /// Only print the plan; change nothing.
        #[arg(long)]
        plan: bool,
        #[command(flatten)]
        options: RebalanceArgs,
    },
    /// Put a drained host back in service.
    Undrain { name: String },
    /// Keep the host's VMs but place nothing new on it; `--off` ends it.
    Maintenance {
        name: String,
        #[arg(long)]
        off: bool,
    },
    /// Show a host's power model, commands and state; with flags, set them.
    Power {
        name: String,
        /// Watts from idle to full load at even steps: `120,300`, or eleven SPECpower points.
        #[arg(long)]
        model: Option<shoal_model::power::PowerModel>,
        /// Command that switches the host on (run by the controller with `sh -c`,
        /// `$SHOAL_HOST` set), e.g. `ipmitool -H bmc-$SHOAL_HOST chassis power on`.
        #[arg(long)]
        on_command: Option<String>,
        /// Command that switches the host off.
        #[arg(long)]
        off_command: Option<String>,
    },
    /// Switch a host on with its power command.
    PowerOn { name: String },
    /// Switch a host that holds no VMs off with its power command.
    PowerOff { name: String },
    /// Each host's power draw and the energy it has used.
    Energy,
    /// What the consolidator would do now (switch hosts on, live-migrate VMs, switch hosts off).
    Consolidate {
        /// Do it.
        #[arg(long)]
        apply: bool,
    },
}

/// How a rebalance trades balance against migrations.
#[derive(Args, Debug, Clone)]
pub struct RebalanceArgs {
    /// Balance memory and vCPUs only, not the VM count (hbal's --ignore-dynu).
    #[arg(long)]
    pub ignore_dynu: bool,
    /// Stop after this many migrations (hbal's -l).
    #[arg(long)]
    pub max_moves: Option<usize>,
    /// Migrations running at once.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
    /// A migration must lower the score by more than this.
    #[arg(long, default_value_t = 1e-9)]
    pub min_gain: f64,
    /// Score (times the number of hosts) a second of migration must buy back.
    #[arg(long, default_value_t = 0.01)]
    pub cost_per_second: f64,
    /// Migration bandwidth in MiB/s for hosts that do not state theirs.
    #[arg(long, default_value_t = 1250.0)]
    pub bandwidth: f64,
}

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Write the live hosts and VMs to FILE as JSON (format: docs/snapshot.md).
    Snapshot { file: PathBuf },
    /// Where a new virtual cluster would go, and why.
    Place(PlaceArgs),
    /// Migrations that would even out the hosts' load (a plan only: nothing moves).
    Rebalance {
        /// Plan on this snapshot file instead of the live state.
        #[arg(long)]
        snapshot: Option<PathBuf>,
        #[command(flatten)]
        options: RebalanceArgs,
    },
    /// Migrations that would empty a host (a plan only: nothing moves).
    Drain {
        host: String,
        #[arg(long)]
        snapshot: Option<PathBuf>,
        #[command(flatten)]
        options: RebalanceArgs,
    },
}

#[derive(Args, Debug)]
pub struct PlaceArgs {
    /// Plan on this snapshot file instead of the live state.
    #[arg(long)]
    pub snapshot: Option<PathBuf>,
    /// Name of the virtual cluster (its VMs already in the snapshot count for affinity).
    #[arg(long, default_value = "new")]
    pub cluster: String,
    /// Number of VMs (a cluster has 1 to 65000).
    #[arg(long, allow_negative_numbers = true, value_parser = cluster_size)]
    pub size: u32,
    #[arg(long)]
    pub cpus: u32,
    /// Memory per VM, e.g. 512MiB or 2GiB.
    #[arg(long)]
    pub memory: String,
    /// Local disk per VM, e.g. 20GiB.
    #[arg(long)]
    pub disk: Option<String>,
    /// Template, for image locality.
    #[arg(long)]
    pub template: Option<String>,
    #[arg(long, value_enum, default_value_t = PlacementArg::Spread)]
    pub placement: PlacementArg,
    /// Hard anti-affinity: at most one VM per DOMAIN (`host`, or a host label such as `zone`).
    #[arg(long, value_name = "DOMAIN")]
    pub anti_affinity: Option<String>,
    /// Hard affinity: every VM in one DOMAIN.
    #[arg(long, value_name = "DOMAIN")]
    pub affinity: Option<String>,
    /// Prefer DOMAINs holding fewer VMs of the cluster.
    #[arg(long, value_name = "DOMAIN")]
    pub soft_anti_affinity: Option<String>,
    /// Prefer DOMAINs already holding VMs of the cluster.
    #[arg(long, value_name = "DOMAIN")]
    pub soft_affinity: Option<String>,
    /// Only hosts with this label (repeatable).
    #[arg(long = "require", value_name = "KEY=VALUE")]
    pub require: Vec<String>,
    /// Only these hosts (repeatable).
    #[arg(long = "host")]
    pub only_hosts: Vec<String>,
    /// Never these hosts (repeatable).
    #[arg(long = "avoid")]
    pub avoid_hosts: Vec<String>,
    /// Powered-off hosts may be switched on.
    #[arg(long)]
    pub allow_power_on: bool,
    /// Print every host's verdict: the filter that rejected it, or its score breakdown.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Upload a disk image (raw or qcow2) as a template.
    Import {
        name: String,
        file: PathBuf,
        /// Boot this kernel directly instead of from the disk.
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// How VMs count as ready: `report` (the guest reports through Shoal's seed, as
        /// cloud-init images do), `running` (a running QEMU is enough).
        #[arg(long, value_enum, default_value_t = ReadyArg::Report, conflicts_with = "ready_pattern")]
        ready: ReadyArg,
        /// Instead of --ready: console text the guest prints when configured.
        #[arg(long)]
        ready_pattern: Option<String>,
        /// Take FILE as this format instead of recognising it (`raw` imports any file).
        #[arg(long, value_enum)]
        format: Option<ImageFormatArg>,
    },
    /// Write a template's disk to FILE (bit-identical to what was imported, as raw).
    Export {
        name: String,
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = ImageFormatArg::Raw)]
        format: ImageFormatArg,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Build the demo template (host kernel, a busybox root, a NoCloud-reading init) and upload it.
    BuildDemo {
        name: String,
    },
    /// Build a Debian cloud template (debootstrap, cloud-init, systemd-networkd) and upload it. Needs
    /// root; takes minutes the first time, then comes from the cache (/var/cache/shoal/templates).
    BuildDebian {
        name: String,
        /// Debian release: bookworm or trixie.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Extra packages, comma-separated (e.g. --packages curl,vim).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// Debian mirror [default: the one in this machine's apt sources, else http://deb.debian.org/debian]
        #[arg(long)]
        mirror: Option<String>,
        /// Debian security mirror, or `none` [default: from this machine's apt sources, else
        /// http://deb.debian.org/debian-security]
        #[arg(long)]
        security_mirror: Option<String>,
        /// Keep builds here [default: /var/cache/shoal/templates]
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Build even if the cache has this recipe's build.
        #[arg(long)]
        rebuild: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Delete a template no profile or cluster uses.
    Delete {
        name: String,
    },
    /// Make a VM's disk, as it is now, a new template that boots like the VM's own.
    Publish {
        vm: String,
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create a network that clusters join with --network NAME.
    Create {
        name: String,
        /// IPv4 CIDR [default: the next free one from the controller's pool]
        #[arg(long)]
        subnet: Option<String>,
        /// VXLAN network identifier, 1..16777215 [default: the lowest free from 10000]
        #[arg(long)]
        vni: Option<u32>,
        /// Outbound access: one of the network's hosts routes and masquerades its traffic
        /// (needs a host with the bridge driver).
        #[arg(long)]
        nat: bool,
        /// DNS servers for the guests, comma-separated (at most 3).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
    },
    List,
    Show {
        name: String,
    },
    /// Change a network's settings.
    Set {
        name: String,
        /// Switch outbound access (NAT) on or off.
        #[arg(long)]
        nat: Option<bool>,
        /// Replace the guests' DNS servers (comma-separated; `none` for none). VMs created
        /// from then on get them.
        #[arg(long, value_delimiter = ',')]
        dns: Option<Vec<String>>,
    },
    /// Delete a network no cluster is on.
    Delete {
        name: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetDriverArg {
    /// No virtual networks: QEMU user-mode networking for every VM.
    None,
    /// A Linux bridge and a VXLAN device per network, made over netlink (needs CAP_NET_ADMIN).
    Bridge,
    /// No privileges needed: QEMU's UDP socket netdev to a switch in the agent, which carries
    /// frames to the other hosts over UDP (port 4790 on the underlay address).
    Udp,
}

// `Create` is much larger than the rest; a command is parsed once per run.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum ProfileCmd {
    Create {
        name: String,
        #[arg(long)]
        template: Option<String>,
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory, e.g. 512MiB or 2GiB.
        #[arg(long)]
        memory: Option<String>,
        /// Disk size, e.g. 10GiB [default: the template's]
        #[arg(long)]
        disk: Option<String>,
        /// Profile to inherit unset fields from.
        #[arg(long)]
        parent: Option<String>,
        /// Network to join [default: the cluster's own]
        #[arg(long)]
        network: Option<String>,
        #[command(flatten)]
        guest: GuestArgs,
        #[command(flatten)]
        ha: HaArgs,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

/// How the VMs of a profile or cluster survive their host's failure.
#[derive(Args, Debug, Clone, Default)]
pub struct HaArgs {
    /// Time between checkpoints of each VM's disk into the image store (`60s`, `5m`, `off`);
    /// a VM of a failed host restarts from its latest [default: off]. On a cluster, in place
    /// of the profile's.
    #[arg(long, value_name = "INTERVAL")]
    pub checkpoint_interval: Option<String>,
    /// Checkpoints kept per VM [default: 3].
    #[arg(long, value_name = "N")]
    pub keep: Option<u32>,
    /// When capacity is short after a host failure, higher priorities restart first [default: 0].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub ha_priority: Option<i32>,
}

/// What an operator gives the guests of a profile or cluster.
#[derive(Args, Debug, Clone, Default)]
pub struct GuestArgs {
    /// An SSH public key, or a file of them (one per line), for the login user; repeatable.
    /// On a cluster, added to the profile's.
    #[arg(long = "ssh-key", value_name = "FILE|KEY")]
    pub ssh_keys: Vec<String>,
    /// Login user to add to the guest, with the keys and sudo [default: the image's default user].
    #[arg(long)]
    pub user: Option<String>,
    /// File with cloud-init user data (#cloud-config, a #! script, MIME multipart), combined
    /// with Shoal's own settings. On a cluster, in place of the profile's.
    #[arg(long)]
    pub user_data: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReadyArg {
    Report,
    Running,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PlacementArg {
    Spread,
    Pack,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AntiAffinityArg {
    None,
    /// At most one VM per host.
    Host,
    /// At most one VM per zone (hosts' `zone` label).
    Zone,
    /// At most one VM per rack (hosts' `rack` label).
    Rack,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Deploy a virtual cluster of SIZE VMs from a profile.
    Create {
        name: String,
        #[arg(long)]
        profile: String,
        /// Number of VMs (a cluster has 1 to 65000).
        #[arg(long, allow_negative_numbers = true, value_parser = cluster_size)]
        size: u32,
        #[arg(long, value_enum, default_value_t = PlacementArg::Spread)]
        placement: PlacementArg,
        #[arg(long, value_enum, default_value_t = AntiAffinityArg::None)]
        anti_affinity: AntiAffinityArg,
        /// Network to join [default: the profile's, else one of the cluster's own]
        #[arg(long)]
        network: Option<String>,
        /// Give the cluster's own network outbound access (see `network create --nat`).
        #[arg(long)]
        nat: bool,
        /// Wait until every VM runs, showing progress.
        #[arg(long)]
        wait: bool,
        /// Only show where the VMs would go; create nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: every host's verdict (the filter that rejected it, or its score).
        #[arg(long, requires = "dry_run")]
        explain: bool,
        #[command(flatten)]
        guest: GuestArgs,
        #[command(flatten)]
        ha: HaArgs,
    },
    List,
    Show {
        name: String,
    },
    /// The cluster's block profile: each VM's latest disk checkpoint, blocks shared with the
    /// template and created by the VM, and their sum.
    Blocks {
        name: String,
    },
    /// Grow or shrink a virtual cluster.
    Scale {
        name: String,
        /// The new number of VMs (a cluster has 1 to 65000; delete it to have none).
        #[arg(long, allow_negative_numbers = true, value_parser = cluster_size)]
        size: u32,
        #[arg(long)]
        wait: bool,
    },
    Delete {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Move every VM of a virtual cluster off the hosts it is on, to hosts placement chooses
    /// with the cluster's rules, in waves.
    Migrate {
        name: String,
        #[command(flatten)]
        how: MigrationArgs,
        /// Migrations that may run at once (a host takes part in at most two).
        #[arg(long, default_value_t = 4)]
        max_concurrent: usize,
    },
    /// Stop every VM of the cluster.
    Stop(PowerArgs),
    /// Start every VM of the cluster.
    Start(PowerArgs),
    /// Suspend the whole cluster: memory saved, hosts' resources freed.
    Suspend(PowerArgs),
    /// Resume a suspended cluster.
    Resume(PowerArgs),
}

#[derive(Args, Debug)]
pub struct PowerArgs {
    pub name: String,
    /// Return at once instead of waiting for the operation.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    List {
        #[arg(long)]
        cluster: Option<String>,
    },
    Show {
        name: String,
    },
    /// Checkpoint the VM's disk into the image store now (only the blocks written since its
    /// last checkpoint are read; the guest keeps running).
    Checkpoint {
        name: String,
    },
    /// The VM's block profile: per checkpoint, blocks shared with its template, created by the
    /// VM, and new since the checkpoint before.
    Blocks {
        name: String,
    },
    /// Stop: ACPI power button, forced after the host's timeout.
    Stop {
        #[command(flatten)]
        vm: PowerArgs,
        /// Pull the plug at once.
        #[arg(long)]
        force: bool,
    },
    Start(PowerArgs),
    /// Save the VM's memory on its host and free its resources.
    Suspend(PowerArgs),
    Resume(PowerArgs),
    /// Print the serial console.
    Console {
        name: String,
        /// Keep printing new output until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Record the VM's disk, as it is now, in the image store (shares unchanged chunks with its template).
    Snapshot {
        name: String,
    },
    /// Move a running VM to another host, shared-nothing: its own disk blocks over NBD, then its
    /// memory. Without --to, placement picks the host (the same rules as deployment).
    Migrate {
        name: String,
        /// The destination host.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        how: MigrationArgs,
        /// Only show where it would go.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: every host's verdict (the filter that rejected it, or its score).
        #[arg(long, requires = "dry_run")]
        explain: bool,
    },
}

/// How a migration runs.
#[derive(clap::Args, Debug)]
pub struct MigrationArgs {
    /// `live` (pre-copy while the guest runs), `pause` (the guest pauses while its memory is
    /// copied) or `auto` (`live` on KVM; `pause` under TCG, whose dirty-page tracking is not
    /// reliable in QEMU 7.2).
    #[arg(long, default_value = "auto")]
    pub mode: shoal_model::agent::MigrationMode,
    /// Longest pause allowed at the end of a live migration, ms.
    #[arg(long, value_name = "MS")]
    pub max_downtime: Option<u64>,
    /// Cap on the migration's bandwidth, MiB/s.
    #[arg(long, value_name = "MIB_S")]
    pub bandwidth: Option<u64>,
    /// Wait until the migration is done, showing its progress.
    #[arg(long)]
    pub wait: bool,
}

impl MigrationArgs {
    pub fn params(&self) -> shoal_model::agent::MigrationParams {
        shoal_model::agent::MigrationParams {
            mode: self.mode,
            max_downtime_ms: self.max_downtime,
            bandwidth_mib: self.bandwidth,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum OperationCmd {
    List,
    Show { id: String },
}
