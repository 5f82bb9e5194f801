//! Durability: no acknowledged write is lost to kill -9, identity survives restarts, and a
//! region refuses a data directory that is not its own.

mod common;

use common::{kv, run_until_exit, send, Region, CLUSTER_ID};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WRITERS: u64 = 32;
const WRITE_FOR: Duration = Duration::from_secs(3);
/// Upper bound on requests per writer, so the loop is bounded even if the clock misbehaves.
const MAX_WRITES_PER_WRITER: u64 = 20_000;

/// What one writer attempted and what the region acknowledged (2xx).
#[derive(Default)]
struct WriterLog {
    registers_attempted: Vec<(String, Value)>,
    registers_acked: Vec<(String, Value)>,
    increments_attempted: i64,
    increments_acked: i64,
    members_attempted: Vec<String>,
    members_acked: Vec<String>,
    /// Answers that are neither 2xx nor 503 (overload), or transport errors before the kill.
    unexpected: Vec<String>,
}

async fn writer(
    id: u64,
    client: reqwest::Client,
    base: String,
    stop: Arc<AtomicBool>,
    killed: Arc<AtomicBool>,
) -> WriterLog {
    let mut log = WriterLog::default();
    let by = (id % 5) as i64 + 1;
    for i in 0..MAX_WRITES_PER_WRITER {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let result = match i % 3 {
            0 => {
                let key = format!("w{id:02}-{i:06}");
                let value = json!({ "writer": id, "i": i, "text": format!("value of {key}") });
                log.registers_attempted.push((key.clone(), value.clone()));
                let body = serde_json::to_vec(&value).expect("serialize");
                let sent = send(
                    &client,
                    &base,
                    Method::PUT,
                    &kv("du-reg", &key),
                    Some(body),
                    &[],
                )
                .await;
                if matches!(&sent, Ok(r) if (200..300).contains(&r.status)) {
                    log.registers_acked.push((key, value));
                }
                sent
            }
            1 => {
                log.increments_attempted += by;
                let body = serde_json::to_vec(&json!({ "by": by })).expect("serialize");
                let path = format!("{}/increment", kv("du-cnt", "total"));
                let sent = send(&client, &base, Method::POST, &path, Some(body), &[]).await;
                if matches!(&sent, Ok(r) if (200..300).contains(&r.status)) {
                    log.increments_acked += by;
                }
                sent
            }
            _ => {
                let member = format!("m{id:02}-{i:06}");
                log.members_attempted.push(member.clone());
                let body = serde_json::to_vec(&json!({ "members": [member] })).expect("serialize");
                let path = format!("{}/add", kv("du-set", "all"));
                let sent = send(&client, &base, Method::POST, &path, Some(body), &[]).await;
                if matches!(&sent, Ok(r) if (200..300).contains(&r.status)) {
                    log.members_acked.push(member);
                }
                sent
            }
        };
        match result {
            Ok(reply) if (200..300).contains(&reply.status) || reply.status == 503 => {}
            Ok(reply) => log.unexpected.push(format!(
                "writer {id} op {i}: {} {}",
                reply.status, reply.text
            )),
            Err(err) => {
                if !killed.load(Ordering::SeqCst) {
                    log.unexpected
                        .push(format!("writer {id} op {i}: transport error {err}"));
                }
                // The region is gone (or going): nothing more will be acknowledged.
                break;
            }
        }
    }
    log
}

/// Checkpoints the region has taken, from its metrics.
async fn checkpoints(region: &Region) -> u64 {
    let metrics = region.get("/metrics").await;
    metrics
        .text
        .lines()
        .find(|l| l.starts_with("meridian_storage_checkpoint_duration_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("checkpoint count is exported")
}

/// Killed before its first checkpoint: everything acknowledged comes back from the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let region = Region::start("dur-crash").await;
    crash_under_load_and_check(region, |taken| assert_eq!(taken, 0, "no checkpoint yet")).await;
}

/// Killed between frequent checkpoints: part comes from the state database, the rest from
/// what the journal holds beyond the last checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9_between_checkpoints() {
    let region = Region::start_with("dur-ckpt", "checkpoint_interval_ms = 100").await;
    crash_under_load_and_check(region, |taken| {
        assert!(taken >= 5, "checkpoints were taken under load ({taken})")
    })
    .await;
}

