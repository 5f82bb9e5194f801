//! Anti-entropy: compares Merkle trees with every peer and repairs whatever differs.
//!
//! Hints are an optimisation; this is the guarantee. Each peer gets its own loop: an exchange
//! at start, then every `anti_entropy_interval_ms` (jittered ±50%), and at once when the peer
//! comes back up or is flagged (its hints overflowed). One exchange:
//!
//! 1. roots (and bucket definitions, which must agree before keys can merge);
//! 2. branch hashes, then segment hashes under differing branches;
//! 3. key digests of the differing segments, page by page in key order: both sides scan the
//!    same key range, so memory stays bounded and an interrupted exchange loses one page;
//! 4. states of differing keys, fetched and merged here, or pushed and merged there, through
//!    the normal partition / group-commit path.
//!
//! Digest scans are paced to `anti_entropy_scan_rate` keys per second (the IO/CPU budget),
//! and while clients write to this region repair takes at most a quarter of the time.

use crate::clock::now_ms;
use crate::peers::{http_client, peer_call, Backoff, ExchangeReport, Peer, Traffic};
use crate::region::Region;
use crate::repair::{chunk_states, merge_states};
use crate::storage::KeyName;
use actix::prelude::*;
use meridian_shared::merkle::{
    diff_digests, differing, SegmentFilter, SEGMENTS, SEGMENTS_PER_BRANCH,
};
use meridian_shared::wire::{
    AeDigests, AeDigestsRequest, AeFetch, AeMerged, AeSegmentsRequest, AeStates, AeTop,
    AeTopRequest, SegmentSet, PROTOCOL_VERSION,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Keys scanned per digest page (each side), bounding one request's work and memory.
pub const SCAN_PAGE: u32 = 50_000;
/// Most digests per page.
pub const DIGESTS_PAGE: u32 = 20_000;
/// Branches whose segments are asked for in one request.
const BRANCHES_PER_CALL: usize = 512;
/// Above this many differing segments a scan reports every segment (cheaper to name).
const SEGMENT_LIST_MAX: usize = SEGMENTS / 8;
/// While clients write here, pause this many times as long as each repaired page took.
const FOREGROUND_YIELD: f64 = 3.0;
/// Wait before confirming differing segments: writes in flight land meanwhile.
const SETTLE: Duration = Duration::from_millis(250);
/// Wait before trying again after the peer said it is running the exchange itself.
const DEFERRED_RETRY: Duration = Duration::from_secs(1);
/// Time allowed for one protocol call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs anti-entropy with every peer.
pub struct AntiEntropy {
    region: Arc<Region>,
}

impl AntiEntropy {
    /// Anti-entropy for the region.
    pub fn new(region: Arc<Region>) -> Self {
        Self { region }
    }
}

impl Actor for AntiEntropy {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for peer in self.region.peers.iter() {
            let (region, peer) = (self.region.clone(), peer.clone());
            ctx.spawn(actix::fut::wrap_future(exchange_forever(region, peer)));
        }
    }
}

async fn exchange_forever(region: Arc<Region>, peer: Arc<Peer>) {
    let client = http_client();
    let interval = Duration::from_millis(region.config.anti_entropy_interval_ms);
    let poll = Duration::from_millis(region.config.heartbeat_interval_ms);
    // First exchange as soon as the peer answers: a new or restored region catches up now.
    let mut due = Instant::now();
    // After the peer deferred an exchange, nothing (not even a flag) starts one before this.
    let mut hold = Instant::now();
    let mut was_up = false;
    let mut returned = false;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let up = peer.is_up();
        returned |= up && !was_up;
        was_up = up;
        let now = Instant::now();
        let wanted = now >= due || returned || peer.ae_needed();
        if !up || now < hold || !wanted {
            tokio::select! {
                _ = peer.came_up.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            continue;
        }
        returned = false;
        let drops = peer.drops.load(Ordering::Acquire);
        peer.exchanging.store(true, Ordering::Release);
        let report = exchange(&region, &client, &peer).await;
        peer.exchanging.store(false, Ordering::Release);
        let Some(report) = report else {
            // The peer is running the exchange for both of us; look again shortly.
            hold = Instant::now() + DEFERRED_RETRY;
            due = hold;
            continue;
        };
        let complete = report.complete;
        // Entries dropped (or a gap accepted) during the exchange may have missed it: the
        // flag then stays.
        if complete && peer.ae_needed() && peer.drops.load(Ordering::Acquire) == drops {
            tracing::info!(peer = %peer.name, "priority anti-entropy done; flag cleared");
            peer.set_ae_needed(false);
            let _ = region.storage.submit_ae_flag(peer.name.as_str(), false);
        }
        peer.set_last_exchange(report);
        if complete && region.caught_up() && region.metrics.caught_up.get() == 0 {
            tracing::info!("caught up: an anti-entropy exchange completed with every peer");
            region.metrics.caught_up.set(1);
        }
        if complete {
            backoff.reset();
            due = Instant::now() + interval.mul_f64(0.5 + crate::peers::jitter());
        } else {
            // Failed part way: retry with backoff, whatever asks for an exchange meanwhile.
            hold = Instant::now() + backoff.next_delay();
            due = hold;
        }
    }
}

