//! Operations endpoints: health, readiness, metrics, OpenAPI, cluster status and client auth.

mod common;

use common::{assert_error, kv, Region, CLUSTER_ID};
use serde_json::{json, Value};

/// Per thread of process `pid`, the CPUs it may run on (`Cpus_allowed_list`).
fn thread_cpus(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
    tasks
        .filter_map(|task| {
            let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
            let line = status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))?;
            Some(
                line.trim_start_matches("Cpus_allowed_list:")
                    .trim()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn http_workers_are_pinned_one_per_cpu_only_when_they_match_the_cpus() {
    let cpus: Vec<String> = core_affinity::get_core_ids()
        .expect("allowed CPUs")
        .iter()
        .map(|c| c.id.to_string())
        .collect();
    let n = cpus.len();
    // The threads that may run on one CPU only (on a one-CPU machine, every thread may).
    let pinned = |region: &Region| {
        let said = region.log().contains("HTTP workers pinned one per CPU");
        let mut pinned: Vec<String> = thread_cpus(region.pid())
            .into_iter()
            .filter(|list| n >= 2 && cpus.contains(list))
            .collect();
        pinned.sort_by_key(|c| c.parse::<usize>().unwrap_or(usize::MAX));
        assert_eq!(said, !pinned.is_empty(), "the log says what was pinned");
        pinned
    };
    // As many workers as CPUs: one worker on each CPU (a single CPU is no reason to pin).
    let region = Region::start_with("ops-pin", &format!("workers = {n}")).await;
    let expected = if n >= 2 { cpus.clone() } else { Vec::new() };
    // Each worker pins itself as it starts; give the last one a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pinned(&region) != expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(pinned(&region), expected);
    drop(region);
    // One more worker than CPUs, or pinning switched off: no thread is pinned.
    let region = Region::start_with("ops-pin-more", &format!("workers = {}", n + 1)).await;
    assert_eq!(pinned(&region), Vec::<String>::new());
    drop(region);
    let region = Region::start_with(
        "ops-pin-off",
        &format!("workers = {n}\npin_workers = false"),
    )
    .await;
    assert_eq!(pinned(&region), Vec::<String>::new());
}

#[tokio::test]
async fn healthz_and_readyz_are_200() {
    let region = Region::start("ops-health").await;
    assert_eq!(region.get("/healthz").await.status, 200);
    assert_eq!(region.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn a_region_asking_its_peers_at_start_is_live_but_not_ready() {
    // A peer that accepts connections and never answers: the region asks it for the whole
    // wait before it serves.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let peer = silent.local_addr().expect("address");
    let config = format!("startup_peer_wait_ms = 4000\n[peers]\neu-west = \"http://{peer}\"\n");
    let mut region = Region::launch("us-east", &config, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let live_not_ready = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "never live:\n{}",
            region.log()
        );
        let live = region
            .client()
            .get(format!("{}/healthz", region.url()))
            .send()
            .await;
        let ready = region
            .client()
            .get(format!("{}/readyz", region.url()))
            .send()
            .await;
        match (live, ready) {
            (Ok(live), Ok(ready)) if live.status() == 200 => {
                break (
                    ready.status().as_u16(),
                    live.headers().contains_key("x-meridian-starting"),
                );
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    assert_eq!(live_not_ready, (503, true), "live, starting, not ready yet");
    region.wait_ready().await;
    assert_eq!(region.get("/healthz").await.status, 200);
}

/// One sample of the Prometheus text format: metric name, raw label text and value.
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// Parses the sample lines of a Prometheus text exposition (comments skipped). Label values
/// may contain spaces, braces and escaped quotes.
fn parse_samples(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = String::new();
        if rest.starts_with('{') {
            let mut in_quotes = false;
            let mut escaped = false;
            let mut end = None;
            for (i, c) in rest.char_indices() {
                if escaped {
                    escaped = false;
                } else if c == '\\' && in_quotes {
                    escaped = true;
                } else if c == '"' {
                    in_quotes = !in_quotes;
                } else if c == '}' && !in_quotes {
                    end = Some(i);
                    break;
                }
            }
            let end = end.unwrap_or_else(|| panic!("unterminated labels in {line:?}"));
            labels = rest[1..end].to_string();
            rest = &rest[end + 1..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|e| panic!("bad value {other:?} in {line:?}: {e}")),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// Total of the HTTP request counter: samples named `*http_requests*_total` (or, if the
/// exporter names it without the suffix, every `*http_requests*` sample that is not a gauge of
/// requests in flight).
fn requests_total(samples: &[Sample]) -> f64 {
    let counters: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name.contains("http_requests") && s.name.ends_with("_total"))
        .collect();
    if !counters.is_empty() {
        return counters.iter().map(|s| s.value).sum();
    }
    samples
        .iter()
        .filter(|s| s.name.contains("http_requests") && !s.name.contains("flight"))
        .map(|s| s.value)
        .sum()
}

/// Total observation count of the HTTP latency histogram (`*duration_seconds_count`, preferring
/// the families that mention `http`).
fn latency_count(samples: &[Sample]) -> f64 {
    let counts: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name.contains("duration_seconds") && s.name.ends_with("_count"))
        .collect();
    let http: Vec<&&Sample> = counts.iter().filter(|s| s.name.contains("http")).collect();
    if http.is_empty() {
        counts.iter().map(|s| s.value).sum()
    } else {
        http.iter().map(|s| s.value).sum()
    }
}

#[tokio::test]
async fn metrics_count_requests_and_their_latency() {
    let region = Region::start("ops-metrics").await;
    region.create_bucket("om-reg", "register").await;

    let first = region.get("/metrics").await;
    assert_eq!(first.status, 200);
    let content_type = first.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text format; got {content_type:?}"
    );
    let text = &first.text;
    assert!(
        text.lines().any(|l| l.starts_with("# TYPE")
            && l.contains("http_requests")
            && l.ends_with("counter")),
        "a counter family named *http_requests*:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("# TYPE")
            && l.contains("duration_seconds")
            && l.ends_with("histogram")),
        "a histogram family named *duration_seconds*:\n{text}"
    );
    let samples = parse_samples(text);
    assert!(
        samples
            .iter()
            .any(|s| s.name.contains("duration_seconds_bucket") && s.labels.contains("le=\"+Inf\"")),
        "histogram has a +Inf bucket:\n{text}"
    );
    let requests_before = requests_total(&samples);
    let latency_before = latency_count(&samples);

    for i in 0..10 {
        region
            .put(&kv("om-reg", &format!("k{i}")), &json!(i))
            .await
            .expect(200);
        region
            .get(&kv("om-reg", &format!("k{i}")))
            .await
            .expect(200);
    }

    let second = region.get("/metrics").await;
    assert_eq!(second.status, 200);
    let samples = parse_samples(&second.text);
    let requests_after = requests_total(&samples);
    let latency_after = latency_count(&samples);
    assert!(
        requests_after >= requests_before + 20.0,
        "request counter grew by at least the 20 requests made: {requests_before} -> \
         {requests_after}\n{}",
        second.text
    );
    assert!(
        latency_after >= latency_before + 20.0,
        "latency histogram count grew by at least 20: {latency_before} -> {latency_after}\n{}",
        second.text
    );
}

#[tokio::test]
async fn openapi_documents_every_public_route() {
    let region = Region::start("ops-openapi").await;
    let reply = region.get("/openapi.json").await;
    let doc = reply.expect(200);
    assert!(doc.is_object(), "valid JSON object; got {}", reply.text);
    let version = doc["openapi"].as_str().unwrap_or("");
    assert!(version.starts_with("3."), "openapi version {version:?}");
    let paths = doc["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("no paths object in {}", reply.text));
    let expected: [(&str, &[&str]); 12] = [
        ("/v1/buckets", &["get"]),
        ("/v1/buckets/{bucket}", &["put", "get"]),
        ("/v1/kv/{bucket}", &["get"]),
        ("/v1/kv/{bucket}/{key}", &["put", "get", "delete"]),
        ("/v1/kv/{bucket}/{key}/increment", &["post"]),
        ("/v1/kv/{bucket}/{key}/add", &["post"]),
        ("/v1/kv/{bucket}/{key}/remove", &["post"]),
        ("/v1/cluster", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/openapi.json", &["get"]),
    ];
    let documented: Vec<&String> = paths.keys().collect();
    // Code generators name a function after each operation: they must be unique.
    let mut operation_ids: Vec<&str> = paths
        .values()
        .filter_map(|item| item.as_object())
        .flat_map(|item| item.values())
        .filter_map(|operation| operation["operationId"].as_str())
        .collect();
    let operations = operation_ids.len();
    operation_ids.sort_unstable();
    operation_ids.dedup();
    assert_eq!(
        operation_ids.len(),
        operations,
        "duplicate operationIds in {paths:?}"
    );
    for (path, methods) in expected {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing; documented: {documented:?}"));
        for method in methods {
            assert!(
                item.get(*method).is_some(),
                "{method} {path} missing in {item}"
            );
        }
    }
}

#[tokio::test]
async fn cluster_status_shows_identity_and_a_growing_applied_vector() {
    let region = Region::start("ops-cluster").await;
    region.create_bucket("oc-cnt", "counter").await;

    let before = region.get("/v1/cluster").await;
    let body = before.expect(200).clone();
    assert_eq!(body["region"], json!("ops-cluster"));
    assert_eq!(body["cluster_id"], json!(CLUSTER_ID));
    assert!(body["regions"].is_array(), "regions is a list: {body}");
    assert!(body["applied"].is_object(), "applied is a map: {body}");
    let incarnation = body["incarnation"]
        .as_str()
        .unwrap_or_else(|| panic!("incarnation in {body}"))
        .to_string();
    uuid::Uuid::parse_str(&incarnation).expect("incarnation is a UUID");
    let applied_before = body["applied"][&incarnation].as_u64().unwrap_or(0);

    region
        .post(
            &format!("{}/increment", kv("oc-cnt", "n")),
            &json!({ "by": 1 }),
        )
        .await
        .expect(200);

    let after = region.get("/v1/cluster").await;
    let body: Value = after.expect(200).clone();
    let applied_after = body["applied"][&incarnation]
        .as_u64()
        .unwrap_or_else(|| panic!("applied[{incarnation}] is a number after a write: {body}"));
    assert!(
        applied_after > applied_before,
        "applied[{incarnation}] grows after a write: {applied_before} -> {applied_after}"
    );
    assert_eq!(body["incarnation"], json!(incarnation));
}

#[tokio::test]
async fn client_tokens_guard_v1_but_not_health() {
    let region = Region::start_with("ops-auth", "[security]\nclient_tokens = [\"s3cret\"]").await;
    let good = [("Authorization", "Bearer s3cret")];

    // Without or with a wrong token: 401 on every /v1 route.
    for headers in [
        &[][..],
        &[("Authorization", "Bearer nope")][..],
        &[("Authorization", "s3cret")][..],
        &[("Authorization", "Basic czNjcmV0")][..],
    ] {
        let reply = region.get_with("/v1/buckets", headers).await;
        assert_error(&reply, 401, "unauthorized");
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"meridian\""),
            "a 401 names the scheme (RFC 7235)"
        );
        let reply = region.get_with("/v1/cluster", headers).await;
        assert_error(&reply, 401, "unauthorized");
        let reply = region
            .put_with(
                "/v1/buckets/oa-reg",
                &json!({ "type": "register" }),
                headers,
            )
            .await;
        assert_error(&reply, 401, "unauthorized");
    }
    // Refused requests changed nothing.
    let reply = region.get_with("/v1/buckets", &good).await;
    assert_eq!(reply.expect(200), &json!({ "buckets": [] }));
    // The scheme is case-insensitive (RFC 7235); the token is not.
    let reply = region
        .get_with("/v1/buckets", &[("Authorization", "bearer s3cret")])
        .await;
    reply.expect(200);
    let reply = region
        .get_with("/v1/buckets", &[("Authorization", "Bearer S3CRET")])
        .await;
    assert_error(&reply, 401, "unauthorized");

    // With the token everything works.
    let reply = region
        .put_with("/v1/buckets/oa-reg", &json!({ "type": "register" }), &good)
        .await;
    reply.expect(201);
    let reply = region
        .put_with(&kv("oa-reg", "k"), &json!("guarded"), &good)
        .await;
    reply.expect(200);
    let reply = region.get_with(&kv("oa-reg", "k"), &good).await;
    assert_eq!(reply.expect(200)["values"], json!(["guarded"]));
    let reply = region.get_with("/v1/cluster", &good).await;
    assert_eq!(reply.expect(200)["region"], json!("ops-auth"));

    // Key routes need it too.
    let reply = region.get(&kv("oa-reg", "k")).await;
    assert_error(&reply, 401, "unauthorized");
    let reply = region.put(&kv("oa-reg", "k"), &json!("intruder")).await;
    assert_error(&reply, 401, "unauthorized");
    let reply = region.get_with(&kv("oa-reg", "k"), &good).await;
    assert_eq!(reply.expect(200)["values"], json!(["guarded"]));

    // Health stays open.
    assert_eq!(region.get("/healthz").await.status, 200);
    assert_eq!(region.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn a_port_in_use_is_a_plain_error_before_anything_opens() {
    let first = Region::start("us-east").await;
    let port = first
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port in the region's URL");
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = dir.path().join("data");
    let (status, log) = common::run_until_exit_on(
        port,
        "eu-west",
        &data,
        CLUSTER_ID,
        std::time::Duration::from_secs(20),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(log.contains("cannot listen on"), "{log}");
    // Before, storage and actors were started first and torn down with panics.
    assert!(!log.contains("panicked"), "{log}");
    assert!(!data.exists(), "no data directory is created: {log}");
    first.get("/readyz").await.expect(200);
}

#[tokio::test]
async fn refused_requests_do_not_write_a_log_line_each() {
    let region = Region::start("us-east").await;
    region.create_bucket("quiet", "register").await;
    for _ in 0..20 {
        let reply = region.get(&kv("quiet", "missing")).await;
        assert_error(&reply, 404, "key_not_found");
        let reply = region.get(&kv("nope", "missing")).await;
        assert_error(&reply, 404, "bucket_not_found");
    }
    // A 404 is an answer, not an incident: the request metrics count them.
    let log = region.log();
    assert!(
        !log.contains("key_not_found") && !log.contains("bucket_not_found"),
        "{log}"
    );
}
