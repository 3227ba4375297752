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
