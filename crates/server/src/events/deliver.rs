//! Delivery: one task per endpoint reads the change feed from the endpoint's position, sends
//! each event that a route to the endpoint matches, and moves the position on.
//!
//! - **At least once.** The position is stored after the events before it were acknowledged by
//!   the destination (a JetStream publish acknowledgement, an MQTT PUBACK, a 2xx answer); a crash
//!   in between sends them again, with the same event ID (`Nats-Msg-Id`, `webhook-id`).
//! - **In order per twin.** An endpoint's events go one at a time in feed order, and an event
//!   is retried before any later one goes; order breaks only where an event is dead-lettered.
//! - **Retries** back off exponentially with full jitter, from the endpoint's first delay up to
//!   a minute; after `maxAttempts` or `maxAgeSeconds` the event goes to the dead-letter store.
//! - **Routes are read at each attempt**, so deleting a route or the endpoint stops delivery at
//!   once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::Rng;
use serde_json::{Value, json};
use twinguard_core::feed::FeedEvent;
use twinguard_core::store::{Mutation, Table};

use super::endpoint::{Endpoint, Kind};
use super::{Inner, cloudevent};
use crate::egress::Destination;

/// Feed records read at a time.
const READ_BATCH: usize = 256;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long one send may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most dead letters kept per endpoint; at the limit the endpoint stops (and keeps retrying)
/// rather than drop events.
pub const MAX_DEAD_LETTERS: usize = 10_000;

/// An event ready to send: its CloudEvent bytes and signature.
pub struct Prepared {
    pub seq: u64,
    pub id: String,
    pub time: String,
    pub body: Vec<u8>,
    pub signature: String,
}

impl Prepared {
    pub fn new(event: &FeedEvent, inner: &Inner) -> Self {
        let ce = cloudevent::to_cloud_event(event, &inner.source);
        let body = serde_json::to_vec(&ce).unwrap_or_default();
        let signature = inner.key.sign(&body);
        Self {
            seq: event.seq,
            id: event.id.clone(),
            time: event.time.clone(),
            body,
            signature,
        }
    }
}

