//! Checkpoints: the overlay moves into the state database in key order, a chunk per
//! transaction, then the state database is made durable and the journal cut.

use super::{Writer, DRAIN_CHUNK, FLUSH_AT_ONCE, OVERLAY_BYTES};
use crate::storage::overlay::Entry;
use crate::storage::tables::KEYS;
use crate::storage::StorageError;
use redb::Durability;
use std::ops::Bound;
use std::time::Instant;

impl Writer {
    /// Makes the state database durable and cuts the journal, when due or when `force`d.
    pub(super) fn checkpoint(&mut self, force: bool) {
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
}
