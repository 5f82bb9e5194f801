//! One shared read snapshot for point reads (key states, idempotency records), reused until the
//! next commit.
//!
//! Opening a read transaction and its table cost more than the lookup itself: about half of a
//! GET's storage time, and a write to a key not yet cached, or with an `Idempotency-Key`, pays
//! it too. Point reads share the latest snapshot instead, but only where a fresh transaction
//! would see exactly the same data: the writer makes the generation odd before each commit
//! (group commits, and those that move the overlay's key states in) and even after it,
//! and a snapshot is shared only if no commit started or ended while it was opened. A read
//! that overlaps a commit opens its own, as every read did before. The writer drops the shared
//! snapshot when a commit starts, so it never pins pages that commits free.

use super::tables::{IDEMPOTENCY, KEYS};
use super::StorageError;
use redb::{Database, ReadOnlyTable, ReadableDatabase, WriteTransaction};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The tables point reads use, as of one read snapshot.
pub struct Snapshot {
    /// Key states.
    pub keys: ReadOnlyTable<(&'static str, &'static str), &'static [u8]>,
    /// Idempotency records.
    pub idempotency: ReadOnlyTable<u128, &'static [u8]>,
}

impl Snapshot {
    fn open(db: &Database) -> Result<Self, StorageError> {
        let txn = db.begin_read()?;
        Ok(Self {
            keys: txn.open_table(KEYS)?,
            idempotency: txn.open_table(IDEMPOTENCY)?,
        })
    }
}

/// The latest shared snapshot and the commit generation it shows.
#[derive(Default)]
pub struct Snapshots {
    /// Even between commits, odd while one is in progress.
    generation: AtomicU64,
    latest: Mutex<Option<(u64, Arc<Snapshot>)>>,
}

impl Snapshots {
    /// The tables as a read transaction opened now would see them.
    pub fn latest(&self, db: &Database) -> Result<Arc<Snapshot>, StorageError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let settled = generation.is_multiple_of(2);
        if settled {
            let shared = self.latest.lock().ok().and_then(|latest| latest.clone());
            if let Some((at, snapshot)) = shared {
                if at == generation {
                    return Ok(snapshot);
                }
            }
        }
        let snapshot = Arc::new(Snapshot::open(db)?);
        // A commit that started meanwhile may or may not be in it: then it is not shared.
        if settled && self.generation.load(Ordering::SeqCst) == generation {
            if let Ok(mut latest) = self.latest.lock() {
                *latest = Some((generation, snapshot.clone()));
            }
        }
        Ok(snapshot)
    }

    /// Commits `txn` between [`Self::commit_starts`] and [`Self::commit_ended`].
    pub fn commit(&self, txn: WriteTransaction) -> Result<(), redb::CommitError> {
        self.commit_starts();
        let committed = txn.commit();
        self.commit_ended();
        committed
    }

    /// Before a commit: from now on no snapshot is shared until it has ended.
    pub fn commit_starts(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let released = self.latest.lock().ok().and_then(|mut latest| latest.take());
        drop(released);
    }

    /// After a commit, whether it succeeded or not.
    pub fn commit_ended(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("s.redb")).expect("db");
        let txn = db.begin_write().expect("txn");
        txn.open_table(IDEMPOTENCY).expect("table");
        txn.commit().expect("commit");
        (dir, db)
    }

    fn put(db: &Database, snapshots: &Snapshots, key: &str, value: &[u8]) {
        let txn = db.begin_write().expect("txn");
        txn.open_table(KEYS)
            .expect("table")
            .insert(("b", key), value)
            .expect("insert");
        snapshots.commit(txn).expect("commit");
    }

    fn get(db: &Database, snapshots: &Snapshots, key: &str) -> Option<Vec<u8>> {
        let snapshot = snapshots.latest(db).expect("snapshot");
        let value = snapshot.keys.get(("b", key)).expect("get");
        value.map(|v| v.value().to_vec())
    }

    #[test]
    fn a_shared_snapshot_is_reused_until_the_next_commit_and_never_after() {
        let (_dir, db) = db();
        let snapshots = Snapshots::default();
        put(&db, &snapshots, "k", b"1");
        let first = snapshots.latest(&db).expect("snapshot");
        let again = snapshots.latest(&db).expect("snapshot");
        assert!(Arc::ptr_eq(&first, &again), "no commit between: shared");
        put(&db, &snapshots, "k", b"2");
        assert_eq!(get(&db, &snapshots, "k").as_deref(), Some(&b"2"[..]));
        put(&db, &snapshots, "new", b"3");
        assert_eq!(get(&db, &snapshots, "new").as_deref(), Some(&b"3"[..]));
        assert_eq!(get(&db, &snapshots, "k").as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn a_snapshot_opened_during_a_commit_is_not_shared() {
        let (_dir, db) = db();
        let snapshots = Snapshots::default();
        put(&db, &snapshots, "k", b"1");
        let txn = db.begin_write().expect("txn");
        txn.open_table(KEYS)
            .expect("table")
            .insert(("b", "k"), &b"2"[..])
            .expect("insert");
        snapshots.commit_starts();
        let during = snapshots.latest(&db).expect("snapshot");
        txn.commit().expect("commit");
        // Not ended yet: still nothing shared, and fresh reads see the commit.
        assert_eq!(get(&db, &snapshots, "k").as_deref(), Some(&b"2"[..]));
        snapshots.commit_ended();
        let after = snapshots.latest(&db).expect("snapshot");
        assert!(!Arc::ptr_eq(&during, &after));
        assert_eq!(get(&db, &snapshots, "k").as_deref(), Some(&b"2"[..]));
    }
}
