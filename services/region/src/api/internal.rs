//! The region-to-region protocol (`/internal/v1/*`): heartbeats and log replication (anti-entropy
//! routes live in `anti_entropy.rs`).

use super::error::ApiError;
use crate::config::Config;
use crate::region::Region;
use crate::storage::{IdempotencyRecord, LogGap};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::HeaderMap;
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpRequest, HttpResponse};
use meridian_shared::encoding::decode_state;
use meridian_shared::log::{LogEntry, LogRecord};
use meridian_shared::wire::{
    Heartbeat, ReplicateAck, ReplicateBatch, CLUSTER_HEADER, PEER_HEADER, PROTOCOL_VERSION,
};
use tracing::Instrument;

/// Registers the internal routes.
pub fn configure(cfg: &mut web::ServiceConfig, max_batch_bytes: usize) {
    cfg.service(
        web::scope("/internal/v1")
            .wrap(from_fn(require_peer))
            .app_data(web::PayloadConfig::new(max_batch_bytes))
            .route("/heartbeat", web::get().to(heartbeat))
            .route("/replicate", web::post().to(replicate))
            .service(super::anti_entropy::scope()),
    );
}

/// Refuses requests without the peer token (when configured) or from another cluster.
async fn require_peer(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(region) = req.app_data::<web::Data<Region>>() {
        check_peer(&region.config, req.headers())?;
    }
    next.call(req).await
}

/// Whether a request comes from a peer of this cluster (with the peer token when configured).
pub fn check_peer(config: &Config, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(expected) = &config.security.peer_token {
        let presented = super::bearer_token(headers);
        if !presented.is_some_and(|p| super::constant_time_eq(expected, p)) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "region-to-region requests need the cluster's peer token",
            ));
        }
    }
    let cluster = headers.get(CLUSTER_HEADER).and_then(|v| v.to_str().ok());
    if cluster != Some(config.cluster_id.as_str()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_cluster",
            format!("this region belongs to cluster {:?}", config.cluster_id),
        ));
    }
    Ok(())
}

/// This region's identity and progress.
async fn heartbeat(region: web::Data<Region>) -> HttpResponse {
    HttpResponse::Ok().json(Heartbeat {
        version: PROTOCOL_VERSION,
        region: region.name().clone(),
        cluster_id: region.config.cluster_id.clone(),
        incarnation: region.storage.identity().incarnation,
        last_seq: region.storage.last_seq(),
        applied: region.applied(),
        commits: region.storage.commits(),
        seen_commits: region
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.seen_commits()))
            .collect(),
        gaps: region.gaps(),
        clock_ms: crate::clock::now_ms(),
    })
}

/// Applies a run of a peer's log and answers how far that origin is now applied here.
async fn replicate(
    region: web::Data<Region>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let origin = req
        .headers()
        .get(PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    let batch = ReplicateBatch::decode(&body)
        .map_err(|e| ApiError::bad_request("invalid_batch", format!("undecodable batch: {e}")))?;
    if batch.version != PROTOCOL_VERSION {
        return Err(ApiError::bad_request(
            "protocol_version",
            format!(
                "peer speaks protocol {}, this region {PROTOCOL_VERSION}",
                batch.version
            ),
        ));
    }
    // Only under a sampled request span: one per unsampled batch, with a merge span per entry
    // under it, cost CPU for spans nobody would see.
    let span = meridian_observability::propagation::child_span(
        &tracing::Span::current(),
        || tracing::info_span!("replicate_apply", origin = %origin, entries = batch.records.len()),
    );
    let applied = apply_batch(&region, &origin, batch)
        .instrument(span)
        .await?;
    let ack = postcard::to_allocvec(&ReplicateAck { applied }).unwrap_or_default();
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(ack))
}

async fn apply_batch(
    region: &Region,
    origin: &str,
    batch: ReplicateBatch,
) -> Result<u64, ApiError> {
    let incarnation = batch.incarnation;
    let applied = region.applied().get(&incarnation).copied().unwrap_or(0);
    let Some(&(first, _)) = batch.records.first() else {
        return Ok(applied);
    };
    let last = batch.records.last().map_or(first, |r| r.0);
    if first > applied + 1 && !batch.resync {
        // A gap: we lost entries the origin thinks we have. Our answer rewinds its cursor.
        tracing::warn!(
            origin,
            applied,
            first,
            "replication gap; asking the origin to resend"
        );
        return Ok(applied);
    }
    // Merges are queued first and the applied mark right after them, so one group commit
    // usually carries the whole batch. The failure epoch makes the mark fail if any commit
    // failed after this point: `applied` never covers a merge (or gap) that did not become
    // durable.
    let epoch = region.storage.failure_epoch();
    if first > applied + 1 {
        let gap = LogGap {
            before: applied,
            upto: last,
        };
        region.accept_log_gap(origin, incarnation, gap)?;
    }
    let mut states = Vec::new();
    let mut answers = Vec::new();
    for (seq, bytes) in batch.records {
        if seq <= applied && !batch.resync {
            continue; // Redelivery of what is already durable here.
        }
        let record = LogRecord::decode(&bytes)
            .map_err(|e| ApiError::bad_request("invalid_batch", format!("entry {seq}: {e}")))?;
        match record.entry {
            // Definitions come before the keys that use them in the log: apply them in order.
            LogEntry::Bucket(def) => region.adopt_bucket(def).await?,
            LogEntry::Key { bucket, key, state } => {
                let state = decode_state(&state).map_err(|e| {
                    ApiError::bad_request("invalid_batch", format!("entry {seq}: {e}"))
                })?;
                states.push((bucket, key, state));
            }
            LogEntry::Idempotency {
                id,
                fingerprint,
                status,
                body,
                created_ms,
            } => answers.push((
                id,
                IdempotencyRecord {
                    fingerprint,
                    status,
                    body,
                    seq,
                    created_ms,
                    origin: Some(incarnation),
                },
            )),
        }
    }
    // Every merge is queued (in parallel across partitions) before the idempotency answers
    // and the applied mark are; the gather keeps them all in one commit.
    let gather = region.storage.gather();
    let queued = crate::repair::queue_merges(region, states, false).await?;
    for (id, record) in answers {
        region.storage.submit_idempotency(id, record)?;
    }
    let mark = region.storage.submit_applied(incarnation, last, epoch)?;
    drop(gather);
    let count = crate::repair::await_merges(queued).await?;
    let applied = mark.await?;
    region
        .metrics
        .replicated_applied
        .with_label_values(&[origin])
        .inc_by(count);
    Ok(applied)
}
