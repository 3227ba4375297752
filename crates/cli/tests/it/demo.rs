//! `twinguard demo` and `twinguard device` / `twinguard sim` as an operator runs them.

use std::process::Command;

use serde_json::Value;

use crate::process::Server;

#[test]
fn the_demo_shows_every_defence_working() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .args(["demo", "--exit", "--seconds", "4", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |device: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("{device} ")) && !l.contains("device "))
            .unwrap_or_else(|| panic!("no line for {device} in\n{out}"))
            .to_owned()
    };
    assert!(
        line("intruder").contains("rejected (bad_signature)"),
        "{out}"
    );
    assert!(!line("intruder").contains("accepted"), "{out}");
    assert!(line("old-gateway").contains("rejected (replay)"), "{out}");
    assert!(line("broken").contains("quarantined (above_max)"), "{out}");
    assert!(
        line("rogue-fw").contains("quarantined (firmware_unknown)"),
        "{out}"
    );
    assert!(out.contains("suspect: temp-c"), "{out}");
    assert!(out.contains("quality \"estimated\""), "{out}");
    // The terminal gets the story; the server's own log goes to the file the story names.
    let log = dir.path().join("data/server.log");
    assert!(out.contains(&log.display().to_string()), "{out}");
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("device registered"), "{logged}");
    assert!(!out.contains("\"level\""), "{out}");
}

#[tokio::test]
async fn an_operator_provisions_a_device_and_the_simulator_signs_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data);
    let token = server.admin_token(&data).await;
    let api = |method, path: &str, body| server.request(&token, method, path, body);
    let model = serde_json::json!([{
        "@context": "dtmi:dtdl:context;3", "@id": "dtmi:test:Tank;1", "@type": "Interface",
        "contents": [{"@type": "Property", "name": "level", "schema": "double"}]
    }]);
    assert!(
        api(
            reqwest::Method::POST,
            "/models?api-version=2023-10-31",
            model
        )
        .await
        .unwrap()
        .status()
        .is_success()
    );
    let twin = serde_json::json!({"$metadata": {"$model": "dtmi:test:Tank;1"}});
    assert!(
        api(
            reqwest::Method::PUT,
            "/digitaltwins/tank-1?api-version=2023-10-31",
            twin
        )
        .await
        .unwrap()
        .status()
        .is_success()
    );
    let digest = "ab".repeat(32);
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_twinguard"))
            .args(args)
            .env("TWINGUARD_DATA_DIR", &data)
            .env("TWINGUARD_LOG", "error")
            .output()
            .unwrap()
    };
    let key = dir.path().join("level-1.pem");
    let provisioned = cli(&[
        "device",
        "provision",
        "level-1",
        "--model",
        "tank-sensor",
        "--bind",
        "tank-1=level",
        "--key-out",
        key.to_str().unwrap(),
    ]);
    assert!(
        provisioned.status.success(),
        "{}",
        String::from_utf8_lossy(&provisioned.stderr)
    );
    let shown = String::from_utf8_lossy(&provisioned.stdout);
    assert!(
        !shown.contains("PRIVATE KEY"),
        "the private key goes to the file only: {shown}"
    );
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert!(
        cli(&["device", "firmware", "tank-sensor", "--digest", &digest])
            .status
            .success()
    );
    let device_plane = server.device_plane(&data);
    let ca = data.join("tls/ca.pem");
    let sim_with = |key: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "sim",
            "--device",
            "level-1",
            "--key",
            key.to_str().unwrap(),
            "--name",
            "level",
            "--firmware",
            &digest,
            "--target",
            &device_plane,
            "--ca",
            ca.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let sim = |extra: &[&str]| sim_with(&key, extra);
    let run = sim(&["--base", "3.5", "--count", "3", "--interval-ms", "10"]);
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let accepted = out
        .lines()
        .filter(|l| l.starts_with("level-1: 200 OK") && l.ends_with("\"status\":\"accepted\"}"))
        .count();
    assert_eq!(accepted, 3, "{out}");
    let twin: Value = api(
        reqwest::Method::GET,
        "/digitaltwins/tank-1?api-version=2023-10-31",
        Value::Null,
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(
        (twin["level"].as_f64().unwrap() - 3.5).abs() < 0.1,
        "{twin}"
    );
    assert_eq!(twin["$metadata"]["level"]["sources"][0], "level-1");
    // A new key from the command line, the old one refused at once (no overlap); the new
    // private key only in its file.
    let new_key = dir.path().join("level-1-new.pem");
    let rotated = cli(&[
        "device",
        "rotate-key",
        "level-1",
        "--key-out",
        new_key.to_str().unwrap(),
    ]);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let shown = String::from_utf8_lossy(&rotated.stdout);
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(!shown.contains("previousKey"), "{shown}");
    let old_key = sim(&["--count", "1"]);
    assert!(
        String::from_utf8_lossy(&old_key.stdout).contains("\"reason\":\"bad_signature\""),
        "{}",
        String::from_utf8_lossy(&old_key.stdout)
    );
    let with_new = sim_with(&new_key, &["--count", "1"]);
    assert!(
        String::from_utf8_lossy(&with_new.stdout).contains("\"status\":\"accepted\""),
        "{}",
        String::from_utf8_lossy(&with_new.stdout)
    );
    // Revoked from the command line: the next message is refused.
    assert!(cli(&["device", "revoke", "level-1"]).status.success());
    let again = sim_with(&new_key, &["--count", "1"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("\"reason\":\"revoked\""));
}

#[tokio::test]
async fn garbage_on_the_device_plane_costs_the_log_a_bounded_number_of_lines() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // At the default level, as a deployment logs.
    let server = Server::start_logging(&data, &[], None, "info");
    let device_plane = server.device_plane(&data);
    let log = data.join("server.log");
    let before = std::fs::metadata(&log).unwrap().len();
    // Issue 17 finding 7: 5 KB of garbage used to produce 168 KB of log lines. 300 bodies of
    // 5 KB each, as JSON, as JWS text and as binary, each refused.
    let mut sent = 0u64;
    for i in 0..300u32 {
        let (kind, body): (&str, Vec<u8>) = match i % 3 {
            // A batch of 700 tiny messages, each refused on its own.
            0 => (
                "application/json",
                format!("{{\"messages\": [{}\"a.b\"]}}", "\"a.b\",".repeat(699)).into_bytes(),
            ),
            1 => ("application/jose", "a.b.c ".repeat(850).into_bytes()),
            _ => (
                "application/cose",
                (0..5_000u32).map(|b| (b * 7 + i) as u8).collect(),
            ),
        };
        sent += body.len() as u64;
        let r = server
            .client
            .post(format!("{device_plane}/telemetry"))
            .header("content-type", kind)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(
            !r.status().is_success() || r.status() == 200,
            "{}",
            r.status()
        );
    }
    // The rate limiter lets each call site write a burst and a few lines a second.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let logged = std::fs::metadata(&log).unwrap().len() - before;
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(
        logged < sent / 4,
        "{logged} bytes of log for {sent} bytes of garbage"
    );
    assert!(lines < 400, "{lines} log lines");
    drop(server);
}
