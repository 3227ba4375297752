//! The MQTT path with an attacker on the same broker (issue 18, finding 4): the real Mosquitto on
//! 127.0.0.1:1883 (every test on topics of its own, sessions it made ended afterwards), and for
//! credentials a Mosquitto of the test's own with a password file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use coset::TaggedCborSerializable;
use ed25519_dalek::{SigningKey, Verifier, VerifyingKey};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use sha2::Digest;
use tempfile::TempDir;
use tokio::sync::mpsc;
use twinguard_core::auth::{DATA_OWNER, OPERATOR, Principal, SECURITY_ADMIN, TELEMETRY_WRITER};
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_server::mqtt::MqttConfig;
use twinguard_telemetry::envelope::{Message, Reading, sign_cose, signing_key_from_pem};
use twinguard_telemetry::manage::{HistoryQuery, NewDevice};
use twinguard_telemetry::registry::{Binding, FirmwareList};

use crate::kit::{TestServer, uuid_like};

const BROKER: &str = "mqtt://127.0.0.1:1883";
const FIRMWARE: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
/// Readings the devices publish, as in the attack that found the weakness.
const READINGS: u64 = 40;
/// How long a test waits for something it expects before failing (a deadline, not a measure).
const PATIENCE: Duration = Duration::from_secs(60);

fn admin() -> Principal {
    Principal::with_roles(
        "admin",
        &[DATA_OWNER, SECURITY_ADMIN, OPERATOR, TELEMETRY_WRITER],
    )
}

/// Topics of one test: `<base>/telemetry/#` in, `<base>/receipts/<device>` out.
struct Topics {
    base: String,
}

impl Topics {
    fn new() -> Self {
        Self {
            base: format!("tg-it-{}", uuid_like()),
        }
    }
    fn telemetry(&self, device: &str) -> String {
        format!("{}/telemetry/{device}", self.base)
    }
    fn filter(&self) -> String {
        format!("{}/telemetry/#", self.base)
    }
    fn receipts(&self) -> String {
        format!("{}/receipts", self.base)
    }
    fn config(&self, url: &str) -> MqttConfig {
        let mut config = MqttConfig::new(url, self.filter());
        config.receipt_prefix = self.receipts();
        config
    }
}

/// A model, one twin per device, the firmware allowlist, and the devices bound to their twin's
/// temperature; their signing keys.
async fn provision(
    state: &twinguard_server::app::AppState,
    devices: &[&str],
) -> HashMap<String, SigningKey> {
    let admin = admin();
    state
        .service
        .write(
            &admin,
            WriteOp::UploadModels(vec![json!({
                "@context": "dtmi:dtdl:context;3",
                "@id": "dtmi:test:Boiler;1",
                "@type": "Interface",
                "contents": [{"@type": "Property", "name": "temperature", "schema": "double"}]
            })]),
        )
        .await
        .unwrap();
    state
        .telemetry
        .put_firmware(
            &admin,
            "thermo-1",
            FirmwareList {
                device_model: String::new(),
                digests: vec![FIRMWARE.into()],
            },
        )
        .await
        .unwrap();
    let mut keys = HashMap::new();
    for device in devices {
        let body = json!({"$metadata": {"$model": "dtmi:test:Boiler;1"}});
        state
            .service
            .write(
                &admin,
                WriteOp::PutTwin {
                    id: twin_of(device),
                    body: body.as_object().cloned().unwrap(),
                    precondition: Precondition::None,
                },
            )
            .await
            .unwrap();
        let registered = state
            .telemetry
            .register_device(
                &admin,
                device,
                NewDevice {
                    public_key: None,
                    generate: true,
                    device_model: "thermo-1".into(),
                    bindings: vec![Binding {
                        twin: twin_of(device),
                        names: vec!["temperature".into()],
                    }],
                },
            )
            .await
            .unwrap();
        let pem = registered.private_key.unwrap();
        keys.insert(device.to_string(), signing_key_from_pem(&pem).unwrap());
    }
    keys
}

