//! One group commit's transaction: every request of the batch applied in order, the changes
//! journaled durably, the new key states published to the overlay, then the state database's
//! transaction committed (visible, not yet durable by itself).

use super::{
    BucketOutcome, BucketSource, Committed, KeyWrite, Outcome, Purge, Request, Writer,
    TRUNCATE_CHUNK,
};
use crate::clock::now_us;
use crate::storage::ops::{Op, StateTables};
use crate::storage::overlay::{Change, Overlay};
use crate::storage::tables::meta;
use crate::storage::{IdempotencyRecord, StorageError};
use meridian_shared::log::{LogEntry, LogRecord};
use meridian_shared::merkle::{entry_hash, segment_of};
use meridian_shared::{Actor, BucketDef};
use redb::Durability;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

impl Writer {
    /// Applies a batch: journaled durably, then committed to the state database, visible.
    pub(super) fn commit(&mut self, batch: &[Request]) -> Result<Committed, StorageError> {
        let last_seq = *self.last_seq.borrow();
        let mut commits = self.commits.load(Ordering::Acquire);
        // Only this thread moves the failure epoch, so it holds for the whole batch.
        let failure_epoch = self.failures.load(Ordering::Acquire);
        let mut txn = self.db.begin_write()?;
        // Durability comes from the journal; the state database is made durable at checkpoints.
        txn.set_durability(Durability::None)?;
        let mut tables = StateTables::new(&txn);
        let mut applying = Applying {
            tables: &mut tables,
            ops: Vec::with_capacity(batch.len() * 2),
            staged: Staged::default(),
            overlay: &self.overlay,
            seq: last_seq,
            log_bytes: self.log_bytes,
            applied: self.applied.borrow().clone(),
            tree_deltas: Vec::new(),
            now_us: now_us(),
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        for request in batch {
            outcomes.push(applying.request(request, failure_epoch)?);
        }
        let cursors = match self.cursors.lock() {
            Ok(mut cursors) => std::mem::take(&mut *cursors),
            Err(_) => BTreeMap::new(),
        };
        for (peer, seq) in cursors {
            applying.apply(Op::PutCursor {
                peer: peer.into(),
                seq,
            })?;
        }
        let changes_states = batch
            .iter()
            .any(|r| matches!(r, Request::Key(..) | Request::Purge(..)));
        if changes_states {
            commits += 1;
            applying.apply(meta_u64(meta::COMMITS, commits))?;
        }
        if applying.seq != last_seq {
            applying.apply(meta_u64(meta::LAST_SEQ, applying.seq))?;
            applying.apply(meta_u64(meta::LOG_BYTES, applying.log_bytes))?;
        }
        let Applying {
            ops,
            staged,
            seq,
            log_bytes,
            applied,
            tree_deltas,
            ..
        } = applying;
        // The commit below consumes the transaction the tables borrow.
        drop(tables);
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
}

/// A batch's changes so far, while its requests are applied in order in one transaction.
struct Applying<'t, 'txn, 'b> {
    tables: &'t mut StateTables<'txn>,
    /// Every change, in order, for the journal.
    ops: Vec<Op<'b>>,
    staged: Staged<'b>,
    overlay: &'b Overlay,
    /// The last sequence number given out.
    seq: u64,
    /// The replication log's running byte offset.
    log_bytes: u64,
    /// Per origin, the highest contiguous sequence number applied here.
    applied: BTreeMap<Actor, u64>,
    /// `(segment, old entry hash XOR new)` of every key state changed.
    tree_deltas: Vec<(u32, u64)>,
    /// When the batch's commit started: its log records and idempotency records carry it.
    now_us: u64,
}

impl<'b> Applying<'_, '_, 'b> {
    /// Applies one request; what its requester is told once the batch has committed.
    fn request(
        &mut self,
        request: &'b Request,
        failure_epoch: u64,
    ) -> Result<Outcome, StorageError> {
        Ok(match request {
            Request::Key(write, _) => self.key(write)?,
            Request::Bucket(def, source, _) => Outcome::Bucket(self.bucket(def, *source)?),
            // A mark for merges that may have been in a commit that failed since: refused
            // without failing the batch, so the peer resends them.
            Request::Applied(_, _, epoch, _) if *epoch != failure_epoch => Outcome::Failed,
            Request::Applied(origin, upto, _, _) => {
                Outcome::Seq(self.applied_upto(*origin, *upto)?)
            }
            Request::Idempotency(id, record) => {
                self.apply(Op::PutIdempotency {
                    id: *id,
                    record: record.encode(),
                })?;
                Outcome::None
            }
            Request::Truncate(upto) => {
                if let Some(first) = self.tables.log_first()? {
                    let last = (*upto).min(first.saturating_add(TRUNCATE_CHUNK));
                    self.apply(Op::TruncateLog { first, last })?;
                }
                Outcome::None
            }
            Request::Purge(purge, _) => Outcome::Seq(self.purge(purge)?),
            Request::Meta(key, value) => {
                self.apply(Op::PutMeta {
                    key: key.as_str().into(),
                    value: value.clone(),
                })?;
                Outcome::None
            }
            Request::ExpireIdempotency(before_ms) => {
                self.apply(Op::ExpireIdempotency {
                    before_ms: *before_ms,
                })?;
                Outcome::None
            }
            Request::Checkpoint(_) => Outcome::None,
        })
    }

