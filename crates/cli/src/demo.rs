//! `twinguard demo`: the server with a small plant and simulated devices, some of them hostile,
//! and a report of what the defences did. A boiler's temperature is measured by three redundant
//! sensors, one of which drifts; an intruder signs with its own key while claiming to be a
//! trusted sensor; an old gateway replays what it captured; a broken sensor reports impossible
//! values; a sensor with unapproved firmware keeps reporting. Then the sensors fall silent and
//! the twin falls back to a forecast, saying so.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};
use twinguard_server::startup::{Application, ServeConfig};

use crate::sim::{Behaviour, EnvelopeFormat, SimArgs, Simulator};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Data directory (created if missing; a fresh one in a temporary directory by default).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seconds of simulated traffic before the report.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Stop after the report instead of serving on.
    #[arg(long)]
    exit: bool,
}

const MODEL: &str = "dtmi:twinguard:demo:Boiler;1";
const FIRMWARE: &str = "5f2b7c5a0d1e4b8f9c3a6d2e1f0b7c8a9d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a";
const ROGUE_FIRMWARE: &str = "0000000000000000000000000000000000000000000000000000000000000bad";
const TRUTH: f64 = 82.0;
/// The built-in Operator role, which reviews quarantine (docs/identity.md).
const OPERATOR: &str = "4a1f8d2c-7e5b-4c93-8b16-3d9e0a6f2c84";

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn boiler(&self) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::GET,
            "/digitaltwins/boiler-1?api-version=2023-10-31",
            Value::Null,
        )
        .await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let response = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(status.is_success(), "{path}: {status} {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// One simulated device of the demo.
struct Actor {
    name: &'static str,
    role: &'static str,
    sim: Simulator,
}

/// The server log's file name in the demo's data directory.
const SERVER_LOG: &str = "server.log";

/// Settles the demo's data directory (a fresh temporary one unless `--data-dir` names one; the
/// guard removes it when dropped) and opens the server log in it, owner-only, before anything
/// logs.
pub fn prepare(args: &mut DemoArgs) -> anyhow::Result<(Option<tempfile::TempDir>, std::fs::File)> {
    let scratch = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("twinguard-demo")
                .tempdir()?,
        ),
    };
    let data_dir = match &scratch {
        Some(dir) => dir.path().to_owned(),
        None => args.data_dir.clone().unwrap_or_default(),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(data_dir.join(SERVER_LOG))
        .with_context(|| format!("cannot open the server log in {}", data_dir.display()))?;
    args.data_dir = Some(data_dir);
    Ok((scratch, log))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .context("the demo's data directory was not prepared")?;
    let app = Application::build(&ServeConfig {
        data_dir: data_dir.clone(),
        api_listen: "127.0.0.1:0".parse()?,
        tls_names: vec![],
        issuers: None,
        audit_witness: None,
        siem: vec![],
        device_listen: Some("127.0.0.1:0".parse()?),
        mqtt: None,
        history_retention: None,
        public_url: None,
        connections: Default::default(),
        dangerous_unbounded_resources: false,
        egress: Default::default(),
        egress_ca: None,
        store: Default::default(),
        endpoint_credentials: None,
        event_backlog: None,
        egress_lookup: None,
    })?;
    let base = app.base_url();
    let device_plane = format!(
        "https://{}",
        app.device_addr().context("the device plane did not bind")?
    );
    println!("twinguard: api listening on {base}");
    println!("twinguard: device plane listening on {device_plane}");
    println!(
        "twinguard: the server's own log goes to {}",
        data_dir.join(SERVER_LOG).display()
    );
    let server = tokio::spawn(app.run());

    let ca = data_dir.join("tls/ca.pem");
    let client = crate::admin::https_client(&ca)?;
    let admin: Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("secrets/admin-client.json"))?)?;
    let token: Value = client
        .post(format!("{base}/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", admin["client_id"].as_str().unwrap_or_default()),
            (
                "client_secret",
                admin["client_secret"].as_str().unwrap_or_default(),
            ),
        ])
        .send()
        .await?
        .json()
        .await?;
    let api = Api {
        client: client.clone(),
        base: base.clone(),
        token: token["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    use reqwest::Method;
    println!("\n== a boiler, its model, and the rules its sensors answer to");
    api.call(
        Method::POST,
        "/models?api-version=2023-10-31",
        json!([{
            "@context": "dtmi:dtdl:context;3", "@id": MODEL, "@type": "Interface",
            "displayName": "Boiler",
            "contents": [
                {"@type": "Property", "name": "temperature", "schema": "double"},
                {"@type": "Telemetry", "name": "pressure", "schema": "double"}
            ]
        }]),
    )
    .await?;
    api.call(
        Method::PUT,
        "/digitaltwins/boiler-1?api-version=2023-10-31",
        json!({"$metadata": {"$model": MODEL}}),
    )
    .await?;
    api.call(
        Method::PUT,
        "/firmware/demo-sensor",
        json!({"digests": [FIRMWARE]}),
    )
    .await?;
    api.call(
        Method::PUT,
        "/policies/boiler-temperature",
        json!({"model": MODEL, "property": "temperature", "min": 0.0, "max": 150.0,
               "unit": "degreeCelsius", "maxRatePerSecond": 5.0, "staleAfterSeconds": 4.0}),
    )
    .await?;
    let keys = data_dir.join("demo-keys");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&keys)?;
    let mut actors = Vec::new();
    let cast: [(&'static str, &'static str, Behaviour, &str, Option<&str>); 7] = [
        ("temp-a", "honest sensor", Behaviour::Honest, FIRMWARE, None),
        ("temp-b", "honest sensor", Behaviour::Honest, FIRMWARE, None),
        (
            "temp-c",
            "sensor that drifts",
            Behaviour::Drift,
            FIRMWARE,
            None,
        ),
        (
            "intruder",
            "signs with its own key, claims to be temp-a",
            Behaviour::Spoof,
            FIRMWARE,
            Some("temp-a"),
        ),
        (
            "old-gateway",
            "replays every message it sent",
            Behaviour::Replay,
            FIRMWARE,
            None,
        ),
        (
            "broken",
            "reports impossible values",
            Behaviour::OutOfLimit,
            FIRMWARE,
            None,
        ),
        (
            "rogue-fw",
            "runs firmware nobody approved",
            Behaviour::Honest,
            ROGUE_FIRMWARE,
            None,
        ),
    ];
    for (name, role, behaviour, firmware, spoof_as) in cast {
        let created = api
            .call(
                Method::PUT,
                &format!("/devices/{name}"),
                json!({"generate": true, "deviceModel": "demo-sensor",
                       "bindings": [{"twin": "boiler-1", "names": ["temperature", "pressure"]}]}),
            )
            .await?;
        let key = keys.join(format!("{name}.pem"));
        twinguard_server::datadir::write_private(
            &key,
            created["privateKey"]
                .as_str()
                .unwrap_or_default()
                .as_bytes(),
        )?;
        let sim = Simulator::new(SimArgs {
            device: name.to_owned(),
            key,
            twin: None,
            name: "temperature".into(),
            base: TRUTH,
            behaviour,
            count: 0,
            interval_ms: 250,
            format: if name.ends_with('b') {
                EnvelopeFormat::Jws
            } else {
                EnvelopeFormat::Cose
            },
            firmware: Some(firmware.to_owned()),
            spoof_as: spoof_as.map(str::to_owned),
            target: None,
            ca: None,
            mqtt: None,
        })?;
        println!("   device {name:<12} {role}");
        actors.push(Actor { name, role, sim });
    }
    api.call(
        Method::PUT,
        "/sensorgroups/boiler-temperature",
        json!({"twin": "boiler-1", "property": "temperature", "devices": ["temp-a", "temp-b", "temp-c"],
               "method": "median", "tolerance": 0.5, "freshSeconds": 4.0}),
    )
    .await?;
    api.call(
        Method::POST,
        "/admin/roleassignments",
        json!({"principalId": admin["client_id"], "roleId": OPERATOR}),
    )
    .await?;
    println!(
        "   sensor group temp-a, temp-b, temp-c feeds boiler-1.temperature (median, tolerance 0.5)"
    );

    println!(
        "\n== {} seconds of traffic, 4 messages a second from each device",
        args.seconds
    );
    let mut tally: BTreeMap<&str, BTreeMap<String, u32>> = BTreeMap::new();
    let ticks = args.seconds * 4;
    for _ in 0..ticks {
        for actor in &mut actors {
            let response = client
                .post(format!("{device_plane}/telemetry"))
                .header("content-type", actor.sim.content_type())
                .body(actor.sim.next_message())
                .send()
                .await?;
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let mut verdict = body["status"].as_str().unwrap_or("error").to_owned();
            if let Some(reason) = body["reason"].as_str() {
                verdict = format!("{verdict} ({reason})");
            }
            if let Some(reasons) = body["readings"][0]["reasons"].as_array() {
                let codes: Vec<&str> = reasons.iter().filter_map(Value::as_str).collect();
                if !codes.is_empty() {
                    verdict = format!("{verdict} ({})", codes.join(", "));
                }
            }
            *tally
                .entry(actor.name)
                .or_default()
                .entry(verdict)
                .or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for actor in &actors {
        let counts = tally.get(actor.name).cloned().unwrap_or_default();
        let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        println!(
            "   {:<12} {:<46} {}",
            actor.name,
            actor.role,
            summary.join(", ")
        );
    }
    let twin = api.boiler().await?;
    let shown = twin["temperature"].as_f64().unwrap_or(f64::NAN);
    let meta = &twin["$metadata"]["temperature"];
    println!(
        "\n   boiler-1.temperature = {shown:.2} (truth about {TRUTH:.1}), quality {}, sources {}",
        meta["quality"], meta["sources"]
    );
    for name in ["temp-a", "temp-b", "temp-c"] {
        let device = api
            .call(Method::GET, &format!("/devices/{name}"), Value::Null)
            .await?;
        if let Some(suspect) = device.get("suspect") {
            println!(
                "   suspect: {name} (reported {}, group said {})",
                suspect["lastValue"], suspect["fusedValue"]
            );
        }
    }
    let held = api
        .call(Method::GET, "/quarantine?limit=1000", Value::Null)
        .await?;
    let n = held["value"].as_array().map_or(0, Vec::len);
    println!(
        "   {n} readings with valid signatures held in quarantine for review (GET /quarantine)"
    );

    println!("\n== the sensors fall silent for 6 seconds");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let twin = api.boiler().await?;
    let meta = &twin["$metadata"]["temperature"];
    println!(
        "   boiler-1.temperature = {:.2}, quality {}, sources {}",
        twin["temperature"].as_f64().unwrap_or(f64::NAN),
        meta["quality"],
        meta["sources"]
    );
    let status = api
        .call(Method::GET, "/telemetry/status", Value::Null)
        .await?;
    println!("   degraded: {}", status["degraded"]);
    println!(
        "\nThe audit trail of all of it is in {}/audit.",
        data_dir.display()
    );
    if args.exit {
        server.abort();
        return Ok(());
    }
    let d = data_dir.display();
    println!("\n== try it while the server runs (another terminal)");
    println!("   D={d}");
    println!(
        "   TOKEN=$(curl -s --cacert $D/tls/ca.pem -d grant_type=client_credentials \\\n     \
         -d client_id=$(jq -r .client_id $D/secrets/admin-client.json) \\\n     \
         -d client_secret=$(jq -r .client_secret $D/secrets/admin-client.json) \\\n     \
         {base}/oauth2/token | jq -r .access_token)"
    );
    println!(
        "   curl -s --cacert $D/tls/ca.pem -H \"Authorization: Bearer $TOKEN\" \\\n     \
         \"{base}/digitaltwins/boiler-1?api-version=2023-10-31\" | jq .   # the twin and its quality"
    );
    println!(
        "   curl -s --cacert $D/tls/ca.pem -H \"Authorization: Bearer $TOKEN\" {base}/quarantine | jq .   # held readings"
    );
    println!(
        "   twinguard audit verify --log $D/audit --key $D/audit/checkpoint.pub   # prove the trail intact"
    );
    println!("   tail -f $D/{SERVER_LOG}   # the server's own log");
    println!("\nThe server keeps running; Ctrl-C stops it.");
    let _ = server.await;
    Ok(())
}
