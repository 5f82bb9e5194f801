//! Operational routes: health, readiness, metrics, OpenAPI and the cluster view.

use super::error::ApiError;
use crate::clock::now_us;
use crate::peers::ExchangeReport;
use crate::region::Region;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Readiness: storage is open and the region accepts writes.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200), (status = 503)))]
pub async fn readyz(region: web::Data<Region>) -> Result<HttpResponse, ApiError> {
    if region.storage.writable() {
        Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
    } else {
        Err(ApiError::unavailable("storage is not accepting writes"))
    }
}

/// Prometheus metrics in the text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics(region: web::Data<Region>) -> HttpResponse {
    let size = region.storage.file_size();
    region.metrics.storage_size_bytes.set(size as i64);
    let (entries, bytes) = region.storage.overlay_size();
    region.metrics.overlay_entries.set(entries as i64);
    region.metrics.overlay_bytes.set(bytes as i64);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(meridian_observability::metrics::render(
            &region.metrics.registry,
        ))
}

/// One region as seen from this one.
#[derive(Serialize, ToSchema)]
pub struct RegionStatus {
    /// Region name.
    pub name: String,
    /// Base URL (empty for this region).
    pub url: String,
    /// `up` or `down`.
    pub status: &'static str,
    /// Whether this entry is the answering region.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// Replication lag in milliseconds (null until replication measures it).
    pub replication_lag_ms: Option<u64>,
    /// Log entries the region has not acknowledged.
    pub pending_entries: Option<u64>,
    /// Hints queued for it.
    pub hints: Option<u64>,
    /// The last anti-entropy exchange with it since this region started, if any.
    pub last_anti_entropy: Option<ExchangeReport>,
    /// Waiting for a priority anti-entropy exchange: its hints overflowed or expired here, or
    /// its log reached this region with a gap.
    pub needs_anti_entropy: bool,
    /// Milliseconds since it last answered (null if never).
    pub last_contact_ms_ago: Option<u64>,
    /// How far its clock is ahead of this region's, in ms (negative: behind), as its last
    /// heartbeat showed (null before one did). Forwarded writes carry a deadline on the home's
    /// clock, and last-writer-wins buckets order by clocks.
    pub clock_offset_ms: Option<i64>,
}

/// The cluster as this region sees it.
#[derive(Serialize, ToSchema)]
pub struct ClusterView {
    /// Answering region.
    pub region: String,
    /// Cluster id.
    pub cluster_id: String,
    /// This region's incarnation id.
    pub incarnation: String,
    /// Every region, this one included.
    pub regions: Vec<RegionStatus>,
    /// Per origin incarnation, the highest sequence number whose effects this region holds
    /// (applied contiguously, and below any gap in the origin's log not yet filled).
    pub applied: BTreeMap<String, u64>,
    /// Whether an anti-entropy exchange has completed with every peer since start: a new or
    /// restored region has caught up.
    pub caught_up: bool,
    /// Root of this region's anti-entropy tree (hex): two regions holding the same data show
    /// the same root.
    pub tree_root: String,
}

/// The cluster view.
#[utoipa::path(get, operation_id = "cluster_status", path = "/v1/cluster", tag = "operations", responses((status = 200, body = ClusterView)))]
pub async fn cluster(region: web::Data<Region>) -> HttpResponse {
    let last_seq = region.storage.last_seq();
    let mut regions = vec![RegionStatus {
        name: region.name().to_string(),
        url: String::new(),
        status: "up",
        is_self: true,
        replication_lag_ms: Some(0),
        pending_entries: Some(0),
        hints: Some(0),
        last_anti_entropy: None,
        needs_anti_entropy: false,
        last_contact_ms_ago: Some(0),
        clock_offset_ms: Some(0),
    }];
    regions.extend(region.peers.iter().map(|peer| {
        let acked = peer.acked();
        let pending = last_seq.saturating_sub(acked);
        // Lag in time: how long the oldest entry the peer has not acknowledged has waited.
        let lag_ms = if pending == 0 {
            0
        } else {
            region
                .storage
                .durable_at(acked + 1)
                .map_or(0, |durable| now_us().saturating_sub(durable) / 1000)
        };
        RegionStatus {
            name: peer.name.to_string(),
            url: peer.url.clone(),
            status: if peer.is_up() { "up" } else { "down" },
            is_self: false,
            replication_lag_ms: Some(lag_ms),
            pending_entries: Some(pending),
            hints: Some(if peer.is_up() { 0 } else { pending }),
            last_anti_entropy: peer.last_exchange(),
            needs_anti_entropy: peer.ae_needed(),
            last_contact_ms_ago: peer.silent_for_ms(),
            clock_offset_ms: peer.clock().map(|clock| clock.offset_ms),
        }
    }));
    regions.sort_by(|a, b| a.name.cmp(&b.name));
    let applied = region
        .held()
        .into_iter()
        .map(|(origin, seq)| (origin.to_string(), seq))
        .collect();
    HttpResponse::Ok().json(ClusterView {
        region: region.name().to_string(),
        cluster_id: region.config.cluster_id.clone(),
        incarnation: region.storage.identity().incarnation.to_string(),
        regions,
        applied,
        caught_up: region.caught_up(),
        tree_root: format!(
            "{:016x}",
            region.storage.with_tree(|t| t.root()).unwrap_or(0)
        ),
    })
}
