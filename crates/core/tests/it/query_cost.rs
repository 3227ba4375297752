//! Bounded query cost (issue 17, findings 1 and 2): the attacks a Query Only caller made, run
//! again through `TwinService::query`. Every bound is proved by counting (bytes on a page,
//! documents parsed, work units), never by timing a run.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use twinguard_core::auth::{DATA_OWNER, Principal, QUERY_ONLY};
use twinguard_core::clock::SystemClock;
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
