//! Anti-entropy and read repair, end to end with real regions on loopback.
//!
//! Hinted handoff is disabled in most tests (`hint_max_bytes = 0`: a down peer's entries are
//! dropped at once and the peer is flagged), so whatever a region missed can only reach it
//! through Merkle-tree exchanges (or, with anti-entropy disabled, through quorum/all reads).
//! Repairs merge states without logging them, so a region's repaired keys can only come from
//! exchanges it or its peers ran: the keys-repaired metrics prove which mechanism did it.

mod common;
mod support;

use common::{assert_error, kv, send, Region, Reply};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use support::proxy::Link;
use support::{eventually, port_of, sample, Cluster, FAST};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERGE: Duration = Duration::from_secs(30);
/// Hints off (entries for a down peer are dropped at once) and an exchange about every second.
const AE_ONLY: &str = "hint_max_bytes = 0\nanti_entropy_interval_ms = 1000\n";

async fn scrape(region: &Region) -> String {
    let reply = region.get("/metrics").await;
    reply.expect(200);
    reply.text
}

/// Keys whose state anti-entropy changed in region `at`: merged there by its own exchanges
/// (`side="local"`) or pushed there by its peers' exchanges (`side="peer"`, `peer=at`).
async fn repaired_at(regions: &[&Region], at: &str) -> f64 {
    let mut total = 0.0;
    for region in regions {
        let text = scrape(region).await;
        total += if region.name() == at {
            sample(
                &text,
                "meridian_anti_entropy_keys_repaired_total",
                &[("side", "local")],
            )
        } else {
            sample(
                &text,
                "meridian_anti_entropy_keys_repaired_total",
                &[("peer", at), ("side", "peer")],
            )
        };
    }
    total
}

/// The `/v1/cluster` view of `region`.
async fn cluster_view(region: &Region) -> Value {
    let view = region.get("/v1/cluster").await;
    view.expect(200);
    view.body
}

/// What `region` reports about `peer` in `/v1/cluster`.
async fn peer_entry(region: &Region, peer: &str) -> Value {
    let view = cluster_view(region).await;
    view["regions"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == peer))
        .cloned()
        .unwrap_or_else(|| panic!("{} has no entry for {peer}: {view}", region.name()))
}

