//! Hinted handoff: a region killed with SIGKILL gets everything it missed after restart, and
//! restarts mid-stream neither lose nor duplicate effects.

mod common;
mod support;

use common::kv;
use serde_json::json;
use std::time::Duration;
use support::{eventually, Cluster};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERGE: Duration = Duration::from_secs(30);

fn hints_for(view: &serde_json::Value, peer: &str) -> u64 {
    view["regions"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == peer))
        .and_then(|r| r["hints"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_region_killed_for_a_while_receives_everything_it_missed() {
    // Anti-entropy off: the hints alone must bring back everything (an exchange at the
    // restart would otherwise repair some of it first, and hide hints that were lost). Slow
    // heartbeats: the replicator of a down peer polls at their pace, so writes of the last
    // second before the peer returns come after its last poll (they went uncounted: 785).
    let config = "anti_entropy_interval_ms = 0\nheartbeat_interval_ms = 1000\n";
    let mut cluster = Cluster::start(&REGIONS, config).await;
    cluster
        .create_buckets(
            "us-east",
            &[("cnt", "counter"), ("set", "set")],
            Some("us-east"),
        )
        .await;
    cluster.region_mut("eu-west").kill9();
    cluster.wait_status("us-east", "eu-west", "down").await;

    let east = cluster.region("us-east");
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let client = east.client();
            let url = east.url();
            tokio::spawn(async move {
                for i in 0..50 {
                    let inc = client
                        .post(format!("{url}{}/increment", kv("cnt", "n")))
                        .json(&json!({"by": 1}));
                    assert_eq!(inc.send().await.expect("increment").status(), 200);
                    let add = client
                        .post(format!("{url}{}/add", kv("set", "s")))
                        .json(&json!({"members": [format!("m{t}-{i}")]}));
                    assert_eq!(add.send().await.expect("add").status(), 200);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task");
    }
    let view = east.get("/v1/cluster").await;
    assert!(
        hints_for(&view.body, "eu-west") >= 800,
        "hints held for eu-west: {view:?}"
    );

    cluster.region_mut("eu-west").restart().await;
    let body = cluster.converged(&kv("cnt", "n"), CONVERGE).await;
    assert_eq!(body["value"], json!(400));
    let body = cluster.converged(&kv("set", "s"), CONVERGE).await;
    assert_eq!(body["members"].as_array().map_or(0, Vec::len), 400);
    eventually(
        CONVERGE,
        "us-east holds no more hints for eu-west",
        || async {
            let view = cluster.region("us-east").get("/v1/cluster").await;
            view.body["regions"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["name"] == "eu-west"))
                .is_some_and(|r| r["pending_entries"] == json!(0) && r["status"] == "up")
        },
    )
    .await;
    // Every hint is counted, whatever the batch sizes (before: only full batches, so 0 here).
    // Waited for: a heartbeat can carry eu-west's applied mark (pending 0 above) before the
    // last batch's answer reaches the replicator that counts it.
    let drained = || async {
        let metrics = cluster.region("us-east").get("/metrics").await.text;
        support::sample(
            &metrics,
            "meridian_hints_drained_entries_total",
            &[("peer", "eu-west")],
        )
    };
    eventually(CONVERGE, "us-east counts 800 drained hints", || async {
        drained().await >= 800.0
    })
    .await;
    assert_eq!(drained().await, 800.0, "400 increments and 400 adds");
}

/// Increments with Idempotency-Keys, retrying any whose outcome is unknown at the same region
/// until it answers: the final count must be exact even though regions die mid-stream.
async fn increment_exactly(url: &str, path: &str, keys: &[String]) -> usize {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut retries = 0;
    for key in keys {
        loop {
            let sent = client
                .post(format!("{url}{path}/increment"))
                .header("idempotency-key", key.as_str())
                .json(&json!({"by": 1}))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => break,
                _ => {
                    retries += 1;
                    assert!(retries < 2000, "region never came back");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    retries
}

#[tokio::test]
async fn regions_restarted_mid_stream_neither_lose_nor_duplicate_increments() {
    let mut cluster = Cluster::start(&REGIONS, "").await;
    cluster
        .create_buckets(
            "us-east",
            &[("cnt", "counter"), ("set", "set")],
            Some("us-east"),
        )
        .await;
    let path = kv("cnt", "exact");
    let url = cluster.region("us-east").url();
    let keys: Vec<String> = (0..600).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let writer = {
        let (url, path, keys) = (url.clone(), path.clone(), keys.clone());
        tokio::spawn(async move { increment_exactly(&url, &path, &keys).await })
    };
    // Kill a replica, then the origin itself, while increments stream in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.region_mut("eu-west").kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.region_mut("eu-west").restart().await;
    cluster.region_mut("us-east").kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.region_mut("us-east").restart().await;
    let retries = writer.await.expect("writer");
    eprintln!("writer retried {retries} times");

    let body = cluster.converged(&path, CONVERGE).await;
    assert_eq!(body["value"], json!(600), "every increment exactly once");
}
