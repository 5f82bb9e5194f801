//! Partition actors: each owns a fixed hash range of keys and serializes their read-merge-write.
//!
//! A write is applied to the key's latest state, handed to the storage writer, and answered
//! once its group commit is durable. While that commit is in flight the new state stays in the
//! actor's `pending` map, so the next write to the same key builds on it rather than on the
//! older committed state; the actor never waits for the commit itself (no lock held across an
//! await), so writes to other keys keep flowing into the same group commit.
//!
//! A peer's state is joined the same way, but the joined state goes straight to the latest
//! state (cache or pending entry) and the caller alone awaits its commit. Should that commit
//! fail, the actor may build on a join that is not durable here; that loses nothing, since the
//! peer still holds it and resends it (the applied mark fails with the commit).

use crate::metrics::Metrics;
use crate::storage::{
    IdempotencyRecord, KeyWrite, PendingIdempotency, Storage, StorageError, WriteTicket,
};
use actix::prelude::*;
use foldhash::fast::RandomState;
use lru::LruCache;
use meridian_observability::propagation::child_span;
use meridian_shared::encoding::encode_state;
use meridian_shared::hlc::Hlc;
use meridian_shared::home::key_hash;
use meridian_shared::{BucketType, KeyState, Op, StateError};
use prometheus::IntGauge;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;
use tracing::Instrument;

/// Builds the answer stored with an idempotency record: (HTTP status, JSON body).
pub type Responder = fn(&KeyState) -> (u16, Vec<u8>);

