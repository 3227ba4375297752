//! An owner's memory that requests read while its edits wait for the store.
//!
//! Owners of security records (the identity directory, the refresh-token families) keep their
//! records in memory, and every request reads them: is this identity enabled, which roles does
//! it hold, is this session's family live. An edit decides on that memory, commits, then
//! changes it. If the edit held the memory's lock across the commit, every request would wait
//! for the store with it: with the store stalled (a synchronous standby lost, a silent
//! network), one administrator's edit would stop the whole node, reads included, since the
//! request path waits for the lock on the async runtime's threads.
//!
//! [`EditLock`] splits the two. Edits take a *turn*, one at a time, held across the store;
//! the memory's own lock is held only while memory is read or changed, and an edit lets go of
//! it for every store call ([`Edit::unlocked`]). Since no other edit runs during the turn, an
//! edit still decides and changes as one step: readers see the memory before the edit or after
//! it. An edit that cannot have its turn within [`EDIT_WAIT`] gives up, so a stalled store
//! holds no more than one edit's thread.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// How long an edit waits for its turn: the bound on an unconfirmed write
/// ([`crate::service::WRITE_WAIT`]).
pub const EDIT_WAIT: Duration = crate::service::WRITE_WAIT;

/// How long an owner's follower of other nodes' changes waits for the turn before it hands the
/// keys back to be read at its next step ([`crate::follow::Follower::changed`]): the follower
/// hands every owner its changes, so an edit the store holds must not hold it.
pub const FOLLOWER_WAIT: Duration = Duration::from_millis(50);

/// Memory of type `S` read by requests and changed by edits that wait for the store.
#[derive(Debug, Default)]
pub struct EditLock<S> {
    turn: Mutex<()>,
    state: RwLock<S>,
}

/// No turn came within the wait: another edit is still waiting for the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

impl<S> EditLock<S> {
    pub fn new(state: S) -> Self {
        Self {
            turn: Mutex::new(()),
            state: RwLock::new(state),
        }
    }

    /// The memory as it is, for a reader: never waits for the store.
    pub fn read(&self) -> RwLockReadGuard<'_, S> {
        self.state.read()
    }

    /// The memory for a change that waits for nothing and leaves the records as they are (a
    /// cache of what they imply). Every change of the records is an [`EditLock::edit`].
    pub fn cache(&self) -> RwLockWriteGuard<'_, S> {
        self.state.write()
    }

    /// An edit, once it has its turn: within [`EDIT_WAIT`], else [`Busy`].
    pub fn edit(&self) -> Result<Edit<'_, S>, Busy> {
        self.edit_within(EDIT_WAIT)
    }

    /// [`EditLock::edit`], waiting at most `wait` for the turn.
    pub fn edit_within(&self, wait: Duration) -> Result<Edit<'_, S>, Busy> {
        let turn = self.turn.try_lock_for(wait).ok_or(Busy)?;
        Ok(Edit {
            _turn: turn,
            state: self.state.write(),
        })
    }
}

/// An edit in its turn: the memory, locked, until [`Edit::unlocked`] lets readers in.
pub struct Edit<'a, S> {
    _turn: MutexGuard<'a, ()>,
    state: RwLockWriteGuard<'a, S>,
}

impl<S> Edit<'_, S> {
    /// Runs `f` (a store call) with the memory unlocked, so readers go on meanwhile, and
    /// locks it again. `f` cannot see the memory (it is borrowed by this call), and no other
    /// edit changes it: the turn is still this edit's.
    pub fn unlocked<T>(&mut self, f: impl FnOnce() -> T) -> T {
        RwLockWriteGuard::unlocked(&mut self.state, f)
    }
}

impl<S> Deref for Edit<'_, S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.state
    }
}

impl<S> DerefMut for Edit<'_, S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.state
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn a_reader_goes_on_while_an_edit_waits_for_the_store_and_sees_it_whole_after() {
        let lock = Arc::new(EditLock::new(vec![1]));
        let (entered, in_store) = mpsc::channel();
        let (release, stalled) = mpsc::channel::<()>();
        let editing = lock.clone();
        let editor = std::thread::spawn(move || {
            let mut edit = editing.edit().unwrap();
            edit.push(2);
            // Undone before the store call: readers must not see a decision half applied.
            edit.pop();
            edit.unlocked(|| {
                entered.send(()).unwrap();
                stalled.recv().unwrap();
            });
            edit.push(2);
        });
        in_store.recv().unwrap();
        // The store holds the edit: a reader is answered, with the memory before the edit.
        let (seen, read) = mpsc::channel();
        let reading = lock.clone();
        std::thread::spawn(move || seen.send(reading.read().clone()));
        assert_eq!(read.recv_timeout(Duration::from_secs(5)), Ok(vec![1]));
        // Another edit cannot have its turn meanwhile, and says so within its wait.
        assert_eq!(
            lock.edit_within(Duration::from_millis(50)).err(),
            Some(Busy)
        );
        release.send(()).unwrap();
        editor.join().unwrap();
        assert_eq!(*lock.read(), [1, 2]);
        assert!(lock.edit_within(Duration::from_millis(50)).is_ok());
    }
}
