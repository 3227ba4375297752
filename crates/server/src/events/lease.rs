//! Delivery leases: on a store that several nodes share, each endpoint is delivered by one node
//! at a time, the one that holds its lease (`Table::Leases`, keyed by endpoint name). A lease
//! lasts [`Times::ttl`] by the wall clock and its holder renews it every [`Times::every`]; a
//! node that stops renewing (it died, or lost the database) loses it when it runs out, and
//! another node takes it and delivers from the position stored last.
//!
//! Taking and renewing are decided in the store: a round writes every lease it takes or renews
//! in one commit that expects each lease record and each endpoint record as the round read them
//! (`Store::commit_expecting`), so of two nodes that find a lease free at once exactly one takes
//! it, and a lease is never taken for an endpoint deleted or changed since the round read it.
//! The holder's own writes for the endpoint (its position, its dead letters) expect the lease
//! record it holds: once another node took the lease, or the endpoint was deleted, they store
//! nothing.
//!
//! The holder stops on its own clock: its delivery ends at a monotonic deadline, [`Times::margin`]
//! before the lease runs out by the wall clock it was taken at, unless a round renewed it. So a
//! node whose rounds fail (its database connection is gone) stops sending before any other node
//! may take over, provided the nodes' clocks agree to within the margin (NTP).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use twinguard_core::store::{Expect, Mutation, Store, StoreError, Table};

/// How long leases last and how often they are renewed.
#[derive(Debug, Clone, Copy)]
pub struct Times {
    /// How long a lease lasts without renewal, by the wall clock.
    pub ttl: Duration,
    /// How often each node reads the endpoints and takes or renews leases.
    pub every: Duration,
    /// How long before the wall-clock end the holder stops delivering: the clock difference
    /// between nodes that is tolerated.
    pub margin: Duration,
}

impl Default for Times {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            every: Duration::from_secs(2),
            margin: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    node: String,
    /// Until when (Unix milliseconds) the node holds it.
    until_ms: u64,
    /// The endpoint was deleted while the node held the lease: the record stays until it runs
    /// out, so that no other node delivers an endpoint made again under the name while the
    /// holder may still be sending, and no longer matches what the holder's writes expect.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
}

/// What deleting an endpoint does with its lease, stored as `lease`.
#[derive(Debug, PartialEq, Eq)]
pub enum OnDelete {
    /// None, run out or unreadable: it is deleted with the endpoint.
    Delete,
    /// Live: it is first replaced by this record, which is kept until it runs out.
    Close(Vec<u8>),
    /// Already closed and live: it is kept.
    Keep,
}

/// What deleting an endpoint at wall time `now_ms` does with its lease.
pub fn on_delete(lease: Option<&[u8]>, now_ms: u64) -> OnDelete {
    match lease.map(serde_json::from_slice::<Record>) {
        Some(Ok(record)) if record.until_ms >= now_ms => match record.deleted {
            true => OnDelete::Keep,
            false => OnDelete::Close(
                serde_json::to_vec(&Record {
                    deleted: true,
                    ..record
                })
                .unwrap_or_default(),
            ),
        },
        _ => OnDelete::Delete,
    }
}

/// What a round reads: every endpoint, position and lease as stored.
#[derive(Debug, Default)]
pub struct Stored {
    /// Endpoint records (their specs as stored), by name.
    pub endpoints: BTreeMap<String, Vec<u8>>,
    pub positions: HashMap<String, u64>,
    pub leases: BTreeMap<String, Vec<u8>>,
}

/// Reads what a round decides on.
pub fn read(store: &dyn Store) -> Result<Stored, StoreError> {
    Ok(Stored {
        endpoints: store.scan(Table::Endpoints)?.into_iter().collect(),
        positions: read_positions(store)?,
        leases: store.scan(Table::Leases)?.into_iter().collect(),
    })
}

/// Every endpoint's stored delivery position, by name.
pub fn read_positions(store: &dyn Store) -> Result<HashMap<String, u64>, StoreError> {
    Ok(store
        .scan(Table::Deliveries)?
        .into_iter()
        .map(|(name, bytes)| (name, parse_position(&bytes)))
        .collect())
}

