//! One client write at a region that is not the key's home is one trace across all three
//! regions: accepting region → home (forward) → every replica (replication), exported over
//! OTLP/HTTP to a real receiver that decodes the protobuf.

mod common;
mod support;

use actix_web::{web, App, HttpResponse, HttpServer};
use common::kv;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{eventually, Cluster};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
/// The trace the test's own client starts (W3C ids, sampled).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One exported span, as the receiver decoded it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    links: Vec<(String, String)>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

async fn receive(body: web::Bytes, spans: web::Data<Spans>) -> HttpResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body.as_ref()) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut received = Vec::new();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.push(Span {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
    spans.lock().expect("spans").extend(received);
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .body(ExportTraceServiceResponse::default().encode_to_vec())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts an OTLP/HTTP receiver on its own thread; returns its base URL and what it received.
fn start_receiver() -> (String, Spans) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let spans: Spans = Arc::default();
    let shared = spans.clone();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(web::Data::new(shared.clone()))
                    .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                    .route("/v1/traces", web::post().to(receive))
            })
            .workers(1)
            .listen(listener)
            .expect("listen")
            .run();
            let _ = server.await;
        })
    });
    (url, spans)
}

fn of_trace(spans: &Spans) -> Vec<Span> {
    let spans = spans.lock().expect("spans");
    spans
        .iter()
        .filter(|s| s.trace_id == TRACE_ID)
        .cloned()
        .collect()
}

/// Whether the trace holds us-east's request span, the home's request span under the forward,
/// and each replica's request span under one of eu-west's two `replicate_send` spans.
fn outermost_spans_arrived(trace: &[Span]) -> bool {
    let named = |service: &str, name: &str| -> Vec<&Span> {
        trace
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    };
    let under = |service: &str, parents: &[&Span]| {
        trace
            .iter()
            .any(|s| s.service == service && parents.iter().any(|p| p.span_id == s.parent))
    };
    let forwards = named("meridian-us-east", "forward_to_home");
    let sends = named("meridian-eu-west", "replicate_send");
    trace
        .iter()
        .any(|s| s.service == "meridian-us-east" && s.parent == CLIENT_SPAN)
        && under("meridian-eu-west", &forwards)
        && sends.len() == 2
        && under("meridian-us-east", &sends)
        && under("meridian-ap-south", &sends)
}

#[tokio::test]
async fn a_write_at_a_non_home_region_is_one_trace_across_all_regions() {
    let (endpoint, spans) = start_receiver();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        // The test checks the trace's shape, not the sampling policy: keep every trace.
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
    ];
    let cluster = Cluster::start_with_env(&REGIONS, "", &env).await;
    cluster
        .create_buckets("us-east", &[("traced", "register")], None)
        .await;
    let home = "eu-west";
    let key = cluster.key_homed_at("traced", home, "k");

    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let reply = cluster
        .region("us-east")
        .put_with(
            &kv("traced", &key),
            &json!("traced"),
            &[("traceparent", &traceparent)],
        )
        .await;
    reply.expect(200);
    assert_eq!(reply.header("x-meridian-region"), Some(home));

    // Each region exports on its own timer, and a span is exported only after its children
    // (it ends after them): wait for the last span to end in each region's part of the trace.
    eventually(
        Duration::from_secs(20),
        "every region's outermost span of the trace arrives",
        || async { outermost_spans_arrived(&of_trace(&spans)) },
    )
    .await;
    let trace = of_trace(&spans);
    let find = |service: &str, pred: &dyn Fn(&Span) -> bool| -> Vec<Span> {
        trace
            .iter()
            .filter(|s| s.service == service && pred(s))
            .cloned()
            .collect()
    };
    let by_id = |id: &str| trace.iter().find(|s| s.span_id == id).cloned();

    // us-east: its request span continues the client's span; the forward is under it.
    let accepted = find("meridian-us-east", &|s| s.parent == CLIENT_SPAN);
    assert_eq!(
        accepted.len(),
        1,
        "one us-east request span under the client span: {trace:#?}"
    );
    let forward = find("meridian-us-east", &|s| s.name == "forward_to_home");
    assert_eq!(forward.len(), 1, "{trace:#?}");
    assert_eq!(forward[0].parent, accepted[0].span_id);

    // eu-west (home): its request span is the forward's child; the write is under it.
    let at_home = find("meridian-eu-west", &|s| s.parent == forward[0].span_id);
    assert_eq!(
        at_home.len(),
        1,
        "home request span under the forward: {trace:#?}"
    );
    let write = find("meridian-eu-west", &|s| s.name == "partition_write");
    assert_eq!(write.len(), 1, "{trace:#?}");
    assert_eq!(write[0].parent, at_home[0].span_id);
    let commits: Vec<Span> = spans
        .lock()
        .expect("spans")
        .iter()
        .filter(|s| s.service == "meridian-eu-west" && s.name == "group_commit")
        .filter(|s| {
            s.parent == write[0].span_id
                || s.links
                    .contains(&(TRACE_ID.to_string(), write[0].span_id.clone()))
        })
        .cloned()
        .collect();
    assert_eq!(
        commits.len(),
        1,
        "the group commit continues the write it carried"
    );

    // Replication: eu-west's sends continue the write's trace; each replica's apply is a child.
    for replica in ["meridian-us-east", "meridian-ap-south"] {
        let applied = find(replica, &|s| {
            by_id(&s.parent)
                .is_some_and(|p| p.name == "replicate_send" && p.service == "meridian-eu-west")
        });
        assert!(
            !applied.is_empty(),
            "{replica} applies under eu-west's replicate_send: {trace:#?}"
        );
        let send = by_id(&applied[0].parent).expect("send span");
        assert_eq!(
            send.parent, write[0].span_id,
            "the send continues the write"
        );
        // Under the sampled request: the batch's apply, and the key's merge under that.
        let apply = find(replica, &|s| {
            s.name == "replicate_apply" && s.parent == applied[0].span_id
        });
        assert_eq!(apply.len(), 1, "{replica} applies the batch: {trace:#?}");
        let merge = find(replica, &|s| {
            s.name == "partition_merge" && s.parent == apply[0].span_id
        });
        assert_eq!(merge.len(), 1, "{replica} merges the key: {trace:#?}");
    }
}

