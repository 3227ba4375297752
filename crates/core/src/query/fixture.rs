//! A small twin graph for the query tests, built by writing the graph's fields directly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{QueryPage, execute, limits, parse};

use crate::dtdl::Interface;
use crate::dtmi::Dtmi;
use crate::graph::{Graph, Id, ModelEntry, Relationship, Twin};

pub(super) struct GraphBuilder {
    graph: Graph,
}

fn dtmi(s: &str) -> Dtmi {
    Dtmi::parse(s).unwrap()
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self {
            graph: Graph::default(),
        }
    }

    /// A model that extends every model in `ancestors`.
    pub fn model(mut self, id: &str, ancestors: &[&str]) -> Self {
        let interface = Interface {
            id: dtmi(id),
            dtdl_version: 3,
            extends: ancestors.iter().map(|a| dtmi(a)).collect(),
            extends_depth: usize::from(!ancestors.is_empty()),
            expanded_size: ancestors.len(),
            ancestors: ancestors.iter().map(|a| dtmi(a)).collect::<BTreeSet<_>>(),
            properties: BTreeMap::new(),
            telemetry: BTreeMap::new(),
            commands: BTreeMap::new(),
            relationships: BTreeMap::new(),
            components: BTreeMap::new(),
        };
        let entry = ModelEntry {
            id: dtmi(id),
            definition: json!({"@id": id}),
            upload_time: "2024-01-01T00:00:00Z".into(),
            decommissioned: false,
            interface: Arc::new(interface),
        };
        self.graph.models.insert(dtmi(id), Arc::new(entry));
        self
    }

    /// A twin whose document is `properties` plus `$dtId`, `$etag` and `$metadata.$model`.
    pub fn twin(mut self, id: &str, model: &str, properties: Value) -> Self {
        let mut doc = Map::new();
        doc.insert("$dtId".into(), json!(id));
        doc.insert("$etag".into(), json!(format!("W/\"{id}\"")));
        doc.insert("$metadata".into(), json!({"$model": model}));
        if let Value::Object(props) = properties {
            doc.extend(props);
        }
        let twin = Twin::from_doc(&doc).expect("fixture twin");
        self.graph.twins.insert(id.into(), Arc::new(twin));
        self
    }

    /// A relationship `source -name-> target` with ID `source-name-target`.
    pub fn rel(self, source: &str, name: &str, target: &str) -> Self {
        let id = format!("{source}-{name}-{target}");
        self.rel_with(&id, source, name, target, json!({}))
    }

    pub fn rel_with(
        mut self,
        id: &str,
        source: &str,
        name: &str,
        target: &str,
        properties: Value,
    ) -> Self {
        let mut doc = Map::new();
        doc.insert("$relationshipId".into(), json!(id));
        doc.insert("$sourceId".into(), json!(source));
        doc.insert("$targetId".into(), json!(target));
        doc.insert("$relationshipName".into(), json!(name));
        doc.insert("$etag".into(), json!(format!("W/\"{id}\"")));
        if let Value::Object(props) = properties {
            doc.extend(props);
        }
        let rel = Relationship::from_doc(&doc, None, None).expect("fixture relationship");
        let source_id: Id = source.into();
        let rel_id: Id = id.into();
        self.graph
            .outgoing
            .entry(source_id.clone())
            .or_default()
            .insert(Arc::new(rel));
        self.graph
            .incoming
            .entry(target.into())
            .or_default()
            .insert((source_id, rel_id));
        self.graph.relationship_count += 1;
        self
    }

    pub fn build(self) -> Graph {
        self.graph
    }
}

pub(super) const BUILDING: &str = "dtmi:test:Building;1";
pub(super) const FLOOR: &str = "dtmi:test:Floor;1";
pub(super) const SPACE: &str = "dtmi:test:Space;1";
pub(super) const ROOM: &str = "dtmi:test:Room;1";
pub(super) const SENSOR: &str = "dtmi:test:Sensor;1";

/// ```text
/// B1 -contains-> F1 -contains-> R1 -hasSensor-> S1 -feeds-> R2
///                   -contains-> R2
///    -contains-> F2 -contains-> R3 -hasSensor-> S2
/// ```
/// Room extends Space. R1 and R2 have numeric temperatures, R3 a string one.
pub(super) fn building() -> Graph {
    GraphBuilder::new()
        .model(SPACE, &[])
        .model(ROOM, &[SPACE])
        .twin("B1", BUILDING, json!({"name": "HQ", "open": true}))
        .twin("F1", FLOOR, json!({"name": "Ground", "level": 0}))
        .twin("F2", FLOOR, json!({"name": "First", "level": 1}))
        .twin(
            "R1",
            ROOM,
            json!({
                "name": "Lobby",
                "temperature": 21,
                "tags": ["public", "large", 3],
                "thermostat": {"setpoint": 20.5, "$metadata": {}},
                "owner": null
            }),
        )
        .twin(
            "R2",
            ROOM,
            json!({"name": "Office", "temperature": 25.5, "tags": ["private"]}),
        )
        .twin("R3", ROOM, json!({"name": "Lab", "temperature": "hot"}))
        .twin("S1", SENSOR, json!({"name": "s-one", "online": true}))
        .twin("S2", SENSOR, json!({"name": "s-two", "online": false}))
        .rel("B1", "contains", "F1")
        .rel("B1", "contains", "F2")
        .rel_with(
            "F1-contains-R1",
            "F1",
            "contains",
            "R1",
            json!({"since": 2020}),
        )
        .rel_with(
            "F1-contains-R2",
            "F1",
            "contains",
            "R2",
            json!({"since": 2022}),
        )
        .rel("F2", "contains", "R3")
        .rel("R1", "hasSensor", "S1")
        .rel("R3", "hasSensor", "S2")
        .rel("S1", "feeds", "R2")
        .build()
}

// ---- helpers for the execution tests ----

pub(super) fn page(graph: &Graph, text: &str, visible: &dyn Fn(&Twin) -> bool) -> QueryPage {
    let query = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    execute(graph, &query, text, 0, limits::MAX_PAGE_SIZE, visible)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

pub(super) fn items(text: &str) -> Vec<Value> {
    page(&building(), text, &|_| true).values()
}

/// The sorted `$dtId`s of the items, read at `key` (or the item itself).
pub(super) fn ids_at(items: &[Value], key: Option<&str>) -> Vec<String> {
    let mut ids: Vec<String> = items
        .iter()
        .map(|item| {
            let doc = key.map_or(item, |k| &item[k]);
            doc["$dtId"]
                .as_str()
                .unwrap_or_else(|| panic!("no $dtId in {item}"))
                .to_owned()
        })
        .collect();
    ids.sort();
    ids
}

pub(super) fn ids(text: &str) -> Vec<String> {
    ids_at(&items(text), None)
}

pub(super) fn var_ids(text: &str, var: &str) -> Vec<String> {
    ids_at(&items(text), Some(var))
}

pub(super) fn count(text: &str) -> u64 {
    let items = items(text);
    assert_eq!(items.len(), 1, "{items:?}");
    items[0]["COUNT"].as_u64().unwrap()
}

pub(super) fn s(list: &[&str]) -> Vec<String> {
    list.iter().map(|x| x.to_string()).collect()
}
