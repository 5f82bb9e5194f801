//! The single storage writer: group commit.
//!
//! One thread owns every write transaction. It takes whatever requests are queued (up to
//! `commit_max_batch`), applies them in one transaction of the state database, appends the
//! same changes durably to the journal (see `journal`), commits the transaction (visible, not
//! yet durable by itself), publishes the batch's key states to the overlay (see `overlay`;
//! they move into the state database before each checkpoint), and only then answers every
//! requester in the batch. Sequence numbers are assigned here, in commit order, so the
//! replication log never has a gap that a later commit fills.

use super::idempotency::IdempotencyRecord;
use super::journal::Journal;
use super::ops::{Op, StateTables};
use super::overlay::{Change, Entry, Overlay};
use super::snapshot::Snapshots;
use super::tables::{meta, KEYS};
use super::{BucketCache, KeyName, StorageError};
use crate::metrics::Metrics;
use meridian_shared::log::{LogEntry, LogRecord};
use meridian_shared::merkle::{entry_hash, segment_of, MerkleTree};
use meridian_shared::{Actor, BucketDef};
use redb::{Database, Durability};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// Requests that may wait for the writer before new writes are shed with 503.
const QUEUE_CAPACITY: usize = 65_536;
/// Most span links one commit or replication batch records.
pub const MAX_SPAN_LINKS: usize = 64;
/// Log entries removed per truncation request, so one commit never grows without bound.
const TRUNCATE_CHUNK: u64 = 20_000;
/// Longest a commit waits for a [`Gather`] to finish queueing (then it commits without it).
const GATHER_WAIT: Duration = Duration::from_micros(500);
/// A checkpoint is taken once the overlay holds about this much memory, whatever the journal.
const OVERLAY_BYTES: u64 = 64 * 1024 * 1024;
/// Overlay entries a due checkpoint moves into the state database without pause. Beyond that
/// it moves one chunk per group commit while writes are queued, so that they wait for one
/// chunk at a time, not for the whole overlay.
const FLUSH_AT_ONCE: u64 = 4096;
/// Overlay entries moved into the state database per transaction.
const DRAIN_CHUNK: usize = 512;

/// A key's new state, to be committed (with a replication-log entry when written here).
#[derive(Debug)]
pub struct KeyWrite {
    /// Bucket name.
    pub bucket: String,
    /// Key name.
    pub key: String,
    /// Canonical encoded state after the write.
    pub state: Vec<u8>,
    /// The state is a tombstone: recorded as a candidate for causally stable removal.
    pub tombstone: bool,
    /// `true` for a client write accepted here: it gets a sequence number and a log entry.
    /// `false` for a merge of a peer's state: the origin's own log carries it.
    pub logged: bool,
    /// The answer to store for an `Idempotency-Key`, in the same transaction.
    pub idempotency: Option<PendingIdempotency>,
    /// `traceparent` of the write's span (logged with it; the commit span links to it).
    pub trace: Option<String>,
}

/// An idempotency record before the writer has given it a sequence number.
#[derive(Debug)]
pub struct PendingIdempotency {
    /// The key (UUID as u128).
    pub id: u128,
    /// Request fingerprint.
    pub fingerprint: u64,
    /// Status of the answer.
    pub status: u16,
    /// Body of the answer.
    pub body: Vec<u8>,
}

/// How a bucket definition arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketSource {
    /// A client created it here: logged and replicated; a different existing one is a conflict.
    Client,
    /// A peer's log carried it: a different existing one is resolved deterministically.
    Replicated,
}

/// What creating a bucket did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketOutcome {
    /// Newly created.
    Created,
    /// An identical definition already existed.
    Identical,
    /// A different definition exists (returned).
    Conflict(BucketDef),
    /// Two regions created different definitions concurrently; this one won everywhere.
    Resolved(BucketDef),
}

/// Resolves once the write is durable (or failed); a writer that stopped without answering
/// is [`StorageError::WriterGone`].
#[must_use = "a write's outcome is known only by awaiting its ticket"]
pub struct WriteTicket<T>(oneshot::Receiver<Result<T, StorageError>>);

impl<T> Future for WriteTicket<T> {
    type Output = Result<T, StorageError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(StorageError::WriterGone)))
    }
}

impl<T> WriteTicket<T> {
    /// Blocks until the outcome is known (outside async code).
    pub fn wait(self) -> Result<T, StorageError> {
        self.0
            .blocking_recv()
            .unwrap_or(Err(StorageError::WriterGone))
    }
}

