//! Event delivery on a store two nodes share (`MemoryStore::shared`, as two nodes on one
//! PostgreSQL database): each endpoint is delivered by the node that holds its lease, edits are
//! decided on the stored records, and a holder that cannot renew stops before another takes
//! over.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use twinguard_core::auth::{DATA_OWNER, Principal};
use twinguard_core::clock::SystemClock;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::service::{OwnerStore, TwinService};
use twinguard_core::store::{
    Expect, Fenced, MemoryStore, Mutation, Owner, Store, StoreError, Table,
};

use super::*;
use crate::egress::EgressPolicy;

const TIMES: lease::Times = lease::Times {
    ttl: Duration::from_millis(1_000),
    every: Duration::from_millis(100),
    margin: Duration::from_millis(300),
};

fn owner() -> Principal {
    Principal::with_roles("owner", &[DATA_OWNER])
}

/// A webhook receiver on loopback: the CloudEvents it got, with when; answers 200, or 500
/// while `refusing` is set (and then records nothing).
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(Value, Instant)>>>,
    refusing: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(&self) -> std::net::SocketAddr {
        let me = self.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let me = me.clone();
            async move {
                if me.refusing.load(Ordering::SeqCst) {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                me.got.lock().unwrap().push((event, Instant::now()));
                axum::http::StatusCode::OK
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// How many times each twin's creation arrived, and from which node (the event's source).
    fn creations(&self) -> HashMap<String, Vec<String>> {
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        for (event, _) in self.got.lock().unwrap().iter() {
            if event["type"] == "Microsoft.DigitalTwins.Twin.Create" {
                let twin = event["subject"].as_str().unwrap_or_default().to_owned();
                let source = event["source"].as_str().unwrap_or_default().to_owned();
                seen.entry(twin).or_default().push(source);
            }
        }
        seen
    }
}

/// What a test runs in the middle of a read.
type Hook = Box<dyn FnOnce() + Send>;

/// A store that fails every call while `failing` is set: a node that lost its database. It can
/// also run a hook during its next scan of the endpoints or read of dead letters, fail reads of the leases once
/// `lease_reads_left` ran out (the rounds cannot renew), and take [`SLOW`] over each commit of
/// a dead letter while `slow_dead_letters` is set.
struct Cut {
    inner: Arc<dyn Store>,
    failing: AtomicBool,
    during_endpoint_scan: Mutex<Option<Hook>>,
    lease_reads_left: AtomicUsize,
    slow_dead_letters: AtomicBool,
    during_dead_letter_read: Mutex<Option<Hook>>,
}

const SLOW: Duration = Duration::from_millis(150);

impl Cut {
    fn check(&self) -> Result<(), StoreError> {
        match self.failing.load(Ordering::SeqCst) {
            true => Err(StoreError("cut off".into())),
            false => Ok(()),
        }
    }
}

impl Store for Cut {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.check()?;
        if table == Table::Leases
            && self
                .lease_reads_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            return Err(StoreError("the leases cannot be read".into()));
        }
        let rows = self.inner.scan(table)?;
        if table == Table::Endpoints {
            let hook = self.during_endpoint_scan.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        Ok(rows)
    }
    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.commit(batch)
    }
    fn head(&self) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.head()
    }
    fn commit_at(&self, batch: &[Mutation], expected: u64) -> Result<Fenced, StoreError> {
        self.check()?;
        self.inner.commit_at(batch, expected)
    }
    fn commit_expecting(&self, batch: &[Mutation], expect: &[Expect]) -> Result<bool, StoreError> {
        self.check()?;
        if self.slow_dead_letters.load(Ordering::SeqCst)
            && batch.iter().any(|m| m.table == Table::DeadLetters)
        {
            std::thread::sleep(SLOW);
        }
        self.inner.commit_expecting(batch, expect)
    }
    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.check()?;
        self.inner.get_many(table, keys)
    }
    fn range(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.check()?;
        let rows = self.inner.range(table, from, to, limit)?;
        if table == Table::DeadLetters {
            let hook = self.during_dead_letter_read.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        Ok(rows)
    }
}

