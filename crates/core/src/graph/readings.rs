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
/// adds `records` to the commit.
pub(crate) fn apply(
    graph: &mut Graph,
    updates: Vec<PropertyUpdate>,
    records: Vec<Mutation>,
    ctx: &WriteContext,
    muts: &mut Vec<Mutation>,
) -> Vec<Result<(), Skipped>> {
    let mut results = Vec::with_capacity(updates.len());
    for update in updates {
        results.push(apply_one(graph, update, ctx, muts));
    }
    muts.extend(records);
    results
}

fn apply_one(
    graph: &mut Graph,
    update: PropertyUpdate,
    ctx: &WriteContext,
    muts: &mut Vec<Mutation>,
) -> Result<(), Skipped> {
    let twin = graph
        .twin(&update.twin)
        .cloned()
        .ok_or(Skipped::TwinMissing)?;
    let iface = graph
        .model(&twin.model)
        .map(|m| m.interface.clone())
        .ok_or(Skipped::TwinMissing)?;
    let property = iface
        .properties
        .get(&update.name)
        .ok_or(Skipped::NotAProperty)?;
    let mut doc = twin.doc();
    let changed = match &update.value {
        Some(value) => {
            property.schema.check(value).map_err(|_| Skipped::Schema)?;
            let changed = doc.get(&update.name) != Some(value);
            doc.insert(update.name.clone(), value.clone());
            changed
        }
        None => false,
    };
    let Some(Value::Object(metadata)) = doc.get_mut("$metadata") else {
        return Err(Skipped::TwinMissing);
    };
    let previous = metadata.get(&update.name).and_then(Value::as_object);
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
    metadata.insert(update.name, Value::Object(meta));
    metadata.insert("$lastUpdateTime".into(), Value::String(ctx.now.clone()));
    doc.insert("$etag".into(), Value::String(ctx.new_etag()));
    let twin = Twin::from_doc(&doc).ok_or(Skipped::TwinMissing)?;
    graph.put_twin(Arc::new(twin), muts);
    Ok(())
}