enum Request {
    Key(KeyWrite, oneshot::Sender<Result<u64, StorageError>>),
    Bucket(
        BucketDef,
        BucketSource,
        oneshot::Sender<Result<BucketOutcome, StorageError>>,
    ),
    Applied(Actor, u64, u64, oneshot::Sender<Result<u64, StorageError>>),
    /// A peer's idempotency record, stored as it comes (queued after the merge it answers).
    Idempotency(u128, IdempotencyRecord),
    Truncate(u64),
    Meta(String, Vec<u8>),
    ExpireIdempotency(u64),
    Purge(Purge, oneshot::Sender<Result<u64, StorageError>>),
    /// Take a checkpoint: if one is due (`None`: sent periodically, so an idle region takes
    /// one too), or now, answering when done (a clean stop leaves nothing to replay).
    Checkpoint(Option<oneshot::Sender<()>>),
}

/// Causally stable tombstones to remove, and candidates that are no longer tombstones.
#[derive(Debug, Default)]
pub struct Purge {
    /// `(bucket, key, state)`: removed only if the stored state is still exactly `state`.
    pub remove: Vec<(String, String, Vec<u8>)>,
    /// Candidates to forget (rewritten since; no longer tombstones).
    pub forget: Vec<(String, String)>,
}

/// When recent commits became durable: `(highest sequence number, wall-clock µs)`, oldest
/// first, bounded. Replication lag is measured from here, not from when the commit started.
pub type DurableTimes = Arc<std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>>;
/// Commits remembered in [`DurableTimes`].
const DURABLE_TIMES_KEPT: usize = 8192;

/// Peers' acknowledged positions not yet written: they ride along with the next commit
/// instead of costing one each.
type PendingCursors = Arc<Mutex<BTreeMap<String, u64>>>;

/// Callers queueing requests that belong in one commit, and the writer thread to wake when
/// the last of them is done.
#[derive(Clone, Default)]
struct Gathering {
    open: Arc<AtomicUsize>,
    writer: Arc<OnceLock<std::thread::Thread>>,
}

/// While held, the writer holds off starting a commit that carries a merge (up to
/// [`GATHER_WAIT`]), so requests queued from several threads, such as a replicated batch's
/// merges and its applied mark, share one commit and one fsync.
pub struct Gather(Gathering);

impl Drop for Gather {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(writer) = self.0.writer.get() {
                writer.unpark();
            }
        }
    }
}

/// Sending side of the writer's queue, plus what it publishes.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Request>,
    cursors: PendingCursors,
    gathering: Gathering,
    durable_times: DurableTimes,
    failures: Arc<AtomicU64>,
    last_seq: watch::Receiver<u64>,
    applied: watch::Receiver<BTreeMap<Actor, u64>>,
    alive: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    commits: Arc<AtomicU64>,
}

