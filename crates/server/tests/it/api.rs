//! The ADT data plane over HTTPS: conventions (api-version, errors, limits, paging), twins with
//! etags, queries, and a real ontology upload.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use reqwest::Method;
use serde_json::{Value, json};

use crate::kit::TestServer;

fn model(id: &str, contents: Value) -> Value {
    json!({"@context": "dtmi:dtdl:context;3", "@id": id, "@type": "Interface", "contents": contents})
}

async fn upload_room_model(server: &TestServer, token: &str) {
    let room = model(
        "dtmi:api:Room;1",
        json!([
            {"@type": "Property", "name": "temperature", "schema": "double"},
            {"@type": "Relationship", "name": "next", "target": "dtmi:api:Room;1"}
        ]),
    );
    let response = server
        .adt(Method::POST, "/models", token)
        .json(&json!([room]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn api_version_is_required_and_checked() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let missing = server
        .client
        .get(server.url("/models"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"]["code"],
        "MissingApiVersionParameter"
    );
    let unknown = server
        .client
        .get(server.url("/models?api-version=1999-01-01"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"]["code"],
        "InvalidApiVersion"
    );
}

#[tokio::test]
async fn bad_input_gets_the_adt_error_shape_with_a_correlation_id() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let malformed = server
        .adt(Method::PUT, "/digitaltwins/t1", &token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let id = malformed.headers()["x-ms-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 36);
    let body: Value = malformed.json().await.unwrap();
    assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string());

    let oversize =
        json!({"$metadata": {"$model": "dtmi:api:Room;1"}, "blob": "x".repeat(40 * 1024)});
    let response = server
        .call_json(Method::PUT, "/digitaltwins/t1", &token, &oversize)
        .await;
    assert_eq!(response.status(), 413);

    let missing = server.call(Method::GET, "/digitaltwins/nope", &token).await;
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"]["code"],
        "DigitalTwinNotFound"
    );
}

#[tokio::test]
async fn twins_round_trip_with_etags_over_https() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    upload_room_model(&server, &token).await;
    let body = json!({"$metadata": {"$model": "dtmi:api:Room;1"}, "temperature": 20.0});
    let created = server
        .adt(Method::PUT, "/digitaltwins/room%201", &token)
        .header("if-none-match", "*")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let etag = created.headers()["etag"].to_str().unwrap().to_owned();
    let twin: Value = created.json().await.unwrap();
    assert_eq!(twin["$dtId"], "room 1");
    assert_eq!(twin["$etag"], etag.as_str());

    let again = server
        .adt(Method::PUT, "/digitaltwins/room%201", &token)
        .header("if-none-match", "*")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 412);

    let patch = json!([{"op": "replace", "path": "/temperature", "value": 22.5}]);
    let patched = server
        .adt(Method::PATCH, "/digitaltwins/room%201", &token)
        .header("if-match", &etag)
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 204);
    let stale = server
        .adt(Method::PATCH, "/digitaltwins/room%201", &token)
        .header("if-match", &etag)
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);

    let fetched: Value = server
        .call(Method::GET, "/digitaltwins/room%201", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["temperature"], 22.5);

    let deleted = server
        .call(Method::DELETE, "/digitaltwins/room%201", &token)
        .await;
    assert_eq!(deleted.status(), 204);
    let gone = server
        .call(Method::GET, "/digitaltwins/room%201", &token)
        .await;
    assert_eq!(gone.status(), 404);
}

