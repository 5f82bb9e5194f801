//! Region-to-region protocol bodies (`/internal/v1/*`), versioned by [`PROTOCOL_VERSION`].

use crate::{Actor, RegionName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped on any incompatible change; peers refuse other versions.
pub const PROTOCOL_VERSION: u32 = 1;
/// Header naming the sending region.
pub const PEER_HEADER: &str = "x-meridian-peer";
/// Header carrying the sender's cluster id.
pub const CLUSTER_HEADER: &str = "x-meridian-cluster";
/// Header marking a request forwarded by another region (never forwarded again).
pub const FORWARDED_HEADER: &str = "x-meridian-forwarded-by";

/// A run of the origin's replication log, in sequence order (postcard body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicateBatch {
    /// Protocol version of the sender.
    pub version: u32,
    /// The origin's incarnation: sequence numbers are per incarnation.
    pub incarnation: Actor,
    /// The sender no longer has the entries before this batch (truncated after overflow):
    /// accept the gap; anti-entropy repairs what it skipped.
    pub resync: bool,
    /// `(sequence number, encoded LogRecord)`, ascending.
    pub records: Vec<(u64, Vec<u8>)>,
}

/// The receiver's answer: how far it has applied the origin's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicateAck {
    /// Highest contiguous sequence number of that incarnation applied (durably).
    pub applied: u64,
}

/// Answer to a heartbeat (JSON, so an operator can curl it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Protocol version.
    pub version: u32,
    /// Answering region.
    pub region: RegionName,
    /// Its cluster id.
    pub cluster_id: String,
    /// Its incarnation.
    pub incarnation: Actor,
    /// Its last committed sequence number.
    pub last_seq: u64,
    /// What it has applied from every origin incarnation.
    pub applied: BTreeMap<Actor, u64>,
}

impl ReplicateBatch {
    /// Binary body.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads a body written by [`ReplicateBatch::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}
