//! The behaviour every [`Store`] backend must share, as checks that a backend's tests run
//! against it (`docs/storage.md`, "The store contract"). The domain is written against this
//! behaviour, not against one engine: a backend that passes these checks can replace another.
//!
//! What the checks hold a backend to:
//!
//! - **Keys** are any UTF-8 string, the empty string and U+0000 included, ordered by their
//!   UTF-8 bytes (which is code point order; not UTF-16 order, not a locale's collation).
//!   Callers use U+001F as a separator inside keys, and [`super::for_each_record`] pages with
//!   bounds that end in U+0000. A SQL backend therefore needs byte-ordered keys that can hold
//!   U+0000 (`bytea`, not `text`).
//! - **Keys** are up to 2 KiB long (a relationship key holds two IDs of up to 128 characters,
//!   up to 512 bytes each); an index with a smaller entry limit must not hold them whole.
//! - **Values** are any bytes, empty included, up to at least 1 MiB.
//! - **Tables** are separate key spaces.
//! - **Commit** applies a whole batch in order and at once: readers see all of it or none of it;
//!   a later mutation of a key in the batch wins over an earlier one; deleting a missing key is
//!   not an error.
//! - **Ranges**: `range_from(t, from, limit)` is the first `limit` records with `from <= key`;
//!   `range(t, from, to, limit)` those with `from <= key < to`, none when `from >= to`; both in
//!   key order, `limit` 0 giving none.
//! - **Durability**: what a commit acknowledged is there when the storage is opened again.
//!
//! Plain functions returning `Err(description)`, so that the library carries no test
//! dependency; a backend's tests call [`check_all`], [`check_reopen`] and, from a property test,
//! [`differential`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Mutation, Store, Table};

/// One check of the contract, run on a store whose tables it may fill and empty.
pub type Check = fn(&dyn Store) -> Result<(), String>;

/// Every check that needs only a store (the durability check, which reopens it, is
/// [`check_reopen`]), by name.
pub const CHECKS: &[(&str, Check)] = &[
    (
        "scan_returns_records_in_byte_order",
        scan_returns_records_in_byte_order,
    ),
    (
        "the_empty_key_is_the_smallest_key",
        the_empty_key_is_the_smallest_key,
    ),
    (
        "a_batch_applies_in_order_and_the_last_change_of_a_key_wins",
        a_batch_applies_in_order_and_the_last_change_of_a_key_wins,
    ),
    (
        "tables_are_separate_key_spaces",
        tables_are_separate_key_spaces,
    ),
    (
        "ranges_keep_their_bounds_and_limits",
        ranges_keep_their_bounds_and_limits,
    ),
    (
        "values_of_any_bytes_and_size_round_trip",
        values_of_any_bytes_and_size_round_trip,
    ),
    (
        "readers_see_a_batch_whole_or_not_at_all",
        readers_see_a_batch_whole_or_not_at_all,
    ),
    (
        "a_counted_store_fences_commits_at_its_counter",
        a_counted_store_fences_commits_at_its_counter,
    ),
    (
        "get_many_answers_exactly_the_keys_asked",
        get_many_answers_exactly_the_keys_asked,
    ),
    (
        "a_counted_store_logs_the_keys_of_followed_tables",
        a_counted_store_logs_the_keys_of_followed_tables,
    ),
];