/// Runs delivery for `endpoint` until the endpoint is deleted or replaced (the task is aborted
/// then).
pub async fn run(inner: Arc<Inner>, endpoint: Arc<Endpoint>) {
    let name = endpoint.name.clone();
    let mut feed = inner.service.watch_feed();
    let mut sink: Option<Sink> = None;
    loop {
        let position = inner.position(&name);
        let head = *feed.borrow_and_update();
        metrics::gauge!("twinguard_events_lag", "endpoint" => name.clone())
            .set(head.saturating_sub(position) as f64);
        if head <= position {
            metrics::gauge!("twinguard_events_lag_seconds", "endpoint" => name.clone()).set(0.0);
            if feed.changed().await.is_err() {
                return;
            }
            continue;
        }
        let events = match inner.service.feed_after(position, READ_BATCH) {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(endpoint = %name, error = %e, "the change feed cannot be read");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(last) = events.last().map(|e| e.seq) else {
            // Trimmed below the position (cannot happen while the position holds the trim
            // back); move to the head rather than spin.
            inner.set_position(&name, head).await;
            continue;
        };
        if let Some(oldest) = events.first() {
            metrics::gauge!("twinguard_events_lag_seconds", "endpoint" => name.clone())
                .set(age_seconds(&oldest.time));
        }
        for event in &events {
            if !inner.routed(&name, event) {
                continue;
            }
            let prepared = Prepared::new(event, &inner);
            deliver_one(&inner, &endpoint, &mut sink, prepared).await;
        }
        inner.set_position(&name, last).await;
    }
}

fn age_seconds(time: &str) -> f64 {
    time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
        .map(|t| {
            (time::OffsetDateTime::now_utc() - t)
                .as_seconds_f64()
                .max(0.0)
        })
        .unwrap_or(0.0)
}

/// Sends one event until it is acknowledged, no route wants it any more, or it is
/// dead-lettered.
async fn deliver_one(inner: &Inner, endpoint: &Endpoint, sink: &mut Option<Sink>, event: Prepared) {
    let name = endpoint.name.as_str();
    let started = Instant::now();
    let mut attempts = 0u32;
    let mut backoff = endpoint.initial_backoff();
    loop {
        attempts += 1;
        let result = match sink {
            Some(s) => s.send(endpoint, inner, &event).await,
            None => match Sink::connect(endpoint, inner).await {
                Ok(mut s) => {
                    let r = s.send(endpoint, inner, &event).await;
                    *sink = Some(s);
                    r
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                metrics::counter!("twinguard_events_delivered_total", "endpoint" => name.to_owned())
                    .increment(1);
                return;
            }
            Err(e) => {
                tracing::warn!(endpoint = %name, event = %event.id, attempt = attempts, error = %e, "an event was not delivered");
                if e.reconnect {
                    *sink = None;
                }
                let exhausted =
                    attempts >= endpoint.max_attempts() || started.elapsed() >= endpoint.max_age();
                if exhausted
                    && inner
                        .dead_letter(endpoint, &event, attempts, &e.message)
                        .await
                {
                    metrics::counter!("twinguard_events_dead_lettered_total", "endpoint" => name.to_owned())
                        .increment(1);
                    return;
                }
                metrics::counter!("twinguard_events_retried_total", "endpoint" => name.to_owned())
                    .increment(1);
                let wait = rand::rng().random_range(Duration::ZERO..=backoff);
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                // A route or the endpoint deleted meanwhile: the event is no longer wanted.
                if !inner.still_routed(name, event.seq) {
                    return;
                }
            }
        }
    }
}

/// Why a send failed, and whether the connection should be made again.
#[derive(Debug)]
pub struct SendError {
    pub message: String,
    pub reconnect: bool,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn failed(message: impl Into<String>, reconnect: bool) -> SendError {
    SendError {
        message: message.into(),
        reconnect,
    }
}

/// A connection to a destination.
pub enum Sink {
    Nats(async_nats::jetstream::Context),
    Mqtt(MqttSink),
    Webhook(reqwest::Client),
}

pub struct MqttSink {
    client: rumqttc::v5::AsyncClient,
    acks: tokio::sync::mpsc::Receiver<Result<(), String>>,
    task: tokio::task::AbortHandle,
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// Connects to `endpoint`'s destination through the egress check (names resolved now, only
    /// admitted addresses used).
    pub async fn connect(endpoint: &Endpoint, inner: &Inner) -> Result<Self, SendError> {
        let url = &endpoint.url;
        match endpoint.kind {
            Kind::Webhook => {
                let mut builder = inner
                    .egress
                    .http_client(url)
                    .map_err(|e| failed(e.to_string(), true))?
                    .timeout(SEND_TIMEOUT)
                    .use_rustls_tls()
                    .tls_built_in_root_certs(false)
                    .https_only(url.scheme() == "https");
                if let Some(pem) = endpoint.ca_pem().map_err(|e| failed(e, true))? {
                    let certs = reqwest::Certificate::from_pem_bundle(&pem)
                        .map_err(|_| failed("caFile holds no certificate", true))?;
                    for cert in certs {
                        builder = builder.add_root_certificate(cert);
                    }
                }
                let client = builder
                    .build()
                    .map_err(|e| failed(format!("HTTP client: {e}"), true))?;
                Ok(Self::Webhook(client))
            }
            Kind::Nats => {
                let destination =
                    Destination::from_url(url).map_err(|e| failed(e.to_string(), true))?;
                let addrs = inner
                    .egress
                    .resolve(&destination)
                    .await
                    .map_err(|e| failed(e.to_string(), true))?;
                let mut options = async_nats::ConnectOptions::new()
                    .connection_timeout(SEND_TIMEOUT)
                    .max_reconnects(Some(0));
                if let (Some(user), Some(password)) = (
                    &endpoint.spec.username,
                    endpoint.password().map_err(|e| failed(e, true))?,
                ) {
                    options = options.user_and_password(user.clone(), password.to_string());
                }
                let target = if url.scheme() == "tls" {
                    // TLS needs the name for the certificate check: the name is connected to
                    // after the check above admitted what it resolves to (a rebinding between
                    // the two is not caught; docs/events.md).
                    options = options.require_tls(true);
                    // The checked file itself (inside the credentials directory), not a copy.
                    if let Some(path) = endpoint.ca_path().map_err(|e| failed(e, true))? {
                        options = options.add_root_certificates(path);
                    }
                    format!("tls://{destination}")
                } else {
                    let addr = addrs
                        .first()
                        .ok_or_else(|| failed("no admitted address", true))?;
                    format!("nats://{addr}")
                };
                let client = options
                    .connect(target)
                    .await
                    .map_err(|e| failed(format!("NATS connect: {e}"), true))?;
                Ok(Self::Nats(async_nats::jetstream::new(client)))
            }
            Kind::Mqtt => connect_mqtt(endpoint, inner).await,
        }
    }

    pub async fn send(
        &mut self,
        endpoint: &Endpoint,
        inner: &Inner,
        event: &Prepared,
    ) -> Result<(), SendError> {
        match self {
            Self::Nats(js) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", event.id.as_str());
                headers.insert("Content-Type", "application/cloudevents+json");
                headers.insert("Twinguard-Signature", event.signature.as_str());
                headers.insert("Twinguard-Key-Id", inner.key.kid());
                let subject = endpoint.spec.subject.clone().unwrap_or_default();
                let ack = tokio::time::timeout(SEND_TIMEOUT, async {
                    js.publish_with_headers(subject, headers, event.body.clone().into())
                        .await
                        .map_err(|e| failed(format!("NATS publish: {e}"), true))?
                        .await
                        .map_err(|e| failed(format!("JetStream acknowledgement: {e}"), false))
                })
                .await
                .map_err(|_| failed("JetStream acknowledgement timed out", true))?;
                ack.map(|_| ())
            }
            Self::Mqtt(mqtt) => {
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::mqttbytes::v5::PublishProperties;
                let properties = PublishProperties {
                    content_type: Some("application/cloudevents+json".into()),
                    user_properties: vec![
                        ("twinguard-signature".into(), event.signature.clone()),
                        ("twinguard-key-id".into(), inner.key.kid().to_owned()),
                        ("ce-id".into(), event.id.clone()),
                    ],
                    ..PublishProperties::default()
                };
                while mqtt.acks.try_recv().is_ok() {}
                let topic = endpoint.spec.topic.clone().unwrap_or_default();
                mqtt.client
                    .publish_with_properties(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        event.body.clone(),
                        properties,
                    )
                    .await
                    .map_err(|e| failed(format!("MQTT publish: {e}"), true))?;
                match tokio::time::timeout(SEND_TIMEOUT, mqtt.acks.recv()).await {
                    Ok(Some(Ok(()))) => Ok(()),
                    Ok(Some(Err(e))) => Err(failed(e, true)),
                    Ok(None) => Err(failed("the MQTT connection ended", true)),
                    Err(_) => Err(failed("no PUBACK in time", true)),
                }
            }
            Self::Webhook(client) => {
                let timestamp = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
                let signature = webhook_signature(endpoint, inner, event, &timestamp)
                    .map_err(|e| failed(e, false))?;
                let answer = client
                    .post(endpoint.url.clone())
                    .header("content-type", "application/cloudevents+json")
                    .header("webhook-id", &event.id)
                    .header("webhook-timestamp", &timestamp)
                    .header("webhook-signature", signature)
                    .body(event.body.clone())
                    .send()
                    .await
                    .map_err(|e| failed(format!("webhook: {}", without_url(&e)), false))?;
                let status = answer.status();
                if status.is_success() {
                    Ok(())
                } else {
                    // Redirects are not followed: a 3xx is a failure like any other.
                    Err(failed(
                        format!("webhook answered {}", status.as_u16()),
                        false,
                    ))
                }
            }
        }
    }
}

/// reqwest's error text without the URL (which may carry a token in its path).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {}", crate::audit::bounded(&detail))
    }
}

