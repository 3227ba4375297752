//! Delivery leases: on a store that several nodes share, each endpoint is delivered by one node
//! at a time, the one that holds its lease (`Table::Leases`, keyed by endpoint name). A lease
//! lasts [`LEASE_TTL`] and its holder renews it every [`LEASE_EVERY`]; a node that stops
//! renewing (it died, or lost the database) loses it when it runs out, and another node takes
//! it and delivers from the position stored last. Taking and renewing are decided in the
//! store: each commits expecting the lease record it read (`Store::commit_expecting`), so of
//! two nodes that find a lease free at once exactly one takes it.
//!
//! Delivery is at least once across a hand-over: the events after the last stored position
//! are sent again by the next holder. A holder that was paused for longer than the lease (and
//! does not know it yet) may send for up to one renewal interval beside the new one. Lease
//! times are wall-clock milliseconds: nodes' clocks must agree to well within the lease (NTP).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use twinguard_core::store::{Expect, Mutation, Store, StoreError, Table};

/// How long a lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// How often leases are taken and renewed, and endpoints made on other nodes learnt.
pub const LEASE_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    node: String,
    /// Until when (Unix milliseconds) the node holds it.
    until_ms: u64,
}

/// Takes or renews the lease of endpoint `name` for `node` at `now_ms`: the lease record now
/// held (to be forgotten when it is not), or `None` when another node holds a live lease or
/// took it first.
pub fn take(
    store: &dyn Store,
    name: &str,
    node: &str,
    now_ms: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    let stored = store
        .get_many(Table::Leases, &[name.to_owned()])?
        .pop()
        .flatten();
    let holder = stored
        .as_deref()
        .and_then(|b| serde_json::from_slice::<Record>(b).ok());
    let free = match &holder {
        None => true,
        Some(lease) => lease.node == node || lease.until_ms < now_ms,
    };
    if !free {
        return Ok(None);
    }
    let lease = serde_json::to_vec(&Record {
        node: node.to_owned(),
        until_ms: now_ms + LEASE_TTL.as_millis() as u64,
    })
    .map_err(|e| StoreError(e.to_string()))?;
    let taken = store.commit_expecting(
        &[Mutation::put(Table::Leases, name, lease.clone())],
        &[Expect {
            table: Table::Leases,
            key: name.to_owned(),
            value: stored,
        }],
    )?;
    Ok(taken.then_some(lease))
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use twinguard_core::store::MemoryStore;

    use super::*;

    const TTL: u64 = LEASE_TTL.as_millis() as u64;

    /// Two nodes that find a lease free at once: exactly one takes it, round after round.
    #[test]
    fn of_two_nodes_taking_a_free_lease_at_once_exactly_one_holds_it() {
        let store = Arc::new(MemoryStore::shared());
        for round in 0..200u64 {
            let name = format!("endpoint-{round}");
            let barrier = std::sync::Barrier::new(2);
            let take_as = |node: &str| {
                barrier.wait();
                take(store.as_ref(), &name, node, 1_000).unwrap().is_some()
            };
            let taken = std::thread::scope(|s| {
                let a = s.spawn(|| take_as("a"));
                let b = s.spawn(|| take_as("b"));
                [a.join().unwrap(), b.join().unwrap()]
            });
            assert_eq!(taken.iter().filter(|t| **t).count(), 1, "round {round}");
        }
    }

    /// The holder renews its lease; another node cannot take it while it lives, takes it once
    /// it ran out, and then the first node's renewal fails.
    #[test]
    fn a_lease_is_renewed_by_its_holder_and_taken_over_only_once_it_runs_out() {
        let store = MemoryStore::shared();
        assert!(take(&store, "e", "a", 0).unwrap().is_some());
        assert!(take(&store, "e", "b", TTL - 1).unwrap().is_none());
        assert!(
            take(&store, "e", "a", TTL - 1).unwrap().is_some(),
            "renewed"
        );
        assert!(take(&store, "e", "b", 2 * TTL - 2).unwrap().is_none());
        assert!(
            take(&store, "e", "b", 2 * TTL).unwrap().is_some(),
            "ran out"
        );
        assert!(take(&store, "e", "a", 2 * TTL + 1).unwrap().is_none());
    }
}
