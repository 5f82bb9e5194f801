//! Operational routes: health, readiness, metrics, OpenAPI and the cluster view.

use super::error::ApiError;
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
    /// Last anti-entropy exchange (RFC 3339), if any.
    pub last_anti_entropy: Option<String>,
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
    /// Per origin incarnation, the highest contiguous sequence number applied here.
    pub applied: BTreeMap<String, u64>,
}

/// The cluster view.
#[utoipa::path(get, path = "/v1/cluster", tag = "operations", responses((status = 200, body = ClusterView)))]
pub async fn cluster(region: web::Data<Region>) -> HttpResponse {
    let mut regions = vec![RegionStatus {
        name: region.name().to_string(),
        url: String::new(),
        status: "up",
        is_self: true,
        replication_lag_ms: Some(0),
        pending_entries: Some(0),
        hints: Some(0),
        last_anti_entropy: None,
    }];
    // Peers are listed but not yet contacted: their status is unknown until membership exists.
    regions.extend(region.config.peers.iter().map(|(name, url)| RegionStatus {
        name: name.to_string(),
        url: url.clone(),
        status: "down",
        is_self: false,
        replication_lag_ms: None,
        pending_entries: None,
        hints: None,
        last_anti_entropy: None,
    }));
    regions.sort_by(|a, b| a.name.cmp(&b.name));
    let applied = region
        .applied()
        .into_iter()
        .map(|(origin, seq)| (origin.to_string(), seq))
        .collect();
    HttpResponse::Ok().json(ClusterView {
        region: region.name().to_string(),
        cluster_id: region.config.cluster_id.clone(),
        incarnation: region.storage.identity().incarnation.to_string(),
        regions,
        applied,
    })
}