/// Runs every check of [`CHECKS`] on `store`, emptying its tables before each one, and reports
/// every failure by name. It deletes every record: only ever on a store made for the test.
pub fn check_all(store: &dyn Store) -> Result<(), String> {
    let mut failures = Vec::new();
    for (name, check) in CHECKS {
        let outcome = clear(store).and_then(|()| check(store));
        if let Err(e) = outcome {
            failures.push(format!("{name}: {e}"));
        }
    }
    clear(store)?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// Deletes every record of every table.
pub fn clear(store: &dyn Store) -> Result<(), String> {
    let mut batch = Vec::new();
    for table in Table::ALL {
        for (key, _) in store
            .scan(table)
            .map_err(|e| format!("scan {table:?}: {e}"))?
        {
            batch.push(Mutation::delete(table, key));
        }
    }
    store
        .commit(&batch)
        .map_err(|e| format!("clearing commit: {e}"))?;
    for table in Table::ALL {
        let left = store.scan(table).map_err(|e| e.to_string())?.len();
        ensure(left == 0, || {
            format!("{table:?} keeps {left} records after deleting them all")
        })?;
    }
    Ok(())
}

/// Keys that orders other than UTF-8 byte order sort differently: case, U+001F and U+0000
/// after a prefix, the ASCII/Latin-1 edge, a character above U+FFFF (before U+FF61 in UTF-16
/// order, after it in byte order), and the empty key.
pub const TRICKY_KEYS: &[&str] = &[
    "",
    "\0",
    "A",
    "Z",
    "a",
    "a\0",
    "a\u{1f}",
    "a\u{1f}b",
    "a\u{1f}b\u{1f}c",
    "ab",
    "abc",
    "b",
    "z",
    "\u{7f}",
    "\u{80}",
    "é",
    "e\u{301}",
    "日本",
    "\u{ff61}",
    "\u{1f600}",
    "\u{10ffff}",
];

fn ensure(ok: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(message()) }
}

type Rows = Vec<(String, Vec<u8>)>;

fn scan(store: &dyn Store, table: Table) -> Result<Rows, String> {
    store
        .scan(table)
        .map_err(|e| format!("scan {table:?}: {e}"))
}

fn commit(store: &dyn Store, batch: &[Mutation]) -> Result<(), String> {
    store.commit(batch).map_err(|e| format!("commit: {e}"))
}

fn range(
    store: &dyn Store,
    table: Table,
    from: &str,
    to: &str,
    limit: usize,
) -> Result<Rows, String> {
    store
        .range(table, from, to, limit)
        .map_err(|e| format!("range {from:?}..{to:?} limit {limit}: {e}"))
}

fn range_from(store: &dyn Store, table: Table, from: &str, limit: usize) -> Result<Rows, String> {
    store
        .range_from(table, from, limit)
        .map_err(|e| format!("range_from {from:?} limit {limit}: {e}"))
}

