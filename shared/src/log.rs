//! Replication-log entries: what a region commits alongside every write, in sequence order.

use crate::BucketDef;
use serde::{Deserialize, Serialize};

/// One committed change, keyed in the log by the origin's region sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LogEntry {
    /// A key's full state after the write (state-based replication: merging it is idempotent).
    Key {
        /// Bucket name.
        bucket: String,
        /// Key name.
        key: String,
        /// Canonical encoding of the state ([`crate::encoding::encode_state`]).
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
    /// A bucket definition was created.
    Bucket(BucketDef),
    /// The first answer to the write logged just before, sent with an `Idempotency-Key`:
    /// replicated so that a retry at any region is answered instead of applied again.
    Idempotency {
        /// The key (UUID as u128).
        id: u128,
        /// Hash of the request: the same key with a different request is a conflict.
        fingerprint: u64,
        /// HTTP status of the answer.
        status: u16,
        /// JSON body of the answer.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// Wall-clock milliseconds when the origin stored it (for expiry everywhere).
        created_ms: u64,
    },
}

/// A log entry with its commit time, as stored in the log table and shipped to peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Wall-clock microseconds of the commit at the origin (replication lag is measured from it).
    pub committed_us: u64,
    /// W3C `traceparent` of the write's span, so replication continues its trace.
    pub trace: Option<String>,
    /// Bytes of log written before this record by the same incarnation: the difference between
    /// two records' offsets is the size of the hints between them, without scanning.
    pub log_offset: u64,
    /// The change.
    pub entry: LogEntry,
}

impl LogRecord {
    /// Binary form for the log table and the wire.
    pub fn encode(&self) -> Vec<u8> {
        // Strings and byte vectors into a Vec: cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads a record written by [`LogRecord::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}