impl WriterHandle {
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Acquire)
    }

    pub(super) fn submit_key(&self, write: KeyWrite) -> Result<WriteTicket<u64>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Key(write, reply))?;
        Ok(WriteTicket(ticket))
    }

    pub(super) fn submit_bucket(
        &self,
        def: BucketDef,
        source: BucketSource,
    ) -> Result<WriteTicket<BucketOutcome>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Bucket(def, source, reply))?;
        Ok(WriteTicket(ticket))
    }

    pub(super) fn submit_applied(
        &self,
        origin: Actor,
        seq: u64,
        epoch: u64,
    ) -> Result<WriteTicket<u64>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Applied(origin, seq, epoch, reply))?;
        Ok(WriteTicket(ticket))
    }

    /// When `seq` became durable here (wall-clock µs), if it was committed recently.
    pub(super) fn durable_at(&self, seq: u64) -> Option<u64> {
        let times = self.durable_times.lock().ok()?;
        let index = times.partition_point(|(last, _)| *last < seq);
        times.get(index).map(|(_, at)| *at)
    }

    pub(super) fn failure_epoch(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    /// Holds off the next commit until the returned guard is dropped (or [`GATHER_WAIT`]).
    pub(super) fn gather(&self) -> Gather {
        self.gathering.open.fetch_add(1, Ordering::AcqRel);
        Gather(self.gathering.clone())
    }

    /// Written with the next commit; the last position given for a peer wins (it may move back).
    pub(super) fn submit_cursor(&self, peer: &str, seq: u64) -> Result<(), StorageError> {
        let mut cursors = self.cursors.lock().map_err(|_| StorageError::WriterGone)?;
        cursors.insert(peer.to_string(), seq);
        Ok(())
    }

    pub(super) fn submit_idempotency(
        &self,
        id: u128,
        record: IdempotencyRecord,
    ) -> Result<(), StorageError> {
        self.enqueue(Request::Idempotency(id, record))
    }

    pub(super) fn submit_truncate(&self, upto: u64) -> Result<(), StorageError> {
        self.enqueue(Request::Truncate(upto))
    }

    pub(super) fn submit_meta(&self, key: String, value: Vec<u8>) -> Result<(), StorageError> {
        self.enqueue(Request::Meta(key, value))
    }

    pub(super) fn submit_purge(&self, purge: Purge) -> Result<WriteTicket<u64>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Purge(purge, reply))?;
        Ok(WriteTicket(ticket))
    }

    /// Resolves once the state database is durable and the journal cut.
    pub(super) fn checkpoint(&self) -> Result<oneshot::Receiver<()>, StorageError> {
        let (done, waiter) = oneshot::channel();
        self.enqueue(Request::Checkpoint(Some(done)))?;
        Ok(waiter)
    }

    pub(super) fn submit_expire_idempotency(&self, before_ms: u64) -> Result<(), StorageError> {
        self.enqueue(Request::ExpireIdempotency(before_ms))
    }

    fn enqueue(&self, request: Request) -> Result<(), StorageError> {
        match self.tx.try_send(request) {
            Ok(()) => {
                self.metrics.commit_queue_depth.inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.writes_shed.inc();
                Err(StorageError::Overloaded)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(StorageError::WriterGone),
        }
    }

    pub(super) fn last_seq(&self) -> watch::Receiver<u64> {
        self.last_seq.clone()
    }

    pub(super) fn applied(&self) -> watch::Receiver<BTreeMap<Actor, u64>> {
        self.applied.clone()
    }

    pub(super) fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

/// What the writer starts from.
pub(super) struct WriterStart {
    pub last_seq: u64,
    pub log_bytes: u64,
    pub applied: BTreeMap<Actor, u64>,
    pub max_batch: usize,
    pub tree: SharedTree,
    pub commits: u64,
    pub journal: Journal,
    pub snapshots: Arc<Snapshots>,
    pub overlay: Arc<Overlay>,
}

/// The anti-entropy tree, updated by the writer after every commit.
pub type SharedTree = Arc<std::sync::Mutex<MerkleTree>>;

/// Starts the writer thread.
pub(super) fn spawn(
    db: Arc<Database>,
    start: WriterStart,
    buckets: BucketCache,
    metrics: Arc<Metrics>,
) -> std::io::Result<WriterHandle> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let (last_seq_tx, last_seq_rx) = watch::channel(start.last_seq);
    let (applied_tx, applied_rx) = watch::channel(start.applied);
    let alive = Arc::new(AtomicBool::new(true));
    let failures = Arc::new(AtomicU64::new(0));
    let durable_times = DurableTimes::default();
    let commits = Arc::new(AtomicU64::new(start.commits));
    let handle = WriterHandle {
        commits: commits.clone(),
        tx,
        durable_times: durable_times.clone(),
        failures: failures.clone(),
        last_seq: last_seq_rx,
        applied: applied_rx,
        alive: alive.clone(),
        metrics: metrics.clone(),
        cursors: PendingCursors::default(),
        gathering: Gathering::default(),
    };
    let mut writer = Writer {
        cursors: handle.cursors.clone(),
        gathering: handle.gathering.clone(),
        db,
        rx,
        max_batch: start.max_batch,
        buckets,
        metrics,
        last_seq: last_seq_tx,
        log_bytes: start.log_bytes,
        applied: applied_tx,
        alive,
        failures,
        durable_times,
        tree: start.tree,
        commits,
        journal: start.journal,
        snapshots: start.snapshots,
        overlay: start.overlay,
        drain_from: Bound::Unbounded,
        last_added: 0,
    };
    spawn_checkpoint_ticker(handle.tx.downgrade(), handle.metrics.clone())?;
    std::thread::Builder::new()
        .name("storage-writer".into())
        .spawn(move || {
            let _ = writer.gathering.writer.set(std::thread::current());
            writer.run()
        })?;
    Ok(handle)
}

/// Asks the writer once a second whether a checkpoint is due, until the writer is gone; a
/// weak sender so that it never keeps the writer running at shutdown.
fn spawn_checkpoint_ticker(
    tx: mpsc::WeakSender<Request>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("checkpoint-ticker".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let Some(tx) = tx.upgrade() else { break };
            if tx.try_send(Request::Checkpoint(None)).is_ok() {
                metrics.commit_queue_depth.inc();
            }
        })?;
    Ok(())
}

struct Writer {
    db: Arc<Database>,
    rx: mpsc::Receiver<Request>,
    max_batch: usize,
    buckets: BucketCache,
    metrics: Arc<Metrics>,
    last_seq: watch::Sender<u64>,
    log_bytes: u64,
    applied: watch::Sender<BTreeMap<Actor, u64>>,
    alive: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    durable_times: DurableTimes,
    tree: SharedTree,
    commits: Arc<AtomicU64>,
    journal: Journal,
    cursors: PendingCursors,
    gathering: Gathering,
    snapshots: Arc<Snapshots>,
    overlay: Arc<Overlay>,
    /// Where the next chunk of the overlay to move into the state database starts.
    drain_from: Bound<KeyName>,
    /// States the last group commit put into the overlay.
    last_added: usize,
}

