//! MQTT ingestion: twinguard subscribes to a broker and treats it as untrusted. A message is
//! believed for its signature only, never for the topic it came on or the broker's word; the
//! broker's job is delivery. Messages are acknowledged (QoS 1) only once the pipeline's
//! decision on them is durable, and the session is persistent, so readings the broker took
//! while twinguard was down are delivered when it is back.
//!
//! The broker is untrusted for availability too (issue 18). Whoever connects with twinguard's
//! client ID takes its persistent session over, with the messages queued in it, so:
//! - the client ID is a random secret ([`session`]), and the derivable ID of older releases is
//!   drained once and ended ([`drain_legacy`]);
//! - the connection takes a user name and password (never over plain TCP off loopback) and TLS;
//! - a takeover is detected ([`Evidence`]), logged, counted, shown in `/readyz` and audited;
//! - every message twinguard decided on gets a signed receipt ([`receipt`]), so a device knows
//!   what twinguard, not the broker, took, and re-sends the rest.
//!
//! twinguard speaks MQTT 5 for its Receive Maximum: it lets the broker send up to
//! [`RECEIVE_MAXIMUM`] messages ahead of the acknowledgements. An MQTT 3.1.1 subscriber gets the
//! broker's own limit instead (Mosquitto: 20), and since acknowledgements wait for a durable
//! commit, every commit then carried at most 20 messages. Several batches are ingested at once;
//! their acknowledgements still go out in the order the messages arrived, as MQTT requires.

pub mod receipt;
pub mod session;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rumqttc::TlsConfiguration;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tokio::sync::mpsc;
use twinguard_telemetry::{Outcome, Telemetry, Transport};
use zeroize::Zeroizing;

use crate::datadir::DataDir;
use receipt::ReceiptKey;
use session::Session;

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// Topic filter, e.g. `twinguard/telemetry/#`.
    pub topic: String,
    /// CA certificate (PEM) the broker's certificate must chain to, for `mqtts`.
    pub ca: Option<PathBuf>,
    /// The user name twinguard logs in to the broker with, if any.
    pub username: Option<String>,
    /// A file holding the password (first line), if any; never the password itself, so it
    /// stays out of the command line and the process list.
    pub password_file: Option<PathBuf>,
    /// The topic prefix receipts are published under ([`receipt::DEFAULT_PREFIX`]).
    pub receipt_prefix: String,
}

impl MqttConfig {
    /// A configuration with the defaults for everything but the broker and topic.
    pub fn new(url: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            topic: topic.into(),
            ca: None,
            username: None,
            password_file: None,
            receipt_prefix: receipt::DEFAULT_PREFIX.to_owned(),
        }
    }
}

/// Most messages ingested as one batch.
const BATCH: usize = 128;
/// Batches being ingested at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// Unacknowledged messages the broker may send (MQTT 5 Receive Maximum): enough to fill every
/// batch in flight. Mosquitto drops a message for a subscriber that already has
/// `max_queued_messages` (default 1,000) plus `max_inflight_messages` (20) unacknowledged, even
/// when its Receive Maximum allows more in flight, so 512 leaves room for a backlog.
pub const RECEIVE_MAXIMUM: u16 = (BATCH * BATCHES_IN_FLIGHT) as u16;
/// How long the legacy session must stay quiet before it counts as drained.
const DRAIN_QUIET: Duration = Duration::from_secs(2);

/// The broker's address, parsed from the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
}

fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        anyhow::bail!("the MQTT URL must start with mqtt:// or mqtts://");
    };
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .context("the MQTT URL needs host:port")?;
    anyhow::ensure!(
        !host.contains('@'),
        "the MQTT URL must not carry credentials: use --mqtt-username and --mqtt-password-file"
    );
    let port: u16 = port.parse().context("the MQTT port is not a number")?;
    Ok(Endpoint {
        tls,
        host: host.to_owned(),
        port,
    })
}

/// `localhost` or a loopback IP address (IPv6 in brackets or not).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The broker login: a user name and the password read from its file.
#[derive(Clone)]
struct Credentials {
    username: String,
    password: Zeroizing<String>,
}

