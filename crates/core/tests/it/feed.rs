//! The change feed: every acknowledged change has exactly one feed record, numbered without
//! gaps in commit order, written in the same commit as the change; refused and failed writes
//! leave nothing; the numbering survives a restart.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Value, json};
use twinguard_core::auth::{DATA_OWNER, Principal};
use twinguard_core::clock::SystemClock;
use twinguard_core::feed::{self, FeedEvent};
use twinguard_core::graph::ops::TelemetryMessage;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::service::TwinService;
use twinguard_core::store::{MemoryStore, Store, Table};

fn owner() -> Principal {
    Principal::with_roles("owner", &[DATA_OWNER])
}

fn models() -> Vec<Value> {
    vec![
        json!({
            "@context": "dtmi:dtdl:context;3", "@id": "dtmi:test:Sensor;1", "@type": "Interface",
            "contents": [{"@type": "Property", "name": "value", "schema": "double"}]
        }),
        json!({
            "@context": "dtmi:dtdl:context;3", "@id": "dtmi:test:Room;1", "@type": "Interface",
            "contents": [
                {"@type": "Property", "name": "temperature", "schema": "double"},
                {"@type": "Relationship", "name": "has", "properties": [{"@type": "Property", "name": "since", "schema": "string"}]},
                {"@type": "Component", "name": "probe", "schema": "dtmi:test:Sensor;1"}
            ]
        }),
    ]
}

async fn open(store: Arc<MemoryStore>) -> TwinService {
    TwinService::open(store, Arc::new(SystemClock)).unwrap()
}

fn put_twin(id: &str, temperature: f64) -> WriteOp {
    let body = json!({"$metadata": {"$model": "dtmi:test:Room;1"}, "temperature": temperature, "probe": {"$metadata": {}}});
    WriteOp::PutTwin {
        id: id.into(),
        body: body.as_object().cloned().unwrap(),
        precondition: Precondition::None,
    }
}

fn all_events(service: &TwinService) -> Vec<FeedEvent> {
    service.feed_after(0, usize::MAX).unwrap()
}

