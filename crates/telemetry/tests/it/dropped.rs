//! Writes whose request is dropped once the write is queued: the client went away, and hyper
//! drops the handler's future with it. Whether the commit then lands or fails, the node must
//! end up holding what the store holds. The oracle is the service opened again over the same
//! store, as after a restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use twinguard_core::auth::Principal;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::store::stalling::StallingStore;
use twinguard_telemetry::manage::{NewDevice, StatusChange};
use twinguard_telemetry::policy::Policy;
use twinguard_telemetry::registry::FirmwareList;
use twinguard_telemetry::{Telemetry, Transport, Verdict};

use crate::nodes::Released;
use crate::pipeline::{FIRMWARE, Plant, group};

type Write = fn(Telemetry, Principal) -> Pin<Box<dyn Future<Output = ()> + Send>>;

fn policy(property: &str) -> Policy {
    serde_json::from_value(json!({
        "model": "dtmi:test:Boiler;1", "property": property, "min": -50.0, "max": 500.0
    }))
    .unwrap()
}

/// Each write of the registry and of what validation reads, its result ignored: the test
/// drops it before it answers.
const WRITES: [(&str, Write); 8] = [
    ("register a device", |t, admin| {
        Box::pin(async move {
            let new = NewDevice {
                public_key: None,
                generate: true,
                device_model: "thermo-1".into(),
                bindings: Vec::new(),
            };
            let _ = t.register_device(&admin, "d2", new).await;
        })
    }),
    ("suspend a device", |t, admin| {
        Box::pin(async move {
            let _ = t.set_status(&admin, "t1", StatusChange::Suspend).await;
        })
    }),
    ("rebind a device", |t, admin| {
        Box::pin(async move {
            let _ = t.set_bindings(&admin, "t1", Vec::new()).await;
        })
    }),
    ("put a firmware list", |t, admin| {
        Box::pin(async move {
            let list = FirmwareList {
                device_model: String::new(),
                digests: vec![FIRMWARE.into()],
            };
            let _ = t.put_firmware(&admin, "thermo-2", list).await;
        })
    }),
    ("put a policy", |t, admin| {
        Box::pin(async move {
            let _ = t.put_policy(&admin, "p2", policy("pressure")).await;
        })
    }),
    ("delete a policy", |t, admin| {
        Box::pin(async move {
            let _ = t.delete_policy(&admin, "p").await;
        })
    }),
    ("put a sensor group", |t, admin| {
        Box::pin(async move {
            let mut g = group(&["a", "b", "c"]);
            g.twin = "boiler-2".into();
            let _ = t.put_group(&admin, "g2", g).await;
        })
    }),
    ("delete a sensor group", |t, admin| {
        Box::pin(async move {
            let _ = t.delete_group(&admin, "g").await;
        })
    }),
];

/// What the node holds of the records that ingestion and the API read.
fn held(t: &Telemetry, admin: &Principal) -> Value {
    json!({
        "devices": t.devices(admin).unwrap(),
        "firmware": t.firmware(admin).unwrap(),
        "policies": t.policies(admin).unwrap(),
        "groups": t.groups(admin).unwrap(),
    })
}

/// A plant with a device, a policy and a sensor group, over a store whose commits the test
/// holds.
async fn plant(store: Arc<StallingStore>) -> Plant<StallingStore> {
    let mut plant = Plant::new_on(store).await;
    plant.device("t1", &["temperature"]).await;
    let t = &plant.telemetry;
    t.put_policy(&plant.admin, "p", policy("temperature"))
        .await
        .unwrap();
    t.put_group(&plant.admin, "g", group(&["a", "b", "c"]))
        .await
        .unwrap();
    plant
}

/// Holds the store's commits, runs `write` and drops it 300 ms later, then lets the held
/// commit land or fails it; returns once the twin writer has answered a later write, so the
/// dropped write's commit has returned.
async fn drop_midway(plant: &Plant<StallingStore>, write: impl Future<Output = ()>, lands: bool) {
    let store = &plant.store;
    store.stall();
    let answered = tokio::time::timeout(Duration::from_millis(300), write).await;
    assert!(
        answered.is_err(),
        "the write answered while its commit was held"
    );
    assert!(store.wait_for_held(1, Duration::from_secs(5)));
    if lands {
        store.release();
    } else {
        store.fail_held();
        assert!(store.wait_until_none_held(Duration::from_secs(5)));
        store.release();
    }
    let body = json!({"$metadata": {"$model": "dtmi:test:Boiler;1"}});
    plant
        .twins
        .write(
            &plant.admin,
            WriteOp::PutTwin {
                id: "after".into(),
                body: body.as_object().cloned().unwrap(),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
}

/// Every write above, dropped while its commit is held, then with the commit landing and with
/// it failing: within 2 s the node holds what the store holds. (With what follows the commit
/// run in the request's future, a policy, group or firmware list that landed was never taken
/// into memory, and a suspension that failed stayed in memory: the node enforced what the
/// store did not say until it restarted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_request_is_dropped_leaves_the_node_holding_what_the_store_holds() {
    let mut failures = Vec::new();
    for (name, write) in WRITES {
        for lands in [true, false] {
            let store = Arc::new(StallingStore::default());
            let _released = Released(store.clone());
            let plant = plant(store).await;
            let before = held(&plant.reopen(), &plant.admin);
            let t = (plant.telemetry.clone(), plant.admin.clone());
            drop_midway(&plant, write(t.0, t.1), lands).await;
            let stored = held(&plant.reopen(), &plant.admin);
            assert_eq!(
                stored != before,
                lands,
                "{name}: the store changed exactly when the commit landed"
            );
            let until = Instant::now() + Duration::from_secs(2);
            loop {
                let node = held(&plant.telemetry, &plant.admin);
                if node == stored {
                    break;
                }
                if Instant::now() >= until {
                    let commit = if lands { "landed" } else { "failed" };
                    failures.push(format!(
                        "{name}, dropped and its commit {commit}: the node holds\n{node:#}\nwhere the store holds\n{stored:#}"
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A message whose batch is dropped while its commit is held, and whose commit then fails,
/// was never stored: the device's retry is accepted, not refused as a replay. With its commit
/// landing instead, the retry is the replay. (With the replay marks taken back only in the
/// request's future, the retry of the failed one was refused: a reading lost that the device
/// would not send again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dropped_midway_is_accepted_again_exactly_when_its_commit_failed() {
    for lands in [true, false] {
        let store = Arc::new(StallingStore::default());
        let _released = Released(store.clone());
        let mut plant = plant(store).await;
        let message = plant.message("t1", "temperature", json!(20.0));
        let bytes = plant.cose(&message);
        let t = plant.telemetry.clone();
        let batch = bytes.clone();
        drop_midway(
            &plant,
            async move {
                let _ = t.ingest(vec![batch], Transport::Https).await;
            },
            lands,
        )
        .await;
        // What follows the commit runs on its own task: a moment for it after the writer
        // answered the later write.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let again = plant.send(bytes).await;
        let expected = if lands {
            (Verdict::Rejected, Some("replay"))
        } else {
            (Verdict::Accepted, None)
        };
        assert_eq!(
            (again.status, again.reason),
            expected,
            "the message sent again after its commit {}: {again:?}",
            if lands { "landed" } else { "failed" }
        );
    }
}
