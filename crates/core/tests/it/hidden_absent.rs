//! Hidden equals absent, as a property: over generated graphs and scopes, everything a scoped
//! caller is told about a world holding an entity outside its scopes equals what it is told
//! about the same world without that entity. Compared: every read and listing of every twin and
//! relationship ID, a set of query forms (pages of several sizes followed through their
//! continuation tokens, with items, tokens and charge, and the same queries under small work
//! budgets), and a sequence of writes aimed at the hidden entity.
//!
//! The one answer allowed to differ is the documented one: a PUT that would create a twin or
//! relationship under an ID that a hidden one holds is refused (as an out-of-scope write)
//! instead of replacing it. The test checks that every difference is exactly that, and that the
//! hidden entities are never changed.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use twinguard_core::auth::{DATA_OWNER, Grant, Principal, PrincipalKind, RoleId, Scope};
use twinguard_core::clock::Clock;
use twinguard_core::error::DomainError;
use twinguard_core::graph::{Graph, Precondition, Twin, WriteOp, WriteOutcome};
use twinguard_core::query;
use twinguard_core::service::{QueryRequest, TwinService};
use twinguard_core::store::MemoryStore;

/// Cases per run. Each case builds three small worlds and asks a few hundred questions.
const CASES: u32 = 128;

const MODELS: [&str; 4] = [
    "dtmi:p:Space;1",
    "dtmi:p:Building;1",
    "dtmi:p:Room;1",
    "dtmi:p:Pump;1",
];
const NAMES: [&str; 2] = ["contains", "feeds"];

struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }
}

#[derive(Debug, Clone)]
struct Spec {
    /// The model of each twin `t0`, `t1`, ...
    twins: Vec<usize>,
    /// (source, target, name) of relationship `e0`, `e1`, ...; self-loops included.
    edges: Vec<(usize, usize, usize)>,
    scope: ScopeSpec,
    /// Which hidden entity (modulo the number there are) is made absent.
    pick: usize,
    /// Hide a relationship rather than a twin.
    hide_relationship: bool,
}

#[derive(Debug, Clone)]
enum ScopeSpec {
    Subtree(usize),
    Model(usize),
    Relationships(usize),
}

fn spec() -> impl Strategy<Value = Spec> {
    (2usize..=7)
        .prop_flat_map(|n| {
            (
                prop::collection::vec(0..MODELS.len(), n),
                prop::collection::vec((0..n, 0..n, 0..NAMES.len()), 0..=12),
                prop_oneof![
                    (0..n).prop_map(ScopeSpec::Subtree),
                    (0..MODELS.len()).prop_map(ScopeSpec::Model),
                    (0..NAMES.len()).prop_map(ScopeSpec::Relationships),
                ],
                any::<usize>(),
                any::<bool>(),
            )
        })
        .prop_map(|(twins, edges, scope, pick, hide_relationship)| Spec {
            twins,
            edges,
            scope,
            pick,
            hide_relationship,
        })
}

fn tid(i: usize) -> String {
    format!("t{i}")
}

fn eid(k: usize) -> String {
    format!("e{k}")
}

fn owner() -> Principal {
    Principal::with_roles("owner", &[DATA_OWNER])
}

fn caller(scope: &ScopeSpec) -> Principal {
    let scope = match scope {
        ScopeSpec::Subtree(root) => Scope::Subtree {
            root: tid(*root),
            relationships: vec!["contains".into()],
        },
        ScopeSpec::Model(m) => Scope::Model {
            model: MODELS[*m].into(),
        },
        ScopeSpec::Relationships(n) => Scope::Relationships {
            names: vec![NAMES[*n].into()],
        },
    };
    let role = twinguard_core::auth::builtin_role(DATA_OWNER).unwrap();
    let grant = Grant {
        role: RoleId(role.id.to_string()),
        actions: role.actions,
        scope,
    };
    Principal::new(
        "scoped",
        PrincipalKind::Application,
        vec![grant].into(),
        false,
        false,
    )
}

