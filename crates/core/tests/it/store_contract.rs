//! The store contract (`twinguard_core::store::contract`) run against `MemoryStore` and against
//! the `Store` trait's default range reads, and shown to catch backends that break it.

use std::sync::Arc;

use proptest::prelude::*;
use twinguard_core::store::contract::{self, DIFFERENTIAL_KEYS, Read, Step};
use twinguard_core::store::{MemoryStore, Mutation, Store, StoreError, Table};

#[test]
fn memory_store_keeps_the_store_contract() {
    contract::check_all(&MemoryStore::default()).unwrap();
}

#[test]
fn a_shared_memory_store_keeps_the_store_contract_with_its_fence() {
    contract::check_all(&MemoryStore::shared()).unwrap();
}

#[test]
fn memory_store_keeps_its_records_while_it_lives() {
    // A memory store cannot be reopened; the same one handed out again stands for it.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    contract::check_reopen(|| store.clone()).unwrap();
}

/// A backend that implements only `scan` and `commit`, relying on the trait's default range
/// reads, as a new backend might at first.
struct DefaultRanges(MemoryStore);

impl Store for DefaultRanges {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.0.scan(table)
    }
    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        self.0.commit(batch)
    }
}

#[test]
fn the_default_range_reads_keep_the_store_contract() {
    contract::check_all(&DefaultRanges(MemoryStore::default())).unwrap();
}

#[test]
fn a_failed_commit_of_the_memory_store_changes_nothing() {
    let store = MemoryStore::default();
    store
        .commit(&[Mutation::put(Table::Twins, "a", b"1".to_vec())])
        .unwrap();
    store.set_failing(true);
    let refused = store.commit(&[
        Mutation::put(Table::Twins, "b", b"2".to_vec()),
        Mutation::delete(Table::Twins, "a"),
    ]);
    assert!(refused.is_err());
    store.set_failing(false);
    assert_eq!(
        store.scan(Table::Twins).unwrap(),
        vec![("a".to_owned(), b"1".to_vec())]
    );
}

/// Ways a backend could get the contract wrong.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `range` returns the record at `to` too.
    InclusiveTo,
    /// The first change of a key in a batch wins.
    FirstChangeWins,
    /// Keys compared as UTF-16 (as some databases and languages do).
    Utf16Order,
    /// Every table in one key space.
    SharedKeySpace,
    /// A batch applied in two halves, with a moment between them.
    TornBatch,
    /// `limit` off by one.
    LimitPlusOne,
    /// `get_many` answers a key with the first record at or after it.
    GetManyNextKey,
}

struct Broken(MemoryStore, Fault);

impl Store for Broken {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let table = match self.1 {
            Fault::SharedKeySpace => Table::Twins,
            _ => table,
        };
        let mut rows = self.0.scan(table)?;
        if let Fault::Utf16Order = self.1 {
            rows.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
        }
        Ok(rows)
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        let mut batch = batch.to_vec();
        match self.1 {
            Fault::FirstChangeWins => batch.reverse(),
            Fault::SharedKeySpace => batch.iter_mut().for_each(|m| m.table = Table::Twins),
            Fault::TornBatch => {
                let rest = batch.split_off(batch.len() / 2);
                self.0.commit(&batch)?;
                std::thread::sleep(std::time::Duration::from_millis(1));
                return self.0.commit(&rest);
            }
            _ => {}
        }
        self.0.commit(&batch)
    }

    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        match self.1 {
            Fault::GetManyNextKey => keys
                .iter()
                .map(|k| Ok(self.range_from(table, k, 1)?.pop().map(|(_, v)| v)))
                .collect(),
            _ => self.0.get_many(table, keys),
        }
    }

    fn range(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let limit = match self.1 {
            Fault::LimitPlusOne => limit.saturating_add(1),
            _ => limit,
        };
        Ok(self
            .scan(table)?
            .into_iter()
            .filter(|(k, _)| {
                k.as_str() >= from
                    && match self.1 {
                        Fault::InclusiveTo => k.as_str() <= to,
                        _ => k.as_str() < to,
                    }
            })
            .take(limit)
            .collect())
    }
}

#[test]
fn the_contract_catches_backends_that_break_it() {
    for (fault, check) in [
        (Fault::InclusiveTo, "ranges_keep_their_bounds_and_limits"),
        (
            Fault::FirstChangeWins,
            "a_batch_applies_in_order_and_the_last_change_of_a_key_wins",
        ),
        (Fault::Utf16Order, "scan_returns_records_in_byte_order"),
        (Fault::SharedKeySpace, "tables_are_separate_key_spaces"),
        (Fault::TornBatch, "readers_see_a_batch_whole_or_not_at_all"),
        (Fault::LimitPlusOne, "ranges_keep_their_bounds_and_limits"),
        (
            Fault::GetManyNextKey,
            "get_many_answers_exactly_the_keys_asked",
        ),
    ] {
        let failures = contract::check_all(&Broken(MemoryStore::default(), fault))
            .expect_err(&format!("{fault:?} passed the contract"));
        assert!(
            failures.lines().any(|line| line.starts_with(check)),
            "{fault:?} was not caught by {check}: {failures}"
        );
    }
}

#[test]
fn the_differential_check_catches_backends_that_break_the_contract() {
    let batches = [vec![(0, 1, Some(1)), (0, 1, Some(2))]];
    let store = Broken(MemoryStore::default(), Fault::FirstChangeWins);
    assert!(contract::differential(&store, &batches, &[]).is_err());
    // Keys 4 ("a") and 5 ("a\0"): `range("", "a\0")` must leave out "a\0".
    let batches = [vec![(0, 4, Some(1)), (0, 5, Some(1))]];
    let store = Broken(MemoryStore::default(), Fault::InclusiveTo);
    assert!(contract::differential(&store, &batches, &[(0, 5, 10)]).is_err());
    let store = MemoryStore::default();
    contract::differential(&store, &batches, &[(0, 5, 10)]).unwrap();
}

fn steps() -> impl Strategy<Value = Vec<Vec<Step>>> {
    let step = (0u8..3, 0..DIFFERENTIAL_KEYS, prop::option::of(any::<u16>()));
    prop::collection::vec(prop::collection::vec(step, 0..12), 1..8)
}

fn reads() -> impl Strategy<Value = Vec<Read>> {
    let read = (0..DIFFERENTIAL_KEYS, 0..=DIFFERENTIAL_KEYS, 0u8..6);
    prop::collection::vec(read, 0..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn memory_store_agrees_with_a_model_on_random_batches(batches in steps(), reads in reads()) {
        let store = MemoryStore::default();
        contract::differential(&store, &batches, &reads).map_err(TestCaseError::fail)?;
    }
}
