//! The history of accepted readings, written so that it costs the ingestion commit little.
//!
//! History is read by twin, name and time, but readings arrive interleaved across every stream.
//! Written under their read keys in the ingestion commit, each commit dirtied one B-tree leaf per
//! stream it carried: the largest part of a small commit's work (measured before ac95e99). So the
//! commit appends each record to a log keyed by arrival ([`Table::HistoryLog`], in the main
//! store, atomically with the twin update it goes with: one or two leaves per commit), and a
//! merger moves the log a page at a time into the history store ([`Table::History`], a store of
//! its own with its own writer), where each stream's records of a page land side by side. The
//! merger runs in the background every [`MERGE_EVERY`], or sooner once a page is waiting; a
//! history read merges first, so it sees every reading acknowledged before it began.
//!
//! Crash safety: a page is committed to the history store before it leaves the log, and merging
//! a page again writes the same keys and values, so a crash in between loses and duplicates
//! nothing.
//!
//! Retention ([`HistoryStore::keep_for`]): the merger also removes, every [`PURGE_EVERY`], the
//! records measured longer ago than the retention period, stream by stream, a page per
//! transaction of the history store. Without it history is kept for ever.
//!
//! The merge is background work and yields to ingestion: the merger thread runs at a lower
//! scheduling priority ([`MERGER_NICE`]), and once [`HistoryStore::trim_through`] is set (the
//! server hands the deletions to the twin writer) no transaction of its own holds the main
//! store's writer, so nothing that ingestion waits for runs at that lower priority.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use twinguard_core::store::{Mutation, Store, StoreError, Table};

use crate::records::{history_stream, stream_bound, stream_end};

/// Log records moved per merge transaction: large enough that a stream's records of one page
/// share leaves.
pub const MERGE_PAGE: usize = 4096;
/// How often the merger looks at the log when fewer than a page of records are waiting.
pub const MERGE_EVERY: Duration = Duration::from_millis(500);
/// How much the merger thread lowers its scheduling priority (a nice increment; Linux keeps nice
/// values per thread). At 5 it gets about a third of the share of an ingestion thread when the
/// cores are contended, enough to keep up with the peak, and all of an idle core otherwise.
pub const MERGER_NICE: i32 = 5;

/// How often the merger removes history older than the retention period, when one is set.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Commits the deletion of merged records from the log (see [`HistoryStore::trim_through`]).
type Trim = Box<dyn Fn(Vec<Mutation>) -> Result<(), StoreError> + Send + Sync>;

/// The log and the history store, and the merge between them. Cheap to clone.
#[derive(Clone)]
pub struct HistoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The main store: the log is committed with the twin updates.
    main: Arc<dyn Store>,
    /// Where merged records are kept, under their read keys.
    series: Arc<dyn Store>,
    /// The next log key.
    next: AtomicU64,
    /// Log records handed out since the last merge (an estimate: some may never commit).
    pending: AtomicUsize,
    /// One merge at a time; holds the log keys already reported as unreadable.
    merging: Mutex<HashSet<String>>,
    merger: Mutex<Option<std::thread::Thread>>,
    /// How merged records leave the log; a transaction of its own on `main` until set.
    trim: OnceLock<Trim>,
    /// How long merged records are kept; for ever until set.
    retention: OnceLock<Duration>,
    /// Readings go straight to their history keys in the ingestion commit, with no log (see
    /// [`HistoryStore::open`]).
    direct: bool,
}

impl std::fmt::Debug for HistoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryStore").finish_non_exhaustive()
    }
}