/// Per-request result of a batch, sent only after the commit.
enum Outcome {
    Seq(u64),
    Bucket(BucketOutcome),
    None,
    /// Refused without failing the batch (an applied mark after a failed commit).
    Failed,
}

/// What a batch changed, published only after its commit.
struct Committed {
    outcomes: Vec<Outcome>,
    last_seq: u64,
    log_bytes: u64,
    applied: BTreeMap<Actor, u64>,
    /// `(segment, old entry hash XOR new)` of every key state this commit changed.
    tree_deltas: Vec<(u32, u64)>,
    /// The commit counter after this commit.
    commits: u64,
}

impl Writer {
    fn run(&mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        // Runs until every sender is gone (shutdown), answering everything queued before that.
        while let Some(first) = self.rx.blocking_recv() {
            batch.push(first);
            self.take_queued(&mut batch);
            self.await_gatherers(&mut batch);
            self.metrics.commit_queue_depth.sub(batch.len() as i64);
            let ticked = batch.iter().any(|r| matches!(r, Request::Checkpoint(_)));
            let waiting: Vec<oneshot::Sender<()>> = batch
                .iter_mut()
                .filter_map(|r| match r {
                    Request::Checkpoint(done) => done.take(),
                    _ => None,
                })
                .collect();
            // Checkpoint requests carry nothing to commit, but they write out pending cursors
            // of an otherwise idle region.
            batch.retain(|r| !matches!(r, Request::Checkpoint(_)));
            if !batch.is_empty() || ticked && self.cursors_pending() {
                self.group_commit(&mut batch);
            }
            self.checkpoint(!waiting.is_empty());
            for done in waiting {
                let _ = done.send(());
            }
        }
        if self.cursors_pending() {
            self.group_commit(&mut batch);
        }
        self.checkpoint(true);
        self.alive.store(false, Ordering::Release);
    }

    /// Adds whatever is queued now, up to the batch limit.
    fn take_queued(&mut self, batch: &mut Vec<Request>) {
        while batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
    }

