//! Property tests: join laws of every bucket type and canonical encoding round trips.

use crdts::CmRDT;
use meridian_shared::encoding::{decode_state, encode_state, encoded_kind};
use meridian_shared::state::View;
use meridian_shared::{Actor, BucketType, KeyState, Op};
use proptest::prelude::*;

const REPLICAS: usize = 3;

/// One step of a replicated history: a local op at a replica, or a merge between replicas.
#[derive(Debug, Clone)]
enum Step {
    Local(usize, Op),
    /// A client read at `read_at` and writes at the replica with that (possibly stale) context.
    LocalWithContextOf {
        at: usize,
        read_at: usize,
        op: Op,
    },
    Merge {
        into: usize,
        from: usize,
    },
}

fn member() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(String::from)
}

fn op_for(kind: BucketType) -> BoxedStrategy<Op> {
    match kind {
        BucketType::Register | BucketType::Lww => prop_oneof![
            4 => (0u32..100).prop_map(|v| Op::Put { value: v.to_string(), context: None }),
            1 => Just(Op::Delete { context: None }),
        ]
        .boxed(),
        BucketType::Counter => (-50i64..50).prop_map(|by| Op::Increment { by }).boxed(),
        BucketType::Set => prop_oneof![
            3 => prop::collection::vec(member(), 1..3).prop_map(|members| Op::Add { members }),
            2 => prop::collection::vec(member(), 1..3).prop_map(|members| Op::Remove { members }),
            1 => Just(Op::Delete { context: None }),
        ]
        .boxed(),
    }
}

fn step(kind: BucketType) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..REPLICAS, op_for(kind)).prop_map(|(r, op)| Step::Local(r, op)),
        2 => (0..REPLICAS, 0..REPLICAS, op_for(kind))
            .prop_map(|(at, read_at, op)| Step::LocalWithContextOf { at, read_at, op }),
        1 => (0..REPLICAS, 0..REPLICAS).prop_map(|(into, from)| Step::Merge { into, from }),
    ]
}

/// Gives a register op the context the client read elsewhere.
fn with_context(op: Op, context: crdts::VClock<Actor>) -> Op {
    match op {
        Op::Put { value, .. } => Op::Put {
            value,
            context: Some(context),
        },
        Op::Delete { .. } => Op::Delete {
            context: Some(context),
        },
        other => other,
    }
}

/// Runs a random history over three replicas, each with its own actor, and returns their states.
fn replicas(kind: BucketType) -> impl Strategy<Value = Vec<KeyState>> {
    prop::collection::vec(step(kind), 0..40).prop_map(move |steps| {
        let mut states = vec![KeyState::empty(kind); REPLICAS];
        for (hlc, step) in steps.into_iter().enumerate() {
            match step {
                Step::Local(r, op) => states[r]
                    .apply(op, Actor::from_u128(r as u128 + 1), hlc as u64 + 1)
                    .expect("op fits type"),
                Step::LocalWithContextOf { at, read_at, op } => {
                    let op = with_context(op, states[read_at].context());
                    states[at]
                        .apply(op, Actor::from_u128(at as u128 + 1), hlc as u64 + 1)
                        .expect("op fits type")
                }
                Step::Merge { into, from } => {
                    let other = states[from].clone();
                    states[into].merge(other).expect("same type");
                }
            }
        }
        states
    })
}

fn any_kind() -> impl Strategy<Value = BucketType> {
    prop::sample::select(vec![
        BucketType::Register,
        BucketType::Lww,
        BucketType::Counter,
        BucketType::Set,
    ])
}

fn any_replicas() -> impl Strategy<Value = Vec<KeyState>> {
    any_kind().prop_flat_map(replicas)
}

fn join(a: &KeyState, b: &KeyState) -> KeyState {
    let mut out = a.clone();
    out.merge(b.clone()).expect("same type");
    out
}