/// The credentials of `config`, refused over plain TCP to anything but loopback: a password
/// sent in clear on the network is a password given away.
fn credentials(config: &MqttConfig, endpoint: &Endpoint) -> anyhow::Result<Option<Credentials>> {
    let (username, password) = match (&config.username, &config.password_file) {
        (None, None) => return Ok(None),
        (Some(user), file) => {
            let password = match file {
                Some(path) => {
                    let text = Zeroizing::new(
                        std::fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    );
                    Zeroizing::new(text.lines().next().unwrap_or("").to_owned())
                }
                None => Zeroizing::new(String::new()),
            };
            (user.clone(), password)
        }
        (None, Some(_)) => anyhow::bail!("--mqtt-password-file needs --mqtt-username"),
    };
    anyhow::ensure!(
        endpoint.tls || is_loopback(&endpoint.host),
        "MQTT credentials are sent only over TLS (mqtts://) or to a loopback broker"
    );
    Ok(Some(Credentials { username, password }))
}

/// The connection options for `client_id`: a persistent session that never expires unless
/// `end_session`, which asks for a clean start and no expiry (the session ends at disconnect).
fn options(
    config: &MqttConfig,
    endpoint: &Endpoint,
    credentials: Option<&Credentials>,
    client_id: &str,
    end_session: bool,
) -> anyhow::Result<MqttOptions> {
    let mut options = MqttOptions::new(client_id, &endpoint.host, endpoint.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_manual_acks(true);
    if end_session {
        options.set_clean_start(true);
        options.set_session_expiry_interval(Some(0));
    } else {
        // A persistent session that never expires (MQTT 5 needs both for what 3.1.1's
        // clean-session flag alone did): the broker keeps what arrives while twinguard is down.
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(u32::MAX));
    }
    options.set_receive_maximum(Some(RECEIVE_MAXIMUM));
    options.set_max_packet_size(Some(
        (twinguard_telemetry::envelope::MAX_ENVELOPE_BYTES + 1024) as u32,
    ));
    if let Some(c) = credentials {
        options.set_credentials(c.username.clone(), c.password.as_str());
    }
    if endpoint.tls {
        let ca = config
            .ca
            .as_ref()
            .context("mqtts needs --mqtt-ca: the broker's CA certificate")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).context("reading the MQTT CA")? {
            roots.add(cert?)?;
        }
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Always our own `ClientConfig`: it verifies with rustls 0.23 (rustls-webpki 0.103).
        // rumqttc's `TlsConfiguration::Simple` would parse PEM with the unmaintained
        // rustls-pemfile; its rustls-webpki 0.102 is only an error type here. See
        // docs/dependencies.md before using any other `TlsConfiguration`.
        options.set_transport(rumqttc::Transport::tls_with_config(
            TlsConfiguration::Rustls(Arc::new(client)),
        ));
    }
    Ok(options)
}

/// What showed that another client took twinguard's session (see docs/telemetry.md for what
/// each can and cannot tell apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The broker sent DISCONNECT with reason 0x8E, Session taken over.
    SessionTakenOver,
    /// The broker closed a connection that was up without a DISCONNECT. Mosquitto 2.0.11 ends a
    /// taken-over MQTT 5 connection this way; a broker restart or a network failure does too.
    ClosedWithoutReason,
    /// The broker answered a reconnect with session-present false: the persistent session and
    /// whatever was queued in it are gone (a clean start under twinguard's ID, or a broker
    /// that lost its state).
    SessionNotPresent,
}

impl Evidence {
    pub fn label(self) -> &'static str {
        match self {
            Self::SessionTakenOver => "session_taken_over",
            Self::ClosedWithoutReason => "closed_without_reason",
            Self::SessionNotPresent => "session_not_present",
        }
    }
}

/// The MQTT link's state, for `/readyz` and the tests.
#[derive(Debug, Default)]
pub struct MqttStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    connected: bool,
    subscribed: bool,
    takeovers: u64,
    sessions_lost: u64,
    last_takeover: Option<(Evidence, String)>,
    legacy_drained: bool,
    /// Messages this node's session received (each node of a shared subscription its share).
    received: u64,
    /// Whether the subscription is shared with the other nodes of a shared store.
    shared: bool,
}

