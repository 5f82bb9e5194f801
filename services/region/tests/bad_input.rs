//! Bad input: one test per error row of docs/contract-details.md that a single region can
//! produce, and one test that sends all of them to the same region and then checks that it
//! still serves and lost nothing.
//!
//! Every region here runs with `max_body_bytes = 1024`.

mod common;

use common::{assert_error, bucket_path, kv, Region};
use meridian_shared::session::SessionToken;
use reqwest::Method;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const REG: &str = "bi-reg";
const CNT: &str = "bi-cnt";
const SET: &str = "bi-set";

/// Keys of the fixture: the rows aim their bad requests at `TARGET`; nothing touches `ASIDE`.
const TARGET: &str = "keep";
const ASIDE: &str = "aside";

/// A region with a register, a counter and a set bucket and known values in each.
async fn fixture(name: &str) -> Region {
    let region = Region::start_with(name, "max_body_bytes = 1024").await;
    region.create_bucket(REG, "register").await;
    region.create_bucket(CNT, "counter").await;
    region.create_bucket(SET, "set").await;
    for key in [TARGET, ASIDE] {
        region
            .put(&kv(REG, key), &json!({ "intact": true, "n": 42 }))
            .await
            .expect(200);
        region
            .post(&incr(CNT, key), &json!({ "by": 42 }))
            .await
            .expect(200);
        region
            .post(&add(SET, key), &json!({ "members": ["kept"] }))
            .await
            .expect(200);
    }
    region
}

/// The region still serves and the fixture's values under `key` are exactly as written.
async fn assert_intact(region: &Region, key: &str) {
    assert_eq!(region.get("/healthz").await.status, 200);
    let get = region.get(&kv(REG, key)).await;
    assert_eq!(
        get.expect(200)["values"],
        json!([{ "intact": true, "n": 42 }]),
        "{REG}/{key}"
    );
    let get = region.get(&kv(CNT, key)).await;
    assert_eq!(get.expect(200)["value"], json!(42), "{CNT}/{key}");
    let get = region.get(&kv(SET, key)).await;
    assert_eq!(get.expect(200)["members"], json!(["kept"]), "{SET}/{key}");
}

fn incr(bucket: &str, key: &str) -> String {
    format!("{}/increment", kv(bucket, key))
}

fn add(bucket: &str, key: &str) -> String {
    format!("{}/add", kv(bucket, key))
}

fn remove(bucket: &str, key: &str) -> String {
    format!("{}/remove", kv(bucket, key))
}

async fn raw(region: &Region, method: Method, path: &str, body: &str) -> common::Reply {
    region
        .call_raw(method, path, Some(body.as_bytes().to_vec()), &[])
        .await
}

/// The checks, each usable on its own fresh region or all in a row on one region.
mod rows {
    use super::*;

    pub async fn invalid_json_on_bucket_put(region: &Region) {
        for body in ["{\"type\": ", "not json", "{\"type\": \"counter\",}", ""] {
            let reply = raw(region, Method::PUT, &bucket_path("bi-new"), body).await;
            assert_error(&reply, 400, "invalid_json");
        }
        let reply = region.get(&bucket_path("bi-new")).await;
        assert_error(&reply, 404, "bucket_not_found");
    }

    pub async fn invalid_json_on_increment(region: &Region) {
        for body in ["{\"by\": 1", "by=1", "{by: 1}"] {
            let reply = raw(region, Method::POST, &incr(CNT, TARGET), body).await;
            assert_error(&reply, 400, "invalid_json");
        }
        let reply = raw(region, Method::POST, &add(SET, TARGET), "[\"x\"").await;
        assert_error(&reply, 400, "invalid_json");
    }

    pub async fn invalid_json_on_register_put(region: &Region) {
        for body in ["{\"a\": ", "undefined", "'single'", "{\"a\": 1} trailing"] {
            let reply = raw(region, Method::PUT, &kv(REG, TARGET), body).await;
            assert_error(&reply, 400, "invalid_json");
        }
    }

