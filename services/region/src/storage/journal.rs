//! The write-ahead journal: what makes a group commit durable.
//!
//! A durable redb commit rewrites one B-tree leaf (and its path) per random key it touches and
//! writes each page back separately; on this kind of disk that dominated the cost of a write.
//! So a group commit's changes go twice: as one record appended to the journal, a small redb
//! database of its own committed with `Durability::Immediate` (a page or two per commit), and
//! into the state database in a non-durable transaction, visible to readers at once. The state
//! database is made durable in bulk at checkpoints, where a leaf written many times since is
//! written once, and the journal is cut there. After a crash, [`Journal::open`] replays the
//! records past the last checkpoint, so every acknowledged write is back before anything reads.

use super::ops::{Op, StateTables};
use super::tables::{meta, JOURNAL, META};
use super::StorageError;
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use std::path::Path;
use std::time::{Duration, Instant};

/// A checkpoint is taken once this much journal has accumulated, or after the configured
/// interval if anything was journaled since.
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// The journal's own page cache: it only ever holds the records since the last checkpoint.
const JOURNAL_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The journal database and its position relative to the state database.
pub struct Journal {
    db: Database,
    /// Number of the last record appended.
    last: u64,
    /// Bytes appended since the last checkpoint.
    pending_bytes: u64,
    last_checkpoint: Instant,
    interval: Duration,
}

impl Journal {
    /// Opens (or creates) the journal beside the state database and replays into `state`
    /// every record its last checkpoint does not hold, then checkpoints.
    pub fn open(path: &Path, state: &Database, interval: Duration) -> Result<Self, StorageError> {
        let db = Database::builder()
            .set_cache_size(JOURNAL_CACHE_BYTES)
            .create(path)?;
        let upto = checkpointed_upto(state)?;
        let started = Instant::now();
        let (replayed, last) = replay(&db, state, upto)?;
        let mut journal = Self {
            db,
            last: last.max(upto),
            pending_bytes: 0,
            last_checkpoint: Instant::now(),
            interval,
        };
        if replayed > 0 {
            journal.checkpoint(state)?;
            tracing::info!(
                records = replayed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "journal replayed after an unclean stop"
            );
        }
        Ok(journal)
    }

    /// Appends one group commit's ops, made durable now if `durable`, else by the next
    /// durable append (a crash can only lose a suffix of the journal, never a middle).
    pub fn append(&mut self, ops: &[Op<'_>], durable: bool) -> Result<usize, StorageError> {
        let record = postcard::to_allocvec(ops)
            .map_err(|e| StorageError::Corrupt(format!("journal record: {e}")))?;
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(Durability::None)?;
        }
        txn.open_table(JOURNAL)?
            .insert(self.last + 1, record.as_slice())?;
        txn.commit()?;
        self.last += 1;
        self.pending_bytes += record.len() as u64;
        Ok(record.len())
    }

    /// Whether enough has been journaled since the last checkpoint to take one.
    pub fn checkpoint_due(&self) -> bool {
        self.pending_bytes >= CHECKPOINT_BYTES
            || (self.pending_bytes > 0 && self.last_checkpoint.elapsed() >= self.interval)
    }

    /// Journal bytes not yet covered by a checkpoint.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Makes the state database durable up to the last record appended, then cuts the journal.
    /// Every non-durable state commit so far must hold what its journal record says.
    pub fn checkpoint(&mut self, state: &Database) -> Result<(), StorageError> {
        let txn = state.begin_write()?;
        txn.open_table(META)?
            .insert(meta::JOURNAL_UPTO, &self.last.to_be_bytes()[..])?;
        txn.commit()?;
        // Not durable by itself: the next append makes it so, and until then replay skips
        // what the checkpoint holds anyway.
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        txn.open_table(JOURNAL)?
            .retain_in(..=self.last, |_, _| false)?;
        txn.commit()?;
        self.pending_bytes = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }
}

/// The last journal record the state database holds durably.
fn checkpointed_upto(state: &Database) -> Result<u64, StorageError> {
    super::read_meta_u64(state, meta::JOURNAL_UPTO)
}

