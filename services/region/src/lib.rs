//! One Meridian region: configuration, storage (redb), actors and the public API.
//!
//! Read top-down: `api/` validates requests and hands writes to `actors/partition.rs`, which
//! applies them to the key's CRDT state and hands them to `storage/` for group commit. Peers'
//! states (replication, anti-entropy, read repair) enter through `repair.rs` and the same path.
#![deny(missing_docs)]

pub mod actors;
pub mod affinity;
pub mod api;
pub mod clock;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod peers;
pub mod region;
pub mod repair;
pub mod server;
pub mod startup;
pub mod storage;
