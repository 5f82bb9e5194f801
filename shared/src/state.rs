//! The value model: one CRDT state per key, by bucket type, and the operations clients send.

use crate::register::DvvRegister;
use crate::{Actor, BucketType};
use crdts::ctx::AddCtx;
use crdts::{CmRDT, CvRDT, Dot, LWWReg, Orswot, PNCounter, VClock};
use num_traits::ToPrimitive;
use serde::{Deserialize, Serialize};

/// Last-writer-wins marker: hybrid timestamp first, writer incarnation breaks ties.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LwwStamp {
    /// Hybrid logical clock timestamp of the write.
    pub hlc: u64,
    /// Incarnation that wrote it; unique per write together with `hlc`.
    pub actor: Actor,
}

/// The CRDT state of one key. Register values are JSON text; for `lww`, `None` is a deletion.
///
/// Variant order and field shapes are part of the on-disk format (see [`crate::encoding`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KeyState {
    /// Multi-value register: concurrent writes survive as siblings.
    Register(DvvRegister),
    /// Last-writer-wins register.
    Lww(LWWReg<Option<String>, LwwStamp>),
    /// PN-counter.
    Counter(PNCounter<Actor>),
    /// Observed-remove set of strings.
    Set(Orswot<String, Actor>),
}

/// A client operation on one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Write a JSON value (registers). `context` = what the client has seen; `None` = everything
    /// the accepting region has seen.
    Put {
        /// Validated JSON text.
        value: String,
        /// Causal context from `X-Meridian-Context`.
        context: Option<VClock<Actor>>,
    },
    /// Delete: a tombstone for registers, removal of every observed member for sets.
    Delete {
        /// Causal context from `X-Meridian-Context`.
        context: Option<VClock<Actor>>,
    },
    /// Add `by` (may be negative) to a counter.
    Increment {
        /// Amount to add.
        by: i64,
    },
    /// Add members to a set.
    Add {
        /// Members to add.
        members: Vec<String>,
    },
    /// Remove observed members from a set.
    Remove {
        /// Members to remove.
        members: Vec<String>,
    },
}

/// Why an operation or merge was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The operation or state does not fit the bucket's type.
    #[error("operation {op} does not fit a {kind} bucket")]
    TypeMismatch {
        /// Operation name.
        op: &'static str,
        /// The bucket's type.
        kind: BucketType,
    },
    /// The increment would take the counter out of the range a client can read exactly.
    #[error("incrementing {value} by {by} leaves the range of a 64-bit signed integer")]
    CounterOverflow {
        /// The counter's value here before the increment.
        value: String,
        /// The increment refused.
        by: i64,
    },
}

/// What a client sees of a key.
#[derive(Debug, Clone, PartialEq)]
pub enum View {
    /// Absent or deleted.
    Absent,
    /// Register values (JSON text; more than one = siblings) and the causal context.
    Register {
        /// Live values, sorted for a stable answer.
        values: Vec<String>,
        /// Causal context covering every value.
        context: VClock<Actor>,
    },
    /// Counter value (saturated to i64).
    Counter(i64),
    /// Set members, sorted.
    Set(Vec<String>),
}

impl Op {
    /// The operation's name in errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::Increment { .. } => "increment",
            Op::Add { .. } => "add",
            Op::Remove { .. } => "remove",
        }
    }
}

impl KeyState {
    /// The empty state of a bucket type.
    pub fn empty(kind: BucketType) -> Self {
        match kind {
            BucketType::Register => KeyState::Register(DvvRegister::default()),
            BucketType::Lww => KeyState::Lww(LWWReg::default()),
            BucketType::Counter => KeyState::Counter(PNCounter::new()),
            BucketType::Set => KeyState::Set(Orswot::new()),
        }
    }

    /// The bucket type this state belongs to.
    pub fn kind(&self) -> BucketType {
        match self {
            KeyState::Register(_) => BucketType::Register,
            KeyState::Lww(_) => BucketType::Lww,
            KeyState::Counter(_) => BucketType::Counter,
            KeyState::Set(_) => BucketType::Set,
        }
    }

