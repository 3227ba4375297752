//! Crash safety (control RS-1) under a power cut, not only `kill -9`: the server runs on a file
//! system that loses every write not yet fsynced (`twinguard-lossyfs`, a FUSE pass-through in
//! the spirit of LazyFS). SIGKILL leaves the page cache intact, so only such a crash can catch a
//! missing fsync; the negative control shows this one does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use twinguard_lossyfs::LossyMount;

use crate::process::Server;

const SKIP_STORE_FSYNC: (&str, &str) = ("TWINGUARD_DANGEROUS_SKIP_STORE_FSYNC", "1");

/// A data directory on a lossy mount over `backing`. Field order is drop order: the mount goes
/// (unmounted, even when the test failed) before the directories are removed.
struct PowerCut {
    mount: Option<LossyMount>,
    _mountpoint: tempfile::TempDir,
    backing: tempfile::TempDir,
}

impl PowerCut {
    fn new() -> Self {
        let backing = tempfile::tempdir().unwrap();
        let mountpoint = tempfile::tempdir().unwrap();
        let mount = LossyMount::mount(backing.path(), mountpoint.path())
            .expect("mounting the lossy file system needs root and /dev/fuse");
        std::fs::create_dir(mountpoint.path().join("data")).unwrap();
        Self {
            mount: Some(mount),
            _mountpoint: mountpoint,
            backing,
        }
    }

    fn mounted(&self) -> &LossyMount {
        self.mount.as_ref().expect("still mounted")
    }

    /// The data directory as the server on the mount sees it.
    fn data(&self) -> PathBuf {
        self.mounted().mountpoint().join("data")
    }

    /// The data directory as a machine that lost power would find it, once [`Self::cut`] ran.
    fn survivor(&self) -> PathBuf {
        self.backing.path().join("data")
    }

    /// Loses every unsynced write, then unmounts.
    fn cut(&mut self) {
        let mount = self.mount.take().expect("still mounted");
        let lost = mount.crash();
        let names: Vec<_> = lost
            .paths
            .iter()
            .filter_map(|p| p.strip_prefix(self.backing.path()).ok())
            .collect();
        eprintln!(
            "power cut: lost {} unsynced bytes in {} files: {names:?}",
            lost.bytes, lost.files
        );
        mount.unmount().unwrap();
    }
}

/// What a writer was told had been done, with the request's correlation ID.
#[derive(Clone, Debug)]
struct Acknowledged {
    id: String,
    reading: u64,
    request: String,
}

