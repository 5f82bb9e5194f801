//! One bench worker: one HTTP/1.1 connection, one request in flight, until the deadline.
//!
//! Everything a request needs is built before the run (paths, header lines, body bytes), so
//! the loop costs a key pick, one buffer assembly and the connection's own work (see `conn`).

use super::conn::{Answer, Connection, Keep, Method};
use super::keys::{KeySpace, XorShift64};
use super::pace::Pace;
use super::paths::PathTable;
use super::stats::BenchStats;
use crate::args::Workload;
use crate::error::describe;
use bytes::Bytes;
use meridian_shared::session::SessionToken;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A worker that fails to connect this many times in a row stops early.
const MAX_CONSECUTIVE_CONNECT_FAILURES: u32 = 20;
/// Ceiling of the pause between reconnect attempts.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// A connection idle longer than this is reopened rather than reused: the region closes idle
/// connections after 5 s (actix-web's default keep-alive), and a request sent as it does so
/// would fail.
const IDLE_REUSE_LIMIT: Duration = Duration::from_secs(4);
/// Reconnects a preloading connection may need before the preload gives up.
const PRELOAD_RECONNECTS: u32 = 3;

/// One region the bench sends to, with its pre-built request paths.
#[derive(Debug)]
pub struct Target {
    /// The base URL as given, for reports.
    pub url: String,
    /// Resolved once up front so reconnects do no DNS.
    pub addr: SocketAddr,
    /// Header lines every request to it carries (`Host`, `Authorization`), CRLF-terminated.
    pub headers: Vec<u8>,
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
    /// What follows a PUT's common header lines: its content headers, the blank line and the
    /// body, the same for every request.
    pub put_tail: Bytes,
}

/// When the run measures and when it stops.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When the warmup starts.
    pub start: Instant,
    /// Operations started before this are warmup and not counted.
    pub measure_start: Instant,
    /// No operation starts after this.
    pub end: Instant,
    /// Workers still waiting on an answer at this point are abandoned.
    pub hard_deadline: Instant,
    /// Longest one request waits for its answer (`--timeout`): then it counts as a timeout
    /// and its connection is dropped.
    pub request_timeout: Duration,
}

impl Timing {
    /// Warmup from now, then `duration` measured, then `grace` for the last answers; each
    /// request waits at most `request_timeout`.
    pub fn starting_now(
        warmup: Duration,
        duration: Duration,
        grace: Duration,
        request_timeout: Duration,
    ) -> Self {
        let start = Instant::now();
        let measure_start = start + warmup;
        let end = measure_start + duration;
        Timing {
            start,
            measure_start,
            end,
            hard_deadline: end + grace,
            request_timeout,
        }
    }
}

/// Runs worker `id` against `target` until `timing.end` and returns what it counted: as fast
/// as answers come, or on the schedule of `pace`.
pub async fn run_worker(
    id: u64,
    target: Arc<Target>,
    requests: Arc<Requests>,
    timing: Timing,
    pace: Option<Pace>,
) -> BenchStats {
    let mut stats = BenchStats::new();
    let mut in_flight = false;
    let drive = drive(
        id,
        &target,
        &requests,
        timing,
        pace,
        &mut stats,
        &mut in_flight,
    );
    // The hard deadline bounds a server that stops answering; the loop bounds everything else.
    let finished = tokio::time::timeout_at(timing.hard_deadline.into(), drive).await;
    if finished.is_err() && in_flight {
        stats.record_timeout(|| format!("no answer from {} by the deadline", target.url));
    }
    stats
}

