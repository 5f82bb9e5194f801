//! Durable storage in redb: one writer thread group-commits; readers use snapshots.
//!
//! Reads run inline on the caller's thread: a redb read transaction never waits for the writer
//! and is served from its page cache in microseconds, cheaper than any hop to a thread pool.

mod idempotency;
mod identity;
pub mod tables;
mod writer;

pub use idempotency::IdempotencyRecord;
pub use identity::Identity;
pub use writer::{now_ms, BucketOutcome, KeyWrite, PendingIdempotency, WriteTicket};

use crate::metrics::Metrics;
use meridian_shared::encoding::{decode_state, DecodeError};
use meridian_shared::{BucketDef, KeyState, RegionName};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use tables::{BUCKETS, IDEMPOTENCY, KEYS};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// redb or the file system failed.
    #[error("storage failure: {0}")]
    Redb(#[from] redb::Error),
    /// Stored bytes could not be read back.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The data directory belongs to another region or cluster, or a newer build.
    #[error("{0}")]
    WrongOwner(String),
    /// The group commit carrying this write failed; nothing of it was applied.
    #[error("group commit failed: {0}")]
    CommitFailed(String),
    /// The commit queue is full: shed load instead of queueing without bound.
    #[error("commit queue is full")]
    Overloaded,
    /// The writer thread has stopped (shutdown or a fatal disk error).
    #[error("storage writer has stopped")]
    WriterGone,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<DecodeError> for StorageError {
    fn from(e: DecodeError) -> Self {
        StorageError::Corrupt(e.to_string())
    }
}

/// Bucket definitions, mirrored in memory for per-request checks; updated after each commit.
pub type BucketCache = Arc<RwLock<BTreeMap<String, BucketDef>>>;

/// Handle to the region's storage; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    db: Arc<Database>,
    identity: Arc<Identity>,
    writer: writer::WriterHandle,
    buckets: BucketCache,
}

/// One page of a key listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// Keys in byte order.
    pub keys: Vec<String>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<String>,
}

impl Storage {
    /// Opens (or creates and stamps) the data directory and starts the writer thread.
    pub fn open(
        data_dir: &Path,
        region: &RegionName,
        cluster_id: &str,
        commit_max_batch: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StorageError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StorageError::Redb(e.into()))?;
        let db = Arc::new(Database::create(data_dir.join("meridian.redb"))?);
        let (identity, last_seq) = identity::stamp_or_check(&db, region, cluster_id)?;
        let buckets: BucketCache = Arc::new(RwLock::new(load_buckets(&db)?));
        metrics.last_sequence.set(last_seq as i64);
        let writer = writer::spawn(
            db.clone(),
            last_seq,
            commit_max_batch,
            buckets.clone(),
            metrics,
        )
        .map_err(|e| StorageError::Redb(e.into()))?;
        Ok(Self {
            db,
            identity: Arc::new(identity),
            writer,
            buckets,
        })
    }

    /// The directory's identity stamp.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Highest region sequence number committed so far.
    pub fn last_seq(&self) -> u64 {
        self.writer.last_seq()
    }

    /// Whether the writer thread is still accepting writes.
    pub fn writable(&self) -> bool {
        self.writer.alive()
    }

    /// Queues a key write for the next group commit.
    pub fn submit_key(&self, write: KeyWrite) -> Result<WriteTicket<u64>, StorageError> {
        self.writer.submit_key(write)
    }

    /// Queues a bucket creation; the writer decides created / identical / conflicting.
    pub fn submit_bucket(
        &self,
        def: BucketDef,
    ) -> Result<WriteTicket<BucketOutcome>, StorageError> {
        self.writer.submit_bucket(def)
    }

    /// A bucket definition, from the in-memory mirror.
    pub fn bucket(&self, name: &str) -> Option<BucketDef> {
        self.buckets.read().ok()?.get(name).cloned()
    }

    /// Every bucket definition, sorted by name.
    pub fn buckets(&self) -> Vec<BucketDef> {
        self.buckets
            .read()
            .map(|b| b.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A key's committed state, if it was ever written.
    pub fn key_state(&self, bucket: &str, key: &str) -> Result<Option<KeyState>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KEYS)?;
        let Some(bytes) = table.get((bucket, key))? else {
            return Ok(None);
        };
        Ok(Some(decode_state(bytes.value())?))
    }

    /// A stored idempotency record.
    pub fn idempotency(&self, id: u128) -> Result<Option<IdempotencyRecord>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IDEMPOTENCY)?;
        let Some(bytes) = table.get(id)? else {
            return Ok(None);
        };
        IdempotencyRecord::decode(bytes.value())
            .map(Some)
            .map_err(|e| StorageError::Corrupt(e.to_string()))
    }

    /// Lists live keys of a bucket in byte order, starting after `after`, filtered by `prefix`.
    pub fn list_keys(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KEYS)?;
        let start = match after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let mut keys = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        for entry in table.range((bucket, start)..)? {
            let (k, v) = entry?;
            let (b, key) = k.value();
            if b != bucket || !key.starts_with(prefix) {
                break;
            }
            if Some(key) == after {
                continue;
            }
            // A deleted register is a tombstone, not a key a client can see.
            if matches!(
                decode_state(v.value())?.view(),
                meridian_shared::state::View::Absent
            ) {
                continue;
            }
            if keys.len() == limit {
                more = true;
                break;
            }
            keys.push(key.to_string());
        }
        let next = if more { keys.last().cloned() } else { None };
        Ok(KeyPage { keys, next })
    }

    /// Size of the database file in bytes.
    pub fn file_size(&self, data_dir: &Path) -> u64 {
        std::fs::metadata(data_dir.join("meridian.redb")).map_or(0, |m| m.len())
    }
}

fn load_buckets(db: &Database) -> Result<BTreeMap<String, BucketDef>, StorageError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(BUCKETS)?;
    let mut out = BTreeMap::new();
    for entry in table.iter()? {
        let (name, bytes) = entry?;
        let def: BucketDef = postcard::from_bytes(bytes.value())
            .map_err(|e| StorageError::Corrupt(format!("bucket {}: {e}", name.value())))?;
        out.insert(def.name.clone(), def);
    }
    Ok(out)
}
