//! The trusted telemetry pipeline end to end in-process: real envelopes signed with device keys,
//! the real twin service and store, a clock the tests move.

use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use serde_json::{Value, json};
use time::OffsetDateTime;
use twinguard_core::auth::{DATA_OWNER, OPERATOR, Principal, SECURITY_ADMIN, TELEMETRY_WRITER};
use twinguard_core::clock::Clock;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::service::TwinService;
use twinguard_core::store::{MemoryStore, Store};
use twinguard_telemetry::envelope::{Message, Reading, sign_cose, sign_jws, signing_key_from_pem};
use twinguard_telemetry::fusion::SensorGroup;
use twinguard_telemetry::manage::{Decision, HistoryQuery, NewDevice, StatusChange};
use twinguard_telemetry::policy::Policy;
use twinguard_telemetry::records::Review;
use twinguard_telemetry::registry::{Binding, FirmwareList};
use twinguard_telemetry::{Outcome, Telemetry, Transport, Verdict};

pub(crate) const FIRMWARE: &str =
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
pub(crate) const T0: i64 = 1_800_000_000_000;

/// A clock the tests move, which can also hold one caller still (see [`TestClock::pause`]).
pub(crate) struct TestClock {
    now: Mutex<OffsetDateTime>,
    pause: crate::keys::Pause,
}

impl TestClock {
    pub(crate) fn at_ms(ms: i64) -> Self {
        Self {
            now: Mutex::new(
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap(),
            ),
            pause: Default::default(),
        }
    }

    /// The next thread to read the clock goes on; its read after that waits until
    /// [`TestClock::resume`]. Other threads read as usual.
    pub(crate) fn pause(&self) {
        self.pause.arm();
    }

    /// Whether a thread waits in the clock now.
    pub(crate) fn paused(&self) -> bool {
        self.pause.holding()
    }

    pub(crate) fn resume(&self) {
        self.pause.release();
    }
}

impl Clock for TestClock {
    fn now(&self) -> OffsetDateTime {
        self.pause.pass();
        *self.now.lock().unwrap()
    }
}

/// A plant over a main store of type `S` (in memory unless a test says otherwise).
pub(crate) struct Plant<S: Store = MemoryStore> {
    pub(crate) store: Arc<S>,
    /// The history store, apart from the main one as in the server.
    pub(crate) history: Arc<MemoryStore>,
    pub(crate) clock: Arc<TestClock>,
    pub(crate) twins: TwinService,
    pub(crate) telemetry: Telemetry,
    pub(crate) admin: Principal,
    pub(crate) keys: std::collections::HashMap<String, SigningKey>,
    pub(crate) seq: u64,
}

/// The plant's administrator: it provisions devices (Security Admin) and may feed the twins
/// they are bound to (Telemetry Writer), which binding a device needs.
pub(crate) fn admin() -> Principal {
    Principal::with_roles(
        "admin",
        &[DATA_OWNER, SECURITY_ADMIN, OPERATOR, TELEMETRY_WRITER],
    )
}

impl Plant {
    pub(crate) async fn new() -> Self {
        Self::new_on(Arc::new(MemoryStore::default())).await
    }
}

impl<S: Store> Plant<S> {
    /// The telemetry service opened again over the same stores, as after a restart.
    pub(crate) fn reopen(&self) -> Telemetry {
        let store: Arc<dyn Store> = self.store.clone();
        Telemetry::open(
            self.twins.clone(),
            store,
            self.history.clone(),
            self.clock.clone(),
        )
        .unwrap()
    }

    /// A plant whose main store is `store` (a shared one for several nodes).
    pub(crate) async fn new_on(store: Arc<S>) -> Self {
        let clock = Arc::new(TestClock::at_ms(T0));
        let twins = TwinService::open(store.clone(), clock.clone()).unwrap();
        twins
            .write(
                &admin(),
                WriteOp::UploadModels(vec![json!({
                    "@context": "dtmi:dtdl:context;3",
                    "@id": "dtmi:test:Boiler;1",
                    "@type": "Interface",
                    "contents": [
                        {"@type": "Property", "name": "temperature", "schema": "double"},
                        {"@type": "Property", "name": "valve", "schema": "string"},
                        {"@type": "Telemetry", "name": "pressure", "schema": "double"}
                    ]
                })]),
            )
            .await
            .unwrap();
        for id in ["boiler-1", "boiler-2"] {
            let body = json!({"$metadata": {"$model": "dtmi:test:Boiler;1"}});
            twins
                .write(
                    &admin(),
                    WriteOp::PutTwin {
                        id: id.into(),
                        body: body.as_object().cloned().unwrap(),
                        precondition: Precondition::None,
                    },
                )
                .await
                .unwrap();
        }
        let history = Arc::new(MemoryStore::default());
        let telemetry =
            Telemetry::open(twins.clone(), store.clone(), history.clone(), clock.clone()).unwrap();
        telemetry
            .put_firmware(
                &admin(),
                "thermo-1",
                FirmwareList {
                    device_model: String::new(),
                    digests: vec![FIRMWARE.into()],
                },
            )
            .await
            .unwrap();
        Self {
            store,
            history,
            clock,
            twins,
            telemetry,
            admin: admin(),
            keys: Default::default(),
            seq: 0,
        }
    }

