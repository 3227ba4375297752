//! `twinguard sim`: a device simulator that signs its messages like a real device and can also
//! misbehave — drift, spike, get stuck, replay, spoof another device, or send impossible values —
//! to show (and test) what the server does about it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ed25519_dalek::SigningKey;
use serde_json::Value;
use twinguard_telemetry::envelope::{Message, Reading, sign_cose, sign_jws, signing_key_from_pem};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Behaviour {
    /// The truth, with a little noise.
    Honest,
    /// Wanders away from the truth slowly (0.05 per reading).
    Drift,
    /// Every fifth reading jumps 40 above the truth.
    Spike,
    /// Repeats one value whatever the truth does.
    Stuck,
    /// Sends each message twice: the second copy is a replay.
    Replay,
    /// Claims to be --spoof-as while signing with its own key.
    Spoof,
    /// Sends values a hundred times the truth.
    OutOfLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EnvelopeFormat {
    Cose,
    Jws,
}

#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// The device ID the simulator signs as.
    #[arg(long)]
    pub device: String,
    /// The device's private key (PKCS#8 PEM), e.g. from `twinguard device provision --key-out`.
    #[arg(long)]
    pub key: PathBuf,
    /// The twin the readings are for (needed when the device is bound to several).
    #[arg(long)]
    pub twin: Option<String>,
    /// The property or telemetry name.
    #[arg(long)]
    pub name: String,
    /// The true value the honest behaviour reports.
    #[arg(long, default_value_t = 21.0)]
    pub base: f64,
    #[arg(long, value_enum, default_value = "honest")]
    pub behaviour: Behaviour,
    /// Messages to send (0: until stopped).
    #[arg(long, default_value_t = 10)]
    pub count: u64,
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    #[arg(long, value_enum, default_value = "cose")]
    pub format: EnvelopeFormat,
    /// Firmware digest to attest (lowercase hex SHA-256).
    #[arg(long)]
    pub firmware: Option<String>,
    /// The device a spoofing simulator claims to be.
    #[arg(long)]
    pub spoof_as: Option<String>,
    /// Device plane URL, e.g. https://127.0.0.1:8444.
    #[arg(long, conflicts_with = "mqtt")]
    pub target: Option<String>,
    /// CA certificate of the device plane (DATA_DIR/tls/ca.pem).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Publish to an MQTT broker instead: mqtt://HOST:PORT (topic twinguard/telemetry/DEVICE).
    #[arg(long)]
    pub mqtt: Option<String>,
}

/// Produces the simulator's messages, one envelope per call.
pub struct Simulator {
    args: SimArgs,
    key: SigningKey,
    seq: u64,
    step: u64,
    previous: Option<Vec<u8>>,
}

impl Simulator {
    pub fn new(args: SimArgs) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(&args.key)
            .with_context(|| format!("reading {}", args.key.display()))?;
        let key = signing_key_from_pem(&pem).context("the key is not a PKCS#8 Ed25519 key")?;
        // Sequence numbers start at the current time in microseconds, so a restarted simulator
        // never reuses one.
        let seq = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000) as u64;
        Ok(Self {
            args,
            key,
            seq,
            step: 0,
            previous: None,
        })
    }

    /// The value this behaviour reports at this step.
    fn value(&self) -> f64 {
        let truth = self.args.base + 0.05 * ((self.step as f64) * 0.7).sin();
        match self.args.behaviour {
            Behaviour::Drift => truth + 0.05 * self.step as f64,
            Behaviour::Spike if self.step % 5 == 4 => truth + 40.0,
            Behaviour::Stuck => self.args.base + 3.0,
            Behaviour::OutOfLimit => truth * 100.0,
            _ => truth,
        }
    }

    /// The next envelope to send.
    pub fn next_message(&mut self) -> Vec<u8> {
        if self.args.behaviour == Behaviour::Replay
            && self.step % 2 == 1
            && let Some(previous) = self.previous.take()
        {
            self.step += 1;
            return previous;
        }
        self.seq += 1;
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let device = match (self.args.behaviour, &self.args.spoof_as) {
            (Behaviour::Spoof, Some(other)) => other.clone(),
            _ => self.args.device.clone(),
        };
        let value = serde_json::Number::from_f64(self.value()).map_or(Value::Null, Value::Number);
        let message = Message {
            device,
            seq: self.seq,
            time: now_ms,
            firmware: self.args.firmware.clone(),
            readings: vec![Reading {
                name: self.args.name.clone(),
                value,
                twin: self.args.twin.clone(),
                time: None,
            }],
        };
        let bytes = match self.args.format {
            EnvelopeFormat::Cose => sign_cose(&message, &self.key),
            EnvelopeFormat::Jws => sign_jws(&message, &self.key).into_bytes(),
        };
        self.step += 1;
        self.previous = Some(bytes.clone());
        bytes
    }

    pub fn content_type(&self) -> &'static str {
        match self.args.format {
            EnvelopeFormat::Cose => "application/cose",
            EnvelopeFormat::Jws => "application/jose",
        }
    }
}

/// Runs the simulator against the device plane (HTTPS) or a broker (MQTT).
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let count = args.count;
    let interval = Duration::from_millis(args.interval_ms);
    let device = args.device.clone();
    let mut sim = Simulator::new(args.clone())?;
    if let Some(url) = &args.mqtt {
        let rest = url
            .strip_prefix("mqtt://")
            .context("--mqtt takes mqtt://HOST:PORT")?;
        let (host, port) = rest.rsplit_once(':').context("--mqtt needs HOST:PORT")?;
        let options = rumqttc::MqttOptions::new(format!("sim-{device}"), host, port.parse()?);
        let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let topic = format!("twinguard/telemetry/{device}");
        let mut sent = 0;
        while count == 0 || sent < count {
            client
                .publish(&topic, rumqttc::QoS::AtLeastOnce, false, sim.next_message())
                .await?;
            sent += 1;
            println!("{device}: published message {sent} to {topic}");
            tokio::time::sleep(interval).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        return Ok(());
    }
    let target = args
        .target
        .as_deref()
        .context("give --target (device plane URL) or --mqtt")?;
    let ca = args.ca.as_ref().context("--target needs --ca")?;
    let client = crate::admin::https_client(ca)?;
    let mut sent = 0;
    while count == 0 || sent < count {
        let response = client
            .post(format!("{}/telemetry", target.trim_end_matches('/')))
            .header("content-type", sim.content_type())
            .body(sim.next_message())
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        sent += 1;
        println!("{device}: {status} {body}");
        tokio::time::sleep(interval).await;
    }
    Ok(())
}
