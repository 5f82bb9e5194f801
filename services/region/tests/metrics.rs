//! `/metrics` of a running region: the families operators rely on are present, and they move
//! with traffic (replication lag rises while a peer is partitioned and falls after the heal).

mod common;
mod support;

use common::kv;
use serde_json::json;
use std::time::Duration;
use support::{eventually, sample, Cluster};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

async fn scrape(cluster: &Cluster, region: &str) -> String {
    let reply = cluster.region(region).get("/metrics").await;
    assert_eq!(reply.status, 200);
    reply.text
}

#[tokio::test]
async fn metrics_are_present_and_follow_traffic_and_partitions() {
    // Anti-entropy off: an exchange at the heal could merge the counter before the hints do,
    // and merges that change nothing are not counted as applied entries. (Its series exist
    // from the start all the same.)
    let cluster = Cluster::start(&REGIONS, "anti_entropy_interval_ms = 0\n").await;
    cluster
        .create_buckets("us-east", &[("m", "counter")], Some("us-east"))
        .await;
    let path = format!("{}/increment", kv("m", "n"));
    for _ in 0..20 {
        cluster
            .region("us-east")
            .post(&path, &json!({"by": 1}))
            .await
            .expect(200);
    }
    let text = scrape(&cluster, "us-east").await;
    for family in [
        "meridian_http_requests_total",
        "meridian_http_request_duration_seconds_bucket",
        "meridian_storage_commit_batch_size_bucket",
        "meridian_storage_commit_duration_seconds_bucket",
        "meridian_storage_commit_queue_depth",
        "meridian_storage_journal_zero_fill_bytes_total",
        "meridian_storage_size_bytes",
        "meridian_partition_mailbox_depth",
        "meridian_partition_pending_writes",
        "meridian_replication_batch_entries_bucket",
        "meridian_replication_lag_seconds_bucket",
        "meridian_replication_pending_entries",
        "meridian_hints_pending_entries",
        "meridian_hints_drained_entries_total",
        "meridian_hints_overflowed_total",
        "meridian_peer_up",
        "meridian_replication_log_entries",
        "meridian_anti_entropy_exchanges_total",
        "meridian_anti_entropy_exchange_seconds_bucket",
        "meridian_anti_entropy_segments_compared_total",
        "meridian_anti_entropy_keys_repaired_total",
        "meridian_anti_entropy_bytes_total",
        "meridian_read_repairs_total",
        "meridian_tombstones_removed_total",
        "meridian_caught_up",
    ] {
        assert!(text.contains(family), "{family} missing from /metrics");
    }
    // Every series the Grafana dashboard queries exists (a renamed metric breaks a panel).
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../observability/grafana/meridian.json"
    ))
    .expect("dashboard");
    let queried: std::collections::BTreeSet<&str> = dashboard
        .match_indices("meridian_")
        .map(|(at, _)| {
            let rest = &dashboard[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    assert!(queried.len() > 10, "dashboard queries found: {queried:?}");
    for name in queried {
        assert!(
            text.contains(name),
            "dashboard queries {name}, missing from /metrics"
        );
    }
    let route = [
        ("route", "/v1/kv/{bucket}/{key}/increment"),
        ("status", "200"),
    ];
    assert!(sample(&text, "meridian_http_requests_total", &route) >= 20.0);
    assert!(sample(&text, "meridian_storage_writes_committed_total", &[]) >= 20.0);
    assert!(sample(&text, "meridian_storage_size_bytes", &[]) > 0.0);
    assert_eq!(
        sample(&text, "meridian_peer_up", &[("peer", "eu-west")]),
        1.0
    );
    let lag_count = |text: &str| {
        sample(
            text,
            "meridian_replication_lag_seconds_count",
            &[("peer", "eu-west")],
        )
    };
    // Observed when eu-west's acknowledgement comes back, after the writes were answered.
    eventually(
        Duration::from_secs(10),
        "replication to eu-west is measured",
        || async { lag_count(&scrape(&cluster, "us-east").await) > 0.0 },
    )
    .await;
    let lag_before = lag_count(&scrape(&cluster, "us-east").await);

    // Partition eu-west away: its pending entries and hints rise with every write.
    cluster.cut_off("eu-west");
    cluster.wait_status("us-east", "eu-west", "down").await;
    for _ in 0..30 {
        cluster
            .region("us-east")
            .post(&path, &json!({"by": 1}))
            .await
            .expect(200);
    }
    eventually(
        Duration::from_secs(10),
        "lag to eu-west is visible in metrics",
        || async {
            let text = scrape(&cluster, "us-east").await;
            sample(
                &text,
                "meridian_replication_pending_entries",
                &[("peer", "eu-west")],
            ) >= 30.0
                && sample(
                    &text,
                    "meridian_hints_pending_entries",
                    &[("peer", "eu-west")],
                ) >= 30.0
                && sample(&text, "meridian_peer_up", &[("peer", "eu-west")]) == 0.0
        },
    )
    .await;

    // Heal: the backlog drains and the lag falls back to nothing.
    cluster.heal_all();
    eventually(
        Duration::from_secs(20),
        "lag to eu-west falls after the heal",
        || async {
            let text = scrape(&cluster, "us-east").await;
            sample(
                &text,
                "meridian_replication_pending_entries",
                &[("peer", "eu-west")],
            ) == 0.0
                && sample(
                    &text,
                    "meridian_hints_pending_entries",
                    &[("peer", "eu-west")],
                ) == 0.0
                && lag_count(&text) > lag_before
        },
    )
    .await;
    let text = scrape(&cluster, "eu-west").await;
    assert!(
        sample(
            &text,
            "meridian_replication_applied_entries_total",
            &[("origin", "us-east")]
        ) >= 50.0
    );
}
