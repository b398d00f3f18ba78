//! Surviving host failures: how often a VM's disk is checkpointed into the image store and how
//! many checkpoints it keeps (its block profile), the order VMs restart in when capacity is
//! short, and what the controller records about a failed host.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use utoipa::ToSchema;

/// Checkpoints kept per VM unless told otherwise.
pub const DEFAULT_KEEP: u32 = 3;
/// The shortest checkpoint interval: a checkpoint reads the blocks written since the last one,
/// and more often than this costs more than the few seconds of writes it could save.
pub const MIN_CHECKPOINT_INTERVAL_S: u64 = 5;
/// The most checkpoints a VM may keep.
pub const MAX_KEEP: u32 = 100;

/// A VM's high-availability settings, resolved from its profile chain and its cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HaSettings {
    /// Seconds between scheduled disk checkpoints; `None`: none scheduled (`vm checkpoint`
    /// still takes one), so a VM of a failed host restarts from its last one, or its template.
    #[serde(default)]
    pub checkpoint_interval_s: Option<u64>,
    /// Checkpoints kept per VM; older ones are dropped and their chunks left to `image gc`.
    #[serde(default = "default_keep")]
    pub keep: u32,
    /// When capacity is short after a host failure, higher priorities restart first.
    #[serde(default)]
    pub priority: i32,
}

fn default_keep() -> u32 {
    DEFAULT_KEEP
}

impl Default for HaSettings {
    fn default() -> Self {
        HaSettings {
            checkpoint_interval_s: None,
            keep: DEFAULT_KEEP,
            priority: 0,
        }
    }
}

/// An interval or a keep count an operator wrote that Shoal cannot use.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HaError {
    #[error("invalid checkpoint interval {input:?}: {reason}")]
    Interval { input: String, reason: String },
    #[error("invalid checkpoint count {keep}: keep 1 to {MAX_KEEP}")]
    Keep { keep: u32 },
}

/// Parses a checkpoint interval: `off`, or a number with `s`, `m` or `h` (a bare number is
/// seconds), at least [`MIN_CHECKPOINT_INTERVAL_S`].
pub fn parse_interval(input: &str) -> Result<Option<u64>, HaError> {
    let err = |reason: String| HaError::Interval {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if s == "off" {
        return Ok(None);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| err("expected `off` or a number of seconds, e.g. 60s, 5m, 1h".into()))?;
    let per: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        other => return Err(err(format!("unknown unit {other:?} (use s, m or h)"))),
    };
    let secs = n.checked_mul(per).ok_or_else(|| err("too long".into()))?;
    if secs < MIN_CHECKPOINT_INTERVAL_S {
        return Err(err(format!("the shortest is {MIN_CHECKPOINT_INTERVAL_S}s")));
    }
    Ok(Some(secs))
}

/// A keep count, or why it is none.
pub fn check_keep(keep: u32) -> Result<u32, HaError> {
    if (1..=MAX_KEEP).contains(&keep) {
        Ok(keep)
    } else {
        Err(HaError::Keep { keep })
    }
}

/// An interval as `parse_interval` reads it back.
pub fn format_interval(secs: Option<u64>) -> String {
    match secs {
        None => "off".into(),
        Some(s) if s % 3600 == 0 => format!("{}h", s / 3600),
        Some(s) if s % 60 == 0 => format!("{}m", s / 60),
        Some(s) => format!("{s}s"),
    }
}

/// One disk checkpoint of a VM, as the controller keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    /// 1 for the VM's first checkpoint, then counting up.
    pub seq: u64,
    /// Manifest id (hex) of the whole disk as of the checkpoint.
    pub manifest: String,
    /// The manifest it was laid over (the previous checkpoint, or the VM's base image).
    pub parent: String,
    pub incremental: bool,
    /// The host the VM ran on.
    pub host: String,
    pub taken_unix_ms: u64,
    pub disk_bytes: u64,
    pub changed_bytes: u64,
    pub read_bytes: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
    /// Where the checkpoint's chunks are held: `controller`, and the hosts whose chunk cache
    /// holds them all.
    pub replicas: Vec<String>,
}

/// Places a checkpoint must be held in before it is safe to restart from.
pub const SAFE_REPLICAS: usize = 2;

impl Checkpoint {
    /// Held in two places: a restart may rely on it.
    pub fn safe(&self) -> bool {
        self.replicas.len() >= SAFE_REPLICAS
    }
}

/// A VM's checkpoints, oldest first (at most its `keep`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointChain {
    pub vm: String,
    pub uuid: uuid::Uuid,
    /// The last sequence number given (the newest checkpoint's, or one dropped before it).
    pub last_seq: u64,
    pub checkpoints: Vec<Checkpoint>,
}

impl CheckpointChain {
    /// The newest checkpoint that is held in two places.
    pub fn latest_safe(&self) -> Option<&Checkpoint> {
        self.checkpoints.iter().rev().find(|c| c.safe())
    }
}

