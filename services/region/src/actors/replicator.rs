//! Replicator: one per peer, streams this region's replication log to it in sequence order.
//!
//! The peer's position (its cursor) is the highest of our sequence numbers it has durably
//! applied; it is persisted with the commit after each acknowledgement (a cursor lost in a
//! crash only resends what the peer skips as applied). Entries past the cursor are the peer's
//! hints: they stay in the log (durable, never loaded in bulk) while the peer is down, are
//! bounded by bytes and age, and drain at a bounded rate when it returns. A peer whose hints
//! overflow is flagged for priority anti-entropy and its cursor jumps ahead so the log can be
//! truncated. One batch is in flight at a time, so batches grow with load like group commits
//! (two in flight measured worse on 2 cores: more, smaller batches cost more CPU at both ends
//! than the overlap saves, and the peer still commits them one after the other).

use crate::clock::now_us;
use crate::peers::{http_client, peer_request, Backoff, Peer};
use crate::region::Region;
use actix::prelude::*;
use meridian_shared::log::LogRecord;
use meridian_shared::wire::{ReplicateAck, ReplicateBatch, PROTOCOL_VERSION};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Streams the log to one peer.
pub struct Replicator {
    region: Arc<Region>,
    peer: Arc<Peer>,
}

impl Replicator {
    /// A replicator for `peer`.
    pub fn new(region: Arc<Region>, peer: Arc<Peer>) -> Self {
        Self { region, peer }
    }
}

impl Actor for Replicator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let (region, peer) = (self.region.clone(), self.peer.clone());
        ctx.spawn(actix::fut::wrap_future(replicate_forever(region, peer)));
    }
}

enum SendError {
    /// The connection was refused: the peer is certainly down.
    Refused,
    /// Anything else (timeout, HTTP error, storage error).
    Other(String),
}