    pub(crate) fn now_ms(&self) -> i64 {
        (self.clock.now().unix_timestamp_nanos() / 1_000_000) as i64
    }

    pub(crate) fn advance(&self, seconds: i64) {
        let mut now = self.clock.now.lock().unwrap();
        *now += time::Duration::seconds(seconds);
    }

    pub(crate) async fn device(&mut self, id: &str, names: &[&str]) {
        let registered = self
            .telemetry
            .register_device(
                &self.admin,
                id,
                NewDevice {
                    public_key: None,
                    generate: true,
                    device_model: "thermo-1".into(),
                    bindings: vec![Binding {
                        twin: "boiler-1".into(),
                        names: names.iter().map(|n| n.to_string()).collect(),
                    }],
                },
            )
            .await
            .unwrap();
        let pem = registered.private_key.unwrap();
        self.keys
            .insert(id.into(), signing_key_from_pem(pem.as_str()).unwrap());
    }

    pub(crate) fn message(&mut self, device: &str, name: &str, value: Value) -> Message {
        self.seq += 1;
        Message {
            device: device.into(),
            seq: self.seq,
            time: self.now_ms(),
            firmware: Some(FIRMWARE.into()),
            readings: vec![Reading {
                name: name.into(),
                value,
                twin: None,
                time: None,
            }],
        }
    }

    pub(crate) fn cose(&self, message: &Message) -> Vec<u8> {
        sign_cose(message, &self.keys[&message.device])
    }

    pub(crate) async fn send(&self, bytes: Vec<u8>) -> Outcome {
        self.telemetry
            .ingest(vec![bytes], Transport::Https)
            .await
            .unwrap()
            .remove(0)
    }

    pub(crate) async fn reading(&mut self, device: &str, name: &str, value: Value) -> Outcome {
        let m = self.message(device, name, value);
        let bytes = self.cose(&m);
        self.send(bytes).await
    }

    pub(crate) async fn set_status(
        &self,
        device: &str,
        change: StatusChange,
    ) -> Result<twinguard_telemetry::registry::Device, twinguard_core::error::DomainError> {
        self.telemetry.set_status(&self.admin, device, change).await
    }

    pub(crate) fn twin(&self) -> Value {
        let twin = self.twins.twin(&self.admin, "boiler-1").unwrap();
        serde_json::to_value(twin.json()).unwrap()
    }

    pub(crate) fn pending(&self) -> Vec<twinguard_telemetry::records::Quarantined> {
        self.telemetry
            .quarantine(&self.admin, Some(Review::Pending), None, 1000)
            .unwrap()
    }
}

#[tokio::test]
async fn an_accepted_reading_moves_the_twin_with_its_quality_source_and_time() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature", "pressure"]).await;
    let outcome = plant.reading("t1", "temperature", json!(21.5)).await;
    assert_eq!(outcome.status, Verdict::Accepted, "{outcome:?}");
    let twin = plant.twin();
    assert_eq!(twin["temperature"], json!(21.5));
    let meta = &twin["$metadata"]["temperature"];
    assert_eq!(meta["quality"], "good");
    assert_eq!(meta["sources"], json!(["t1"]));
    assert_eq!(meta["sourceTime"], "2027-01-15T08:00:00Z");
    // Telemetry is recorded, never stored on the twin.
    let outcome = plant.reading("t1", "pressure", json!(2.5)).await;
    assert_eq!(outcome.status, Verdict::Accepted);
    assert!(plant.twin().get("pressure").is_none());
    // A client's own write of the value carries no quality: only the pipeline vouches.
    plant
        .twins
        .write(
            &plant.admin,
            WriteOp::PatchTwin {
                id: "boiler-1".into(),
                component: None,
                patch: json!([{"op": "replace", "path": "/temperature", "value": 30.0}]),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
    assert!(
        plant.twin()["$metadata"]["temperature"]
            .get("quality")
            .is_none()
    );
}

#[tokio::test]
async fn jws_and_cose_messages_are_both_accepted() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let m = plant.message("t1", "temperature", json!(20.0));
    let jws = sign_jws(&m, &plant.keys["t1"]).into_bytes();
    assert_eq!(plant.send(jws).await.status, Verdict::Accepted);
    assert_eq!(plant.twin()["temperature"], json!(20.0));
}

