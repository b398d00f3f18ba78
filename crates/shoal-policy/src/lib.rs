//! Shoal's policy core. Every function here is pure: a snapshot of the cluster goes in, a plan
//! comes out; the controller and the simulator execute plans. No I/O, no clocks, no randomness
//! beyond what the caller passes in.
//!
//! - [`snapshot`]: hosts, VMs and image locality, the input of every policy;
//! - [`filter`], [`score`], [`place`]: gang placement, filter → score → pick;
//! - [`explain`]: every host's verdict for a request;
//! - [`hbal`]: Ganeti hbal's cluster imbalance score, reproduced exactly;
//! - [`rebalance`]: plans of live migrations that lower it, and drains;
//! - [`consolidate`]: green consolidation (migrations and host power) from measured demand.

pub mod consolidate;
pub mod explain;
pub mod filter;
pub mod hbal;
pub mod place;
pub mod rebalance;
pub mod score;
pub mod snapshot;

pub use explain::{Explanation, HostVerdict};
pub use filter::{GangRequest, Reject, Rules, Weights};
pub use place::{place_gang, Assignment, PlacementError, Placer};
pub use score::ScoreBreakdown;
pub use snapshot::{Host, HostState, Snapshot, SnapshotError, Vm};