fn object(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

fn put_twin(id: &str, model: &str, precondition: Precondition) -> WriteOp {
    WriteOp::PutTwin {
        id: id.into(),
        body: object(json!({"$metadata": {"$model": model}, "name": id})),
        precondition,
    }
}

fn put_rel(source: &str, id: &str, name: &str, target: &str, pre: Precondition) -> WriteOp {
    WriteOp::PutRelationship {
        source: source.into(),
        id: id.into(),
        body: object(json!({"$targetId": target, "$relationshipName": name})),
        precondition: pre,
    }
}

fn delete_rel(source: &str, id: &str, precondition: Precondition) -> WriteOp {
    WriteOp::DeleteRelationship {
        source: source.into(),
        id: id.into(),
        precondition,
    }
}

fn delete_twin(id: &str, precondition: Precondition) -> WriteOp {
    WriteOp::DeleteTwin {
        id: id.into(),
        precondition,
    }
}

/// The graph of `spec`, written by the owner. Relationships the models do not allow (a Pump
/// contains nothing) are refused and left out, the same way in every world.
async fn build(spec: &Spec) -> TwinService {
    let service =
        TwinService::open(Arc::new(MemoryStore::default()), Arc::new(FixedClock)).unwrap();
    let space = json!({
        "@context": "dtmi:dtdl:context;3", "@id": MODELS[0], "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "name", "schema": "string"},
            {"@type": "Property", "name": "level", "schema": "double"},
            {"@type": "Relationship", "name": "contains"},
            {"@type": "Relationship", "name": "feeds"}
        ]
    });
    let building = json!({"@context": "dtmi:dtdl:context;3", "@id": MODELS[1],
        "@type": "Interface", "extends": MODELS[0]});
    let room = json!({"@context": "dtmi:dtdl:context;3", "@id": MODELS[2],
        "@type": "Interface", "extends": MODELS[0]});
    let pump = json!({"@context": "dtmi:dtdl:context;3", "@id": MODELS[3],
    "@type": "Interface", "contents": [
        {"@type": "Property", "name": "name", "schema": "string"},
        {"@type": "Relationship", "name": "feeds"}
    ]});
    let o = owner();
    service
        .write(&o, WriteOp::UploadModels(vec![space, building, room, pump]))
        .await
        .unwrap();
    for (i, m) in spec.twins.iter().enumerate() {
        service
            .write(&o, put_twin(&tid(i), MODELS[*m], Precondition::None))
            .await
            .unwrap();
    }
    for (k, (s, t, n)) in spec.edges.iter().enumerate() {
        let _ = service
            .write(
                &o,
                put_rel(&tid(*s), &eid(k), NAMES[*n], &tid(*t), Precondition::None),
            )
            .await;
    }
    service
}

/// The hidden entity made absent: a twin (with its relationships) or one relationship.
#[derive(Debug, Clone)]
enum Hidden {
    Twin(String),
    Relationship(String, String),
}

/// The relationships of the built graph, as (source, id, target).
fn edges_of(service: &TwinService) -> Vec<(String, String, String)> {
    let graph = service.snapshot();
    let mut out: Vec<_> = graph
        .relationships()
        .map(|r| (r.source.to_string(), r.id.to_string(), r.target.to_string()))
        .collect();
    out.sort();
    out
}

/// Picks the entity to hide, or `None` when the scope hides nothing of that kind. A twin counts
/// as hidden only if the caller can neither read it nor see it as the end of a relationship
/// (a relationship scope shows every twin as a possible endpoint, by design, so there only
/// relationships are hidden).
fn choose(spec: &Spec, service: &TwinService, who: &Principal) -> Option<Hidden> {
    let edges = edges_of(service);
    let rel_hidden = |s: &str, id: &str| service.relationship(who, s, id).is_err();
    if spec.hide_relationship || matches!(spec.scope, ScopeSpec::Relationships(_)) {
        let hidden: Vec<_> = edges
            .iter()
            .filter(|(s, id, _)| rel_hidden(s, id))
            .collect();
        let (s, id, _) = hidden.get(spec.pick % hidden.len().max(1))?;
        return Some(Hidden::Relationship(s.clone(), id.clone()));
    }
    let hidden: Vec<String> = (0..spec.twins.len())
        .map(tid)
        .filter(|t| service.twin(who, t).is_err())
        .filter(|t| {
            edges
                .iter()
                .filter(|(s, _, target)| s == t || target == t)
                .all(|(s, id, _)| rel_hidden(s, id))
        })
        .collect();
    hidden
        .get(spec.pick % hidden.len().max(1))
        .cloned()
        .map(Hidden::Twin)
}

