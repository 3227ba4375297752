//! Issue 19's event delivery benchmark: writes per second with delivery to NATS JetStream on
//! and off (ABBA rounds), events per second delivered end to end, and, at half of the peak write
//! rate offered open loop, the server's CPU per write with delivery off and on (ABBA rounds) and
//! the time from a write's acknowledgement to a JetStream consumer receiving its event.
//!
//! The writes change `temperature` to a number unique over the run (the write's index), so the
//! consumer matches each event to its write by the value in the event's patch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{Api, MODEL, ingest, run_parallel};

/// The endpoint and route the benchmark creates (and deletes) on the server.
const ENDPOINT: &str = "bench-nats";
const ROUTE: &str = "bench-route";
/// How long a phase may wait for its last event before it fails.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct Options {
    /// The NATS server, nats://HOST:PORT (the server must be allowed to connect to it).
    pub nats: String,
    /// Twins the writes go to (created first with the `load` subcommand's code).
    pub twins: usize,
    /// Writes per round.
    pub writes: usize,
    /// Rounds of each mode, alternating (ABBA).
    pub rounds: usize,
    pub concurrency: usize,
    /// Seconds of the latency phase.
    pub latency_seconds: f64,
    pub server_pid: Option<u32>,
    pub broker_pid: Option<u32>,
}

/// Runs the whole benchmark on a JetStream stream of its own, deleted at the end whatever
/// happened.
pub async fn run(api: Arc<Api>, options: &Options) -> anyhow::Result<()> {
    crate::load(api.clone(), options.twins, 0, options.concurrency).await?;
    let client = async_nats::connect(&options.nats)
        .await
        .with_context(|| format!("connecting to {}", options.nats))?;
    let js = jetstream::new(client);
    let unique = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis()
    );
    let name = format!("twinguard-bench-{unique}");
    let subject = format!("twinguard.bench.{unique}");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        // Limits in case the deletion below never runs (the process is killed).
        max_age: Duration::from_secs(3600),
        max_bytes: 2 << 30,
        ..stream::Config::default()
    })
    .await
    .context("creating the JetStream stream")?;
    println!("stream={name} subject={subject}");
    let bench = Bench {
        api,
        js: js.clone(),
        stream: name.clone(),
        subject,
        options,
        next_value: AtomicUsize::new(0),
    };
    let result = bench.all().await;
    // Leave nothing behind on the server or on NATS, whatever the result.
    let _ = bench.delivery(false).await;
    let deleted = js.delete_stream(&name).await;
    result?;
    deleted.with_context(|| format!("deleting the stream {name}"))?;
    println!("stream={name} deleted");
    Ok(())
}

struct Bench<'a> {
    api: Arc<Api>,
    js: jetstream::Context,
    stream: String,
    subject: String,
    options: &'a Options,
    /// The next `temperature` value: every write of the run sets a different one.
    next_value: AtomicUsize,
}

/// One round's figures.
struct Round {
    writes_per_s: f64,
    server_cpu_us: Option<f64>,
}

