//! Two twin services on one shared store, as two nodes on one PostgreSQL database are
//! (`MemoryStore::shared`: a store that counts and fences its commits). Each node keeps its own
//! snapshot; the store's commit counter serialises their writes, so a node that has not seen
//! the other's commit neither overwrites it nor decides a precondition on it, and the change
//! feed stays one gap-free sequence.

use std::sync::Arc;

use serde_json::{Value, json};
use twinguard_core::auth::{DATA_OWNER, Principal};
use twinguard_core::clock::SystemClock;
use twinguard_core::error::DomainError;
use twinguard_core::feed::FeedEvent;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::service::TwinService;
use twinguard_core::store::{Expect, MemoryStore, Mutation, Owner, Store, Table};

fn owner() -> Principal {
    Principal::with_roles("owner", &[DATA_OWNER])
}

fn counter_model() -> Value {
    json!({
        "@context": "dtmi:dtdl:context;3",
        "@id": "dtmi:nodes:Counter;1",
        "@type": "Interface",
        "contents": [{"@type": "Property", "name": "count", "schema": "integer"}]
    })
}

/// Node A with the model and a twin `c` at count 0, and node B opened on the same store after.
async fn two_nodes(store: &Arc<MemoryStore>) -> (TwinService, TwinService) {
    let a = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    a.write(&owner(), WriteOp::UploadModels(vec![counter_model()]))
        .await
        .unwrap();
    put(&a, "c", 0).await.unwrap();
    let b = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    (a, b)
}

async fn put(node: &TwinService, id: &str, count: i64) -> Result<String, DomainError> {
    let mut body = serde_json::Map::new();
    body.insert(
        "$metadata".into(),
        json!({"$model": "dtmi:nodes:Counter;1"}),
    );
    body.insert("count".into(), json!(count));
    let twin = node
        .write(
            &owner(),
            WriteOp::PutTwin {
                id: id.into(),
                body,
                precondition: Precondition::None,
            },
        )
        .await?
        .into_twin()?;
    Ok(twin.etag.clone())
}

async fn patch_count(
    node: &TwinService,
    count: i64,
    precondition: Precondition,
) -> Result<String, DomainError> {
    let twin = node
        .write(
            &owner(),
            WriteOp::PatchTwin {
                id: "c".into(),
                component: None,
                patch: json!([{"op": "replace", "path": "/count", "value": count}]),
                precondition,
            },
        )
        .await?
        .into_twin()?;
    Ok(twin.etag.clone())
}

/// The count and etag of `c` in `node`'s snapshot.
fn read(node: &TwinService) -> (i64, String) {
    let twin = node.twin(&owner(), "c").unwrap();
    let doc: Value = serde_json::from_str(twin.json().get()).unwrap();
    (doc["count"].as_i64().unwrap(), twin.etag.clone())
}

fn feed(store: &MemoryStore) -> Vec<FeedEvent> {
    store
        .scan(Table::Events)
        .unwrap()
        .into_iter()
        .map(|(_, bytes)| serde_json::from_slice(&bytes).unwrap())
        .collect()
}

#[tokio::test]
async fn two_nodes_racing_on_one_etag_give_one_winner_and_one_412() {
    let store = Arc::new(MemoryStore::shared());
    let (a, b) = two_nodes(&store).await;
    let (_, first) = read(&b);
    // A moves the twin on; B has not seen that commit in its snapshot.
    patch_count(&a, 1, Precondition::IfMatch(first.clone()))
        .await
        .unwrap();
    assert_eq!(
        read(&b).0,
        0,
        "B's snapshot is behind, as a second node's would be"
    );
    // B's write with the etag both saw is refused, not applied over A's.
    let refused = patch_count(&b, 2, Precondition::IfMatch(first)).await;
    assert!(
        matches!(refused, Err(DomainError::PreconditionFailed)),
        "{refused:?}"
    );
    let (count, now) = read(&b);
    assert_eq!(count, 1, "B caught up with A's commit before deciding");
    // With the current etag it succeeds, on top of A's change.
    patch_count(&b, 2, Precondition::IfMatch(now))
        .await
        .unwrap();
    let stored: Value = serde_json::from_slice(
        &store
            .scan(Table::Twins)
            .unwrap()
            .into_iter()
            .find(|(k, _)| k == "c")
            .unwrap()
            .1,
    )
    .unwrap();
    assert_eq!(stored["count"], 2);
}

