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
//! A record is a header (payload length, record number, round, checksum of all three and the
//! payload) and the postcard-encoded ops. Every start and every checkpoint begins a new round:
//! a random number, written from the top of the file. Replay reads one round from the top and
//! ends at the first record that is torn (its checksum fails), belongs to another round (left
//! behind by an earlier, longer one, or by a session that crashed before its records reached
//! the disk) or does not continue the numbering. Only a suffix that nobody was answered for can
//! be torn, because every acknowledged append returned from an `fdatasync` that covered
//! everything written before it.

use super::ops::{Op, StateTables};
use super::tables::{meta, META};
use super::StorageError;
use prometheus::IntCounter;
use redb::{Database, Durability};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A checkpoint is taken once this much journal has accumulated, or after the configured
/// interval if anything was journaled since.
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// The file grows in zero-filled steps of this size, so most appends write inside it and their
/// `fdatasync` has no file size to update. A filler thread writes the steps ahead of the
/// appends (see [`Journal::fill_ahead`]).
const GROWTH_BYTES: u64 = 4 * 1024 * 1024;
/// The filler writes zeros in pieces of this size, syncing each, so that an append's
/// `fdatasync` never has more of its zeros to flush than one piece.
const FILL_PIECE_BYTES: u64 = 256 * 1024;
/// Record header, little-endian: payload length (u32), record number (u64), round (u64),
/// checksum (u64) of the first three and the payload.
const HEADER_BYTES: usize = 28;

/// The journal file and its position relative to the state database.
pub struct Journal {
    file: File,
    path: PathBuf,
    /// Number of the last record appended.
    last: u64,
    /// Where the next record goes.
    offset: u64,
    /// The round records are written in now.
    round: u64,
    /// How much of the file exists, shared with the filler.
    extent: Arc<Extent>,
    /// The thread zero-filling ahead of the appends, once started.
    filler: Option<Filler>,
    /// Set by the first failed write or sync, after which nothing is appended or checkpointed:
    /// the kernel may have dropped the pages that failed, so a later successful `fdatasync`
    /// would not prove that the records before it are on disk.
    poisoned: Option<String>,
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
            .open(path)?;
        let allocated = file.metadata()?.len();
        if allocated == 0 {
            // A new file: its directory entry must be durable before any record relies on it.
            super::sync_dir_of(path)?;
        }
        let upto = checkpointed_upto(state)?;
        let started = Instant::now();
        let replayed = replay(&file, allocated, state, upto)?;
        let mut journal = Self {
            file,
            path: path.to_path_buf(),
            last: upto + replayed,
            offset: 0,
            round: new_round(),
            extent: Arc::new(Extent {
                allocated: AtomicU64::new(allocated),
                filling: Mutex::new(()),
            }),
            filler: None,
            poisoned: None,
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
        self.check()?;
        let number = self.last + 1;
        let record = encode(number, self.round, ops)?;
        let end = self.offset + record.len() as u64;
        if let Err(error) = self.write(&record, end, durable) {
            self.poison(format!("journal write failed: {error}"));
            return Err(error.into());
        }
        self.last = number;
        self.offset = end;
        Ok(record.len())
    }

    fn write(&mut self, record: &[u8], end: u64, durable: bool) -> std::io::Result<()> {
        self.ensure_allocated(end)?;
        self.file.write_all_at(record, self.offset)?;
        if durable {
            self.file.sync_data()?;
        }
        if let Some(filler) = &mut self.filler {
            filler.keep_ahead_of(end);
        }
        Ok(())
    }

    /// Zero-fills the file up to at least `end`, in whole steps, where the filler has not:
    /// zeros read back as "no record".
    fn ensure_allocated(&self, end: u64) -> std::io::Result<()> {
        if end <= self.extent.allocated.load(Ordering::Acquire) {
            return Ok(());
        }
        let filled = self
            .extent
            .fill_to(&self.file, end.div_ceil(GROWTH_BYTES) * GROWTH_BYTES)?;
        if let Some(filler) = &self.filler {
            filler.inline.inc_by(filled);
        }
        Ok(())
    }