/// Writes from many clients, kill -9 mid-stream, restart, and check every acknowledged write.
/// `checkpoints_taken` checks how many checkpoints preceded the kill.
async fn crash_under_load_and_check(mut region: Region, checkpoints_taken: impl Fn(u64)) {
    region.create_bucket("du-reg", "register").await;
    region.create_bucket("du-cnt", "counter").await;
    region.create_bucket("du-set", "set").await;

    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for id in 0..WRITERS {
        handles.push(tokio::spawn(writer(
            id,
            region.client(),
            region.url(),
            stop.clone(),
            killed.clone(),
        )));
    }
    tokio::time::sleep(WRITE_FOR).await;
    checkpoints_taken(checkpoints(&region).await);
    // Crash while the writers are still sending.
    killed.store(true, Ordering::SeqCst);
    region.kill9();
    stop.store(true, Ordering::SeqCst);

    let mut logs = Vec::new();
    for handle in handles {
        let log = tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("writer finishes after the kill")
            .expect("writer task");
        logs.push(log);
    }
    let unexpected: Vec<&String> = logs.iter().flat_map(|l| &l.unexpected).collect();
    assert!(
        unexpected.is_empty(),
        "unexpected answers before the kill: {unexpected:?}"
    );

    let registers_acked: Vec<(String, Value)> = logs
        .iter()
        .flat_map(|l| l.registers_acked.iter().cloned())
        .collect();
    let acked_keys: BTreeSet<&String> = registers_acked.iter().map(|(k, _)| k).collect();
    let registers_unacked: Vec<(String, Value)> = logs
        .iter()
        .flat_map(|l| l.registers_attempted.iter().cloned())
        .filter(|(k, _)| !acked_keys.contains(k))
        .collect();
    let increments_acked: i64 = logs.iter().map(|l| l.increments_acked).sum();
    let increments_attempted: i64 = logs.iter().map(|l| l.increments_attempted).sum();
    let members_acked: BTreeSet<String> = logs
        .iter()
        .flat_map(|l| l.members_acked.iter().cloned())
        .collect();
    let members_attempted: BTreeSet<String> = logs
        .iter()
        .flat_map(|l| l.members_attempted.iter().cloned())
        .collect();
    eprintln!(
        "acknowledged before kill -9: {} register puts ({} unacknowledged), increments {} of {}, \
         {} set members of {}",
        registers_acked.len(),
        registers_unacked.len(),
        increments_acked,
        increments_attempted,
        members_acked.len(),
        members_attempted.len()
    );
    assert!(
        registers_acked.len() >= 10 && increments_acked >= 10 && members_acked.len() >= 10,
        "too few acknowledged writes for the test to mean anything"
    );

    region.restart().await;

    // Every acknowledged register value, exactly; an unacknowledged one is absent or exact.
    let mut checks = Vec::new();
    let chunk_size = registers_acked.len().div_ceil(16).max(1);
    for chunk in registers_acked.chunks(chunk_size) {
        let chunk = chunk.to_vec();
        let client = region.client();
        let base = region.url();
        checks.push(tokio::spawn(async move {
            let mut lost = Vec::new();
            for (key, value) in chunk {
                let reply = send(&client, &base, Method::GET, &kv("du-reg", &key), None, &[])
                    .await
                    .expect("read after restart");
                if reply.status != 200 || reply.body["values"] != json!([value]) {
                    lost.push(format!(
                        "{key}: expected [{value}], got {} {}",
                        reply.status, reply.text
                    ));
                }
            }
            lost
        }));
    }
    let mut lost = Vec::new();
    for check in checks {
        lost.extend(check.await.expect("check task"));
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged register writes lost or changed: {:?}",
        lost.len(),
        registers_acked.len(),
        &lost[..lost.len().min(20)]
    );
    for (key, value) in &registers_unacked {
        let reply = region.get(&kv("du-reg", key)).await;
        assert!(
            reply.status == 404 || (reply.status == 200 && reply.body["values"] == json!([value])),
            "unacknowledged {key} is absent or exactly as sent; got {reply:?}"
        );
    }

    let get = region.get(&kv("du-cnt", "total")).await;
    let total = get.expect(200)["value"].as_i64().expect("counter value");
    assert!(
        (increments_acked..=increments_attempted).contains(&total),
        "counter {total} must lie between acknowledged {increments_acked} and attempted \
         {increments_attempted}"
    );

    let get = region.get(&kv("du-set", "all")).await;
    let members: BTreeSet<String> =
        serde_json::from_value(get.expect(200)["members"].clone()).expect("members are strings");
    let missing: Vec<&String> = members_acked.difference(&members).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged set members lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    let phantom: Vec<&String> = members.difference(&members_attempted).collect();
    assert!(phantom.is_empty(), "members never sent: {phantom:?}");

    // The restarted region takes writes again.
    region
        .post(
            &format!("{}/increment", kv("du-cnt", "total")),
            &json!({ "by": 1 }),
        )
        .await
        .expect(200);
}