    /// A key's new state; a client write accepted here also gets its log entry (and its
    /// idempotency record), a peer's merge does not.
    fn key(&mut self, write: &'b KeyWrite) -> Result<Outcome, StorageError> {
        let (bucket, key) = (write.bucket.as_str(), write.key.as_str());
        let old = self
            .current_state(bucket, key)?
            .map_or(0, |old| entry_hash(bucket, key, &old));
        // Journaled here, published to the overlay after the batch (see `overlay`).
        self.record(Op::PutKey {
            bucket: bucket.into(),
            key: key.into(),
            state: write.state.as_slice().into(),
        });
        self.staged.insert((bucket, key), Some(&write.state));
        let delta = old ^ entry_hash(bucket, key, &write.state);
        if delta != 0 {
            self.tree_deltas.push((segment_of(bucket, key), delta));
        }
        if write.tombstone {
            self.apply(Op::MarkTombstone {
                bucket: bucket.into(),
                key: key.into(),
            })?;
        }
        if !write.logged {
            return Ok(Outcome::Seq(0));
        }
        let entry = LogEntry::Key {
            bucket: write.bucket.clone(),
            key: write.key.clone(),
            state: write.state.clone(),
        };
        let seq = self.append(entry, write.trace.clone())?;
        if let Some(pending) = &write.idempotency {
            let created_ms = self.now_us / 1000;
            let record = IdempotencyRecord {
                fingerprint: pending.fingerprint,
                status: pending.status,
                body: pending.body.clone(),
                seq,
                created_ms,
                origin: None,
            };
            self.apply(Op::PutIdempotency {
                id: pending.id,
                record: record.encode(),
            })?;
            let entry = LogEntry::Idempotency {
                id: pending.id,
                fingerprint: pending.fingerprint,
                status: pending.status,
                body: pending.body.clone(),
                created_ms,
            };
            self.append(entry, None)?;
        }
        Ok(Outcome::Seq(seq))
    }

    /// A bucket definition, created here by a client or carried by a peer's log.
    fn bucket(
        &mut self,
        def: &BucketDef,
        source: BucketSource,
    ) -> Result<BucketOutcome, StorageError> {
        let existing = match self.tables.bucket(&def.name)? {
            Some(bytes) => Some(
                postcard::from_bytes::<BucketDef>(&bytes)
                    .map_err(|e| StorageError::Corrupt(e.to_string()))?,
            ),
            None => None,
        };
        let store = |def: &BucketDef| postcard::to_allocvec(def).unwrap_or_default();
        let put = |def: &BucketDef| Op::PutBucket {
            name: def.name.clone().into(),
            def: store(def),
        };
        Ok(match (existing, source) {
            (Some(existing), _) if existing == *def => BucketOutcome::Identical,
            (Some(existing), BucketSource::Client) => BucketOutcome::Conflict(existing),
            (Some(existing), BucketSource::Replicated) => {
                // Concurrent creations with different definitions: every region keeps the one
                // with the smaller encoding, so all agree.
                let winner = if store(def) < store(&existing) {
                    def.clone()
                } else {
                    existing
                };
                self.apply(put(&winner))?;
                BucketOutcome::Resolved(winner)
            }
            (None, source) => {
                self.apply(put(def))?;
                if source == BucketSource::Client {
                    self.append(LogEntry::Bucket(def.clone()), None)?;
                }
                BucketOutcome::Created
            }
        })
    }

