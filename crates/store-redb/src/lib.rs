//! The embedded default store: one redb file with a table per [`Table`].
//!
//! redb is a pure-Rust, copy-on-write B-tree store with ACID transactions; a committed write
//! transaction is fsynced before `commit` returns, so a write the server acknowledged survives
//! `kill -9` and power loss. Why redb rather than SQLite is in `docs/storage.md`.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use twinguard_core::store::{Mutation, Store, StoreError, Table};

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

/// redb's page cache.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug)]
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`; redb recovers from an unclean shutdown here.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // The server reads the store only at start-up (the graph lives in memory), so a small
        // page cache is enough; redb's default of 1 GiB would double the resident memory.
        Self::open_with_cache(path, CACHE_BYTES)
    }

    /// [`RedbStore::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        // The file is its owner's only, whatever the umask: made here with mode 0600 (redb
        // initialises an empty file), an existing one kept as it is.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        let mut builder = Database::builder();
        builder.set_cache_size(cache_bytes);
        #[cfg(feature = "dangerous-skip-fsync-for-tests")]
        if skip_fsync::requested() {
            let backend = skip_fsync::Backend::new(file).map_err(err)?;
            let db = builder.create_with_backend(backend).map_err(err)?;
            return Self::with_tables(db);
        }
        drop(file);
        let db = builder.create(path).map_err(err)?;
        Self::with_tables(db)
    }

    fn with_tables(db: Database) -> Result<Self, StoreError> {
        // Create every table up front so that scans of empty tables succeed.
        let txn = db.begin_write().map_err(err)?;
        for table in Table::ALL {
            txn.open_table(definition(table)).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(Self { db })
    }
}

/// A negative control for the durability tests, compiled only with the feature
/// `dangerous-skip-fsync-for-tests` (which no production build enables) and active only when
/// `TWINGUARD_DANGEROUS_SKIP_STORE_FSYNC=1`: redb's commits write as usual but never reach
/// `fsync`, so a store that survives `kill -9` loses its acknowledged writes in a power cut.
/// The crash test on a file system that loses unsynced writes must catch it.
#[cfg(feature = "dangerous-skip-fsync-for-tests")]
mod skip_fsync {
    use std::io;
    use std::ops::Bound;

    use redb::backends::FileBackend;
    use redb::{BackendError, StorageBackend};

    pub(super) fn requested() -> bool {
        let on = std::env::var_os("TWINGUARD_DANGEROUS_SKIP_STORE_FSYNC").is_some_and(|v| v == "1");
        if on {
            eprintln!(
                "twinguard: DANGEROUS: store commits skip fsync (test build, negative control)"
            );
        }
        on
    }

    /// redb's own file backend, every call passed on but `sync_data`.
    #[derive(Debug)]
    pub(super) struct Backend(FileBackend);

    impl Backend {
        pub(super) fn new(file: std::fs::File) -> Result<Self, redb::DatabaseError> {
            FileBackend::new(file).map(Self)
        }
    }

    impl StorageBackend for Backend {
        fn len(&self) -> Result<u64, io::Error> {
            self.0.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
            self.0.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> Result<(), io::Error> {
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            self.0.write(offset, data)
        }
        fn close(&self) -> Result<(), io::Error> {
            self.0.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.0.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.0.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.0.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), BackendError> {
            self.0.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.0.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.0.query_lock_range(start, end)
        }
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl Store for RedbStore {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(definition(table)).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut open = std::collections::BTreeMap::new();
            for m in batch {
                if let std::collections::btree_map::Entry::Vacant(e) = open.entry(m.table) {
                    e.insert(txn.open_table(definition(m.table)).map_err(err)?);
                }
                let Some(t) = open.get_mut(&m.table) else {
                    continue;
                };
                match &m.value {
                    Some(v) => {
                        t.insert(m.key.as_str(), v.as_slice()).map_err(err)?;
                    }
                    None => {
                        t.remove(m.key.as_str()).map_err(err)?;
                    }
                }
            }
        }
        txn.commit().map_err(err)
    }