    pub async fn invalid_body_wrong_types(region: &Region) {
        for body in [
            json!({ "by": "x" }),
            json!({ "by": 1.5 }),
            json!({ "by": null }),
            json!([1]),
            json!(7),
        ] {
            let reply = region.post(&incr(CNT, TARGET), &body).await;
            assert_error(&reply, 422, "invalid_body");
        }
        for body in [
            json!({ "members": [1] }),
            json!({ "members": "a" }),
            json!({ "members": ["a", null] }),
        ] {
            let reply = region.post(&add(SET, TARGET), &body).await;
            assert_error(&reply, 422, "invalid_body");
            let reply = region.post(&remove(SET, TARGET), &body).await;
            assert_error(&reply, 422, "invalid_body");
        }
        let reply = region
            .put(&bucket_path("bi-typed"), &json!({ "type": ["counter"] }))
            .await;
        assert_error(&reply, 422, "invalid_body");
    }

    pub async fn invalid_body_missing_field(region: &Region) {
        let reply = region.post(&incr(CNT, TARGET), &json!({})).await;
        assert_error(&reply, 422, "invalid_body");
        let reply = region.post(&incr(CNT, TARGET), &json!({ "bye": 1 })).await;
        assert_error(&reply, 422, "invalid_body");
        let reply = region.post(&add(SET, TARGET), &json!({})).await;
        assert_error(&reply, 422, "invalid_body");
        let reply = region.post(&remove(SET, TARGET), &json!({})).await;
        assert_error(&reply, 422, "invalid_body");
        let reply = region
            .put(&bucket_path("bi-untyped"), &json!({ "home_region": null }))
            .await;
        assert_error(&reply, 422, "invalid_body");
    }

    pub async fn invalid_body_unknown_bucket_type(region: &Region) {
        let reply = region
            .put(&bucket_path("bi-map"), &json!({ "type": "map" }))
            .await;
        assert_error(&reply, 422, "invalid_body");
    }

    pub async fn unknown_region_as_home(region: &Region) {
        let reply = region
            .put(
                &bucket_path("bi-far"),
                &json!({ "type": "lww", "home_region": "mars" }),
            )
            .await;
        assert_error(&reply, 422, "unknown_region");
    }

    pub async fn bucket_not_found(region: &Region) {
        let missing = "bi-nowhere";
        assert_error(
            &region.get(&kv(missing, "k")).await,
            404,
            "bucket_not_found",
        );
        assert_error(
            &region.put(&kv(missing, "k"), &json!(1)).await,
            404,
            "bucket_not_found",
        );
        assert_error(
            &region.delete(&kv(missing, "k")).await,
            404,
            "bucket_not_found",
        );
        assert_error(
            &region.post(&incr(missing, "k"), &json!({ "by": 1 })).await,
            404,
            "bucket_not_found",
        );
        assert_error(
            &region
                .post(&add(missing, "k"), &json!({ "members": ["a"] }))
                .await,
            404,
            "bucket_not_found",
        );
        assert_error(
            &region.get(&format!("/v1/kv/{missing}")).await,
            404,
            "bucket_not_found",
        );
        assert_error(
            &region.get(&bucket_path(missing)).await,
            404,
            "bucket_not_found",
        );
    }

    pub async fn key_not_found(region: &Region) {
        assert_error(
            &region.get(&kv(REG, "never-written")).await,
            404,
            "key_not_found",
        );
    }

    pub async fn type_mismatch(region: &Region) {
        // Counter and set operations on a register bucket.
        let reply = region.post(&incr(REG, TARGET), &json!({ "by": 1 })).await;
        assert_error(&reply, 409, "type_mismatch");
        let reply = region
            .post(&add(REG, TARGET), &json!({ "members": ["a"] }))
            .await;
        assert_error(&reply, 409, "type_mismatch");
        // Register and set operations on a counter bucket.
        let reply = region.put(&kv(CNT, TARGET), &json!(5)).await;
        assert_error(&reply, 409, "type_mismatch");
        let reply = region
            .post(&add(CNT, TARGET), &json!({ "members": ["a"] }))
            .await;
        assert_error(&reply, 409, "type_mismatch");
        let reply = region.delete(&kv(CNT, TARGET)).await;
        assert_error(&reply, 409, "type_mismatch");
        // Counter and register operations on a set bucket.
        let reply = region.post(&incr(SET, TARGET), &json!({ "by": 1 })).await;
        assert_error(&reply, 409, "type_mismatch");
        let reply = region.put(&kv(SET, TARGET), &json!(["a"])).await;
        assert_error(&reply, 409, "type_mismatch");
    }

