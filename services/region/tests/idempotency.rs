//! `Idempotency-Key`: a retried write is applied once and answered like the first time.

mod common;
mod support;

use common::{assert_error, kv, Region, Reply};
use serde_json::json;
use std::time::Duration;
use support::Cluster;

fn incr(bucket: &str, key: &str) -> String {
    format!("{}/increment", kv(bucket, key))
}

fn replayed(reply: &Reply) -> bool {
    reply
        .header("idempotency-replayed")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

#[tokio::test]
async fn a_retried_increment_is_applied_once_and_replayed() {
    let region = Region::start("idem-incr").await;
    region.create_bucket("id-cnt", "counter").await;
    let path = incr("id-cnt", "hits");
    let key = uuid::Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];

    let first = region.post_with(&path, &json!({ "by": 7 }), &headers).await;
    assert_eq!(first.expect(200), &json!({ "value": 7 }));
    assert!(
        !replayed(&first),
        "the first answer is not a replay: {first:?}"
    );

    for attempt in 2..=3 {
        let retry = region.post_with(&path, &json!({ "by": 7 }), &headers).await;
        assert_eq!(retry.status, first.status, "attempt {attempt}");
        assert_eq!(retry.body, first.body, "attempt {attempt}: same body");
        assert!(
            replayed(&retry),
            "attempt {attempt}: Idempotency-Replayed: true; {retry:?}"
        );
    }
    let get = region.get(&kv("id-cnt", "hits")).await;
    assert_eq!(get.expect(200)["value"], json!(7), "applied once");

    // A new key is a new write.
    let other = uuid::Uuid::new_v4().to_string();
    let next = region
        .post_with(&path, &json!({ "by": 7 }), &[("Idempotency-Key", &other)])
        .await;
    assert_eq!(next.expect(200), &json!({ "value": 14 }));
    assert!(!replayed(&next));
    // Without a key every request is applied.
    region.post(&path, &json!({ "by": 1 })).await.expect(200);
    region.post(&path, &json!({ "by": 1 })).await.expect(200);
    let get = region.get(&kv("id-cnt", "hits")).await;
    assert_eq!(get.expect(200)["value"], json!(16));
}

#[tokio::test]
async fn a_key_reused_for_a_different_request_is_409_idempotency_conflict() {
    let region = Region::start("idem-conflict").await;
    region.create_bucket("ic-cnt", "counter").await;
    region.create_bucket("ic-reg", "register").await;
    let key = uuid::Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];

    region
        .post_with(&incr("ic-cnt", "a"), &json!({ "by": 1 }), &headers)
        .await
        .expect(200);

    // Same route, different body.
    let reply = region
        .post_with(&incr("ic-cnt", "a"), &json!({ "by": 2 }), &headers)
        .await;
    assert_error(&reply, 409, "idempotency_conflict");
    // Different key of the same bucket.
    let reply = region
        .post_with(&incr("ic-cnt", "b"), &json!({ "by": 1 }), &headers)
        .await;
    assert_error(&reply, 409, "idempotency_conflict");
    // A different operation altogether.
    let reply = region
        .put_with(&kv("ic-reg", "a"), &json!({ "by": 1 }), &headers)
        .await;
    assert_error(&reply, 409, "idempotency_conflict");

    // None of them was applied.
    let get = region.get(&kv("ic-cnt", "a")).await;
    assert_eq!(get.expect(200)["value"], json!(1));
    let get = region.get(&kv("ic-cnt", "b")).await;
    assert_eq!(get.expect(200)["value"], json!(0));
    assert_error(&region.get(&kv("ic-reg", "a")).await, 404, "key_not_found");
}

