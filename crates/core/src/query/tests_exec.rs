//! Execution tests over the fixture building: SELECT shapes, point lookups and WHERE semantics.

use serde_json::{Value, json};

use super::fixture::{ROOM, SENSOR};
use super::fixture::{building, count, ids, ids_at, items, page, s};

// ---- SELECT shapes ----

#[test]
fn select_star_returns_every_twin_document_as_is() {
    let graph = building();
    let result = page(&graph, "SELECT * FROM DIGITALTWINS", &|_| true);
    assert_eq!(result.items.len(), 8);
    assert!(result.continuation.is_none());
    let values = result.values();
    let r1 = values.iter().find(|i| i["$dtId"] == "R1").unwrap();
    assert_eq!(r1, &Value::Object(graph.twin("R1").unwrap().doc()));
}

#[test]
fn selecting_a_collection_wraps_each_document_under_its_name() {
    assert_eq!(
        items("SELECT T FROM DIGITALTWINS T WHERE T.$dtId = 'B1'"),
        vec![json!({
            "T": {"$dtId": "B1", "$etag": "W/\"B1\"", "$metadata": {"$model": "dtmi:test:Building;1"},
                  "name": "HQ", "open": true}
        })]
    );
}

#[test]
fn projected_properties_that_are_missing_are_left_out() {
    let mut rows = items(
        "SELECT T.$dtId, T.temperature AS t, T.thermostat.setpoint FROM DIGITALTWINS T WHERE IS_OF_MODEL('dtmi:test:Room;1')",
    );
    rows.sort_by_key(|r| r["$dtId"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        rows,
        vec![
            json!({"$dtId": "R1", "t": 21, "setpoint": 20.5}),
            json!({"$dtId": "R2", "t": 25.5}),
            json!({"$dtId": "R3", "t": "hot"}),
        ]
    );
    assert_eq!(
        items("SELECT missing FROM DIGITALTWINS WHERE $dtId = 'B1'"),
        vec![json!({})]
    );
    assert_eq!(
        items("SELECT T.$metadata FROM DIGITALTWINS T WHERE T.$dtId = 'F1'"),
        vec![json!({"$metadata": {"$model": "dtmi:test:Floor;1"}})]
    );
}

#[test]
fn top_limits_the_rows_and_count_counts_them() {
    assert_eq!(items("SELECT TOP(3) FROM DIGITALTWINS").len(), 3);
    assert_eq!(items("SELECT TOP(3) T.name FROM DIGITALTWINS T").len(), 3);
    assert_eq!(items("SELECT TOP(0) FROM DIGITALTWINS").len(), 0);
    assert_eq!(items("SELECT TOP(100) FROM DIGITALTWINS").len(), 8);
    assert_eq!(count("SELECT COUNT() FROM DIGITALTWINS"), 8);
    assert_eq!(count("SELECT COUNT() FROM RELATIONSHIPS"), 8);
    assert_eq!(
        count("SELECT COUNT() FROM DIGITALTWINS WHERE IS_OF_MODEL('dtmi:test:Room;1')"),
        3
    );
    assert_eq!(
        count("SELECT COUNT() FROM DIGITALTWINS WHERE $dtId = 'nope'"),
        0
    );
    assert_eq!(
        items(
            "SELECT COUNT() AS n FROM DIGITALTWINS B JOIN F RELATED B.contains JOIN R RELATED F.contains"
        ),
        vec![json!({"n": 3})]
    );
}

// ---- point lookups and charge ----

#[test]
fn dtid_equality_is_a_point_lookup_in_every_spelling() {
    for text in [
        "SELECT * FROM DIGITALTWINS WHERE $dtId = 'R1'",
        "SELECT * FROM DIGITALTWINS T WHERE T.$dtId = 'R1'",
        "SELECT * FROM DIGITALTWINS T WHERE 'R1' = T.$dtId AND T.name = 'Lobby'",
    ] {
        let result = page(&building(), text, &|_| true);
        assert_eq!(ids_at(&result.values(), None), s(&["R1"]), "{text}");
        assert_eq!(result.charge, 1.01, "one twin examined: {text}");
    }
    let result = page(
        &building(),
        "SELECT * FROM DIGITALTWINS WHERE $dtId IN ['R2', 'nope', 'R1', 'R2']",
        &|_| true,
    );
    assert_eq!(ids_at(&result.values(), None), s(&["R1", "R2"]));
    assert_eq!(result.charge, 1.03, "duplicates are looked up once");
}

#[test]
fn the_charge_counts_what_a_scan_examines() {
    let result = page(
        &building(),
        "SELECT * FROM DIGITALTWINS WHERE name = 'HQ'",
        &|_| true,
    );
    assert_eq!(result.charge, 1.08);
}

#[test]
fn dtid_conditions_under_or_or_not_do_not_anchor_and_stay_correct() {
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE $dtId = 'R1' OR $dtId = 'F1'"),
        s(&["F1", "R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE NOT $dtId != 'R1'"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE $dtId NIN ['R1', 'R2', 'R3', 'S1', 'S2']"),
        s(&["B1", "F1", "F2"])
    );
}

// ---- WHERE semantics ----

#[test]
fn comparisons_across_types_and_missing_properties_are_undefined() {
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE temperature > 22"),
        s(&["R2"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE temperature != 21"),
        s(&["R2"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE NOT temperature = 21"),
        s(&["R2"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE temperature = 'hot'"),
        s(&["R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE temperature > 100 OR name = 'HQ'"),
        s(&["B1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE level = 0.0"),
        s(&["F1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE level >= 1"),
        s(&["F2"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE level <= 0 AND level < 1"),
        s(&["F1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE name < 'M'"),
        s(&["B1", "F1", "F2", "R1", "R3"])
    );
    assert_eq!(ids("SELECT * FROM DIGITALTWINS WHERE open"), s(&["B1"]));
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE online = false"),
        s(&["S2"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE owner = null"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE T.thermostat.setpoint = 20.5"),
        Vec::<String>::new(),
        "T is a property here"
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE thermostat.setpoint = 20.5"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE $metadata.$model = 'dtmi:test:Room;1'"),
        s(&["R1", "R2", "R3"])
    );
}

#[test]
fn in_and_nin_match_by_value_and_skip_undefined() {
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE temperature IN [21, 'hot']"),
        s(&["R1", "R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE temperature IN [21.0]"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE temperature NIN [21]"),
        s(&["R2", "R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE temperature NOT IN [21]"),
        s(&["R2", "R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE name IN []"),
        Vec::<String>::new()
    );
}

#[test]
fn type_functions_check_the_json_type() {
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_DEFINED(owner)"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_NULL(owner)"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS T WHERE NOT IS_NULL(T.owner)").len(),
        7
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_BOOL(open)"),
        s(&["B1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_NUMBER(temperature)"),
        s(&["R1", "R2"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_STRING(temperature)"),
        s(&["R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_OBJECT(thermostat)"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_PRIMITIVE(temperature)"),
        s(&["R1", "R2", "R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_PRIMITIVE(owner)"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_PRIMITIVE(tags)"),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(
            "SELECT * FROM DIGITALTWINS WHERE IS_OBJECT(thermostat) AND NOT IS_DEFINED(thermostat.reading)"
        ),
        s(&["R1"])
    );
}

#[test]
fn string_functions_need_two_strings() {
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS T WHERE STARTSWITH(T.$dtId, 'R')"),
        s(&["R1", "R2", "R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE ENDSWITH(name, 'b')"),
        s(&["R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE CONTAINS(name, 'ff')"),
        s(&["R2"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE STARTSWITH(level, '0')"),
        Vec::<String>::new()
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE NOT STARTSWITH(temperature, 'h')"),
        Vec::<String>::new()
    );
}

#[test]
fn array_contains_looks_at_top_level_items() {
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE ARRAY_CONTAINS(tags, 'private')"),
        s(&["R2"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE ARRAY_CONTAINS(tags, 3)"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE ARRAY_CONTAINS(tags, 3.0)"),
        s(&["R1"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE ARRAY_CONTAINS(name, 'L')"),
        Vec::<String>::new()
    );
}

#[test]
fn is_of_model_follows_inheritance_unless_exact() {
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_OF_MODEL('dtmi:test:Space;1')"),
        s(&["R1", "R2", "R3"])
    );
    assert_eq!(
        ids("SELECT * FROM DIGITALTWINS WHERE IS_OF_MODEL('dtmi:test:Space;1', exact)"),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&format!(
            "SELECT * FROM DIGITALTWINS T WHERE IS_OF_MODEL(T, '{ROOM}', exact)"
        )),
        s(&["R1", "R2", "R3"])
    );
    assert_eq!(
        ids(&format!(
            "SELECT * FROM DIGITALTWINS WHERE IS_OF_MODEL('{SENSOR}')"
        )),
        s(&["S1", "S2"])
    );
}
