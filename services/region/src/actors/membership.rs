//! Membership: heartbeats every peer and decides up/down.
//!
//! A peer is down after `down_after_missed` consecutive failed heartbeats, or at once when a
//! connection to it is refused (forwarding and replication report that). It is up again at its
//! first answered heartbeat, which wakes its replicator to drain the backlog.

use crate::peers::{http_client, peer_request, Peer};
use crate::region::Region;
use actix::prelude::*;
use meridian_shared::wire::{Heartbeat, PROTOCOL_VERSION};
use reqwest::StatusCode;
use std::sync::Arc;
use std::time::Duration;

/// Heartbeats every peer on an interval.
pub struct Membership {
    region: Arc<Region>,
    client: reqwest::Client,
}

impl Membership {
    /// A membership actor for the region's peers.
    pub fn new(region: Arc<Region>) -> Self {
        Self {
            region,
            client: http_client(),
        }
    }
}

impl Actor for Membership {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let interval = Duration::from_millis(self.region.config.heartbeat_interval_ms);
        ctx.run_interval(interval, |actor, _ctx| {
            for peer in actor.region.peers.iter() {
                let (region, client, peer) =
                    (actor.region.clone(), actor.client.clone(), peer.clone());
                // Each heartbeat runs on its own, so one slow peer never delays the others.
                actix::spawn(async move { heartbeat(&region, &client, &peer).await });
            }
        });
    }
}

/// One heartbeat: success marks the peer up and learns how far it has applied our log.
async fn heartbeat(region: &Region, client: &reqwest::Client, peer: &Peer) {
    let timeout = Duration::from_millis(region.config.heartbeat_interval_ms.max(250) * 2);
    let request = peer_request(
        client.get(format!("{}/internal/v1/heartbeat", peer.url)),
        &region.config,
    )
    .timeout(timeout);
    let sent_ms = crate::clock::now_ms();
    // A failure's status, if the peer answered, and why.
    let outcome = async {
        let response = request.send().await.map_err(|e| (None, e.to_string()))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            let excerpt: String = body.chars().take(200).collect();
            return Err((Some(status), format!("HTTP {status}: {excerpt}")));
        }
        response
            .json::<Heartbeat>()
            .await
            .map_err(|e| (None, e.to_string()))
    }
    .await;
    let labels = [peer.name.as_str()];
    match outcome {
        Ok(beat)
            if beat.cluster_id == region.config.cluster_id
                && beat.version == PROTOCOL_VERSION
                && beat.region == peer.name =>
        {
            peer.heard_from();
            peer.observe_clock(beat.clock_ms, sent_ms, crate::clock::now_ms());
            let ours = region.storage.identity().incarnation;
            if let Some(&applied) = beat.applied.get(&ours) {
                // Heartbeats only raise the cursor; the replicator's acks may also lower it.
                if applied > peer.acked() && applied <= region.storage.last_seq() {
                    peer.set_acked(applied);
                }
            }
            // Remembered durably so a restored old copy of the peer is recognised even after
            // we restart (a small meta write that rides the next group commit).
            if let Some(commits) = peer.observe_commits(beat.commits) {
                let _ = region
                    .storage
                    .submit_peer_commits(peer.name.as_str(), commits);
            }
            peer.set_beat(beat);
            region.note_peer_applied();
        }
        Ok(beat) => {
            // Counting another region's commits or applied marks under this peer's name would
            // corrupt what it is owed (a peer URL pointing at the wrong region). Said once.
            let what = format!("{} {} {}", beat.region, beat.cluster_id, beat.version);
            if peer.note_misconfigured(what) {
                tracing::error!(peer = %peer.name, url = %peer.url, answers_as = %beat.region,
                    their_cluster = %beat.cluster_id, version = beat.version,
                    "the peer's URL answers as another region, cluster or protocol version; \
                     refusing it");
            }
            peer.mark_down("wrong region, cluster or protocol");
        }
        Err((status, error)) => {
            region
                .metrics
                .heartbeats_failed
                .with_label_values(&labels)
                .inc();
            let refused = matches!(
                status,
                Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
            );
            // A misconfiguration, not an outage: no retry mends it, so say so loudly (once).
            if refused && peer.note_misconfigured(error.clone()) {
                tracing::error!(peer = %peer.name, url = %peer.url, %error,
                    "the peer refuses this region: its peer_token or cluster_id differs from \
                     ours; it stays down until they match");
            }
            if peer.missed(region.config.down_after_missed, &error) {
                tracing::debug!(peer = %peer.name, %error, "heartbeat failed");
            }
        }
    }
    region
        .metrics
        .peer_up
        .with_label_values(&labels)
        .set(peer.is_up() as i64);
}
