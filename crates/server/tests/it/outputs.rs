//! What the server puts on the wire besides the answer itself: the security headers on every
//! answer of both listeners, and links built from the configured public address, never from
//! what a client sent.

use reqwest::Method;
use serde_json::{Value, json};

use crate::auth::documented_operations;
use crate::kit::{API, TestServer};

/// Public documents a shared cache may keep: the token signing keys and the server metadata.
const PUBLIC_DOCUMENTS: [&str; 3] = [
    "/.well-known/jwks.json",
    "/.well-known/openid-configuration",
    "/.well-known/oauth-authorization-server",
];

fn assert_security_headers(what: &str, path: &str, response: &reqwest::Response) {
    let headers = response.headers();
    let expected = [
        ("strict-transport-security", "max-age=31536000"),
        ("x-content-type-options", "nosniff"),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ];
    for (name, value) in expected {
        assert_eq!(
            headers.get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{what} ({}) lacks {name}: {value}",
            response.status()
        );
    }
    let cache = headers.get("cache-control").and_then(|v| v.to_str().ok());
    if PUBLIC_DOCUMENTS.contains(&path) && response.status() == 200 {
        assert_eq!(cache, Some("public, max-age=300"), "{what}");
    } else {
        assert_eq!(
            cache,
            Some("no-store"),
            "{what} ({}) may be stored by a cache",
            response.status()
        );
    }
}