#[tokio::test]
async fn replayed_tampered_foreign_and_stale_messages_are_rejected_with_their_reason() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    plant.device("t2", &["temperature"]).await;
    let m = plant.message("t1", "temperature", json!(20.0));
    let bytes = plant.cose(&m);
    assert_eq!(plant.send(bytes.clone()).await.status, Verdict::Accepted);
    let replay = plant.send(bytes.clone()).await;
    assert_eq!(
        (replay.status, replay.reason),
        (Verdict::Rejected, Some("replay"))
    );

    // One byte changed anywhere in the signature.
    let mut m = plant.message("t1", "temperature", json!(20.1));
    let mut tampered = plant.cose(&m);
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(plant.send(tampered).await.reason, Some("bad_signature"));

    // Signed by t2's key but claiming to be t1.
    m.seq += 1000;
    let foreign = sign_cose(&m, &plant.keys["t2"]);
    assert_eq!(plant.send(foreign).await.reason, Some("bad_signature"));

    // Older than the replay window.
    let mut old = plant.message("t1", "temperature", json!(20.2));
    old.seq = 5_000;
    let b = plant.cose(&old);
    assert_eq!(plant.send(b).await.status, Verdict::Accepted);
    old.seq = 5_000 - 1024;
    let b = plant.cose(&old);
    assert_eq!(plant.send(b).await.reason, Some("too_old"));

    // Stamped far from the server's clock.
    let mut late = plant.message("t1", "temperature", json!(20.3));
    late.time -= 10 * 60 * 1000;
    let b = plant.cose(&late);
    assert_eq!(plant.send(b).await.reason, Some("timestamp"));

    // Garbage and unknown devices.
    assert_eq!(
        plant.send(b"not an envelope".to_vec()).await.reason,
        Some("malformed")
    );
    // Nothing refused was stored as data.
    assert!(plant.pending().is_empty());
    assert_eq!(plant.twin()["temperature"], json!(20.2));
}

#[tokio::test]
async fn a_large_batch_answers_each_message_in_its_place() {
    // Refusals at both ends and in the middle: every answer must stay with its message.
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let mut batch = Vec::new();
    for i in 0..200 {
        let m = plant.message("t1", "temperature", json!(20.0 + f64::from(i % 3) * 0.01));
        batch.push(plant.cose(&m));
    }
    let tampered = [5usize, 120, 199];
    for &i in &tampered {
        let last = batch[i].len() - 1;
        batch[i][last] ^= 1;
    }
    batch[50] = b"not an envelope".to_vec();
    let outcomes = plant
        .telemetry
        .ingest(batch, Transport::Https)
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 200);
    for (i, outcome) in outcomes.iter().enumerate() {
        let expected = if tampered.contains(&i) {
            Some("bad_signature")
        } else if i == 50 {
            Some("malformed")
        } else {
            None
        };
        assert_eq!(outcome.reason, expected, "message {i}: {outcome:?}");
        let status = if expected.is_some() {
            Verdict::Rejected
        } else {
            Verdict::Accepted
        };
        assert_eq!(outcome.status, status, "message {i}");
    }
}

/// A twin's document without its `$etag`, which every write renews.
fn without_etag(mut twin: Value) -> Value {
    twin.as_object_mut().unwrap().remove("$etag");
    twin
}

#[tokio::test]
async fn a_batch_that_moves_one_twin_many_times_leaves_it_as_one_message_at_a_time_would() {
    let mut plants = [Plant::new().await, Plant::new().await];
    let mut batches = [Vec::new(), Vec::new()];
    for (plant, batch) in plants.iter_mut().zip(&mut batches) {
        plant.device("t1", &["temperature", "valve"]).await;
        plant.device("t2", &["temperature"]).await;
        let mut two = plant.message("t1", "temperature", json!(21.0));
        two.readings.push(Reading {
            name: "valve".into(),
            value: json!("open"),
            twin: None,
            time: None,
        });
        let messages = [
            plant.message("t2", "temperature", json!(20.5)),
            two,
            plant.message("t1", "temperature", json!(22.0)),
            plant.message("t2", "valve", json!("shut")), // not bound: quarantined
        ];
        batch.extend(messages.iter().map(|m| plant.cose(m)));
    }
    let [together, one_by_one] = &plants;
    let [batch, singles] = batches;
    let outcomes = together
        .telemetry
        .ingest(batch, Transport::Https)
        .await
        .unwrap();
    let verdicts: Vec<Verdict> = outcomes.iter().map(|o| o.status).collect();
    assert_eq!(
        verdicts,
        [
            Verdict::Accepted,
            Verdict::Accepted,
            Verdict::Accepted,
            Verdict::Quarantined
        ]
    );
    for bytes in singles {
        one_by_one.send(bytes).await;
    }
    let twin = together.twin();
    assert_eq!(twin["temperature"], json!(22.0));
    assert_eq!(twin["valve"], json!("open"));
    assert_eq!(twin["$metadata"]["temperature"]["sources"], json!(["t1"]));
    assert_eq!(without_etag(twin), without_etag(one_by_one.twin()));
}