    pub async fn counter_overflow(region: &Region) {
        // Past i64: refused, the value stays exact.
        let reply = region
            .post(&incr(CNT, TARGET), &json!({ "by": i64::MAX }))
            .await;
        assert_error(&reply, 422, "counter_overflow");
        // Within i64 at every step, but this region's own total of increments would pass
        // u64 on the third +MAX: refused, not wrapped around and lost.
        let edge = incr(CNT, "edge");
        for (by, value) in [
            (i64::MAX, i64::MAX),
            (-i64::MAX, 0),
            (i64::MAX, i64::MAX),
            (-i64::MAX, 0),
        ] {
            let reply = region.post(&edge, &json!({ "by": by })).await;
            assert_eq!(reply.expect(200)["value"], json!(value), "by {by}");
        }
        let reply = region.post(&edge, &json!({ "by": i64::MAX })).await;
        assert_error(&reply, 422, "counter_overflow");
        let get = region.get(&kv(CNT, "edge")).await;
        assert_eq!(get.expect(200)["value"], json!(0));
    }

    pub async fn invalid_name_too_long(region: &Region) {
        let long = "k".repeat(257);
        let reply = region.put(&kv(REG, &long), &json!(1)).await;
        assert_error(&reply, 400, "invalid_name");
        let reply = region.get(&kv(REG, &long)).await;
        assert_error(&reply, 400, "invalid_name");
        // Multi-byte: 129 × "é" is 258 bytes (129 characters).
        let reply = region.put(&kv(REG, &"é".repeat(129)), &json!(1)).await;
        assert_error(&reply, 400, "invalid_name");
        let reply = region
            .put(&bucket_path(&"b".repeat(257)), &json!({ "type": "set" }))
            .await;
        assert_error(&reply, 400, "invalid_name");
        // The boundary itself is fine.
        let ok = "k".repeat(256);
        region.put(&kv(REG, &ok), &json!("edge")).await.expect(200);
        let get = region.get(&kv(REG, &ok)).await;
        assert_eq!(get.expect(200)["values"], json!(["edge"]));
    }

    pub async fn invalid_name_characters(region: &Region) {
        for key in ["bad%01key", "tab%09key", "del%7Fkey", "a%2Fb"] {
            let path = format!("/v1/kv/{REG}/{key}");
            let reply = region.put(&path, &json!(1)).await;
            assert_error(&reply, 400, "invalid_name");
        }
        let reply = region
            .put("/v1/buckets/a%2Fb", &json!({ "type": "register" }))
            .await;
        assert_error(&reply, 400, "invalid_name");
        let reply = region
            .put("/v1/buckets/ctl%01name", &json!({ "type": "register" }))
            .await;
        assert_error(&reply, 400, "invalid_name");
        let reply = region.get("/v1/buckets/a%2Fb").await;
        assert_error(&reply, 400, "invalid_name");
    }

    pub async fn payload_too_large(region: &Region) {
        // Just under the limit is accepted...
        let fits = json!("x".repeat(900));
        region.put(&kv(REG, "big"), &fits).await.expect(200);
        // ...just over it is not, on every body-carrying route.
        let too_big = json!("y".repeat(2000));
        let reply = region.put(&kv(REG, "big"), &too_big).await;
        assert_error(&reply, 413, "payload_too_large");
        let members: Vec<String> = (0..300).map(|i| format!("m{i:04}")).collect();
        let reply = region
            .post(&add(SET, "big"), &json!({ "members": members }))
            .await;
        assert_error(&reply, 413, "payload_too_large");
        let padded = format!("{{\"by\": 1{}}}", " ".repeat(4096));
        let reply = raw(region, Method::POST, &incr(CNT, TARGET), &padded).await;
        assert_error(&reply, 413, "payload_too_large");
        // The refused write did not happen.
        let get = region.get(&kv(REG, "big")).await;
        assert_eq!(get.expect(200)["values"], json!([fits]));
    }