/// Makes `hidden` absent, as the owner would delete it.
async fn remove(service: &TwinService, hidden: &Hidden) {
    let o = owner();
    match hidden {
        Hidden::Relationship(s, id) => {
            service
                .write(&o, delete_rel(s, id, Precondition::None))
                .await
                .unwrap();
        }
        Hidden::Twin(t) => {
            for (s, id, target) in edges_of(service) {
                if &s == t || &target == t {
                    service
                        .write(&o, delete_rel(&s, &id, Precondition::None))
                        .await
                        .unwrap();
                }
            }
            service
                .write(&o, delete_twin(t, Precondition::None))
                .await
                .unwrap();
        }
    }
}

/// What a client is told: the error a hidden resource is answered as (the audit trail alone
/// learns it was hidden), or the JSON of the answer.
fn told<T>(result: Result<T, DomainError>, ok: impl Fn(T) -> String) -> String {
    match result {
        Ok(v) => ok(v),
        Err(DomainError::Hidden(absent)) => format!("{absent:?}"),
        Err(e) => format!("{e:?}"),
    }
}

/// The same, for a write: etags are fresh random values in every answer, so they are dropped.
fn told_write(result: &Result<WriteOutcome, DomainError>) -> String {
    let strip = |raw: &str| {
        let mut v: Value = serde_json::from_str(raw).unwrap();
        if let Some(o) = v.as_object_mut() {
            o.remove("$etag");
        }
        v.to_string()
    };
    match result {
        Ok(WriteOutcome::Twin(t)) => strip(t.json().get()),
        Ok(WriteOutcome::Relationship(r)) => strip(r.json().get()),
        Ok(other) => format!("{other:?}"),
        Err(DomainError::Hidden(absent)) => format!("{absent:?}"),
        Err(e) => format!("{e:?}"),
    }
}

const QUERIES: &[&str] = &[
    "SELECT * FROM DIGITALTWINS",
    "SELECT T.$dtId, T.name FROM DIGITALTWINS T",
    "SELECT COUNT() FROM DIGITALTWINS",
    "SELECT TOP(2) T.$dtId FROM DIGITALTWINS T",
    "SELECT * FROM DIGITALTWINS WHERE $dtId = '{h}'",
    "SELECT * FROM DIGITALTWINS WHERE $dtId IN ['{h}', 't0', 't1', 't2', 'nope']",
    "SELECT T.$dtId FROM DIGITALTWINS T WHERE IS_OF_MODEL('dtmi:p:Space;1')",
    "SELECT T.$dtId FROM DIGITALTWINS T WHERE IS_OF_MODEL(T, 'dtmi:p:Room;1', exact)",
    "SELECT a.$dtId AS a, b.$dtId AS b FROM DIGITALTWINS a JOIN b RELATED a.contains",
    "SELECT a.$dtId AS a, r, b.$dtId AS b FROM DIGITALTWINS a JOIN b RELATED a.feeds r \
     WHERE a.$dtId IN ['{h}', 't0', 't1']",
    "SELECT a, b FROM DIGITALTWINS MATCH (a)-[:contains*1..3]->(b)",
    "SELECT COUNT() FROM DIGITALTWINS MATCH (a)-[*..2]-(b)",
    "SELECT b.$dtId FROM DIGITALTWINS MATCH (a)-[r]->(b) WHERE a.$dtId IN ['{h}', 't0', 't1']",
    "SELECT a.$dtId AS a, c.$dtId AS c FROM DIGITALTWINS MATCH (a)-[:contains]->(b)<-[:feeds]-(c)",
    "SELECT * FROM RELATIONSHIPS",
    "SELECT COUNT() FROM RELATIONSHIPS R WHERE R.$sourceId IN ['{h}', 't0', 't1']",
    "SELECT * FROM RELATIONSHIPS WHERE $targetId = '{h}'",
    "SELECT R.$relationshipId FROM RELATIONSHIPS R WHERE R.$relationshipName = 'feeds'",
];

