//! Bounded query cost (issue 17, findings 1 and 2): the attacks a Query Only caller made, run
//! again through `TwinService::query`. Every bound is proved by counting (bytes on a page,
//! documents parsed, work units), never by timing a run.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use twinguard_core::auth::{
    DATA_OWNER, Grant, Principal, PrincipalKind, QUERY_ONLY, RoleId, Scope, builtin_role,
};
use twinguard_core::clock::{Clock, SystemClock};
use twinguard_core::error::DomainError;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::query::QueryPage;
use twinguard_core::service::{QueryRequest, TwinService};
use twinguard_core::store::MemoryStore;

/// The page byte cap the tests hold the server to.
const PAGE_CAP: u64 = 4 * 1024 * 1024;

fn owner() -> Principal {
    Principal::with_roles("owner", &[DATA_OWNER])
}

fn attacker() -> Principal {
    Principal::with_roles("attacker", &[QUERY_ONLY])
}

fn object(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

/// A service whose one model has a string, a string map and a `feeds` relationship.
async fn service() -> TwinService {
    let service =
        TwinService::open(Arc::new(MemoryStore::default()), Arc::new(SystemClock)).unwrap();
    let model = json!({
        "@context": "dtmi:dtdl:context;3", "@id": "dtmi:a:Amp;1", "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "s", "schema": "string"},
            {"@type": "Property", "name": "blob", "schema": {"@type": "Map",
                "mapKey": {"name": "k", "schema": "string"},
                "mapValue": {"name": "v", "schema": "string"}}},
            {"@type": "Relationship", "name": "feeds"},
            {"@type": "Relationship", "name": "contains"}
        ]
    });
    service
        .write(&owner(), WriteOp::UploadModels(vec![model]))
        .await
        .unwrap();
    service
}