/// One node: its twin service and its event delivery (whose events say `source`).
struct Node {
    service: Arc<TwinService>,
    events: Events,
    cut: Arc<Cut>,
}

fn node<S: Store + 'static>(store: &Arc<S>, source: &str) -> Node {
    let service = Arc::new(TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap());
    let owned = OwnerStore::new(Owner::Events, store.clone());
    owned.connect(service.door(Owner::Events));
    let cut = Arc::new(Cut {
        inner: Arc::new(owned),
        failing: AtomicBool::new(false),
        during_endpoint_scan: Mutex::new(None),
        lease_reads_left: AtomicUsize::new(usize::MAX),
        slow_dead_letters: AtomicBool::new(false),
        during_dead_letter_read: Mutex::new(None),
    });
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let events = Events::open(
        service.clone(),
        cut.clone(),
        Egress::new(EgressPolicy::from_lines("127.0.0.1").unwrap()),
        Arc::new(EventKey::from_key(key).unwrap()),
        source.to_owned(),
        std::env::temp_dir(),
        DEFAULT_BACKLOG,
    )
    .unwrap()
    .with_lease_times(TIMES);
    Node {
        service,
        events,
        cut,
    }
}

fn model() -> Value {
    json!({
        "@context": "dtmi:dtdl:context;3",
        "@id": "dtmi:lease:Thing;1",
        "@type": "Interface",
        "contents": [{"@type": "Property", "name": "n", "schema": "integer"}]
    })
}