impl HistoryStore {
    /// Opens the history over `main` (which holds the log) and `series` (which holds the merged
    /// records); `series` may be `main` itself. Merges everything the log holds, and moves
    /// history records that an earlier version kept in the main store into `series`.
    ///
    /// When `series` is `main` and several nodes may share it (it counts its commits,
    /// [`Store::head`]), there is no log from then on: each reading goes to its history key in
    /// the ingestion commit. The log's keys count per node, so two nodes' logs would overwrite
    /// each other's records; and the log exists for redb, whose B-tree a commit of many
    /// streams' readings would dirty leaf by leaf, not for PostgreSQL, which keeps history in a
    /// table of its own partitioned by day.
    pub fn open(main: Arc<dyn Store>, series: Arc<dyn Store>) -> Result<Self, StoreError> {
        let direct = Arc::ptr_eq(&main, &series) && main.head()?.is_some();
        let history = Self {
            inner: Arc::new(Inner {
                main,
                series,
                next: AtomicU64::new(0),
                pending: AtomicUsize::new(0),
                merging: Mutex::new(HashSet::new()),
                merger: Mutex::new(None),
                trim: OnceLock::new(),
                retention: OnceLock::new(),
                direct: false,
            }),
        };
        if !Arc::ptr_eq(&history.inner.main, &history.inner.series) {
            history.adopt_main_history()?;
        }
        history.merge()?;
        // Records the merge could not read stay in the log; new keys go after them.
        let left = history.inner.main.scan(Table::HistoryLog)?;
        let next = left
            .last()
            .and_then(|(key, _)| key.parse::<u64>().ok())
            .map_or(0, |n| n + 1);
        history.inner.next.store(next, Ordering::Relaxed);
        if direct {
            // The log is merged (what an earlier version left): from here on it stays empty.
            let mut history = history;
            if let Some(inner) = Arc::get_mut(&mut history.inner) {
                inner.direct = true;
            }
            return Ok(history);
        }
        Ok(history)
    }

