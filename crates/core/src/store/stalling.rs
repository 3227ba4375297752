//! A store whose commits can be held, as a database holds every commit while its one
//! synchronous standby is gone: for tests that what waits for the store waits alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Expect, MemoryStore, Mutation, Store, StoreError, Table};

/// A [`MemoryStore`] whose commits wait while it is stalled ([`StallingStore::stall`]).
/// Reads are answered throughout, as they are by a database waiting for its standby, but those
/// of a table named by [`StallingStore::stall_reads_of`] (a database far away, or cut off).
#[derive(Debug, Default)]
pub struct StallingStore {
    inner: MemoryStore,
    stalled: Mutex<bool>,
    /// The table whose reads wait too while stalled.
    slow_reads: Mutex<Option<Table>>,
    changed: Condvar,
    /// Commits waiting now.
    waiting: AtomicUsize,
}

impl StallingStore {
    /// Holds every commit from now until [`StallingStore::release`].
    pub fn stall(&self) {
        *self.stalled.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Holds every commit, and every read of `table`, from now until
    /// [`StallingStore::release`]; [`StallingStore::wait_for_held`] counts both.
    pub fn stall_reads_of(&self, table: Table) {
        *self.slow_reads.lock().unwrap_or_else(|e| e.into_inner()) = Some(table);
        self.stall();
    }

    /// Lets the held commits and every later one through.
    pub fn release(&self) {
        *self.stalled.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.changed.notify_all();
    }

    /// Waits up to `within` until `count` commits are held; whether they are.
    pub fn wait_for_held(&self, count: usize, within: Duration) -> bool {
        let until = Instant::now() + within;
        while self.waiting.load(Ordering::SeqCst) < count {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn pass(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        while *stalled {
            stalled = self
                .changed
                .wait(stalled)
                .unwrap_or_else(|e| e.into_inner());
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Store for StallingStore {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan(table)
    }

    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if *self.slow_reads.lock().unwrap_or_else(|e| e.into_inner()) == Some(table) {
            self.pass();
        }
        self.inner.get_many(table, keys)
    }

    fn head(&self) -> Result<Option<u64>, StoreError> {
        self.inner.head()
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        self.pass();
        self.inner.commit(batch)
    }

    fn commit_expecting(&self, batch: &[Mutation], expect: &[Expect]) -> Result<bool, StoreError> {
        self.pass();
        self.inner.commit_expecting(batch, expect)
    }
}