    /// Keeps taking requests while a [`Gather`] is open, up to [`GATHER_WAIT`], if the batch
    /// holds a merge already: a batch of client writes alone is never held back for others.
    fn await_gatherers(&mut self, batch: &mut Vec<Request>) {
        let merging = batch
            .iter()
            .any(|r| matches!(r, Request::Key(write, _) if !write.logged));
        if !merging || self.gathering.open.load(Ordering::Acquire) == 0 {
            return;
        }
        let started = Instant::now();
        let deadline = started + GATHER_WAIT;
        while self.gathering.open.load(Ordering::Acquire) > 0 && batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(mpsc::error::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    // Woken by the last gatherer's drop.
                    std::thread::park_timeout(deadline - now);
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        // Whatever the last gatherer queued just before it let go.
        self.take_queued(batch);
        self.metrics
            .commit_gather_wait
            .inc_by(started.elapsed().as_secs_f64());
    }

    fn cursors_pending(&self) -> bool {
        self.cursors.lock().is_ok_and(|c| !c.is_empty())
    }

    /// Commits one batch and answers everyone in it.
    fn group_commit(&mut self, batch: &mut Vec<Request>) {
        // One commit carries many writes of many traces: traced only if one of them is
        // sampled; it continues the first and links the rest.
        let mut traces = batch
            .iter()
            .filter_map(|r| match r {
                Request::Key(write, _) => write.trace.as_deref(),
                _ => None,
            })
            .peekable();
        let span = if traces.peek().is_some() {
            let span = tracing::info_span!("group_commit", writes = batch.len());
            meridian_observability::propagation::continue_traces(&span, traces, MAX_SPAN_LINKS);
            span
        } else {
            tracing::Span::none()
        };
        let _span = span.entered();
        let started = Instant::now();
        let result = self.commit(batch);
        self.metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.commit_batch_size.observe(batch.len() as f64);
        match result {
            Ok(committed) => self.publish(batch, committed),
            Err(error) => self.fail(batch, error),
        }
    }

    /// Applies a batch: journaled durably, then committed to the state database, visible.
    fn commit(&mut self, batch: &[Request]) -> Result<Committed, StorageError> {
        let mut seq = *self.last_seq.borrow();
        let mut log_bytes = self.log_bytes;
        let mut applied = self.applied.borrow().clone();
        let now_us = now_us();
        let now_ms = now_us / 1000;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut tree_deltas = Vec::new();
        let mut commits = self.commits.load(Ordering::Acquire);
        let mut txn = self.db.begin_write()?;
        // Durability comes from the journal; the state database is made durable at checkpoints.
        txn.set_durability(Durability::None)?;
        let mut staged = Staged::default();
        let ops = {
            let mut changes = Recorded {
                tables: StateTables::new(&txn),
                ops: Vec::with_capacity(batch.len() * 2),
            };
            let mut appender = Appender {
                seq: &mut seq,
                log_bytes: &mut log_bytes,
                now_us,
            };
            for request in batch {
                let outcome = match request {
                    Request::Key(write, _) => {
                        let (bucket, key) = (write.bucket.as_str(), write.key.as_str());
                        let old = current_state(&staged, &self.overlay, &mut changes, bucket, key)?
                            .map_or(0, |old| entry_hash(bucket, key, &old));
                        // Journaled here, published to the overlay below (see `overlay`).
                        changes.record(Op::PutKey {
                            bucket: bucket.into(),
                            key: key.into(),
                            state: write.state.as_slice().into(),
                        });
                        staged.insert((bucket, key), Some(&write.state));
                        let delta = old ^ entry_hash(bucket, key, &write.state);
                        if delta != 0 {
                            tree_deltas.push((segment_of(bucket, key), delta));
                        }
                        if write.tombstone {
                            changes.apply(Op::MarkTombstone {
                                bucket: bucket.into(),
                                key: key.into(),
                            })?;
                        }
                        if !write.logged {
                            Outcome::Seq(0)
                        } else {
                            let entry = LogEntry::Key {
                                bucket: write.bucket.clone(),
                                key: write.key.clone(),
                                state: write.state.clone(),
                            };
                            changes.apply(appender.append(entry, write.trace.clone()))?;
                            let seq = *appender.seq;
                            if let Some(pending) = &write.idempotency {
                                let record = IdempotencyRecord {
                                    fingerprint: pending.fingerprint,
                                    status: pending.status,
                                    body: pending.body.clone(),
                                    seq,
                                    created_ms: now_ms,
                                    origin: None,
                                };
                                changes.apply(Op::PutIdempotency {
                                    id: pending.id,
                                    record: record.encode(),
                                })?;
                                let entry = LogEntry::Idempotency {
                                    id: pending.id,
                                    fingerprint: pending.fingerprint,
                                    status: pending.status,
                                    body: pending.body.clone(),
                                    created_ms: now_ms,
                                };
                                changes.apply(appender.append(entry, None))?;
                            }
                            Outcome::Seq(seq)
                        }
                    }
                    Request::Bucket(def, source, _) => {
                        let existing = match changes.tables.bucket(&def.name)? {
                            Some(bytes) => Some(
                                postcard::from_bytes::<BucketDef>(&bytes)
                                    .map_err(|e| StorageError::Corrupt(e.to_string()))?,
                            ),
                            None => None,
                        };
                        let store =
                            |def: &BucketDef| postcard::to_allocvec(def).unwrap_or_default();
                        let put = |def: &BucketDef| Op::PutBucket {
                            name: def.name.clone().into(),
                            def: store(def),
                        };
                        let outcome = match (existing, source) {
                            (Some(existing), _) if existing == *def => BucketOutcome::Identical,
                            (Some(existing), BucketSource::Client) => {
                                BucketOutcome::Conflict(existing)
                            }
                            (Some(existing), BucketSource::Replicated) => {
                                // Concurrent creations with different definitions: every region
                                // keeps the one with the smaller encoding, so all agree.
                                let winner = if store(def) < store(&existing) {
                                    def.clone()
                                } else {
                                    existing
                                };
                                changes.apply(put(&winner))?;
                                BucketOutcome::Resolved(winner)
                            }
                            (None, source) => {
                                changes.apply(put(def))?;
                                if *source == BucketSource::Client {
                                    changes.apply(
                                        appender.append(LogEntry::Bucket(def.clone()), None),
                                    )?;
                                }
                                BucketOutcome::Created
                            }
                        };
                        Outcome::Bucket(outcome)
                    }
                    Request::Applied(_, _, epoch, _)
                        if *epoch != self.failures.load(Ordering::Acquire) =>
                    {
                        Outcome::Failed
                    }
                    Request::Applied(origin, upto, _, _) => {
                        let current = applied.get(origin).copied().unwrap_or(0);
                        let next = current.max(*upto);
                        changes.apply(Op::PutApplied {
                            origin: origin.as_u128(),
                            seq: next,
                        })?;
                        applied.insert(*origin, next);
                        Outcome::Seq(next)
                    }
                    Request::Idempotency(id, record) => {
                        changes.apply(Op::PutIdempotency {
                            id: *id,
                            record: record.encode(),
                        })?;
                        Outcome::None
                    }
                    Request::Truncate(upto) => {
                        if let Some(first) = changes.tables.log_first()? {
                            let last = (*upto).min(first.saturating_add(TRUNCATE_CHUNK));
                            changes.apply(Op::TruncateLog { first, last })?;
                        }
                        Outcome::None
                    }
                    Request::Purge(purge, _) => {
                        let mut removed = 0;
                        for (bucket, key, state) in &purge.remove {
                            let (bucket, key) = (bucket.as_str(), key.as_str());
                            let current =
                                current_state(&staged, &self.overlay, &mut changes, bucket, key)?;
                            if current.as_ref() == Some(state) {
                                // Also removes any older state the state database still holds.
                                changes.apply(Op::RemoveKey {
                                    bucket: bucket.into(),
                                    key: key.into(),
                                })?;
                                staged.insert((bucket, key), None);
                                tree_deltas.push((
                                    segment_of(bucket, key),
                                    entry_hash(bucket, key, state),
                                ));
                                changes.apply(Op::ForgetTombstone {
                                    bucket: bucket.into(),
                                    key: key.into(),
                                })?;
                                removed += 1;
                            }
                        }
                        for (bucket, key) in &purge.forget {
                            changes.apply(Op::ForgetTombstone {
                                bucket: bucket.as_str().into(),
                                key: key.as_str().into(),
                            })?;
                        }
                        Outcome::Seq(removed)
                    }
                    Request::Meta(key, value) => {
                        changes.apply(Op::PutMeta {
                            key: key.as_str().into(),
                            value: value.clone(),
                        })?;
                        Outcome::None
                    }
                    Request::ExpireIdempotency(before_ms) => {
                        changes.apply(Op::ExpireIdempotency {
                            before_ms: *before_ms,
                        })?;
                        Outcome::None
                    }
                    Request::Checkpoint(_) => Outcome::None,
                };
                outcomes.push(outcome);
            }
            let cursors = match self.cursors.lock() {
                Ok(mut cursors) => std::mem::take(&mut *cursors),
                Err(_) => BTreeMap::new(),
            };
            for (peer, seq) in cursors {
                changes.apply(Op::PutCursor {
                    peer: peer.into(),
                    seq,
                })?;
            }
            let changes_states = batch
                .iter()
                .any(|r| matches!(r, Request::Key(..) | Request::Purge(..)));
            if changes_states {
                commits += 1;
                changes.apply(meta_u64(meta::COMMITS, commits))?;
            }
            if seq != *self.last_seq.borrow() {
                changes.apply(meta_u64(meta::LAST_SEQ, seq))?;
                changes.apply(meta_u64(meta::LOG_BYTES, log_bytes))?;
            }
            changes.ops
        };
        if !ops.is_empty() {
            // A batch nobody waits on (cursors, truncation, expiry, meta) needs no fsync of its
            // own: lost in a crash, it only repeats work or is re-learned from peers.
            let durable = batch.iter().any(|r| {
                matches!(
                    r,
                    Request::Key(..)
                        | Request::Bucket(..)
                        | Request::Applied(..)
                        | Request::Purge(..)
                )
            });
            let bytes = self.journal.append(&ops, durable)?;
            self.metrics.journal_bytes.inc_by(bytes as u64);
        }
        drop(ops);
        // The batch's new states are published before its commit makes the rest visible (a
        // tombstone's candidate mark, log entries, the applied vector), so nobody sees those
        // without the states; the journal holds them already. Removed keys leave the overlay
        // only after the commit has ended (see `Overlay`).
        let (set, removed): (Vec<Change>, Vec<Change>) = staged
            .into_iter()
            .map(|((bucket, key), state)| (bucket.into(), key.into(), state.map(<[u8]>::to_vec)))
            .partition(|(_, _, state)| state.is_some());
        self.last_added = set.len();
        self.overlay.apply(set);
        if let Err(error) = self.snapshots.commit(txn) {
            // The journal already holds this batch: a restart replays it. Until then nothing
            // may be written on top of a state database that lacks it, and no checkpoint may
            // declare it held.
            self.alive.store(false, Ordering::Release);
            self.journal.poison(format!(
                "state commit failed after its journal append: {error}"
            ));
            return Err(StorageError::CommitFailed(format!(
                "journaled but not applied ({error}); the region stops accepting writes and \
                 recovers the batch from its journal on restart"
            )));
        }
        self.overlay.apply(removed);
        Ok(Committed {
            outcomes,
            last_seq: seq,
            log_bytes,
            applied,
            tree_deltas,
            commits,
        })
    }

    /// Makes the state database durable and cuts the journal, when due or when `force`d.
    fn checkpoint(&mut self, force: bool) {
        let overlay_full = self.overlay.bytes() >= OVERLAY_BYTES;
        if !(self.journal.checkpoint_due()
            || (force || overlay_full) && self.journal.pending_bytes() > 0)
        {
            return;
        }
        // The checkpoint makes durable what the state database holds: the overlay goes first.
        // While writes wait and much is left, each call moves twice what the last commit
        // added (at least a chunk), so the overlay shrinks under any load.
        let mut budget = if force {
            usize::MAX
        } else {
            DRAIN_CHUNK.max(2 * self.last_added)
        };
        while self.overlay.entries() > 0 {
            let writes_wait = !self.rx.is_empty() && self.overlay.entries() > FLUSH_AT_ONCE;
            if budget == 0 && writes_wait {
                return;
            }
            let Some(moved) = self.drain_chunk() else {
                return;
            };
            budget = budget.saturating_sub(moved);
        }
        let _span = tracing::info_span!("checkpoint", journal_bytes = self.journal.pending_bytes())
            .entered();
        let started = Instant::now();
        match self.journal.checkpoint(&self.db) {
            Ok(()) => self
                .metrics
                .checkpoint_duration
                .observe(started.elapsed().as_secs_f64()),
            Err(error) => {
                // Nothing is lost (the journal still holds it all), but a state database that
                // cannot be made durable will not take the next checkpoint either.
                tracing::error!(%error, "checkpoint failed; the journal keeps growing until one succeeds");
                self.metrics.checkpoint_failures.inc();
            }
        }
    }

    /// Moves the next chunk of the overlay, in key order, into the state database (not durably:
    /// the journal holds it until the checkpoint). Returns how many moved; `None` on failure.
    fn drain_chunk(&mut self) -> Option<usize> {
        let mut chunk = self.overlay.copy_from(&self.drain_from, DRAIN_CHUNK);
        if chunk.is_empty() {
            // Past the last entry; those written meanwhile are behind: start over.
            self.drain_from = Bound::Unbounded;
            chunk = self.overlay.copy_from(&self.drain_from, DRAIN_CHUNK);
        }
        let (bucket, key, _) = chunk.last()?;
        self.drain_from = Bound::Excluded((bucket.clone(), key.clone()));
        let moved = chunk.len();
        let _span = tracing::info_span!("overlay_drain", entries = moved).entered();
        match self.move_into_state(chunk) {
            Ok(()) => {
                self.metrics.overlay_flushed.inc_by(moved as u64);
                Some(moved)
            }
            Err(error) => {
                // Nothing is lost: the overlay and the journal still hold the chunk.
                tracing::error!(%error, "moving overlay entries into the state database failed");
                self.metrics.checkpoint_failures.inc();
                None
            }
        }
    }

    /// Inserts `chunk` into the state database, then drops it from the overlay.
    fn move_into_state(&mut self, chunk: Vec<Entry>) -> Result<(), StorageError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            let mut keys = txn.open_table(KEYS)?;
            for (bucket, key, state) in &chunk {
                keys.insert((bucket.as_str(), key.as_str()), state.as_slice())?;
            }
        }
        self.snapshots.commit(txn)?;
        // Only now that the commit has ended (see `Overlay`). The writer alone changes the
        // overlay, so these are still the states just inserted.
        let removed = chunk.into_iter().map(|(b, k, _)| (b, k, None)).collect();
        self.overlay.apply(removed);
        Ok(())
    }

    fn publish(&mut self, batch: &mut Vec<Request>, committed: Committed) {
        // The tree first: whoever reads the applied vector and then the tree sees every state
        // the vector claims (anti-entropy relies on that order).
        if !committed.tree_deltas.is_empty() {
            if let Ok(mut tree) = self.tree.lock() {
                for (segment, delta) in &committed.tree_deltas {
                    tree.toggle(*segment, *delta);
                }
            }
        }
        let previous = *self.last_seq.borrow();
        if committed.last_seq != previous {
            if let Ok(mut times) = self.durable_times.lock() {
                if times.len() == DURABLE_TIMES_KEPT {
                    times.pop_front();
                }
                times.push_back((committed.last_seq, now_us()));
            }
            self.metrics
                .writes_committed
                .inc_by(committed.last_seq - previous);
            self.metrics.last_sequence.set(committed.last_seq as i64);
            self.last_seq.send_replace(committed.last_seq);
        }
        self.log_bytes = committed.log_bytes;
        self.commits.store(committed.commits, Ordering::Release);
        if *self.applied.borrow() != committed.applied {
            self.applied.send_replace(committed.applied);
        }
        for (request, outcome) in batch.drain(..).zip(committed.outcomes) {
            match (request, outcome) {
                (Request::Key(_, reply), Outcome::Seq(seq))
                | (Request::Purge(_, reply), Outcome::Seq(seq))
                | (Request::Applied(_, _, _, reply), Outcome::Seq(seq)) => {
                    let _ = reply.send(Ok(seq));
                }
                (Request::Applied(_, _, _, reply), Outcome::Failed) => {
                    let _ = reply.send(Err(StorageError::CommitFailed(
                        "a commit of this batch's merges failed".into(),
                    )));
                }
                (Request::Bucket(def, _, reply), Outcome::Bucket(outcome)) => {
                    let stored = match &outcome {
                        BucketOutcome::Created => Some(def),
                        BucketOutcome::Resolved(winner) => Some(winner.clone()),
                        BucketOutcome::Identical | BucketOutcome::Conflict(_) => None,
                    };
                    if let (Some(def), Ok(mut cache)) = (stored, self.buckets.write()) {
                        cache.insert(def.name.clone(), def);
                    }
                    let _ = reply.send(Ok(outcome));
                }
                _ => {}
            }
        }
    }

    fn fail(&mut self, batch: &mut Vec<Request>, error: StorageError) {
        self.failures.fetch_add(1, Ordering::AcqRel);
        tracing::error!(%error, requests = batch.len(), "group commit failed; nothing in it was applied");
        let failed = || StorageError::CommitFailed(error.to_string());
        for request in batch.drain(..) {
            match request {
                Request::Key(_, reply)
                | Request::Applied(_, _, _, reply)
                | Request::Purge(_, reply) => {
                    let _ = reply.send(Err(failed()));
                }
                Request::Bucket(_, _, reply) => {
                    let _ = reply.send(Err(failed()));
                }
                Request::Idempotency(..)
                | Request::Checkpoint(_)
                | Request::Truncate(_)
                | Request::Meta(..)
                | Request::ExpireIdempotency(_) => {}
            }
        }
        if matches!(
            error,
            StorageError::Redb(redb::Error::Io(_)) | StorageError::Redb(redb::Error::PreviousIo)
        ) {
            // After an I/O failure redb refuses further commits: stop being ready.
            self.alive.store(false, Ordering::Release);
        }
    }
}

