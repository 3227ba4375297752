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
