//! The write that moves twins from sensor data. The telemetry pipeline decides what each
//! property should show (value, source time, quality, sources) and hands the decisions here with
//! the records that go with them (replay windows, history, quarantine), so that all of it is
//! committed in one durable transaction: a reading is never applied without its replay state,
//! nor recorded as accepted without being applied.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Graph;
use super::ops::WriteContext;
use super::types::Twin;
use crate::dtdl::Interface;
use crate::store::Mutation;

/// How far a property's value can be trusted (control DI-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// From verified readings that passed every check (or the fused value of a sensor group
    /// with quorum).
    Good,
    /// From readings that passed, but the sources disagree or one of them is suspect.
    Suspect,
    /// A forecast from history, shown because the inputs are stale or lack quorum.
    Estimated,
    /// The last value, older than the property's staleness limit, with no forecast to offer.
    Stale,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Suspect => "suspect",
            Self::Estimated => "estimated",
            Self::Stale => "stale",
        }
    }
}

/// What one property of one twin should now show.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyUpdate {
    pub twin: String,
    pub name: String,
    /// The new value; `None` keeps the current one and changes only its quality and sources.
    pub value: Option<Value>,
    /// RFC 3339 time the value was measured (or forecast for).
    pub source_time: Option<String>,
    pub quality: Quality,
    /// The devices the value came from.
    pub sources: Vec<String>,
}

/// Why an update was not applied; the pipeline keeps the reading in quarantine with this code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    TwinMissing,
    NotAProperty,
    Schema,
}

impl Skipped {
    pub fn code(self) -> &'static str {
        match self {
            Self::TwinMissing => "twin_missing",
            Self::NotAProperty => "not_a_property",
            Self::Schema => "schema",
        }
    }
}

/// Applies `updates` in order (each one that fits; the others are reported, never fatal) and
/// adds `records` to the commit. Each twin is parsed and written once however many of its
/// properties move.
pub(crate) fn apply(
    graph: &mut Graph,
    updates: Vec<PropertyUpdate>,
    records: Vec<Mutation>,
    ctx: &WriteContext,
    muts: &mut Vec<Mutation>,
) -> Vec<Result<(), Skipped>> {
    let mut results = vec![Ok(()); updates.len()];
    // The updates of each twin, in order, twins in the order they first appear.
    let mut twins: Vec<Vec<(usize, PropertyUpdate)>> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, update) in updates.into_iter().enumerate() {
        let slot = match index.get(&update.twin) {
            Some(&slot) => slot,
            None => {
                index.insert(update.twin.clone(), twins.len());
                twins.push(Vec::new());
                twins.len() - 1
            }
        };
        twins[slot].push((i, update));
    }
    for updates in twins {
        let Some(id) = updates.first().map(|(_, u)| u.twin.clone()) else {
            continue;
        };
        let target = graph.twin(&id).and_then(|twin| {
            let iface = graph.model(&twin.model)?.interface.clone();
            Some((twin.doc(), iface))
        });
        let Some((mut doc, iface)) = target else {
            for (i, _) in updates {
                results[i] = Err(Skipped::TwinMissing);
            }
            continue;
        };
        let mut moved = Vec::new();
        for (i, update) in updates {
            results[i] = update_doc(&mut doc, &iface, update, ctx);
            if results[i].is_ok() {
                moved.push(i);
            }
        }
        if moved.is_empty() {
            continue;
        }
        if let Some(Value::Object(metadata)) = doc.get_mut("$metadata") {
            metadata.insert("$lastUpdateTime".into(), Value::String(ctx.now.clone()));
        }
        doc.insert("$etag".into(), Value::String(ctx.new_etag()));
        match Twin::from_doc(&doc) {
            Some(twin) => graph.put_twin(Arc::new(twin), muts),
            None => {
                for i in moved {
                    results[i] = Err(Skipped::TwinMissing);
                }
            }
        }
    }
    muts.extend(records);
    results
}

/// Moves one property of a twin's document, with its `$metadata`.
fn update_doc(
    doc: &mut Map<String, Value>,
    iface: &Interface,
    update: PropertyUpdate,
    ctx: &WriteContext,
) -> Result<(), Skipped> {
    let property = iface
        .properties
        .get(&update.name)
        .ok_or(Skipped::NotAProperty)?;
    if let Some(value) = &update.value {
        property.schema.check(value).map_err(|_| Skipped::Schema)?;
    }
    let Some(Value::Object(metadata)) = doc.get("$metadata") else {
        return Err(Skipped::TwinMissing);
    };
    let previous = metadata.get(&update.name).and_then(Value::as_object);
    let changed = update
        .value
        .as_ref()
        .is_some_and(|value| doc.get(&update.name) != Some(value));
    let mut meta = Map::new();
    let last = match previous.and_then(|m| m.get("lastUpdateTime")) {
        Some(t) if !changed => t.clone(),
        _ => Value::String(ctx.now.clone()),
    };
    meta.insert("lastUpdateTime".into(), last);
    let source_time = update
        .source_time
        .map(Value::String)
        .or_else(|| previous.and_then(|m| m.get("sourceTime")).cloned());
    if let Some(t) = source_time {
        meta.insert("sourceTime".into(), t);
    }
    meta.insert(
        "quality".into(),
        Value::String(update.quality.as_str().into()),
    );
    meta.insert(
        "sources".into(),
        Value::Array(update.sources.into_iter().map(Value::String).collect()),
    );
    if let Some(value) = update.value {
        doc.insert(update.name.clone(), value);
    }
    if let Some(Value::Object(metadata)) = doc.get_mut("$metadata") {
        metadata.insert(update.name, Value::Object(meta));
    }
    Ok(())
}
