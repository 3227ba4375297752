//! Authentication and authorization at the HTTP edge: the token endpoint, bearer tokens on every
//! route the OpenAPI document lists, forged tokens, and the built-in roles.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::Method;
use serde_json::{Value, json};
use twinguard_core::auth::{DATA_READER, MONITORING};

use crate::kit::{TestServer, https_client};

#[tokio::test]
async fn client_credentials_grant_issues_an_eddsa_access_token() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    for claim in [
        "iss",
        "sub",
        "aud",
        "exp",
        "nbf",
        "iat",
        "jti",
        "client_id",
        "auth_time",
    ] {
        assert!(claims.get(claim).is_some(), "{claim} missing");
    }
    // Roles are not in the token: they are read from the directory on every request.
    assert!(claims.get("roles").is_none());
    assert_eq!(claims["amr"], json!([]));
}

#[tokio::test]
async fn token_endpoint_accepts_http_basic_and_refuses_wrong_or_unknown_clients_alike() {
    let server = TestServer::start().await;
    let (id, secret) = server.admin_credentials();
    let basic = server
        .client
        .post(server.url("/oauth2/token"))
        .header(
            "authorization",
            format!("Basic {}", STANDARD.encode(format!("{id}:{secret}"))),
        )
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    assert_eq!(basic.headers()["cache-control"], "no-store");

    let wrong = server.token_for(&id, "not-the-secret").await;
    let unknown = server
        .token_for("00000000-0000-0000-0000-000000000000", &secret)
        .await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(unknown.status(), 401);
    assert_eq!(wrong.text().await.unwrap(), unknown.text().await.unwrap());

    let no_grant = server
        .client
        .post(server.url("/oauth2/token"))
        .form(&[("client_id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(no_grant.status(), 400);
    let other_grant = server
        .client
        .post(server.url("/oauth2/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("client_id", id.as_str()),
            ("client_secret", secret.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(other_grant.status(), 400);
    assert_eq!(
        other_grant.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );
}

/// Every operation of the OpenAPI document, with its path parameters filled in.
pub(crate) fn documented_operations() -> Vec<(Method, String, bool)> {
    let doc: Value = serde_json::from_str(include_str!("../../src/openapi.json")).unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let anonymous = op["security"].as_array().is_some_and(|s| {
                s.is_empty() || s.iter().any(|r| r.as_object().unwrap().is_empty())
            });
            let concrete = path
                .replace("{id}", "x")
                .replace("{rel}", "y")
                .replace("{component}", "z");
            ops.push((method.to_uppercase().parse().unwrap(), concrete, anonymous));
        }
    }
    ops
}

#[tokio::test]
async fn every_documented_route_but_probes_and_token_requires_a_bearer_token() {
    let server = TestServer::start().await;
    let ops = documented_operations();
    assert!(
        ops.len() >= 25,
        "the document lists {} operations",
        ops.len()
    );
    for (method, path, anonymous) in ops {
        let response = server
            .client
            .request(
                method.clone(),
                server.url(&format!("{path}?api-version=2023-10-31")),
            )
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        if anonymous {
            assert_ne!(
                response.status(),
                401,
                "{method} {path} should be anonymous"
            );
        } else {
            assert_eq!(
                response.status(),
                401,
                "{method} {path} answered without a token"
            );
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            assert!(response.headers().contains_key("x-ms-request-id"));
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "Unauthenticated");
        }
    }
}

fn forge(header: Value, claims: Value, signature: &str) -> String {
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!("{}.{}.{signature}", enc(&header), enc(&claims))
}

#[tokio::test]
async fn forged_altered_and_foreign_tokens_are_rejected() {
    let server = TestServer::start().await;
    let good = server.admin_token().await;
    let parts: Vec<&str> = good.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();

    let mut none_header = header.clone();
    none_header["alg"] = json!("none");
    let mut hs_header = header.clone();
    hs_header["alg"] = json!("HS256");
    let mut elevated = claims.clone();
    elevated["sub"] = json!("someone-else");
    let mut expired = claims.clone();
    expired["exp"] = json!(1);
    let mut jku = header.clone();
    jku["jku"] = json!("https://attacker.example/jwks.json");
    let mut flipped = parts[2].to_owned().into_bytes();
    flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };

    let attempts = [
        ("alg none", forge(none_header, claims.clone(), "")),
        (
            "HS256 confusion",
            forge(hs_header, claims.clone(), parts[2]),
        ),
        ("altered claims", forge(header.clone(), elevated, parts[2])),
        ("expired", forge(header.clone(), expired, parts[2])),
        ("injected jku", forge(jku, claims.clone(), parts[2])),
        ("stripped signature", format!("{}.{}.", parts[0], parts[1])),
        (
            "flipped signature",
            format!(
                "{}.{}.{}",
                parts[0],
                parts[1],
                String::from_utf8(flipped).unwrap()
            ),
        ),
        ("oversize", format!("{good}{}", "A".repeat(10_000))),
        ("garbage", "not-a-jwt".to_owned()),
    ];
    for (what, token) in attempts {
        let response = server.call(Method::GET, "/models", &token).await;
        assert_eq!(response.status(), 401, "{what} was accepted");
    }
    let response = server.call(Method::GET, "/models", &good).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_token_from_another_instance_is_rejected() {
    let one = TestServer::start().await;
    let other = TestServer::start().await;
    let foreign = other.admin_token().await;
    let response = one
        .adt(Method::GET, "/models", &foreign)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn data_reader_reads_and_queries_but_every_write_is_forbidden() {
    let server = TestServer::start().await;
    let reader = server.token_with_role(DATA_READER).await;
    let ok = server.call(Method::GET, "/models", &reader).await;
    assert_eq!(ok.status(), 200);
    let query = server
        .adt(Method::POST, "/query", &reader)
        .json(&json!({"query": "SELECT * FROM DIGITALTWINS"}))
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), 200);
    let writes = [
        (Method::POST, "/models", json!([])),
        (
            Method::PUT,
            "/digitaltwins/t1",
            json!({"$metadata": {"$model": "dtmi:a;1"}}),
        ),
        (Method::DELETE, "/digitaltwins/t1", json!(null)),
        (
            Method::PUT,
            "/eventroutes/r1",
            json!({"endpointName": "e", "filter": "true"}),
        ),
        (Method::DELETE, "/models/dtmi:a;1", json!(null)),
    ];
    for (method, path, body) in writes {
        let response = server
            .adt(method.clone(), path, &reader)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "Forbidden");
    }
}

/// The probes need no credential; `/readyz` says why only to a caller that may read metrics.
/// Anonymous, with a role that lacks the permission, the answer is the status alone (the
/// not-ready cases are in `audit.rs`); a credential that fails is refused as on every route.
#[tokio::test]
async fn probes_are_anonymous_and_readiness_says_why_only_to_monitoring() {
    let server = TestServer::start().await;
    let health = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let probe = async |token: Option<&str>| {
        let mut request = server.client.get(server.url("/readyz"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    };
    let reader = server.token_with_role(DATA_READER).await;
    let monitor = server.token_with_role(MONITORING).await;
    let status_alone = (200, r#"{"status":"ready"}"#.to_owned());
    assert_eq!(probe(None).await, status_alone);
    assert_eq!(probe(Some(&reader)).await, status_alone);
    let (status, told) = probe(Some(&monitor)).await;
    let told: Value = serde_json::from_str(&told).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        (
            &told["status"],
            &told["store"],
            &told["audit"],
            &told["auditDisk"]
        ),
        (&json!("ready"), &json!("ok"), &json!("ok"), &json!("ok")),
        "{told}"
    );
    assert_eq!(probe(Some("not-a-token")).await.0, 401);
}

#[tokio::test]
async fn repeated_bad_secrets_from_one_address_back_off_while_the_owner_gets_in_from_another() {
    let server = TestServer::start().await;
    let (id, secret) = server.admin_credentials();
    for _ in 0..5 {
        assert_eq!(server.token_for(&id, "wrong").await.status(), 401);
    }
    let throttled = server.token_for(&id, "wrong").await;
    assert_eq!(throttled.status(), 429);
    let retry: u64 = throttled.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=900).contains(&retry), "{retry}");
    // While the address waits nothing is checked, not even the right secret.
    assert_eq!(server.token_for(&id, &secret).await.status(), 429);

    let elsewhere = https_client(server.dir.path(), Some("127.0.0.2".parse().unwrap()));
    let response = elsewhere
        .post(server.url("/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &id),
            ("client_secret", &secret),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the owner signs in at once from another address"
    );
}

/// Signs `claims` with the server's own key, as an insider or a bug elsewhere might: the
/// signature is valid, so only the claim checks stand in the way.
fn sign_with_server_key(server: &TestServer, header_kid: Option<&str>, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.typ = Some("at+jwt".into());
    header.kid = header_kid.map(str::to_owned);
    server.state.tokens.with_key_ring(|ring| {
        jsonwebtoken::encode(&header, claims, &ring.active(u64::MAX).encoding).unwrap()
    })
}

#[tokio::test]
async fn validly_signed_tokens_with_wrong_claims_or_kid_are_rejected() {
    let server = TestServer::start().await;
    let good = server.admin_token().await;
    let parts: Vec<&str> = good.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let kid = header["kid"].as_str().unwrap().to_owned();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();

    // The harness itself is sound: re-signing the genuine claims yields an accepted token.
    let resigned = sign_with_server_key(&server, Some(&kid), &claims);
    assert_eq!(
        server
            .call(Method::GET, "/models", &resigned)
            .await
            .status(),
        200
    );

    let with = |field: &str, value: Value| {
        let mut c = claims.clone();
        c[field] = value;
        c
    };
    let without = |field: &str| {
        let mut c = claims.clone();
        c.as_object_mut().unwrap().remove(field);
        c
    };
    let far = json!(4_102_444_800u64); // 2100-01-01
    let cases = [
        (
            "exp as a string (CVE-2026-25537 class)",
            Some(kid.as_str()),
            with("exp", json!("4102444800")),
        ),
        (
            "nbf as a string",
            Some(kid.as_str()),
            with("nbf", json!("0")),
        ),
        (
            "nbf in the future",
            Some(kid.as_str()),
            with("nbf", far.clone()),
        ),
        (
            "iat in the future",
            Some(kid.as_str()),
            with("iat", far.clone()),
        ),
        ("exp missing", Some(kid.as_str()), without("exp")),
        ("nbf missing", Some(kid.as_str()), without("nbf")),
        ("iss missing", Some(kid.as_str()), without("iss")),
        ("aud missing", Some(kid.as_str()), without("aud")),
        (
            "another issuer",
            Some(kid.as_str()),
            with("iss", json!("https://attacker.example")),
        ),
        (
            "another audience",
            Some(kid.as_str()),
            with("aud", json!(["https://management.azure.com"])),
        ),
        (
            "audience of the wrong type",
            Some(kid.as_str()),
            with("aud", json!(42)),
        ),
        (
            "roles of the wrong type",
            Some(kid.as_str()),
            with("roles", json!("bcd981a7-7f74-457b-83e1-cceb9e632ffe")),
        ),
        ("unknown kid", Some("0123456789abcdef"), claims.clone()),
        ("no kid", None, claims.clone()),
        ("expired beyond the skew", Some(kid.as_str()), {
            let now = claims["iat"].as_u64().unwrap();
            let mut c = claims.clone();
            c["iat"] = json!(now - 7_200);
            c["nbf"] = json!(now - 7_200);
            c["auth_time"] = json!(now - 7_200);
            c["exp"] = json!(now - 3_600);
            c
        }),
        ("sub missing", Some(kid.as_str()), without("sub")),
        ("jti missing", Some(kid.as_str()), without("jti")),
        ("iat missing", Some(kid.as_str()), without("iat")),
        (
            "authenticated after it was issued (step-up for ever)",
            Some(kid.as_str()),
            with("auth_time", far.clone()),
        ),
        (
            "a session generation that was never issued",
            Some(kid.as_str()),
            with("gen", json!(7)),
        ),
        (
            "a refresh family that does not exist",
            Some(kid.as_str()),
            with("sid", json!("no-such-family")),
        ),
        (
            "a claim the server does not know",
            Some(kid.as_str()),
            with("roles", json!(["bcd981a7-7f74-457b-83e1-cceb9e632ffe"])),
        ),
        (
            "oversize (a 9 KiB client_id)",
            Some(kid.as_str()),
            with("client_id", json!("x".repeat(9 * 1024))),
        ),
    ];
    for (what, kid, claims) in cases {
        let token = sign_with_server_key(&server, kid, &claims);
        let status = server.call(Method::GET, "/models", &token).await.status();
        assert_eq!(status, 401, "{what} was accepted");
    }
}
