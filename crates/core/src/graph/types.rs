//! The twin graph's records. Twins and relationships keep their wire form (`doc`), the JSON object
//! ADT clients see, beside the few fields the server indexes by.

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::dtdl::Interface;
use crate::dtmi::Dtmi;

/// A twin ID or relationship ID: 1 to 128 characters, no control characters.
pub type Id = Arc<str>;

/// A twin. Its wire form is kept as serialized JSON: about a tenth of the memory of a parsed
/// `serde_json::Map` (whose B-tree nodes dominate), and GET sends it without re-serialising.
#[derive(Debug, Clone)]
pub struct Twin {
    pub id: Id,
    pub model: Dtmi,
    pub etag: String,
    /// The wire form: `$dtId`, `$etag`, `$metadata` (with `$model`, `$lastUpdateTime` and per
    /// property `lastUpdateTime`/`sourceTime`), properties and components.
    json: Box<RawValue>,
}

impl Twin {
    /// Builds a twin from its wire form; `None` if `$dtId`, `$etag` or `$metadata.$model` is
    /// missing or malformed.
    pub fn from_doc(doc: &Map<String, Value>) -> Option<Self> {
        let id: Id = Arc::from(doc.get("$dtId")?.as_str()?);
        let etag = doc.get("$etag")?.as_str()?.to_owned();
        let model = Dtmi::parse(doc.get("$metadata")?.get("$model")?.as_str()?).ok()?;
        Some(Self {
            id,
            model,
            etag,
            json: to_raw(doc)?,
        })
    }

    /// Rebuilds a twin from the JSON text [`Twin::json`] gave (as the store keeps it) without
    /// building the document: only the indexed fields are read, and the text is kept as it is.
    /// Start-up uses it; with paged reads of the store it took 63 MiB off the resident memory
    /// after restarting with a million twins (measured when it landed in 79fdd58).
    pub fn from_json(text: String) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Indexed<'a> {
            #[serde(rename = "$dtId", borrow)]
            id: std::borrow::Cow<'a, str>,
            #[serde(rename = "$etag", borrow)]
            etag: std::borrow::Cow<'a, str>,
            #[serde(rename = "$metadata", borrow)]
            metadata: Metadata<'a>,
        }
        #[derive(serde::Deserialize)]
        struct Metadata<'a> {
            #[serde(rename = "$model", borrow)]
            model: std::borrow::Cow<'a, str>,
        }
        let indexed: Indexed = serde_json::from_str(&text).ok()?;
        let (id, etag) = (Arc::from(indexed.id.as_ref()), indexed.etag.into_owned());
        let model = Dtmi::parse(&indexed.metadata.model).ok()?;
        Some(Self {
            id,
            model,
            etag,
            json: RawValue::from_string(text).ok()?,
        })
    }

    /// The wire form as JSON text.
    pub fn json(&self) -> &RawValue {
        &self.json
    }

    /// The wire form, parsed.
    pub fn doc(&self) -> Map<String, Value> {
        parse_object(&self.json)
    }
}

/// A relationship, kept like a [`Twin`] as serialized JSON beside its indexed fields.
#[derive(Debug, Clone)]
pub struct Relationship {
    pub id: Id,
    pub source: Id,
    pub target: Id,
    pub name: Arc<str>,
    pub etag: String,
    /// The wire form: `$relationshipId`, `$sourceId`, `$targetId`, `$relationshipName`, `$etag`
    /// and the relationship's properties.
    json: Box<RawValue>,
}

impl Relationship {
    /// Builds a relationship from its wire form; `None` if a system property is missing. The
    /// source and target IDs are taken from `source` and `target` when given, so the graph
    /// shares one allocation per twin ID.
    pub fn from_doc(
        doc: &Map<String, Value>,
        source: Option<&Id>,
        target: Option<&Id>,
    ) -> Option<Self> {
        let field = |name: &str| doc.get(name).and_then(Value::as_str);
        let share = |given: Option<&Id>, name: &str| -> Option<Id> {
            let text = field(name)?;
            Some(match given {
                Some(id) if id.as_ref() == text => id.clone(),
                _ => Arc::from(text),
            })
        };
        Some(Self {
            id: Arc::from(field("$relationshipId")?),
            source: share(source, "$sourceId")?,
            target: share(target, "$targetId")?,
            name: Arc::from(field("$relationshipName")?),
            etag: field("$etag")?.to_owned(),
            json: to_raw(doc)?,
        })
    }

    pub fn json(&self) -> &RawValue {
        &self.json
    }

    pub fn doc(&self) -> Map<String, Value> {
        parse_object(&self.json)
    }
}

fn to_raw(doc: &Map<String, Value>) -> Option<Box<RawValue>> {
    serde_json::value::to_raw_value(doc).ok()
}

/// Parses JSON this module wrote from a `Map`, so it is always an object; an empty map stands in
/// should that ever not hold.
fn parse_object(raw: &RawValue) -> Map<String, Value> {
    serde_json::from_str(raw.get()).unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub id: Dtmi,
    /// The DTDL document as uploaded.
    pub definition: Value,
    /// RFC 3339 upload time.
    pub upload_time: String,
    pub decommissioned: bool,
    pub interface: Arc<Interface>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRoute {
    pub id: String,
    pub endpoint_name: String,
    pub filter: String,
}