/// Uploads the model, then eight writers create twins until the server is killed after
/// `run_for`; returns every acknowledged write.
async fn write_twins_until_killed(
    server: Server,
    token: &str,
    before_writes: impl FnOnce(),
    run_for: Duration,
) -> Vec<Acknowledged> {
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:cut:Meter;1", "@type": "Interface",
        "contents": [{"@type": "Property", "name": "reading", "schema": "long"}]}]);
    let created = server
        .request(
            token,
            reqwest::Method::POST,
            "/models?api-version=2023-10-31",
            model,
        )
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    before_writes();

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, base, token, acknowledged) = (
            server.client.clone(),
            server.base.clone(),
            token.to_owned(),
            acknowledged.clone(),
        );
        writers.push(tokio::spawn(async move {
            let started = Instant::now();
            // Bounded in count and time whatever happens to the kill.
            for i in 0..5_000u64 {
                if started.elapsed() > Duration::from_secs(15) {
                    break;
                }
                let id = format!("m-{w}-{i}");
                let body = json!({"$metadata": {"$model": "dtmi:cut:Meter;1"}, "reading": i});
                let url = format!("{base}/digitaltwins/{id}?api-version=2023-10-31");
                match client.put(url).bearer_auth(&token).json(&body).send().await {
                    Ok(r) if r.status() == 200 => {
                        let request = r
                            .headers()
                            .get("x-ms-request-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        acknowledged.lock().unwrap().push(Acknowledged {
                            id,
                            reading: i,
                            request,
                        });
                    }
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(run_for).await;
    server.kill();
    for w in writers {
        w.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 50,
        "only {} writes were acknowledged before the kill",
        acknowledged.len()
    );
    acknowledged
}

/// The acknowledged twins a server on `data` does not return with their value.
async fn missing_twins(
    data: &Path,
    env: &[(&str, &str)],
    acknowledged: &[Acknowledged],
) -> Vec<String> {
    let server = Server::start_env(data, env);
    let token = server.admin_token(data).await;
    let mut missing = Vec::new();
    for write in acknowledged {
        let response = server
            .client
            .get(server.url(&format!("/digitaltwins/{}", write.id)))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let twin: Option<Value> = match response.status().as_u16() {
            200 => Some(response.json().await.unwrap()),
            404 => None,
            other => panic!("reading {} back answered {other}", write.id),
        };
        if twin.is_none_or(|t| t["reading"] != write.reading) {
            missing.push(write.id.clone());
        }
    }
    server.kill();
    missing
}

/// `twinguard audit verify` on a stopped server's data directory.
fn audit_verifies(data: &Path) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .args(["audit", "verify", "--log"])
        .arg(data.join("audit"))
        .arg("--key")
        .arg(data.join("audit/checkpoint.pub"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Correlation IDs of the outcome entries in the audit log (up to its first NUL).
fn audited_requests(data: &Path) -> std::collections::HashSet<String> {
    let bytes = std::fs::read(data.join("audit/entries.jsonl")).unwrap();
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| entry["kind"] == "request")
        .filter_map(|entry| entry["correlationId"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_and_its_audit_entry_survive_a_power_cut_that_loses_unsynced_data()
{
    let mut cut = PowerCut::new();
    let data = cut.data();
    let server = Server::start(&data);
    let token = server.admin_token(&data).await;
    let acknowledged =
        write_twins_until_killed(server, &token, || (), Duration::from_millis(2_000)).await;
    cut.cut();

    let survivor = cut.survivor();
    let missing = missing_twins(&survivor, &[], &acknowledged).await;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged twins are missing after the power cut, e.g. {:?}",
        missing.len(),
        acknowledged.len(),
        &missing[..missing.len().min(5)]
    );
    let audited = audited_requests(&survivor);
    let unaudited: Vec<_> = acknowledged
        .iter()
        .filter(|w| !audited.contains(&w.request))
        .map(|w| w.request.clone())
        .collect();
    assert!(
        unaudited.is_empty(),
        "{} acknowledged writes have no audit entry after the power cut",
        unaudited.len()
    );
    if let Err(report) = audit_verifies(&survivor) {
        panic!("the audit log does not verify after the power cut: {report}");
    }
}

/// The negative control: a store whose commits skip fsync (a test build's switch) keeps every
/// acknowledged write through `kill -9`, which is why SIGKILL tests cannot catch it, and loses
/// them in a power cut, which the test above would report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_skips_fsync_survives_kill_9_but_the_power_cut_test_catches_its_lost_writes() {
    let mut cut = PowerCut::new();
    let data = cut.data();
    let server = Server::start_env(&data, &[SKIP_STORE_FSYNC]);
    let token = server.admin_token(&data).await;
    // Set-up (admin client, model) made durable as a kernel's write-back might, so that what
    // is lost is the writes after it, not the whole store.
    let write_back = || {
        cut.mounted().write_back().unwrap();
    };
    let acknowledged =
        write_twins_until_killed(server, &token, write_back, Duration::from_millis(2_000)).await;

    // kill -9 alone: restarted on the same (still mounted) data, nothing is missing.
    let after_kill = missing_twins(&data, &[SKIP_STORE_FSYNC], &acknowledged).await;
    assert!(
        after_kill.is_empty(),
        "{} acknowledged writes missing after kill -9 alone",
        after_kill.len()
    );

    cut.cut();
    let missing = missing_twins(&cut.survivor(), &[], &acknowledged).await;
    eprintln!(
        "negative control: {} of {} acknowledged twins lost",
        missing.len(),
        acknowledged.len()
    );
    assert!(
        !missing.is_empty(),
        "a store that never fsyncs lost nothing in the power cut: the test cannot catch a missing fsync"
    );
}

/// Sets up four tank twins and their devices, then each device sends batches of 25 signed
/// one-reading messages to the device plane until the server is killed after `run_for`;
/// returns every reading the device plane accepted, as (device, sequence number).
async fn send_readings_until_killed(
    server: Server,
    data: &Path,
    before_sending: impl FnOnce(),
    run_for: Duration,
) -> Vec<(usize, u64)> {
    use base64::Engine;
    use twinguard_telemetry::envelope::{Message, Reading, sign_cose, signing_key_from_pem};

    let token = server.admin_token(data).await;
    let plane = server.device_plane(data);
    let api = |method, path: &str, body| server.request(&token, method, path, body);
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:cut:Tank;1", "@type": "Interface",
        "contents": [{"@type": "Property", "name": "level", "schema": "double"}]}]);
    let created = api(
        reqwest::Method::POST,
        "/models?api-version=2023-10-31",
        model,
    );
    assert_eq!(created.await.unwrap().status(), 201);
    let firmware = "cd".repeat(32);
    let allowed = api(
        reqwest::Method::PUT,
        "/firmware/tank-sensor",
        json!({"digests": [firmware]}),
    );
    assert!(allowed.await.unwrap().status().is_success());
    let mut keys = Vec::new();
    for d in 0..TANKS {
        let twin = json!({"$metadata": {"$model": "dtmi:cut:Tank;1"}});
        let put = api(
            reqwest::Method::PUT,
            &format!("/digitaltwins/tank-{d}?api-version=2023-10-31"),
            twin,
        );
        assert!(put.await.unwrap().status().is_success());
        let device = json!({"generate": true, "deviceModel": "tank-sensor",
            "bindings": [{"twin": format!("tank-{d}"), "names": ["level"]}]});
        let registered = api(reqwest::Method::PUT, &format!("/devices/level-{d}"), device);
        let registered: Value = registered.await.unwrap().json().await.unwrap();
        let pem = registered["privateKey"].as_str().expect("a generated key");
        keys.push(signing_key_from_pem(pem).unwrap());
    }
    before_sending();

    let accepted = Arc::new(Mutex::new(Vec::<(usize, u64)>::new()));
    let mut senders = Vec::new();
    for (d, key) in keys.into_iter().enumerate() {
        let (client, url, accepted, firmware) = (
            server.client.clone(),
            format!("{plane}/telemetry"),
            accepted.clone(),
            firmware.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut seq = 0;
            let started = Instant::now();
            // Bounded in count and time whatever happens to the kill.
            while seq < 4_000 && started.elapsed() < Duration::from_secs(15) {
                let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
                let batch: Vec<String> = (0..25)
                    .map(|_| {
                        seq += 1;
                        let message = Message {
                            device: format!("level-{d}"),
                            seq,
                            time: now as i64,
                            firmware: Some(firmware.clone()),
                            readings: vec![Reading {
                                name: "level".into(),
                                value: json!(1.5),
                                twin: None,
                                time: None,
                            }],
                        };
                        base64::engine::general_purpose::STANDARD.encode(sign_cose(&message, &key))
                    })
                    .collect();
                let Ok(response) = client
                    .post(&url)
                    .json(&json!({"messages": batch}))
                    .send()
                    .await
                else {
                    return;
                };
                let Ok(answer) = response.json::<Value>().await else {
                    return;
                };
                let results = answer["results"].as_array().cloned().unwrap_or_default();
                let first = seq - 24;
                for (i, result) in results.iter().enumerate() {
                    if result["status"] == "accepted" {
                        accepted.lock().unwrap().push((d, first + i as u64));
                    }
                }
            }
        }));
    }
    // Long enough for background merges of the history log, then the kill lands mid-stream.
    tokio::time::sleep(run_for).await;
    server.kill();
    for sender in senders {
        sender.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() > 100,
        "only {} readings were accepted before the kill",
        accepted.len()
    );
    accepted
}

