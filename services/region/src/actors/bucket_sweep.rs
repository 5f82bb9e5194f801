//! Bucket sweep: when a bucket's definition is replaced by a concurrent one of another type
//! (two regions created it differently while apart; every region keeps the same winner), the
//! states written here under the losing type can never merge with the winner's. Reads and
//! merges already treat them as absent; the sweep removes them from storage and from the
//! anti-entropy tree, so that regions converge on the same keys.
//!
//! A sweep starts when a definition changes type or arrives here new, and again whenever
//! anti-entropy finds a state of the wrong type among the keys it repairs: that covers a
//! state merged in just after a sweep passed it, and a sweep cut short by a restart.

use crate::region::Region;
use crate::storage::{Purge, StorageError};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::Instrument;

/// States removed per commit.
const CHUNK: usize = 256;

/// Sweeps every bucket whose type changed, as the names arrive, until the sender is gone.
pub async fn run(region: Arc<Region>, mut retyped: mpsc::UnboundedReceiver<String>) {
    while let Some(first) = retyped.recv().await {
        // Requests that queued up meanwhile (anti-entropy asks each round) need one sweep.
        let mut buckets = BTreeSet::from([first]);
        while let Ok(more) = retyped.try_recv() {
            buckets.insert(more);
        }
        for bucket in buckets {
            sweep_logged(&region, &bucket).await;
        }
    }
}

/// Sweeps one bucket in its own span and logs what it removed.
async fn sweep_logged(region: &Region, bucket: &str) {
    let span = tracing::info_span!("bucket_sweep", bucket = %bucket);
    match sweep(region, bucket).instrument(span).await {
        Ok(0) => {}
        Ok(removed) => tracing::warn!(
            %bucket,
            removed,
            "states written under a losing definition of the bucket (another type) removed"
        ),
        // Reads and merges still treat what is left as absent; anti-entropy asks again.
        Err(error) => tracing::error!(%bucket, %error, "bucket sweep failed"),
    }
}

/// Removes the bucket's states whose type is not its type now; returns how many.
async fn sweep(region: &Region, bucket: &str) -> Result<u64, StorageError> {
    let Some(kind) = region.storage.bucket(bucket).map(|def| def.kind) else {
        return Ok(0);
    };
    let mut removed = 0;
    let mut after: Option<String> = None;
    loop {
        // A page may scan the whole bucket: off the async threads.
        let (storage, name, from) = (region.storage.clone(), bucket.to_string(), after.take());
        let page = tokio::task::spawn_blocking(move || {
            storage.foreign_states(&name, kind, from.as_deref(), CHUNK)
        })
        .await
        .map_err(|e| StorageError::Corrupt(format!("sweep scan stopped: {e}")))??;
        if !page.states.is_empty() {
            let keys: Vec<(String, String)> = page
                .states
                .iter()
                .map(|(key, _)| (bucket.to_string(), key.clone()))
                .collect();
            let purge = Purge {
                // Removed only if still exactly this state: one written meanwhile stays.
                remove: page
                    .states
                    .into_iter()
                    .map(|(key, state)| (bucket.to_string(), key, state))
                    .collect(),
                forget: Vec::new(),
            };
            let gone = region.storage.submit_purge(purge)?.await?;
            region.partitions.evict(keys);
            region.metrics.foreign_states_dropped.inc_by(gone);
            removed += gone;
        }
        match page.next {
            Some(key) => after = Some(key),
            None => return Ok(removed),
        }
    }
}
