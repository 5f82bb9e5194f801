//! Failover writes while the home region is partitioned away, and exact convergence after heal.

mod common;
mod support;

use common::kv;
use serde_json::json;
use std::time::Duration;
use support::Cluster;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERGE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn failover_writes_during_a_partition_merge_exactly_after_heal() {
    let cluster = Cluster::start(&REGIONS, "").await;
    cluster
        .create_buckets(
            "us-east",
            &[("reg", "register"), ("cnt", "counter"), ("set", "set")],
            None,
        )
        .await;
    let home = "ap-south";
    let reg = kv("reg", &cluster.key_homed_at("reg", home, "doc"));
    let cnt = kv("cnt", &cluster.key_homed_at("cnt", home, "hits"));
    let set = kv("set", &cluster.key_homed_at("set", home, "tags"));

    let east = cluster.region("us-east");
    east.put(&reg, &json!("v0")).await.expect(200);
    east.post(&format!("{cnt}/increment"), &json!({"by": 1}))
        .await
        .expect(200);
    east.post(&format!("{set}/add"), &json!({"members": ["m0"]}))
        .await
        .expect(200);
    cluster.converged(&cnt, CONVERGE).await;
    cluster.converged(&set, CONVERGE).await;
    cluster.converged(&reg, CONVERGE).await;

    cluster.cut_off(home);
    cluster.wait_status("us-east", home, "down").await;
    cluster.wait_status("eu-west", home, "down").await;

    // Outside the home: accepted as failover writes.
    let reply = east.put(&reg, &json!("east")).await;
    reply.expect(200);
    assert_eq!(
        reply.header("x-meridian-failover"),
        Some("true"),
        "{reply:?}"
    );
    assert_eq!(reply.header("x-meridian-region"), Some("us-east"));
    let reply = east
        .post(&format!("{cnt}/increment"), &json!({"by": 10}))
        .await;
    reply.expect(200);
    assert_eq!(reply.header("x-meridian-failover"), Some("true"));
    east.post(&format!("{set}/add"), &json!({"members": ["east"]}))
        .await
        .expect(200);
    let west = cluster.region("eu-west");
    west.post(&format!("{cnt}/increment"), &json!({"by": 100}))
        .await
        .expect(200);
    west.post(&format!("{set}/add"), &json!({"members": ["west"]}))
        .await
        .expect(200);

    // The home keeps serving its own clients meanwhile.
    let inside = cluster.region(home);
    let reply = inside.put(&reg, &json!("home")).await;
    reply.expect(200);
    assert_eq!(reply.header("x-meridian-failover"), None);
    inside
        .post(&format!("{cnt}/increment"), &json!({"by": 1000}))
        .await
        .expect(200);
    inside
        .post(&format!("{set}/add"), &json!({"members": ["home"]}))
        .await
        .expect(200);
    inside
        .post(&format!("{set}/remove"), &json!({"members": ["m0"]}))
        .await
        .expect(200);

    cluster.heal_all();
    cluster.wait_all_up().await;
    // Concurrent register writes are kept as siblings; nothing else is lost or doubled.
    let body = cluster.converged(&reg, CONVERGE).await;
    assert_eq!(body["values"], json!(["east", "home"]));
    let body = cluster.converged(&cnt, CONVERGE).await;
    assert_eq!(body["value"], json!(1111));
    let body = cluster.converged(&set, CONVERGE).await;
    assert_eq!(body["members"], json!(["east", "home", "west"]));

    // Writing with the context of the siblings resolves them everywhere.
    let context = cluster.region("eu-west").get(&reg).await.context();
    let reply = cluster
        .region("eu-west")
        .put_with(
            &reg,
            &json!("resolved"),
            &[("x-meridian-context", &context)],
        )
        .await;
    reply.expect(200);
    let body = cluster.converged(&reg, CONVERGE).await;
    assert_eq!(body["values"], json!(["resolved"]));
}

