//! Durable storage in redb: one writer thread group-commits, durable through a write-ahead
//! journal (see `journal`); readers use snapshots of the state database.
//!
//! Reads run inline on the caller's thread: a redb read transaction never waits for the writer
//! and is served from its page cache in microseconds, cheaper than any hop to a thread pool.

mod idempotency;
mod identity;
mod journal;
mod ops;
mod overlay;
mod scan;
mod snapshot;
pub mod tables;
#[cfg(test)]
mod tests;
mod writer;

pub use idempotency::IdempotencyRecord;
pub use identity::Identity;
pub use writer::{
    BucketOutcome, BucketSource, Gather, KeyWrite, PendingIdempotency, Purge, SharedTree,
    WriteTicket, MAX_SPAN_LINKS,
};

use crate::metrics::Metrics;
use meridian_shared::encoding::{decode_state, encoded_kind, DecodeError};
use meridian_shared::log::LogRecord;
use meridian_shared::merkle::{entry_hash, segment_of, Digest, MerkleTree, SegmentFilter};
use meridian_shared::state::View;
use meridian_shared::{Actor, BucketDef, BucketType, KeyState, RegionName};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tables::{meta, APPLIED, BUCKETS, KEYS, LOG, META, PEER_CURSORS, TOMBSTONES};
use tokio::sync::watch;

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
    redb::SetDurabilityError,
    std::io::Error
);

impl From<DecodeError> for StorageError {
    fn from(e: DecodeError) -> Self {
        StorageError::Corrupt(e.to_string())
    }
}

/// Bucket definitions, mirrored in memory for per-request checks; updated after each commit.
pub type BucketCache = Arc<RwLock<BTreeMap<String, BucketDef>>>;

/// An opened, stamped database whose writer has not started yet (see [`Storage::start`]).
pub struct OpenedDb {
    db: Arc<Database>,
    path: PathBuf,
    identity: Identity,
    last_seq: u64,
    commits: u64,
    journal: journal::Journal,
}

impl OpenedDb {
    /// Opens (or creates and stamps) the data directory, first replaying what the journal
    /// holds beyond the last checkpoint. `cache_bytes` bounds redb's page cache, which
    /// otherwise grows with the file (hints of a down peer included) up to 1 GiB.
    pub fn open(
        data_dir: &Path,
        region: &RegionName,
        cluster_id: &str,
        cache_bytes: usize,
        checkpoint_interval: std::time::Duration,
    ) -> Result<Self, StorageError> {
        if !data_dir.exists() {
            std::fs::create_dir_all(data_dir)?;
            // The new directory's own entry must be durable too, or a power loss could take
            // the first acknowledged writes with it (the journal syncs what is inside).
            sync_dir_of(data_dir)?;
        }
        if data_dir.join("journal.redb").exists() {
            return Err(StorageError::WrongOwner(format!(
                "{} holds a journal.redb from an older build: stop it cleanly with that build \
                 (which checkpoints it), then remove journal.redb",
                data_dir.display()
            )));
        }
        let path = data_dir.join("meridian.redb");
        let db = Arc::new(
            Database::builder()
                .set_cache_size(cache_bytes)
                .create(&path)?,
        );
        let journal =
            journal::Journal::open(&data_dir.join("journal.wal"), &db, checkpoint_interval)?;
        let (identity, last_seq) = identity::stamp_or_check(&db, region, cluster_id)?;
        let commits = read_meta_u64(&db, meta::COMMITS)?;
        Ok(Self {
            db,
            path,
            identity,
            last_seq,
            commits,
            journal,
        })
    }

    /// The directory's identity stamp.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Highest sequence number committed under the current incarnation.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Group commits that changed key states in this directory.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// The applied vector and what is persisted about each peer, as the writer will load them.
    pub fn progress(&self) -> Result<(BTreeMap<Actor, u64>, PeerProgress), StorageError> {
        let (_, applied) = load_progress(&self.db)?;
        Ok((applied, read_peer_progress(&self.db)?))
    }

