//! Multi-value register on dotted version vectors.
//!
//! `crdts::MVReg` tags each value with a whole version vector, so two writes accepted by the
//! same region are always ordered and a write with a stale context silently drops the value it
//! never saw. The contract needs the opposite: a write supersedes exactly the values its
//! context covers. Here each sibling keeps its own dot and the register keeps one compact
//! causal context (every dot it has seen), which is the dot-store join of delta-state CRDTs:
//! a sibling survives a merge if both sides hold it or the other side never saw its dot.
//! Deletes remove what their context covers and leave the context behind as the tombstone.

use crate::Actor;
use crdts::{CmRDT, CvRDT, Dot, VClock};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A multi-value register: concurrent writes survive as siblings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvvRegister {
    /// Live values by the dot of the write that created them.
    siblings: BTreeMap<(Actor, u64), String>,
    /// Every dot this register has seen, written or superseded (compact per actor).
    context: VClock<Actor>,
}

impl DvvRegister {
    /// Writes `value` (or deletes, with `None`) as `actor`, superseding the siblings `seen`
    /// covers; without `seen`, everything this register holds. The new dot's counter is at
    /// least `floor` (a hybrid clock reading): dots stay unique even after a causally stable
    /// tombstone was removed and the key starts again from an empty register.
    pub fn write(
        &mut self,
        value: Option<String>,
        seen: Option<&VClock<Actor>>,
        actor: Actor,
        floor: u64,
    ) {
        let covered = seen.unwrap_or(&self.context);
        self.siblings
            .retain(|(owner, counter), _| *counter > covered.get(owner));
        if let Some(seen) = seen {
            // The client saw these dots (perhaps in another region): when their values
            // arrive here they are already superseded.
            self.context.merge(seen.clone());
        }
        if let Some(value) = value {
            let dot = Dot::new(actor, (self.context.get(&actor) + 1).max(floor));
            self.siblings.insert((dot.actor, dot.counter), value);
            self.context.apply(dot);
        }
    }

    /// Join: keeps what both hold and what the other side has not seen.
    pub fn merge(&mut self, other: DvvRegister) {
        let mine = std::mem::take(&mut self.siblings);
        for (dot, value) in mine {
            if other.siblings.contains_key(&dot) || dot.1 > other.context.get(&dot.0) {
                self.siblings.insert(dot, value);
            }
        }
        for (dot, value) in other.siblings {
            if dot.1 > self.context.get(&dot.0) {
                self.siblings.entry(dot).or_insert(value);
            }
        }
        self.context.merge(other.context);
    }

    /// Live values in dot order.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.siblings.values().map(String::as_str)
    }

    /// The causal context: pass it back with a write to supersede every current value.
    pub fn context(&self) -> &VClock<Actor> {
        &self.context
    }
}
