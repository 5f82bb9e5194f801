//! The storage API on real files: requests gathered into one commit, and peers' cursors
//! written with the commits that happen anyway.

use super::*;
use meridian_shared::encoding::encode_state;
use meridian_shared::BucketType;
use std::time::{Duration, Instant};

/// A started storage in `dir`, with its metrics.
fn start(dir: &Path) -> (Storage, Arc<Metrics>) {
    start_with(dir, Duration::from_secs(60))
}

/// A started storage that checkpoints every `checkpoint_interval` when anything was written.
fn start_with(dir: &Path, checkpoint_interval: Duration) -> (Storage, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new("us-east").expect("metrics"));
    let region = RegionName::new("us-east").expect("region name");
    let opened = OpenedDb::open(dir, &region, "test", 16 << 20, checkpoint_interval)
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
    merged.wait().expect("merge durable");
    mark.wait().expect("mark durable");
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
        .wait()
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
        .wait()
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

/// One step of the overlay model test.
#[derive(Debug, Clone)]
enum Step {
    /// Sets `(bucket, key)` to state number `n` (0: a register with no value, hidden from
    /// listings).
    Put(usize, usize, i64),
    /// Purges `(bucket, key)` if its state is still number `n`.
    Purge(usize, usize, i64),
    /// Moves the overlay into the state database.
    Checkpoint,
}

const BUCKETS: [&str; 3] = ["a", "a-b", "b"];
const MODEL_KEYS: [&str; 6] = ["k", "k1", "k10", "k2", "x", "x1"];

fn numbered_state(n: i64) -> Vec<u8> {
    if n == 0 {
        return encode_state(&KeyState::empty(BucketType::Register));
    }
    let mut state = KeyState::empty(BucketType::Counter);
    let by = meridian_shared::state::Op::Increment { by: n };
    state.apply(by, Actor::from_u128(1), 1).expect("counter op");
    encode_state(&state)
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let name = (0..BUCKETS.len(), 0..MODEL_KEYS.len());
    prop_oneof![
        6 => (name.clone(), 0..4i64).prop_map(|((b, k), n)| Step::Put(b, k, n)),
        2 => (name, 0..4i64).prop_map(|((b, k), n)| Step::Purge(b, k, n)),
        1 => Just(Step::Checkpoint),
    ]
}

/// Every key of `bucket` starting with `prefix`, listed page by page.
fn list_all(storage: &Storage, bucket: &str, prefix: &str, page_size: usize) -> Vec<String> {
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = storage
            .list_keys(bucket, prefix, after.as_deref(), page_size)
            .expect("list");
        listed.extend(page.keys);
        match page.next {
            Some(next) => after = Some(next),
            None => return listed,
        }
    }
}

/// Waits until every write behind `tickets` is durable.
fn await_durable(tickets: Vec<WriteTicket<u64>>) {
    for ticket in tickets {
        ticket.wait().expect("durable");
    }
}