/// What every partition actor shares.
pub struct PartitionShared {
    /// Durable storage.
    pub storage: Storage,
    /// Bytes of committed states each partition keeps cached.
    pub cache_bytes: usize,
    /// Largest state a client write may produce (removals and deletes may always shrink one).
    pub max_state_bytes: usize,
    /// Hybrid clock for last-writer-wins timestamps.
    pub hlc: Arc<Hlc>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// A client write to one key.
pub struct Write {
    /// Bucket name.
    pub bucket: String,
    /// Key name.
    pub key: String,
    /// The bucket's type (checked by the caller against the bucket definition).
    pub kind: BucketType,
    /// The operation.
    pub op: Op,
    /// `Idempotency-Key` and request fingerprint, with the responder that builds the answer.
    pub idempotency: Option<(u128, u64, Responder)>,
    /// A forwarded write's deadline (Unix ms): past it, the forwarder has stopped waiting and
    /// may let a retry fail over, so it is refused unapplied.
    pub apply_by: Option<u64>,
    /// The request's span, carried across the mailbox.
    pub span: tracing::Span,
}

/// What a write did.
#[derive(Debug)]
pub enum WriteOutcome {
    /// Applied and durable, with its region sequence number and the key's new state.
    Applied {
        /// Region sequence number.
        seq: u64,
        /// The key's state after the write.
        state: KeyState,
    },
    /// A retry of a write already applied: the stored answer.
    Replayed(IdempotencyRecord),
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The operation does not fit the key's type.
    #[error(transparent)]
    State(#[from] StateError),
    /// Storage refused or failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The idempotency key is in flight or was used for another request.
    #[error("{0}")]
    IdempotencyConflict(&'static str),
    /// The key's state would grow past `max_state_bytes`.
    #[error("the key's state would be {size} bytes, over this region's limit of {limit} (max_state_bytes); resolve its siblings with a context, remove members, or delete it")]
    StateTooLarge {
        /// Encoded size the write would produce.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The partition actor is gone (shutdown).
    #[error("partition actor stopped")]
    Stopped,
    /// A forwarded write reached its partition after its deadline.
    #[error("the forwarded write arrived {late_ms} ms after its deadline")]
    Late {
        /// How late.
        late_ms: u64,
    },
}

impl Message for Write {
    type Result = Result<WriteOutcome, WriteError>;
}

/// A peer's state of one key, to be joined into ours (replication and repair).
pub struct Merge {
    /// Bucket name.
    pub bucket: String,
    /// Key name.
    pub key: String,
    /// The peer's state.
    pub state: KeyState,
    /// The bucket's type here, when its definition has arrived: a stored state of another
    /// type was written under a definition that lost (see [`PartitionActor::latest`]).
    pub kind: Option<BucketType>,
    /// The span of the apply that carries it.
    pub span: tracing::Span,
    /// Whether a change goes into this region's log. Repair merges do: what arrived outside
    /// the log is covered by no applied vector, so a session token from here would leave it
    /// out; logged, the token covers it and other regions receive it before serving that token.
    pub logged: bool,
}

impl Message for Merge {
    type Result = Result<Option<WriteTicket<u64>>, WriteError>;
}

/// The answer stored for `Idempotency-Key` `id`, if any; a conflict if it answered a different
/// request (another `fingerprint`).
pub fn stored_answer(
    storage: &Storage,
    id: u128,
    fingerprint: u64,
) -> Result<Option<IdempotencyRecord>, WriteError> {
    match storage.idempotency(id)? {
        Some(record) if record.fingerprint != fingerprint => Err(WriteError::IdempotencyConflict(
            "this Idempotency-Key was already used for a different request",
        )),
        stored => Ok(stored),
    }
}

/// A write handed to the group commit, or a retry answered from its idempotency record.
enum Prepared {
    Queued {
        ticket: WriteTicket<u64>,
        state: KeyState,
        version: u64,
    },
    Replayed(IdempotencyRecord),
}

/// Owns the keys whose hash falls in its range.
///
/// Its maps are looked up several times per write, so they hash with foldhash (seeded per
/// process) rather than SipHash, which stood out in profiles of the write path.
pub struct PartitionActor {
    shared: Arc<PartitionShared>,
    /// States written but not yet durable: key → (write version, state, encoded size).
    pending: HashMap<(String, String), (u64, KeyState, usize), RandomState>,
    /// Idempotency keys whose first write is still being committed.
    idempotency_in_flight: HashSet<u128, RandomState>,
    next_version: u64,
    /// Latest states of recently written keys, not in `pending`. This actor is the only writer
    /// of its keys' states, so the cache cannot go stale, except through removals (tombstone
    /// GC, bucket sweep), which [`Evict`] the keys afterwards. It saves a storage read and
    /// decode per write.
    cache: StateCache,
}

/// Committed key states, least recently used evicted first, bounded by encoded bytes.
struct StateCache {
    entries: LruCache<(String, String), (KeyState, usize), RandomState>,
    bytes: usize,
    budget: usize,
}

impl StateCache {
    fn new(budget: usize) -> Self {
        Self {
            entries: LruCache::unbounded_with_hasher(RandomState::default()),
            bytes: 0,
            budget,
        }
    }

    /// Takes a state and its size out (the caller puts back what it builds on it): no clone.
    fn take(&mut self, slot: &(String, String)) -> Option<(KeyState, usize)> {
        let (state, size) = self.entries.pop(slot)?;
        self.bytes -= size;
        Some((state, size))
    }

    fn put(&mut self, slot: (String, String), state: KeyState, size: usize) {
        if size > self.budget {
            self.forget(&slot);
            return;
        }
        if let Some((_, old)) = self.entries.put(slot, (state, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > self.budget {
            match self.entries.pop_lru() {
                Some((_, (_, evicted))) => self.bytes -= evicted,
                None => break,
            }
        }
    }

    fn forget(&mut self, slot: &(String, String)) {
        if let Some((_, size)) = self.entries.pop(slot) {
            self.bytes -= size;
        }
    }
}

impl Actor for PartitionActor {
    type Context = Context<Self>;
}

impl PartitionActor {
    fn new(shared: Arc<PartitionShared>) -> Self {
        Self {
            cache: StateCache::new(shared.cache_bytes),
            shared,
            pending: HashMap::default(),
            idempotency_in_flight: HashSet::default(),
            next_version: 0,
        }
    }

    /// Applies the write to the latest state and queues it; returns the ticket and new state.
    fn prepare(&mut self, msg: &mut Write) -> Result<Prepared, WriteError> {
        if let Some((id, fingerprint, _)) = msg.idempotency {
            if self.idempotency_in_flight.contains(&id) {
                return Err(WriteError::IdempotencyConflict(
                    "a request with this Idempotency-Key is still in flight; retry shortly",
                ));
            }
            if let Some(record) = stored_answer(&self.shared.storage, id, fingerprint)? {
                return Ok(Prepared::Replayed(record));
            }
        }
        // The last moment before the write is queued for its commit (a replay above may still
        // answer: it applies nothing).
        if let Some(apply_by) = msg.apply_by {
            let now = crate::clock::now_ms();
            if now > apply_by {
                self.shared.metrics.forwards_too_late.inc();
                return Err(WriteError::Late {
                    late_ms: now - apply_by,
                });
            }
        }

        let slot = (msg.bucket.clone(), msg.key.clone());
        let (mut state, size_before) = self
            .latest(&slot, Some(msg.kind))?
            .unwrap_or_else(|| (KeyState::empty(msg.kind), 0));
        let actor = self.shared.storage.identity().incarnation;
        let hlc = self.shared.hlc.tick(crate::clock::now_ms());
        let op = std::mem::replace(&mut msg.op, Op::Increment { by: 0 });
        state.apply(op, actor, hlc)?;
        let encoded = encode_state(&state);
        let size = encoded.len();
        // Only growth is refused: a state merged past the limit (joins are not bounded) can
        // still be shrunk by resolving siblings, removing members or deleting. Checked before
        // anything is queued; the state taken from the cache is dropped, so the next write
        // reads the unchanged one back from storage.
        if size > self.shared.max_state_bytes && size > size_before {
            return Err(WriteError::StateTooLarge {
                size,
                limit: self.shared.max_state_bytes,
            });
        }

        let idempotency = msg.idempotency.map(|(id, fingerprint, respond)| {
            let (status, body) = respond(&state);
            PendingIdempotency {
                id,
                fingerprint,
                status,
                body,
            }
        });
        let trace = meridian_observability::propagation::traceparent(&tracing::Span::current());
        let ticket = self.submit(&slot, &state, encoded, true, idempotency, trace)?;
        self.next_version += 1;
        let version = self.next_version;
        self.pending.insert(slot, (version, state.clone(), size));
        self.shared.metrics.partition_pending_writes.inc();
        if let Some((id, _, _)) = msg.idempotency {
            self.idempotency_in_flight.insert(id);
        }
        Ok(Prepared::Queued {
            ticket,
            state,
            version,
        })
    }

    /// The latest state of a key to build on, with its encoded size: a copy of the pending
    /// one if a commit is in flight, else taken out of the cache (the caller keeps what it
    /// builds), else committed.
    fn latest(
        &mut self,
        slot: &(String, String),
        kind: Option<BucketType>,
    ) -> Result<Option<(KeyState, usize)>, WriteError> {
        let state = if let Some((_, state, size)) = self.pending.get(slot) {
            Some((state.clone(), *size))
        } else if let Some(sized) = self.cache.take(slot) {
            Some(sized)
        } else {
            self.shared.storage.sized_key_state(&slot.0, &slot.1)?
        };
        // A state of another type than the bucket's was written under a concurrent definition
        // that lost: it can never merge with the bucket's type, so it counts as absent and the
        // next state replaces it (the bucket sweep removes those nothing replaces).
        Ok(state.filter(|(state, _)| kind.is_none_or(|kind| state.kind() == kind)))
    }

    /// Keeps a key's newest state: in its pending entry while a write's commit is in flight
    /// (that write's settle moves it on), else in the cache.
    fn keep(&mut self, slot: (String, String), state: KeyState, size: usize) {
        match self.pending.get_mut(&slot) {
            Some(entry) => {
                entry.1 = state;
                entry.2 = size;
            }
            None => self.cache.put(slot, state, size),
        }
    }

    /// Hands a new state of a key to the group commit.
    fn submit(
        &self,
        slot: &(String, String),
        state: &KeyState,
        encoded: Vec<u8>,
        logged: bool,
        idempotency: Option<PendingIdempotency>,
        trace: Option<String>,
    ) -> Result<WriteTicket<u64>, WriteError> {
        Ok(self.shared.storage.submit_key(KeyWrite {
            bucket: slot.0.clone(),
            key: slot.1.clone(),
            state: encoded,
            tombstone: state.is_tombstone(),
            logged,
            idempotency,
            trace,
        })?)
    }

    /// Once a commit is done: a durable state moves to the cache (unless a newer write to the
    /// key replaced it); after a failed commit the key is read from storage again.
    fn settle(&mut self, slot: &(String, String), version: u64, durable: bool) {
        self.shared.metrics.partition_pending_writes.dec();
        if !durable {
            self.cache.forget(slot);
        }
        if self
            .pending
            .get(slot)
            .is_some_and(|(v, _, _)| *v == version)
        {
            if let Some((_, state, size)) = self.pending.remove(slot) {
                if durable {
                    self.cache.put(slot.clone(), state, size);
                }
            }
        }
    }
}

impl Handler<Write> for PartitionActor {
    type Result = ResponseActFuture<Self, Result<WriteOutcome, WriteError>>;

    fn handle(&mut self, mut msg: Write, _ctx: &mut Self::Context) -> Self::Result {
        let span = child_span(
            &msg.span,
            || tracing::info_span!("partition_write", bucket = %msg.bucket),
        );
        let prepared = span.in_scope(|| self.prepare(&mut msg));
        let (ticket, state, version) = match prepared {
            Ok(Prepared::Queued {
                ticket,
                state,
                version,
            }) => (ticket, state, version),
            Ok(Prepared::Replayed(record)) => {
                return Box::pin(fut::ready(Ok(WriteOutcome::Replayed(record))))
            }
            Err(error) => return Box::pin(fut::ready(Err(error))),
        };
        let slot = (msg.bucket, msg.key);
        let idempotency_id = msg.idempotency.map(|(id, _, _)| id);
        let wait = ticket.instrument(span);
        Box::pin(wait.into_actor(self).map(move |committed, actor, _ctx| {
            actor.settle(&slot, version, committed.is_ok());
            if let Some(id) = idempotency_id {
                actor.idempotency_in_flight.remove(&id);
            }
            let seq = committed?;
            Ok(WriteOutcome::Applied { seq, state })
        }))
    }
}

impl Handler<Merge> for PartitionActor {
    /// `None`: nothing new to store. `Some`: queued for the group commit; the caller may queue
    /// more before awaiting it, so one commit can carry a whole replication batch.
    type Result = Result<Option<WriteTicket<u64>>, WriteError>;

    fn handle(&mut self, msg: Merge, _ctx: &mut Self::Context) -> Self::Result {
        let span = child_span(
            &msg.span,
            || tracing::info_span!("partition_merge", bucket = %msg.bucket),
        );
        let _entered = span.enter();
        let slot = (msg.bucket, msg.key);
        if let KeyState::Lww(reg) = &msg.state {
            // Keep our hybrid clock ahead of every timestamp we have seen.
            self.shared.hlc.observe(reg.marker.hlc);
        }
        let (merged, encoded) = match self.latest(&slot, msg.kind)? {
            None => {
                let encoded = encode_state(&msg.state);
                (msg.state, encoded)
            }
            Some((mut current, _)) => {
                let before = encode_state(&current);
                if let Err(error) = current.merge(msg.state) {
                    self.keep(slot, current, before.len());
                    return Err(error.into());
                }
                let after = encode_state(&current);
                if after == before {
                    // Nothing new: a redelivery or an older state.
                    self.keep(slot, current, before.len());
                    return Ok(None);
                }
                (current, after)
            }
        };
        let size = encoded.len();
        let ticket = self.submit(&slot, &merged, encoded, msg.logged, None, None)?;
        self.keep(slot, merged, size);
        Ok(Some(ticket))
    }
}

/// A message counted in `partition_mailbox_depth` from its sending until its actor takes it,
/// or drops it unhandled (an actor stopped with its worker), so the gauge never drifts.
pub struct Queued<M> {
    msg: M,
    _depth: Depth,
}

/// One message's share of the mailbox gauge, given back when dropped.
struct Depth(IntGauge);

impl Drop for Depth {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<M> Queued<M> {
    fn new(msg: M, gauge: &IntGauge) -> Self {
        gauge.inc();
        Self {
            msg,
            _depth: Depth(gauge.clone()),
        }
    }

    /// The message, its place in the mailbox given back.
    fn take(self) -> M {
        self.msg
    }
}

impl<M: Message> Message for Queued<M> {
    type Result = M::Result;
}

/// Each counted message is handled as itself once taken out of the mailbox.
macro_rules! handle_queued {
    ($message:ty) => {
        impl Handler<Queued<$message>> for PartitionActor {
            type Result = <Self as Handler<$message>>::Result;

            fn handle(
                &mut self,
                queued: Queued<$message>,
                ctx: &mut Self::Context,
            ) -> Self::Result {
                Handler::<$message>::handle(self, queued.take(), ctx)
            }
        }
    };
}

handle_queued!(Write);
handle_queued!(Merge);

/// Keys whose states storage removed (tombstone GC, the bucket sweep): a cached copy would
/// make merges of them look like nothing new and writes build on what is gone.
pub struct Evict {
    /// The removed keys.
    pub keys: Vec<(String, String)>,
}

impl Message for Evict {
    type Result = ();
}

impl Handler<Evict> for PartitionActor {
    type Result = ();

    fn handle(&mut self, msg: Evict, _ctx: &mut Self::Context) {
        for slot in &msg.keys {
            self.cache.forget(slot);
        }
    }
}

/// Routes each key to its partition actor: `hash(bucket, key) mod P`.
#[derive(Clone)]
pub struct PartitionRouter {
    /// The actors, once started; replaced whole if they are started again.
    partitions: Arc<RwLock<Arc<Vec<Addr<PartitionActor>>>>>,
    /// Set once the actors are started.
    started: watch::Sender<bool>,
    count: usize,
    shared: Arc<PartitionShared>,
    metrics: Arc<Metrics>,
}

impl PartitionRouter {
    /// `count` partition actors: spread over `threads` arbiters of their own, started now; or,
    /// with `threads == 0`, none until [`PartitionRouter::start_here`] runs them on the one
    /// HTTP worker's thread.
    pub fn start(count: usize, threads: usize, shared: Arc<PartitionShared>) -> Self {
        let router = Self {
            partitions: Arc::default(),
            started: watch::Sender::new(false),
            count: count.max(1),
            metrics: shared.metrics.clone(),
            shared,
        };
        if threads > 0 {
            let arbiters: Vec<Arbiter> = (0..threads).map(|_| Arbiter::new()).collect();
            let partitions = (0..router.count)
                .map(|i| {
                    let shared = router.shared.clone();
                    let arbiter = &arbiters[i % arbiters.len()];
                    PartitionActor::start_in_arbiter(&arbiter.handle(), move |_| {
                        PartitionActor::new(shared)
                    })
                })
                .collect();
            router.install(partitions);
        }
        router
    }

    /// Starts the partition actors on the calling thread's arbiter (an HTTP worker's), in place
    /// of any started before, once those have stopped: actix restarts a worker that died, and
    /// its arbiter stops a moment later. Two sets at once would break the per-key order, so a
    /// set that does not stop ends the process (the journal has every acknowledged write).
    pub fn start_here(&self) {
        let old = self
            .partitions
            .read()
            .map(|p| p.clone())
            .unwrap_or_default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while old.iter().any(Addr::connected) {
            if std::time::Instant::now() >= deadline {
                tracing::error!("the partition actors of a restarted HTTP worker did not stop");
                std::process::exit(70);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let partitions = (0..self.count)
            .map(|_| PartitionActor::new(self.shared.clone()).start())
            .collect();
        self.install(partitions);
    }

    fn install(&self, partitions: Vec<Addr<PartitionActor>>) {
        if let Ok(mut current) = self.partitions.write() {
            *current = Arc::new(partitions);
        }
        self.started.send_replace(true);
    }

    /// Resolves once the actors are started.
    pub async fn started(&self) {
        let _ = self.started.subscribe().wait_for(|started| *started).await;
    }

    fn owner(&self, bucket: &str, key: &str) -> Option<Addr<PartitionActor>> {
        let partitions = self.partitions.read().ok()?;
        let index = self.owner_index(bucket, key);
        partitions.get(index).cloned()
    }

    fn owner_index(&self, bucket: &str, key: &str) -> usize {
        (key_hash(bucket, key) % self.count as u64) as usize
    }

    /// Sends a write to the actor owning its key and waits for the durable outcome.
    pub async fn write(&self, msg: Write) -> Result<WriteOutcome, WriteError> {
        let owner = self
            .owner(&msg.bucket, &msg.key)
            .ok_or(WriteError::Stopped)?;
        let queued = Queued::new(msg, &self.metrics.partition_mailbox_depth);
        owner.send(queued).await.unwrap_or(Err(WriteError::Stopped))
    }

    /// Drops the cached states of keys storage removed, each at the actor owning it.
    pub fn evict(&self, keys: impl IntoIterator<Item = (String, String)>) {
        let mut by_owner: HashMap<usize, Vec<(String, String)>> = HashMap::default();
        for (bucket, key) in keys {
            let owner = self.owner_index(&bucket, &key);
            by_owner.entry(owner).or_default().push((bucket, key));
        }
        let Ok(partitions) = self.partitions.read() else {
            return;
        };
        for (owner, keys) in by_owner {
            if let Some(partition) = partitions.get(owner) {
                partition.do_send(Evict { keys });
            }
        }
    }

    /// Joins a peer's state into the key's; returns once it is queued for a group commit.
    pub async fn merge(&self, msg: Merge) -> Result<Option<WriteTicket<u64>>, WriteError> {
        let owner = self
            .owner(&msg.bucket, &msg.key)
            .ok_or(WriteError::Stopped)?;
        let queued = Queued::new(msg, &self.metrics.partition_mailbox_depth);
        owner.send(queued).await.unwrap_or(Err(WriteError::Stopped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_leaves_the_gauge_when_taken_or_dropped_unhandled() {
        let gauge = IntGauge::new("depth", "test").expect("gauge");
        let taken = Queued::new(1u8, &gauge);
        let dropped = Queued::new(2u8, &gauge);
        assert_eq!(gauge.get(), 2);
        assert_eq!(taken.take(), 1);
        assert_eq!(gauge.get(), 1);
        drop(dropped);
        assert_eq!(gauge.get(), 0);
    }
}
