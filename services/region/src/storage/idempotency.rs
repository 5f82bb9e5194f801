//! Idempotency records: the first answer to a write, replayed for retries with the same key.

use serde::{Deserialize, Serialize};

/// What a write with an `Idempotency-Key` answered, stored in the write's own transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// Hash of the request (operation, bucket, key, body, context): a different request with
    /// the same key is refused rather than answered with the wrong result.
    pub fingerprint: u64,
    /// HTTP status of the first answer.
    pub status: u16,
    /// JSON body of the first answer.
    pub body: Vec<u8>,
    /// Region sequence number of the write (for the session token on replay).
    pub seq: u64,
    /// Wall-clock milliseconds when it was stored (for expiry).
    pub created_ms: u64,
}

impl IdempotencyRecord {
    /// Binary form for the idempotency table.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads a record written by [`IdempotencyRecord::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}