#[tokio::test]
async fn register_puts_and_set_adds_are_idempotent_too() {
    let region = Region::start("idem-other").await;
    region.create_bucket("io-reg", "register").await;
    region.create_bucket("io-set", "set").await;

    let key = uuid::Uuid::new_v4().to_string();
    let path = kv("io-reg", "doc");
    let ctx1 = region.put(&path, &json!("v1")).await.context();
    let first = region
        .put_with(
            &path,
            &json!("v2"),
            &[("Idempotency-Key", &key), ("X-Meridian-Context", &ctx1)],
        )
        .await;
    first.expect(200);
    region.put(&path, &json!("v3")).await.expect(200);
    // The replay answers like the first time and does not write v2 again over v3.
    let retry = region
        .put_with(
            &path,
            &json!("v2"),
            &[("Idempotency-Key", &key), ("X-Meridian-Context", &ctx1)],
        )
        .await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body, first.body);
    assert!(replayed(&retry), "{retry:?}");
    let get = region.get(&path).await;
    assert_eq!(get.expect(200)["values"], json!(["v3"]));

    let set_key = uuid::Uuid::new_v4().to_string();
    let add = format!("{}/add", kv("io-set", "team"));
    let first = region
        .post_with(
            &add,
            &json!({ "members": ["a"] }),
            &[("Idempotency-Key", &set_key)],
        )
        .await;
    assert_eq!(first.expect(200), &json!({ "members": ["a"] }));
    region
        .post(
            &format!("{}/remove", kv("io-set", "team")),
            &json!({ "members": ["a"] }),
        )
        .await
        .expect(200);
    let retry = region
        .post_with(
            &add,
            &json!({ "members": ["a"] }),
            &[("Idempotency-Key", &set_key)],
        )
        .await;
    assert_eq!(retry.body, first.body);
    assert!(replayed(&retry), "{retry:?}");
    let get = region.get(&kv("io-set", "team")).await;
    assert_eq!(
        get.expect(200)["members"],
        json!([]),
        "the add was not re-applied"
    );
}

#[tokio::test]
async fn a_replay_still_works_after_kill_9_and_restart() {
    let mut region = Region::start("idem-crash").await;
    region.create_bucket("ik-cnt", "counter").await;
    let path = incr("ik-cnt", "hits");
    let key = uuid::Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];

    let first = region.post_with(&path, &json!({ "by": 5 }), &headers).await;
    assert_eq!(first.expect(200), &json!({ "value": 5 }));

    region.kill9();
    region.restart().await;

    let retry = region.post_with(&path, &json!({ "by": 5 }), &headers).await;
    assert_eq!(retry.status, 200, "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert!(replayed(&retry), "{retry:?}");
    let get = region.get(&kv("ik-cnt", "hits")).await;
    assert_eq!(
        get.expect(200)["value"],
        json!(5),
        "applied once across the crash"
    );

    let reply = region.post_with(&path, &json!({ "by": 6 }), &headers).await;
    assert_error(&reply, 409, "idempotency_conflict");
}

#[tokio::test]
async fn records_expire_after_the_configured_ttl() {
    let region = Region::start_with("idem-ttl", "idempotency_ttl_secs = 1\n").await;
    region.create_bucket("ttl-cnt", "counter").await;
    let path = incr("ttl-cnt", "n");
    let key = uuid::Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];
    region
        .post_with(&path, &json!({ "by": 1 }), &headers)
        .await
        .expect(200);
    let retry = region.post_with(&path, &json!({ "by": 1 }), &headers).await;
    assert!(
        replayed(&retry),
        "within the TTL a retry is a replay: {retry:?}"
    );

    // Past the TTL (and at least one sweep, every second here) the key is forgotten.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let again = region.post_with(&path, &json!({ "by": 1 }), &headers).await;
        again.expect(200);
        if !replayed(&again) {
            assert_eq!(
                again.body,
                json!({ "value": 2 }),
                "applied anew once expired"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the record never expired"
        );
    }
}

