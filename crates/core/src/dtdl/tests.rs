//! Unit tests of `parse`: the basics of compilation. The conformance suite lives in
//! `tests/it/dtdl_conformance.rs`.

use std::sync::Arc;

use serde_json::{Value, json};

use super::*;

fn none(_: &Dtmi) -> Option<Arc<Interface>> {
    None
}

fn parse_strict(docs: &[Value]) -> Result<Vec<Arc<Interface>>, DtdlError> {
    parse(docs, &none, &ParseOptions::strict())
}

fn id(s: &str) -> Dtmi {
    Dtmi::parse(s).unwrap()
}

#[test]
fn interface_contents_are_compiled_by_kind() {
    let doc = json!({
        "@context": "dtmi:dtdl:context;3",
        "@id": "dtmi:ex:Thermostat;1",
        "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "target", "schema": "double", "writable": true},
            {"@type": "Telemetry", "name": "temp", "schema": "double"},
            {"@type": "Command", "name": "reboot", "request": {"name": "delay", "schema": "integer"}},
            {"@type": "Relationship", "name": "feeds", "target": "dtmi:ex:Room;1", "maxMultiplicity": 3}
        ]
    });
    let ifaces = parse_strict(&[doc]).unwrap();
    let t = &ifaces[0];
    assert_eq!(t.dtdl_version, 3);
    assert!(t.properties["target"].writable);
    assert_eq!(
        *t.telemetry["temp"].schema,
        Schema::Primitive(Primitive::Double)
    );
    assert_eq!(
        t.commands["reboot"].request.as_deref(),
        Some(&Schema::Primitive(Primitive::Integer))
    );
    assert_eq!(t.relationships["feeds"].target, Some(id("dtmi:ex:Room;1")));
    assert_eq!(t.relationships["feeds"].max_multiplicity, Some(3));
}

#[test]
fn inherited_contents_are_flattened_and_ancestors_are_transitive() {
    let docs = [
        json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:ex:A;1", "@type": "Interface",
               "contents": [{"@type": "Property", "name": "a", "schema": "string"}]}),
        json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:ex:B;1", "@type": "Interface",
               "extends": "dtmi:ex:A;1"}),
        json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:ex:C;1", "@type": "Interface",
               "extends": ["dtmi:ex:B;1"]}),
    ];
    let ifaces = parse_strict(&docs).unwrap();
    let c = &ifaces[2];
    assert_eq!(c.extends, vec![id("dtmi:ex:B;1")]);
    assert!(c.ancestors.contains(&id("dtmi:ex:A;1")));
    assert!(c.is_a(&id("dtmi:ex:A;1")));
    assert!(c.properties.contains_key("a"));
}

#[test]
fn extends_cycles_are_rejected() {
    let docs = [
        json!({"@context": "dtmi:dtdl:context;2", "@id": "dtmi:ex:A;1", "@type": "Interface", "extends": "dtmi:ex:B;1"}),
        json!({"@context": "dtmi:dtdl:context;2", "@id": "dtmi:ex:B;1", "@type": "Interface", "extends": "dtmi:ex:A;1"}),
    ];
    assert!(parse_strict(&docs).is_err());
}

#[test]
fn missing_dependencies_are_rejected_unless_the_resolver_knows_them() {
    let doc = json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:ex:B;1", "@type": "Interface",
                     "extends": "dtmi:ex:A;1"});
    assert!(parse_strict(std::slice::from_ref(&doc)).is_err());
    let base = parse_strict(&[
        json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:ex:A;1",
        "@type": "Interface", "contents": [{"@type": "Telemetry", "name": "t", "schema": "long"}]}),
    ])
    .unwrap();
    let resolve = |d: &Dtmi| base.iter().find(|i| &i.id == d).cloned();
    let b = parse(&[doc], &resolve, &ParseOptions::strict()).unwrap();
    assert!(b[0].telemetry.contains_key("t"));
    assert!(b[0].ancestors.contains(&id("dtmi:ex:A;1")));
}

#[test]
fn components_carry_their_interface_and_named_schemas_are_resolved() {
    let docs = [json!([
        {"@context": "dtmi:dtdl:context;3", "@id": "dtmi:ex:Part;1", "@type": "Interface",
         "contents": [{"@type": "Property", "name": "mode", "schema": "dtmi:ex:Part:mode;1"}],
         "schemas": [{"@id": "dtmi:ex:Part:mode;1", "@type": "Enum", "valueSchema": "string",
                      "enumValues": [{"name": "on", "enumValue": "on"}]}]},
        {"@context": "dtmi:dtdl:context;3", "@id": "dtmi:ex:Whole;1", "@type": "Interface",
         "contents": [{"@type": "Component", "name": "part", "schema": "dtmi:ex:Part;1"}]}
    ])];
    let ifaces = parse_strict(&docs).unwrap();
    let part = &ifaces[1].components["part"].schema;
    assert_eq!(part.id, id("dtmi:ex:Part;1"));
    match &*part.properties["mode"].schema {
        Schema::Enum { values, .. } => assert_eq!(values[0].value, json!("on")),
        other => panic!("not an enum: {other:?}"),
    }
}

#[test]
fn undefined_extensions_are_rejected_only_in_strict_mode() {
    let doc = json!({"@context": ["dtmi:dtdl:context;3", "dtmi:foo:ext;1"], "@id": "dtmi:ex:A;1",
                     "@type": "Interface"});
    assert!(parse_strict(std::slice::from_ref(&doc)).is_err());
    assert!(parse(&[doc], &none, &ParseOptions::default()).is_ok());
}

#[test]
fn quantitative_types_need_matching_units() {
    let with_unit = |unit: &str| {
        json!({"@context": ["dtmi:dtdl:context;3", "dtmi:dtdl:extension:quantitativeTypes;1"],
               "@id": "dtmi:ex:A;1", "@type": "Interface",
               "contents": [{"@type": ["Telemetry", "Temperature"], "name": "t", "schema": "double",
                             "unit": unit}]})
    };
    assert!(parse_strict(&[with_unit("degreeCelsius")]).is_ok());
    assert!(parse_strict(&[with_unit("metre")]).is_err());
}
