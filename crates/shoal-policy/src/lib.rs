//! Shoal's policy core. Every function here is pure: a snapshot of the cluster goes in, a plan
//! comes out; the controller and the simulator execute plans. No I/O, no clocks, no randomness
//! beyond what the caller passes in.

pub mod placement;

pub use placement::{place_gang, GangRequest, HostView, PlacementError};
