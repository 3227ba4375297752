//! Which properties each metamodel class has, and the shape of their values.

use super::Primitive;
use super::vocab::Class;

/// The shape of a property's value.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    /// A plain string; `name` adds the identifier pattern.
    Str {
        max: usize,
        name: bool,
    },
    /// A localizable string.
    Lang {
        max: usize,
    },
    Bool,
    Int,
    /// A DTMI (relationship `target`).
    Dtmi,
    /// Elements of the given classes, inline; `refs` allows DTMI references.
    Elements {
        classes: &'static [Class],
        refs: bool,
        min: usize,
        max: Option<usize>,
    },
    /// Any schema: primitive term, inline complex schema or reference.
    Schema,
    /// One of a fixed set of primitive schemas.
    PrimSchema(&'static [Primitive]),
    Unit,
    CommandType,
    /// An integer or string literal (`enumValue`).
    Literal,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct PropDef {
    pub name: &'static str,
    pub kind: Kind,
    pub required: bool,
}

const CONTENTS: &[Class] = &[
    Class::Telemetry,
    Class::Property,
    Class::Command,
    Class::Relationship,
    Class::Component,
];
const COMPLEX: &[Class] = &[Class::Array, Class::Enum, Class::Map, Class::Object];
const INTERFACE: &[Class] = &[Class::Interface];

fn def(name: &'static str, kind: Kind, required: bool) -> PropDef {
    PropDef {
        name,
        kind,
        required,
    }
}

fn one(classes: &'static [Class]) -> Kind {
    Kind::Elements {
        classes,
        refs: true,
        min: 0,
        max: Some(1),
    }
}

/// The properties of `class` in DTDL `version`; `semantic` says whether a semantic type co-types
/// the element (which brings `unit`).
pub(super) fn class_props(class: Class, version: u8, semantic: bool) -> Vec<PropDef> {
    let v2 = version == 2;
    let name_max = if v2 { 64 } else { 512 };
    let mut props = vec![
        def(
            "comment",
            Kind::Str {
                max: 512,
                name: false,
            },
            false,
        ),
        def("description", Kind::Lang { max: 512 }, false),
        def(
            "displayName",
            Kind::Lang {
                max: if v2 { 64 } else { 512 },
            },
            false,
        ),
    ];
    let name = def(
        "name",
        Kind::Str {
            max: name_max,
            name: true,
        },
        true,
    );
    let schema = def("schema", Kind::Schema, true);
    match class {
        Class::Interface => {
            props.push(def(
                "contents",
                Kind::Elements {
                    classes: CONTENTS,
                    refs: false,
                    min: 0,
                    max: None,
                },
                false,
            ));
            props.push(def(
                "extends",
                Kind::Elements {
                    classes: INTERFACE,
                    refs: true,
                    min: 0,
                    max: v2.then_some(2),
                },
                false,
            ));
            props.push(def(
                "schemas",
                Kind::Elements {
                    classes: COMPLEX,
                    refs: false,
                    min: 0,
                    max: None,
                },
                false,
            ));
        }
        Class::Telemetry => props.extend([name, schema]),
        Class::Property => {
            props.extend([name, schema, def("writable", Kind::Bool, false)]);
        }
        Class::Command => {
            props.push(name);
            props.push(def("commandType", Kind::CommandType, false));
            if v2 {
                props.push(def("request", one(&[Class::CommandPayload]), false));
                props.push(def("response", one(&[Class::CommandPayload]), false));
            } else {
                props.push(def("request", one(&[Class::CommandRequest]), false));
                props.push(def("response", one(&[Class::CommandResponse]), false));
            }
        }
        Class::Relationship => {
            props.extend([
                name,
                def("maxMultiplicity", Kind::Int, false),
                def("minMultiplicity", Kind::Int, false),
                def(
                    "properties",
                    Kind::Elements {
                        classes: &[Class::Property],
                        refs: true,
                        min: 0,
                        max: v2.then_some(300),
                    },
                    false,
                ),
                def("target", Kind::Dtmi, false),
                def("writable", Kind::Bool, false),
            ]);
        }
        Class::Component => {
            props.push(name);
            props.push(def(
                "schema",
                Kind::Elements {
                    classes: INTERFACE,
                    refs: true,
                    min: 0,
                    max: Some(1),
                },
                true,
            ));
        }
        Class::CommandPayload
        | Class::CommandRequest
        | Class::CommandResponse
        | Class::MapValue
        | Class::Field => props.extend([name, schema]),
        Class::Array => props.push(def("elementSchema", Kind::Schema, true)),
        Class::Enum => {
            props.push(def(
                "enumValues",
                Kind::Elements {
                    classes: &[Class::EnumValue],
                    refs: true,
                    min: usize::from(v2),
                    max: v2.then_some(100),
                },
                v2,
            ));
            props.push(def(
                "valueSchema",
                Kind::PrimSchema(&[Primitive::Integer, Primitive::String]),
                true,
            ));
        }
        Class::EnumValue => props.extend([name, def("enumValue", Kind::Literal, true)]),
        Class::Map => {
            props.push(def("mapKey", one(&[Class::MapKey]), true));
            props.push(def("mapValue", one(&[Class::MapValue]), true));
        }
        Class::MapKey => {
            props.push(name);
            props.push(def("schema", Kind::PrimSchema(&[Primitive::String]), true));
        }
        Class::Object => props.push(def(
            "fields",
            Kind::Elements {
                classes: &[Class::Field],
                refs: true,
                min: usize::from(v2),
                max: v2.then_some(30),
            },
            v2,
        )),
    }
    if semantic && class.takes_semantic_type(version) {
        props.push(def("unit", Kind::Unit, true));
    }
    props
}