const TANKS: usize = 4;

/// The accepted readings a server on `data` does not return in their twins' history, read a
/// page of 500 at a time by following `nextLink` (the paged history route).
async fn missing_readings(
    data: &Path,
    env: &[(&str, &str)],
    accepted: &[(usize, u64)],
) -> Vec<(usize, u64)> {
    let server = Server::start_env(data, env);
    let token = server.admin_token(data).await;
    let mut missing = Vec::new();
    for d in 0..TANKS {
        let mut kept = std::collections::HashSet::new();
        let mut url = format!("{}/history/tank-{d}/level?limit=500", server.base);
        for _ in 0..1_000 {
            let page: Value = server
                .client
                .get(&url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for r in page["readings"].as_array().unwrap() {
                assert_eq!(r["device"], format!("level-{d}"));
                assert!(kept.insert(r["seq"].as_u64().unwrap()), "a reading twice");
            }
            match page["nextLink"].as_str() {
                Some(next) => url = next.to_owned(),
                None => break,
            }
        }
        missing.extend(
            accepted
                .iter()
                .filter(|(device, seq)| *device == d && !kept.contains(seq)),
        );
    }
    server.kill();
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_the_device_plane_accepted_survives_a_power_cut_in_the_history() {
    let mut cut = PowerCut::new();
    let data = cut.data();
    let server = Server::start(&data);
    let accepted =
        send_readings_until_killed(server, &data, || (), Duration::from_millis(2_500)).await;
    cut.cut();
    let missing = missing_readings(&cut.survivor(), &[], &accepted).await;
    assert!(
        missing.is_empty(),
        "{} of {} accepted readings are missing from the history after the power cut, e.g. {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(5)]
    );
}

/// The negative control for the history: with the stores' fsync skipped (the test build's
/// switch, on the main store's history log and on the history store alike), accepted readings
/// survive `kill -9` but the power cut loses them, so the test above can catch a missing fsync
/// on the history's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_that_skips_fsync_survives_kill_9_but_the_power_cut_test_catches_its_lost_readings()
 {
    let mut cut = PowerCut::new();
    let data = cut.data();
    let server = Server::start_env(&data, &[SKIP_STORE_FSYNC]);
    let write_back = || {
        cut.mounted().write_back().unwrap();
    };
    let accepted =
        send_readings_until_killed(server, &data, write_back, Duration::from_millis(2_500)).await;
    let after_kill = missing_readings(&data, &[SKIP_STORE_FSYNC], &accepted).await;
    assert!(
        after_kill.is_empty(),
        "{} accepted readings missing after kill -9 alone",
        after_kill.len()
    );
    cut.cut();
    let missing = missing_readings(&cut.survivor(), &[], &accepted).await;
    eprintln!(
        "negative control: {} of {} accepted readings lost",
        missing.len(),
        accepted.len()
    );
    assert!(
        !missing.is_empty(),
        "a history that never fsyncs lost nothing in the power cut: the test cannot catch a missing fsync"
    );
}
