//! Key routes: registers, counters, sets and listing.

use super::error::ApiError;
use super::extract::{
    self, ReadConsistency, ReadQuery, WriteQuery, CONTEXT_HEADER, SESSION_HEADER,
};
use super::forward::{self, Forwarded, PeerClient};
use crate::actors::partition::{stored_answer, Responder, Write, WriteOutcome};
use crate::region::Region;
use actix_web::http::header::HeaderName;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use meridian_shared::context::encode_context;
use meridian_shared::session::SessionToken;
use meridian_shared::state::View;
use meridian_shared::{BucketDef, KeyState, Op, RegionName};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::time::Duration;
use utoipa::ToSchema;

/// Answer to a register write or delete.
#[derive(Serialize, ToSchema)]
pub struct ContextBody {
    /// Causal context covering the write: send it back as `X-Meridian-Context`.
    pub context: String,
}

/// A register's values (more than one = concurrent siblings).
#[derive(Serialize, ToSchema)]
pub struct RegisterBody<'a> {
    /// The values, sorted by their JSON text.
    #[schema(value_type = Vec<Object>)]
    pub values: Vec<&'a RawValue>,
    /// Causal context covering every value.
    pub context: String,
    /// The key's home region.
    pub home_region: &'a str,
}

/// A counter's value.
#[derive(Serialize, ToSchema)]
pub struct CounterBody<'a> {
    /// Current value.
    pub value: i64,
    /// The key's home region (on reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home_region: Option<&'a str>,
}

/// A set's members.
#[derive(Serialize, ToSchema)]
pub struct SetBody<'a> {
    /// Members, sorted.
    pub members: Vec<String>,
    /// The key's home region (on reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home_region: Option<&'a str>,
}

/// Body of `POST .../increment`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncrementBody {
    /// Amount to add; may be negative.
    pub by: i64,
}

/// Body of `POST .../add` and `.../remove`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MembersBody {
    /// Set members.
    pub members: Vec<String>,
}

/// A page of keys.
#[derive(Serialize, ToSchema)]
pub struct KeyListBody {
    /// Keys in byte order.
    pub keys: Vec<String>,
    /// Pass as `after` for the next page; null on the last page.
    pub next: Option<String>,
}

/// Query of the key listing.
#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
    // Flattened fields arrive as text: fine for `consistency`, an enum of names, but a number
    // or bool added to `ReadQuery` would no longer parse here (serde#1183).
    #[serde(flatten)]
    read: ReadQuery,
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers: serialization cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn respond_context(state: &KeyState) -> (u16, Vec<u8>) {
    let context = encode_context(&state.context());
    (200, to_json(&ContextBody { context }))
}

fn respond_counter(state: &KeyState) -> (u16, Vec<u8>) {
    let value = match state.view() {
        View::Counter(value) => value,
        _ => 0,
    };
    (
        200,
        to_json(&CounterBody {
            value,
            home_region: None,
        }),
    )
}

fn respond_members(state: &KeyState) -> (u16, Vec<u8>) {
    let members = match state.view() {
        View::Set(members) => members,
        _ => Vec::new(),
    };
    (
        200,
        to_json(&SetBody {
            members,
            home_region: None,
        }),
    )
}

/// `X-Meridian-Session`, named once: parsing a name from a string allocates, on every answer.
const SESSION: HeaderName = HeaderName::from_static(SESSION_HEADER);

/// Headers every key answer carries.
fn key_response(
    region: &Region,
    (status, body): (u16, Vec<u8>),
    home: &RegionName,
    session: SessionToken,
    failover: bool,
) -> HttpResponse {
    // Static names: parsing one from a string allocates, on every answer.
    const REGION: HeaderName = HeaderName::from_static(extract::REGION_HEADER);
    const HOME: HeaderName = HeaderName::from_static(extract::HOME_HEADER);
    const FAILOVER: HeaderName = HeaderName::from_static(extract::FAILOVER_HEADER);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = HttpResponse::build(status);
    response
        .content_type("application/json")
        .insert_header((REGION, region.name().as_str()))
        .insert_header((HOME, home.as_str()))
        .insert_header((SESSION, session.encode()));
    if failover {
        response.insert_header((FAILOVER, "true"));
    }
    response.body(body)
}

