//! The responder's side of anti-entropy and read repair (`/internal/v1/ae/*`, postcard bodies).

use super::error::ApiError;
use crate::actors::anti_entropy::{DIGESTS_PAGE, SCAN_PAGE};
use crate::region::Region;
use crate::repair::merge_states;
use actix_web::{web, HttpResponse};
use meridian_shared::merkle::{SegmentFilter, BRANCHES};
use meridian_shared::wire::{
    self, AeDigests, AeDigestsRequest, AeFetch, AeMerged, AeSegmentsRequest, AeStates, AeTop,
    AeTopRequest, SegmentSet, PROTOCOL_VERSION,
};
use serde::de::DeserializeOwned;

/// Most keys one fetch may ask for (exchanges and read repair ask for at most 1000).
const MAX_FETCH_KEYS: usize = 10_000;

/// The anti-entropy routes, nested in the internal scope (which checks the peer).
pub fn scope() -> actix_web::Scope {
    web::scope("/ae")
        .route("/top", web::post().to(top))
        .route("/segments", web::post().to(segments))
        .route("/digests", web::post().to(digests))
        .route("/fetch", web::post().to(fetch))
        .route("/push", web::post().to(push))
}

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    wire::decode(bytes)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("undecodable body: {e}")))
}

fn answer<T: serde::Serialize>(value: &T) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(wire::encode(value))
}

/// Step 1: our root, our branches if the roots differ, and our bucket definitions.
async fn top(
    region: web::Data<Region>,
    req: actix_web::HttpRequest,
    bytes: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let request: AeTopRequest = body(&bytes)?;
    let from = req
        .headers()
        .get(meridian_shared::wire::PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|name| region.peers.iter().find(|p| p.name.as_str() == name));
    if let Some(peer) = from {
        // Both sides started at once (a peer returning, say): the smaller name goes on.
        let ours_runs = peer.exchanging.load(std::sync::atomic::Ordering::Acquire);
        if ours_runs && region.name() < &peer.name {
            return Ok(answer(&AeTop {
                deferred: true,
                root: 0,
                branches: None,
                buckets: Vec::new(),
                applied: Default::default(),
            }));
        }
    }
    if request.version != PROTOCOL_VERSION {
        return Err(ApiError::bad_request(
            "protocol_version",
            format!(
                "peer speaks protocol {}, this region {PROTOCOL_VERSION}",
                request.version
            ),
        ));
    }
    // Applied vector first, then the tree (the writer publishes them in the other order).
    let applied = region.held();
    let (root, branches) = region
        .storage
        .with_tree(|t| {
            let root = t.root();
            (root, (root != request.root).then(|| t.branches().to_vec()))
        })
        .ok_or_else(|| ApiError::unavailable("anti-entropy tree is unavailable"))?;
    Ok(answer(&AeTop {
        deferred: false,
        root,
        branches,
        buckets: region.storage.buckets(),
        applied,
    }))
}

/// Step 2: segment hashes under the asked branches.
async fn segments(region: web::Data<Region>, bytes: web::Bytes) -> Result<HttpResponse, ApiError> {
    let request: AeSegmentsRequest = body(&bytes)?;
    if request.branches.iter().any(|&b| b as usize >= BRANCHES) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "branch index out of range",
        ));
    }
    let hashes: Vec<Vec<u64>> = region
        .storage
        .with_tree(|t| {
            request
                .branches
                .iter()
                .map(|b| t.segments_of(*b).to_vec())
                .collect()
        })
        .ok_or_else(|| ApiError::unavailable("anti-entropy tree is unavailable"))?;
    Ok(answer(&hashes))
}

/// Step 3: digests of the keys in the asked segments, one bounded page.
async fn digests(region: web::Data<Region>, bytes: web::Bytes) -> Result<HttpResponse, ApiError> {
    let request: AeDigestsRequest = body(&bytes)?;
    let filter = match &request.segments {
        SegmentSet::All => SegmentFilter::all(),
        SegmentSet::Some(list) => SegmentFilter::of(list),
    };
    let storage = region.storage.clone();
    let max_digests = request.max_digests.clamp(1, DIGESTS_PAGE) as usize;
    let max_scan = request.max_scan.clamp(1, SCAN_PAGE) as usize;
    let (digests, scanned_to) = web::block(move || {
        crate::affinity::unpinned(|| {
            storage.digests(&filter, request.after.as_ref(), None, max_digests, max_scan)
        })
    })
    .await
    .map_err(|e| ApiError::unavailable(format!("digest scan: {e}")))??;
    Ok(answer(&AeDigests {
        digests,
        scanned_to,
    }))
}

/// Step 4a (and read repair): our states of the asked keys.
async fn fetch(region: web::Data<Region>, bytes: web::Bytes) -> Result<HttpResponse, ApiError> {
    let request: AeFetch = body(&bytes)?;
    if request.keys.len() > MAX_FETCH_KEYS {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("at most {MAX_FETCH_KEYS} keys per fetch"),
        ));
    }
    let states = region.storage.raw_states(&request.keys)?;
    region.sweep_if_foreign(&states);
    Ok(answer(&AeStates { states }))
}

/// Step 4b (and read repair write-back): merges the peer's states into ours, durably.
async fn push(region: web::Data<Region>, bytes: web::Bytes) -> Result<HttpResponse, ApiError> {
    let request: AeStates = body(&bytes)?;
    let names: Vec<(String, String)> = request
        .states
        .iter()
        .map(|(b, k, _)| (b.clone(), k.clone()))
        .collect();
    let pushed: std::collections::HashMap<(String, String), Vec<u8>> = request
        .states
        .iter()
        .map(|(b, k, s)| ((b.clone(), k.clone()), s.clone()))
        .collect();
    let changed = merge_states(&region, request.states).await?;
    let newer = region
        .storage
        .raw_states(&names)?
        .into_iter()
        .filter(|(b, k, merged)| pushed.get(&(b.clone(), k.clone())) != Some(merged))
        .collect();
    Ok(answer(&AeMerged { changed, newer }))
}
