//! The DTDL vocabulary: context terms, metamodel classes and properties, semantic types and units.
//!
//! Term tables are extracted from the official JSON-LD contexts (`data/terms.*.txt`) and unit
//! tables from the language specifications (`data/units.*.txt`).

use std::collections::HashMap;
use std::sync::OnceLock;

use super::Primitive;

/// A context a document can name in `@context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Context {
    Dtdl2,
    Dtdl3,
    IotCentral,
    Annotation,
    Historization,
    Mqtt,
    Overriding,
    QuantitativeTypes,
}

impl Context {
    /// The context a DTMI names, if the parser defines it for `version`.
    pub(super) fn lookup(id: &str, version: u8) -> Option<Context> {
        match (id, version) {
            ("dtmi:dtdl:context;2", 2) => Some(Context::Dtdl2),
            ("dtmi:dtdl:context;3", 3) => Some(Context::Dtdl3),
            ("dtmi:iotcentral:context;2", 2) => Some(Context::IotCentral),
            ("dtmi:dtdl:extension:annotation;1", 3) => Some(Context::Annotation),
            ("dtmi:dtdl:extension:historization;1", 3) => Some(Context::Historization),
            ("dtmi:dtdl:extension:mqtt;1", 3) => Some(Context::Mqtt),
            ("dtmi:dtdl:extension:overriding;1", 3) => Some(Context::Overriding),
            ("dtmi:dtdl:extension:quantitativeTypes;1", 3) => Some(Context::QuantitativeTypes),
            _ => None,
        }
    }

    fn table(self) -> &'static HashMap<&'static str, &'static str> {
        static TABLES: OnceLock<Vec<HashMap<&'static str, &'static str>>> = OnceLock::new();
        let tables = TABLES.get_or_init(|| {
            [
                include_str!("data/terms.v2.txt"),
                include_str!("data/terms.v3.txt"),
                include_str!("data/terms.iotcentral.txt"),
                include_str!("data/terms.annotation.txt"),
                include_str!("data/terms.historization.txt"),
                include_str!("data/terms.mqtt.txt"),
                include_str!("data/terms.overriding.txt"),
                include_str!("data/terms.quantitativeTypes.txt"),
            ]
            .iter()
            .map(|text| {
                text.lines()
                    .filter_map(|line| line.split_once(' '))
                    .collect()
            })
            .collect()
        });
        let index = match self {
            Context::Dtdl2 => 0,
            Context::Dtdl3 => 1,
            Context::IotCentral => 2,
            Context::Annotation => 3,
            Context::Historization => 4,
            Context::Mqtt => 5,
            Context::Overriding => 6,
            Context::QuantitativeTypes => 7,
        };
        &tables[index]
    }

    pub(super) fn term(self, term: &str) -> Option<&'static str> {
        self.table().get(term).copied()
    }
}

/// The concrete metamodel classes an element can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Class {
    Interface,
    Telemetry,
    Property,
    Command,
    Relationship,
    Component,
    CommandPayload,
    CommandRequest,
    CommandResponse,
    Array,
    Enum,
    EnumValue,
    Map,
    MapKey,
    MapValue,
    Object,
    Field,
}

