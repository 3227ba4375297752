//! MQTT ingestion: twinguard subscribes to a broker and treats it as untrusted. A message is
//! believed for its signature only, never for the topic it came on or the broker's word; the
//! broker's job is delivery. Messages are acknowledged (QoS 1) only once the pipeline's
//! decision on them is durable, and the session is persistent, so readings the broker took
//! while twinguard was down are delivered when it is back.
//!
//! twinguard speaks MQTT 5 for its Receive Maximum: it lets the broker send up to
//! [`RECEIVE_MAXIMUM`] messages ahead of the acknowledgements. An MQTT 3.1.1 subscriber gets the
//! broker's own limit instead (Mosquitto: 20), and since acknowledgements wait for a durable
//! commit, every commit then carried at most 20 messages. Several batches are ingested at once;
//! their acknowledgements still go out in the order the messages arrived, as MQTT requires.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use rumqttc::TlsConfiguration;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::mpsc;
use twinguard_telemetry::{Telemetry, Transport};

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// Topic filter, e.g. `twinguard/telemetry/#`.
    pub topic: String,
    /// CA certificate (PEM) the broker's certificate must chain to, for `mqtts`.
    pub ca: Option<PathBuf>,
    /// The persistent session's client ID.
    pub client_id: String,
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

fn options(config: &MqttConfig) -> anyhow::Result<MqttOptions> {
    let (tls, rest) = if let Some(rest) = config.url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = config.url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        anyhow::bail!("the MQTT URL must start with mqtt:// or mqtts://");
    };
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .context("the MQTT URL needs host:port")?;
    let port: u16 = port.parse().context("the MQTT port is not a number")?;
    let mut options = MqttOptions::new(&config.client_id, host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_manual_acks(true);
    // A persistent session that never expires (MQTT 5 needs both for what 3.1.1's
    // clean-session flag alone did): the broker keeps what arrives while twinguard is down.
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(u32::MAX));
    options.set_receive_maximum(Some(RECEIVE_MAXIMUM));
    options.set_max_packet_size(Some(
        (twinguard_telemetry::envelope::MAX_ENVELOPE_BYTES + 1024) as u32,
    ));
    if tls {
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
    } else {
        tracing::warn!(
            "MQTT without TLS: the broker link is readable on the network (messages are still verified by signature)"
        );
    }
    Ok(options)
}

/// Connects and ingests until the process ends; reconnects with a pause after errors.
pub fn spawn(config: MqttConfig, telemetry: Telemetry) -> anyhow::Result<()> {
    let options = options(&config)?;
    let (client, mut events) = AsyncClient::new(options, usize::from(RECEIVE_MAXIMUM));
    // Each message with the connection it came on: an acknowledgement belongs to that
    // connection only (after a reconnect the broker sends again whatever was not acknowledged).
    let connection = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::channel::<(u64, Publish)>(usize::from(RECEIVE_MAXIMUM));
    let topic = config.topic.clone();
    let subscriber = client.clone();
    let current = connection.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    current.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(topic = %topic, "connected to the MQTT broker");
                    if let Err(e) = subscriber.subscribe(&topic, QoS::AtLeastOnce).await {
                        tracing::error!(error = %e, "MQTT subscribe failed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let on = current.load(Ordering::SeqCst);
                    if tx.send((on, publish)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT connection error; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    // Batches start in arrival order and are answered in that order.
    let (started, mut ingesting) = mpsc::channel(BATCHES_IN_FLIGHT);
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
    tokio::spawn(async move {
        // The connection on which a batch could not be stored: nothing more is acknowledged
        // on it, so the broker sends the rest again after the reconnect this forces.
        let mut failed_on = None;
        while let Some((ingest, batch)) = ingesting.recv().await {
            let stored = match ingest.await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, messages = batch.len(), "MQTT batch not stored; leaving it unacknowledged");
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, messages = batch.len(), "MQTT batch failed; leaving it unacknowledged");
                    false
                }
            };
            let now = connection.load(Ordering::SeqCst);
            if !stored {
                if failed_on != Some(now) {
                    failed_on = Some(now);
                    let _ = client.disconnect().await;
                }
                continue;
            }
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