/// The Standard Webhooks `webhook-signature` value: `v1,<HMAC-SHA256>` when the endpoint has a
/// secret, and `v1a,<Ed25519>` with the event key, both over `id.timestamp.body`.
pub fn webhook_signature(
    endpoint: &Endpoint,
    inner: &Inner,
    event: &Prepared,
    timestamp: &str,
) -> Result<String, String> {
    let mut signed = Vec::with_capacity(event.body.len() + 64);
    signed.extend_from_slice(event.id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(&event.body);
    let mut parts = Vec::new();
    if let Some(secret) = endpoint.webhook_secret()? {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
        let tag = aws_lc_rs::hmac::sign(&key, &signed);
        parts.push(format!("v1,{}", STANDARD.encode(tag.as_ref())));
    }
    parts.push(format!("v1a,{}", inner.key.sign(&signed)));
    Ok(parts.join(" "))
}

async fn connect_mqtt(endpoint: &Endpoint, inner: &Inner) -> Result<Sink, SendError> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let url = &endpoint.url;
    let destination = Destination::from_url(url).map_err(|e| failed(e.to_string(), true))?;
    let addrs = inner
        .egress
        .resolve(&destination)
        .await
        .map_err(|e| failed(e.to_string(), true))?;
    let tls = url.scheme() == "mqtts";
    let host = if tls {
        url.host_str().unwrap_or_default().to_owned()
    } else {
        addrs
            .first()
            .map(|a| a.ip().to_string())
            .ok_or_else(|| failed("no admitted address", true))?
    };
    let client_id = format!("twinguard-events-{}", uuid::Uuid::new_v4().simple());
    let mut options = MqttOptions::new(client_id, host, destination.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_start(true);
    if let (Some(user), Some(password)) = (
        &endpoint.spec.username,
        endpoint.password().map_err(|e| failed(e, true))?,
    ) {
        options.set_credentials(user.clone(), password.to_string());
    }
    if tls {
        let pem = endpoint
            .ca_pem()
            .map_err(|e| failed(e, true))?
            .unwrap_or_default();
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem).flatten() {
            let _ = roots.add(cert);
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (tx, acks) = tokio::sync::mpsc::channel(16);
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(c) = connected_tx.take() {
                        let _ = c.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    // A PUBACK with a failure reason code (>= 0x80) is a refusal.
                    let ok = (ack.reason as u8) < 0x80;
                    let _ = tx
                        .send(if ok {
                            Ok(())
                        } else {
                            Err(format!("PUBACK {:?}", ack.reason))
                        })
                        .await;
                }
                Ok(_) => {}
                Err(e) => {
                    let message = format!("MQTT: {e}");
                    if let Some(c) = connected_tx.take() {
                        let _ = c.send(Err(message));
                        return;
                    }
                    let _ = tx.send(Err(message)).await;
                    return;
                }
            }
        }
    })
    .abort_handle();
    match tokio::time::timeout(SEND_TIMEOUT, connected).await {
        Ok(Ok(Ok(()))) => Ok(Sink::Mqtt(MqttSink { client, acks, task })),
        Ok(Ok(Err(e))) => {
            task.abort();
            Err(failed(e, true))
        }
        _ => {
            task.abort();
            Err(failed("MQTT connection timed out", true))
        }
    }
}

/// A dead letter as stored and listed.
pub fn dead_letter_record(endpoint: &str, event: &Prepared, attempts: u32, error: &str) -> Value {
    let ce: Value = serde_json::from_slice(&event.body).unwrap_or(Value::Null);
    json!({
        "endpoint": endpoint,
        "sequence": event.seq,
        "id": event.id,
        "eventTime": event.time,
        "deadLetteredTime": twinguard_core::clock::rfc3339(time::OffsetDateTime::now_utc()),
        "attempts": attempts,
        "lastError": crate::audit::bounded(error),
        "event": ce,
    })
}

pub fn dead_letter_key(endpoint: &str, seq: u64) -> String {
    format!("{endpoint}\u{1f}{}", twinguard_core::feed::key(seq))
}

/// Stores a dead letter (the caller checked the per-endpoint limit).
pub fn dead_letter_mutation(endpoint: &str, record: &Value) -> Mutation {
    let seq = record["sequence"].as_u64().unwrap_or(0);
    Mutation::put(
        Table::DeadLetters,
        dead_letter_key(endpoint, seq),
        serde_json::to_vec(record).unwrap_or_default(),
    )
}
