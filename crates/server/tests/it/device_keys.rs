//! Device keys rotate over HTTPS (`PUT /devices/{id}/key`, `DELETE /devices/{id}/key/previous`)
//! while the device sends to the device plane, on one node and across two nodes of one
//! PostgreSQL database.

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use twinguard_core::auth::DATA_OWNER;
use twinguard_telemetry::envelope::{Message, Reading, sign_cose, signing_key_from_pem};

use crate::kit::{TestServer, shared_store};

const FIRMWARE: &str = "ef";

/// A model, a twin, a firmware allowlist and device `gauge-1` bound to the twin; returns the
/// device's private key.
async fn plant(server: &TestServer, admin: &str) -> SigningKey {
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:k:Gauge;1",
        "@type": "Interface",
        "contents": [{"@type": "Property", "name": "level", "schema": "double"}]}]);
    let r = server
        .call_json(Method::POST, "/models", admin, &model)
        .await;
    assert_eq!(r.status(), 201);
    let twin = json!({"$metadata": {"$model": "dtmi:k:Gauge;1"}});
    let r = server
        .call_json(Method::PUT, "/digitaltwins/gauge", admin, &twin)
        .await;
    assert_eq!(r.status(), 200);
    let firmware = json!({"digests": [FIRMWARE.repeat(32)]});
    let (status, _) = call(
        server,
        admin,
        Method::PUT,
        "/firmware/gauge",
        Some(firmware),
    )
    .await;
    assert!(status.is_success());
    let device = json!({"generate": true, "deviceModel": "gauge",
        "bindings": [{"twin": "gauge", "names": ["level"]}]});
    let (status, body) = call(server, admin, Method::PUT, "/devices/gauge-1", Some(device)).await;
    assert_eq!(status, StatusCode::CREATED);
    signing_key_from_pem(body["privateKey"].as_str().unwrap()).unwrap()
}

