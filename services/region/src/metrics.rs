//! The region's Prometheus metrics: names say subject and unit.

use meridian_observability::metrics::latency_buckets;
use prometheus::{
    exponential_buckets, Counter, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the region exports, registered in one registry.
pub struct Metrics {
    /// Registry rendered at `/metrics`.
    pub registry: Registry,
    /// HTTP requests by method, route pattern and status.
    pub http_requests: IntCounterVec,
    /// HTTP request latency by method, route pattern and status.
    pub http_duration: HistogramVec,
    /// Writes per group commit.
    pub commit_batch_size: Histogram,
    /// Time to write and durably commit one group.
    pub commit_duration: Histogram,
    /// Time commits waited for callers still queueing requests that belong with them.
    pub commit_gather_wait: Counter,
    /// Writes committed (each gets a region sequence number).
    pub writes_committed: IntCounter,
    /// Bytes appended to the write-ahead journal.
    pub journal_bytes: IntCounter,
    /// Bytes of journal file zero-filled, by who: its filler thread, or appends themselves.
    pub journal_zero_fill: IntCounterVec,
    /// Time to make the state database durable and cut the journal.
    pub checkpoint_duration: Histogram,
    /// Checkpoints that failed (the journal keeps everything until one succeeds).
    pub checkpoint_failures: IntCounter,
    /// Writes waiting for the storage writer.
    pub commit_queue_depth: IntGauge,
    /// Writes accepted by partition actors and not yet committed.
    pub partition_pending_writes: IntGauge,
    /// Messages waiting in partition actors' mailboxes.
    pub partition_mailbox_depth: IntGauge,
    /// Writes refused because the commit queue was full.
    pub writes_shed: IntCounter,
    /// Highest region sequence number committed.
    pub last_sequence: IntGauge,
    /// Size of the redb file, sampled at scrape time.
    pub storage_size_bytes: IntGauge,
    /// Key states in the write-back overlay, sampled at scrape time.
    pub overlay_entries: IntGauge,
    /// Approximate memory of the write-back overlay, sampled at scrape time.
    pub overlay_bytes: IntGauge,
    /// Key states moved from the overlay into the state database.
    pub overlay_flushed: IntCounter,
    /// 1 while a peer is considered up.
    pub peer_up: IntGaugeVec,
    /// Heartbeats that failed, by peer.
    pub heartbeats_failed: IntCounterVec,
    /// Replication batches acknowledged, by peer.
    pub replication_batches: IntCounterVec,
    /// Log entries acknowledged by peers, by peer.
    pub replication_entries: IntCounterVec,
    /// Entries per replication batch.
    pub replication_batch_entries: Histogram,
    /// Time from a write being durable here to its durable apply at the peer, by peer.
    pub replication_lag: HistogramVec,
    /// Log entries a peer has not acknowledged yet, by peer.
    pub replication_pending_entries: IntGaugeVec,
    /// Hints (unacknowledged entries) of down peers, by peer.
    pub hints_pending: IntGaugeVec,
    /// Hints delivered: entries a peer lacked while it was down, sent once it returned, by peer.
    pub hints_drained: IntCounterVec,
    /// Peers whose hints overflowed or expired (handed to anti-entropy), by peer.
    pub hints_overflowed: IntCounterVec,
    /// Entries applied from peers' logs, by origin region.
    pub replicated_applied: IntCounterVec,
    /// Writes forwarded to their home region, by outcome.
    pub forwards: IntCounterVec,
    /// Writes accepted outside their home region.
    pub failover_writes: IntCounter,
    /// Writes not failed over: an earlier attempt with their Idempotency-Key may still apply
    /// at the home.
    pub failovers_refused: IntCounter,
    /// Forwarded writes refused unapplied at the home: they arrived after their deadline.
    pub forwards_too_late: IntCounter,
    /// Writes refused before applying: too few peers up for their `ack`.
    pub acks_refused: IntCounter,
    /// Idempotency keys whose forward to the home has an unknown outcome.
    pub forwards_in_doubt: IntGauge,
    /// Keys in doubt forgotten early because too many were (their retries may fail over).
    pub forwards_in_doubt_evicted: IntCounter,
    /// Key states dropped because their type is not their bucket's (written under a
    /// concurrent definition of the bucket that lost): peers' skipped, and local ones swept.
    pub foreign_states_dropped: IntCounter,
    /// Entries currently in the replication log.
    pub log_entries: IntGauge,
    /// Anti-entropy exchanges, by peer and outcome (`in_sync`, `repaired`, `deferred`, `failed`).
    pub ae_exchanges: IntCounterVec,
    /// Duration of anti-entropy exchanges, by peer.
    pub ae_duration: HistogramVec,
    /// Tree segments compared in anti-entropy exchanges, by peer.
    pub ae_segments_compared: IntCounterVec,
    /// Keys whose state an exchange changed, by peer and side (`local`, `peer`).
    pub ae_keys_repaired: IntCounterVec,
    /// Anti-entropy body bytes, by peer and direction (`sent`, `received`).
    pub ae_bytes: IntCounterVec,
    /// Keys a quorum or all read wrote back to a stale region (this one included).
    pub read_repairs: IntCounter,
    /// Write-backs a quorum or all read left to anti-entropy (too many in flight to that peer).
    pub read_repairs_skipped: IntCounter,
    /// 1 once this region has completed an exchange with every peer since it started empty.
    pub caught_up: IntGauge,
    /// Causally stable tombstones removed.
    pub tombstones_removed: IntCounter,
}

impl Metrics {
    /// Creates every per-peer series at zero, so dashboards and alerts see them before the
    /// first event (a counter that never moved is still a fact worth showing).
    pub fn register_peers<'a>(&self, peers: impl Iterator<Item = &'a str>) {
        for peer in peers {
            let labels = [peer];
            self.peer_up.with_label_values(&labels);
            self.heartbeats_failed.with_label_values(&labels);
            self.replication_batches.with_label_values(&labels);
            self.replication_entries.with_label_values(&labels);
            self.replication_lag.with_label_values(&labels);
            self.replication_pending_entries.with_label_values(&labels);
            self.hints_pending.with_label_values(&labels);
            self.hints_drained.with_label_values(&labels);
            self.hints_overflowed.with_label_values(&labels);
            self.replicated_applied.with_label_values(&labels);
            self.ae_duration.with_label_values(&labels);
            self.ae_segments_compared.with_label_values(&labels);
            for outcome in ["in_sync", "repaired", "deferred", "failed"] {
                self.ae_exchanges.with_label_values(&[peer, outcome]);
            }
            for side in ["local", "peer"] {
                self.ae_keys_repaired.with_label_values(&[peer, side]);
            }
            for direction in ["sent", "received"] {
                self.ae_bytes.with_label_values(&[peer, direction]);
            }
        }
    }

    /// Creates and registers every metric.
    pub fn new(region: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(
            Some("meridian".into()),
            Some([("region".to_string(), region.to_string())].into()),
        )?;
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests served"),
            &["method", "route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(latency_buckets()),
            &["method", "route", "status"],
        )?;
        let commit_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "storage_commit_batch_size",
                "Writes carried by one group commit",
            )
            .buckets(exponential_buckets(1.0, 2.0, 14)?),
        )?;
        let commit_duration = Histogram::with_opts(
            HistogramOpts::new(
                "storage_commit_duration_seconds",
                "Time to write and durably commit one group",
            )
            .buckets(latency_buckets()),
        )?;
        let commit_gather_wait = Counter::new(
            "storage_commit_gather_wait_seconds_total",
            "Time commits waited for callers still queueing requests that belong with them",
        )?;
        let writes_committed =
            IntCounter::new("storage_writes_committed_total", "Writes durably committed")?;
        let journal_bytes = IntCounter::new(
            "storage_journal_bytes_total",
            "Bytes appended to the write-ahead journal",
        )?;
        let journal_zero_fill = IntCounterVec::new(
            Opts::new(
                "storage_journal_zero_fill_bytes_total",
                "Bytes of journal file zero-filled, by the filler thread or by appends",
            ),
            &["by"],
        )?;
        let checkpoint_duration = Histogram::with_opts(
            HistogramOpts::new(
                "storage_checkpoint_duration_seconds",
                "Time to make the state database durable and cut the journal",
            )
            .buckets(latency_buckets()),
        )?;
        let checkpoint_failures = IntCounter::new(
            "storage_checkpoint_failures_total",
            "Checkpoints that failed",
        )?;
        let commit_queue_depth = IntGauge::new(
            "storage_commit_queue_depth",
            "Writes waiting for the writer",
        )?;
        let partition_pending_writes = IntGauge::new(
            "partition_pending_writes",
            "Writes accepted by partition actors, not yet committed",
        )?;
        let partition_mailbox_depth = IntGauge::new(
            "partition_mailbox_depth",
            "Messages waiting in partition actors' mailboxes",
        )?;
        registry.register(Box::new(partition_mailbox_depth.clone()))?;
        let writes_shed = IntCounter::new(
            "storage_writes_shed_total",
            "Writes refused with 503 because the commit queue was full",
        )?;
        let last_sequence = IntGauge::new(
            "region_last_sequence",
            "Highest region sequence number committed",
        )?;
        let storage_size_bytes = IntGauge::new("storage_size_bytes", "Size of the redb file")?;
        let overlay_entries = IntGauge::new(
            "storage_overlay_entries",
            "Key states committed but not yet in the state database",
        )?;
        let overlay_bytes = IntGauge::new(
            "storage_overlay_bytes",
            "Approximate memory of the key states not yet in the state database",
        )?;
        let overlay_flushed = IntCounter::new(
            "storage_overlay_flushed_total",
            "Key states moved from the overlay into the state database",
        )?;

        let peer_up = IntGaugeVec::new(Opts::new("peer_up", "1 while the peer is up"), &["peer"])?;
        let heartbeats_failed = IntCounterVec::new(
            Opts::new("peer_heartbeats_failed_total", "Heartbeats that failed"),
            &["peer"],
        )?;
        let replication_batches = IntCounterVec::new(
            Opts::new(
                "replication_batches_total",
                "Replication batches acknowledged",
            ),
            &["peer"],
        )?;
        let replication_entries = IntCounterVec::new(
            Opts::new(
                "replication_entries_total",
                "Log entries acknowledged by the peer",
            ),
            &["peer"],
        )?;
        let replication_batch_entries = Histogram::with_opts(
            HistogramOpts::new("replication_batch_entries", "Entries per replication batch")
                .buckets(exponential_buckets(1.0, 2.0, 14)?),
        )?;
        let replication_lag = HistogramVec::new(
            HistogramOpts::new(
                "replication_lag_seconds",
                "Time from a write being durable here to its durable apply at the peer",
            )
            .buckets(latency_buckets()),
            &["peer"],
        )?;
        let replication_pending_entries = IntGaugeVec::new(
            Opts::new(
                "replication_pending_entries",
                "Log entries the peer has not acknowledged",
            ),
            &["peer"],
        )?;
        let hints_pending = IntGaugeVec::new(
            Opts::new(
                "hints_pending_entries",
                "Unacknowledged entries held for a down peer",
            ),
            &["peer"],
        )?;
        let hints_drained = IntCounterVec::new(
            Opts::new(
                "hints_drained_entries_total",
                "Backlog entries delivered to a returning peer",
            ),
            &["peer"],
        )?;
        let hints_overflowed = IntCounterVec::new(
            Opts::new(
                "hints_overflowed_total",
                "Times a peer's hints overflowed or expired and it was flagged for anti-entropy",
            ),
            &["peer"],
        )?;
        let replicated_applied = IntCounterVec::new(
            Opts::new(
                "replication_applied_entries_total",
                "Entries applied from a peer's log",
            ),
            &["origin"],
        )?;
        let forwards = IntCounterVec::new(
            Opts::new(
                "forwards_total",
                "Writes forwarded to their home region, by outcome",
            ),
            &["outcome"],
        )?;
        let failover_writes = IntCounter::new(
            "failover_writes_total",
            "Writes accepted outside their home region because the home was unreachable",
        )?;
        let failovers_refused = IntCounter::new(
            "failovers_refused_total",
            "Writes not failed over because an earlier attempt with their Idempotency-Key may \
             still be applied by the home",
        )?;
        let forwards_too_late = IntCounter::new(
            "forwards_too_late_total",
            "Forwarded writes this home refused unapplied because they reached it after the \
             forwarder had stopped waiting (a hung or overloaded home)",
        )?;
        let acks_refused = IntCounter::new(
            "acks_refused_total",
            "Writes refused before applying because too few regions were up for their ack level",
        )?;
        let forwards_in_doubt = IntGauge::new(
            "forwards_in_doubt",
            "Idempotency keys whose forward to the home region has an unknown outcome",
        )?;
        let forwards_in_doubt_evicted = IntCounter::new(
            "forwards_in_doubt_evicted_total",
            "Idempotency keys in doubt forgotten early because too many were in doubt",
        )?;
        let foreign_states_dropped = IntCounter::new(
            "foreign_states_dropped_total",
            "Key states dropped because a concurrent definition of their bucket with another \
             type won",
        )?;
        let log_entries =
            IntGauge::new("replication_log_entries", "Entries in the replication log")?;
        let ae_exchanges = IntCounterVec::new(
            Opts::new(
                "anti_entropy_exchanges_total",
                "Anti-entropy exchanges with a peer, by outcome (deferred: the peer ran it)",
            ),
            &["peer", "outcome"],
        )?;
        let ae_duration = HistogramVec::new(
            HistogramOpts::new(
                "anti_entropy_exchange_seconds",
                "Duration of one anti-entropy exchange",
            )
            .buckets(exponential_buckets(0.001, 4.0, 10)?),
            &["peer"],
        )?;
        let ae_segments_compared = IntCounterVec::new(
            Opts::new(
                "anti_entropy_segments_compared_total",
                "Merkle tree segments compared with a peer",
            ),
            &["peer"],
        )?;
        let ae_keys_repaired = IntCounterVec::new(
            Opts::new(
                "anti_entropy_keys_repaired_total",
                "Keys whose state an exchange changed, by the side that changed",
            ),
            &["peer", "side"],
        )?;
        let ae_bytes = IntCounterVec::new(
            Opts::new(
                "anti_entropy_bytes_total",
                "Anti-entropy body bytes, by direction",
            ),
            &["peer", "direction"],
        )?;
        let read_repairs = IntCounter::new(
            "read_repairs_total",
            "Keys a quorum or all read wrote back to a stale region",
        )?;
        let read_repairs_skipped = IntCounter::new(
            "read_repairs_skipped_total",
            "Write-backs a quorum or all read left to anti-entropy (too many in flight to that peer)",
        )?;
        let caught_up = IntGauge::new(
            "caught_up",
            "1 once the region has completed an anti-entropy exchange with every peer",
        )?;
        let tombstones_removed = IntCounter::new(
            "tombstones_removed_total",
            "Deletion tombstones removed once causally stable",
        )?;
        registry.register(Box::new(tombstones_removed.clone()))?;
        registry.register(Box::new(ae_exchanges.clone()))?;
        registry.register(Box::new(ae_duration.clone()))?;
        registry.register(Box::new(ae_segments_compared.clone()))?;
        registry.register(Box::new(ae_keys_repaired.clone()))?;
        registry.register(Box::new(ae_bytes.clone()))?;
        registry.register(Box::new(read_repairs.clone()))?;
        registry.register(Box::new(read_repairs_skipped.clone()))?;
        registry.register(Box::new(caught_up.clone()))?;
        registry.register(Box::new(replication_batch_entries.clone()))?;
        registry.register(Box::new(peer_up.clone()))?;
        registry.register(Box::new(heartbeats_failed.clone()))?;
        registry.register(Box::new(replication_batches.clone()))?;
        registry.register(Box::new(replication_entries.clone()))?;
        registry.register(Box::new(replication_lag.clone()))?;
        registry.register(Box::new(replication_pending_entries.clone()))?;
        registry.register(Box::new(hints_pending.clone()))?;
        registry.register(Box::new(hints_drained.clone()))?;
        registry.register(Box::new(hints_overflowed.clone()))?;
        registry.register(Box::new(replicated_applied.clone()))?;
        registry.register(Box::new(forwards.clone()))?;
        registry.register(Box::new(failover_writes.clone()))?;
        registry.register(Box::new(failovers_refused.clone()))?;
        registry.register(Box::new(forwards_too_late.clone()))?;
        registry.register(Box::new(acks_refused.clone()))?;
        registry.register(Box::new(forwards_in_doubt.clone()))?;
        registry.register(Box::new(forwards_in_doubt_evicted.clone()))?;
        registry.register(Box::new(foreign_states_dropped.clone()))?;
        registry.register(Box::new(log_entries.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(commit_batch_size.clone()))?;
        registry.register(Box::new(commit_duration.clone()))?;
        registry.register(Box::new(commit_gather_wait.clone()))?;
        registry.register(Box::new(writes_committed.clone()))?;
        registry.register(Box::new(journal_bytes.clone()))?;
        registry.register(Box::new(journal_zero_fill.clone()))?;
        registry.register(Box::new(checkpoint_duration.clone()))?;
        registry.register(Box::new(checkpoint_failures.clone()))?;
        registry.register(Box::new(commit_queue_depth.clone()))?;
        registry.register(Box::new(partition_pending_writes.clone()))?;
        registry.register(Box::new(writes_shed.clone()))?;
        registry.register(Box::new(last_sequence.clone()))?;
        registry.register(Box::new(storage_size_bytes.clone()))?;
        registry.register(Box::new(overlay_entries.clone()))?;
        registry.register(Box::new(overlay_bytes.clone()))?;
        registry.register(Box::new(overlay_flushed.clone()))?;
        for outcome in [
            "answered",
            "refused",
            "unknown",
            "home_down",
            "unknown_home",
        ] {
            forwards.with_label_values(&[outcome]);
        }
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            commit_batch_size,
            commit_duration,
            commit_gather_wait,
            writes_committed,
            journal_bytes,
            journal_zero_fill,
            checkpoint_duration,
            checkpoint_failures,
            commit_queue_depth,
            partition_pending_writes,
            partition_mailbox_depth,
            writes_shed,
            last_sequence,
            storage_size_bytes,
            overlay_entries,
            overlay_bytes,
            overlay_flushed,
            peer_up,
            heartbeats_failed,
            replication_batches,
            replication_entries,
            replication_batch_entries,
            replication_lag,
            replication_pending_entries,
            hints_pending,
            hints_drained,
            hints_overflowed,
            replicated_applied,
            forwards,
            failover_writes,
            failovers_refused,
            forwards_too_late,
            acks_refused,
            forwards_in_doubt,
            forwards_in_doubt_evicted,
            foreign_states_dropped,
            log_entries,
            ae_exchanges,
            ae_duration,
            ae_segments_compared,
            ae_keys_repaired,
            ae_bytes,
            read_repairs,
            read_repairs_skipped,
            caught_up,
            tombstones_removed,
        })
    }
}
