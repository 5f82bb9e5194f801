//! Incarnations: a region restarted on an empty disk, or on an old copy of its own, never
//! reuses a sequence number or dot its peers have seen, so its new writes reach everyone.

mod common;
mod support;

use common::kv;
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use support::{eventually, Cluster};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERGE: Duration = Duration::from_secs(20);

async fn incarnation(cluster: &Cluster, name: &str) -> String {
    let view = cluster.region(name).get("/v1/cluster").await;
    view.body["incarnation"]
        .as_str()
        .expect("incarnation")
        .to_string()
}

async fn write(cluster: &Cluster, at: &str, increments: usize, members: &[&str]) {
    let region = cluster.region(at);
    for _ in 0..increments {
        region
            .post(&format!("{}/increment", kv("cnt", "n")), &json!({"by": 1}))
            .await
            .expect(200);
    }
    if !members.is_empty() {
        region
            .post(
                &format!("{}/add", kv("set", "s")),
                &json!({"members": members}),
            )
            .await
            .expect(200);
    }
}

/// Waits until `names` all report `value` for the counter and contain `members`.
async fn peers_hold(cluster: &Cluster, names: &[&str], value: i64, members: &[&str]) {
    for name in names {
        eventually(
            CONVERGE,
            &format!("{name} holds {value} and {members:?}"),
            || async {
                let region = cluster.region(name);
                let count = region.get(&kv("cnt", "n")).await.body["value"].clone();
                let set = region.get(&kv("set", "s")).await.body["members"].clone();
                let has_all = members
                    .iter()
                    .all(|m| set.as_array().is_some_and(|a| a.contains(&json!(m))));
                count == json!(value) && has_all
            },
        )
        .await;
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy file");
    }
}

/// A cluster with the counter and set buckets every test writes, homed at eu-west.
async fn cluster_with_buckets_at_eu_west(extra: &str) -> Cluster {
    let cluster = Cluster::start(&REGIONS, extra).await;
    cluster
        .create_buckets(
            "eu-west",
            &[("cnt", "counter"), ("set", "set")],
            Some("eu-west"),
        )
        .await;
    cluster
}

/// A cluster whose eu-west wrote 3 increments and "a", was copied while stopped, then wrote 4
/// more and "b" that every peer holds: the cluster, the copy, and eu-west's incarnation.
async fn cluster_with_an_old_copy(extra: &str) -> (Cluster, tempfile::TempDir, String) {
    let mut cluster = cluster_with_buckets_at_eu_west(extra).await;
    write(&cluster, "eu-west", 3, &["a"]).await;
    peers_hold(&cluster, &["us-east", "ap-south"], 3, &["a"]).await;
    // Take a copy while stopped, then keep writing so peers see more than the copy holds.
    let snapshot = tempfile::tempdir().expect("snapshot dir");
    let region = cluster.region_mut("eu-west");
    region.stop();
    copy_dir(&region.data_dir(), snapshot.path());
    region.restart().await;
    let before = incarnation(&cluster, "eu-west").await;
    write(&cluster, "eu-west", 4, &["b"]).await;
    peers_hold(&cluster, &["us-east", "ap-south"], 7, &["a", "b"]).await;
    (cluster, snapshot, before)
}

/// Replaces a (stopped) region's data directory with the copy.
fn put_back(data: &Path, snapshot: &Path) {
    std::fs::remove_dir_all(data).expect("remove data");
    copy_dir(snapshot, data);
}

/// The restored eu-west runs as a new incarnation, and its new writes are not mistaken for
/// the ones peers already applied.
async fn new_writes_reach_every_peer(cluster: &Cluster, before: &str) {
    assert_ne!(
        incarnation(cluster, "eu-west").await,
        before,
        "restored copy must re-incarnate"
    );
    write(cluster, "eu-west", 5, &["c"]).await;
    peers_hold(cluster, &["us-east", "ap-south"], 12, &["a", "b", "c"]).await;
}

#[tokio::test]
async fn a_region_restarted_on_an_empty_disk_writes_as_a_new_incarnation() {
    let mut cluster = cluster_with_buckets_at_eu_west("").await;
    write(&cluster, "eu-west", 5, &["a", "b"]).await;
    peers_hold(&cluster, &["us-east", "ap-south"], 5, &["a", "b"]).await;
    let before = incarnation(&cluster, "eu-west").await;

    let region = cluster.region_mut("eu-west");
    region.kill9();
    let data = region.data_dir();
    std::fs::remove_dir_all(&data).expect("wipe data");
    std::fs::create_dir_all(&data).expect("empty data dir");
    region.restart().await;
    assert_ne!(incarnation(&cluster, "eu-west").await, before);
    // The bucket definitions are gone with the disk; recreate them as an operator would.
    for (bucket, kind) in [("cnt", "counter"), ("set", "set")] {
        let body = json!({"type": kind, "home_region": "eu-west"});
        let reply = cluster
            .region("eu-west")
            .put(&format!("/v1/buckets/{bucket}"), &body)
            .await;
        assert!(reply.status == 201 || reply.status == 200, "{reply:?}");
    }

    // Right after the restart: new counter increments and set adds.
    write(&cluster, "eu-west", 7, &["c", "d"]).await;
    peers_hold(
        &cluster,
        &["us-east", "ap-south"],
        12,
        &["a", "b", "c", "d"],
    )
    .await;
}

#[tokio::test]
async fn a_region_restored_from_an_old_copy_of_its_disk_does_not_reuse_sequence_numbers() {
    let (mut cluster, snapshot, before) = cluster_with_an_old_copy("").await;

    // Restore the old copy.
    let region = cluster.region_mut("eu-west");
    region.stop();
    put_back(&region.data_dir(), snapshot.path());
    region.restart().await;
    new_writes_reach_every_peer(&cluster, &before).await;
}

#[tokio::test]
async fn a_restored_copy_started_with_the_whole_cluster_does_not_reuse_sequence_numbers() {
    // Every region starts at the same moment (compose up after a restore): none listens yet
    // when the others ask who they are, so each answers from its disk while it asks.
    let (mut cluster, snapshot, before) =
        cluster_with_an_old_copy("startup_peer_wait_ms = 1500\n").await;
    for region in cluster.regions.iter_mut() {
        region.stop();
    }
    put_back(&cluster.region("eu-west").data_dir(), snapshot.path());
    for region in cluster.regions.iter_mut() {
        region.relaunch();
    }
    for region in cluster.regions.iter_mut() {
        region.wait_ready().await;
    }
    cluster.wait_all_up().await;
    // Before: nobody answered its one question at start, and it kept the old incarnation.
    new_writes_reach_every_peer(&cluster, &before).await;

    // With no peer to answer, a reopened region waits a bounded time, then serves.
    for name in ["us-east", "ap-south"] {
        cluster.region_mut(name).stop();
    }
    let region = cluster.region_mut("eu-west");
    let started = std::time::Instant::now();
    region.restart().await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "it asked its peers for (about) the whole wait: {:?}",
        started.elapsed()
    );
    assert!(
        region
            .log()
            .contains("not every peer answered the start-up question"),
        "says why it waited"
    );
}
