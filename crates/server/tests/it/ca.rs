//! The instance's CA rotates while the server serves (`crate::ca` in twinguard-server): add,
//! rotate and retire, seen through fresh TLS handshakes of clients that trust one bundle or
//! another, and of workloads presenting certificates of either authority.

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use twinguard_core::auth::DATA_OWNER;

use crate::attacks::{application, csr};
use crate::kit::{TestServer, shared_store};

/// A client that trusts exactly the authorities in `bundle`, presents `identity` (certificate
/// and key, PEM) if given, and makes a new connection, hence a new handshake, for every request.
fn fresh(bundle: &str, identity: Option<(&str, &str)>) -> Client {
    let mut builder = Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(0);
    for root in reqwest::Certificate::from_pem_bundle(bundle.as_bytes()).unwrap() {
        builder = builder.add_root_certificate(root);
    }
    if let Some((cert, key)) = identity {
        builder = builder
            .identity(reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// Whether `client` completes a request to `server` at all (any status).
async fn connects(client: &Client, server: &TestServer) -> bool {
    client.get(server.url("/healthz")).send().await.is_ok()
}

/// The status of a client-credentials token request from a workload that authenticates with
/// its certificate alone; `None` when the connection fails.
async fn token_by_certificate(
    client: &Client,
    server: &TestServer,
    id: &str,
) -> Option<StatusCode> {
    let sent = client
        .post(server.url("/oauth2/token"))
        .form(&[("grant_type", "client_credentials"), ("client_id", id)])
        .send()
        .await;
    sent.ok().map(|r| r.status())
}

/// A workload's new certificate from the admin API: (certificate, key, serial, bundle).
async fn certify(
    server: &TestServer,
    client: &Client,
    admin: &str,
    id: &str,
) -> (String, String, String, String) {
    let (csr, key) = csr();
    let r = client
        .post(server.url(&format!("/admin/identities/{id}/certificates")))
        .bearer_auth(admin)
        .json(&json!({"csr": csr}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let issued: Value = r.json().await.unwrap();
    let text = |k: &str| issued[k].as_str().unwrap().to_owned();
    (
        text("certificate"),
        key,
        text("serial"),
        text("caCertificate"),
    )
}

/// `POST /admin/ca/{step}` through `client`: status and body.
async fn step(
    client: &Client,
    server: &TestServer,
    admin: &str,
    step: &str,
) -> (StatusCode, Value) {
    let r = client
        .post(server.url(&format!("/admin/ca/{step}")))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn states(view: &Value) -> Vec<&str> {
    view["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect()
}

/// Through one running server: `add` changes no handshake and trusts the new authority;
/// `rotate` makes the server present a certificate of the new authority from the next
/// handshake on (a client trusting the old authority alone fails; one trusting the bundle
/// connects) while certificates of the old one still authenticate; `retire` is refused while
/// a live certificate of the old authority is recorded, and once it is revoked removes the
/// old authority: its certificates fail the handshake, the new one's authenticate. Steps out
/// of order and callers without the keys permission are refused.
#[tokio::test]
async fn the_ca_rotates_while_the_server_serves_and_retiring_stops_only_the_old_authoritys_certificates()
 {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let old = std::fs::read_to_string(server.dir.path().join("tls/ca.pem")).unwrap();
    let old_only = fresh(&old, None);
    let (pump, _) = application(&server, &admin, &[]).await;
    let (old_cert, old_key, old_serial, issued_bundle) =
        certify(&server, &old_only, &admin, &pump).await;
    assert_eq!(issued_bundle.trim(), old.trim());
    let with_old_cert = |bundle: &str| fresh(bundle, Some((&old_cert, &old_key)));
    assert_eq!(
        token_by_certificate(&with_old_cert(&old), &server, &pump).await,
        Some(StatusCode::OK)
    );

    // Out of order, or without the permission: refused, and nothing changes.
    assert_eq!(
        step(&old_only, &server, &admin, "rotate").await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        step(&old_only, &server, &admin, "retire").await.0,
        StatusCode::CONFLICT
    );
    let owner = server.token_with_role(DATA_OWNER).await;
    for name in ["add", "rotate", "retire"] {
        assert_eq!(
            step(&old_only, &server, &owner, name).await.0,
            StatusCode::FORBIDDEN
        );
    }

    // Add: trusted at once, issuing nothing; the server still presents its old certificate.
    let (status, added) = step(&old_only, &server, &admin, "add").await;
    assert_eq!(status, StatusCode::OK, "{added}");
    assert_eq!(states(&added), ["issuing", "next"]);
    assert_eq!(
        step(&old_only, &server, &admin, "add").await.0,
        StatusCode::CONFLICT
    );
    let bundle = added["bundle"].as_str().unwrap().to_owned();
    let new = added["authorities"][1]["certificate"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        std::fs::read_to_string(server.dir.path().join("tls/ca.pem")).unwrap(),
        bundle
    );
    assert!(connects(&old_only, &server).await);
    assert!(!connects(&fresh(&new, None), &server).await);

    // Rotate: the next handshake presents a certificate of the new authority.
    let (status, rotated) = step(&old_only, &server, &admin, "rotate").await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(states(&rotated), ["retiring", "issuing"]);
    assert!(
        !connects(&old_only, &server).await,
        "still the old authority's certificate"
    );
    // A connection opened before the rotation goes on: the kit's client, which trusts the old
    // authority alone, still has the one it opened then in its pool.
    let through_open: Value = server
        .admin_json(Method::GET, "/admin/ca", &admin, None)
        .await;
    assert_eq!(through_open, rotated);
    assert!(connects(&fresh(&new, None), &server).await);
    let everyone = fresh(&bundle, None);
    let shown: Value = everyone
        .get(server.url("/admin/ca"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown, rotated);
    // The old authority's certificate still authenticates; new ones come from the new authority.
    assert_eq!(
        token_by_certificate(&with_old_cert(&bundle), &server, &pump).await,
        Some(StatusCode::OK)
    );
    let (new_cert, new_key, _, issued_bundle) = certify(&server, &everyone, &admin, &pump).await;
    assert_eq!(issued_bundle, bundle);
    let with_new_cert = fresh(&bundle, Some((&new_cert, &new_key)));
    assert_eq!(
        token_by_certificate(&with_new_cert, &server, &pump).await,
        Some(StatusCode::OK)
    );

    // Retire: refused while the old certificate lives; forced or after its revocation, done.
    let (status, refused) = step(&everyone, &server, &admin, "retire").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("1 live client"),
        "{refused}"
    );
    let revoked = everyone
        .delete(server.url(&format!(
            "/admin/identities/{pump}/certificates/{old_serial}"
        )))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let (status, retired) = step(&everyone, &server, &admin, "retire").await;
    assert_eq!(status, StatusCode::OK, "{retired}");
    assert_eq!(states(&retired), ["issuing"]);
    assert_eq!(retired["bundle"].as_str().unwrap().trim(), new.trim());
    assert_eq!(
        std::fs::read_to_string(server.dir.path().join("tls/ca.pem"))
            .unwrap()
            .trim(),
        new.trim()
    );
    // The old authority's certificate no longer completes a handshake; the new one's does.
    assert_eq!(
        token_by_certificate(&with_old_cert(&bundle), &server, &pump).await,
        None
    );
    assert_eq!(
        token_by_certificate(&with_new_cert, &server, &pump).await,
        Some(StatusCode::OK)
    );
}

/// A forced retirement goes through live certificates of the old authority, which then fail
/// their handshake: the operator's explicit choice, and the only way past the count.
#[tokio::test]
async fn a_forced_retirement_stops_the_old_authoritys_live_certificates() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let old = std::fs::read_to_string(server.dir.path().join("tls/ca.pem")).unwrap();
    let old_only = fresh(&old, None);
    let (pump, _) = application(&server, &admin, &[]).await;
    let (cert, key, _, _) = certify(&server, &old_only, &admin, &pump).await;
    let (_, added) = step(&old_only, &server, &admin, "add").await;
    let bundle = added["bundle"].as_str().unwrap().to_owned();
    let everyone = fresh(&bundle, None);
    assert_eq!(
        step(&everyone, &server, &admin, "rotate").await.0,
        StatusCode::OK
    );
    assert_eq!(
        step(&everyone, &server, &admin, "retire").await.0,
        StatusCode::CONFLICT
    );
    let with_cert = fresh(&bundle, Some((&cert, &key)));
    assert_eq!(
        token_by_certificate(&with_cert, &server, &pump).await,
        Some(StatusCode::OK)
    );
    let forced = everyone
        .post(server.url("/admin/ca/retire?force=true"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(forced.status(), StatusCode::OK);
    assert_eq!(token_by_certificate(&with_cert, &server, &pump).await, None);
}

/// On a shared store, a rotation on node A reaches node B without a restart: B presents a
/// certificate of the new authority from a handshake within 2 s of A's answer (the change
/// follower's step is 100 ms), and after the retirement on A, B refuses the old authority's
/// client certificates too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_node_reaches_the_other_without_a_restart() {
    let Some((_db, store)) = shared_store() else {
        return;
    };
    let (a, b) = TestServer::two_nodes(|c| c.store = store.clone()).await;
    let admin = a.admin_token().await;
    let old = std::fs::read_to_string(a.dir.path().join("tls/ca.pem")).unwrap();
    assert_eq!(
        std::fs::read_to_string(b.dir.path().join("tls/ca.pem")).unwrap(),
        old
    );
    let old_only = fresh(&old, None);
    let (pump, _) = application(&a, &admin, &[]).await;
    let (cert, key, serial, _) = certify(&a, &old_only, &admin, &pump).await;

    let (_, added) = step(&old_only, &a, &admin, "add").await;
    let bundle = added["bundle"].as_str().unwrap().to_owned();
    let new = added["authorities"][1]["certificate"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = step(&fresh(&bundle, None), &a, &admin, "rotate").await;
    assert_eq!(status, StatusCode::OK);
    let new_only = fresh(&new, None);
    assert!(
        within_2s(|| connects(&new_only, &b)).await,
        "B still presents the old authority's certificate"
    );
    assert!(!connects(&old_only, &b).await);
    let with_cert = fresh(&bundle, Some((&cert, &key)));
    assert_eq!(
        token_by_certificate(&with_cert, &b, &pump).await,
        Some(StatusCode::OK)
    );

    let everyone = fresh(&bundle, None);
    let revoked = everyone
        .delete(a.url(&format!("/admin/identities/{pump}/certificates/{serial}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        step(&everyone, &a, &admin, "retire").await.0,
        StatusCode::OK
    );
    let (new_cert, new_key, _, _) = certify(&a, &everyone, &admin, &pump).await;
    let with_new_cert = fresh(&new, Some((&new_cert, &new_key)));
    assert!(
        within_2s(|| async { token_by_certificate(&with_cert, &b, &pump).await.is_none() }).await,
        "B still trusts the retired authority"
    );
    assert!(
        within_2s(|| async {
            token_by_certificate(&with_new_cert, &b, &pump).await == Some(StatusCode::OK)
        })
        .await
    );
}

/// Whether `check` holds within two seconds, tried every 50 ms.
async fn within_2s<F: std::future::Future<Output = bool>>(check: impl Fn() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
