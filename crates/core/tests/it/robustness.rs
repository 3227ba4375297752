//! Hostile input never panics: random and mutated inputs to every parser of the domain, and
//! random twin bodies and patches through the write path. Each either succeeds or returns an
//! error; the process survives either way.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use twinguard_core::auth::{DATA_OWNER, Principal};
use twinguard_core::clock::SystemClock;
use twinguard_core::dtdl::{self, ParseOptions};
use twinguard_core::dtmi::Dtmi;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::paging::{self, ListPosition};
use twinguard_core::service::TwinService;
use twinguard_core::store::MemoryStore;
use twinguard_core::{query, routes};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-zA-Z0-9@:;_$ .-]{0,24}".prop_map(Value::String),
        prop::sample::select(vec![
            "Interface",
            "Property",
            "Telemetry",
            "Relationship",
            "Component",
            "Command",
            "Object",
            "Map",
            "Enum",
            "Array",
            "double",
            "string",
            "integer",
            "dtmi:dtdl:context;2",
            "dtmi:dtdl:context;3",
            "dtmi:a:B;1",
            "@id",
            "@type",
            "contents",
            "schema",
            "name",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "@context",
                        "@id",
                        "@type",
                        "contents",
                        "schema",
                        "name",
                        "extends",
                        "target",
                        "elementSchema",
                        "fields",
                        "enumValues",
                        "valueSchema",
                        "mapKey",
                        "mapValue",
                        "writable",
                        "maxMultiplicity",
                        "x",
                    ]),
                    inner
                ),
                0..6
            )
            .prop_map(|kvs| Value::Object(
                kvs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
            )),
        ]
    })
}

const QUERY_WORDS: &[&str] = &[
    "SELECT",
    "TOP",
    "(",
    ")",
    "*",
    "COUNT()",
    "FROM",
    "DIGITALTWINS",
    "RELATIONSHIPS",
    "T",
    "R",
    "JOIN",
    "RELATED",
    "T.contains",
    "MATCH",
    "-[",
    "]->",
    "<-[",
    "]-",
    ":contains",
    "*1..3",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "=",
    "!=",
    "<",
    ">=",
    "IN",
    "NIN",
    "[",
    "]",
    ",",
    "'x'",
    "\"y\"",
    "1",
    "2.5",
    "true",
    "null",
    "IS_OF_MODEL",
    "IS_DEFINED",
    "STARTSWITH",
    "T.$dtId",
    "$dtId",
    "AS",
    ".",
    "..",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn query_parser_survives_arbitrary_text(text in "\\PC{0,200}") {
        let _ = query::parse(&text);
    }

    #[test]
    fn query_parser_survives_shuffled_keywords(words in prop::collection::vec(prop::sample::select(QUERY_WORDS), 0..40)) {
        let _ = query::parse(&words.join(" "));
    }

    #[test]
    fn continuation_decoder_survives_arbitrary_tokens(token in "\\PC{0,300}") {
        let _ = query::decode_continuation(&token);
    }

    #[test]
    fn list_continuation_parser_survives_arbitrary_tokens(token in "\\PC{0,100}") {
        let _ = ListPosition::parse(&token);
    }

    #[test]
    fn list_continuation_tokens_round_trip(offset in any::<usize>(), size in 1..=paging::MAX_PAGE_SIZE) {
        let position = ListPosition::new(offset, size);
        prop_assert!(position.is_some());
        prop_assert_eq!(position.and_then(|p| ListPosition::parse(&p.token())), position);
    }

    #[test]
    fn route_filter_checker_survives_arbitrary_text(text in "\\PC{0,200}") {
        let _ = routes::check_filter(&text);
    }

    #[test]
    fn dtmi_parser_survives_arbitrary_text(text in "\\PC{0,100}") {
        let _ = Dtmi::parse(&text);
    }

    #[test]
    fn dtdl_parser_survives_arbitrary_documents(docs in prop::collection::vec(json_value(), 0..4), strict in any::<bool>()) {
        let options = ParseOptions { disallow_undefined_extensions: strict };
        let _ = dtdl::parse(&docs, &|_| None, &options);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn twin_writes_survive_arbitrary_bodies_and_patches(body in json_value(), patch in json_value(), id in "\\PC{0,10}") {
        runtime().block_on(async {
            let service = TwinService::open(Arc::new(MemoryStore::default()), Arc::new(SystemClock)).unwrap();
            let owner = Principal::with_roles("o", &[DATA_OWNER]);
            let model = json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:a:B;1", "@type": "Interface",
                "contents": [{"@type": "Property", "name": "x", "schema": {"@type": "Map",
                    "mapKey": {"name": "k", "schema": "string"}, "mapValue": {"name": "v", "schema": "double"}}}]});
            service.write(&owner, WriteOp::UploadModels(vec![model])).await.unwrap();
            let mut body = body.as_object().cloned().unwrap_or_else(Map::new);
            body.insert("$metadata".into(), json!({"$model": "dtmi:a:B;1"}));
            let op = WriteOp::PutTwin { id: id.clone(), body, precondition: Precondition::None };
            let _ = service.write(&owner, op).await;
            let op = WriteOp::PatchTwin { id, component: None, patch, precondition: Precondition::None };
            let _ = service.write(&owner, op).await;
        });
    }
}
