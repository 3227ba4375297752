//! The audit trail over HTTPS: every request is in the log before its answer, with its
//! correlation ID and caller and without secrets; proofs served by the API verify; and a log
//! that cannot be written refuses requests instead of serving them unrecorded.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::Method;
use serde_json::{Value, json};
use twinguard_audit::merkle::{Hash, verify_consistency, verify_inclusion};
use twinguard_audit::note::{Checkpoint, NoteVerifier};

use crate::kit::TestServer;

fn hash(v: &Value) -> Hash {
    STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

fn hashes(v: &Value) -> Vec<Hash> {
    v.as_array().unwrap().iter().map(hash).collect()
}

async fn entries(server: &TestServer, token: &str) -> Vec<Value> {
    let size = server.state.audit.log().head().size;
    let mut out = Vec::new();
    for i in 0..size {
        let r: Value = server
            .admin_json(Method::GET, &format!("/audit/entries/{i}"), token, None)
            .await;
        out.push(r["entry"].clone());
    }
    out
}

#[tokio::test]
async fn every_request_is_recorded_with_its_correlation_id_caller_and_no_secret() {
    let server = TestServer::start().await;
    let (id, secret) = server.admin_credentials();
    let failed = server
        .client
        .post(server.url("/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id.as_str()),
            ("client_secret", "wrong"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 401);
    let failed_id = failed.headers()["x-ms-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let admin = server.admin_token().await;
    let read = server.call(Method::GET, "/models", &admin).await;
    let read_id = read.headers()["x-ms-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let all = entries(&server, &admin).await;
    let find = |cid: &str| {
        all.iter()
            .find(|e| e["correlationId"] == cid)
            .cloned()
            .unwrap_or_else(|| panic!("no entry for {cid}: {all:?}"))
    };
    let login = find(&failed_id);
    assert_eq!(login["status"], 401);
    assert_eq!(login["authResult"], "failed");
    assert_eq!(login["address"], "127.0.0.1");
    // A failed attempt names no account, not even as a keyed digest (issue 16, finding 15).
    assert!(login.get("account").is_none(), "{login}");
    assert!(login.get("principal").is_none(), "{login}");
    let get = find(&read_id);
    assert_eq!(get["principal"], id.as_str());
    assert_eq!(
        (get["method"].as_str(), get["path"].as_str()),
        (Some("GET"), Some("/models"))
    );
    // Secrets never reach the log.
    let raw = std::fs::read_to_string(server.dir.path().join("audit/entries.jsonl")).unwrap();
    assert!(!raw.contains(&secret) && !raw.contains(&admin));
    // Entries carry their index.
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["seq"], i as u64);
    }
}

#[tokio::test]
async fn proofs_from_the_api_verify_against_the_signed_checkpoint() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    for _ in 0..20 {
        server.call(Method::GET, "/models", &admin).await;
    }
    // Wait for a checkpoint that covers at least 20 entries.
    let vkey = std::fs::read_to_string(server.dir.path().join("audit/checkpoint.pub")).unwrap();
    let verifier = NoteVerifier::parse(&vkey).unwrap();
    let mut checkpoint = None;
    for _ in 0..60 {
        let note = server
            .admin_call(Method::GET, "/audit/checkpoint", &admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if let Ok(text) = verifier.verify(&note) {
            let c = Checkpoint::parse(text).unwrap();
            if c.size >= 20 {
                checkpoint = Some(c);
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let checkpoint = checkpoint.expect("a signed checkpoint covering the requests");
    for index in [0, 7, checkpoint.size - 1] {
        let r: Value = server
            .admin_json(
                Method::GET,
                &format!("/audit/entries/{index}?size={}", checkpoint.size),
                &admin,
                None,
            )
            .await;
        let leaf = twinguard_audit::merkle::leaf_hash(
            &STANDARD.decode(r["leaf"].as_str().unwrap()).unwrap(),
        );
        verify_inclusion(
            index,
            checkpoint.size,
            &leaf,
            &hashes(&r["inclusionProof"]),
            &checkpoint.root,
        )
        .unwrap();
    }
    let r: Value = server
        .admin_json(
            Method::GET,
            &format!("/audit/proofs/consistency?old=5&new={}", checkpoint.size),
            &admin,
            None,
        )
        .await;
    verify_consistency(
        5,
        checkpoint.size,
        &hash(&r["oldRoot"]),
        &checkpoint.root,
        &hashes(&r["consistencyProof"]),
    )
    .unwrap();
    // Only auditors read the trail.
    let reader = server
        .token_with_role(twinguard_core::auth::DATA_READER)
        .await;
    let denied = server
        .admin_call(Method::GET, "/audit/checkpoint", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
}

#[tokio::test]
async fn when_the_log_cannot_be_written_requests_fail_and_nothing_is_acknowledged() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let model =
        json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:t:A;1", "@type": "Interface"});
    assert_eq!(
        server
            .call_json(Method::POST, "/models", &admin, &json!([model]))
            .await
            .status(),
        201
    );
    // Make the audit log's file unwritable underneath the running server: `chattr +i` makes
    // even the writer's open descriptor fail (EPERM), as a read-only or failing disk would.
    let entries = server.dir.path().join("audit/entries.jsonl");
    let _immutable = Immutable::set(&entries);
    // The request in flight when the disk fails is refused: its record could not be made.
    let body = json!({"$metadata": {"$model": "dtmi:t:A;1"}});
    let first = server
        .call_json(Method::PUT, "/digitaltwins/during", &admin, &body)
        .await;
    assert_eq!(first.status(), 503);
    // From then on nothing runs: writes are refused before they reach the graph.
    let after = server
        .call_json(Method::PUT, "/digitaltwins/after", &admin, &body)
        .await;
    assert_eq!(after.status(), 503);
    let owner =
        twinguard_core::auth::Principal::with_roles("t", &[twinguard_core::auth::DATA_OWNER]);
    assert!(
        server.state.service.twin(&owner, "after").is_err(),
        "a refused write was applied"
    );
    let ready = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["audit"], "failing");
}

#[tokio::test]
async fn metrics_report_requests_latencies_and_the_audit_trail() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    for _ in 0..5 {
        assert_eq!(
            server.call(Method::GET, "/models", &admin).await.status(),
            200
        );
    }
    assert_eq!(
        server
            .call(Method::GET, "/models", "not-a-token")
            .await
            .status(),
        401
    );
    let text = server
        .admin_call(Method::GET, "/metrics", &admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert!(value("twinguard_http_requests_total{method=\"GET\",status=\"2xx\"}") >= 5.0);
    assert!(value("twinguard_http_requests_total{method=\"GET\",status=\"4xx\"}") >= 1.0);
    assert!(value("twinguard_http_request_duration_seconds_count") >= 6.0);
    assert!(text.contains("twinguard_http_request_duration_seconds_bucket{le=\"0.005\"}"));
    assert!(value("twinguard_audit_entries") >= 7.0);
    assert_eq!(value("twinguard_audit_healthy"), 1.0);
    assert!(value("twinguard_auth_failures_total{method=\"bearer\"}") >= 1.0);
}

/// `chattr +i` on a file for the life of the guard.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &std::path::Path) -> Self {
        let status = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .expect("chattr (e2fsprogs) is on every machine of this kind");
        assert!(status.success(), "chattr +i failed on {}", path.display());
        Self(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}
