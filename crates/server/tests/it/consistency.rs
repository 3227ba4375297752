//! What a client of several nodes relies on, through HTTPS (`crate::http::consistency`): a
//! successful write's answer names its position, sealed; a request presenting a position is
//! answered only once the node has applied it, and one presenting anything else is refused. On
//! the embedded store (one writer, always current) there are no positions and a presented one
//! never waits; the PostgreSQL run of this suite (`TWINGUARD_TEST_STORE=postgresql`) checks the
//! positions themselves.

use reqwest::Method;
use serde_json::json;

use crate::kit::TestServer;

#[tokio::test]
async fn a_write_names_its_position_and_a_request_presenting_one_waits_for_it() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let model =
        json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:t:Pos;1", "@type": "Interface"});
    let uploaded = server
        .call_json(Method::POST, "/models", &admin, &json!([model]))
        .await;
    assert_eq!(uploaded.status(), 201);
    let body = json!({"$metadata": {"$model": "dtmi:t:Pos;1"}});
    let written = server
        .call_json(Method::PUT, "/digitaltwins/pos-1", &admin, &body)
        .await;
    assert_eq!(written.status(), 200);
    let position = written
        .headers()
        .get("twinguard-position")
        .map(|v| v.to_str().unwrap().to_owned());
    let shared = server.database_url().is_some();
    assert_eq!(
        position.is_some(),
        shared,
        "a position exactly on a shared store"
    );
    let seal = server.state.positions.clone();
    if let (Some(seal), Some(token)) = (&seal, &position) {
        // Sealed: it opens, for the node, to a position that holds the write.
        let opened = seal.open(token).unwrap();
        assert!(opened >= 1 && Some(opened) <= server.state.service.position());
        assert!(token.parse::<u64>().is_err(), "the position shows: {token}");
    }

    // Presenting the write's position (or anything well-formed, on the embedded store):
    // answered at once.
    let presented = position.clone().unwrap_or_else(|| "1".into());
    let read = server
        .adt(Method::GET, "/digitaltwins/pos-1", &admin)
        .header("twinguard-min-position", &presented)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    // Reads carry no position.
    assert!(read.headers().get("twinguard-position").is_none());

    // On a shared store, a token that is not one of the instance's (made up, or the plain
    // number) is refused, not ignored.
    for made_up in ["soon", "7", &"0".repeat(32)] {
        let bad = server
            .adt(Method::GET, "/digitaltwins/pos-1", &admin)
            .header("twinguard-min-position", made_up)
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), if shared { 400 } else { 200 }, "{made_up}");
    }

    // A position no node has reached: the shared store's node waits, then says to retry.
    if let Some(seal) = &seal {
        let ahead = seal
            .seal(server.state.service.position().unwrap() + 1_000)
            .unwrap();
        let ahead = server
            .adt(Method::GET, "/digitaltwins/pos-1", &admin)
            .header("twinguard-min-position", ahead)
            .send()
            .await
            .unwrap();
        assert_eq!(ahead.status(), 503);
        assert_eq!(ahead.headers()["retry-after"], "1");
    }

    // Without a valid credential: a position already reached, and one that is not a position,
    // are answered 401 as any unauthenticated request. A sealed position this node has not
    // reached (only a write's answer gives one) is waited for before the credential is judged,
    // since the credential may be one that the position brought: then 503, to retry.
    let ahead = seal
        .as_ref()
        .map(|seal| {
            seal.seal(server.state.service.position().unwrap() + 1_000)
                .unwrap()
        })
        .unwrap_or_else(|| "1".into());
    for (presented, expected) in [
        (ahead, if shared { 503 } else { 401 }),
        (presented, 401),
        ("soon".into(), 401),
    ] {
        for token in ["", "not-a-token"] {
            let anonymous = server
                .adt(Method::GET, "/digitaltwins/pos-1", token)
                .header("twinguard-min-position", &presented)
                .send()
                .await
                .unwrap();
            assert_eq!(anonymous.status(), expected, "{token:?} with {presented}");
        }
    }

    // A refused write names no position (the same answer whatever else the store holds).
    let missing = json!({"$metadata": {"$model": "dtmi:t:Missing;1"}});
    let refused = server
        .call_json(Method::PUT, "/digitaltwins/pos-2", &admin, &missing)
        .await;
    assert_eq!(refused.status(), 400);
    assert!(refused.headers().get("twinguard-position").is_none());
}