    /// Starts the background merger; it stops once every clone of this store is dropped.
    pub fn spawn_merger(&self) -> std::io::Result<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let handle = std::thread::Builder::new()
            .name("history-merge".into())
            .spawn(move || {
                if let Err(e) = rustix::process::nice(MERGER_NICE) {
                    tracing::debug!(error = %e, "the history merger keeps its priority");
                }
                let mut purged: Option<std::time::Instant> = None;
                loop {
                    std::thread::park_timeout(MERGE_EVERY);
                    let Some(inner) = weak.upgrade() else {
                        return;
                    };
                    let history = HistoryStore { inner };
                    if let Err(e) = history.merge() {
                        tracing::warn!(error = %e, "merging the history log failed; will retry");
                    }
                    let due = purged.is_none_or(|at| at.elapsed() >= PURGE_EVERY);
                    if let Some(retention) = history.inner.retention.get()
                        && due
                    {
                        purged = Some(std::time::Instant::now());
                        let cutoff = now_ms() - retention.as_millis() as i64;
                        match history.purge_before(cutoff) {
                            Ok(0) => {}
                            Ok(removed) => tracing::info!(
                                records = removed,
                                "removed history older than the retention period"
                            ),
                            Err(e) => tracing::warn!(
                                error = %e,
                                "removing history older than the retention period failed; will retry"
                            ),
                        }
                    }
                }
            })?;
        if let Ok(mut merger) = self.inner.merger.lock() {
            *merger = Some(handle.thread().clone());
        }
        Ok(())
    }

    /// From now on, hands the deletion of merged records from the log to `trim`, which must
    /// commit them durably to the main store before it returns: for instance with the main
    /// store's other writes, rather than in transactions of its own. Set once; later calls are
    /// ignored.
    pub fn trim_through(
        &self,
        trim: impl Fn(Vec<Mutation>) -> Result<(), StoreError> + Send + Sync + 'static,
    ) {
        let _ = self.inner.trim.set(Box::new(trim));
    }

    /// From now on, keeps merged records for `retention` after their measurement time; the
    /// background merger removes older ones. Set once; later calls are ignored.
    pub fn keep_for(&self, retention: Duration) {
        let _ = self.inner.retention.set(retention);
    }

    /// Removes the merged records measured before `cutoff_ms` (Unix milliseconds), stream by
    /// stream, a page per transaction. Returns how many were removed. Costs one lookup per
    /// stream besides the records removed.
    pub fn purge_before(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let series = &self.inner.series;
        // Whole days at once where the store keeps history by day.
        let days = series.drop_history_before(cutoff_ms)?;
        if days > 0 {
            tracing::info!(
                days,
                "removed whole days of history older than the retention period"
            );
        }
        let mut removed = 0;
        let mut from = String::new();
        while let Some((key, _)) = series.range_from(Table::History, &from, 1)?.pop() {
            let Some(stream) = history_stream(&key) else {
                tracing::error!(key = %key, "a history key is unreadable; it is kept");
                from = format!("{key}\0");
                continue;
            };
            let (first, bound) = (stream_bound(stream, 0), stream_bound(stream, cutoff_ms));
            loop {
                let rows = series.range(Table::History, &first, &bound, MERGE_PAGE)?;
                let deletes: Vec<Mutation> = rows
                    .into_iter()
                    .map(|(key, _)| Mutation::delete(Table::History, key))
                    .collect();
                if !deletes.is_empty() {
                    series.commit(&deletes)?;
                }
                removed += deletes.len();
                if deletes.len() < MERGE_PAGE {
                    break;
                }
            }
            from = stream_end(stream);
        }
        Ok(removed)
    }

    /// The log record of a reading whose history key is `key` and stored value `value`: a
    /// mutation of the main store, for the commit that applies the reading.
    pub fn record(&self, key: &str, value: &[u8]) -> Mutation {
        if self.inner.direct {
            return Mutation::put(Table::History, key, value.to_vec());
        }
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        if self.inner.pending.fetch_add(1, Ordering::Relaxed) + 1 == MERGE_PAGE {
            self.wake_merger();
        }
        Mutation::put(Table::HistoryLog, log_key(n), frame(key, value))
    }

    /// The merged records with `from <= key < to`, at most `limit`, after merging the log so that
    /// every record committed before this call is among them.
    pub fn range(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.merge()?;
        self.merged_range(from, to, limit)
    }

    /// The records already merged into the history store with `from <= key < to`, in key order,
    /// at most `limit`: one page of an ordered range read, without merging the log first (a
    /// paged read merges once, then reads page after page).
    pub fn merged_range(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.series.range(Table::History, from, to, limit)
    }

    /// Moves every committed log record into the history store, a page per transaction.
    /// Returns how many records moved.
    pub fn merge(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        if inner.direct {
            return Ok(0);
        }
        let mut unreadable = inner
            .merging
            .lock()
            .map_err(|_| StoreError("the history merge lock is poisoned".into()))?;
        inner.pending.store(0, Ordering::Relaxed);
        let mut moved = 0;
        let mut from = String::new();
        loop {
            let rows = inner
                .main
                .range_from(Table::HistoryLog, &from, MERGE_PAGE)?;
            let Some((last, _)) = rows.last() else {
                return Ok(moved);
            };
            let full = rows.len() == MERGE_PAGE;
            from = format!("{last}\0");
            let mut puts = Vec::with_capacity(rows.len());
            let mut deletes = Vec::with_capacity(rows.len());
            for (log, framed) in rows {
                match unframe(&framed) {
                    Some((key, value)) => {
                        puts.push(Mutation::put(Table::History, key, value.to_vec()));
                        deletes.push(Mutation::delete(Table::HistoryLog, log));
                    }
                    // Left in the log, where an operator can find it; never silently dropped.
                    None => {
                        if unreadable.insert(log.clone()) {
                            tracing::error!(key = %log, "a history log record is unreadable; it stays in the log");
                        }
                    }
                }
            }
            puts.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            if !puts.is_empty() {
                let started = std::time::Instant::now();
                inner.series.commit(&puts)?;
                let stored = started.elapsed();
                // Only now, with the records durable in the history store.
                match inner.trim.get() {
                    Some(trim) => trim(deletes)?,
                    None => inner.main.commit(&deletes)?,
                }
                tracing::debug!(
                    records = puts.len(),
                    store_micros = stored.as_micros() as u64,
                    trim_micros = (started.elapsed() - stored).as_micros() as u64,
                    "merged a page of the history log"
                );
            }
            moved += puts.len();
            if !full {
                return Ok(moved);
            }
        }
    }

    /// Moves history records kept in the main store (before the log) into the history store.
    fn adopt_main_history(&self) -> Result<(), StoreError> {
        loop {
            let rows = self.inner.main.range_from(Table::History, "", MERGE_PAGE)?;
            if rows.is_empty() {
                return Ok(());
            }
            let deletes: Vec<Mutation> = rows
                .iter()
                .map(|(key, _)| Mutation::delete(Table::History, key.clone()))
                .collect();
            let puts: Vec<Mutation> = rows
                .into_iter()
                .map(|(key, value)| Mutation::put(Table::History, key, value))
                .collect();
            self.inner.series.commit(&puts)?;
            self.inner.main.commit(&deletes)?;
            tracing::info!(
                records = puts.len(),
                "moved history records into the history store"
            );
        }
    }

    fn wake_merger(&self) {
        if let Ok(merger) = self.inner.merger.lock()
            && let Some(thread) = merger.as_ref()
        {
            thread.unpark();
        }
    }
}