fn twin_of(device: &str) -> String {
    format!("boiler-of-{device}")
}

/// `count` signed readings of each device, by sequence number.
fn sign_readings(
    keys: &HashMap<String, SigningKey>,
    count: u64,
) -> BTreeMap<(String, u64), Vec<u8>> {
    let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let mut out = BTreeMap::new();
    for (device, key) in keys {
        for seq in 1..=count {
            let message = Message {
                device: device.clone(),
                seq,
                time: now + seq as i64,
                firmware: Some(FIRMWARE.into()),
                readings: vec![Reading {
                    name: "temperature".into(),
                    value: json!(20.0 + (seq % 3) as f64 / 10.0),
                    twin: None,
                    time: None,
                }],
            };
            out.insert((device.clone(), seq), sign_cose(&message, key));
        }
    }
    out
}

/// The sequence numbers of `device` in its twin's history.
fn history(state: &twinguard_server::app::AppState, device: &str) -> BTreeSet<u64> {
    let history = state
        .telemetry
        .history(
            &admin(),
            &twin_of(device),
            "temperature",
            HistoryQuery {
                from_ms: 0,
                to_ms: i64::MAX,
                interval_ms: None,
                limit: 10_000,
            },
        )
        .unwrap();
    history
        .readings
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.device == device)
        .map(|e| e.seq)
        .collect()
}

/// Waits until `done` holds, failing the test after [`PATIENCE`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn options(client_id: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// What a client connected as `client_id` received, counted, while it runs: an attacker who
/// resumes a persistent session (no clean start, never expiring) and acknowledges everything,
/// reconnecting at once whenever it is thrown out.
struct Attacker {
    task: tokio::task::JoinHandle<()>,
    taken: mpsc::UnboundedReceiver<Vec<u8>>,
    connected: mpsc::UnboundedReceiver<()>,
}

impl Attacker {
    fn start(client_id: &str) -> Self {
        let mut opts = options(client_id, 1883);
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(u32::MAX));
        let (_client, mut events) = AsyncClient::new(opts, 64);
        let (taken_tx, taken) = mpsc::unbounded_channel();
        let (connected_tx, connected) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _client = _client;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = connected_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = taken_tx.send(p.payload.to_vec());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Self {
            task,
            taken,
            connected,
        }
    }

    /// Stops the attacker and ends the session it may hold (clean start, no expiry), so the
    /// broker keeps nothing of the test.
    async fn stop(mut self) -> Vec<Vec<u8>> {
        self.task.abort();
        let _ = self.task.await;
        let mut taken = Vec::new();
        while let Ok(p) = self.taken.try_recv() {
            taken.push(p);
        }
        taken
    }
}

/// Ends any session the broker holds under `client_id`.
async fn end_session(client_id: &str, port: u16) {
    let mut opts = options(client_id, port);
    opts.set_clean_start(true);
    opts.set_session_expiry_interval(Some(0));
    let (client, mut events) = AsyncClient::new(opts, 8);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
}

/// Whether the broker still holds a session under `client_id` (connecting to look ends it).
async fn session_present(client_id: &str) -> bool {
    let mut opts = options(client_id, 1883);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(0));
    let (client, mut events) = AsyncClient::new(opts, 8);
    let present = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => break ack.session_present,
            Ok(Ok(_)) => {}
            other => panic!("probing the session of {client_id}: {other:?}"),
        }
    };
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
    present
}

/// Devices' publisher: publishes at QoS 1 and collects the receipts of every device, as
/// `(device, seq) -> (status, reason, digest)` once their signature verifies with the receipt
/// key.
struct Devices {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
    receipts: mpsc::UnboundedReceiver<Vec<u8>>,
    acked: mpsc::UnboundedReceiver<()>,
    subscribed: mpsc::UnboundedReceiver<()>,
}

