//! The writer's sending side: the handle every other part of the region submits through, the
//! ticket a submitted write resolves by, and the guard that lets several threads share a commit.

use super::{BucketOutcome, BucketSource, DurableTimes, KeyWrite, PendingCursors, Purge, Request};
use crate::metrics::Metrics;
use crate::storage::{IdempotencyRecord, StorageError};
use meridian_shared::{Actor, BucketDef};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot, watch};

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

/// Callers queueing requests that belong in one commit, and the writer thread to wake when
/// the last of them is done.
#[derive(Clone, Default)]
pub(super) struct Gathering {
    /// Guards not yet dropped.
    pub(super) open: Arc<AtomicUsize>,
    /// Set once the writer thread runs.
    pub(super) writer: Arc<OnceLock<std::thread::Thread>>,
}

/// While held, the writer holds off starting a commit that carries a merge (up to
/// `GATHER_WAIT`), so requests queued from several threads, such as a replicated batch's
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
    pub(super) tx: mpsc::Sender<Request>,
    pub(super) cursors: PendingCursors,
    pub(super) gathering: Gathering,
    pub(super) durable_times: DurableTimes,
    pub(super) failures: Arc<AtomicU64>,
    pub(super) last_seq: watch::Receiver<u64>,
    pub(super) applied: watch::Receiver<BTreeMap<Actor, u64>>,
    pub(super) alive: Arc<AtomicBool>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) commits: Arc<AtomicU64>,
}

impl WriterHandle {
    pub(in crate::storage) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Acquire)
    }

    pub(in crate::storage) fn submit_key(
        &self,
        write: KeyWrite,
    ) -> Result<WriteTicket<u64>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Key(write, reply))?;
        Ok(WriteTicket(ticket))
    }

    pub(in crate::storage) fn submit_bucket(
        &self,
        def: BucketDef,
        source: BucketSource,
    ) -> Result<WriteTicket<BucketOutcome>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Bucket(def, source, reply))?;
        Ok(WriteTicket(ticket))
    }

    pub(in crate::storage) fn submit_applied(
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
    pub(in crate::storage) fn durable_at(&self, seq: u64) -> Option<u64> {
        let times = self.durable_times.lock().ok()?;
        let index = times.partition_point(|(last, _)| *last < seq);
        times.get(index).map(|(_, at)| *at)
    }

    pub(in crate::storage) fn failure_epoch(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    /// Holds off the next commit until the returned guard is dropped (or `GATHER_WAIT`).
    pub(in crate::storage) fn gather(&self) -> Gather {
        self.gathering.open.fetch_add(1, Ordering::AcqRel);
        Gather(self.gathering.clone())
    }

    /// Written with the next commit; the last position given for a peer wins (it may move back).
    pub(in crate::storage) fn submit_cursor(
        &self,
        peer: &str,
        seq: u64,
    ) -> Result<(), StorageError> {
        let mut cursors = self.cursors.lock().map_err(|_| StorageError::WriterGone)?;
        cursors.insert(peer.to_string(), seq);
        Ok(())
    }

    pub(in crate::storage) fn submit_idempotency(
        &self,
        id: u128,
        record: IdempotencyRecord,
    ) -> Result<(), StorageError> {
        self.enqueue(Request::Idempotency(id, record))
    }

    pub(in crate::storage) fn submit_truncate(&self, upto: u64) -> Result<(), StorageError> {
        self.enqueue(Request::Truncate(upto))
    }

    pub(in crate::storage) fn submit_meta(
        &self,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), StorageError> {
        self.enqueue(Request::Meta(key, value))
    }

    pub(in crate::storage) fn submit_purge(
        &self,
        purge: Purge,
    ) -> Result<WriteTicket<u64>, StorageError> {
        let (reply, ticket) = oneshot::channel();
        self.enqueue(Request::Purge(purge, reply))?;
        Ok(WriteTicket(ticket))
    }

    /// Resolves once the state database is durable and the journal cut.
    pub(in crate::storage) fn checkpoint(&self) -> Result<oneshot::Receiver<()>, StorageError> {
        let (done, waiter) = oneshot::channel();
        self.enqueue(Request::Checkpoint(Some(done)))?;
        Ok(waiter)
    }

    pub(in crate::storage) fn submit_expire_idempotency(
        &self,
        before_ms: u64,
    ) -> Result<(), StorageError> {
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

    pub(in crate::storage) fn last_seq(&self) -> watch::Receiver<u64> {
        self.last_seq.clone()
    }

    pub(in crate::storage) fn applied(&self) -> watch::Receiver<BTreeMap<Actor, u64>> {
        self.applied.clone()
    }

    /// Reads the applied vector in place (no copy, no new receiver).
    pub(in crate::storage) fn with_applied<T>(
        &self,
        read: impl FnOnce(&BTreeMap<Actor, u64>) -> T,
    ) -> T {
        read(&self.applied.borrow())
    }

    pub(in crate::storage) fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}
