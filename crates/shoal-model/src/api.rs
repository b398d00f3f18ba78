//! Request and error bodies of the controller's REST API.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::objects::{AntiAffinity, Placement, Profile, VmShape};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateProfile {
    pub name: String,
    pub parent: Option<String>,
    pub template: Option<String>,
    pub cpus: Option<u32>,
    /// Memory as a size string (`512MiB`, `2GiB`).
    pub memory: Option<String>,
    /// Disk as a size string.
    pub disk: Option<String>,
    pub network: Option<String>,
    pub user_data: Option<String>,
    /// Login user Shoal adds to the guest, with the SSH keys and sudo.
    #[serde(default)]
    pub user: Option<String>,
    /// SSH public keys (one `authorized_keys` line each).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Time between disk checkpoints (`60s`, `5m`, `off`).
    #[serde(default)]
    pub checkpoint_interval: Option<String>,
    /// Checkpoints kept per VM.
    #[serde(default)]
    pub keep_checkpoints: Option<u32>,
    /// Restart order after a host failure when capacity is short (higher first).
    #[serde(default)]
    pub ha_priority: Option<i32>,
}

/// A profile and what it resolves to after inheritance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProfileView {
    #[serde(flatten)]
    pub profile: Profile,
    pub effective: VmShape,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateCluster {
    pub name: String,
    pub profile: String,
    pub size: u32,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub anti_affinity: AntiAffinity,
    /// Network to join; default: the profile's, else a network of the cluster's own.
    #[serde(default)]
    pub network: Option<String>,
    /// The cluster's own network gets outbound access (NAT); for a joined network this is the
    /// network's own setting (`shoal network create --nat`, `network set --nat`).
    #[serde(default)]
    pub nat: bool,
    /// cloud-init user data for the cluster's VMs, in place of the profile's.
    #[serde(default)]
    pub user_data: Option<String>,
    /// Login user, in place of the profile's.
    #[serde(default)]
    pub user: Option<String>,
    /// SSH public keys, added to the profile's.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Time between disk checkpoints (`60s`, `5m`, `off`), in place of the profile's.
    #[serde(default)]
    pub checkpoint_interval: Option<String>,
    /// Checkpoints kept per VM, in place of the profile's.
    #[serde(default)]
    pub keep_checkpoints: Option<u32>,
    /// Restart order after a host failure, in place of the profile's.
    #[serde(default)]
    pub ha_priority: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScaleCluster {
    pub size: u32,
}

/// A cluster with the counts of its VMs by state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    #[serde(flatten)]
    pub cluster: crate::objects::Cluster,
    pub vms_running: u32,
    pub vms_total: u32,
}

/// Every error the API returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `not_found`, `conflict`, `invalid`, `in_use`,
    /// `insufficient_capacity`, `unauthorized`, `unavailable`, `internal`.
    pub code: String,
    /// What was wrong, naming the offending value.
    pub message: String,
}

/// Chunk ids (hex), for asking which are missing or fetching them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChunkList {
    pub chunks: Vec<String>,
}

/// What an upload of a chunk batch stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChunkUpload {
    pub received: u64,
    pub new: u64,
}

/// A stored manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ManifestRef {
    pub manifest: String,
}

/// Totals of an image store (`shoal image stats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageStats {
    /// Sum of the logical sizes of every stored image.
    pub logical_bytes: u64,
    /// Bytes the store occupies on disk (packs, indexes, manifests).
    pub stored_bytes: u64,
    pub chunks: u64,
    /// Compressed bytes of the chunks.
    pub chunk_bytes: u64,
    pub manifests: u64,
    pub refs: u64,
}

/// What `shoal image gc` removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageGc {
    pub manifests_removed: u64,
    pub chunks_removed: u64,
    pub bytes_freed: u64,
}

/// What `shoal image verify` found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageVerify {
    pub chunks_checked: u64,
    /// Chunks whose content did not match their id; moved to quarantine.
    pub corrupt: Vec<String>,
    /// Chunks images need that the store lacks.
    pub missing: Vec<String>,
    /// Images (refs such as `template/NAME`) damaged by the above.
    pub damaged: Vec<String>,
}

/// A VM disk recorded in the image store.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSnapshot {
    pub vm: String,
    /// The name the image store keeps it under (`vm/NAME/UNIX_MS`).
    pub image: String,
    /// Manifest id (hex).
    pub manifest: String,
    pub logical_bytes: u64,
    /// Bytes of the disk that are not zeros.
    pub data_bytes: u64,
    /// Of those, bytes held by chunks the VM's template has too.
    pub shared_with_template_bytes: u64,
    pub chunks: u64,
    /// Chunks that were new to the controller's store, and their compressed bytes.
    pub chunks_sent: u64,
    pub bytes_sent: u64,
}

/// Turn a VM's disk into a new template (`shoal template publish VM NAME`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PublishTemplate {
    pub vm: String,
    pub name: String,
}