    /// Advances `origin`'s applied mark to `upto` (never back); returns the mark.
    fn applied_upto(&mut self, origin: Actor, upto: u64) -> Result<u64, StorageError> {
        let next = self.applied.get(&origin).copied().unwrap_or(0).max(upto);
        self.apply(Op::PutApplied {
            origin: origin.as_u128(),
            seq: next,
        })?;
        self.applied.insert(origin, next);
        Ok(next)
    }

    /// Removes the states still exactly as found (causally stable tombstones, or states of a
    /// bucket type that lost); returns how many went.
    fn purge(&mut self, purge: &'b Purge) -> Result<u64, StorageError> {
        let mut removed = 0;
        for (bucket, key, state) in &purge.remove {
            let (bucket, key) = (bucket.as_str(), key.as_str());
            if self.current_state(bucket, key)?.as_ref() != Some(state) {
                continue;
            }
            // Also removes any older state the state database still holds.
            self.apply(Op::RemoveKey {
                bucket: bucket.into(),
                key: key.into(),
            })?;
            self.staged.insert((bucket, key), None);
            self.tree_deltas
                .push((segment_of(bucket, key), entry_hash(bucket, key, state)));
            self.apply(Op::ForgetTombstone {
                bucket: bucket.into(),
                key: key.into(),
            })?;
            removed += 1;
        }
        for (bucket, key, state) in &purge.forget {
            let (bucket, key) = (bucket.as_str(), key.as_str());
            if self.current_state(bucket, key)? != *state {
                continue;
            }
            self.apply(Op::ForgetTombstone {
                bucket: bucket.into(),
                key: key.into(),
            })?;
        }
        Ok(removed)
    }

    /// Applies `op` to the tables and records it; returns what [`StateTables::apply`] returns.
    fn apply(&mut self, op: Op<'b>) -> Result<u64, StorageError> {
        let replaced = self.tables.apply(&op)?;
        self.ops.push(op);
        Ok(replaced)
    }

    /// Records `op` for the journal only (a key state, which goes to the overlay).
    fn record(&mut self, op: Op<'b>) {
        self.ops.push(op);
    }

    /// Appends `entry` to the replication log as the next sequence number, which it returns.
    fn append(&mut self, entry: LogEntry, trace: Option<String>) -> Result<u64, StorageError> {
        self.seq += 1;
        let record = LogRecord {
            committed_us: self.now_us,
            trace,
            log_offset: self.log_bytes,
            entry,
        }
        .encode();
        self.log_bytes += record.len() as u64;
        self.apply(Op::PutLog {
            seq: self.seq,
            record,
        })?;
        Ok(self.seq)
    }

    /// A key's state at this point of the batch: as the batch left it, else the overlay's,
    /// else the state database's.
    fn current_state(
        &mut self,
        bucket: &'b str,
        key: &'b str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(state) = self.staged.get(&(bucket, key)) {
            return Ok(state.map(<[u8]>::to_vec));
        }
        if let Some(state) = self.overlay.with(bucket, key, <[u8]>::to_vec) {
            return Ok(Some(state));
        }
        self.tables.key_state(bucket, key)
    }
}

/// Key states a batch has set (`Some`) or removed (`None`) so far, by `(bucket, key)`.
type Staged<'b> = HashMap<(&'b str, &'b str), Option<&'b [u8]>, foldhash::fast::RandomState>;

/// The op that sets a u64 meta value.
fn meta_u64(key: &'static str, value: u64) -> Op<'static> {
    Op::PutMeta {
        key: key.into(),
        value: value.to_be_bytes().to_vec(),
    }
}