/// The answer to a write that is applied: its own, or the error of an `ack` not met in time.
/// Either way it goes out as a key response, so a 504 still tells where the write was
/// applied and carries the session token that covers it.
fn settled(acked: Result<(), ApiError>, answer: (u16, Vec<u8>)) -> (u16, Vec<u8>) {
    match acked {
        Ok(()) => answer,
        Err(error) => (error.status.as_u16(), error.body()),
    }
}

/// The bucket and key a request names. A forwarded request may name a bucket created so
/// recently that its definition has not replicated here yet: it brought the definition along.
async fn target(region: &Region, req: &HttpRequest) -> Result<(BucketDef, String), ApiError> {
    let bucket = extract::name_at(req, 3)?;
    let key = extract::name_at(req, 4)?;
    match region.bucket(&bucket) {
        Ok(def) => Ok((def, key)),
        Err(missing) => {
            let Some(def) = forward::forwarded_bucket(region, req, &bucket) else {
                return Err(missing);
            };
            region.adopt_bucket(def).await?;
            Ok((region.bucket(&bucket)?, key))
        }
    }
}

/// A write as the handlers parsed it.
struct Change<'a> {
    def: BucketDef,
    key: String,
    op: Op,
    /// The raw body (forwarded as is, and fingerprinted for idempotency).
    body: &'a [u8],
    /// Builds the answer from the key's new state.
    respond: Responder,
}

/// Forwards a write to its home region, or applies it here (at home, or as failover), then
/// waits for the requested acknowledgement.
async fn write(
    region: &Region,
    client: &PeerClient,
    req: &HttpRequest,
    change: Change<'_>,
) -> Result<HttpResponse, ApiError> {
    let Change {
        def,
        key,
        op,
        body,
        respond,
    } = change;
    let WriteQuery { ack, .. } = extract::query(req)?;
    let session = extract::session(req)?;
    let idempotency = extract::idempotency_key(req)?.map(|id| {
        (
            id,
            fingerprint(req, op.name(), &def.name, &key, body),
            respond,
        )
    });
    let home = region.home_of(&def, &key).clone();
    let forwarded = forward::was_forwarded(region, req);
    let failover = &home != region.name() && !forwarded;
    if failover {
        // A retry of a write this region accepted as failover is answered here: forwarding
        // it to the (now reachable) home would apply it a second time.
        if let Some(record) = stored_record(region, idempotency)? {
            return replay(region, ack, session, record, &home, true).await;
        }
        let home_may_wait = match ack {
            extract::Ack::Local => Duration::ZERO,
            _ => Duration::from_millis(region.config.ack_timeout_ms),
        };
        let what = forward::Forward {
            req,
            def: &def,
            body,
            idempotency: idempotency.as_ref().map(|(id, ..)| *id),
        };
        match forward::forward(region, client, what, &home, home_may_wait).await? {
            Forwarded::Answered(response) => return Ok(response),
            Forwarded::HomeUnreachable => {
                if let Some((id, ..)) = idempotency {
                    if region.in_doubt.contains(id) {
                        region.metrics.failovers_refused.inc();
                        return Err(ApiError::unavailable(format!(
                            "an earlier attempt with this Idempotency-Key may still be applied \
                             by the home region {home}, which is unreachable; retry until it \
                             answers"
                        )));
                    }
                }
                region.metrics.failover_writes.inc()
            }
        }
    }
    if let Err(refused) = region.check_ack(ack) {
        // A retry of a write already applied is still answered from its record.
        return match stored_record(region, idempotency)? {
            Some(record) => replay(region, ack, session, record, &home, failover).await,
            None => {
                region.metrics.acks_refused.inc();
                Err(refused)
            }
        };
    }
    let outcome = region
        .partitions
        .write(Write {
            bucket: def.name.clone(),
            key,
            kind: def.kind,
            op,
            idempotency,
            apply_by: if forwarded {
                extract::apply_by(req)?
            } else {
                None
            },
            span: tracing::Span::current(),
        })
        .await?;
    match outcome {
        WriteOutcome::Applied { seq, state } => {
            let answer = respond(&state);
            let answer = settled(region.await_ack(ack, seq).await, answer);
            let token = region.session_after(session);
            Ok(key_response(region, answer, &home, token, failover))
        }
        WriteOutcome::Replayed(record) => {
            replay(region, ack, session, record, &home, failover).await
        }
    }
}