impl Devices {
    async fn start(port: u16, receipt_filter: &str, login: Option<(&str, &str)>) -> Self {
        let mut opts = options(&format!("tg-it-dev-{}", uuid_like()), port);
        if let Some((user, password)) = login {
            opts.set_credentials(user, password);
        }
        let (client, mut events) = AsyncClient::new(opts, 256);
        let (receipts_tx, receipts) = mpsc::unbounded_channel();
        let (acked_tx, acked) = mpsc::unbounded_channel();
        let (sub_tx, subscribed) = mpsc::unbounded_channel();
        let filter = receipt_filter.to_owned();
        let subscriber = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = subscriber
                            .subscribe_many([Filter::new(filter.clone(), QoS::AtMostOnce)])
                            .await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = receipts_tx.send(p.payload.to_vec());
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let _ = acked_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let mut devices = Self {
            client,
            task,
            receipts,
            acked,
            subscribed,
        };
        tokio::time::timeout(PATIENCE, devices.subscribed.recv())
            .await
            .expect("the devices' receipt subscription");
        devices
    }

    /// Publishes each message at QoS 1 and waits for the broker's acknowledgements (which
    /// prove nothing about twinguard).
    async fn publish(&mut self, topics: &Topics, messages: &[(&(String, u64), &Vec<u8>)]) {
        for ((device, _), bytes) in messages {
            self.client
                .publish(
                    topics.telemetry(device),
                    QoS::AtLeastOnce,
                    false,
                    (*bytes).clone(),
                )
                .await
                .unwrap();
        }
        for _ in messages {
            tokio::time::timeout(PATIENCE, self.acked.recv())
                .await
                .expect("the broker's PUBACK");
        }
    }

    fn stop(self) {
        self.task.abort();
    }
}

/// A receipt's payload, after its signature verified.
#[derive(Debug, serde::Deserialize)]
struct ReceiptBody {
    device: String,
    seq: u64,
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[allow(dead_code)]
    time: String,
    digest: serde_bytes_like::Bytes,
}

mod serde_bytes_like {
    /// A CBOR byte string.
    #[derive(Debug)]
    pub struct Bytes(pub Vec<u8>);

    impl<'de> serde::Deserialize<'de> for Bytes {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
            }
            d.deserialize_bytes(Visitor)
        }
    }
}

/// The receipt key from `DATA_DIR/mqtt/receipt-key.jwk`, as a device would be given it.
fn receipt_key(dir: &std::path::Path) -> VerifyingKey {
    let jwk: Value =
        serde_json::from_slice(&std::fs::read(dir.join("mqtt/receipt-key.jwk")).unwrap()).unwrap();
    assert_eq!(jwk["kty"], "OKP");
    assert_eq!(jwk["crv"], "Ed25519");
    let x = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        jwk["x"].as_str().unwrap(),
    )
    .unwrap();
    VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap()
}

/// Verifies a receipt as a device does: COSE_Sign1, EdDSA, signed by the receipt key.
fn verify_receipt(key: &VerifyingKey, bytes: &[u8]) -> ReceiptBody {
    let sign1 = coset::CoseSign1::from_tagged_slice(bytes).unwrap();
    assert_eq!(
        sign1.protected.header.alg,
        Some(coset::RegisteredLabelWithPrivate::Assigned(
            coset::iana::Algorithm::EdDSA
        ))
    );
    sign1
        .verify_signature(b"", |signature, data| {
            let signature = ed25519_dalek::Signature::from_slice(signature).map_err(|_| ())?;
            key.verify(data, &signature).map_err(|_| ())
        })
        .expect("a receipt that does not verify with the receipt key");
    ciborium::from_reader(sign1.payload.unwrap().as_slice()).unwrap()
}

/// Every receipt received so far, verified, by `(device, seq)`; checks each binds the message
/// the device sent (its SHA-256).
fn drain_receipts(
    devices: &mut Devices,
    key: &VerifyingKey,
    sent: &BTreeMap<(String, u64), Vec<u8>>,
    into: &mut BTreeMap<(String, u64), (String, Option<String>)>,
) {
    while let Ok(bytes) = devices.receipts.try_recv() {
        let body = verify_receipt(key, &bytes);
        let id = (body.device.clone(), body.seq);
        let message = sent.get(&id).expect("a receipt for a message nobody sent");
        assert_eq!(
            body.digest.0,
            sha2::Sha256::digest(message).to_vec(),
            "the receipt binds another message"
        );
        into.insert(id, (body.status, body.reason));
    }
}

