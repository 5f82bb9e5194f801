//! Repair: joins peers' states into ours through the normal commit path (anti-entropy, read
//! repair), and quorum / all reads that merge what several regions hold.

use crate::actors::partition::{Merge, WriteError};
use crate::api::error::ApiError;
use crate::peers::{peer_call, Peer, Traffic};
use crate::region::Region;
use crate::storage::{StorageError, WriteTicket};
use futures_util::StreamExt;
use meridian_shared::encoding::{decode_state, encode_state};
use meridian_shared::wire::{AeFetch, AeMerged, AeStates};
use meridian_shared::{BucketDef, KeyState};
use std::sync::Arc;
use std::time::Duration;

/// Most states in one anti-entropy or read-repair body.
pub const STATES_PER_CALL: usize = 1000;
/// About the most state bytes in one body (well under the internal body limit).
pub const STATE_BYTES_PER_CALL: usize = 1024 * 1024;

/// Joins peers' `(bucket, key, encoded state)` into ours outside the log (anti-entropy, read
/// repair), durably, logging each change; returns how many changed.
pub async fn merge_states(
    region: &Region,
    states: Vec<(String, String, Vec<u8>)>,
) -> Result<u64, ApiError> {
    let mut decoded = Vec::with_capacity(states.len());
    for (bucket, key, bytes) in states {
        let state = decode_state(&bytes)
            .map_err(|e| ApiError::bad_request("invalid_state", format!("{bucket}/{key}: {e}")))?;
        decoded.push((bucket, key, state));
    }
    let queued = queue_merges(region, decoded, true).await?;
    await_merges(queued).await
}

