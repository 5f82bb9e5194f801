//! The single storage writer: group commit.
//!
//! One thread owns every write transaction. It takes whatever requests are queued (up to
//! `commit_max_batch`), applies them in one transaction of the state database, appends the
//! same changes durably to the journal (see `journal`), publishes the batch's new key states
//! to the overlay (see `overlay`; they move into the state database before each checkpoint),
//! commits the transaction (visible, not yet durable by itself), and only then answers every
//! requester in the batch (see `batch`). Sequence numbers are assigned here, in commit order, so the
//! replication log never has a gap that a later commit fills.

mod batch;
mod checkpoint;
mod handle;

pub use handle::{Gather, WriteTicket, WriterHandle};

use super::idempotency::IdempotencyRecord;
use super::journal::Journal;
use super::overlay::Overlay;
use super::snapshot::Snapshots;
use super::{BucketCache, KeyName, StorageError};
use crate::clock::now_us;
use crate::metrics::Metrics;
use handle::Gathering;
use meridian_shared::merkle::MerkleTree;
use meridian_shared::{Actor, BucketDef};
use redb::Database;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

/// States to remove (causally stable tombstones, states of a bucket type that lost), and
/// tombstone candidates that are no longer tombstones.
#[derive(Debug, Default)]
pub struct Purge {
    /// `(bucket, key, state)`: removed only if the stored state is still exactly `state`.
    pub remove: Vec<(String, String, Vec<u8>)>,
    /// `(bucket, key, state)`: candidates no longer tombstones (rewritten, or gone: `None`),
    /// forgotten only if the stored state is still exactly `state`; a key deleted again
    /// since it was checked stays a candidate.
    pub forget: Vec<(String, String, Option<Vec<u8>>)>,
}

/// When recent commits became durable: `(highest sequence number, wall-clock µs)`, oldest
/// first, bounded. Replication lag is measured from here, not from when the commit started.
pub type DurableTimes = Arc<std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>>;
/// Commits remembered in [`DurableTimes`].
const DURABLE_TIMES_KEPT: usize = 8192;

/// Peers' acknowledged positions not yet written: they ride along with the next commit
/// instead of costing one each.
type PendingCursors = Arc<Mutex<BTreeMap<String, u64>>>;

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
    let mut journal = start.journal;
    journal.fill_ahead(
        metrics.journal_zero_fill.with_label_values(&["filler"]),
        metrics.journal_zero_fill.with_label_values(&["append"]),
    )?;
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
        journal,
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
        self.journal.stop_filling();
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