#[tokio::test]
async fn a_reading_overtaken_by_a_later_one_of_the_same_time_does_not_move_the_twin_back() {
    // The test clock stands still, so both readings carry the same time; the device numbered
    // them, and the twin must end on the later one whatever order they are decided in.
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    plant.device("t2", &["temperature"]).await;
    let first = plant.message("t1", "temperature", json!(21.0));
    let second = plant.message("t1", "temperature", json!(22.0));
    let (first, second) = (plant.cose(&first), plant.cose(&second));
    assert_eq!(plant.send(second).await.status, Verdict::Accepted);
    assert_eq!(plant.send(first).await.status, Verdict::Accepted);
    assert_eq!(plant.twin()["temperature"], json!(22.0));
    // Another device's reading of the same time is newer news for the twin.
    assert_eq!(
        plant.reading("t2", "temperature", json!(23.0)).await.status,
        Verdict::Accepted
    );
    assert_eq!(plant.twin()["temperature"], json!(23.0));
    assert_eq!(
        plant.twin()["$metadata"]["temperature"]["sources"],
        json!(["t2"])
    );
}

#[tokio::test]
async fn every_message_of_a_batch_stays_refused_as_a_replay_after_a_restart() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    plant.device("t2", &["temperature"]).await;
    let batch: Vec<Vec<u8>> = (0..6)
        .map(|i| {
            let device = if i % 2 == 0 { "t1" } else { "t2" };
            let m = plant.message(device, "temperature", json!(20.0 + f64::from(i) * 0.01));
            plant.cose(&m)
        })
        .collect();
    let outcomes = plant
        .telemetry
        .ingest(batch.clone(), Transport::Https)
        .await
        .unwrap();
    assert!(outcomes.iter().all(|o| o.status == Verdict::Accepted));
    let reopened = plant.reopen();
    let again = reopened.ingest(batch, Transport::Mqtt).await.unwrap();
    let reasons: Vec<Option<&str>> = again.iter().map(|o| o.reason).collect();
    assert_eq!(reasons, [Some("replay"); 6]);
}

#[tokio::test]
async fn suspended_and_revoked_devices_are_refused_on_the_next_message() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    assert_eq!(
        plant.reading("t1", "temperature", json!(1.0)).await.status,
        Verdict::Accepted
    );
    plant.set_status("t1", StatusChange::Suspend).await.unwrap();
    assert_eq!(
        plant.reading("t1", "temperature", json!(2.0)).await.reason,
        Some("suspended")
    );
    plant.set_status("t1", StatusChange::Resume).await.unwrap();
    assert_eq!(
        plant.reading("t1", "temperature", json!(3.0)).await.status,
        Verdict::Accepted
    );
    plant.set_status("t1", StatusChange::Revoke).await.unwrap();
    assert_eq!(
        plant.reading("t1", "temperature", json!(4.0)).await.reason,
        Some("revoked")
    );
    assert!(
        plant.set_status("t1", StatusChange::Resume).await.is_err(),
        "a revocation cannot be undone"
    );
    assert_eq!(plant.twin()["temperature"], json!(3.0));
}

#[tokio::test]
async fn a_key_registered_twice_or_a_caller_without_the_role_is_refused() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let jwk = plant
        .telemetry
        .device(&plant.admin, "t1")
        .unwrap()
        .public_key;
    let again = plant
        .telemetry
        .register_device(
            &plant.admin,
            "t9",
            NewDevice {
                public_key: Some(jwk),
                generate: false,
                device_model: "thermo-1".into(),
                bindings: vec![],
            },
        )
        .await;
    assert!(again.is_err(), "two devices may not share a key");
    let reader = Principal::with_roles("reader", &[twinguard_core::auth::DATA_READER]);
    assert!(plant.telemetry.devices(&reader).is_err());
    assert!(plant.telemetry.quarantine(&reader, None, None, 10).is_err());
}