#[tokio::test]
async fn a_write_decided_on_a_stale_snapshot_is_never_applied() {
    // No precondition at all: B's PUT is built from its own snapshot. It may only be applied
    // after B has read A's commit, so the feed records A's change and then B's, never B's in
    // A's place.
    let store = Arc::new(MemoryStore::shared());
    let (a, b) = two_nodes(&store).await;
    put(&a, "d", 10).await.unwrap();
    put(&b, "e", 20).await.unwrap();
    // B sees A's twin: it read the store before deciding.
    assert!(b.twin(&owner(), "d").is_ok());
    let twins: Vec<String> = store
        .scan(Table::Twins)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(twins, ["c", "d", "e"]);
    // Both creations are in the feed, each at a position of its own.
    let created: Vec<(u64, String)> = feed(&store).into_iter().map(|e| (e.seq, e.twin)).collect();
    assert_eq!(
        created,
        [
            (1, "c".to_owned()),
            (2, "d".to_owned()),
            (3, "e".to_owned())
        ]
    );
}

/// Two nodes, each running read-then-increment PATCHes with `If-Match` from its own snapshot
/// at once: every increment that was acknowledged is in the final count (no lost update), and
/// the change feed holds one event per acknowledged change, numbered 1, 2, 3... with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_read_modify_writes_on_two_nodes_lose_no_update_and_the_feed_has_no_gap() {
    let store = Arc::new(MemoryStore::shared());
    let (a, b) = two_nodes(&store).await;
    let events_before = feed(&store).len();
    let mut tasks = Vec::new();
    for (node, name) in [(a.clone(), "a"), (b.clone(), "b")] {
        for worker in 0..4 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let mut acknowledged = 0u64;
                let mut attempts = 0;
                while acknowledged < 10 && attempts < 400 {
                    attempts += 1;
                    let (count, etag) = read(&node);
                    match patch_count(&node, count + 1, Precondition::IfMatch(etag)).await {
                        Ok(_) => acknowledged += 1,
                        Err(
                            DomainError::PreconditionFailed
                            | DomainError::Unavailable
                            | DomainError::Superseded,
                        ) => {
                            tokio::task::yield_now().await;
                        }
                        Err(e) => panic!("node {name} worker {worker}: {e:?}"),
                    }
                }
                acknowledged
            }));
        }
    }
    let mut acknowledged = 0;
    for task in tasks {
        acknowledged += task.await.unwrap();
    }
    assert!(acknowledged > 0);
    // A fresh node reads what the store holds.
    let c = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    assert_eq!(
        read(&c).0 as u64,
        acknowledged,
        "an acknowledged increment was lost"
    );
    let events = feed(&store);
    assert_eq!(
        events.len() - events_before,
        acknowledged as usize,
        "one event per acknowledged change"
    );
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "the feed has a gap or a repeat");
    }
    let of_c: Vec<u64> = events
        .iter()
        .filter(|e| e.twin == "c")
        .map(|e| e.twin_seq)
        .collect();
    let expected: Vec<u64> = (1..=of_c.len() as u64).collect();
    assert_eq!(
        of_c, expected,
        "the twin's own sequence has a gap or a repeat"
    );
}

#[test]
fn a_fenced_commit_at_a_stale_counter_applies_nothing() {
    use twinguard_core::store::{Fenced, Mutation};
    let store = MemoryStore::shared();
    assert_eq!(store.head().unwrap(), Some(0));
    let put = |key: &str| vec![Mutation::put(Table::Twins, key, b"{}".to_vec())];
    assert_eq!(store.commit_at(&put("a"), 0).unwrap(), Fenced::Committed(1));
    store.commit(&put("b")).unwrap();
    assert_eq!(store.head().unwrap(), Some(2));
    assert_eq!(store.commit_at(&put("c"), 1).unwrap(), Fenced::Stale(2));
    let keys: Vec<String> = store
        .scan(Table::Twins)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["a", "b"]);
    // A store of one writer has no counter and commits unconditionally.
    let single = MemoryStore::default();
    assert_eq!(single.head().unwrap(), None);
    assert_eq!(
        single.commit_at(&put("a"), 7).unwrap(),
        Fenced::Committed(7)
    );
}