impl Bench<'_> {
    async fn all(&self) -> anyhow::Result<()> {
        let o = self.options;
        let mut rounds: HashMap<bool, Vec<Round>> = HashMap::new();
        let mut e2e = Vec::new();
        for round in 1..=o.rounds {
            let order = if round % 2 == 1 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                let (r, events_per_s) = self.round(round, on).await?;
                e2e.extend(events_per_s);
                rounds.entry(on).or_default().push(r);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let summary = |on: bool| {
            let r = rounds.get(&on).map(Vec::as_slice).unwrap_or_default();
            let rate = mean(&r.iter().map(|r| r.writes_per_s).collect::<Vec<_>>());
            let cpu: Vec<f64> = r.iter().filter_map(|r| r.server_cpu_us).collect();
            (rate, (!cpu.is_empty()).then(|| mean(&cpu)))
        };
        let (off_rate, off_cpu) = summary(false);
        let (on_rate, on_cpu) = summary(true);
        let cpu = |c: Option<f64>| c.map_or("n/a".to_owned(), |c| format!("{c:.1}"));
        println!(
            "writes: off writes_per_s={off_rate:.0} server_cpu_us_per_write={}, on writes_per_s={on_rate:.0} server_cpu_us_per_write={}; throughput on/off={:.3} cpu off/on={} ({} rounds each)",
            cpu(off_cpu),
            cpu(on_cpu),
            on_rate / off_rate,
            off_cpu
                .zip(on_cpu)
                .map_or("n/a".to_owned(), |(a, b)| format!("{:.3}", a / b)),
            o.rounds
        );
        println!(
            "events_end_to_end: events_per_s={:.0} (mean of {} rounds, from the first write to the last event received)",
            mean(&e2e),
            e2e.len()
        );
        self.paced(on_rate / 2.0).await
    }

    /// The cost at equal load: the same offered write rate (open loop) with delivery off and
    /// on, in ABBA rounds, so the server's CPU per write compares like with like (a closed
    /// loop at each mode's own peak also measures how batching changes with the rate). The
    /// "on" rounds also give the time from acknowledgement to receipt.
    async fn paced(&self, rate: f64) -> anyhow::Result<()> {
        let o = self.options;
        if !rate.is_finite() || rate < 1.0 {
            bail!("no write rate to offer half of: {rate}");
        }
        let mut cpu: HashMap<bool, Vec<f64>> = HashMap::new();
        for round in 1..=o.rounds {
            let order = if round % 2 == 1 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                if let Some(us) = self.latency(round, rate, on).await? {
                    cpu.entry(on).or_default().push(us);
                }
            }
        }
        let mean = |v: Option<&Vec<f64>>| {
            v.filter(|v| !v.is_empty())
                .map(|v| v.iter().sum::<f64>() / v.len() as f64)
        };
        if let (Some(off), Some(on)) = (mean(cpu.get(&false)), mean(cpu.get(&true))) {
            println!(
                "paced offered_writes_per_s={rate:.0}: server_cpu_us_per_write off={off:.1} on={on:.1}; delivery adds {:.1} us per write = {:.1} % ({} rounds each)",
                on - off,
                (on - off) / off * 100.0,
                o.rounds
            );
        }
        Ok(())
    }

    /// Creates the endpoint and the route `true` to it (`on`), or deletes both.
    async fn delivery(&self, on: bool) -> anyhow::Result<()> {
        let endpoint = format!("/admin/endpoints/{ENDPOINT}");
        let route = format!("/eventroutes/{ROUTE}?{}", crate::API);
        if on {
            let spec =
                json!({"type": "natsJetStream", "url": self.options.nats, "subject": self.subject});
            self.api.call(Method::PUT, &endpoint, Some(&spec)).await?;
            let route_body = json!({"endpointName": ENDPOINT, "filter": "true"});
            self.api.call(Method::PUT, &route, Some(&route_body)).await
        } else {
            // Either may not exist (yet): a 404 is fine here.
            let _ = self.api.call(Method::DELETE, &route, None).await;
            let _ = self.api.call(Method::DELETE, &endpoint, None).await;
            Ok(())
        }
    }

    /// `count` writes, `concurrency` at a time: even ones PATCH `temperature`, odd ones PUT the
    /// whole twin with a new `temperature`. Returns the first value written.
    async fn write_load(&self, count: usize) -> anyhow::Result<(usize, Duration)> {
        let first = self.next_value.fetch_add(count, Ordering::Relaxed);
        let (api, twins) = (self.api.clone(), self.options.twins);
        let took = run_parallel(count, self.options.concurrency, move |i| {
            let api = api.clone();
            async move { write(&api, i, first + i, twins).await }
        })
        .await?;
        Ok((first, took))
    }

    async fn round(&self, round: usize, on: bool) -> anyhow::Result<(Round, Option<f64>)> {
        let o = self.options;
        let collector = if on {
            self.delivery(true).await?;
            Some(Collector::start(&self.js, &self.stream).await?)
        } else {
            None
        };
        let cpu = Cpu::now(o);
        let started = Instant::now();
        let (first, took) = self.write_load(o.writes).await?;
        let writes_per_s = o.writes as f64 / took.as_secs_f64();
        let mut line = format!(
            "round={round} mode={} writes={} writes_per_s={writes_per_s:.0}",
            if on { "on" } else { "off" },
            o.writes
        );
        let mut events_per_s = None;
        if let Some(collector) = collector {
            let last = collector.wait(first, o.writes).await?;
            let seconds = last.duration_since(started).as_secs_f64();
            events_per_s = Some(o.writes as f64 / seconds);
            line += &format!(
                " events_per_s_end_to_end={:.0} last_event_after_s={seconds:.2} duplicates={}",
                o.writes as f64 / seconds,
                collector.duplicates()
            );
        }
        // CPU from the first write until all of the round's work is done (with delivery on,
        // until the last event was received).
        let (used, figures) = cpu.per_op(o.writes, on);
        line += &figures;
        println!("{line}");
        if on {
            self.delivery(false).await?;
        }
        Ok((
            Round {
                writes_per_s,
                server_cpu_us: used,
            },
            events_per_s,
        ))
    }

    /// Writes at `rate` per second (open loop) for the phase's seconds, with delivery `on` or
    /// off; with it on, reports the time from each write's acknowledgement to its event's
    /// receipt. Returns the server's CPU microseconds per write (until the last event arrived,
    /// with delivery on).
    async fn latency(&self, round: usize, rate: f64, on: bool) -> anyhow::Result<Option<f64>> {
        let o = self.options;
        let collector = if on {
            self.delivery(true).await?;
            let collector = Collector::start(&self.js, &self.stream).await?;
            // Warm up: the endpoint connects to NATS with its first event.
            let (first, _) = self.write_load(200).await?;
            collector.wait(first, 200).await?;
            Some(collector)
        } else {
            self.write_load(200).await?;
            None
        };
        let count = ((rate * o.latency_seconds) as usize).max(1);
        let first = self.next_value.fetch_add(count, Ordering::Relaxed);
        let cpu = Cpu::now(o);
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            ticker.tick().await;
            let api = self.api.clone();
            let twins = o.twins;
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                write(&api, i, first + i, twins).await?;
                anyhow::Ok((sent, Instant::now()))
            }));
        }
        let mut acks = Vec::with_capacity(count);
        for task in tasks {
            acks.push(task.await??);
        }
        let Some(collector) = collector else {
            let (used, cpu_figures) = cpu.per_op(count, false);
            println!(
                "paced round={round} mode=off offered_writes_per_s={rate:.0} writes={count}{cpu_figures}"
            );
            return Ok(used);
        };
        collector.wait(first, count).await?;
        let (used, cpu_figures) = cpu.per_op(count, true);
        let received = collector.received();
        let mut delays = Vec::with_capacity(count);
        let mut answers = Vec::with_capacity(count);
        for (i, (sent, acked)) in acks.iter().enumerate() {
            let at = received
                .get(&(first + i))
                .with_context(|| format!("no event for write {}", first + i))?;
            // Signed: an event may reach the consumer before the HTTP answer reaches the client.
            let delay = if *at >= *acked {
                at.duration_since(*acked).as_secs_f64()
            } else {
                -acked.duration_since(*at).as_secs_f64()
            };
            delays.push(delay * 1000.0);
            answers.push(acked.duration_since(*sent).as_secs_f64() * 1000.0);
        }
        delays.sort_by(f64::total_cmp);
        answers.sort_by(f64::total_cmp);
        let pct = |v: &[f64], p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "paced round={round} mode=on offered_writes_per_s={rate:.0} writes={count} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} min_ms={:.2} write_answer_p50_ms={:.2} write_answer_p99_ms={:.2} duplicates={}{cpu_figures}",
            pct(&delays, 0.5),
            pct(&delays, 0.99),
            pct(&delays, 1.0),
            pct(&delays, 0.0),
            pct(&answers, 0.5),
            pct(&answers, 0.99),
            collector.duplicates()
        );
        let mut stream = self.js.get_stream(&self.stream).await?;
        let state = &stream.info().await?.state;
        println!(
            "stream messages={} bytes_per_message={:.0}",
            state.messages,
            state.bytes as f64 / state.messages.max(1) as f64
        );
        self.delivery(false).await?;
        Ok(used)
    }
}

