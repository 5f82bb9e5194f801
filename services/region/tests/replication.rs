//! Three real regions on loopback: replication of every bucket type, forwarding to the home,
//! `ack=all`, and session reads that never go back in time.

mod common;
mod support;

use common::kv;
use serde_json::{json, Value};
use std::time::Duration;
use support::Cluster;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERGE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn every_bucket_type_replicates_to_every_region() {
    every_bucket_type_replicates("").await;
}

#[tokio::test]
async fn every_bucket_type_replicates_with_partition_actors_on_the_single_worker() {
    every_bucket_type_replicates("workers = 1").await;
}

/// Writes every bucket type at every region of a cluster started with `extra` configuration
/// and finds the merged values everywhere.
async fn every_bucket_type_replicates(extra: &str) {
    let cluster = Cluster::start(&REGIONS, extra).await;
    let first = cluster.region("us-east");
    for (bucket, kind) in [
        ("reg", "register"),
        ("lww", "lww"),
        ("cnt", "counter"),
        ("set", "set"),
    ] {
        first.create_bucket(bucket, kind).await;
    }
    cluster.wait_buckets(4).await;

    for (i, region) in cluster.regions.iter().enumerate() {
        region
            .put(
                &kv("reg", &format!("k{i}")),
                &json!({"from": region.name()}),
            )
            .await
            .expect(200);
        region
            .put(&kv("lww", "shared"), &json!(i))
            .await
            .expect(200);
        let by = i as i64 + 1;
        region
            .post(
                &format!("{}/increment", kv("cnt", "hits")),
                &json!({"by": by}),
            )
            .await
            .expect(200);
        let members = json!({"members": [region.name()]});
        region
            .post(&format!("{}/add", kv("set", "s")), &members)
            .await
            .expect(200);
    }

    for (i, region) in cluster.regions.iter().enumerate() {
        let body = cluster
            .converged(&kv("reg", &format!("k{i}")), CONVERGE)
            .await;
        assert_eq!(body["values"], json!([{"from": region.name()}]));
    }
    // The lww writes went one after another: the last one wins everywhere.
    let body = cluster.converged(&kv("lww", "shared"), CONVERGE).await;
    assert_eq!(body["values"], json!([2]));
    let body = cluster.converged(&kv("cnt", "hits"), CONVERGE).await;
    assert_eq!(body["value"], json!(6));
    let body = cluster.converged(&kv("set", "s"), CONVERGE).await;
    assert_eq!(body["members"], json!(["ap-south", "eu-west", "us-east"]));
}

#[tokio::test]
async fn writes_at_a_region_that_is_not_home_are_forwarded_to_the_home() {
    let cluster = Cluster::start(&REGIONS, "").await;
    cluster
        .region("us-east")
        .create_bucket("fwd", "register")
        .await;
    let pinned = json!({"type": "counter", "home_region": "eu-west"});
    cluster
        .region("us-east")
        .put("/v1/buckets/pinned", &pinned)
        .await
        .expect(201);
    cluster.wait_buckets(2).await;

    for home in REGIONS {
        let key = cluster.key_homed_at("fwd", home, "k");
        for region in cluster.regions.iter().filter(|r| r.name() != home) {
            let reply = region.put(&kv("fwd", &key), &json!(region.name())).await;
            reply.expect(200);
            assert_eq!(reply.header("x-meridian-region"), Some(home), "{reply:?}");
            assert_eq!(reply.header("x-meridian-home"), Some(home));
            assert_eq!(reply.header("x-meridian-failover"), None);
        }
    }
    let reply = cluster
        .region("ap-south")
        .post(
            &format!("{}/increment", kv("pinned", "any")),
            &json!({"by": 3}),
        )
        .await;
    reply.expect(200);
    assert_eq!(reply.header("x-meridian-region"), Some("eu-west"));
    assert_eq!(reply.body["value"], json!(3));
}