#[tokio::test]
async fn a_retry_at_another_region_while_the_home_is_down_is_replayed_not_applied_again() {
    let cluster = Cluster::start(&["us-east", "eu-west", "ap-south"], "").await;
    cluster
        .create_buckets("ap-south", &[("idc", "counter")], None)
        .await;
    let home = "ap-south";
    let hits = cluster.key_homed_at("idc", home, "hits");
    let path = incr("idc", &hits);
    let marker = kv("idc", &cluster.key_homed_at("idc", home, "marker"));
    let key = uuid::Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];
    let at_home = cluster.region(home);
    let first = at_home
        .post_with(&path, &json!({ "by": 5 }), &headers)
        .await;
    assert_eq!(first.expect(200), &json!({ "value": 5 }));
    // The home logs the answer right after the write: once a later write has arrived
    // everywhere, so has the answer.
    at_home
        .post(&format!("{marker}/increment"), &json!({ "by": 1 }))
        .await
        .expect(200);
    cluster.converged(&marker, Duration::from_secs(15)).await;

    cluster.cut_off(home);
    cluster.wait_status("us-east", home, "down").await;
    let east = cluster.region("us-east");
    let retry = east.post_with(&path, &json!({ "by": 5 }), &headers).await;
    assert_eq!(retry.expect(200), &json!({ "value": 5 }), "{retry:?}");
    assert!(
        replayed(&retry),
        "answered from the replicated record: {retry:?}"
    );
    assert_eq!(
        retry.header("x-meridian-failover"),
        None,
        "the home applied it, as the first answer said: {retry:?}"
    );
    // The write is durable at its origin and here: a quorum of three, not all.
    let quorum = east
        .post_with(&format!("{path}?ack=quorum"), &json!({ "by": 5 }), &headers)
        .await;
    assert_eq!(quorum.expect(200), &json!({ "value": 5 }));
    let all = east
        .post_with(&format!("{path}?ack=all"), &json!({ "by": 5 }), &headers)
        .await;
    assert_error(&all, 504, "consistency_timeout");
    let conflict = east.post_with(&path, &json!({ "by": 6 }), &headers).await;
    assert_error(&conflict, 409, "idempotency_conflict");
    // A new key is a new write, accepted as failover.
    let other = uuid::Uuid::new_v4().to_string();
    let fresh = east
        .post_with(&path, &json!({ "by": 5 }), &[("Idempotency-Key", &other)])
        .await;
    assert_eq!(fresh.expect(200), &json!({ "value": 10 }));
    assert_eq!(fresh.header("x-meridian-failover"), Some("true"));

    cluster.heal_all();
    let value = cluster
        .converged(&kv("idc", &hits), Duration::from_secs(20))
        .await;
    assert_eq!(value["value"], json!(10), "applied once each: {value}");
}

/// Three regions whose failure detection is slow (the first request after a hang must find
/// the home still up), and a counter in `bucket` homed at `home` that reads 1 everywhere;
/// the cluster and the counter's path.
async fn counted_once_everywhere(bucket: &str, home: &str) -> (Cluster, String) {
    let cluster = Cluster::start(&["us-east", "eu-west", "ap-south"], support::SLOW_DOWN).await;
    cluster
        .create_buckets("us-east", &[(bucket, "counter")], None)
        .await;
    let hits = kv(bucket, &cluster.key_homed_at(bucket, home, "hits"));
    let east = cluster.region("us-east");
    east.post(&format!("{hits}/increment"), &json!({ "by": 1 }))
        .await
        .expect(200);
    cluster.converged(&hits, Duration::from_secs(15)).await;
    (cluster, hits)
}