async fn call(
    server: &TestServer,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = server.admin_call(method, path, token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Sends one new message of `gauge-1` signed with `key` to `server`'s device plane; returns
/// the outcome's reason (`None` when accepted).
async fn send(server: &TestServer, key: &SigningKey) -> Option<String> {
    let message = message("gauge-1", 1.5);
    let r = server
        .client
        .post(format!("{}/telemetry", server.device_base))
        .header("content-type", "application/cose")
        .body(sign_cose(&message, key))
        .send()
        .await
        .unwrap();
    let outcome: Value = r.json().await.unwrap();
    match outcome["status"].as_str() {
        Some("accepted") => None,
        _ => Some(outcome["reason"].as_str().unwrap_or("?").to_owned()),
    }
}

fn bad_signature() -> Option<String> {
    Some("bad_signature".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_key_rotates_over_https_with_an_overlap_that_retiring_ends() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let old = plant(&server, &admin).await;
    assert_eq!(send(&server, &old).await, None);

    let rotation = json!({"generate": true, "overlapSeconds": 3600});
    let (status, rotated) = call(
        &server,
        &admin,
        Method::PUT,
        "/devices/gauge-1/key",
        Some(rotation),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = signing_key_from_pem(rotated["privateKey"].as_str().unwrap()).unwrap();
    let device = &rotated["device"];
    assert_ne!(
        device["keyThumbprint"],
        device["previousKey"]["keyThumbprint"]
    );
    assert!(device["previousKey"]["until"].is_string());
    // The private key is in that answer only.
    let (_, shown) = call(&server, &admin, Method::GET, "/devices/gauge-1", None).await;
    assert_eq!(&shown, device);
    assert_eq!(send(&server, &old).await, None);
    assert_eq!(send(&server, &new).await, None);

    let (status, retired) = call(
        &server,
        &admin,
        Method::DELETE,
        "/devices/gauge-1/key/previous",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(retired.get("previousKey").is_none(), "{retired}");
    assert_eq!(send(&server, &old).await, bad_signature());
    assert_eq!(send(&server, &new).await, None);

    // Refusals: the current key again, an overlap over 30 days, a body with both, an absent
    // device, and a caller without the devices permission.
    let same = json!({"publicKey": rotated["device"]["publicKey"]});
    let cases = [
        ("/devices/gauge-1/key", same, StatusCode::CONFLICT),
        (
            "/devices/gauge-1/key",
            json!({"generate": true, "overlapSeconds": 2_592_001}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/devices/gauge-1/key",
            json!({"generate": true, "publicKey": rotated["device"]["publicKey"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/devices/nobody/key",
            json!({"generate": true}),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (path, body, expected) in cases {
        let (status, error) = call(&server, &admin, Method::PUT, path, Some(body)).await;
        assert_eq!(status, expected, "{path}: {error}");
        assert!(error["error"]["code"].is_string(), "{error}");
    }
    let owner = server.token_with_role(DATA_OWNER).await;
    let (status, _) = call(
        &server,
        &owner,
        Method::PUT,
        "/devices/gauge-1/key",
        Some(json!({"generate": true})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(
        &server,
        &owner,
        Method::DELETE,
        "/devices/gauge-1/key/previous",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        send(&server, &new).await,
        None,
        "nothing refused changed the key"
    );
}

/// Two nodes of one PostgreSQL database: a key rotated out on node A with no overlap is refused
/// by node B within one second of A's answer, and B accepts the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_on_one_node_is_refused_by_the_other_within_a_second() {
    let Some((_db, store)) = shared_store() else {
        return;
    };
    let (a, b) = TestServer::two_nodes(|c| c.store = store.clone()).await;
    let admin = a.admin_token().await;
    let old = plant(&a, &admin).await;
    let started = Instant::now();
    while send(&b, &old).await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "B never saw the device"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, rotated) = call(
        &a,
        &admin,
        Method::PUT,
        "/devices/gauge-1/key",
        Some(json!({"generate": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let acknowledged = Instant::now();
    let new = signing_key_from_pem(rotated["privateKey"].as_str().unwrap()).unwrap();
    assert_eq!(send(&a, &old).await, bad_signature());
    loop {
        match send(&b, &old).await {
            reason if reason == bad_signature() => break,
            None => assert!(
                acknowledged.elapsed() < Duration::from_secs(1),
                "node B still believes the old key a second after the rotation"
            ),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused_after = acknowledged.elapsed();
    assert_eq!(send(&b, &new).await, None);
    println!("node B refused the rotated-out key {refused_after:?} after node A's answer");
}

/// The device plane honours positions as the API plane does (`docs/consistency.md`): ten
/// rounds on two nodes of one database of a device registered on node A and at once sending to
/// node B presenting the registration's position: accepted every round, and its answer names a
/// position under which node A shows the reading. Then the device suspended on A and a message
/// presenting that position refused by B at once. Before, the device plane ignored positions:
/// B refused a device it had not yet followed as `unknown_device` and named no position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_plane_waits_for_a_presented_position_and_names_its_own() {
    let Some((_db, store)) = shared_store() else {
        return;
    };
    let (a, b) = TestServer::two_nodes(|c| c.store = store.clone()).await;
    let admin = a.admin_token().await;
    plant(&a, &admin).await;
    for round in 0..10 {
        let device = format!("meter-{round}");
        let registration = json!({"generate": true, "deviceModel": "gauge",
            "bindings": [{"twin": "gauge", "names": ["level"]}]});
        let r = a
            .admin_call(Method::PUT, &format!("/devices/{device}"), &admin)
            .json(&registration)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let registered = position(&r);
        let body: Value = r.json().await.unwrap();
        let key = signing_key_from_pem(body["privateKey"].as_str().unwrap()).unwrap();

        let value = 100.0 + f64::from(round);
        let r = post(&b, &device, &key, value, &registered).await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "round {round}: the new device on B"
        );
        let holding = position(&r);
        let outcome: Value = r.json().await.unwrap();
        assert_eq!(outcome["status"], "accepted", "round {round}: {outcome}");
        let twin: Value = a
            .adt(Method::GET, "/digitaltwins/gauge", &admin)
            .header("twinguard-min-position", &holding)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            twin["level"],
            json!(value),
            "round {round}: B's reading on A"
        );

        let r = a
            .admin_call(Method::POST, &format!("/devices/{device}/suspend"), &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let suspended = position(&r);
        let r = post(&b, &device, &key, value + 0.5, &suspended).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get("twinguard-position").is_none());
        let outcome: Value = r.json().await.unwrap();
        assert_eq!(
            outcome["reason"], "suspended",
            "round {round}: suspended on A, on B"
        );
    }
}

/// The position a successful write's answer names.
fn position(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("twinguard-position")
        .expect("a write names its position")
        .to_str()
        .unwrap()
        .to_owned()
}

/// One new message of `device` with `value`, signed with `key`, sent to `server`'s device
/// plane presenting `position`.
async fn post(
    server: &TestServer,
    device: &str,
    key: &SigningKey,
    value: f64,
    position: &str,
) -> reqwest::Response {
    let message = message(device, value);
    server
        .client
        .post(format!("{}/telemetry", server.device_base))
        .header("content-type", "application/cose")
        .header("twinguard-min-position", position)
        .body(sign_cose(&message, key))
        .send()
        .await
        .unwrap()
}

/// A new message of `device` reporting `level` = `value`, its sequence number and time now.
fn message(device: &str, value: f64) -> Message {
    let micros = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000;
    Message {
        device: device.into(),
        seq: micros as u64,
        time: (micros / 1_000) as i64,
        firmware: Some(FIRMWARE.repeat(32)),
        readings: vec![Reading {
            name: "level".into(),
            value: json!(value),
            twin: None,
            time: None,
        }],
    }
}