#[tokio::test]
async fn a_write_right_after_creating_its_bucket_reaches_a_home_that_has_not_seen_it_yet() {
    let cluster = Cluster::start(&REGIONS, "").await;
    let here = cluster.region("us-east");
    // The definition replicates asynchronously; the forwarded write brings it along, so the
    // home never answers 404 for a bucket the client has just been told exists.
    for i in 0..20 {
        let bucket = format!("fresh{i}");
        let def = json!({"type": "register", "home_region": "eu-west"});
        here.put(&format!("/v1/buckets/{bucket}"), &def)
            .await
            .expect(201);
        let reply = here.put(&kv(&bucket, "k"), &json!(i)).await;
        reply.expect(200);
        assert_eq!(reply.header("x-meridian-region"), Some("eu-west"));
    }
    let body = cluster.converged(&kv("fresh19", "k"), CONVERGE).await;
    assert_eq!(body["values"], json!([19]));
}

#[tokio::test]
async fn ack_all_returns_only_once_every_region_has_applied_the_write() {
    // Slow failure detection: the first write after the cut must find the victim still up.
    let extra = format!("ack_timeout_ms = 1500\n{}", support::SLOW_DOWN);
    let cluster = Cluster::start(&REGIONS, &extra).await;
    cluster
        .region("us-east")
        .create_bucket("acks", "counter")
        .await;
    cluster.wait_buckets(1).await;
    let path = kv("acks", "n");
    for i in 0..15i64 {
        let writer = &cluster.regions[i as usize % 3];
        let reply = writer
            .post(&format!("{path}/increment?ack=all"), &json!({"by": 1}))
            .await;
        reply.expect(200);
        // No waiting: ack=all promised every region has it now.
        for region in &cluster.regions {
            let value = region.get(&path).await.body["value"].clone();
            assert_eq!(
                value,
                json!(i + 1),
                "{} after ack=all write {i}",
                region.name()
            );
        }
    }

    // With a region unreachable, ack=all cannot be met: 504, and the write is not rolled back.
    let home = cluster.home_of("acks", "n");
    let other = REGIONS
        .iter()
        .find(|r| **r != home)
        .copied()
        .unwrap_or("us-east");
    let victim = REGIONS
        .iter()
        .find(|r| **r != home && **r != other)
        .copied()
        .unwrap_or("ap-south");
    cluster.cut_off(victim);
    let reply = cluster
        .region(other)
        .post(&format!("{path}/increment?ack=all"), &json!({"by": 1}))
        .await;
    common::assert_error(&reply, 504, "consistency_timeout");
    // Applied at the home all the same: the answer says where, with a session covering it.
    assert_eq!(reply.header("x-meridian-region"), Some(home.as_str()));
    assert!(reply.header("x-meridian-session").is_some(), "{reply:?}");
    // Once the region is known to be down, ack=all is refused before anything is applied.
    // (The write goes to the home: that is where it is checked.)
    cluster.wait_status(&home, victim, "down").await;
    let refused = cluster
        .region(other)
        .post(&format!("{path}/increment?ack=all"), &json!({"by": 1}))
        .await;
    common::assert_error(&refused, 503, "unavailable");
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
    let message = refused.body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains(victim), "names the region down: {message}");
    // A quorum (two of three) is still reachable.
    cluster
        .region(other)
        .post(&format!("{path}/increment?ack=quorum"), &json!({"by": 10}))
        .await
        .expect(200);
    cluster.heal_all();
    let body = cluster.converged(&path, CONVERGE).await;
    assert_eq!(
        body["value"],
        json!(26),
        "the refused write was not applied"
    );
}

