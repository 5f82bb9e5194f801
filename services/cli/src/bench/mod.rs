//! `bench`: a load generator built to spend little CPU per request, since it shares the
//! machine with the server it measures. Closed loop by default; open loop with `--rate`.
//!
//! Steps: resolve targets, make sure the bucket exists, preload keys for GETs, then run one
//! worker per connection for warmup + duration and merge their histograms.

pub mod conn;
pub mod keys;
pub mod pace;
pub mod paths;
pub mod report;
pub mod stats;
pub mod worker;

use crate::args::{BenchArgs, Workload};
use crate::client::{build_url, ApiClient, Call};
use crate::commands::write_stdout;
use crate::error::CliError;
use bytes::Bytes;
use keys::KeySpace;
use meridian_shared::session::SessionToken;
use pace::Pace;
use paths::PathTable;
use report::{BenchReport, RunShape};
use reqwest::header::HeaderValue;
use reqwest::{Method, Url};
use serde_json::{json, Value};
use stats::BenchStats;
use std::sync::Arc;
use std::time::{Duration, Instant};
use worker::{Requests, Target, Timing};

/// GET workloads read from this many keys at most, all written before the run.
pub const PRELOAD_LIMIT: u64 = 10_000;
/// Connections used to preload.
const PRELOAD_CONNECTIONS: u64 = 32;
/// How long to wait for every target to have the preloaded keys.
const REPLICATION_WAIT: Duration = Duration::from_secs(10);
/// Time after the end for the last answers to arrive before workers are abandoned.
const GRACE: Duration = Duration::from_secs(5);

