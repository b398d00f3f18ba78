//! Shoal's vocabulary: the objects an operator manipulates (hosts, templates, profiles, virtual
//! clusters, VMs, operations), how they are named and sized, and the JSON exchanged between the
//! CLI, the controller and the host agents. No I/O lives here.

pub mod agent;
pub mod api;
pub mod disk;
pub mod guest;
pub mod ha;
pub mod migration;
pub mod name;
pub mod net;
pub mod network;
pub mod objects;
pub mod power;
pub mod size;
pub mod text;

pub use disk::{DiskFormat, DiskFormatError, TemplateDisk, TemplateDiskError};
pub use guest::{GuestError, Readiness};
pub use ha::{Checkpoint, CheckpointChain, Fencing, HaSettings, HostFailure};
pub use migration::{MigrateCluster, MigrateVm, Migration, MigrationStep};
pub use name::{validate_name, NameError};
pub use net::{Ipv4Subnet, MacAddr, NetError};
pub use network::{Network, VmNetwork};
pub use objects::*;
pub use size::{format_mib, parse_size_mib, SizeError};
pub use text::plural;
