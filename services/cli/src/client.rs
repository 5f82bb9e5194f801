//! A thin reqwest client for the one-shot commands: builds URLs, sends, maps errors to the contract.

use crate::error::{describe, CliError};
use bytes::Bytes;
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use std::time::Duration;

/// Response headers worth showing with `-v`.
const VERBOSE_HEADERS: [&str; 6] = [
    "x-meridian-region",
    "x-meridian-home",
    "x-meridian-failover",
    "x-meridian-session",
    "idempotency-replayed",
    "retry-after",
];

/// One request to the public API, described before it is sent.
#[derive(Debug)]
pub struct Call {
    method: Method,
    segments: Vec<String>,
    query: Vec<(&'static str, String)>,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

impl Call {
    /// A request for the path made of `segments`, each percent-encoded as one segment.
    pub fn new(method: Method, segments: &[&str]) -> Self {
        Call {
            method,
            segments: segments.iter().map(|s| (*s).to_owned()).collect(),
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// Adds `name=value` to the query string when `value` is present.
    pub fn query(mut self, name: &'static str, value: Option<impl ToString>) -> Self {
        if let Some(value) = value {
            self.query.push((name, value.to_string()));
        }
        self
    }

    /// Adds a request header when `value` is present.
    pub fn header(mut self, name: &'static str, value: Option<impl ToString>) -> Self {
        if let Some(value) = value {
            self.headers.push((name, value.to_string()));
        }
        self
    }

    /// Sets a JSON body.
    pub fn json(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }
}

/// A successful (2xx) answer.
#[derive(Debug)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Raw body bytes (JSON by contract).
    pub body: Bytes,
}

/// Sends [`Call`]s to one region.
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    session: Option<String>,
    verbose: bool,
}

impl ApiClient {
    /// A client for the region at `base`.
    pub fn new(
        base: Url,
        token: Option<String>,
        session: Option<String>,
        timeout: Duration,
        verbose: bool,
    ) -> Result<Self, CliError> {
        for (flag, value) in [("--token", &token), ("--session", &session)] {
            let text = value.as_deref().unwrap_or_default();
            if reqwest::header::HeaderValue::from_str(text).is_err() {
                return Err(CliError::Usage(format!(
                    "{flag} contains characters not allowed in a header"
                )));
            }
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| {
                CliError::Failed(format!("cannot build the HTTP client: {}", describe(&e)))
            })?;
        Ok(ApiClient {
            http,
            base,
            token,
            session,
            verbose,
        })
    }

    /// The full URL of `call`: base URL path, then the segments, then the query.
    pub fn url(&self, call: &Call) -> Result<Url, CliError> {
        build_url(&self.base, &call.segments, &call.query)
    }

    /// Sends `call`; any non-2xx answer becomes [`CliError::Api`].
    pub async fn send(&self, call: Call) -> Result<ApiResponse, CliError> {
        let url = self.url(&call)?;
        let mut request = self.http.request(call.method, url);
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(session) = &self.session {
            request = request.header("x-meridian-session", session);
        }
        for (name, value) in call.headers {
            request = request.header(name, value);
        }
        if let Some(body) = call.body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let response = request.send().await.map_err(transport_error)?;
        let status = response.status();
        if self.verbose {
            eprint!("{}", verbose_lines(status, response.headers()));
        }
        let body = response.bytes().await.map_err(transport_error)?;
        if status.is_success() {
            Ok(ApiResponse { status, body })
        } else {
            Err(api_error(status, &body))
        }
    }
}

/// Appends percent-encoded `segments` and a query to `base`.
pub fn build_url(
    base: &Url,
    segments: &[String],
    query: &[(&'static str, String)],
) -> Result<Url, CliError> {
    // Names are checked by the contract's rules before anything is sent: URL building drops
    // `.` and `..` (path steps) and an empty segment names another route, so the request
    // would act on something else than was named.
    for segment in segments {
        meridian_shared::names::validate(segment).map_err(|why| {
            CliError::Usage(format!("{segment:?} cannot be a bucket or key name: {why}"))
        })?;
    }
    let mut url = base.clone();
    {
        let mut path = url
            .path_segments_mut()
            .map_err(|()| CliError::Usage(format!("{base} cannot be used as a base URL")))?;
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        let mut pairs = url.query_pairs_mut();
        for (name, value) in query {
            pairs.append_pair(name, value);
        }
    }
    Ok(url)
}

/// Connection failures and timeouts mean "unreachable" (exit 3); the rest is a plain failure.
fn transport_error(error: reqwest::Error) -> CliError {
    let text = describe(&error);
    if error.is_connect() || error.is_timeout() || error.is_request() {
        CliError::Unreachable(text)
    } else {
        CliError::Failed(text)
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// Reads the contract's `{"error": {"code", "message"}}`; tolerates other bodies (e.g. a proxy's).
pub fn api_error(status: StatusCode, body: &[u8]) -> CliError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => CliError::Api {
            status: status.as_u16(),
            code: parsed.error.code,
            message: parsed.error.message,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let message = if text.is_empty() {
                status.canonical_reason().unwrap_or("no body").to_owned()
            } else {
                text.chars().take(500).collect()
            };
            CliError::Api {
                status: status.as_u16(),
                code: "unexpected_response".to_owned(),
                message,
            }
        }
    }
}

/// The `-v` lines: status, then the interesting response headers.
fn verbose_lines(status: StatusCode, headers: &HeaderMap) -> String {
    let mut out = format!("< HTTP {status}\n");
    for name in VERBOSE_HEADERS {
        for value in headers.get_all(name) {
            out.push_str(&format!(
                "< {name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn base(text: &str) -> Url {
        Url::parse(text).expect("valid test URL")
    }

    #[test]
    fn urls_percent_encode_each_segment_and_query() {
        let call = Call::new(Method::GET, &["v1", "kv", "my bucket", "ü?#%"])
            .query("prefix", Some("a b&c"))
            .query("limit", None::<u32>)
            .query("after", Some("k1"));
        let url = build_url(&base("http://h:1"), &call.segments, &call.query).expect("url");
        assert_eq!(
            url.as_str(),
            "http://h:1/v1/kv/my%20bucket/%C3%BC%3F%23%25?prefix=a+b%26c&after=k1"
        );
    }

    #[test]
    fn names_that_url_building_would_drop_are_refused() {
        for name in ["", ".", ".."] {
            let segments = vec![
                "v1".to_owned(),
                "kv".to_owned(),
                "b".to_owned(),
                name.into(),
            ];
            let built = build_url(&base("http://h:1"), &segments, &[]);
            assert!(
                matches!(built, Err(CliError::Usage(_))),
                "{name:?}: {built:?}"
            );
        }
    }

    #[test]
    fn urls_keep_a_base_path() {
        let segments = vec!["v1".to_owned(), "cluster".to_owned()];
        for b in ["http://h:1/meridian", "http://h:1/meridian/"] {
            let url = build_url(&base(b), &segments, &[]).expect("url");
            assert_eq!(url.as_str(), "http://h:1/meridian/v1/cluster");
        }
    }

    #[test]
    fn error_bodies_follow_the_contract() {
        let body = br#"{"error": {"code": "type_mismatch", "message": "bucket c is a counter"}}"#;
        let err = api_error(StatusCode::CONFLICT, body);
        assert_eq!(
            err.to_string(),
            "type_mismatch: bucket c is a counter (HTTP 409)"
        );
        let err = api_error(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(
            err.to_string(),
            "unexpected_response: Bad Gateway (HTTP 502)"
        );
        let err = api_error(StatusCode::NOT_FOUND, b"nope\n");
        assert_eq!(err.to_string(), "unexpected_response: nope (HTTP 404)");
    }

    #[test]
    fn verbose_shows_meridian_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-meridian-region", HeaderValue::from_static("eu-west"));
        headers.insert("x-meridian-failover", HeaderValue::from_static("true"));
        headers.insert("content-length", HeaderValue::from_static("2"));
        let text = verbose_lines(StatusCode::OK, &headers);
        assert_eq!(
            text,
            "< HTTP 200 OK\n< x-meridian-region: eu-west\n< x-meridian-failover: true\n"
        );
    }
}
