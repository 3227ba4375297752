//! Import jobs against single PUTs: the same graph (N twins, K relationships each) created both
//! ways on one server, in the same run, alternating which goes first in each round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{API, Api, neighbour, run_parallel};

const MODEL: &str = "dtmi:bench:ImportNode;1";

fn model() -> Value {
    json!({
        "@context": "dtmi:dtdl:context;3", "@id": MODEL, "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "name", "schema": "string"},
            {"@type": "Property", "name": "temperature", "schema": "double"},
            {"@type": "Property", "name": "status", "schema": "string"},
            {"@type": "Relationship", "name": "link", "target": MODEL}
        ]
    })
}

fn twin_body(i: usize) -> Value {
    json!({"$metadata": {"$model": MODEL}, "name": format!("node {i}"),
           "temperature": 20.0 + (i % 100) as f64 / 10.0, "status": "ok"})
}

/// The import file for twins `{prefix}{i}` and their relationships.
fn import_file(prefix: &str, twins: usize, per_twin: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(twins * (140 + per_twin * 120));
    let mut line = |v: &Value| {
        out.extend_from_slice(v.to_string().as_bytes());
        out.push(b'\n');
    };
    line(&json!({"Section": "Header"}));
    line(
        &json!({"fileVersion": "1.0.0", "author": "twinguard-bench", "organization": "twinguard"}),
    );
    line(&json!({"Section": "Twins"}));
    for i in 0..twins {
        let mut body = twin_body(i);
        body["$dtId"] = json!(format!("{prefix}{i}"));
        line(&body);
    }
    line(&json!({"Section": "Relationships"}));
    for i in 0..twins {
        for k in 0..per_twin {
            line(&json!({
                "$dtId": format!("{prefix}{i}"),
                "$relationshipId": format!("l{k}"),
                "$targetId": format!("{prefix}{}", neighbour(i, k, twins)),
                "$relationshipName": "link",
            }));
        }
    }
    out
}

async fn by_single_puts(
    api: Arc<Api>,
    prefix: &str,
    twins: usize,
    per_twin: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let a = api.clone();
    let p = prefix.to_owned();
    let twin_time = run_parallel(twins, concurrency, move |i| {
        let (a, p) = (a.clone(), p.clone());
        async move {
            a.put(i, &format!("/digitaltwins/{p}{i}"), &twin_body(i))
                .await
        }
    })
    .await?;
    let a = api.clone();
    let p = prefix.to_owned();
    let rel_time = run_parallel(twins * per_twin, concurrency, move |r| {
        let (a, p) = (a.clone(), p.clone());
        async move {
            let (i, k) = (r / per_twin, r % per_twin);
            let body = json!({"$targetId": format!("{p}{}", neighbour(i, k, twins)), "$relationshipName": "link"});
            a.put(r, &format!("/digitaltwins/{p}{i}/relationships/l{k}"), &body)
                .await
        }
    })
    .await?;
    Ok(twin_time + rel_time)
}

/// Uploads the file as an import job and waits until it has succeeded; the time includes the
/// upload.
async fn by_import(api: &Api, id: &str, file: Vec<u8>) -> anyhow::Result<Duration> {
    let client = &api.clients[0];
    let started = Instant::now();
    let response = client
        .put(format!("{}/jobs/imports/{id}?{API}", api.base))
        .bearer_auth(&api.token)
        .header("content-type", "application/x-ndjson")
        .timeout(Duration::from_secs(600))
        .body(file)
        .send()
        .await?;
    if response.status() != 201 {
        bail!(
            "creating the import job: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    loop {
        let job: Value = client
            .get(format!("{}/jobs/imports/{id}?{API}", api.base))
            .bearer_auth(&api.token)
            .send()
            .await?
            .json()
            .await?;
        match job["status"].as_str() {
            Some("succeeded") => return Ok(started.elapsed()),
            Some("notstarted" | "running") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => bail!("the import job did not succeed: {job}"),
        }
    }
}

pub async fn compare(
    api: Arc<Api>,
    twins: usize,
    per_twin: usize,
    concurrency: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let response = api.clients[0]
        .post(format!("{}/models?{API}", api.base))
        .bearer_auth(&api.token)
        .json(&json!([model()]))
        .send()
        .await?;
    if !response.status().is_success() && response.status() != 409 {
        bail!("model upload failed: {}", response.status());
    }
    let (mut put_total, mut import_total) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        // ABBA: a drift of the shared host, or the graph growing, falls on both.
        let import_first = round % 2 == 1;
        for phase in 0..2 {
            if (phase == 0) == import_first {
                let file = import_file(&format!("i{round}-"), twins, per_twin);
                let bytes = file.len();
                let took = by_import(&api, &format!("bench-{round}"), file)
                    .await
                    .context("import job")?;
                import_total += took;
                println!(
                    "round={round} mode=import twins={twins} relationships={} bytes={bytes} seconds={:.2} twins_per_s={:.0}",
                    twins * per_twin,
                    took.as_secs_f64(),
                    twins as f64 / took.as_secs_f64()
                );
            } else {
                let took = by_single_puts(
                    api.clone(),
                    &format!("p{round}-"),
                    twins,
                    per_twin,
                    concurrency,
                )
                .await
                .context("single PUTs")?;
                put_total += took;
                println!(
                    "round={round} mode=put twins={twins} relationships={} concurrency={concurrency} seconds={:.2} twins_per_s={:.0}",
                    twins * per_twin,
                    took.as_secs_f64(),
                    twins as f64 / took.as_secs_f64()
                );
            }
        }
    }
    let total = (twins * rounds) as f64;
    let import_rate = total / import_total.as_secs_f64();
    let put_rate = total / put_total.as_secs_f64();
    println!(
        "import twins_per_s={import_rate:.0}, single PUTs twins_per_s={put_rate:.0}; import/put={:.2} ({rounds} rounds; twins per second counts each twin with its {per_twin} relationships)",
        import_rate / put_rate
    );
    Ok(())
}