async fn wait_ready(server: &TestServer) {
    let mqtt = server.state.mqtt.clone().unwrap();
    eventually(
        "twinguard subscribed and the legacy session drained",
        || mqtt.subscribed() && mqtt.legacy_drained(),
    )
    .await;
}

fn instance_id(dir: &std::path::Path) -> String {
    let instance: Value =
        serde_json::from_slice(&std::fs::read(dir.join("instance.json")).unwrap()).unwrap();
    instance["instanceId"].as_str().unwrap().to_owned()
}

fn client_id(dir: &std::path::Path) -> String {
    let session: Value =
        serde_json::from_slice(&std::fs::read(dir.join("mqtt/session.json")).unwrap()).unwrap();
    session["clientId"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_attacker_with_the_client_id_derivable_from_the_issuer_takes_no_reading() {
    let topics = Topics::new();
    let server = TestServer::start_with(|c| c.mqtt = Some(topics.config(BROKER))).await;
    let keys = provision(&server.state, &["dev-a", "dev-b"]).await;
    wait_ready(&server).await;
    // The attack as found: the issuer is public, and the instance ID is in it.
    let discovery: Value = server
        .client
        .get(server.url("/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let instance = instance_id(server.dir.path());
    assert!(
        discovery["issuer"].as_str().unwrap().contains(&instance),
        "the premise: the issuer names the instance"
    );
    let mut attacker = Attacker::start(&format!("twinguard-{instance}"));
    tokio::time::timeout(PATIENCE, attacker.connected.recv())
        .await
        .unwrap();
    let mut devices = Devices::start(1883, &format!("{}/#", topics.receipts()), None).await;
    let sent = sign_readings(&keys, READINGS / 2);
    devices
        .publish(&topics, &sent.iter().collect::<Vec<_>>())
        .await;
    let state = server.state.clone();
    eventually("every reading in its twin's history", || {
        keys.keys()
            .all(|d| history(&state, d).len() as u64 == READINGS / 2)
    })
    .await;
    let taken = attacker.stop().await;
    devices.stop();
    end_session(&format!("twinguard-{instance}"), 1883).await;
    assert!(
        taken.is_empty(),
        "the attacker took {} readings",
        taken.len()
    );
    assert_eq!(server.state.mqtt.as_ref().unwrap().takeovers(), 0);
    end_session(&client_id(server.dir.path()), 1883).await;
}

#[tokio::test]
async fn with_the_client_id_leaked_every_reading_reaches_the_twin_or_has_no_receipt_and_is_sent_again()
 {
    let topics = Topics::new();
    let server = TestServer::start_with(|c| c.mqtt = Some(topics.config(BROKER))).await;
    let keys = provision(&server.state, &["dev-a", "dev-b"]).await;
    wait_ready(&server).await;
    let receipt_key = receipt_key(server.dir.path());
    let mut devices = Devices::start(1883, &format!("{}/#", topics.receipts()), None).await;
    let sent = sign_readings(&keys, READINGS / 2);

    // The attacker read session.json: it takes the session over and keeps fighting for it.
    let leaked = client_id(server.dir.path());
    let mut attacker = Attacker::start(&leaked);
    tokio::time::timeout(PATIENCE, attacker.connected.recv())
        .await
        .unwrap();
    devices
        .publish(&topics, &sent.iter().collect::<Vec<_>>())
        .await;
    let mqtt = server.state.mqtt.clone().unwrap();
    eventually("the takeover detected", || mqtt.takeovers() > 0).await;
    let taken = attacker.stop().await;
    eprintln!("the attacker took {} messages", taken.len());
    eventually("twinguard holds its session again", || mqtt.subscribed()).await;

    // Whatever has a receipt saying accepted is in the twin's history.
    let mut receipts = BTreeMap::new();
    tokio::time::sleep(Duration::from_secs(2)).await; // let receipts in flight arrive
    drain_receipts(&mut devices, &receipt_key, &sent, &mut receipts);
    let state = server.state.clone();
    let accepted: Vec<(String, u64)> = receipts
        .iter()
        .filter(|(_, (status, _))| status == "accepted")
        .map(|(id, _)| id.clone())
        .collect();
    eventually("every receipted reading in the history", || {
        accepted
            .iter()
            .all(|(device, seq)| history(&state, device).contains(seq))
    })
    .await;

    // A device re-sends what has no receipt until twinguard answers; then the set is complete.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        drain_receipts(&mut devices, &receipt_key, &sent, &mut receipts);
        let missing: Vec<_> = sent
            .iter()
            .filter(|(id, _)| !receipts.contains_key(*id))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} readings never got a receipt",
            missing.len()
        );
        devices.publish(&topics, &missing).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for ((device, seq), (status, reason)) in &receipts {
        // `replay`: twinguard already took this exact message (the broker sent it twice).
        assert!(
            status == "accepted" || reason.as_deref() == Some("replay"),
            "{device} {seq}: {status} {reason:?}"
        );
    }
    eventually("every reading in its twin's history", || {
        keys.keys()
            .all(|d| history(&state, d).len() as u64 == READINGS / 2)
    })
    .await;

    // Detected and reported: /readyz to a caller that may read metrics, the audit trail (the
    // log line and metrics go beside).
    let monitor = server.admin_token().await;
    let ready: Value = server
        .client
        .get(server.url("/readyz"))
        .bearer_auth(&monitor)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["mqtt"]["status"], "takeover", "{ready}");
    assert!(ready["mqtt"]["takeovers"].as_u64().unwrap() >= 1);
    let evidence = ready["mqtt"]["lastTakeover"]["evidence"].as_str().unwrap();
    eprintln!("takeover evidence: {evidence}");
    let dir = server.dir.path().to_owned();
    eventually("the takeover in the audit trail", || {
        let trail = std::fs::read(dir.join("audit/entries.jsonl")).unwrap();
        String::from_utf8_lossy(twinguard_audit::log::recorded(&trail))
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| e["kind"] == "mqtt" && e["event"] == "session.takeover")
    })
    .await;
    devices.stop();
    end_session(&leaked, 1883).await;
}

