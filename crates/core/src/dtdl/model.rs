//! The compiled form of a DTDL interface: what the twin graph needs to validate writes and answer
//! `IS_OF_MODEL`. Inherited contents are flattened in; components carry their own interface, so a
//! compiled [`Interface`] is self-contained.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use crate::dtmi::Dtmi;

#[derive(Debug, Clone, PartialEq)]
pub struct Interface {
    pub id: Dtmi,
    /// 2 or 3, from the `@context`.
    pub dtdl_version: u8,
    /// Direct parents, in declaration order.
    pub extends: Vec<Dtmi>,
    /// Levels of `extends` above this interface (0 when it extends nothing).
    pub extends_depth: usize,
    /// The work its compilation took, in entries copied: its parents' contents, relationship
    /// properties and ancestors, and its own contents. It bounds the entries it holds (schemas
    /// and component interfaces are shared, not copied) and is what compiling it again at
    /// start-up costs; the server bounds the sum over stored models (`docs/dtdl.md`).
    pub expanded_size: usize,
    /// Every interface this one extends, directly or not; never contains `id` itself.
    pub ancestors: BTreeSet<Dtmi>,
    /// Own and inherited contents, by name.
    pub properties: BTreeMap<String, Property>,
    pub telemetry: BTreeMap<String, Telemetry>,
    pub commands: BTreeMap<String, Command>,
    pub relationships: BTreeMap<String, Relationship>,
    pub components: BTreeMap<String, Component>,
}

impl Interface {
    /// True when this interface is `model` or extends it.
    pub fn is_a(&self, model: &Dtmi) -> bool {
        &self.id == model || self.ancestors.contains(model)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub name: String,
    pub schema: Arc<Schema>,
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub name: String,
    pub schema: Arc<Schema>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub name: String,
    pub request: Option<Arc<Schema>>,
    pub response: Option<Arc<Schema>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relationship {
    pub name: String,
    /// The interface the target twin must be (or extend); `None` means any.
    pub target: Option<Dtmi>,
    pub min_multiplicity: Option<u32>,
    pub max_multiplicity: Option<u32>,
    pub writable: bool,
    pub properties: BTreeMap<String, Property>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub name: String,
    pub schema: Arc<Interface>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Primitive {
    Boolean,
    Date,
    DateTime,
    Double,
    Duration,
    Float,
    Integer,
    Long,
    String,
    Time,
    // DTDL v3 additions.
    Byte,
    Bytes,
    Decimal,
    Short,
    Uuid,
    UnsignedByte,
    UnsignedShort,
    UnsignedInteger,
    UnsignedLong,
    // Geospatial schemas (GeoJSON objects).
    Point,
    MultiPoint,
    LineString,
    MultiLineString,
    Polygon,
    MultiPolygon,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnumValue {
    pub name: String,
    /// An integer or a string, per the enum's `valueSchema`.
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub schema: Arc<Schema>,
}

/// A schema. Named schemas are compiled once and shared (`Arc`) by every use, so a schema
/// referenced many times, or inherited by many interfaces, is held once.
#[derive(Debug, Clone, PartialEq)]
pub enum Schema {
    Primitive(Primitive),
    Array(Arc<Schema>),
    Enum {
        value_schema: Primitive,
        values: Vec<EnumValue>,
    },
    Map {
        key: Primitive,
        value: Arc<Schema>,
    },
    Object {
        fields: Vec<Field>,
    },
}
