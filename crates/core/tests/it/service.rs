//! The twin service end to end over an in-memory store: write rules, preconditions, access
//! decisions, group commit and failure of the store.

use std::sync::Arc;

use serde_json::{Value, json};
use twinguard_core::auth::{DATA_OWNER, DATA_READER, Principal, TELEMETRY_WRITER};
use twinguard_core::clock::SystemClock;
use twinguard_core::dtmi::Dtmi;
use twinguard_core::error::DomainError;
use twinguard_core::graph::{Precondition, PropertyUpdate, Quality, WriteOp, WriteOutcome};
use twinguard_core::service::{OpenError, QueryRequest, TwinService};
use twinguard_core::store::{MemoryStore, Mutation, Store, Table};

fn owner() -> Principal {
    Principal::with_roles("owner", &[DATA_OWNER])
}

fn reader() -> Principal {
    Principal::with_roles("reader", &[DATA_READER])
}

fn ontology() -> Vec<Value> {
    vec![
        json!({
            "@context": "dtmi:dtdl:context;3",
            "@id": "dtmi:test:Space;1",
            "@type": "Interface",
            "contents": [{"@type": "Property", "name": "name", "schema": "string"}]
        }),
        json!({
            "@context": "dtmi:dtdl:context;3",
            "@id": "dtmi:test:Room;1",
            "@type": "Interface",
            "extends": "dtmi:test:Space;1",
            "contents": [
                {"@type": "Property", "name": "temperature", "schema": "double"},
                {"@type": "Property", "name": "mode", "schema": {"@type": "Enum", "valueSchema": "string",
                    "enumValues": [{"name": "auto", "enumValue": "auto"}, {"name": "off", "enumValue": "off"}]}},
                {"@type": "Telemetry", "name": "humidity", "schema": "double"}
            ]
        }),
        json!({
            "@context": "dtmi:dtdl:context;3",
            "@id": "dtmi:test:Floor;1",
            "@type": "Interface",
            "extends": "dtmi:test:Space;1",
            "contents": [{"@type": "Relationship", "name": "contains", "target": "dtmi:test:Room;1", "maxMultiplicity": 2}]
        }),
    ]
}

async fn service_with_ontology() -> (TwinService, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::default());
    let service = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    service
        .write(&owner(), WriteOp::UploadModels(ontology()))
        .await
        .unwrap();
    (service, store)
}

fn twin_body(model: &str, props: Value) -> serde_json::Map<String, Value> {
    let mut body = props.as_object().cloned().unwrap_or_default();
    body.insert("$metadata".into(), json!({"$model": model}));
    body
}

async fn put_twin(
    service: &TwinService,
    id: &str,
    model: &str,
    props: Value,
) -> Result<WriteOutcome, DomainError> {
    let op = WriteOp::PutTwin {
        id: id.into(),
        body: twin_body(model, props),
        precondition: Precondition::None,
    };
    service.write(&owner(), op).await
}

async fn relate(
    service: &TwinService,
    source: &str,
    id: &str,
    target: &str,
) -> Result<WriteOutcome, DomainError> {
    let body = json!({"$targetId": target, "$relationshipName": "contains"})
        .as_object()
        .cloned()
        .unwrap();
    let op = WriteOp::PutRelationship {
        source: source.into(),
        id: id.into(),
        body,
        precondition: Precondition::None,
    };
    service.write(&owner(), op).await
}

#[tokio::test]
async fn created_twin_carries_model_etag_and_property_metadata() {
    let (service, _) = service_with_ontology().await;
    put_twin(
        &service,
        "r1",
        "dtmi:test:Room;1",
        json!({"temperature": 21.5, "name": "lab"}),
    )
    .await
    .unwrap();
    let twin = service.twin(&reader(), "r1").unwrap();
    assert_eq!(twin.doc()["$dtId"], "r1");
    assert!(twin.etag.starts_with("W/\""));
    assert_eq!(twin.doc()["$metadata"]["$model"], "dtmi:test:Room;1");
    assert!(twin.doc()["$metadata"]["temperature"]["lastUpdateTime"].is_string());
    assert!(twin.doc()["$metadata"]["$lastUpdateTime"].is_string());
}