async fn create(node: &Node, id: &str) {
    let mut body = serde_json::Map::new();
    body.insert("$metadata".into(), json!({"$model": "dtmi:lease:Thing;1"}));
    body.insert("n".into(), json!(1));
    let op = WriteOp::PutTwin {
        id: id.into(),
        body,
        precondition: Precondition::None,
    };
    // The node's snapshot may be behind the other's commit: decided again then.
    for _ in 0..20 {
        if node.service.write(&owner(), op.clone()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("twin {id} could not be created");
}

fn spec(addr: std::net::SocketAddr) -> EndpointSpec {
    serde_json::from_value(json!({"type": "webhook", "url": format!("http://{addr}/hook")}))
        .unwrap()
}

/// Node A with the model, endpoint `hook` to `addr` and a route of every event to it.
async fn first_node(store: &Arc<MemoryStore>, addr: std::net::SocketAddr) -> Node {
    let a = node(store, "a");
    a.service
        .write(&owner(), WriteOp::UploadModels(vec![model()]))
        .await
        .unwrap();
    a.events.put("hook", spec(addr)).await.unwrap();
    a.service
        .write(
            &owner(),
            WriteOp::PutRoute {
                id: "all".into(),
                endpoint_name: "hook".into(),
                filter: "true".into(),
            },
        )
        .await
        .unwrap();
    a
}

/// A shared store, a receiver, and node A with endpoint `hook` to it (see [`first_node`]).
async fn setup() -> (Arc<MemoryStore>, Receiver, std::net::SocketAddr, Node) {
    let store = Arc::new(MemoryStore::shared());
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let a = first_node(&store, addr).await;
    (store, receiver, addr, a)
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn holder(store: &MemoryStore) -> Option<String> {
    let leases = store.scan(Table::Leases).unwrap();
    let (_, record) = leases.first()?;
    let record: Value = serde_json::from_slice(record).unwrap();
    Some(record["node"].as_str().unwrap().to_owned())
}

/// Two nodes that both know the endpoint: each event arrives once, sent by one node. Without
/// leases each node delivers every event, and each arrives twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_nodes_each_event_is_delivered_once_by_the_holder() {
    let (store, receiver, _addr, a) = setup().await;
    let b = node(&store, "b");
    a.events.start();
    b.events.start();
    for i in 0..40 {
        create(if i % 2 == 0 { &a } else { &b }, &format!("t{i}")).await;
    }
    wait_for("every creation", Duration::from_secs(10), || {
        receiver.creations().len() == 40
    })
    .await;
    // Time for a second delivery to arrive, if there were one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let creations = receiver.creations();
    let senders: std::collections::BTreeSet<&String> = creations.values().flatten().collect();
    assert_eq!(senders.len(), 1, "one node delivers: {senders:?}");
    for (twin, sources) in &creations {
        assert_eq!(sources.len(), 1, "{twin} arrived {} times", sources.len());
    }
}

/// A node cut off from the database cannot renew its lease: it stops delivering at its own
/// deadline, before the lease runs out for the other node, which then delivers from the stored
/// position. So no event arrives from the cut-off node after the first from the other, and
/// every event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_renew_stops_delivering_before_another_takes_over() {
    let (store, receiver, _addr, a) = setup().await;
    a.events.start();
    wait_for("a's lease", Duration::from_secs(5), || {
        holder(&store).is_some()
    })
    .await;
    let b = node(&store, "b");
    b.events.start();
    create(&a, "before").await;
    wait_for("the first event", Duration::from_secs(5), || {
        receiver.creations().contains_key("before")
    })
    .await;
    a.cut.failing.store(true, Ordering::SeqCst);
    let cut_at = Instant::now();
    let mut i = 0;
    // Written on a: its feed, which its delivery reads, holds them all.
    while cut_at.elapsed() < Duration::from_millis(2_500) {
        create(&a, &format!("t{i}")).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for("every creation", Duration::from_secs(10), || {
        receiver.creations().len() == i + 1
    })
    .await;
    let got = receiver.got.lock().unwrap().clone();
    let first_from_b = got
        .iter()
        .filter(|(e, _)| e["source"] == "b")
        .map(|(_, at)| *at)
        .min()
        .expect("b took over");
    let last_from_a = got
        .iter()
        .filter(|(e, _)| e["source"] == "a")
        .map(|(_, at)| *at)
        .max()
        .unwrap();
    assert!(
        last_from_a < first_from_b,
        "a sent {:?} after b's first event",
        last_from_a - first_from_b
    );
}

/// Runs `edit` on `events` while a lease round of that node has just read the endpoints, and
/// lets the round go on once it finished (or after 300 ms: under the edits lock the edit waits
/// for the round). Returns once both finished.
async fn edit_during_a_round<F>(a: &Node, edit: impl FnOnce(Events) -> F + Send + 'static)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let events = a.events.clone();
    let runtime = tokio::runtime::Handle::current();
    let (done, edited) = std::sync::mpsc::channel();
    let finished = Arc::new(AtomicBool::new(false));
    let flag = finished.clone();
    *a.cut.during_endpoint_scan.lock().unwrap() = Some(Box::new(move || {
        runtime.spawn(async move {
            edit(events).await;
            flag.store(true, Ordering::SeqCst);
            let _ = done.send(());
        });
        let _ = edited.recv_timeout(Duration::from_millis(300));
    }));
    a.events.inner.round().await.unwrap();
    wait_for("the edit", Duration::from_secs(5), || {
        finished.load(Ordering::SeqCst)
    })
    .await;
}

/// An endpoint made or deleted on a node while a lease round of that node has just read the
/// endpoints is neither undone nor brought back by the round; a deletion leaves no record of
/// the endpoint behind. The first half is what the edits lock guards (without it the round
/// forgets the new endpoint); the second holds by the round's commit too, which expects the
/// endpoint record the round read and so is decided again on the deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_racing_a_lease_round_is_neither_undone_nor_brought_back() {
    let (store, _receiver, addr, a) = setup().await;
    a.events.inner.round().await.unwrap();
    edit_during_a_round(&a, move |events| async move {
        events.put("new", spec(addr)).await.unwrap();
    })
    .await;
    assert!(a.events.get("new").is_ok(), "the new endpoint was undone");

    edit_during_a_round(&a, |events| async move {
        events.delete("hook").await.unwrap();
    })
    .await;
    assert!(a.events.get("hook").is_err(), "the endpoint came back");
    a.events.inner.round().await.unwrap();
    assert!(a.events.get("hook").is_err(), "the endpoint came back");
    for table in [
        Table::Endpoints,
        Table::Deliveries,
        Table::Leases,
        Table::DeadLetters,
    ] {
        let names: Vec<String> = store
            .scan(table)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("new")),
            "{table:?} keeps {names:?}"
        );
    }
}