/// Numbers log records consecutively and keeps their running byte offsets.
struct Appender<'a> {
    seq: &'a mut u64,
    log_bytes: &'a mut u64,
    now_us: u64,
}

impl Appender<'_> {
    /// The op that appends `entry` as the next sequence number.
    fn append(&mut self, entry: LogEntry, trace: Option<String>) -> Op<'static> {
        *self.seq += 1;
        let record = LogRecord {
            committed_us: self.now_us,
            trace,
            log_offset: *self.log_bytes,
            entry,
        }
        .encode();
        *self.log_bytes += record.len() as u64;
        Op::PutLog {
            seq: *self.seq,
            record,
        }
    }
}

/// State tables whose every change is also recorded for the journal.
struct Recorded<'txn, 'a> {
    tables: StateTables<'txn>,
    ops: Vec<Op<'a>>,
}

impl<'a> Recorded<'_, 'a> {
    /// Applies `op` and records it; returns what [`StateTables::apply`] returns.
    fn apply(&mut self, op: Op<'a>) -> Result<u64, StorageError> {
        let replaced = self.tables.apply(&op)?;
        self.ops.push(op);
        Ok(replaced)
    }

    /// Records `op` for the journal only (a key state, which goes to the overlay).
    fn record(&mut self, op: Op<'a>) {
        self.ops.push(op);
    }
}

/// Key states a batch has set (`Some`) or removed (`None`) so far, by `(bucket, key)`.
type Staged<'b> = HashMap<(&'b str, &'b str), Option<&'b [u8]>, foldhash::fast::RandomState>;

/// A key's state at this point of a batch: as the batch left it, else the overlay's, else the
/// state database's.
fn current_state<'b>(
    staged: &Staged<'b>,
    overlay: &Overlay,
    changes: &mut Recorded<'_, '_>,
    bucket: &'b str,
    key: &'b str,
) -> Result<Option<Vec<u8>>, StorageError> {
    if let Some(state) = staged.get(&(bucket, key)) {
        return Ok(state.map(<[u8]>::to_vec));
    }
    if let Some(state) = overlay.with(bucket, key, <[u8]>::to_vec) {
        return Ok(Some(state));
    }
    changes.tables.key_state(bucket, key)
}

/// The op that sets a u64 meta value.
fn meta_u64(key: &'static str, value: u64) -> Op<'static> {
    Op::PutMeta {
        key: key.into(),
        value: value.to_be_bytes().to_vec(),
    }
}

/// A wall-clock time in Unix milliseconds as RFC 3339 (UTC).
pub fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