/// The stored answer of a keyed write already applied (or replicated here), if any.
fn stored_record(
    region: &Region,
    idempotency: Option<(u128, u64, Responder)>,
) -> Result<Option<crate::storage::IdempotencyRecord>, ApiError> {
    match idempotency {
        Some((id, fingerprint, _)) => Ok(stored_answer(&region.storage, id, fingerprint)?),
        None => Ok(None),
    }
}

/// A retry answered from its stored record once `ack` holds, marked as a replay. It claims
/// failover only if this region applied it outside the key's home; a record replicated from
/// another region answers as that region did.
async fn replay(
    region: &Region,
    ack: extract::Ack,
    session: SessionToken,
    record: crate::storage::IdempotencyRecord,
    home: &RegionName,
    outside_home: bool,
) -> Result<HttpResponse, ApiError> {
    let acked = region.await_replay_ack(ack, &record).await;
    let token = region.session_after_replay(session, &record);
    let failover = outside_home && record.origin.is_none();
    let answer = settled(acked, (record.status, record.body));
    let mut response = key_response(region, answer, home, token, failover);
    response.headers_mut().insert(
        HeaderName::from_static(extract::REPLAYED_HEADER),
        actix_web::http::header::HeaderValue::from_static("true"),
    );
    Ok(response)
}

/// Identifies a request for idempotency: same key + different request = conflict.
fn fingerprint(req: &HttpRequest, op: &str, bucket: &str, key: &str, body: &[u8]) -> u64 {
    let context = req
        .headers()
        .get(CONTEXT_HEADER)
        .map_or(&b""[..], |v| v.as_bytes());
    let mut buf =
        Vec::with_capacity(op.len() + bucket.len() + key.len() + body.len() + context.len() + 4);
    for part in [
        op.as_bytes(),
        bucket.as_bytes(),
        key.as_bytes(),
        body,
        context,
    ] {
        buf.extend_from_slice(part);
        buf.push(0xff);
    }
    xxhash_rust::xxh3::xxh3_64(&buf)
}

/// Reads a JSON object body, turns it into an operation and writes it.
async fn write_body<B: serde::de::DeserializeOwned>(
    region: &Region,
    client: &PeerClient,
    req: &HttpRequest,
    payload: web::Payload,
    to_op: fn(B) -> Op,
    respond: Responder,
) -> Result<HttpResponse, ApiError> {
    let (def, key) = target(region, req).await?;
    let body = extract::read_body(req, payload, region.config.max_body_bytes).await?;
    let op = to_op(extract::json(&body)?);
    let change = Change {
        def,
        key,
        op,
        body: &body,
        respond,
    };
    write(region, client, req, change).await
}

/// Writes a register value.
#[utoipa::path(put, operation_id = "put_key", path = "/v1/kv/{bucket}/{key}", tag = "keys",
    params(("bucket" = String, Path), ("key" = String, Path),
           ("ack" = Option<String>, Query, description = "local | quorum | all"),
           ("X-Meridian-Context" = Option<String>, Header, description = "context that this write supersedes"),
           ("Idempotency-Key" = Option<String>, Header, description = "UUID; a retry is applied once")),
    request_body(content = serde_json::Value, description = "any JSON value"),
    responses((status = 200, body = ContextBody), (status = 400, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody),
              (status = 413, body = super::error::ErrorBody)))]
pub async fn put(
    region: web::Data<Region>,
    client: web::Data<PeerClient>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (def, key) = target(&region, &req).await?;
    let body = extract::read_body(&req, payload, region.config.max_body_bytes).await?;
    let value = extract::json_value_text(&body)?;
    let context = extract::context(&req)?;
    let op = Op::Put { value, context };
    let change = Change {
        def,
        key,
        op,
        body: &body,
        respond: respond_context,
    };
    write(&region, &client, &req, change).await
}

