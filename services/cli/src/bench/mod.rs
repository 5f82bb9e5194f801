//! `bench`: a closed-loop load generator built to spend little CPU per request, since it
//! shares the machine with the server it measures.
//!
//! Steps: resolve targets, make sure the bucket exists, preload keys for GETs, then run one
//! worker per connection for warmup + duration and merge their histograms.

pub mod keys;
pub mod paths;
pub mod report;
pub mod stats;
pub mod worker;

use crate::args::{BenchArgs, Workload};
use crate::client::{build_url, ApiClient, Call};
use crate::commands::write_stdout;
use crate::error::CliError;
use bytes::Bytes;
use hyper::header::HeaderValue;
use keys::KeySpace;
use paths::PathTable;
use report::{BenchReport, RunShape};
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
/// How long to wait for peers to have the preloaded keys.
const REPLICATION_WAIT: Duration = Duration::from_secs(10);
/// Time after the end for the last answers to arrive before workers are abandoned.
const GRACE: Duration = Duration::from_secs(5);
/// Key whose arrival at a peer shows the preload has replicated there.
const PRELOAD_MARKER_KEY: &str = "preload-marker";

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
    let targets =
        resolve_targets(&urls, &args.bucket, args.keys, preload_count.unwrap_or(0)).await?;
    let requests = Arc::new(Requests {
        workload: args.workload,
        put_keys: key_space(args.keys, args.hot),
        get_keys: key_space(preload_count.unwrap_or(1), args.hot),
        value: json_string_value(args.value_size as usize),
        auth: bearer(token.as_deref())?,
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
        println!(
            "filled {} keys into {} in {secs:.1} s ({:.0} writes/s)",
            args.keys,
            urls[0],
            args.keys as f64 / secs.max(1e-9)
        );
        return Ok(());
    }
    if let Some(count) = preload_count {
        note(&args, format!("preloading {count} keys into {}", urls[0]));
        preload(&targets[0], &requests, count, PRELOAD_CONNECTIONS).await?;
        if clients.len() > 1 {
            wait_for_replication(&clients, &args.bucket).await?;
        }
    }

    note(
        &args,
        format!(
            "running {} for {:.3} s after {:.3} s warmup with {} connections",
            args.workload.as_str(),
            args.duration.as_secs_f64(),
            args.warmup.as_secs_f64(),
            args.concurrency
        ),
    );
    let timing = Timing::starting_now(args.warmup, args.duration, GRACE);
    let handles: Vec<_> = (0..u64::from(args.concurrency))
        .map(|id| {
            // Round-robin by worker spreads connections evenly over the regions.
            let target = Arc::clone(&targets[(id % targets.len() as u64) as usize]);
            tokio::spawn(worker::run_worker(
                id,
                target,
                Arc::clone(&requests),
                timing,
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
    let measured = total
        .last_done
        .map(|last| last.saturating_duration_since(timing.measure_start));

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

/// Resolves each URL once and pre-builds its paths; URLs with the same path share tables.
async fn resolve_targets(
    urls: &[Url],
    bucket: &str,
    keys: u64,
    preload_count: u64,
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
        let host_header = HeaderValue::from_str(&authority)
            .map_err(|_| CliError::Usage(format!("{url}: host is not a valid header value")))?;

        // "" as the last segment leaves the trailing slash the key is appended to.
        let segments = ["v1", "kv", bucket, ""].map(str::to_owned);
        let prefix = build_url(url, &segments, &[])?.path().to_owned();
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
            host: host_header,
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
) -> Result<(), CliError> {
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
    for handle in handles {
        handle
            .await
            .map_err(|e| CliError::Failed(format!("a preload task failed: {e}")))?
            .map_err(|e| CliError::Failed(format!("preload failed: {e}")))?;
    }
    Ok(())
}

/// Writes a marker after the preload and waits until every peer can read it.
///
/// Regions replicate their log in order, so a peer that has the marker has every preloaded key
/// before it; without this wait, early GETs on peers would count as 404 errors.
async fn wait_for_replication(clients: &[ApiClient], bucket: &str) -> Result<(), CliError> {
    let Some((primary, peers)) = clients.split_first() else {
        return Ok(());
    };
    let stamp = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(&json!(stamp))
        .map_err(|e| CliError::Failed(format!("cannot encode the marker: {e}")))?;
    primary
        .send(Call::new(Method::PUT, &["v1", "kv", bucket, PRELOAD_MARKER_KEY]).json(body))
        .await?;
    let deadline = Instant::now() + REPLICATION_WAIT;
    for peer in peers {
        loop {
            let read = peer
                .send(Call::new(
                    Method::GET,
                    &["v1", "kv", bucket, PRELOAD_MARKER_KEY],
                ))
                .await;
            let arrived = match &read {
                Ok(response) => serde_json::from_slice::<Value>(&response.body)
                    .ok()
                    .and_then(|v| v.get("values").and_then(Value::as_array).cloned())
                    .is_some_and(|values| values.iter().any(|v| v.as_str() == Some(&stamp))),
                Err(CliError::Api { status: 404, .. }) => false,
                Err(CliError::Unreachable(_)) => return read.map(|_| ()),
                Err(_) => false,
            };
            if arrived {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "warning: a peer has not received the preloaded keys after {REPLICATION_WAIT:?}; early GETs there may fail"
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
    fn bearer_header_refuses_bad_tokens() {
        assert!(bearer(None).expect("ok").is_none());
        assert_eq!(
            bearer(Some("abc")).expect("ok").expect("some"),
            HeaderValue::from_static("Bearer abc")
        );
        assert!(bearer(Some("a\nb")).is_err());
    }
}