/// The security records behind the token and administration endpoints are followed from the
/// store by each node's owners (identities, role assignments, revocations), about one follow
/// interval after another node wrote them. A client that presents the position of its write is
/// answered on the other node as if there were one node: a client created on A gets a token on
/// B, a token issued on A (with its refresh family) is honoured on B, a role assigned on A
/// grants on B, and a revocation or a disabled identity on A is refused on B, each at once, in
/// every round. Before, the administration and token routes ignored the position; waiting for
/// the graph alone would not do (the owners follow apart from it), nor would judging the
/// credential before the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_writes_on_one_node_hold_at_once_on_another_for_a_client_presenting_the_position()
{
    use crate::identity::PASSWORD;
    use twinguard_core::auth::DATA_READER;
    let Some((_db, store)) = crate::kit::shared_store() else {
        return;
    };
    let (a, b) = TestServer::two_nodes(|c| c.store = store.clone()).await;
    let admin = a.admin_token().await;
    let mut client = Following::default();
    for round in 0..10 {
        let created = client
            .write(
                a.admin_call(Method::POST, "/admin/identities", &admin)
                    .json(&json!({"kind": "application", "name": format!("app-{round}")})),
            )
            .await;
        assert_eq!(created.status(), 201);
        let created: serde_json::Value = created.json().await.unwrap();
        let (id, secret) = (
            created["identity"]["id"].as_str().unwrap().to_owned(),
            created["clientSecret"].as_str().unwrap().to_owned(),
        );
        let issued = client
            .write(client_credentials(&b, &b.client, &id, &secret))
            .await;
        assert_eq!(issued.status(), 200, "round {round}: the new client on B");
        let issued: serde_json::Value = issued.json().await.unwrap();
        let token = issued["access_token"].as_str().unwrap().to_owned();

        let assigned = client
            .write(
                a.admin_call(Method::POST, "/admin/roleassignments", &admin)
                    .json(&json!({"principalId": id, "roleId": DATA_READER})),
            )
            .await;
        assert_eq!(assigned.status(), 201);
        let read = client.read(b.adt(Method::GET, "/models", &token)).await;
        assert_eq!(read, 200, "round {round}: the role assigned on A, on B");

        // A person's token, whose refresh family is made on A, honoured on B.
        let name = format!("erin-{round}");
        let person = client
            .write(
                a.admin_call(Method::POST, "/admin/identities", &admin)
                    .json(&json!({"kind": "user", "name": name, "password": PASSWORD})),
            )
            .await;
        assert_eq!(person.status(), 201);
        let person: serde_json::Value = person.json().await.unwrap();
        let assigned = client
            .write(
                a.admin_call(Method::POST, "/admin/roleassignments", &admin)
                    .json(&json!({"principalId": person["identity"]["id"], "roleId": DATA_READER})),
            )
            .await;
        assert_eq!(assigned.status(), 201);
        let login = client
            .write(a.client.post(a.url("/oauth2/token")).form(&[
                ("grant_type", "password"),
                ("username", &name),
                ("password", PASSWORD),
            ]))
            .await;
        assert_eq!(login.status(), 200);
        let login: serde_json::Value = login.json().await.unwrap();
        assert!(login["refresh_token"].is_string());
        let access = login["access_token"].as_str().unwrap();
        let read = client.read(b.adt(Method::GET, "/models", access)).await;
        assert_eq!(read, 200, "round {round}: a login on A, on B");

        let revoked = client
            .write(
                a.client
                    .post(a.url("/oauth2/revoke"))
                    .form(&[("token", token.as_str())]),
            )
            .await;
        assert_eq!(revoked.status(), 200);
        let refused = client.read(b.adt(Method::GET, "/models", &token)).await;
        assert_eq!(refused, 401, "round {round}: revoked on A, on B");

        let fresh = b.token_for(&id, &secret).await;
        assert_eq!(fresh.status(), 200);
        let fresh: serde_json::Value = fresh.json().await.unwrap();
        let fresh = fresh["access_token"].as_str().unwrap().to_owned();
        let disabled = client
            .write(
                a.admin_call(Method::PATCH, &format!("/admin/identities/{id}"), &admin)
                    .json(&json!({"disabled": true})),
            )
            .await;
        assert_eq!(disabled.status(), 200);
        let refused = client.read(b.adt(Method::GET, "/models", &fresh)).await;
        assert_eq!(refused, 401, "round {round}: disabled on A, on B");
        // A refused secret counts against its address: each round's from one of its own.
        let elsewhere = format!("127.0.3.{}", round + 1).parse().ok();
        let from_elsewhere = crate::kit::https_client(b.dir.path(), elsewhere);
        let refused = client
            .read(client_credentials(&b, &from_elsewhere, &id, &secret))
            .await;
        assert_eq!(refused, 401, "round {round}: disabled on A, on B");
    }
}

/// A client as `docs/consistency.md` describes it: every request presents the position of its
/// last write.
#[derive(Default)]
struct Following {
    at: Option<String>,
}

impl Following {
    /// Sends a write; its answer, if a success, must name a position, which later requests
    /// present.
    async fn write(&mut self, request: reqwest::RequestBuilder) -> reqwest::Response {
        let response = self.present(request).send().await.unwrap();
        if response.status().is_success() {
            let named = response
                .headers()
                .get("twinguard-position")
                .expect("a write names its position");
            self.at = Some(named.to_str().unwrap().to_owned());
        }
        response
    }

    /// Sends a request that changes nothing; its status.
    async fn read(&mut self, request: reqwest::RequestBuilder) -> u16 {
        let response = self.present(request).send().await.unwrap();
        response.status().as_u16()
    }

    fn present(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.at {
            Some(at) => request.header("twinguard-min-position", at),
            None => request,
        }
    }
}

/// A client-credentials token request to `server`, sent by `client`.
fn client_credentials(
    server: &TestServer,
    client: &reqwest::Client,
    id: &str,
    secret: &str,
) -> reqwest::RequestBuilder {
    client.post(server.url("/oauth2/token")).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", id),
        ("client_secret", secret),
    ])
}
