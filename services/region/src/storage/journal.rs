//! The write-ahead journal: what makes a group commit durable.
//!
//! A durable redb commit rewrites one B-tree leaf (and its path) per random key it touches and
//! writes each page back separately; on this kind of disk that dominated the cost of a write.
//! So a group commit's changes go twice: as one record appended to the journal, a plain file
//! written in place and made durable with one `fdatasync` (a single sequential write), and into
//! the state database in a non-durable transaction, visible to readers at once. The state
//! database is made durable in bulk at checkpoints, where a leaf written many times since is
//! written once, and the journal starts over from the top of its file. After a crash,
//! [`Journal::open`] replays the records past the last checkpoint, so every acknowledged write
//! is back before anything reads.
//!
//! A record is a header (payload length, record number, checksum of both and the payload) and
//! the postcard-encoded ops. The file is reused after each checkpoint, so behind the newest
//! record may lie a torn write or records of an older round; both end the journal: a torn
//! write fails its checksum, and an older record's number does not follow. Only a suffix that
//! nobody was answered for can be torn, because every acknowledged append returned from an
//! `fdatasync` that covered everything written before it.

use super::ops::{Op, StateTables};
use super::tables::{meta, META};
use super::StorageError;
use redb::{Database, Durability};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// A checkpoint is taken once this much journal has accumulated, or after the configured
/// interval if anything was journaled since.
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// The file grows in zero-filled steps of this size, so most appends write inside it and their
/// `fdatasync` has no file size to update.
const GROWTH_BYTES: u64 = 4 * 1024 * 1024;
/// Record header: payload length (u32), record number (u64), checksum (u64), little-endian.
const HEADER_BYTES: usize = 20;

/// The journal file and its position relative to the state database.
pub struct Journal {
    file: File,
    /// Number of the last record appended.
    last: u64,
    /// Where the next record goes.
    offset: u64,
    /// Bytes of the file known to exist (zero-filled or written).
    allocated: u64,
    last_checkpoint: Instant,
    interval: Duration,
}

impl Journal {
    /// Opens (or creates) the journal beside the state database and replays into `state`
    /// every record its last checkpoint does not hold, then checkpoints.
    pub fn open(path: &Path, state: &Database, interval: Duration) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let allocated = file.metadata().map_err(io)?.len();
        if allocated == 0 {
            // A new file: its directory entry must be durable before any record relies on it.
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let upto = checkpointed_upto(state)?;
        let started = Instant::now();
        let replayed = replay(&file, state, upto)?;
        let mut journal = Self {
            file,
            last: upto + replayed,
            offset: 0,
            allocated,
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
        let number = self.last + 1;
        let record = encode(number, ops)?;
        let end = self.offset + record.len() as u64;
        if end > self.allocated {
            self.grow(end)?;
        }
        self.file.write_all_at(&record, self.offset).map_err(io)?;
        if durable {
            self.file.sync_data().map_err(io)?;
        }
        self.last = number;
        self.offset = end;
        Ok(record.len())
    }

    /// Zero-fills the file up to at least `end`, in [`GROWTH_BYTES`] steps. Zeros read back
    /// as "no record", so the region past the last record never looks like one.
    fn grow(&mut self, end: u64) -> Result<(), StorageError> {
        let target = end.div_ceil(GROWTH_BYTES) * GROWTH_BYTES;
        let zeros = vec![0u8; (target - self.allocated) as usize];
        self.file.write_all_at(&zeros, self.allocated).map_err(io)?;
        self.allocated = target;
        Ok(())
    }

    /// Whether enough has been journaled since the last checkpoint to take one.
    pub fn checkpoint_due(&self) -> bool {
        self.offset >= CHECKPOINT_BYTES
            || (self.offset > 0 && self.last_checkpoint.elapsed() >= self.interval)
    }

    /// Journal bytes not yet covered by a checkpoint.
    pub fn pending_bytes(&self) -> u64 {
        self.offset
    }

    /// Makes the state database durable up to the last record appended, then starts the
    /// journal over. Every non-durable state commit so far must hold what its record says.
    pub fn checkpoint(&mut self, state: &Database) -> Result<(), StorageError> {
        let txn = state.begin_write()?;
        txn.open_table(META)?
            .insert(meta::JOURNAL_UPTO, &self.last.to_be_bytes()[..])?;
        txn.commit()?;
        // The checkpoint is durable, so every record in the file is obsolete: overwrite them.
        self.offset = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }
}

fn io(error: std::io::Error) -> StorageError {
    StorageError::Redb(error.into())
}

/// One record: header, then the encoded ops.
fn encode(number: u64, ops: &[Op<'_>]) -> Result<Vec<u8>, StorageError> {
    let mut record = postcard::to_extend(ops, vec![0u8; HEADER_BYTES])
        .map_err(|e| StorageError::Corrupt(format!("journal record: {e}")))?;
    let len = u32::try_from(record.len() - HEADER_BYTES)
        .map_err(|_| StorageError::Corrupt("journal record over 4 GiB".into()))?;
    record[0..4].copy_from_slice(&len.to_le_bytes());
    record[4..12].copy_from_slice(&number.to_le_bytes());
    let sum = checksum(&record[0..12], &record[HEADER_BYTES..]);
    record[12..20].copy_from_slice(&sum.to_le_bytes());
    Ok(record)
}

fn checksum(head: &[u8], payload: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(head);
    hasher.update(payload);
    hasher.digest()
}

/// The next intact record, or `None` at the end of the journal (zeros, a torn write, the end
/// of the file). Only a failing read is an error.
fn next_record(reader: &mut impl Read) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
    let mut header = [0u8; HEADER_BYTES];
    if !read_full(reader, &mut header)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut number = [0u8; 8];
    number.copy_from_slice(&header[4..12]);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&header[12..20]);
    if len == 0 {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    if !read_full(reader, &mut payload)? {
        return Ok(None);
    }
    if checksum(&header[0..12], &payload) != u64::from_le_bytes(sum) {
        return Ok(None);
    }
    Ok(Some((u64::from_le_bytes(number), payload)))
}

/// Fills `buf`; false if the file ends first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<bool, StorageError> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io(e)),
    }
}

