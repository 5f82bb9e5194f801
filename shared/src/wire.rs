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
/// Header carrying the `peer_token` with a forwarded request (its `Authorization` is the
/// client's), so the home honours the forward headers from peers only.
pub const FORWARD_TOKEN_HEADER: &str = "x-meridian-forward-token";
/// On a heartbeat request: the start-up question of a region that reopened its data
/// directory, which a region still starting itself answers too.
pub const STARTUP_QUESTION_HEADER: &str = "x-meridian-startup-question";
/// On a 503: the region is still starting, so it applied nothing (a forward may fail over).
pub const STARTING_HEADER: &str = "x-meridian-starting";
/// On a forwarded write: the time (Unix ms on the home's clock, as the forwarder estimates it
/// from heartbeats) after which the home must not start applying it, as the forwarder will
/// soon stop waiting; past it, the home refuses it with [`NOT_APPLIED_HEADER`]. So a forward
/// that reaches a home that hung holds no surprise for a retry that failed over meanwhile.
pub const APPLY_BY_HEADER: &str = "x-meridian-apply-by";
/// On an error: this request applied nothing (a forwarder's retry of it need not wait for the
/// home; a proxy's own 503 never carries it).
pub const NOT_APPLIED_HEADER: &str = "x-meridian-not-applied";

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
    #[serde(with = "byte_rows")]
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
    /// Origins whose log it accepted past a gap not yet filled: what it had applied before.
    #[serde(default)]
    pub gaps: BTreeMap<Actor, u64>,
    /// Its wall clock as it answered (Unix ms; 0 from a version that did not say), from which
    /// the asker estimates how far apart their clocks are.
    #[serde(default)]
    pub clock_ms: u64,
}

impl Heartbeat {
    /// Whether it holds nothing at all: no write of its own, none applied from elsewhere.
    pub fn holds_nothing(&self) -> bool {
        self.last_seq == 0 && self.commits == 0 && self.applied.values().all(|s| *s == 0)
    }

    /// What it is known to hold of every origin: `applied`, below any gap.
    pub fn held(&self) -> BTreeMap<Actor, u64> {
        let mut held = self.applied.clone();
        below_gaps(&mut held, &self.gaps);
        held
    }
}

/// Lowers an applied vector to what was applied before each gap in `gaps`.
pub fn below_gaps(applied: &mut BTreeMap<Actor, u64>, gaps: &BTreeMap<Actor, u64>) {
    for (origin, before) in gaps {
        if let Some(seq) = applied.get_mut(origin) {
            *seq = (*seq).min(*before);
        }
    }
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
    #[serde(with = "byte_rows")]
    pub states: Vec<(String, String, Vec<u8>)>,
}

/// Answer to a push of [`AeStates`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeMerged {
    /// Keys whose state changed by the merge.
    pub changed: u64,
    /// Merged states that hold more than what was pushed (the responder had something the
    /// sender lacks): the sender merges them, so a key present on both sides needs one trip.
    #[serde(with = "byte_rows")]
    pub newer: Vec<(String, String, Vec<u8>)>,
}

/// Rows whose last column is bytes, (de)serialized as bytes rather than as a sequence of
/// numbers: the same postcard encoding (a length, then the bytes), copied in one go instead
/// of byte by byte.
mod byte_rows {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    /// A row with its bytes column.
    pub trait Row: Sized {
        /// The row with its bytes borrowed as [`Bytes`].
        fn as_serialized(&self) -> impl Serialize + '_;
        /// The row as deserialized, with its bytes in a [`ByteBuf`].
        type Deserialized: for<'de> Deserialize<'de>;
        /// Back to the plain row.
        fn from_deserialized(row: Self::Deserialized) -> Self;
    }

    impl Row for (u64, Vec<u8>) {
        fn as_serialized(&self) -> impl Serialize + '_ {
            (self.0, Bytes::new(&self.1))
        }
        type Deserialized = (u64, ByteBuf);
        fn from_deserialized((seq, bytes): Self::Deserialized) -> Self {
            (seq, bytes.into_vec())
        }
    }

    impl Row for (String, String, Vec<u8>) {
        fn as_serialized(&self) -> impl Serialize + '_ {
            (&self.0, &self.1, Bytes::new(&self.2))
        }
        type Deserialized = (String, String, ByteBuf);
        fn from_deserialized((bucket, key, bytes): Self::Deserialized) -> Self {
            (bucket, key, bytes.into_vec())
        }
    }

    pub fn serialize<R: Row, S: Serializer>(rows: &[R], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(rows.iter().map(Row::as_serialized))
    }

    pub fn deserialize<'de, R: Row, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<R>, D::Error> {
        let rows = Vec::<R::Deserialized>::deserialize(deserializer)?;
        Ok(rows.into_iter().map(R::from_deserialized).collect())
    }
}

/// Encodes any protocol body as postcard (strings, vectors and integers: cannot fail).
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    postcard::to_allocvec(body).unwrap_or_default()
}

/// Decodes a postcard protocol body.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{LogEntry, LogRecord};

    /// The bodies as the previous build declared them: bytes as plain sequences.
    #[derive(Serialize, Deserialize)]
    struct PlainBatch {
        version: u32,
        incarnation: Actor,
        resync: bool,
        records: Vec<(u64, Vec<u8>)>,
    }

    #[derive(Serialize, Deserialize)]
    struct PlainStates {
        states: Vec<(String, String, Vec<u8>)>,
    }

    #[derive(Serialize)]
    enum PlainEntry {
        Key {
            bucket: String,
            key: String,
            state: Vec<u8>,
        },
    }

    #[derive(Serialize)]
    struct PlainRecord {
        committed_us: u64,
        trace: Option<String>,
        log_offset: u64,
        entry: PlainEntry,
    }

    #[test]
    fn bytes_keep_the_encoding_of_plain_sequences() {
        let state: Vec<u8> = (0..=255).collect();
        let record = LogRecord {
            committed_us: 1,
            trace: Some("00-ab-cd-01".into()),
            log_offset: 300,
            entry: LogEntry::Key {
                bucket: "b".into(),
                key: "k".into(),
                state: state.clone(),
            },
        };
        let plain_record = PlainRecord {
            committed_us: 1,
            trace: Some("00-ab-cd-01".into()),
            log_offset: 300,
            entry: PlainEntry::Key {
                bucket: "b".into(),
                key: "k".into(),
                state: state.clone(),
            },
        };
        let encoded = record.encode();
        assert_eq!(encoded, encode(&plain_record), "log records");

        let batch = ReplicateBatch {
            version: PROTOCOL_VERSION,
            incarnation: Actor::from_u128(3),
            resync: false,
            records: vec![(7, encoded.clone()), (8, Vec::new())],
        };
        let plain = PlainBatch {
            version: PROTOCOL_VERSION,
            incarnation: Actor::from_u128(3),
            resync: false,
            records: vec![(7, encoded), (8, Vec::new())],
        };
        assert_eq!(batch.encode(), encode(&plain), "replication batches");
        assert_eq!(ReplicateBatch::decode(&encode(&plain)), Ok(batch));

        let states = AeStates {
            states: vec![("b".into(), "k".into(), state)],
        };
        let plain: PlainStates = decode(&encode(&states)).expect("plain decode");
        assert_eq!(encode(&plain), encode(&states), "anti-entropy states");
        assert_eq!(decode::<AeStates>(&encode(&plain)), Ok(states));
    }
}