#[tokio::test]
async fn session_reads_see_the_sessions_own_writes_and_never_go_back() {
    let cluster = Cluster::start(&REGIONS, "session_wait_ms = 300\n").await;
    let pinned = json!({"type": "register", "home_region": "us-east"});
    cluster
        .region("us-east")
        .put("/v1/buckets/sess", &pinned)
        .await
        .expect(201);
    cluster.wait_buckets(1).await;
    // Replication into eu-west crawls: a plain local read there would be stale.
    cluster.link("us-east", "eu-west").slow(400);
    let path = kv("sess", "doc");
    let mut token = String::new();
    for version in 1..=6i64 {
        let mut headers = vec![];
        if !token.is_empty() {
            headers.push(("x-meridian-session", token.as_str()));
        }
        let reply = cluster
            .region("us-east")
            .put_with(&path, &json!(version), &headers)
            .await;
        reply.expect(200);
        token = reply
            .header("x-meridian-session")
            .expect("session token")
            .to_string();
        for reader in ["eu-west", "ap-south"] {
            let read = cluster
                .region(reader)
                .get_with(
                    &format!("{path}?consistency=session"),
                    &[("x-meridian-session", &token)],
                )
                .await;
            read.expect(200);
            assert_eq!(
                read.body["values"],
                json!([version]),
                "{reader} read after write {version}"
            );
            token = read
                .header("x-meridian-session")
                .expect("session token")
                .to_string();
        }
    }
    cluster.heal_all();
    let body: Value = cluster.converged(&path, CONVERGE).await;
    assert_eq!(body["values"], json!([6]));
}

#[tokio::test]
async fn a_session_token_from_a_read_covers_the_value_read_wherever_it_was_written() {
    // The value a client reads in us-east was written in ap-south: a session read in eu-west,
    // which has not received it, must not answer the older value.
    let cluster = Cluster::start(&REGIONS, "session_wait_ms = 300\n").await;
    let pinned = json!({"type": "register", "home_region": "ap-south"});
    cluster
        .region("ap-south")
        .put("/v1/buckets/mono", &pinned)
        .await
        .expect(201);
    cluster.wait_buckets(1).await;
    let path = kv("mono", "doc");
    let home = cluster.region("ap-south");
    home.put(&path, &json!("old")).await.expect(200);
    cluster.converged(&path, CONVERGE).await;

    cluster.cut_off("eu-west");
    home.put(&path, &json!("new")).await.expect(200);
    let east = cluster.region("us-east");
    support::eventually(CONVERGE, "us-east has the new value", || async {
        east.get(&path).await.body["values"] == json!(["new"])
    })
    .await;
    let read = east.get(&path).await;
    let token = read
        .header("x-meridian-session")
        .expect("session token")
        .to_string();

    let session_read = format!("{path}?consistency=session");
    let stale = cluster
        .region("eu-west")
        .get_with(&session_read, &[("x-meridian-session", &token)])
        .await;
    // It cannot have the new value, nor reach the home: refusing is the only right answer.
    assert_ne!(stale.status, 200, "went back in time: {stale:?}");
    assert!(
        matches!(stale.status, 503 | 504),
        "a clear refusal: {stale:?}"
    );

    cluster.heal_all();
    let west = cluster.region("eu-west");
    support::eventually(CONVERGE, "eu-west serves the session read", || async {
        let read = west
            .get_with(&session_read, &[("x-meridian-session", &token)])
            .await;
        // Until it has caught up (or reaches the home) it refuses; it never answers "old".
        if read.status == 200 {
            assert_eq!(read.body["values"], json!(["new"]), "{read:?}");
        }
        read.status == 200
    })
    .await;
}

