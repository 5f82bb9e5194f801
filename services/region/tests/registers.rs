//! Registers (`register`, `lww`): round trips, siblings (also with a peer's values), deletes
//! and key listing.

mod common;

use common::{assert_error, assert_key_headers, enc, kv, Region, CLUSTER_ID};
use meridian_shared::encoding::encode_state;
use meridian_shared::log::{LogEntry, LogRecord};
use meridian_shared::wire::{
    ReplicateAck, ReplicateBatch, CLUSTER_HEADER, PEER_HEADER, PROTOCOL_VERSION,
};
use meridian_shared::{Actor, BucketType, KeyState, Op};
use serde_json::{json, Value};

#[tokio::test]
async fn values_round_trip_with_contract_headers() {
    let region = Region::start("reg-trip").await;
    region.create_bucket("rt-reg", "register").await;
    let values = [
        json!({ "name": "ada", "tags": ["x", "y"], "nested": { "ok": true, "n": null } }),
        json!([1, "two", 3.5, false, [], {}]),
        json!("hello ünïcødé ✓"),
        json!(42),
        json!(-7.25),
        json!(null),
        json!({}),
    ];
    for (i, value) in values.iter().enumerate() {
        let key = format!("key-{i}");
        let put = region.put(&kv("rt-reg", &key), value).await;
        put.expect(200);
        put.context();
        assert_key_headers(&put, "reg-trip");

        let get = region.get(&kv("rt-reg", &key)).await;
        let body = get.expect(200);
        assert_eq!(body["values"], json!([value]), "value {i}");
        assert_eq!(body["home_region"], json!("reg-trip"));
        get.context();
        assert_key_headers(&get, "reg-trip");
    }
    // Overwrite with the returned context: exactly the new value.
    let get = region.get(&kv("rt-reg", "key-0")).await;
    let ctx = get.context();
    region
        .put_with(
            &kv("rt-reg", "key-0"),
            &json!("replaced"),
            &[("X-Meridian-Context", &ctx)],
        )
        .await
        .expect(200);
    let get = region.get(&kv("rt-reg", "key-0")).await;
    assert_eq!(get.expect(200)["values"], json!(["replaced"]));
}

#[tokio::test]
async fn keys_with_unusual_characters_round_trip() {
    let region = Region::start("reg-names").await;
    region.create_bucket("rn-reg", "register").await;
    let long = "k".repeat(256);
    for key in [
        "with space",
        "ünïcødé-ключ",
        "a?b#c&d=e%f",
        "+plus+",
        long.as_str(),
    ] {
        region
            .put(&kv("rn-reg", key), &json!({ "key": key }))
            .await
            .expect(200);
        let get = region.get(&kv("rn-reg", key)).await;
        assert_eq!(get.expect(200)["values"], json!([{ "key": key }]), "{key}");
    }
}

#[tokio::test]
async fn every_consistency_and_ack_level_works_on_a_single_region() {
    let region = Region::start("reg-levels").await;
    region.create_bucket("lv-reg", "register").await;
    for ack in ["local", "quorum", "all"] {
        let path = format!("{}?ack={ack}", kv("lv-reg", ack));
        region.put(&path, &json!({ "ack": ack })).await.expect(200);
    }
    let put = region.put(&kv("lv-reg", "s"), &json!("mine")).await;
    put.expect(200);
    let session = put.header("x-meridian-session").unwrap_or("").to_string();
    for consistency in ["local", "home", "session", "quorum", "all"] {
        let path = format!("{}?consistency={consistency}", kv("lv-reg", "s"));
        let get = region
            .get_with(&path, &[("X-Meridian-Session", &session)])
            .await;
        assert_eq!(get.expect(200)["values"], json!(["mine"]), "{consistency}");
        assert_key_headers(&get, "reg-levels");
    }
    for ack in ["local", "quorum", "all"] {
        let get = region.get(&kv("lv-reg", ack)).await;
        assert_eq!(get.expect(200)["values"], json!([{ "ack": ack }]), "{ack}");
    }
}

