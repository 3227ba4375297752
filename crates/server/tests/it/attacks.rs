//! Issue 16's identity and access findings, each replayed as the attacker did it against
//! `2eec417`: derived credentials, MFA enrolment, sessions after resets, the one throttle, the
//! audit trail as an oracle, and administrative permissions bounded by their holder.

use std::net::IpAddr;

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use twinguard_core::auth::{DATA_OWNER, DATA_READER, QUERY_ONLY, SECURITY_ADMIN};

use crate::identity::{PASSWORD, code_at, create_user, error_code, login};
use crate::kit::{TestServer, https_client, uuid_like};

/// An application holding `roles` at instance scope, created by the first administrator.
pub(crate) async fn application(
    server: &TestServer,
    admin: &str,
    roles: &[&str],
) -> (String, String) {
    let created: Value = server
        .admin_json(
            Method::POST,
            "/admin/identities",
            admin,
            Some(&json!({"kind": "application", "name": format!("app-{}", uuid_like())})),
        )
        .await;
    let id = created["identity"]["id"].as_str().unwrap().to_owned();
    for role in roles {
        assign(server, admin, &id, role).await;
    }
    (id, created["clientSecret"].as_str().unwrap().to_owned())
}

async fn assign(server: &TestServer, admin: &str, principal: &str, role: &str) -> Value {
    let r = server
        .admin_call(Method::POST, "/admin/roleassignments", admin)
        .json(&json!({"principalId": principal, "roleId": role}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

async fn token(server: &TestServer, id: &str, secret: &str) -> String {
    let r = server.token_for(id, secret).await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A request to the token endpoint from `client`.
async fn token_request(
    client: &Client,
    server: &TestServer,
    form: &[(&str, &str)],
) -> reqwest::Response {
    client
        .post(server.url("/oauth2/token"))
        .form(form)
        .send()
        .await
        .unwrap()
}

/// A custom role holding exactly `actions`, and a token of a new application holding it.
async fn holder_of(server: &TestServer, admin: &str, actions: &[&str]) -> (String, String) {
    let role: Value = server
        .admin_json(
            Method::POST,
            "/admin/roles",
            admin,
            Some(&json!({"name": format!("only-{}", uuid_like()), "actions": actions})),
        )
        .await;
    let role = role["id"].as_str().unwrap().to_owned();
    let (id, secret) = application(server, admin, &[&role]).await;
    (id.clone(), token(server, &id, &secret).await)
}

/// A PKCS #10 request and its key, PEM.
pub(crate) fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (csr, key.serialize_pem())
}

/// An HTTPS client presenting `cert` and `key` (PEM) as its client certificate.
fn mtls_client(server: &TestServer, cert: &str, key: &str) -> Client {
    let ca = std::fs::read(server.dir.path().join("tls/ca.pem")).unwrap();
    let identity = reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).unwrap();
    Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(identity)
        .build()
        .unwrap()
}

async fn renew(client: &Client, server: &TestServer, auth: (&str, &str)) -> StatusCode {
    let (header, value) = auth;
    client
        .post(server.url("/me/certificate"))
        .header(header, value)
        .json(&json!({"csr": csr().0}))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn no_credential_obtains_a_certificate_or_other_credential_beyond_what_it_holds() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    // Finding 1: a powerful workload, and a Query Only key for it.
    let (pump, _) = application(&server, &admin, &[SECURITY_ADMIN, DATA_OWNER, QUERY_ONLY]).await;
    let (request, key_pem) = csr();
    let issued: Value = server
        .admin_json(
            Method::POST,
            &format!("/admin/identities/{pump}/certificates"),
            &admin,
            Some(&json!({"csr": request})),
        )
        .await;
    let cert = issued["certificate"].as_str().unwrap().to_owned();
    let key: Value = server
        .admin_json(
            Method::POST,
            "/admin/apikeys",
            &admin,
            Some(&json!({"name": "q", "ownerId": pump, "roleId": QUERY_ONLY, "risk": "low"})),
        )
        .await;
    let api_key = key["apiKey"].as_str().unwrap().to_owned();
    let plain = &server.client;
    let with_cert = mtls_client(&server, &cert, &key_pem);

    // The API key, over plain TLS or with the certificate: no self-service at all.
    for client in [plain, &with_cert] {
        assert_eq!(renew(client, &server, ("x-api-key", &api_key)).await, 403);
    }
    for (method, path, body) in [
        (Method::POST, "/me/mfa/totp", json!({})),
        (
            Method::POST,
            "/me/mfa/totp/confirm",
            json!({"code": "123456"}),
        ),
        (
            Method::PUT,
            "/me/password",
            json!({"currentPassword": "x", "newPassword": "y".repeat(16)}),
        ),
    ] {
        let r = plain
            .request(method, server.url(path))
            .header("x-api-key", &api_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }

    // A workload without the keys permission: a token from its client secret is no
    // certificate and cannot turn itself into one, with or without a certificate at hand.
    // (The pump itself holds Security Admin, whose keys permission may certify identities it
    // covers, itself included: that is administration, not self-service.)
    let (valve, valve_secret) = application(&server, &admin, &[DATA_OWNER]).await;
    let (request, valve_key) = csr();
    let issued: Value = server
        .admin_json(
            Method::POST,
            &format!("/admin/identities/{valve}/certificates"),
            &admin,
            Some(&json!({"csr": request})),
        )
        .await;
    let valve_cert = mtls_client(&server, issued["certificate"].as_str().unwrap(), &valve_key);
    let by_secret = token(&server, &valve, &valve_secret).await;
    let bearer = format!("Bearer {by_secret}");
    for client in [plain, &valve_cert] {
        assert_eq!(
            renew(client, &server, ("authorization", &bearer)).await,
            403
        );
    }

    // A token the certificate got renews it only where the certificate is presented: a stolen
    // copy of the token alone cannot.
    let by_cert: Value = token_request(
        &valve_cert,
        &server,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", valve.as_str()),
        ],
    )
    .await
    .json()
    .await
    .unwrap();
    let bearer = format!("Bearer {}", by_cert["access_token"].as_str().unwrap());
    assert_eq!(renew(plain, &server, ("authorization", &bearer)).await, 403);
    assert_eq!(
        renew(&valve_cert, &server, ("authorization", &bearer)).await,
        201
    );
    // The pump's certificate is another workload's: it does not prove the valve's binding.
    assert_eq!(
        renew(&with_cert, &server, ("authorization", &bearer)).await,
        403
    );

    // A token from a private_key_jwt assertion is no certificate either, even on a request
    // that presents the valve's certificate, and a workload has no password to change.
    let signer = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "valve-1",
        "x": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signer.public_key_raw())});
    let registered = server
        .admin_call(
            Method::PUT,
            &format!("/admin/identities/{valve}/keys"),
            &admin,
        )
        .json(&json!({"keys": [jwk]}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 204);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": valve, "sub": valve, "aud": server.url("/oauth2/token"),
        "iat": now, "exp": now + 60, "jti": uuid_like()});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("valve-1".into());
    let key = jsonwebtoken::EncodingKey::from_ed_der(&signer.serialize_der());
    let assertion = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let by_assertion: Value = token_request(
        plain,
        &server,
        &[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ],
    )
    .await
    .json()
    .await
    .unwrap();
    let by_assertion = by_assertion["access_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {by_assertion}");
    for client in [plain, &valve_cert] {
        assert_eq!(
            renew(client, &server, ("authorization", &bearer)).await,
            403
        );
    }
    let password = plain
        .put(server.url("/me/password"))
        .bearer_auth(&by_assertion)
        .json(&json!({"currentPassword": "x".repeat(12), "newPassword": "y".repeat(16)}))
        .send()
        .await
        .unwrap();
    assert!(password.status().is_client_error() && password.status() != 429);

    // The refresh-token grant continues a person's session with the grants they hold now,
    // never more: a refreshed token of a Data Reader still cannot write.
    let reader = create_user(&server, &admin, &[DATA_READER]).await;
    let first: Value = login(&server, &reader.name, PASSWORD, None)
        .await
        .json()
        .await
        .unwrap();
    let refreshed: Value = token_request(
        plain,
        &server,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", first["refresh_token"].as_str().unwrap()),
        ],
    )
    .await
    .json()
    .await
    .unwrap();
    let refreshed = refreshed["access_token"].as_str().unwrap();
    let write = server
        .call_json(
            Method::PUT,
            "/digitaltwins/t1",
            refreshed,
            &json!({"$metadata": {"$model": "dtmi:x:y;1"}}),
        )
        .await;
    assert_eq!(write.status(), 403);
    // A person has no certificate to renew, and no keys permission to be issued one.
    let person = format!("Bearer {refreshed}");
    assert_eq!(renew(plain, &server, ("authorization", &person)).await, 403);
}