fn rows(model: &BTreeMap<String, Vec<u8>>) -> Rows {
    model.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn model_range(
    model: &BTreeMap<String, Vec<u8>>,
    from: &str,
    to: Option<&str>,
    limit: usize,
) -> Rows {
    model
        .iter()
        .filter(|(k, _)| k.as_str() >= from && to.is_none_or(|to| k.as_str() < to))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn same(what: impl FnOnce() -> String, got: &Rows, want: &Rows) -> Result<(), String> {
    let keys = |r: &Rows| r.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    ensure(got == want, || {
        format!(
            "{}: got keys {:?}, want {:?}{}",
            what(),
            keys(got),
            keys(want),
            if keys(got) == keys(want) {
                " (values differ)"
            } else {
                ""
            }
        )
    })
}

/// Scan returns every record in UTF-8 byte order, whatever the order they were written in.
pub fn scan_returns_records_in_byte_order(store: &dyn Store) -> Result<(), String> {
    let table = Table::Relationships;
    // Written in reverse, then in an interleaved order, in two batches.
    let (odd, even): (Vec<_>, Vec<_>) = TRICKY_KEYS
        .iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 1);
    for half in [odd, even] {
        let batch: Vec<Mutation> = half
            .iter()
            .rev()
            .map(|(_, k)| Mutation::put(table, **k, k.as_bytes().to_vec()))
            .collect();
        commit(store, &batch)?;
    }
    let mut want: Vec<(String, Vec<u8>)> = TRICKY_KEYS
        .iter()
        .map(|k| ((*k).to_owned(), k.as_bytes().to_vec()))
        .collect();
    want.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    same(|| "scan".into(), &scan(store, table)?, &want)
}

/// `""` is a key like any other, and the smallest: a scan and a page from `""` start with it.
pub fn the_empty_key_is_the_smallest_key(store: &dyn Store) -> Result<(), String> {
    let table = Table::Twins;
    commit(
        store,
        &[
            Mutation::put(table, "a", b"1".to_vec()),
            Mutation::put(table, "", b"empty".to_vec()),
        ],
    )?;
    let want = vec![
        (String::new(), b"empty".to_vec()),
        ("a".to_owned(), b"1".to_vec()),
    ];
    same(|| "scan".into(), &scan(store, table)?, &want)?;
    same(
        || "range_from \"\"".into(),
        &range_from(store, table, "", 10)?,
        &want,
    )?;
    same(
        || "range \"\"..\"a\"".into(),
        &range(store, table, "", "a", 10)?,
        &want[..1].to_vec(),
    )?;
    commit(store, &[Mutation::delete(table, "")])?;
    same(
        || "scan after deleting \"\"".into(),
        &scan(store, table)?,
        &want[1..].to_vec(),
    )
}

/// A batch of puts and deletes over several tables is applied as if in order: the last change
/// of a key wins, deleting a missing key is no error, a key deleted then written again exists.
pub fn a_batch_applies_in_order_and_the_last_change_of_a_key_wins(
    store: &dyn Store,
) -> Result<(), String> {
    let (t, u) = (Table::Twins, Table::History);
    commit(
        store,
        &[
            Mutation::put(t, "keep", b"old".to_vec()),
            Mutation::put(t, "gone", b"old".to_vec()),
            Mutation::put(t, "back", b"old".to_vec()),
            Mutation::put(u, "x", b"old".to_vec()),
        ],
    )?;
    commit(
        store,
        &[
            Mutation::put(t, "new", b"1".to_vec()),
            Mutation::put(t, "new", b"2".to_vec()),
            Mutation::put(t, "new", b"3".to_vec()),
            Mutation::delete(t, "gone"),
            Mutation::delete(t, "never-there"),
            Mutation::delete(t, "back"),
            Mutation::put(t, "back", b"again".to_vec()),
            Mutation::put(t, "brief", b"1".to_vec()),
            Mutation::delete(t, "brief"),
            Mutation::delete(u, "x"),
            Mutation::put(u, "y", b"1".to_vec()),
        ],
    )?;
    let want_t = vec![
        ("back".to_owned(), b"again".to_vec()),
        ("keep".to_owned(), b"old".to_vec()),
        ("new".to_owned(), b"3".to_vec()),
    ];
    same(|| format!("scan {t:?}"), &scan(store, t)?, &want_t)?;
    same(
        || format!("scan {u:?}"),
        &scan(store, u)?,
        &vec![("y".to_owned(), b"1".to_vec())],
    )?;
    // A batch of deletes of missing keys only, and an empty batch, succeed and change nothing.
    commit(
        store,
        &[
            Mutation::delete(t, "nothing"),
            Mutation::delete(t, "nothing"),
        ],
    )?;
    commit(store, &[])?;
    same(
        || format!("scan {t:?} after no-op batches"),
        &scan(store, t)?,
        &want_t,
    )
}

/// Every table is its own key space: one key in every table holds that table's value, and
/// deleting it from one table leaves the others alone.
pub fn tables_are_separate_key_spaces(store: &dyn Store) -> Result<(), String> {
    let batch: Vec<Mutation> = Table::ALL
        .iter()
        .map(|t| Mutation::put(*t, "k", t.name().as_bytes().to_vec()))
        .collect();
    commit(store, &batch)?;
    for table in Table::ALL {
        let want = vec![("k".to_owned(), table.name().as_bytes().to_vec())];
        same(|| format!("scan {table:?}"), &scan(store, table)?, &want)?;
        same(
            || format!("range_from {table:?}"),
            &range_from(store, table, "", 100)?,
            &want,
        )?;
        same(
            || format!("range {table:?}"),
            &range(store, table, "", "z", 100)?,
            &want,
        )?;
    }
    commit(store, &[Mutation::delete(Table::ApiKeys, "k")])?;
    for table in Table::ALL {
        let left = scan(store, table)?.len();
        let want = usize::from(table != Table::ApiKeys);
        ensure(left == want, || {
            format!("{table:?} holds {left} records after deleting ApiKeys/k, want {want}")
        })?;
    }
    Ok(())
}

/// `get_many` answers each key asked, in the order asked, with its value or `None`: exact keys
/// only (not a key's prefix or extensions, the empty key and U+0000 included), one table only,
/// a key asked twice answered twice.
pub fn get_many_answers_exactly_the_keys_asked(store: &dyn Store) -> Result<(), String> {
    let present = ["", "a", "a\0", "ab", "b\u{10348}", "z"];
    let mut batch: Vec<Mutation> = present
        .iter()
        .map(|k| Mutation::put(Table::Replay, *k, format!("v:{k}").into_bytes()))
        .collect();
    batch.push(Mutation::put(Table::Devices, "c", b"other table".to_vec()));
    batch.push(Mutation::put(Table::Replay, "empty", Vec::new()));
    commit(store, &batch)?;
    let asked: Vec<String> = [
        "ab", "", "c", "a", "a\0\0", "aa", "z", "ab", "\0", "empty", "b",
    ]
    .iter()
    .map(|k| (*k).to_owned())
    .collect();
    let got = store
        .get_many(Table::Replay, &asked)
        .map_err(|e| format!("get_many: {e}"))?;
    let want: Vec<Option<Vec<u8>>> = asked
        .iter()
        .map(|k| match k.as_str() {
            "empty" => Some(Vec::new()),
            k if present.contains(&k) => Some(format!("v:{k}").into_bytes()),
            _ => None,
        })
        .collect();
    ensure(got == want, || {
        format!("get_many of {asked:?}: got {got:?}, want {want:?}")
    })?;
    let none = store
        .get_many(Table::Replay, &[])
        .map_err(|e| format!("get_many: {e}"))?;
    ensure(none.is_empty(), || {
        format!("get_many of no keys gave {none:?}")
    })
}

/// A store with a commit counter logs, per commit, the keys of logged tables (`Table::logged`:
/// the followed ones and the graph's kept in memory) it put or deleted, and once the graph's
/// mark (`GRAPH_CHANGED`) if it changed a record of the graph's tables (and nothing of other
/// tables: not replay windows, not history, not the feed's records); `changes_after` answers
/// the commits in its range, in commit order. A store without a counter keeps no log.
pub fn a_counted_store_logs_the_keys_of_followed_tables(store: &dyn Store) -> Result<(), String> {
    use crate::store::Change;
    let head = store.head().map_err(|e| format!("head: {e}"))?;
    let Some(h0) = head else {
        let log = store
            .changes_after(0, u64::MAX)
            .map_err(|e| format!("changes_after: {e}"))?;
        return ensure(log.is_none(), || {
            "a store without a counter answered a change log".into()
        });
    };
    commit(
        store,
        &[
            Mutation::put(Table::Identities, "a", b"1".to_vec()),
            Mutation::put(Table::Twins, "t", b"the graph's".to_vec()),
            Mutation::put(Table::Events, "e", b"not logged".to_vec()),
            Mutation::delete(Table::Devices, "d"),
            Mutation::put(Table::Firmware, "", b"w".to_vec()),
            Mutation::put(Table::Replay, "r", b"decided by expectation".to_vec()),
            Mutation::put(Table::Identities, "a", b"2".to_vec()),
        ],
    )?;
    commit(
        store,
        &[Mutation::put(Table::RevokedTokens, "j", b"9".to_vec())],
    )?;
    commit(
        store,
        &[Mutation::put(Table::History, "h", b"not followed".to_vec())],
    )?;
    let read = |after: u64, upto: u64| -> Result<Vec<(u64, Table, String)>, String> {
        let changes = store
            .changes_after(after, upto)
            .map_err(|e| format!("changes_after({after}, {upto}): {e}"))?
            .ok_or_else(|| format!("changes_after({after}, {upto}) has no log"))?;
        let seqs: Vec<u64> = changes.iter().map(|c| c.seq).collect();
        ensure(seqs.is_sorted(), || {
            format!("changes_after({after}, {upto}) out of commit order: {seqs:?}")
        })?;
        let mut rows: Vec<(u64, Table, String)> = changes
            .into_iter()
            .map(|Change { seq, table, key }| (seq, table, key))
            .collect();
        rows.sort();
        rows.dedup();
        Ok(rows)
    };
    let first = vec![
        (h0 + 1, Table::Identities, "a".to_owned()),
        (h0 + 1, Table::Devices, "d".to_owned()),
        (h0 + 1, Table::Firmware, String::new()),
        (h0 + 1, Table::Twins, "t".to_owned()),
        (h0 + 1, Table::Meta, crate::store::GRAPH_CHANGED.to_owned()),
    ];
    let second = vec![(h0 + 2, Table::RevokedTokens, "j".to_owned())];
    let sorted = |mut v: Vec<(u64, Table, String)>| {
        v.sort();
        v
    };
    let all = sorted([first.clone(), second.clone()].concat());
    for (after, upto, want) in [
        (h0, h0 + 3, all.clone()),
        (h0, u64::MAX, all),
        (h0, h0 + 1, sorted(first)),
        (h0 + 1, h0 + 3, second),
        (h0 + 2, h0 + 3, Vec::new()),
        (h0 + 3, h0 + 3, Vec::new()),
    ] {
        let got = read(after, upto)?;
        ensure(got == want, || {
            format!("changes_after({after}, {upto}): got {got:?}, want {want:?}")
        })?;
    }
    Ok(())
}

/// `range_from` and `range` against a model, over keys that are prefixes of each other, with
/// bounds on, between, before and after the keys, bounds ending in U+0000, and limits 0, 1, 2
/// and more than the table holds.
pub fn ranges_keep_their_bounds_and_limits(store: &dyn Store) -> Result<(), String> {
    let table = Table::History;
    let mut model = BTreeMap::new();
    let batch: Vec<Mutation> = TRICKY_KEYS
        .iter()
        .enumerate()
        .map(|(i, k)| {
            model.insert((*k).to_owned(), vec![i as u8]);
            Mutation::put(table, *k, vec![i as u8])
        })
        .collect();
    commit(store, &batch)?;
    // A neighbouring table's keys must never leak into a range.
    commit(
        store,
        &[Mutation::put(
            Table::HistoryLog,
            "a\u{1f}",
            b"other".to_vec(),
        )],
    )?;
    let mut bounds: Vec<String> = TRICKY_KEYS.iter().map(|k| (*k).to_owned()).collect();
    bounds.extend(TRICKY_KEYS.iter().map(|k| format!("{k}\0")));
    bounds.extend(["a\u{1e}", "a\u{20}", "aa", "\u{10ffff}\u{10ffff}", "0"].map(String::from));
    for limit in [0, 1, 2, usize::MAX] {
        for from in &bounds {
            let want = model_range(&model, from, None, limit);
            same(
                || format!("range_from {from:?} limit {limit}"),
                &range_from(store, table, from, limit)?,
                &want,
            )?;
            for to in &bounds {
                let want = model_range(&model, from, Some(to), limit);
                if from >= to {
                    ensure(want.is_empty(), || "the model is wrong".into())?;
                }
                same(
                    || format!("range {from:?}..{to:?} limit {limit}"),
                    &range(store, table, from, to, limit)?,
                    &want,
                )?;
            }
        }
    }
    // Paging with `for_each_record` visits every record once, in order, whatever the page.
    for page in [1, 2, 3, TRICKY_KEYS.len(), TRICKY_KEYS.len() + 1] {
        let mut seen = Vec::new();
        super::for_each_record(store, table, page, |k, v| {
            seen.push((k, v));
            Ok::<_, super::StoreError>(())
        })
        .map_err(|e| format!("for_each_record page {page}: {e}"))?;
        same(
            || format!("for_each_record page {page}"),
            &seen,
            &rows(&model),
        )?;
    }
    Ok(())
}

/// Values are bytes, not text: empty, every byte value, and 1 MiB come back as written.
pub fn values_of_any_bytes_and_size_round_trip(store: &dyn Store) -> Result<(), String> {
    let table = Table::Quarantine;
    let every_byte: Vec<u8> = (0..=255u8).collect();
    let large: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    commit(
        store,
        &[
            Mutation::put(table, "empty", Vec::new()),
            Mutation::put(table, "every-byte", every_byte.clone()),
            Mutation::put(table, "large", large.clone()),
        ],
    )?;
    let want = vec![
        ("empty".to_owned(), Vec::new()),
        ("every-byte".to_owned(), every_byte),
        ("large".to_owned(), large.clone()),
    ];
    same(|| "scan".into(), &scan(store, table)?, &want)?;
    same(
        || "range".into(),
        &range(store, table, "l", "m", 5)?,
        &want[2..].to_vec(),
    )?;
    // Overwritten by a smaller value, then by a larger one.
    commit(store, &[Mutation::put(table, "large", b"small".to_vec())])?;
    same(
        || "range after shrinking".into(),
        &range_from(store, table, "large", 1)?,
        &vec![("large".to_owned(), b"small".to_vec())],
    )?;
    let larger: Vec<u8> = large.iter().chain(large.iter()).copied().collect();
    commit(store, &[Mutation::put(table, "large", larger.clone())])?;
    same(
        || "range after growing to 2 MiB".into(),
        &range_from(store, table, "large", 1)?,
        &vec![("large".to_owned(), larger)],
    )
}

/// Keys of up to 2 KiB, ASCII and four-byte characters, are kept whole and apart from keys
/// they share a long prefix with.
pub fn keys_of_up_to_2_kib_round_trip(store: &dyn Store) -> Result<(), String> {
    let table = Table::Relationships;
    let ascii = "k".repeat(2048);
    let wide = "\u{1f600}".repeat(512);
    let mut keys = [
        ascii.clone(),
        format!("{}x", "k".repeat(2047)),
        wide,
        format!("{}\u{1f}", "\u{1f600}".repeat(511)),
    ];
    let batch: Vec<Mutation> = keys
        .iter()
        .map(|k| Mutation::put(table, k.as_str(), k.len().to_be_bytes().to_vec()))
        .collect();
    commit(store, &batch)?;
    keys.sort();
    let want: Rows = keys
        .iter()
        .map(|k| (k.clone(), k.len().to_be_bytes().to_vec()))
        .collect();
    same(|| "scan".into(), &scan(store, table)?, &want)?;
    same(
        || "range over the 2 KiB ASCII key".into(),
        &range(store, table, &ascii, &format!("{ascii}\0"), 10)?,
        &want[..1].to_vec(),
    )
}

/// While batches that rewrite a set of keys together are committed, a reader scanning the
/// table sees every key of the set at one version: never part of a batch.
pub fn readers_see_a_batch_whole_or_not_at_all(store: &dyn Store) -> Result<(), String> {
    const KEYS: usize = 8;
    const ROUNDS: u32 = 100;
    let table = Table::Streams;
    let batch = |round: u32| -> Vec<Mutation> {
        (0..KEYS)
            .map(|i| Mutation::put(table, format!("k{i}"), round.to_be_bytes().to_vec()))
            .collect()
    };
    commit(store, &batch(0))?;
    let done = AtomicBool::new(false);
    let (written, read) = std::thread::scope(|s| {
        let reader = s.spawn(|| -> Result<usize, String> {
            let mut scans = 0;
            while !done.load(Ordering::SeqCst) || scans == 0 {
                let rows = scan(store, table)?;
                scans += 1;
                ensure(rows.len() == KEYS, || {
                    format!("a scan saw {} of the {KEYS} keys", rows.len())
                })?;
                let first = rows.first().map(|(_, v)| v.clone());
                ensure(rows.iter().all(|(_, v)| Some(v) == first.as_ref()), || {
                    format!("a scan saw a batch in part: {rows:?}")
                })?;
            }
            Ok(scans)
        });
        let written = (1..=ROUNDS).try_for_each(|round| commit(store, &batch(round)));
        done.store(true, Ordering::SeqCst);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err("the reader panicked".into()));
        (written, read)
    });
    written?;
    read?;
    let last = scan(store, table)?;
    ensure(
        last.iter()
            .all(|(_, v)| *v == ROUNDS.to_be_bytes().to_vec()),
        || "the last batch is not what the table holds".into(),
    )
}