#[tokio::test]
async fn a_session_wiped_under_twinguards_id_is_reported_lost_and_twinguard_subscribes_again() {
    let topics = Topics::new();
    let server = TestServer::start_with(|c| c.mqtt = Some(topics.config(BROKER))).await;
    let keys = provision(&server.state, &["dev-a"]).await;
    wait_ready(&server).await;
    // With the leaked ID and a clean start, the attacker discards twinguard's session, its
    // subscription and anything queued in it.
    let leaked = client_id(server.dir.path());
    end_session(&leaked, 1883).await;
    let mqtt = server.state.mqtt.clone().unwrap();
    eventually("the lost session reported", || {
        mqtt.detail()["sessionsLost"].as_u64() >= Some(1)
    })
    .await;
    eventually("twinguard subscribed again", || mqtt.subscribed()).await;
    assert_eq!(
        mqtt.detail()["lastTakeover"]["evidence"],
        "session_not_present",
        "{}",
        mqtt.detail()
    );
    let mut devices = Devices::start(1883, &format!("{}/#", topics.receipts()), None).await;
    let sent = sign_readings(&keys, 3);
    devices
        .publish(&topics, &sent.iter().collect::<Vec<_>>())
        .await;
    let state = server.state.clone();
    eventually("readings after the loss in the history", || {
        history(&state, "dev-a").len() == 3
    })
    .await;
    devices.stop();
    end_session(&leaked, 1883).await;
}