async fn put_twin(service: &TwinService, id: &str, body: Value) {
    let mut body = object(body);
    body.insert("$metadata".into(), json!({"$model": "dtmi:a:Amp;1"}));
    service
        .write(
            &owner(),
            WriteOp::PutTwin {
                id: id.into(),
                body,
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
}

async fn put_rel(service: &TwinService, source: &str, id: &str, name: &str, target: &str) {
    service
        .write(
            &owner(),
            WriteOp::PutRelationship {
                source: source.into(),
                id: id.into(),
                body: object(json!({"$targetId": target, "$relationshipName": name})),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
}

/// `amp` with `body` and `loops` self-loop `feeds` relationships.
async fn amp_with_self_loops(body: Value, loops: usize) -> TwinService {
    let service = service().await;
    put_twin(&service, "amp", body).await;
    for i in 0..loops {
        put_rel(&service, "amp", &format!("loop{i}"), "feeds", "amp").await;
    }
    service
}

/// `JOIN X1 RELATED T.feeds JOIN X2 RELATED X1.feeds ... JOIN Xn RELATED X(n-1).feeds`
fn joins(n: usize) -> String {
    (1..=n)
        .map(|k| {
            let from = if k == 1 {
                "T".into()
            } else {
                format!("X{}", k - 1)
            };
            format!(" JOIN X{k} RELATED {from}.feeds")
        })
        .collect()
}

fn request(text: &str, page_size: usize) -> QueryRequest {
    QueryRequest {
        query: Some(text.into()),
        continuation_token: None,
        page_size,
    }
}

/// Every page of `text` for `who`, following continuation tokens; stops at the first error.
fn all_pages(
    service: &TwinService,
    who: &Principal,
    text: &str,
    page_size: usize,
) -> (Vec<QueryPage>, Option<DomainError>) {
    let mut pages = Vec::new();
    let mut next = request(text, page_size);
    loop {
        match service.query(who, &next) {
            Ok(page) => {
                let token = page.continuation.clone();
                pages.push(page);
                match token {
                    Some(token) => {
                        next = QueryRequest {
                            query: None,
                            continuation_token: Some(token),
                            page_size,
                        }
                    }
                    None => return (pages, None),
                }
            }
            Err(e) => return (pages, Some(e)),
        }
    }
}

/// Finding 1: ten whole-document projections over ten JOINs of two self-loops (1,024 rows of
/// ten copies of a 28 KB twin, 282 MB in one page before the fix).
#[tokio::test]
async fn a_wide_projection_over_self_loops_is_paged_under_the_byte_cap_and_parses_its_twin_once() {
    let service = amp_with_self_loops(json!({"s": "x".repeat(28_000)}), 2).await;
    let columns: Vec<String> = (0..10).map(|i| format!("T AS a{i}")).collect();
    let text = format!(
        "SELECT {} FROM DIGITALTWINS T{} WHERE T.$dtId = 'amp'",
        columns.join(", "),
        joins(10)
    );
    let (pages, error) = all_pages(&service, &attacker(), &text, 1000);
    assert!(error.is_none(), "{error:?}");
    let rows: usize = pages.iter().map(|p| p.items.len()).sum();
    assert_eq!(rows, 1024, "every row is delivered, over several pages");
    assert!(pages.len() > 1);
    for page in &pages {
        assert!(
            page.cost.page_bytes <= PAGE_CAP,
            "page of {} bytes",
            page.cost.page_bytes
        );
        // Whole documents are copied from their stored JSON; the one twin is parsed once,
        // for the `$dtId` condition.
        assert!(page.cost.parses <= 1, "{:?}", page.cost);
    }
}

/// Finding 2: eight JOINs over four self-loops with a filter on the last twin's 1,700-key map
/// (65,536 rows, each parsing the 20 KB document again before the fix).
#[tokio::test]
async fn deep_joins_over_self_loops_parse_the_one_twin_they_touch_once() {
    let blob: Map<String, Value> = (0..1_700)
        .map(|i| (format!("k{i:04}"), Value::from("v")))
        .collect();
    let service = amp_with_self_loops(json!({ "blob": blob }), 4).await;
    let text = format!(
        "SELECT T.$dtId FROM DIGITALTWINS T{} WHERE T.$dtId = 'amp' AND X8.blob.k0001 = 'nope'",
        joins(8)
    );
    let page = service.query(&attacker(), &request(&text, 1000)).unwrap();
    assert!(page.items.is_empty());
    assert_eq!(page.cost.parses, 1, "one twin touched, one parse");
}

/// A clock that moves one second each time it is read: a query that keeps working reads it at
/// every deadline check, so it meets its deadline after a fixed amount of work, whatever the
/// machine's speed.
struct SteppingClock(std::sync::Mutex<time::OffsetDateTime>);

impl Clock for SteppingClock {
    fn now(&self) -> time::OffsetDateTime {
        let mut now = self.0.lock().unwrap();
        *now += time::Duration::seconds(1);
        *now
    }
}

/// A clock that, while `hold` is set, parks every reader until it is cleared: a query reads it
/// once it holds its slot, so the test can keep queries running for as long as it likes.
#[derive(Default)]
struct HoldingClock {
    state: std::sync::Mutex<(bool, usize)>,
    changed: std::sync::Condvar,
}

impl HoldingClock {
    fn hold(&self, on: bool) {
        self.state.lock().unwrap().0 = on;
        self.changed.notify_all();
    }

    fn wait_for_parked(&self, n: usize) {
        let mut state = self.state.lock().unwrap();
        while state.1 < n {
            state = self.changed.wait(state).unwrap();
        }
    }
}

impl Clock for HoldingClock {
    fn now(&self) -> time::OffsetDateTime {
        let mut state = self.state.lock().unwrap();
        if state.0 {
            state.1 += 1;
            self.changed.notify_all();
            while state.0 {
                state = self.changed.wait(state).unwrap();
            }
            state.1 -= 1;
        }
        time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }
}

async fn service_on(clock: Arc<dyn Clock>) -> TwinService {
    let service = TwinService::open(Arc::new(MemoryStore::default()), clock).unwrap();
    let model = json!({
        "@context": "dtmi:dtdl:context;3", "@id": "dtmi:a:Amp;1", "@type": "Interface",
        "contents": [{"@type": "Relationship", "name": "feeds"}]
    });
    service
        .write(&owner(), WriteOp::UploadModels(vec![model]))
        .await
        .unwrap();
    put_twin(&service, "amp", json!({})).await;
    for i in 0..4 {
        put_rel(&service, "amp", &format!("loop{i}"), "feeds", "amp").await;
    }
    service
}

#[tokio::test]
async fn a_query_past_its_deadline_is_refused_and_a_short_one_answers() {
    let clock = Arc::new(SteppingClock(std::sync::Mutex::new(
        time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
    )));
    let service = service_on(clock).await;
    // 87,380 relationships examined: far inside the work budget, but at one second per
    // deadline check it meets the 10 s deadline after about 160,000 work units.
    let long = format!(
        "SELECT COUNT() FROM DIGITALTWINS T{} WHERE T.$dtId = 'amp'",
        joins(8)
    );
    match service.query(&attacker(), &request(&long, 10)) {
        Err(DomainError::QueryLimitExceeded(message)) => {
            assert!(message.contains("deadline"), "{message}")
        }
        other => panic!("{:?}", other.map(|p| p.values())),
    }
    let short = format!(
        "SELECT COUNT() FROM DIGITALTWINS T{} WHERE T.$dtId = 'amp'",
        joins(2)
    );
    let page = service.query(&attacker(), &request(&short, 10)).unwrap();
    assert_eq!(page.values(), vec![json!({"COUNT": 16})]);
}

#[tokio::test]
async fn a_principal_runs_at_most_two_queries_at_once_and_others_are_not_held_back() {
    let clock = Arc::new(HoldingClock::default());
    let service = service_on(clock.clone()).await;
    let text = "SELECT COUNT() FROM DIGITALTWINS";
    clock.hold(true);
    let run = |who: Principal| {
        let service = service.clone();
        std::thread::spawn(move || service.query(&who, &request(text, 10)).map(|p| p.values()))
    };
    let first = [run(attacker()), run(attacker())];
    clock.wait_for_parked(2);
    // Refused before it runs (it never reads the clock, so it is not parked).
    match service.query(&attacker(), &request(text, 10)) {
        Err(DomainError::Busy { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
        other => panic!("{:?}", other.map(|p| p.values())),
    }
    // Another principal still gets a slot.
    let other = run(Principal::with_roles("someone-else", &[QUERY_ONLY]));
    clock.wait_for_parked(3);
    clock.hold(false);
    for handle in first.into_iter().chain([other]) {
        assert_eq!(handle.join().unwrap().unwrap(), vec![json!({"COUNT": 1})]);
    }
    // The slots are free again.
    assert!(service.query(&attacker(), &request(text, 10)).is_ok());
}

/// A caller scoped to the subtree of `c0` in a containment chain `c0 → c1 → … → c(n-1)`.
fn chain_reader() -> Principal {
    let role = builtin_role(QUERY_ONLY).unwrap();
    let grant = Grant {
        role: RoleId(role.id.to_string()),
        actions: role.actions,
        scope: Scope::Subtree {
            root: "c0".into(),
            relationships: vec!["contains".into()],
        },
    };
    Principal::new(
        "chain-reader",
        PrincipalKind::Application,
        vec![grant].into(),
        false,
        false,
    )
}

/// Suspected finding: subtree membership walked up from every twin, uncharged, so a scan of a
/// chain of n twins took n²/2 steps (500,000 for 1,000 twins) outside the work budget.
#[tokio::test]
async fn a_scoped_scan_of_a_containment_chain_walks_it_once_and_is_charged_for_the_walk() {
    const N: usize = 1_000;
    let service = service().await;
    for i in 0..N {
        put_twin(&service, &format!("c{i}"), json!({})).await;
    }
    for i in 1..N {
        put_rel(
            &service,
            &format!("c{}", i - 1),
            &format!("r{i}"),
            "contains",
            &format!("c{i}"),
        )
        .await;
    }
    let reader = chain_reader();
    let graph = service.snapshot();
    let scope = reader.query_scope(&graph).unwrap();
    // Deepest first: the order that made every walk the longest.
    for i in (0..N).rev() {
        assert!(scope.visible(graph.twin(&format!("c{i}")).unwrap()));
    }
    assert_eq!(
        scope.walk_steps(),
        (N - 1) as u64,
        "each relationship walked once"
    );
    assert_eq!(scope.charged_steps(), 0, "deciding is not charged");
    for i in (0..N).rev() {
        scope.charge(graph.twin(&format!("c{i}")).unwrap());
    }
    assert_eq!(scope.charged_steps(), (N - 1) as u64);
    assert_eq!(
        scope.walk_steps(),
        2 * (N - 1) as u64,
        "each relationship walked once more to charge it"
    );

    let page = service
        .query(&reader, &request("SELECT COUNT() FROM DIGITALTWINS", 10))
        .unwrap();
    assert_eq!(page.values(), vec![json!({"COUNT": N})]);
    assert_eq!(page.cost.scope_steps, (N - 1) as u64, "the walk is charged");
}
