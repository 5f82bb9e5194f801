//! Region-to-region protocol bodies (`/internal/v1/*`), versioned by [`PROTOCOL_VERSION`].

use crate::{Actor, RegionName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped on any incompatible change; peers refuse other versions.
pub const PROTOCOL_VERSION: u32 = 2;
/// Header naming the sending region.
pub const PEER_HEADER: &str = "x-meridian-peer";
/// Header carrying the sender's cluster id.
pub const CLUSTER_HEADER: &str = "x-meridian-cluster";
/// Header marking a request forwarded by another region (never forwarded again).
pub const FORWARDED_HEADER: &str = "x-meridian-forwarded-by";
/// Header carrying the bucket definition (JSON) with a forwarded request, so a home that has
/// not yet received the definition by replication can serve it at once.
pub const BUCKET_DEF_HEADER: &str = "x-meridian-bucket-def";

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
    /// Group commits that changed its key states (a restored old copy reports fewer).
    #[serde(default)]
    pub commits: u64,
    /// The highest `commits` it has seen from each peer.
    #[serde(default)]
    pub seen_commits: BTreeMap<RegionName, u64>,
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

/// Anti-entropy, step 1: the initiator's root. The answer carries the responder's branches
/// only when the roots differ, and always its bucket definitions (they must agree first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AeTopRequest {
    /// Protocol version of the initiator.
    pub version: u32,
    /// The initiator's root hash.
    pub root: u64,
}

/// Answer to [`AeTopRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AeTop {
    /// The responder is itself exchanging with the initiator and wins the tie (smaller region
    /// name): the initiator stops, since one exchange repairs both sides.
    pub deferred: bool,
    /// The responder's root hash.
    pub root: u64,
    /// Every branch hash, when the roots differ.
    pub branches: Option<Vec<u64>>,
    /// The responder's bucket definitions.
    pub buckets: Vec<crate::BucketDef>,
    /// The responder's applied vector (its own incarnation: its last sequence number), read
    /// before its tree: once the initiator holds everything the tree held, it has applied
    /// this much of every origin.
    pub applied: BTreeMap<Actor, u64>,
}

/// Step 2: the segment hashes under some branches (answer: one `Vec<u64>` per branch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeSegmentsRequest {
    /// Branch indexes.
    pub branches: Vec<u32>,
}

/// Which segments a digest scan covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentSet {
    /// Every segment (bootstrap, or most of the tree differs).
    All,
    /// These segments, ascending.
    Some(Vec<u32>),
}

/// Step 3: digests of the keys in `segments`, in key order, after `after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeDigestsRequest {
    /// Segments to report.
    pub segments: SegmentSet,
    /// Resume after this `(bucket, key)`; `None` from the start.
    pub after: Option<(String, String)>,
    /// Most digests in the answer.
    pub max_digests: u32,
    /// Most keys scanned for the answer (bounds the responder's work per request).
    pub max_scan: u32,
}

/// Answer to [`AeDigestsRequest`]: every digest in `(after, scanned_to]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeDigests {
    /// Digests in key order.
    pub digests: Vec<crate::merkle::Digest>,
    /// Last key scanned when a limit stopped the scan; `None` when it reached the end.
    pub scanned_to: Option<(String, String)>,
}

/// Step 4a: keys whose states the initiator wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeFetch {
    /// `(bucket, key)` pairs.
    pub keys: Vec<(String, String)>,
}

/// Step 4b (and the answer to [`AeFetch`]): key states to merge, canonically encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeStates {
    /// `(bucket, key, state)`; keys the sender does not have are left out.
    pub states: Vec<(String, String, Vec<u8>)>,
}

/// Answer to a push of [`AeStates`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeMerged {
    /// Keys whose state changed by the merge.
    pub changed: u64,
    /// Merged states that hold more than what was pushed (the responder had something the
    /// sender lacks): the sender merges them, so a key present on both sides needs one trip.
    pub newer: Vec<(String, String, Vec<u8>)>,
}

/// Encodes any protocol body as postcard (strings, vectors and integers: cannot fail).
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    postcard::to_allocvec(body).unwrap_or_default()
}

/// Decodes a postcard protocol body.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
