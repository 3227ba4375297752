//! The twin graph's records. Twins and relationships keep their wire form (`doc`), the JSON object
//! ADT clients see, beside the few fields the server indexes by.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::dtdl::Interface;
use crate::dtmi::Dtmi;

/// A twin ID or relationship ID: 1 to 128 characters, no control characters.
pub type Id = Arc<str>;

#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    pub id: Id,
    pub model: Dtmi,
    pub etag: String,
    /// The wire form: `$dtId`, `$etag`, `$metadata` (with `$model`, `$lastUpdateTime` and per
    /// property `lastUpdateTime`/`sourceTime`), properties and components.
    pub doc: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relationship {
    pub id: Id,
    pub source: Id,
    pub target: Id,
    pub name: Arc<str>,
    pub etag: String,
    /// The wire form: `$relationshipId`, `$sourceId`, `$targetId`, `$relationshipName`, `$etag`
    /// and the relationship's properties.
    pub doc: Map<String, Value>,
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