/// Every way of reading key states agrees with a plain map of what was written: point reads,
/// batch reads, listings page by page, digest scans page by page and the anti-entropy tree,
/// whether a state sits in the overlay, the state database, or both (an older one there).
fn check_reads(storage: &Storage, model: &BTreeMap<KeyName, Vec<u8>>) {
    let all: Vec<KeyName> = BUCKETS
        .iter()
        .flat_map(|b| MODEL_KEYS.iter().map(|k| (b.to_string(), k.to_string())))
        .collect();
    for (bucket, key) in &all {
        let expected = model.get(&(bucket.clone(), key.clone()));
        let read = storage.key_state(bucket, key).expect("key state");
        assert_eq!(
            read.map(|s| encode_state(&s)).as_ref(),
            expected,
            "{bucket}/{key}"
        );
    }
    let raw: Vec<(String, String, Vec<u8>)> = model
        .iter()
        .map(|((b, k), s)| (b.clone(), k.clone(), s.clone()))
        .collect();
    assert_eq!(storage.raw_states(&all).expect("raw states"), raw);

    for bucket in BUCKETS {
        for prefix in ["", "k1", "x"] {
            let live: Vec<String> = model
                .iter()
                .filter(|((b, k), s)| {
                    b == bucket && k.starts_with(prefix) && **s != numbered_state(0)
                })
                .map(|((_, k), _)| k.clone())
                .collect();
            let listed = list_all(storage, bucket, prefix, 2);
            assert_eq!(listed, live, "listing {bucket} prefix {prefix:?}");
        }
    }

    let expected: Vec<Digest> = model
        .iter()
        .map(|((b, k), s)| Digest {
            bucket: b.clone(),
            key: k.clone(),
            hash: entry_hash(b, k, s),
        })
        .collect();
    let mut digests = Vec::new();
    let mut after: Option<KeyName> = None;
    loop {
        let (page, stopped) = storage
            .digests(&SegmentFilter::all(), after.as_ref(), None, usize::MAX, 3)
            .expect("digests");
        digests.extend(page);
        match stopped {
            Some(at) => after = Some(at),
            None => break,
        }
    }
    assert_eq!(digests, expected, "digest scan");

    let mut tree = MerkleTree::new();
    for ((b, k), s) in model {
        tree.toggle(segment_of(b, k), entry_hash(b, k, s));
    }
    let root = storage.with_tree(|t| t.root()).expect("tree");
    assert_eq!(root, tree.root(), "anti-entropy tree");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    #[test]
    fn key_states_read_the_same_wherever_they_sit(
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, metrics) = start(dir.path());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut model: BTreeMap<KeyName, Vec<u8>> = BTreeMap::new();
        for step in steps {
            match step {
                Step::Put(b, k, n) => {
                    let write = KeyWrite {
                        bucket: BUCKETS[b].into(),
                        key: MODEL_KEYS[k].into(),
                        state: numbered_state(n),
                        tombstone: false,
                        logged: n % 2 == 0,
                        idempotency: None,
                        trace: None,
                    };
                    storage.submit_key(write).expect("queue").wait()
                        .expect("durable");
                    model.insert((BUCKETS[b].into(), MODEL_KEYS[k].into()), numbered_state(n));
                }
                Step::Purge(b, k, n) => {
                    let name: KeyName = (BUCKETS[b].into(), MODEL_KEYS[k].into());
                    let purge = Purge {
                        remove: vec![(name.0.clone(), name.1.clone(), numbered_state(n))],
                        forget: Vec::new(),
                    };
                    let removed = storage.submit_purge(purge).expect("queue").wait()
                        .expect("durable");
                    let matches = model.get(&name) == Some(&numbered_state(n));
                    proptest::prop_assert_eq!(removed, u64::from(matches));
                    if matches {
                        model.remove(&name);
                    }
                }
                Step::Checkpoint => {
                    runtime.block_on(storage.checkpoint()).expect("checkpoint");
                    proptest::prop_assert_eq!(storage.overlay_size().0, 0, "the overlay is flushed");
                }
            }
            check_reads(&storage, &model);
        }
        let flushed = metrics.overlay_flushed.get();
        runtime.block_on(storage.checkpoint()).expect("checkpoint");
        proptest::prop_assert!(metrics.overlay_flushed.get() >= flushed);
        check_reads(&storage, &model);
    }
}

#[test]
fn a_due_checkpoint_moves_a_large_overlay_in_chunks_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, metrics) = start_with(dir.path(), Duration::from_millis(100));
    const KEYS: usize = 6000;
    let name = |i: usize| format!("k{i:05}");
    let tickets: Vec<_> = (0..KEYS)
        .map(|i| {
            let write = KeyWrite {
                state: numbered_state(1 + (i % 3) as i64),
                ..merge(&name(i))
            };
            storage.submit_key(write).expect("queue")
        })
        .collect();
    await_durable(tickets);
    // Idle now: the periodic tick finds a checkpoint due with more than one chunk to move.
    let deadline = Instant::now() + Duration::from_secs(20);
    while storage.overlay_size().0 > 0 {
        assert!(
            Instant::now() < deadline,
            "an idle region empties its overlay"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metrics.overlay_flushed.get() >= KEYS as u64);
    assert_eq!(metrics.checkpoint_failures.get(), 0);
    for i in (0..KEYS).step_by(97) {
        let state = storage.key_state("b", &name(i)).expect("read");
        assert_eq!(
            state.map(|s| encode_state(&s)),
            Some(numbered_state(1 + (i % 3) as i64))
        );
    }
    let (digests, stopped) = storage
        .digests(&SegmentFilter::all(), None, None, usize::MAX, usize::MAX)
        .expect("digests");
    assert_eq!((digests.len(), stopped), (KEYS, None));
}

#[test]
fn checkpoints_keep_up_with_writes_to_ever_new_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, metrics) = start_with(dir.path(), Duration::from_millis(50));
    let checkpoints = || metrics.checkpoint_duration.get_sample_count();
    let mut next = 0u64;
    let mut round = || -> Vec<WriteTicket<u64>> {
        (0..2000)
            .map(|_| {
                next += 1;
                storage
                    .submit_key(merge(&format!("k{next}")))
                    .expect("queue")
            })
            .collect()
    };
    // Every commit (up to 1024 writes) adds more new keys than one chunk moves, and the next
    // round is always queued: the checkpoint must still come.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut waiting = round();
    while checkpoints() < 3 {
        assert!(
            Instant::now() < deadline,
            "{} checkpoints while writes to new keys keep coming; overlay {:?}",
            checkpoints(),
            storage.overlay_size()
        );
        let queued = round();
        await_durable(waiting);
        waiting = queued;
    }
    await_durable(waiting);
}