#[tokio::test]
async fn a_password_thief_cannot_enrol_a_second_factor_for_a_privileged_person() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    // Finding 2: a privileged person who has not enrolled yet.
    let victim = create_user(&server, &admin, &[DATA_OWNER, SECURITY_ADMIN]).await;
    let stolen: Value = login(&server, &victim.name, PASSWORD, None)
        .await
        .json()
        .await
        .unwrap();
    let stolen = stolen["access_token"].as_str().unwrap();
    for body in [None, Some(json!({"enrolmentCode": "guessed-code"}))] {
        let mut r = server.admin_call(Method::POST, "/me/mfa/totp", stolen);
        if let Some(body) = body {
            r = r.json(&body);
        }
        let (status, code) = error_code(r.send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (400, "InvalidArgument"));
    }
    // The identity still has no second factor: the thief enrolled nothing.
    let me: Value = server
        .admin_json(
            Method::GET,
            &format!("/admin/identities/{}", victim.id),
            &admin,
            None,
        )
        .await;
    assert_eq!(me["mfaEnrolled"], false);

    // A person without privileged roles still enrols with the password alone.
    let reader = create_user(&server, &admin, &[DATA_READER]).await;
    let token: Value = login(&server, &reader.name, PASSWORD, None)
        .await
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap();
    let enrolment: Value = server
        .admin_json(Method::POST, "/me/mfa/totp", token, None)
        .await;
    let secret = enrolment["secret"].as_str().unwrap();
    let confirmed: Value = server
        .admin_json(
            Method::POST,
            "/me/mfa/totp/confirm",
            token,
            Some(&json!({"code": code_at(secret, 0)})),
        )
        .await;
    assert_eq!(confirmed["recoveryCodes"].as_array().unwrap().len(), 10);
}