/// Every anti-entropy exchange is a trace of its own, continued at the peer: the peer's
/// request spans for the exchange's calls are children of the initiator's `anti_entropy` span.
#[tokio::test]
async fn an_anti_entropy_exchange_is_a_trace_continued_at_the_peer() {
    let (endpoint, spans) = start_receiver();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
    ];
    let _cluster = Cluster::start_with_env(
        &["us-east", "eu-west"],
        "anti_entropy_interval_ms = 1000\n",
        &env,
    )
    .await;
    // The exchange and the peer's side of it, in one trace.
    let continued = |all: &[Span]| -> Option<(Span, Vec<Span>)> {
        all.iter()
            .filter(|s| s.name == "anti_entropy")
            .find_map(|exchange| {
                let remote: Vec<Span> = all
                    .iter()
                    .filter(|s| s.service != exchange.service && s.trace_id == exchange.trace_id)
                    .cloned()
                    .collect();
                remote
                    .iter()
                    .any(|s| s.name == "/internal/v1/ae/top")
                    .then(|| (exchange.clone(), remote))
            })
    };
    eventually(
        Duration::from_secs(20),
        "an exchange and the peer's side of it are exported",
        || async { continued(&spans.lock().expect("spans")).is_some() },
    )
    .await;
    let all = spans.lock().expect("spans").clone();
    let (exchange, remote) = continued(&all).expect("found above");
    assert!(
        exchange.parent.is_empty(),
        "an exchange is a root: {exchange:?}"
    );
    let top = remote
        .iter()
        .find(|s| s.name == "/internal/v1/ae/top")
        .expect("found above");
    assert_eq!(top.parent, exchange.span_id, "{remote:#?}");
}

/// A checkpoint pauses the storage writer, so each one is a trace of its own in Jaeger; so
/// are tombstone GC rounds (README "Operations").
#[tokio::test]
async fn a_checkpoint_and_a_tombstone_gc_round_are_traces_of_their_own() {
    let (endpoint, spans) = start_receiver();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let config = "checkpoint_interval_ms = 200\ntombstone_gc_interval_ms = 200\n";
    let cluster = Cluster::start_with_env(&["us-east"], config, &env).await;
    // Creating a bucket is journaled, so a checkpoint becomes due.
    cluster
        .create_buckets("us-east", &[("checkpointed", "register")], None)
        .await;
    // A tombstone: a GC round with a candidate (an idle round is no trace).
    let region = cluster.region("us-east");
    let path = kv("checkpointed", "gone");
    region.put(&path, &json!("v")).await.expect(200);
    region.delete(&path).await.expect(200);
    for name in ["checkpoint", "tombstone_gc"] {
        eventually(
            Duration::from_secs(20),
            &format!("a {name} span is exported as a root"),
            || async {
                spans.lock().expect("spans").iter().any(|s| {
                    s.name == name && s.parent.is_empty() && s.service == "meridian-us-east"
                })
            },
        )
        .await;
    }
}
