//! Idempotency records: the first answer to a write, replayed for retries with the same key.

use meridian_shared::Actor;
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
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Sequence number of the write in its origin's log (for the session token on replay).
    pub seq: u64,
    /// Wall-clock milliseconds when it was stored (for expiry).
    pub created_ms: u64,
    /// The incarnation whose log holds the write: `None` for this region's own writes, else the
    /// peer it was replicated from.
    pub origin: Option<Actor>,
}

/// Records stored before `origin` existed (all of them this region's own).
#[derive(Deserialize)]
struct RecordWithoutOrigin {
    fingerprint: u64,
    status: u16,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    seq: u64,
    created_ms: u64,
}

impl IdempotencyRecord {
    /// Binary form for the idempotency table.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads a record written by [`IdempotencyRecord::encode`] (or by an older build).
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes).or_else(|error| {
            let old: RecordWithoutOrigin = postcard::from_bytes(bytes).map_err(|_| error)?;
            Ok(Self {
                fingerprint: old.fingerprint,
                status: old.status,
                body: old.body,
                seq: old.seq,
                created_ms: old.created_ms,
                origin: None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_older_ones_without_origin_still_decode() {
        let record = IdempotencyRecord {
            fingerprint: 7,
            status: 200,
            body: b"{}".to_vec(),
            seq: 42,
            created_ms: 1_000,
            origin: Some(Actor::from_u128(9)),
        };
        assert_eq!(
            IdempotencyRecord::decode(&record.encode()),
            Ok(record.clone())
        );

        #[derive(Serialize)]
        struct Older {
            fingerprint: u64,
            status: u16,
            body: Vec<u8>,
            seq: u64,
            created_ms: u64,
        }
        let older = postcard::to_allocvec(&Older {
            fingerprint: 7,
            status: 200,
            body: b"{}".to_vec(),
            seq: 42,
            created_ms: 1_000,
        })
        .expect("encode");
        let decoded = IdempotencyRecord::decode(&older).expect("older record");
        assert_eq!(decoded.origin, None, "an older record is this region's own");
        assert_eq!(decoded.seq, 42);
    }
}