#[tokio::test]
async fn unknown_firmware_holds_every_reading_until_the_device_reports_approved_firmware() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let mut m = plant.message("t1", "temperature", json!(30.0));
    m.firmware = Some("00".repeat(32));
    let b = plant.cose(&m);
    let outcome = plant.send(b).await;
    assert_eq!(outcome.status, Verdict::Quarantined);
    assert_eq!(outcome.readings[0].reasons, vec!["firmware_unknown"]);
    // A message without a digest is judged by the last one attested.
    let mut m = plant.message("t1", "temperature", json!(31.0));
    m.firmware = None;
    let b = plant.cose(&m);
    assert_eq!(plant.send(b).await.status, Verdict::Quarantined);
    assert!(plant.twin().get("temperature").is_none());
    assert_eq!(
        plant.pending().len(),
        2,
        "held readings are kept, not dropped"
    );
    assert_eq!(
        plant.reading("t1", "temperature", json!(32.0)).await.status,
        Verdict::Accepted
    );
}

#[tokio::test]
async fn impossible_readings_are_quarantined_and_a_reviewer_can_release_or_discard_them() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let policy: Policy = serde_json::from_value(json!({
        "model": "dtmi:test:Boiler;1", "property": "temperature",
        "min": -40.0, "max": 150.0, "unit": "degreeCelsius", "maxRatePerSecond": 5.0
    }))
    .unwrap();
    plant
        .telemetry
        .put_policy(&plant.admin, "boiler-temp", policy)
        .await
        .unwrap();
    assert_eq!(
        plant.reading("t1", "temperature", json!(20.0)).await.status,
        Verdict::Accepted
    );
    let hot = plant.reading("t1", "temperature", json!(900.0)).await;
    assert_eq!(hot.readings[0].reasons, vec!["above_max", "rate_of_change"]);
    plant.advance(1);
    let jump = plant.reading("t1", "temperature", json!(60.0)).await;
    assert_eq!(jump.readings[0].reasons, vec!["rate_of_change"]);
    let wrong_type = plant.reading("t1", "temperature", json!("warm")).await;
    assert_eq!(wrong_type.readings[0].reasons, vec!["schema"]);
    let unbound = plant.reading("t1", "valve", json!("open")).await;
    assert_eq!(unbound.readings[0].reasons, vec!["not_bound"]);
    assert_eq!(plant.twin()["temperature"], json!(20.0));

    let pending = plant.pending();
    assert_eq!(pending.len(), 4);
    let released = plant
        .telemetry
        .review(&plant.admin, &pending[1].id, Decision::Release)
        .await
        .unwrap();
    assert_eq!(released.status, Review::Released);
    assert_eq!(released.decided_by.as_deref(), Some("admin"));
    assert_eq!(plant.twin()["temperature"], json!(60.0));
    plant
        .telemetry
        .review(&plant.admin, &pending[0].id, Decision::Discard)
        .await
        .unwrap();
    assert!(
        plant
            .telemetry
            .review(&plant.admin, &pending[0].id, Decision::Release)
            .await
            .is_err(),
        "a decision is final"
    );
    assert_eq!(plant.pending().len(), 2);
    let discarded = plant
        .telemetry
        .quarantine(&plant.admin, Some(Review::Discarded), None, 10)
        .unwrap();
    assert_eq!(discarded[0].value, json!(900.0));
}

pub(crate) fn group(devices: &[&str]) -> SensorGroup {
    serde_json::from_value(json!({
        "twin": "boiler-1", "property": "temperature",
        "devices": devices, "method": "median", "tolerance": 1.0, "freshSeconds": 30.0
    }))
    .unwrap()
}

#[tokio::test]
async fn one_lying_sensor_of_three_cannot_move_the_twin_and_is_marked_suspect() {
    for lie in ["spike", "drift", "stuck"] {
        let mut plant = Plant::new().await;
        for d in ["a", "b", "c"] {
            plant.device(d, &["temperature"]).await;
        }
        plant
            .telemetry
            .put_group(&plant.admin, "boiler-temp", group(&["a", "b", "c"]))
            .await
            .unwrap();
        let mut worst: f64 = 0.0;
        for step in 0..60 {
            let truth = 70.0 + 0.2 * (step as f64 * 0.3).sin() + step as f64 * 0.1;
            let liar = match lie {
                "spike" if step % 3 == 0 => truth + 50.0,
                "spike" => truth,
                "drift" => truth + 0.25 * step as f64,
                _ => 70.0,
            };
            plant.reading("a", "temperature", json!(truth)).await;
            plant.reading("b", "temperature", json!(truth + 0.1)).await;
            plant.reading("c", "temperature", json!(liar)).await;
            let shown = plant.twin()["temperature"].as_f64().unwrap();
            worst = worst.max((shown - truth).abs());
            plant.advance(1);
        }
        assert!(
            worst <= 1.0,
            "{lie}: the twin strayed {worst} from the truth"
        );
        let c = plant.telemetry.device(&plant.admin, "c").unwrap();
        assert!(c.suspect.is_some(), "{lie}: the liar was not flagged");
        for honest in ["a", "b"] {
            assert!(
                plant
                    .telemetry
                    .device(&plant.admin, honest)
                    .unwrap()
                    .suspect
                    .is_none()
            );
        }
        assert_eq!(plant.twin()["$metadata"]["temperature"]["quality"], "good");
    }
}