    /// Starts a new incarnation: peers have seen more of the old one than this copy holds, so
    /// its sequence numbers and dots must never be reused. The old log is dropped with it.
    /// With `forget_states` (peers saw more commits than this copy holds: a restored old copy)
    /// its key states go too; anti-entropy refills them, and a stale copy cannot bring back
    /// what was deleted and collected since.
    pub fn reincarnate(&mut self, forget_states: bool, commits: u64) -> Result<(), StorageError> {
        let incarnation =
            identity::reincarnate(&self.db, self.identity.incarnation, forget_states, commits)?;
        if forget_states {
            self.commits = commits;
        }
        tracing::warn!(old = %self.identity.incarnation, new = %incarnation,
            "data directory is behind what peers have seen from it: new incarnation");
        self.identity.incarnation = incarnation;
        self.last_seq = 0;
        Ok(())
    }
}

/// Handle to the region's storage; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    db: Arc<Database>,
    path: PathBuf,
    identity: Arc<Identity>,
    writer: writer::WriterHandle,
    buckets: BucketCache,
    tree: SharedTree,
    snapshots: Arc<snapshot::Snapshots>,
    overlay: Arc<overlay::Overlay>,
}

/// A `(bucket, key)` position in key order.
pub type KeyName = (String, String);

/// What was persisted about each peer: its cursor in our log and its anti-entropy flag.
#[derive(Debug, Default)]
pub struct PeerProgress {
    /// Peer name → highest of our sequence numbers it acknowledged.
    pub cursors: BTreeMap<String, u64>,
    /// Peer name → flagged for priority anti-entropy.
    pub flags: BTreeMap<String, bool>,
    /// Peer name → highest commit counter it reported.
    pub commits: BTreeMap<String, u64>,
    /// Peer name → gaps accepted in its log (see [`Storage::submit_log_gaps`]).
    pub gaps: BTreeMap<String, BTreeMap<Actor, LogGap>>,
}

/// Entries of an origin's log that this region accepted to skip (the origin had dropped them
/// as hints): its applied mark jumped from `before` to `upto` without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogGap {
    /// Applied before the first gap.
    pub before: u64,
    /// Highest mark a gap jumped to: once a peer that holds this much of the origin has been
    /// exchanged with completely, nothing is missing any more.
    pub upto: u64,
}