#[tokio::test]
async fn query_pages_with_continuation_tokens_and_reports_a_charge() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    upload_room_model(&server, &token).await;
    for i in 0..25 {
        let body = json!({"$metadata": {"$model": "dtmi:api:Room;1"}, "temperature": i as f64});
        let response = server
            .adt(Method::PUT, &format!("/digitaltwins/r{i}"), &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut seen = BTreeSet::new();
    let mut request = json!({"query": "SELECT * FROM DIGITALTWINS T WHERE T.temperature >= 5"});
    let mut pages = 0;
    loop {
        let response = server
            .adt(Method::POST, "/query", &token)
            .header("max-items-per-page", "7")
            .json(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let charge: f64 = response.headers()["query-charge"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(charge >= 1.0);
        let page: Value = response.json().await.unwrap();
        let items = page["value"].as_array().unwrap();
        assert!(items.len() <= 7);
        for item in items {
            assert!(
                seen.insert(item["$dtId"].as_str().unwrap().to_owned()),
                "duplicate across pages"
            );
        }
        pages += 1;
        match page["continuationToken"].as_str() {
            Some(t) => request = json!({"continuationToken": t}),
            None => break,
        }
    }
    assert_eq!(seen.len(), 20);
    assert_eq!(pages, 3);

    let bad = server
        .adt(Method::POST, "/query", &token)
        .json(&json!({"query": "SELECT * FROM WHERE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["code"], "SqlQueryError");
}

#[tokio::test]
async fn a_write_is_visible_to_the_next_query_at_once() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    upload_room_model(&server, &token).await;
    for i in 0..20 {
        let body = json!({"$metadata": {"$model": "dtmi:api:Room;1"}, "temperature": i as f64});
        server
            .adt(Method::PUT, &format!("/digitaltwins/v{i}"), &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let query = json!({"query": format!("SELECT T.temperature FROM DIGITALTWINS T WHERE T.$dtId = 'v{i}'")});
        let page: Value = server
            .call_json(Method::POST, "/query", &token, &query)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(page["value"][0]["temperature"], i as f64);
    }
}

#[tokio::test]
async fn list_continuation_tokens_a_list_could_not_have_produced_are_refused_with_400() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    // `o:0:n:0`, `o:0:n:1001`, `o:-1:n:10`, not base64, and a 68-character token.
    let long = "A".repeat(68);
    for bad in [
        "bzowOm46MA",
        "bzowOm46MTAwMQ",
        "bzotMTpuOjEw",
        "%2A%2A%2A",
        long.as_str(),
    ] {
        let answer = server
            .adt(
                Method::GET,
                &format!("/models?continuationToken={bad}"),
                &token,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "{bad}");
    }
    // The token of a real page is accepted.
    let good = twinguard_core::paging::ListPosition::new(0, 10)
        .unwrap()
        .token();
    let answer = server
        .adt(
            Method::GET,
            &format!("/models?continuationToken={good}"),
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn model_lists_page_with_next_links() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let models: Vec<Value> = (0..5)
        .map(|i| model(&format!("dtmi:api:M{i};1"), json!([])))
        .collect();
    assert_eq!(
        server
            .call_json(Method::POST, "/models", &token, &models)
            .await
            .status(),
        201
    );
    // Like the ADT SDKs, send the page size only with the first request and then follow the
    // next links as they are: the size must carry over.
    let first: Value = server
        .adt(Method::GET, "/models?includeModelDefinition=true", &token)
        .header("max-items-per-page", "2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut page = first;
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(page["value"].as_array().unwrap().len() <= 2);
        for m in page["value"].as_array().unwrap() {
            assert!(m["model"].is_object());
            ids.push(m["id"].as_str().unwrap().to_owned());
        }
        match page["nextLink"].as_str() {
            Some(link) => {
                assert!(link.starts_with(&server.base), "{link}");
                let next = server
                    .client
                    .get(link)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                page = next.json().await.unwrap();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        ids,
        [
            "dtmi:api:M0;1",
            "dtmi:api:M1;1",
            "dtmi:api:M2;1",
            "dtmi:api:M3;1",
            "dtmi:api:M4;1"
        ]
    );
}

/// Every RealEstateCore interface, ordered so that each one's `extends` and component schemas
/// come before it.
fn realestatecore_in_dependency_order() -> Vec<Value> {
    fn collect(dir: &Path, out: &mut Vec<Value>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                collect(&path, out);
            } else if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).unwrap();
                match serde_json::from_str(text.trim_start_matches('\u{feff}')).unwrap() {
                    Value::Array(items) => out.extend(items),
                    item => out.push(item),
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/ontologies/realestatecore");
    let mut all = Vec::new();
    collect(&root, &mut all);
    let by_id: BTreeMap<String, Value> = all
        .into_iter()
        .map(|m| (m["@id"].as_str().unwrap().to_owned(), m))
        .collect();
    fn deps(m: &Value) -> Vec<String> {
        let mut out: Vec<String> = match &m["extends"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => vec![],
        };
        for c in m["contents"].as_array().into_iter().flatten() {
            if c["@type"] == "Component" {
                out.extend(c["schema"].as_str().map(str::to_owned));
            }
        }
        out
    }
    fn visit(
        id: &str,
        by_id: &BTreeMap<String, Value>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<Value>,
    ) {
        if !done.insert(id.to_owned()) {
            return;
        }
        if let Some(m) = by_id.get(id) {
            for d in deps(m) {
                visit(&d, by_id, done, out);
            }
            out.push(m.clone());
        }
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for id in by_id.keys() {
        visit(id, &by_id, &mut done, &mut out);
    }
    out
}

#[tokio::test]
async fn the_realestatecore_ontology_uploads_in_batches_of_250() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let models = realestatecore_in_dependency_order();
    assert_eq!(models.len(), 767);
    for chunk in models.chunks(250) {
        let response = server
            .call_json(Method::POST, "/models", &token, &chunk)
            .await;
        let status = response.status();
        assert_eq!(status, 201, "{}", response.text().await.unwrap());
    }
    let too_many: Vec<Value> = (0..251)
        .map(|i| model(&format!("dtmi:api:Many{i};1"), json!([])))
        .collect();
    let response = server
        .call_json(Method::POST, "/models", &token, &too_many)
        .await;
    assert_eq!(response.status(), 400);

    let deps: Value = server
        .call(
            Method::GET,
            "/models?dependenciesFor=dtmi:digitaltwins:rec_3_3:building:CookingRoom;1",
            &token,
        )
        .await
        .json()
        .await
        .unwrap();
    let ids: BTreeSet<&str> = deps["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains("dtmi:digitaltwins:rec_3_3:core:Space;1"),
        "{ids:?}"
    );

    let duplicate = server
        .adt(Method::POST, "/models", &token)
        .json(&json!([models[0]]))
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 409);
}

#[tokio::test]
async fn the_openapi_document_is_served() {
    let server = TestServer::start().await;
    let doc: Value = server
        .client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/digitaltwins/{id}"]["patch"].is_object());
}

#[tokio::test]
async fn a_list_of_large_items_is_paged_under_the_byte_cap_and_loses_nothing() {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let model = json!([{
        "@context": "dtmi:dtdl:context;3", "@id": "dtmi:api:Tank;1", "@type": "Interface",
        "contents": [{"@type": "Relationship", "name": "feeds",
            "properties": [{"@type": "Property", "name": "blob", "schema": "string"}]}]
    }]);
    assert_eq!(
        server
            .call_json(Method::POST, "/models", &admin, &model)
            .await
            .status(),
        201
    );
    let twin = json!({"$metadata": {"$model": "dtmi:api:Tank;1"}});
    for id in ["src", "dst"] {
        let r = server
            .call_json(Method::PUT, &format!("/digitaltwins/{id}"), &admin, &twin)
            .await;
        assert_eq!(r.status(), 200);
    }
    // Issue 17: 200 relationships of 30 KB each, 6 MB in all, asked for in one page of 1,000.
    let blob = "b".repeat(30 * 1024);
    for i in 0..200 {
        let body = json!({"$targetId": "dst", "$relationshipName": "feeds", "blob": blob});
        let r = server
            .call_json(
                Method::PUT,
                &format!("/digitaltwins/src/relationships/r{i:03}"),
                &admin,
                &body,
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let mut url = format!(
        "{}/digitaltwins/src/relationships?{}",
        server.base,
        crate::kit::API
    );
    let mut seen = std::collections::BTreeSet::new();
    let mut pages = 0;
    loop {
        let r = server
            .client
            .get(&url)
            .bearer_auth(&admin)
            .header("max-items-per-page", "1000")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let bytes = r.bytes().await.unwrap();
        assert!(
            bytes.len() <= twinguard_server::http::MAX_LIST_PAGE_BYTES + 1024,
            "a page of {} bytes",
            bytes.len()
        );
        let page: Value = serde_json::from_slice(&bytes).unwrap();
        for rel in page["value"].as_array().unwrap() {
            assert!(seen.insert(rel["$relationshipId"].as_str().unwrap().to_owned()));
        }
        pages += 1;
        match page["nextLink"].as_str() {
            Some(next) => url = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 200, "every relationship once");
    assert!(pages >= 2, "{pages} page(s)");
}

/// Follows a list's next links from `path` with `max-items-per-page: size`: every page's
/// bytes and the IDs (`key`) of its items, in order.
async fn walk_list(
    server: &TestServer,
    token: &str,
    path: &str,
    size: usize,
    key: &str,
) -> (Vec<usize>, Vec<String>) {
    let mut url = server.url(path);
    let (mut pages, mut ids) = (Vec::new(), Vec::new());
    loop {
        let r = server
            .client
            .get(&url)
            .bearer_auth(token)
            .header("max-items-per-page", size.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let bytes = r.bytes().await.unwrap();
        pages.push(bytes.len());
        let page: Value = serde_json::from_slice(&bytes).unwrap();
        let items = page["value"].as_array().unwrap();
        assert!(
            items.len() <= size,
            "{} items in a page of {size}",
            items.len()
        );
        ids.extend(items.iter().map(|i| i[key].as_str().unwrap().to_owned()));
        match page["nextLink"].as_str() {
            Some(next) => url = next.to_owned(),
            None => return (pages, ids),
        }
    }
}

#[tokio::test]
async fn administration_lists_are_paged_under_the_byte_cap_every_item_once_and_forged_tokens_get_400()
 {
    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    // Issue 17: 300 firmware allowlists of 230 digests (about 15.5 KB each, 4.6 MB in all).
    let digests: Vec<String> = (0..230).map(|i| format!("{i:064x}")).collect();
    for i in 0..300 {
        let r = server
            .admin_call(Method::PUT, &format!("/firmware/model-{i:03}"), &admin)
            .json(&json!({ "digests": digests }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
    let expected: Vec<String> = (0..300).map(|i| format!("model-{i:03}")).collect();
    // Asked for in pages of 1,000: the byte cap ends each page, and nothing is lost or repeated.
    let (pages, ids) = walk_list(&server, &admin, "/firmware", 1_000, "deviceModel").await;
    assert_eq!(ids, expected, "every allowlist once, in order");
    assert!(pages.len() >= 2, "{} page(s)", pages.len());
    for bytes in &pages {
        assert!(
            *bytes <= twinguard_server::http::MAX_LIST_PAGE_BYTES + 1024,
            "a page of {bytes} bytes"
        );
    }
    // Without a size: pages of the default 100.
    let first: Value = server
        .admin_json(Method::GET, "/firmware", &admin, None)
        .await;
    assert_eq!(first["value"].as_array().unwrap().len(), 100);
    assert!(first["nextLink"].as_str().is_some());
    // A short page size walks a list of more items than a page: the roles, 3 at a time.
    let all_roles: usize = {
        let (_, ids) = walk_list(&server, &admin, "/admin/roles", 1_000, "id").await;
        ids.len()
    };
    let (pages, ids) = walk_list(&server, &admin, "/admin/roles", 3, "id").await;
    assert!(all_roles > 3 && pages.len() == all_roles.div_ceil(3));
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        all_roles,
        "every role once"
    );
    // Tokens no list could have produced are refused on every paged administration list.
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    for path in [
        "/admin/identities",
        "/admin/roles",
        "/admin/roleassignments",
        "/admin/apikeys",
        "/admin/apikeys/overdue",
        "/devices",
        "/firmware",
        "/policies",
        "/sensorgroups",
        "/quarantine",
    ] {
        for forged in [
            "garbage".to_owned(),
            b64("o:0:n:100000"),
            b64("o:-1:n:10"),
            b64("k:../x:n:10"),
            b64("k:a:n:0"),
        ] {
            let r = server
                .admin_call(
                    Method::GET,
                    &format!("{path}?continuationToken={forged}"),
                    &admin,
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{path} with {forged}");
        }
    }
    // A history token must name a reading of this twin's property inside the window read.
    let other = twinguard_telemetry::history_page::HistoryCursor {
        after: twinguard_telemetry::records::history_key("other", "level", 1_000, "d", 1),
        bucket: None,
    }
    .token();
    for forged in ["garbage".to_owned(), other] {
        let r = server
            .admin_call(
                Method::GET,
                &format!(
                    "/history/tank/level?from=1970-01-01T00:00:00Z&continuationToken={forged}"
                ),
                &admin,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "history with {forged}");
    }
}

#[tokio::test]
async fn the_quarantine_pages_by_key_so_reviews_between_pages_skip_nothing() {
    use base64::Engine;
    use twinguard_telemetry::envelope::{Message, Reading, sign_cose, signing_key_from_pem};

    let server = TestServer::start().await;
    let admin = server.admin_token().await;
    let model = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:q:Tank;1", "@type": "Interface",
        "contents": [{"@type": "Property", "name": "level", "schema": "double"}]}]);
    assert_eq!(
        server
            .call_json(Method::POST, "/models", &admin, &model)
            .await
            .status(),
        201
    );
    let twin = json!({"$metadata": {"$model": "dtmi:q:Tank;1"}});
    let put = server
        .call_json(Method::PUT, "/digitaltwins/tank", &admin, &twin)
        .await;
    assert_eq!(put.status(), 200);
    let firmware = "cd".repeat(32);
    let admin_put = |path: &str, body: Value| {
        server
            .admin_call(Method::PUT, path, &admin)
            .json(&body)
            .send()
    };
    let r = admin_put("/firmware/tank-sensor", json!({"digests": [firmware]})).await;
    assert!(r.unwrap().status().is_success());
    let policy = json!({"model": "dtmi:q:Tank;1", "property": "level", "min": 0.0, "max": 10.0});
    let r = admin_put("/policies/level", policy).await;
    assert!(r.unwrap().status().is_success());
    let device = json!({"generate": true, "deviceModel": "tank-sensor",
        "bindings": [{"twin": "tank", "names": ["level"]}]});
    let registered: Value = admin_put("/devices/level-1", device)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = signing_key_from_pem(registered["privateKey"].as_str().unwrap()).unwrap();
    // 30 readings above the policy's maximum: each is quarantined.
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let messages: Vec<String> = (1..=30u64)
        .map(|seq| {
            let message = Message {
                device: "level-1".into(),
                seq,
                time: now as i64,
                firmware: Some(firmware.clone()),
                readings: vec![Reading {
                    name: "level".into(),
                    value: json!(50.0),
                    twin: None,
                    time: None,
                }],
            };
            base64::engine::general_purpose::STANDARD.encode(sign_cose(&message, &key))
        })
        .collect();
    let sent = server
        .client
        .post(format!("{}/telemetry", server.device_base))
        .json(&json!({ "messages": messages }))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    let (_, all) = walk_list(&server, &admin, "/quarantine", 1_000, "id").await;
    assert_eq!(all.len(), 30, "every reading quarantined");
    let (pages, walked) = walk_list(&server, &admin, "/quarantine", 7, "id").await;
    assert_eq!(walked, all, "pages of 7: every reading once, in order");
    assert_eq!(pages.len(), 5);

    // Pages of 7; after each page its readings are discarded, which takes them off the pending
    // list. Pages by offset would now skip readings; by key, each comes exactly once.
    let mut url = server.url("/quarantine");
    let mut seen = Vec::new();
    loop {
        let page: Value = server
            .client
            .get(&url)
            .bearer_auth(&admin)
            .header("max-items-per-page", "7")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let items = page["value"].as_array().unwrap();
        assert!(items.len() <= 7);
        for item in items {
            let id = item["id"].as_str().unwrap().to_owned();
            let r = server
                .admin_call(Method::POST, &format!("/quarantine/{id}/discard"), &admin)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            seen.push(id);
        }
        match page["nextLink"].as_str() {
            Some(next) => url = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, all, "every pending reading once, in order");
}