    /// Starts zero-filling the file ahead of the appends on a thread of its own, counting the
    /// bytes it fills in `ahead` and those appends still fill themselves in `inline`. Growing
    /// inline cost a busy region's first round a stall every few megabytes: the append wrote
    /// a whole step of zeros, and its `fdatasync` flushed them.
    pub fn fill_ahead(&mut self, ahead: IntCounter, inline: IntCounter) -> std::io::Result<()> {
        // An open file of its own, not a clone of the appends': the kernel reports a failed
        // write-back to the first sync on each open file, so the appends' next `fdatasync`
        // still fails when the filler's sync met the error first.
        let file = OpenOptions::new().write(true).open(&self.path)?;
        let (wanted, targets) = mpsc::channel();
        let extent = self.extent.clone();
        let thread = std::thread::Builder::new()
            .name("journal-filler".into())
            .spawn(move || fill(&file, &extent, &targets, &ahead))?;
        let mut filler = Filler {
            wanted: Some(wanted),
            requested: self.extent.allocated.load(Ordering::Acquire),
            inline,
            thread: Some(thread),
        };
        // A new file gets its first steps before the first append needs them.
        filler.keep_ahead_of(self.offset);
        self.filler = Some(filler);
        Ok(())
    }

    /// Stops the filler (waiting for the piece it is writing), before the state database's
    /// lock goes: a journal opened next on the file must not find it still writing zeros.
    pub fn stop_filling(&mut self) {
        self.filler = None;
    }

    /// Stops all further appends and checkpoints: the last append's changes may be missing
    /// from the state database (or from the disk), and only a restart's replay is trusted.
    pub fn poison(&mut self, why: String) {
        tracing::error!(%why, "journal stopped; the region recovers from it on restart");
        self.poisoned.get_or_insert(why);
    }