/// Waits until `at` sees the partitioned `peer` down, holds nothing for it any more (its
/// entries were dropped) and has flagged it for anti-entropy: from then on nothing but an
/// exchange (or a read repair) can bring `peer` what `at` wrote.
async fn wait_dropped_and_flagged(cluster: &Cluster, at: &str, peer: &str) {
    let region = cluster.region(at);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let last = peer_entry(region, peer).await;
        if last["status"] == "down"
            && last["needs_anti_entropy"] == json!(true)
            && last["pending_entries"] == json!(0)
            && last["hints"] == json!(0)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{at} never dropped its entries for {peer} and flagged it: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `writes` at `at` while `stale` is cut off and its entries are dropped (hints off),
/// then heals: only a repair brings them to `stale`.
async fn written_while_cut_off(cluster: &Cluster, at: &str, stale: &str, writes: &[(&str, Value)]) {
    cluster.cut_off(stale);
    cluster.wait_status(at, stale, "down").await;
    for name in cluster.names() {
        if name != at && name != stale {
            cluster.wait_status(&name, stale, "down").await;
        }
    }
    for (path, value) in writes {
        cluster.region(at).put(path, value).await.expect(200);
    }
    wait_dropped_and_flagged(cluster, at, stale).await;
    cluster.heal_all();
    cluster.wait_all_up().await;
}

/// Waits until `region` reports `caught_up: true` with a complete, error-free exchange with
/// every peer since it started.
async fn wait_caught_up(region: &Region, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let view = cluster_view(region).await;
        let peers_done = view["regions"].as_array().is_some_and(|rs| {
            rs.iter().filter(|r| r["self"] != json!(true)).all(|r| {
                r["last_anti_entropy"]["complete"] == json!(true)
                    && r["last_anti_entropy"]["error"].is_null()
            })
        });
        if view["caught_up"] == json!(true) && peers_done {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "{} not caught up within {timeout:?}: {view}",
            region.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every region answers `path` with the same body and asserts its `field`.
async fn converged_to(cluster: &Cluster, path: &str, field: &str, expected: Value) {
    let body = cluster.converged(path, CONVERGE).await;
    assert_eq!(
        body[field], expected,
        "{path}: regions agree, but on the wrong value: {body}"
    );
}

/// `values` of a register body, sorted (sibling order is not part of the contract).
fn sorted_values(body: &Value) -> Vec<String> {
    let mut values: Vec<String> = body["values"]
        .as_array()
        .unwrap_or_else(|| panic!("register body without values: {body}"))
        .iter()
        .map(Value::to_string)
        .collect();
    values.sort();
    values
}

/// Recursive copy of a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// Stops `region` and copies its data directory into a new temporary directory.
async fn snapshot(region: &mut Region) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("snapshot dir");
    region.stop(); // a stopped region's redb file is consistent
    copy_dir(&region.data_dir(), copy.path());
    region.restart().await;
    copy
}

/// Stops `region`, replaces its data directory with `copy`, and starts it again.
async fn restore(region: &mut Region, copy: &Path) {
    region.stop();
    let data = region.data_dir();
    std::fs::remove_dir_all(&data).expect("remove data dir");
    copy_dir(copy, &data);
    region.restart().await;
}

async fn increment(region: &Region, path: &str, by: i64) -> Reply {
    let reply = region
        .post(&format!("{path}/increment"), &json!({ "by": by }))
        .await;
    reply.expect(200);
    reply
}

async fn add(region: &Region, path: &str, members: &[&str]) -> Reply {
    let reply = region
        .post(&format!("{path}/add"), &json!({ "members": members }))
        .await;
    reply.expect(200);
    reply
}

async fn remove(region: &Region, path: &str, members: &[&str]) -> Reply {
    let reply = region
        .post(&format!("{path}/remove"), &json!({ "members": members }))
        .await;
    reply.expect(200);
    reply
}

#[tokio::test]
async fn diverged_regions_converge_by_anti_entropy_alone() {
    let cluster = Cluster::start(&REGIONS, AE_ONLY).await;
    cluster
        .create_buckets(
            "us-east",
            &[
                ("reg", "register"),
                ("lww", "lww"),
                ("cnt", "counter"),
                ("set", "set"),
            ],
            None,
        )
        .await;
    // Every key is homed in the region that will be cut off, so each write on the majority
    // side is a failover write that originates (and is logged) where it was sent.
    let cut = "ap-south";
    let reg = kv("reg", &cluster.key_homed_at("reg", cut, "doc"));
    let only_east = kv("reg", &cluster.key_homed_at("reg", cut, "east-only"));
    let only_south = kv("reg", &cluster.key_homed_at("reg", cut, "south-only"));
    let lww = kv("lww", &cluster.key_homed_at("lww", cut, "x"));
    let only_west = kv("lww", &cluster.key_homed_at("lww", cut, "west-only"));
    let cnt = kv("cnt", &cluster.key_homed_at("cnt", cut, "n"));
    let set = kv("set", &cluster.key_homed_at("set", cut, "s"));
    let east = cluster.region("us-east");
    let west = cluster.region("eu-west");
    let south = cluster.region(cut);

    // A common past, replicated everywhere the normal way.
    east.put(&reg, &json!("v0")).await.expect(200);
    east.put(&lww, &json!("l0")).await.expect(200);
    increment(east, &cnt, 1).await;
    add(east, &set, &["m0", "m1", "m2"]).await;
    converged_to(&cluster, &reg, "values", json!(["v0"])).await;
    converged_to(&cluster, &lww, "values", json!(["l0"])).await;
    converged_to(&cluster, &cnt, "value", json!(1)).await;
    converged_to(&cluster, &set, "members", json!(["m0", "m1", "m2"])).await;

    cluster.cut_off(cut);
    for other in ["us-east", "eu-west"] {
        cluster.wait_status(other, cut, "down").await;
        cluster.wait_status(cut, other, "down").await;
    }

    // Majority side.
    let reply = east.put(&reg, &json!("east")).await;
    reply.expect(200);
    assert_eq!(
        reply.header("x-meridian-failover"),
        Some("true"),
        "{reply:?}"
    );
    east.put(&only_east, &json!("e")).await.expect(200);
    east.put(&lww, &json!("l-east")).await.expect(200);
    west.put(&only_west, &json!("w")).await.expect(200);
    increment(east, &cnt, 10).await;
    increment(west, &cnt, 100).await;
    add(east, &set, &["east"]).await;
    remove(west, &set, &["m1"]).await;
    // The majority side agrees on its own writes before the minority writes.
    converged_majority(&cluster, &cnt, "value", json!(111)).await;
    converged_majority(&cluster, &set, "members", json!(["east", "m0", "m2"])).await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Minority side, all later in time (its lww write wins).
    south.put(&reg, &json!("south")).await.expect(200);
    south.put(&only_south, &json!("s")).await.expect(200);
    south.put(&lww, &json!("l-south")).await.expect(200);
    increment(south, &cnt, 1000).await;
    // Re-adding m1 is concurrent with eu-west's remove of it: the add wins.
    add(south, &set, &["south", "m1"]).await;
    remove(south, &set, &["m0"]).await;

    // Nothing crossed the partition, and every writer dropped what it held for the other side.
    assert_eq!(south.get(&cnt).await.body["value"], json!(1001));
    assert_eq!(
        south.get(&set).await.body["members"],
        json!(["m1", "m2", "south"])
    );
    south.get(&only_east).await.expect(404);
    east.get(&only_south).await.expect(404);
    for at in ["us-east", "eu-west"] {
        wait_dropped_and_flagged(&cluster, at, cut).await;
        wait_dropped_and_flagged(&cluster, cut, at).await;
    }
    let all: Vec<&Region> = cluster.regions.iter().collect();
    let mut before = BTreeMap::new();
    for name in REGIONS {
        before.insert(name, repaired_at(&all, name).await);
    }
    let mut exchanges_before = 0.0;
    for region in &all {
        let text = scrape(region).await;
        exchanges_before += sample(
            &text,
            "meridian_anti_entropy_exchanges_total",
            &[("outcome", "repaired")],
        );
    }

    cluster.heal_all();
    cluster.wait_all_up().await;
    let body = cluster.converged(&reg, CONVERGE).await;
    assert_eq!(
        sorted_values(&body),
        vec!["\"east\"", "\"south\""],
        "concurrent register writes are kept as siblings: {body}"
    );
    converged_to(&cluster, &only_east, "values", json!(["e"])).await;
    converged_to(&cluster, &only_south, "values", json!(["s"])).await;
    converged_to(&cluster, &only_west, "values", json!(["w"])).await;
    converged_to(&cluster, &lww, "values", json!(["l-south"])).await;
    converged_to(&cluster, &cnt, "value", json!(1111)).await;
    converged_to(
        &cluster,
        &set,
        "members",
        json!(["east", "m1", "m2", "south"]),
    )
    .await;

    // Anti-entropy did it (every entry for the other side was dropped): five keys differed
    // across the partition, and the first exchange to meet each changed it on one side at
    // least. Where it changed them it logged them again, so the other regions may have
    // received them through replication rather than by an exchange of their own.
    let mut delta = 0.0;
    for name in REGIONS {
        delta += repaired_at(&all, name).await - before[name];
    }
    assert!(
        delta >= 5.0,
        "anti-entropy changed {delta} keys in all; at least 5 had to be repaired"
    );
    // The flags set while the partition lasted are cleared by the completed exchanges.
    for (at, peer) in [
        ("us-east", cut),
        ("eu-west", cut),
        (cut, "us-east"),
        (cut, "eu-west"),
    ] {
        let region = cluster.region(at);
        let cleared = Instant::now() + Duration::from_secs(15);
        loop {
            let last = peer_entry(region, peer).await;
            if last["needs_anti_entropy"] == json!(false)
                && last["last_anti_entropy"]["complete"] == json!(true)
            {
                break;
            }
            assert!(
                Instant::now() < cleared,
                "{at} still flags {peer} after the heal: {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut repairing = 0.0;
    for region in &all {
        let text = scrape(region).await;
        repairing += sample(
            &text,
            "meridian_anti_entropy_exchanges_total",
            &[("outcome", "repaired")],
        );
    }
    assert!(
        repairing > exchanges_before,
        "no exchange counted itself as repairing ({repairing} before and after the heal)"
    );
    // When both sides of a pair start at once one defers to the other and waits, and an
    // exchange that fails (the link was cut) backs off: a handful of each, never a busy loop
    // (a flagged peer once retried without pause).
    for outcome in ["deferred", "failed"] {
        let mut count = 0.0;
        for region in &all {
            let text = scrape(region).await;
            count += sample(
                &text,
                "meridian_anti_entropy_exchanges_total",
                &[("outcome", outcome)],
            );
        }
        assert!(count < 50.0, "{count} {outcome} exchanges: a retry loop");
    }
}

/// Waits until the two majority regions agree on `path` and checks the value.
async fn converged_majority(cluster: &Cluster, path: &str, field: &str, expected: Value) {
    let mut last = (Value::Null, Value::Null);
    let deadline = Instant::now() + CONVERGE;
    loop {
        last.0 = cluster.region("us-east").get(path).await.body[field].clone();
        last.1 = cluster.region("eu-west").get(path).await.body[field].clone();
        if last.0 == expected && last.1 == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "majority never agreed on {path} = {expected}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn restored_old_data_directory_converges_back() {
    let mut cluster = Cluster::start(&REGIONS, AE_ONLY).await;
    cluster
        .create_buckets(
            "us-east",
            &[("reg", "register"), ("cnt", "counter"), ("set", "set")],
            None,
        )
        .await;
    let victim = "eu-west";
    let cnt_victim = kv("cnt", &cluster.key_homed_at("cnt", victim, "v"));
    let cnt_east = kv("cnt", &cluster.key_homed_at("cnt", "us-east", "e"));
    let set = kv("set", &cluster.key_homed_at("set", victim, "s"));
    let doc = kv("reg", &cluster.key_homed_at("reg", victim, "doc"));
    let mut registers: BTreeMap<String, Value> = BTreeMap::new();

    // Before the copy.
    for (i, at) in REGIONS.iter().cycle().take(12).enumerate() {
        let path = kv("reg", &format!("old{i}"));
        cluster.region(at).put(&path, &json!(i)).await.expect(200);
        registers.insert(path, json!([i]));
    }
    for at in REGIONS {
        let region = cluster.region(at);
        increment(region, &cnt_victim, 1).await;
        increment(region, &cnt_east, 1).await;
        add(region, &set, &[&format!("old-{at}")]).await;
    }
    cluster
        .region("us-east")
        .put(&doc, &json!("before"))
        .await
        .expect(200);
    converged_to(&cluster, &cnt_victim, "value", json!(3)).await;
    converged_to(&cluster, &cnt_east, "value", json!(3)).await;
    converged_to(&cluster, &doc, "values", json!(["before"])).await;
    converged_to(
        &cluster,
        &set,
        "members",
        json!(["old-ap-south", "old-eu-west", "old-us-east"]),
    )
    .await;
    for (path, expected) in &registers {
        converged_to(&cluster, path, "values", expected.clone()).await;
    }

    let copy = snapshot(cluster.region_mut(victim)).await;
    cluster.wait_all_up().await;

    // After the copy: writes at the others and at the victim itself (keys homed there).
    for (i, at) in REGIONS.iter().cycle().take(9).enumerate() {
        let path = kv("reg", &format!("new{i}"));
        let value = json!(format!("n{i}-{at}"));
        cluster.region(at).put(&path, &value).await.expect(200);
        registers.insert(path, json!([value]));
    }
    for i in 0..3 {
        let path = kv(
            "reg",
            &cluster.key_homed_at("reg", victim, &format!("mine{i}-")),
        );
        let value = json!(format!("victim-{i}"));
        let reply = cluster.region(victim).put(&path, &value).await;
        reply.expect(200);
        assert_eq!(reply.header("x-meridian-region"), Some(victim));
        registers.insert(path, json!([value]));
    }
    let victim_region = cluster.region(victim);
    // Supersedes "before": the restored copy's old value must not come back as a sibling.
    victim_region.put(&doc, &json!("after")).await.expect(200);
    increment(victim_region, &cnt_victim, 10).await;
    increment(cluster.region("us-east"), &cnt_east, 100).await;
    add(cluster.region("us-east"), &set, &["new-us-east"]).await;
    remove(victim_region, &set, &["old-ap-south"]).await;
    let set_after = json!(["new-us-east", "old-eu-west", "old-us-east"]);
    converged_to(&cluster, &cnt_victim, "value", json!(13)).await;
    converged_to(&cluster, &cnt_east, "value", json!(103)).await;
    converged_to(&cluster, &doc, "values", json!(["after"])).await;
    converged_to(&cluster, &set, "members", set_after.clone()).await;
    for (path, expected) in &registers {
        converged_to(&cluster, path, "values", expected.clone()).await;
    }

    let all: Vec<&Region> = cluster.regions.iter().collect();
    let before = repaired_at(&all, victim).await;
    restore(cluster.region_mut(victim), copy.path()).await;
    let victim_region = cluster.region(victim);
    wait_caught_up(victim_region, CONVERGE).await;

    // Caught up means caught up: the victim's own local reads are right at once.
    assert_eq!(
        victim_region.get(&cnt_victim).await.body["value"],
        json!(13)
    );
    assert_eq!(victim_region.get(&cnt_east).await.body["value"], json!(103));
    assert_eq!(
        victim_region.get(&doc).await.body["values"],
        json!(["after"])
    );
    assert_eq!(victim_region.get(&set).await.body["members"], set_after);
    for (path, expected) in &registers {
        let reply = victim_region.get(path).await;
        assert_eq!(
            reply.body["values"], *expected,
            "{path} at the restored {victim}: {reply:?}"
        );
    }
    // And every region agrees.
    converged_to(&cluster, &cnt_victim, "value", json!(13)).await;
    converged_to(&cluster, &cnt_east, "value", json!(103)).await;
    converged_to(&cluster, &doc, "values", json!(["after"])).await;
    converged_to(&cluster, &set, "members", set_after).await;
    for (path, expected) in &registers {
        converged_to(&cluster, path, "values", expected.clone()).await;
    }
    // What the victim itself wrote after the copy exists only as state at its peers (their
    // logs hold their own writes): six keys (the victim's counter, the set, the document and
    // the three keys written there) can only have come back through anti-entropy.
    let all: Vec<&Region> = cluster.regions.iter().collect();
    let delta = repaired_at(&all, victim).await - before;
    assert!(
        delta >= 6.0,
        "anti-entropy changed {delta} keys in the restored {victim}; at least 6 had to be"
    );
}

/// Checks for `for_how_long` that every region answers 404 for `path`, locally and with
/// `consistency=all`.
async fn stays_deleted(cluster: &Cluster, path: &str, for_how_long: Duration) {
    let until = Instant::now() + for_how_long;
    let mut rounds = 0;
    while Instant::now() < until || rounds == 0 {
        for region in &cluster.regions {
            for query in ["", "?consistency=all"] {
                let reply = region.get(&format!("{path}{query}")).await;
                assert_eq!(
                    reply.status,
                    404,
                    "deleted {path}{query} came back at {} (round {rounds}): {reply:?}",
                    region.name()
                );
                assert_eq!(reply.body["error"]["code"], json!("key_not_found"));
            }
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tombstones each region's process has removed so far (the counter restarts with it).
async fn tombstones_removed(cluster: &Cluster) -> BTreeMap<String, f64> {
    let mut removed = BTreeMap::new();
    for region in &cluster.regions {
        let text = scrape(region).await;
        removed.insert(
            region.name().to_string(),
            sample(&text, "meridian_tombstones_removed_total", &[]),
        );
    }
    removed
}

/// Waits until every region has removed `more` tombstones since `baseline`; the panic shows
/// the counts and every region's applied vector and cluster view.
async fn wait_tombstones_removed(cluster: &Cluster, baseline: &BTreeMap<String, f64>, more: f64) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let now = tombstones_removed(cluster).await;
        if now.iter().all(|(name, n)| *n >= baseline[name] + more) {
            return;
        }
        if Instant::now() >= deadline {
            let mut views = String::new();
            for region in &cluster.regions {
                let view = cluster_view(region).await;
                views.push_str(&format!(
                    "\n{}: incarnation {} applied {}",
                    region.name(),
                    view["incarnation"],
                    view["applied"]
                ));
            }
            panic!(
                "tombstones removed per region: {now:?} (before: {baseline:?}); expected {more} \
                 more everywhere within {CONVERGE:?}{views}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The region cut off in the deletion tests: home of the doomed key.
const CUT: &str = "ap-south";

/// Three regions with anti-entropy only and frequent tombstone GC, and a register key homed
/// at `home`, written at us-east and present everywhere; returns the cluster and its path.
async fn cluster_with_live_key_homed_at(home: &str) -> (Cluster, String) {
    let config = format!("{AE_ONLY}tombstone_gc_interval_ms = 500\n");
    let cluster = Cluster::start(&REGIONS, &config).await;
    cluster
        .create_buckets("us-east", &[("reg", "register")], None)
        .await;
    let doomed = kv("reg", &cluster.key_homed_at("reg", home, "doomed"));
    cluster
        .region("us-east")
        .put(&doomed, &json!("alive"))
        .await
        .expect(200);
    converged_to(&cluster, &doomed, "values", json!(["alive"])).await;
    (cluster, doomed)
}

#[tokio::test]
async fn deleted_key_stays_deleted() {
    // Tombstone GC runs often: the tombstones are gone everywhere before the stale states
    // come back, which is when a deleted key is most at risk of resurrection.
    let (mut cluster, doomed) = cluster_with_live_key_homed_at(CUT).await;

    // 1. Deleted on the majority side of a partition, while the (home) region cut off still
    //    holds the live value.
    let cut = CUT;
    cluster.cut_off(cut);
    for other in ["us-east", "eu-west"] {
        cluster.wait_status(other, cut, "down").await;
        cluster.wait_status(cut, other, "down").await;
    }
    let reply = cluster.region("eu-west").delete(&doomed).await;
    reply.expect(200);
    assert_eq!(reply.header("x-meridian-failover"), Some("true"));
    cluster.region("eu-west").get(&doomed).await.expect(404);
    eventually(CONVERGE, "us-east sees the delete", || async {
        cluster.region("us-east").get(&doomed).await.status == 404
    })
    .await;
    wait_dropped_and_flagged(&cluster, "eu-west", cut).await;
    assert_eq!(
        cluster.region(cut).get(&doomed).await.body["values"],
        json!(["alive"]),
        "the partitioned region still holds the live value"
    );
    cluster.heal_all();
    cluster.wait_all_up().await;
    let body = cluster.converged(&doomed, CONVERGE).await;
    assert_eq!(body["error"]["code"], json!("key_not_found"), "{body}");
    stays_deleted(&cluster, &doomed, Duration::from_secs(3)).await;

    // 2. A copy of a region's disk taken while the key was live is restored after the delete.
    //    The key is homed there, so both its write and its delete originated there.
    let victim = "eu-west";
    let phoenix = kv("reg", &cluster.key_homed_at("reg", victim, "phoenix"));
    cluster
        .region("us-east")
        .put(&phoenix, &json!("alive"))
        .await
        .expect(200);
    converged_to(&cluster, &phoenix, "values", json!(["alive"])).await;
    let copy = snapshot(cluster.region_mut(victim)).await;
    cluster.wait_all_up().await;
    assert_eq!(
        cluster.region(victim).get(&phoenix).await.body["values"],
        json!(["alive"])
    );
    let removed_before = tombstones_removed(&cluster).await;
    let reply = cluster.region("us-east").delete(&phoenix).await;
    reply.expect(200);
    assert_eq!(reply.header("x-meridian-region"), Some(victim));
    let body = cluster.converged(&phoenix, CONVERGE).await;
    assert_eq!(body["error"]["code"], json!("key_not_found"), "{body}");
    // The tombstone is gone everywhere (causally stable) before the stale copy comes back.
    wait_tombstones_removed(&cluster, &removed_before, 1.0).await;

    restore(cluster.region_mut(victim), copy.path()).await;
    cluster.wait_all_up().await;
    wait_caught_up(cluster.region(victim), CONVERGE).await;
    let reply = cluster.region(victim).get(&phoenix).await;
    assert_eq!(
        reply.status, 404,
        "{victim} caught up but still serves the key deleted after its copy: {reply:?}"
    );
    stays_deleted(&cluster, &phoenix, Duration::from_secs(4)).await;
    stays_deleted(&cluster, &doomed, Duration::from_millis(1)).await;
}

/// After a partition in which a delete's log entry was dropped for the region cut off (hints
/// disabled) and anti-entropy delivered the tombstone instead, the tombstone still becomes
/// causally stable and is collected in every region, without any further write.
#[tokio::test]
async fn tombstones_are_collected_after_anti_entropy_delivered_them() {
    let (cluster, doomed) = cluster_with_live_key_homed_at(CUT).await;
    let cut = CUT;
    let removed_before = tombstones_removed(&cluster).await;
    cluster.cut_off(cut);
    cluster.wait_status("eu-west", cut, "down").await;
    cluster.region("eu-west").delete(&doomed).await.expect(200);
    wait_dropped_and_flagged(&cluster, "eu-west", cut).await;
    cluster.heal_all();
    cluster.wait_all_up().await;
    let body = cluster.converged(&doomed, CONVERGE).await;
    assert_eq!(body["error"]["code"], json!("key_not_found"), "{body}");
    wait_tombstones_removed(&cluster, &removed_before, 1.0).await;
    stays_deleted(&cluster, &doomed, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn quorum_read_repairs_a_stale_region() {
    let cluster = Cluster::start(
        &REGIONS,
        "anti_entropy_interval_ms = 0\nhint_max_bytes = 0\n",
    )
    .await;
    let (a, c) = ("us-east", "ap-south");
    cluster
        .create_buckets("us-east", &[("reg", "register")], Some(a))
        .await;
    let key = kv("reg", "k");
    let other = kv("reg", "other");
    let writes = [
        (key.as_str(), json!("fresh")),
        (other.as_str(), json!("fresh-other")),
    ];
    written_while_cut_off(&cluster, a, c, &writes).await;

    // Nothing repairs C on its own: no hints, no anti-entropy.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stale = cluster.region(c);
    stale
        .get(&format!("{key}?consistency=local"))
        .await
        .expect(404);
    stale
        .get(&format!("{other}?consistency=local"))
        .await
        .expect(404);
    let view = cluster_view(stale).await;
    assert_eq!(
        view["caught_up"],
        json!(false),
        "anti-entropy is disabled: {view}"
    );
    assert_eq!(
        cluster.region("eu-west").get(&key).await.expect(200)["values"],
        json!(["fresh"])
    );

    // A quorum read at C merges a peer's state into its answer and into C itself.
    let before = sample(&scrape(stale).await, "meridian_read_repairs_total", &[]);
    let reply = stale.get(&format!("{key}?consistency=quorum")).await;
    reply.expect(200);
    assert_eq!(reply.body["values"], json!(["fresh"]), "{reply:?}");
    assert_eq!(reply.header("x-meridian-region"), Some(c));
    let reply = stale.get(&format!("{key}?consistency=local")).await;
    assert_eq!(
        reply.body["values"],
        json!(["fresh"]),
        "the quorum read wrote the merge back to {c} before answering: {reply:?}"
    );
    let after = sample(&scrape(stale).await, "meridian_read_repairs_total", &[]);
    assert_eq!(
        after - before,
        1.0,
        "one key repaired locally by the quorum read"
    );

    // A quorum read at an up-to-date region repairs the stale peers it asked, in the background.
    let reply = cluster
        .region(a)
        .get(&format!("{other}?consistency=quorum"))
        .await;
    assert_eq!(reply.body["values"], json!(["fresh-other"]), "{reply:?}");
    eventually(
        Duration::from_secs(5),
        "the quorum read at us-east repairs ap-south",
        || async {
            stale
                .get(&format!("{other}?consistency=local"))
                .await
                .status
                == 200
        },
    )
    .await;
    assert_eq!(
        stale.get(&other).await.body["values"],
        json!(["fresh-other"])
    );

    // consistency=all with a region cut off cannot be met: 503 in the error shape.
    cluster.cut_off(c);
    cluster.wait_status(a, c, "down").await;
    let reply = cluster
        .region(a)
        .get(&format!("{key}?consistency=all"))
        .await;
    assert_error(&reply, 503, "unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"), "{reply:?}");
    // A quorum (one other region of three) still can.
    let reply = cluster
        .region(a)
        .get(&format!("{key}?consistency=quorum"))
        .await;
    assert_eq!(reply.body["values"], json!(["fresh"]), "{reply:?}");
    // The cut-off region itself has no peer to ask.
    cluster.wait_status(c, a, "down").await;
    cluster.wait_status(c, "eu-west", "down").await;
    let reply = stale.get(&format!("{key}?consistency=quorum")).await;
    assert_error(&reply, 503, "unavailable");
}

#[tokio::test]
async fn quorum_read_write_backs_to_a_slow_peer_are_bounded() {
    // Heartbeats every 500 ms (timing out after 1 s) stay within a link slowed to 300 ms a
    // chunk each way, so the slow peer stays up and is asked.
    let cluster = Cluster::start_with_env(
        &REGIONS,
        "anti_entropy_interval_ms = 0\nhint_max_bytes = 0\n",
        &[
            ("MERIDIAN_HEARTBEAT_INTERVAL_MS", "500"),
            ("MERIDIAN_FORWARD_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let (a, c) = ("us-east", "ap-south");
    cluster
        .create_buckets(a, &[("reg", "register")], Some(a))
        .await;
    let keys: Vec<String> = (0..60).map(|i| kv("reg", &format!("k{i}"))).collect();
    let writes: Vec<(&str, Value)> = keys.iter().map(|k| (k.as_str(), json!("fresh"))).collect();
    written_while_cut_off(&cluster, a, c, &writes).await;

    // 60 quorum reads at once at us-east: eu-west answers each at once; ap-south's answers,
    // each lacking its key, come in together later, and each write-back to it takes 600 ms.
    cluster.link(a, c).slow(300);
    let east = cluster.region(a);
    let skipped = || async {
        sample(
            &scrape(east).await,
            "meridian_read_repairs_skipped_total",
            &[],
        )
    };
    let reads = keys
        .iter()
        .map(|key| async move { east.get(&format!("{key}?consistency=quorum")).await });
    for reply in futures_util::future::join_all(reads).await {
        assert_eq!(reply.body["values"], json!(["fresh"]), "{reply:?}");
    }
    let stale = cluster.region(c);
    let repaired = || async {
        let mut present = 0;
        for key in &keys {
            if stale.get(&format!("{key}?consistency=local")).await.status == 200 {
                present += 1;
            }
        }
        present
    };
    eventually(
        Duration::from_secs(20),
        "every write-back to ap-south sent or skipped",
        || async { repaired().await + skipped().await as usize == keys.len() },
    )
    .await;
    let (sent, skipped) = (repaired().await, skipped().await as usize);
    assert!(
        sent >= 32 && skipped > 0,
        "at most 32 write-backs in flight to one peer, the rest left to anti-entropy: \
         {sent} sent, {skipped} skipped"
    );
}

/// One directed proxy link per ordered pair of `names`.
fn mesh(names: &[&str]) -> BTreeMap<(String, String), Link> {
    let mut links = BTreeMap::new();
    for from in names {
        for to in names.iter().filter(|to| *to != from) {
            links.insert((from.to_string(), to.to_string()), Link::start());
        }
    }
    links
}

/// Configuration of `name` with `peers` reached through their links.
fn config_with_peers(
    links: &BTreeMap<(String, String), Link>,
    name: &str,
    peers: &[&str],
) -> String {
    let mut config = format!("{FAST}\n[peers]\n");
    for peer in peers {
        let link = &links[&(name.to_string(), peer.to_string())];
        config.push_str(&format!("{peer} = \"{}\"\n", link.url()));
    }
    config
}

/// Whether `at` sees `peer` up with nothing pending for it.
async fn peer_settled(at: &Region, peer: &str) -> bool {
    let entry = peer_entry(at, peer).await;
    entry["status"] == "up" && entry["pending_entries"] == json!(0)
}

/// Sends `ops` (method, url, path, body) from `tasks` concurrent tasks; each must answer 200.
async fn run_all(
    client: &reqwest::Client,
    ops: Vec<(Method, String, String, Option<Value>)>,
    tasks: usize,
) {
    let mut queues: Vec<Vec<_>> = (0..tasks).map(|_| Vec::new()).collect();
    for (i, op) in ops.into_iter().enumerate() {
        queues[i % tasks].push(op);
    }
    let handles: Vec<_> = queues
        .into_iter()
        .map(|queue| {
            let client = client.clone();
            tokio::spawn(async move {
                for (method, url, path, body) in queue {
                    let bytes = body.map(|b| serde_json::to_vec(&b).expect("body"));
                    let what = format!("{method} {url}{path}");
                    let reply = send(&client, &url, method, &path, bytes, &[])
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(reply.status, 200, "{what}: {reply:?}");
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("writer task");
    }
}

#[tokio::test]
async fn new_empty_region_catches_up() {
    let (a, b, c) = ("us-east", "eu-west", "ap-south");
    let links = mesh(&[a, b, c]);
    let link = |from: &str, to: &str| links[&(from.to_string(), to.to_string())].clone();
    // Started together, as a new cluster does: each answers the other's start-up question.
    let mut east = Region::launch(a, &config_with_peers(&links, a, &[b]), &[]);
    let mut west = Region::launch(b, &config_with_peers(&links, b, &[a]), &[]);
    link(a, b).set_target(port_of(&west.url()));
    link(b, a).set_target(port_of(&east.url()));
    east.wait_ready().await;
    west.wait_ready().await;
    eventually(
        Duration::from_secs(20),
        "us-east and eu-west see each other",
        || async {
            peer_entry(&east, b).await["status"] == "up"
                && peer_entry(&west, a).await["status"] == "up"
        },
    )
    .await;
    for (bucket, kind) in [
        ("reg", "register"),
        ("lww", "lww"),
        ("cnt", "counter"),
        ("set", "set"),
    ] {
        east.create_bucket(bucket, kind).await;
    }
    eventually(Duration::from_secs(20), "buckets replicate", || async {
        west.get("/v1/buckets").await.body["buckets"]
            .as_array()
            .map_or(0, Vec::len)
            == 4
    })
    .await;

    // A few thousand keys of every type, written at both regions.
    let urls = [east.url(), west.url()];
    let mut ops = Vec::new();
    let mut expected: Vec<(String, &str, Value)> = Vec::new();
    for i in 0..2000 {
        let path = kv("reg", &format!("r{i:04}"));
        let value = json!({"i": i, "tag": format!("r{i}")});
        ops.push((
            Method::PUT,
            urls[i % 2].clone(),
            path.clone(),
            Some(value.clone()),
        ));
        expected.push((path, "values", json!([value])));
    }
    for i in 0..500 {
        let path = kv("lww", &format!("l{i:03}"));
        let value = json!(format!("l{i}"));
        ops.push((
            Method::PUT,
            urls[(i + 1) % 2].clone(),
            path.clone(),
            Some(value.clone()),
        ));
        expected.push((path, "values", json!([value])));
    }
    for i in 0..250i64 {
        let path = kv("cnt", &format!("c{i:03}"));
        for (j, url) in urls.iter().enumerate() {
            let by = (i + 1) * (j as i64 * 1000 + 1);
            ops.push((
                Method::POST,
                url.clone(),
                format!("{path}/increment"),
                Some(json!({ "by": by })),
            ));
        }
        expected.push((path, "value", json!((i + 1) * 1002)));
    }
    for i in 0..250 {
        let path = kv("set", &format!("s{i:03}"));
        let members = json!({"members": [format!("a{i}"), format!("b{i}"), format!("c{i}")]});
        ops.push((
            Method::POST,
            urls[i % 2].clone(),
            format!("{path}/add"),
            Some(members),
        ));
        expected.push((
            path,
            "members",
            json!([format!("a{i}"), format!("b{i}"), format!("c{i}")]),
        ));
    }
    let client = east.client();
    let started = Instant::now();
    run_all(&client, ops, 16).await;
    eprintln!("wrote {} keys in {:?}", expected.len(), started.elapsed());
    // Removes after the adds, so they observe what they remove.
    let removes = (0..250)
        .map(|i| {
            let path = format!("{}/remove", kv("set", &format!("s{i:03}")));
            let body = json!({"members": [format!("b{i}")]});
            (Method::POST, urls[(i + 1) % 2].clone(), path, Some(body))
        })
        .collect();
    // Both regions must have the adds before either removes.
    eventually(
        CONVERGE,
        "us-east and eu-west replicate everything",
        || async { peer_settled(&east, b).await && peer_settled(&west, a).await },
    )
    .await;
    run_all(&client, removes, 16).await;
    for (_, field, value) in expected.iter_mut() {
        if *field == "members" {
            if let Some(members) = value.as_array_mut() {
                members.remove(1);
            }
        }
    }
    eventually(
        CONVERGE,
        "us-east and eu-west replicate everything",
        || async { peer_settled(&east, b).await && peer_settled(&west, a).await },
    )
    .await;

    // Add ap-south: the old regions learn of it, then it starts with an empty disk.
    east.reconfigure(&config_with_peers(&links, a, &[b, c]));
    west.reconfigure(&config_with_peers(&links, b, &[a, c]));
    east.restart().await;
    west.restart().await;
    link(c, a).set_target(port_of(&east.url()));
    link(c, b).set_target(port_of(&west.url()));
    let started = Instant::now();
    let new = Region::start_with(c, &config_with_peers(&links, c, &[a, b])).await;
    link(a, c).set_target(port_of(&new.url()));
    link(b, c).set_target(port_of(&new.url()));
    let view = wait_caught_up(&new, Duration::from_secs(45)).await;
    eprintln!(
        "ap-south caught up {:?} after start: {view}",
        started.elapsed()
    );
    let text = scrape(&new).await;
    assert_eq!(sample(&text, "meridian_caught_up", &[]), 1.0, "{text}");
    // Most of what ap-south holds came through exchanges (its own fetches or its peers'
    // pushes): the old regions' logs were truncated long before it existed.
    let repaired = repaired_at(&[&east, &west, &new], c).await;
    assert!(
        repaired >= 1000.0,
        "anti-entropy changed only {repaired} keys in the new region"
    );

    // Caught up means caught up: every key, right away, from ap-south's own storage.
    let buckets = new.get("/v1/buckets").await;
    assert_eq!(
        buckets.body["buckets"].as_array().map_or(0, Vec::len),
        4,
        "{buckets:?}"
    );
    let url = new.url();
    let checks: Vec<_> = (0..8)
        .map(|t| {
            let mine: Vec<_> = expected.iter().skip(t).step_by(8).cloned().collect();
            let (client, url) = (new.client(), url.clone());
            tokio::spawn(async move {
                let mut wrong = Vec::new();
                for (path, field, value) in mine {
                    let full = format!("{path}?consistency=local");
                    let reply = send(&client, &url, Method::GET, &full, None, &[])
                        .await
                        .unwrap_or_else(|e| panic!("GET {full}: {e}"));
                    if reply.status != 200 || reply.body[field] != value {
                        wrong.push(format!(
                            "{path}: expected {field} = {value}, got {} {}",
                            reply.status, reply.text
                        ));
                    }
                }
                wrong
            })
        })
        .collect();
    let mut wrong = Vec::new();
    for check in checks {
        wrong.extend(check.await.expect("reader task"));
    }
    assert!(
        wrong.is_empty(),
        "{} of {} keys wrong at ap-south after caught_up; first: {:#?}",
        wrong.len(),
        expected.len(),
        &wrong[..wrong.len().min(10)]
    );
}

/// A region that got a write only through anti-entropy (its log entry was dropped) has
/// applied it: a session read there with the writer's token is served locally, even once the
/// home is unreachable, instead of waiting for a log entry that will never come.
#[tokio::test]
async fn a_region_repaired_by_anti_entropy_serves_session_reads_itself() {
    let cluster = Cluster::start(&REGIONS, AE_ONLY).await;
    cluster
        .create_buckets("us-east", &[("sess", "register")], Some("us-east"))
        .await;
    cluster.cut_off("ap-south");
    cluster.wait_status("us-east", "ap-south", "down").await;
    let written = cluster
        .region("us-east")
        .put(&kv("sess", "k"), &json!("v"))
        .await;
    written.expect(200);
    let token = written
        .header("x-meridian-session")
        .expect("session token")
        .to_string();
    wait_dropped_and_flagged(&cluster, "us-east", "ap-south").await;
    cluster.heal_all();

    let path = format!("{}?consistency=session", kv("sess", "k"));
    let south = cluster.region("ap-south");
    eventually(
        CONVERGE,
        "ap-south serves the session read itself",
        || async {
            let reply = south
                .get_with(&path, &[("x-meridian-session", &token)])
                .await;
            reply.status == 200 && reply.header("x-meridian-region") == Some("ap-south")
        },
    )
    .await;
    cluster.cut_off("us-east");
    cluster.wait_status("ap-south", "us-east", "down").await;
    let reply = south
        .get_with(&path, &[("x-meridian-session", &token)])
        .await;
    assert_eq!(reply.body["values"], json!(["v"]), "{reply:?}");
    assert_eq!(reply.header("x-meridian-region"), Some("ap-south"));
}

/// Writes a set state for `bucket/key` straight into a stopped region's data directory, as a
/// peer's merge that raced the bucket sweep leaves one behind under a bucket of another type.
fn leave_set_state_behind(data_dir: &Path, region: &str, bucket: &str, key: &str) {
    use meridian_region::storage::{KeyWrite, OpenedDb, Storage};
    use meridian_shared::encoding::encode_state;
    use meridian_shared::{Actor, BucketType, KeyState, Op, RegionName};
    use std::sync::Arc;

    let name = RegionName::new(region).expect("region name");
    let metrics = Arc::new(meridian_region::metrics::Metrics::new(region).expect("metrics"));
    let open = || {
        OpenedDb::open(
            data_dir,
            &name,
            common::CLUSTER_ID,
            16 << 20,
            Duration::from_secs(60),
        )
    };
    let opened = open().expect("open the stopped region's data directory");
    let storage = Storage::start(opened, 64, metrics).expect("start its writer");
    let mut state = KeyState::empty(BucketType::Set);
    let members = vec!["stray".to_string()];
    state
        .apply(Op::Add { members }, Actor::from_u128(99), 0)
        .expect("add to a set");
    let write = KeyWrite {
        bucket: bucket.into(),
        key: key.into(),
        state: encode_state(&state),
        tombstone: false,
        logged: false,
        idempotency: None,
        trace: None,
    };
    storage
        .submit_key(write)
        .expect("queue the state")
        .wait()
        .expect("state durable");
    drop(storage);
    // The writer thread closes the database once its queue is gone: wait until it can be
    // opened again, so the region can open it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() > deadline => panic!("database stays open: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[tokio::test]
async fn a_state_of_another_type_left_behind_is_swept_once_anti_entropy_meets_it() {
    let mut cluster = Cluster::start(&["us-east", "eu-west"], AE_ONLY).await;
    cluster
        .region("us-east")
        .create_bucket("typed", "counter")
        .await;
    cluster.wait_buckets(1).await;
    increment(cluster.region("us-east"), &kv("typed", "n"), 3)
        .await
        .expect(200);
    cluster.converged(&kv("typed", "n"), CONVERGE).await;

    let west = cluster.region_mut("eu-west");
    west.stop();
    let dir = west.data_dir();
    // Off the test's runtime: the storage API blocks.
    std::thread::spawn(move || leave_set_state_behind(&dir, "eu-west", "typed", "stray"))
        .join()
        .expect("state left behind");
    // Restarted with the same definition: nothing at start asks for a sweep.
    west.restart().await;

    // Until it is swept, the stray state keeps the trees apart: the peer drops it as foreign
    // each time an exchange offers it, and it stays here.
    eventually(CONVERGE, "the trees agree again", || async {
        let east = cluster_view(cluster.region("us-east")).await;
        let west = cluster_view(cluster.region("eu-west")).await;
        east["tree_root"] == west["tree_root"]
    })
    .await;
    // Counted when the sweep evicts, just after its purge commit changed the tree.
    eventually(
        CONVERGE,
        "the sweep at eu-west counts what it dropped",
        || async {
            let text = scrape(cluster.region("eu-west")).await;
            sample(&text, "meridian_foreign_states_dropped_total", &[]) >= 1.0
        },
    )
    .await;
    let listed = cluster.region("eu-west").get("/v1/kv/typed").await;
    assert_eq!(listed.expect(200)["keys"], json!(["n"]));
    let body = cluster.converged(&kv("typed", "n"), CONVERGE).await;
    assert_eq!(body["value"], json!(3));
}