/// Deletes a register (tombstone) or every observed member of a set.
#[utoipa::path(delete, operation_id = "delete_key", path = "/v1/kv/{bucket}/{key}", tag = "keys",
    params(("bucket" = String, Path), ("key" = String, Path),
           ("X-Meridian-Context" = Option<String>, Header, description = "context that this delete supersedes")),
    responses((status = 200, body = ContextBody), (status = 404, body = super::error::ErrorBody),
              (status = 409, body = super::error::ErrorBody)))]
pub async fn delete(
    region: web::Data<Region>,
    client: web::Data<PeerClient>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (def, key) = target(&region, &req).await?;
    let context = extract::context(&req)?;
    let respond: Responder = match def.kind {
        meridian_shared::BucketType::Set => respond_members,
        _ => respond_context,
    };
    let change = Change {
        def,
        key,
        op: Op::Delete { context },
        body: b"",
        respond,
    };
    write(&region, &client, &req, change).await
}

/// Adds to a counter.
#[utoipa::path(post, operation_id = "increment_counter", path = "/v1/kv/{bucket}/{key}/increment", tag = "keys",
    params(("bucket" = String, Path), ("key" = String, Path),
           ("Idempotency-Key" = Option<String>, Header, description = "UUID; a retry is applied once")),
    request_body = IncrementBody,
    responses((status = 200, body = CounterBody), (status = 409, body = super::error::ErrorBody),
              (status = 422, body = super::error::ErrorBody)))]
pub async fn increment(
    region: web::Data<Region>,
    client: web::Data<PeerClient>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let op = |IncrementBody { by }| Op::Increment { by };
    write_body::<IncrementBody>(&region, &client, &req, payload, op, respond_counter).await
}

/// Adds members to a set.
#[utoipa::path(post, operation_id = "add_members", path = "/v1/kv/{bucket}/{key}/add", tag = "keys",
    params(("bucket" = String, Path), ("key" = String, Path)),
    request_body = MembersBody,
    responses((status = 200, body = SetBody), (status = 409, body = super::error::ErrorBody),
              (status = 422, body = super::error::ErrorBody)))]
pub async fn add(
    region: web::Data<Region>,
    client: web::Data<PeerClient>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let op = |MembersBody { members }| Op::Add { members };
    write_body::<MembersBody>(&region, &client, &req, payload, op, respond_members).await
}

/// Removes observed members from a set.
#[utoipa::path(post, operation_id = "remove_members", path = "/v1/kv/{bucket}/{key}/remove", tag = "keys",
    params(("bucket" = String, Path), ("key" = String, Path)),
    request_body = MembersBody,
    responses((status = 200, body = SetBody), (status = 409, body = super::error::ErrorBody),
              (status = 422, body = super::error::ErrorBody)))]
pub async fn remove(
    region: web::Data<Region>,
    client: web::Data<PeerClient>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let op = |MembersBody { members }| Op::Remove { members };
    write_body::<MembersBody>(&region, &client, &req, payload, op, respond_members).await
}

