//! The real binary on a PostgreSQL main store (`serve --store postgresql://...`): what it
//! acknowledged is read back by a server started again on the same database, with the same data
//! directory and with a fresh one. Needs PostgreSQL on 127.0.0.1:5432 (a database of its own,
//! dropped at the end); fails without it unless `TWINGUARD_SKIP_POSTGRES=1`.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use twinguard_store_postgres::testdb::TestDatabase;

use crate::process::Server;

pub(crate) async fn read_twin(server: &Server, token: &str, id: &str) -> (u16, Value) {
    let response = server
        .client
        .get(server.url(&format!("/digitaltwins/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Copies file `name` of data directory `from` into `to`, owner-only.
fn copy_private(from: &Path, to: &Path, name: &str) {
    let target = to.join(name);
    if let Some(dir) = target.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .unwrap();
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .unwrap();
    std::io::Write::write_all(&mut file, &std::fs::read(from.join(name)).unwrap()).unwrap();
}

/// Copies the first admin credential, to administer an instance from another data directory
/// (the credential is checked against the identities in PostgreSQL).
pub(crate) fn copy_admin_credential(from: &Path, to: &Path) {
    copy_private(from, to, "secrets/admin-client.json");
}

/// The files of a data directory that another node on the same database needs, as the README
/// lists them: the instance's identity and its key-encryption key (the admin credential only
/// to administer it). Everything else a node makes, or reads sealed from the database.
pub(crate) fn copy_node_files(from: &Path, to: &Path) {
    for name in [
        "instance.json",
        "secrets/instance.kek",
        "secrets/admin-client.json",
    ] {
        copy_private(from, to, name);
    }
}

/// The names of the sealed records in `db`'s `Table::Secrets`, after checking that none
/// holds a private key in the clear.
pub(crate) fn sealed_records(db: &TestDatabase) -> Vec<String> {
    let plain = db
        .query(
            "SELECT count(*) FROM records WHERE tbl = 'secrets' \
             AND position('PRIVATE KEY'::bytea in value) > 0",
        )
        .unwrap();
    assert_eq!(
        plain,
        vec![Some("0".to_owned())],
        "a private key in the clear"
    );
    db.query("SELECT convert_from(key, 'UTF8') FROM records WHERE tbl = 'secrets' ORDER BY 1")
        .unwrap()
        .into_iter()
        .flatten()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgresql_restarts_and_a_new_node_needs_only_the_instance_files() {
    let db = match TestDatabase::create() {
        Ok(Some(db)) => db,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let url = db.url();
    let store = ["--store", url.as_str()];
    let first_dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(first_dir.path(), &store, None);
    let token = server.admin_token(first_dir.path()).await;
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:pg:Pump;1", "@type": "Interface",
        "contents": [{"@type": "Property", "name": "flow", "schema": "double"}]}]);
    let response = server
        .client
        .post(server.url("/models"))
        .bearer_auth(&token)
        .json(&model)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = server
        .client
        .put(server.url("/digitaltwins/pump-1"))
        .bearer_auth(&token)
        .json(&json!({"$metadata": {"$model": "dtmi:pg:Pump;1"}, "flow": 12.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The main store is PostgreSQL: no store file, the twin's record in the database.
    assert!(!first_dir.path().join("store.redb").exists());
    assert_eq!(
        db.query("SELECT count(*) FROM records WHERE tbl = 'twins' AND key = 'pump-1'::bytea")
            .unwrap(),
        vec![Some("1".to_owned())]
    );
    drop(server);

    // Again on the same data directory.
    let server = Server::start_with(first_dir.path(), &store, None);
    let token = server.admin_token(first_dir.path()).await;
    let (status, twin) = read_twin(&server, &token, "pump-1").await;
    assert_eq!(status, 200, "{twin}");
    assert_eq!(twin["flow"], 12.5);
    drop(server);

    // The instance's private material is sealed in PostgreSQL, and no longer in the data
    // directory, so a copy of the directory carries none of it.
    assert_eq!(
        sealed_records(&db),
        [
            "ca",
            "event-key",
            "graph-order-key",
            "position-key",
            "token-keys"
        ]
    );
    for moved in [
        "tls/ca-key.pem",
        "secrets/ca.json",
        "secrets/token-keys.json",
        "secrets/event-key",
    ] {
        assert!(!first_dir.path().join(moved).exists(), "{moved}");
    }

    // A new data directory with only the files a node needs (the instance's identity, its
    // key-encryption key, and the admin credential): the CA and the token keys are the
    // instance's, so a token the first directory's server issued is good here, and the
    // graph and the identities come from PostgreSQL.
    let second_dir = tempfile::tempdir().unwrap();
    copy_node_files(first_dir.path(), second_dir.path());
    let server = Server::start_with(second_dir.path(), &store, None);
    let (status, twin) = read_twin(&server, &token, "pump-1").await;
    assert_eq!(status, 200, "{twin}");
    assert_eq!(twin["flow"], 12.5);
    assert_eq!(twin["$metadata"]["$model"], "dtmi:pg:Pump;1");
    let token = server.admin_token(second_dir.path()).await;
    let (status, _) = read_twin(&server, &token, "pump-2").await;
    assert_eq!(status, 404);
    assert_eq!(
        std::fs::read(second_dir.path().join("tls/ca.pem")).unwrap(),
        std::fs::read(first_dir.path().join("tls/ca.pem")).unwrap(),
        "one CA for the nodes"
    );
    drop(server);

    // A data directory without the instance's key-encryption key opens none of it, and says so.
    let third_dir = tempfile::tempdir().unwrap();
    copy_admin_credential(first_dir.path(), third_dir.path());
    let refused = Server::start_refused(third_dir.path(), &store);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(said.contains("another key-encryption key"), "{said}");
    assert_eq!(
        sealed_records(&db),
        [
            "ca",
            "event-key",
            "graph-order-key",
            "position-key",
            "token-keys"
        ],
        "nothing replaced"
    );
}

#[test]
fn a_store_url_for_a_remote_host_without_tls_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .args(["init", "--data-dir"])
        .arg(dir.path())
        .args([
            "--store",
            "postgresql://twinguard:hunter2-secret@192.0.2.10:5432/twins",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not loopback without TLS"), "{stderr}");
    assert!(!stderr.contains("hunter2-secret"), "{stderr}");
}

/// As `crash::every_acknowledged_write_survives_kill_9`, on PostgreSQL: four writers, SIGKILL
/// mid-stream, and every twin the killed server acknowledged is read back, with its value, by
/// a server started again on the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_acknowledged_on_postgresql_survives_kill_9() {
    let db = match TestDatabase::create() {
        Ok(Some(db)) => db,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let url = db.url();
    let store = ["--store", url.as_str()];
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &store, None);
    let token = server.admin_token(dir.path()).await;
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:pg:Meter;1", "@type": "Interface",
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
    for w in 0..4 {
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
                let body = json!({"$metadata": {"$model": "dtmi:pg:Meter;1"}, "reading": i});
                let url = format!("{base}/digitaltwins/{id}?api-version=2023-10-31");
                match client.put(url).bearer_auth(&token).json(&body).send().await {
                    Ok(r) if r.status() == 200 => acknowledged.lock().unwrap().push((id, i)),
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill();
    for w in writers {
        w.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 20,
        "only {} writes were acknowledged before the kill",
        acknowledged.len()
    );
    let restarted = Server::start_with(dir.path(), &store, None);
    let token = restarted.admin_token(dir.path()).await;
    for (id, reading) in &acknowledged {
        let (status, twin) = read_twin(&restarted, &token, id).await;
        assert_eq!(
            status, 200,
            "acknowledged twin {id} is missing after the kill"
        );
        assert_eq!(&twin["reading"], reading);
    }
}

/// Readiness as a load balancer reads it: a node whose database stops answering reports not
/// ready (`"store": "unreachable"`) within a few probes, with no write needed to find out, and
/// refuses writes meanwhile; it serves reads from memory only until its view is older than the
/// 5 s bound, then refuses them (`"feed": "lagging"`); once the database is back it takes its
/// lock on it again and is ready, and a restart serves every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_its_database_reports_not_ready_and_refuses_writes() {
    let db = match TestDatabase::create() {
        Ok(Some(db)) => db,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let url = db.url();
    let store = ["--store", url.as_str()];
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &store, None);
    let token = server.admin_token(dir.path()).await;
    server.upload_interface(&token, "dtmi:pg:Valve;1").await;
    let put = |id: &str| {
        server.request(
            &token,
            reqwest::Method::PUT,
            &format!("/digitaltwins/{id}?api-version=2023-10-31"),
            json!({"$metadata": {"$model": "dtmi:pg:Valve;1"}}),
        )
    };
    assert_eq!(put("before").await.unwrap().status(), 200);
    let readiness = || server.readiness(Some(&token));
    assert_eq!(readiness().await.0, 200);

    db.set_reachable(false).unwrap();
    let cut = Instant::now();
    // A deadline, not a measurement: the probe runs every 2 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = readiness().await;
        if status == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still ready with its database gone: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(body["store"], "unreachable", "{body}");
    assert_eq!(put("during").await.unwrap().status(), 503);
    // Reads are served from memory until the node's view is older than the bound (5 s: it
    // was last confirmed current before the cut), then refused. A read sent after the bound
    // plus a second of slack (for a confirmation in flight at the cut) must not be served.
    loop {
        let sent = Instant::now();
        let (status, _) = read_twin(&server, &token, "before").await;
        if status == 503 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            sent.duration_since(cut) <= Duration::from_secs(6),
            "a read was served {:?} after the database was cut off",
            sent.duration_since(cut)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The node's audit log is kept in the database too, so nothing it answers can be recorded
    // now: whoever asks is refused (the trail fails closed), with or without a credential.
    let (status, _) = read_twin(&server, "not-a-token", "before").await;
    assert_eq!(status, 503, "answered without its audit trail");
    // Nor is a token issued, on what the node last knew of revocations and identities.
    let issued = server.admin_token_request(dir.path()).await;
    assert_eq!(issued.status(), 503, "a token issued while cut off");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = readiness().await;
        if body["feed"] == "lagging" {
            break;
        }
        assert!(Instant::now() < deadline, "the lag is not reported: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Once the database is back, the node takes its lock on it again, catches up and serves.
    db.set_reachable(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readiness().await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not ready again: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(read_twin(&server, &token, "before").await.0, 200);
    assert_eq!(read_twin(&server, &token, "during").await.0, 404);
    assert_eq!(put("after").await.unwrap().status(), 200);
    server.kill();

    let restarted = Server::start_with(dir.path(), &store, None);
    let token = restarted.admin_token(dir.path()).await;
    assert_eq!(read_twin(&restarted, &token, "before").await.0, 200);
    assert_eq!(read_twin(&restarted, &token, "during").await.0, 404);
    assert_eq!(read_twin(&restarted, &token, "after").await.0, 200);
}

/// A token for the client `id` with `secret` from `server`'s token endpoint.
async fn client_token(server: &Server, id: &str, secret: &str) -> String {
    let response: Value = server
        .client_token_request(id, secret)
        .await
        .json()
        .await
        .unwrap();
    response["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {response}"))
        .to_owned()
}

/// A second node: `serve` with `flags` on a new data directory holding only the files a node
/// needs of `first`'s ([`copy_node_files`]), and an admin token from it (with the copied admin
/// credential).
pub(crate) async fn start_copy(
    first: &Path,
    flags: &[&str],
) -> (tempfile::TempDir, Server, String) {
    let dir = tempfile::tempdir().unwrap();
    copy_node_files(first, dir.path());
    let server = Server::start_with(dir.path(), flags, None);
    let admin: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("secrets/admin-client.json")).unwrap(),
    )
    .unwrap();
    let token = client_token(
        &server,
        admin["client_id"].as_str().unwrap(),
        admin["client_secret"].as_str().unwrap(),
    )
    .await;
    (dir, server, token)
}

/// A database of its own and its URL; `None` when PostgreSQL tests are skipped.
pub(crate) fn database() -> Option<(TestDatabase, String)> {
    match TestDatabase::create() {
        Ok(Some(db)) => {
            let url = db.url();
            Some((db, url))
        }
        Ok(None) => None,
        Err(e) => panic!("{e}"),
    }
}

/// Two `serve` processes with `flags`, the second on the files a node needs of the first's
/// data directory ([`start_copy`]), each with an admin token.
pub(crate) struct Pair {
    pub first_dir: tempfile::TempDir,
    pub a: Server,
    pub admin_a: String,
    pub second_dir: tempfile::TempDir,
    pub b: Server,
    pub admin_b: String,
}

pub(crate) async fn two_nodes(flags: &[&str]) -> Pair {
    let first_dir = tempfile::tempdir().unwrap();
    let a = Server::start_with(first_dir.path(), flags, None);
    let admin_a = a.admin_token(first_dir.path()).await;
    let (second_dir, b, admin_b) = start_copy(first_dir.path(), flags).await;
    Pair {
        first_dir,
        a,
        admin_a,
        second_dir,
        b,
        admin_b,
    }
}

/// How long until `token` is refused by `server` (polled every 10 ms, for at most 5 s).
async fn refused_after(server: &Server, token: &str, since: Instant) -> Duration {
    loop {
        let (status, _) = read_twin(server, token, "shared-1").await;
        if status == 401 {
            return since.elapsed();
        }
        assert_eq!(status, 200);
        assert!(since.elapsed() < Duration::from_secs(5), "still accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two `serve` processes on one database (the second started with
/// only the files a node needs of the first's data directory): a write on one is read on the other through the
/// position it was answered with; an identity disabled on one, and a token revoked on one, are
/// refused by the other within a second (measured and printed); one signed telemetry message
/// sent to both at once, 1,000 times, is accepted exactly once each time, and the history read
/// on either node holds each reading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serving_processes_on_one_database_share_writes_revocations_and_telemetry() {
    let Some((_db, url)) = database() else {
        return;
    };
    let flags = ["--store", url.as_str()];
    let Pair {
        first_dir,
        a,
        admin_a,
        second_dir,
        b,
        admin_b,
    } = two_nodes(&flags).await;

    // A write on A, read on B with the position A answered.
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:pg:Shared;1",
        "@type": "Interface", "contents": [{"@type": "Property", "name": "n", "schema": "integer"}]}]);
    let uploaded = a
        .client
        .post(a.url("/models"))
        .bearer_auth(&admin_a)
        .json(&model)
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 201);
    let twin = json!({"$metadata": {"$model": "dtmi:pg:Shared;1"}, "n": 1});
    let written = a
        .client
        .put(a.url("/digitaltwins/shared-1"))
        .bearer_auth(&admin_a)
        .json(&twin)
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200);
    let position = written.headers()["twinguard-position"]
        .to_str()
        .unwrap()
        .to_owned();
    let read = b
        .client
        .get(b.url("/digitaltwins/shared-1"))
        .bearer_auth(&admin_b)
        .header("twinguard-min-position", &position)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(read.json::<Value>().await.unwrap()["n"], 1);

    // An application with a reader role, made on B; its tokens, issued by B, work on A.
    let made: Value = b
        .request(
            &admin_b,
            reqwest::Method::POST,
            "/admin/identities",
            json!({"kind": "application", "name": "reader-app", "groups": []}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (app_id, app_secret) = (
        made["identity"]["id"].as_str().unwrap().to_owned(),
        made["clientSecret"].as_str().unwrap().to_owned(),
    );
    let assigned = b
        .request(
            &admin_b,
            reqwest::Method::POST,
            "/admin/roleassignments",
            json!({"principalId": app_id, "roleId": twinguard_core::auth::DATA_READER,
                "scope": {"kind": "instance"}}),
        )
        .await
        .unwrap();
    assert!(assigned.status().is_success(), "{}", assigned.status());
    let revoked_token = client_token(&b, &app_id, &app_secret).await;
    let disabled_token = client_token(&b, &app_id, &app_secret).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for token in [&revoked_token, &disabled_token] {
        assert_eq!(read_twin(&a, token, "shared-1").await.0, 200);
    }

    // Revoked on B: refused on A within a second.
    let revoked = b
        .client
        .post(b.url("/oauth2/revoke"))
        .form(&[("token", revoked_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let after_revocation = refused_after(&a, &revoked_token, Instant::now()).await;
    // Disabled on A: refused on B within a second.
    let disabled = a
        .request(
            &admin_a,
            reqwest::Method::PATCH,
            &format!("/admin/identities/{app_id}"),
            json!({"disabled": true}),
        )
        .await
        .unwrap();
    assert_eq!(disabled.status(), 200);
    let after_disabling = refused_after(&b, &disabled_token, Instant::now()).await;
    println!(
        "refused on the other node after: revocation {after_revocation:?}, disabling {after_disabling:?}"
    );
    assert!(after_revocation < Duration::from_secs(1));
    assert!(after_disabling < Duration::from_secs(1));

    // One signed message sent to both nodes at once, 1,000 times: exactly one acceptance each
    // time, and the history (kept in PostgreSQL) holds each reading once, read on either node.
    use base64::Engine;
    use twinguard_telemetry::envelope::{Message, Reading, sign_cose, signing_key_from_pem};
    let firmware = "ab".repeat(32);
    let allowed = a.request(
        &admin_a,
        reqwest::Method::PUT,
        "/firmware/meter",
        json!({"digests": [firmware]}),
    );
    assert!(allowed.await.unwrap().status().is_success());
    let device = json!({"generate": true, "deviceModel": "meter",
        "bindings": [{"twin": "shared-1", "names": ["n"]}]});
    let registered: Value = a
        .request(&admin_a, reqwest::Method::PUT, "/devices/meter-1", device)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = signing_key_from_pem(registered["privateKey"].as_str().unwrap()).unwrap();
    let planes = [
        format!("{}/telemetry", a.device_plane(first_dir.path())),
        format!("{}/telemetry", b.device_plane(second_dir.path())),
    ];
    // B learns of the device (its follower) before the race starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    const ROUNDS: u64 = 1_000;
    let (mut by_a, mut by_b) = (0, 0);
    for seq in 1..=ROUNDS {
        let message = Message {
            device: "meter-1".into(),
            seq,
            time: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
            firmware: Some(firmware.clone()),
            readings: vec![Reading {
                name: "n".into(),
                value: json!(seq),
                twin: None,
                time: None,
            }],
        };
        let body = json!({"messages": [
            base64::engine::general_purpose::STANDARD.encode(sign_cose(&message, &key))
        ]});
        let send = |node: usize| a.client.post(&planes[node]).json(&body).send();
        let (on_a, on_b) = tokio::join!(send(0), send(1));
        let status = |answer: Value| answer["results"][0]["status"].as_str().unwrap().to_owned();
        let on_a = status(on_a.unwrap().json().await.unwrap());
        let on_b = status(on_b.unwrap().json().await.unwrap());
        let accepted = [&on_a, &on_b].iter().filter(|s| **s == "accepted").count();
        assert_eq!(accepted, 1, "round {seq}: {on_a} on A, {on_b} on B");
        if on_a == "accepted" {
            by_a += 1;
        } else {
            by_b += 1;
        }
    }
    println!("1,000 rounds: accepted by A {by_a} times, by B {by_b} times");
    for (server, token) in [(&a, &admin_a), (&b, &admin_b)] {
        let mut seen = std::collections::HashSet::new();
        let mut url = format!("{}/history/shared-1/n?limit=500", server.base);
        loop {
            let page: Value = server
                .client
                .get(&url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for r in page["readings"].as_array().unwrap() {
                assert!(seen.insert(r["seq"].as_u64().unwrap()), "a reading twice");
            }
            match page["nextLink"].as_str() {
                Some(next) => url = next.to_owned(),
                None => break,
            }
        }
        assert_eq!(
            seen.len() as u64,
            ROUNDS,
            "every reading once in the history"
        );
    }
    drop((a, b));
}

/// A webhook receiver on loopback, written on plain tokio: the bodies it received, each
/// answered 200 (HTTP/1.1, kept alive).
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let bodies = got.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    bodies
                        .lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, got)
}

/// Creates twin `hooked-{i}` through `server`, as a client does: again after a 503, which a
/// node answers when another node's commit came between its decision and its own (a lease
/// renewal, say: `docs/storage.md`, the commit fence).
async fn create_hooked(server: &Server, token: &str, i: usize) {
    for _ in 0..10 {
        let written = server
            .client
            .put(server.url(&format!("/digitaltwins/hooked-{i}")))
            .bearer_auth(token)
            .json(&json!({"$metadata": {"$model": "dtmi:pg:Hooked;1"}}))
            .send()
            .await
            .unwrap();
        match written.status().as_u16() {
            200 => return,
            503 => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("hooked-{i}: {other}"),
        }
    }
    panic!("hooked-{i}: 503 ten times");
}

/// Two `serve` processes on one database deliver each event of an endpoint once: the one that
/// holds the endpoint's lease sends it, whichever node the write came through. Without the
/// lease each process delivers every event (both know the endpoint: the second starts after it
/// was made). Once the holder is killed with SIGKILL, the other takes over when the lease runs
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serving_processes_deliver_each_event_once() {
    let db = match TestDatabase::create() {
        Ok(Some(db)) => db,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let url = db.url();
    let flags = ["--store", url.as_str(), "--egress-allow", "127.0.0.1"];
    let first_dir = tempfile::tempdir().unwrap();
    let a = Server::start_with(first_dir.path(), &flags, None);
    let admin_a = a.admin_token(first_dir.path()).await;

    let (hook, got) = webhook_receiver().await;
    let made = a
        .request(
            &admin_a,
            reqwest::Method::PUT,
            "/admin/endpoints/hook",
            json!({"type": "webhook", "url": hook}),
        )
        .await
        .unwrap();
    assert!(made.status().is_success(), "{}", made.status());
    let routed = a
        .client
        .put(a.url("/eventroutes/all"))
        .bearer_auth(&admin_a)
        .json(&json!({"endpointName": "hook", "filter": "true"}))
        .send()
        .await
        .unwrap();
    assert!(routed.status().is_success(), "{}", routed.status());
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:pg:Hooked;1",
        "@type": "Interface"}]);
    let uploaded = a
        .client
        .post(a.url("/models"))
        .bearer_auth(&admin_a)
        .json(&model)
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 201);
    // B starts with the endpoint stored: it knows it from its start.
    let (_second_dir, b, admin_b) = start_copy(first_dir.path(), &flags).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    const TWINS: usize = 40;
    for i in 0..TWINS {
        let (server, token) = if i % 2 == 0 {
            (&a, &admin_a)
        } else {
            (&b, &admin_b)
        };
        create_hooked(server, token, i).await;
    }
    let creations = || {
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        for event in got.lock().unwrap().iter() {
            if event["type"] == "Microsoft.DigitalTwins.Twin.Create" {
                *seen
                    .entry(event["subject"].as_str().unwrap_or_default().to_owned())
                    .or_default() += 1;
            }
        }
        seen
    };
    let until = Instant::now() + Duration::from_secs(20);
    while creations().len() < TWINS {
        assert!(
            Instant::now() < until,
            "only {} creations arrived",
            creations().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for a second delivery to arrive, if there were one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (twin, times) in creations() {
        assert_eq!(times, 1, "{twin} arrived {times} times");
    }

    // A took the lease when the endpoint was made there, before B started. Killed (-9), it
    // gives nothing up: B takes the endpoint once the lease runs out (10 s) and delivers what
    // was written after, and what A had not delivered, from the stored position.
    a.kill();
    let killed = Instant::now();
    for i in TWINS..TWINS + 10 {
        create_hooked(&b, &admin_b, i).await;
    }
    let until = Instant::now() + Duration::from_secs(30);
    while creations().len() < TWINS + 10 {
        assert!(
            Instant::now() < until,
            "only {} creations arrived after the kill",
            creations().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "after A's kill -9, B delivered the next events {:?} later",
        killed.elapsed()
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(5),
        "A held the lease"
    );
    drop(b);
}

/// `requests` GETs of the model list, sent to the two nodes in turn; the correlation IDs each
/// node answered with.
pub(crate) async fn answered_in_turn(
    nodes: [(&Server, &String); 2],
    requests: usize,
) -> [Vec<String>; 2] {
    let mut answered = [Vec::new(), Vec::new()];
    for i in 0..requests {
        let (server, token) = nodes[i % 2];
        let response = server
            .client
            .get(server.url("/models"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-ms-request-id"].to_str().unwrap();
        answered[i % 2].push(id.to_owned());
    }
    answered
}

/// `twinguard audit verify-nodes` with `keys`, against `url`.
fn verify_nodes(url: &str, keys: &[&Path]) -> (bool, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_twinguard"));
    command.args(["audit", "verify-nodes", "--store", url]);
    for key in keys {
        command.arg("--key").arg(key);
    }
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Each node keeps its audit log in the database as well as on its disk (docs/audit.md,
/// "Several nodes"). Two nodes answer requests; then node A's data directory is lost whole,
/// and `twinguard audit verify-nodes` checks both logs from the database with the checkpoint
/// keys kept apart: each request either node acknowledged has its entry (found by the
/// correlation ID it was answered with). One byte of one of A's entries altered in the database
/// fails verification, naming the node; so does a node whose key is not given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_nodes_audit_log_is_kept_in_the_database_and_verifies_after_its_disk_is_lost() {
    let Some((db, url)) = database() else {
        return;
    };
    let flags = ["--store", url.as_str()];
    let Pair {
        first_dir,
        a,
        admin_a,
        second_dir,
        b,
        admin_b,
    } = two_nodes(&flags).await;
    // The keys an auditor keeps apart, copied when the nodes were set up.
    let keys = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (keys.path().join("a.pub"), keys.path().join("b.pub"));
    std::fs::copy(first_dir.path().join("audit/checkpoint.pub"), &key_a).unwrap();
    std::fs::copy(second_dir.path().join("audit/checkpoint.pub"), &key_b).unwrap();
    assert_ne!(
        std::fs::read(&key_a).unwrap(),
        std::fs::read(&key_b).unwrap(),
        "each node signs its own log"
    );

    let answered = answered_in_turn([(&a, &admin_a), (&b, &admin_b)], 20)
        .await
        .concat();
    // A checkpoint covers every entry (one a second), then both stop hard and A's disk is lost.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    a.kill();
    b.kill();
    drop(first_dir);

    let (ok, text) = verify_nodes(&url, &[&key_a, &key_b]);
    assert!(ok, "{text}");
    assert_eq!(text.matches("audit log verified").count(), 2, "{text}");
    for id in &answered {
        let found = db
            .query(&format!(
                "SELECT count(*) FROM twinguard_audit WHERE position('{id}'::bytea in entry) > 0"
            ))
            .unwrap();
        assert_eq!(
            found,
            vec![Some("1".to_owned())],
            "the entry of request {id}"
        );
    }

    let node_a = twinguard_server::audit::node_name(&std::fs::read_to_string(&key_a).unwrap());
    db.query(&format!(
        "UPDATE twinguard_audit SET entry = overlay(entry placing '9'::bytea from 5 for 1) \
         WHERE node = '{node_a}' AND seq = 3"
    ))
    .unwrap();
    let (ok, text) = verify_nodes(&url, &[&key_a, &key_b]);
    assert!(!ok, "an altered entry verified: {text}");
    assert!(
        text.contains(&format!("node {node_a}:")) && text.contains("modified"),
        "{text}"
    );
    let (ok, text) = verify_nodes(&url, &[&key_b]);
    assert!(!ok && text.contains("not given"), "{text}");
}