/// Every page of `text` for `who` at `page_size`, followed through continuation tokens.
fn pages(service: &TwinService, who: &Principal, text: &str, page_size: usize) -> String {
    let mut out = String::new();
    let mut request = QueryRequest {
        query: Some(text.into()),
        continuation_token: None,
        page_size,
    };
    for _ in 0..64 {
        match service.query(who, &request) {
            Ok(page) => {
                out += &format!(
                    "{:?} {:?} {} {:?}\n",
                    page.items, page.continuation, page.charge, page.cost
                );
                let Some(token) = page.continuation else {
                    return out;
                };
                request = QueryRequest {
                    query: None,
                    continuation_token: Some(token),
                    page_size,
                };
            }
            Err(e) => return out + &told::<()>(Err(e), |_| String::new()),
        }
    }
    out
}

/// The first page of `text` for `who` under a work budget of `budget` units, run the way the
/// service runs it (visibility decided once per twin, subtree walks charged to the budget), or
/// the error the budget ends it with.
fn budgeted(graph: &Graph, who: &Principal, text: &str, page_size: usize, budget: u64) -> String {
    let parsed = query::parse(text).unwrap();
    let page = match who.query_scope(graph) {
        None => query::execute_with_budget(graph, &parsed, text, 0, page_size, &|_| true, budget),
        Some(scope) => {
            let steps = |t: &Twin| scope.charge(t);
            let bounds = query::Bounds {
                max_work: budget,
                scope_steps: &steps,
                ..query::Bounds::default()
            };
            let visible = |t: &Twin| scope.visible(t);
            query::execute_bounded(graph, &parsed, text, 0, page_size, &visible, &bounds)
        }
    };
    format!("{page:?}")
}

/// Everything the caller is told by reads, listings and queries.
fn observe(service: &TwinService, who: &Principal, spec: &Spec, h: &str) -> Vec<String> {
    let twin_ids: Vec<String> = (0..spec.twins.len())
        .map(tid)
        .chain(["nope".to_owned()])
        .collect();
    let rel_ids: Vec<String> = (0..spec.edges.len())
        .map(eid)
        .chain(["x1".to_owned(), "x2".to_owned()])
        .collect();
    let rel_json = |r: Arc<twinguard_core::graph::Relationship>| r.json().get().to_owned();
    let list = |rs: Vec<Arc<twinguard_core::graph::Relationship>>| {
        rs.into_iter().map(rel_json).collect::<Vec<_>>().join(",")
    };
    let mut out = Vec::new();
    for t in &twin_ids {
        out.push(told(service.twin(who, t), |t| t.json().get().to_owned()));
        out.push(told(service.component(who, t, "c"), |c| format!("{c:?}")));
        out.push(told(service.outgoing(who, t, None), list));
        out.push(told(service.outgoing(who, t, Some("feeds")), list));
        out.push(told(service.incoming(who, t), list));
        for r in &rel_ids {
            out.push(told(service.relationship(who, t, r), rel_json));
        }
    }
    let graph = service.snapshot();
    for template in QUERIES {
        let text = template.replace("{h}", h);
        for page_size in [1, 2, 1000] {
            out.push(pages(service, who, &text, page_size));
        }
        // Small budgets: whether the work limit is reached depends on visible work only.
        for budget in [8, 40, 120] {
            out.push(budgeted(&graph, who, &text, 2, budget));
        }
    }
    out
}