#[tokio::test]
async fn a_stale_stream_falls_back_to_a_forecast_marked_estimated() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let policy: Policy = serde_json::from_value(json!({
        "model": "dtmi:test:Boiler;1", "property": "temperature", "staleAfterSeconds": 10.0
    }))
    .unwrap();
    plant
        .telemetry
        .put_policy(&plant.admin, "p", policy)
        .await
        .unwrap();
    for step in 0..20 {
        plant
            .reading("t1", "temperature", json!(50.0 + step as f64))
            .await;
        plant.advance(1);
    }
    assert_eq!(plant.telemetry.sweep().await.unwrap(), 0);
    plant.advance(15);
    assert_eq!(plant.telemetry.sweep().await.unwrap(), 1);
    let twin = plant.twin();
    assert_eq!(twin["$metadata"]["temperature"]["quality"], "estimated");
    let forecast = twin["temperature"].as_f64().unwrap();
    assert!(forecast > 69.0 && forecast < 90.0, "forecast {forecast}");
    let degraded = plant.telemetry.degraded().unwrap();
    assert_eq!(degraded.len(), 1);
    // Fresh data brings it back.
    plant.reading("t1", "temperature", json!(70.0)).await;
    assert_eq!(plant.twin()["$metadata"]["temperature"]["quality"], "good");
    assert!(plant.telemetry.degraded().unwrap().is_empty());
}

#[tokio::test]
async fn a_group_that_loses_quorum_shows_an_estimate() {
    let mut plant = Plant::new().await;
    for d in ["a", "b", "c"] {
        plant.device(d, &["temperature"]).await;
    }
    plant
        .telemetry
        .put_group(&plant.admin, "g", group(&["a", "b", "c"]))
        .await
        .unwrap();
    for step in 0..10 {
        for d in ["a", "b", "c"] {
            plant
                .reading(d, "temperature", json!(40.0 + step as f64 * 0.01))
                .await;
        }
        plant.advance(1);
    }
    // Only one member keeps reporting: no quorum.
    plant.advance(40);
    plant.reading("a", "temperature", json!(40.2)).await;
    let meta = &plant.twin()["$metadata"]["temperature"];
    assert_eq!(meta["quality"], "estimated", "{meta}");
    assert_eq!(meta["sources"], json!(["forecast"]));
}

#[tokio::test]
async fn the_replay_window_survives_a_restart() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let m = plant.message("t1", "temperature", json!(20.0));
    let bytes = plant.cose(&m);
    assert_eq!(plant.send(bytes.clone()).await.status, Verdict::Accepted);
    let reopened = plant.reopen();
    let again = reopened.ingest(vec![bytes], Transport::Mqtt).await.unwrap();
    assert_eq!(again[0].reason, Some("replay"));
}

#[tokio::test]
async fn a_failed_commit_is_not_acknowledged_and_the_same_message_can_be_sent_again() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let m = plant.message("t1", "temperature", json!(20.0));
    let bytes = plant.cose(&m);
    plant.store.set_failing(true);
    assert!(
        plant
            .telemetry
            .ingest(vec![bytes.clone()], Transport::Https)
            .await
            .is_err()
    );
    plant.store.set_failing(false);
    assert_eq!(plant.send(bytes).await.status, Verdict::Accepted);
    assert_eq!(plant.twin()["temperature"], json!(20.0));
}

