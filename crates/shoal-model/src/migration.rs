//! A VM moving from one host to another: the request, and the record the controller keeps while
//! it moves (`/v1/migrations`), from which a restarted controller finishes or undoes it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agent::{IncomingVm, MigrationParams, MigrationProgress};

/// `POST /v1/vms/{name}/migrate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrateVm {
    /// The destination host; without it, placement picks one (the source excluded).
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default, flatten)]
    pub params: MigrationParams,
}

/// `POST /v1/clusters/{name}/migrate`: every VM of the cluster leaves the hosts it is on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrateCluster {
    #[serde(default, flatten)]
    pub params: MigrationParams,
    /// Migrations that may run at once (a host takes part in at most two).
    #[serde(default)]
    pub max_concurrent: Option<usize>,
}

/// Where a migration is, as the controller records it before each step that cannot be taken
/// back, so that a controller that restarts knows what is safe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStep {
    /// The destination is preparing the incoming VM; the source runs untouched.
    Prepare,
    /// The source sends disk and memory; its guest runs (live) or is paused (pause). The
    /// destination's guest never ran.
    Copy,
    /// Everything arrived: the destination is told to run the guest. From here on only the
    /// destination's own answer decides: running → the move is committed; not running → undone.
    Switch,
    /// Undoing: the destination's copy is removed, then the source's migration cancelled (its
    /// guest runs on); `reason` says why. `switched`: the destination was told to run the guest,
    /// so only its own word that the copy is gone lets the source resume.
    RollBack {
        reason: String,
        #[serde(default)]
        switched: bool,
    },
}

impl MigrationStep {
    pub fn as_str(&self) -> &'static str {
        match self {
            MigrationStep::Prepare => "prepare",
            MigrationStep::Copy => "copy",
            MigrationStep::Switch => "switch",
            MigrationStep::RollBack { .. } => "roll_back",
        }
    }
}

/// A migration under way (`/migrations/<vm>` in the store); gone once it is committed or undone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    pub vm: String,
    pub uuid: Uuid,
    pub from: String,
    pub to: String,
    /// With the mode resolved (`live` or `pause`).
    pub params: MigrationParams,
    pub step: MigrationStep,
    /// What the destination prepared, once it has.
    #[serde(default)]
    pub incoming: Option<IncomingVm>,
    /// The source's last report.
    #[serde(default)]
    pub progress: Option<MigrationProgress>,
    /// The operation that shows it.
    pub operation: Uuid,
    pub started_unix_ms: u64,
}
