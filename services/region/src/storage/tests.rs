//! The storage API on real files: requests gathered into one commit, and peers' cursors
//! written with the commits that happen anyway.

use super::*;
use meridian_shared::encoding::encode_state;
use meridian_shared::BucketType;
use std::time::{Duration, Instant};

/// A started storage in `dir`, with its metrics.
fn start(dir: &Path) -> (Storage, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new("us-east").expect("metrics"));
    let region = RegionName::new("us-east").expect("region name");
    let opened = OpenedDb::open(dir, &region, "test", 16 << 20, Duration::from_secs(60))
        .expect("open data directory");
    let storage = Storage::start(opened, 1024, metrics.clone()).expect("start writer");
    (storage, metrics)
}

/// A peer's state of `key`, as a merge queues it (not logged here).
fn merge(key: &str) -> KeyWrite {
    KeyWrite {
        bucket: "b".into(),
        key: key.into(),
        state: encode_state(&KeyState::empty(BucketType::Counter)),
        tombstone: false,
        logged: false,
        idempotency: None,
        trace: None,
    }
}

fn group_commits(metrics: &Metrics) -> u64 {
    metrics.commit_duration.get_sample_count()
}

/// Queues a merge, then (after `gap`, as if from another actor) the applied mark covering it;
/// waits until both are durable.
fn merge_then_mark(storage: &Storage, round: u64, gap: Duration, gathered: bool) {
    let origin = Actor::from_u128(7);
    let gather = gathered.then(|| storage.gather());
    let merged = storage
        .submit_key(merge(&format!("k{round}")))
        .expect("queue merge");
    std::thread::sleep(gap);
    let mark = storage
        .submit_applied(origin, round, storage.failure_epoch())
        .expect("queue mark");
    drop(gather);
    merged
        .blocking_recv()
        .expect("answer")
        .expect("merge durable");
    mark.blocking_recv().expect("answer").expect("mark durable");
}

#[test]
fn a_gather_keeps_requests_queued_meanwhile_in_one_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, metrics) = start(dir.path());
    const ROUNDS: u64 = 20;

    // Without a gather, a mark queued a while after its merge gets a commit of its own.
    let before = group_commits(&metrics);
    for round in 1..=ROUNDS {
        merge_then_mark(&storage, round, Duration::from_millis(5), false);
    }
    let separate = group_commits(&metrics) - before;
    assert!(
        separate >= 2 * ROUNDS - ROUNDS / 4,
        "{separate} commits: merge and mark are committed separately"
    );

    // With one, the writer holds the merge's commit until the mark is queued. A gap well
    // inside GATHER_WAIT; rounds where the scheduler stretched it past are tolerated.
    let before = group_commits(&metrics);
    for round in ROUNDS + 1..=2 * ROUNDS {
        merge_then_mark(&storage, round, Duration::from_micros(150), true);
    }
    let gathered = group_commits(&metrics) - before;
    assert!(
        gathered <= ROUNDS + ROUNDS / 4,
        "{gathered} commits for {ROUNDS} gathered merge + mark pairs"
    );
    let waited = metrics.commit_gather_wait.get();
    assert!(waited > 0.0, "time spent gathering is counted");

    // Client writes alone are never held back for a gather.
    let gather = storage.gather();
    let client_write = KeyWrite {
        logged: true,
        ..merge("client")
    };
    storage
        .submit_key(client_write)
        .expect("queue")
        .blocking_recv()
        .expect("answer")
        .expect("durable");
    drop(gather);
    assert_eq!(
        metrics.commit_gather_wait.get(),
        waited,
        "no wait for others"
    );
}

#[test]
fn cursors_ride_along_with_the_next_commit_and_a_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, metrics) = start(dir.path());
    let cursor = |peer: &str| {
        storage
            .peer_progress()
            .expect("read progress")
            .cursors
            .get(peer)
            .copied()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    // A cursor costs no commit of its own: it is written with the next one.
    let before = group_commits(&metrics);
    storage.submit_cursor("eu-west", 7).expect("cursor");
    storage
        .submit_key(merge("k"))
        .expect("queue")
        .blocking_recv()
        .expect("answer")
        .expect("durable");
    assert_eq!(group_commits(&metrics) - before, 1);
    assert_eq!(cursor("eu-west"), Some(7));

    // It may move back (a peer that lost entries rewinds it); with no other write, the
    // periodic checkpoint tick writes it.
    storage.submit_cursor("eu-west", 5).expect("cursor");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cursor("eu-west") != Some(5) {
        assert!(
            Instant::now() < deadline,
            "an idle region writes pending cursors"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The checkpoint of a clean stop writes what is pending.
    storage.submit_cursor("ap-south", 9).expect("cursor");
    runtime.block_on(storage.checkpoint()).expect("checkpoint");
    assert_eq!(cursor("ap-south"), Some(9));
}