#[tokio::test]
async fn a_node_that_only_reads_follows_what_the_other_commits() {
    let store = Arc::new(MemoryStore::shared());
    let (a, b) = two_nodes(&store).await;
    put(&a, "d", 4).await.unwrap();
    assert!(b.twin(&owner(), "d").is_err(), "B has not looked yet");
    // B writes nothing; following the store is what brings A's twin.
    b.follow().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while b.twin(&owner(), "d").is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "B never followed A's commit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(b.position(), a.position());
}

/// Another node's commits that change only other owners' records (replay windows here; a
/// delivery position, a lease or a token alike) do not make a node read anything of the graph
/// before its next write: the change log says the graph is unchanged. A commit that changes a
/// twin makes it read that twin, not the whole graph; one that changes a model (models are
/// compiled together) makes it read the whole graph.
#[tokio::test]
async fn a_node_reads_again_only_what_another_changed() {
    let store = Arc::new(MemoryStore::shared());
    let (a, b) = two_nodes(&store).await;
    let door_b = b.door(Owner::Telemetry);
    let reads = || store.scans_of(Table::Models);
    let before = reads();
    for i in 0..5 {
        let door = door_b.clone();
        let window = Mutation::put(Table::Replay, format!("d{i}"), b"1".to_vec());
        std::thread::spawn(move || door.commit_expecting(vec![window], Vec::new()))
            .join()
            .unwrap()
            .unwrap();
    }
    put(&a, "d", 1).await.unwrap();
    assert_eq!(
        reads(),
        before,
        "A read the graph again after owner records only"
    );
    put(&b, "e", 1).await.unwrap();
    let before = reads();
    put(&a, "f", 1).await.unwrap();
    assert!(a.twin(&owner(), "e").is_ok(), "A did not read B's twin");
    assert_eq!(reads(), before, "A read the whole graph again for one twin");
    let mut model = counter_model();
    model["@id"] = json!("dtmi:nodes:Other;1");
    b.write(&owner(), WriteOp::UploadModels(vec![model]))
        .await
        .unwrap();
    put(&a, "g", 1).await.unwrap();
    assert_eq!(reads(), before + 1, "A did not read B's model");
    let positions: Vec<u64> = feed(&store).into_iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=positions.len() as u64).collect();
    assert_eq!(positions, expected);
}

