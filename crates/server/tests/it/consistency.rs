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

    // Without a valid credential, a presented position is not looked at, let alone waited
    // for: 401, as for any unauthenticated request (a position ahead of the node, one from
    // the write, and a made-up one alike).
    let ahead = seal
        .as_ref()
        .map(|seal| {
            seal.seal(server.state.service.position().unwrap() + 1_000)
                .unwrap()
        })
        .unwrap_or_else(|| "1".into());
    for presented in [ahead, presented, "soon".into()] {
        for token in ["", "not-a-token"] {
            let anonymous = server
                .adt(Method::GET, "/digitaltwins/pos-1", token)
                .header("twinguard-min-position", &presented)
                .send()
                .await
                .unwrap();
            assert_eq!(anonymous.status(), 401, "{token:?} with {presented}");
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
