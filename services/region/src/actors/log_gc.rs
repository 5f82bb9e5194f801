//! Log GC: truncates replication-log entries every peer has acknowledged, and expires
//! idempotency records older than `idempotency_ttl_secs`.

use crate::region::Region;
use actix::prelude::*;
use std::sync::Arc;
use std::time::Duration;

/// Periodically removes acknowledged log entries.
pub struct LogGc {
    region: Arc<Region>,
}

impl LogGc {
    /// A log GC for the region.
    pub fn new(region: Arc<Region>) -> Self {
        Self { region }
    }

    fn collect(&self) {
        let region = &self.region;
        let last = region.storage.last_seq();
        // Everything up to the slowest peer's cursor is acknowledged everywhere.
        let upto = region
            .peers
            .iter()
            .map(|p| p.acked())
            .min()
            .unwrap_or(last)
            .min(last);
        let first = match region.storage.log_first() {
            Ok(Some(first)) => first,
            Ok(None) => {
                region.metrics.log_entries.set(0);
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "log GC could not read the log");
                return;
            }
        };
        region
            .metrics
            .log_entries
            .set((last + 1).saturating_sub(first) as i64);
        if first <= upto {
            let _span = tracing::debug_span!("log_truncate", first, upto).entered();
            let _ = region.storage.submit_truncate(upto);
        }
    }
}

impl Actor for LogGc {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_secs(1), |gc, _| gc.collect());
        // The sweep scans the whole table, so it runs rarely; records live at least the TTL.
        let ttl_ms = self.region.config.idempotency_ttl_secs.saturating_mul(1000);
        let sweep = Duration::from_millis((ttl_ms / 10).clamp(1000, 600_000));
        ctx.run_interval(sweep, move |gc, _| {
            let before = crate::clock::now_ms().saturating_sub(ttl_ms);
            let _span = tracing::debug_span!("idempotency_expire", before).entered();
            let _ = gc.region.storage.submit_expire_idempotency(before);
        });
    }
}
