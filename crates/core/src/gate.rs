//! A concurrency cap per key (a principal's subject): at most `limit` holders of one key at
//! once. Used for queries and history reads, whose cost per request is bounded but large, so
//! that one caller cannot hold every slot the server has.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Counts holders per key.
#[derive(Debug)]
pub struct Gate {
    limit: usize,
    running: Mutex<HashMap<String, usize>>,
}

/// One holder of a key; leaving the scope frees the slot.
#[derive(Debug)]
#[must_use = "the slot is freed when the ticket is dropped"]
pub struct Ticket<'g> {
    gate: &'g Gate,
    key: String,
}

impl Gate {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `key`, or `None` when `key` already holds `limit`.
    pub fn enter(&self, key: &str) -> Option<Ticket<'_>> {
        // The map is only counted up and down under the lock; a panic elsewhere cannot leave
        // it inconsistent, so a poisoned lock is used as is.
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let count = running.entry(key.to_owned()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Ticket {
            gate: self,
            key: key.to_owned(),
        })
    }

    /// Holders of `key` now.
    pub fn holders(&self, key: &str) -> usize {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.get(key).copied().unwrap_or(0)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut running = self
            .gate
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = running.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                running.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_limit_and_a_dropped_ticket_frees_its_slot() {
        let gate = Gate::new(2);
        let a = gate.enter("alice");
        let b = gate.enter("alice");
        assert!(a.is_some() && b.is_some());
        assert!(gate.enter("alice").is_none());
        assert!(gate.enter("bob").is_some(), "other keys are not affected");
        drop(a);
        assert_eq!(gate.holders("alice"), 1);
        assert!(gate.enter("alice").is_some());
        drop(b);
        assert_eq!(gate.holders("alice"), 0);
    }
}