async fn cluster(region: &Region) -> Value {
    let reply = region.get("/v1/cluster").await;
    reply.expect(200).clone()
}

fn incarnation(cluster: &Value) -> String {
    let incarnation = cluster["incarnation"]
        .as_str()
        .unwrap_or_else(|| panic!("no incarnation in {cluster}"))
        .to_string();
    uuid::Uuid::parse_str(&incarnation)
        .unwrap_or_else(|e| panic!("incarnation {incarnation:?} is not a UUID: {e}"));
    incarnation
}

fn applied(cluster: &Value, origin: &str) -> u64 {
    cluster["applied"][origin].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_restarted_region_keeps_its_incarnation() {
    let mut region = Region::start("dur-inc").await;
    region.create_bucket("dn-cnt", "counter").await;
    let before = cluster(&region).await;
    let inc = incarnation(&before);
    let path = format!("{}/increment", kv("dn-cnt", "n"));
    region.post(&path, &json!({ "by": 3 })).await.expect(200);
    let written = cluster(&region).await;
    assert_eq!(incarnation(&written), inc);
    let seq = applied(&written, &inc);
    assert!(seq > 0, "applied[{inc}] after a write: {written}");

    region.kill9();
    region.restart().await;
    let after = cluster(&region).await;
    assert_eq!(incarnation(&after), inc, "kill -9 keeps the incarnation");
    assert!(
        applied(&after, &inc) >= seq,
        "applied sequence went backwards: {seq} -> {after}"
    );

    let status = region.stop();
    assert!(status.success(), "graceful stop exits 0, got {status}");
    region.restart().await;
    let after = cluster(&region).await;
    assert_eq!(
        incarnation(&after),
        inc,
        "graceful restart keeps the incarnation"
    );
    let get = region.get(&kv("dn-cnt", "n")).await;
    assert_eq!(get.expect(200)["value"], json!(3));

    // New writes continue the same sequence.
    region.post(&path, &json!({ "by": 1 })).await.expect(200);
    let later = cluster(&region).await;
    assert!(applied(&later, &inc) > seq, "{later}");
}

#[tokio::test]
async fn a_region_refuses_another_regions_data_dir() {
    let mut amber = Region::start("amber").await;
    amber.create_bucket("df-reg", "register").await;
    amber
        .put(&kv("df-reg", "mine"), &json!("amber's"))
        .await
        .expect(200);
    amber.stop();

    let (status, log) = run_until_exit(
        "birch",
        &amber.data_dir(),
        CLUSTER_ID,
        Duration::from_secs(20),
    );
    let status = status
        .unwrap_or_else(|| panic!("region birch kept running on amber's data dir; log:\n{log}"));
    assert!(
        !status.success(),
        "must exit non-zero, got {status}; log:\n{log}"
    );
    assert!(
        log.contains("amber"),
        "the refusal names the region the data dir belongs to; log:\n{log}"
    );

    let (status, log) = run_until_exit(
        "amber",
        &amber.data_dir(),
        "other-cluster",
        Duration::from_secs(20),
    );
    let status = status.unwrap_or_else(|| {
        panic!("region amber of another cluster kept running on this data dir; log:\n{log}")
    });
    assert!(
        !status.success(),
        "must exit non-zero, got {status}; log:\n{log}"
    );

    // The refusals did not damage the data directory.
    amber.restart().await;
    let get = amber.get(&kv("df-reg", "mine")).await;
    assert_eq!(get.expect(200)["values"], json!(["amber's"]));
}