type Model = BTreeMap<(Table, String), Vec<u8>>;

/// Commits `batch` to `store` and applies it to `model`.
fn apply(store: &dyn Store, model: &mut Model, batch: Vec<Mutation>) -> Result<(), String> {
    commit(store, &batch)?;
    for m in batch {
        match m.value {
            Some(v) => model.insert((m.table, m.key), v),
            None => model.remove(&(m.table, m.key)),
        };
    }
    Ok(())
}

/// Durability: records committed, overwritten and deleted over several batches are there, as
/// last committed, each time `open` opens the same storage again; a store opened again takes
/// further commits. `open` must return a store on the same storage as the one before it, which
/// this check drops first (a file-backed store may lock its file).
pub fn check_reopen(mut open: impl FnMut() -> Arc<dyn Store>) -> Result<(), String> {
    let store = open();
    clear(store.as_ref())?;
    let mut model = Model::new();
    let large: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 253) as u8).collect();
    let mut first: Vec<Mutation> = TRICKY_KEYS
        .iter()
        .map(|k| Mutation::put(Table::Twins, *k, k.as_bytes().to_vec()))
        .collect();
    first.push(Mutation::put(Table::Models, "m", large));
    first.push(Mutation::put(Table::ApiKeys, "key", b"digest".to_vec()));
    apply(store.as_ref(), &mut model, first)?;
    apply(
        store.as_ref(),
        &mut model,
        vec![
            Mutation::delete(Table::Twins, "a"),
            Mutation::put(Table::Twins, "b", b"overwritten".to_vec()),
            Mutation::delete(Table::ApiKeys, "key"),
        ],
    )?;
    let check = |store: &dyn Store, model: &Model, when: &str| {
        for table in Table::ALL {
            let want: Rows = model
                .iter()
                .filter(|((t, _), _)| *t == table)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect();
            same(
                || format!("{when}: scan {table:?}"),
                &scan(store, table)?,
                &want,
            )?;
        }
        Ok::<_, String>(())
    };
    drop(store);
    let store = open();
    check(store.as_ref(), &model, "after reopening")?;
    apply(
        store.as_ref(),
        &mut model,
        vec![
            Mutation::put(Table::Twins, "a", b"back".to_vec()),
            Mutation::put(Table::Devices, "d", b"device".to_vec()),
        ],
    )?;
    drop(store);
    let store = open();
    check(store.as_ref(), &model, "after reopening twice")?;
    clear(store.as_ref())
}