    /// Applies a client operation as a new write by `actor` at hybrid time `hlc`.
    ///
    /// The caller must serialize writes per key and actor (the partition actor does).
    pub fn apply(&mut self, op: Op, actor: Actor, hlc: u64) -> Result<(), StateError> {
        let kind = self.kind();
        let mismatch = |op: &Op| StateError::TypeMismatch {
            op: op.name(),
            kind,
        };
        match (self, op) {
            (KeyState::Register(reg), Op::Put { value, context }) => {
                reg.write(Some(value), context.as_ref(), actor, hlc)
            }
            (KeyState::Register(reg), Op::Delete { context }) => {
                reg.write(None, context.as_ref(), actor, hlc)
            }
            (KeyState::Lww(reg), Op::Put { value, .. }) => {
                reg.update(Some(value), LwwStamp { hlc, actor })
            }
            (KeyState::Lww(reg), Op::Delete { .. }) => reg.update(None, LwwStamp { hlc, actor }),
            (KeyState::Counter(counter), Op::Increment { by }) => {
                // Checked first: past i64 a read could only clamp the value, and past u64 this
                // actor's own total would wrap, silently losing the increment. A step toward
                // the range is always taken (increments accepted concurrently in several
                // regions can sum past i64). A step of 0 yields the dot carrying this actor's
                // total as it stands.
                let value = counter.read();
                let own = if by >= 0 {
                    counter.inc_many(actor, 0)
                } else {
                    counter.dec_many(actor, 0)
                }
                .dot
                .counter;
                let next = &value + by;
                let fits = (next.to_i64().is_some() || next.magnitude() <= value.magnitude())
                    && own.checked_add(by.unsigned_abs()).is_some();
                if !fits {
                    return Err(StateError::CounterOverflow {
                        value: value.to_string(),
                        by,
                    });
                }
                if by > 0 {
                    counter.apply(counter.inc_many(actor, by.unsigned_abs()));
                } else if by < 0 {
                    counter.apply(counter.dec_many(actor, by.unsigned_abs()));
                }
            }
            (KeyState::Set(set), Op::Add { members }) => {
                // Like `derive_add_ctx`, with the dot's counter at least `hlc`: unique even
                // after a causally stable empty set was removed and the key starts again.
                let mut clock = set.read_ctx().add_clock;
                let dot = Dot::new(actor, (clock.get(&actor) + 1).max(hlc));
                clock.apply(dot);
                set.apply(set.add_all(members, AddCtx { clock, dot }));
            }
            (KeyState::Set(set), Op::Remove { members }) => {
                let ctx = set.read_ctx().derive_rm_ctx();
                set.apply(set.rm_all(members, ctx));
            }
            (KeyState::Set(set), Op::Delete { .. }) => {
                let read = set.read();
                let (members, ctx) = read.split();
                set.apply(set.rm_all(members, ctx.derive_rm_ctx()));
            }
            (_, op) => return Err(mismatch(&op)),
        }
        Ok(())
    }

    /// CRDT join: afterwards `self` holds everything either state held.
    pub fn merge(&mut self, other: KeyState) -> Result<(), StateError> {
        let kind = self.kind();
        match (self, other) {
            (KeyState::Register(a), KeyState::Register(b)) => a.merge(b),
            (KeyState::Lww(a), KeyState::Lww(b)) => a.merge(b),
            (KeyState::Counter(a), KeyState::Counter(b)) => a.merge(b),
            (KeyState::Set(a), KeyState::Set(b)) => a.merge(b),
            _ => return Err(StateError::TypeMismatch { op: "merge", kind }),
        }
        Ok(())
    }

    /// Whether the state holds nothing a client can see (a deleted register, an emptied set):
    /// a tombstone, kept until causally stable. Counters are never deleted.
    pub fn is_tombstone(&self) -> bool {
        match self {
            KeyState::Register(reg) => reg.values().next().is_none(),
            KeyState::Lww(reg) => reg.val.is_none(),
            KeyState::Counter(_) => false,
            KeyState::Set(set) => set.read().val.is_empty(),
        }
    }

    /// The causal context a client passes back to supersede what it has seen (registers);
    /// other types need none, so theirs is empty.
    pub fn context(&self) -> VClock<Actor> {
        match self {
            KeyState::Register(reg) => reg.context().clone(),
            KeyState::Lww(_) | KeyState::Counter(_) | KeyState::Set(_) => VClock::new(),
        }
    }

    /// The client's view of the state.
    pub fn view(&self) -> View {
        match self {
            KeyState::Register(reg) => {
                let mut live: Vec<String> = reg.values().map(String::from).collect();
                if live.is_empty() {
                    return View::Absent;
                }
                live.sort_unstable();
                // Concurrent writes of the same value are one value to a reader; the context
                // still covers both writes.
                live.dedup();
                View::Register {
                    values: live,
                    context: reg.context().clone(),
                }
            }
            KeyState::Lww(reg) => match &reg.val {
                Some(value) => View::Register {
                    values: vec![value.clone()],
                    context: VClock::new(),
                },
                None => View::Absent,
            },
            KeyState::Counter(counter) => {
                let value = counter.read();
                let clamped =
                    value
                        .to_i64()
                        .unwrap_or(if value.sign() == num_bigint::Sign::Minus {
                            i64::MIN
                        } else {
                            i64::MAX
                        });
                View::Counter(clamped)
            }
            KeyState::Set(set) => {
                let mut members: Vec<String> = set.read().val.into_iter().collect();
                members.sort_unstable();
                View::Set(members)
            }
        }
    }
}