    fn check(&self) -> Result<(), StorageError> {
        match &self.poisoned {
            Some(why) => Err(StorageError::CommitFailed(format!(
                "{why}; restart the region to recover"
            ))),
            None => Ok(()),
        }
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

    /// Makes the state database durable up to the last record appended, then starts a new
    /// round. Every non-durable state commit so far must hold what its record says.
    pub fn checkpoint(&mut self, state: &Database) -> Result<(), StorageError> {
        self.check()?;
        let txn = state.begin_write()?;
        txn.open_table(META)?
            .insert(meta::JOURNAL_UPTO, &self.last.to_be_bytes()[..])?;
        txn.commit()?;
        // The checkpoint is durable, so every record in the file is obsolete: overwrite them.
        self.offset = 0;
        self.round = new_round();
        self.last_checkpoint = Instant::now();
        Ok(())
    }
}

/// How much of the journal file exists, shared by the appends and the filler.
struct Extent {
    /// Bytes of the file that exist (zero-filled or written); it only grows. Appends write
    /// only below it, and read it without the lock.
    allocated: AtomicU64,
    /// Held by whoever writes zeros past `allocated`.
    filling: Mutex<()>,
}

impl Extent {
    /// Zero-fills `file` from the mark up to `upto`, if short of it; the bytes written.
    fn fill_to(&self, file: &File, upto: u64) -> std::io::Result<u64> {
        let _filling = self
            .filling
            .lock()
            .map_err(|_| std::io::Error::other("the journal filler panicked"))?;
        let from = self.allocated.load(Ordering::Acquire);
        if upto <= from {
            return Ok(0);
        }
        write_zeros(file, from, upto)?;
        self.allocated.store(upto, Ordering::Release);
        Ok(upto - from)
    }
}

/// The zero-filling thread, as the journal sees it.
struct Filler {
    /// Where the file should be zero-filled up to (`None` once stopping).
    wanted: Option<mpsc::Sender<u64>>,
    /// The highest target sent.
    requested: u64,
    /// Bytes zero-filled by appends themselves, because the filler had not got that far.
    inline: IntCounter,
    thread: Option<JoinHandle<()>>,
}

impl Filler {
    /// Asks for the file to be filled two steps past `end` once less than one is left.
    fn keep_ahead_of(&mut self, end: u64) {
        if end + GROWTH_BYTES <= self.requested {
            return;
        }
        let target = (end.div_ceil(GROWTH_BYTES) + 2) * GROWTH_BYTES;
        if let Some(wanted) = &self.wanted {
            // A filler gone (after a failed write) leaves the growing to the appends.
            if wanted.send(target).is_ok() {
                self.requested = target;
            }
        }
    }
}

impl Drop for Filler {
    /// Waits for the thread: it must not write zeros past a mark that a journal opened next
    /// on the same file no longer keeps.
    fn drop(&mut self) {
        self.wanted = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The filler's loop: zero-fills up to each target, a piece at a time, until the journal is
/// dropped. A failed write ends it (the appends then fill, and meet the failure themselves).
fn fill(file: &File, extent: &Extent, targets: &mpsc::Receiver<u64>, ahead: &IntCounter) {
    while let Ok(mut target) = targets.recv() {
        let _span = tracing::debug_span!("journal_zero_fill", upto = target).entered();
        loop {
            match targets.try_recv() {
                Ok(later) => target = target.max(later),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
            let from = extent.allocated.load(Ordering::Acquire);
            if from >= target {
                break;
            }
            match extent.fill_to(file, (from + FILL_PIECE_BYTES).min(target)) {
                // The appends got past the piece meanwhile: nothing written, nothing to sync.
                Ok(0) => continue,
                Ok(filled) => ahead.inc_by(filled),
                Err(error) => {
                    tracing::warn!(%error, "journal zero-fill failed; appends grow the file");
                    return;
                }
            }
            if let Err(error) = file.sync_data() {
                tracing::warn!(%error, "journal zero-fill sync failed; appends grow the file");
                return;
            }
        }
    }
}

/// Writes zeros over `[from, to)` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    file.write_all_at(&vec![0u8; (to - from) as usize], from)
}

/// A round number no earlier round of this file is likely to have used.
fn new_round() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// One record: header, then the encoded ops.
fn encode(number: u64, round: u64, ops: &[Op<'_>]) -> Result<Vec<u8>, StorageError> {
    let mut record = postcard::to_extend(ops, vec![0u8; HEADER_BYTES])
        .map_err(|e| StorageError::Corrupt(format!("journal record: {e}")))?;
    let len = u32::try_from(record.len() - HEADER_BYTES)
        .map_err(|_| StorageError::Corrupt("journal record over 4 GiB".into()))?;
    record[0..4].copy_from_slice(&len.to_le_bytes());
    record[4..12].copy_from_slice(&number.to_le_bytes());
    record[12..20].copy_from_slice(&round.to_le_bytes());
    let sum = checksum(&record[0..20], &record[HEADER_BYTES..]);
    record[20..28].copy_from_slice(&sum.to_le_bytes());
    Ok(record)
}

fn checksum(head: &[u8], payload: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(head);
    hasher.update(payload);
    hasher.digest()
}

/// One intact record read back.
struct Record {
    number: u64,
    round: u64,
    payload: Vec<u8>,
}

/// The next intact record, or `None` where the journal ends (zeros, a torn write, the end of
/// the file). `remaining` bytes are left in the file: a length beyond them is not a record (and
/// is never allocated). Only a failing read is an error.
fn next_record(
    reader: &mut impl Read,
    remaining: &mut u64,
) -> Result<Option<Record>, StorageError> {
    let mut header = [0u8; HEADER_BYTES];
    if *remaining < HEADER_BYTES as u64 || !read_full(reader, &mut header)? {
        return Ok(None);
    }
    *remaining -= HEADER_BYTES as u64;
    let field = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let len = u64::from(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let (number, round, sum) = (field(4), field(12), field(20));
    if len == 0 || len > *remaining {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    if !read_full(reader, &mut payload)? {
        return Ok(None);
    }
    *remaining -= len;
    if checksum(&header[0..20], &payload) != sum {
        return Ok(None);
    }
    Ok(Some(Record {
        number,
        round,
        payload,
    }))
}

/// Fills `buf`; false if the file ends first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<bool, StorageError> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The last journal record the state database holds durably.
fn checkpointed_upto(state: &Database) -> Result<u64, StorageError> {
    super::read_meta_u64(state, meta::JOURNAL_UPTO)
}

/// Applies the records after `upto` to `state` in one transaction (made durable by the
/// checkpoint that follows). Returns how many were applied.
///
/// The round at the top of the file is read. Records the checkpoint holds may lead it (a crash
/// before the first append after a checkpoint) and are skipped; the first one it lacks must be
/// `upto + 1`, else the journal belongs to another copy of the state database and is refused.
fn replay(file: &File, len: u64, state: &Database, upto: u64) -> Result<u64, StorageError> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut remaining = len;
    let mut txn = state.begin_write()?;
    txn.set_durability(Durability::None)?;
    let mut replayed = 0;
    let mut round = None;
    {
        let mut tables = StateTables::new(&txn);
        while let Some(record) = next_record(&mut reader, &mut remaining)? {
            if *round.get_or_insert(record.round) != record.round {
                break; // Left behind by an earlier round.
            }
            let (number, expected) = (record.number, upto + replayed + 1);
            if number < expected && replayed == 0 {
                continue;
            }
            if number != expected {
                // One round is numbered without gaps: this is not a crash's doing.
                return Err(StorageError::Corrupt(format!(
                    "journal record {number} does not follow record {}",
                    expected - 1
                )));
            }
            let ops: Vec<Op<'_>> = postcard::from_bytes(&record.payload)
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

    const ROUND: u64 = 0x5eed;
    const OLD_ROUND: u64 = 0x01d;

    fn put(key: &str, state: &[u8]) -> Op<'static> {
        Op::PutKey {
            bucket: "b".into(),
            key: key.to_string().into(),
            state: state.to_vec().into(),
        }
    }

    /// Record `n` of `round`: puts key `k<n>` with state `n`.
    fn record(n: u64, round: u64) -> Vec<u8> {
        encode(n, round, &[put(&format!("k{n}"), &n.to_be_bytes())]).expect("encode")
    }

    /// Records `numbers` of `round`, one after another.
    fn records(numbers: &[u64], round: u64) -> Vec<u8> {
        numbers.iter().flat_map(|n| record(*n, round)).collect()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        state: Database,
        path: std::path::PathBuf,
    }

    /// A state database whose checkpoint holds records up to `upto`, and a journal file.
    fn fixture(upto: u64, journal: &[u8]) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Database::create(dir.path().join("state.redb")).expect("state db");
        if upto > 0 {
            let txn = state.begin_write().expect("txn");
            txn.open_table(META)
                .expect("meta")
                .insert(meta::JOURNAL_UPTO, &upto.to_be_bytes()[..])
                .expect("upto");
            txn.commit().expect("commit");
        }
        let path = dir.path().join("journal.wal");
        std::fs::write(&path, journal).expect("journal file");
        Fixture {
            _dir: dir,
            state,
            path,
        }
    }

    fn open(f: &Fixture) -> Result<Journal, StorageError> {
        Journal::open(&f.path, &f.state, Duration::MAX)
    }

    /// The keys `k<n>` present in the state database, in order.
    fn applied(db: &Database) -> Vec<String> {
        let txn = db.begin_read().expect("read");
        match txn.open_table(KEYS) {
            Ok(table) => table
                .iter()
                .expect("iter")
                .map(|entry| entry.expect("entry").0.value().1.to_string())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    #[test]
    fn replay_applies_what_the_checkpoint_lacks_then_checkpoints() {
        let f = fixture(0, &records(&[1, 2, 3], ROUND));
        let journal = open(&f).expect("replayed");
        assert_eq!(applied(&f.state), ["k1", "k2", "k3"]);
        assert_eq!(checkpointed_upto(&f.state).expect("upto"), 3);
        assert_eq!(
            journal.last, 3,
            "numbering continues after the replayed records"
        );
        assert_eq!(journal.pending_bytes(), 0);
    }

    #[test]
    fn records_the_checkpoint_holds_are_skipped() {
        let f = fixture(2, &records(&[1, 2, 3], ROUND));
        open(&f).expect("replayed");
        assert_eq!(
            applied(&f.state),
            ["k3"],
            "1 and 2 are held by the checkpoint"
        );
    }

    #[test]
    fn a_journal_that_does_not_follow_the_checkpoint_is_refused() {
        let f = fixture(0, &records(&[5, 6], ROUND));
        assert!(matches!(open(&f), Err(StorageError::Corrupt(_))));
        assert!(applied(&f.state).is_empty(), "nothing of it is applied");
    }

    #[test]
    fn a_record_missing_from_the_middle_of_a_round_is_refused() {
        let f = fixture(0, &records(&[1, 3], ROUND));
        assert!(matches!(open(&f), Err(StorageError::Corrupt(_))));
        assert!(applied(&f.state).is_empty());
    }

    #[test]
    fn a_torn_last_record_ends_the_journal() {
        let whole = record(3, ROUND);
        let mut flipped = whole.clone();
        let at = flipped.len() - 1;
        flipped[at] ^= 1;
        for tail in [&whole[..whole.len() - 1], &flipped[..], &whole[..7]] {
            let mut bytes = records(&[1, 2], ROUND);
            bytes.extend_from_slice(tail);
            let f = fixture(0, &bytes);
            let mut journal = open(&f).expect("replayed");
            assert_eq!(
                applied(&f.state),
                ["k1", "k2"],
                "a torn record is not applied"
            );
            assert_eq!(journal.last, 2);
            journal.append(&[put("k3", b"x")], true).expect("append");
            assert_eq!(journal.last, 3, "the torn record's number is used again");
        }
    }

    #[test]
    fn an_older_round_behind_the_newest_one_is_not_replayed() {
        // Same-sized records, so the newest round ends exactly where an old record starts.
        let mut bytes = records(&[4, 5], ROUND);
        bytes.extend(records(&[6, 7], OLD_ROUND));
        let f = fixture(3, &bytes);
        let journal = open(&f).expect("replayed");
        assert_eq!(applied(&f.state), ["k4", "k5"]);
        assert_eq!(journal.last, 5);
    }

    #[test]
    fn a_record_of_a_session_that_crashed_before_its_first_reached_the_disk_is_ignored() {
        // Session A's records 1 and 2 never reached the disk, its unacknowledged 3 did. Session
        // B then wrote 1' and 2' from the top: A's 3 follows them by number, not by round.
        let mut bytes = records(&[1, 2], ROUND);
        bytes.extend(record(3, OLD_ROUND));
        let f = fixture(0, &bytes);
        open(&f).expect("replayed");
        assert_eq!(applied(&f.state), ["k1", "k2"]);

        // Nor is an old record whose number jumps taken for a foreign journal.
        let mut bytes = records(&[1], ROUND);
        bytes.extend(record(4, OLD_ROUND));
        let f = fixture(0, &bytes);
        open(&f).expect("an old round never refuses a start");
        assert_eq!(applied(&f.state), ["k1"]);
    }

    #[test]
    fn a_length_beyond_the_file_ends_the_journal() {
        let mut bytes = records(&[1], ROUND);
        let mut bogus = record(2, ROUND);
        bogus[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend(bogus);
        let f = fixture(0, &bytes);
        open(&f).expect("replayed");
        assert_eq!(applied(&f.state), ["k1"]);
    }

    #[test]
    fn appends_continue_a_new_round_from_the_top_after_each_start_and_checkpoint() {
        let f = fixture(0, &[]);
        let mut journal = open(&f).expect("opened");
        let long = vec![7u8; 3000];
        for n in 1..=3 {
            journal
                .append(&[put(&format!("old{n}"), &long)], n == 3)
                .expect("append");
        }
        journal.checkpoint(&f.state).expect("checkpoint");
        assert_eq!(journal.pending_bytes(), 0, "written from the top again");
        journal.append(&[put("k4", b"4")], true).expect("append");
        journal.append(&[put("k5", b"5")], true).expect("append");
        drop(journal);

        let journal = open(&f).expect("replayed");
        assert_eq!(
            applied(&f.state),
            ["k4", "k5"],
            "the checkpoint held the older round (never applied here), so none of it is replayed"
        );
        assert_eq!(journal.last, 5);
    }

    /// The fixture's journal with its filler started, and the bytes zero-filled by the filler
    /// and by appends.
    fn filling(f: &Fixture) -> (Journal, IntCounter, IntCounter) {
        let mut journal = open(f).expect("opened");
        let counter = |name| IntCounter::new(name, "bytes").expect("counter");
        let (filler, appends) = (counter("filler"), counter("appends"));
        journal
            .fill_ahead(filler.clone(), appends.clone())
            .expect("filler");
        (journal, filler, appends)
    }

    /// Waits (up to 10 s) until the file exists up to `upto`.
    fn await_allocated(journal: &Journal, upto: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while journal.extent.allocated.load(Ordering::Acquire) < upto && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn the_filler_grows_the_file_before_appends_need_it() {
        let f = fixture(0, &[]);
        let (mut journal, filler, appends) = filling(&f);
        await_allocated(&journal, 2 * GROWTH_BYTES);
        assert_eq!(
            filler.get(),
            2 * GROWTH_BYTES,
            "two steps ahead of a new file"
        );
        // Four steps' worth of appends, each given time to be filled ahead of.
        let state = vec![3u8; 512 * 1024];
        let count = 32;
        for n in 1..=count {
            journal
                .append(&[put(&format!("k{n:02}"), &state)], n % 8 == 0)
                .expect("append");
            await_allocated(&journal, journal.offset + GROWTH_BYTES);
        }
        assert_eq!(appends.get(), 0, "no append waited for zeros of its own");
        assert!(
            filler.get() >= journal.offset + GROWTH_BYTES,
            "kept at least a step ahead: filled {} for {} appended",
            filler.get(),
            journal.offset
        );
        drop(journal);
        open(&f).expect("replayed");
        assert_eq!(applied(&f.state).len(), count);
    }

    #[test]
    fn a_dropped_journal_stops_its_filler_at_once() {
        let f = fixture(0, &[]);
        let (mut journal, _, _) = filling(&f);
        if let Some(filler) = &mut journal.filler {
            filler.keep_ahead_of(1000 * GROWTH_BYTES); // 4 GiB: far more than it gets to
        }
        let started = Instant::now();
        drop(journal);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "drop waited {:?}",
            started.elapsed()
        );
        let size = std::fs::metadata(&f.path).expect("size").len();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            std::fs::metadata(&f.path).expect("size").len(),
            size,
            "nothing written after the drop"
        );
        assert!(size < 1000 * GROWTH_BYTES);
        // A journal opened next on the file appends safely.
        let mut journal = open(&f).expect("reopened");
        journal.append(&[put("k1", b"1")], true).expect("append");
        drop(journal);
        open(&f).expect("replayed");
        assert_eq!(applied(&f.state), ["k1"]);
    }

    #[test]
    fn appends_racing_the_filler_keep_every_record() {
        let f = fixture(0, &[]);
        let (mut journal, filler, appends) = filling(&f);
        // The filler is sent far ahead, piece by synced piece, while records of over two steps
        // each are appended: wherever one reaches past the filler, the append fills a step of
        // its own while the filler is still at work below (how often depends on the disk).
        if let Some(filler) = &mut journal.filler {
            filler.keep_ahead_of(14 * GROWTH_BYTES);
        }
        let (huge, small) = (vec![6u8; 9 * 1024 * 1024], vec![5u8; 300 * 1024]);
        let count = 8;
        for n in 1..=count {
            let state = if n % 2 == 1 { &huge } else { &small };
            journal
                .append(&[put(&format!("k{n:03}"), state)], n == count)
                .expect("append");
        }
        assert!(filler.get() > 0, "the filler filled some");
        drop(journal);
        open(&f).expect("replayed");
        assert_eq!(
            applied(&f.state).len(),
            count,
            "zeros never landed on a record (filled {} by the filler, {} by appends)",
            filler.get(),
            appends.get()
        );
    }

    #[test]
    fn records_past_the_first_growth_step_survive_a_reopen() {
        let f = fixture(0, &[]);
        let mut journal = open(&f).expect("opened");
        let big = vec![1u8; 1024 * 1024 + 17];
        for n in 1..=5 {
            journal
                .append(&[put(&format!("k{n}"), &big)], true)
                .expect("append");
        }
        let size = std::fs::metadata(&f.path).expect("size").len();
        assert_eq!(size, 2 * GROWTH_BYTES, "grown in whole steps");
        let tail = {
            let mut bytes = vec![0u8; 64];
            journal
                .file
                .read_exact_at(&mut bytes, journal.offset)
                .expect("read");
            bytes
        };
        assert!(tail.iter().all(|b| *b == 0), "zeros past the last record");
        drop(journal);
        open(&f).expect("replayed");
        assert_eq!(applied(&f.state), ["k1", "k2", "k3", "k4", "k5"]);
    }

    #[test]
    fn a_poisoned_journal_appends_and_checkpoints_nothing() {
        let f = fixture(0, &[]);
        let mut journal = open(&f).expect("opened");
        journal.append(&[put("k1", b"1")], true).expect("append");
        journal.poison("test".into());
        assert!(journal.append(&[put("k2", b"2")], true).is_err());
        assert!(journal.checkpoint(&f.state).is_err());
        assert_eq!(checkpointed_upto(&f.state).expect("upto"), 0);
        drop(journal);
        open(&f).expect("replayed");
        assert_eq!(applied(&f.state), ["k1"]);
    }
}