/// A step of [`differential`]: `(table, key, value)` as small numbers that a property test
/// generates and shrinks easily. `table` picks one of three tables, `key` one of
/// [`TRICKY_KEYS`] and a few more, `value` `None` for a delete or the bytes of a put.
pub type Step = (u8, u8, Option<u16>);

/// A read of [`differential`]: `(from, to, limit)`, `from` and `to` picking bounds as `key` in
/// [`Step`], `to` past the bounds meaning a `range_from`.
pub type Read = (u8, u8, u8);

/// How many distinct keys [`Step`] and [`Read`] pick from (`0..DIFFERENTIAL_KEYS`); a [`Read`]
/// whose `to` is `DIFFERENTIAL_KEYS` or more is a `range_from`.
pub const DIFFERENTIAL_KEYS: u8 = TRICKY_KEYS.len() as u8 + 7;

const DIFFERENTIAL_TABLES: [Table; 3] = [Table::Twins, Table::History, Table::ApiKeys];

fn differential_key(n: u8) -> String {
    let n = usize::from(n);
    match TRICKY_KEYS.get(n) {
        Some(k) => (*k).to_owned(),
        // Keys built from a shared prefix, as the relationship and history keys are.
        None => format!("t\u{1f}{}", n % 7),
    }
}

fn differential_value(v: u16) -> Vec<u8> {
    // Empty values and values of a few sizes.
    v.to_be_bytes()
        .repeat(usize::from(v % 5) * usize::from(v % 3 + 1))
}

