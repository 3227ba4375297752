//! Following what other nodes commit to owner records. Each owner (the identity directory,
//! token revocation, refresh families, the device registry) keeps the records it decides on in
//! memory, loaded at start. On a store that several nodes share, a [`ChangeFollower`] reads the
//! store's change log (the keys of [followed](Table::followed) tables each commit changed)
//! and hands each owner the keys of its tables, which it reads again; when the log no longer
//! reaches back to where the follower stands, each owner reads its tables whole.
//!
//! This is what makes a revocation, a disabled identity or a suspended device on one node hold
//! on the others about one follow interval later, on a node that can read the store (one that
//! cannot stops answering reads after the staleness bound). Decisions that must never be taken
//! twice (a replay window, a spent refresh token, a one-time code) do not rely on it: they name
//! the records they were decided on ([`crate::store::Expect`]) and the writer checks them in
//! the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::store::{Change, Store, StoreError, Table};

/// An owner of records that other nodes may change.
pub trait Follower: Send + Sync {
    /// Whether this owner keeps `table`'s records in memory.
    fn follows(&self, table: Table) -> bool;

    /// Reads `keys` of `table` again from the store (a key now absent was deleted), each
    /// under the owner's lock so that no write of its own lands between the read and its
    /// taking effect. Returns the keys it could not take now (a write of its own to them is
    /// still in flight, and what the store holds may be older than what it knows): the
    /// follower hands them again at its next step.
    fn changed(&self, table: Table, keys: &[String]) -> Result<Vec<String>, StoreError>;

    /// Reads every table it follows again, whole; returns the records it could not take now,
    /// as [`Follower::changed`] does.
    fn reload(&self) -> Result<Vec<(Table, String)>, StoreError>;
}

/// Commits read from the change log at a time.
const COMMITS_PER_STEP: u64 = 4_096;

/// Where a node stands in its shared store's change log, and who to tell.
pub struct ChangeFollower {
    store: Arc<dyn Store>,
    /// The commit counter up to which every owner has been told.
    after: Mutex<u64>,
    followers: Mutex<Vec<Arc<dyn Follower>>>,
    /// Keys an owner could not take at the last step, to hand again.
    deferred: Mutex<BTreeMap<Table, BTreeSet<String>>>,
    /// [`ChangeFollower::position`], for those who wait for one ([`ChangeFollower::wait_for`]).
    told: tokio::sync::watch::Sender<u64>,
    /// Asked for a step before the next interval (a request waits for a position).
    wanted: tokio::sync::Notify,
}

impl std::fmt::Debug for ChangeFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFollower").finish_non_exhaustive()
    }
}

impl ChangeFollower {
    /// Starts following `store` from its counter now: call it *before* the owners load, so
    /// that a commit made while they load is handed to them again (reading a record twice is
    /// harmless; missing one is not). `None` for a store of one writer.
    pub fn start(store: Arc<dyn Store>) -> Result<Option<Arc<Self>>, StoreError> {
        let Some(head) = store.head()? else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Self {
            store,
            after: Mutex::new(head),
            followers: Mutex::new(Vec::new()),
            deferred: Mutex::new(BTreeMap::new()),
            told: tokio::sync::watch::Sender::new(head),
            wanted: tokio::sync::Notify::new(),
        })))
    }

    /// Tells `follower` of every change from now on.
    pub fn register(&self, follower: Arc<dyn Follower>) {
        if let Ok(mut followers) = self.followers.lock() {
            followers.push(follower);
        }
    }

    /// The commit counter up to which every owner has been told.
    pub fn position(&self) -> u64 {
        *self.told.borrow()
    }

    /// Whether every owner has been told of the commits up to `position`, waiting up to
    /// `within` (and asking for a step now rather than at the next interval). A client that
    /// presents the position of its write on one node is answered on another by owners that
    /// know of it: an identity it created, a role it assigned, a device it registered.
    pub async fn wait_for(&self, position: u64, within: std::time::Duration) -> bool {
        let mut told = self.told.subscribe();
        if *told.borrow() >= position {
            return true;
        }
        self.wanted.notify_one();
        tokio::time::timeout(within, told.wait_for(|t| *t >= position))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Returns when a step is asked for ([`ChangeFollower::wait_for`]): whoever runs the steps
    /// runs one then rather than at its next interval.
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }

    /// Hands the owners what other nodes committed since the last step, up to the store's
    /// counter now (in steps of at most [`COMMITS_PER_STEP`] commits). Returns the number of
    /// changed records handed on. Steps run one at a time; an owner's failure leaves the
    /// follower where it stood, so the next step hands the same changes again.
    pub fn step(&self) -> Result<usize, StoreError> {
        match self.store.head()? {
            Some(head) => self.step_to(head),
            None => Ok(0),
        }
    }

    /// [`ChangeFollower::step`] up to `head`, a counter the caller has just read (the server
    /// reads it once for the graph's follower and this one).
    pub fn step_to(&self, head: u64) -> Result<usize, StoreError> {
        let mut after = self
            .after
            .lock()
            .map_err(|_| StoreError("the change follower is poisoned".into()))?;
        let followers = self
            .followers
            .lock()
            .map_err(|_| StoreError("the change follower is poisoned".into()))?
            .clone();
        let mut deferred = self
            .deferred
            .lock()
            .map_err(|_| StoreError("the change follower is poisoned".into()))?;
        if head < *after {
            // The store's counter went back: a standby promoted without commits this node had
            // read from the old primary (visible there before the standby confirmed them), or a
            // point-in-time recovery. What the owners were told since may not exist any more,
            // and the new history reuses those numbers.
            self.start_over(
                &followers,
                &mut deferred,
                &mut after,
                head,
                "the store's commit counter went back (a failover or a recovery)",
            )?;
            return Ok(0);
        }
        let mut handed = 0;
        // What was deferred first: each key is read as it stands now.
        let again: Vec<Change> = std::mem::take(&mut *deferred)
            .into_iter()
            .flat_map(|(table, keys)| {
                keys.into_iter()
                    .map(move |key| Change { seq: 0, table, key })
            })
            .collect();
        if let Err(e) = hand_on(&followers, again.clone(), &mut deferred) {
            // Nothing of what was deferred is lost: all of it is handed again next time.
            for change in again {
                deferred.entry(change.table).or_default().insert(change.key);
            }
            return Err(e);
        }
        while *after < head {
            let upto = head.min(after.saturating_add(COMMITS_PER_STEP));
            match self.store.changes_after(*after, upto)? {
                Some(changes) => {
                    handed += changes.len();
                    hand_on(&followers, changes, &mut deferred)?;
                }
                None => {
                    self.start_over(
                        &followers,
                        &mut deferred,
                        &mut after,
                        head,
                        "the store's change log no longer reaches back to this node",
                    )?;
                    break;
                }
            }
            *after = upto;
            self.told.send_replace(upto);
        }
        if handed > 0 {
            metrics::counter!("twinguard_store_followed_changes_total").increment(handed as u64);
        }
        Ok(handed)
    }

    /// Has every follower read its tables whole (what one cannot take now goes into
    /// `deferred`), and stands at `head`: the changes up to it cannot be read one by one, for
    /// the reason `why`.
    fn start_over(
        &self,
        followers: &[Arc<dyn Follower>],
        deferred: &mut BTreeMap<Table, BTreeSet<String>>,
        after: &mut u64,
        head: u64,
        why: &str,
    ) -> Result<(), StoreError> {
        tracing::warn!(
            from = *after,
            head,
            "{why}; reading the followed tables whole"
        );
        metrics::counter!("twinguard_store_follow_reloads_total").increment(1);
        deferred.clear();
        for follower in followers {
            for (table, key) in follower.reload()? {
                deferred.entry(table).or_default().insert(key);
            }
        }
        *after = head;
        self.told.send_replace(head);
        Ok(())
    }
}