/// A stored delivery position (0 when unreadable: events are sent again, never skipped).
pub fn parse_position(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// What a round writes: the leases it takes or renews and the stale ones it deletes, with what
/// each write expects.
#[derive(Debug, Default)]
pub struct Plan {
    pub batch: Vec<Mutation>,
    pub expect: Vec<Expect>,
    /// The lease records to hold once the batch commits, by endpoint name, with until when
    /// (Unix milliseconds) each lasts.
    pub held: BTreeMap<String, (Vec<u8>, u64)>,
}

/// Decides a round for `node` at wall time `now_ms`: it takes or renews the lease of each
/// endpoint in `wanted` (the stored endpoints this node can deliver) that is free, its own or
/// run out; deletes leases of endpoints no longer stored once they are its own or run out; and
/// gives up its own leases of stored endpoints it no longer wants (its allowlist refuses them
/// now), so that another node takes them at once.
pub fn plan<'a>(
    stored: &Stored,
    wanted: impl IntoIterator<Item = &'a String>,
    node: &str,
    now_ms: u64,
    times: Times,
) -> Plan {
    let mut plan = Plan::default();
    let wanted: std::collections::BTreeSet<&String> = wanted.into_iter().collect();
    for name in wanted.iter().copied() {
        let Some(endpoint) = stored.endpoints.get(name) else {
            continue;
        };
        let lease = stored.leases.get(name);
        if !free_for(lease.map(Vec::as_slice), node, now_ms) {
            continue;
        }
        // Its own lease with time left is held as it is: renewed only once less than
        // `ttl - 2 every` is left (two rounds' worth of renewal used), so that a node does not
        // commit at every round, and every other node then read the store again.
        if let Some((record, until_ms)) = lease.and_then(|l| own_until(l, node))
            && until_ms.saturating_sub(now_ms) > renew_below(times)
        {
            plan.held.insert(name.clone(), (record.to_vec(), until_ms));
            continue;
        }
        let until_ms = now_ms.saturating_add(times.ttl.as_millis() as u64);
        let record = serde_json::to_vec(&Record {
            node: node.to_owned(),
            until_ms,
            deleted: false,
        })
        .unwrap_or_default();
        plan.batch
            .push(Mutation::put(Table::Leases, name.clone(), record.clone()));
        plan.expect.push(Expect {
            table: Table::Leases,
            key: name.clone(),
            value: lease.cloned(),
        });
        plan.expect.push(Expect {
            table: Table::Endpoints,
            key: name.clone(),
            value: Some(endpoint.clone()),
        });
        plan.held.insert(name.clone(), (record, until_ms));
    }
    for (name, lease) in &stored.leases {
        let gone = !stored.endpoints.contains_key(name) && free_for(Some(lease), node, now_ms);
        let unwanted = stored.endpoints.contains_key(name)
            && !wanted.contains(name)
            && own_until(lease, node).is_some();
        if gone || unwanted {
            plan.batch
                .push(Mutation::delete(Table::Leases, name.clone()));
            plan.expect.push(Expect {
                table: Table::Leases,
                key: name.clone(),
                value: Some(lease.clone()),
            });
        }
    }
    plan
}

/// Renewed once less than this is left, in milliseconds.
fn renew_below(times: Times) -> u64 {
    times.ttl.saturating_sub(times.every * 2).as_millis() as u64
}

/// `lease` with until when it lasts, if it is `node`'s own and open.
fn own_until<'a>(lease: &'a [u8], node: &str) -> Option<(&'a [u8], u64)> {
    serde_json::from_slice::<Record>(lease)
        .ok()
        .filter(|record| record.node == node && !record.deleted)
        .map(|record| (lease, record.until_ms))
}

/// Whether `node` may take or renew a lease stored as `lease`: none, its own, another's that
/// ran out, or one that cannot be read.
fn free_for(lease: Option<&[u8]>, node: &str, now_ms: u64) -> bool {
    match lease.map(serde_json::from_slice::<Record>) {
        None | Some(Err(_)) => true,
        Some(Ok(record)) => record.node == node || record.until_ms < now_ms,
    }
}