/// A node that stops cleanly gives its leases up: the other takes the endpoint at its next
/// round, not when the lease would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_cleanly_hands_its_endpoints_over_at_once() {
    let (store, receiver, _addr, a) = setup().await;
    let a = with_times(a, Duration::from_secs(60), TIMES.every);
    a.events.start();
    wait_for("a's lease", Duration::from_secs(5), || {
        holder(&store).is_some()
    })
    .await;
    let b = node(&store, "b");
    b.events.start();
    a.events.release().await;
    create(&b, "after").await;
    wait_for("b's delivery", Duration::from_secs(3), || {
        receiver.creations().get("after") == Some(&vec!["b".to_owned()])
    })
    .await;
}

/// An endpoint replaced on a node that never delivered it keeps the stored position: the
/// events committed while nobody delivered it arrive, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_replaced_on_another_node_skips_no_event() {
    let (store, receiver, addr, a) = setup().await;
    a.events.start();
    create(&a, "first").await;
    wait_for("the first event", Duration::from_secs(5), || {
        receiver.creations().contains_key("first")
    })
    .await;
    a.events.release().await;
    for i in 0..10 {
        create(&a, &format!("t{i}")).await;
    }
    let b = node(&store, "b");
    let mut changed = spec(addr);
    changed.max_attempts = Some(3);
    assert!(!b.events.put("hook", changed).await.unwrap().1, "replaced");
    b.events.start();
    wait_for("every creation", Duration::from_secs(5), || {
        receiver.creations().len() == 11
    })
    .await;
}