#[tokio::test]
async fn every_answer_of_both_listeners_carries_the_security_headers_and_no_store() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let ops = documented_operations();
    assert!(
        ops.len() >= 25,
        "the document lists {} operations",
        ops.len()
    );
    // Every documented operation, anonymous (mostly 401) and as the administrator (200, 201,
    // 204, 400, 404, ...).
    // The CA's rotation goes last: after it, the server presents a certificate that this
    // test's client, which trusts the first authority alone, refuses.
    const LAST: &str = "/admin/ca/rotate";
    for (method, path, _) in ops.iter().filter(|(_, path, _)| path != LAST) {
        every_caller(&server, &admin, method, path).await;
    }

    // The answers that carry secrets, each reached for real.
    let created = server
        .admin_call(Method::POST, "/admin/identities", &admin)
        .json(&json!({"kind": "application", "name": "headers-app"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_security_headers("identity creation", "", &created);
    let id = created.json::<Value>().await.unwrap()["identity"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rotated = server
        .admin_call(
            Method::POST,
            &format!("/admin/identities/{id}/secret"),
            &admin,
        )
        .send()
        .await
        .unwrap();
    assert!(rotated.status().is_success(), "{}", rotated.status());
    assert_security_headers("secret rotation", "", &rotated);
    let device = server
        .admin_call(Method::PUT, "/devices/headers-device", &admin)
        .json(&json!({"generate": true, "deviceModel": "headers-sensor"}))
        .send()
        .await
        .unwrap();
    assert_eq!(device.status(), 201);
    let device_headers = device.headers().clone();
    let body: Value = device.json().await.unwrap();
    assert!(body["privateKey"].is_string());
    assert_eq!(device_headers["cache-control"], "no-store");
    assert_eq!(device_headers["x-content-type-options"], "nosniff");

    // Errors outside the documented routes.
    let missing = server
        .client
        .get(server.url("/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_security_headers("an unknown route", "/nowhere", &missing);
    let wrong_method = server
        .client
        .delete(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_security_headers("a wrong method", "/healthz", &wrong_method);
    let no_version = server
        .client
        .get(server.url("/models"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(no_version.status(), 400);
    assert_security_headers("a missing api-version", "/models", &no_version);

    // The device plane: its routes, a refused message, its fallbacks.
    let device_plane = [
        (Method::GET, "/healthz", None),
        (Method::POST, "/telemetry", Some("not a signed message")),
        (Method::GET, "/telemetry", None),
        (Method::GET, "/models", None),
    ];
    for (method, path, body) in device_plane {
        let mut request = server
            .client
            .request(method.clone(), format!("{}{path}", server.device_base));
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        assert_security_headers(&format!("device plane {method} {path}"), path, &response);
    }
    assert!(ops.iter().any(|(_, path, _)| path == LAST));
    every_caller(&server, &admin, &Method::POST, LAST).await;
}

/// Calls a documented operation anonymously and as the administrator, and checks the security
/// headers of both answers.
async fn every_caller(server: &TestServer, admin: &str, method: &Method, path: &str) {
    for token in [None, Some(admin)] {
        let mut request = server
            .client
            .request(method.clone(), server.url(&format!("{path}?{API}")))
            .header("content-type", "application/json")
            .body("{}");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let who = if token.is_some() {
            "admin"
        } else {
            "anonymous"
        };
        assert_security_headers(&format!("{method} {path} ({who})"), path, &response);
    }
}

/// Two models, so a page of one has a next link.
async fn two_models(server: &TestServer, token: &str) {
    let models: Vec<Value> = ["A", "B"]
        .iter()
        .map(|n| {
            json!({"@id": format!("dtmi:echo:{n};1"), "@type": "Interface",
                   "@context": "dtmi:dtdl:context;3"})
        })
        .collect();
    let response = server
        .adt(Method::POST, "/models", token)
        .json(&models)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

/// Clients an attacker controls: HTTP/1.1 with a `Host` header of its choosing, and HTTP/2
/// whose `:authority` names the attacker's host (resolved to the server).
fn attacker_clients(server: &TestServer) -> [(&'static str, reqwest::Client, String); 2] {
    let ca = std::fs::read(server.dir.path().join("tls/ca.pem")).unwrap();
    let http1 = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let addr: std::net::SocketAddr = server.base.trim_start_matches("https://").parse().unwrap();
    let http2 = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        // The attacker's client talks to the real server under the attacker's name.
        .danger_accept_invalid_certs(true)
        .resolve("attacker.example", addr)
        .http2_prior_knowledge()
        .build()
        .unwrap();
    [
        ("HTTP/1.1 Host", http1, server.base.clone()),
        (
            "HTTP/2 :authority",
            http2,
            format!("https://attacker.example:{}", addr.port()),
        ),
    ]
}

/// Follows what the attacker gets back: the `nextLink` of a one-item page of models and the
/// endpoints of the discovery metadata, each of which must be on `public`.
async fn links_seen_by_an_attacker(server: &TestServer, public: &str) {
    let token = server.admin_token().await;
    two_models(server, &token).await;
    for (how, client, base) in attacker_clients(server) {
        let page = client
            .get(format!("{base}/models?{API}"))
            .header("host", "attacker.example")
            .header("max-items-per-page", "1")
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200, "{how}");
        if how.starts_with("HTTP/2") {
            assert_eq!(page.version(), reqwest::Version::HTTP_2);
        } else {
            assert_eq!(page.version(), reqwest::Version::HTTP_11);
        }
        let body: Value = page.json().await.unwrap();
        let next = body["nextLink"].as_str().unwrap();
        assert!(
            next.starts_with(&format!("{public}/models?")),
            "{how}: the next link {next} is not on {public}"
        );
        assert!(!next.contains("attacker"), "{how}: {next}");

        let metadata: Value = client
            .get(format!("{base}/.well-known/openid-configuration"))
            .header("host", "attacker.example")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for endpoint in ["token_endpoint", "jwks_uri", "revocation_endpoint"] {
            let url = metadata[endpoint].as_str().unwrap();
            assert!(
                url.starts_with(&format!("{public}/")),
                "{how}: {endpoint} {url} is not on {public}"
            );
        }
    }
}

#[tokio::test]
async fn links_are_built_on_the_configured_public_url_whatever_host_the_client_names() {
    let server = TestServer::start_with(|config| {
        config.public_url =
            Some(twinguard_server::startup::PublicUrl::parse("https://twins.example.com").unwrap());
    })
    .await;
    // The test reaches the server at its listener; only the links name the public URL.
    links_seen_by_an_attacker(&server, "https://twins.example.com").await;
}

#[tokio::test]
async fn without_a_public_url_links_are_built_on_the_listener_address_not_the_host_header() {
    let server = TestServer::start().await;
    let public = server.base.clone();
    links_seen_by_an_attacker(&server, &public).await;
}

/// Paths under `root` (itself included) whose mode gives group or others any access.
fn open_to_others(root: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
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
async fn files_are_created_owner_only_by_their_own_modes_not_by_the_umask() {
    // The library sets no umask (the binary does): with the usual permissive one, only the
    // modes every file is opened with keep the data directory and the exports private. Each
    // test runs in its own process under nextest.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let outside = tempfile::tempdir().unwrap();
    let siem = outside.path().join("audit.jsonl");
    let witness = outside.path().join("witness");
    let server = TestServer::start_with(|config| {
        config.siem = vec![twinguard_server::siem::Sink::File {
            path: siem.clone(),
            max_bytes: 1 << 20,
            keep: 2,
        }];
        config.audit_witness = Some(witness.clone());
    })
    .await;
    let admin = server.admin_token().await;
    let device = server
        .admin_call(Method::PUT, "/devices/umask-device", &admin)
        .json(&json!({"generate": true, "deviceModel": "umask-sensor"}))
        .send()
        .await
        .unwrap();
    assert_eq!(device.status(), 201);
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
    let mut open = open_to_others(server.dir.path());
    open.extend(open_to_others(&siem));
    open.extend(open_to_others(&witness));
    assert!(open.is_empty(), "readable by others: {open:#?}");
}

/// Percent-encodes every byte of `id` but ASCII letters, digits, `-`, `_` and `~` (dots too, so
/// `..` reaches the server as the ID an attacker sends rather than being resolved by the client).
fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn assert_invalid_argument(what: &str, response: reqwest::Response) {
    assert_eq!(response.status(), 400, "{what} was accepted");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidArgument", "{what}");
}

#[tokio::test]
async fn event_routes_refuse_path_like_ids_and_endpoint_names_that_are_urls_or_escapes() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let good = json!({"endpointName": "audit-sink", "filter": "true"});
    // A bare `..` cannot be sent through a URL parser (it resolves `%2E%2E` too); the unit test
    // `route_ids_read_as_names_never_as_paths` refuses it.
    for id in ["a/../b", "a/..", "a/b", "a..b", "r\u{202e}1", "r\u{200b}1"] {
        let response = server
            .call_json(
                Method::PUT,
                &format!("/eventroutes/{}", path_segment(id)),
                &token,
                &good,
            )
            .await;
        assert_invalid_argument(&format!("route ID {id:?}"), response).await;
    }
    for endpoint in [
        "https://attacker.example/hook",
        "sink\r\nX-Injected: 1",
        "\u{1b}[2J\u{1b}[31mOK",
        "sink\u{2028}forged",
        "e",
    ] {
        let response = server
            .call_json(
                Method::PUT,
                "/eventroutes/route-1",
                &token,
                &json!({"endpointName": endpoint, "filter": "true"}),
            )
            .await;
        assert_invalid_argument(&format!("endpoint {endpoint:?}"), response).await;
    }
    let listed: Value = server
        .call(Method::GET, "/eventroutes", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["value"], json!([]), "something was stored");
    let stored = server
        .call_json(Method::PUT, "/eventroutes/route-1", &token, &good)
        .await;
    assert!(stored.status().is_success(), "{}", stored.status());
}

#[tokio::test]
async fn twin_and_relationship_ids_refuse_hidden_characters_and_mixed_alphabets_but_keep_other_scripts()
 {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let room = json!({"@id": "dtmi:echo:Room;1", "@type": "Interface",
        "@context": "dtmi:dtdl:context;3",
        "contents": [{"@type": "Relationship", "name": "next"}]});
    let uploaded = server
        .call_json(Method::POST, "/models", &token, &json!([room]))
        .await;
    assert_eq!(uploaded.status(), 201);
    let twin = json!({"$metadata": {"$model": "dtmi:echo:Room;1"}});
    let put_twin = |id: String| {
        let server = &server;
        let token = token.clone();
        let twin = twin.clone();
        async move {
            server
                .call_json(
                    Method::PUT,
                    &format!("/digitaltwins/{}", path_segment(&id)),
                    &token,
                    &twin,
                )
                .await
        }
    };
    // What a person would read as "room-1", "admin", or with its end shown first.
    for id in [
        "room\u{200b}-1",
        "room-1\u{202e}gnp.exe",
        "\u{2066}room-1\u{2069}",
        "\u{feff}room-1",
        "room-1\u{2028}",
        "room-1\u{85}",
        "r\u{43e}om-1",
        "\u{430}dmin",
        " room-1",
        "room\u{e000}",
    ] {
        assert_invalid_argument(&format!("twin ID {id:?}"), put_twin(id.to_owned()).await).await;
    }
    for id in ["room-1", "комната-1", "会議室-1", "δωμάτιο"] {
        let response = put_twin(id.to_owned()).await;
        assert_eq!(response.status(), 200, "the twin ID {id} was refused");
    }
    let relationship = |target: &str| json!({"$relationshipName": "next", "$targetId": target});
    let refused = server
        .call_json(
            Method::PUT,
            &format!(
                "/digitaltwins/room-1/relationships/{}",
                path_segment("next\u{202e}1")
            ),
            &token,
            &relationship("комната-1"),
        )
        .await;
    assert_invalid_argument("relationship ID with a bidi override", refused).await;
    let kept = server
        .call_json(
            Method::PUT,
            "/digitaltwins/room-1/relationships/next-1",
            &token,
            &relationship("комната-1"),
        )
        .await;
    assert_eq!(kept.status(), 200);
}