#[tokio::test]
async fn a_retry_after_a_forward_with_an_unknown_outcome_waits_for_the_home_not_failover() {
    // The home hangs (SIGSTOP) with the forward unread in its socket: the first attempt's
    // outcome is unknown to the forwarder (the home refuses it once it resumes, too late, but
    // it might have applied it just before it hung). A retry with the same key must not fail
    // over meanwhile, or the increment could count twice.
    let home = "ap-south";
    let (cluster, hits) = counted_once_everywhere("idd", home).await;
    let path = format!("{hits}/increment");
    let key = uuid::Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];
    let east = cluster.region("us-east");

    cluster.region(home).pause();
    let first = east.post_with(&path, &json!({ "by": 100 }), &headers).await;
    assert_error(&first, 503, "unavailable");
    cluster.wait_status("us-east", home, "down").await;
    let retry = east.post_with(&path, &json!({ "by": 100 }), &headers).await;
    assert_error(&retry, 503, "unavailable");
    assert_eq!(
        east.get(&hits).await.body["value"],
        json!(1),
        "not applied here"
    );
    // Without a key a write still fails over: nothing ties it to the first attempt.
    let other = east.post(&path, &json!({ "by": 10 })).await;
    other.expect(200);
    assert_eq!(other.header("x-meridian-failover"), Some("true"));

    cluster.region(home).resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let answer = loop {
        let reply = east.post_with(&path, &json!({ "by": 100 }), &headers).await;
        if reply.status == 200 {
            break reply;
        }
        // 503 until the home is up again; 409 while the first attempt is still in flight.
        assert!(
            matches!(reply.status, 503 | 409),
            "while the home resumes: {reply:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the home never answered the retry: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Applied by the home: the first copy came too late, the retry applied it.
    assert_eq!(answer.header("x-meridian-failover"), None, "{answer:?}");
    let value = cluster.converged(&hits, Duration::from_secs(20)).await;
    assert_eq!(
        value["value"],
        json!(111),
        "the keyed increment applied once: {value}"
    );
}

#[tokio::test]
async fn a_forward_that_reaches_a_hung_home_too_late_is_not_applied_after_a_failover_elsewhere() {
    // The first attempt's forward waits unread in the hung home's socket; the retry goes to a
    // third region, which sees the home down and fails over. When the home resumes it reads
    // the old forward: applying it then would count the increment twice (it did: 201).
    let home = "eu-west";
    let (cluster, hits) = counted_once_everywhere("late", home).await;
    let path = format!("{hits}/increment");
    let key = uuid::Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];
    let (east, south) = (cluster.region("us-east"), cluster.region("ap-south"));
    // The deadline is set on the home's clock, which heartbeats show (one machine here).
    let view = east.get("/v1/cluster").await;
    let offset = view.body["regions"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["name"] == home))
        .and_then(|r| r["clock_offset_ms"].as_i64());
    assert!(offset.is_some_and(|ms| ms.abs() < 500), "{view:?}");

    cluster.region(home).pause();
    let first = east.post_with(&path, &json!({ "by": 100 }), &headers).await;
    assert_error(&first, 503, "unavailable");
    // The failover's answer (its idempotency record) must not reach the home before the old
    // copy does: the copy would be replayed from it then, which proves nothing.
    cluster.link("ap-south", home).cut();
    cluster.wait_status("ap-south", home, "down").await;
    let retry = south
        .post_with(&path, &json!({ "by": 100 }), &headers)
        .await;
    assert_eq!(retry.expect(200), &json!({ "value": 101 }));
    assert_eq!(retry.header("x-meridian-failover"), Some("true"));

    cluster.region(home).resume();
    let late = "meridian_forwards_too_late_total{region=\"eu-west\"} 1";
    support::eventually(
        Duration::from_secs(10),
        "the home refuses the late copy",
        || async {
            cluster
                .region(home)
                .get("/metrics")
                .await
                .text
                .contains(late)
        },
    )
    .await;
    cluster.heal_all();
    let value = cluster.converged(&hits, Duration::from_secs(20)).await;
    assert_eq!(
        value["value"],
        json!(101),
        "the keyed increment applied once: {value}"
    );
}

#[tokio::test]
async fn a_retry_of_a_write_the_home_refused_unapplied_may_fail_over_later() {
    // The home refuses an ack=quorum write up front (it sees no other region up) and says
    // nothing was applied. When the home then goes down, a retry with the same key fails over
    // instead of waiting for the home (before: 503 for the records' whole lifetime).
    let cluster = Cluster::start(&["us-east", "eu-west", "ap-south"], "").await;
    cluster
        .create_buckets("us-east", &[("ref", "counter")], None)
        .await;
    let home = "eu-west";
    let hits = kv("ref", &cluster.key_homed_at("ref", home, "hits"));
    let path = format!("{hits}/increment?ack=quorum");
    let key = uuid::Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];
    cluster.link(home, "us-east").cut();
    cluster.link(home, "ap-south").cut();
    cluster.wait_status(home, "us-east", "down").await;
    cluster.wait_status(home, "ap-south", "down").await;

    let east = cluster.region("us-east");
    let refused = east.post_with(&path, &json!({ "by": 5 }), &headers).await;
    assert_error(&refused, 503, "unavailable");

    cluster.link("us-east", home).cut();
    cluster.wait_status("us-east", home, "down").await;
    let retry = east.post_with(&path, &json!({ "by": 5 }), &headers).await;
    retry.expect(200);
    assert_eq!(
        retry.header("x-meridian-failover"),
        Some("true"),
        "{retry:?}"
    );
    assert_eq!(east.get(&hits).await.body["value"], json!(5));

    cluster.heal_all();
    let value = cluster.converged(&hits, Duration::from_secs(20)).await;
    assert_eq!(value["value"], json!(5), "applied once: {value}");
}