/// The time now in Unix milliseconds, as history keys hold measurement times.
fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Log keys sort by the order they were handed out.
fn log_key(n: u64) -> String {
    format!("{n:020}")
}

/// A log record's value: the history key's length (4 bytes, little-endian), the key, then the
/// stored value as it will be kept in the history store, so that merging parses nothing.
fn frame(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len() + value.len());
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value);
    out
}

fn unframe(framed: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = framed.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return None;
    }
    let (key, value) = rest.split_at(len);
    Some((std::str::from_utf8(key).ok()?, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinguard_core::store::MemoryStore;

    fn stores() -> (Arc<MemoryStore>, Arc<MemoryStore>) {
        (Arc::default(), Arc::default())
    }

    /// Two nodes that share a store (one that counts its commits, as PostgreSQL) each record
    /// readings and commit them: every reading of both is in the history. With a log (keyed by
    /// a counter of each node's own) the second node's records overwrote the first's.
    #[test]
    fn two_nodes_sharing_a_store_lose_none_of_each_others_readings() {
        let main: Arc<dyn Store> = Arc::new(MemoryStore::shared());
        let a = HistoryStore::open(main.clone(), main.clone()).unwrap();
        let b = HistoryStore::open(main.clone(), main.clone()).unwrap();
        for n in 0..100u64 {
            for (node, history) in [("a", &a), ("b", &b)] {
                let key = crate::records::history_key("t", "p", 1_000 + n as i64, node, n);
                main.commit(&[history.record(&key, b"{}")]).unwrap();
            }
        }
        let prefix = crate::records::history_bound("t", "p", 0);
        for history in [&a, &b] {
            let all = history
                .range(&prefix, &stream_end("t\u{1f}p"), 1_000)
                .unwrap();
            assert_eq!(all.len(), 200);
        }
        assert!(main.scan(Table::HistoryLog).unwrap().is_empty());
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        let framed = frame("t\u{1f}p\u{1f}0001", b"{\"value\":1}");
        assert_eq!(
            unframe(&framed),
            Some(("t\u{1f}p\u{1f}0001", &b"{\"value\":1}"[..]))
        );
        assert_eq!(unframe(&frame("", b"")), Some(("", &b""[..])));
        assert_eq!(unframe(b"\x02\x00"), None);
        assert_eq!(unframe(b"\x09\x00\x00\x00short"), None);
        assert_eq!(unframe(b"\x02\x00\x00\x00\xff\xfe"), None);
    }

    #[test]
    fn committed_records_are_read_back_under_their_history_keys_and_leave_the_log() {
        let (main, series) = stores();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        let records: Vec<Mutation> = (0..MERGE_PAGE + 10)
            .map(|i| history.record(&format!("k{i:05}"), format!("v{i}").as_bytes()))
            .collect();
        main.commit(&records).unwrap();
        // A record handed out but never committed (its commit failed) is simply absent.
        let _lost = history.record("lost", b"x");
        let rows = history.range("k", "l", usize::MAX).unwrap();
        assert_eq!(rows.len(), MERGE_PAGE + 10);
        assert_eq!(rows[7], ("k00007".to_owned(), b"v7".to_vec()));
        assert!(main.scan(Table::HistoryLog).unwrap().is_empty());
        assert_eq!(series.scan(Table::History).unwrap().len(), MERGE_PAGE + 10);
        assert_eq!(history.range("k00003", "k00005", 10).unwrap().len(), 2);
    }

    #[test]
    fn a_failed_merge_keeps_the_log_and_a_later_one_finishes_it() {
        let (main, series) = stores();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        main.commit(&[history.record("a", b"1"), history.record("b", b"2")])
            .unwrap();
        series.set_failing(true);
        assert!(history.merge().is_err());
        assert_eq!(main.scan(Table::HistoryLog).unwrap().len(), 2);
        series.set_failing(false);
        // Reopening merges what the log still holds and hands out keys after it.
        let reopened = HistoryStore::open(main.clone(), series.clone()).unwrap();
        assert!(main.scan(Table::HistoryLog).unwrap().is_empty());
        assert_eq!(series.scan(Table::History).unwrap().len(), 2);
        main.commit(&[reopened.record("c", b"3")]).unwrap();
        assert_eq!(reopened.range("", "z", 10).unwrap().len(), 3);
    }

    #[test]
    fn a_crash_between_the_two_commits_duplicates_nothing() {
        let (main, series) = stores();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        let record = history.record("a", b"1");
        main.commit(std::slice::from_ref(&record)).unwrap();
        // The page reached the history store, but the process died before the log was trimmed.
        series
            .commit(&[Mutation::put(Table::History, "a", b"1".to_vec())])
            .unwrap();
        let reopened = HistoryStore::open(main.clone(), series.clone()).unwrap();
        assert_eq!(
            reopened.range("", "z", 10).unwrap(),
            vec![("a".to_owned(), b"1".to_vec())]
        );
        assert!(main.scan(Table::HistoryLog).unwrap().is_empty());
    }

    #[test]
    fn unreadable_log_records_stay_and_new_keys_go_after_them() {
        let (main, series) = stores();
        main.commit(&[
            Mutation::put(Table::HistoryLog, log_key(41), b"\x01".to_vec()),
            Mutation::put(Table::HistoryLog, log_key(40), frame("a", b"1")),
        ])
        .unwrap();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        assert_eq!(series.scan(Table::History).unwrap().len(), 1);
        let left = main.scan(Table::HistoryLog).unwrap();
        assert_eq!(left, vec![(log_key(41), b"\x01".to_vec())]);
        assert_eq!(history.record("b", b"2").key, log_key(42));
    }

    #[test]
    fn history_kept_in_the_main_store_moves_to_the_history_store() {
        let (main, series) = stores();
        let old: Vec<Mutation> = (0..MERGE_PAGE + 1)
            .map(|i| Mutation::put(Table::History, format!("h{i:05}"), b"v".to_vec()))
            .collect();
        main.commit(&old).unwrap();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        assert!(main.scan(Table::History).unwrap().is_empty());
        assert_eq!(
            history.range("h", "i", usize::MAX).unwrap().len(),
            MERGE_PAGE + 1
        );
    }

    #[test]
    fn a_trim_handed_elsewhere_takes_every_deletion_and_a_failed_one_loses_nothing() {
        let (main, series) = stores();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (seen, fail, store) = (calls.clone(), failing.clone(), main.clone());
        history.trim_through(move |deletes| {
            if fail.load(Ordering::Relaxed) {
                return Err(StoreError("trim refused".into()));
            }
            seen.lock().unwrap().push(deletes.len());
            store.commit(&deletes)
        });
        let records: Vec<Mutation> = (0..MERGE_PAGE + 3)
            .map(|i| history.record(&format!("k{i:05}"), b"v"))
            .collect();
        main.commit(&records).unwrap();
        // The page reached the history store but stays in the log: merging again is harmless.
        assert!(history.merge().is_err());
        assert_eq!(main.scan(Table::HistoryLog).unwrap().len(), MERGE_PAGE + 3);
        failing.store(false, Ordering::Relaxed);
        assert_eq!(history.merge().unwrap(), MERGE_PAGE + 3);
        assert_eq!(*calls.lock().unwrap(), [MERGE_PAGE, 3]);
        assert!(main.scan(Table::HistoryLog).unwrap().is_empty());
        assert_eq!(series.scan(Table::History).unwrap().len(), MERGE_PAGE + 3);
    }

    fn history_keys(series: &MemoryStore) -> Vec<String> {
        let rows = series.scan(Table::History).unwrap();
        rows.into_iter().map(|(key, _)| key).collect()
    }

    fn key(twin: &str, name: &str, time_ms: i64, seq: u64) -> String {
        crate::records::history_key(twin, name, time_ms, "dev", seq)
    }

    #[test]
    fn purging_removes_each_streams_records_measured_before_the_cutoff_and_nothing_else() {
        let (main, series) = stores();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        // "temp" and "tempo" share a prefix; "pump\u{1f}a" holds the separator in its twin ID.
        let mut puts = Vec::new();
        for (twin, name) in [("pump", "temp"), ("pump", "tempo"), ("pump\u{1f}a", "flow")] {
            for (time, seq) in [(999, 1), (1_000, 2), (5_000, 3)] {
                puts.push(Mutation::put(
                    Table::History,
                    key(twin, name, time, seq),
                    b"v".to_vec(),
                ));
            }
        }
        // More old records in one stream than a page, to take several transactions.
        for seq in 0..MERGE_PAGE as u64 + 5 {
            puts.push(Mutation::put(
                Table::History,
                key("big", "p", 10, seq),
                b"v".to_vec(),
            ));
        }
        puts.push(Mutation::put(
            Table::History,
            key("big", "p", 1_000, 0),
            b"v".to_vec(),
        ));
        series.commit(&puts).unwrap();
        assert_eq!(history.purge_before(1_000).unwrap(), 3 + MERGE_PAGE + 5);
        let left = history_keys(&series);
        let mut expected = vec![key("big", "p", 1_000, 0)];
        for (twin, name) in [("pump", "temp"), ("pump", "tempo"), ("pump\u{1f}a", "flow")] {
            expected.push(key(twin, name, 1_000, 2));
            expected.push(key(twin, name, 5_000, 3));
        }
        expected.sort();
        assert_eq!(left, expected);
        assert_eq!(history.purge_before(1_000).unwrap(), 0);
        assert_eq!(history.purge_before(i64::MAX).unwrap(), expected.len());
    }

    #[test]
    fn the_background_merger_keeps_history_for_the_retention_period_only() {
        let (main, series) = stores();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        history.keep_for(Duration::from_secs(3_600));
        let now_ms = now_ms();
        let (old, recent) = (
            key("t", "p", now_ms - 7_200_000, 1),
            key("t", "p", now_ms - 60_000, 2),
        );
        main.commit(&[history.record(&old, b"1"), history.record(&recent, b"2")])
            .unwrap();
        history.spawn_merger().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let keys = history_keys(&series);
            if keys == [recent.clone()] {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "history is {keys:?}, not only the recent reading"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The nice value of this process's thread called `name`, from `/proc`.
    #[cfg(target_os = "linux")]
    fn thread_nice(name: &str) -> Option<i32> {
        for task in std::fs::read_dir("/proc/self/task").ok()? {
            let path = task.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            if comm.trim_end() == name {
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                // Fields after the command's closing parenthesis; nice is field 19 of stat.
                let rest = &stat[stat.rfind(')')? + 2..];
                return rest.split(' ').nth(16)?.parse().ok();
            }
        }
        None
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_merger_thread_runs_at_a_lower_priority_than_the_rest() {
        let (main, series) = stores();
        let history = HistoryStore::open(main, series).unwrap();
        history.spawn_merger().unwrap();
        let expected = (rustix::process::getpriority_process(None).unwrap() + MERGER_NICE).min(19);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The thread may be seen before it has lowered its priority, never after at another.
        while thread_nice("history-merge") != Some(expected) {
            assert!(
                std::time::Instant::now() < deadline,
                "the merger's nice value is {:?}, not {expected}",
                thread_nice("history-merge")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_background_merger_empties_the_log_and_stops_with_the_store() {
        let (main, series) = stores();
        let history = HistoryStore::open(main.clone(), series.clone()).unwrap();
        history.spawn_merger().unwrap();
        main.commit(&[history.record("a", b"1")]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !main.scan(Table::HistoryLog).unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the merger never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(series.scan(Table::History).unwrap().len(), 1);
        let weak = Arc::downgrade(&history.inner);
        drop(history);
        // The merger holds the store only while it merges.
        while weak.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the merger kept the store"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
