//! Request parsing: names from the raw path, bounded bodies, JSON, query and header tokens.
//!
//! Every failure maps to the API's JSON errors; actix's default extractors answer with
//! plain-text errors, so the handlers use these instead.

use super::error::ApiError;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest};
use crdts::VClock;
use futures_util::StreamExt;
use meridian_shared::context::decode_context;
use meridian_shared::session::SessionToken;
use meridian_shared::wire::APPLY_BY_HEADER;
use meridian_shared::{names, Actor};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Request header carrying a causal context.
pub const CONTEXT_HEADER: &str = "x-meridian-context";
/// Request and response header carrying a session token.
pub const SESSION_HEADER: &str = "x-meridian-session";
/// Request header making a write idempotent.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Response header naming the region that answered.
pub const REGION_HEADER: &str = "x-meridian-region";
/// Response header naming the key's home region.
pub const HOME_HEADER: &str = "x-meridian-home";
/// Response header set when a write was accepted outside its home region.
pub const FAILOVER_HEADER: &str = "x-meridian-failover";
/// Response header set when a retried write was answered from its idempotency record.
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

/// The percent-decoded, validated path segment at `index` (`/v1/kv/{bucket}/{key}`: 3 and 4).
///
/// Decoding the raw segment ourselves means an encoded `/` (`%2F`) is seen, and refused.
pub fn name_at(req: &HttpRequest, index: usize) -> Result<String, ApiError> {
    let raw = req.uri().path().split('/').nth(index).unwrap_or("");
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("invalid_name", "names must be valid UTF-8"))?;
    names::validate(&decoded)
        .map_err(|e| ApiError::bad_request("invalid_name", format!("{decoded:?}: {e}")))?;
    Ok(decoded.into_owned())
}

/// Reads the body, refusing more than `limit` bytes with 413 before buffering them.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("invalid_body_stream", format!("could not read body: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Parses a JSON object body: malformed → 400 `invalid_json`; well-formed but not an object of
/// the expected shape → 422 `invalid_body`.
///
/// Parsing to a `Value` first keeps the two apart: serde's struct deserializer would accept an
/// array as a struct and report a truncated body as a type error.
pub fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}"))
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid_body("body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::invalid_body(e.to_string()))
}

/// Checks that the body is one JSON value and returns its text without surrounding whitespace.
pub fn json_value_text(body: &[u8]) -> Result<String, ApiError> {
    let raw: &serde_json::value::RawValue = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}"))
    })?;
    Ok(raw.get().to_string())
}

/// Parses the query string: anything unparseable is 400 `invalid_parameter`, as is a value
/// that is not UTF-8 once percent-decoded (the parser would quietly make it U+FFFD).
pub fn query<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    let raw = req.query_string();
    // Parameters split at ASCII bytes only, so the whole string decodes iff each value does.
    if percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .is_err()
    {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "query parameters must be UTF-8 once percent-decoded",
        ));
    }
    web::Query::<T>::from_query(raw)
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::bad_request("invalid_parameter", e.to_string()))
}

fn header<'a>(
    req: &'a HttpRequest,
    name: &str,
    code: &'static str,
) -> Result<Option<&'a str>, ApiError> {
    match req.headers().get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad_request(code, format!("{name} must be ASCII"))),
    }
}

/// The causal context from `X-Meridian-Context`, if sent.
pub fn context(req: &HttpRequest) -> Result<Option<VClock<Actor>>, ApiError> {
    header(req, CONTEXT_HEADER, "invalid_context")?
        .map(|token| {
            decode_context(token).map_err(|_| {
                ApiError::bad_request(
                    "invalid_context",
                    "X-Meridian-Context is not a context this service issued",
                )
            })
        })
        .transpose()
}

/// The session token from `X-Meridian-Session` (empty when not sent).
pub fn session(req: &HttpRequest) -> Result<SessionToken, ApiError> {
    match header(req, SESSION_HEADER, "invalid_session")? {
        None => Ok(SessionToken::default()),
        Some(token) => SessionToken::decode(token).map_err(|_| {
            ApiError::bad_request(
                "invalid_session",
                "X-Meridian-Session is not a session token this service issued",
            )
        }),
    }
}

/// A forwarded write's deadline to start applying (Unix ms), if the forwarder sent one.
pub fn apply_by(req: &HttpRequest) -> Result<Option<u64>, ApiError> {
    header(req, APPLY_BY_HEADER, "invalid_parameter")?
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::bad_request("invalid_parameter", "X-Meridian-Apply-By must be Unix ms")
            })
        })
        .transpose()
}

/// The `Idempotency-Key` as a u128, if sent.
pub fn idempotency_key(req: &HttpRequest) -> Result<Option<u128>, ApiError> {
    header(req, IDEMPOTENCY_HEADER, "invalid_idempotency_key")?
        .map(|v| {
            uuid::Uuid::parse_str(v.trim())
                .map(|u| u.as_u128())
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_idempotency_key",
                        "Idempotency-Key must be a UUID",
                    )
                })
        })
        .transpose()
}

/// Read consistency levels (`?consistency=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadConsistency {
    /// This region's committed state.
    #[default]
    Local,
    /// The key's home region.
    Home,
    /// Read-your-writes and monotonic reads from the session token.
    Session,
    /// A majority of regions, merged.
    Quorum,
    /// Every region, merged.
    All,
}

/// Write acknowledgement levels (`?ack=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    /// Durable in the accepting region.
    #[default]
    Local,
    /// Durable in a majority of regions.
    Quorum,
    /// Durable in every region.
    All,
}

/// Query parameters of key reads (and listings).
#[derive(Debug, Default, Deserialize)]
pub struct ReadQuery {
    /// Requested consistency.
    #[serde(default)]
    pub consistency: ReadConsistency,
    /// A write's parameter: present, it fails the parse, since ignoring it would leave the
    /// client believing it asked for something.
    #[serde(default, deserialize_with = "reads_take_consistency")]
    pub ack: (),
}

/// Query parameters of key writes.
#[derive(Debug, Default, Deserialize)]
pub struct WriteQuery {
    /// Requested acknowledgement.
    #[serde(default)]
    pub ack: Ack,
    /// A read's parameter: present, it fails the parse, like `ack` on a read.
    #[serde(default, deserialize_with = "writes_take_ack")]
    pub consistency: (),
}

fn reads_take_consistency<'de, D: serde::Deserializer<'de>>(_: D) -> Result<(), D::Error> {
    Err(serde::de::Error::custom(
        "ack applies to writes; a read takes consistency=local|home|session|quorum|all",
    ))
}

fn writes_take_ack<'de, D: serde::Deserializer<'de>>(_: D) -> Result<(), D::Error> {
    Err(serde::de::Error::custom(
        "consistency applies to reads; a write takes ack=local|quorum|all",
    ))
}