#[tokio::test]
async fn session_tokens_leave_out_what_every_region_has_applied() {
    let cluster = Cluster::start(&REGIONS, "").await;
    cluster
        .create_buckets("us-east", &[("tok", "counter")], None)
        .await;
    let path = kv("tok", "n");
    let write = cluster
        .region("us-east")
        .post(&format!("{path}/increment"), &json!({"by": 1}))
        .await;
    write.expect(200);
    let fresh = write
        .header("x-meridian-session")
        .expect("session token")
        .to_string();
    assert_ne!(fresh, EMPTY_TOKEN, "the write is not everywhere yet");
    cluster.converged(&path, CONVERGE).await;
    // Once the heartbeats say every region has applied everything, a token carries nothing:
    // it stays small however many writes and incarnations the cluster has seen.
    let west = cluster.region("eu-west");
    support::eventually(CONVERGE, "an empty session token", || async {
        let read = west
            .get_with(&path, &[("x-meridian-session", &fresh)])
            .await;
        read.header("x-meridian-session") == Some(EMPTY_TOKEN)
    })
    .await;
}

/// The header form of a token with no entries.
const EMPTY_TOKEN: &str = "AA";

#[tokio::test]
async fn a_session_read_of_a_bucket_not_yet_known_here_waits_not_404() {
    let cluster = Cluster::start(&REGIONS, "session_wait_ms = 300\n").await;
    cluster.cut_off("eu-west");
    let east = cluster.region("us-east");
    east.put("/v1/buckets/late", &json!({"type": "counter"}))
        .await
        .expect(201);
    let path = kv("late", "n");
    let write = east
        .post(&format!("{path}/increment"), &json!({"by": 1}))
        .await;
    write.expect(200);
    let token = write
        .header("x-meridian-session")
        .expect("session token")
        .to_string();
    let west = cluster.region("eu-west");
    let session_read = format!("{path}?consistency=session");
    // The bucket has not reached eu-west: the session has seen more than it has applied.
    let early = west
        .get_with(&session_read, &[("x-meridian-session", &token)])
        .await;
    common::assert_error(&early, 504, "consistency_timeout");
    // Without a session, an unknown bucket is just unknown.
    common::assert_error(&west.get(&path).await, 404, "bucket_not_found");

    cluster.heal_all();
    support::eventually(CONVERGE, "eu-west serves the session read", || async {
        let read = west
            .get_with(&session_read, &[("x-meridian-session", &token)])
            .await;
        read.status == 200 && read.body["value"] == json!(1)
    })
    .await;
}

#[tokio::test]
async fn a_quorum_read_does_not_wait_for_a_hung_peer_when_another_answers() {
    // A long forward timeout: waiting for the hung peer would show.
    let cluster =
        Cluster::start_with_env(&REGIONS, "", &[("MERIDIAN_FORWARD_TIMEOUT_MS", "5000")]).await;
    cluster
        .create_buckets("us-east", &[("qr", "register")], Some("us-east"))
        .await;
    let path = kv("qr", "k");
    let east = cluster.region("us-east");
    east.put(&path, &json!("v")).await.expect(200);
    cluster.converged(&path, CONVERGE).await;

    cluster.region("ap-south").pause();
    let started = std::time::Instant::now();
    let read = east.get(&format!("{path}?consistency=quorum")).await;
    let took = started.elapsed();
    cluster.region("ap-south").resume();
    assert_eq!(read.expect(200)["values"], json!(["v"]), "{read:?}");
    assert!(
        took < Duration::from_millis(2500),
        "answered by eu-west, not after ap-south's 5 s timeout: {took:?}"
    );
}

