//! Chaos (bounded): random partitions, silent partitions, slow links and SIGKILL/restart while
//! clients write to every region. Afterwards every acknowledged write is present in every
//! region, all regions answer identically, and counters are exact.
//!
//! Counter increments carry Idempotency-Keys; one whose outcome was unknown is retried at the
//! region it was first sent to once the cluster is healed, so the expected sum is exact.
//! The scenario runs twice: with hinted handoff, and with hints disabled so that whatever a
//! partitioned or killed region missed reaches it through anti-entropy alone.
//! Duration: `MERIDIAN_CHAOS_SECS` (default 30 with hints, 20 without).

mod common;
mod support;

use common::kv;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::Cluster;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const SET_KEYS: usize = 4;
const COUNTER_KEYS: usize = 3;

/// What the writers learned: acknowledged writes and increments whose outcome is unknown.
#[derive(Default)]
struct Ledger {
    members: BTreeMap<String, BTreeSet<String>>,
    registers: BTreeMap<String, i64>,
    /// counter key → (idempotency key, region url it was sent to, acknowledged)
    increments: Vec<(String, String, String, bool)>,
}

/// A tiny deterministic PRNG (xorshift) so a failing run can be replayed by seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn writer(id: usize, url: String, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        match n % 3 {
            0 => {
                let key = format!("s{}", n as usize % SET_KEYS);
                let member = format!("w{id}-{n}");
                let sent = client
                    .post(format!("{url}{}/add", kv("cset", &key)))
                    .json(&json!({"members": [member]}))
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    let mut ledger = ledger.lock().expect("ledger");
                    ledger.members.entry(key).or_default().insert(member);
                }
            }
            1 => {
                let key = format!("r{id}-{n}");
                let sent = client
                    .put(format!("{url}{}", kv("creg", &key)))
                    .json(&json!(n))
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    ledger
                        .lock()
                        .expect("ledger")
                        .registers
                        .insert(key, n as i64);
                }
            }
            _ => {
                let key = format!("c{}", n as usize % COUNTER_KEYS);
                let idempotency = uuid::Uuid::new_v4().to_string();
                let sent = client
                    .post(format!("{url}{}/increment", kv("ccnt", &key)))
                    .header("idempotency-key", &idempotency)
                    .json(&json!({"by": 1}))
                    .send()
                    .await;
                let acked = sent.is_ok_and(|r| r.status().is_success());
                ledger.lock().expect("ledger").increments.push((
                    key,
                    idempotency,
                    url.clone(),
                    acked,
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn every_acknowledged_write_survives_partitions_kills_and_slow_links() {
    chaos("ack_timeout_ms = 1000\n", 30).await;
}

/// The same with hinted handoff disabled: entries for a down peer are dropped at once, so only
/// anti-entropy (an exchange about every second) can repair what it missed.
#[tokio::test]
async fn every_acknowledged_write_survives_chaos_with_hints_disabled() {
    chaos(
        "ack_timeout_ms = 1000\nhint_max_bytes = 0\nanti_entropy_interval_ms = 1000\n",
        20,
    )
    .await;
}

/// Runs the chaos scenario with `extra` region configuration for `MERIDIAN_CHAOS_SECS`
/// (default `default_secs`) and checks every acknowledged write afterwards.
async fn chaos(extra: &str, default_secs: u64) {
    let secs: u64 = std::env::var("MERIDIAN_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    let seed: u64 = std::env::var("MERIDIAN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe);
    eprintln!("chaos: {secs} s, seed {seed}, config {extra:?}");
    let mut cluster = Cluster::start(&REGIONS, extra).await;
    for (bucket, kind) in [("cset", "set"), ("creg", "register"), ("ccnt", "counter")] {
        cluster.region("us-east").create_bucket(bucket, kind).await;
    }
    cluster.wait_buckets(3).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = cluster
        .regions
        .iter()
        .flat_map(|r| [r.url(), r.url()])
        .enumerate()
        .map(|(id, url)| tokio::spawn(writer(id, url, ledger.clone(), stop.clone())))
        .collect();

    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut dead: Option<String> = None;
    let links: Vec<(String, String)> = cluster.all_links().map(|(k, _)| k.clone()).collect();
    while Instant::now() < deadline {
        match rng.below(6) {
            0 => {
                let victim = REGIONS[rng.below(3) as usize];
                eprintln!("chaos: partition {victim}");
                cluster.cut_off(victim);
            }
            1 => {
                let (from, to) = &links[rng.below(links.len() as u64) as usize];
                eprintln!("chaos: blackhole {from}->{to}");
                cluster.link(from, to).blackhole();
            }
            2 => {
                let (from, to) = &links[rng.below(links.len() as u64) as usize];
                eprintln!("chaos: slow {from}->{to}");
                cluster.link(from, to).slow(50 + rng.below(200));
            }
            3 if dead.is_none() => {
                let victim = REGIONS[rng.below(3) as usize];
                eprintln!("chaos: kill -9 {victim}");
                cluster.region_mut(victim).kill9();
                dead = Some(victim.to_string());
            }
            3 | 4 => {
                if let Some(victim) = dead.take() {
                    eprintln!("chaos: restart {victim}");
                    cluster.region_mut(&victim).restart().await;
                }
            }
            _ => {
                eprintln!("chaos: heal");
                cluster.heal_all();
            }
        }
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
    }
    stop.store(true, Ordering::Release);
    for writer in writers {
        writer.await.expect("writer task");
    }
    cluster.heal_all();
    if let Some(victim) = dead.take() {
        cluster.region_mut(&victim).restart().await;
    }
    cluster.wait_all_up().await;

    // Settle every increment whose outcome is unknown, at the region it was sent to.
    let client = reqwest::Client::new();
    let (increments, members, registers) = {
        let ledger = ledger.lock().expect("ledger");
        (
            ledger.increments.clone(),
            ledger.members.clone(),
            ledger.registers.clone(),
        )
    };
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut unknown = 0;
    for (key, idempotency, url, acked) in &increments {
        if !acked {
            unknown += 1;
            let mut tries = 0;
            loop {
                let sent = client
                    .post(format!("{url}{}/increment", kv("ccnt", key)))
                    .header("idempotency-key", idempotency)
                    .json(&json!({"by": 1}))
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                tries += 1;
                assert!(
                    tries < 100,
                    "retry of {idempotency} at {url} never succeeded"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        *expected.entry(key.clone()).or_default() += 1;
    }
    eprintln!(
        "chaos: {} increments ({unknown} settled after heal), {} set members, {} registers acknowledged",
        increments.len(),
        members.values().map(BTreeSet::len).sum::<usize>(),
        registers.len()
    );

    let converge = Duration::from_secs(30);
    for (key, value) in &expected {
        let body = cluster.converged(&kv("ccnt", key), converge).await;
        assert_eq!(body["value"], json!(value), "counter {key}");
    }
    for (key, acked) in &members {
        let body = cluster.converged(&kv("cset", key), converge).await;
        let present: BTreeSet<String> = body["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m.as_str().map(String::from))
            .collect();
        let missing: Vec<_> = acked.difference(&present).collect();
        assert!(
            missing.is_empty(),
            "set {key} lost acknowledged members {missing:?}"
        );
    }
    for (key, value) in &registers {
        let body = cluster.converged(&kv("creg", key), converge).await;
        assert_eq!(body["values"], json!([value]), "register {key}");
    }
}
