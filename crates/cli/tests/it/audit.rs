//! `twinguard audit verify` on a stopped server's data, as the operator contract says:
//! `--log DATA_DIR/audit --key DATA_DIR/audit/checkpoint.pub`.

use std::process::Command;

use crate::process::Server;

fn verify(dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .args(["audit", "verify", "--log"])
        .arg(dir.join("audit"))
        .arg("--key")
        .arg(dir.join("audit/checkpoint.pub"))
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_offline_verifier_accepts_the_servers_log_and_names_a_tampered_entry() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.admin_token(dir.path()).await;
    for _ in 0..10 {
        let r = server
            .client
            .get(server.url("/models"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Let a checkpoint cover every entry, then stop the server hard.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    server.kill();

    let ok = verify(dir.path());
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The token request's intent and outcome, then the ten reads.
    assert!(stdout.contains("12 entries"), "{stdout}");

    let path = dir.path().join("audit/entries.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let tampered = text.replacen("\"GET\"", "\"PUT\"", 1);
    assert_ne!(text, tampered);
    std::fs::write(&path, tampered).unwrap();
    let bad = verify(dir.path());
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("entry 2 was modified"), "{stderr}");
}