async fn replicate_forever(region: Arc<Region>, peer: Arc<Peer>) {
    let client = http_client();
    let mut last_seq = region.storage.last_seq_watch();
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
    let poll = Duration::from_millis(region.config.heartbeat_interval_ms);
    let labels = [peer.name.as_str()];
    // Hints not yet delivered: what the peer lacked when it was seen up again (the metric
    // counts them out as they go, whatever the batch sizes), and the peer's down count then.
    let mut hints_left: u64 = 0;
    let mut was_down = false;
    let mut downs_seen = peer.downs();
    loop {
        let cursor = peer.acked();
        let last = *last_seq.borrow_and_update();
        let pending = last.saturating_sub(cursor);
        region
            .metrics
            .replication_pending_entries
            .with_label_values(&labels)
            .set(pending as i64);
        if !peer.is_up() {
            region
                .metrics
                .hints_pending
                .with_label_values(&labels)
                .set(pending as i64);
            // Hints dropped here are anti-entropy's: the cursor moves past them.
            enforce_hint_bounds(&region, &peer, cursor, last);
            was_down = true;
            tokio::select! {
                _ = peer.came_up.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            continue;
        }
        region
            .metrics
            .hints_pending
            .with_label_values(&labels)
            .set(0);
        if was_down || peer.downs() != downs_seen {
            // Back from down: all it lacks now accumulated while it was away (taken now, not
            // at the last poll while down, which missed the writes after it). Or it went down
            // and came back while this loop was busy sending.
            was_down = false;
            downs_seen = peer.downs();
            hints_left = pending;
        }
        // Less if the peer caught up otherwise (anti-entropy, a heartbeat's applied mark).
        hints_left = hints_left.min(pending);
        if pending == 0 {
            tokio::select! {
                changed = last_seq.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(poll) => {}
            }
            continue;
        }
        let draining = pending > region.config.replication_batch_entries as u64;
        // A returning peer's backlog drains as its own background trace, batch by batch.
        let drain_span = if draining {
            tracing::info_span!("hint_drain", peer = %peer.name, after = cursor, pending)
        } else {
            tracing::Span::none()
        };
        match send_batch(&region, &client, &peer, cursor, draining)
            .instrument(drain_span)
            .await
        {
            Ok(sent) => {
                backoff.reset();
                let drained = sent.min(hints_left);
                hints_left -= drained;
                region
                    .metrics
                    .hints_drained
                    .with_label_values(&labels)
                    .inc_by(drained);
                if draining {
                    // Draining a backlog: pace it so a returning peer does not starve live work.
                    let pause = sent as f64 / region.config.hint_drain_rate as f64;
                    tokio::time::sleep(Duration::from_secs_f64(pause)).await;
                }
            }
            Err(SendError::Refused) => {
                peer.mark_down("replication connection refused");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(SendError::Other(error)) => {
                tracing::warn!(peer = %peer.name, %error, "replication batch failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// A batch read from the log and encoded, ready to send.
struct Prepared {
    /// Whether the peer must accept a gap (what it misses was truncated).
    resync: bool,
    /// Entries carried.
    count: usize,
    /// Sequence number of the last entry.
    last: u64,
    /// When the last entry became durable here (µs), for the lag once the peer has it.
    durable_us: Option<u64>,
    /// The encoded [`ReplicateBatch`].
    body: Vec<u8>,
    /// The span of the send.
    span: tracing::Span,
}

/// Reads the entries after `cursor` and encodes them; `None` when there are none.
fn prepare(region: &Region, peer: &Peer, cursor: u64) -> Result<Option<Prepared>, SendError> {
    let config = &region.config;
    let records = region
        .storage
        .log_after(
            cursor,
            config.replication_batch_entries,
            config.replication_batch_bytes,
        )
        .map_err(|e| SendError::Other(e.to_string()))?;
    let (Some(&(first, _)), Some(&(last, _))) = (records.first(), records.last()) else {
        return Ok(None);
    };
    let span = send_span(peer, cursor, &records);
    let count = records.len();
    let batch = ReplicateBatch {
        version: PROTOCOL_VERSION,
        incarnation: region.storage.identity().incarnation,
        resync: first > cursor + 1,
        records,
    };
    Ok(Some(Prepared {
        resync: batch.resync,
        count,
        last,
        // Read here: a backlog's last entry is old, so this may read the log from disk.
        durable_us: region.storage.durable_at(last),
        body: batch.encode(),
        span,
    }))
}

/// Sends the entries after `cursor`; returns how many the peer newly acknowledged.
async fn send_batch(
    region: &Arc<Region>,
    client: &reqwest::Client,
    peer: &Arc<Peer>,
    cursor: u64,
    draining: bool,
) -> Result<u64, SendError> {
    let config = &region.config;
    // A backlog's batches are full and read old entries, maybe from disk: off the thread that
    // every replicator shares, so that a healthy peer's batches do not wait behind them.
    let prepared = if draining {
        let (region, peer) = (Arc::clone(region), Arc::clone(peer));
        let drain = tracing::Span::current();
        tokio::task::spawn_blocking(move || drain.in_scope(|| prepare(&region, &peer, cursor)))
            .await
            .map_err(|e| SendError::Other(format!("reading the log failed: {e}")))??
    } else {
        prepare(region, peer, cursor)?
    };
    let Some(Prepared {
        resync,
        count,
        last,
        durable_us,
        body,
        span,
    }) = prepared
    else {
        return Ok(0);
    };
    if resync {
        region.flag_for_anti_entropy(peer, "log no longer holds what the peer is missing");
    }
    let mut headers = reqwest::header::HeaderMap::new();
    meridian_observability::propagation::inject(&span, &mut headers);
    let url = format!("{}/internal/v1/replicate", peer.url);
    let request = peer_request(client.post(url), config)
        .header("content-type", "application/octet-stream")
        .headers(headers)
        .timeout(Duration::from_secs(10))
        .body(body);
    let exchange = async {
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                SendError::Refused
            } else {
                SendError::Other(e.to_string())
            }
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| SendError::Other(e.to_string()))?;
        Ok::<_, SendError>((status, body))
    };
    let (status, body) = exchange.instrument(span).await?;
    if !status.is_success() {
        return Err(SendError::Other(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )));
    }
    let ack: ReplicateAck =
        postcard::from_bytes(&body).map_err(|e| SendError::Other(format!("bad ack: {e}")))?;
    peer.heard_from();
    // Against what this batch carried too: a commit is readable from the log a moment
    // before `last_seq` says so.
    if ack.applied > region.storage.last_seq().max(last) {
        tracing::error!(peer = %peer.name, applied = ack.applied,
            "peer has applied more of this incarnation than it holds; restart to re-incarnate");
    }
    peer.set_acked(ack.applied);
    let _ = region
        .storage
        .submit_cursor(peer.name.as_str(), ack.applied);
    let labels = [peer.name.as_str()];
    let newly = ack.applied.saturating_sub(cursor);
    region
        .metrics
        .replication_batches
        .with_label_values(&labels)
        .inc();
    region
        .metrics
        .replication_entries
        .with_label_values(&labels)
        .inc_by(newly);
    region
        .metrics
        .replication_batch_entries
        .observe(count as f64);
    if ack.applied >= last {
        // From the moment the write was durable (acknowledged) here to its durable apply there.
        if let Some(durable) = durable_us {
            let lag = now_us().saturating_sub(durable) as f64 / 1e6;
            region
                .metrics
                .replication_lag
                .with_label_values(&labels)
                .observe(lag);
        }
    }
    Ok(newly)
}

/// The span of one batch: a child of its first traced write (so a single write's trace runs on
/// into the peer) and linked to the others.
fn send_span(peer: &Peer, cursor: u64, records: &[(u64, Vec<u8>)]) -> tracing::Span {
    if !meridian_observability::telemetry::exporting() {
        // Writes carry a trace only when export is on: spare every batch a decode pass.
        return tracing::Span::none();
    }
    let traces: Vec<String> = records
        .iter()
        .filter_map(|(_, bytes)| LogRecord::decode(bytes).ok()?.trace)
        .collect();
    if traces.is_empty() {
        return tracing::Span::none(); // No sampled write in the batch: nothing to continue.
    }
    let span = tracing::info_span!("replicate_send", "otel.kind" = "client", peer = %peer.name,
        after = cursor, entries = records.len());
    meridian_observability::propagation::continue_traces(
        &span,
        traces.iter().map(String::as_str),
        crate::storage::MAX_SPAN_LINKS,
    );
    span
}

/// Hands a down peer to anti-entropy once its hints exceed the byte or age bound.
fn enforce_hint_bounds(region: &Region, peer: &Peer, cursor: u64, last: u64) {
    if cursor >= last {
        return;
    }
    let (Ok(Some(oldest)), Ok(Some(newest))) = (
        region.storage.log_record(cursor + 1),
        region.storage.log_record(last),
    ) else {
        return;
    };
    let bytes = newest.log_offset.saturating_sub(oldest.log_offset);
    let age_secs = now_us().saturating_sub(oldest.committed_us) / 1_000_000;
    let max_bytes = region.config.hint_max_bytes;
    if max_bytes == 0 || bytes > max_bytes || age_secs > region.config.hint_max_age_secs {
        tracing::warn!(peer = %peer.name, bytes, age_secs, entries = last - cursor,
            "hints overflowed; the peer will be repaired by anti-entropy");
        region
            .metrics
            .hints_overflowed
            .with_label_values(&[peer.name.as_str()])
            .inc();
        region.flag_for_anti_entropy(peer, "hints overflowed");
        peer.set_acked(last);
        let _ = region.storage.submit_cursor(peer.name.as_str(), last);
    }
}
