//! Tombstone GC: removes a deletion tombstone only once it is causally stable, never by age.
//!
//! A tombstone here may be removed when (1) every region holds exactly the same tombstone or
//! nothing at all for the key (it removed it already), and (2) every region has since applied
//! every origin's log up to what any region had committed when (1) was checked. (1) means no
//! region holds a live state the tombstone covers; (2) means no older write the tombstone
//! covers is still on its way anywhere. Writes after a removal take dots above the hybrid
//! clock (see `DvvRegister::write`), so regions still holding the tombstone keep them.
//!
//! Every region checks its own tombstones; all peers must be up. A removal is conditional in
//! the writer: a key written since the check keeps its new state.

use crate::peers::{http_client, peer_call, Traffic};
use crate::region::Region;
use crate::storage::{KeyName, Purge};
use actix::prelude::*;
use meridian_shared::encoding::decode_state;
use meridian_shared::wire::{AeFetch, AeStates};
use meridian_shared::Actor as Incarnation;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Candidates examined per round.
const CANDIDATES_PER_ROUND: usize = 1000;
/// Heartbeat rounds to wait for every region to apply up to the horizon.
const HORIZON_ROUNDS: u32 = 50;

/// Periodically removes causally stable tombstones.
pub struct TombstoneGc {
    region: Arc<Region>,
}

impl TombstoneGc {
    /// Tombstone GC for the region.
    pub fn new(region: Arc<Region>) -> Self {
        Self { region }
    }
}

impl Actor for TombstoneGc {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let region = self.region.clone();
        ctx.spawn(actix::fut::wrap_future(collect_forever(region)));
    }
}

async fn collect_forever(region: Arc<Region>) {
    let client = http_client();
    let interval = Duration::from_millis(region.config.tombstone_gc_interval_ms);
    let mut after: Option<KeyName> = None;
    loop {
        tokio::time::sleep(interval.mul_f64(0.5 + crate::peers::jitter())).await;
        let names = match region
            .storage
            .tombstone_candidates(after.as_ref(), CANDIDATES_PER_ROUND)
        {
            Ok(names) => names,
            Err(why) => {
                tracing::debug!(%why, "tombstone GC round skipped");
                continue;
            }
        };
        let next = (names.len() == CANDIDATES_PER_ROUND)
            .then(|| names.last().cloned())
            .flatten();
        if names.is_empty() {
            after = None;
            continue;
        }
        // Only a round with candidates is a trace: an idle one every few seconds is noise.
        let span = tracing::info_span!(
            "tombstone_gc",
            candidates = names.len(),
            removed = tracing::field::Empty
        );
        match round(&region, &client, names)
            .instrument(span.clone())
            .await
        {
            Ok(removed) => {
                span.record("removed", removed);
                after = next;
            }
            Err(why) => tracing::debug!(%why, "tombstone GC round skipped"),
        }
    }
}