/// Sends `PUT path` with the path bytes exactly as given (an HTTP client library would
/// normalise them first); returns the status code.
fn raw_put(url: &str, path: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("answer");
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

#[tokio::test]
async fn a_forward_acts_on_exactly_the_names_validated_where_the_client_sent_it() {
    let cluster = Cluster::start(&REGIONS, "").await;
    cluster
        .create_buckets(
            "us-east",
            &[("pub", "register"), ("priv", "register")],
            Some("eu-west"),
        )
        .await;
    let west = cluster.region("eu-west");
    west.put(&kv("priv", "secret"), &json!("original"))
        .await
        .expect(200);
    // A raw `\` is a legal name character, but a URL parser turns it into `/` and then
    // resolves the `..`: forwarded as received, this would write priv/secret.
    let sneaky = r"x\..\..\priv\secret";
    let status = raw_put(
        &cluster.region("us-east").url(),
        &format!("/v1/kv/pub/{sneaky}"),
        "\"sneaky\"",
    );
    assert_eq!(status, 200);
    assert_eq!(
        west.get(&kv("priv", "secret")).await.expect(200)["values"],
        json!(["original"])
    );
    assert_eq!(
        west.get(&kv("pub", sneaky)).await.expect(200)["values"],
        json!(["sneaky"])
    );
}

#[tokio::test]
async fn forward_headers_sent_by_a_client_are_not_trusted() {
    let cluster = Cluster::start_with_env(
        &REGIONS,
        "",
        &[("MERIDIAN_SECURITY", "{peer_token=\"peer-secret\"}")],
    )
    .await;
    cluster
        .create_buckets("us-east", &[("fw", "counter")], Some("eu-west"))
        .await;
    let path = format!("{}/increment", kv("fw", "n"));
    let east = cluster.region("us-east");
    // Posing as the home's forward: still forwarded to the real home, not applied here.
    let reply = east
        .post_with(
            &path,
            &json!({"by": 1}),
            &[("x-meridian-forwarded-by", "eu-west")],
        )
        .await;
    reply.expect(200);
    assert_eq!(
        reply.header("x-meridian-region"),
        Some("eu-west"),
        "{reply:?}"
    );
    assert_eq!(reply.header("x-meridian-failover"), None);
    // A bucket definition sent along by a client creates nothing.
    let forged = r#"{"name":"forged","kind":"register","home_region":"mars"}"#;
    let reply = east
        .put_with(
            &kv("forged", "k"),
            &json!("v"),
            &[
                ("x-meridian-forwarded-by", "eu-west"),
                ("x-meridian-bucket-def", forged),
            ],
        )
        .await;
    common::assert_error(&reply, 404, "bucket_not_found");
    east.get("/v1/buckets/forged").await.expect(404);
}

/// Asserts that `region`'s `/v1/cluster` shows `peer` down.
async fn assert_sees_down(region: &common::Region, peer: &str) {
    let view = region.get("/v1/cluster").await;
    let entry = view.body["regions"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["name"] == peer))
        .cloned()
        .unwrap_or_default();
    assert_eq!(entry["status"], json!("down"), "{view:?}");
}

#[tokio::test]
async fn a_peer_url_that_answers_as_another_region_is_refused() {
    let other = common::Region::start("ap-south").await;
    let config = format!(
        "heartbeat_interval_ms = 100\n[peers]\neu-west = \"{}\"\n",
        other.url()
    );
    let region = common::Region::start_with("us-east", &config).await;
    let said = "answers as another region";
    support::eventually(CONVERGE, "the mismatch is reported", || async {
        region.log().contains(said)
    })
    .await;
    // Ten more such heartbeats say nothing new.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(region.log().matches(said).count(), 1, "{}", region.log());
    assert_sees_down(&region, "eu-west").await;
}

#[tokio::test]
async fn a_peer_of_another_cluster_is_reported_once_as_a_misconfiguration() {
    let other =
        common::Region::start_with_env("eu-west", "", &[("MERIDIAN_CLUSTER_ID", "elsewhere")])
            .await;
    let config = format!(
        "heartbeat_interval_ms = 100\nstartup_peer_wait_ms = 300\n[peers]\neu-west = \"{}\"\n",
        other.url()
    );
    let region = common::Region::start_with("us-east", &config).await;
    let said = "the peer refuses this region";
    support::eventually(CONVERGE, "the refusal is reported", || async {
        region.log().contains(said)
    })
    .await;
    // Ten more refused heartbeats say nothing new.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let log = region.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(said)).collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("ERROR") && lines[0].contains("403"),
        "{}",
        lines[0]
    );
    assert_sees_down(&region, "eu-west").await;
}