/// States compare by canonical bytes: the strongest equality, and what the Merkle tree uses.
fn same(a: &KeyState, b: &KeyState) -> bool {
    encode_state(a) == encode_state(b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn join_is_commutative(s in any_replicas()) {
        prop_assert!(same(&join(&s[0], &s[1]), &join(&s[1], &s[0])));
    }

    #[test]
    fn join_is_associative(s in any_replicas()) {
        let left = join(&join(&s[0], &s[1]), &s[2]);
        let right = join(&s[0], &join(&s[1], &s[2]));
        prop_assert!(same(&left, &right));
    }

    #[test]
    fn join_is_idempotent(s in any_replicas()) {
        prop_assert!(same(&join(&s[0], &s[0]), &s[0]));
        let joined = join(&s[0], &s[1]);
        prop_assert!(same(&join(&joined, &s[1]), &joined));
    }

    #[test]
    fn encoding_round_trips(s in any_replicas()) {
        for state in &s {
            let bytes = encode_state(state);
            let decoded = decode_state(&bytes).expect("decodes");
            prop_assert_eq!(&decoded, state);
            prop_assert_eq!(encode_state(&decoded), bytes.clone());
            prop_assert_eq!(encoded_kind(&bytes), Some(state.kind()));
        }
    }

    #[test]
    fn counter_converges_to_the_sum_of_all_increments(
        incs in prop::collection::vec((0..REPLICAS, -1000i64..1000), 0..50)
    ) {
        let mut states = vec![KeyState::empty(BucketType::Counter); REPLICAS];
        for (r, by) in &incs {
            states[*r].apply(Op::Increment { by: *by }, Actor::from_u128(*r as u128 + 1), 0).unwrap();
        }
        let all = states.iter().fold(KeyState::empty(BucketType::Counter), |acc, s| join(&acc, s));
        prop_assert_eq!(all.view(), View::Counter(incs.iter().map(|(_, by)| by).sum()));
    }

    /// Increments at the edges of i64 are applied exactly or refused, never lost: refused
    /// exactly when the value would leave i64 or the actor's own total of increments (or of
    /// decrements) would pass u64, and the value read is always the sum of those applied.
    #[test]
    fn counter_increments_are_exact_or_refused(
        incs in prop::collection::vec(
            prop_oneof![Just(i64::MIN), Just(i64::MAX), any::<i64>(), -1000i64..1000],
            1..40,
        )
    ) {
        let actor = Actor::from_u128(1);
        let mut state = KeyState::empty(BucketType::Counter);
        let (mut sum, mut ups, mut downs) = (0i128, 0u128, 0u128);
        for by in incs {
            let next = sum + i128::from(by);
            let fits = i64::try_from(next).is_ok()
                && if by >= 0 { ups + u128::from(by.unsigned_abs()) } else { downs + u128::from(by.unsigned_abs()) }
                    <= u128::from(u64::MAX);
            let result = state.apply(Op::Increment { by }, actor, 0);
            prop_assert_eq!(result.is_ok(), fits, "by {} on {}", by, sum);
            if fits {
                sum = next;
                if by >= 0 { ups += u128::from(by.unsigned_abs()) } else { downs += u128::from(by.unsigned_abs()) }
            }
            prop_assert_eq!(state.view(), View::Counter(sum as i64));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Two clients write concurrently at two replicas with the same stale context: after the
    /// replicas exchange states, both values are siblings everywhere; a write with the merged
    /// context then resolves them to one value everywhere.
    #[test]
    fn concurrent_register_writes_survive_until_a_covering_write(s in replicas(BucketType::Register)) {
        let (a, b) = (Actor::from_u128(1), Actor::from_u128(2));
        let base = join(&s[0], &s[1]);
        let stale = base.context();
        let (mut left, mut right) = (base.clone(), base.clone());
        left.apply(Op::Put { value: "\"left\"".into(), context: Some(stale.clone()) }, a, 1000).unwrap();
        right.apply(Op::Put { value: "\"right\"".into(), context: Some(stale) }, b, 1001).unwrap();
        let merged = join(&left, &right);
        prop_assert!(same(&merged, &join(&right, &left)));
        let View::Register { values, context } = merged.view() else { panic!("register") };
        prop_assert_eq!(values, vec!["\"left\"".to_string(), "\"right\"".to_string()]);
        let mut resolved = merged.clone();
        resolved.apply(Op::Put { value: "1".into(), context: Some(context) }, b, 1002).unwrap();
        let everywhere = join(&join(&left, &resolved), &right);
        prop_assert_eq!(everywhere.view(), View::Register { values: vec!["1".into()], context: everywhere.context() });
    }
}

#[test]
fn decoding_refuses_garbage_and_unknown_versions() {
    assert!(decode_state(&[]).is_err());
    assert!(decode_state(&[99, 1, 2]).is_err());
    assert!(decode_state(&[1, 200, 200, 200]).is_err());
    let mut bytes = encode_state(&KeyState::empty(BucketType::Set));
    bytes.push(0);
    assert!(decode_state(&bytes).is_err());
}

#[test]
fn concurrent_register_writes_stay_siblings_until_resolved_with_their_context() {
    let (a, b) = (Actor::from_u128(1), Actor::from_u128(2));
    let mut left = KeyState::empty(BucketType::Register);
    let mut right = KeyState::empty(BucketType::Register);
    left.apply(
        Op::Put {
            value: "1".into(),
            context: None,
        },
        a,
        1,
    )
    .unwrap();
    right
        .apply(
            Op::Put {
                value: "2".into(),
                context: None,
            },
            b,
            2,
        )
        .unwrap();
    left.merge(right).unwrap();
    let View::Register { values, context } = left.view() else {
        panic!("register")
    };
    assert_eq!(values, vec!["1", "2"]);

    // A stale context (covering only "1") leaves "2" as a sibling of the new write.
    let mut stale = left.clone();
    let mut only_first = crdts::VClock::new();
    only_first.apply(crdts::Dot::new(a, 1));
    stale
        .apply(
            Op::Put {
                value: "3".into(),
                context: Some(only_first),
            },
            a,
            3,
        )
        .unwrap();
    let View::Register { values, .. } = stale.view() else {
        panic!("register")
    };
    assert_eq!(values, vec!["2", "3"]);

    // The full context resolves both siblings.
    left.apply(
        Op::Put {
            value: "3".into(),
            context: Some(context),
        },
        b,
        3,
    )
    .unwrap();
    let View::Register { values, .. } = left.view() else {
        panic!("register")
    };
    assert_eq!(values, vec!["3"]);
}

#[test]
fn deleted_register_reads_absent_and_a_later_put_revives_it() {
    let a = Actor::from_u128(1);
    let mut s = KeyState::empty(BucketType::Register);
    s.apply(
        Op::Put {
            value: "1".into(),
            context: None,
        },
        a,
        1,
    )
    .unwrap();
    s.apply(Op::Delete { context: None }, a, 2).unwrap();
    assert_eq!(s.view(), View::Absent);
    s.apply(
        Op::Put {
            value: "2".into(),
            context: None,
        },
        a,
        3,
    )
    .unwrap();
    assert!(matches!(s.view(), View::Register { values, .. } if values == vec!["2"]));
}

#[test]
fn operations_that_do_not_fit_the_type_are_refused() {
    let a = Actor::from_u128(1);
    let mut s = KeyState::empty(BucketType::Counter);
    assert!(s
        .apply(
            Op::Put {
                value: "1".into(),
                context: None
            },
            a,
            1
        )
        .is_err());
    assert!(s.merge(KeyState::empty(BucketType::Set)).is_err());
}

/// After a causally stable tombstone is removed, the key starts again from an empty state; a
/// region that still holds the tombstone must not treat the new write as already deleted.
#[test]
fn a_write_after_a_removed_tombstone_survives_the_tombstone() {
    let a = Actor::from_u128(1);
    for (kind, write, delete) in [
        (
            BucketType::Register,
            Op::Put {
                value: "1".into(),
                context: None,
            },
            Op::Delete { context: None },
        ),
        (
            BucketType::Set,
            Op::Add {
                members: vec!["m".into()],
            },
            Op::Delete { context: None },
        ),
    ] {
        let mut tombstone = KeyState::empty(kind);
        for hlc in 1..=5 {
            tombstone.apply(write.clone(), a, hlc).unwrap();
        }
        tombstone.apply(delete, a, 6).unwrap();
        assert!(tombstone.is_tombstone());
        // Removed here; a later write starts from empty, at a later hybrid time.
        let mut fresh = KeyState::empty(kind);
        fresh.apply(write, a, 7).unwrap();
        let mut held_elsewhere = tombstone.clone();
        held_elsewhere.merge(fresh.clone()).unwrap();
        assert_eq!(held_elsewhere.view(), fresh.view(), "{kind:?}");
        fresh.merge(tombstone).unwrap();
        assert!(!fresh.is_tombstone(), "{kind:?}");
    }
}

/// Two regions writing the same value concurrently: a reader sees it once, and a write with
/// the merged context still supersedes both.
#[test]
fn concurrent_writes_of_one_value_read_as_one_value() {
    let (a, b) = (Actor::from_u128(1), Actor::from_u128(2));
    let put = |value: &str| Op::Put {
        value: value.into(),
        context: None,
    };
    let mut left = KeyState::empty(BucketType::Register);
    let mut right = KeyState::empty(BucketType::Register);
    left.apply(put("\"x\""), a, 1).expect("register put");
    right.apply(put("\"x\""), b, 1).expect("register put");
    let mut merged = join(&left, &right);
    let View::Register { values, .. } = merged.view() else {
        panic!("register view")
    };
    assert_eq!(values, vec!["\"x\"".to_string()]);
    let context = merged.context();
    merged
        .apply(
            Op::Put {
                value: "\"y\"".into(),
                context: Some(context),
            },
            a,
            2,
        )
        .expect("register put");
    let View::Register { values, .. } = merged.view() else {
        panic!("register view")
    };
    assert_eq!(values, vec!["\"y\"".to_string()]);
}

/// Increments accepted concurrently at two regions can sum past i64: reads show the bound,
/// steps back toward the range are taken, steps further out are refused.
#[test]
fn a_counter_past_i64_from_concurrent_increments_can_be_brought_back() {
    let (a, b) = (Actor::from_u128(1), Actor::from_u128(2));
    let mut left = KeyState::empty(BucketType::Counter);
    let mut right = KeyState::empty(BucketType::Counter);
    left.apply(Op::Increment { by: i64::MAX }, a, 0)
        .expect("fits at a");
    right
        .apply(Op::Increment { by: 2 }, b, 0)
        .expect("fits at b");
    let mut merged = join(&left, &right);
    assert_eq!(merged.view(), View::Counter(i64::MAX), "clamped");
    assert!(
        merged.apply(Op::Increment { by: 1 }, a, 0).is_err(),
        "further out"
    );
    merged
        .apply(Op::Increment { by: -1 }, a, 0)
        .expect("back toward the range");
    assert_eq!(
        merged.view(),
        View::Counter(i64::MAX),
        "MAX + 1, still clamped"
    );
    merged
        .apply(Op::Increment { by: -1 }, b, 0)
        .expect("back toward the range");
    assert_eq!(merged.view(), View::Counter(i64::MAX), "exactly MAX");
}