/// Reads a key.
#[utoipa::path(get, operation_id = "get_key", path = "/v1/kv/{bucket}/{key}", tag = "keys",
    params(("bucket" = String, Path), ("key" = String, Path),
           ("consistency" = Option<String>, Query, description = "local | home | session | quorum | all"),
           ("X-Meridian-Session" = Option<String>, Header, description = "session token for consistency=session")),
    responses((status = 200, description = "register: {values, context, home_region}; counter: {value}; set: {members}"),
              (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    region: web::Data<Region>,
    client: web::Data<PeerClient>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let ReadQuery { consistency, .. } = extract::query(&req)?;
    let session = extract::session(&req)?;
    // A session may have seen the bucket created elsewhere: wait for it before a 404.
    let covered = consistency != ReadConsistency::Session || region.await_session(&session).await;
    let (def, key) = match target(&region, &req).await {
        Err(missing) if !covered && missing.code == "bucket_not_found" => {
            region.check_read(consistency, &session)?;
            return Err(missing);
        }
        found => found?,
    };
    let home = region.home_of(&def, &key).clone();
    let at_home = &home == region.name() || forward::was_forwarded(&region, &req);
    let go_home = match consistency {
        ReadConsistency::Home => !at_home,
        ReadConsistency::Session => !covered && !at_home,
        ReadConsistency::Local | ReadConsistency::Quorum | ReadConsistency::All => false,
    };
    if go_home {
        let home_may_wait = Duration::from_millis(region.config.session_wait_ms);
        let what = forward::Forward {
            req: &req,
            def: &def,
            body: b"",
            idempotency: None,
        };
        return match forward::forward(&region, &client, what, &home, home_may_wait).await? {
            Forwarded::Answered(response) => Ok(response),
            Forwarded::HomeUnreachable => Err(ApiError::unavailable(format!(
                "consistency={} needs the home region {home}, which is unreachable",
                format!("{consistency:?}").to_lowercase()
            ))),
        };
    }
    region.check_read(consistency, &session)?;
    let state = match consistency {
        ReadConsistency::Quorum | ReadConsistency::All if !region.peers.is_empty() => {
            let needed = region.others_needed(consistency == ReadConsistency::All);
            crate::repair::read_merged(&region.clone().into_inner(), &client.0, &def, &key, needed)
                .await?
        }
        _ => region.storage.key_state(&def.name, &key)?,
    }
    // A state of another type was written under a definition of the bucket that lost.
    .filter(|state| state.kind() == def.kind)
    .unwrap_or_else(|| KeyState::empty(def.kind));
    let home_region = Some(home.as_str());
    let token = region.session_after(session);
    let body = match state.view() {
        View::Absent => {
            // A key response still: a read that found a delete must carry the token that
            // covers it, or a session read elsewhere could show the deleted value again.
            let missing = ApiError::not_found(
                "key_not_found",
                format!("key {key:?} does not exist in bucket {:?}", def.name),
            );
            let answer = (missing.status.as_u16(), missing.body());
            return Ok(key_response(&region, answer, &home, token, false));
        }
        View::Register { values, context } => {
            let raw: Vec<&RawValue> = values
                .iter()
                .filter_map(|v| serde_json::from_str::<&RawValue>(v).ok())
                .collect();
            to_json(&RegisterBody {
                values: raw,
                context: encode_context(&context),
                home_region: home.as_str(),
            })
        }
        View::Counter(value) => to_json(&CounterBody { value, home_region }),
        View::Set(members) => to_json(&SetBody {
            members,
            home_region,
        }),
    };
    Ok(key_response(&region, (200, body), &home, token, false))
}

/// Lists a bucket's keys in byte order.
#[utoipa::path(get, operation_id = "list_keys", path = "/v1/kv/{bucket}", tag = "keys",
    params(("bucket" = String, Path),
           ("prefix" = Option<String>, Query), ("after" = Option<String>, Query),
           ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "default 100"),
           ("consistency" = Option<String>, Query, description = "local (default) | session: a listing reads this region only"),
           ("X-Meridian-Session" = Option<String>, Header, description = "session token for consistency=session")),
    responses((status = 200, body = KeyListBody), (status = 404, body = super::error::ErrorBody)))]
pub async fn list(region: web::Data<Region>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let bucket = extract::name_at(&req, 3)?;
    let q: ListQuery = extract::query(&req)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "limit must be between 1 and 1000",
        ));
    }
    let session = extract::session(&req)?;
    match q.read.consistency {
        ReadConsistency::Local => {}
        // Before the bucket is looked up: the session may have seen it created elsewhere.
        ReadConsistency::Session => {
            region.await_session(&session).await;
            region.check_read(ReadConsistency::Session, &session)?;
        }
        ReadConsistency::Home | ReadConsistency::Quorum | ReadConsistency::All => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "a listing reads this region only: consistency=local or session",
            ))
        }
    }
    let def = region.bucket(&bucket)?;
    let page = region
        .storage
        .list_keys(&def.name, &q.prefix, q.after.as_deref(), limit)?;
    Ok(HttpResponse::Ok()
        .insert_header((SESSION, region.session_after(session).encode()))
        .json(KeyListBody {
            keys: page.keys,
            next: page.next,
        }))
}
