//! Forwarding a request to the key's home region.
//!
//! Failover is allowed only when the forward certainly did not apply: the home is marked down,
//! the connection could not be made, or the home answered that it is still starting. When the
//! request may have reached the home (a timeout after sending, a broken answer) the client gets
//! 503: applying it here too could count a counter increment twice. Its Idempotency-Key stays
//! in doubt (see `in_doubt`) until the home answers for it, or says that this attempt applied
//! nothing, so that a retry does not fail over either.

use super::error::ApiError;
use super::extract::{
    CONTEXT_HEADER, FAILOVER_HEADER, HOME_HEADER, IDEMPOTENCY_HEADER, REGION_HEADER,
    REPLAYED_HEADER, SESSION_HEADER,
};
use crate::region::Region;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use meridian_shared::wire::{
    APPLY_BY_HEADER, BUCKET_DEF_HEADER, FORWARDED_HEADER, FORWARD_TOKEN_HEADER, NOT_APPLIED_HEADER,
    STARTING_HEADER,
};
use meridian_shared::{BucketDef, RegionName};
use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::time::Duration;
use tracing::Instrument;

/// Share (in quarters) of `forward_timeout_ms` within which the home must start applying a
/// forwarded write: the rest covers its commit and answer, so that it never starts applying
/// one the forwarder has given up on.
const APPLY_BY_QUARTERS: u64 = 3;

/// The HTTP client an actix worker uses for forwards (one per worker).
pub struct PeerClient(pub reqwest::Client);

/// What forwarding did.
pub enum Forwarded {
    /// The home answered; pass its answer on.
    Answered(HttpResponse),
    /// The home is certainly unreachable and nothing was applied there.
    HomeUnreachable,
}

/// Request headers a forward carries over (trace context is injected afresh: the forward span).
const PASSED_REQUEST_HEADERS: [&str; 5] = [
    "content-type",
    "authorization",
    IDEMPOTENCY_HEADER,
    CONTEXT_HEADER,
    SESSION_HEADER,
];

/// Response headers passed back from the home.
const PASSED_RESPONSE_HEADERS: [&str; 7] = [
    "content-type",
    REGION_HEADER,
    HOME_HEADER,
    SESSION_HEADER,
    FAILOVER_HEADER,
    REPLAYED_HEADER,
    "retry-after",
];

/// Path segments as the home must see them: everything but unreserved characters encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The request's path and query for the home, every segment re-encoded: the URL parser would
/// otherwise turn a raw `\` into `/` and resolve `..`, so the home could act on other names
/// than the ones validated here.
fn forward_path(req: &HttpRequest) -> String {
    let mut path = String::new();
    for segment in req.uri().path().split('/').skip(1) {
        path.push('/');
        let raw: Vec<u8> = percent_decode_str(segment).collect();
        path.extend(percent_encode(&raw, SEGMENT));
    }
    if let Some(query) = req.uri().query() {
        path.push('?');
        path.push_str(query);
    }
    path
}

/// Whether a peer forwarded this request (it must not be forwarded again): it names one of
/// our peers and, when `peer_token` is set, carries it. A client cannot pose as a peer.
pub fn was_forwarded(region: &Region, req: &HttpRequest) -> bool {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let Some(by) = header(FORWARDED_HEADER) else {
        return false;
    };
    let from_peer = region.peers.iter().any(|peer| peer.name.as_str() == by);
    let token_ok = match &region.config.security.peer_token {
        None => true,
        Some(token) => header(FORWARD_TOKEN_HEADER)
            .is_some_and(|presented| super::constant_time_eq(token, presented)),
    };
    from_peer && token_ok
}

/// The bucket definition a forwarding peer sent along, if it names `bucket` and a home region
/// of this cluster.
pub fn forwarded_bucket(region: &Region, req: &HttpRequest, bucket: &str) -> Option<BucketDef> {
    if !was_forwarded(region, req) {
        return None;
    }
    let header = req.headers().get(BUCKET_DEF_HEADER)?.to_str().ok()?;
    let def: BucketDef = serde_json::from_str(header).ok()?;
    let home_known = def
        .home_region
        .as_ref()
        .is_none_or(|home| region.regions.contains(home));
    (def.name == bucket && home_known).then_some(def)
}

/// A forwarded write's deadline on the home's clock, as its heartbeats showed it: early by the
/// estimate's error, so the home never starts applying it later than meant. None before a
/// heartbeat said, or while the estimate is too rough to leave the home time to apply it.
fn apply_by(region: &Region, home: &crate::peers::Peer) -> Option<u64> {
    let clock = home.clock()?;
    let budget = region
        .config
        .forward_timeout_ms
        .saturating_mul(APPLY_BY_QUARTERS)
        / 4;
    if clock.error_ms > budget / 4 {
        return None;
    }
    let home_now = crate::clock::now_ms().saturating_add_signed(clock.offset_ms);
    Some(
        home_now
            .saturating_sub(clock.error_ms)
            .saturating_add(budget),
    )
}