#[test]
fn scans_miss_no_key_while_the_overlay_moves_into_redb() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, metrics) = start_with(dir.path(), Duration::from_millis(20));
    const KEYS: usize = 3000;
    let name = |i: usize| format!("k{i:05}");
    // Keys below this are durable: every later scan must list them.
    let written = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    /// Stops the writing thread however the scans end (a failed assertion included), so the
    /// scope can join it.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let mut round = 0i64;
            while !done.load(Ordering::Acquire) {
                round += 1;
                // First pass: new keys in rounds; afterwards rewrites, so states keep moving
                // between the overlay and redb under the scans.
                let start = written.load(Ordering::Acquire);
                let range = if start < KEYS {
                    start..(start + 300).min(KEYS)
                } else {
                    (round as usize * 37) % (KEYS - 500)..(round as usize * 37) % (KEYS - 500) + 500
                };
                let tickets: Vec<_> = range
                    .clone()
                    .map(|i| {
                        let write = KeyWrite {
                            state: numbered_state(1 + round % 3),
                            ..merge(&name(i))
                        };
                        storage.submit_key(write).expect("queue")
                    })
                    .collect();
                await_durable(tickets);
                if start < KEYS {
                    written.store(range.end, Ordering::Release);
                }
                if round % 7 == 0 {
                    runtime.block_on(storage.checkpoint()).expect("checkpoint");
                }
            }
        });
        let _stop = Stop(&done);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut scans = 0;
        while Instant::now() < deadline || written.load(Ordering::Acquire) < KEYS {
            assert!(
                Instant::now() < deadline + Duration::from_secs(30),
                "the first {KEYS} writes did not finish"
            );
            let durable = written.load(Ordering::Acquire);
            let listed = list_all(&storage, "b", "", 100);
            let expected: Vec<String> = (0..durable).map(name).collect();
            assert!(
                listed.len() >= durable && listed[..durable] == expected[..],
                "a listing missed durable keys ({} listed, {durable} durable)",
                listed.len()
            );
            let (digests, stopped) = storage
                .digests(&SegmentFilter::all(), None, None, usize::MAX, usize::MAX)
                .expect("digests");
            assert_eq!(stopped, None);
            assert!(
                digests.len() >= durable,
                "a digest scan missed durable keys ({} of {durable})",
                digests.len()
            );
            scans += 1;
        }
        assert!(scans >= 3, "only {scans} scans ran");
    });
    assert!(
        metrics.overlay_flushed.get() >= KEYS as u64 / 2,
        "states moved into redb while the scans ran"
    );
}

/// Writes `state` of `s/k` as a client write would (logged), waiting until it is durable.
fn write_set(storage: &Storage, state: &KeyState) {
    let write = KeyWrite {
        bucket: "s".into(),
        key: "k".into(),
        state: encode_state(state),
        tombstone: state.is_tombstone(),
        logged: true,
        idempotency: None,
        trace: None,
    };
    storage
        .submit_key(write)
        .expect("queue")
        .wait()
        .expect("durable");
}

#[test]
fn a_candidate_deleted_again_after_its_check_stays_a_candidate() {
    use meridian_shared::Op;
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, _) = start(dir.path());
    let actor = Actor::from_u128(1);
    let mut state = KeyState::empty(BucketType::Set);
    let add = || Op::Add {
        members: vec!["a".into()],
    };
    let candidates = |storage: &Storage| storage.tombstone_candidates(None, 10).expect("scan");
    let name: KeyName = ("s".into(), "k".into());

    state.apply(add(), actor, 1).expect("add");
    state
        .apply(Op::Delete { context: None }, actor, 2)
        .expect("delete");
    write_set(&storage, &state);
    state.apply(add(), actor, 3).expect("add again");
    write_set(&storage, &state);
    // A GC round checks now: live again, so it will ask to forget the candidate...
    let checked = encode_state(&state);
    // ...but the key is deleted again before the purge commits.
    state
        .apply(Op::Delete { context: None }, actor, 4)
        .expect("delete again");
    write_set(&storage, &state);
    let purge = Purge {
        remove: Vec::new(),
        forget: vec![("s".into(), "k".into(), Some(checked))],
    };
    storage
        .submit_purge(purge)
        .expect("queue")
        .wait()
        .expect("durable");
    assert_eq!(
        candidates(&storage),
        vec![name.clone()],
        "the new tombstone is collectable"
    );

    // Still exactly as checked: forgotten.
    state.apply(add(), actor, 5).expect("add");
    write_set(&storage, &state);
    let purge = Purge {
        remove: Vec::new(),
        forget: vec![("s".into(), "k".into(), Some(encode_state(&state)))],
    };
    storage
        .submit_purge(purge)
        .expect("queue")
        .wait()
        .expect("durable");
    assert!(candidates(&storage).is_empty());
}