/// Applies `batches` to `store` (whose tables must start empty) and to a `BTreeMap` model, and
/// after each batch compares the scan of every table used and `reads` with the model.
pub fn differential(
    store: &dyn Store,
    batches: &[Vec<Step>],
    reads: &[Read],
) -> Result<(), String> {
    let mut model = Model::new();
    for table in DIFFERENTIAL_TABLES {
        ensure(scan(store, table)?.is_empty(), || {
            format!("{table:?} is not empty at the start")
        })?;
    }
    for (n, steps) in batches.iter().enumerate() {
        let batch: Vec<Mutation> = steps
            .iter()
            .map(|&(t, k, v)| {
                let table = DIFFERENTIAL_TABLES[usize::from(t) % DIFFERENTIAL_TABLES.len()];
                match v {
                    Some(v) => Mutation::put(table, differential_key(k), differential_value(v)),
                    None => Mutation::delete(table, differential_key(k)),
                }
            })
            .collect();
        apply(store, &mut model, batch)?;
        for table in DIFFERENTIAL_TABLES {
            let want: BTreeMap<String, Vec<u8>> = model
                .iter()
                .filter(|((t, _), _)| *t == table)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect();
            same(
                || format!("after batch {n}: scan {table:?}"),
                &scan(store, table)?,
                &rows(&want),
            )?;
            for &(from, to, limit) in reads {
                let from = differential_key(from);
                let limit = usize::from(limit);
                if to >= DIFFERENTIAL_KEYS {
                    same(
                        || format!("after batch {n}: range_from {table:?} {from:?} limit {limit}"),
                        &range_from(store, table, &from, limit)?,
                        &model_range(&want, &from, None, limit),
                    )?;
                } else {
                    let to = differential_key(to);
                    same(
                        || {
                            format!(
                                "after batch {n}: range {table:?} {from:?}..{to:?} limit {limit}"
                            )
                        },
                        &range(store, table, &from, &to, limit)?,
                        &model_range(&want, &from, Some(&to), limit),
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// A store with a commit counter ([`Store::head`] is `Some`) moves it by one per commit,
/// fenced or not, and applies nothing of a fenced commit at another value. A store without one
/// passes trivially: it is written by one process alone.
pub fn a_counted_store_fences_commits_at_its_counter(store: &dyn Store) -> Result<(), String> {
    use super::Fenced;
    let Some(start) = store.head().map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let table = Table::EventRoutes;
    let put = |key: &str| vec![Mutation::put(table, key, key.as_bytes().to_vec())];
    let head = |store: &dyn Store| store.head().map_err(|e| e.to_string());
    match store
        .commit_at(&put("a"), start)
        .map_err(|e| e.to_string())?
    {
        Fenced::Committed(n) if n == start + 1 => {}
        other => return Err(format!("a commit at the counter answered {other:?}")),
    }
    commit(store, &put("b"))?;
    if head(store)? != Some(start + 2) {
        return Err("a plain commit did not move the counter".into());
    }
    match store
        .commit_at(&put("c"), start + 1)
        .map_err(|e| e.to_string())?
    {
        Fenced::Stale(n) if n == start + 2 => {}
        other => return Err(format!("a commit at a stale counter answered {other:?}")),
    }
    if head(store)? != Some(start + 2) {
        return Err("a refused fenced commit moved the counter".into());
    }
    let keys: Vec<String> = store
        .scan(table)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    if keys != ["a", "b"] {
        return Err(format!(
            "a refused fenced commit applied something: {keys:?}"
        ));
    }
    Ok(())
}