#[tokio::test]
async fn writes_that_break_the_model_are_rejected() {
    let (service, _) = service_with_ontology().await;
    for (props, why) in [
        (json!({"unknown": 1}), "unknown property"),
        (json!({"temperature": "warm"}), "wrong type"),
        (json!({"mode": "turbo"}), "bad enum value"),
        (json!({"humidity": 40.0}), "telemetry"),
    ] {
        let err = put_twin(&service, "r1", "dtmi:test:Room;1", props)
            .await
            .unwrap_err();
        assert!(
            matches!(err, DomainError::ValidationFailed(_)),
            "{why}: {err:?}"
        );
    }
    let err = put_twin(&service, "r1", "dtmi:test:Missing;1", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, DomainError::ValidationFailed(_)), "{err:?}");
    assert!(service.snapshot().twin("r1").is_none());
}

#[tokio::test]
async fn stale_etags_and_if_none_match_are_refused_with_precondition_failed() {
    let (service, _) = service_with_ontology().await;
    let WriteOutcome::Twin(first) = put_twin(
        &service,
        "r1",
        "dtmi:test:Room;1",
        json!({"temperature": 1.0}),
    )
    .await
    .unwrap() else {
        panic!("expected a twin")
    };
    let patch = json!([{"op": "replace", "path": "/temperature", "value": 2.0}]);
    let op = |tag: &str| WriteOp::PatchTwin {
        id: "r1".into(),
        component: None,
        patch: patch.clone(),
        precondition: Precondition::IfMatch(tag.into()),
    };
    service.write(&owner(), op(&first.etag)).await.unwrap();
    let err = service.write(&owner(), op(&first.etag)).await.unwrap_err();
    assert!(matches!(err, DomainError::PreconditionFailed));
    assert_eq!(
        service.twin(&owner(), "r1").unwrap().doc()["temperature"],
        2.0
    );

    let again = WriteOp::PutTwin {
        id: "r1".into(),
        body: twin_body("dtmi:test:Room;1", json!({})),
        precondition: Precondition::IfNoneMatch,
    };
    assert!(matches!(
        service.write(&owner(), again).await.unwrap_err(),
        DomainError::PreconditionFailed
    ));
}

#[tokio::test]
async fn relationships_follow_the_source_model_target_and_multiplicity() {
    let (service, _) = service_with_ontology().await;
    put_twin(&service, "f1", "dtmi:test:Floor;1", json!({}))
        .await
        .unwrap();
    put_twin(&service, "f2", "dtmi:test:Floor;1", json!({}))
        .await
        .unwrap();
    for room in ["r1", "r2", "r3"] {
        put_twin(&service, room, "dtmi:test:Room;1", json!({}))
            .await
            .unwrap();
    }
    relate(&service, "f1", "c1", "r1").await.unwrap();
    relate(&service, "f1", "c2", "r2").await.unwrap();
    // maxMultiplicity is 2.
    assert!(matches!(
        relate(&service, "f1", "c3", "r3").await.unwrap_err(),
        DomainError::ValidationFailed(_)
    ));
    // Replacing an existing relationship does not count against the limit.
    relate(&service, "f1", "c2", "r3").await.unwrap();
    // The target must be a Room.
    assert!(matches!(
        relate(&service, "f2", "x", "f1").await.unwrap_err(),
        DomainError::ValidationFailed(_)
    ));
    // Rooms define no relationships.
    assert!(matches!(
        relate(&service, "r1", "x", "r2").await.unwrap_err(),
        DomainError::ValidationFailed(_)
    ));

    let incoming: Vec<_> = service
        .incoming(&reader(), "r3")
        .unwrap()
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(incoming, ["c2"]);
    assert!(
        service.incoming(&reader(), "r2").unwrap().is_empty(),
        "the replaced relationship no longer targets r2"
    );

    let delete = |id: &str| WriteOp::DeleteTwin {
        id: id.into(),
        precondition: Precondition::None,
    };
    assert!(matches!(
        service.write(&owner(), delete("r1")).await.unwrap_err(),
        DomainError::RelationshipsExist(_)
    ));
    assert!(matches!(
        service.write(&owner(), delete("f1")).await.unwrap_err(),
        DomainError::RelationshipsExist(_)
    ));
    service.write(&owner(), delete("r2")).await.unwrap();
}

