//! Adversarial DTDL uploads (issue 17, findings 3 and 4): inheritance lattices, wide and deep
//! schema references and many children of one parent, sent as a Model Uploader sends them.
//! Cost is proven by counting, never by timing.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Value, json};
use twinguard_core::auth::{MODEL_UPLOADER, Principal};
use twinguard_core::clock::SystemClock;
use twinguard_core::dtdl::Schema;
use twinguard_core::graph::WriteOp;
use twinguard_core::service::TwinService;
use twinguard_core::store::MemoryStore;

fn uploader() -> Principal {
    Principal::with_roles("uploader", &[MODEL_UPLOADER])
}

fn open() -> (TwinService, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::default());
    let service = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    (service, store)
}

/// `layers` layers of `width` interfaces, each extending every interface of the layer below,
/// each with one property of its own.
fn lattice(prefix: &str, width: usize, layers: usize) -> Vec<Value> {
    let id = |l: usize, j: usize| format!("dtmi:attack:{prefix}L{l}x{j};1");
    let mut docs = Vec::new();
    for l in 0..layers {
        for j in 0..width {
            let mut doc = json!({
                "@context": "dtmi:dtdl:context;3",
                "@id": id(l, j),
                "@type": "Interface",
                "contents": [{"@type": "Property", "name": format!("p{l}x{j}"), "schema": "double"}]
            });
            if l > 0 {
                doc["extends"] = json!((0..width).map(|k| id(l - 1, k)).collect::<Vec<_>>());
            }
            docs.push(doc);
        }
    }
    docs
}

/// One interface whose properties use a chain of named Objects, each with `width` fields of
/// the next one: five levels, the deepest DTDL allows, in a few kilobytes.
fn schema_fan(id: &str, width: usize, properties: usize) -> Value {
    let sid = |level: usize| format!("{}:s{level};1", id.trim_end_matches(";1"));
    let schemas: Vec<Value> = (1..=5)
        .map(|level| {
            let fields: Vec<Value> = (0..width)
                .map(|f| {
                    let schema = if level == 5 {
                        json!("double")
                    } else {
                        json!(sid(level + 1))
                    };
                    json!({"name": format!("f{f}"), "schema": schema})
                })
                .collect();
            json!({"@id": sid(level), "@type": "Object", "fields": fields})
        })
        .collect();
    let contents: Vec<Value> = (0..properties)
        .map(|p| json!({"@type": "Property", "name": format!("p{p}"), "schema": sid(1)}))
        .collect();
    json!({
        "@context": "dtmi:dtdl:context;3",
        "@id": id,
        "@type": "Interface",
        "schemas": schemas,
        "contents": contents
    })
}

fn children_of(parent: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "@context": "dtmi:dtdl:context;3",
                "@id": format!("dtmi:attack:child{i};1"),
                "@type": "Interface",
                "extends": parent
            })
        })
        .collect()
}

/// Schema nodes held in memory by every stored model, each allocation counted once: what the
/// uploads cost in memory, whatever the sharing.
fn schema_allocations(service: &TwinService) -> usize {
    fn walk(s: &Schema, seen: &mut HashSet<usize>) {
        if !seen.insert(std::ptr::from_ref(s) as usize) {
            return;
        }
        match s {
            Schema::Array(e) => walk(e, seen),
            Schema::Map { value, .. } => walk(value, seen),
            Schema::Object { fields } => {
                for f in fields {
                    walk(&f.schema, seen);
                }
            }
            _ => {}
        }
    }
    let mut seen = HashSet::new();
    for m in service.snapshot().models() {
        for p in m.interface.properties.values() {
            walk(&p.schema, &mut seen);
        }
    }
    seen.len()
}

#[tokio::test]
async fn an_eleven_layer_inheritance_lattice_is_compiled_once_per_interface() {
    let (service, _) = open();
    let docs = lattice("a", 5, 11);
    service
        .write(&uploader(), WriteOp::UploadModels(docs))
        .await
        .unwrap();
    let top = service.snapshot();
    let top = top
        .models()
        .find(|m| m.id.to_string() == "dtmi:attack:aL10x0;1")
        .unwrap();
    assert_eq!(top.interface.ancestors.len(), 50);
    assert_eq!(top.interface.properties.len(), 51);
}

#[tokio::test]
async fn schemas_referenced_many_times_and_many_children_share_one_copy() {
    let (service, _) = open();
    let parent = schema_fan("dtmi:attack:fan;1", 8, 4);
    let parent_bytes = parent.to_string().len();
    service
        .write(&uploader(), WriteOp::UploadModels(vec![parent]))
        .await
        .unwrap();
    let alone = schema_allocations(&service);
    service
        .write(
            &uploader(),
            WriteOp::UploadModels(children_of("dtmi:attack:fan;1", 20)),
        )
        .await
        .unwrap();
    let with_children = schema_allocations(&service);
    eprintln!("schema nodes: alone {alone}, with 20 children {with_children}");
    // Five named schemas of 8 fields: 5 objects and their leaves, not 8^5 copies per use.
    assert!(
        alone <= parent_bytes / 16,
        "a {parent_bytes}-byte model holds {alone} schema nodes"
    );
    assert_eq!(
        alone, with_children,
        "children copied their parent's schemas"
    );
}

/// Stored interfaces are looked up through the resolver; count the look-ups an upload on top
/// of a stored lattice makes as the lattice grows.
fn lookups_for_lattice_on_stored_layers(width: usize, layers: usize, stored: usize) -> usize {
    use std::cell::Cell;
    use std::collections::HashMap;
    use twinguard_core::dtdl::{Interface, ParseOptions, parse};
    use twinguard_core::dtmi::Dtmi;
    let docs = lattice("r", width, layers);
    let (below, above) = docs.split_at(width * stored);
    let none = |_: &Dtmi| None;
    let stored: HashMap<Dtmi, Arc<Interface>> = parse(below, &none, &ParseOptions::strict())
        .unwrap()
        .into_iter()
        .map(|i| (i.id.clone(), i))
        .collect();
    let calls = Cell::new(0usize);
    let resolve = |id: &Dtmi| {
        calls.set(calls.get() + 1);
        stored.get(id).cloned()
    };
    parse(above, &resolve, &ParseOptions::strict()).unwrap();
    calls.get()
}

#[test]
fn an_upload_over_a_stored_lattice_looks_each_stored_interface_up_a_bounded_number_of_times() {
    let small = lookups_for_lattice_on_stored_layers(3, 7, 2);
    let large = lookups_for_lattice_on_stored_layers(3, 9, 2);
    eprintln!("resolver look-ups: 7 layers {small}, 9 layers {large}");
    // Two more layers of three interfaces add 6 interfaces (a third more): the look-ups may
    // grow as much, not by the factor of 9 the extra paths through the lattice would give.
    assert!(large <= small * 2, "look-ups grew from {small} to {large}");
}
