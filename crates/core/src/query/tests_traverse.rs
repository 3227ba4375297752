//! Execution tests for traversals (JOIN, MATCH, FROM RELATIONSHIPS), visibility, paging and the
//! work budget.

use serde_json::{Value, json};

use super::fixture::{GraphBuilder, ROOM, building, count, ids_at, items, page, s, var_ids};
use super::{
    QueryErrorKind, QueryRequest, continuation_token, decode_continuation, execute_with_budget,
    parse, run,
};
use crate::graph::{Graph, Twin};

// ---- JOIN ----

#[test]
fn join_expands_the_bound_twins_outgoing_relationships() {
    let rows =
        items("SELECT T, CT FROM DIGITALTWINS T JOIN CT RELATED T.contains WHERE T.$dtId = 'B1'");
    assert_eq!(ids_at(&rows, Some("CT")), s(&["F1", "F2"]));
    assert_eq!(ids_at(&rows, Some("T")), s(&["B1", "B1"]));
}

#[test]
fn join_relationship_collections_can_be_filtered_and_projected() {
    let rows = items(
        "SELECT CT.$dtId, R.since, R FROM DIGITALTWINS T JOIN CT RELATED T.contains R \
         WHERE T.$dtId = 'F1' AND R.since > 2021",
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["$dtId"], "R2");
    assert_eq!(rows[0]["since"], 2022);
    assert_eq!(rows[0]["R"]["$relationshipId"], "F1-contains-R2");
}

#[test]
fn multiple_joins_walk_several_levels_and_drop_rows_without_a_match() {
    assert_eq!(
        var_ids(
            "SELECT R FROM DIGITALTWINS B JOIN F RELATED B.contains JOIN R RELATED F.contains WHERE B.$dtId = 'B1'",
            "R"
        ),
        s(&["R1", "R2", "R3"])
    );
    assert_eq!(
        var_ids(
            "SELECT Room, S FROM DIGITALTWINS Room JOIN S RELATED Room.hasSensor",
            "Room"
        ),
        s(&["R1", "R3"])
    );
    assert_eq!(
        var_ids(
            "SELECT X FROM DIGITALTWINS B JOIN F RELATED B.contains JOIN X RELATED F.missing WHERE B.$dtId = 'B1'",
            "X"
        ),
        Vec::<String>::new()
    );
}

#[test]
fn join_anchored_on_the_target_walks_incoming_relationships() {
    let text = "SELECT Room, Sensor, Rel FROM DIGITALTWINS Room JOIN Sensor RELATED Room.hasSensor Rel \
                WHERE Sensor.$dtId = 'S2'";
    let result = page(&building(), text, &|_| true);
    assert_eq!(ids_at(&result.values(), Some("Room")), s(&["R3"]));
    assert_eq!(
        result.values()[0]["Rel"]["$relationshipId"],
        "R3-hasSensor-S2"
    );
    assert!(result.charge < 1.05, "no scan: {}", result.charge);
}

// ---- FROM RELATIONSHIPS ----

