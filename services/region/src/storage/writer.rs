//! The single storage writer: group commit.
//!
//! One thread owns every write transaction. It takes whatever writes are queued (up to
//! `commit_max_batch`), applies them in one transaction with `Durability::Immediate`, and only
//! then answers every writer in the batch. Sequence numbers are assigned here, in commit order,
//! so the replication log never has a gap that a later commit fills.

use super::idempotency::IdempotencyRecord;
use super::tables::{meta, BUCKETS, IDEMPOTENCY, KEYS, LOG, META};
use super::{BucketCache, StorageError};
use crate::metrics::Metrics;
use meridian_shared::log::LogEntry;
use meridian_shared::BucketDef;
use redb::{Database, Durability, ReadableTable};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Writes that may wait for the writer before new ones are shed with 503.
const QUEUE_CAPACITY: usize = 65_536;

/// A key's new state, to be committed with its replication-log entry.
#[derive(Debug)]
pub struct KeyWrite {
    /// Bucket name.
    pub bucket: String,
    /// Key name.
    pub key: String,
    /// Canonical encoded state after the write.
    pub state: Vec<u8>,
    /// The answer to store for an `Idempotency-Key`, in the same transaction.
    pub idempotency: Option<PendingIdempotency>,
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

/// What creating a bucket did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketOutcome {
    /// Newly created.
    Created,
    /// An identical definition already existed.
    Identical,
    /// A different definition exists (returned).
    Conflict(BucketDef),
}

/// Resolves once the write is durable (or failed).
pub type WriteTicket<T> = oneshot::Receiver<Result<T, StorageError>>;

enum Request {
    Key(KeyWrite, oneshot::Sender<Result<u64, StorageError>>),
    Bucket(
        BucketDef,
        oneshot::Sender<Result<BucketOutcome, StorageError>>,
    ),
}

/// Sending side of the writer's queue.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Request>,
    last_seq: Arc<AtomicU64>,
    alive: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl WriterHandle {
    pub(super) fn submit_key(&self, write: KeyWrite) -> Result<WriteTicket<u64>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Key(write, reply))?;
        Ok(ticket)
    }

    pub(super) fn submit_bucket(
        &self,
        def: BucketDef,
    ) -> Result<WriteTicket<BucketOutcome>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Bucket(def, reply))?;
        Ok(ticket)
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

    pub(super) fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    pub(super) fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

/// Starts the writer thread.
pub(super) fn spawn(
    db: Arc<Database>,
    last_seq: u64,
    max_batch: usize,
    buckets: BucketCache,
    metrics: Arc<Metrics>,
) -> std::io::Result<WriterHandle> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let handle = WriterHandle {
        tx,
        last_seq: Arc::new(AtomicU64::new(last_seq)),
        alive: Arc::new(AtomicBool::new(true)),
        metrics: metrics.clone(),
    };
    let mut writer = Writer {
        db,
        rx,
        max_batch,
        buckets,
        metrics,
        last_seq: handle.last_seq.clone(),
        alive: handle.alive.clone(),
    };
    std::thread::Builder::new()
        .name("storage-writer".into())
        .spawn(move || writer.run())?;
    Ok(handle)
}

struct Writer {
    db: Arc<Database>,
    rx: mpsc::Receiver<Request>,
    max_batch: usize,
    buckets: BucketCache,
    metrics: Arc<Metrics>,
    last_seq: Arc<AtomicU64>,
    alive: Arc<AtomicBool>,
}

/// Per-request result of a batch, sent only after the commit.
enum Outcome {
    Seq(u64),
    Bucket(BucketOutcome),
}