/// A holder whose dead letters are slow to commit (a slow database) and whose lease is not
/// renewed stops at its deadline even in the middle of them: the backlog it took over, older
/// than `maxAgeSeconds`, is dead-lettered one slow commit at a time, and the young event
/// behind it, which would be sent once they are done, is not sent by this node after its
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_slowed_down_by_dead_letters_starts_nothing_after_its_deadline() {
    let (store, receiver, addr, a) = setup().await;
    let mut aging = spec(addr);
    aging.max_age_seconds = Some(3);
    a.events.put("hook", aging).await.unwrap();
    for i in 0..10 {
        create(&a, &format!("old{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    create(&a, "young").await;
    a.cut.slow_dead_letters.store(true, Ordering::SeqCst);
    // The first round takes the lease; no later one can renew it. Its deadline is
    // ttl - margin = 700 ms after that round, and ten dead letters take 1.5 s.
    a.cut.lease_reads_left.store(1, Ordering::SeqCst);
    a.events.start();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let dead = store.scan(Table::DeadLetters).unwrap().len();
    assert!(
        (1..10).contains(&dead),
        "{dead} dead letters: the delivery did not stop in the middle of them"
    );
    assert!(
        !receiver.creations().contains_key("young"),
        "sent after the lease's deadline"
    );
}

/// `node` with leases of `ttl` renewed every `every` (the margin of [`TIMES`]).
fn with_times(node: Node, ttl: Duration, every: Duration) -> Node {
    Node {
        events: node.events.with_lease_times(lease::Times {
            ttl,
            every,
            margin: TIMES.margin,
        }),
        ..node
    }
}

fn node_id(node: &Node) -> String {
    node.events.inner.leases.as_ref().unwrap().0.clone()
}

/// Whether `node` holds a lease in its memory (for endpoint `name`).
fn holds(node: &Node, name: &str) -> bool {
    node.events
        .inner
        .lock()
        .endpoints
        .get(name)
        .is_some_and(|r| r.lease.is_some())
}

/// An endpoint deleted on another node than its holder and made again at once under its name
/// is not delivered by a second node while the holder may still be sending: the deletion
/// closes the holder's lease rather than removing it, and no other node takes it before it
/// runs out. The endpoint made again is delivered all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_deleted_and_made_again_elsewhere_has_one_sender_at_a_time() {
    let (store, receiver, addr, a) = setup().await;
    // A's rounds are far apart: it goes on sending until its next one.
    let a = with_times(
        a,
        Duration::from_millis(2_000),
        Duration::from_millis(1_500),
    );
    a.events.start();
    wait_for("a's lease", Duration::from_secs(5), || holds(&a, "hook")).await;
    let b = node(&store, "b");
    b.events.start();
    b.events.delete("hook").await.unwrap();
    assert!(
        b.events.put("hook", spec(addr)).await.unwrap().1,
        "made again"
    );
    let (a_id, b_id) = (node_id(&a), node_id(&b));
    let until = Instant::now() + Duration::from_millis(1_000);
    while Instant::now() < until {
        assert_ne!(holder(&store), Some(b_id.clone()), "b took the lease");
        assert!(!holds(&b, "hook"), "b delivers while a may");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    create(&b, "after").await;
    wait_for(
        "the endpoint made again to deliver",
        Duration::from_secs(5),
        || receiver.creations().contains_key("after"),
    )
    .await;
    assert!(
        [Some(a_id), Some(b_id)].contains(&holder(&store)),
        "one of the nodes holds it"
    );
}

/// A dead letter the holder stores while another node deletes the endpoint (after that node
/// read the dead letters it deletes) is refused: the deletion closed the lease first, and the
/// holder's writes expect it open. So no dead letter outlives its endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_stored_during_a_deletion_does_not_outlive_the_endpoint() {
    let (store, _receiver, _addr, a) = setup().await;
    a.events.start();
    wait_for("a's lease", Duration::from_secs(5), || holds(&a, "hook")).await;
    let b = node(&store, "b");
    let holder_events = a.events.clone();
    let runtime = tokio::runtime::Handle::current();
    let stored_meanwhile = Arc::new(Mutex::new(None));
    let outcome = stored_meanwhile.clone();
    *b.cut.during_dead_letter_read.lock().unwrap() = Some(Box::new(move || {
        let record = json!({"id": "late"});
        let late = deliver::dead_letter_mutation("hook", &record);
        let stored = runtime.block_on(holder_events.inner.commit_delivery("hook", vec![late]));
        *outcome.lock().unwrap() = Some(stored.unwrap());
    }));
    b.events.delete("hook").await.unwrap();
    assert_eq!(
        *stored_meanwhile.lock().unwrap(),
        Some(false),
        "the holder's dead letter was refused"
    );
    assert!(store.scan(Table::DeadLetters).unwrap().is_empty());
    assert!(!holds(&a, "hook"), "the holder stopped at the refusal");
}

/// Dead letters discarded on another node make room on the holder, whose cached count says
/// the dead letters are full: it reads the count again at the limit rather than waiting for
/// ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_discarded_on_another_node_make_room_on_the_holder() {
    let (store, receiver, addr, a) = setup().await;
    let mut once = spec(addr);
    once.max_attempts = Some(1);
    once.initial_backoff_ms = Some(20);
    a.events.put("hook", once).await.unwrap();
    // All but one of the endpoint's dead letters are taken (stored earlier by whichever node
    // delivered it).
    let filler: Vec<Mutation> = (0..deliver::MAX_DEAD_LETTERS as u64 - 1)
        .map(|i| {
            let key = deliver::dead_letter_key("hook", 1_000_000 + i);
            Mutation::put(Table::DeadLetters, key, b"{}".to_vec())
        })
        .collect();
    store.commit(&filler).unwrap();
    let events_dead = || {
        store
            .scan(Table::DeadLetters)
            .unwrap()
            .iter()
            .filter(|(_, v)| serde_json::from_slice::<Value>(v).unwrap()["id"] != Value::Null)
            .count()
    };
    receiver.refusing.store(true, Ordering::SeqCst);
    a.events.start();
    create(&a, "first").await;
    wait_for("the first dead letter", Duration::from_secs(5), || {
        events_dead() == 1
    })
    .await;
    let b = node(&store, "b");
    b.events.discard("hook", 1_000_000).await.unwrap();
    create(&a, "second").await;
    wait_for("the second dead letter", Duration::from_secs(5), || {
        events_dead() == 2
    })
    .await;
}

/// An endpoint made on another node since this node's last lease round keeps the feed records
/// it needs from this node's trim, although this node's own endpoint has delivered past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_made_on_another_node_keeps_its_records_from_this_nodes_trim() {
    let (store, receiver, addr, a) = setup().await;
    let a = with_times(a, Duration::from_secs(120), Duration::from_secs(60));
    a.events.start();
    for i in 0..5 {
        create(&a, &format!("t{i}")).await;
    }
    // A's first lease round is over once it delivers: it cannot take 'late' for a minute.
    wait_for("a delivering", Duration::from_secs(5), || {
        receiver.creations().len() == 5
    })
    .await;
    let b = node(&store, "b");
    b.events.put("late", spec(addr)).await.unwrap();
    let late = lease::read_positions(store.as_ref()).unwrap()["late"];
    for i in 5..10 {
        create(&a, &format!("t{i}")).await;
    }
    wait_for("a's delivery", Duration::from_secs(5), || {
        receiver.creations().len() == 10 && a.events.progress("hook").0 > late
    })
    .await;
    let below = a.events.inner.trim_point().await.unwrap();
    assert!(
        below <= late + 1,
        "a would trim below {below}, and 'late' needs what follows {late}"
    );
}