/// What an exchange found.
enum Outcome {
    /// The trees were equal.
    InSync,
    /// Differences were repaired.
    Repaired,
    /// The peer is running the exchange with us itself.
    Deferred,
}

/// One exchange with `peer`, recorded in metrics and as an `anti_entropy` span; `None` when
/// the peer deferred it (it is running one with us).
async fn exchange(
    region: &Region,
    client: &reqwest::Client,
    peer: &Peer,
) -> Option<ExchangeReport> {
    let span = tracing::info_span!("anti_entropy", peer = %peer.name,
        segments_compared = tracing::field::Empty, keys_repaired = tracing::field::Empty);
    let started = Instant::now();
    let mut run = Exchange {
        region,
        client,
        peer,
        traffic: Traffic::default(),
        report: ExchangeReport::default(),
    };
    let outcome = run.run().instrument(span.clone()).await;
    let mut report = run.report;
    report.bytes_sent = run.traffic.sent;
    report.bytes_received = run.traffic.received;
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.at = crate::clock::rfc3339(now_ms());
    span.record("segments_compared", report.segments_compared);
    span.record("keys_repaired", report.keys_repaired);
    let peer_label = peer.name.as_str();
    let metrics = &region.metrics;
    let result = match &outcome {
        Ok(Outcome::InSync) => "in_sync",
        Ok(Outcome::Repaired) => "repaired",
        Ok(Outcome::Deferred) => "deferred",
        Err(_) => "failed",
    };
    metrics
        .ae_exchanges
        .with_label_values(&[peer_label, result])
        .inc();
    metrics
        .ae_duration
        .with_label_values(&[peer_label])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .ae_segments_compared
        .with_label_values(&[peer_label])
        .inc_by(report.segments_compared);
    metrics
        .ae_bytes
        .with_label_values(&[peer_label, "sent"])
        .inc_by(report.bytes_sent);
    metrics
        .ae_bytes
        .with_label_values(&[peer_label, "received"])
        .inc_by(report.bytes_received);
    match outcome {
        Ok(Outcome::Deferred) => return None,
        Ok(_) => report.complete = true,
        Err(error) => {
            tracing::warn!(peer = %peer.name, %error, "anti-entropy exchange stopped early");
            report.error = Some(error);
        }
    }
    if report.keys_repaired > 0 {
        tracing::info!(peer = %peer.name, repaired = report.keys_repaired,
            differing = report.keys_differing, "anti-entropy repaired keys");
    }
    Some(report)
}

/// The branches above `segments` (ascending, once each).
fn unique_branches(segments: &[u32]) -> Vec<u32> {
    let mut branches: Vec<u32> = segments
        .iter()
        .map(|s| meridian_shared::merkle::branch_of(*s))
        .collect();
    branches.dedup();
    branches
}

/// State of one exchange in progress.
struct Exchange<'a> {
    region: &'a Region,
    client: &'a reqwest::Client,
    peer: &'a Peer,
    traffic: Traffic,
    report: ExchangeReport,
}

