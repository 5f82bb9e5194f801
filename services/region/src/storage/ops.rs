//! Physical changes to the state database: what a group commit does, what the journal records,
//! and what recovery replays. One `apply` serves the live commit and the replay, so the two
//! cannot drift apart.

use super::tables::{APPLIED, BUCKETS, IDEMPOTENCY, KEYS, LOG, META, PEER_CURSORS, TOMBSTONES};
use super::{IdempotencyRecord, StorageError};
use meridian_shared::merkle::entry_hash;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// One change to one row of the state database.
#[derive(Debug, Serialize, Deserialize)]
pub enum Op<'a> {
    /// Sets a key's state.
    PutKey {
        bucket: Cow<'a, str>,
        key: Cow<'a, str>,
        #[serde(with = "serde_bytes", borrow)]
        state: Cow<'a, [u8]>,
    },
    /// Removes a key's state (a causally stable tombstone).
    RemoveKey {
        bucket: Cow<'a, str>,
        key: Cow<'a, str>,
    },
    /// Records a tombstone candidate.
    MarkTombstone {
        bucket: Cow<'a, str>,
        key: Cow<'a, str>,
    },
    /// Forgets a tombstone candidate.
    ForgetTombstone {
        bucket: Cow<'a, str>,
        key: Cow<'a, str>,
    },
    /// Appends an encoded replication-log record.
    PutLog {
        seq: u64,
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// Removes the replication-log records `first..=last`.
    TruncateLog { first: u64, last: u64 },
    /// Stores an encoded idempotency record.
    PutIdempotency {
        id: u128,
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// Removes idempotency records created before this wall-clock millisecond (and any that
    /// cannot be decoded: they can never be replayed).
    ExpireIdempotency { before_ms: u64 },
    /// Stores an encoded bucket definition.
    PutBucket {
        name: Cow<'a, str>,
        #[serde(with = "serde_bytes")]
        def: Vec<u8>,
    },
    /// Sets an origin's applied sequence number.
    PutApplied { origin: u128, seq: u64 },
    /// Sets a peer's replication cursor.
    PutCursor { peer: Cow<'a, str>, seq: u64 },
    /// Sets a meta value.
    PutMeta {
        key: Cow<'a, str>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
}

/// The state database's tables in one write transaction, each opened on first use (every
/// table opened is also flushed at commit).
pub struct StateTables<'txn> {
    txn: &'txn WriteTransaction,
    keys: Option<Table<'txn, (&'static str, &'static str), &'static [u8]>>,
    tombstones: Option<Table<'txn, (&'static str, &'static str), ()>>,
    log: Option<Table<'txn, u64, &'static [u8]>>,
    idempotency: Option<Table<'txn, u128, &'static [u8]>>,
    buckets: Option<Table<'txn, &'static str, &'static [u8]>>,
    applied: Option<Table<'txn, u128, u64>>,
    cursors: Option<Table<'txn, &'static str, u64>>,
    meta: Option<Table<'txn, &'static str, &'static [u8]>>,
}

impl<'txn> StateTables<'txn> {
    /// No table opened yet.
    pub fn new(txn: &'txn WriteTransaction) -> Self {
        Self {
            txn,
            keys: None,
            tombstones: None,
            log: None,
            idempotency: None,
            buckets: None,
            applied: None,
            cursors: None,
            meta: None,
        }
    }

    /// Applies one op. Returns the entry hash of the key state it replaced or removed (0 for
    /// none, and for ops on other tables), which the anti-entropy tree needs.
    pub fn apply(&mut self, op: &Op<'_>) -> Result<u64, StorageError> {
        let txn = self.txn;
        match op {
            Op::PutKey { bucket, key, state } => {
                let old = open(&mut self.keys, txn, KEYS)?
                    .insert((bucket.as_ref(), key.as_ref()), state.as_ref())?;
                Ok(old.map_or(0, |old| entry_hash(bucket, key, old.value())))
            }
            Op::RemoveKey { bucket, key } => {
                let old =
                    open(&mut self.keys, txn, KEYS)?.remove((bucket.as_ref(), key.as_ref()))?;
                Ok(old.map_or(0, |old| entry_hash(bucket, key, old.value())))
            }
            Op::MarkTombstone { bucket, key } => {
                open(&mut self.tombstones, txn, TOMBSTONES)?
                    .insert((bucket.as_ref(), key.as_ref()), ())?;
                Ok(0)
            }
            Op::ForgetTombstone { bucket, key } => {
                open(&mut self.tombstones, txn, TOMBSTONES)?
                    .remove((bucket.as_ref(), key.as_ref()))?;
                Ok(0)
            }
            Op::PutLog { seq, record } => {
                open(&mut self.log, txn, LOG)?.insert(*seq, record.as_slice())?;
                Ok(0)
            }
            Op::TruncateLog { first, last } => {
                open(&mut self.log, txn, LOG)?.retain_in(*first..=*last, |_, _| false)?;
                Ok(0)
            }
            Op::ExpireIdempotency { before_ms } => {
                open(&mut self.idempotency, txn, IDEMPOTENCY)?.retain(|_, bytes| {
                    IdempotencyRecord::decode(bytes).is_ok_and(|r| r.created_ms >= *before_ms)
                })?;
                Ok(0)
            }
            Op::PutIdempotency { id, record } => {
                open(&mut self.idempotency, txn, IDEMPOTENCY)?.insert(*id, record.as_slice())?;
                Ok(0)
            }
            Op::PutBucket { name, def } => {
                open(&mut self.buckets, txn, BUCKETS)?.insert(name.as_ref(), def.as_slice())?;
                Ok(0)
            }
            Op::PutApplied { origin, seq } => {
                open(&mut self.applied, txn, APPLIED)?.insert(*origin, *seq)?;
                Ok(0)
            }
            Op::PutCursor { peer, seq } => {
                open(&mut self.cursors, txn, PEER_CURSORS)?.insert(peer.as_ref(), *seq)?;
                Ok(0)
            }
            Op::PutMeta { key, value } => {
                open(&mut self.meta, txn, META)?.insert(key.as_ref(), value.as_slice())?;
                Ok(0)
            }
        }
    }

    /// A key's stored state.
    pub fn key_state(&mut self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let state = open(&mut self.keys, self.txn, KEYS)?
            .get((bucket, key))?
            .map(|v| v.value().to_vec());
        Ok(state)
    }

    /// A stored bucket definition, encoded.
    pub fn bucket(&mut self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let def = open(&mut self.buckets, self.txn, BUCKETS)?
            .get(name)?
            .map(|v| v.value().to_vec());
        Ok(def)
    }

    /// The first sequence number in the replication log.
    pub fn log_first(&mut self) -> Result<Option<u64>, StorageError> {
        let first = open(&mut self.log, self.txn, LOG)?
            .first()?
            .map(|(k, _)| k.value());
        Ok(first)
    }
}

/// The table in `slot`, opened in `txn` on first use.
fn open<'s, 'txn, K: redb::Key + 'static, V: redb::Value + 'static>(
    slot: &'s mut Option<Table<'txn, K, V>>,
    txn: &'txn WriteTransaction,
    definition: TableDefinition<'static, K, V>,
) -> Result<&'s mut Table<'txn, K, V>, StorageError> {
    if slot.is_none() {
        *slot = Some(txn.open_table(definition)?);
    }
    slot.as_mut()
        .ok_or_else(|| StorageError::Corrupt("table could not be opened".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first variants as the previous build declared them: bytes as plain sequences.
    #[derive(Serialize)]
    enum PlainOp<'a> {
        PutKey {
            bucket: Cow<'a, str>,
            key: Cow<'a, str>,
            state: Cow<'a, [u8]>,
        },
        _RemoveKey,
        _MarkTombstone,
        _ForgetTombstone,
        PutLog {
            seq: u64,
            record: Vec<u8>,
        },
    }

    #[test]
    fn journal_ops_keep_the_encoding_of_plain_byte_sequences() {
        let bytes: Vec<u8> = (0..=255).rev().collect();
        let ops = vec![
            Op::PutKey {
                bucket: "b".into(),
                key: "k".into(),
                state: bytes.as_slice().into(),
            },
            Op::PutLog {
                seq: 9,
                record: bytes.clone(),
            },
        ];
        let plain = vec![
            PlainOp::PutKey {
                bucket: "b".into(),
                key: "k".into(),
                state: bytes.as_slice().into(),
            },
            PlainOp::PutLog {
                seq: 9,
                record: bytes.clone(),
            },
        ];
        let encoded = postcard::to_allocvec(&ops).expect("encode");
        assert_eq!(encoded, postcard::to_allocvec(&plain).expect("encode"));
        let decoded: Vec<Op<'_>> = postcard::from_bytes(&encoded).expect("decode");
        match &decoded[0] {
            Op::PutKey { state, .. } => {
                assert!(
                    matches!(state, Cow::Borrowed(_)),
                    "replay borrows, not copies"
                );
                assert_eq!(state.as_ref(), bytes.as_slice());
            }
            other => panic!("decoded {other:?}"),
        }
    }
}