#[tokio::test]
async fn a_stale_context_creates_siblings_that_a_later_write_resolves() {
    let region = Region::start("reg-siblings").await;
    region.create_bucket("sb-reg", "register").await;
    let path = kv("sb-reg", "doc");

    let ctx1 = region.put(&path, &json!("v1")).await.context();

    // No context: the write has seen everything, so it supersedes v1.
    region.put(&path, &json!("v2")).await.expect(200);
    let get = region.get(&path).await;
    assert_eq!(get.expect(200)["values"], json!(["v2"]));

    // ctx1 has not seen v2: v3 is concurrent with it.
    region
        .put_with(&path, &json!("v3"), &[("X-Meridian-Context", &ctx1)])
        .await
        .expect(200);
    let get = region.get(&path).await;
    assert_eq!(
        get.expect(200)["values"],
        json!(["v2", "v3"]),
        "siblings, sorted by JSON text"
    );
    let merged = get.context();

    region
        .put_with(&path, &json!("v4"), &[("X-Meridian-Context", &merged)])
        .await
        .expect(200);
    let get = region.get(&path).await;
    assert_eq!(get.expect(200)["values"], json!(["v4"]));
}

#[tokio::test]
async fn a_write_supersedes_the_peer_values_merged_before_it() {
    let region = Region::start("reg-peer").await;
    region.create_bucket("pm-reg", "register").await;
    let path = kv("pm-reg", "doc");
    // Written here first, so the partition actor holds the key's state when the peer's arrives.
    region.put(&path, &json!("v0")).await.expect(200);

    let peer = Actor::new_v4();
    let mut theirs = KeyState::empty(BucketType::Register);
    let write = Op::Put {
        value: json!("v1").to_string(),
        context: None,
    };
    theirs.apply(write, peer, 1).expect("a put fits a register");
    replicate(&region, peer, 1, &theirs).await;
    let get = region.get(&path).await;
    assert_eq!(get.expect(200)["values"], json!(["v0", "v1"]), "concurrent");

    // No context: the write has seen everything here, the peer's value included.
    region.put(&path, &json!("v2")).await.expect(200);
    assert_eq!(region.get(&path).await.expect(200)["values"], json!(["v2"]));

    // The peer's state again (a later entry, or anti-entropy): v2 superseded v1, so v1 stays
    // gone. Had the write been built on the state from before the merge, v1 would be back.
    replicate(&region, peer, 2, &theirs).await;
    assert_eq!(region.get(&path).await.expect(200)["values"], json!(["v2"]));
}

/// Sends `state` of `pm-reg/doc` as entry `seq` of peer incarnation `peer`'s replication log,
/// as a peer's replicator would; asserts the region applied it.
async fn replicate(region: &Region, peer: Actor, seq: u64, state: &KeyState) {
    let record = LogRecord {
        committed_us: 0,
        trace: None,
        log_offset: 0,
        entry: LogEntry::Key {
            bucket: "pm-reg".into(),
            key: "doc".into(),
            state: encode_state(state),
        },
    };
    let batch = ReplicateBatch {
        version: PROTOCOL_VERSION,
        incarnation: peer,
        resync: false,
        records: vec![(seq, record.encode())],
    };
    let reply = region
        .client()
        .post(format!("{}/internal/v1/replicate", region.url()))
        .header(PEER_HEADER, "a-peer")
        .header(CLUSTER_HEADER, CLUSTER_ID)
        .body(batch.encode())
        .send()
        .await
        .expect("the region answers");
    assert_eq!(reply.status(), 200, "replicate");
    let body = reply.bytes().await.expect("a replication ack");
    let ack: ReplicateAck = postcard::from_bytes(&body).expect("a replication ack");
    assert_eq!(ack.applied, seq);
}