/// Applies the records after `upto` to `state` in one transaction (made durable by the
/// checkpoint that follows). Returns how many were applied and the last record's number.
fn replay(journal: &Database, state: &Database, upto: u64) -> Result<(u64, u64), StorageError> {
    let read = journal.begin_read()?;
    let table = match read.open_table(JOURNAL) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, 0)),
        Err(e) => return Err(e.into()),
    };
    let last = table.last()?.map_or(0, |(k, _)| k.value());
    let mut txn = state.begin_write()?;
    txn.set_durability(Durability::None)?;
    let mut replayed = 0;
    {
        let mut tables = StateTables::new(&txn);
        for entry in table.range(upto.saturating_add(1)..)? {
            let (number, record) = entry?;
            // A gap means this journal belongs to another copy of the state database.
            if number.value() != upto + replayed + 1 {
                return Err(StorageError::Corrupt(format!(
                    "journal record {} does not follow the checkpoint at {}",
                    number.value(),
                    upto + replayed
                )));
            }
            let ops: Vec<Op<'_>> = postcard::from_bytes(record.value()).map_err(|e| {
                StorageError::Corrupt(format!("journal record {}: {e}", number.value()))
            })?;
            for op in &ops {
                tables.apply(op)?;
            }
            replayed += 1;
        }
    }
    txn.commit()?;
    Ok((replayed, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tables::KEYS;

    fn put(key: &str, state: &[u8]) -> Op<'static> {
        Op::PutKey {
            bucket: "b".into(),
            key: key.to_string().into(),
            state: state.to_vec().into(),
        }
    }

    /// Writes journal records `numbers`, each putting key `k<number>`, straight into `path`.
    fn journal_with(path: &Path, numbers: &[u64]) {
        let db = Database::create(path).expect("journal db");
        let txn = db.begin_write().expect("txn");
        {
            let mut table = txn.open_table(JOURNAL).expect("table");
            for n in numbers {
                let ops = vec![put(&format!("k{n}"), &n.to_be_bytes())];
                let record = postcard::to_allocvec(&ops).expect("encode");
                table.insert(*n, record.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    fn state_of(db: &Database, key: &str) -> Option<Vec<u8>> {
        let txn = db.begin_read().expect("read");
        let table = txn.open_table(KEYS).expect("keys");
        let value = table
            .get(("b", key))
            .expect("get")
            .map(|v| v.value().to_vec());
        value
    }

    #[test]
    fn replay_applies_what_the_checkpoint_lacks_then_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        journal_with(&dir.path().join("journal.redb"), &[1, 2, 3]);
        let journal = Journal::open(&dir.path().join("journal.redb"), &state, Duration::MAX)
            .expect("replayed");
        for n in 1u64..=3 {
            assert_eq!(
                state_of(&state, &format!("k{n}")),
                Some(n.to_be_bytes().to_vec())
            );
        }
        assert_eq!(checkpointed_upto(&state).expect("upto"), 3);
        assert_eq!(
            journal.last, 3,
            "numbering continues after the replayed records"
        );
        assert_eq!(journal.pending_bytes(), 0);
    }

    #[test]
    fn records_the_checkpoint_holds_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        let txn = state.begin_write().expect("txn");
        txn.open_table(META)
            .expect("meta")
            .insert(meta::JOURNAL_UPTO, &2u64.to_be_bytes()[..])
            .expect("upto");
        txn.commit().expect("commit");
        journal_with(&dir.path().join("journal.redb"), &[1, 2, 3]);
        Journal::open(&dir.path().join("journal.redb"), &state, Duration::MAX).expect("replayed");
        assert_eq!(
            state_of(&state, "k1"),
            None,
            "held by the checkpoint, not replayed"
        );
        assert_eq!(state_of(&state, "k3"), Some(3u64.to_be_bytes().to_vec()));
    }

    #[test]
    fn a_journal_that_does_not_follow_the_checkpoint_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        journal_with(&dir.path().join("journal.redb"), &[5, 6]);
        let opened = Journal::open(&dir.path().join("journal.redb"), &state, Duration::MAX);
        assert!(matches!(opened, Err(StorageError::Corrupt(_))));
        assert_eq!(
            state_of_any(&state),
            0,
            "nothing of a foreign journal is applied"
        );
    }

    fn state_of_any(db: &Database) -> usize {
        let txn = db.begin_read().expect("read");
        match txn.open_table(KEYS) {
            Ok(table) => table.iter().expect("iter").count(),
            Err(_) => 0,
        }
    }
}