/// One checkpoint's blocks: shared with the template, created by the VM, and new since the
/// checkpoint before it (`vm blocks`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BlockCounts {
    pub size: u64,
    pub zero_bytes: u64,
    pub template_chunks: u64,
    pub template_bytes: u64,
    pub own_chunks: u64,
    pub own_bytes: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
}

impl std::ops::AddAssign<&BlockCounts> for BlockCounts {
    fn add_assign(&mut self, o: &BlockCounts) {
        self.size += o.size;
        self.zero_bytes += o.zero_bytes;
        self.template_chunks += o.template_chunks;
        self.template_bytes += o.template_bytes;
        self.own_chunks += o.own_chunks;
        self.own_bytes += o.own_bytes;
        self.new_chunks += o.new_chunks;
        self.new_bytes += o.new_bytes;
    }
}

/// A checkpoint with its block counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointBlocks {
    #[serde(flatten)]
    pub checkpoint: Checkpoint,
    pub safe: bool,
    pub blocks: BlockCounts,
}

/// A VM's block profile: its checkpoints, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmBlocks {
    pub vm: String,
    pub template: String,
    pub checkpoint_interval_s: Option<u64>,
    pub keep: u32,
    pub checkpoints: Vec<CheckpointBlocks>,
}

/// A cluster's block profile: each VM's latest checkpoint, and their sum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterBlocks {
    pub cluster: String,
    pub vms: Vec<ClusterVmBlocks>,
    pub total: BlockCounts,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterVmBlocks {
    pub vm: String,
    /// The VM's latest checkpoint; `None`: it has none.
    pub latest: Option<CheckpointBlocks>,
    pub checkpoints: u32,
}

/// How a failed host was fenced, so that none of its VMs can still run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fencing {
    /// Its power-off command succeeded.
    PowerOff,
    /// Its agent's lease certainly expired, and the agent stops its VMs when its lease expires
    /// (self-fencing).
    Lease,
}

/// What the controller records about a host it declared failed (`/failures/<host>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostFailure {
    pub host: String,
    pub detected_unix_ms: u64,
    /// The last moment the host was known alive (its heartbeat or a peer reaching it).
    pub last_seen_unix_ms: u64,
    /// Set once fencing is confirmed; restarts begin only then.
    #[serde(default)]
    pub fenced: Option<Fencing>,
    #[serde(default)]
    pub fenced_unix_ms: Option<u64>,
    /// Every peer it counts on was heard and none reached it: its own watchdog stops its VMs
    /// once its lease runs out, so waiting the lease out fences it.
    #[serde(default)]
    pub lease_safe: bool,
    /// Its power-off command was run and failed.
    #[serde(default)]
    pub power_off_failed: bool,
    /// Why it is not fenced yet (a failing power-off command, a lease still running).
    #[serde(default)]
    pub waiting: Option<String>,
    /// The evacuation operation that restarts its VMs elsewhere.
    #[serde(default)]
    pub operation: Option<uuid::Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_with_units_and_off_and_refuse_the_rest_naming_the_input() {
        assert_eq!(parse_interval("off"), Ok(None));
        assert_eq!(parse_interval("60"), Ok(Some(60)));
        assert_eq!(parse_interval("60s"), Ok(Some(60)));
        assert_eq!(parse_interval("5m"), Ok(Some(300)));
        assert_eq!(parse_interval("1h"), Ok(Some(3600)));
        for bad in ["", "1s", "4", "5x", "-5s", "m", "99999999999999999999h"] {
            let e = parse_interval(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        for s in [Some(5), Some(60), Some(90), Some(3600), None] {
            assert_eq!(parse_interval(&format_interval(s)), Ok(s));
        }
        assert_eq!(check_keep(0), Err(HaError::Keep { keep: 0 }));
        assert_eq!(check_keep(101), Err(HaError::Keep { keep: 101 }));
        assert_eq!(check_keep(3), Ok(3));
    }

    #[test]
    fn the_latest_safe_checkpoint_is_the_newest_held_in_two_places() {
        let cp = |seq: u64, replicas: &[&str]| Checkpoint {
            seq,
            manifest: format!("m{seq}"),
            parent: String::new(),
            incremental: seq > 1,
            host: "h".into(),
            taken_unix_ms: seq,
            disk_bytes: 0,
            changed_bytes: 0,
            read_bytes: 0,
            bytes_sent: 0,
            seconds: 0.0,
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
        };
        let mut chain = CheckpointChain {
            checkpoints: vec![
                cp(1, &["controller", "h2"]),
                cp(2, &["controller", "h3"]),
                cp(3, &["controller"]),
            ],
            ..Default::default()
        };
        assert_eq!(chain.latest_safe().map(|c| c.seq), Some(2));
        chain.checkpoints.truncate(0);
        assert!(chain.latest_safe().is_none());
    }
}
