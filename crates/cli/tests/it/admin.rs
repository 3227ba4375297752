//! `twinguard admin` and `twinguard mfa enroll` against a running server, as an operator and a
//! person at a terminal use them.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::process::Server;

fn twinguard(data_dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .arg("admin")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn an_operator_manages_identities_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let _server = Server::start(dir.path());
    let password = "a password nobody guesses\n";
    let created = json(&twinguard(
        dir.path(),
        &[
            "identity",
            "create",
            "--kind",
            "user",
            "--name",
            "alice",
            "--password-stdin",
        ],
        Some(password),
    ));
    let alice = created["identity"]["id"].as_str().unwrap().to_owned();
    let listed = json(&twinguard(dir.path(), &["identity", "list"], None));
    let names: Vec<&str> = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"alice") && names.contains(&"bootstrap-admin"));
    let assigned = json(&twinguard(
        dir.path(),
        &[
            "assignment",
            "create",
            "--principal",
            &alice,
            "--role",
            twinguard_core_reader(),
            "--scope",
            r#"{"kind":"subtree","root":"site","relationships":["contains"]}"#,
        ],
        None,
    ));
    assert_eq!(assigned["scope"]["kind"], "subtree");
    let disabled = json(&twinguard(
        dir.path(),
        &["identity", "disable", &alice],
        None,
    ));
    assert_eq!(disabled["disabled"], true);
    let app = json(&twinguard(
        dir.path(),
        &[
            "identity",
            "create",
            "--kind",
            "service-account",
            "--name",
            "historian",
        ],
        None,
    ));
    assert!(app["clientSecret"].as_str().unwrap().len() >= 40);
    // Errors are reported and fail the command.
    let refused = twinguard(dir.path(), &["identity", "delete", "no-such-id"], None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("NotFound"));
}

fn twinguard_core_reader() -> &'static str {
    "d57506d4-4c8d-48b1-8587-93c323f6a5a3"
}

#[tokio::test]
async fn a_person_enrols_totp_at_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let _server = Server::start(dir.path());
    let bob = json(&twinguard(
        dir.path(),
        &[
            "identity",
            "create",
            "--kind",
            "user",
            "--name",
            "bob",
            "--password-stdin",
        ],
        Some("bob's long passphrase\n"),
    ));
    let bob = bob["identity"]["id"].as_str().unwrap().to_owned();
    // Bob holds a privileged role, so his password alone cannot enrol a second factor: the
    // administrator issues him a one-time enrolment code.
    json(&twinguard(
        dir.path(),
        &[
            "assignment",
            "create",
            "--principal",
            &bob,
            "--role",
            "4a1f8d2c-7e5b-4c93-8b16-3d9e0a6f2c84", // twinguard Operator
        ],
        None,
    ));
    let issued = json(&twinguard(
        dir.path(),
        &["identity", "enrolment-code", &bob],
        None,
    ));
    let code = issued["enrolmentCode"].as_str().unwrap().to_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .args([
            "mfa",
            "enroll",
            "--enrolment-code",
            "--username",
            "bob",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "bob's long passphrase").unwrap();
    writeln!(stdin, "{code}").unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let secret = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "ended early: {printed}"
        );
        printed.push_str(&line);
        if let Some(s) = line.trim().strip_prefix("secret: ") {
            break s.to_owned();
        }
    };
    assert!(
        printed.contains('\u{2588}'),
        "a QR code is drawn: {printed}"
    );
    assert!(printed.contains("otpauth://totp/twinguard:bob"));
    let totp = totp_rs::Builder::new()
        .with_secret(totp_rs::Secret::try_from_base32(&secret).unwrap())
        .build()
        .unwrap();
    writeln!(stdin, "{}", totp.generate_current()).unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
    assert!(rest.contains("enrolled"));
    let codes = rest
        .lines()
        .filter(|l| l.starts_with("  ") && l.trim().len() == 19)
        .count();
    assert_eq!(codes, 10, "{rest}");
}

#[tokio::test]
async fn the_command_line_follows_next_links_and_prints_whole_lists() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.admin_token(dir.path()).await;
    // More custom roles than the server's default page of 100.
    for i in 0..120 {
        let body = serde_json::json!({"name": format!("reader-{i:03}"), "description": "",
            "actions": ["Microsoft.DigitalTwins/digitaltwins/read"]});
        let r = server
            .request(&token, reqwest::Method::POST, "/admin/roles", body)
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }
    let first_page: Value = server
        .client
        .get(server.url("/admin/roles"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first_page["value"].as_array().unwrap().len(), 100);
    assert!(first_page["nextLink"].is_string());
    let listed = json(&twinguard(dir.path(), &["role", "list"], None));
    let names: std::collections::BTreeSet<&str> = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for i in 0..120 {
        assert!(
            names.contains(format!("reader-{i:03}").as_str()),
            "reader-{i:03}"
        );
    }
    assert_eq!(
        listed["value"].as_array().unwrap().len(),
        names.len(),
        "none twice"
    );
    assert!(listed.get("nextLink").is_none(), "one list, as before");
}

/// The CA rotates from the command line while the server serves: each command trusts the data
/// directory's bundle (`tls/ca.pem`), which follows the ring, so the operator's own client
/// keeps connecting through add, rotate and retire.
#[tokio::test]
async fn an_operator_rotates_the_ca_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let _server = Server::start(dir.path());
    let states = |view: &Value| -> Vec<String> {
        view["authorities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["state"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = json(&twinguard(dir.path(), &["ca", "show"], None));
    assert_eq!(states(&first), ["issuing"]);
    let added = json(&twinguard(dir.path(), &["ca", "add"], None));
    assert_eq!(states(&added), ["issuing", "next"]);
    let rotated = json(&twinguard(dir.path(), &["ca", "rotate"], None));
    assert_eq!(states(&rotated), ["retiring", "issuing"]);
    let refused = twinguard(dir.path(), &["ca", "rotate"], None);
    assert!(!refused.status.success());
    let retired = json(&twinguard(dir.path(), &["ca", "retire"], None));
    assert_eq!(states(&retired), ["issuing"]);
    assert_ne!(
        retired["authorities"][0]["fingerprint"],
        first["authorities"][0]["fingerprint"]
    );
    let shown = json(&twinguard(dir.path(), &["ca", "show"], None));
    assert_eq!(shown, retired);
}