/// Each follower's keys, table by table, each key once; what a follower cannot take now goes
/// into `deferred`.
fn hand_on(
    followers: &[Arc<dyn Follower>],
    changes: Vec<Change>,
    deferred: &mut BTreeMap<Table, BTreeSet<String>>,
) -> Result<(), StoreError> {
    let mut by_table: BTreeMap<Table, Vec<String>> = BTreeMap::new();
    for change in changes {
        by_table.entry(change.table).or_default().push(change.key);
    }
    for (table, mut keys) in by_table {
        keys.sort_unstable();
        keys.dedup();
        for follower in followers.iter().filter(|f| f.follows(table)) {
            let later = follower.changed(table, &keys)?;
            if !later.is_empty() {
                deferred.entry(table).or_default().extend(later);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::{MemoryStore, Mutation};

    /// An owner of the identities table that counts what it is told.
    #[derive(Default)]
    struct Counting {
        changed: AtomicUsize,
        reloads: AtomicUsize,
    }

    impl Follower for Counting {
        fn follows(&self, table: Table) -> bool {
            table == Table::Identities
        }

        fn changed(&self, _: Table, keys: &[String]) -> Result<Vec<String>, StoreError> {
            self.changed.fetch_add(keys.len(), Ordering::SeqCst);
            Ok(Vec::new())
        }

        fn reload(&self) -> Result<Vec<(Table, String)>, StoreError> {
            self.reloads.fetch_add(1, Ordering::SeqCst);
            Ok(Vec::new())
        }
    }

    /// A promoted standby that lacks the last commits a node read from the old primary reports
    /// a lower counter, and numbers its own next commits as those were: the follower cannot
    /// tell which changes are new, so every owner reads its tables whole, once, and follows
    /// the new history from there. Without it, the follower stood still until the counter
    /// passed where it was, and never handed on the commits numbered in between.
    #[test]
    fn a_counter_that_went_back_makes_every_owner_read_its_tables_whole() {
        let store = Arc::new(MemoryStore::shared());
        let follower = ChangeFollower::start(store.clone()).unwrap().unwrap();
        let owner = Arc::new(Counting::default());
        follower.register(owner.clone());
        for key in ["a", "b", "c"] {
            store
                .commit(&[Mutation::put(Table::Identities, key, b"1".to_vec())])
                .unwrap();
        }
        assert_eq!(follower.step().unwrap(), 3);
        assert_eq!(follower.position(), 3);
        assert_eq!(owner.reloads.load(Ordering::SeqCst), 0);

        // The store now answers for a history one commit shorter.
        follower.step_to(2).unwrap();
        assert_eq!(owner.reloads.load(Ordering::SeqCst), 1);
        assert_eq!(follower.position(), 2);
        // Standing still there is not another reload.
        follower.step_to(2).unwrap();
        assert_eq!(owner.reloads.load(Ordering::SeqCst), 1);
    }
}