#[tokio::test]
async fn a_key_state_is_bounded_and_a_large_one_still_replicates() {
    // Batches of 64 KiB: the old peer body limit (2 × batch + 1 MiB) refused the record of a
    // 1.8 MB register state forever, and replication to that peer stopped for every key.
    let extra = "replication_batch_bytes = 65536\nmax_state_bytes = 2500000\n";
    let cluster = Cluster::start(&["us-east", "eu-west"], extra).await;
    let home = cluster.region("us-east");
    let other = cluster.region("eu-west");
    home.put(
        "/v1/buckets/big",
        &json!({"type": "register", "home_region": "us-east"}),
    )
    .await
    .expect(201);
    cluster.wait_buckets(1).await;

    let path = kv("big", "k");
    let stale = home.put(&path, &json!("seed")).await.context();
    let value = |c: char| json!(c.to_string().repeat(900_000));
    for c in ['a', 'b'] {
        home.put_with(&path, &value(c), &[("X-Meridian-Context", &stale)])
            .await
            .expect(200);
    }
    // A third sibling would take the state past max_state_bytes: refused, nothing changed.
    let refused = home
        .put_with(&path, &value('c'), &[("X-Meridian-Context", &stale)])
        .await;
    common::assert_error(&refused, 413, "state_too_large");
    home.put(&kv("big", "after"), &json!("small"))
        .await
        .expect(200);

    let body = cluster.converged(&path, CONVERGE).await;
    assert_eq!(body["values"], json!([value('a'), value('b')]));
    let body = cluster.converged(&kv("big", "after"), CONVERGE).await;
    assert_eq!(body["values"], json!(["small"]));

    // Resolving the siblings with their context shrinks the state, and that replicates too.
    let context = other.get(&path).await.context();
    home.put_with(
        &path,
        &json!("resolved"),
        &[("X-Meridian-Context", &context)],
    )
    .await
    .expect(200);
    let body = cluster.converged(&path, CONVERGE).await;
    assert_eq!(body["values"], json!(["resolved"]));
}

#[tokio::test]
async fn a_restarted_region_takes_ack_all_writes_before_its_first_heartbeat_round() {
    // Heartbeats every 2 s: a write right after the restart comes long before the first one.
    let slow_beats = [("MERIDIAN_HEARTBEAT_INTERVAL_MS", "2000")];
    let mut cluster = Cluster::start_with_env(&REGIONS, "", &slow_beats).await;
    cluster
        .region("us-east")
        .put(
            "/v1/buckets/acked",
            &json!({"type": "counter", "home_region": "us-east"}),
        )
        .await
        .expect(201);
    cluster.wait_buckets(1).await;
    cluster.region_mut("us-east").restart().await;
    // The peers answered the restarted region's start-up question: they count as up.
    let path = format!("{}/increment?ack=all", kv("acked", "n"));
    let reply = cluster
        .region("us-east")
        .post(&path, &json!({"by": 1}))
        .await;
    assert_eq!(reply.expect(200), &json!({"value": 1}), "{reply:?}");
}

