//! One bench worker: one HTTP/1.1 connection, one request in flight, until the deadline.
//!
//! Everything a request needs is built before the run (paths, body bytes, header values), so
//! the loop costs a key pick, a `Request` assembly and hyper's own work.

use super::keys::{KeySpace, XorShift64};
use super::paths::PathTable;
use super::stats::BenchStats;
use crate::args::Workload;
use crate::error::describe;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use meridian_shared::session::SessionToken;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Longest wait for one TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A worker that fails to connect this many times in a row stops early.
const MAX_CONSECUTIVE_CONNECT_FAILURES: u32 = 20;
/// Ceiling of the pause between reconnect attempts.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// Reconnects a preloading connection may need before the preload gives up.
const PRELOAD_RECONNECTS: u32 = 3;

/// One region the bench sends to, with its pre-built request paths.
#[derive(Debug)]
pub struct Target {
    /// The base URL as given, for reports.
    pub url: String,
    /// Resolved once up front so reconnects do no DNS.
    pub addr: SocketAddr,
    /// `Host` header value (`host:port`).
    pub host: HeaderValue,
    /// PUT paths for every key of the key space.
    pub put_paths: Arc<PathTable>,
    /// GET paths for the preloaded keys.
    pub get_paths: Arc<PathTable>,
}

/// What every worker sends, shared read-only.
#[derive(Debug)]
pub struct Requests {
    /// Operation mix.
    pub workload: Workload,
    /// Keys PUTs go to.
    pub put_keys: KeySpace,
    /// Keys GETs read (the preloaded range).
    pub get_keys: KeySpace,
    /// The PUT body, shared by every request.
    pub value: Bytes,
    /// `Authorization` header value, when a token was given.
    pub auth: Option<HeaderValue>,
}

/// When the run measures and when it stops.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Operations started before this are warmup and not counted.
    pub measure_start: Instant,
    /// No operation starts after this.
    pub end: Instant,
    /// Workers still waiting on an answer at this point are abandoned.
    pub hard_deadline: Instant,
}

impl Timing {
    /// Warmup from now, then `duration` measured, then `grace` for the last answers.
    pub fn starting_now(warmup: Duration, duration: Duration, grace: Duration) -> Self {
        let measure_start = Instant::now() + warmup;
        let end = measure_start + duration;
        Timing {
            measure_start,
            end,
            hard_deadline: end + grace,
        }
    }
}

/// The kind of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
}

/// How an exchange ended when the connection survived it.
enum Answer {
    /// 2xx, with the session token that covers it.
    Success(Option<HeaderValue>),
    Failure {
        status: StatusCode,
        body: Bytes,
    },
}

/// The response header carrying the session token.
const SESSION_HEADER: &str = "x-meridian-session";

type Sender = SendRequest<Full<Bytes>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs worker `id` against `target` until `timing.end` and returns what it counted.
pub async fn run_worker(
    id: u64,
    target: Arc<Target>,
    requests: Arc<Requests>,
    timing: Timing,
) -> BenchStats {
    let mut stats = BenchStats::new();
    let mut in_flight = false;
    let drive = drive(id, &target, &requests, timing, &mut stats, &mut in_flight);
    // The hard deadline bounds a server that stops answering; the loop bounds everything else.
    let finished = tokio::time::timeout_at(timing.hard_deadline.into(), drive).await;
    if finished.is_err() && in_flight {
        stats.timeouts += 1;
        if stats.first_error.is_none() {
            stats.first_error = Some(format!("no answer from {} by the deadline", target.url));
        }
    }
    stats
}

async fn drive(
    id: u64,
    target: &Target,
    requests: &Requests,
    timing: Timing,
    stats: &mut BenchStats,
    in_flight: &mut bool,
) {
    let mut rng = XorShift64::seeded(id);
    let mut sender: Option<Sender> = None;
    let mut connect_failures = 0u32;
    loop {
        if Instant::now() >= timing.end {
            return;
        }
        // A server may close an idle or `Connection: close` connection; that is no error.
        if sender.as_ref().is_some_and(Sender::is_closed) {
            sender = None;
        }
        let connection = match sender.as_mut() {
            Some(connection) => connection,
            None => {
                *in_flight = true;
                let connected = connect(target).await;
                *in_flight = false;
                match connected {
                    Ok(connection) => {
                        connect_failures = 0;
                        sender.insert(connection)
                    }
                    Err(e) => {
                        if Instant::now() >= timing.measure_start {
                            stats.record_connection_error(|| {
                                format!("connect to {}: {}", target.url, describe(e.as_ref()))
                            });
                        }
                        connect_failures += 1;
                        if connect_failures >= MAX_CONSECUTIVE_CONNECT_FAILURES {
                            return;
                        }
                        let pause =
                            (Duration::from_millis(10) * connect_failures).min(MAX_RECONNECT_PAUSE);
                        let wake = (Instant::now() + pause).min(timing.end);
                        tokio::time::sleep_until(wake.into()).await;
                        continue;
                    }
                }
            }
        };

        let op = match requests.workload {
            Workload::Put => Op::Put,
            Workload::Get => Op::Get,
            Workload::Mixed if rng.coin() => Op::Put,
            Workload::Mixed => Op::Get,
        };
        let Some(request) = build_request(target, requests, op, &mut rng) else {
            // Paths were validated when built, so this means a bug, not a server problem.
            stats.record_connection_error(|| "request path out of range".to_owned());
            return;
        };

        let start = Instant::now();
        *in_flight = true;
        let result = exchange(connection, request, false).await;
        *in_flight = false;
        let done = Instant::now();
        let measured = start >= timing.measure_start;
        match result {
            Ok(Answer::Success(_)) if measured => stats.record_ok(done - start, done),
            Ok(Answer::Failure { status, body }) if measured => {
                stats.record_http_error(status.as_u16(), done, || {
                    describe_failure(&target.url, status, &body)
                });
            }
            Ok(_) => {}
            Err(e) => {
                sender = None;
                if measured {
                    stats.record_connection_error(|| {
                        format!("request to {}: {}", target.url, describe(&e))
                    });
                }
            }
        }
    }
}

