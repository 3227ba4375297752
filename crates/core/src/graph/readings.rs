//! The write that moves twins from sensor data. The telemetry pipeline decides what each
//! property should show (value, source time, quality, sources) and hands the decisions here with
//! the records that go with them (replay windows, history, quarantine), so that all of it is
//! committed in one durable transaction: a reading is never applied without its replay state,
//! nor recorded as accepted without being applied.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Graph;
use super::ops::WriteContext;
use super::types::{Id, Twin};
use crate::dtdl::Interface;
use crate::error::{DomainError, DomainResult};
use crate::store::{Mutation, Owner};

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

/// Whether every record is of a table that telemetry owns ([`crate::store::Table::owner`]).
pub(crate) fn telemetry_owns(records: &[Mutation]) -> bool {
    records.iter().all(|m| m.table.owner() == Owner::Telemetry)
}

/// Refuses a telemetry write that carries a record of a table telemetry does not own (the
/// graph's, whose records only the writer's own operations make, or an identity table): the
/// telemetry write must not be a way around the rules of the other writers.
pub(crate) fn check_records(records: &[Mutation]) -> DomainResult<()> {
    match records.iter().find(|m| m.table.owner() != Owner::Telemetry) {
        None => Ok(()),
        Some(m) => {
            tracing::error!(
                table = m.table.name(),
                "a telemetry write carried a record of a table telemetry does not own; refused"
            );
            Err(DomainError::Internal(
                "a telemetry write carried a record of a table telemetry does not own",
            ))
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
            Some((ctx.parsed.borrow_mut().take(twin), iface))
        });
        let Some((mut doc, iface)) = target else {
            for (i, _) in updates {
                results[i] = Err(Skipped::TwinMissing);
            }
            continue;
        };
        let mut moved = Vec::new();
        let mut patch = Vec::new();
        for (i, update) in updates {
            let change = update.value.clone().map(|value| {
                (
                    format!("/{}", update.name.replace('~', "~0").replace('/', "~1")),
                    value,
                )
            });
            results[i] = update_doc(&mut doc, &iface, update, ctx);
            if results[i].is_ok() {
                moved.push(i);
                if let Some((path, value)) = change {
                    patch.push(serde_json::json!({"op": "replace", "path": path, "value": value}));
                }
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
            Some(twin) => {
                let twin = Arc::new(twin);
                if !patch.is_empty() {
                    ctx.changes.borrow_mut().push(crate::feed::Change {
                        event_type: crate::feed::TWIN_UPDATE,
                        twin: id.clone(),
                        subject: id.clone(),
                        data: serde_json::json!({"modelId": twin.model.to_string(), "patch": patch}),
                        dataschema: Some(twin.model.to_string()),
                        component: None,
                        source_time: None,
                    });
                }
                ctx.parsed.borrow_mut().keep(&twin, doc);
                graph.put_twin(twin, muts);
            }
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

/// Twin documents kept parsed between commits for the twins that telemetry moves. A twin is
/// stored as JSON text, and parsing it back (and dropping the parse) was about half of what
/// applying readings cost when each commit carries a few readings per twin (measured in b2c9d96);
/// the writer keeps the document it has just written and takes it back at the twin's next
/// update.
///
/// A document is used only while the twin still has the etag it was kept with. Every change of
/// a twin gives it a fresh etag, so a twin changed by anything else since (an API write, a
/// commit that failed and was never published) is parsed again from its text.
#[derive(Default)]
pub(crate) struct ParsedTwins {
    docs: HashMap<Id, Kept>,
    /// The JSON text length of the kept documents, against [`ParsedTwins::BUDGET`].
    bytes: usize,
}

struct Kept {
    etag: String,
    len: usize,
    doc: Map<String, Value>,
}

impl std::fmt::Debug for ParsedTwins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedTwins")
            .field("twins", &self.docs.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl ParsedTwins {
    /// Most JSON text kept parsed (a parsed document takes a few times its text). When a new
    /// document would go over, everything kept is dropped: a fleet larger than the budget is
    /// parsed as if there were no cache, and memory stays bounded.
    const BUDGET: usize = 8 << 20;

    /// The twin's document: the kept one if it is still current, else parsed from its text.
    pub(crate) fn take(&mut self, twin: &Twin) -> Map<String, Value> {
        match self.docs.remove(&twin.id) {
            Some(kept) => {
                self.bytes -= kept.len;
                if kept.etag == twin.etag {
                    return kept.doc;
                }
                twin.doc()
            }
            None => twin.doc(),
        }
    }

    /// Keeps `doc`, the document `twin` was just built from, for the twin's next update.
    pub(crate) fn keep(&mut self, twin: &Twin, doc: Map<String, Value>) {
        let len = twin.json().get().len();
        if len > Self::BUDGET {
            return;
        }
        if self.bytes + len > Self::BUDGET {
            self.docs.clear();
            self.bytes = 0;
        }
        let kept = Kept {
            etag: twin.etag.clone(),
            len,
            doc,
        };
        self.bytes += len;
        if let Some(old) = self.docs.insert(twin.id.clone(), kept) {
            self.bytes -= old.len;
        }
    }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn twin(id: &str, etag: &str, extra: Value) -> Twin {
        let mut doc = json!({"$dtId": id, "$etag": etag, "$metadata": {"$model": "dtmi:t:T;1"}});
        doc["extra"] = extra;
        Twin::from_doc(doc.as_object().unwrap()).unwrap()
    }

    #[test]
    fn a_kept_document_is_used_only_while_its_twin_keeps_the_etag() {
        let mut parsed = ParsedTwins::default();
        let first = twin("a", "e1", json!(1));
        let mut doc = first.doc();
        doc.insert("marker".into(), json!("kept"));
        parsed.keep(&first, doc.clone());
        assert_eq!(parsed.take(&first), doc, "the kept document, not a parse");
        // Taken: a second take parses the text.
        assert_eq!(parsed.take(&first), first.doc());
        parsed.keep(&first, doc);
        let changed = twin("a", "e2", json!(2));
        assert_eq!(
            parsed.take(&changed),
            changed.doc(),
            "changed since: parsed"
        );
        assert_eq!((parsed.docs.len(), parsed.bytes), (0, 0));
    }

    #[test]
    fn kept_documents_stay_within_the_budget() {
        let mut parsed = ParsedTwins::default();
        let big = "x".repeat(ParsedTwins::BUDGET / 3);
        for i in 0..10 {
            let t = twin(&format!("t{i}"), "e", json!(big));
            parsed.keep(&t, t.doc());
            assert!(parsed.bytes <= ParsedTwins::BUDGET);
            assert_eq!(
                parsed.bytes,
                parsed.docs.values().map(|k| k.len).sum::<usize>()
            );
        }
        assert!(!parsed.docs.is_empty());
        // Keeping a twin again replaces its entry and its share of the budget.
        let t = twin("t9", "e", json!(1));
        parsed.keep(&t, t.doc());
        assert_eq!(
            parsed.bytes,
            parsed.docs.values().map(|k| k.len).sum::<usize>()
        );
        // A document bigger than the whole budget is not kept.
        let huge = twin("h", "e", json!("y".repeat(ParsedTwins::BUDGET + 1)));
        parsed.keep(&huge, huge.doc());
        assert!(!parsed.docs.contains_key("h"));
    }
}