/// The last journal record the state database holds durably.
fn checkpointed_upto(state: &Database) -> Result<u64, StorageError> {
    super::read_meta_u64(state, meta::JOURNAL_UPTO)
}

/// Applies the records after `upto` to `state` in one transaction (made durable by the
/// checkpoint that follows). Returns how many were applied.
///
/// Records the checkpoint holds may lead the file (a crash before the first append after a
/// checkpoint) and are skipped; the first one it lacks must be `upto + 1`, else the journal
/// belongs to another copy of the state database and is refused. From there the journal ends
/// at the first record that does not follow.
fn replay(file: &File, state: &Database, upto: u64) -> Result<u64, StorageError> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut txn = state.begin_write()?;
    txn.set_durability(Durability::None)?;
    let mut replayed = 0;
    let mut skipped = false;
    {
        let mut tables = StateTables::new(&txn);
        while let Some((number, payload)) = next_record(&mut reader)? {
            let expected = upto + replayed + 1;
            if number < expected {
                if replayed == 0 {
                    skipped = true;
                    continue;
                }
                break; // An older round's record behind the newest one.
            }
            if number > expected {
                if skipped {
                    // The first record after the checkpoint never reached the disk, so none
                    // after it was acknowledged: one found behind the older round is not owed.
                    break;
                }
                // No crash produces this (a torn write fails its checksum): another journal.
                return Err(StorageError::Corrupt(format!(
                    "journal record {number} does not follow record {}",
                    expected - 1
                )));
            }
            let ops: Vec<Op<'_>> = postcard::from_bytes(&payload)
                .map_err(|e| StorageError::Corrupt(format!("journal record {number}: {e}")))?;
            for op in &ops {
                tables.apply(op)?;
            }
            replayed += 1;
        }
    }
    txn.commit()?;
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tables::KEYS;
    use redb::{ReadableDatabase, ReadableTable};

    fn put(key: &str, state: &[u8]) -> Op<'static> {
        Op::PutKey {
            bucket: "b".into(),
            key: key.to_string().into(),
            state: state.to_vec().into(),
        }
    }

    /// Record `n`: puts key `k<n>` with state `n`.
    fn record(n: u64) -> Vec<u8> {
        encode(n, &[put(&format!("k{n}"), &n.to_be_bytes())]).expect("encode")
    }

    /// Writes journal records `numbers` one after another, then `tail`, into `path`.
    fn journal_with(path: &Path, numbers: &[u64], tail: &[u8]) {
        let mut bytes: Vec<u8> = numbers.iter().flat_map(|n| record(*n)).collect();
        bytes.extend_from_slice(tail);
        std::fs::write(path, bytes).expect("journal file");
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

    fn state_of_any(db: &Database) -> usize {
        let txn = db.begin_read().expect("read");
        match txn.open_table(KEYS) {
            Ok(table) => table.iter().expect("iter").count(),
            Err(_) => 0,
        }
    }

    fn set_upto(state: &Database, upto: u64) {
        let txn = state.begin_write().expect("txn");
        txn.open_table(META)
            .expect("meta")
            .insert(meta::JOURNAL_UPTO, &upto.to_be_bytes()[..])
            .expect("upto");
        txn.commit().expect("commit");
    }

    #[test]
    fn replay_applies_what_the_checkpoint_lacks_then_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        let path = dir.path().join("journal.wal");
        journal_with(&path, &[1, 2, 3], &[]);
        let journal = Journal::open(&path, &state, Duration::MAX).expect("replayed");
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
        set_upto(&state, 2);
        let path = dir.path().join("journal.wal");
        journal_with(&path, &[1, 2, 3], &[]);
        Journal::open(&path, &state, Duration::MAX).expect("replayed");
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
        let path = dir.path().join("journal.wal");
        journal_with(&path, &[5, 6], &[]);
        let opened = Journal::open(&path, &state, Duration::MAX);
        assert!(matches!(opened, Err(StorageError::Corrupt(_))));
        assert_eq!(
            state_of_any(&state),
            0,
            "nothing of a foreign journal is applied"
        );
    }

    #[test]
    fn a_record_missing_from_the_middle_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        let path = dir.path().join("journal.wal");
        journal_with(&path, &[1, 3], &[]);
        let opened = Journal::open(&path, &state, Duration::MAX);
        assert!(matches!(opened, Err(StorageError::Corrupt(_))));
        assert_eq!(state_of_any(&state), 0);
    }

    #[test]
    fn a_record_behind_the_older_round_was_never_acknowledged() {
        // Record 2 (the first after the checkpoint at 1) was lost; record 3 landed behind
        // record 1 of the older round, but its fdatasync never returned.
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        set_upto(&state, 1);
        let path = dir.path().join("journal.wal");
        journal_with(&path, &[1, 3], &[]);
        let journal = Journal::open(&path, &state, Duration::MAX).expect("opened");
        assert_eq!(state_of_any(&state), 0);
        assert_eq!(journal.last, 1);
    }

    #[test]
    fn a_torn_last_record_ends_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        let path = dir.path().join("journal.wal");
        let torn = record(3);
        let mut flipped = record(3);
        let at = flipped.len() - 1;
        flipped[at] ^= 1;
        for tail in [&torn[..torn.len() - 1], &flipped[..], &torn[..7]] {
            journal_with(&path, &[1, 2], tail);
            let mut journal = Journal::open(&path, &state, Duration::MAX).expect("replayed");
            assert_eq!(state_of(&state, "k2"), Some(2u64.to_be_bytes().to_vec()));
            assert_eq!(state_of(&state, "k3"), None, "a torn record is not applied");
            assert_eq!(journal.last, 2);
            journal.append(&[put("k3", b"x")], true).expect("append");
            assert_eq!(journal.last, 3, "numbering continues after the torn record");
            set_upto(&state, 0);
        }
    }

    #[test]
    fn a_reused_file_replays_only_the_newest_round() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        let path = dir.path().join("journal.wal");
        let mut journal = Journal::open(&path, &state, Duration::MAX).expect("opened");
        let long = vec![7u8; 3000];
        for n in 1..=3 {
            journal
                .append(&[put(&format!("old{n}"), &long)], false)
                .expect("append");
        }
        journal.checkpoint(&state).expect("checkpoint");
        // Shorter than what it overwrites: the older round's records still follow it.
        journal.append(&[put("new4", b"4")], true).expect("append");
        journal.append(&[put("new5", b"5")], true).expect("append");
        drop(journal);

        let journal = Journal::open(&path, &state, Duration::MAX).expect("replayed");
        assert_eq!(state_of(&state, "new4"), Some(b"4".to_vec()));
        assert_eq!(state_of(&state, "new5"), Some(b"5".to_vec()));
        assert_eq!(
            state_of(&state, "old3"),
            None,
            "the checkpoint held the older round (it was never applied here), so none of it is replayed"
        );
        assert_eq!(journal.last, 5);
    }

    #[test]
    fn the_file_grows_in_zeroed_steps_and_is_reused_after_a_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        let path = dir.path().join("journal.wal");
        let mut journal = Journal::open(&path, &state, Duration::MAX).expect("opened");
        journal.append(&[put("a", b"1")], true).expect("append");
        let size = std::fs::metadata(&path).expect("size").len();
        assert_eq!(size, GROWTH_BYTES);
        journal.checkpoint(&state).expect("checkpoint");
        journal.append(&[put("b", b"2")], true).expect("append");
        let second = encode(2, &[put("b", b"2")]).expect("encode");
        assert_eq!(
            journal.pending_bytes(),
            second.len() as u64,
            "written from the top"
        );
        assert_eq!(std::fs::metadata(&path).expect("size").len(), size);
    }
}
