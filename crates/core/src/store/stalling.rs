//! A store whose commits can be held, as a database holds every commit while its one
//! synchronous standby is gone: for tests that what waits for the store waits alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Expect, MemoryStore, Mutation, Store, StoreError, Table};

/// A [`MemoryStore`] whose commits wait while it is stalled ([`StallingStore::stall`]).
/// Reads are answered throughout, as they are by a database waiting for its standby, but those
/// of a table named by [`StallingStore::stall_reads_of`] or [`StallingStore::hold_reads_of`]
/// (a database far away, or cut off): such a read is answered late, with what the store held
/// when it began, as a statement answers from the snapshot it began with.
#[derive(Debug, Default)]
pub struct StallingStore {
    inner: MemoryStore,
    held: Mutex<Held>,
    changed: Condvar,
    /// Commits and reads waiting now.
    waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct Held {
    commits: bool,
    /// Commits fail (a database that lost its primary mid-commit) instead of landing.
    failing: bool,
    /// The table whose reads wait.
    reads_of: Option<Table>,
}

impl StallingStore {
    /// Holds every commit from now until [`StallingStore::release`].
    pub fn stall(&self) {
        self.held().commits = true;
    }

    /// Holds every commit, and every read of `table`, from now until
    /// [`StallingStore::release`]; [`StallingStore::wait_for_held`] counts both.
    pub fn stall_reads_of(&self, table: Table) {
        let mut held = self.held();
        held.commits = true;
        held.reads_of = Some(table);
    }

    /// Holds every read of `table` from now until [`StallingStore::release`], and no commit;
    /// [`StallingStore::wait_for_held`] counts the reads.
    pub fn hold_reads_of(&self, table: Table) {
        self.held().reads_of = Some(table);
    }

    /// Fails the held commits, and every later one until [`StallingStore::release`]; held reads
    /// are let through.
    pub fn fail_held(&self) {
        *self.held() = Held {
            failing: true,
            ..Held::default()
        };
        self.changed.notify_all();
    }

    /// Lets the held commits and reads through, and every later one.
    pub fn release(&self) {
        *self.held() = Held::default();
        self.changed.notify_all();
    }

    /// Waits up to `within` until `count` commits or reads are held; whether they are.
    pub fn wait_for_held(&self, count: usize, within: Duration) -> bool {
        self.wait_until(within, |held| held >= count)
    }

    /// Waits up to `within` until no commit or read is held; whether none is.
    pub fn wait_until_none_held(&self, within: Duration) -> bool {
        self.wait_until(within, |held| held == 0)
    }

    /// Waits up to `within` until `done` says so of the number of calls held now.
    fn wait_until(&self, within: Duration, done: impl Fn(usize) -> bool) -> bool {
        let until = Instant::now() + within;
        while !done(self.waiting.load(Ordering::SeqCst)) {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while `waits` says the store holds this call.
    fn pass(&self, waits: impl Fn(&Held) -> bool) {
        let mut held = self.held();
        if !waits(&held) {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while waits(&held) {
            held = self.changed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn pass_commit(&self) -> Result<(), StoreError> {
        self.pass(|held| held.commits);
        if self.held().failing {
            return Err(StoreError(
                "the store failed the commit (a test's failure)".into(),
            ));
        }
        Ok(())
    }
}

impl Store for StallingStore {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan(table)
    }

    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let answer = self.inner.get_many(table, keys);
        self.pass(|held| held.reads_of == Some(table));
        answer
    }

    fn head(&self) -> Result<Option<u64>, StoreError> {
        self.inner.head()
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        self.pass_commit()?;
        self.inner.commit(batch)
    }

    fn commit_expecting(&self, batch: &[Mutation], expect: &[Expect]) -> Result<bool, StoreError> {
        self.pass_commit()?;
        self.inner.commit_expecting(batch, expect)
    }
}
