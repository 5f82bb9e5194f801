//! What this region knows about each peer, shared by membership, replicators and handlers.

use crate::clock::now_ms;
use crate::config::Config;
use crate::storage::{LogGap, PeerProgress};
use meridian_shared::wire::{Heartbeat, CLUSTER_HEADER, PEER_HEADER};
use meridian_shared::{Actor, RegionName};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Live state of one peer region.
pub struct Peer {
    /// Its name.
    pub name: RegionName,
    /// Its base URL.
    pub url: String,
    up: AtomicBool,
    /// Times it went down since start (a replicator that never saw it down learns so here).
    downs: AtomicU64,
    /// Where its clock stands against ours, as the best recent heartbeat showed it.
    clock: std::sync::Mutex<Option<(ClockEstimate, std::time::Instant)>>,
    /// The misconfiguration its answers last showed, if any: it refused our heartbeat
    /// (401/403: another `peer_token` or `cluster_id`), or its URL answers as another region,
    /// cluster or protocol version.
    misconfigured: std::sync::Mutex<Option<String>>,
    missed_heartbeats: AtomicU32,
    last_heartbeat_ms: AtomicU64,
    /// Highest of our sequence numbers it has durably applied (its cursor in our log).
    acked: watch::Sender<u64>,
    /// Its hints overflowed or expired, or its log reached us with a gap: it needs priority
    /// anti-entropy.
    ae_needed: AtomicBool,
    /// Woken when the peer comes back up.
    pub came_up: Notify,
    /// The last anti-entropy exchange with it, if any since start.
    last_exchange: std::sync::Mutex<Option<ExchangeReport>>,
    /// Whether an exchange with it has completed since start.
    synced: AtomicBool,
    /// Whether this region is running an anti-entropy exchange with it right now.
    pub exchanging: AtomicBool,
    /// Times entries for it were dropped (hints overflowed or expired): an exchange clears the
    /// flag only if none were dropped after it started.
    pub drops: AtomicU64,
    /// Its last heartbeat answer and when it arrived.
    beat: std::sync::Mutex<Option<(Heartbeat, std::time::Instant)>>,
    /// The highest commit counter it reported.
    seen_commits: AtomicU64,
    /// Gaps accepted in its log (its hints for us were dropped), per incarnation. Until an
    /// exchange fills them, our applied vector claims entries we may lack.
    gaps: std::sync::Mutex<BTreeMap<Actor, LogGap>>,
    /// Bounds the read repairs pushed to it at once (see `repair::read_merged`), so a slow
    /// peer holds up no write-back to the others.
    pub write_backs: Arc<tokio::sync::Semaphore>,
}

/// How long a clock estimate stands against estimates from slower heartbeats.
const CLOCK_SAMPLE_KEPT: Duration = Duration::from_secs(10);

/// How far a peer's clock is from ours, as one heartbeat showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockEstimate {
    /// Its clock minus ours, in ms (negative: behind).
    pub offset_ms: i64,
    /// The most the offset can be wrong by: half the heartbeat's round trip.
    pub error_ms: u64,
}

impl ClockEstimate {
    /// From a heartbeat answer: the peer read `clock_ms` (0: it did not say) somewhere
    /// between our `sent_ms` and `received_ms`, taken as the midpoint.
    fn from_heartbeat(clock_ms: u64, sent_ms: u64, received_ms: u64) -> Option<Self> {
        if clock_ms == 0 || received_ms < sent_ms {
            return None;
        }
        let error_ms = (received_ms - sent_ms).div_ceil(2);
        let midpoint = sent_ms + (received_ms - sent_ms) / 2;
        Some(Self {
            offset_ms: clock_ms as i64 - midpoint as i64,
            error_ms,
        })
    }
}

/// Read repairs pushed to one peer at once, at most.
const MAX_WRITE_BACKS: usize = 32;

/// What one anti-entropy exchange with a peer did (shown in `/v1/cluster`).
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct ExchangeReport {
    /// When it finished (RFC 3339).
    pub at: String,
    /// How long it took.
    pub duration_ms: u64,
    /// Whether it walked the whole tree; `false`: it failed part way (`error` says why).
    pub complete: bool,
    /// Tree segments (leaves) compared.
    pub segments_compared: u64,
    /// Keys whose digests differed.
    pub keys_differing: u64,
    /// Keys whose state the exchange changed, here or at the peer.
    pub keys_repaired: u64,
    /// Body bytes sent to the peer.
    pub bytes_sent: u64,
    /// Body bytes received from the peer.
    pub bytes_received: u64,
    /// Why it stopped early.
    pub error: Option<String>,
}