/// Hands peers' states to their partition actors; returns the merges that changed something,
/// queued for the group commit. Every merge is queued before any is awaited, so one commit
/// usually carries the lot (and a caller may queue more, such as an applied mark, first).
/// `logged`: see [`Merge::logged`] (replication's merges are covered by its applied mark).
pub async fn queue_merges(
    region: &Region,
    states: Vec<(String, String, KeyState)>,
    logged: bool,
) -> Result<Vec<WriteTicket<u64>>, ApiError> {
    let mut foreign = 0;
    let sends = states.into_iter().filter_map(|(bucket, key, state)| {
        let kind = region.storage.bucket(&bucket).map(|def| def.kind);
        if kind.is_some_and(|kind| state.kind() != kind) {
            // Written under a concurrent definition of the bucket that lost here: it can never
            // apply (the peer drops it too once the winning definition reaches it).
            foreign += 1;
            return None;
        }
        Some(region.partitions.merge(Merge {
            bucket,
            key,
            state,
            kind,
            span: tracing::Span::current(),
            logged,
        }))
    });
    let sends: Vec<_> = sends.collect();
    if foreign > 0 {
        region.metrics.foreign_states_dropped.inc_by(foreign);
        tracing::warn!(
            states = foreign,
            "peer states of another type than their bucket's skipped (conflicting definitions)"
        );
    }
    let mut queued = Vec::new();
    for sent in futures_util::future::join_all(sends).await {
        match sent {
            Ok(Some(commit)) => queued.push(commit),
            Ok(None) => {}
            // Another type than ours (concurrent conflicting bucket definitions): it can
            // never apply; skipping keeps replication and repair moving.
            Err(WriteError::State(error)) => {
                tracing::error!(%error, "a peer's state does not fit the local bucket type; skipped")
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(queued)
}

/// Waits until queued merges are durable; returns how many there were.
pub async fn await_merges(queued: Vec<WriteTicket<u64>>) -> Result<u64, ApiError> {
    let changed = queued.len() as u64;
    for ticket in queued {
        ticket.await?;
    }
    Ok(changed)
}

/// Splits states into bodies bounded by count and bytes.
pub fn chunk_states(states: Vec<(String, String, Vec<u8>)>) -> Vec<Vec<(String, String, Vec<u8>)>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for state in states {
        bytes += state.0.len() + state.1.len() + state.2.len();
        current.push(state);
        if current.len() >= STATES_PER_CALL || bytes >= STATE_BYTES_PER_CALL {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A `consistency=quorum|all` read: asks `needed` peers for the key (all peers are asked, the
/// first `needed` answers count), merges their states with ours, answers the merge, and
/// writes it back to every region that answered with less (this one included).
pub async fn read_merged(
    region: &Arc<Region>,
    client: &reqwest::Client,
    def: &BucketDef,
    key: &str,
    needed: usize,
) -> Result<Option<KeyState>, ApiError> {
    let name = (def.name.clone(), key.to_string());
    let timeout = Duration::from_millis(region.config.forward_timeout_ms);
    let up: Vec<&Arc<Peer>> = region.peers.iter().filter(|p| p.is_up()).collect();
    if up.len() < needed {
        return Err(ApiError::unavailable(format!(
            "this read needs {needed} other regions and only {} are up",
            up.len()
        )));
    }
    let asks = up.into_iter().map(|peer| {
        let (region, client, peer) = (region.clone(), client.clone(), peer.clone());
        let fetch = AeFetch {
            keys: vec![name.clone()],
        };
        async move {
            let mut traffic = Traffic::default();
            let answer: Result<AeStates, String> = peer_call(
                &client,
                &region.config,
                &peer,
                "ae/fetch",
                &fetch,
                timeout,
                &mut traffic,
            )
            .await;
            (peer, answer)
        }
    });
    let mut answers: Vec<(Arc<Peer>, Option<Vec<u8>>)> = Vec::new();
    // The first `needed` answers decide: a hung peer costs a quorum read nothing while
    // others answer (each ask is bounded by the forward timeout).
    let mut pending: futures_util::stream::FuturesUnordered<_> = asks.collect();
    while answers.len() < needed {
        let Some((peer, answer)) = pending.next().await else {
            break;
        };
        match answer {
            Ok(states) => {
                let state = states.states.into_iter().next().map(|(_, _, bytes)| bytes);
                answers.push((peer, state));
            }
            Err(error) => tracing::debug!(peer = %peer.name, %error, "read repair: no answer"),
        }
    }
    if answers.len() < needed {
        return Err(ApiError::unavailable(format!(
            "this read needs {needed} other regions and only {} answered",
            answers.len()
        )));
    }
    let local = region.storage.raw_states(std::slice::from_ref(&name))?;
    let local = local.into_iter().next().map(|(_, _, bytes)| bytes);
    let mut merged: Option<KeyState> = None;
    for bytes in answers
        .iter()
        .filter_map(|(_, b)| b.as_ref())
        .chain(local.as_ref())
    {
        let state = decode_state(bytes)
            .map_err(|e| ApiError::from(StorageError::Corrupt(e.to_string())))?;
        if state.kind() != def.kind {
            // Written under a definition of the bucket that lost: it counts as absent.
            continue;
        }
        match &mut merged {
            None => merged = Some(state),
            Some(acc) => acc.merge(state).map_err(|e| {
                ApiError::new(
                    actix_web::http::StatusCode::CONFLICT,
                    "type_mismatch",
                    format!("regions disagree on the key's type: {e}"),
                )
            })?,
        }
    }
    let Some(merged) = merged else {
        return Ok(None);
    };
    let encoded = encode_state(&merged);
    let entry = vec![(name.0.clone(), name.1.clone(), encoded.clone())];
    if local.as_ref() != Some(&encoded) {
        let changed = merge_states(region, entry.clone()).await?;
        region.metrics.read_repairs.inc_by(changed);
    }
    // Written back in the background, to the peers that held less: those that answered, and
    // the others as their answers come in. The reader already has the merged answer.
    let (region, client) = (region.clone(), client.clone());
    actix_web::rt::spawn(async move {
        // Each write-back runs on its own, so a slow one never delays reading the next answer.
        // Past a bound in flight to a peer they are left to anti-entropy: a burst of quorum
        // reads of keys a lagging peer lacks must not turn into a burst of pushes to it.
        let repair = |peer: Arc<Peer>, state: Option<Vec<u8>>| {
            if state.as_ref() == Some(&encoded) {
                return;
            }
            let Ok(permit) = peer.write_backs.clone().try_acquire_owned() else {
                region.metrics.read_repairs_skipped.inc();
                return;
            };
            let (region, client, entry) = (region.clone(), client.clone(), entry.clone());
            actix_web::rt::spawn(async move {
                write_back(&region, &client, &peer, entry, timeout).await;
                drop(permit);
            });
        };
        for (peer, state) in answers {
            repair(peer, state);
        }
        while let Some((peer, answer)) = pending.next().await {
            if let Ok(states) = answer {
                repair(
                    peer,
                    states.states.into_iter().next().map(|(_, _, bytes)| bytes),
                );
            }
        }
    });
    Ok(Some(merged))
}

/// Pushes a read's merged state to a peer that held less.
async fn write_back(
    region: &Region,
    client: &reqwest::Client,
    peer: &Peer,
    entry: Vec<(String, String, Vec<u8>)>,
    timeout: Duration,
) {
    let body = AeStates { states: entry };
    let mut traffic = Traffic::default();
    let pushed: Result<AeMerged, String> = peer_call(
        client,
        &region.config,
        peer,
        "ae/push",
        &body,
        timeout,
        &mut traffic,
    )
    .await;
    match pushed {
        Ok(merged) => region.metrics.read_repairs.inc_by(merged.changed),
        Err(error) => tracing::warn!(peer = %peer.name, %error, "read repair write-back failed"),
    }
}
