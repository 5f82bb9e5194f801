//! Meridian's replication model: pure, IO-free types shared by the region server and the CLI.
//!
//! Everything here is deterministic so that its laws (CRDT joins, canonical encodings, home
//! placement) can be property-tested in isolation.
#![deny(missing_docs)]

pub mod bucket;
pub mod context;
pub mod encoding;
pub mod hlc;
pub mod home;
pub mod ids;
pub mod log;
pub mod merkle;
pub mod names;
pub mod register;
pub mod session;
pub mod state;
pub mod wire;

pub use bucket::{BucketDef, BucketType};
pub use ids::{Actor, RegionName};
pub use state::{KeyState, Op, StateError};