/// One round over the candidates `names` (up to [`CANDIDATES_PER_ROUND`]); returns how many
/// were removed.
async fn round(
    region: &Region,
    client: &reqwest::Client,
    names: Vec<KeyName>,
) -> Result<u64, String> {
    let storage = &region.storage;
    if region.peers.iter().any(|p| !p.is_up()) {
        return Err("a peer is down: stability cannot be established".into());
    }
    // Our current states: the ones still tombstones are candidates, the rest are forgotten.
    let mut purge = Purge::default();
    let mut ours: HashMap<KeyName, Vec<u8>> = HashMap::new();
    let stored = storage.raw_states(&names).map_err(|e| e.to_string())?;
    let mut present: std::collections::HashSet<KeyName> = std::collections::HashSet::new();
    for (bucket, key, bytes) in stored {
        present.insert((bucket.clone(), key.clone()));
        match decode_state(&bytes) {
            Ok(state) if state.is_tombstone() => {
                ours.insert((bucket, key), bytes);
            }
            _ => purge.forget.push((bucket, key, Some(bytes))),
        }
    }
    let gone = names.iter().filter(|n| !present.contains(*n));
    purge
        .forget
        .extend(gone.map(|(bucket, key)| (bucket.clone(), key.clone(), None)));
    // (1) Every peer holds the same tombstone or nothing.
    let keys: Vec<KeyName> = ours.keys().cloned().collect();
    let timeout = Duration::from_millis(region.config.forward_timeout_ms.max(1000));
    for peer in region.peers.iter() {
        for chunk in keys.chunks(crate::repair::STATES_PER_CALL) {
            let mut traffic = Traffic::default();
            let theirs: AeStates = peer_call(
                client,
                &region.config,
                peer,
                "ae/fetch",
                &AeFetch {
                    keys: chunk.to_vec(),
                },
                timeout,
                &mut traffic,
            )
            .await?;
            for (bucket, key, bytes) in theirs.states {
                let name = (bucket, key);
                if ours.get(&name).is_some_and(|mine| *mine != bytes) {
                    ours.remove(&name); // Not converged yet: anti-entropy will get there.
                }
            }
        }
    }
    // (2) Every region applies every origin's log up to what was committed anywhere by now.
    if !ours.is_empty() {
        await_horizon(region).await?;
    }
    purge.remove = ours
        .into_iter()
        .map(|((bucket, key), bytes)| (bucket, key, bytes))
        .collect();
    if purge.remove.is_empty() && purge.forget.is_empty() {
        return Ok(0);
    }
    let purged: Vec<KeyName> = purge
        .remove
        .iter()
        .map(|(b, k, _)| (b.clone(), k.clone()))
        .collect();
    let ticket = storage.submit_purge(purge).map_err(|e| e.to_string())?;
    let removed = ticket.await.map_err(|e| e.to_string())?;
    region.partitions.evict(purged);
    region.metrics.tombstones_removed.inc_by(removed);
    Ok(removed)
}

/// Waits until every region's applied vector covers the horizon: the highest sequence number
/// of every current incarnation known anywhere right now (fresh heartbeats only).
async fn await_horizon(region: &Region) -> Result<(), String> {
    let poll = Duration::from_millis(region.config.heartbeat_interval_ms);
    let started = Instant::now();
    // Heartbeats sent after this point report at least what the peers held during step (1).
    tokio::time::sleep(poll * 2).await;
    let beats: Vec<_> = region
        .peers
        .iter()
        .map(|p| p.beat_since(started))
        .collect::<Option<_>>()
        .ok_or("no fresh heartbeat from every peer")?;
    let mut horizon: BTreeMap<Incarnation, u64> = BTreeMap::new();
    let own = region.held();
    let current: Vec<Incarnation> = std::iter::once(region.storage.identity().incarnation)
        .chain(
            beats
                .iter()
                .map(|b: &meridian_shared::wire::Heartbeat| b.incarnation),
        )
        .collect();
    for incarnation in &current {
        let highest = beats
            .iter()
            .map(|b| b.held())
            .chain(std::iter::once(own.clone()))
            .filter_map(|applied| applied.get(incarnation).copied())
            .max()
            .unwrap_or(0);
        horizon.insert(*incarnation, highest);
    }
    let covers = |applied: &BTreeMap<Incarnation, u64>| {
        horizon
            .iter()
            .all(|(inc, seq)| applied.get(inc).copied().unwrap_or(0) >= *seq)
    };
    for _ in 0..HORIZON_ROUNDS {
        let since = Instant::now();
        tokio::time::sleep(poll * 2).await;
        let fresh: Option<Vec<_>> = region.peers.iter().map(|p| p.beat_since(since)).collect();
        if let Some(fresh) = fresh {
            if covers(&region.held()) && fresh.iter().all(|b| covers(&b.held())) {
                return Ok(());
            }
        }
    }
    Err("regions did not reach the horizon in time".into())
}