/// Two nodes whose lease rounds read a free lease at once, committing through their writers:
/// exactly one holds it, in the store and in its memory, round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_nodes_rounding_at_once_through_their_writers_exactly_one_holds_the_lease() {
    for attempt in 0..20 {
        let (store, _receiver, _addr, a) = setup().await;
        let b = node(&store, "b");
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for n in [&a, &b] {
            let barrier = barrier.clone();
            *n.cut.during_endpoint_scan.lock().unwrap() = Some(Box::new(move || {
                barrier.wait();
            }));
        }
        let (ra, rb) = tokio::join!(a.events.inner.round(), b.events.inner.round());
        ra.unwrap();
        rb.unwrap();
        let holding: Vec<&Node> = [&a, &b].into_iter().filter(|n| holds(n, "hook")).collect();
        assert_eq!(holding.len(), 1, "attempt {attempt}");
        assert_eq!(
            holder(&store),
            Some(node_id(holding[0])),
            "attempt {attempt}"
        );
    }
}

/// Two nodes creating an endpoint each at once, when the store holds one fewer than the cap:
/// each counted before the other's commit, and never are more than the cap kept (here both are
/// refused). Without the count after the commit, both land, one over the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_created_at_once_on_two_nodes_never_exceed_the_cap() {
    let (store, _receiver, addr, a) = setup().await;
    let record = serde_json::to_vec(&spec(addr)).unwrap();
    let filler: Vec<Mutation> = (1..MAX_ENDPOINTS - 1)
        .map(|i| Mutation::put(Table::Endpoints, format!("e{i}"), record.clone()))
        .collect();
    store.commit(&filler).unwrap();
    let b = node(&store, "b");
    let barrier = Arc::new(std::sync::Barrier::new(2));
    for n in [&a, &b] {
        let barrier = barrier.clone();
        *n.cut.during_endpoint_scan.lock().unwrap() = Some(Box::new(move || {
            barrier.wait();
        }));
    }
    let (on_a, on_b) = tokio::join!(
        a.events.put("on-a", spec(addr)),
        b.events.put("on-b", spec(addr))
    );
    let stored = store.scan(Table::Endpoints).unwrap().len();
    assert!(stored <= MAX_ENDPOINTS, "{stored} endpoints stored");
    assert!(
        [&on_a, &on_b]
            .iter()
            .any(|r| matches!(r, Err(EventsError::TooMany))),
        "{on_a:?} {on_b:?}"
    );
}