    pub async fn invalid_context(region: &Region) {
        for token in ["not a token!", "AAAA", "%%%", "eyJhbGciOi"] {
            let reply = region
                .put_with(
                    &kv(REG, TARGET),
                    &json!("overwritten"),
                    &[("X-Meridian-Context", token)],
                )
                .await;
            assert_error(&reply, 400, "invalid_context");
        }
        let reply = region
            .call(
                Method::DELETE,
                &kv(REG, TARGET),
                None,
                &[("X-Meridian-Context", "not a token!")],
            )
            .await;
        assert_error(&reply, 400, "invalid_context");
    }

    pub async fn invalid_session(region: &Region) {
        let path = format!("{}?consistency=session", kv(REG, TARGET));
        for token in ["not a token!", "%%%", "AAAA"] {
            let reply = region
                .get_with(&path, &[("X-Meridian-Session", token)])
                .await;
            assert_error(&reply, 400, "invalid_session");
        }
    }

    pub async fn session_ahead_of_region(region: &Region) {
        let path = format!("{}?consistency=session", kv(REG, TARGET));
        let read = region.get(&path).await;
        read.expect(200);
        let issued = read.header("x-meridian-session").expect("a session token");
        let mut token = SessionToken::decode(issued).expect("the region's own token");
        assert!(
            !token.seen.is_empty(),
            "the token covers the fixture's writes"
        );
        for seq in token.seen.values_mut() {
            *seq += 1_000_000;
        }
        let started = Instant::now();
        let reply = region
            .get_with(&path, &[("X-Meridian-Session", &token.encode())])
            .await;
        assert_error(&reply, 422, "session_ahead_of_region");
        // Refused at once, not after the bounded wait for replication (1 s).
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    pub async fn invalid_parameter(region: &Region) {
        let key = kv(REG, TARGET);
        for query in ["consistency=bogus", "consistency=strong"] {
            let reply = region.get(&format!("{key}?{query}")).await;
            assert_error(&reply, 400, "invalid_parameter");
        }
        let reply = region
            .put(&format!("{key}?ack=bogus"), &json!("overwritten"))
            .await;
        assert_error(&reply, 400, "invalid_parameter");
        let reply = region
            .post(
                &format!("{}?ack=bogus", incr(CNT, TARGET)),
                &json!({ "by": 1 }),
            )
            .await;
        assert_error(&reply, 400, "invalid_parameter");
        for query in ["limit=0", "limit=1001", "limit=-1", "limit=ten"] {
            let reply = region.get(&format!("/v1/kv/{REG}?{query}")).await;
            assert_error(&reply, 400, "invalid_parameter");
        }
        // The edges of the range are fine.
        for query in ["limit=1", "limit=1000"] {
            let reply = region.get(&format!("/v1/kv/{REG}?{query}")).await;
            reply.expect(200);
        }
        // A parameter of the other kind of request is refused, not ignored.
        let reply = region.get(&format!("{key}?ack=all")).await;
        assert_error(&reply, 400, "invalid_parameter");
        let reply = region
            .put(&format!("{key}?consistency=home"), &json!("overwritten"))
            .await;
        assert_error(&reply, 400, "invalid_parameter");
        let reply = region
            .post(
                &format!("{}?consistency=all", incr(CNT, TARGET)),
                &json!({ "by": 1 }),
            )
            .await;
        assert_error(&reply, 400, "invalid_parameter");
        // A listing checks its consistency, and serves only what it can honour.
        for query in [
            "consistency=bogus",
            "consistency=home",
            "consistency=quorum",
            "ack=all",
        ] {
            let reply = region.get(&format!("/v1/kv/{REG}?{query}")).await;
            assert_error(&reply, 400, "invalid_parameter");
        }
        for query in [
            "consistency=local",
            "consistency=session",
            "prefix=k&consistency=local",
        ] {
            let reply = region.get(&format!("/v1/kv/{REG}?{query}")).await;
            reply.expect(200);
            assert!(reply.header("x-meridian-session").is_some(), "{reply:?}");
        }
        // A value that is not UTF-8 once decoded is refused, not turned into U+FFFD.
        for query in ["after=%FF", "prefix=%C3", "consistency=%FFlocal"] {
            let reply = region.get(&format!("/v1/kv/{REG}?{query}")).await;
            assert_error(&reply, 400, "invalid_parameter");
        }
        let reply = region.get(&format!("/v1/kv/{REG}?after=%C3%A9")).await;
        reply.expect(200);
    }

    pub async fn invalid_idempotency_key(region: &Region) {
        for key in ["not-a-uuid", "12345", "0f8fad5b-d9cb-469f-a165-70867728950"] {
            let reply = region
                .post_with(
                    &incr(CNT, TARGET),
                    &json!({ "by": 1 }),
                    &[("Idempotency-Key", key)],
                )
                .await;
            assert_error(&reply, 400, "invalid_idempotency_key");
        }
    }

    pub async fn unknown_route(region: &Region) {
        for path in [
            "/v2/kv/x/y",
            "/nothing",
            "/v1/kv/bi-reg/keep/explode",
            "/v1",
        ] {
            let reply = region.get(path).await;
            assert_error(&reply, 404, "not_found");
        }
    }

    pub async fn method_not_allowed(region: &Region) {
        let reply = region.call(Method::DELETE, "/v1/buckets", None, &[]).await;
        assert_error(&reply, 405, "method_not_allowed");
        assert_eq!(reply.header("allow"), Some("GET"));
        let reply = region
            .call(Method::GET, &incr(CNT, TARGET), None, &[])
            .await;
        assert_error(&reply, 405, "method_not_allowed");
        assert_eq!(reply.header("allow"), Some("POST"));
        let reply = region.call(Method::POST, &kv(REG, TARGET), None, &[]).await;
        assert_error(&reply, 405, "method_not_allowed");
        assert_eq!(reply.header("allow"), Some("GET, PUT, DELETE"));
        // The operations routes too, not a 404.
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
            let reply = region.call(Method::POST, path, None, &[]).await;
            assert_error(&reply, 405, "method_not_allowed");
            assert_eq!(reply.header("allow"), Some("GET"), "{path}");
        }
    }
}

