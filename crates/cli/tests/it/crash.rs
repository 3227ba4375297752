//! Crash safety (control RS-1): writers run, the process is killed with SIGKILL, and after a
//! restart every write that was acknowledged is there.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::process::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.admin_token(dir.path()).await;
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:crash:Meter;1", "@type": "Interface",
        "contents": [{"@type": "Property", "name": "reading", "schema": "long"}]}]);
    let response = server
        .client
        .post(server.url("/models"))
        .bearer_auth(&token)
        .json(&model)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, base, token, acknowledged) = (
            server.client.clone(),
            server.base.clone(),
            token.clone(),
            acknowledged.clone(),
        );
        writers.push(tokio::spawn(async move {
            let started = Instant::now();
            for i in 0.. {
                if started.elapsed() > Duration::from_secs(10) {
                    break;
                }
                let id = format!("m-{w}-{i}");
                let body = json!({"$metadata": {"$model": "dtmi:crash:Meter;1"}, "reading": i});
                let url = format!("{base}/digitaltwins/{id}?api-version=2023-10-31");
                match client.put(url).bearer_auth(&token).json(&body).send().await {
                    Ok(r) if r.status() == 200 => acknowledged.lock().unwrap().push((id, i)),
                    _ => break,
                }
            }
        }));
    }
    // Let the writers get going, then kill the server mid-stream.
    tokio::time::sleep(Duration::from_millis(1500)).await;
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

    let restarted = Server::start(dir.path());
    let token = restarted.admin_token(dir.path()).await;
    for (id, reading) in &acknowledged {
        let response = restarted
            .client
            .get(restarted.url(&format!("/digitaltwins/{id}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "acknowledged twin {id} is missing after the crash"
        );
        let twin: Value = response.json().await.unwrap();
        assert_eq!(&twin["reading"], reading);
    }
}

/// Signed telemetry under SIGKILL: every reading the device plane accepted is in its twin's
/// history after a restart, whether it was still in the history log or already merged into the
/// history store when the process died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_reading_survives_kill_9_in_the_history() {
    use base64::Engine;
    use twinguard_telemetry::envelope::{Message, Reading, sign_cose, signing_key_from_pem};

    const DEVICES: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.admin_token(dir.path()).await;
    let plane = server.device_plane(dir.path());
    let api = |method, path: &str, body| server.request(&token, method, path, body);
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:crash:Tank;1", "@type": "Interface",
        "contents": [{"@type": "Property", "name": "level", "schema": "double"}]}]);
    let created = api(
        reqwest::Method::POST,
        "/models?api-version=2023-10-31",
        model,
    );
    let created = created.await.unwrap();
    assert_eq!(created.status(), 201);
    let firmware = "cd".repeat(32);
    let allowed = api(
        reqwest::Method::PUT,
        "/firmware/tank-sensor",
        json!({"digests": [firmware]}),
    );
    assert!(allowed.await.unwrap().status().is_success());
    let mut keys = Vec::new();
    for d in 0..DEVICES {
        let twin = json!({"$metadata": {"$model": "dtmi:crash:Tank;1"}});
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

    // Each device sends batches of 25 signed one-reading messages and notes what was accepted.
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
            while seq < 4_000 {
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
    // Long enough for several background merges, then the kill lands mid-stream.
    tokio::time::sleep(Duration::from_millis(2500)).await;
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

    let restarted = Server::start(dir.path());
    let token = restarted.admin_token(dir.path()).await;
    for d in 0..DEVICES {
        let history: Value = restarted
            .client
            .get(format!(
                "{}/history/tank-{d}/level?limit=10000",
                restarted.base
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(history["truncated"], false);
        let kept: std::collections::HashSet<u64> = history["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["device"], format!("level-{d}"));
                r["seq"].as_u64().unwrap()
            })
            .collect();
        for (_, seq) in accepted.iter().filter(|(device, _)| *device == d) {
            assert!(
                kept.contains(seq),
                "accepted reading {seq} of level-{d} is missing from the history after the crash"
            );
        }
    }
}

#[tokio::test]
async fn first_start_writes_a_private_admin_credential_and_never_prints_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let path = dir.path().join("secrets/admin-client.json");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let admin: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let secret = admin["client_secret"].as_str().unwrap();
    assert!(secret.len() >= 43, "a 256-bit secret");
    let token = server.admin_token(dir.path()).await;
    assert!(!token.is_empty());
    assert!(dir.path().join("tls/ca.pem").exists());
    // The store holds only the secret's hash.
    let store = std::fs::read(dir.path().join("store.redb")).unwrap();
    assert!(!store.windows(secret.len()).any(|w| w == secret.as_bytes()));
    server.kill();
    for output in ["server.out", "server.log"] {
        let text = std::fs::read_to_string(dir.path().join(output)).unwrap();
        assert!(!text.contains(secret), "the secret appeared in {output}");
    }
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly_and_it_starts_again_on_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let token = server.admin_token(dir.path()).await;
    let response = server
        .client
        .get(server.url("/models"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Close our idle connection, or the graceful shutdown waits out its grace period for it.
    server.client = reqwest::Client::new();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_with_timeout(&mut server.child, std::time::Duration::from_secs(15));
    assert_eq!(
        exit.map(|s| s.code()),
        Some(Some(0)),
        "the server did not exit cleanly on SIGTERM"
    );
    drop(server);
    let again = Server::start(dir.path());
    let token = again.admin_token(dir.path()).await;
    assert!(!token.is_empty());
}

fn wait_with_timeout(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

/// Every file and directory under `root` (itself included) whose mode gives group or others
/// any access, skipping the names the test harness itself creates.
fn open_to_others(root: &std::path::Path, harness: &[&str]) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if harness.contains(&name) {
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            found.push(format!("{} {mode:o}", path.display()));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    found
}

#[tokio::test]
async fn under_a_permissive_umask_every_file_the_server_writes_is_its_owners_only() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let siem = outside.path().join("audit.jsonl");
    let witness = outside.path().join("witness");
    let server = Server::start_with(
        dir.path(),
        &[
            "--siem-file",
            siem.to_str().unwrap(),
            "--audit-witness",
            witness.to_str().unwrap(),
        ],
        Some("022"),
    );
    let token = server.admin_token(dir.path()).await;
    let created = server
        .request(
            &token,
            reqwest::Method::POST,
            "/admin/identities",
            json!({"kind": "application", "name": "umask-app"}),
        )
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let device = server
        .request(
            &token,
            reqwest::Method::PUT,
            "/devices/umask-device",
            json!({"generate": true, "deviceModel": "umask-sensor"}),
        )
        .await
        .unwrap();
    assert_eq!(device.status(), 201);
    // The SIEM export and the witness are written in the background.
    for _ in 0..100 {
        let exported = std::fs::metadata(&siem).map(|m| m.len()).unwrap_or(0);
        if exported > 0 && witness.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        std::fs::metadata(&siem).unwrap().len() > 0,
        "nothing exported"
    );
    // server.out and server.log are the harness's captures of stdout and stderr.
    let open = open_to_others(dir.path(), &["server.out", "server.log"]);
    assert!(open.is_empty(), "readable by others: {open:#?}");
    for path in [&siem, &witness] {
        let open = open_to_others(path, &[]);
        assert!(open.is_empty(), "readable by others: {open:#?}");
    }
    server.kill();
}
