//! One door for durable writes: an owner's records reach the store through the twin writer's
//! group commit, and only into the tables the owner owns.

use std::sync::Arc;

use twinguard_core::clock::SystemClock;
use twinguard_core::service::{OwnerStore, TwinService};
use twinguard_core::store::{MemoryStore, Mutation, Owner, Store, Table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_commits_its_own_tables_through_the_writer_and_nothing_else() {
    let store = Arc::new(MemoryStore::default());
    let service = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    let identity = OwnerStore::new(Owner::Identity, store.clone());
    // Before the writer is connected (start-up, migrations): direct, still checked.
    identity
        .commit(&[Mutation::put(Table::Identities, "early", b"{}".to_vec())])
        .unwrap();
    assert!(
        identity
            .commit(&[Mutation::put(Table::Twins, "t", b"{}".to_vec())])
            .is_err()
    );
    identity.connect(service.door(Owner::Identity));
    let door = tokio::task::spawn_blocking(move || {
        identity.commit(&[Mutation::put(Table::ApiKeys, "k", b"1".to_vec())])?;
        // A record outside the owner's tables refuses the whole commit.
        let foreign = identity.commit(&[
            Mutation::put(Table::Identities, "x", b"{}".to_vec()),
            Mutation::put(Table::Events, "00000000000000000001", b"{}".to_vec()),
        ]);
        assert!(
            foreign.is_err(),
            "a forged feed record through the identity door"
        );
        Ok::<_, twinguard_core::store::StoreError>(())
    });
    door.await.unwrap().unwrap();
    assert_eq!(store.scan(Table::ApiKeys).unwrap().len(), 1);
    assert!(store.scan(Table::Events).unwrap().is_empty());
    let identities: Vec<String> = store
        .scan(Table::Identities)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        identities,
        ["early"],
        "nothing of the refused commit is stored"
    );
    // The graph's tables change only through its own operations, even for the graph's owner.
    let graph = service.door(Owner::Graph);
    let refused = tokio::task::spawn_blocking(move || {
        graph.commit(vec![Mutation::put(Table::Twins, "t", b"{}".to_vec())])
    });
    assert!(refused.await.unwrap().is_err());
    assert!(store.scan(Table::Twins).unwrap().is_empty());
}

/// A store whose commits wait while its gate is shut: a writer stuck on a slow disk.
#[derive(Default)]
struct GatedStore {
    inner: MemoryStore,
    shut: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
    entered: std::sync::atomic::AtomicBool,
}

impl GatedStore {
    fn set_shut(&self, shut: bool) {
        *self.shut.lock().unwrap() = shut;
        self.changed.notify_all();
    }
}

impl Store for GatedStore {
    fn scan(
        &self,
        table: Table,
    ) -> Result<Vec<(String, Vec<u8>)>, twinguard_core::store::StoreError> {
        self.inner.scan(table)
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), twinguard_core::store::StoreError> {
        self.entered
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut shut = self.shut.lock().unwrap();
        while *shut {
            shut = self.changed.wait(shut).unwrap();
        }
        drop(shut);
        self.inner.commit(batch)
    }
}

/// A synchronous commit (identity, token revocation) holds its thread while it waits for room
/// in the writer's queue; when the writer is stuck and the queue full, it gives up within a
/// fraction of a second instead of holding the thread for seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_door_commit_gives_up_at_once_when_the_writer_queue_is_full() {
    let store = Arc::new(GatedStore::default());
    let service = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    store.set_shut(true);
    // Opens the gate however the test ends, so that a failure cannot leave the writer stuck.
    struct Reopen(Arc<GatedStore>);
    impl Drop for Reopen {
        fn drop(&mut self) {
            self.0.set_shut(false);
        }
    }
    let reopen = Reopen(store.clone());
    let stuck = service.door(Owner::Identity);
    let first = tokio::task::spawn_blocking(move || {
        stuck.commit(vec![Mutation::put(Table::Identities, "a", b"{}".to_vec())])
    });
    while !store.entered.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // The writer is inside the first commit: fill its queue (4,096 jobs) and more.
    let trims: Vec<_> = (0..5_000)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move { service.trim_feed(0).await })
        })
        .collect();
    // Wait until the queue is full: the writes past it are refused at once.
    let full = std::time::Instant::now();
    while !trims.iter().any(|t| t.is_finished()) {
        assert!(
            full.elapsed() < std::time::Duration::from_secs(30),
            "the writer's queue never filled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let door = service.door(Owner::Identity);
    let started = std::time::Instant::now();
    let refused = tokio::task::spawn_blocking(move || {
        door.commit(vec![Mutation::put(Table::Identities, "b", b"{}".to_vec())])
    })
    .await
    .unwrap();
    let waited = started.elapsed();
    assert!(refused.is_err(), "a commit into a full queue");
    assert!(
        waited < std::time::Duration::from_secs(1),
        "the door held its thread for {waited:?}"
    );
    // Once the writer moves again, everything queued is committed.
    drop(reopen);
    first.await.unwrap().unwrap();
    let mut refused_trims = 0;
    for trim in trims {
        refused_trims += usize::from(trim.await.unwrap().is_err());
    }
    assert!(
        refused_trims > 0 && refused_trims < 5_000,
        "{refused_trims} trims refused"
    );
    assert_eq!(store.scan(Table::Identities).unwrap().len(), 1);
}