/// Write `value` into twin `t{value % twins}`: a PATCH for even `n`, a PUT of the whole twin for
/// odd `n`. Both make one `Twin.Update` event whose patch replaces `/temperature` with `value`.
async fn write(api: &Api, n: usize, value: usize, twins: usize) -> anyhow::Result<()> {
    let twin = value % twins.max(1);
    let path = format!("/digitaltwins/t{twin}");
    if n.is_multiple_of(2) {
        let patch = json!([{"op": "replace", "path": "/temperature", "value": value as f64}]);
        api.write(Method::PATCH, n, &path, &patch).await
    } else {
        let body = json!({"$metadata": {"$model": MODEL}, "name": format!("node {twin}"), "temperature": value as f64, "status": "ok"});
        api.write(Method::PUT, n, &path, &body).await
    }
}

/// CPU seconds of the server and the broker, and the bytes the server wrote to storage, at the
/// start of a phase.
struct Cpu {
    server: Option<(u32, f64)>,
    broker: Option<(u32, f64)>,
    disk: Option<(u32, u64)>,
}

/// Bytes process `pid` has caused to be written to storage so far (`write_bytes` of
/// `/proc/PID/io`).
fn disk_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

impl Cpu {
    fn now(o: &Options) -> Self {
        let at = |pid: Option<u32>| pid.and_then(|p| Some((p, ingest::cpu_seconds(p)?)));
        Self {
            server: at(o.server_pid),
            broker: at(o.broker_pid),
            disk: o.server_pid.and_then(|p| Some((p, disk_bytes(p)?))),
        }
    }