impl Peer {
    /// Whether membership currently considers the peer reachable.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Times it went down since start.
    pub fn downs(&self) -> u64 {
        self.downs.load(Ordering::Acquire)
    }

    /// Records a successful contact: the peer is up (and waiters are woken if it was down).
    pub fn heard_from(&self) {
        if let Ok(mut misconfigured) = self.misconfigured.lock() {
            *misconfigured = None;
        }
        self.missed_heartbeats.store(0, Ordering::Release);
        self.last_heartbeat_ms.store(now_ms(), Ordering::Release);
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!(peer = %self.name, "peer is up");
            self.came_up.notify_waiters();
        }
    }

    /// Records the misconfiguration `what` its answer showed; returns whether that is news
    /// (so each is logged once, not at every heartbeat, and a different one is logged again).
    pub fn note_misconfigured(&self, what: String) -> bool {
        let Ok(mut misconfigured) = self.misconfigured.lock() else {
            return true;
        };
        let news = misconfigured.as_ref() != Some(&what);
        *misconfigured = Some(what);
        news
    }

    /// Records a missed heartbeat; returns whether the peer is now down.
    pub fn missed(&self, down_after: u32, error: &str) -> bool {
        let missed = self.missed_heartbeats.fetch_add(1, Ordering::AcqRel) + 1;
        if missed >= down_after {
            // The last error says why (a refused connection, or 401/403 for a wrong
            // `peer_token` or `cluster_id`).
            self.mark_down(&format!("missed heartbeats: {error}"));
        }
        !self.is_up()
    }

    /// Marks the peer down at once: a refused connection is certain, no need to wait.
    pub fn mark_down(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.downs.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(peer = %self.name, why, "peer is down");
        }
    }

    /// Records its clock as a heartbeat answered: `clock_ms` was read between our `sent_ms`
    /// and `received_ms`. A slower answer (a larger error) replaces a recent estimate only
    /// once that is [`CLOCK_SAMPLE_KEPT`] old: heartbeats run concurrently, and a slow one
    /// must not spoil a good estimate.
    pub fn observe_clock(&self, clock_ms: u64, sent_ms: u64, received_ms: u64) {
        let Some(sample) = ClockEstimate::from_heartbeat(clock_ms, sent_ms, received_ms) else {
            return;
        };
        if let Ok(mut clock) = self.clock.lock() {
            let keep_old = clock.as_ref().is_some_and(|(old, at)| {
                old.error_ms < sample.error_ms && at.elapsed() < CLOCK_SAMPLE_KEPT
            });
            if !keep_old {
                *clock = Some((sample, std::time::Instant::now()));
            }
        }
    }

    /// Where its clock stands against ours, once a heartbeat said.
    pub fn clock(&self) -> Option<ClockEstimate> {
        self.clock
            .lock()
            .ok()?
            .as_ref()
            .map(|(estimate, _)| *estimate)
    }

    /// Our highest sequence number the peer has applied.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Watches [`Peer::acked`] (for `ack=quorum|all` waiters).
    pub fn acked_watch(&self) -> watch::Receiver<u64> {
        self.acked.subscribe()
    }

    /// Sets the peer's position in our log (it may move back if the peer lost data).
    pub fn set_acked(&self, seq: u64) {
        self.acked.send_if_modified(|current| {
            let changed = *current != seq;
            *current = seq;
            changed
        });
    }

    /// Whether the peer is flagged for priority anti-entropy.
    pub fn ae_needed(&self) -> bool {
        self.ae_needed.load(Ordering::Acquire)
    }

    /// Sets or clears the anti-entropy flag.
    pub fn set_ae_needed(&self, needed: bool) {
        self.ae_needed.store(needed, Ordering::Release);
    }

    /// Records the outcome of an anti-entropy exchange.
    pub fn set_last_exchange(&self, report: ExchangeReport) {
        if report.complete {
            self.synced.store(true, Ordering::Release);
        }
        if let Ok(mut last) = self.last_exchange.lock() {
            *last = Some(report);
        }
    }

    /// The highest commit counter it has reported.
    pub fn seen_commits(&self) -> u64 {
        self.seen_commits.load(Ordering::Acquire)
    }

    /// Raises the commit counter seen from it; returns the new value when it rose (to persist).
    pub fn observe_commits(&self, commits: u64) -> Option<u64> {
        let previous = self.seen_commits.fetch_max(commits, Ordering::AcqRel);
        (commits > previous).then_some(commits)
    }

    /// Records its heartbeat answer.
    pub fn set_beat(&self, beat: Heartbeat) {
        if let Ok(mut last) = self.beat.lock() {
            *last = Some((beat, std::time::Instant::now()));
        }
    }

    /// What its last heartbeat said it holds of every origin (`None` before the first answer).
    pub fn held(&self) -> Option<BTreeMap<Actor, u64>> {
        let last = self.beat.lock().ok()?;
        last.as_ref().map(|(beat, _)| beat.held())
    }

    /// Its last heartbeat answer, if it arrived after `since`.
    pub fn beat_since(&self, since: std::time::Instant) -> Option<Heartbeat> {
        let last = self.beat.lock().ok()?;
        let (beat, at) = last.as_ref()?;
        (*at >= since).then(|| beat.clone())
    }

    /// Whether an anti-entropy exchange with it has completed since start.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The last anti-entropy exchange, if any since start.
    pub fn last_exchange(&self) -> Option<ExchangeReport> {
        self.last_exchange.lock().ok()?.clone()
    }

    /// Records that its log of `incarnation` is accepted past a gap, from `before` to `upto`;
    /// `persist` queues the new set under the same lock, so the disk sees changes in order,
    /// and memory changes only once it is queued.
    pub fn add_gap<E>(
        &self,
        incarnation: Actor,
        gap: LogGap,
        persist: impl FnOnce(&BTreeMap<Actor, LogGap>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut gaps = self.gaps.lock().unwrap_or_else(|p| p.into_inner());
        let merged = match gaps.get(&incarnation) {
            Some(old) => LogGap {
                before: old.before.min(gap.before),
                upto: old.upto.max(gap.upto),
            },
            None => gap,
        };
        // Queued even when unchanged: a retried batch may follow a failed commit of it.
        let mut next = gaps.clone();
        next.insert(incarnation, merged);
        persist(&next)?;
        *gaps = next;
        Ok(())
    }

    /// Forgets the gaps that `held` (what a peer held when a complete exchange with it began)
    /// covers; `persist` queues the rest under the same lock. Returns how many were filled.
    pub fn fill_gaps<E>(
        &self,
        held: &BTreeMap<Actor, u64>,
        persist: impl FnOnce(&BTreeMap<Actor, LogGap>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut gaps = self.gaps.lock().unwrap_or_else(|p| p.into_inner());
        let before = gaps.len();
        gaps.retain(|incarnation, gap| held.get(incarnation).copied().unwrap_or(0) < gap.upto);
        let filled = before - gaps.len();
        if filled > 0 {
            persist(&gaps)?;
        }
        Ok(filled)
    }

    /// Reads its gaps in place.
    pub fn with_gaps<T>(&self, read: impl FnOnce(&BTreeMap<Actor, LogGap>) -> T) -> T {
        read(&self.gaps.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Milliseconds since the last successful contact (None if never).
    pub fn silent_for_ms(&self) -> Option<u64> {
        match self.last_heartbeat_ms.load(Ordering::Acquire) {
            0 => None,
            last => Some(now_ms().saturating_sub(last)),
        }
    }
}

/// Every peer of this region.
pub struct Peers {
    list: Vec<Arc<Peer>>,
}

impl Peers {
    /// Peers from the configuration, with their persisted cursors and flags. All start down
    /// until their first heartbeat answers.
    pub fn new(config: &Config, progress: &PeerProgress) -> Self {
        let PeerProgress {
            cursors,
            flags,
            commits,
            gaps,
        } = progress;
        let list = config
            .peers
            .iter()
            .map(|(name, url)| {
                let (acked, _) = watch::channel(cursors.get(name.as_str()).copied().unwrap_or(0));
                Arc::new(Peer {
                    name: name.clone(),
                    url: url.trim_end_matches('/').to_string(),
                    up: AtomicBool::new(false),
                    downs: AtomicU64::new(0),
                    misconfigured: std::sync::Mutex::new(None),
                    clock: std::sync::Mutex::new(None),
                    missed_heartbeats: AtomicU32::new(0),
                    last_heartbeat_ms: AtomicU64::new(0),
                    acked,
                    ae_needed: AtomicBool::new(flags.get(name.as_str()).copied().unwrap_or(false)),
                    came_up: Notify::new(),
                    last_exchange: std::sync::Mutex::new(None),
                    synced: AtomicBool::new(false),
                    exchanging: AtomicBool::new(false),
                    drops: AtomicU64::new(0),
                    beat: std::sync::Mutex::new(None),
                    seen_commits: AtomicU64::new(commits.get(name.as_str()).copied().unwrap_or(0)),
                    gaps: std::sync::Mutex::new(
                        gaps.get(name.as_str()).cloned().unwrap_or_default(),
                    ),
                    write_backs: Arc::new(tokio::sync::Semaphore::new(MAX_WRITE_BACKS)),
                })
            })
            .collect();
        Self { list }
    }

    /// Every peer.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.list.iter()
    }

    /// A peer by name.
    pub fn get(&self, name: &RegionName) -> Option<&Arc<Peer>> {
        self.list.iter().find(|p| &p.name == name)
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether the region has no peers.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Builds an HTTP client for talking to peers: pooled keep-alive connections, short connect
/// timeout so a dead peer is detected quickly. Each actor or worker builds its own.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Adds the headers that identify this region to a peer request.
pub fn peer_request(builder: reqwest::RequestBuilder, config: &Config) -> reqwest::RequestBuilder {
    let builder = builder
        .header(PEER_HEADER, config.region.as_str())
        .header(CLUSTER_HEADER, config.cluster_id.as_str());
    match &config.security.peer_token {
        Some(token) => builder.bearer_auth(token),
        None => builder,
    }
}

/// Body bytes of one binary peer call, for exchange accounting.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    /// Request body bytes.
    pub sent: u64,
    /// Response body bytes.
    pub received: u64,
}

/// POSTs a postcard body to `path` under the peer's `/internal/v1` and decodes the answer.
pub async fn peer_call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    config: &Config,
    peer: &Peer,
    path: &str,
    body: &Req,
    timeout: Duration,
    traffic: &mut Traffic,
) -> Result<Resp, String> {
    let bytes = meridian_shared::wire::encode(body);
    traffic.sent += bytes.len() as u64;
    let url = format!("{}/internal/v1/{path}", peer.url);
    let mut request = peer_request(client.post(url), config)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .timeout(timeout)
        .body(bytes);
    if let Some(traceparent) =
        meridian_observability::propagation::traceparent(&tracing::Span::current())
    {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.map_err(|e| format!("{path}: {e}"))?;
    let status = response.status();
    let answer = response.bytes().await.map_err(|e| format!("{path}: {e}"))?;
    traffic.received += answer.len() as u64;
    if !status.is_success() {
        return Err(format!(
            "{path}: peer answered {status}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        ));
    }
    meridian_shared::wire::decode(&answer).map_err(|e| format!("{path}: undecodable answer: {e}"))
}

/// Exponential backoff with full jitter, for retrying a peer.
pub struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            current: min,
            min,
            max,
        }
    }

    /// The next delay: random in `[0, current]`, then doubles `current`.
    pub fn next_delay(&mut self) -> Duration {
        let jittered = self.current.mul_f64(jitter());
        self.current = (self.current * 2).min(self.max);
        jittered.max(self.min / 2)
    }

    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// A cheap pseudo-random factor in [0, 1) (jitter needs spread, not cryptographic quality).
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms());
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_peer() -> Arc<Peer> {
        let toml = "region = \"us-east\"\ndata_dir = \"/tmp/x\"\n[peers]\neu-west = \"http://127.0.0.1:1\"";
        let config = Config::load_from_str(toml).expect("config");
        let peers = Peers::new(&config, &PeerProgress::default());
        let name = RegionName::new("eu-west".to_string()).expect("name");
        peers.get(&name).expect("peer").clone()
    }

    #[test]
    fn a_peer_clock_is_read_at_the_heartbeats_midpoint_and_a_slow_sample_keeps_the_better() {
        let peer = a_peer();
        assert_eq!(peer.clock(), None, "unknown before a heartbeat");
        let estimate = |offset_ms, error_ms| {
            Some(ClockEstimate {
                offset_ms,
                error_ms,
            })
        };
        // Ahead by 5 s: it read 1_005_050 while we sent at 1_000_000 and heard at 1_000_100.
        peer.observe_clock(1_005_050, 1_000_000, 1_000_100);
        assert_eq!(peer.clock(), estimate(5_000, 50));
        // A better sample replaces it: behind by 2 s, within 5 ms.
        peer.observe_clock(998_005, 1_000_000, 1_000_010);
        assert_eq!(peer.clock(), estimate(-2_000, 5));
        // A slower one does not spoil it, nor does a version that did not say.
        peer.observe_clock(1_500_000, 1_000_000, 1_001_000);
        peer.observe_clock(0, 1_000_000, 1_000_002);
        assert_eq!(peer.clock(), estimate(-2_000, 5));
    }
}