    fn range_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read_range(table, from.., limit)
    }

    fn range(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.read_range(table, from..to, limit)
    }
}

impl RedbStore {
    /// At most `limit` records of `table` whose keys fall in `keys`, in key order.
    fn read_range<'k>(
        &self,
        table: Table,
        keys: impl std::ops::RangeBounds<&'k str> + 'k,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(definition(table)).map_err(err)?;
        let mut out = Vec::with_capacity(limit.min(1024));
        for row in t.range(keys).map_err(err)?.take(limit) {
            let (k, v) = row.map_err(err)?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use twinguard_core::store::contract::{self, DIFFERENTIAL_KEYS};

    use super::*;

    #[test]
    fn redb_keeps_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        contract::check_all(&store).unwrap();
    }

    #[test]
    fn redb_keeps_the_store_contract_across_reopening_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        contract::check_reopen(|| Arc::new(RedbStore::open(&path).unwrap())).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn redb_agrees_with_a_model_on_random_batches(
            batches in prop::collection::vec(
                prop::collection::vec(
                    (0u8..3, 0..DIFFERENTIAL_KEYS, prop::option::of(any::<u16>())),
                    0..12,
                ),
                1..8,
            ),
            reads in prop::collection::vec(
                (0..DIFFERENTIAL_KEYS, 0..=DIFFERENTIAL_KEYS, 0u8..6),
                0..8,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
            contract::differential(&store, &batches, &reads).map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn range_reads_agree_with_the_default_scan_and_filter() {
        use twinguard_core::store::MemoryStore;
        let dir = tempfile::tempdir().unwrap();
        let redb = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        let memory = MemoryStore::default();
        let batch: Vec<Mutation> = ["a", "b", "b\u{1f}1", "b\u{1f}2", "c", "d"]
            .iter()
            .map(|k| Mutation::put(Table::History, *k, k.as_bytes().to_vec()))
            .collect();
        redb.commit(&batch).unwrap();
        memory.commit(&batch).unwrap();
        for (from, to, limit) in [
            ("b", "c", 10),
            ("a", "z", 3),
            ("c", "b", 10),
            ("b\u{1f}", "b\u{1f}\u{7f}", 1),
        ] {
            assert_eq!(
                redb.range(Table::History, from, to, limit).unwrap(),
                memory.range(Table::History, from, to, limit).unwrap(),
                "{from:?}..{to:?} limit {limit}"
            );
        }
        assert_eq!(redb.range(Table::History, "b", "c", 10).unwrap().len(), 3);
        for (from, limit) in [("", 10), ("b", 2), ("b\u{1f}1\0", 10), ("e", 10)] {
            assert_eq!(
                redb.range_from(Table::History, from, limit).unwrap(),
                memory.range_from(Table::History, from, limit).unwrap(),
                "{from:?}.. limit {limit}"
            );
        }
        // Paging visits every record once, in order, whatever the page size.
        for page in [1, 2, 5, 6, 100] {
            let mut seen = Vec::new();
            twinguard_core::store::for_each_record(&redb, Table::History, page, |k, _| {
                seen.push(k);
                Ok::<_, StoreError>(())
            })
            .unwrap();
            assert_eq!(
                seen,
                ["a", "b", "b\u{1f}1", "b\u{1f}2", "c", "d"],
                "page {page}"
            );
        }
    }

    #[test]
    fn committed_batches_are_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            store
                .commit(&[
                    Mutation::put(Table::Twins, "a", b"1".to_vec()),
                    Mutation::put(Table::Twins, "b", b"2".to_vec()),
                    Mutation::put(Table::Models, "m", b"3".to_vec()),
                ])
                .unwrap();
            store
                .commit(&[Mutation::delete(Table::Twins, "a")])
                .unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(
            store.scan(Table::Twins).unwrap(),
            vec![("b".to_owned(), b"2".to_vec())]
        );
        assert_eq!(store.scan(Table::Models).unwrap().len(), 1);
        assert!(store.scan(Table::EventRoutes).unwrap().is_empty());
    }
}