    /// The server's CPU microseconds per operation since `now`, and the figures as text (with
    /// the broker's when it carried events).
    fn per_op(&self, ops: usize, broker: bool) -> (Option<f64>, String) {
        let used = |at: Option<(u32, f64)>| {
            at.and_then(|(pid, before)| {
                Some((ingest::cpu_seconds(pid)? - before) / ops as f64 * 1e6)
            })
        };
        let server = used(self.server);
        let mut text = String::new();
        if let Some(us) = server {
            text += &format!(" server_cpu_us_per_write={us:.1}");
        }
        if let Some((pid, before)) = self.disk
            && let Some(after) = disk_bytes(pid)
        {
            let bytes = after.saturating_sub(before) as f64 / ops as f64;
            text += &format!(" server_disk_bytes_per_write={bytes:.0}");
        }
        if broker && let Some(us) = used(self.broker) {
            text += &format!(" nats_cpu_us_per_event={us:.1}");
        }
        (server, text)
    }
}

/// A JetStream consumer (ordered, from the stream's next message on) that records when each
/// event arrived, by the `temperature` value in its patch.
struct Collector {
    received: Arc<Mutex<HashMap<usize, Instant>>>,
    duplicates: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Collector {
    async fn start(js: &jetstream::Context, stream: &str) -> anyhow::Result<Self> {
        let consumer = js
            .get_stream(stream)
            .await?
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::New,
                ..consumer::pull::OrderedConfig::default()
            })
            .await
            .context("creating the consumer")?;
        let mut messages = consumer.messages().await?;
        let received = Arc::new(Mutex::new(HashMap::new()));
        let duplicates = Arc::new(AtomicUsize::new(0));
        let (r, d) = (received.clone(), duplicates.clone());
        let task = tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let message = message.context("reading the stream")?;
                let at = Instant::now();
                let Some(value) = temperature(&message.payload) else {
                    bail!(
                        "an event without a temperature: {}",
                        String::from_utf8_lossy(&message.payload)
                    );
                };
                let mut map = r.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                if map.insert(value, at).is_some() {
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        });
        Ok(Self {
            received,
            duplicates,
            task,
        })
    }

    /// Waits until the events of values `first..first + count` have all arrived and returns
    /// when the last of them did.
    async fn wait(&self, first: usize, count: usize) -> anyhow::Result<Instant> {
        let started = Instant::now();
        loop {
            {
                let map = self
                    .received
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?;
                let mut last = None;
                let mut missing = 0;
                for v in first..first + count {
                    match map.get(&v) {
                        Some(at) => last = last.max(Some(*at)),
                        None => missing += 1,
                    }
                    if missing > 0 {
                        break;
                    }
                }
                if missing == 0
                    && let Some(last) = last
                {
                    return Ok(last);
                }
            }
            if self.task.is_finished() {
                bail!("the consumer stopped");
            }
            if started.elapsed() > DELIVERY_TIMEOUT {
                bail!("events missing after {DELIVERY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn received(&self) -> HashMap<usize, Instant> {
        self.received.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn duplicates(&self) -> usize {
        self.duplicates.load(Ordering::Relaxed)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `temperature` value an update event's patch sets.
fn temperature(payload: &[u8]) -> Option<usize> {
    let event: Value = serde_json::from_slice(payload).ok()?;
    let patch = event["data"]["patch"].as_array()?;
    let op = patch.iter().find(|op| op["path"] == "/temperature")?;
    Some(op["value"].as_f64()? as usize)
}