/// One page of stored states of a bucket, in key order.
#[derive(Debug)]
pub struct StatesPage {
    /// `(key, encoded state)`.
    pub states: Vec<(String, Vec<u8>)>,
    /// The last key scanned, when there may be more after it.
    pub next: Option<String>,
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
    /// Starts the writer thread on an opened database.
    pub fn start(
        opened: OpenedDb,
        commit_max_batch: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StorageError> {
        let OpenedDb {
            db,
            path,
            identity,
            last_seq,
            commits,
            journal,
        } = opened;
        let buckets: BucketCache = Arc::new(RwLock::new(load_buckets(&db)?));
        let (log_bytes, applied) = load_progress(&db)?;
        metrics.last_sequence.set(last_seq as i64);
        let tree = Arc::new(std::sync::Mutex::new(build_tree(&db)?));
        let snapshots = Arc::new(snapshot::Snapshots::default());
        let overlay = Arc::new(overlay::Overlay::default());
        let start = writer::WriterStart {
            last_seq,
            log_bytes,
            applied,
            max_batch: commit_max_batch,
            tree: tree.clone(),
            commits,
            journal,
            snapshots: snapshots.clone(),
            overlay: overlay.clone(),
        };
        let writer = writer::spawn(db.clone(), start, buckets.clone(), metrics)?;
        Ok(Self {
            db,
            path,
            identity: Arc::new(identity),
            writer,
            buckets,
            tree,
            snapshots,
            overlay,
        })
    }

    /// A copy of the anti-entropy tree's root, branches or segments, read under its lock.
    pub fn with_tree<T>(&self, read: impl FnOnce(&MerkleTree) -> T) -> Option<T> {
        self.tree.lock().ok().map(|tree| read(&tree))
    }

    /// Digests of the keys in `segments` after `after` (exclusive) up to `upto` (inclusive;
    /// `None`: the end), in key order. Stops early after `max_digests` digests or `max_scan`
    /// keys scanned, returning the last key scanned; `None` when the range was covered.
    pub fn digests(
        &self,
        segments: &SegmentFilter,
        after: Option<&KeyName>,
        upto: Option<&KeyName>,
        max_digests: usize,
        max_scan: usize,
    ) -> Result<(Vec<Digest>, Option<KeyName>), StorageError> {
        let from = after.map_or(Bound::Unbounded, |name| Bound::Excluded(name.clone()));
        let mut digests = Vec::new();
        let mut scanned = 0;
        let mut stopped_at = None;
        scan::scan_states(&self.db, &self.overlay, from, |bucket, key, state| {
            if upto.is_some_and(|(b, k)| (bucket, key) > (b.as_str(), k.as_str())) {
                return Ok(false);
            }
            if segments.contains(segment_of(bucket, key)) {
                digests.push(Digest {
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                    hash: entry_hash(bucket, key, state),
                });
            }
            scanned += 1;
            if digests.len() >= max_digests || scanned >= max_scan {
                stopped_at = Some((bucket.to_string(), key.to_string()));
                return Ok(false);
            }
            Ok(true)
        })?;
        Ok((digests, stopped_at))
    }

    /// The stored (canonical encoded) states of `keys`; absent keys are left out.
    pub fn raw_states(
        &self,
        keys: &[KeyName],
    ) -> Result<Vec<(String, String, Vec<u8>)>, StorageError> {
        let mut found: Vec<Option<Vec<u8>>> = keys
            .iter()
            .map(|(bucket, key)| self.overlay.with(bucket, key, <[u8]>::to_vec))
            .collect();
        // Opened after every overlay lookup: a state that left the overlay meanwhile is in it.
        let snapshot = self.snapshots.latest(&self.db)?;
        for ((bucket, key), state) in keys.iter().zip(found.iter_mut()) {
            if state.is_none() {
                *state = snapshot
                    .keys
                    .get((bucket.as_str(), key.as_str()))?
                    .map(|stored| stored.value().to_vec());
            }
        }
        let out = keys
            .iter()
            .zip(found)
            .filter_map(|((bucket, key), state)| Some((bucket.clone(), key.clone(), state?)))
            .collect();
        Ok(out)
    }

    /// The directory's identity stamp.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Highest region sequence number committed so far.
    pub fn last_seq(&self) -> u64 {
        *self.writer.last_seq().borrow()
    }

    /// Watches the last committed sequence number.
    pub fn last_seq_watch(&self) -> watch::Receiver<u64> {
        self.writer.last_seq()
    }

    /// Watches the applied vector (peers' origins only; this region's own is `last_seq`).
    pub fn applied_watch(&self) -> watch::Receiver<BTreeMap<Actor, u64>> {
        self.writer.applied()
    }

    /// Reads the applied vector (as [`Storage::applied_watch`] has it) in place.
    pub fn with_applied<T>(&self, read: impl FnOnce(&BTreeMap<Actor, u64>) -> T) -> T {
        self.writer.with_applied(read)
    }

    /// Group commits that changed key states, durable so far.
    pub fn commits(&self) -> u64 {
        self.writer.commits()
    }

    /// Persists the highest commit counter seen from a peer (restored-copy detection).
    pub fn submit_peer_commits(&self, peer: &str, commits: u64) -> Result<(), StorageError> {
        let key = format!("{}{peer}", meta::PEER_COMMITS_PREFIX);
        self.writer.submit_meta(key, commits.to_be_bytes().to_vec())
    }

    /// Whether the writer thread is still accepting writes.
    pub fn writable(&self) -> bool {
        self.writer.alive()
    }

    /// Queues a key write for the next group commit.
    pub fn submit_key(&self, write: KeyWrite) -> Result<WriteTicket<u64>, StorageError> {
        self.writer.submit_key(write)
    }

    /// Queues a bucket definition; the writer decides created / identical / conflicting.
    pub fn submit_bucket(
        &self,
        def: BucketDef,
        source: BucketSource,
    ) -> Result<WriteTicket<BucketOutcome>, StorageError> {
        self.writer.submit_bucket(def, source)
    }

    /// Records that `origin`'s log is applied up to `seq` (never moves backwards). Fails if
    /// any group commit failed since [`Storage::failure_epoch`] returned `epoch`.
    pub fn submit_applied(
        &self,
        origin: Actor,
        seq: u64,
        epoch: u64,
    ) -> Result<WriteTicket<u64>, StorageError> {
        self.writer.submit_applied(origin, seq, epoch)
    }

    /// When sequence number `seq` became durable here (wall-clock µs): exact for recent
    /// commits, else the start of its commit as recorded in the log.
    pub fn durable_at(&self, seq: u64) -> Option<u64> {
        self.writer.durable_at(seq).or_else(|| {
            self.log_record(seq)
                .ok()
                .flatten()
                .map(|record| record.committed_us)
        })
    }

    /// Number of failed group commits so far.
    pub fn failure_epoch(&self) -> u64 {
        self.writer.failure_epoch()
    }

    /// Holds off a group commit that carries merges while the guard lives (briefly): what the
    /// caller queues meanwhile, from any thread, shares that commit.
    pub fn gather(&self) -> Gather {
        self.writer.gather()
    }

    /// Records a peer's acknowledged position, written with the next commit (at-least-once:
    /// losing one is harmless).
    pub fn submit_cursor(&self, peer: &str, seq: u64) -> Result<(), StorageError> {
        self.writer.submit_cursor(peer, seq)
    }

    /// Stores an idempotency record replicated from a peer. Queue it after the merge it
    /// answers and before the applied mark that covers it: the mark's commit carries it.
    pub fn submit_idempotency(
        &self,
        id: u128,
        record: IdempotencyRecord,
    ) -> Result<(), StorageError> {
        self.writer.submit_idempotency(id, record)
    }

    /// Removes log entries up to `upto` (in bounded chunks).
    pub fn submit_truncate(&self, upto: u64) -> Result<(), StorageError> {
        self.writer.submit_truncate(upto)
    }

    /// Removes causally stable tombstones (only where the stored state is unchanged) and
    /// forgets stale candidates; the ticket resolves to the number removed.
    pub fn submit_purge(&self, purge: Purge) -> Result<WriteTicket<u64>, StorageError> {
        self.writer.submit_purge(purge)
    }

    /// Up to `limit` tombstone candidates after `after`, in key order.
    pub fn tombstone_candidates(
        &self,
        after: Option<&KeyName>,
        limit: usize,
    ) -> Result<Vec<KeyName>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOMBSTONES)?;
        let range = table.range::<(&str, &str)>(exclusive_after(after))?;
        let mut out = Vec::new();
        for entry in range {
            let (name, _) = entry?;
            let (bucket, key) = name.value();
            out.push((bucket.to_string(), key.to_string()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Makes the state database durable and cuts the journal (before a clean stop).
    pub async fn checkpoint(&self) -> Result<(), StorageError> {
        self.writer
            .checkpoint()?
            .await
            .map_err(|_| StorageError::WriterGone)
    }

    /// Removes idempotency records stored before `before_ms` (wall-clock milliseconds).
    pub fn submit_expire_idempotency(&self, before_ms: u64) -> Result<(), StorageError> {
        self.writer.submit_expire_idempotency(before_ms)
    }

    /// Sets or clears the "needs priority anti-entropy" flag of a peer.
    pub fn submit_ae_flag(&self, peer: &str, needed: bool) -> Result<(), StorageError> {
        let key = format!("{}{peer}", meta::AE_NEEDED_PREFIX);
        self.writer.submit_meta(key, vec![needed as u8])
    }

    /// Persists the gaps accepted in a peer's log, per incarnation (empty: none left).
    pub fn submit_log_gaps(
        &self,
        peer: &str,
        gaps: &BTreeMap<Actor, LogGap>,
    ) -> Result<(), StorageError> {
        let key = format!("{}{peer}", meta::LOG_GAP_PREFIX);
        let value =
            postcard::to_allocvec(gaps).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        self.writer.submit_meta(key, value)
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
        Ok(self.sized_key_state(bucket, key)?.map(|(state, _)| state))
    }

    /// A key's latest state with its encoded size.
    pub fn sized_key_state(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(KeyState, usize)>, StorageError> {
        let sized = |bytes: &[u8]| decode_state(bytes).map(|state| (state, bytes.len()));
        if let Some(state) = self.overlay.with(bucket, key, sized) {
            return Ok(Some(state?));
        }
        let snapshot = self.snapshots.latest(&self.db)?;
        let Some(bytes) = snapshot.keys.get((bucket, key))? else {
            return Ok(None);
        };
        Ok(Some(sized(bytes.value())?))
    }

    /// A stored idempotency record.
    pub fn idempotency(&self, id: u128) -> Result<Option<IdempotencyRecord>, StorageError> {
        let snapshot = self.snapshots.latest(&self.db)?;
        let Some(bytes) = snapshot.idempotency.get(id)? else {
            return Ok(None);
        };
        IdempotencyRecord::decode(bytes.value())
            .map(Some)
            .map_err(|e| StorageError::Corrupt(e.to_string()))
    }

    /// Log records after `after`, ascending, up to `max_entries` and about `max_bytes`.
    pub fn log_after(
        &self,
        after: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in table.range(after.saturating_add(1)..)? {
            let (seq, record) = entry?;
            bytes += record.value().len();
            out.push((seq.value(), record.value().to_vec()));
            if out.len() >= max_entries || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The oldest sequence number still in the log.
    pub fn log_first(&self) -> Result<Option<u64>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let first = table.first()?.map(|(k, _)| k.value());
        Ok(first)
    }

    /// One decoded log record.
    pub fn log_record(&self, seq: u64) -> Result<Option<LogRecord>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let Some(bytes) = table.get(seq)? else {
            return Ok(None);
        };
        LogRecord::decode(bytes.value())
            .map(Some)
            .map_err(|e| StorageError::Corrupt(e.to_string()))
    }

    /// Persisted per-peer cursors, anti-entropy flags, commit counters and log gaps.
    pub fn peer_progress(&self) -> Result<PeerProgress, StorageError> {
        read_peer_progress(&self.db)
    }

    /// Up to `limit` stored states in `bucket` after key `after` whose type is not `kind`.
    pub fn foreign_states(
        &self,
        bucket: &str,
        kind: BucketType,
        after: Option<&str>,
        limit: usize,
    ) -> Result<StatesPage, StorageError> {
        let from = match after {
            Some(after) => Bound::Excluded((bucket.to_string(), after.to_string())),
            None => Bound::Included((bucket.to_string(), String::new())),
        };
        let mut found = Vec::new();
        let mut stopped_at = None;
        scan::scan_states(&self.db, &self.overlay, from, |b, key, state| {
            if b != bucket {
                return Ok(false);
            }
            let stored = encoded_kind(state).ok_or_else(|| {
                StorageError::Corrupt(format!("state of {bucket}/{key} has no known encoding"))
            })?;
            if stored != kind {
                found.push((key.to_string(), state.to_vec()));
                if found.len() == limit {
                    stopped_at = Some(key.to_string());
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        Ok(StatesPage {
            states: found,
            next: stopped_at,
        })
    }

    /// Lists live keys of a bucket in byte order, starting after `after`, filtered by `prefix`.
    pub fn list_keys(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StorageError> {
        let start = match after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let from = Bound::Included((bucket.to_string(), start.to_string()));
        let mut keys = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        scan::scan_states(&self.db, &self.overlay, from, |b, key, state| {
            if b != bucket || !key.starts_with(prefix) {
                return Ok(false);
            }
            // A deleted register is a tombstone, not a key a client can see.
            if Some(key) == after || matches!(decode_state(state)?.view(), View::Absent) {
                return Ok(true);
            }
            if keys.len() == limit {
                more = true;
                return Ok(false);
            }
            keys.push(key.to_string());
            Ok(true)
        })?;
        let next = if more { keys.last().cloned() } else { None };
        Ok(KeyPage { keys, next })
    }

    /// Size of the database file in bytes.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Key states in the write-back overlay, and the memory they hold (approximately).
    pub fn overlay_size(&self) -> (u64, u64) {
        (self.overlay.entries(), self.overlay.bytes())
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

/// A `(bucket, key)` position borrowed for a range bound.
type NameBound<'a> = Bound<(&'a str, &'a str)>;

/// Range bounds for `(bucket, key)` tables: everything after `after`, or everything.
fn exclusive_after(after: Option<&KeyName>) -> (NameBound<'_>, NameBound<'_>) {
    let lower = after.map_or(Bound::Unbounded, |(b, k)| {
        Bound::Excluded((b.as_str(), k.as_str()))
    });
    (lower, Bound::Unbounded)
}

/// The anti-entropy tree of every stored key state (one scan, at start).
fn build_tree(db: &Database) -> Result<MerkleTree, StorageError> {
    let started = std::time::Instant::now();
    let txn = db.begin_read()?;
    let mut tree = MerkleTree::new();
    let mut keys = 0u64;
    for entry in txn.open_table(KEYS)?.iter()? {
        let (name, state) = entry?;
        let (bucket, key) = name.value();
        tree.toggle(
            segment_of(bucket, key),
            entry_hash(bucket, key, state.value()),
        );
        keys += 1;
    }
    tracing::info!(
        keys,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "anti-entropy tree built"
    );
    Ok(tree)
}

/// Makes the entry of `path` in its directory durable (after creating it).
fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// A u64 meta value (0 when absent, also before the directory is stamped).
fn read_meta_u64(db: &Database, key: &str) -> Result<u64, StorageError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(META) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let value = match table.get(key)? {
        Some(v) => u64::from_be_bytes(v.value().try_into().unwrap_or([0; 8])),
        None => 0,
    };
    Ok(value)
}

/// Persisted per-peer cursors, anti-entropy flags, commit counters and log gaps.
fn read_peer_progress(db: &Database) -> Result<PeerProgress, StorageError> {
    let txn = db.begin_read()?;
    let mut cursors = BTreeMap::new();
    for entry in txn.open_table(PEER_CURSORS)?.iter()? {
        let (peer, seq) = entry?;
        cursors.insert(peer.value().to_string(), seq.value());
    }
    let meta_table = txn.open_table(META)?;
    let flags = per_peer(&meta_table, meta::AE_NEEDED_PREFIX, |v| Ok(v == [1]))?;
    let commits = per_peer(&meta_table, meta::PEER_COMMITS_PREFIX, |v| {
        Ok(u64::from_be_bytes(v.try_into().unwrap_or([0; 8])))
    })?;
    let gaps = per_peer(&meta_table, meta::LOG_GAP_PREFIX, |v| {
        postcard::from_bytes(v).map_err(|e| StorageError::Corrupt(format!("log gap: {e}")))
    })?;
    Ok(PeerProgress {
        cursors,
        flags,
        commits,
        gaps,
    })
}

/// Every `<prefix><peer>` meta entry, read by `read`.
fn per_peer<T>(
    table: &redb::ReadOnlyTable<&str, &[u8]>,
    prefix: &str,
    read: impl Fn(&[u8]) -> Result<T, StorageError>,
) -> Result<BTreeMap<String, T>, StorageError> {
    let mut found = BTreeMap::new();
    for entry in table.range(prefix..)? {
        let (key, value) = entry?;
        let Some(peer) = key.value().strip_prefix(prefix) else {
            break;
        };
        found.insert(peer.to_string(), read(value.value())?);
    }
    Ok(found)
}

/// Log bytes written so far and the applied vector.
fn load_progress(db: &Database) -> Result<(u64, BTreeMap<Actor, u64>), StorageError> {
    let txn = db.begin_read()?;
    let log_bytes = match txn.open_table(META)?.get(meta::LOG_BYTES)? {
        Some(v) => u64::from_be_bytes(v.value().try_into().unwrap_or([0; 8])),
        None => 0,
    };
    let mut applied = BTreeMap::new();
    for entry in txn.open_table(APPLIED)?.iter()? {
        let (origin, seq) = entry?;
        applied.insert(Actor::from_u128(origin.value()), seq.value());
    }
    Ok((log_bytes, applied))
}