#[tokio::test]
async fn each_change_becomes_one_event_in_adt_shape_in_commit_order() {
    let store = Arc::new(MemoryStore::default());
    let service = open(store.clone()).await;
    let owner = owner();
    service
        .write(&owner, WriteOp::UploadModels(models()))
        .await
        .unwrap();
    assert_eq!(service.feed_head(), 0, "model uploads are not twin events");
    service.write(&owner, put_twin("r1", 20.0)).await.unwrap();
    service.write(&owner, put_twin("r2", 21.0)).await.unwrap();
    let patch = json!([{"op": "replace", "path": "/temperature", "value": 22.5}]);
    service
        .write(
            &owner,
            WriteOp::PatchTwin {
                id: "r1".into(),
                component: None,
                patch: patch.clone(),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
    let component_patch = json!([{"op": "add", "path": "/value", "value": 1.5}]);
    service
        .write(
            &owner,
            WriteOp::PatchTwin {
                id: "r1".into(),
                component: Some("probe".into()),
                patch: component_patch,
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
    let rel = json!({"$targetId": "r2", "$relationshipName": "has", "since": "2020"});
    service
        .write(
            &owner,
            WriteOp::PutRelationship {
                source: "r1".into(),
                id: "h1".into(),
                body: rel.as_object().cloned().unwrap(),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
    let rel_patch = json!([{"op": "replace", "path": "/since", "value": "2021"}]);
    service
        .write(
            &owner,
            WriteOp::PatchRelationship {
                source: "r1".into(),
                id: "h1".into(),
                patch: rel_patch.clone(),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
    service
        .write(
            &owner,
            WriteOp::DeleteRelationship {
                source: "r1".into(),
                id: "h1".into(),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
    service
        .write(
            &owner,
            WriteOp::DeleteTwin {
                id: "r2".into(),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
    // A refused write leaves no event.
    assert!(
        service
            .write(
                &owner,
                WriteOp::DeleteTwin {
                    id: "nope".into(),
                    precondition: Precondition::None
                }
            )
            .await
            .is_err()
    );

    let events = all_events(&service);
    let shape: Vec<(u64, &str, &str, u64)> = events
        .iter()
        .map(|e| (e.seq, e.event_type.as_str(), e.subject.as_str(), e.twin_seq))
        .collect();
    assert_eq!(
        shape,
        [
            (1, feed::TWIN_CREATE, "r1", 1),
            (2, feed::TWIN_CREATE, "r2", 1),
            (3, feed::TWIN_UPDATE, "r1", 2),
            (4, feed::TWIN_UPDATE, "r1", 3),
            (5, feed::RELATIONSHIP_CREATE, "r1/relationships/h1", 4),
            (6, feed::RELATIONSHIP_UPDATE, "r1/relationships/h1", 5),
            (7, feed::RELATIONSHIP_DELETE, "r1/relationships/h1", 6),
            (8, feed::TWIN_DELETE, "r2", 2),
        ]
    );
    assert_eq!(service.feed_head(), 8);
    // Create: the twin as GET returns it.
    let created = service.twin(&owner, "r1").ok();
    assert!(created.is_some());
    assert_eq!(events[0].data["$dtId"], "r1");
    assert_eq!(events[0].data["$metadata"]["$model"], "dtmi:test:Room;1");
    assert_eq!(events[0].dataschema.as_deref(), Some("dtmi:test:Room;1"));
    // Update: the patch that was applied, with the model.
    assert_eq!(
        events[2].data,
        json!({"modelId": "dtmi:test:Room;1", "patch": patch})
    );
    // A component patch is reported with paths from the twin's root.
    assert_eq!(events[3].data["patch"][0]["path"], "/probe/value");
    assert_eq!(events[4].data["$relationshipId"], "h1");
    assert_eq!(events[4].data["$targetId"], "r2");
    assert_eq!(
        events[5].data,
        json!({"modelId": "dtmi:test:Room;1", "patch": rel_patch})
    );
    assert_eq!(events[7].data["$dtId"], "r2");
    // IDs are unique.
    let mut ids: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len());

    // A restart continues both sequences where they were.
    drop(service);
    let service = open(store).await;
    assert_eq!(service.feed_head(), 8);
    service.write(&owner, put_twin("r2", 1.0)).await.unwrap();
    let last = service.feed_after(8, 10).unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(
        (last[0].seq, last[0].twin_seq),
        (9, 3),
        "r2's sequence survives its deletion"
    );
}

#[tokio::test]
async fn replacing_a_twin_reports_what_changed_as_a_patch() {
    let service = open(Arc::new(MemoryStore::default())).await;
    let owner = owner();
    service
        .write(&owner, WriteOp::UploadModels(models()))
        .await
        .unwrap();
    service.write(&owner, put_twin("r1", 20.0)).await.unwrap();
    service.write(&owner, put_twin("r1", 25.0)).await.unwrap();
    let events = all_events(&service);
    assert_eq!(events[1].event_type, feed::TWIN_UPDATE);
    assert_eq!(
        events[1].data["patch"],
        json!([{"op": "replace", "path": "/temperature", "value": 25.0}])
    );
}

#[tokio::test]
async fn a_failed_commit_leaves_no_gap_and_no_event() {
    let store = Arc::new(MemoryStore::default());
    let service = open(store.clone()).await;
    let owner = owner();
    service
        .write(&owner, WriteOp::UploadModels(models()))
        .await
        .unwrap();
    service.write(&owner, put_twin("a", 1.0)).await.unwrap();
    store.set_failing(true);
    assert!(service.write(&owner, put_twin("b", 1.0)).await.is_err());
    store.set_failing(false);
    service.write(&owner, put_twin("c", 1.0)).await.unwrap();
    let events = all_events(&service);
    let subjects: Vec<_> = events.iter().map(|e| (e.seq, e.subject.as_str())).collect();
    assert_eq!(subjects, [(1, "a"), (2, "c")]);
}

#[tokio::test]
async fn telemetry_is_published_once_per_message_id_and_checked_against_the_twin() {
    let service = open(Arc::new(MemoryStore::default())).await;
    let owner = owner();
    service
        .write(&owner, WriteOp::UploadModels(models()))
        .await
        .unwrap();
    service.write(&owner, put_twin("r1", 20.0)).await.unwrap();
    let send = |id: &str, component: Option<&str>, twin: &str| {
        WriteOp::PublishTelemetry(TelemetryMessage {
            twin: twin.into(),
            component: component.map(str::to_owned),
            message_id: id.into(),
            source_time: Some("2026-12-05T08:00:00Z".into()),
            body: json!({"humidity": 40}),
        })
    };
    service.write(&owner, send("m1", None, "r1")).await.unwrap();
    service.write(&owner, send("m1", None, "r1")).await.unwrap();
    service
        .write(&owner, send("m2", Some("probe"), "r1"))
        .await
        .unwrap();
    assert!(
        service
            .write(&owner, send("m3", Some("nope"), "r1"))
            .await
            .is_err()
    );
    assert!(
        service
            .write(&owner, send("m4", None, "ghost"))
            .await
            .is_err()
    );
    let events: Vec<_> = all_events(&service).into_iter().skip(1).collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].event_type, feed::TELEMETRY);
    assert_eq!(events[0].data, json!({"humidity": 40}));
    assert_eq!(events[0].dataschema.as_deref(), Some("dtmi:test:Room;1"));
    assert_eq!(
        events[0].source_time.as_deref(),
        Some("2026-12-05T08:00:00Z")
    );
    assert_eq!(events[1].subject, "r1/components/probe");
    assert_eq!(events[1].dataschema.as_deref(), Some("dtmi:test:Sensor;1"));
}

#[tokio::test]
async fn a_trim_removes_only_records_below_the_position_and_survives_restart() {
    let store = Arc::new(MemoryStore::default());
    let service = open(store.clone()).await;
    let owner = owner();
    service
        .write(&owner, WriteOp::UploadModels(models()))
        .await
        .unwrap();
    for i in 0..5 {
        service
            .write(&owner, put_twin(&format!("t{i}"), 1.0))
            .await
            .unwrap();
    }
    service.trim_feed(4).await.unwrap();
    let left: Vec<u64> = all_events(&service).iter().map(|e| e.seq).collect();
    assert_eq!(left, [4, 5]);
    assert_eq!(store.scan(Table::Events).unwrap().len(), 2);
    drop(service);
    let service = open(store).await;
    service.trim_feed(100).await.unwrap();
    assert!(all_events(&service).is_empty());
    service.write(&owner, put_twin("t9", 1.0)).await.unwrap();
    assert_eq!(all_events(&service)[0].seq, 6);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Writes submitted together (so the writer groups them, some refused) leave a feed that
    /// is exactly 1..=n, one record per acknowledged write in acknowledgement order per twin,
    /// with each twin's sequence 1..=k.
    #[test]
    fn the_feed_matches_the_acknowledged_writes(ops in prop::collection::vec((0u8..4, 0u8..3), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let service = open(Arc::new(MemoryStore::default())).await;
            let owner = owner();
            service.write(&owner, WriteOp::UploadModels(models())).await.unwrap();
            let mut pending = Vec::new();
            for (kind, twin) in &ops {
                let id = format!("t{twin}");
                let op = match kind {
                    0 | 1 => put_twin(&id, f64::from(*kind)),
                    2 => WriteOp::PatchTwin { id: id.clone(), component: None, patch: json!([{"op": "replace", "path": "/temperature", "value": 3.0}]), precondition: Precondition::None },
                    _ => WriteOp::DeleteTwin { id: id.clone(), precondition: Precondition::None },
                };
                pending.push((id, service.submit(&owner, op).unwrap()));
            }
            let mut acknowledged: HashMap<String, u64> = HashMap::new();
            let mut total = 0;
            for (id, answer) in pending {
                if answer.await.is_ok() {
                    *acknowledged.entry(id).or_default() += 1;
                    total += 1;
                }
            }
            let events = all_events(&service);
            assert_eq!(events.len(), total);
            assert!(events.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
            for (twin, count) in acknowledged {
                let seqs: Vec<u64> = events.iter().filter(|e| e.twin == twin).map(|e| e.twin_seq).collect();
                assert_eq!(seqs, (1..=count).collect::<Vec<_>>(), "twin {twin}");
            }
        });
    }
}