#[tokio::test]
async fn siblings_survive_a_restart() {
    let mut region = Region::start("reg-sib-restart").await;
    region.create_bucket("sr-reg", "register").await;
    let path = kv("sr-reg", "doc");
    let ctx1 = region.put(&path, &json!({ "v": 1 })).await.context();
    region.put(&path, &json!({ "v": 2 })).await.expect(200);
    region
        .put_with(&path, &json!({ "v": 3 }), &[("X-Meridian-Context", &ctx1)])
        .await
        .expect(200);
    region.kill9();
    region.restart().await;
    let get = region.get(&path).await;
    assert_eq!(get.expect(200)["values"], json!([{ "v": 2 }, { "v": 3 }]));
}

#[tokio::test]
async fn lww_keeps_only_the_last_write() {
    let region = Region::start("reg-lww").await;
    region.create_bucket("lw-lww", "lww").await;
    let path = kv("lw-lww", "doc");
    let ctx1 = region.put(&path, &json!("first")).await.context();
    region.put(&path, &json!("second")).await.expect(200);
    region.put(&path, &json!("third")).await.expect(200);
    let get = region.get(&path).await;
    assert_eq!(get.expect(200)["values"], json!(["third"]));
    assert_key_headers(&get, "reg-lww");

    // A stale context does not create siblings in an lww bucket: the later write wins.
    region
        .put_with(&path, &json!("fourth"), &[("X-Meridian-Context", &ctx1)])
        .await
        .expect(200);
    let get = region.get(&path).await;
    assert_eq!(get.expect(200)["values"], json!(["fourth"]));
}

#[tokio::test]
async fn delete_hides_the_key_and_a_later_put_revives_it() {
    let region = Region::start("reg-delete").await;
    for (bucket, kind) in [("dl-reg", "register"), ("dl-lww", "lww")] {
        region.create_bucket(bucket, kind).await;
        let path = kv(bucket, "doc");
        region.put(&path, &json!({ "alive": 1 })).await.expect(200);

        let del = region.delete(&path).await;
        del.expect(200);
        del.context();
        assert_key_headers(&del, "reg-delete");

        let get = region.get(&path).await;
        assert_error(&get, 404, "key_not_found");
        // Still a key response: the token that covers the delete goes on with the session.
        assert_key_headers(&get, "reg-delete");

        region.put(&path, &json!({ "alive": 2 })).await.expect(200);
        let get = region.get(&path).await;
        assert_eq!(get.expect(200)["values"], json!([{ "alive": 2 }]), "{kind}");
    }

    // A key that was never written is 404 key_not_found too.
    let get = region.get(&kv("dl-reg", "never")).await;
    assert_error(&get, 404, "key_not_found");
    assert_key_headers(&get, "reg-delete");
}