/// An endpoint made on a node whose snapshot lags another node's commits starts at the feed's
/// head as stored, not at the lagging node's: it is not sent the events committed elsewhere
/// before it was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_made_on_a_lagging_node_starts_at_the_stored_head() {
    let (store, _receiver, addr, a) = setup().await;
    let b = node(&store, "b");
    for i in 0..5 {
        create(&a, &format!("t{i}")).await;
    }
    assert!(b.service.feed_head() < a.service.feed_head(), "b lags");
    b.events.put("late", spec(addr)).await.unwrap();
    let late = lease::read_positions(store.as_ref()).unwrap()["late"];
    assert_eq!(late, a.service.feed_head());
}

/// An endpoint edit whose request is dropped while the store holds its commit (the client went
/// away) still ends once the commit lands: a deleted endpoint is no longer delivered, a new
/// one is. (With the edit's memory change in the request's future, the deleted endpoint went
/// on receiving every event from this node until it restarted, and the new one received none.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_edit_whose_request_is_dropped_still_takes_effect() {
    use twinguard_core::store::stalling::StallingStore;
    let store = Arc::new(StallingStore::default());
    let (deleted, kept) = (Receiver::default(), Receiver::default());
    let (deleted_at, kept_at) = (deleted.start().await, kept.start().await);
    let a = node(&store, "a");
    a.events.start();
    a.service
        .write(&owner(), WriteOp::UploadModels(vec![model()]))
        .await
        .unwrap();
    a.events.put("hook", spec(deleted_at)).await.unwrap();
    for (id, endpoint) in [("to-deleted", "hook"), ("to-new", "new")] {
        let route = WriteOp::PutRoute {
            id: id.into(),
            endpoint_name: endpoint.into(),
            filter: "true".into(),
        };
        a.service.write(&owner(), route).await.unwrap();
    }
    let dropped_while_held = async |edit: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
        store.stall();
        let answered = tokio::time::timeout(Duration::from_millis(300), edit).await;
        assert!(
            answered.is_err(),
            "the edit answered while its commit was held"
        );
        assert!(store.wait_for_held(1, Duration::from_secs(5)));
        store.release();
    };
    let events = a.events.clone();
    dropped_while_held(Box::pin(async move {
        let _ = events.delete("hook").await;
    }))
    .await;
    let events = a.events.clone();
    dropped_while_held(Box::pin(async move {
        let _ = events.put("new", spec(kept_at)).await;
    }))
    .await;
    wait_for("the edits in memory", Duration::from_secs(2), || {
        a.events.get("hook").is_err() && a.events.get("new").is_ok()
    })
    .await;
    create(&a, "after-the-edits").await;
    wait_for(
        "the new endpoint's delivery",
        Duration::from_secs(5),
        || kept.creations().contains_key("after-the-edits"),
    )
    .await;
    assert!(
        !deleted.creations().contains_key("after-the-edits"),
        "a deleted endpoint received an event"
    );
}
