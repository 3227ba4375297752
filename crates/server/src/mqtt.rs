//! MQTT ingestion: twinguard subscribes to a broker and treats it as untrusted. A message is
//! believed for its signature only, never for the topic it came on or the broker's word; the
//! broker's job is delivery. Messages are acknowledged (QoS 1) only once the pipeline's
//! decision on them is durable, and the session is persistent, so readings the broker took
//! while twinguard was down are delivered when it is back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, TlsConfiguration};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
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
const BATCH: usize = 256;

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
    options.set_clean_session(false);
    options.set_max_packet_size(
        twinguard_telemetry::envelope::MAX_ENVELOPE_BYTES + 1024,
        twinguard_telemetry::envelope::MAX_ENVELOPE_BYTES + 1024,
    );
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
    let (client, mut events) = AsyncClient::new(options, 1_024);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Publish>(4 * BATCH);
    let topic = config.topic.clone();
    let subscriber = client.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(topic = %topic, "connected to the MQTT broker");
                    if let Err(e) = subscriber.subscribe(&topic, QoS::AtLeastOnce).await {
                        tracing::error!(error = %e, "MQTT subscribe failed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if tx.send(publish).await.is_err() {
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
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let raw = batch.iter().map(|p| p.payload.to_vec()).collect();
            match telemetry.ingest(raw, Transport::Mqtt).await {
                Ok(_) => {
                    for publish in batch.drain(..) {
                        if let Err(e) = client.ack(&publish).await {
                            tracing::warn!(error = %e, "MQTT ack failed");
                        }
                    }
                }
                Err(e) => {
                    // Not acknowledged: the broker redelivers after the reconnect this forces.
                    tracing::error!(error = %e, messages = batch.len(), "MQTT batch not stored; leaving it unacknowledged");
                    batch.clear();
                    let _ = client.disconnect().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(())
}