#[tokio::test]
async fn a_forward_with_an_unknown_outcome_is_refused_not_applied_twice() {
    let cluster = Cluster::start(&REGIONS, support::SLOW_DOWN).await;
    cluster
        .create_buckets("us-east", &[("cnt", "counter")], None)
        .await;
    let home = "eu-west";
    let cnt = kv("cnt", &cluster.key_homed_at("cnt", home, "n"));
    let east = cluster.region("us-east");
    east.post(&format!("{cnt}/increment"), &json!({"by": 1}))
        .await
        .expect(200);
    cluster.converged(&cnt, CONVERGE).await;

    // A silent partition: the forward leaves, nothing comes back.
    cluster.link("us-east", home).blackhole();
    let reply = east
        .post(&format!("{cnt}/increment"), &json!({"by": 5}))
        .await;
    common::assert_error(&reply, 503, "unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"));
    // Not applied at us-east (and the blackhole delivered nothing to the home).
    assert_eq!(east.get(&cnt).await.body["value"], json!(1));

    // Once membership has declared the home down, writes fail over.
    cluster.wait_status("us-east", home, "down").await;
    let reply = east
        .post(&format!("{cnt}/increment"), &json!({"by": 2}))
        .await;
    reply.expect(200);
    assert_eq!(reply.header("x-meridian-failover"), Some("true"));

    cluster.heal_all();
    let body = cluster.converged(&cnt, CONVERGE).await;
    assert_eq!(body["value"], json!(3));
}

#[tokio::test]
async fn buckets_created_with_different_types_on_both_sides_of_a_partition_converge() {
    let cluster = Cluster::start(&["us-east", "eu-west"], "").await;
    cluster.cut_off("eu-west");
    let (east, west) = (cluster.region("us-east"), cluster.region("eu-west"));
    east.put("/v1/buckets/split", &json!({"type": "counter"}))
        .await
        .expect(201);
    west.put("/v1/buckets/split", &json!({"type": "set"}))
        .await
        .expect(201);
    for key in ["both", "east-only"] {
        east.post(
            &format!("{}/increment", kv("split", key)),
            &json!({"by": 5}),
        )
        .await
        .expect(200);
    }
    for key in ["both", "west-only"] {
        west.post(
            &format!("{}/add", kv("split", key)),
            &json!({"members": ["m"]}),
        )
        .await
        .expect(200);
    }

    cluster.heal_all();
    support::eventually(CONVERGE, "one definition everywhere", || async {
        let (a, b) = (
            east.get("/v1/buckets/split").await,
            west.get("/v1/buckets/split").await,
        );
        a.body == b.body
    })
    .await;
    let definition = west.get("/v1/buckets/split").await;
    let winner = definition.body["type"].as_str().unwrap_or_default();
    // Every key reads the same everywhere, and the regions hold the same states.
    let keys = ["both", "east-only", "west-only"];
    support::eventually(CONVERGE, "the keys and trees agree", || async {
        for key in keys {
            let (a, b) = (
                east.get(&kv("split", key)).await,
                west.get(&kv("split", key)).await,
            );
            if (a.status, &a.body) != (b.status, &b.body) {
                return false;
            }
        }
        let root = |r: common::Reply| r.body["tree_root"].clone();
        root(east.get("/v1/cluster").await) == root(west.get("/v1/cluster").await)
    })
    .await;
    // What was written under the winning type is intact; the losing type's states are gone.
    let read = |key| async move { west.get(&kv("split", key)).await.body };
    if winner == "counter" {
        assert_eq!(read("both").await["value"], json!(5));
        assert_eq!(read("east-only").await["value"], json!(5));
        assert_eq!(read("west-only").await["value"], json!(0));
    } else {
        assert_eq!(winner, "set");
        assert_eq!(read("both").await["members"], json!(["m"]));
        assert_eq!(read("west-only").await["members"], json!(["m"]));
        assert_eq!(read("east-only").await["members"], json!([]));
    }
}