impl Writer {
    fn run(&mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        // Runs until every sender is gone (shutdown), answering everything queued before that.
        while let Some(first) = self.rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.metrics.commit_queue_depth.sub(batch.len() as i64);
            let _span = tracing::debug_span!("group_commit", writes = batch.len()).entered();
            let started = Instant::now();
            let result = self.commit(&batch);
            self.metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            self.metrics.commit_batch_size.observe(batch.len() as f64);
            match result {
                Ok(outcomes) => self.answer(&mut batch, outcomes),
                Err(error) => {
                    tracing::error!(%error, writes = batch.len(), "group commit failed; writes refused");
                    for request in batch.drain(..) {
                        let failed = StorageError::CommitFailed(error.to_string());
                        match request {
                            Request::Key(_, reply) => {
                                let _ = reply.send(Err(failed));
                            }
                            Request::Bucket(_, reply) => {
                                let _ = reply.send(Err(failed));
                            }
                        }
                    }
                    if matches!(
                        error,
                        StorageError::Redb(redb::Error::Io(_))
                            | StorageError::Redb(redb::Error::PreviousIo)
                    ) {
                        // After an I/O failure redb refuses further commits: stop being ready.
                        self.alive.store(false, Ordering::Release);
                    }
                }
            }
        }
        self.alive.store(false, Ordering::Release);
    }

    /// Applies a batch in one durable transaction; returns the per-request outcomes.
    fn commit(&self, batch: &[Request]) -> Result<Vec<Outcome>, StorageError> {
        let mut seq = self.last_seq.load(Ordering::Acquire);
        let now_ms = now_ms();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut keys = txn.open_table(KEYS)?;
            let mut log = txn.open_table(LOG)?;
            let mut idempotency = txn.open_table(IDEMPOTENCY)?;
            let mut buckets = txn.open_table(BUCKETS)?;
            for request in batch {
                match request {
                    Request::Key(write, _) => {
                        seq += 1;
                        keys.insert(
                            (write.bucket.as_str(), write.key.as_str()),
                            write.state.as_slice(),
                        )?;
                        let entry = LogEntry::Key {
                            bucket: write.bucket.clone(),
                            key: write.key.clone(),
                            state: write.state.clone(),
                        };
                        log.insert(seq, entry.encode().as_slice())?;
                        if let Some(pending) = &write.idempotency {
                            let record = IdempotencyRecord {
                                fingerprint: pending.fingerprint,
                                status: pending.status,
                                body: pending.body.clone(),
                                seq,
                                created_ms: now_ms,
                            };
                            idempotency.insert(pending.id, record.encode().as_slice())?;
                        }
                        outcomes.push(Outcome::Seq(seq));
                    }
                    Request::Bucket(def, _) => {
                        let existing = match buckets.get(def.name.as_str())? {
                            Some(bytes) => Some(
                                postcard::from_bytes::<BucketDef>(bytes.value())
                                    .map_err(|e| StorageError::Corrupt(e.to_string()))?,
                            ),
                            None => None,
                        };
                        let outcome = match existing {
                            Some(existing) if existing.same_as(def) => BucketOutcome::Identical,
                            Some(existing) => BucketOutcome::Conflict(existing),
                            None => {
                                let bytes = postcard::to_allocvec(def)
                                    .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                                buckets.insert(def.name.as_str(), bytes.as_slice())?;
                                seq += 1;
                                log.insert(seq, LogEntry::Bucket(def.clone()).encode().as_slice())?;
                                BucketOutcome::Created
                            }
                        };
                        outcomes.push(Outcome::Bucket(outcome));
                    }
                }
            }
            let mut meta_table = txn.open_table(META)?;
            meta_table.insert(meta::LAST_SEQ, &seq.to_be_bytes()[..])?;
        }
        txn.commit()?;
        let previous = self.last_seq.swap(seq, Ordering::AcqRel);
        self.metrics.writes_committed.inc_by(seq - previous);
        self.metrics.last_sequence.set(seq as i64);
        Ok(outcomes)
    }

    fn answer(&self, batch: &mut Vec<Request>, outcomes: Vec<Outcome>) {
        for (request, outcome) in batch.drain(..).zip(outcomes) {
            match (request, outcome) {
                (Request::Key(_, reply), Outcome::Seq(seq)) => {
                    let _ = reply.send(Ok(seq));
                }
                (Request::Bucket(def, reply), Outcome::Bucket(outcome)) => {
                    if outcome == BucketOutcome::Created {
                        if let Ok(mut cache) = self.buckets.write() {
                            cache.insert(def.name.clone(), def);
                        }
                    }
                    let _ = reply.send(Ok(outcome));
                }
                // `commit` pushes exactly one outcome of the matching kind per request.
                (Request::Key(_, reply), Outcome::Bucket(_)) => {
                    let _ =
                        reply.send(Err(StorageError::Corrupt("writer outcome mismatch".into())));
                }
                (Request::Bucket(_, reply), Outcome::Seq(_)) => {
                    let _ =
                        reply.send(Err(StorageError::Corrupt("writer outcome mismatch".into())));
                }
            }
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