async fn drive(
    id: u64,
    target: &Target,
    requests: &Requests,
    timing: Timing,
    mut pace: Option<Pace>,
    stats: &mut BenchStats,
    in_flight: &mut bool,
) {
    let mut rng = XorShift64::seeded(id);
    let mut connection: Option<Connection> = None;
    let mut connect_failures = 0u32;
    let mut last_answer = Instant::now();
    loop {
        // Paced, the worker waits for the due time first; it stops only once the schedule
        // does, so requests due before the end are sent however late (the hard deadline
        // bounds that), and the due time decides whether a request is measured. The start
        // of its latency: see `latency_start`.
        let paced = match pace.as_mut() {
            Some(pace) => {
                let due = pace.next_due();
                if due >= timing.end {
                    return;
                }
                let late = Instant::now() >= due;
                tokio::time::sleep_until(due.into()).await;
                Some((due, late))
            }
            None if Instant::now() >= timing.end => return,
            None => None,
        };
        let counted_from = paced.map_or_else(Instant::now, |(due, _)| due);
        // A server may close a `Connection: close` connection, or one idle past its keep-alive
        // (only a slow schedule leaves one idle that long); neither is an error.
        if connection
            .as_ref()
            .is_some_and(|c| c.is_closed() || last_answer.elapsed() > IDLE_REUSE_LIMIT)
        {
            connection = None;
        }
        let open = match connection.as_mut() {
            Some(open) => open,
            None => {
                *in_flight = true;
                let connected = Connection::open(target.addr).await;
                *in_flight = false;
                match connected {
                    Ok(open) => {
                        connect_failures = 0;
                        connection.insert(open)
                    }
                    Err(e) => {
                        if counted_from >= timing.measure_start {
                            stats.record_connection_error(|| {
                                format!("connect to {}: {}", target.url, describe(&e))
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
            Workload::Put => Method::Put,
            Workload::Get => Method::Get,
            Workload::Mixed if rng.coin() => Method::Put,
            Workload::Mixed => Method::Get,
        };
        let (paths, keys) = match op {
            Method::Put => (&target.put_paths, &requests.put_keys),
            Method::Get => (&target.get_paths, &requests.get_keys),
        };
        let Some(path) = paths.path(keys.pick(&mut rng)) else {
            // Paths were validated when built, so this means a bug, not a server problem.
            stats.record_connection_error(|| "request path out of range".to_owned());
            return;
        };

        let start = latency_start(paced);
        *in_flight = true;
        let sent = send(open, target, requests, op, path, Keep::STATUS);
        let result = tokio::time::timeout(timing.request_timeout, sent).await;
        *in_flight = false;
        let done = Instant::now();
        last_answer = done;
        let measured = counted_from >= timing.measure_start;
        match result {
            Ok(Ok(answer)) if measured && answer.is_success() => {
                stats.record_ok(done - start, done)
            }
            Ok(Ok(answer)) if measured => {
                stats.record_http_error(answer.status, done, || {
                    describe_failure(&target.url, &answer)
                });
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                // The answer may still come: this connection cannot carry the next request.
                connection = None;
                if measured {
                    stats.record_timeout(|| {
                        format!(
                            "no answer from {} within {:?} (--timeout)",
                            target.url, timing.request_timeout
                        )
                    });
                }
            }
            Ok(Err(e)) => {
                connection = None;
                if measured {
                    stats.record_connection_error(|| {
                        format!("request to {}: {}", target.url, describe(&e))
                    });
                }
            }
        }
    }
}

/// Where a request's latency starts: when it is sent, unless it was sent late on its
/// schedule because earlier answers were late, when the server owes the wait since it was
/// due. A worker idle when its request was due woke by a timer that ticks in whole
/// milliseconds: that lateness is the timer's, not the server's.
fn latency_start(paced: Option<(Instant, bool)>) -> Instant {
    match paced {
        Some((due, true)) => due,
        _ => Instant::now(),
    }
}

/// Writes `keys` with PUTs over one connection to `target`; stops at the first error answer.
/// Returns the session token that covers every write.
pub async fn preload(
    target: Arc<Target>,
    requests: Arc<Requests>,
    keys: Vec<u64>,
) -> Result<SessionToken, String> {
    let mut connection: Option<Connection> = None;
    let mut reconnects = 0u32;
    let mut covers = SessionToken::default();
    let keep = Keep {
        session: true,
        body: false,
    };
    for key in keys {
        let path = target
            .put_paths
            .path(key)
            .ok_or_else(|| format!("no request path for key k{key}"))?;
        loop {
            let open = match connection.as_mut().filter(|c| !c.is_closed()) {
                Some(open) => open,
                None => connection.insert(
                    Connection::open(target.addr)
                        .await
                        .map_err(|e| format!("connect to {}: {}", target.url, describe(&e)))?,
                ),
            };
            match send(open, &target, &requests, Method::Put, path, keep).await {
                Ok(answer) if answer.is_success() => {
                    let token = answer
                        .session
                        .as_deref()
                        .and_then(|v| SessionToken::decode(v).ok());
                    if let Some(token) = token {
                        covers.merge(&token);
                    }
                    break;
                }
                Ok(answer) => return Err(describe_failure(&target.url, &answer)),
                Err(e) if reconnects < PRELOAD_RECONNECTS => {
                    reconnects += 1;
                    connection = None;
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

/// Sends one `method` request for `path` and reads its whole answer.
async fn send(
    connection: &mut Connection,
    target: &Target,
    requests: &Requests,
    method: Method,
    path: &[u8],
    keep: Keep,
) -> std::io::Result<Answer> {
    let tail: &[u8] = match method {
        Method::Put => &requests.put_tail,
        Method::Get => b"\r\n",
    };
    connection
        .exchange(method, path, &[&target.headers, tail], keep)
        .await
}

/// `http://...: unavailable: overloaded (HTTP 503)`, from the contract's error body if any.
fn describe_failure(url: &str, answer: &Answer) -> String {
    match reqwest::StatusCode::from_u16(answer.status) {
        Ok(status) => format!("{url}: {}", crate::client::api_error(status, &answer.body)),
        Err(_) => format!("{url}: answered with status {}", answer.status),
    }
}