/// Writes a scoped caller might aim at the hidden entity.
fn writes(spec: &Spec, hidden: &Hidden, hidden_edges: &[(String, String, String)]) -> Vec<WriteOp> {
    let v = tid(0);
    let mut ops = Vec::new();
    let preconditions = [
        Precondition::None,
        Precondition::IfMatch("*".into()),
        Precondition::IfMatch("W/\"guess\"".into()),
        Precondition::IfNoneMatch,
    ];
    if let Hidden::Twin(h) = hidden {
        for pre in &preconditions {
            for m in MODELS {
                ops.push(put_twin(h, m, pre.clone()));
            }
            ops.push(WriteOp::PatchTwin {
                id: h.clone(),
                component: None,
                patch: json!([{"op": "add", "path": "/level", "value": 1.5}]),
                precondition: pre.clone(),
            });
            ops.push(delete_twin(h, pre.clone()));
        }
        for name in NAMES {
            ops.push(put_rel(h, "x1", name, &v, Precondition::None));
            ops.push(put_rel(&v, "x2", name, h, Precondition::None));
        }
    }
    for (s, id, _) in hidden_edges {
        for pre in &preconditions {
            for name in NAMES {
                for t in (0..spec.twins.len()).map(tid).take(3) {
                    ops.push(put_rel(s, id, name, &t, pre.clone()));
                }
            }
            ops.push(WriteOp::PatchRelationship {
                source: s.clone(),
                id: id.clone(),
                patch: json!([{"op": "add", "path": "/weight", "value": 1}]),
                precondition: pre.clone(),
            });
            ops.push(delete_rel(s, id, pre.clone()));
        }
    }
    ops
}

/// The entity a write creates, for undoing it.
fn created_by(op: &WriteOp) -> Option<WriteOp> {
    match op {
        WriteOp::PutTwin { id, .. } => Some(delete_twin(id, Precondition::None)),
        WriteOp::PutRelationship { source, id, .. } => {
            Some(delete_rel(source, id, Precondition::None))
        }
        _ => None,
    }
}

async fn check(spec: Spec) -> Result<(), TestCaseError> {
    let who = caller(&spec.scope);
    let world = build(&spec).await;
    let Some(hidden) = choose(&spec, &world, &who) else {
        return Ok(());
    };
    let h = match &hidden {
        Hidden::Twin(t) => t.clone(),
        Hidden::Relationship(s, _) => s.clone(),
    };
    let edges = edges_of(&world);
    let hidden_edges: Vec<_> = edges
        .iter()
        .filter(|(s, id, t)| match &hidden {
            Hidden::Twin(x) => s == x || t == x,
            Hidden::Relationship(hs, hid) => s == hs && id == hid,
        })
        .cloned()
        .collect();

    // Reads, listings and queries: the same service before and after the owner deletes the
    // hidden entity, so that iteration order (and so paging) is the graph's own.
    let seen = observe(&world, &who, &spec, &h);
    remove(&world, &hidden).await;
    let absent = observe(&world, &who, &spec, &h);
    for (i, (s, a)) in seen.iter().zip(&absent).enumerate() {
        prop_assert_eq!(s, a, "observation {} for {:?} hiding {:?}", i, spec, hidden);
    }

    // Writes: the same sequence in a world with the hidden entity and one without.
    let with = build(&spec).await;
    let without = build(&spec).await;
    remove(&without, &hidden).await;
    let before: Vec<String> = hidden_edges
        .iter()
        .map(|(s, id, _)| {
            told(with.relationship(&owner(), s, id), |r| {
                r.json().get().to_owned()
            })
        })
        .chain(std::iter::once(told(with.twin(&owner(), &h), |t| {
            t.json().get().to_owned()
        })))
        .collect();
    for op in writes(&spec, &hidden, &hidden_edges) {
        let in_with = with.write(&who, op.clone()).await;
        let in_without = without.write(&who, op.clone()).await;
        let (w, wo) = (told_write(&in_with), told_write(&in_without));
        if w == wo {
            continue;
        }
        // The one documented difference: a PUT that would create under a taken ID.
        let refused = matches!(&in_with, Err(DomainError::Hidden(e))
            if matches!(**e, DomainError::Forbidden { .. }));
        prop_assert!(
            refused && in_without.is_ok() && created_by(&op).is_some(),
            "{:?}: {} with the hidden entity, {} without, for {:?} hiding {:?}",
            op,
            w,
            wo,
            spec,
            hidden
        );
        if let Some(undo) = created_by(&op) {
            without.write(&owner(), undo).await.unwrap();
        }
    }
    let after: Vec<String> = hidden_edges
        .iter()
        .map(|(s, id, _)| {
            told(with.relationship(&owner(), s, id), |r| {
                r.json().get().to_owned()
            })
        })
        .chain(std::iter::once(told(with.twin(&owner(), &h), |t| {
            t.json().get().to_owned()
        })))
        .collect();
    prop_assert_eq!(before, after, "the hidden entities were changed");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn a_scoped_caller_is_told_the_same_about_a_hidden_entity_as_about_an_absent_one(
        spec in spec()
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(check(spec))?;
    }
}