/// The store comes to answer for a history without A's last commits (a standby promoted
/// before it had them, a recovery to an earlier point), and A reads its counter while it is
/// below where A stands. A reads the graph again whole: the lost twin is gone from its
/// snapshot, its position comes down to the store's (not left above it, where a client would
/// be told a position no node reaches), and its next write is decided on that history.
/// (Where the new history's counter has already reached A's, the numbers alone cannot tell
/// the histories apart: PostgreSQL's positions name its timeline for that, proven in the
/// cli's `sites` tests.)
#[tokio::test]
async fn a_node_whose_store_goes_back_to_an_earlier_history_forgets_what_it_lost() {
    let store = Arc::new(MemoryStore::shared());
    let (a, _b) = two_nodes(&store).await;
    let earlier = store.copy();
    put(&a, "lost", 1).await.unwrap();
    put(&a, "lost-too", 1).await.unwrap();
    store.go_back_to(&earlier);
    let head = store.head().unwrap();
    assert!(head < a.position(), "the store went back");

    // Following the store brings A down to it, without a write.
    a.follow().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while a.position() != head {
        assert!(
            std::time::Instant::now() < deadline,
            "A's position stayed above the store's counter: {:?} > {head:?}",
            a.position()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for lost in ["lost", "lost-too"] {
        assert!(a.twin(&owner(), lost).is_err(), "A kept the lost {lost}");
    }
    put(&a, "after", 1).await.unwrap();
    assert_eq!(a.position(), store.head().unwrap());
    let twins: Vec<String> = store
        .scan(Table::Twins)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(twins, ["after", "c"]);
}

#[tokio::test]
async fn a_read_that_presents_another_nodes_position_waits_for_it() {
    let store = Arc::new(MemoryStore::shared());
    let (a, b) = two_nodes(&store).await;
    put(&a, "d", 4).await.unwrap();
    let written = a.position().unwrap();
    assert!(b.position().unwrap() < written);
    // Presented to B, A's position is waited for, and then A's write is there.
    assert!(
        b.wait_for_position(written, std::time::Duration::from_secs(5))
            .await
    );
    assert!(b.twin(&owner(), "d").is_ok());
    // A position nobody has reached is not waited for past the bound.
    assert!(
        !b.wait_for_position(written + 100, std::time::Duration::from_millis(100))
            .await
    );
    // A store of one writer has no positions: always current.
    let single =
        TwinService::open(Arc::new(MemoryStore::default()), Arc::new(SystemClock)).unwrap();
    assert_eq!(single.position(), None);
    assert_eq!(single.lag(), None);
    assert!(
        single
            .wait_for_position(u64::MAX, std::time::Duration::ZERO)
            .await
    );
}

#[tokio::test]
async fn a_node_that_cannot_reach_its_store_knows_how_stale_it_is() {
    let store = Arc::new(MemoryStore::shared());
    let (_a, b) = two_nodes(&store).await;
    b.follow().unwrap();
    let fresh = b.lag().unwrap();
    store.set_failing(true);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(b.follow().is_err());
    let stale = b.lag().unwrap();
    assert!(
        stale >= fresh + std::time::Duration::from_millis(300),
        "{stale:?} after {fresh:?}"
    );
    store.set_failing(false);
    b.follow().unwrap();
    assert!(b.lag().unwrap() < stale);
}

/// Twin `c` as another writer would leave it: count `count`, a new etag.
fn changed_elsewhere(store: &MemoryStore, count: i64) -> Mutation {
    let stored = store
        .get_many(Table::Twins, &["c".into()])
        .unwrap()
        .remove(0);
    let mut twin: Value = serde_json::from_slice(&stored.unwrap()).unwrap();
    twin["count"] = json!(count);
    twin["$etag"] = json!(format!("W/\"elsewhere-{count}\""));
    Mutation::put(Table::Twins, "c", serde_json::to_vec(&twin).unwrap())
}

/// Another writer commits after node A caught up for a group and before the group's commit.
/// The fenced commit applies nothing, and A decides the group again on a state that includes
/// the other writer's commit, rather than answering 503: a write whose precondition that
/// commit broke is refused (412), one it does not touch lands, after it, and the feed has no
/// gap and no repeat. With plain commits the writes would land on top of a state they never
/// saw.
#[tokio::test]
async fn a_group_whose_commit_finds_another_writer_first_is_decided_again_after_it() {
    let store = Arc::new(MemoryStore::shared());
    let (a, _b) = two_nodes(&store).await;
    let (_, etag) = read(&a);
    let head = store.head().unwrap().unwrap();
    store.interpose_before_next_fenced_commit(vec![changed_elsewhere(&store, 7)]);
    let refused = patch_count(&a, 8, Precondition::IfMatch(etag)).await;
    assert!(
        matches!(refused, Err(DomainError::PreconditionFailed)),
        "decided again on the other writer's change: {refused:?}"
    );
    assert_eq!(read(&a).0, 7, "A's snapshot has the other writer's change");

    store.interpose_before_next_fenced_commit(vec![changed_elsewhere(&store, 9)]);
    put(&a, "late", 1).await.unwrap();
    assert_eq!(
        store.head().unwrap(),
        Some(head + 3),
        "two others and this one"
    );
    assert!(a.twin(&owner(), "late").is_ok());
    assert_eq!(read(&a).0, 9);
    let positions: Vec<u64> = feed(&store).into_iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=positions.len() as u64).collect();
    assert_eq!(positions, expected);
}

/// A group whose commit finds another writer first at every try (more than it is decided
/// again) applies nothing and is answered `Superseded` (503, retryable): the node does not
/// spin for ever behind a busier writer. The retry, decided on the new state, lands.
#[tokio::test]
async fn a_group_that_another_writer_beats_at_every_try_is_superseded() {
    let store = Arc::new(MemoryStore::shared());
    let (a, _b) = two_nodes(&store).await;
    let head = store.head().unwrap().unwrap();
    for i in 0..4 {
        store.interpose_before_next_fenced_commit(vec![Mutation::put(
            Table::Meta,
            format!("test.elsewhere.{i}"),
            b"1".to_vec(),
        )]);
    }
    let refused = put(&a, "late", 1).await;
    // Superseded: answered 503 by the API, and the cue for an owner to read its records again.
    assert!(
        matches!(refused, Err(DomainError::Superseded)),
        "{refused:?}"
    );
    assert!(
        a.twin(&owner(), "late").is_err(),
        "a refused write is not visible"
    );
    assert_eq!(
        store.head().unwrap(),
        Some(head + 4),
        "only the other writer's commits"
    );
    assert!(
        !store
            .scan(Table::Twins)
            .unwrap()
            .iter()
            .any(|(k, _)| k == "late"),
        "a refused write is not stored"
    );
    put(&a, "late", 2).await.unwrap();
    let positions: Vec<u64> = feed(&store).into_iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=positions.len() as u64).collect();
    assert_eq!(positions, expected);
}