/// Runs the bench and prints its report.
pub async fn run(
    url: Url,
    token: Option<String>,
    timeout: Duration,
    args: BenchArgs,
) -> Result<(), CliError> {
    let urls: Vec<Url> = std::iter::once(url)
        .chain(args.peer_urls.iter().cloned())
        .collect();
    let clients = urls
        .iter()
        .map(|u| ApiClient::new(u.clone(), token.clone(), None, timeout, false))
        .collect::<Result<Vec<_>, _>>()?;
    for client in &clients {
        ensure_bucket(client, &args.bucket).await?;
    }

    let preload_count = match args.workload {
        Workload::Put => None,
        Workload::Get | Workload::Mixed => Some(args.keys.min(PRELOAD_LIMIT)),
    };
    let auth = bearer(token.as_deref())?;
    let targets = resolve_targets(
        &urls,
        &args.bucket,
        args.keys,
        preload_count.unwrap_or(0),
        auth.as_ref(),
    )
    .await?;
    let requests = Arc::new(Requests {
        workload: args.workload,
        put_keys: key_space(args.keys, args.hot),
        get_keys: key_space(preload_count.unwrap_or(1), args.hot),
        put_tail: put_tail(&json_string_value(args.value_size as usize)),
    });

    if args.fill {
        let started = std::time::Instant::now();
        preload(
            &targets[0],
            &requests,
            args.keys,
            u64::from(args.concurrency),
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        let rate = args.keys as f64 / secs.max(1e-9);
        let text = if args.json {
            let report = json!({"filled": args.keys, "target": urls[0].as_str(),
                "duration_s": secs, "writes_per_sec": rate});
            format!("{report}\n")
        } else {
            format!(
                "filled {} keys into {} in {secs:.1} s ({rate:.0} writes/s)\n",
                args.keys, urls[0]
            )
        };
        return write_stdout(&text);
    }
    if let Some(count) = preload_count {
        note(&args, format!("preloading {count} keys into {}", urls[0]));
        let written = preload(&targets[0], &requests, count, PRELOAD_CONNECTIONS).await?;
        wait_until_applied(&clients, &written).await?;
    }

    let schedule = match args.rate {
        Some(rate) => format!(" at {rate} requests/s"),
        None => String::new(),
    };
    note(
        &args,
        format!(
            "running {}{schedule} for {:.3} s after {:.3} s warmup with {} connections",
            args.workload.as_str(),
            args.duration.as_secs_f64(),
            args.warmup.as_secs_f64(),
            args.concurrency
        ),
    );
    let timing = Timing::starting_now(args.warmup, args.duration, GRACE, timeout);
    let handles: Vec<_> = (0..u64::from(args.concurrency))
        .map(|id| {
            // Round-robin by worker spreads connections evenly over the regions.
            let target = Arc::clone(&targets[(id % targets.len() as u64) as usize]);
            let workers = u64::from(args.concurrency);
            let pace = args
                .rate
                .map(|rate| Pace::for_worker(rate, workers, id, timing.start));
            tokio::spawn(worker::run_worker(
                id,
                target,
                Arc::clone(&requests),
                timing,
                pace,
            ))
        })
        .collect();
    let mut total = BenchStats::new();
    for handle in handles {
        let stats = handle
            .await
            .map_err(|e| CliError::Failed(format!("a bench worker failed: {e}")))?;
        total.merge(&stats);
    }
    let last_answer = total
        .last_done
        .map(|last| last.saturating_duration_since(timing.measure_start));
    // Paced, the run lasts as scheduled: the last request is due up to one interval before
    // the end, so the last answer would understate it.
    let measured = match args.rate {
        Some(_) => Some(args.duration),
        None => last_answer,
    };

    let shape = RunShape {
        workload: args.workload.as_str(),
        concurrency: args.concurrency,
        threads: args.threads,
        targets: urls.iter().map(Url::to_string).collect(),
        value_size: args.value_size,
        keys: args.keys,
        hot: args.hot,
        preloaded_keys: preload_count,
        warmup: args.warmup,
        duration: args.duration,
        rate: args.rate,
    };
    let report = BenchReport::new(&shape, &total, measured);
    let text = if args.json {
        let mut line = serde_json::to_string(&report)
            .map_err(|e| CliError::Failed(format!("cannot encode the report: {e}")))?;
        line.push('\n');
        line
    } else {
        report.render_text()
    };
    write_stdout(&text)?;
    if report.ops == 0 {
        return Err(CliError::Failed(
            "no operation succeeded during the measured time".to_owned(),
        ));
    }
    // A last answer far short of --duration means the target stopped answering and the
    // figures describe only the start of the run. A paced run's last request may be due one
    // interval of the schedule before the end.
    let slack = args.rate.map_or(0.0, |rate| 1.0 / rate as f64);
    let answered_until = last_answer.unwrap_or_default().as_secs_f64();
    if answered_until < args.duration.as_secs_f64() * 0.9 - slack {
        return Err(CliError::Failed(format!(
            "the run ended early: no answer after {answered_until:.1} s of the {:.1} s measured",
            args.duration.as_secs_f64()
        )));
    }
    if let Some(rate) = args.rate {
        // Too few connections, or a server that cannot keep up: the schedule slipped.
        let answered = (report.ops + report.errors) as f64 / report.duration_s.max(1e-9);
        if answered < rate as f64 * 0.95 {
            eprintln!(
                "warning: {answered:.0} of the scheduled {rate} requests/s were answered; the region or --concurrency could not keep up"
            );
        }
    }
    if report.errors > 0 {
        eprintln!(
            "warning: {} of {} operations failed (see the errors line)",
            report.errors,
            report.errors + report.ops
        );
    }
    Ok(())
}

/// Progress notes go to stderr so stdout holds only the report.
fn note(args: &BenchArgs, text: String) {
    if !args.json {
        eprintln!("bench: {text}");
    }
}

fn key_space(count: u64, hot: bool) -> KeySpace {
    if hot {
        KeySpace::hot(count)
    } else {
        KeySpace::uniform(count)
    }
}

/// A JSON string exactly `size` bytes long, quotes included (`size >= 2`).
pub fn json_string_value(size: usize) -> Bytes {
    let inner = size.saturating_sub(2);
    let mut value = Vec::with_capacity(inner + 2);
    value.push(b'"');
    value.extend((0..inner).map(|i| b'a' + (i % 26) as u8));
    value.push(b'"');
    Bytes::from(value)
}

/// A PUT's content headers, the blank line and the body.
fn put_tail(value: &[u8]) -> Bytes {
    let mut tail = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        value.len()
    )
    .into_bytes();
    tail.extend_from_slice(value);
    Bytes::from(tail)
}

fn bearer(token: Option<&str>) -> Result<Option<HeaderValue>, CliError> {
    token
        .map(|t| {
            HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                CliError::Usage("--token contains characters not allowed in a header".to_owned())
            })
        })
        .transpose()
}