/// One test per row on a fresh region, plus one test that sends every row to the same region
/// (each row in its own task, so a failing row does not hide the rest) and then checks that
/// the region still serves and lost nothing.
macro_rules! bad_input_tests {
    ($($row:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $row() {
                let region = fixture("bad-input").await;
                rows::$row(&region).await;
                assert_intact(&region, TARGET).await;
                assert_intact(&region, ASIDE).await;
            }
        )*

        #[tokio::test]
        async fn the_region_survives_every_bad_request_in_a_row() {
            let region = Arc::new(fixture("bad-all").await);
            let mut failed_rows = Vec::new();
            $(
                let shared = Arc::clone(&region);
                let outcome = tokio::spawn(async move { rows::$row(&shared).await }).await;
                if outcome.is_err() {
                    failed_rows.push(stringify!($row));
                }
            )*
            // Whatever the rows found, the region still serves and lost nothing...
            assert_intact(&region, ASIDE).await;
            assert_eq!(region.get("/readyz").await.status, 200);
            // ...and still takes writes.
            region
                .post(&incr(CNT, "after"), &json!({ "by": 1 }))
                .await
                .expect(200);
            let get = region.get(&kv(CNT, "after")).await;
            assert_eq!(get.expect(200)["value"], json!(1));
            assert!(
                failed_rows.is_empty(),
                "the region survived, but these rows failed (see their panics above): \
                 {failed_rows:?}"
            );
            // No refused request changed the values the rows aimed at.
            assert_intact(&region, TARGET).await;
        }
    };
}

bad_input_tests!(
    invalid_json_on_bucket_put,
    invalid_json_on_increment,
    invalid_json_on_register_put,
    invalid_body_wrong_types,
    invalid_body_missing_field,
    invalid_body_unknown_bucket_type,
    unknown_region_as_home,
    bucket_not_found,
    key_not_found,
    type_mismatch,
    counter_overflow,
    invalid_name_too_long,
    invalid_name_characters,
    payload_too_large,
    invalid_context,
    invalid_session,
    session_ahead_of_region,
    invalid_parameter,
    invalid_idempotency_key,
    unknown_route,
    method_not_allowed,
);