#[tokio::test]
async fn a_region_restarted_without_its_data_serves_no_session_it_cannot_cover() {
    let mut cluster = Cluster::start(&REGIONS, "session_wait_ms = 300\n").await;
    let east = cluster.region("us-east");
    east.put("/v1/buckets/kept", &json!({"type": "register"}))
        .await
        .expect(201);
    cluster.wait_buckets(1).await;
    let path = kv("kept", "k");
    east.put(&path, &json!("v1")).await.expect(200);
    cluster.converged(&path, CONVERGE).await;
    // Once every region has applied the write, a read's token leaves it out.
    let deadline = std::time::Instant::now() + CONVERGE;
    let token = loop {
        let read = cluster.region("us-east").get(&path).await;
        let token = read.header("x-meridian-session").unwrap_or("?").to_string();
        let decoded = meridian_shared::session::SessionToken::decode(&token);
        if decoded.is_ok_and(|t| t == Default::default()) {
            break token;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "token never emptied: {token}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // ap-south comes back on an empty disk while no peer can refill it.
    let south = cluster.region_mut("ap-south");
    south.stop();
    std::fs::remove_dir_all(south.data_dir()).expect("wipe ap-south");
    cluster.cut_off("ap-south");
    cluster.region_mut("ap-south").restart().await;
    let session_read = format!("{path}?consistency=session");
    let south = cluster.region("ap-south");
    let early = south
        .get_with(&session_read, &[("x-meridian-session", &token)])
        .await;
    // Before: 404 bucket_not_found, for data the session had read.
    assert!(
        matches!(early.status, 503 | 504),
        "not served from an empty disk: {early:?}"
    );

    cluster.heal_all();
    support::eventually(CONVERGE, "ap-south serves the session read", || async {
        let read = cluster
            .region("ap-south")
            .get_with(&session_read, &[("x-meridian-session", &token)])
            .await;
        read.status == 200 && read.body["values"] == json!(["v1"])
    })
    .await;
}

/// Asserts that a session read answered either the value the session has seen or a clear
/// refusal: never the older value.
#[track_caller]
fn assert_not_back_in_time(read: &common::Reply, seen: &Value) {
    if read.status == 200 {
        assert_eq!(&read.body["values"], seen, "went back in time: {read:?}");
    } else {
        assert!(
            matches!(read.status, 503 | 504),
            "a clear refusal: {read:?}"
        );
    }
}

/// A register bucket homed at ap-south holding "old" everywhere; returns the key's path.
async fn old_value_homed_at_ap_south(cluster: &Cluster, bucket: &str) -> String {
    let pinned = json!({"type": "register", "home_region": "ap-south"});
    cluster
        .region("ap-south")
        .put(&format!("/v1/buckets/{bucket}"), &pinned)
        .await
        .expect(201);
    cluster.wait_buckets(1).await;
    let path = kv(bucket, "doc");
    cluster
        .region("ap-south")
        .put(&path, &json!("old"))
        .await
        .expect(200);
    cluster.converged(&path, CONVERGE).await;
    path
}

#[tokio::test]
async fn a_token_from_a_quorum_read_covers_what_it_merged_from_a_peer() {
    // us-east reads ap-south's newer value with consistency=quorum while nothing of it has
    // reached eu-west, nor can. A session read in eu-west with the token (or with the token
    // of a later local read of us-east's repaired copy) must not answer the old value.
    let quiet = "session_wait_ms = 300\nanti_entropy_interval_ms = 600000\n";
    let cluster = Cluster::start(&REGIONS, quiet).await;
    let path = old_value_homed_at_ap_south(&cluster, "quorum").await;
    cluster.link("ap-south", "us-east").cut();
    cluster.link("ap-south", "eu-west").cut();
    cluster.link("us-east", "eu-west").cut();
    cluster.wait_status("us-east", "eu-west", "down").await;
    cluster
        .region("ap-south")
        .put(&path, &json!("new"))
        .await
        .expect(200);

    let east = cluster.region("us-east");
    let quorum = east.get(&format!("{path}?consistency=quorum")).await;
    assert_eq!(quorum.expect(200)["values"], json!(["new"]));
    let local = east.get(&path).await;
    assert_eq!(local.expect(200)["values"], json!(["new"]), "repaired here");

    let session_read = format!("{path}?consistency=session");
    let west = cluster.region("eu-west");
    for read in [&quorum, &local] {
        let token = read.header("x-meridian-session").expect("session token");
        let answer = west
            .get_with(&session_read, &[("x-meridian-session", token)])
            .await;
        // Before: the token covered nothing eu-west lacks, and it answered "old".
        assert_not_back_in_time(&answer, &json!(["new"]));
    }
}

#[tokio::test]
async fn a_region_serves_no_session_read_past_a_gap_in_a_peers_log_until_it_is_filled() {
    // ap-south drops its hints for eu-west at once (hint_max_bytes = 0), so its log reaches
    // eu-west with a gap that hides "new". eu-west's applied vector jumps the gap; until an
    // exchange has filled it, a session that saw "new" must not be served "old" there.
    let config = "session_wait_ms = 300\nhint_max_bytes = 0\nanti_entropy_interval_ms = 600000\n";
    let cluster = Cluster::start(&REGIONS, config).await;
    let path = old_value_homed_at_ap_south(&cluster, "gap").await;
    let south = cluster.region("ap-south");
    let link = cluster.link("ap-south", "eu-west");
    link.cut();
    cluster.wait_status("ap-south", "eu-west", "down").await;
    let write = south.put(&path, &json!("new")).await;
    write.expect(200);
    let token = write
        .header("x-meridian-session")
        .expect("session token")
        .to_string();
    // Dropped for eu-west and, once us-east has it too, truncated from the log.
    support::eventually(CONVERGE, "ap-south's log emptied", || async {
        let metrics = south.get("/metrics").await.text;
        support::sample(&metrics, "meridian_replication_log_entries", &[]) == 0.0
    })
    .await;

    // ap-south's own exchange with eu-west goes over this link: slowed, it repairs "new"
    // seconds after the next log entry has reached eu-west past the gap.
    link.heal();
    link.slow(150);
    cluster.wait_status("ap-south", "eu-west", "up").await;
    let later = kv("gap", "later");
    south.put(&later, &json!("x")).await.expect(200);
    let west = cluster.region("eu-west");
    support::eventually(CONVERGE, "the later write reaches eu-west", || async {
        west.get(&later).await.status == 200
    })
    .await;
    let session_read = format!("{path}?consistency=session");
    let read = west
        .get_with(&session_read, &[("x-meridian-session", &token)])
        .await;
    assert_not_back_in_time(&read, &json!(["new"]));

    // eu-west's own exchange fills the gap: it then serves the session itself.
    support::eventually(
        CONVERGE,
        "eu-west serves the session read itself",
        || async {
            let read = west
                .get_with(&session_read, &[("x-meridian-session", &token)])
                .await;
            assert_not_back_in_time(&read, &json!(["new"]));
            read.status == 200 && read.header("x-meridian-region") == Some("eu-west")
        },
    )
    .await;
}

#[tokio::test]
async fn a_new_cluster_serves_session_reads_with_anti_entropy_off() {
    // Every region starts on an empty disk at the same moment and hears from every peer that
    // nothing exists yet: none lacks anything, though no exchange will ever run. (Before:
    // each took itself for a wiped region and refused every session read, home included.)
    // A long wait costs nothing when every region answers; it keeps a loaded machine from
    // turning a slow start into a region that took itself for a wiped one.
    let config =
        "anti_entropy_interval_ms = 0\nsession_wait_ms = 300\nstartup_peer_wait_ms = 20000\n";
    let cluster = Cluster::start(&REGIONS, config).await;
    cluster
        .create_buckets("us-east", &[("fresh", "register")], None)
        .await;
    let path = kv("fresh", "k");
    let write = cluster.region("us-east").put(&path, &json!("v1")).await;
    write.expect(200);
    let token = write
        .header("x-meridian-session")
        .expect("session token")
        .to_string();
    let session_read = format!("{path}?consistency=session");
    for region in &cluster.regions {
        support::eventually(
            CONVERGE,
            &format!("{} serves it", region.name()),
            || async {
                let read = region
                    .get_with(&session_read, &[("x-meridian-session", &token)])
                    .await;
                assert_not_back_in_time(&read, &json!(["v1"]));
                read.status == 200
            },
        )
        .await;
    }
}