#[test]
fn relationships_are_queried_by_source_target_and_name() {
    let rel_ids = |text: &str| {
        let mut v: Vec<String> = items(text)
            .iter()
            .map(|r| r["$relationshipId"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        rel_ids("SELECT * FROM RELATIONSHIPS WHERE $sourceId IN ['F1', 'B1']").len(),
        4
    );
    let wrapped = items("SELECT R FROM RELATIONSHIPS R WHERE R.$targetId = 'R2'");
    assert_eq!(wrapped.len(), 2);
    assert_eq!(
        wrapped[0]["R"]["$targetId"], "R2",
        "SELECT R wraps the document"
    );
    assert_eq!(
        rel_ids("SELECT * FROM RELATIONSHIPS R WHERE R.$targetId = 'R2'"),
        s(&["F1-contains-R2", "S1-feeds-R2"])
    );
    assert_eq!(
        rel_ids("SELECT * FROM RELATIONSHIPS WHERE $relationshipName = 'feeds'"),
        s(&["S1-feeds-R2"])
    );
    let result = page(
        &building(),
        "SELECT * FROM RELATIONSHIPS WHERE $sourceId = 'F1'",
        &|_| true,
    );
    assert_eq!((result.items.len(), result.charge), (2, 1.02));
}

// ---- MATCH ----

#[test]
fn match_follows_each_direction() {
    let m = |pattern: &str, start: &str| {
        var_ids(
            &format!("SELECT a, b FROM DIGITALTWINS MATCH {pattern} WHERE a.$dtId = '{start}'"),
            "b",
        )
    };
    assert_eq!(m("(a)-[]->(b)", "F1"), s(&["R1", "R2"]));
    assert_eq!(m("(a)<-[]-(b)", "R2"), s(&["F1", "S1"]));
    assert_eq!(m("(a)-[]-(b)", "R1"), s(&["F1", "S1"]));
    assert_eq!(m("(b)-[]->(a)", "R2"), s(&["F1", "S1"]));
}

#[test]
fn match_filters_by_relationship_names_and_variables() {
    let rows = items(
        "SELECT a, b, r FROM DIGITALTWINS MATCH (a)-[r:contains]->(b) WHERE a.$dtId = 'F1' AND r.since = 2020",
    );
    assert_eq!(ids_at(&rows, Some("b")), s(&["R1"]));
    assert_eq!(rows[0]["r"]["$relationshipName"], "contains");
    assert_eq!(
        var_ids(
            "SELECT b FROM DIGITALTWINS MATCH (a)<-[:contains|feeds]-(b) WHERE a.$dtId = 'R2'",
            "b"
        ),
        s(&["F1", "S1"])
    );
    assert_eq!(
        var_ids(
            "SELECT b FROM DIGITALTWINS MATCH (a)<-[:feeds]-(b) WHERE a.$dtId = 'R2'",
            "b"
        ),
        s(&["S1"])
    );
    assert_eq!(
        var_ids(
            "SELECT b FROM DIGITALTWINS MATCH (a)-[rel]-(b) WHERE a.$dtId = 'S1' AND rel.$relationshipName = 'feeds'",
            "b"
        ),
        s(&["R2"])
    );
}

#[test]
fn match_hop_ranges_follow_adts_exclusive_starting_limit() {
    let m = |hops: &str| {
        var_ids(
            &format!("SELECT b FROM DIGITALTWINS MATCH (a)-[{hops}]->(b) WHERE a.$dtId = 'B1'"),
            "b",
        )
    };
    assert_eq!(m("*2"), s(&["R1", "R2", "R3"]));
    assert_eq!(m("*3"), s(&["S1", "S2"]));
    assert_eq!(m("*4"), s(&["R2"]), "B1 > F1 > R1 > S1 > R2");
    assert_eq!(
        m("*1..3"),
        s(&["R1", "R2", "R3", "S1", "S2"]),
        "2 or 3 hops"
    );
    assert_eq!(m("*..2"), s(&["F1", "F2", "R1", "R2", "R3"]));
    assert_eq!(
        m("*..4"),
        s(&["F1", "F2", "R1", "R2", "R3", "S1", "S2"]),
        "each twin once"
    );
    assert_eq!(m(":contains*..3"), s(&["F1", "F2", "R1", "R2", "R3"]));
    assert_eq!(m(":contains|hasSensor*3"), s(&["S1", "S2"]));
}

#[test]
fn undirected_multi_hop_paths_never_return_to_their_start() {
    assert_eq!(
        var_ids(
            "SELECT b FROM DIGITALTWINS MATCH (a)-[*2]-(b) WHERE a.$dtId = 'R1'",
            "b"
        ),
        s(&["B1", "R2"])
    );
}

#[test]
fn chained_match_conditions_bind_every_named_twin() {
    let rows = items(
        "SELECT * FROM DIGITALTWINS MATCH (b)-[:contains]->(f)-[:contains]->(r) \
         WHERE b.$dtId = 'B1' AND r.name = 'Lab'",
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["f"]["$dtId"], "F2");
    assert_eq!(rows[0]["r"]["$dtId"], "R3");
    assert_eq!(rows[0].as_object().map(|o| o.len()), Some(3));
    // Anchored on the last node: walked backwards.
    let result = page(
        &building(),
        "SELECT f FROM DIGITALTWINS MATCH (b)-[:contains]->(f)-[:contains]->(r) WHERE r.$dtId = 'R3'",
        &|_| true,
    );
    assert_eq!(ids_at(&result.values(), Some("f")), s(&["F2"]));
    assert!(result.charge < 1.05, "no scan: {}", result.charge);
}

#[test]
fn match_without_a_dtid_scans_from_every_twin() {
    assert_eq!(
        var_ids(
            "SELECT s FROM DIGITALTWINS MATCH (r)-[:hasSensor]->(s) WHERE s.online = true",
            "s"
        ),
        s(&["S1"])
    );
    assert_eq!(count("SELECT COUNT() FROM DIGITALTWINS MATCH ()-[]->()"), 8);
}

#[test]
fn undirected_match_lists_a_self_relationship_once() {
    let graph = GraphBuilder::new()
        .twin("A", ROOM, json!({}))
        .rel("A", "self", "A")
        .build();
    let result = page(
        &graph,
        "SELECT b FROM DIGITALTWINS MATCH (a)-[]-(b) WHERE a.$dtId = 'A'",
        &|_| true,
    );
    assert_eq!(result.items.len(), 1);
}

// ---- visibility ----

#[test]
fn hidden_twins_behave_as_if_absent() {
    let graph = building();
    let hide_f1 = |t: &Twin| &*t.id != "F1";
    let run_hidden = |text: &str| page(&graph, text, &hide_f1).values();
    assert_eq!(run_hidden("SELECT * FROM DIGITALTWINS").len(), 7);
    assert_eq!(
        run_hidden("SELECT COUNT() FROM DIGITALTWINS"),
        vec![json!({"COUNT": 7})]
    );
    assert!(run_hidden("SELECT * FROM DIGITALTWINS WHERE $dtId = 'F1'").is_empty());
    assert_eq!(
        ids_at(
            &run_hidden(
                "SELECT C FROM DIGITALTWINS T JOIN C RELATED T.contains WHERE T.$dtId = 'B1'"
            ),
            Some("C")
        ),
        s(&["F2"])
    );
    assert_eq!(
        ids_at(
            &run_hidden("SELECT b FROM DIGITALTWINS MATCH (a)-[*2]->(b) WHERE a.$dtId = 'B1'"),
            Some("b")
        ),
        s(&["R3"])
    );
    assert_eq!(
        run_hidden("SELECT COUNT() FROM RELATIONSHIPS"),
        vec![json!({"COUNT": 5})]
    );
    assert!(run_hidden("SELECT * FROM RELATIONSHIPS WHERE $sourceId = 'F1'").is_empty());
    assert!(run_hidden("SELECT * FROM RELATIONSHIPS WHERE $targetId = 'F1'").is_empty());
}

// ---- paging ----

fn many_twins(n: usize) -> Graph {
    let mut builder = GraphBuilder::new();
    for i in 0..n {
        builder = builder.twin(&format!("t{i:04}"), ROOM, json!({"n": i}));
    }
    builder.build()
}

fn all_pages(graph: &Graph, text: &str, page_size: usize) -> (Vec<Value>, usize) {
    let mut request = QueryRequest::Text(text);
    let mut token;
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let result = run(graph, request, page_size, &|_| true).unwrap();
        pages += 1;
        all.extend(result.values());
        match result.continuation {
            Some(t) => {
                token = t;
                request = QueryRequest::Continuation(&token);
            }
            None => return (all, pages),
        }
        assert!(pages < 1_000, "paging does not end");
    }
}

#[test]
fn continuation_tokens_page_through_every_result_once() {
    let graph = many_twins(250);
    let (items, pages) = all_pages(&graph, "SELECT * FROM DIGITALTWINS", 100);
    assert_eq!(pages, 3);
    let mut ids = ids_at(&items, None);
    ids.dedup();
    assert_eq!(ids.len(), 250);
    let (items, pages) = all_pages(&graph, "SELECT * FROM DIGITALTWINS", 50);
    assert_eq!((items.len(), pages), (250, 5), "no empty last page");
    let (items, pages) = all_pages(&graph, "SELECT TOP(150) T.n FROM DIGITALTWINS T", 100);
    assert_eq!((items.len(), pages), (150, 2));
    let (items, pages) = all_pages(
        &graph,
        "SELECT COUNT() FROM DIGITALTWINS WHERE n >= 200",
        10,
    );
    assert_eq!((items, pages), (vec![json!({"COUNT": 50})], 1));
}

#[test]
fn continuation_tokens_round_trip_and_bad_ones_are_errors() {
    let token = continuation_token("SELECT * FROM DIGITALTWINS", 42);
    assert!(
        token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    );
    assert_eq!(
        decode_continuation(&token).unwrap(),
        ("SELECT * FROM DIGITALTWINS".into(), 42)
    );
    for bad in [
        "",
        "!!!",
        "bm90IGpzb24",
        "eyJxIjoxfQ",
        "eyJxIjoiYSIsIm8iOjEsIngiOjF9",
    ] {
        let e = decode_continuation(bad).unwrap_err();
        assert_eq!(e.kind, QueryErrorKind::InvalidContinuation, "{bad}");
    }
    let huge = "A".repeat(10_000_000);
    assert!(decode_continuation(&huge).is_err());
    let e = run(
        &building(),
        QueryRequest::Continuation("garbage"),
        10,
        &|_| true,
    )
    .unwrap_err();
    assert_eq!(e.code(), twinguard_proto::ErrorCode::BadRequest);
}

// ---- work budget ----

fn complete_graph(n: usize) -> Graph {
    let mut builder = GraphBuilder::new();
    for i in 0..n {
        builder = builder.twin(&format!("n{i}"), ROOM, json!({}));
    }
    for i in 0..n {
        for j in 0..n {
            if i != j {
                builder = builder.rel(&format!("n{i}"), "r", &format!("n{j}"));
            }
        }
    }
    builder.build()
}

#[test]
fn a_hostile_traversal_stops_at_the_work_budget() {
    let graph = complete_graph(20);
    let text = "SELECT COUNT() FROM DIGITALTWINS MATCH (a)-[*10]-(b)";
    let query = parse(text).unwrap();
    let e = execute_with_budget(&graph, &query, text, 0, 100, &|_| true, 200_000).unwrap_err();
    assert_eq!(e.kind, QueryErrorKind::WorkLimitExceeded);
    assert_eq!(e.code(), twinguard_proto::ErrorCode::QueryLimitExceeded);
}

#[test]
fn a_query_within_the_budget_is_not_stopped() {
    let graph = complete_graph(5);
    let text = "SELECT COUNT() FROM DIGITALTWINS MATCH (a)-[*..4]->(b) WHERE a.$dtId = 'n0'";
    assert_eq!(
        page(&graph, text, &|_| true).values(),
        vec![json!({"COUNT": 4})]
    );
}

#[test]
fn multi_hop_walks_traverse_each_relationship_once_and_end_on_cycles() {
    let graph = GraphBuilder::new()
        .twin("A", ROOM, json!({}))
        .twin("B", ROOM, json!({}))
        .twin("C", ROOM, json!({}))
        .rel("A", "next", "B")
        .rel("B", "next", "C")
        .rel("C", "next", "A")
        .build();
    let reached = |pattern: &str| {
        let text = format!("SELECT b FROM DIGITALTWINS MATCH {pattern} WHERE a.$dtId = 'A'");
        ids_at(&page(&graph, &text, &|_| true).values(), Some("b"))
    };
    assert_eq!(reached("(a)-[*..10]->(b)"), s(&["B", "C"]));
    assert_eq!(reached("(a)-[*..10]-(b)"), s(&["B", "C"]));
    assert_eq!(
        reached("(a)-[*3]->(b)"),
        Vec::<String>::new(),
        "the start is not re-entered"
    );
    assert_eq!(reached("(a)<-[*2]-(b)"), s(&["B"]));
}

#[test]
fn pages_can_end_in_the_middle_of_a_join_expansion() {
    let graph = building();
    let text = "SELECT R FROM DIGITALTWINS B JOIN F RELATED B.contains JOIN R RELATED F.contains \
                WHERE B.$dtId = 'B1'";
    let (items, pages) = all_pages(&graph, text, 1);
    assert_eq!(pages, 3);
    assert_eq!(ids_at(&items, Some("R")), s(&["R1", "R2", "R3"]));
}