impl MqttStatus {
    fn with<T>(&self, f: impl FnOnce(&mut StatusInner) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-update of plain counters.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Takeover evidence seen so far.
    pub fn takeovers(&self) -> u64 {
        self.with(|s| s.takeovers)
    }

    /// Whether twinguard's session is connected and subscribed.
    pub fn subscribed(&self) -> bool {
        self.with(|s| s.connected && s.subscribed)
    }

    /// Messages this node's session received from the broker.
    pub fn received(&self) -> u64 {
        self.with(|s| s.received)
    }

    /// Whether the session of the derivable ID of older releases has been drained and ended.
    pub fn legacy_drained(&self) -> bool {
        self.with(|s| s.legacy_drained)
    }

    /// The `mqtt` detail of `/readyz`.
    pub fn detail(&self) -> serde_json::Value {
        self.with(|s| {
            json!({
                "status": if s.takeovers > 0 { "takeover" } else if s.connected { "ok" } else { "disconnected" },
                "connected": s.connected,
                "subscribed": s.connected && s.subscribed,
                "takeovers": s.takeovers,
                "sessionsLost": s.sessions_lost,
                "lastTakeover": s.last_takeover.as_ref().map(|(e, t)| json!({"evidence": e.label(), "time": t})),
                "legacySessionDrained": s.legacy_drained,
                "sharedSubscription": s.shared,
                "received": s.received,
            })
        })
    }
}

/// Reports takeover evidence: an error log line, the metrics, the status and the audit trail.
fn report(evidence: Evidence, status: &MqttStatus, audit: &crate::audit::Audit, detail: &str) {
    let time = twinguard_core::clock::rfc3339(time::OffsetDateTime::now_utc());
    tracing::error!(
        evidence = evidence.label(),
        detail,
        "MQTT session takeover suspected: another client may hold twinguard's session; \
         messages the broker delivered to it are lost to twinguard (devices re-send what has \
         no receipt)"
    );
    metrics::counter!("twinguard_mqtt_session_takeovers_total", "evidence" => evidence.label())
        .increment(1);
    if evidence == Evidence::SessionNotPresent {
        metrics::counter!("twinguard_mqtt_sessions_lost_total").increment(1);
    }
    status.with(|s| {
        s.takeovers += 1;
        if evidence == Evidence::SessionNotPresent {
            s.sessions_lost += 1;
        }
        s.last_takeover = Some((evidence, time.clone()));
    });
    let entry = json!({
        "kind": "mqtt",
        "time": time,
        "event": "session.takeover",
        "evidence": evidence.label(),
        "detail": detail,
    });
    let audit = audit.clone();
    tokio::spawn(async move {
        if let Err(e) = audit
            .log()
            .append_async(entry.to_string().into_bytes())
            .await
        {
            tracing::error!(error = %e, "an MQTT takeover could not be recorded in the audit log");
        }
    });
}

/// Whether `e` is the broker closing a connection without a DISCONNECT.
fn closed_by_peer(e: &ConnectionError) -> bool {
    matches!(
        e,
        ConnectionError::MqttState(StateError::ConnectionAborted)
            | ConnectionError::MqttState(StateError::Io(_))
            | ConnectionError::Io(_)
    )
}

/// What the MQTT link needs from the rest of the server.
pub struct MqttContext {
    pub data_dir: DataDir,
    pub telemetry: Telemetry,
    pub audit: crate::audit::Audit,
    pub status: Arc<MqttStatus>,
}

/// Everything checked before serving: the URL, credentials, TLS, the session identity and the
/// receipt key. Errors here stop start-up.
pub struct Prepared {
    config: MqttConfig,
    endpoint: Endpoint,
    credentials: Option<Credentials>,
    session: Session,
    receipts: Arc<ReceiptKey>,
    /// The shared subscription's group name, on a store several nodes share.
    share: Option<String>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    pub fn new(
        config: MqttConfig,
        data_dir: &DataDir,
        instance_id: &str,
        material: &crate::vault::Material,
    ) -> anyhow::Result<Self> {
        let endpoint = endpoint(&config.url)?;
        let credentials = credentials(&config, &endpoint)?;
        // Fails early on a bad CA file.
        options(&config, &endpoint, credentials.as_ref(), "probe", false)?;
        anyhow::ensure!(
            !config.topic.starts_with("$share/"),
            "give the MQTT topic as a plain filter: on a store several nodes share, twinguard \
             shares the subscription among its nodes itself"
        );
        let share = match material {
            crate::vault::Material::Files => None,
            crate::vault::Material::Sealed(vault) => {
                // Receipts go to `<prefix>/<device>`, the device ID one level.
                let receipts = format!("{}/+", config.receipt_prefix.trim_end_matches('/'));
                anyhow::ensure!(
                    !filters_overlap(&config.topic, &receipts),
                    "the MQTT topic filter {} takes twinguard's own receipts ({receipts}): a \
                     shared subscription cannot leave a node's own messages out, so choose a \
                     filter or a receipt prefix apart",
                    config.topic
                );
                Some(share_group(vault)?)
            }
        };
        data_dir.private_dir("mqtt")?;
        let session = Session::load_or_create(data_dir, instance_id)?;
        let receipts = Arc::new(ReceiptKey::load_or_create(data_dir, material)?);
        if !endpoint.tls {
            tracing::warn!(
                "MQTT without TLS: the broker link is readable on the network (messages are still verified by signature)"
            );
        }
        Ok(Self {
            config,
            endpoint,
            credentials,
            session,
            receipts,
            share,
        })
    }
}

/// The shared subscription's group name: the same for every node of the instance, random, so
/// a broker client that may subscribe to the topic cannot join the group by guessing it (the
/// broker's ACLs are the first defence; an attacker in the group takes a share of the messages,
/// which then get no receipt and are sent again). Sealed in the store like the other instance
/// material.
fn share_group(vault: &crate::vault::Vault) -> anyhow::Result<String> {
    let group = vault.get_or_store(
        crate::vault::names::MQTT_SHARE_GROUP,
        "the MQTT share group",
        None,
        || {
            let mut raw = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
            Ok(Zeroizing::new(
                format!("twinguard-{}", hex::encode(raw)).into_bytes(),
            ))
        },
    )?;
    let group = String::from_utf8(group.to_vec())?;
    anyhow::ensure!(
        !group.is_empty() && !group.contains(['/', '+', '#']),
        "the stored MQTT share group is not a group name"
    );
    Ok(group)
}

/// The filter twinguard subscribes with: `topic`, or on a store several nodes share, the MQTT 5
/// shared subscription `$share/<group>/<topic>`, so the broker hands each message to one node
/// of the group (which then ingests and receipts it) instead of every node.
fn subscription(topic: &str, share: Option<&str>) -> String {
    match share {
        Some(group) => format!("$share/{group}/{topic}"),
        None => topic.to_owned(),
    }
}

/// Whether some topic matches both MQTT topic filters (MQTT 5, 4.7: `+` one level, `#` this
/// level and all below; wildcards at the first level never match a `$` topic).
fn filters_overlap(a: &str, b: &str) -> bool {
    let wild = |f: &str| f.starts_with(['+', '#']);
    if (a.starts_with('$') && wild(b)) || (b.starts_with('$') && wild(a)) {
        return false;
    }
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Publishes the receipts of a batch's outcomes (QoS 0: a lost receipt only makes the device
/// send again, and the answer to that is a `replay` receipt).
async fn publish_receipts(
    client: &AsyncClient,
    keys: &ReceiptKey,
    prefix: &str,
    outcomes: &[Outcome],
    envelopes: &[&[u8]],
) {
    let now = twinguard_core::clock::rfc3339(time::OffsetDateTime::now_utc());
    for (outcome, envelope) in outcomes.iter().zip(envelopes) {
        let Some(receipt) = keys.receipt(outcome, envelope, &now) else {
            continue;
        };
        let topic = receipt::topic(prefix, &receipt.device);
        if let Err(e) = client
            .publish(topic, QoS::AtMostOnce, false, receipt.bytes)
            .await
        {
            tracing::warn!(error = %e, "an MQTT receipt could not be queued");
        }
    }
}

/// Connects and ingests until the process ends; reconnects with a pause after errors.
pub fn spawn(prepared: Prepared, cx: MqttContext) -> anyhow::Result<()> {
    let Prepared {
        config,
        endpoint,
        credentials,
        session,
        receipts,
        share,
    } = prepared;
    cx.status.with(|s| s.shared = share.is_some());
    let persistent = options(
        &config,
        &endpoint,
        credentials.as_ref(),
        &session.client_id,
        false,
    )?;
    let (client, mut events) = AsyncClient::new(persistent, usize::from(RECEIVE_MAXIMUM));
    // Each message with the connection it came on: an acknowledgement belongs to that
    // connection only (after a reconnect the broker sends again whatever was not acknowledged).
    let connection = Arc::new(AtomicU64::new(0));
    // Set before twinguard itself disconnects, so that close is not taken for a takeover.
    let leaving = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<(u64, Publish)>(usize::from(RECEIVE_MAXIMUM));
    let topic = subscription(&config.topic, share.as_deref());
    let nolocal = share.is_none();
    let subscriber = client.clone();
    let current = connection.clone();
    let status = cx.status.clone();
    let audit = cx.audit.clone();
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let first_subscription = subscribed.clone();
    let left = leaving.clone();
    tokio::spawn(async move {
        // Whether the current connection got its CONNACK, and whether a session should exist.
        let mut up = false;
        let mut expect_session = false;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    up = true;
                    current.fetch_add(1, Ordering::SeqCst);
                    status.with(|s| {
                        s.connected = true;
                        s.subscribed = false;
                    });
                    tracing::info!(topic = %topic, session_present = ack.session_present, "connected to the MQTT broker");
                    if expect_session && !ack.session_present {
                        report(
                            Evidence::SessionNotPresent,
                            &status,
                            &audit,
                            "the broker no longer held twinguard's persistent session",
                        );
                    }
                    expect_session = true;
                    // No Local: twinguard never receives its own receipts, whatever the filter.
                    // A shared subscription may not ask for it (MQTT 5, 3.8.3.1): there the
                    // filter was checked to leave the receipts out (`Prepared::new`).
                    let mut filter = Filter::new(topic.clone(), QoS::AtLeastOnce);
                    filter.nolocal = nolocal;
                    if let Err(e) = subscriber.subscribe_many([filter]).await {
                        tracing::error!(error = %e, "MQTT subscribe failed");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    status.with(|s| s.subscribed = true);
                    first_subscription.notify_one();
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    status.with(|s| s.received += 1);
                    let on = current.load(Ordering::SeqCst);
                    if tx.send((on, publish)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let was_up = std::mem::replace(&mut up, false);
                    status.with(|s| {
                        s.connected = false;
                        s.subscribed = false;
                    });
                    let ours = left.swap(false, Ordering::SeqCst);
                    match &e {
                        ConnectionError::MqttState(StateError::ServerDisconnect {
                            reason_code: DisconnectReasonCode::SessionTakenOver,
                            ..
                        }) => report(
                            Evidence::SessionTakenOver,
                            &status,
                            &audit,
                            "the broker sent DISCONNECT 0x8E (session taken over)",
                        ),
                        e if was_up && !ours && closed_by_peer(e) => report(
                            Evidence::ClosedWithoutReason,
                            &status,
                            &audit,
                            "the broker closed the connection without a DISCONNECT",
                        ),
                        _ => {}
                    }
                    tracing::warn!(error = %e, "MQTT connection error; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    if let Some(legacy) = session.legacy_client_id.clone() {
        let drain = Drain {
            config: config.clone(),
            endpoint: endpoint.clone(),
            credentials: credentials.clone(),
            legacy,
            session: session.clone(),
            data_dir: cx.data_dir.clone(),
            telemetry: cx.telemetry.clone(),
            receipts: receipts.clone(),
            client: client.clone(),
            status: cx.status.clone(),
        };
        tokio::spawn(async move {
            // The new session subscribes first: from then on every message reaches it, so
            // what the old session still holds is all there is to drain.
            subscribed.notified().await;
            drain.run().await;
        });
    } else {
        cx.status.with(|s| s.legacy_drained = true);
    }
    // Batches start in arrival order and are answered in that order.
    let (started, mut ingesting) = mpsc::channel(BATCHES_IN_FLIGHT);
    let telemetry = cx.telemetry.clone();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let raw = batch.iter().map(|(_, p)| p.payload.to_vec()).collect();
            let telemetry = telemetry.clone();
            let ingest = tokio::spawn(async move { telemetry.ingest(raw, Transport::Mqtt).await });
            if started
                .send((ingest, std::mem::take(&mut batch)))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let prefix = config.receipt_prefix.clone();
    tokio::spawn(async move {
        // The connection on which a batch could not be stored: nothing more is acknowledged
        // on it, so the broker sends the rest again after the reconnect this forces.
        let mut failed_on = None;
        while let Some((ingest, batch)) = ingesting.recv().await {
            let outcomes = match ingest.await {
                Ok(Ok(outcomes)) => Some(outcomes),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, messages = batch.len(), "MQTT batch not stored; leaving it unacknowledged");
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, messages = batch.len(), "MQTT batch failed; leaving it unacknowledged");
                    None
                }
            };
            let now = connection.load(Ordering::SeqCst);
            let Some(outcomes) = outcomes else {
                if failed_on != Some(now) {
                    failed_on = Some(now);
                    leaving.store(true, Ordering::SeqCst);
                    let _ = client.disconnect().await;
                }
                continue;
            };
            // Durable now: the receipts say so, whichever connection the messages came on.
            let envelopes: Vec<&[u8]> = batch.iter().map(|(_, p)| p.payload.as_ref()).collect();
            publish_receipts(&client, &receipts, &prefix, &outcomes, &envelopes).await;
            for (on, publish) in batch {
                if on != now || failed_on == Some(on) {
                    continue; // its connection is gone: the broker delivers it again
                }
                if let Err(e) = client.ack(&publish).await {
                    tracing::warn!(error = %e, "MQTT ack failed");
                }
            }
        }
    });
    Ok(())
}

/// Drains the persistent session that releases before issue 18 kept under the derivable client
/// ID `twinguard-<instance>`: connects with it resuming the session, ingests (and receipts)
/// whatever the broker still held there until it has been quiet for [`DRAIN_QUIET`], then ends
/// the session (clean start, expiry 0) and records that in `session.json`. Retries until done.
struct Drain {
    config: MqttConfig,
    endpoint: Endpoint,
    credentials: Option<Credentials>,
    legacy: String,
    session: Session,
    data_dir: DataDir,
    telemetry: Telemetry,
    receipts: Arc<ReceiptKey>,
    client: AsyncClient,
    status: Arc<MqttStatus>,
}

impl Drain {
    async fn run(self) {
        loop {
            match self.once().await {
                Ok(drained) => {
                    let mut session = self.session.clone();
                    session.legacy_client_id = None;
                    if let Err(e) = session.save(&self.data_dir) {
                        tracing::error!(error = %e, "the drained legacy MQTT session could not be recorded; it is drained again at the next start");
                    }
                    self.status.with(|s| s.legacy_drained = true);
                    tracing::info!(
                        messages = drained,
                        "the MQTT session under the derivable client ID of older releases is drained and ended"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "draining the legacy MQTT session failed; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    /// One attempt: the number of messages drained.
    async fn once(&self) -> anyhow::Result<usize> {
        let resume = options(
            &self.config,
            &self.endpoint,
            self.credentials.as_ref(),
            &self.legacy,
            false,
        )?;
        let (client, mut events) = AsyncClient::new(resume, usize::from(RECEIVE_MAXIMUM));
        let mut drained = 0;
        let mut present = None;
        loop {
            let event = match present {
                // Until the CONNACK, no quiet deadline: connecting may take its time.
                None => events.poll().await,
                Some(_) => match tokio::time::timeout(DRAIN_QUIET, events.poll()).await {
                    Ok(event) => event,
                    Err(_) => break, // quiet: everything queued has been delivered
                },
            };
            match event.context("the legacy MQTT session's connection")? {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    present = Some(ack.session_present);
                    if !ack.session_present {
                        break;
                    }
                }
                Event::Incoming(Packet::Publish(publish)) => {
                    let outcomes = self
                        .telemetry
                        .ingest(vec![publish.payload.to_vec()], Transport::Mqtt)
                        .await
                        .map_err(|e| anyhow::anyhow!("ingesting a drained message: {e}"))?;
                    publish_receipts(
                        &self.client,
                        &self.receipts,
                        &self.config.receipt_prefix,
                        &outcomes,
                        &[publish.payload.as_ref()],
                    )
                    .await;
                    client.ack(&publish).await?;
                    drained += 1;
                }
                _ => {}
            }
        }
        let _ = client.disconnect().await;
        // Let the acknowledgements and the DISCONNECT go out.
        while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(5), events.poll()).await
        {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
        // End the session: a clean start discards it, expiry 0 leaves nothing behind.
        let end = options(
            &self.config,
            &self.endpoint,
            self.credentials.as_ref(),
            &self.legacy,
            true,
        )?;
        let (client, mut events) = AsyncClient::new(end, 8);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e).context("ending the legacy MQTT session"),
                Err(_) => {
                    anyhow::bail!("the broker did not answer while ending the legacy session")
                }
            }
        }
        let _ = client.disconnect().await;
        while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(5), events.poll()).await
        {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
        Ok(drained)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn topic_filters_overlap_as_mqtt_matches_them() {
        for (a, b, overlap) in [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+/c", "a/b/+", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "twinguard/receipts/+", true),
            ("+/receipts/dev", "twinguard/receipts/+", true),
            ("twinguard/+/dev", "twinguard/receipts/+", true),
            ("twinguard/telemetry/#", "twinguard/receipts/+", false),
            ("twinguard/receipts", "twinguard/receipts/+", false),
            ("#", "$SYS/+", false),
            ("+/broker", "$SYS/broker", false),
            ("$SYS/#", "$SYS/broker", true),
            ("a//b", "a/+/b", true),
            ("a/b", "a/b/", false),
        ] {
            assert_eq!(filters_overlap(a, b), overlap, "{a} and {b}");
            assert_eq!(filters_overlap(b, a), overlap, "{b} and {a}");
        }
    }

    #[test]
    fn a_shared_store_subscribes_with_a_shared_subscription_and_keeps_receipts_out() {
        use twinguard_core::store::MemoryStore;
        let store: Arc<dyn twinguard_core::store::Store> = Arc::new(MemoryStore::shared());
        let vault = Arc::new(crate::vault::Vault::new(
            crate::vault::Kek::new(&[6; 32]).unwrap(),
            store,
        ));
        let sealed = crate::vault::Material::Sealed(vault.clone());
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path());
        let prepare = |topic: &str, material: &crate::vault::Material| {
            Prepared::new(
                MqttConfig::new("mqtt://127.0.0.1:1883", topic),
                &data_dir,
                "instance",
                material,
            )
        };
        let a = prepare("plant/telemetry/#", &sealed).unwrap();
        let b = prepare("plant/telemetry/#", &sealed).unwrap();
        let group = a.share.clone().unwrap();
        assert_eq!(b.share.as_deref(), Some(group.as_str()), "one group");
        assert_eq!(
            subscription("plant/telemetry/#", a.share.as_deref()),
            format!("$share/{group}/plant/telemetry/#")
        );
        assert!(prepare("#", &sealed).is_err(), "would take the receipts");
        assert!(prepare("twinguard/+/dev", &sealed).is_err());
        assert!(prepare("$share/g/plant/#", &sealed).is_err());
        let alone = prepare("#", &crate::vault::Material::Files).unwrap();
        assert_eq!(alone.share, None);
    }

    #[test]
    fn credentials_go_only_over_tls_or_to_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let with = |url: &str| {
            let mut config = MqttConfig::new(url, "t/#");
            config.username = Some("twinguard".into());
            config.password_file = Some(file.clone());
            credentials(&config, &endpoint(url).unwrap())
        };
        for url in [
            "mqtt://127.0.0.1:1883",
            "mqtt://localhost:1883",
            "mqtt://[::1]:1883",
            "mqtts://broker.example.com:8883",
        ] {
            let c = with(url).unwrap().unwrap();
            assert_eq!(c.password.as_str(), "s3cret");
        }
        for url in ["mqtt://broker.example.com:1883", "mqtt://10.0.0.5:1883"] {
            assert!(with(url).is_err(), "{url} took credentials in clear");
        }
        assert!(endpoint("mqtt://user:pw@127.0.0.1:1883").is_err());
    }
}