impl Class {
    fn from_name(name: &str, version: u8) -> Option<Class> {
        Some(match name {
            "Interface" => Class::Interface,
            "Telemetry" => Class::Telemetry,
            "Property" => Class::Property,
            "Command" => Class::Command,
            "Relationship" => Class::Relationship,
            "Component" => Class::Component,
            "CommandPayload" if version == 2 => Class::CommandPayload,
            "CommandRequest" if version >= 3 => Class::CommandRequest,
            "CommandResponse" if version >= 3 => Class::CommandResponse,
            "Array" => Class::Array,
            "Enum" => Class::Enum,
            "EnumValue" => Class::EnumValue,
            "Map" => Class::Map,
            "MapKey" => Class::MapKey,
            "MapValue" => Class::MapValue,
            "Object" => Class::Object,
            "Field" => Class::Field,
            _ => return None,
        })
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Class::Interface => "Interface",
            Class::Telemetry => "Telemetry",
            Class::Property => "Property",
            Class::Command => "Command",
            Class::Relationship => "Relationship",
            Class::Component => "Component",
            Class::CommandPayload => "CommandPayload",
            Class::CommandRequest => "CommandRequest",
            Class::CommandResponse => "CommandResponse",
            Class::Array => "Array",
            Class::Enum => "Enum",
            Class::EnumValue => "EnumValue",
            Class::Map => "Map",
            Class::MapKey => "MapKey",
            Class::MapValue => "MapValue",
            Class::Object => "Object",
            Class::Field => "Field",
        }
    }

    /// Whether `@type` may be omitted (the class is then implied by the property).
    pub(super) fn type_optional(self) -> bool {
        matches!(
            self,
            Class::CommandPayload
                | Class::CommandRequest
                | Class::CommandResponse
                | Class::EnumValue
                | Class::MapKey
                | Class::MapValue
                | Class::Field
        )
    }

    pub(super) fn is_complex_schema(self) -> bool {
        matches!(
            self,
            Class::Array | Class::Enum | Class::Map | Class::Object
        )
    }

    /// Whether semantic types (and thus `unit`) may co-type this class.
    pub(super) fn takes_semantic_type(self, version: u8) -> bool {
        match version {
            2 => matches!(self, Class::Property | Class::Telemetry),
            _ => matches!(
                self,
                Class::Property
                    | Class::Telemetry
                    | Class::CommandRequest
                    | Class::CommandResponse
                    | Class::Field
                    | Class::MapValue
            ),
        }
    }
}