#[tokio::test]
async fn listing_pages_through_keys_in_byte_order() {
    let region = Region::start("reg-list").await;
    region.create_bucket("ls-reg", "register").await;

    // 27 keys under the prefix, two of them deleted: 25 listed.
    for i in 0..27 {
        let key = format!("page-{i:02}");
        region.put(&kv("ls-reg", &key), &json!(i)).await.expect(200);
    }
    for deleted in ["page-03", "page-20"] {
        region.delete(&kv("ls-reg", deleted)).await.expect(200);
    }
    // Neighbours of the prefix that must not be listed under it.
    for other in ["pag", "page", "pagf", "other-1", "Page-01"] {
        region
            .put(&kv("ls-reg", other), &json!(other))
            .await
            .expect(200);
    }
    let expected: Vec<String> = (0..27)
        .filter(|i| *i != 3 && *i != 20)
        .map(|i| format!("page-{i:02}"))
        .collect();

    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 4, "too many pages; seen so far: {seen:?}");
        let mut path = format!("/v1/kv/ls-reg?prefix={}&limit=10", enc("page-"));
        if let Some(after) = &after {
            path.push_str(&format!("&after={}", enc(after)));
        }
        let reply = region.get(&path).await;
        let body = reply.expect(200);
        let keys: Vec<String> = serde_json::from_value(body["keys"].clone())
            .unwrap_or_else(|e| panic!("keys must be strings: {e}; {reply:?}"));
        let start = (pages - 1) * 10;
        let end = (start + 10).min(expected.len());
        assert_eq!(keys, expected[start..end], "page {pages}");
        seen.extend(keys.iter().cloned());
        match &body["next"] {
            Value::Null => break,
            Value::String(next) => {
                assert_eq!(Some(next), keys.last(), "next = last key of the page");
                after = Some(next.clone());
            }
            other => panic!("next must be a string or null, got {other}"),
        }
    }
    assert_eq!(pages, 3, "25 keys at limit 10 are three pages");
    assert_eq!(seen, expected);

    // Without a prefix: everything live, in byte order ("Page-01" < "other-1" < "pag" < ...).
    let reply = region.get("/v1/kv/ls-reg?limit=1000").await;
    let body = reply.expect(200);
    let mut all: Vec<String> = expected.clone();
    all.extend(
        ["pag", "page", "pagf", "other-1", "Page-01"]
            .iter()
            .map(|s| s.to_string()),
    );
    all.sort();
    assert_eq!(body["keys"], json!(all));
    assert_eq!(body["next"], Value::Null);

    // Default limit is 100 and an `after` past the end is an empty last page.
    let reply = region.get("/v1/kv/ls-reg?after=zzz").await;
    assert_eq!(reply.expect(200), &json!({ "keys": [], "next": null }));
}

#[tokio::test]
async fn a_state_merged_past_the_size_limit_can_still_shrink_but_not_grow() {
    use meridian_shared::context::encode_context;
    use meridian_shared::wire::{AeMerged, AeStates};
    let region = Region::start_with("us-east", "max_state_bytes = 2500000\n").await;
    region.create_bucket("big", "register").await;
    // Four concurrent siblings of 0.9 MB from four peers' writes: 3.6 MB, joined past the
    // limit (merges are never refused).
    let sibling = |n: u128| {
        let mut state = KeyState::empty(BucketType::Register);
        let value = serde_json::to_string(&n.to_string().repeat(900_000)).expect("json");
        let put = Op::Put {
            value,
            context: None,
        };
        state.apply(put, Actor::from_u128(n), 1).expect("put");
        state
    };
    let mut two = sibling(1);
    two.merge(sibling(2)).expect("merge");
    let mut four = two.clone();
    four.merge(sibling(3)).expect("merge");
    four.merge(sibling(4)).expect("merge");
    let push = AeStates {
        states: vec![("big".into(), "k".into(), encode_state(&four))],
    };
    let merged: AeMerged = common::internal(&region, "ae/push", &push).await;
    assert_eq!(merged.changed, 1);
    let path = kv("big", "k");
    assert_eq!(
        region.get(&path).await.expect(200)["values"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );

    // Growing it is refused (an empty context supersedes nothing: one more sibling)...
    let stale = encode_context(&Default::default());
    let grow = region
        .put_with(
            &path,
            &json!("x".repeat(900_000)),
            &[("X-Meridian-Context", &stale)],
        )
        .await;
    assert_error(&grow, 413, "state_too_large");
    // ...shrinking it is not, even while it stays over the limit: two siblings resolved into
    // one leaves three (2.7 MB).
    let context = encode_context(&two.context());
    let shrink = region
        .put_with(
            &path,
            &json!("y".repeat(900_000)),
            &[("X-Meridian-Context", &context)],
        )
        .await;
    shrink.expect(200);
    let values = region.get(&path).await.expect(200)["values"].clone();
    assert_eq!(
        values.as_array().map(Vec::len),
        Some(3),
        "{}",
        values.to_string().len()
    );
}