/// Creates the bench bucket as a register bucket; an existing register or lww bucket will do.
async fn ensure_bucket(client: &ApiClient, bucket: &str) -> Result<(), CliError> {
    let create =
        Call::new(Method::PUT, &["v1", "buckets", bucket]).json(br#"{"type":"register"}"#.to_vec());
    match client.send(create).await {
        Ok(_) => Ok(()),
        Err(CliError::Api { status: 409, .. }) => {
            let existing = client
                .send(Call::new(Method::GET, &["v1", "buckets", bucket]))
                .await?;
            let definition: Value = serde_json::from_slice(&existing.body).unwrap_or(Value::Null);
            match definition.get("type").and_then(Value::as_str) {
                Some("register" | "lww") => Ok(()),
                other => Err(CliError::Usage(format!(
                    "bucket {bucket:?} exists with type {}; the bench needs a register or lww bucket (use --bucket)",
                    other.unwrap_or("unknown")
                ))),
            }
        }
        Err(e) => Err(e),
    }
}

/// Resolves each URL once and pre-builds its paths and header lines; URLs with the same path
/// share tables.
async fn resolve_targets(
    urls: &[Url],
    bucket: &str,
    keys: u64,
    preload_count: u64,
    auth: Option<&HeaderValue>,
) -> Result<Vec<Arc<Target>>, CliError> {
    let mut tables: Vec<(String, Arc<PathTable>, Arc<PathTable>)> = Vec::new();
    let mut targets = Vec::with_capacity(urls.len());
    for url in urls {
        let host = url
            .host_str()
            .ok_or_else(|| CliError::Usage(format!("{url} has no host")))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| CliError::Unreachable(format!("cannot resolve {host}: {e}")))?
            .next()
            .ok_or_else(|| CliError::Unreachable(format!("{host} resolves to no address")))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        HeaderValue::from_str(&authority)
            .map_err(|_| CliError::Usage(format!("{url}: host is not a valid header value")))?;
        let mut headers = format!("Host: {authority}\r\n").into_bytes();
        if let Some(auth) = auth {
            headers.extend_from_slice(b"Authorization: ");
            headers.extend_from_slice(auth.as_bytes());
            headers.extend_from_slice(b"\r\n");
        }

        let segments = ["v1", "kv", bucket].map(str::to_owned);
        // The key is appended after this slash.
        let prefix = build_url(url, &segments, &[])?.path().to_owned() + "/";
        let (put_paths, get_paths) = match tables.iter().find(|(p, _, _)| *p == prefix) {
            Some((_, put, get)) => (Arc::clone(put), Arc::clone(get)),
            None => {
                let put = Arc::new(PathTable::build(&prefix, "", keys).map_err(CliError::Usage)?);
                let get = Arc::new(
                    PathTable::build(&prefix, "", preload_count).map_err(CliError::Usage)?,
                );
                tables.push((prefix, Arc::clone(&put), Arc::clone(&get)));
                (put, get)
            }
        };
        targets.push(Arc::new(Target {
            url: url.to_string(),
            addr,
            headers,
            put_paths,
            get_paths,
        }));
    }
    Ok(targets)
}

/// Writes keys `0..count` to `target` over several connections.
async fn preload(
    target: &Arc<Target>,
    requests: &Arc<Requests>,
    count: u64,
    connections: u64,
) -> Result<SessionToken, CliError> {
    let connections = connections.min(count).max(1);
    let handles: Vec<_> = (0..connections)
        .map(|c| {
            let keys: Vec<u64> = (c..count).step_by(connections as usize).collect();
            tokio::spawn(worker::preload(
                Arc::clone(target),
                Arc::clone(requests),
                keys,
            ))
        })
        .collect();
    let mut written = SessionToken::default();
    for handle in handles {
        let covers = handle
            .await
            .map_err(|e| CliError::Failed(format!("a preload task failed: {e}")))?
            .map_err(|e| CliError::Failed(format!("preload failed: {e}")))?;
        written.merge(&covers);
    }
    Ok(written)
}

/// Waits until every target has applied what the preload wrote (the session token of its
/// answers), as its `/v1/cluster` applied vector shows. The preload's writes go to each key's
/// home region, so even the target they were sent to may only have them once they replicate
/// back; without this wait, early GETs would count as 404 errors.
async fn wait_until_applied(clients: &[ApiClient], written: &SessionToken) -> Result<(), CliError> {
    let deadline = Instant::now() + REPLICATION_WAIT;
    for client in clients {
        loop {
            let view = client
                .send(Call::new(Method::GET, &["v1", "cluster"]))
                .await;
            let applied = match &view {
                Ok(response) => serde_json::from_slice::<Value>(&response.body)
                    .ok()
                    .and_then(|v| serde_json::from_value(v["applied"].clone()).ok()),
                Err(CliError::Unreachable(_)) => return view.map(|_| ()),
                Err(_) => None,
            };
            if applied.is_some_and(|applied| written.covered_by(&applied)) {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "warning: a target has not applied the preloaded keys after {REPLICATION_WAIT:?}; early GETs there may fail"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_strings_of_the_requested_size() {
        for size in [2usize, 3, 100, 4096] {
            let value = json_string_value(size);
            assert_eq!(value.len(), size);
            let parsed: Value = serde_json::from_slice(&value).expect("valid JSON");
            assert!(parsed.is_string());
        }
    }

    #[test]
    fn put_tail_announces_the_body_it_carries() {
        let tail = put_tail(b"\"abc\"");
        assert_eq!(
            &tail[..],
            &b"Content-Type: application/json\r\nContent-Length: 5\r\n\r\n\"abc\""[..]
        );
    }

    #[test]
    fn bearer_header_refuses_bad_tokens() {
        assert!(bearer(None).expect("ok").is_none());
        assert_eq!(
            bearer(Some("abc")).expect("ok").expect("some"),
            HeaderValue::from_static("Bearer abc")
        );
        assert!(bearer(Some("a\nb")).is_err());
    }
}