/// What an IRI (from a term or written out) denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Iri {
    Class(Class),
    Property(&'static str),
    Primitive(Primitive),
    CommandType,
    SemanticType(&'static str),
    Unit(&'static str),
    /// An extension's adjunct type (e.g. `Historized`).
    Adjunct,
    /// Anything else: valid, but not meaningful where it appears.
    Other,
}

/// Classifies an IRI for a document of `version`; `quantitative` says whether the
/// QuantitativeTypes extension is in scope.
pub(super) fn classify(iri: &str, version: u8, quantitative: bool) -> Iri {
    if version == 2 {
        if let Some(rest) = iri.strip_suffix(";2") {
            if let Some(name) = rest.strip_prefix("dtmi:dtdl:class:") {
                return Class::from_name(name, 2).map_or(Iri::Other, Iri::Class);
            }
            if let Some(name) = rest.strip_prefix("dtmi:dtdl:property:") {
                return property_name(name).map_or(Iri::Other, Iri::Property);
            }
            if let Some(name) = rest.strip_prefix("dtmi:dtdl:instance:Schema:") {
                return primitive(name, 2).map_or(Iri::Other, Iri::Primitive);
            }
            if let Some(name) = rest.strip_prefix("dtmi:standard:schema:geospatial:") {
                return primitive(name, 2).map_or(Iri::Other, Iri::Primitive);
            }
            if rest.starts_with("dtmi:dtdl:instance:CommandType:") {
                return Iri::CommandType;
            }
            if let Some(name) = rest.strip_prefix("dtmi:standard:class:") {
                return semantic_type(name, 2).map_or(Iri::Other, Iri::SemanticType);
            }
            if let Some(name) = rest.strip_prefix("dtmi:standard:unit:") {
                return unit(name, 2).map_or(Iri::Other, Iri::Unit);
            }
        }
        return Iri::Other;
    }
    if let Some(rest) = iri.strip_suffix(";3") {
        if let Some(name) = rest.strip_prefix("dtmi:dtdl:class:") {
            return Class::from_name(name, 3).map_or(Iri::Other, Iri::Class);
        }
        if let Some(name) = rest.strip_prefix("dtmi:dtdl:property:") {
            return property_name(name)
                .filter(|n| *n != "unit")
                .map_or(Iri::Other, Iri::Property);
        }
        if let Some(name) = rest.strip_prefix("dtmi:dtdl:instance:Schema:") {
            return primitive(name, 3).map_or(Iri::Other, Iri::Primitive);
        }
        if let Some(name) = rest.strip_prefix("dtmi:standard:schema:geospatial:") {
            return primitive(name, 3).map_or(Iri::Other, Iri::Primitive);
        }
        if rest.starts_with("dtmi:dtdl:instance:CommandType:") {
            return Iri::CommandType;
        }
        return Iri::Other;
    }
    if let Some(rest) = iri.strip_prefix("dtmi:dtdl:extension:quantitativeTypes:v1:") {
        if !quantitative {
            return Iri::Other;
        }
        if let Some(name) = rest.strip_prefix("class:") {
            return semantic_type(name, 3).map_or(Iri::Other, Iri::SemanticType);
        }
        if let Some(name) = rest.strip_prefix("unit:") {
            return unit(name, 3).map_or(Iri::Other, Iri::Unit);
        }
        if rest == "property:unit" {
            return Iri::Property("unit");
        }
        return Iri::Other;
    }
    if matches!(
        iri,
        "dtmi:dtdl:extension:historization:v1:Historized"
            | "dtmi:dtdl:extension:annotation:v1:ValueAnnotation"
            | "dtmi:dtdl:extension:overriding:v1:Override"
    ) {
        return Iri::Adjunct;
    }
    Iri::Other
}

const PROPERTY_NAMES: &[&str] = &[
    "comment",
    "commandType",
    "contents",
    "description",
    "displayName",
    "elementSchema",
    "enumValue",
    "enumValues",
    "extends",
    "fields",
    "mapKey",
    "mapValue",
    "maxMultiplicity",
    "minMultiplicity",
    "name",
    "properties",
    "request",
    "response",
    "schema",
    "schemas",
    "target",
    "unit",
    "valueSchema",
    "writable",
];

fn property_name(name: &str) -> Option<&'static str> {
    PROPERTY_NAMES.iter().copied().find(|n| *n == name)
}

pub(super) fn primitive(name: &str, _version: u8) -> Option<Primitive> {
    Some(match name {
        "boolean" => Primitive::Boolean,
        "date" => Primitive::Date,
        "dateTime" => Primitive::DateTime,
        "double" => Primitive::Double,
        "duration" => Primitive::Duration,
        "float" => Primitive::Float,
        "integer" => Primitive::Integer,
        "long" => Primitive::Long,
        "string" => Primitive::String,
        "time" => Primitive::Time,
        "point" => Primitive::Point,
        "multiPoint" => Primitive::MultiPoint,
        "lineString" => Primitive::LineString,
        "multiLineString" => Primitive::MultiLineString,
        "polygon" => Primitive::Polygon,
        "multiPolygon" => Primitive::MultiPolygon,
        _ => return None,
    })
}

/// One row of a semantic-type table: the semantic type, its unit type and its units.
struct SemanticRow {
    semantic: &'static str,
    units: Vec<&'static str>,
}

fn rows(version: u8) -> &'static [SemanticRow] {
    static V2: OnceLock<Vec<SemanticRow>> = OnceLock::new();
    static V3: OnceLock<Vec<SemanticRow>> = OnceLock::new();
    let (cell, text) = if version == 2 {
        (&V2, include_str!("data/units.v2.txt"))
    } else {
        (&V3, include_str!("data/units.v3.txt"))
    };
    cell.get_or_init(|| {
        text.lines()
            .filter_map(|line| {
                let mut words = line.split(' ');
                let semantic = words.next()?;
                let _unit_type = words.next()?;
                Some(SemanticRow {
                    semantic,
                    units: words.collect(),
                })
            })
            .collect()
    })
}

fn semantic_type(name: &str, version: u8) -> Option<&'static str> {
    rows(version)
        .iter()
        .map(|r| r.semantic)
        .find(|s| *s == name)
}

fn unit(name: &str, version: u8) -> Option<&'static str> {
    rows(version)
        .iter()
        .flat_map(|r| r.units.iter().copied())
        .find(|u| *u == name)
}

/// Whether `unit` is a unit of the unit type that goes with `semantic`.
pub(super) fn unit_fits(semantic: &str, unit: &str, version: u8) -> bool {
    rows(version)
        .iter()
        .any(|r| r.semantic == semantic && r.units.contains(&unit))
}
