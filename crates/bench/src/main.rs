//! `twinguard-bench`: loads a graph through the public API and measures request latency, as a
//! client would see it (HTTPS, bearer token, HTTP/2). `bench/run.sh` drives it and compares the
//! figures with references measured in the same run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

mod events;
mod import;
mod ingest;

#[derive(Debug, Parser)]
struct Cli {
    /// The server's data directory (for the CA and the admin credential).
    #[arg(long)]
    data_dir: PathBuf,
    /// The server's base URL, e.g. https://127.0.0.1:8443.
    #[arg(long)]
    base: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a bearer token for the admin client.
    Token,
    /// Upload the bench model, then create twins `t0..tN` and K `link` relationships per twin.
    Load {
        #[arg(long)]
        twins: usize,
        #[arg(long, default_value_t = 3)]
        relationships_per_twin: usize,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
    /// Signed telemetry ingestion over the device plane (and MQTT), against this machine's
    /// Ed25519 batch verification rate.
    Ingest {
        /// The device plane's URL.
        #[arg(long)]
        device_plane: String,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Messages per HTTPS phase.
        #[arg(long, default_value_t = 40_000)]
        messages: usize,
        #[arg(long, default_value_t = 250)]
        batch: usize,
        /// Batches in flight: many devices and gateways send at once; with only a few, the
        /// figure measures the commit latency rather than the server's capacity.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// The broker the server subscribes to, mqtt://HOST:PORT.
        #[arg(long)]
        mqtt: Option<String>,
        /// The topic to publish on (under the server's --mqtt-topic filter).
        #[arg(long, default_value = "twinguard/telemetry/bench")]
        topic: String,
        /// The server's process ID: each phase then also reports the server's CPU time per
        /// reading (user + system, from /proc), which varies less than throughput on a shared
        /// host.
        #[arg(long)]
        server_pid: Option<u32>,
        /// The MQTT broker's process ID, when it runs on this machine: the MQTT phases then
        /// also report the broker's CPU time per reading, part of what the two cores carry.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Leave out the latency phases (for profiling the throughput phases).
        #[arg(long)]
        no_latency: bool,
    },
    /// The same graph created by an import job and by single PUTs, in the same run.
    Import {
        #[arg(long)]
        twins: usize,
        #[arg(long, default_value_t = 3)]
        relationships_per_twin: usize,
        /// PUTs in flight in the single-PUT phase.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Rounds; each creates the graph both ways, alternating which goes first.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// Event delivery (issue 19): writes per second with a natsJetStream endpoint and a route
    /// `true` on and off (ABBA rounds), events per second end to end, and the time from each
    /// write's acknowledgement to a JetStream consumer receiving its event, at half the peak.
    /// Creates a JetStream stream of its own and deletes it at the end.
    Events {
        /// The NATS server (the twinguard server must be allowed to connect to it).
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
        #[arg(long, default_value_t = 10_000)]
        twins: usize,
        /// Writes per round.
        #[arg(long, default_value_t = 20_000)]
        writes: usize,
        /// Rounds of each mode.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Seconds of the latency phase at half the peak write rate.
        #[arg(long, default_value_t = 10.0)]
        latency_seconds: f64,
        /// The server's process ID, for its CPU time per write.
        #[arg(long)]
        server_pid: Option<u32>,
        /// The NATS server's process ID, for its CPU time per event.
        #[arg(long)]
        broker_pid: Option<u32>,
    },
    /// Run a query template sequentially and print latency percentiles. `{id}` in the template
    /// is replaced by a random twin ID below `--twins`.
    Latency {
        #[arg(long)]
        query: String,
        #[arg(long)]
        twins: usize,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Fail if a result has fewer items than this (checks the query does real work).
        #[arg(long, default_value_t = 1)]
        min_items: usize,
    },
}

const MODEL: &str = "dtmi:bench:Node;1";
static RETRIES: AtomicUsize = AtomicUsize::new(0);
const API: &str = "api-version=2023-10-31";

/// The batch size of the ingestion bench's gateway phases: what a gateway sends at a time.
const GATEWAY_BATCH: usize = 25;

struct Api {
    clients: Vec<reqwest::Client>,
    base: String,
    token: String,
}

fn client(ca: &Path) -> anyhow::Result<reqwest::Client> {
    let ca = std::fs::read(ca).context("reading the CA")?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .timeout(Duration::from_secs(60))
        .build()?)
}

impl Api {
    async fn connect(data_dir: &Path, base: &str, connections: usize) -> anyhow::Result<Self> {
        let clients = (0..connections.max(1))
            .map(|_| client(&data_dir.join("tls/ca.pem")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let admin: Value =
            serde_json::from_slice(&std::fs::read(data_dir.join("secrets/admin-client.json"))?)?;
        let field = |k: &str| {
            admin[k]
                .as_str()
                .map(str::to_owned)
                .context("admin-client.json is incomplete")
        };
        let response: Value = clients[0]
            .post(format!("{base}/oauth2/token"))
            .form(&[
                ("grant_type", "client_credentials".to_owned()),
                ("client_id", field("client_id")?),
                ("client_secret", field("client_secret")?),
            ])
            .send()
            .await?
            .json()
            .await?;
        let token = response["access_token"]
            .as_str()
            .context("no access token")?
            .to_owned();
        Ok(Self {
            clients,
            base: base.to_owned(),
            token,
        })
    }

    /// PUT is idempotent, so a request whose connection failed is sent again on another
    /// connection (at most twice); retries are counted and reported.
    async fn put(&self, n: usize, path: &str, body: &Value) -> anyhow::Result<()> {
        self.write(reqwest::Method::PUT, n, path, body).await
    }

    /// A write (`PUT`, or a `PATCH` that sets values, which is idempotent too) on connection
    /// `n`, sent again on another connection after a transport error (at most twice).
    async fn write(
        &self,
        method: reqwest::Method,
        n: usize,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            let client = &self.clients[(n + attempt) % self.clients.len()];
            let url = format!("{}{path}?{API}", self.base);
            match client
                .request(method.clone(), url)
                .bearer_auth(&self.token)
                .json(body)
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => {
                    // Read the body as a real client does; dropping it unread makes the client
                    // reset the HTTP/2 stream, and enough resets close the connection.
                    response.bytes().await?;
                    return Ok(());
                }
                Ok(response) => {
                    let status = response.status();
                    bail!(
                        "{method} {path}: {status} {}",
                        response.text().await.unwrap_or_default()
                    );
                }
                Err(e) if attempt < 2 => {
                    if RETRIES.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("retrying {method} {path} after a transport error: {e:#}");
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One request with `path_and_query` as given (admin paths take no `api-version`); fails
    /// unless the answer is a success.
    async fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<()> {
        let mut request = self.clients[0]
            .request(method.clone(), format!("{}{path_and_query}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{method} {path_and_query}: {status} {text}");
        }
        Ok(())
    }
}

/// Neighbours of twin `i`: a fixed pseudo-random spread, so hops fan out across the graph.
fn neighbour(i: usize, k: usize, n: usize) -> usize {
    (i.wrapping_mul(7919)
        .wrapping_add((k + 1).wrapping_mul(104_729)))
        % n
}

async fn run_parallel<F, Fut>(total: usize, concurrency: usize, f: F) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, f) = (next.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                f(i).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

async fn load(
    api: Arc<Api>,
    twins: usize,
    per_twin: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let model = json!([{
        "@context": "dtmi:dtdl:context;3", "@id": MODEL, "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "name", "schema": "string"},
            {"@type": "Property", "name": "temperature", "schema": "double"},
            {"@type": "Property", "name": "status", "schema": "string"},
            {"@type": "Relationship", "name": "link", "target": MODEL}
        ]
    }]);
    let response = api.clients[0]
        .post(format!("{}/models?{API}", api.base))
        .bearer_auth(&api.token)
        .json(&model)
        .send()
        .await?;
    if !response.status().is_success() && response.status() != 409 {
        bail!("model upload failed: {}", response.status());
    }
    let a = api.clone();
    let twin_time = run_parallel(twins, concurrency, move |i| {
        let a = a.clone();
        async move {
            let body = json!({"$metadata": {"$model": MODEL}, "name": format!("node {i}"), "temperature": 20.0 + (i % 100) as f64 / 10.0, "status": "ok"});
            a.put(i, &format!("/digitaltwins/t{i}"), &body).await
        }
    })
    .await?;
    let rels = twins * per_twin;
    let a = api.clone();
    let rel_time = run_parallel(rels, concurrency, move |r| {
        let a = a.clone();
        async move {
            let (i, k) = (r / per_twin, r % per_twin);
            let body = json!({"$targetId": format!("t{}", neighbour(i, k, twins)), "$relationshipName": "link"});
            a.put(r, &format!("/digitaltwins/t{i}/relationships/l{k}"), &body).await
        }
    })
    .await?;
    let total = twin_time + rel_time;
    println!(
        "load twins={twins} seconds={:.2} writes_per_s={:.0}",
        twin_time.as_secs_f64(),
        twins as f64 / twin_time.as_secs_f64()
    );
    println!(
        "load relationships={rels} seconds={:.2} writes_per_s={:.0}",
        rel_time.as_secs_f64(),
        rels as f64 / rel_time.as_secs_f64()
    );
    println!(
        "load all_writes={} seconds={:.2} writes_per_s={:.0} transport_retries={}",
        twins + rels,
        total.as_secs_f64(),
        (twins + rels) as f64 / total.as_secs_f64(),
        RETRIES.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn latency(
    api: &Api,
    template: &str,
    twins: usize,
    count: usize,
    min_items: usize,
) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity(count);
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut total_items = 0usize;
    for n in 0..count + count / 10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let id = (seed % twins.max(1) as u64) as usize;
        let query = template.replace("{id}", &format!("t{id}"));
        let started = Instant::now();
        let response = api.clients[0]
            .post(format!("{}/query?{API}", api.base))
            .bearer_auth(&api.token)
            .json(&json!({"query": query}))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        let elapsed = started.elapsed();
        if !status.is_success() {
            bail!("query failed: {status} {body}");
        }
        let items = body["value"].as_array().map_or(0, Vec::len);
        if items < min_items {
            bail!("query returned {items} items, expected at least {min_items}: {query}");
        }
        // The first tenth warms connections and caches.
        if n >= count / 10 {
            samples.push(elapsed);
            total_items += items;
        }
    }
    samples.sort();
    let pct = |p: f64| {
        samples[((samples.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "latency count={} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} mean_items={:.1} query={template:?}",
        samples.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        total_items as f64 / samples.len() as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Token => {
                let api = Api::connect(&cli.data_dir, &cli.base, 1).await?;
                println!("{}", api.token);
            }
            Command::Load {
                twins,
                relationships_per_twin,
                concurrency,
            } => {
                let api = Arc::new(Api::connect(&cli.data_dir, &cli.base, 8).await?);
                load(api, twins, relationships_per_twin, concurrency).await?;
            }
            Command::Ingest {
                device_plane,
                devices,
                messages,
                batch,
                concurrency,
                mqtt,
                topic,
                server_pid,
                broker_pid,
                no_latency,
            } => {
                // CPU seconds so far of the server and the broker (when their PIDs are known)
                // and of this load generator, all sharing the machine's cores.
                let cpu = || -> [Option<f64>; 3] {
                    [
                        server_pid.and_then(ingest::cpu_seconds),
                        ingest::cpu_seconds(std::process::id()),
                        broker_pid.and_then(ingest::cpu_seconds),
                    ]
                };
                let per_reading = |before: [Option<f64>; 3], readings: usize, mqtt_phase: bool| {
                    let after = cpu();
                    let mut out = String::new();
                    let mut names = vec!["server", "load_generator"];
                    if mqtt_phase {
                        names.push("broker");
                    }
                    for (name, (a, b)) in names.into_iter().zip(before.into_iter().zip(after)) {
                        if let Some((a, b)) = a.zip(b) {
                            let us = (b - a) / readings as f64 * 1e6;
                            out += &format!(" {name}_cpu_us_per_reading={us:.1}");
                        }
                    }
                    out
                };
                let api = Arc::new(Api::connect(&cli.data_dir, &cli.base, concurrency).await?);
                let mut fleet = ingest::setup(&api, devices).await?;
                let warm = fleet.sign(2_000, 1);
                ingest::https(&api, &device_plane, warm, batch, concurrency).await?;
                // Measured once the server is set up and idle, so that none of its work
                // competes with the reference, as the best of three runs: a busy moment of the
                // shared host lowers a single run and would flatter the ratio.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let reference = ingest::verify_rate(cores, 20_000, 3)?;
                println!(
                    "ed25519_batch_verify_per_s={reference:.0} ({cores} threads, batches of 256, best of 3)"
                );
                // What a ratio of 0.6 leaves for everything on the machine (server, load
                // generator, broker) per reading, beside what the signature check alone costs:
                // the CPU figures of each phase below add up against it.
                let cpu_us = cores as f64 * 1e6;
                println!(
                    "cpu_us_per_signature={:.1} cpu_budget_us_per_reading_at_ratio_0.6={:.1} ({cores} cores)",
                    cpu_us / reference,
                    cpu_us / (0.6 * reference)
                );
                // (readings per message, batch size, messages): the peak's batches, and a
                // gateway's batches of 25 with half as many messages (they take longer).
                let mut phases = vec![(1, batch, messages), (10, batch, messages / 10)];
                if batch != GATEWAY_BATCH {
                    phases.push((1, GATEWAY_BATCH, messages / 2));
                }
                let mut peaks = Vec::new();
                for (readings, size, count) in phases {
                    let signed = fleet.sign(count, readings);
                    let before = cpu();
                    let took = ingest::https(&api, &device_plane, signed, size, concurrency).await?;
                    fleet.check_applied(&api, Duration::ZERO).await?;
                    let rate = (count * readings) as f64 / took.as_secs_f64();
                    if readings == 1 {
                        peaks.push((size, rate));
                    }
                    println!(
                        "ingest_https readings_per_message={readings} batch={size} messages={count} readings_per_s={rate:.0} ratio_to_verify={:.2}{}",
                        rate / reference,
                        per_reading(before, count * readings, false)
                    );
                }
                if let Some(url) = &mqtt {
                    for readings in [1, 10] {
                        let count = messages / 2 / readings;
                        let signed = fleet.sign(count, readings);
                        let before = cpu();
                        let took = ingest::mqtt(&api, url, &topic, signed).await?;
                        fleet.check_applied(&api, Duration::from_secs(2)).await?;
                        let rate = (count * readings) as f64 / took.as_secs_f64();
                        println!(
                            "ingest_mqtt readings_per_message={readings} messages={count} readings_per_s={rate:.0} ratio_to_verify={:.2}{}",
                            rate / reference,
                            per_reading(before, count * readings, true)
                        );
                    }
                }
                // Half of each batch size's own peak, offered for 10 s (open loop): in the
                // peak's batches (a request then waits for all its messages) and in a gateway's
                // batches, whose peak is lower because each request and each small
                // verification batch costs more per reading.
                let phases = if no_latency { vec![] } else { peaks };
                for (size, peak) in phases {
                    let rate = peak / 2.0;
                    let signed = fleet.sign((rate * 10.0) as usize, 1);
                    let count = signed.len();
                    let before = cpu();
                    let durations = ingest::request_durations(&api).await?;
                    let mut samples =
                        ingest::latency(&api, &device_plane, signed, size, rate).await?;
                    let cpu_used = per_reading(before, count, false);
                    // The server's own view, from receipt to the durable twin update: the
                    // histogram bound under which 99 % of the phase's requests finished.
                    let (server_p99, requests) = ingest::percentile_bound(
                        &durations,
                        &ingest::request_durations(&api).await?,
                        0.99,
                    );
                    fleet.check_applied(&api, Duration::ZERO).await?;
                    samples.sort();
                    let pct = |p: f64| {
                        samples[((samples.len() as f64 - 1.0) * p).round() as usize].as_secs_f64()
                            * 1000.0
                    };
                    println!(
                        "ingest_latency offered_readings_per_s={rate:.0} batch={size} requests={} p50_ms={:.2} p99_ms={:.2} server_p99_ms_at_most={server_p99} (of {requests} requests){cpu_used}",
                        samples.len(),
                        pct(0.5),
                        pct(0.99)
                    );
                }
            }
            Command::Import {
                twins,
                relationships_per_twin,
                concurrency,
                rounds,
            } => {
                let api = Arc::new(Api::connect(&cli.data_dir, &cli.base, 8).await?);
                import::compare(api, twins, relationships_per_twin, concurrency, rounds).await?;
            }
            Command::Events {
                nats,
                twins,
                writes,
                rounds,
                concurrency,
                latency_seconds,
                server_pid,
                broker_pid,
            } => {
                let api = Arc::new(Api::connect(&cli.data_dir, &cli.base, 8).await?);
                let options = events::Options {
                    nats,
                    twins,
                    writes,
                    rounds,
                    concurrency,
                    latency_seconds,
                    server_pid,
                    broker_pid,
                };
                events::run(api, &options).await?;
            }
            Command::Latency {
                query,
                twins,
                count,
                min_items,
            } => {
                let api = Api::connect(&cli.data_dir, &cli.base, 1).await?;
                latency(&api, &query, twins, count, min_items).await?;
            }
        }
        Ok(())
    })
}