/// The case the property first failed on: a relationship scan by a subtree caller (root `t3`)
/// where the hidden twin `t4` is the target of `e0` from the visible `t0`. Checking `e0` walked
/// up from `t0` and charged that walk to the work budget, so the scope steps charged (and the
/// budget at which the page fails) depended on the hidden twin. Whether it showed depended on
/// the graph's iteration order, which changes from run to run; the next test does not.
#[test]
fn regression_the_case_the_property_failed_on() {
    let spec = Spec {
        twins: vec![0, 0, 0, 0, 0],
        edges: vec![(0, 4, 1), (1, 1, 0), (3, 2, 0), (1, 0, 0), (2, 1, 0)],
        scope: ScopeSpec::Subtree(3),
        pick: 9_555_179_242_479_674_494,
        hide_relationship: false,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Fresh worlds iterate in different orders: try several.
    for _ in 0..16 {
        runtime.block_on(check(spec.clone())).unwrap();
    }
}

/// The same leak, independent of iteration order: a containment chain `t0 > t1 > t2 > t3` seen
/// by a subtree caller at `t0`, and `t3 -feeds-> t4` with `t4` outside. Asking for the
/// relationships from `t3` and then from `t1` checked `t3 -> t4` first, which walked up from
/// `t3` and charged three steps; without `t4` only the walks from `t1` and `t2` were charged
/// (two). Eight more work units with the hidden twin than without: under a budget in between,
/// the page failed with `QueryLimitExceeded` in one world and was served in the other.
#[test]
fn regression_a_hidden_relationship_end_does_not_change_the_scope_steps_charged() {
    let spec = Spec {
        twins: vec![0, 0, 0, 0, 0],
        edges: vec![(0, 1, 0), (1, 2, 0), (2, 3, 0), (3, 4, 1)],
        scope: ScopeSpec::Subtree(0),
        pick: 0,
        hide_relationship: false,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let who = caller(&spec.scope);
        let world = build(&spec).await;
        let text = "SELECT * FROM RELATIONSHIPS R WHERE R.$sourceId IN ['t3', 't1']";
        let request = QueryRequest {
            query: Some(text.into()),
            continuation_token: None,
            page_size: 10,
        };
        let run = |world: &TwinService| {
            let page = world.query(&who, &request).unwrap();
            let budgets: Vec<String> = (1..=100)
                .map(|b| budgeted(&world.snapshot(), &who, text, 10, b))
                .collect();
            (page.cost, page.charge, page.values(), budgets)
        };
        let seen = run(&world);
        remove(&world, &Hidden::Twin(tid(4))).await;
        let absent = run(&world);
        for (b, (s, a)) in seen.3.iter().zip(&absent.3).enumerate() {
            assert_eq!(s, a, "budget {}", b + 1);
        }
        assert_eq!(seen.0, absent.0);
        assert_eq!(seen.1, absent.1);
        assert_eq!(seen.2, absent.2);
        assert_eq!(
            seen.0.scope_steps, 2,
            "the walks from t1 and t2, one step each"
        );
    });
    runtime.block_on(check(spec)).unwrap();
}
