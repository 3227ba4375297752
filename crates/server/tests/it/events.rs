//! Event delivery end to end: endpoints behind the egress allowlist, routes with ADT filters,
//! webhooks signed per Standard Webhooks (checked here with independent code), retries,
//! dead letters, redirects, NATS JetStream and MQTT 5 through the machine's brokers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use reqwest::Method;
use serde_json::{Value, json};
use twinguard_core::auth::{DATA_OWNER, SECURITY_ADMIN};

use crate::kit::{TestServer, uuid_like};

/// A webhook receiver on loopback: records what it gets, answers with the statuses queued
/// (then 200).
/// A request as received: headers and body.
type Request = (HeaderMap, Vec<u8>);
/// An answer to give: status and `Location`.
type Answer = (StatusCode, Option<String>);

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Request>>>,
    answers: Arc<Mutex<VecDeque<Answer>>>,
}

impl Receiver {
    async fn start(&self) -> SocketAddr {
        let me = self.clone();
        let app =
            axum::Router::new().fallback(move |headers: HeaderMap, body: axum::body::Bytes| {
                let me = me.clone();
                async move {
                    me.got.lock().unwrap().push((headers, body.to_vec()));
                    let (status, location) = me
                        .answers
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((StatusCode::OK, None));
                    let mut response = axum::response::Response::new(axum::body::Body::empty());
                    *response.status_mut() = status;
                    if let Some(location) = location {
                        response
                            .headers_mut()
                            .insert("location", location.parse().unwrap());
                    }
                    response
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn bodies(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect()
    }
}

/// Each twin's events arrived in its order: `twinsequence` rises by one from event to event
/// of a twin (a relationship's events count for its source twin).
fn assert_in_order_per_twin(bodies: &[Value]) {
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    for b in bodies {
        let twin = b["subject"].as_str().unwrap().split('/').next().unwrap();
        let seq = b["twinsequence"].as_u64().unwrap();
        let before = last.insert(twin.to_owned(), seq).unwrap_or(0);
        assert_eq!(seq, before + 1, "twin {twin}: event {seq} after {before}");
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

const MODEL: &str = "dtmi:test:events:Room;1";

async fn plant(server: &TestServer, token: &str) {
    let model = json!([{
        "@context": "dtmi:dtdl:context;3", "@id": MODEL, "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "temperature", "schema": "double"},
            {"@type": "Relationship", "name": "next"}
        ]
    }]);
    let r = server
        .call_json(Method::POST, "/models", token, &model)
        .await;
    assert_eq!(r.status(), 201);
}

async fn put_twin(server: &TestServer, token: &str, id: &str, t: f64) {
    let body = json!({"$metadata": {"$model": MODEL}, "temperature": t});
    let r = server
        .call_json(Method::PUT, &format!("/digitaltwins/{id}"), token, &body)
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

async fn route(server: &TestServer, token: &str, id: &str, endpoint: &str, filter: &str) {
    let r = server
        .call_json(
            Method::PUT,
            &format!("/eventroutes/{id}"),
            token,
            &json!({"endpointName": endpoint, "filter": filter}),
        )
        .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

async fn put_endpoint(
    server: &TestServer,
    token: &str,
    name: &str,
    body: &Value,
) -> reqwest::Response {
    server
        .admin_call(Method::PUT, &format!("/admin/endpoints/{name}"), token)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The event key the instance signs with now: the one key of the set it publishes in
/// `events/event-keys.json` (a new instance's ring holds one).
fn event_key(server: &TestServer) -> VerifyingKey {
    let jwks: Value = serde_json::from_slice(
        &std::fs::read(server.dir.path().join("events/event-keys.json")).unwrap(),
    )
    .unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{jwks}");
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(keys[0]["x"].as_str().unwrap())
        .unwrap();
    VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap()
}

/// Checks a Standard Webhooks request: `v1` (HMAC-SHA256 with `secret`) and `v1a` (Ed25519
/// with `key`) over `id.timestamp.body`, written here from the specification.
fn verify_webhook(headers: &HeaderMap, body: &[u8], secret: &[u8], key: &VerifyingKey) {
    let header = |n: &str| headers.get(n).unwrap().to_str().unwrap().to_owned();
    let signed = format!("{}.{}.", header("webhook-id"), header("webhook-timestamp"));
    let mut signed = signed.into_bytes();
    signed.extend_from_slice(body);
    let mut v1 = false;
    let mut v1a = false;
    for part in header("webhook-signature").split(' ') {
        let (scheme, sig) = part.split_once(',').unwrap();
        let sig = STANDARD.decode(sig).unwrap();
        match scheme {
            "v1" => {
                let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
                aws_lc_rs::hmac::verify(&k, &signed, &sig).unwrap();
                v1 = true;
            }
            "v1a" => {
                key.verify(&signed, &Signature::from_slice(&sig).unwrap())
                    .unwrap();
                v1a = true;
            }
            other => panic!("unknown scheme {other}"),
        }
    }
    assert!(v1 && v1a, "both signatures present");
}

fn secret_file(server: &TestServer) -> (std::path::PathBuf, Vec<u8>) {
    let secret = vec![42u8; 32];
    let path = server.dir.path().join("endpoint-credentials/hook-secret");
    std::fs::write(&path, format!("whsec_{}", STANDARD.encode(&secret))).unwrap();
    (path, secret)
}

fn allow_loopback(config: &mut twinguard_server::startup::ServeConfig) {
    config.egress = twinguard_server::egress::EgressPolicy::from_lines("127.0.0.1").unwrap();
}

#[tokio::test]
async fn endpoints_are_for_security_admins_and_outside_the_allowlist_are_refused() {
    let server = TestServer::start_with(|c| {
        c.egress =
            twinguard_server::egress::EgressPolicy::from_lines("127.0.0.1:4222\nlocalhost:4223")
                .unwrap();
    })
    .await;
    let admin = server.token_with_role(SECURITY_ADMIN).await;
    let owner = server.token_with_role(DATA_OWNER).await;
    let nats =
        json!({"type": "natsJetStream", "url": "nats://127.0.0.1:4222", "subject": "twins.x"});
    let r = put_endpoint(&server, &owner, "nats-one", &nats).await;
    assert_eq!(r.status(), 403, "a data owner does not manage endpoints");
    let r = put_endpoint(&server, &admin, "nats-one", &nats).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    for (url, why) in [
        ("nats://127.0.0.1:4223", "a port the rule does not list"),
        (
            "nats://127.0.0.2:4222",
            "a loopback address that is not listed",
        ),
        ("nats://10.1.2.3:4222", "a private address"),
        ("nats://169.254.169.254:4222", "the metadata address"),
        (
            "nats://localhost:4223",
            "a listed name that resolves to loopback (needs an address rule)",
        ),
        ("nats://example.com:4222", "a name that is not listed"),
        (
            "nats://[::ffff:127.0.0.2]:4222",
            "loopback written as IPv4-mapped IPv6",
        ),
    ] {
        let body = json!({"type": "natsJetStream", "url": url, "subject": "twins.x"});
        let r = put_endpoint(&server, &admin, "nats-two", &body).await;
        assert_eq!(r.status(), 400, "{why}: {}", r.text().await.unwrap());
    }
    let listed = server
        .admin_json(Method::GET, "/admin/endpoints", &admin, None)
        .await;
    let names: Vec<&str> = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"nats-one"));
    // A name that resolves to loopback is admitted by no address at connect time.
    let inner = twinguard_server::egress::Egress::new(
        twinguard_server::egress::EgressPolicy::from_lines("localhost").unwrap(),
    );
    let dest = twinguard_server::egress::Destination::new("localhost", 4222).unwrap();
    assert!(inner.resolve(&dest).await.is_err());
    let r = server
        .admin_call(Method::DELETE, "/admin/endpoints/nats-one", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = server
        .admin_call(Method::GET, "/admin/endpoints/nats-one", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_webhook_receives_every_change_in_order_signed_and_filtered() {
    let server = TestServer::start_with(allow_loopback).await;
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let admin = server.admin_token().await;
    let (secret_path, secret) = secret_file(&server);
    let body =
        json!({"type": "webhook", "url": format!("http://{addr}/hook"), "secretFile": secret_path});
    let r = put_endpoint(&server, &admin, "hook", &body).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let shown: Value = server
        .admin_json(Method::GET, "/admin/endpoints/hook", &admin, None)
        .await;
    assert!(
        !shown.to_string().contains(&STANDARD.encode(&secret)),
        "the secret is never echoed"
    );
    plant(&server, &admin).await;
    route(&server, &admin, "all", "hook", "true").await;
    // A second route to the same endpoint does not send an event twice.
    route(
        &server,
        &admin,
        "creates",
        "hook",
        "type = 'Microsoft.DigitalTwins.Twin.Create'",
    )
    .await;
    put_twin(&server, &admin, "r1", 20.0).await;
    put_twin(&server, &admin, "r2", 21.0).await;
    let patch = json!([{"op": "replace", "path": "/temperature", "value": 23.5}]);
    let r = server
        .call_json(Method::PATCH, "/digitaltwins/r1", &admin, &patch)
        .await;
    assert_eq!(r.status(), 204);
    let rel = json!({"$targetId": "r2", "$relationshipName": "next"});
    let r = server
        .call_json(
            Method::PUT,
            "/digitaltwins/r1/relationships/n1",
            &admin,
            &rel,
        )
        .await;
    assert_eq!(r.status(), 200);
    // ADT's telemetry API: Message-Id de-duplicates.
    for _ in 0..2 {
        let r = server
            .adt(Method::POST, "/digitaltwins/r1/telemetry", &admin)
            .header("Message-Id", "m-1")
            .header("Telemetry-Source-Time", "2026-12-05T08:00:00Z")
            .json(&json!({"humidity": 40}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    }
    let r = server
        .adt(Method::POST, "/digitaltwins/r1/telemetry", &admin)
        .json(&json!({"humidity": 41}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "Message-Id is required");
    let r = server
        .call(Method::DELETE, "/digitaltwins/r1/relationships/n1", &admin)
        .await;
    assert_eq!(r.status(), 204);
    wait_for("six events", || receiver.got.lock().unwrap().len() >= 6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bodies = receiver.bodies();
    let mut kinds: Vec<(&str, &str, u64)> = bodies
        .iter()
        .map(|b| {
            (
                b["type"].as_str().unwrap(),
                b["subject"].as_str().unwrap(),
                b["twinsequence"].as_u64().unwrap(),
            )
        })
        .collect();
    // Events of different twins may overtake each other (delivery is pipelined); each twin's
    // arrive in its order.
    assert_in_order_per_twin(&bodies);
    kinds.sort_by_key(|(_, subject, seq)| (subject.split('/').next().unwrap().to_owned(), *seq));
    assert_eq!(
        kinds,
        [
            ("Microsoft.DigitalTwins.Twin.Create", "r1", 1),
            ("Microsoft.DigitalTwins.Twin.Update", "r1", 2),
            (
                "Microsoft.DigitalTwins.Relationship.Create",
                "r1/relationships/n1",
                3
            ),
            ("microsoft.iot.telemetry", "r1", 4),
            (
                "Microsoft.DigitalTwins.Relationship.Delete",
                "r1/relationships/n1",
                5
            ),
            ("Microsoft.DigitalTwins.Twin.Create", "r2", 1),
        ]
    );
    assert_eq!(bodies.len(), 6, "one delivery per event: {bodies:#?}");
    let of_type = |t: &str| bodies.iter().find(|b| b["type"] == t).unwrap();
    let update = of_type("Microsoft.DigitalTwins.Twin.Update");
    assert_eq!(update["data"], json!({"modelId": MODEL, "patch": patch}));
    let telemetry = of_type("microsoft.iot.telemetry");
    assert_eq!(telemetry["data"], json!({"humidity": 40}));
    assert_eq!(telemetry["telemetrysourcetime"], "2026-12-05T08:00:00Z");
    assert_eq!(telemetry["dataschema"], MODEL);
    let create = bodies
        .iter()
        .find(|b| b["subject"] == "r1" && b["twinsequence"] == 1)
        .unwrap();
    assert_eq!(create["specversion"], "1.0");
    assert_eq!(create["source"], "127.0.0.1");
    assert_eq!(create["data"]["$dtId"], "r1");
    let key = event_key(&server);
    for (headers, body) in receiver.got.lock().unwrap().iter() {
        verify_webhook(headers, body, &secret, &key);
        let id = headers.get("webhook-id").unwrap().to_str().unwrap();
        let ce: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(ce["id"], id, "webhook-id is the event ID");
    }
    // The published key set carries the same key.
    let jwks: Value = server
        .client
        .get(server.url("/.well-known/event-keys.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    let on_disk: Value = serde_json::from_slice(
        &std::fs::read(server.dir.path().join("events/event-keys.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(jwks, on_disk, "the endpoint and the file publish one set");

    // Deleting the route stops delivery at once.
    for id in ["all", "creates"] {
        let r = server
            .call(Method::DELETE, &format!("/eventroutes/{id}"), &admin)
            .await;
        assert_eq!(r.status(), 204);
    }
    put_twin(&server, &admin, "r3", 1.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.got.lock().unwrap().len(),
        6,
        "no route, no delivery"
    );
    // Records every endpoint has passed are trimmed from the feed (every 5 s).
    let service = server.state.service.clone();
    wait_for("the delivered records trimmed", || {
        service.feed_head() >= 7 && service.feed_after(0, 10).unwrap().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_failing_webhook_is_retried_then_dead_lettered_and_can_be_replayed() {
    let server = TestServer::start_with(allow_loopback).await;
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let admin = server.admin_token().await;
    let body = json!({"type": "webhook", "url": format!("http://{addr}/hook"),
        "maxAttempts": 3, "initialBackoffMs": 10});
    assert_eq!(
        put_endpoint(&server, &admin, "flaky", &body).await.status(),
        201
    );
    plant(&server, &admin).await;
    route(&server, &admin, "r", "flaky", "true").await;
    // Two failures, then success: the first event arrives on its third attempt.
    receiver.answers.lock().unwrap().extend([
        (StatusCode::SERVICE_UNAVAILABLE, None),
        (StatusCode::INTERNAL_SERVER_ERROR, None),
    ]);
    put_twin(&server, &admin, "a", 1.0).await;
    wait_for("three attempts", || receiver.got.lock().unwrap().len() >= 3).await;
    let ids: Vec<String> = receiver
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|(h, _)| h["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "a retry carries the same ID"
    );
    // Three failures: dead-lettered, and the next event still goes.
    receiver.answers.lock().unwrap().extend([
        (StatusCode::BAD_GATEWAY, None),
        (StatusCode::BAD_GATEWAY, None),
        (StatusCode::BAD_GATEWAY, None),
    ]);
    put_twin(&server, &admin, "b", 1.0).await;
    wait_for("b tried three times", || {
        receiver.got.lock().unwrap().len() >= 6
    })
    .await;
    put_twin(&server, &admin, "c", 1.0).await;
    wait_for("c delivered", || {
        receiver.bodies().iter().any(|b| b["subject"] == "c")
    })
    .await;
    let dead = server
        .admin_json(
            Method::GET,
            "/admin/endpoints/flaky/deadletters",
            &admin,
            None,
        )
        .await;
    let dead = dead["value"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0]["event"]["subject"], "b");
    assert_eq!(dead[0]["attempts"], 3);
    assert!(dead[0]["lastError"].as_str().unwrap().contains("502"));
    let seq = dead[0]["sequence"].as_u64().unwrap();
    let before = receiver.got.lock().unwrap().len();
    let r = server
        .admin_call(
            Method::POST,
            &format!("/admin/endpoints/flaky/deadletters/{seq}/replay"),
            &admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let replayed: Value = {
        let got = receiver.got.lock().unwrap();
        assert_eq!(got.len(), before + 1);
        serde_json::from_slice(&got[before].1).unwrap()
    };
    assert_eq!(
        replayed["id"], dead[0]["id"],
        "the replay is the same event"
    );
    let dead = server
        .admin_json(
            Method::GET,
            "/admin/endpoints/flaky/deadletters",
            &admin,
            None,
        )
        .await;
    assert!(dead["value"].as_array().unwrap().is_empty());
    let metrics = server
        .admin_call(Method::GET, "/metrics", &admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("twinguard_events_dead_lettered_total{endpoint=\"flaky\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("twinguard_events_retried_total{endpoint=\"flaky\"}"));
}

/// A slow webhook that refuses every fifth request: delivery keeps several events in flight
/// (it is pipelined) and still delivers each twin's events exactly once each, in order, however
/// the failures fall.
#[tokio::test]
async fn pipelined_delivery_keeps_each_twins_order_through_failures() {
    #[derive(Clone, Default)]
    struct Slow {
        accepted: Arc<Mutex<Vec<Value>>>,
        requests: Arc<std::sync::atomic::AtomicUsize>,
        now: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    }
    use std::sync::atomic::Ordering::SeqCst;
    let slow = Slow::default();
    let me = slow.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let me = me.clone();
        async move {
            let now = me.now.fetch_add(1, SeqCst) + 1;
            me.most.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(3)).await;
            let n = me.requests.fetch_add(1, SeqCst);
            let status = if n % 5 == 4 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                me.accepted
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                StatusCode::OK
            };
            me.now.fetch_sub(1, SeqCst);
            status
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let server = Arc::new(TestServer::start_with(allow_loopback).await);
    let admin = server.admin_token().await;
    let body = json!({"type": "webhook", "url": format!("http://{addr}/hook"),
        "maxAttempts": 1000, "initialBackoffMs": 5});
    assert_eq!(
        put_endpoint(&server, &admin, "slow", &body).await.status(),
        201
    );
    plant(&server, &admin).await;
    route(&server, &admin, "r", "slow", "true").await;
    const TWINS: usize = 40;
    const UPDATES: usize = 5;
    let writers: Vec<_> = (0..TWINS)
        .map(|i| {
            let server = server.clone();
            let admin = admin.clone();
            tokio::spawn(async move {
                for u in 0..=UPDATES {
                    put_twin(&server, &admin, &format!("t{i}"), u as f64).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let total = TWINS * (UPDATES + 1);
    wait_for("every event accepted", || {
        slow.accepted.lock().unwrap().len() >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let accepted = slow.accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), total, "each event accepted once");
    assert_in_order_per_twin(&accepted);
    assert!(
        slow.requests.load(SeqCst) > total,
        "some requests were refused and retried"
    );
    let most = slow.most.load(SeqCst);
    assert!(
        most > 1,
        "at most {most} request(s) in flight: not pipelined"
    );
}

#[tokio::test]
async fn a_webhook_redirect_is_not_followed() {
    let server = TestServer::start_with(allow_loopback).await;
    let hook = Receiver::default();
    let target = Receiver::default();
    let hook_addr = hook.start().await;
    let target_addr = target.start().await;
    hook.answers.lock().unwrap().extend([(
        StatusCode::FOUND,
        Some(format!("http://{target_addr}/stolen")),
    )]);
    let admin = server.admin_token().await;
    let body =
        json!({"type": "webhook", "url": format!("http://{hook_addr}/hook"), "maxAttempts": 1});
    assert_eq!(
        put_endpoint(&server, &admin, "redir", &body).await.status(),
        201
    );
    plant(&server, &admin).await;
    route(&server, &admin, "r", "redir", "true").await;
    put_twin(&server, &admin, "a", 1.0).await;
    wait_for("a dead letter", || {
        server
            .state
            .events
            .dead_letters("redir")
            .map(|d| !d.is_empty())
            .unwrap_or(false)
    })
    .await;
    assert_eq!(hook.got.lock().unwrap().len(), 1);
    assert!(
        target.got.lock().unwrap().is_empty(),
        "the redirect target got nothing"
    );
}

#[tokio::test]
async fn nats_jetstream_receives_signed_events_with_message_ids() {
    let Ok(client) = async_nats::connect("nats://127.0.0.1:4222").await else {
        panic!("NATS is expected on 127.0.0.1:4222 on this machine kind");
    };
    let js = async_nats::jetstream::new(client);
    let name = format!("TG_{}", uuid_like().replace('-', "_"));
    let subject = format!("tg.events.{name}");
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let server = TestServer::start_with(|c| {
        c.egress = twinguard_server::egress::EgressPolicy::from_lines("127.0.0.1:4222").unwrap();
    })
    .await;
    let admin = server.admin_token().await;
    let body = json!({"type": "natsJetStream", "url": "nats://127.0.0.1:4222", "subject": subject});
    assert_eq!(
        put_endpoint(&server, &admin, "nats", &body).await.status(),
        201
    );
    plant(&server, &admin).await;
    route(
        &server,
        &admin,
        "r",
        "nats",
        "$body.temperature > 10 OR type = 'Microsoft.DigitalTwins.Twin.Update'",
    )
    .await;
    put_twin(&server, &admin, "cold", 5.0).await;
    put_twin(&server, &admin, "warm", 15.0).await;
    let patch = json!([{"op": "replace", "path": "/temperature", "value": 6.0}]);
    assert_eq!(
        server
            .call_json(Method::PATCH, "/digitaltwins/cold", &admin, &patch)
            .await
            .status(),
        204
    );
    let mut stream = stream;
    for _ in 0..100 {
        if stream.info().await.unwrap().state.messages >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        2,
        "the cold twin's creation is filtered out"
    );
    let key = event_key(&server);
    let mut subjects = Vec::new();
    for seq in 1..=2 {
        let message = stream.get_raw_message(seq).await.unwrap();
        let headers = message.headers;
        let id = headers.get("Nats-Msg-Id").unwrap().to_string();
        let sig = STANDARD
            .decode(headers.get("Twinguard-Signature").unwrap().as_str())
            .unwrap();
        key.verify(&message.payload, &Signature::from_slice(&sig).unwrap())
            .unwrap();
        let ce: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(ce["id"], id);
        subjects.push((
            ce["type"].as_str().unwrap().to_owned(),
            ce["subject"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        subjects,
        [
            (
                "Microsoft.DigitalTwins.Twin.Create".to_owned(),
                "warm".to_owned()
            ),
            (
                "Microsoft.DigitalTwins.Twin.Update".to_owned(),
                "cold".to_owned()
            ),
        ]
    );
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test]
async fn mqtt_receives_signed_events_at_qos_1() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let topic = format!("tg-it/events/{}", uuid_like());
    let mut options = MqttOptions::new(format!("tg-it-sub-{}", uuid_like()), "127.0.0.1", 1883);
    options.set_clean_start(true);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let props = p.properties.map(|p| p.user_properties).unwrap_or_default();
                    sink.lock().unwrap().push((p.payload.to_vec(), props));
                }
                _ => {}
            }
        }
    });
    subscribed.await.unwrap();
    let server = TestServer::start_with(|c| {
        c.egress = twinguard_server::egress::EgressPolicy::from_lines("127.0.0.1:1883").unwrap();
    })
    .await;
    let admin = server.admin_token().await;
    let body = json!({"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "topic": topic});
    assert_eq!(
        put_endpoint(&server, &admin, "mqtt", &body).await.status(),
        201
    );
    plant(&server, &admin).await;
    route(&server, &admin, "r", "mqtt", "true").await;
    for i in 0..3 {
        put_twin(&server, &admin, &format!("m{i}"), f64::from(i)).await;
    }
    wait_for("three MQTT events", || received.lock().unwrap().len() >= 3).await;
    let key = event_key(&server);
    for (i, (payload, props)) in received.lock().unwrap().iter().enumerate() {
        let sig = props
            .iter()
            .find(|(k, _)| k == "twinguard-signature")
            .unwrap();
        let sig = STANDARD.decode(&sig.1).unwrap();
        key.verify(payload, &Signature::from_slice(&sig).unwrap())
            .unwrap();
        let ce: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(ce["subject"], format!("m{i}"));
    }
}

/// A nats-server of the test's own (JetStream on, the given extra configuration) on a free
/// loopback port, stopped when dropped.
struct OwnNats {
    child: std::process::Child,
    port: u16,
    /// Clients connect with TLS, to the name `localhost`.
    tls: bool,
    _dir: tempfile::TempDir,
}

impl OwnNats {
    async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let file = dir.path().join("nats.conf");
        std::fs::write(
            &file,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\n{config}\n",
                dir.path().join("js").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("nats-server")
            .arg("-c")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("nats-server (scripts/test-env.sh installs it)");
        let mut ready = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            ready,
            "nats-server did not start: {}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        Self {
            child,
            port,
            tls: config.contains("tls {"),
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        if self.tls {
            format!("tls://localhost:{}", self.port)
        } else {
            format!("nats://127.0.0.1:{}", self.port)
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A NATS JWT (`ed25519-nkey`) with `claims`, issued and signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, nats: Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": uuid_like().replace('-', "").to_uppercase(),
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "name": subject,
        "sub": subject,
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{signature}")
}

/// Delivers through `endpoint` (its NATS credentials as given) to a stream on `nats`, as the
/// client `check` connects with, and returns how many events the stream holds.
async fn deliver_through(
    nats: &OwnNats,
    check: async_nats::ConnectOptions,
    endpoint: Value,
) -> (reqwest::StatusCode, u64) {
    deliver_resolving(nats, check, endpoint, None).await
}

/// [`deliver_through`], with twinguard resolving names through `lookup`, and the endpoint's
/// `url` as given when it has one.
async fn deliver_resolving(
    nats: &OwnNats,
    check: async_nats::ConnectOptions,
    endpoint: Value,
    lookup: Option<twinguard_server::egress::SharedLookup>,
) -> (reqwest::StatusCode, u64) {
    let js = async_nats::jetstream::new(check.connect(nats.url()).await.unwrap());
    let name = format!("TG_{}", uuid_like().replace('-', "_"));
    let subject = format!("tg.events.{name}");
    let mut stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name,
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let allow = format!("127.0.0.1:{port}\nbroker.test:{port}", port = nats.port);
    let server = TestServer::start_with(move |c| {
        c.egress = twinguard_server::egress::EgressPolicy::from_lines(&allow).unwrap();
        c.egress_lookup = lookup;
    })
    .await;
    let admin = server.admin_token().await;
    let dir = server.dir.path().join("endpoint-credentials");
    let mut body = endpoint;
    if body["url"].is_null() {
        body["url"] = nats.url().into();
    }
    body["subject"] = subject.into();
    for field in ["nkeyFile", "credentialsFile", "caFile"] {
        if let Some(text) = body[field].as_str().map(str::to_owned) {
            let path = dir.join(field);
            std::fs::write(&path, text).unwrap();
            body[field] = path.display().to_string().into();
        }
    }
    let answer = put_endpoint(&server, &admin, "nats", &body).await;
    let status = answer.status();
    if status != 201 {
        eprintln!("endpoint refused: {}", answer.text().await.unwrap());
        return (status, 0);
    }
    plant(&server, &admin).await;
    route(&server, &admin, "r", "nats", "true").await;
    put_twin(&server, &admin, "a", 1.0).await;
    put_twin(&server, &admin, "b", 2.0).await;
    for _ in 0..40 {
        if stream.info().await.unwrap().state.messages >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (status, stream.info().await.unwrap().state.messages)
}

#[tokio::test]
async fn nats_endpoints_authenticate_with_an_nkey_or_a_creds_file() {
    // A server that lists one user by public nkey.
    let user = nkeys::KeyPair::new_user();
    let nats = OwnNats::start(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ))
    .await;
    let check = || async_nats::ConnectOptions::new().nkey(user.seed().unwrap());
    let seed = user.seed().unwrap();
    assert_eq!(
        deliver_through(
            &nats,
            check(),
            json!({"type": "natsJetStream", "nkeyFile": seed})
        )
        .await,
        (reqwest::StatusCode::CREATED, 2),
        "delivered with the user's nkey"
    );
    // Another user's seed is not listed: nothing arrives.
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    assert_eq!(
        deliver_through(
            &nats,
            check(),
            json!({"type": "natsJetStream", "nkeyFile": stranger})
        )
        .await,
        (reqwest::StatusCode::CREATED, 0),
        "an unlisted nkey delivers nothing"
    );
    // Not a user seed: refused when the endpoint is created.
    let account = nkeys::KeyPair::new_account().seed().unwrap();
    for bad in [account.as_str(), "SUNOTASEED"] {
        assert_eq!(
            deliver_through(
                &nats,
                check(),
                json!({"type": "natsJetStream", "nkeyFile": bad})
            )
            .await
            .0,
            reqwest::StatusCode::BAD_REQUEST
        );
    }
    assert_eq!(
        deliver_through(
            &nats,
            check(),
            json!({"type": "natsJetStream", "credentialsFile": "not a creds file"})
        )
        .await
        .0,
        reqwest::StatusCode::BAD_REQUEST
    );
    drop(nats);

    // Operator (decentralised JWT) mode: the user's JWT and seed in a .creds file.
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        json!({"type": "account", "version": 2, "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1}),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        json!({"type": "account", "version": 2}),
    );
    let nats = OwnNats::start(&format!(
        "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {}: {account_jwt}, {sys}: {system_jwt} }}",
        account.public_key(),
        sys = system.public_key(),
    ))
    .await;
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    let check = async_nats::ConnectOptions::new()
        .credentials(&creds)
        .unwrap();
    assert_eq!(
        deliver_through(
            &nats,
            check,
            json!({"type": "natsJetStream", "credentialsFile": creds})
        )
        .await,
        (reqwest::StatusCode::CREATED, 2),
        "delivered with the user's .creds"
    );
}

/// A webhook receiver that refuses everything (503) until `up` is set; records what it accepted.
#[derive(Clone, Default)]
struct Switch {
    up: Arc<std::sync::atomic::AtomicBool>,
    accepted: Arc<Mutex<Vec<Value>>>,
}

impl Switch {
    async fn start(&self) -> SocketAddr {
        let me = self.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let me = me.clone();
            async move {
                if !me.up.load(std::sync::atomic::Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                me.accepted
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                StatusCode::OK
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
}

async fn metric(server: &TestServer, token: &str, name: &str) -> Option<f64> {
    let text = server
        .admin_call(Method::GET, "/metrics", token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// An endpoint whose receiver is down cannot make the change feed grow without end: past the
/// backlog the oldest records go, and the endpoint counts what it skipped. Every event is
/// either delivered or counted as skipped.
#[tokio::test]
async fn a_receiver_that_is_down_cannot_grow_the_feed_past_the_backlog() {
    let switch = Switch::default();
    let addr = switch.start().await;
    let server = TestServer::start_with(|c| {
        allow_loopback(c);
        c.event_backlog = Some(100);
    })
    .await;
    let admin = server.admin_token().await;
    let body = json!({"type": "webhook", "url": format!("http://{addr}/hook"),
        "maxAttempts": 1000, "initialBackoffMs": 10});
    assert_eq!(
        put_endpoint(&server, &admin, "down", &body).await.status(),
        201
    );
    plant(&server, &admin).await;
    route(&server, &admin, "r", "down", "true").await;
    // More than the delivery task reads ahead (2,048) plus the backlog.
    const WRITES: usize = 3_000;
    let server = Arc::new(server);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (server, admin) = (server.clone(), admin.clone());
            tokio::spawn(async move {
                for i in (w..WRITES).step_by(8) {
                    put_twin(&server, &admin, &format!("t{}", i % 50), i as f64).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let service = server.state.service.clone();
    assert!(service.feed_head() >= WRITES as u64);
    // The trim (every 5 s) keeps no more than the backlog.
    let mut kept = usize::MAX;
    for _ in 0..160 {
        kept = service.feed_after(0, 10_000).unwrap().len();
        if kept <= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(kept <= 100, "{kept} feed records kept");
    switch.up.store(true, std::sync::atomic::Ordering::SeqCst);
    let accounted = || async {
        let delivered = switch.accepted.lock().unwrap().len() as f64;
        let skipped = metric(
            &server,
            &admin,
            "twinguard_events_skipped_total{endpoint=\"down\"}",
        )
        .await
        .unwrap_or(0.0);
        (delivered, skipped)
    };
    // A deadline, not a measure: the endpoint was failing all along, so its next probe may be
    // up to the delivery's longest backoff (60 s) away; on a loaded machine the write phase
    // lasts long enough for the backoff to pass 30 s.
    let mut last = (0.0, 0.0);
    for _ in 0..900 {
        last = accounted().await;
        if last.0 + last.1 >= WRITES as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (delivered, skipped) = last;
    assert!(skipped > 0.0, "nothing skipped: {last:?}");
    assert_eq!(
        delivered + skipped,
        WRITES as f64,
        "every event delivered or skipped"
    );
    // What arrived is still in order per twin (with gaps where events were skipped).
    let mut seen: std::collections::HashMap<String, u64> = Default::default();
    for b in switch.accepted.lock().unwrap().iter() {
        let twin = b["subject"].as_str().unwrap().to_owned();
        let seq = b["twinsequence"].as_u64().unwrap();
        let before = seen.insert(twin.clone(), seq).unwrap_or(0);
        assert!(seq > before, "twin {twin}: {seq} after {before}");
    }
}

/// `maxAgeSeconds` counts from the event's commit (ADT's time-to-live): events that age past it
/// while their receiver is down are dead-lettered together, not one probe at a time.
#[tokio::test]
async fn events_older_than_max_age_are_dead_lettered_while_the_receiver_is_down() {
    let switch = Switch::default();
    let addr = switch.start().await;
    let server = TestServer::start_with(allow_loopback).await;
    let admin = server.admin_token().await;
    let body = json!({"type": "webhook", "url": format!("http://{addr}/hook"),
        "maxAttempts": 1000, "maxAgeSeconds": 1, "initialBackoffMs": 20000});
    assert_eq!(
        put_endpoint(&server, &admin, "ttl", &body).await.status(),
        201
    );
    plant(&server, &admin).await;
    route(&server, &admin, "r", "ttl", "true").await;
    for i in 0..5 {
        put_twin(&server, &admin, &format!("t{i}"), 1.0).await;
    }
    let mut dead = Vec::new();
    for _ in 0..60 {
        dead = server
            .admin_json(
                Method::GET,
                "/admin/endpoints/ttl/deadletters",
                &admin,
                None,
            )
            .await["value"]
            .as_array()
            .unwrap()
            .clone();
        if dead.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 5, "{dead:#?}");
    assert!(
        dead.iter().filter(|d| d["attempts"] == 0).count() >= 4,
        "waiting events expire without an attempt: {dead:#?}"
    );
}

/// A NATS server of the test's own serving a certificate for `cert_name` only; and its CA (PEM).
async fn tls_nats(cert_name: &str) -> (OwnNats, String) {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate_for(cert_name);
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    // nats-server reads the files when it starts; `dir` may go after that.
    let nats = OwnNats::start(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        cert_file.display(),
        key_file.display()
    ))
    .await;
    (nats, ca)
}

/// The test's own NATS client (it only creates and reads the stream): checks no certificate.
fn unchecked_tls_client() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .require_tls(true)
        .tls_client_config(
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate))
                .with_no_client_auth(),
        )
}

/// A certificate for `name` only (no address in it), from a fresh CA: (CA PEM, cert PEM, key PEM).
fn certificate_for(name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// NATS over TLS: twinguard dials the address its egress check admitted and checks the
/// certificate for the endpoint's host name (the certificate names `localhost` only, no
/// address); a certificate for another name is refused.
#[tokio::test]
async fn nats_over_tls_checks_the_host_name_on_the_admitted_address() {
    for (cert_name, delivered) in [("localhost", 2), ("elsewhere.test", 0)] {
        let (nats, ca) = tls_nats(cert_name).await;
        let check = unchecked_tls_client();
        let endpoint = json!({"type": "natsJetStream", "caFile": ca});
        assert_eq!(
            deliver_through(&nats, check, endpoint).await,
            (reqwest::StatusCode::CREATED, delivered),
            "a certificate for {cert_name}"
        );
    }
}

/// The test client's verifier: accepts any certificate (signatures still checked).
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// A DNS of the test's own: `broker.test` is 127.0.0.1; the system resolver does not know it.
struct TestDns;

impl twinguard_server::egress::Lookup for TestDns {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
    {
        let found = (host == "broker.test").then(|| SocketAddr::from(([127, 0, 0, 1], port)));
        Box::pin(async move {
            found
                .map(|a| vec![a])
                .ok_or_else(|| std::io::Error::other("no such host"))
        })
    }
}

/// The rebinding window is closed for TLS too: twinguard connects to the address its own
/// (checked) resolution gave, never resolving the name a second time in the client library.
/// `broker.test` exists only in twinguard's resolver, so a library that resolved it again
/// would not connect at all; the certificate is still checked for `broker.test`.
#[tokio::test]
async fn nats_over_tls_connects_to_the_address_the_egress_check_resolved() {
    let (nats, ca) = tls_nats("broker.test").await;
    let check = unchecked_tls_client();
    let endpoint = json!({"type": "natsJetStream", "caFile": ca,
        "url": format!("tls://broker.test:{}", nats.port)});
    let lookup = twinguard_server::egress::SharedLookup(Arc::new(TestDns));
    assert_eq!(
        deliver_resolving(&nats, check, endpoint, Some(lookup)).await,
        (reqwest::StatusCode::CREATED, 2)
    );
}
