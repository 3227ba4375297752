//! Signed telemetry ingestion, end to end: messages signed beforehand (so the client's signing
//! does not compete with the server for the two cores while timing), sent over the HTTPS device
//! plane in batches or through an MQTT broker, each one verified, validated, applied to its twin
//! and made durable by the server before it answers or acknowledges. The reference is this
//! machine's own Ed25519 batch verification rate on both cores, measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Value, json};
use twinguard_telemetry::envelope::{Message, Reading, sign_cose, signing_key_from_pem};

use crate::Api;

const MODEL: &str = "dtmi:bench:Sensor;1";
const FIRMWARE: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const API_VERSION: &str = "api-version=2023-10-31";

pub struct Fleet {
    keys: Vec<SigningKey>,
    seq: Vec<u64>,
    /// Each device's newest reading so far: its time (ms) and the values of `p0..`.
    newest: Vec<(i64, Vec<f64>)>,
}

/// Model, twins `s0..`, firmware allowlist and one device per twin, bound to `p0..p9`.
pub async fn setup(api: &Api, devices: usize) -> anyhow::Result<Fleet> {
    let client = &api.clients[0];
    let contents: Vec<Value> = (0..10)
        .map(|i| json!({"@type": "Property", "name": format!("p{i}"), "schema": "double"}))
        .collect();
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": MODEL, "@type": "Interface", "contents": contents}]);
    let send = |method: reqwest::Method, path: String, body: Value| {
        client
            .request(method, format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .json(&body)
            .send()
    };
    let r = send(
        reqwest::Method::POST,
        format!("/models?{API_VERSION}"),
        model,
    )
    .await?;
    ensure!(
        r.status().is_success() || r.status() == 409,
        "model upload: {}",
        r.status()
    );
    send(
        reqwest::Method::PUT,
        "/firmware/bench-sensor".into(),
        json!({"digests": [FIRMWARE]}),
    )
    .await?
    .error_for_status()?;
    // Limits for every property, as a plant would have. The values below are synthetic, not a
    // physical process, so the detector's veto is off (a threshold above 1): it still scores
    // every reading, and that work is measured, but a run cannot fail on its opinion of a
    // made-up pattern (at the default threshold it held about one reading in 20,000).
    for p in 0..10 {
        send(
            reqwest::Method::PUT,
            format!("/policies/bench-p{p}"),
            json!({"model": MODEL, "property": format!("p{p}"), "min": -50.0, "max": 150.0,
                   "anomalyThreshold": 1.5}),
        )
        .await?
        .error_for_status()?;
    }
    let mut keys = Vec::with_capacity(devices);
    for i in 0..devices {
        send(
            reqwest::Method::PUT,
            format!("/digitaltwins/s{i}?{API_VERSION}"),
            json!({"$metadata": {"$model": MODEL}}),
        )
        .await?
        .error_for_status()?;
        let names: Vec<String> = (0..10).map(|p| format!("p{p}")).collect();
        let created: Value = send(
            reqwest::Method::PUT,
            format!("/devices/d{i}"),
            json!({"generate": true, "deviceModel": "bench-sensor",
                   "bindings": [{"twin": format!("s{i}"), "names": names}]}),
        )
        .await?
        .error_for_status()?
        .json()
        .await?;
        let pem = created["privateKey"].as_str().context("no private key")?;
        keys.push(signing_key_from_pem(pem)?);
    }
    Ok(Fleet {
        seq: vec![0; keys.len()],
        newest: vec![(0, Vec::new()); keys.len()],
        keys,
    })
}

impl Fleet {
    /// `count` COSE messages of `readings` readings each, spread over the devices. Each
    /// device's readings are 1 ms apart and newer than all it sent before, so every one that
    /// arrives in order moves its twin (an older one would only go to the history).
    pub fn sign(&mut self, count: usize, readings: usize) -> Vec<Vec<u8>> {
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        (0..count)
            .map(|n| {
                let d = n % self.keys.len();
                self.seq[d] += 1;
                // A minute back, so that up to 65,000 messages per device and call stay within
                // the 5 s a reading may be ahead of its message.
                let time = (self.newest[d].0 + 1).max(now - 60_000);
                let values: Vec<f64> = (0..readings)
                    .map(|p| 20.0 + ((n + p) % 7) as f64 * 0.1)
                    .collect();
                let message = Message {
                    device: format!("d{d}"),
                    seq: self.seq[d],
                    time: now,
                    firmware: Some(FIRMWARE.into()),
                    readings: values
                        .iter()
                        .enumerate()
                        .map(|(p, v)| Reading {
                            name: format!("p{p}"),
                            value: json!(v),
                            twin: None,
                            time: Some(time),
                        })
                        .collect(),
                };
                self.newest[d] = (time, values);
                sign_cose(&message, &self.keys[d])
            })
            .collect()
    }

    /// Fails unless every device's twin shows the device's newest reading (value and source
    /// time), i.e. the phase really applied readings to twins rather than only storing them.
    /// `settle` is how long a twin may take to show it: none after HTTPS answers (they come
    /// once the update is durable), a moment after MQTT, whose end the bench only sees in the
    /// server's acceptance counter, which counts a message before its commit.
    pub async fn check_applied(&self, api: &Api, settle: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + settle;
        loop {
            match self.first_stale(api).await? {
                None => return Ok(()),
                Some(e) if Instant::now() >= deadline => bail!(e),
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The first twin that does not show its device's newest reading, described.
    async fn first_stale(&self, api: &Api) -> anyhow::Result<Option<String>> {
        for (d, (time, values)) in self.newest.iter().enumerate() {
            let twin: Value = api.clients[0]
                .get(format!("{}/digitaltwins/s{d}?{API_VERSION}", api.base))
                .bearer_auth(&api.token)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            for (p, value) in values.iter().enumerate() {
                let name = format!("p{p}");
                let shown = twin[&name].as_f64();
                let source_time = twin["$metadata"][&name]["sourceTime"]
                    .as_str()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
                if shown != Some(*value) || source_time != Some(*time) {
                    return Ok(Some(format!(
                        "twin s{d} shows {name} = {shown:?} from {source_time:?}, not the newest reading {value} from {time}"
                    )));
                }
            }
        }
        Ok(None)
    }
}

/// The part of a device plane answer the load generator reads.
#[derive(serde::Deserialize)]
struct Statuses {
    results: Vec<Status>,
}

#[derive(serde::Deserialize)]
struct Status {
    status: String,
}

/// A device plane batch: COSE messages as base64.
fn batch_body(chunk: &[Vec<u8>]) -> Value {
    let encoded: Vec<String> = chunk
        .iter()
        .map(|m| base64::engine::general_purpose::STANDARD.encode(m))
        .collect();
    json!({ "messages": encoded })
}

/// Sends `messages` in batches of `batch` with `concurrency` requests in flight; returns the
/// elapsed time once every message is answered, and fails unless every one was accepted.
pub async fn https(
    api: &Arc<Api>,
    plane: &str,
    messages: Vec<Vec<u8>>,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let bodies: Vec<Value> = messages.chunks(batch).map(batch_body).collect();
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (api, bodies, next, url) = (
            api.clone(),
            bodies.clone(),
            next.clone(),
            format!("{plane}/telemetry"),
        );
        tasks.push(tokio::spawn(async move {
            let client = &api.clients[worker % api.clients.len()];
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return anyhow::Ok(());
                };
                // Only each message's status is read, as a gateway would; the whole answer is
                // shown when one was not accepted.
                let answer = client
                    .post(&url)
                    .json(body)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
                let statuses: Statuses = serde_json::from_slice(&answer)?;
                if statuses.results.len() != body["messages"].as_array().map_or(0, Vec::len)
                    || statuses.results.iter().any(|r| r.status != "accepted")
                {
                    bail!(
                        "not every message was accepted: {}",
                        String::from_utf8_lossy(&answer)
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

/// The server's `/metrics` text.
async fn metrics(api: &Api) -> anyhow::Result<String> {
    Ok(api.clients[0]
        .get(format!("{}/metrics", api.base))
        .bearer_auth(&api.token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// The server's count of accepted messages over `transport`, from `/metrics`.
async fn accepted(api: &Api, transport: &str) -> anyhow::Result<u64> {
    let text = metrics(api).await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("twinguard_telemetry_messages_total")
                && l.contains(&format!("transport=\"{transport}\""))
                && l.contains("status=\"accepted\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// The server's request duration histogram, from `/metrics`: `(upper bound in seconds,
/// requests at or under it)`, ascending.
pub async fn request_durations(api: &Api) -> anyhow::Result<Vec<(f64, u64)>> {
    let text = metrics(api).await?;
    let mut buckets: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("twinguard_http_request_duration_seconds_bucket{le=\"")?;
            let (le, rest) = rest.split_once('"')?;
            let count = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((le.parse::<f64>().unwrap_or(f64::INFINITY), count as u64))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    ensure!(
        !buckets.is_empty(),
        "the server reports no request durations"
    );
    Ok(buckets)
}

/// The smallest histogram bound under which at least `p` of the requests between two
/// snapshots finished, in milliseconds, with the number of requests.
pub fn percentile_bound(before: &[(f64, u64)], after: &[(f64, u64)], p: f64) -> (f64, u64) {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| {
            let earlier = before.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
            (le, n.saturating_sub(earlier))
        })
        .collect();
    let total = delta.last().map_or(0, |d| d.1);
    let bound = delta
        .iter()
        .find(|&&(_, n)| n as f64 >= p * total as f64)
        .map_or(f64::INFINITY, |d| d.0);
    (bound * 1000.0, total)
}

/// Publishes `messages` with QoS 1 and returns the time until the server has accepted all.
pub async fn mqtt(
    api: &Api,
    url: &str,
    topic: &str,
    messages: Vec<Vec<u8>>,
) -> anyhow::Result<Duration> {
    let rest = url
        .strip_prefix("mqtt://")
        .context("--mqtt takes mqtt://HOST:PORT")?;
    let (host, port) = rest.rsplit_once(':').context("HOST:PORT")?;
    let mut options = rumqttc::MqttOptions::new(
        format!("bench-{}-{}", std::process::id(), messages.len()),
        host,
        port.parse()?,
    );
    options.set_max_packet_size(1 << 20, 1 << 20);
    options.set_inflight(1_000);
    options.set_clean_session(false);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10_000);
    // Keep polling through errors: rumqttc reconnects and resends what was not acknowledged.
    tokio::spawn(async move {
        loop {
            if let Err(e) = events.poll().await {
                eprintln!("bench publisher: {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let before = accepted(api, "mqtt").await?;
    let total = messages.len() as u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    let mut published = 0u64;
    let mut messages = messages.into_iter();
    loop {
        let done = accepted(api, "mqtt").await? - before;
        if done >= total {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            bail!("only {done} of {total} MQTT messages were accepted within 300 s");
        }
        // At most WINDOW messages between publisher and server: Mosquitto queues a bounded number
        // of QoS 1 messages per subscriber (its log says "Outgoing messages are being dropped").
        while published - done < WINDOW {
            let Some(m) = messages.next() else { break };
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, m)
                .await?;
            published += 1;
        }
        // Often enough that the window, not this pause, sets the pace: 400 messages per 5 ms
        // is 80,000 a second. Each look is a /metrics request, which the server's CPU figure
        // includes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Messages published but not yet accepted by the server. Mosquitto drops messages for a
/// subscriber that has more than 1,020 unacknowledged (its default `max_queued_messages` of
/// 1,000 plus `max_inflight_messages` of 20, whatever the subscriber's Receive Maximum), and the
/// server may hold up to 512 accepted but not yet acknowledged (its Receive Maximum), so the
/// publisher stays 400 ahead at most.
const WINDOW: u64 = 400;

/// Sends batches of `batch` messages at `rate` messages per second (open loop) and returns each
/// request's latency: from sending to the answer, which comes after the twin update is durable.
pub async fn latency(
    api: &Arc<Api>,
    plane: &str,
    messages: Vec<Vec<u8>>,
    batch: usize,
    rate: f64,
) -> anyhow::Result<Vec<Duration>> {
    let period = Duration::from_secs_f64(batch as f64 / rate);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for (n, chunk) in messages.chunks(batch).enumerate() {
        ticker.tick().await;
        let body = batch_body(chunk);
        let (api, url) = (api.clone(), format!("{plane}/telemetry"));
        tasks.push(tokio::spawn(async move {
            let client = &api.clients[n % api.clients.len()];
            let started = Instant::now();
            let answer: Value = client
                .post(&url)
                .json(&body)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let elapsed = started.elapsed();
            let results = answer["results"].as_array().context("no results")?;
            if let Some(refused) = results.iter().find(|r| r["status"] != "accepted") {
                bail!("a message was not accepted: {refused}");
            }
            anyhow::Ok(elapsed)
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await??);
    }
    Ok(out)
}

/// This machine's Ed25519 batch verification rate (signatures per second) on `threads` threads,
/// in batches of 256 (the server's own batches are a request's messages, at most 250 in the
/// bench), the best of `runs` runs: a busy moment of a shared host lowers a single run.
pub fn verify_rate(threads: usize, per_thread: usize, runs: usize) -> anyhow::Result<f64> {
    let key = SigningKey::from_bytes(&[7; 32]);
    let public: VerifyingKey = key.verifying_key();
    let messages: Vec<Vec<u8>> = (0..per_thread)
        .map(|i| format!("reading {i} of the reference").into_bytes())
        .collect();
    let signatures: Vec<Signature> = messages.iter().map(|m| key.sign(m)).collect();
    let mut best: f64 = 0.0;
    for _ in 0..runs {
        best = best.max(verify_run(threads, public, &messages, &signatures)?);
    }
    Ok(best)
}

/// One run of [`verify_rate`]: every thread verifies all `messages` in batches of 256.
fn verify_run(
    threads: usize,
    public: VerifyingKey,
    messages: &[Vec<u8>],
    signatures: &[Signature],
) -> anyhow::Result<f64> {
    let started = Instant::now();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    for (ms, ss) in messages.chunks(256).zip(signatures.chunks(256)) {
                        let refs: Vec<&[u8]> = ms.iter().map(Vec::as_slice).collect();
                        let keys = vec![public; ms.len()];
                        ed25519_dalek::verify_batch(&refs, ss, &keys)
                            .map_err(|_| anyhow::anyhow!("reference batch failed"))?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a reference thread failed"))??;
        }
        anyhow::Ok(())
    })?;
    Ok((threads * messages.len()) as f64 / started.elapsed().as_secs_f64())
}

/// User + system CPU seconds of process `pid` so far (Linux `/proc/PID/stat`, fields 14 and 15,
/// in clock ticks of 1/100 s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields count from after it.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}