#[tokio::test]
async fn history_returns_ranges_and_downsampled_buckets() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let start = plant.now_ms();
    for step in 0..30 {
        plant.reading("t1", "temperature", json!(step as f64)).await;
        plant.advance(1);
    }
    let all = plant
        .telemetry
        .history(
            &plant.admin,
            "boiler-1",
            "temperature",
            HistoryQuery {
                from_ms: start,
                to_ms: start + 60_000,
                interval_ms: None,
                limit: 100,
            },
        )
        .unwrap();
    let readings = all.readings.unwrap();
    assert_eq!(readings.len(), 30);
    assert_eq!(readings[29].value, json!(29.0));
    let part = plant
        .telemetry
        .history(
            &plant.admin,
            "boiler-1",
            "temperature",
            HistoryQuery {
                from_ms: start + 10_000,
                to_ms: start + 20_000,
                interval_ms: None,
                limit: 5,
            },
        )
        .unwrap();
    assert!(part.truncated);
    assert_eq!(part.readings.unwrap()[0].value, json!(10.0));
    let buckets = plant
        .telemetry
        .history(
            &plant.admin,
            "boiler-1",
            "temperature",
            HistoryQuery {
                from_ms: start,
                to_ms: start + 30_000,
                interval_ms: Some(10_000),
                limit: 0,
            },
        )
        .unwrap()
        .buckets
        .unwrap();
    assert_eq!(buckets.len(), 3);
    assert_eq!(
        (
            buckets[1].count,
            buckets[1].min,
            buckets[1].max,
            buckets[1].mean
        ),
        (10, 10.0, 19.0, 14.5)
    );
    // A caller who may not read the twin reads no history.
    let nobody = Principal::with_roles("nobody", &[]);
    assert!(
        plant
            .telemetry
            .history(
                &nobody,
                "boiler-1",
                "temperature",
                HistoryQuery {
                    from_ms: start,
                    to_ms: start + 1,
                    interval_ms: None,
                    limit: 1
                }
            )
            .is_err()
    );
}

#[tokio::test]
async fn a_reading_that_breaks_the_streams_history_is_held_and_the_stream_goes_on() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    for step in 0..400 {
        let value = 60.0 + 0.5 * (step as f64 * 0.2).sin();
        let outcome = plant.reading("t1", "temperature", json!(value)).await;
        assert_eq!(
            outcome.status,
            Verdict::Accepted,
            "step {step}: {outcome:?}"
        );
        plant.advance(1);
    }
    let spike = plant.reading("t1", "temperature", json!(95.0)).await;
    assert_eq!(spike.status, Verdict::Quarantined, "{spike:?}");
    assert_eq!(spike.readings[0].reasons, vec!["anomaly"]);
    assert!(spike.readings[0].anomaly_score.unwrap() >= 0.41);
    plant.advance(1);
    let next = plant.reading("t1", "temperature", json!(60.2)).await;
    assert_eq!(next.status, Verdict::Accepted, "{next:?}");
    assert_eq!(plant.twin()["temperature"], json!(60.2));
    assert_eq!(plant.pending()[0].reasons, vec!["anomaly"]);
}

/// A caller holding `devices/read` (and `twins/read`) on the subtree of `root` only.
fn device_reader_of(root: &str) -> Principal {
    use twinguard_core::auth::{Action, Grant, PrincipalKind, RoleId, Scope};
    let grant = Grant {
        role: RoleId("device-reader".into()),
        actions: [Action::DevicesRead, Action::TwinsRead]
            .into_iter()
            .collect(),
        scope: Scope::Subtree {
            root: root.into(),
            relationships: vec!["contains".into()],
        },
    };
    Principal::new(
        "eve",
        PrincipalKind::Application,
        vec![grant].into(),
        false,
        false,
    )
}

/// Everything the telemetry administration reads show `who`, as a client would see it.
fn telemetry_view(plant: &Plant, who: &Principal) -> String {
    let t = &plant.telemetry;
    let device = |id: &str| match t.device(who, id) {
        Ok(d) => serde_json::to_string(&d).unwrap(),
        Err(twinguard_core::error::DomainError::Hidden(absent)) => format!("{absent:?}"),
        Err(e) => format!("{e:?}"),
    };
    format!(
        "devices {}\nd-two {}\nd-both {}\ngroups {}\nfirmware {}\npolicies {}\nquarantine {:?}",
        serde_json::to_string(&t.devices(who).unwrap()).unwrap(),
        device("d-two").replace("d-two", "<id>"),
        device("d-both"),
        serde_json::to_string(&t.groups(who).unwrap()).unwrap(),
        serde_json::to_string(&t.firmware(who).unwrap()).unwrap(),
        serde_json::to_string(&t.policies(who).unwrap()).unwrap(),
        t.quarantine(who, None, None, 10).map(|q| q.len()),
    )
}