/// Whether `lease`, as stored, is `node`'s own and open (not closed by a deletion).
pub fn is_own(lease: Option<&[u8]>, node: &str) -> bool {
    lease
        .and_then(|bytes| serde_json::from_slice::<Record>(bytes).ok())
        .is_some_and(|record| record.node == node && !record.deleted)
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

    const TTL: u64 = 10_000;

    /// One round of `node` at `now_ms` on `store` for endpoint `e`: whether it holds the lease.
    fn round(store: &dyn Store, node: &str, now_ms: u64) -> bool {
        let stored = read(store).unwrap();
        let wanted: Vec<String> = stored.endpoints.keys().cloned().collect();
        let plan = plan(&stored, &wanted, node, now_ms, Times::default());
        !plan.held.is_empty() && store.commit_expecting(&plan.batch, &plan.expect).unwrap()
    }

    fn with_endpoint(name: &str) -> MemoryStore {
        let store = MemoryStore::shared();
        store
            .commit(&[Mutation::put(Table::Endpoints, name, b"{}".to_vec())])
            .unwrap();
        store
    }

    /// Two nodes that find a lease free at once: exactly one takes it, round after round.
    #[test]
    fn of_two_nodes_taking_a_free_lease_at_once_exactly_one_holds_it() {
        for round_no in 0..200u64 {
            let store = Arc::new(with_endpoint("e"));
            let barrier = std::sync::Barrier::new(2);
            let take_as = |node: &str| {
                let stored = read(store.as_ref()).unwrap();
                let wanted: Vec<String> = stored.endpoints.keys().cloned().collect();
                let plan = plan(&stored, &wanted, node, 1_000, Times::default());
                barrier.wait();
                store.commit_expecting(&plan.batch, &plan.expect).unwrap()
            };
            let taken = std::thread::scope(|s| {
                let a = s.spawn(|| take_as("a"));
                let b = s.spawn(|| take_as("b"));
                [a.join().unwrap(), b.join().unwrap()]
            });
            assert_eq!(taken.iter().filter(|t| **t).count(), 1, "round {round_no}");
        }
    }

    /// The holder renews its lease; another node cannot take it while it lives, takes it once
    /// it ran out, and then the first node's renewal fails.
    #[test]
    fn a_lease_is_renewed_by_its_holder_and_taken_over_only_once_it_runs_out() {
        let store = with_endpoint("e");
        assert!(round(&store, "a", 0));
        assert!(!round(&store, "b", TTL - 1));
        assert!(round(&store, "a", TTL - 1), "renewed");
        assert!(!round(&store, "b", 2 * TTL - 2));
        assert!(round(&store, "b", 2 * TTL), "ran out");
        assert!(!round(&store, "a", 2 * TTL + 1));
    }

    /// A lease is not taken for an endpoint deleted after the round read it, and a lease left
    /// by a deleted endpoint is deleted once it ran out.
    #[test]
    fn no_lease_outlives_its_endpoint() {
        let store = with_endpoint("e");
        let stored = read(&store).unwrap();
        let wanted: Vec<String> = stored.endpoints.keys().cloned().collect();
        let decided = plan(&stored, &wanted, "a", 0, Times::default());
        store
            .commit(&[Mutation::delete(Table::Endpoints, "e")])
            .unwrap();
        assert!(
            !store
                .commit_expecting(&decided.batch, &decided.expect)
                .unwrap()
        );
        assert!(store.scan(Table::Leases).unwrap().is_empty());

        let store = with_endpoint("e");
        assert!(round(&store, "a", 0));
        store
            .commit(&[Mutation::delete(Table::Endpoints, "e")])
            .unwrap();
        let stale = plan(&read(&store).unwrap(), &[], "b", TTL - 1, Times::default());
        assert!(stale.batch.is_empty(), "a live lease of another is left");
        let stale = plan(&read(&store).unwrap(), &[], "b", TTL + 1, Times::default());
        assert!(store.commit_expecting(&stale.batch, &stale.expect).unwrap());
        assert!(store.scan(Table::Leases).unwrap().is_empty());
    }

    /// A node's own lease is held as it is while more than `ttl - 2 every` is left, and renewed
    /// after: its rounds do not commit each time.
    #[test]
    fn an_own_lease_is_renewed_only_once_its_time_runs_low() {
        let store = with_endpoint("e");
        let times = Times::default();
        let every = times.every.as_millis() as u64;
        assert!(round(&store, "a", 0));
        let held = |now_ms| {
            let stored = read(&store).unwrap();
            let wanted: Vec<String> = stored.endpoints.keys().cloned().collect();
            plan(&stored, &wanted, "a", now_ms, times)
        };
        let early = held(every);
        assert!(early.batch.is_empty(), "nothing to commit");
        assert_eq!(early.held["e"].1, TTL, "held as it is");
        let late = held(2 * every + 1);
        assert_eq!(late.batch.len(), 1, "renewed");
        assert_eq!(late.held["e"].1, 2 * every + 1 + TTL);
    }

    /// A node's own lease of an endpoint it no longer wants (its allowlist refuses it now) is
    /// given up at its next round, not left to run out; another node's is left alone.
    #[test]
    fn an_own_lease_of_an_endpoint_no_longer_wanted_is_given_up() {
        let store = with_endpoint("e");
        assert!(round(&store, "a", 0));
        let stored = read(&store).unwrap();
        let other = plan(&stored, &[], "b", 1, Times::default());
        assert!(other.batch.is_empty());
        let own = plan(&stored, &[], "a", 1, Times::default());
        assert!(store.commit_expecting(&own.batch, &own.expect).unwrap());
        assert!(store.scan(Table::Leases).unwrap().is_empty());
    }
}