async fn revoke(server: &TestServer, token: &str) {
    let r = server
        .client
        .post(server.url("/oauth2/revoke"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn refresh_status(server: &TestServer, refresh: &str) -> u16 {
    token_request(
        &server.client,
        server,
        &[("grant_type", "refresh_token"), ("refresh_token", refresh)],
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test]
async fn a_reset_or_a_revoked_family_ends_every_session_of_it_at_once() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let person = create_user(&server, &admin, &[DATA_READER]).await;
    let session = |password: &'static str| {
        let server = &server;
        let name = person.name.clone();
        async move {
            let body: Value = login(server, &name, password, None)
                .await
                .json()
                .await
                .unwrap();
            (
                body["access_token"].as_str().unwrap().to_owned(),
                body["refresh_token"].as_str().unwrap().to_owned(),
            )
        }
    };
    let reads = |token: String| {
        let server = &server;
        async move {
            server
                .call(Method::GET, "/models", &token)
                .await
                .status()
                .as_u16()
        }
    };

    // Finding 3: an administrator resets the password; the session in the thief's hands ends.
    let (access, refresh) = session(PASSWORD).await;
    assert_eq!(reads(access.clone()).await, 200);
    let new_password = "another long passphrase";
    let r = server
        .admin_call(
            Method::PUT,
            &format!("/admin/identities/{}/password", person.id),
            &admin,
        )
        .json(&json!({"password": new_password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(reads(access).await, 401);
    assert_eq!(refresh_status(&server, &refresh).await, 400);

    // A reset of the second factor does the same.
    let (access, refresh) = session(new_password).await;
    assert_eq!(reads(access.clone()).await, 200);
    let r = server
        .admin_call(
            Method::DELETE,
            &format!("/admin/identities/{}/mfa", person.id),
            &admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(reads(access).await, 401);
    assert_eq!(refresh_status(&server, &refresh).await, 400);

    // Revoking a refresh family ends the access tokens issued from it, not only the family.
    let (access, refresh) = session(new_password).await;
    let (other, _) = session(new_password).await;
    revoke(&server, &refresh).await;
    assert_eq!(reads(access).await, 401);
    assert_eq!(reads(other).await, 200, "another login's session lives on");
}

async fn failing_login(client: &Client, server: &TestServer, name: &str) -> u16 {
    token_request(
        client,
        server,
        &[
            ("grant_type", "password"),
            ("username", name),
            ("password", "not the password"),
        ],
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test]
async fn a_success_never_wipes_the_failures_of_its_address() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let (own, own_secret) = application(&server, &admin, &[]).await;
    let victims = [
        create_user(&server, &admin, &[]).await,
        create_user(&server, &admin, &[]).await,
        create_user(&server, &admin, &[]).await,
    ];
    // Finding 4: 70 failures over three accounts from one address, with the attacker's own
    // role-less workload logging in after every fourth failure.
    let attacker = https_client(server.dir.path(), Some(IpAddr::from([127, 0, 0, 9])));
    let mut statuses = Vec::new();
    for i in 0..70 {
        statuses.push(failing_login(&attacker, &server, &victims[i % 3].name).await);
        if i % 4 == 3 {
            token_request(
                &attacker,
                &server,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", own.as_str()),
                    ("client_secret", own_secret.as_str()),
                ],
            )
            .await;
        }
    }
    // Before the fix no attempt drew a 429. Now the sixth failure waits; afterwards only an
    // attempt made after a wait has run out is checked at all, and each wait doubles (1, 2,
    // 4 s...), so however slowly this loop runs here, few more are checked.
    let first_429 = statuses.iter().position(|s| *s == 429);
    assert_eq!(first_429, Some(5), "{statuses:?}");
    assert!(
        statuses.iter().filter(|s| **s == 400).count() <= 8,
        "{statuses:?}"
    );
    // The owner of one of the accounts still gets in at once from elsewhere.
    assert_eq!(
        login(&server, &victims[0].name, PASSWORD, None)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn one_throttle_holds_across_every_secret_check() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let (app, app_secret) = application(&server, &admin, &[DATA_READER]).await;
    let person = create_user(&server, &admin, &[]).await;
    let key: Value = server
        .admin_json(
            Method::POST,
            "/admin/apikeys",
            &admin,
            Some(&json!({"name": "k", "ownerId": app, "roleId": DATA_READER, "risk": "low"})),
        )
        .await;
    let api_key = key["apiKey"].as_str().unwrap().to_owned();
    let from = https_client(server.dir.path(), Some(IpAddr::from([127, 0, 0, 11])));
    let session: Value = from
        .post(server.url("/oauth2/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", person.name.as_str()),
            ("password", PASSWORD),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = session["access_token"].as_str().unwrap().to_owned();
    let begun = from
        .post(server.url("/me/mfa/totp"))
        .bearer_auth(&session)
        .send()
        .await
        .unwrap();
    assert_eq!(begun.status(), 200);

    // One wrong guess at each kind of secret, each followed by a success of the same kind: no
    // single check sees more than one failure, and every success clears nothing.
    let wrong_key = format!("{}_{}", key["key"]["id"].as_str().unwrap(), "A".repeat(43));
    let guesses: Vec<(&str, reqwest::RequestBuilder, reqwest::RequestBuilder)> = vec![
        (
            "password at login",
            from.post(server.url("/oauth2/token")).form(&[
                ("grant_type", "password"),
                ("username", person.name.as_str()),
                ("password", "wrong guess at it"),
            ]),
            from.get(server.url("/me")).bearer_auth(&session),
        ),
        (
            "current password at change",
            from.put(server.url("/me/password"))
                .bearer_auth(&session)
                .json(
                    &json!({"currentPassword": "wrong guess at it", "newPassword": "n".repeat(16)}),
                ),
            from.get(server.url("/me")).bearer_auth(&session),
        ),
        (
            "client secret",
            from.post(server.url("/oauth2/token")).form(&[
                ("grant_type", "client_credentials"),
                ("client_id", app.as_str()),
                ("client_secret", "wrong"),
            ]),
            from.post(server.url("/oauth2/token")).form(&[
                ("grant_type", "client_credentials"),
                ("client_id", app.as_str()),
                ("client_secret", app_secret.as_str()),
            ]),
        ),
        (
            "API key",
            from.get(server.url("/me")).header("x-api-key", &wrong_key),
            from.get(server.url("/me")).header("x-api-key", &api_key),
        ),
        (
            "TOTP code at enrolment",
            from.post(server.url("/me/mfa/totp/confirm"))
                .bearer_auth(&session)
                .json(&json!({"code": "000000"})),
            from.get(server.url("/me")).bearer_auth(&session),
        ),
    ];
    for (what, guess, success) in guesses {
        let status = guess.send().await.unwrap().status();
        assert!(
            status.is_client_error() && status != 429,
            "{what}: {status}"
        );
        assert!(
            success.send().await.unwrap().status().is_success(),
            "{what}"
        );
    }
    // Five failures in all: the address now waits, whichever secret it tries next, and even
    // the right one is not checked.
    let next = from
        .post(server.url("/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", app.as_str()),
            ("client_secret", app_secret.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 429);
    assert!(next.headers().contains_key("retry-after"));
    let next = from
        .get(server.url("/me"))
        .header("x-api-key", &api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 429);
    assert!(next.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn guessing_the_current_password_backs_off_and_a_right_guess_then_changes_nothing() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let person = create_user(&server, &admin, &[DATA_READER]).await;
    let body: Value = login(&server, &person.name, PASSWORD, None)
        .await
        .json()
        .await
        .unwrap();
    // Finding 6: a leaked 15-minute token guesses the password at /me/password.
    let leaked = body["access_token"].as_str().unwrap().to_owned();
    let attacker = https_client(server.dir.path(), Some(IpAddr::from([127, 0, 0, 12])));
    let change = |current: String| {
        let (attacker, server, leaked) = (&attacker, &server, leaked.clone());
        async move {
            attacker
                .put(server.url("/me/password"))
                .bearer_auth(leaked)
                .json(&json!({"currentPassword": current, "newPassword": "the attacker's own password"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Before the fix, 30 wrong guesses drew no 429. Now the sixth is refused unchecked, and so
    // is the right guess straight after it (the wait is at least a second from the fifth).
    let mut statuses = Vec::new();
    for i in 0..30 {
        let status = change(format!("guess number {i:02}")).await;
        statuses.push(status);
        if status == 429 {
            break;
        }
    }
    assert_eq!(statuses, [400, 400, 400, 400, 400, 429]);
    assert_eq!(change(PASSWORD.to_owned()).await, 429);
    // The password did not change: the owner logs in with it from elsewhere.
    assert_eq!(
        login(&server, &person.name, PASSWORD, None).await.status(),
        200
    );
}

#[tokio::test]
async fn the_audit_trail_cannot_confirm_a_guessed_account_name() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let victim = create_user(&server, &admin, &[DATA_READER]).await;
    assert_eq!(
        login(&server, &victim.name, PASSWORD, None).await.status(),
        200
    );
    // Finding 15: guesses at account names, most of them throttled; one is the victim's.
    let attacker = https_client(server.dir.path(), Some(IpAddr::from([127, 0, 0, 13])));
    let mut guesses = Vec::new();
    for i in 0..12 {
        let name = if i % 4 == 2 {
            victim.name.clone()
        } else {
            format!("guess-{i}")
        };
        let r = token_request(
            &attacker,
            &server,
            &[
                ("grant_type", "password"),
                ("username", name.as_str()),
                ("password", "wrong password 1"),
            ],
        )
        .await;
        let id = r.headers()["x-ms-request-id"].to_str().unwrap().to_owned();
        guesses.push((name == victim.name, r.status().as_u16(), id));
    }
    assert!(guesses.iter().any(|(_, s, _)| *s == 429));
    let auditor = server.admin_token().await;
    let size = server.state.audit.log().head().size;
    let mut entries = Vec::new();
    for i in 0..size {
        let r: Value = server
            .admin_json(Method::GET, &format!("/audit/entries/{i}"), &auditor, None)
            .await;
        entries.push(r["entry"].clone());
    }
    let digest = server.state.audit.digest(&victim.name);
    // Each failed or throttled guess is recorded alike, whichever name it tried: with what
    // differs per request taken out, a guess at the victim's name reads exactly as any other.
    let normalised = |cid: &str| {
        let mut e = entries
            .iter()
            .find(|e| e["correlationId"] == cid && e["kind"] == "request")
            .cloned()
            .unwrap();
        let text = e.to_string();
        assert!(
            !text.contains(&victim.name) && !text.contains(&victim.id) && !text.contains(&digest),
            "{text}"
        );
        for volatile in ["time", "correlationId", "seq"] {
            e.as_object_mut().unwrap().remove(volatile);
        }
        e
    };
    for status in [400, 429] {
        let kinds: Vec<(bool, Value)> = guesses
            .iter()
            .filter(|(_, s, _)| *s == status)
            .map(|(is_victim, _, cid)| (*is_victim, normalised(cid)))
            .collect();
        assert!(
            kinds.iter().any(|(v, _)| *v) && kinds.iter().any(|(v, _)| !*v),
            "{status}: {kinds:?}"
        );
        assert!(
            kinds.windows(2).all(|w| w[0].1 == w[1].1),
            "{status}: {kinds:?}"
        );
    }
}

#[tokio::test]
async fn each_administrative_permission_alone_yields_nothing_beyond_itself() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let (root, _) = server.admin_credentials();
    let (_, keys_only) = holder_of(&server, &admin, &["twinguard/keys/write"]).await;
    let (identities_id, identities_only) =
        holder_of(&server, &admin, &["twinguard/identities/write"]).await;
    let (roles_id, roles_only) = holder_of(&server, &admin, &["twinguard/roles/write"]).await;
    let powerful = create_user(&server, &admin, &[DATA_OWNER]).await;
    let (bare, _) = application(&server, &admin, &[]).await;
    let bare_person = create_user(&server, &admin, &[]).await;
    let admins: Value = server
        .admin_json(
            Method::POST,
            "/admin/identities",
            &admin,
            Some(&json!({"kind": "group", "name": format!("admins-{}", uuid_like())})),
        )
        .await;
    let admins = admins["identity"]["id"].as_str().unwrap().to_owned();
    assign(&server, &admin, &admins, SECURITY_ADMIN).await;
    let root_assignments: Value = server
        .admin_json(
            Method::GET,
            &format!("/admin/roleassignments?principalId={root}"),
            &admin,
            None,
        )
        .await;
    let root_admin_role = root_assignments["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["roleId"] == SECURITY_ADMIN)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Finding 14, acted out: (actor, method, path, body, the status a bounded actor gets).
    let attempts: Vec<(&str, &str, Method, String, Value, u16)> = vec![
        (
            "keys",
            &keys_only,
            Method::POST,
            format!("/admin/identities/{root}/secret"),
            json!(null),
            403,
        ),
        (
            "keys",
            &keys_only,
            Method::PUT,
            format!("/admin/identities/{root}/keys"),
            json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "k"}]}),
            403,
        ),
        (
            "keys",
            &keys_only,
            Method::POST,
            format!("/admin/identities/{root}/certificates"),
            json!({"csr": csr().0}),
            403,
        ),
        (
            "keys",
            &keys_only,
            Method::POST,
            "/admin/apikeys".into(),
            json!({"name": "x", "ownerId": root, "roleId": DATA_OWNER, "risk": "low"}),
            403,
        ),
        (
            "identities",
            &identities_only,
            Method::PATCH,
            format!("/admin/identities/{identities_id}"),
            json!({"groups": [admins]}),
            403,
        ),
        (
            "identities",
            &identities_only,
            Method::PUT,
            format!("/admin/identities/{}/password", powerful.id),
            json!({"password": "taken over by the attacker"}),
            403,
        ),
        (
            "identities",
            &identities_only,
            Method::POST,
            format!("/admin/identities/{}/mfa/enrolmentcode", powerful.id),
            json!(null),
            403,
        ),
        (
            "identities",
            &identities_only,
            Method::PATCH,
            format!("/admin/identities/{root}"),
            json!({"disabled": true}),
            403,
        ),
        (
            "identities",
            &identities_only,
            Method::DELETE,
            format!("/admin/identities/{root}"),
            json!(null),
            403,
        ),
        (
            "roles",
            &roles_only,
            Method::POST,
            "/admin/roleassignments".into(),
            json!({"principalId": roles_id, "roleId": DATA_OWNER}),
            403,
        ),
        (
            "roles",
            &roles_only,
            Method::DELETE,
            format!("/admin/roleassignments/{root_admin_role}"),
            json!(null),
            403,
        ),
        // Within its bounds each permission still works.
        (
            "keys",
            &keys_only,
            Method::POST,
            format!("/admin/identities/{bare}/secret"),
            json!(null),
            200,
        ),
        (
            "identities",
            &identities_only,
            Method::PUT,
            format!("/admin/identities/{}/password", bare_person.id),
            json!({"password": "a fresh long password"}),
            204,
        ),
    ];
    for (permission, actor, method, path, body, expected) in attempts {
        let mut r = server.admin_call(method.clone(), &path, actor);
        if !body.is_null() {
            r = r.json(&body);
        }
        let status = r.send().await.unwrap().status().as_u16();
        assert_eq!(status, expected, "{permission}: {method} {path}");
    }
    // Nothing changed for the first administrator.
    assert_eq!(
        server
            .call(Method::GET, "/models", &server.admin_token().await)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn keys_obey_their_owner_and_are_rotated_once() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    // Finding 5: a key owned by a person would carry change actions without MFA.
    let person = create_user(&server, &admin, &[DATA_OWNER, DATA_READER]).await;
    let create = |role: &str| {
        let (server, admin, owner) = (&server, &admin, person.id.clone());
        let role = role.to_owned();
        async move {
            server
                .admin_call(Method::POST, "/admin/apikeys", admin)
                .json(&json!({"name": "k", "ownerId": owner, "roleId": role, "risk": "low"}))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(create(DATA_OWNER).await.status(), 400);
    let reader = create(DATA_READER).await;
    assert_eq!(reader.status(), 201);
    let reader: Value = reader.json().await.unwrap();
    let id = reader["key"]["id"].as_str().unwrap().to_owned();
    let r = server
        .client
        .get(server.url("/models?api-version=2023-10-31"))
        .header("x-api-key", reader["apiKey"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Finding 17: a key that was replaced cannot be rotated again into a second live successor.
    let rotate = |id: String| {
        let (server, admin) = (&server, &admin);
        async move {
            server
                .admin_call(Method::POST, &format!("/admin/apikeys/{id}/rotate"), admin)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(rotate(id.clone()).await, 201);
    assert_eq!(rotate(id.clone()).await, 409);
    let keys: Value = server
        .admin_json(Method::GET, "/admin/apikeys", &admin, None)
        .await;
    let live = keys["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| {
            k["ownerId"] == person.id.as_str() && k["replacedBy"].is_null() && k["revoked"] == false
        })
        .count();
    assert_eq!(live, 1);
}