#[tokio::test]
async fn a_device_reader_scoped_to_a_subtree_sees_no_device_group_or_twin_outside_it() {
    let plant = Plant::new().await;
    let a = &plant.admin;
    for (id, model, twins) in [
        ("d-one", "thermo-1", vec!["boiler-1"]),
        ("d-two", "thermo-2", vec!["boiler-2"]),
        ("d-both", "thermo-1", vec!["boiler-1", "boiler-2"]),
    ] {
        let bindings = twins
            .into_iter()
            .map(|twin| Binding {
                twin: twin.into(),
                names: vec!["temperature".into()],
            })
            .collect();
        let new = NewDevice {
            public_key: None,
            generate: true,
            device_model: model.into(),
            bindings,
        };
        plant.telemetry.register_device(a, id, new).await.unwrap();
    }
    let firmware = FirmwareList {
        device_model: String::new(),
        digests: vec![FIRMWARE.into()],
    };
    plant
        .telemetry
        .put_firmware(a, "thermo-2", firmware)
        .await
        .unwrap();
    for twin in ["boiler-1", "boiler-2"] {
        let mut g = group(&["d-one", "d-both"]);
        g.twin = twin.into();
        plant
            .telemetry
            .put_group(a, &format!("g-{twin}"), g)
            .await
            .unwrap();
    }
    let policy: Policy = serde_json::from_value(json!({
        "model": "dtmi:test:Boiler;1", "property": "temperature", "min": -50.0, "max": 500.0
    }))
    .unwrap();
    plant.telemetry.put_policy(a, "p", policy).await.unwrap();

    let eve = device_reader_of("boiler-1");
    let seen = telemetry_view(&plant, &eve);
    // The listings used to show d-two, the group on boiler-2 and d-both's binding to it.
    assert!(!seen.contains("boiler-2"), "{seen}");
    assert!(!seen.contains("thermo-2"), "{seen}");
    assert!(
        seen.contains("d-one") && seen.contains("g-boiler-1"),
        "{seen}"
    );
    // Hidden equals absent: with boiler-2 gone (and nothing else changed), eve sees the same.
    plant
        .twins
        .write(
            a,
            WriteOp::DeleteTwin {
                id: "boiler-2".into(),
                precondition: Precondition::None,
            },
        )
        .await
        .unwrap();
    assert_eq!(telemetry_view(&plant, &eve), seen);
    // d-two is now as absent for eve as a device that was never registered.
    assert!(seen.contains(&format!(
        "d-two {:?}",
        plant.telemetry.device(&eve, "<id>").unwrap_err()
    )));
    // The instance-wide administrator still sees everything as it was registered.
    let all = telemetry_view(&plant, a);
    assert!(all.contains("d-two") && all.contains("g-boiler-2") && all.contains("thermo-2"));
}

fn refused<T>(r: &Result<T, twinguard_core::error::DomainError>) -> bool {
    matches!(r, Err(twinguard_core::error::DomainError::Forbidden { action }) if *action == "twinguard/telemetry/write")
}

#[tokio::test]
async fn the_devices_permission_alone_binds_no_device_or_group_to_a_twin() {
    use twinguard_core::auth::{Action, Grant, PrincipalKind, RoleId, Scope};
    let plant = Plant::new().await;
    let t = &plant.telemetry;
    let new = |twin: &str| NewDevice {
        public_key: None,
        generate: true,
        device_model: "thermo-1".into(),
        bindings: vec![Binding {
            twin: twin.into(),
            names: vec!["temperature".into()],
        }],
    };
    // Security Admin holds devices/write but no telemetry/write: a device it binds to a twin
    // would let it move that twin with readings signed by a key it chose (issue 16, deputies).
    let security_admin = Principal::with_roles("sa", &[SECURITY_ADMIN]);
    assert!(refused(
        &t.register_device(&security_admin, "rogue", new("boiler-1"))
            .await
    ));
    let unbound = NewDevice {
        bindings: vec![],
        ..new("boiler-1")
    };
    t.register_device(&security_admin, "spare", unbound)
        .await
        .unwrap();
    let rebind = vec![Binding {
        twin: "boiler-1".into(),
        names: vec!["temperature".into()],
    }];
    assert!(refused(
        &t.set_bindings(&security_admin, "spare", rebind.clone())
            .await
    ));
    assert!(refused(
        &t.put_group(&security_admin, "g", group(&["spare"])).await
    ));
    // With telemetry/write on boiler-1's subtree as well, it binds there, and a twin outside
    // the subtree is refused exactly like one that does not exist.
    let grants = vec![
        Grant {
            role: RoleId("sa".into()),
            actions: [Action::DevicesWrite].into_iter().collect(),
            scope: Scope::Instance,
        },
        Grant {
            role: RoleId("feeder".into()),
            actions: [Action::TelemetryWrite].into_iter().collect(),
            scope: Scope::Subtree {
                root: "boiler-1".into(),
                relationships: vec!["contains".into()],
            },
        },
    ];
    let feeder = Principal::new("f", PrincipalKind::Application, grants.into(), false, false);
    t.set_bindings(&feeder, "spare", rebind).await.unwrap();
    let outside = t.register_device(&feeder, "d-out", new("boiler-2")).await;
    let absent = t
        .register_device(&feeder, "d-none", new("no-such-boiler"))
        .await;
    assert!(refused(&outside) && refused(&absent));
    assert_eq!(
        format!("{:?}", outside.err()),
        format!("{:?}", absent.err())
    );
}
