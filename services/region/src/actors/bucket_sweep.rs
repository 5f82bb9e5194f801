//! Bucket sweep: when a bucket's definition is replaced by a concurrent one of another type
//! (two regions created it differently while apart; every region keeps the same winner), the
//! states written here under the losing type can never merge with the winner's. Reads and
//! merges already treat them as absent; the sweep removes them from storage and from the
//! anti-entropy tree, so that regions converge on the same keys.

use crate::region::Region;
use crate::storage::Purge;
use std::sync::Arc;
use tokio::sync::mpsc;

/// States removed per commit.
const CHUNK: usize = 256;

/// Sweeps every bucket whose type changed, as the names arrive, until the sender is gone.
pub async fn run(region: Arc<Region>, mut retyped: mpsc::UnboundedReceiver<String>) {
    while let Some(bucket) = retyped.recv().await {
        let span = tracing::info_span!("bucket_sweep", bucket = %bucket);
        let _entered = span.enter();
        match sweep(&region, &bucket).await {
            Ok(0) => {}
            Ok(removed) => tracing::warn!(
                %bucket,
                removed,
                "states written under a losing definition of the bucket (another type) removed"
            ),
            // Reads and merges still treat what is left as absent; the next change retries.
            Err(error) => tracing::error!(%bucket, %error, "bucket sweep failed"),
        }
    }
}

/// Removes the bucket's states whose type is not its type now; returns how many.
async fn sweep(region: &Region, bucket: &str) -> Result<u64, crate::storage::StorageError> {
    let Some(kind) = region.storage.bucket(bucket).map(|def| def.kind) else {
        return Ok(0);
    };
    let mut removed = 0;
    let mut after: Option<String> = None;
    loop {
        let page = region
            .storage
            .foreign_states(bucket, kind, after.as_deref(), CHUNK)?;
        if !page.states.is_empty() {
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
            region.metrics.foreign_states_dropped.inc_by(gone);
            removed += gone;
        }
        match page.next {
            Some(key) => after = Some(key),
            None => return Ok(removed),
        }
    }
}
