//! The region's Prometheus metrics: names say subject and unit.

use meridian_observability::metrics::latency_buckets;
use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry,
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
    /// Writes committed (each gets a region sequence number).
    pub writes_committed: IntCounter,
    /// Writes waiting for the storage writer.
    pub commit_queue_depth: IntGauge,
    /// Writes accepted by partition actors and not yet committed.
    pub partition_pending_writes: IntGauge,
    /// Writes refused because the commit queue was full.
    pub writes_shed: IntCounter,
    /// Highest region sequence number committed.
    pub last_sequence: IntGauge,
    /// Size of the redb file, sampled at scrape time.
    pub storage_size_bytes: IntGauge,
}

impl Metrics {
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
        let writes_committed =
            IntCounter::new("storage_writes_committed_total", "Writes durably committed")?;
        let commit_queue_depth = IntGauge::new(
            "storage_commit_queue_depth",
            "Writes waiting for the writer",
        )?;
        let partition_pending_writes = IntGauge::new(
            "partition_pending_writes",
            "Writes accepted by partition actors, not yet committed",
        )?;
        let writes_shed = IntCounter::new(
            "storage_writes_shed_total",
            "Writes refused with 503 because the commit queue was full",
        )?;
        let last_sequence = IntGauge::new(
            "region_last_sequence",
            "Highest region sequence number committed",
        )?;
        let storage_size_bytes = IntGauge::new("storage_size_bytes", "Size of the redb file")?;

        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(commit_batch_size.clone()))?;
        registry.register(Box::new(commit_duration.clone()))?;
        registry.register(Box::new(writes_committed.clone()))?;
        registry.register(Box::new(commit_queue_depth.clone()))?;
        registry.register(Box::new(partition_pending_writes.clone()))?;
        registry.register(Box::new(writes_shed.clone()))?;
        registry.register(Box::new(last_sequence.clone()))?;
        registry.register(Box::new(storage_size_bytes.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            commit_batch_size,
            commit_duration,
            writes_committed,
            commit_queue_depth,
            partition_pending_writes,
            writes_shed,
            last_sequence,
            storage_size_bytes,
        })
    }
}