/// Writes `keys` with PUTs over one connection to `target`; stops at the first error answer.
/// Returns the session token that covers every write.
pub async fn preload(
    target: Arc<Target>,
    requests: Arc<Requests>,
    keys: Vec<u64>,
) -> Result<SessionToken, String> {
    let mut sender: Option<Sender> = None;
    let mut reconnects = 0u32;
    let mut covers = SessionToken::default();
    for key in keys {
        loop {
            let connection =
                match sender.as_mut().filter(|s| !s.is_closed()) {
                    Some(connection) => connection,
                    None => sender.insert(connect(&target).await.map_err(|e| {
                        format!("connect to {}: {}", target.url, describe(e.as_ref()))
                    })?),
                };
            let request = put_request(&target, &requests, key)
                .ok_or_else(|| format!("no request path for key k{key}"))?;
            match exchange(connection, request, true).await {
                Ok(Answer::Success(session)) => {
                    let token = session
                        .as_ref()
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| SessionToken::decode(v).ok());
                    if let Some(token) = token {
                        covers.merge(&token);
                    }
                    break;
                }
                Ok(Answer::Failure { status, body }) => {
                    return Err(describe_failure(&target.url, status, &body))
                }
                Err(e) if reconnects < PRELOAD_RECONNECTS => {
                    reconnects += 1;
                    sender = None;
                    eprintln!(
                        "warning: preload to {}: {}; reconnecting",
                        target.url,
                        describe(&e)
                    );
                }
                Err(e) => return Err(format!("request to {}: {}", target.url, describe(&e))),
            }
        }
    }
    Ok(covers)
}

/// Opens one HTTP/1.1 connection and drives it on its own task.
async fn connect(target: &Target) -> Result<Sender, BoxError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.addr))
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))??;
    // Requests are small and sequential: waiting for Nagle would add latency to every one.
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Its errors surface on the sender as failed requests, where they are counted.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole answer so the connection can carry the next; keeps
/// the session token if `want_session` (the measured loop does not pay for the lookup).
async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
    want_session: bool,
) -> Result<Answer, hyper::Error> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let session = want_session
        .then(|| response.headers().get(SESSION_HEADER).cloned())
        .flatten();
    let mut body = response.into_body();
    if status.is_success() {
        // Drain without collecting: success bodies are not needed.
        while let Some(frame) = body.frame().await {
            frame?;
        }
        Ok(Answer::Success(session))
    } else {
        let body = body.collect().await?.to_bytes();
        Ok(Answer::Failure { status, body })
    }
}

fn build_request(
    target: &Target,
    requests: &Requests,
    op: Op,
    rng: &mut XorShift64,
) -> Option<Request<Full<Bytes>>> {
    match op {
        Op::Put => put_request(target, requests, requests.put_keys.pick(rng)),
        Op::Get => {
            let uri = target.get_paths.uri(requests.get_keys.pick(rng))?;
            let mut request = Request::new(Full::new(Bytes::new()));
            *request.uri_mut() = uri;
            add_common_headers(&mut request, target, requests);
            Some(request)
        }
    }
}

fn put_request(target: &Target, requests: &Requests, key: u64) -> Option<Request<Full<Bytes>>> {
    let uri = target.put_paths.uri(key)?;
    let mut request = Request::new(Full::new(requests.value.clone()));
    *request.method_mut() = Method::PUT;
    *request.uri_mut() = uri;
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    add_common_headers(&mut request, target, requests);
    Some(request)
}

fn add_common_headers(request: &mut Request<Full<Bytes>>, target: &Target, requests: &Requests) {
    let headers = request.headers_mut();
    // hyper's low-level client does not add Host; HTTP/1.1 requires it.
    headers.insert(HOST, target.host.clone());
    if let Some(auth) = &requests.auth {
        headers.insert(AUTHORIZATION, auth.clone());
    }
}

/// `http://...: unavailable: overloaded (HTTP 503)`, from the contract's error body if any.
fn describe_failure(url: &str, status: StatusCode, body: &[u8]) -> String {
    format!("{url}: {}", crate::client::api_error(status, body))
}