/// What to forward: the client's request, its body and the bucket it names.
pub struct Forward<'a> {
    /// The client's request (method, path, passed-on headers).
    pub req: &'a HttpRequest,
    /// The bucket's definition (sent along for a home that has not received it yet).
    pub def: &'a BucketDef,
    /// The request body.
    pub body: &'a [u8],
    /// A write's parsed `Idempotency-Key`: in doubt while its outcome is unknown.
    pub idempotency: Option<u128>,
}

/// Sends the request to `home` and returns its answer, or says the home is unreachable.
/// `home_may_wait` is how long the home may hold the request by design (ack or session waits).
pub async fn forward(
    region: &Region,
    client: &PeerClient,
    what: Forward<'_>,
    home: &RegionName,
    home_may_wait: Duration,
) -> Result<Forwarded, ApiError> {
    let Forward {
        req,
        def,
        body,
        idempotency,
    } = what;
    let outcome = |label: &str| region.metrics.forwards.with_label_values(&[label]).inc();
    let Some(peer) = region.peers.get(home) else {
        outcome("unknown_home");
        return Ok(Forwarded::HomeUnreachable);
    };
    if !peer.is_up() {
        outcome("home_down");
        return Ok(Forwarded::HomeUnreachable);
    }
    let path = forward_path(req);
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|_| ApiError::bad_request("invalid_method", "unsupported method"))?;
    let mut request = client
        .0
        .request(method, format!("{}{path}", peer.url))
        // The home may legitimately wait (for acks, for a session): allow it that on top.
        .timeout(Duration::from_millis(region.config.forward_timeout_ms) + home_may_wait)
        .header(FORWARDED_HEADER, region.name().as_str())
        .header(
            BUCKET_DEF_HEADER,
            serde_json::to_string(def).unwrap_or_default(),
        )
        .body(body.to_vec());
    if let Some(token) = &region.config.security.peer_token {
        request = request.header(FORWARD_TOKEN_HEADER, token.as_str());
    }
    for name in PASSED_REQUEST_HEADERS {
        if let Some(value) = req.headers().get(name) {
            request = request.header(name, value.as_bytes());
        }
    }
    // Only under a sampled request: an unsampled one would be a span nobody sees.
    let span = meridian_observability::propagation::child_span(
        &tracing::Span::current(),
        || tracing::info_span!("forward_to_home", "otel.kind" = "client", home = %home),
    );
    let mut trace_headers = reqwest::header::HeaderMap::new();
    meridian_observability::propagation::inject(&span, &mut trace_headers);
    request = request.headers(trace_headers);
    let is_read = req.method() == actix_web::http::Method::GET;
    if let Some(apply_by) = (!is_read).then(|| apply_by(region, peer)).flatten() {
        request = request.header(APPLY_BY_HEADER, apply_by.to_string());
    }
    let unknown = |error: String| {
        outcome("unknown");
        tracing::warn!(home = %home, %error, "forward outcome unknown");
        // The cause stays in the log: it names the peer's internal address.
        ApiError::unavailable(if is_read {
            format!("the home region {home} did not answer")
        } else {
            format!(
                "the home region {home} did not answer; the write may or may not have been \
                 applied there. Retry with the same Idempotency-Key"
            )
        })
    };
    // In doubt from before it is sent until the home answers: also when this future is
    // dropped on the way (the client went away), the home may still apply it.
    let mut attempt = idempotency.map(|id| region.in_doubt.begin(id));
    let response = match request.send().instrument(span.clone()).await {
        Ok(response) => response,
        Err(e) if e.is_connect() => {
            // Nothing was sent: safe to accept the write here instead, unless another
            // attempt left the key in doubt.
            if let Some(attempt) = attempt {
                region.in_doubt.not_sent(attempt);
            }
            peer.mark_down("forward connection refused");
            outcome("refused");
            return Ok(Forwarded::HomeUnreachable);
        }
        Err(e) => return Err(unknown(e.to_string())),
    };
    if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
        && response.headers().contains_key(STARTING_HEADER)
    {
        // The home is still starting (asking its peers who it is): it applied nothing.
        if let Some(attempt) = attempt {
            region.in_doubt.not_sent(attempt);
        }
        peer.mark_down("home is starting");
        outcome("refused");
        return Ok(Forwarded::HomeUnreachable);
    }
    if response.headers().contains_key(NOT_APPLIED_HEADER) {
        // The home refused it before applying anything: a retry may fail over later.
        if let Some(attempt) = attempt.take() {
            region.in_doubt.not_sent(attempt);
        }
    }
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers: Vec<(&'static str, Vec<u8>)> = PASSED_RESPONSE_HEADERS
        .iter()
        .filter_map(|name| {
            response
                .headers()
                .get(*name)
                .map(|v| (*name, v.as_bytes().to_vec()))
        })
        .collect();
    let body = response
        .bytes()
        .instrument(span)
        .await
        .map_err(|e| unknown(e.to_string()))?;
    outcome("answered");
    if let (Some(id), true) = (idempotency, status.is_success()) {
        // The home holds a durable answer for the key: a later copy of an earlier attempt
        // replays it. (A 409 may mean the first attempt is still in flight there.)
        region.in_doubt.settle(id);
    }
    let mut answer = HttpResponse::build(status);
    for (name, value) in headers {
        answer.insert_header((name, value));
    }
    Ok(Forwarded::Answered(answer.body(body)))
}