/// A node whose shared store failed for a moment is ready again once the store answers its
/// probe, without waiting for a write (which a load balancer may no longer send it).
#[tokio::test]
async fn a_node_is_healthy_again_when_its_shared_store_answers_without_a_write() {
    let store = Arc::new(MemoryStore::shared());
    let (a, _b) = two_nodes(&store).await;
    store.set_failing(true);
    assert!(matches!(
        put(&a, "d", 1).await,
        Err(DomainError::Unavailable)
    ));
    assert!(!a.store_healthy());
    assert!(!a.probe_store());
    store.set_failing(false);
    assert!(a.probe_store());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !a.store_healthy() {
        assert!(std::time::Instant::now() < deadline, "still not healthy");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn replay(value: &[u8]) -> Mutation {
    Mutation::put(Table::Replay, "d", value.to_vec())
}

fn expect(value: Option<&[u8]>) -> Vec<Expect> {
    vec![Expect {
        table: Table::Replay,
        key: "d".into(),
        value: value.map(<[u8]>::to_vec),
    }]
}

fn stored(store: &MemoryStore) -> Option<Vec<u8>> {
    store
        .get_many(Table::Replay, &["d".into()])
        .unwrap()
        .remove(0)
}

/// An owner's commit decided on a record (a replay window) that another node has changed
/// since is superseded and stores nothing; decided again on what the store holds, it commits.
#[tokio::test]
async fn an_owner_commit_decided_on_a_record_another_node_changed_is_superseded() {
    let store = Arc::new(MemoryStore::shared());
    let (a, b) = two_nodes(&store).await;
    let (door_a, door_b) = (a.door(Owner::Telemetry), b.door(Owner::Telemetry));
    let blocking = |door: twinguard_core::service::Door, m, e| {
        std::thread::spawn(move || door.commit_expecting(vec![m], e))
            .join()
            .unwrap()
    };
    blocking(door_a.clone(), replay(b"a1"), expect(None)).unwrap();
    // Node B still believes the window absent.
    let refused = blocking(door_b.clone(), replay(b"b1"), expect(None));
    assert!(
        matches!(refused, Err(DomainError::Superseded)),
        "{refused:?}"
    );
    assert_eq!(stored(&store).as_deref(), Some(&b"a1"[..]));
    blocking(door_b, replay(b"b1"), expect(Some(b"a1"))).unwrap();
    // Now node A is behind.
    let refused = blocking(door_a, replay(b"a2"), expect(Some(b"a1")));
    assert!(
        matches!(refused, Err(DomainError::Superseded)),
        "{refused:?}"
    );
    assert_eq!(stored(&store).as_deref(), Some(&b"b1"[..]));
}

/// An owner's commit (a delivery position, a lease) whose group another writer beat is
/// decided again too: it lands when the records it expects still hold, and is superseded when
/// the other writer's commit changed one of them.
#[tokio::test]
async fn an_owner_commit_beaten_by_an_unrelated_commit_lands_and_by_a_related_one_does_not() {
    let store = Arc::new(MemoryStore::shared());
    let (a, _b) = two_nodes(&store).await;
    let door = a.door(Owner::Telemetry);
    let blocking = |m, e| {
        let door = door.clone();
        std::thread::spawn(move || door.commit_expecting(vec![m], e))
            .join()
            .unwrap()
    };
    store.interpose_before_next_fenced_commit(vec![Mutation::put(
        Table::Meta,
        "test.elsewhere",
        b"1".to_vec(),
    )]);
    blocking(replay(b"a1"), expect(None)).unwrap();
    assert_eq!(stored(&store).as_deref(), Some(&b"a1"[..]));
    store.interpose_before_next_fenced_commit(vec![replay(b"b1")]);
    let refused = blocking(replay(b"a2"), expect(Some(b"a1")));
    assert!(
        matches!(refused, Err(DomainError::Superseded)),
        "{refused:?}"
    );
    assert_eq!(stored(&store).as_deref(), Some(&b"b1"[..]));
}

/// Writes of one group are judged in order, each on what the writes before it leave, whether
/// they expect something or not: an owner that decided a write on its previous one commits it,
/// and a write decided on a value an earlier write of the group changed is superseded. The
/// writer is held in a commit while the writes queue, so that they form one group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expectations_are_judged_on_the_writes_before_them_in_the_group() {
    use twinguard_core::auth::TELEMETRY_WRITER;
    let store = Arc::new(MemoryStore::shared());
    let (a, _b) = two_nodes(&store).await;
    let system = Principal::with_roles("system:telemetry", &[TELEMETRY_WRITER]);
    let readings = |m| WriteOp::ApplyReadings {
        updates: Vec::new(),
        records: vec![m],
    };
    store.hold_commits(true);
    let blocker = a
        .submit(
            &system,
            readings(Mutation::put(Table::Replay, "other", b"0".to_vec())),
        )
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let submit = |value: &[u8], expected: Option<Option<&[u8]>>| {
        a.submit_expecting(
            &system,
            readings(replay(value)),
            expected.map(expect).unwrap_or_default(),
        )
        .unwrap()
    };
    let first = submit(b"1", Some(None));
    let second = submit(b"2", Some(Some(b"1")));
    let unconditional = submit(b"3", None);
    let stale = submit(b"x", Some(Some(b"2")));
    let last = submit(b"5", Some(Some(b"3")));
    store.hold_commits(false);
    blocker.await.unwrap();
    first.await.unwrap();
    second.await.unwrap();
    unconditional.await.unwrap();
    let refused = stale.await;
    assert!(
        matches!(refused, Err(DomainError::Superseded)),
        "{refused:?}"
    );
    last.await.unwrap();
    assert_eq!(stored(&store).as_deref(), Some(&b"5"[..]));
}

/// On a store of one writer (the embedded file), nothing else writes the owners' records, so
/// expectations are not read: the owner's memory is the truth.
#[tokio::test]
async fn a_store_of_one_writer_does_not_read_expectations() {
    let store = Arc::new(MemoryStore::default());
    let a = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    assert!(!a.shares_store());
    let door = a.door(Owner::Telemetry);
    std::thread::spawn(move || {
        door.commit_expecting(vec![replay(b"1")], expect(Some(b"never stored")))
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(stored(&store).as_deref(), Some(&b"1"[..]));
}

/// A client paging through a load balancer takes each page from whichever node it reaches, and
/// a continuation token resumes at an offset into the graph's order; so two nodes holding the
/// same twins must iterate them alike. Node A learnt its twins one write at a time, node B read
/// them from the store at once: pages taken from A and B in turn still give every twin exactly
/// once (before the graph's maps were hashed under one order key, each map had a random one,
/// and this lost and repeated rows).
#[tokio::test]
async fn query_pages_taken_from_two_nodes_in_turn_give_every_twin_once() {
    use twinguard_core::service::QueryRequest;
    let store = Arc::new(MemoryStore::shared());
    let (a, b) = two_nodes(&store).await;
    for n in 0..60 {
        put(&a, &format!("twin-{n:02}"), n).await.unwrap();
    }
    b.follow().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while b.position() != a.position() {
        assert!(std::time::Instant::now() < deadline, "B never followed A");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut request = QueryRequest {
        query: Some("SELECT T.$dtId FROM DIGITALTWINS T".into()),
        continuation_token: None,
        page_size: 7,
    };
    let mut seen = Vec::new();
    for turn in 0.. {
        let node = if turn % 2 == 0 { &a } else { &b };
        let page = node.query(&owner(), &request).unwrap();
        for item in &page.items {
            let row: Value = serde_json::from_str(item.get()).unwrap();
            seen.push(row["$dtId"].as_str().unwrap().to_owned());
        }
        match page.continuation {
            Some(token) => {
                request.query = None;
                request.continuation_token = Some(token);
            }
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..60).map(|n| format!("twin-{n:02}")).collect();
    expected.push("c".into());
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected);
}

/// One step of [`two_nodes_following_each_other_agree_with_a_node_that_reads_it_all`].
#[derive(Debug, Clone)]
enum Step {
    PutTwin(u8, i64),
    DeleteTwin(u8),
    Link(u8, u8, u8),
    Unlink(u8, u8),
    Telemetry(u8, u8),
}

fn step() -> impl proptest::strategy::Strategy<Value = (bool, Step)> {
    use proptest::prelude::*;
    let twin = 0..6u8;
    let step = prop_oneof![
        3 => (twin.clone(), 0..100i64).prop_map(|(t, n)| Step::PutTwin(t, n)),
        1 => twin.clone().prop_map(Step::DeleteTwin),
        2 => (twin.clone(), twin.clone(), 0..3u8).prop_map(|(s, t, r)| Step::Link(s, t, r)),
        1 => (twin.clone(), 0..3u8).prop_map(|(s, r)| Step::Unlink(s, r)),
        1 => (twin, 0..4u8).prop_map(|(t, m)| Step::Telemetry(t, m)),
    ];
    (any::<bool>(), step)
}

fn linked_model() -> Value {
    json!({
        "@context": "dtmi:dtdl:context;3",
        "@id": "dtmi:nodes:Linked;1",
        "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "count", "schema": "integer"},
            {"@type": "Relationship", "name": "link"},
            {"@type": "Telemetry", "name": "t", "schema": "integer"}
        ]
    })
}

fn body(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().unwrap().clone()
}

/// Runs `step` on `node`; refusals (a twin that does not exist, one with relationships) are
/// part of the game.
async fn run_step(node: &TwinService, step: &Step) {
    use twinguard_core::graph::ops::TelemetryMessage;
    let op = match step.clone() {
        Step::PutTwin(t, n) => WriteOp::PutTwin {
            id: format!("t{t}"),
            body: body(json!({"$metadata": {"$model": "dtmi:nodes:Linked;1"}, "count": n})),
            precondition: Precondition::None,
        },
        Step::DeleteTwin(t) => WriteOp::DeleteTwin {
            id: format!("t{t}"),
            precondition: Precondition::None,
        },
        Step::Link(s, t, r) => WriteOp::PutRelationship {
            source: format!("t{s}"),
            id: format!("r{r}"),
            body: body(json!({"$targetId": format!("t{t}"), "$relationshipName": "link"})),
            precondition: Precondition::None,
        },
        Step::Unlink(s, r) => WriteOp::DeleteRelationship {
            source: format!("t{s}"),
            id: format!("r{r}"),
            precondition: Precondition::None,
        },
        Step::Telemetry(t, m) => WriteOp::PublishTelemetry(TelemetryMessage {
            twin: format!("t{t}"),
            component: None,
            message_id: format!("m{m}"),
            source_time: None,
            body: json!({"t": m}),
        }),
    };
    let _ = node.write(&owner(), op).await;
}

/// Records by key, as JSON.
type Records = Vec<(String, String)>;

/// What a node's snapshot holds: every twin and relationship as JSON, and the feed's head.
fn state(node: &TwinService) -> (Records, Records, u64) {
    let graph = node.snapshot();
    let mut twins: Records = graph
        .twins()
        .map(|t| (t.id.to_string(), t.json().get().to_owned()))
        .collect();
    twins.sort();
    let mut relationships: Records = graph
        .relationships()
        .map(|r| (format!("{}/{}", r.source, r.id), r.json().get().to_owned()))
        .collect();
    relationships.sort();
    assert_eq!(graph.relationship_count(), relationships.len());
    (twins, relationships, node.feed_head())
}

/// Waits until `node` reflects the store's counter (following it, as its node does every
/// 100 ms).
async fn caught_up(node: &TwinService, store: &MemoryStore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while node.position() != store.head().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "a node never caught up"
        );
        node.follow().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Differential: two nodes write in turn at random (twins put and deleted, relationships
    /// made and removed, telemetry with repeated message IDs) and each follows the other by
    /// the change log alone, reading only what changed. After every few steps both agree, twin
    /// for twin, relationship for relationship and at the feed's head, with a third node that
    /// reads the whole store; and the feed stays one sequence with no gap, numbered by both.
    #[test]
    fn two_nodes_following_each_other_agree_with_a_node_that_reads_it_all(
        steps in proptest::collection::vec(step(), 1..40)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let store = Arc::new(MemoryStore::shared());
            let a = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
            a.write(&owner(), WriteOp::UploadModels(vec![linked_model()])).await.unwrap();
            let b = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
            let whole_reads = store.scans_of(Table::Models);
            for (i, (on_a, step)) in steps.iter().enumerate() {
                run_step(if *on_a { &a } else { &b }, step).await;
                if i % 5 == 4 || i + 1 == steps.len() {
                    caught_up(&a, &store).await;
                    caught_up(&b, &store).await;
                    let c = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
                    let whole = state(&c);
                    assert_eq!(state(&a), whole, "A after step {i}");
                    assert_eq!(state(&b), whole, "B after step {i}");
                }
            }
            // Only the third nodes read the store whole (one read each).
            let checks = steps.len().div_ceil(5) as u64;
            assert_eq!(store.scans_of(Table::Models), whole_reads + checks);
            let events = feed(&store);
            let positions: Vec<u64> = events.iter().map(|e| e.seq).collect();
            let expected: Vec<u64> = (1..=positions.len() as u64).collect();
            assert_eq!(positions, expected);
            // Each twin's events are numbered 1, 2, 3... by whichever node wrote them, and a
            // telemetry message ID is published once however many nodes it is sent to.
            let mut per_twin: std::collections::HashMap<&str, u64> = Default::default();
            let mut published = std::collections::HashSet::new();
            for event in &events {
                let last = per_twin.entry(event.twin.as_str()).or_default();
                assert_eq!(event.twin_seq, *last + 1, "{event:?}");
                *last = event.twin_seq;
                if event.event_type == twinguard_core::feed::TELEMETRY {
                    assert!(published.insert((event.twin.clone(), event.data.clone())), "{event:?}");
                }
            }
        });
    }
}

/// The writer says how long its commit has been waiting for the store, while one is, and
/// nothing between commits: `/readyz` reports a node whose commits the database holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_tells_how_long_its_commit_has_waited_for_the_store() {
    use twinguard_core::auth::TELEMETRY_WRITER;
    let store = Arc::new(MemoryStore::shared());
    let (a, _b) = two_nodes(&store).await;
    let system = Principal::with_roles("system:telemetry", &[TELEMETRY_WRITER]);
    let write = |value: &[u8]| {
        a.submit(
            &system,
            WriteOp::ApplyReadings {
                updates: Vec::new(),
                records: vec![replay(value)],
            },
        )
        .unwrap()
    };
    write(b"1").await.unwrap();
    assert_eq!(a.commit_waiting(), None, "no commit waits between commits");
    store.hold_commits(true);
    let held = write(b"2");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let waited = a.commit_waiting();
    store.hold_commits(false);
    held.await.unwrap();
    assert!(
        waited.is_some_and(|w| w >= std::time::Duration::from_millis(250)),
        "a commit held for 300 ms: {waited:?}"
    );
    assert_eq!(a.commit_waiting(), None, "the commit returned");
}
