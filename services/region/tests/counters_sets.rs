//! Counters (PN-counter) and sets (OR-set of strings).

mod common;

use common::{assert_error, assert_key_headers, kv, Region};
use reqwest::Method;
use serde_json::json;
use std::collections::BTreeSet;

fn increment(bucket: &str, key: &str) -> String {
    format!("{}/increment", kv(bucket, key))
}

#[tokio::test]
async fn increments_add_up_including_negative_ones() {
    let region = Region::start("cs-incr").await;
    region.create_bucket("ci-cnt", "counter").await;
    let path = increment("ci-cnt", "hits");
    let mut expected = 0i64;
    for by in [5i64, -8, 10, 0, -1_000_000, 999_999, 3] {
        expected += by;
        let reply = region.post(&path, &json!({ "by": by })).await;
        assert_eq!(reply.expect(200), &json!({ "value": expected }), "by {by}");
        assert_key_headers(&reply, "cs-incr");
    }
    let get = region.get(&kv("ci-cnt", "hits")).await;
    assert_eq!(
        get.expect(200),
        &json!({ "value": expected, "home_region": "cs-incr" })
    );
    assert_key_headers(&get, "cs-incr");
}

#[tokio::test]
async fn a_counter_never_written_reads_zero() {
    let region = Region::start("cs-zero").await;
    region.create_bucket("cz-cnt", "counter").await;
    let get = region.get(&kv("cz-cnt", "untouched")).await;
    assert_eq!(get.expect(200)["value"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_sum_exactly() {
    const TASKS: i64 = 20;
    const PER_TASK: i64 = 50;
    let region = Region::start("cs-conc").await;
    region.create_bucket("cc-cnt", "counter").await;
    let url = format!("{}{}", region.url(), increment("cc-cnt", "total"));

    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let client = region.client();
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let mut returned = Vec::new();
            for _ in 0..PER_TASK {
                let resp = client
                    .post(&url)
                    .json(&json!({ "by": 1 }))
                    .send()
                    .await
                    .expect("increment request");
                assert_eq!(resp.status().as_u16(), 200);
                let body: serde_json::Value = resp.json().await.expect("increment body");
                returned.push(body["value"].as_i64().expect("value is an i64"));
            }
            returned
        }));
    }
    let mut returned = Vec::new();
    for handle in handles {
        returned.extend(handle.await.expect("increment task"));
    }
    let total = TASKS * PER_TASK;
    assert!(
        returned.iter().all(|v| (1..=total).contains(v)),
        "every answer lies between 1 and {total}"
    );
    assert_eq!(returned.iter().max(), Some(&total));

    let get = region.get(&kv("cc-cnt", "total")).await;
    assert_eq!(get.expect(200)["value"], json!(total));
}

#[tokio::test]
async fn set_members_are_added_removed_and_read_sorted() {
    let region = Region::start("cs-set").await;
    region.create_bucket("ss-set", "set").await;
    let key = kv("ss-set", "team");

    let reply = region
        .post(
            &format!("{key}/add"),
            &json!({ "members": ["b", "a", "Z"] }),
        )
        .await;
    assert_eq!(reply.expect(200), &json!({ "members": ["Z", "a", "b"] }));
    assert_key_headers(&reply, "cs-set");

    let reply = region
        .post(
            &format!("{key}/add"),
            &json!({ "members": ["c", "a", "c"] }),
        )
        .await;
    assert_eq!(
        reply.expect(200),
        &json!({ "members": ["Z", "a", "b", "c"] })
    );

    let reply = region
        .post(&format!("{key}/remove"), &json!({ "members": ["b", "Z"] }))
        .await;
    assert_eq!(reply.expect(200), &json!({ "members": ["a", "c"] }));
    assert_key_headers(&reply, "cs-set");

    // Removing a member that was never added is harmless.
    let reply = region
        .post(
            &format!("{key}/remove"),
            &json!({ "members": ["never-there"] }),
        )
        .await;
    assert_eq!(reply.expect(200), &json!({ "members": ["a", "c"] }));

    let get = region.get(&key).await;
    assert_eq!(
        get.expect(200),
        &json!({ "members": ["a", "c"], "home_region": "cs-set" })
    );
    assert_key_headers(&get, "cs-set");

    // A removed member can be added again.
    let reply = region
        .post(&format!("{key}/add"), &json!({ "members": ["b"] }))
        .await;
    assert_eq!(reply.expect(200), &json!({ "members": ["a", "b", "c"] }));
}

#[tokio::test]
async fn a_set_never_written_reads_empty_and_delete_empties_a_set() {
    let region = Region::start("cs-set-del").await;
    region.create_bucket("sd-set", "set").await;
    let get = region.get(&kv("sd-set", "untouched")).await;
    assert_eq!(get.expect(200)["members"], json!([]));

    let key = kv("sd-set", "team");
    region
        .post(&format!("{key}/add"), &json!({ "members": ["x", "y"] }))
        .await
        .expect(200);
    region.delete(&key).await.expect(200);
    let get = region.get(&key).await;
    assert_eq!(get.expect(200)["members"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_set_adds_are_all_kept() {
    let region = Region::start("cs-set-conc").await;
    region.create_bucket("sc-set", "set").await;
    let url = format!("{}{}/add", region.url(), kv("sc-set", "many"));
    let mut handles = Vec::new();
    for task in 0..10 {
        let client = region.client();
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..20 {
                let resp = client
                    .post(&url)
                    .json(&json!({ "members": [format!("m-{task:02}-{i:02}")] }))
                    .send()
                    .await
                    .expect("add request");
                assert_eq!(resp.status().as_u16(), 200);
            }
        }));
    }
    for handle in handles {
        handle.await.expect("add task");
    }
    let expected: BTreeSet<String> = (0..10)
        .flat_map(|t| (0..20).map(move |i| format!("m-{t:02}-{i:02}")))
        .collect();
    let get = region.get(&kv("sc-set", "many")).await;
    assert_eq!(get.expect(200)["members"], json!(expected));
}

#[tokio::test]
async fn delete_on_a_counter_is_409_type_mismatch() {
    let region = Region::start("cs-cnt-del").await;
    region.create_bucket("cd-cnt", "counter").await;
    let path = kv("cd-cnt", "hits");
    region
        .post(&increment("cd-cnt", "hits"), &json!({ "by": 4 }))
        .await
        .expect(200);
    let reply = region.call(Method::DELETE, &path, None, &[]).await;
    assert_error(&reply, 409, "type_mismatch");
    let get = region.get(&path).await;
    assert_eq!(get.expect(200)["value"], json!(4));
}
