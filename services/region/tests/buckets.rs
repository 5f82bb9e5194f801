//! Bucket definitions: create, re-create, conflicts, listing, lookup and refusals.

mod common;

use common::{assert_error, bucket_path, Region};
use serde_json::json;

#[tokio::test]
async fn each_bucket_type_is_created_and_can_be_read_back() {
    let region = Region::start("bk-create").await;
    for kind in ["register", "lww", "counter", "set"] {
        let name = format!("bk-{kind}");
        let reply = region
            .put(&bucket_path(&name), &json!({ "type": kind }))
            .await;
        let expected = json!({ "name": name, "type": kind, "home_region": null });
        assert_eq!(reply.expect(201), &expected, "create {kind}");

        let reply = region.get(&bucket_path(&name)).await;
        assert_eq!(reply.expect(200), &expected, "get {kind}");
    }
}

#[tokio::test]
async fn identical_re_create_is_200_with_the_same_definition() {
    let region = Region::start("bk-recreate").await;
    let plain = json!({ "type": "counter" });
    let first = region.put(&bucket_path("bk-again"), &plain).await;
    first.expect(201);
    let second = region.put(&bucket_path("bk-again"), &plain).await;
    assert_eq!(second.expect(200), &first.body);

    // With a home region (the only region of this cluster).
    let homed = json!({ "type": "set", "home_region": "bk-recreate" });
    let first = region.put(&bucket_path("bk-homed"), &homed).await;
    assert_eq!(
        first.expect(201),
        &json!({ "name": "bk-homed", "type": "set", "home_region": "bk-recreate" })
    );
    let second = region.put(&bucket_path("bk-homed"), &homed).await;
    assert_eq!(second.expect(200), &first.body);
}

#[tokio::test]
async fn a_different_definition_is_409_bucket_conflict_and_changes_nothing() {
    let region = Region::start("bk-conflict").await;
    region.create_bucket("bk-fixed", "register").await;

    let reply = region
        .put(&bucket_path("bk-fixed"), &json!({ "type": "lww" }))
        .await;
    assert_error(&reply, 409, "bucket_conflict");

    let reply = region
        .put(
            &bucket_path("bk-fixed"),
            &json!({ "type": "register", "home_region": "bk-conflict" }),
        )
        .await;
    assert_error(&reply, 409, "bucket_conflict");

    let reply = region.get(&bucket_path("bk-fixed")).await;
    assert_eq!(
        reply.expect(200),
        &json!({ "name": "bk-fixed", "type": "register", "home_region": null })
    );
}

#[tokio::test]
async fn listing_is_sorted_by_name_and_survives_a_restart() {
    let mut region = Region::start("bk-list").await;
    let created = [
        ("zeta", "set"),
        ("alpha", "register"),
        ("Mid", "counter"),
        ("beta-2", "lww"),
        ("beta", "counter"),
    ];
    for (name, kind) in created {
        region.create_bucket(name, kind).await;
    }
    let mut expected: Vec<_> = created.to_vec();
    expected.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let expected = json!({
        "buckets": expected
            .iter()
            .map(|(name, kind)| json!({ "name": name, "type": kind, "home_region": null }))
            .collect::<Vec<_>>()
    });

    let reply = region.get("/v1/buckets").await;
    assert_eq!(reply.expect(200), &expected);

    region.kill9();
    region.restart().await;
    let reply = region.get("/v1/buckets").await;
    assert_eq!(reply.expect(200), &expected, "after kill -9 and restart");
}

#[tokio::test]
async fn unknown_bucket_is_404_bucket_not_found() {
    let region = Region::start("bk-missing").await;
    let reply = region.get(&bucket_path("bk-never-created")).await;
    assert_error(&reply, 404, "bucket_not_found");
}

#[tokio::test]
async fn unknown_type_is_422_invalid_body_and_creates_nothing() {
    let region = Region::start("bk-badtype").await;
    for body in [
        json!({ "type": "map" }),
        json!({ "type": "Register" }),
        json!({ "type": 3 }),
        json!({}),
    ] {
        let reply = region.put(&bucket_path("bk-weird"), &body).await;
        assert_error(&reply, 422, "invalid_body");
    }
    let reply = region.get(&bucket_path("bk-weird")).await;
    assert_error(&reply, 404, "bucket_not_found");
    assert_eq!(
        region.get("/v1/buckets").await.expect(200),
        &json!({ "buckets": [] })
    );
}

#[tokio::test]
async fn home_region_outside_the_cluster_is_422_unknown_region() {
    let region = Region::start("bk-home").await;
    let reply = region
        .put(
            &bucket_path("bk-far"),
            &json!({ "type": "register", "home_region": "mars" }),
        )
        .await;
    assert_error(&reply, 422, "unknown_region");
    let reply = region.get(&bucket_path("bk-far")).await;
    assert_error(&reply, 404, "bucket_not_found");
}