#[tokio::test]
async fn a_data_dir_with_the_old_derivable_session_is_drained_and_switches_to_a_random_id() {
    let topics = Topics::new();
    let dir = TempDir::new().unwrap();
    let app = TestServer::build_in(&dir, |c| c.mqtt = Some(topics.config(BROKER)));
    let keys = provision(app.state(), &["dev-a"]).await;
    // What an older release left: a persistent session under `twinguard-<instance>`,
    // subscribed, holding readings that arrived while twinguard was down.
    let legacy = format!("twinguard-{}", instance_id(dir.path()));
    {
        let mut opts = options(&legacy, 1883);
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(u32::MAX));
        let (client, mut events) = AsyncClient::new(opts, 8);
        loop {
            match events.poll().await.unwrap() {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .subscribe(topics.filter(), QoS::AtLeastOnce)
                        .await
                        .unwrap();
                }
                Event::Incoming(Packet::SubAck(_)) => break,
                _ => {}
            }
        }
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
    }
    let mut devices = Devices::start(1883, &format!("{}/#", topics.receipts()), None).await;
    let sent = sign_readings(&keys, 10);
    devices
        .publish(&topics, &sent.iter().collect::<Vec<_>>())
        .await;
    devices.stop();

    let server = TestServer::run(app, dir);
    let state = server.state.clone();
    eventually(
        "the readings queued in the old session in the history",
        || history(&state, "dev-a").len() == 10,
    )
    .await;
    wait_ready(&server).await;
    let id = client_id(server.dir.path());
    assert_ne!(id, legacy);
    let hex = id.strip_prefix("twinguard-").unwrap();
    assert!(hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()));
    let session: Value = serde_json::from_slice(
        &std::fs::read(server.dir.path().join("mqtt/session.json")).unwrap(),
    )
    .unwrap();
    assert!(session.get("legacyClientId").is_none(), "{session}");
    use std::os::unix::fs::PermissionsExt;
    // On a shared store the receipt key is sealed in it, not a file (`twinguard_server::vault`).
    let receipt_file = server.dir.path().join("secrets/mqtt-receipt-key");
    assert_eq!(receipt_file.exists(), server.database_url().is_none());
    let mut files = vec!["mqtt/session.json", "mqtt/receipt-key.jwk"];
    if receipt_file.exists() {
        files.push("secrets/mqtt-receipt-key");
    }
    for file in files {
        let mode = std::fs::metadata(server.dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    assert!(
        !session_present(&legacy).await,
        "the old session was left behind"
    );
    end_session(&id, 1883).await;
}

/// A Mosquitto of the test's own on a free port: no anonymous clients, one user.
struct OwnBroker {
    child: std::process::Child,
    port: u16,
    _dir: TempDir,
}

impl OwnBroker {
    fn start(user: &str, password: &str) -> Option<Self> {
        if std::process::Command::new("mosquitto_passwd")
            .arg("--help")
            .output()
            .is_err()
        {
            eprintln!("skipped: Mosquitto is installed by scripts/test-env.sh");
            return None;
        }
        let dir = TempDir::new().unwrap();
        let passwords = dir.path().join("passwd");
        let status = std::process::Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwords)
            .args([user, password])
            .status()
            .unwrap();
        assert!(status.success());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let me = String::from_utf8(
            std::process::Command::new("id")
                .arg("-un")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\n\
                 # the test's own user: as root the broker would switch to one who cannot read here\nuser {}\n",
                passwords.display(),
                me.trim()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let broker = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(broker)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn twinguard_logs_in_to_a_broker_that_refuses_anonymous_clients() {
    let password = uuid_like();
    let Some(broker) = OwnBroker::start("twinguard", &password) else {
        return;
    };
    let secrets = TempDir::new().unwrap();
    let password_file = secrets.path().join("mqtt-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let topics = Topics::new();
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let server = TestServer::start_with(|c| {
        let mut config = topics.config(&url);
        config.username = Some("twinguard".into());
        config.password_file = Some(password_file.clone());
        c.mqtt = Some(config);
    })
    .await;
    let keys = provision(&server.state, &["dev-a"]).await;
    wait_ready(&server).await;
    // The broker refuses anonymous clients: an attacker without the password gets nowhere.
    {
        let (_client, mut events) = AsyncClient::new(options("anonymous", broker.port), 8);
        let refused = loop {
            match tokio::time::timeout(PATIENCE, events.poll()).await.unwrap() {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack.code,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("anonymous refused: {e}");
                    break rumqttc::v5::mqttbytes::v5::ConnectReturnCode::NotAuthorized;
                }
            }
        };
        assert_ne!(
            refused,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
        );
    }
    let mut devices = Devices::start(
        broker.port,
        &format!("{}/#", topics.receipts()),
        Some(("twinguard", &password)),
    )
    .await;
    let sent = sign_readings(&keys, 3);
    devices
        .publish(&topics, &sent.iter().collect::<Vec<_>>())
        .await;
    let state = server.state.clone();
    eventually("the readings in the history", || {
        history(&state, "dev-a").len() == 3
    })
    .await;
    devices.stop();
}

/// Two nodes on one PostgreSQL database, each subscribed to the broker with a session of its
/// own: the subscription is shared (MQTT 5 `$share/<group>/...`), so the broker hands each
/// message to one node, which ingests and receipts it. Every reading lands once, every message
/// gets exactly one receipt, `accepted`, and both nodes took a share. With each node
/// subscribed on its own, every message reached both, and the second copy drew a `replay`
/// receipt (and the store decided it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_one_database_share_the_subscription_and_ingest_each_message_once() {
    let Some((_db, store)) = crate::kit::shared_store() else {
        return;
    };
    let topics = Topics::new();
    // The second node's data directory holds only the instance files of the first's.
    let (a, b) = TestServer::two_nodes(|c| {
        c.store = store.clone();
        c.mqtt = Some(topics.config(BROKER));
    })
    .await;
    assert_ne!(client_id(a.dir.path()), client_id(b.dir.path()));

    let names = ["dev-a", "dev-b", "dev-c", "dev-d"];
    let keys = provision(&a.state, &names).await;
    let written = a.state.service.position().unwrap();
    assert!(
        b.state
            .service
            .wait_for_position(written, Duration::from_secs(10))
            .await
    );
    eventually("the devices known on the second node", || {
        names
            .iter()
            .all(|d| b.state.telemetry.device(&admin(), d).is_ok())
    })
    .await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let receipt_key = receipt_key(a.dir.path());
    let mut devices = Devices::start(1883, &format!("{}/#", topics.receipts()), None).await;
    let sent = sign_readings(&keys, 25);
    devices
        .publish(&topics, &sent.iter().collect::<Vec<_>>())
        .await;

    eventually("every reading in its twin's history", || {
        names.iter().all(|d| history(&a.state, d).len() == 25)
    })
    .await;
    // Receipts still in flight arrive; then each message has exactly one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut receipts: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    while let Ok(bytes) = devices.receipts.try_recv() {
        let body = verify_receipt(&receipt_key, &bytes);
        receipts
            .entry((body.device, body.seq))
            .or_default()
            .push(body.status);
    }
    devices.stop();
    let (on_a, on_b) = (
        a.state.mqtt.as_ref().unwrap().received(),
        b.state.mqtt.as_ref().unwrap().received(),
    );
    eprintln!("node A received {on_a} messages, node B {on_b}");
    for id in sent.keys() {
        assert_eq!(
            receipts.get(id).map(Vec::as_slice),
            Some(&["accepted".to_owned()][..]),
            "{id:?}"
        );
    }
    assert!(on_a > 0 && on_b > 0, "A took {on_a}, B {on_b}");
    assert_eq!(on_a + on_b, sent.len() as u64);
    assert_eq!(
        a.state.mqtt.as_ref().unwrap().detail()["sharedSubscription"],
        true
    );
    end_session(&client_id(a.dir.path()), 1883).await;
    end_session(&client_id(b.dir.path()), 1883).await;
}