impl Exchange<'_> {
    /// Walks the trees top-down and repairs. After
    /// a complete exchange this region holds everything the peer's tree held when it answered,
    /// so it has also applied what the peer had: the applied vector advances to match (this is
    /// what lets session reads and tombstone GC move on after log entries were skipped).
    async fn run(&mut self) -> Result<Outcome, String> {
        let epoch = self.region.storage.failure_epoch();
        let root = self.region.storage.with_tree(|t| t.root()).unwrap_or(0);
        let request = AeTopRequest {
            version: PROTOCOL_VERSION,
            root,
        };
        let mut top: AeTop = self.call("ae/top", &request).await?;
        if top.deferred {
            return Ok(Outcome::Deferred);
        }
        self.adopt_buckets(std::mem::take(&mut top.buckets)).await?;
        let in_sync = self.walk(top.branches.take()).await?;
        self.region
            .fill_gaps(&top.applied)
            .map_err(|e| format!("log gaps: {e}"))?;
        self.adopt_applied(top.applied, epoch).await?;
        Ok(if in_sync {
            Outcome::InSync
        } else {
            Outcome::Repaired
        })
    }

    /// Raises our applied vector to the peer's (our own incarnation excepted).
    async fn adopt_applied(
        &mut self,
        theirs: std::collections::BTreeMap<meridian_shared::Actor, u64>,
        epoch: u64,
    ) -> Result<(), String> {
        let storage = &self.region.storage;
        let own = storage.identity().incarnation;
        let ours = self.region.applied();
        for (origin, seq) in theirs {
            if origin == own || ours.get(&origin).copied().unwrap_or(0) >= seq {
                continue;
            }
            let ticket = storage
                .submit_applied(origin, seq, epoch)
                .map_err(|e| format!("applied mark: {e}"))?;
            ticket.await.map_err(|e| format!("applied mark: {e}"))?;
        }
        Ok(())
    }

    /// Compares branches, then segments, then digests, repairing what differs.
    async fn walk(&mut self, theirs: Option<Vec<u64>>) -> Result<bool, String> {
        let storage = &self.region.storage;
        let Some(theirs) = theirs else {
            return Ok(true);
        };
        let mine = storage
            .with_tree(|t| t.branches().to_vec())
            .unwrap_or_default();
        let branches = differing(&mine, &theirs);
        let first = self.differing_segments(&branches).await?;
        if first.is_empty() {
            return Ok(true); // The roots moved while we looked: in sync now.
        }
        // Writes still in flight between the two regions differ for a moment too. Looking
        // again after they have landed keeps only lasting differences, so an exchange during
        // heavy traffic does not scan the keyspace for keys replication is about to deliver.
        tokio::time::sleep(SETTLE).await;
        let again: std::collections::HashSet<u32> = self
            .differing_segments(&unique_branches(&first))
            .await?
            .into_iter()
            .collect();
        let segments: Vec<u32> = first.into_iter().filter(|s| again.contains(s)).collect();
        if segments.is_empty() {
            return Ok(true); // Only writes in flight differed.
        }
        let (set, filter) = if segments.len() > SEGMENT_LIST_MAX {
            (SegmentSet::All, SegmentFilter::all())
        } else {
            let filter = SegmentFilter::of(&segments);
            (SegmentSet::Some(segments), filter)
        };
        self.repair_segments(set, filter).await?;
        Ok(false)
    }

    /// The segments under `branches` whose hashes differ between the two trees.
    async fn differing_segments(&mut self, branches: &[u32]) -> Result<Vec<u32>, String> {
        let storage = &self.region.storage;
        let mut segments = Vec::new();
        for chunk in branches.chunks(BRANCHES_PER_CALL) {
            let theirs: Vec<Vec<u64>> = self
                .call(
                    "ae/segments",
                    &AeSegmentsRequest {
                        branches: chunk.to_vec(),
                    },
                )
                .await?;
            let mine: Vec<Vec<u64>> = storage
                .with_tree(|t| chunk.iter().map(|b| t.segments_of(*b).to_vec()).collect())
                .unwrap_or_default();
            for (i, branch) in chunk.iter().enumerate() {
                let (mine, theirs) = (mine.get(i), theirs.get(i));
                let (mine, theirs) = (
                    mine.map_or(&[][..], Vec::as_slice),
                    theirs.map_or(&[][..], Vec::as_slice),
                );
                let base = branch * SEGMENTS_PER_BRANCH as u32;
                segments.extend(differing(mine, theirs).into_iter().map(|s| base + s));
            }
            self.report.segments_compared += (chunk.len() * SEGMENTS_PER_BRANCH) as u64;
        }
        Ok(segments)
    }

    /// Pages through the digests of the differing segments and repairs each page.
    async fn repair_segments(
        &mut self,
        set: SegmentSet,
        filter: SegmentFilter,
    ) -> Result<(), String> {
        let scan_rate = self.region.config.anti_entropy_scan_rate.max(1) as f64;
        let filter = Arc::new(filter);
        let mut cursor: Option<KeyName> = None;
        loop {
            let page_started = Instant::now();
            let seq_at_page_start = self.region.storage.last_seq();
            // Our scan runs while the peer scans: both stop at the same limits, and only the
            // range both covered is compared.
            let storage = self.region.storage.clone();
            let (after, local_filter) = (cursor.clone(), filter.clone());
            let local = tokio::task::spawn_blocking(move || {
                storage.digests(
                    &local_filter,
                    after.as_ref(),
                    None,
                    DIGESTS_PAGE as usize,
                    SCAN_PAGE as usize,
                )
            });
            let theirs: AeDigests = self
                .call(
                    "ae/digests",
                    &AeDigestsRequest {
                        segments: set.clone(),
                        after: cursor.clone(),
                        max_digests: DIGESTS_PAGE,
                        max_scan: SCAN_PAGE,
                    },
                )
                .await?;
            let (mine, my_end) = local
                .await
                .map_err(|e| format!("digest scan: {e}"))?
                .map_err(|e| format!("digest scan: {e}"))?;
            // Both sides stop at a limit: compare only the range both covered.
            let end = match (my_end, theirs.scanned_to) {
                (Some(mine), Some(theirs)) => Some(mine.min(theirs)),
                (Some(end), None) | (None, Some(end)) => Some(end),
                (None, None) => None,
            };
            let in_range = |d: &meridian_shared::merkle::Digest| {
                end.as_ref()
                    .is_none_or(|(b, k)| (&d.bucket, &d.key) <= (b, k))
            };
            let theirs: Vec<_> = theirs.digests.into_iter().filter(in_range).collect();
            let mine: Vec<_> = mine.into_iter().filter(in_range).collect();
            let diff = diff_digests(&mine, &theirs);
            self.report.keys_differing += diff.differing as u64;
            // Keys both sides hold are only pushed: the answer carries back whatever the
            // peer had that we lack. Only keys we do not hold at all are fetched.
            let pushed: std::collections::HashSet<&KeyName> = diff.send.iter().collect();
            let missing: Vec<KeyName> = diff
                .fetch
                .iter()
                .filter(|k| !pushed.contains(k))
                .cloned()
                .collect();
            self.fetch(missing).await?;
            self.push(diff.send).await?;
            match end {
                None => return Ok(()),
                Some(end) => cursor = Some(end),
            }
            let elapsed = page_started.elapsed();
            let mut pause =
                Duration::from_secs_f64(SCAN_PAGE as f64 / scan_rate).saturating_sub(elapsed);
            if self.region.storage.last_seq() != seq_at_page_start {
                // Clients are writing here: repair takes at most a quarter of the time.
                pause = pause.max(elapsed.mul_f64(FOREGROUND_YIELD));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Fetches the peer's states of `keys` and merges them here.
    async fn fetch(&mut self, keys: Vec<KeyName>) -> Result<(), String> {
        for chunk in keys.chunks(crate::repair::STATES_PER_CALL) {
            let states: AeStates = self
                .call(
                    "ae/fetch",
                    &AeFetch {
                        keys: chunk.to_vec(),
                    },
                )
                .await?;
            let changed = merge_states(self.region, states.states)
                .await
                .map_err(|e| format!("merging fetched states: {}", e.message))?;
            self.repaired("local", changed);
        }
        Ok(())
    }

    /// Sends our states of `keys` for the peer to merge.
    async fn push(&mut self, keys: Vec<KeyName>) -> Result<(), String> {
        for names in keys.chunks(crate::repair::STATES_PER_CALL) {
            let states = self
                .region
                .storage
                .raw_states(names)
                .map_err(|e| format!("reading states to push: {e}"))?;
            self.region.sweep_if_foreign(&states);
            for chunk in chunk_states(states) {
                let merged: AeMerged = self.call("ae/push", &AeStates { states: chunk }).await?;
                self.repaired("peer", merged.changed);
                if !merged.newer.is_empty() {
                    let changed = merge_states(self.region, merged.newer)
                        .await
                        .map_err(|e| format!("merging returned states: {}", e.message))?;
                    self.repaired("local", changed);
                }
            }
        }
        Ok(())
    }

    fn repaired(&mut self, side: &str, changed: u64) {
        self.report.keys_repaired += changed;
        self.region
            .metrics
            .ae_keys_repaired
            .with_label_values(&[self.peer.name.as_str(), side])
            .inc_by(changed);
    }

    /// Creates (or resolves) every bucket definition the peer has and we lack or differ on.
    async fn adopt_buckets(
        &mut self,
        buckets: Vec<meridian_shared::BucketDef>,
    ) -> Result<(), String> {
        for def in buckets {
            if self.region.storage.bucket(&def.name).as_ref() == Some(&def) {
                continue;
            }
            self.region
                .adopt_bucket(def)
                .await
                .map_err(|e| format!("bucket definition: {e}"))?;
        }
        Ok(())
    }

    async fn call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, String> {
        peer_call(
            self.client,
            &self.region.config,
            self.peer,
            path,
            body,
            CALL_TIMEOUT,
            &mut self.traffic,
        )
        .await
    }
}