#[tokio::test]
async fn models_in_use_cannot_be_deleted() {
    let (service, _) = service_with_ontology().await;
    let delete = |id: &str| WriteOp::DeleteModel(twinguard_core::dtmi::Dtmi::parse(id).unwrap());
    let err = service
        .write(&owner(), delete("dtmi:test:Space;1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DomainError::ModelReferenced(..)),
        "extended by Room: {err:?}"
    );
    put_twin(&service, "r1", "dtmi:test:Room;1", json!({}))
        .await
        .unwrap();
    let err = service
        .write(&owner(), delete("dtmi:test:Room;1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DomainError::ModelReferenced(..)),
        "used by a twin: {err:?}"
    );
    service
        .write(&owner(), delete("dtmi:test:Floor;1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn readers_cannot_write_and_nobody_gets_in_without_a_role() {
    let (service, _) = service_with_ontology().await;
    let op = WriteOp::PutTwin {
        id: "r".into(),
        body: twin_body("dtmi:test:Room;1", json!({})),
        precondition: Precondition::None,
    };
    assert!(matches!(
        service.write(&reader(), op).await.unwrap_err(),
        DomainError::Forbidden { .. }
    ));
    let nobody = Principal::with_roles("nobody", &[]);
    assert!(matches!(
        service.twin(&nobody, "r").unwrap_err(),
        DomainError::Forbidden { .. }
    ));
    let q = QueryRequest {
        query: Some("SELECT * FROM DIGITALTWINS".into()),
        continuation_token: None,
        page_size: 10,
    };
    assert!(matches!(
        service.query(&nobody, &q).unwrap_err(),
        DomainError::Forbidden { .. }
    ));
}

#[tokio::test]
async fn a_failing_store_refuses_writes_and_keeps_the_graph_unchanged() {
    let (service, store) = service_with_ontology().await;
    put_twin(
        &service,
        "r1",
        "dtmi:test:Room;1",
        json!({"temperature": 1.0}),
    )
    .await
    .unwrap();
    store.set_failing(true);
    let err = put_twin(&service, "r2", "dtmi:test:Room;1", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, DomainError::Unavailable));
    assert!(!service.store_healthy());
    assert!(
        service.snapshot().twin("r2").is_none(),
        "an unacknowledged write must not be visible"
    );
    store.set_failing(false);
    put_twin(&service, "r2", "dtmi:test:Room;1", json!({}))
        .await
        .unwrap();
    assert!(service.store_healthy());
}

#[tokio::test]
async fn reopening_the_store_restores_every_acknowledged_write() {
    let (service, store) = service_with_ontology().await;
    put_twin(
        &service,
        "f1",
        "dtmi:test:Floor;1",
        json!({"name": "ground"}),
    )
    .await
    .unwrap();
    put_twin(
        &service,
        "r1",
        "dtmi:test:Room;1",
        json!({"temperature": 19.0}),
    )
    .await
    .unwrap();
    relate(&service, "f1", "c1", "r1").await.unwrap();
    let op = WriteOp::PutRoute {
        id: "all".into(),
        endpoint_name: "hub".into(),
        filter: "true".into(),
    };
    service.write(&owner(), op).await.unwrap();
    drop(service);

    let reopened =
        TwinService::open(store.clone() as Arc<dyn Store>, Arc::new(SystemClock)).unwrap();
    let graph = reopened.snapshot();
    assert_eq!(graph.twin_count(), 2);
    assert_eq!(graph.relationship_count(), 1);
    assert_eq!(graph.twin("r1").unwrap().doc()["temperature"], 19.0);
    assert_eq!(graph.incoming("r1").count(), 1);
    assert!(graph.route("all").is_some());
    assert_eq!(graph.models().count(), 3);
}

#[tokio::test]
async fn reopening_keeps_each_twin_byte_for_byte_and_refuses_a_corrupt_record() {
    let (service, store) = service_with_ontology().await;
    let ids = [
        "plain",
        "quote\"d",
        "\u{fc}n\u{ef}code-\u{2603}",
        "back\\slash",
    ];
    for id in ids {
        put_twin(
            &service,
            id,
            "dtmi:test:Room;1",
            json!({"temperature": 19.5, "mode": "auto"}),
        )
        .await
        .unwrap();
    }
    let written = |service: &TwinService| -> Vec<(String, String, String)> {
        let graph = service.snapshot();
        ids.iter()
            .map(|id| {
                let twin = graph.twin(id).unwrap();
                (
                    twin.id.to_string(),
                    twin.etag.clone(),
                    twin.json().get().to_owned(),
                )
            })
            .collect()
    };
    let before = written(&service);
    drop(service);
    let reopened =
        TwinService::open(store.clone() as Arc<dyn Store>, Arc::new(SystemClock)).unwrap();
    assert_eq!(written(&reopened), before);
    assert_eq!(
        reopened
            .snapshot()
            .twin("quote\"d")
            .unwrap()
            .model
            .to_string(),
        "dtmi:test:Room;1"
    );
    drop(reopened);

    // A record that is not a twin, or whose key is not its $dtId, stops the start-up.
    for (key, value) in [
        ("plain", b"{\"$dtId\": ".to_vec()),
        ("elsewhere", before[0].2.clone().into_bytes()),
    ] {
        let store = Arc::new(MemoryStore::default());
        let (service, original) = service_with_ontology().await;
        drop(service);
        for table in Table::ALL {
            let rows: Vec<Mutation> = original
                .scan(table)
                .unwrap()
                .into_iter()
                .map(|(k, v)| Mutation::put(table, k, v))
                .collect();
            store.commit(&rows).unwrap();
        }
        store
            .commit(&[Mutation::put(Table::Twins, key, value)])
            .unwrap();
        match TwinService::open(store as Arc<dyn Store>, Arc::new(SystemClock)) {
            Err(OpenError::Corrupt("twin", k)) => assert_eq!(k, key),
            other => panic!("{key}: {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test]
async fn concurrent_writes_are_grouped_and_all_acknowledged() {
    let (service, _) = service_with_ontology().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            put_twin(
                &service,
                &format!("room-{i}"),
                "dtmi:test:Room;1",
                json!({"temperature": i as f64}),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let q = QueryRequest {
        query: Some("SELECT COUNT() FROM DIGITALTWINS".into()),
        continuation_token: None,
        page_size: 10,
    };
    let page = service.query(&reader(), &q).unwrap();
    assert_eq!(page.values()[0]["COUNT"], 200);
}

#[tokio::test]
async fn source_times_are_kept_per_property_and_unchanged_values_keep_their_update_time() {
    let (service, _) = service_with_ontology().await;
    let mut body = twin_body(
        "dtmi:test:Room;1",
        json!({"temperature": 20.0, "name": "lab"}),
    );
    body.insert(
        "$metadata".into(),
        json!({"$model": "dtmi:test:Room;1", "temperature": {"sourceTime": "2026-01-02T03:04:05Z"}}),
    );
    let op = WriteOp::PutTwin {
        id: "r1".into(),
        body,
        precondition: Precondition::None,
    };
    service.write(&owner(), op).await.unwrap();
    let first = service.twin(&owner(), "r1").unwrap();
    assert_eq!(
        first.doc()["$metadata"]["temperature"]["sourceTime"],
        "2026-01-02T03:04:05Z"
    );
    assert!(first.doc()["$metadata"]["name"].get("sourceTime").is_none());

    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let patch = json!([
        {"op": "replace", "path": "/temperature", "value": 21.0},
        {"op": "add", "path": "/$metadata/temperature/sourceTime", "value": "2026-01-02T03:05:00Z"}
    ]);
    let op = WriteOp::PatchTwin {
        id: "r1".into(),
        component: None,
        patch,
        precondition: Precondition::None,
    };
    service.write(&owner(), op).await.unwrap();
    let second = service.twin(&owner(), "r1").unwrap();
    let meta = &second.doc()["$metadata"];
    assert_eq!(meta["temperature"]["sourceTime"], "2026-01-02T03:05:00Z");
    assert_ne!(
        meta["temperature"]["lastUpdateTime"],
        first.doc()["$metadata"]["temperature"]["lastUpdateTime"]
    );
    assert_eq!(
        meta["name"]["lastUpdateTime"],
        first.doc()["$metadata"]["name"]["lastUpdateTime"],
        "name did not change"
    );
}

#[tokio::test]
async fn refusals_decided_against_an_uncommitted_write_fail_with_its_group() {
    let (service, store) = service_with_ontology().await;
    store.set_failing(true);
    let create = |precondition| WriteOp::PutTwin {
        id: "x".into(),
        body: twin_body("dtmi:test:Room;1", json!({})),
        precondition,
    };
    // In one group, the second would be refused (412) because of the first, which then never
    // becomes durable; in two groups, both reach the failing store. Either way neither may
    // report anything but 503.
    let owner = owner();
    let (a, b) = tokio::join!(
        service.write(&owner, create(Precondition::None)),
        service.write(&owner, create(Precondition::IfNoneMatch)),
    );
    assert!(matches!(a, Err(DomainError::Unavailable)), "{a:?}");
    assert!(matches!(b, Err(DomainError::Unavailable)), "{b:?}");
}

#[tokio::test]
async fn if_match_accepts_any_of_several_etags_and_patches_cannot_move_to_a_decommissioned_model() {
    let (service, _) = service_with_ontology().await;
    let WriteOutcome::Twin(twin) = put_twin(&service, "s1", "dtmi:test:Space;1", json!({}))
        .await
        .unwrap()
    else {
        panic!("expected a twin")
    };
    let patch = |tags: String, value: &str| WriteOp::PatchTwin {
        id: "s1".into(),
        component: None,
        patch: json!([{"op": "add", "path": "/name", "value": value}]),
        precondition: Precondition::IfMatch(tags),
    };
    let err = service
        .write(&owner(), patch("W/\"nope\"".into(), "a"))
        .await
        .unwrap_err();
    assert!(matches!(err, DomainError::PreconditionFailed));
    let tags = format!("W/\"other\", {}", twin.etag);
    service.write(&owner(), patch(tags, "b")).await.unwrap();

    let room = Dtmi::parse("dtmi:test:Room;1").unwrap();
    let op = WriteOp::SetModelDecommissioned {
        id: room,
        decommissioned: true,
    };
    service.write(&owner(), op).await.unwrap();
    let to_room = WriteOp::PatchTwin {
        id: "s1".into(),
        component: None,
        patch: json!([{"op": "replace", "path": "/$metadata/$model", "value": "dtmi:test:Room;1"}]),
        precondition: Precondition::None,
    };
    let err = service.write(&owner(), to_room).await.unwrap_err();
    assert!(
        matches!(err, DomainError::ModelDecommissioned(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_source_time_that_is_not_a_date_time_is_rejected() {
    let (service, _) = service_with_ontology().await;
    let mut body = twin_body("dtmi:test:Room;1", json!({"temperature": 1.0}));
    body.insert(
        "$metadata".into(),
        json!({"$model": "dtmi:test:Room;1", "temperature": {"sourceTime": "yesterday"}}),
    );
    let op = WriteOp::PutTwin {
        id: "r".into(),
        body,
        precondition: Precondition::None,
    };
    let err = service.write(&owner(), op).await.unwrap_err();
    assert!(matches!(err, DomainError::ValidationFailed(_)), "{err:?}");
}

/// A telemetry write that moves `temperature` of `twin` to `value`.
async fn reading(service: &TwinService, twin: &str, value: f64) -> Result<(), DomainError> {
    let update = PropertyUpdate {
        twin: twin.into(),
        name: "temperature".into(),
        value: Some(json!(value)),
        source_time: None,
        quality: Quality::Good,
        sources: vec!["d1".into()],
    };
    let op = WriteOp::ApplyReadings {
        updates: vec![update],
        records: Vec::new(),
    };
    let pipeline = Principal::with_roles("pipeline", &[TELEMETRY_WRITER]);
    match service.write(&pipeline, op).await? {
        WriteOutcome::Readings(results) => {
            assert_eq!(results, [Ok(())]);
            Ok(())
        }
        other => panic!("not a readings answer: {other:?}"),
    }
}

async fn patch_twin(service: &TwinService, id: &str, patch: Value) {
    let op = WriteOp::PatchTwin {
        id: id.into(),
        component: None,
        patch,
        precondition: Precondition::None,
    };
    service.write(&owner(), op).await.unwrap();
}

/// The writer keeps the documents of twins that telemetry moves parsed between commits; a twin
/// changed since by anything else, or by a commit that never became durable, must be read from
/// what is published, never from what was kept.
#[tokio::test]
async fn telemetry_writes_build_on_every_other_change_of_their_twin() {
    let (service, store) = service_with_ontology().await;
    put_twin(
        &service,
        "r1",
        "dtmi:test:Room;1",
        json!({"temperature": 20.0, "name": "lab"}),
    )
    .await
    .unwrap();
    reading(&service, "r1", 21.0).await.unwrap();
    // An API write in between: the next reading keeps its change.
    patch_twin(
        &service,
        "r1",
        json!([{"op": "replace", "path": "/name", "value": "hall"}]),
    )
    .await;
    reading(&service, "r1", 22.0).await.unwrap();
    let doc = service.twin(&owner(), "r1").unwrap().doc();
    assert_eq!(
        (doc["name"].clone(), doc["temperature"].clone()),
        (json!("hall"), json!(22.0))
    );
    // A reading whose commit fails is not acknowledged and must not resurface in a later one.
    store.set_failing(true);
    assert!(matches!(
        reading(&service, "r1", 99.0).await,
        Err(DomainError::Unavailable)
    ));
    store.set_failing(false);
    patch_twin(
        &service,
        "r1",
        json!([{"op": "add", "path": "/mode", "value": "off"}]),
    )
    .await;
    reading(&service, "r1", 23.0).await.unwrap();
    let published = service.twin(&owner(), "r1").unwrap();
    let doc = published.doc();
    assert_eq!(
        (
            doc["name"].clone(),
            doc["mode"].clone(),
            doc["temperature"].clone()
        ),
        (json!("hall"), json!("off"), json!(23.0))
    );
    // What the store holds is what the service shows.
    let stored = store.scan(Table::Twins).unwrap();
    let stored = stored.iter().find(|(key, _)| key == "r1").unwrap();
    assert_eq!(stored.1, published.json().get().as_bytes());
}

/// A telemetry write that moves `temperature` of `twin` and carries `records`.
fn readings_with_records(twin: &str, value: f64, records: Vec<Mutation>) -> WriteOp {
    WriteOp::ApplyReadings {
        updates: vec![PropertyUpdate {
            twin: twin.into(),
            name: "temperature".into(),
            value: Some(json!(value)),
            source_time: None,
            quality: Quality::Good,
            sources: vec!["d1".into()],
        }],
        records,
    }
}

/// The telemetry write may carry records of the tables telemetry owns only: a record of an
/// identity table (a user, an API key) or of the graph's is refused with the whole write, and
/// nothing of it is stored, not even its twin updates.
#[tokio::test]
async fn a_telemetry_write_carrying_a_record_of_a_table_telemetry_does_not_own_is_refused() {
    let (service, store) = service_with_ontology().await;
    put_twin(
        &service,
        "r1",
        "dtmi:test:Room;1",
        json!({"temperature": 20.0}),
    )
    .await
    .unwrap();
    let pipeline = Principal::with_roles("pipeline", &[TELEMETRY_WRITER]);
    let twin_before = store.scan(Table::Twins).unwrap();
    for table in [
        Table::Identities,
        Table::ApiKeys,
        Table::RoleAssignments,
        Table::Twins,
    ] {
        let records = vec![
            Mutation::put(Table::Replay, "d1", b"{}".to_vec()),
            Mutation::put(table, "intruder", b"{}".to_vec()),
        ];
        let err = service
            .write(&pipeline, readings_with_records("r1", 99.0, records))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DomainError::Internal(_)),
            "{table:?}: {err:?}"
        );
        assert!(
            store
                .scan(table)
                .unwrap()
                .iter()
                .all(|(k, _)| k != "intruder"),
            "{table:?}: the record was stored"
        );
        assert!(store.scan(Table::Replay).unwrap().is_empty(), "{table:?}");
        assert_eq!(store.scan(Table::Twins).unwrap(), twin_before, "{table:?}");
    }
    assert_eq!(
        service.twin(&owner(), "r1").unwrap().doc()["temperature"],
        json!(20.0)
    );
    // Records of the tables telemetry owns still go through.
    let records = vec![Mutation::put(Table::Replay, "d1", b"{}".to_vec())];
    service
        .write(&pipeline, readings_with_records("r1", 21.0, records))
        .await
        .unwrap();
    assert_eq!(store.scan(Table::Replay).unwrap().len(), 1);
    assert_eq!(
        service.twin(&owner(), "r1").unwrap().doc()["temperature"],
        json!(21.0)
    );
}

/// Telemetry writes queued together are merged into one; a refused one must not take the
/// others down with it.
#[tokio::test]
async fn a_refused_telemetry_write_does_not_refuse_the_writes_queued_with_it() {
    let (service, store) = service_with_ontology().await;
    for id in ["r1", "r2", "r3"] {
        put_twin(
            &service,
            id,
            "dtmi:test:Room;1",
            json!({"temperature": 20.0}),
        )
        .await
        .unwrap();
    }
    let pipeline = Principal::with_roles("pipeline", &[TELEMETRY_WRITER]);
    let mut pending = Vec::new();
    for round in 0..20 {
        for (id, table) in [
            ("r1", Table::Replay),
            ("r2", Table::ApiKeys),
            ("r3", Table::History),
        ] {
            let records = vec![Mutation::put(
                table,
                format!("{id}-{round}"),
                b"{}".to_vec(),
            )];
            let op = readings_with_records(id, f64::from(round), records);
            pending.push((table, service.submit(&pipeline, op).unwrap()));
        }
    }
    for (table, answer) in pending {
        let answer = answer.await;
        if table == Table::ApiKeys {
            assert!(
                matches!(answer, Err(DomainError::Internal(_))),
                "{answer:?}"
            );
        } else {
            assert!(
                matches!(answer, Ok(WriteOutcome::Readings(ref r)) if r == &[Ok(())]),
                "{table:?}: {answer:?}"
            );
        }
    }
    assert!(store.scan(Table::ApiKeys).unwrap().is_empty());
    assert_eq!(store.scan(Table::Replay).unwrap().len(), 20);
    assert_eq!(store.scan(Table::History).unwrap().len(), 20);
    assert_eq!(
        service.twin(&owner(), "r2").unwrap().doc()["temperature"],
        json!(20.0)
    );
    assert_eq!(
        service.twin(&owner(), "r3").unwrap().doc()["temperature"],
        json!(19.0)
    );
}

/// ADT's `Message-Id`: a telemetry message sent again within the hour is acknowledged and not
/// published twice, and a restart in between does not make it new.
#[tokio::test]
async fn a_repeated_telemetry_message_id_is_published_once_even_across_a_restart() {
    let (service, store) = service_with_ontology().await;
    put_twin(
        &service,
        "r1",
        "dtmi:test:Room;1",
        json!({"temperature": 19.0}),
    )
    .await
    .unwrap();
    let send = |id: &str| {
        WriteOp::PublishTelemetry(twinguard_core::graph::ops::TelemetryMessage {
            twin: "r1".into(),
            component: None,
            message_id: id.into(),
            source_time: None,
            body: json!({"humidity": 40}),
        })
    };
    let telemetry_events = |service: &TwinService| {
        service
            .feed_after(0, 1_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == "microsoft.iot.telemetry")
            .count()
    };
    service.write(&owner(), send("m-1")).await.unwrap();
    service.write(&owner(), send("m-1")).await.unwrap();
    assert_eq!(telemetry_events(&service), 1);
    drop(service);
    let reopened = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
    reopened.write(&owner(), send("m-1")).await.unwrap();
    assert_eq!(telemetry_events(&reopened), 1, "a repeat after a restart");
    reopened.write(&owner(), send("m-2")).await.unwrap();
    assert_eq!(telemetry_events(&reopened), 2, "a new ID is published");
}
