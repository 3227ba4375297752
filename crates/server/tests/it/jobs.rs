//! Import and deletion jobs (`/jobs/imports`, `/jobs/deletions`), end to end.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use twinguard_core::auth::{DATA_OWNER, DATA_READER, MODEL_UPLOADER};

use crate::kit::TestServer;

const NODE: &str = "dtmi:jobs:Node;1";

fn node_model() -> Value {
    json!({
        "@context": "dtmi:dtdl:context;3",
        "@id": NODE,
        "@type": "Interface",
        "contents": [
            {"@type": "Property", "name": "n", "schema": "integer"},
            {"@type": "Relationship", "name": "feeds", "target": NODE,
             "properties": [{"@type": "Property", "name": "w", "schema": "double"}]}
        ]
    })
}

/// An import file in ADT's format: the sections in order, one JSON value a line.
fn import_file(models: &[Value], twins: &[Value], relationships: &[Value]) -> String {
    let mut out = String::new();
    let mut line = |v: &Value| writeln!(out, "{v}").unwrap();
    line(&json!({"Section": "Header"}));
    line(&json!({"fileVersion": "1.0.0", "author": "twinguard tests", "organization": "none"}));
    line(&json!({"Section": "Models"}));
    models.iter().for_each(&mut line);
    line(&json!({"Section": "Twins"}));
    twins.iter().for_each(&mut line);
    line(&json!({"Section": "Relationships"}));
    relationships.iter().for_each(&mut line);
    out
}

fn twin(i: usize) -> Value {
    json!({"$dtId": format!("t{i}"), "$metadata": {"$model": NODE}, "n": i})
}

/// `n` twins; twin `i` feeds the next three (modulo `n`).
fn generated_graph(n: usize) -> (Vec<Value>, Vec<Value>) {
    let twins = (0..n).map(twin).collect();
    let relationships = (0..n)
        .flat_map(|i| {
            (1..=3).map(move |k| {
                json!({
                    "$dtId": format!("t{i}"),
                    "$relationshipId": format!("r{i}-{k}"),
                    "$targetId": format!("t{}", (i + k) % n),
                    "$relationshipName": "feeds",
                    "w": k as f64 / 2.0,
                })
            })
        })
        .collect();
    (twins, relationships)
}

/// Every RealEstateCore interface in `../shared/data`, in the order the directory walk finds
/// them (not in dependency order: the job orders them).
fn realestatecore() -> Vec<Value> {
    fn collect(dir: &Path, out: &mut Vec<Value>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        // Reverse, so that most models come before what they extend.
        entries.reverse();
        for path in entries {
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
    all
}

async fn put_import(server: &TestServer, token: &str, id: &str, body: String) -> reqwest::Response {
    server
        .adt(Method::PUT, &format!("/jobs/imports/{id}"), token)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Polls a job until it has finished (succeeded, failed or cancelled).
async fn finished(server: &TestServer, token: &str, kind: &str, id: &str) -> Value {
    for _ in 0..6000 {
        let job: Value = server
            .call(Method::GET, &format!("/jobs/{kind}/{id}"), token)
            .await
            .json()
            .await
            .unwrap();
        if matches!(
            job["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not finish");
}

async fn output(server: &TestServer, token: &str, id: &str) -> Vec<Value> {
    let response = server
        .call(Method::GET, &format!("/jobs/imports/{id}/output"), token)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    response
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn audit_entries(server: &TestServer) -> Vec<Value> {
    let bytes = std::fs::read(server.dir.path().join("audit/entries.jsonl")).unwrap();
    twinguard_audit::log::recorded(&bytes)
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .map(|e| e.get("entry").cloned().unwrap_or(e))
        .collect()
}

fn audit_job_entries(server: &TestServer) -> Vec<Value> {
    audit_entries(server)
        .into_iter()
        .filter(|e| e["kind"] == "job")
        .collect()
}

#[tokio::test]
async fn jobs_import_the_realestatecore_ontology_and_a_generated_graph() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let mut models = realestatecore();
    assert_eq!(models.len(), 767);
    models.push(node_model());
    let (twins, relationships) = generated_graph(10_000);
    let file = import_file(&models, &twins, &relationships);

    let response = put_import(&server, &token, "plant", file).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["id"], "plant");
    assert!(matches!(
        created["status"].as_str(),
        Some("notstarted" | "running")
    ));
    assert!(created["createdDateTime"].is_string());
    assert!(
        created["outputBlobUri"]
            .as_str()
            .unwrap()
            .ends_with("/jobs/imports/plant/output")
    );

    let job = finished(&server, &token, "imports", "plant").await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["finishedDateTime"].is_string() && job["purgeDateTime"].is_string());
    assert_eq!(job["progress"]["models"], 768);
    assert_eq!(job["progress"]["twins"], 10_000);
    assert_eq!(job["progress"]["relationships"], 30_000);

    let graph = server.state.service.snapshot();
    assert_eq!(graph.models().count(), 768);
    assert_eq!(graph.twin_count(), 10_000);
    assert_eq!(graph.relationship_count(), 30_000);
    // What the API answers for an imported twin and relationship.
    let t: Value = server
        .call(Method::GET, "/digitaltwins/t42", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (t["n"].as_i64(), t["$metadata"]["$model"].as_str()),
        (Some(42), Some(NODE))
    );
    let r: Value = server
        .call(
            Method::GET,
            "/digitaltwins/t9999/relationships/r9999-2",
            &token,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["$targetId"], "t1");
    assert_eq!(r["w"], 1.0);
    let space = server
        .call(
            Method::GET,
            "/models/dtmi:digitaltwins:rec_3_3:core:Space;1",
            &token,
        )
        .await;
    assert_eq!(space.status(), 200);

    let log = output(&server, &token, "plant").await;
    assert_eq!(log.first().unwrap()["details"]["status"], "Started");
    assert_eq!(log.last().unwrap()["details"]["status"], "succeeded");
    assert!(
        log.iter()
            .all(|e| e["jobId"] == "plant" && e["jobType"] == "Import")
    );

    let list: Value = server
        .call(Method::GET, "/jobs/imports", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["value"][0]["id"], "plant");

    // The completion is on the audit trail.
    let audited = audit_job_entries(&server);
    assert!(
        audited
            .iter()
            .any(|e| e["jobId"] == "plant" && e["status"] == "succeeded"),
        "{audited:?}"
    );

    // Its creation is recorded like every request, with the job's ID.
    let entries = audit_entries(&server);
    assert!(
        entries.iter().any(|e| e["kind"] == "request"
            && e["method"] == "PUT"
            && e["path"] == "/jobs/imports/plant"
            && e["job"] == "plant"
            && e["status"] == 201),
        "no request entry for the job's creation"
    );

    // The ID is taken until the job is deleted.
    let again = put_import(&server, &token, "plant", import_file(&[], &[], &[])).await;
    assert_eq!(again.status(), 400);
    let deleted = server
        .call(Method::DELETE, "/jobs/imports/plant", &token)
        .await;
    assert_eq!(deleted.status(), 204);
    let gone = server
        .call(Method::GET, "/jobs/imports/plant", &token)
        .await;
    assert_eq!(gone.status(), 404);
}

/// Uploads share one spool budget: an upload past it is refused with 503 (nothing kept), and
/// the budget is whole again afterwards.
#[tokio::test]
async fn uploads_past_the_spool_budget_are_refused_and_leave_nothing() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    server.state.jobs.set_spool_limit(64 * 1024);
    let (twins, _) = generated_graph(2_000);
    let big = import_file(&[node_model()], &twins, &[]);
    assert!(big.len() > 64 * 1024);
    let response = put_import(&server, &token, "big", big).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ServiceUnavailable", "{body}");
    assert_eq!(server.state.jobs.spool_used(), 0);
    let spool = server.dir.path().join("jobs");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "no file left"
    );
    let small = import_file(&[node_model()], &twins[..10], &[]);
    let response = put_import(&server, &token, "small", small).await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        finished(&server, &token, "imports", "small").await["status"],
        "succeeded"
    );
}

#[tokio::test]
async fn a_malformed_line_fails_the_job_with_its_line_number_and_nothing_after_it_is_applied() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let (twins, _) = generated_graph(200);
    let mut file = import_file(&[node_model()], &twins[..100], &[]);
    // Drop the empty relationships section again: the broken line goes into the twins.
    file.truncate(file.len() - "{\"Section\":\"Relationships\"}\n".len());
    // Lines: 1 header section, 2 header, 3 models section, 4 model, 5 twins section,
    // 6..=105 the first hundred twins, 106 the broken line.
    file.push_str("{\"$dtId\": \"broken\", \"$metadata\": \n");
    for t in &twins[100..] {
        writeln!(file, "{t}").unwrap();
    }
    let response = put_import(&server, &token, "broken", file).await;
    assert_eq!(response.status(), 201);
    let job = finished(&server, &token, "imports", "broken").await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "ValidationFailed");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("line 106:"), "{message}");

    let graph = server.state.service.snapshot();
    assert_eq!(
        graph.twin_count(),
        100,
        "everything before line 106, nothing after"
    );
    assert!(graph.twin("t99").is_some() && graph.twin("t100").is_none());
    assert!(graph.twin("broken").is_none());

    let log = output(&server, &token, "broken").await;
    assert!(
        log.iter().any(|e| e["logType"] == "Error"
            && e["details"]["message"]
                .as_str()
                .unwrap()
                .starts_with("line 106:")),
        "{log:?}"
    );

    // A twin its model rejects fails the job too, naming its line.
    let bad_twin = json!({"$dtId": "x", "$metadata": {"$model": NODE}, "n": "not a number"});
    let file = import_file(&[], &[bad_twin], &[]);
    let response = put_import(&server, &token, "rejected", file).await;
    assert_eq!(response.status(), 201);
    let job = finished(&server, &token, "imports", "rejected").await;
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 5:"),
        "{job}"
    );

    // A twin larger than PUT /digitaltwins takes (32 KiB) is refused the same way.
    let big_twin =
        json!({"$dtId": "big", "$metadata": {"$model": NODE}, "pad": "x".repeat(40_000)});
    let response = put_import(
        &server,
        &token,
        "oversize",
        import_file(&[], &[big_twin], &[]),
    )
    .await;
    assert_eq!(response.status(), 201);
    let job = finished(&server, &token, "imports", "oversize").await;
    assert_eq!(job["status"], "failed");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("line 5: the line is longer than 32768"),
        "{message}"
    );

    // A file that does not start with the header section.
    let response = put_import(
        &server,
        &token,
        "headless",
        "{\"Section\": \"Twins\"}\n".into(),
    )
    .await;
    assert_eq!(response.status(), 201);
    let job = finished(&server, &token, "imports", "headless").await;
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 1:")
    );
}

#[tokio::test]
async fn a_cancelled_import_stops_before_its_next_write_and_a_waiting_one_never_starts() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let (twins, _) = generated_graph(40_000);
    let file = import_file(&[node_model()], &twins, &[]);
    let first = put_import(&server, &token, "big", file).await;
    assert_eq!(first.status(), 201);
    // Jobs run one at a time: this one waits for the first.
    let waiting = put_import(
        &server,
        &token,
        "waiting",
        import_file(
            &[],
            &[json!({"$dtId": "w", "$metadata": {"$model": NODE}})],
            &[],
        ),
    )
    .await;
    assert_eq!(waiting.status(), 201);
    let cancelled: Value = server
        .call(Method::POST, "/jobs/imports/waiting/cancel", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");

    // Cancel once the job is under way: some twins are in, not all.
    for _ in 0..2000 {
        let job: Value = server
            .call(Method::GET, "/jobs/imports/big", &token)
            .await
            .json()
            .await
            .unwrap();
        if job["progress"]["twins"].as_u64().unwrap() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cancelling = server
        .call(Method::POST, "/jobs/imports/big/cancel", &token)
        .await;
    assert_eq!(cancelling.status(), 200);
    let status: Value = cancelling.json().await.unwrap();
    assert!(
        matches!(status["status"].as_str(), Some("cancelling" | "cancelled")),
        "{status}"
    );
    let job = finished(&server, &token, "imports", "big").await;
    assert_eq!(job["status"], "cancelled");
    let graph = server.state.service.snapshot();
    let applied = graph.twin_count();
    assert!(applied > 0 && applied < 40_000, "{applied} twins");
    assert_eq!(job["progress"]["twins"], applied as u64);
    assert!(graph.twin("w").is_none(), "the cancelled waiting job ran");
    let later = finished(&server, &token, "imports", "waiting").await;
    assert_eq!(later["status"], "cancelled");
}

#[tokio::test]
async fn callers_without_the_rights_get_403_and_anonymous_callers_401() {
    let server = TestServer::start().await;
    let reader = server.token_with_role(DATA_READER).await;
    let uploader = server.token_with_role(MODEL_UPLOADER).await;
    // A data owner of one model's twins only: jobs need their actions instance-wide.
    let scoped = server
        .token_with_scoped_role(DATA_OWNER, json!({"kind": "model", "model": NODE}))
        .await;
    let file = import_file(&[node_model()], &[], &[]);
    for token in [&reader, &uploader, &scoped] {
        let response = put_import(&server, token, "nope", file.clone()).await;
        assert_eq!(response.status(), 403);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "Forbidden");
        let deletion = server
            .call(Method::PUT, "/jobs/deletions/nope", token)
            .await;
        assert_eq!(deletion.status(), 403);
        let deletion = server.call(Method::POST, "/jobs/deletions", token).await;
        assert_eq!(deletion.status(), 403);
    }
    // A reader may list jobs; nothing was created.
    let list: Value = server
        .call(Method::GET, "/jobs/imports", &reader)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["value"], json!([]));
    assert_eq!(server.state.service.snapshot().models().count(), 0);
    // A data owner holds every job action.
    let owner = server.token_with_role(DATA_OWNER).await;
    let response = put_import(&server, &owner, "yes", file.clone()).await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        finished(&server, &owner, "imports", "yes").await["status"],
        "succeeded"
    );
    let anonymous = server
        .client
        .put(server.url(&format!("/jobs/imports/anon?{}", crate::kit::API)))
        .header("content-type", "application/x-ndjson")
        .body(file)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn a_deletion_job_deletes_every_model_twin_and_relationship() {
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let base =
        json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:jobs:Base;1", "@type": "Interface"});
    let derived = json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:jobs:Derived;1",
        "@type": "Interface", "extends": "dtmi:jobs:Base;1"});
    let (twins, relationships) = generated_graph(2_500);
    let file = import_file(&[derived, base, node_model()], &twins, &relationships);
    assert_eq!(
        put_import(&server, &token, "load", file).await.status(),
        201
    );
    assert_eq!(
        finished(&server, &token, "imports", "load").await["status"],
        "succeeded"
    );
    assert_eq!(server.state.service.snapshot().relationship_count(), 7_500);

    let response = server
        .adt(Method::POST, "/jobs/deletions", &token)
        .header("operation-id", "wipe")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["operation-location"].to_str().unwrap();
    assert!(
        location.contains("/jobs/deletions/wipe?api-version="),
        "{location}"
    );
    let job = finished(&server, &token, "deletions", "wipe").await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["relationships"], 7_500);
    assert_eq!(job["progress"]["twins"], 2_500);
    assert_eq!(job["progress"]["models"], 3);
    let graph = server.state.service.snapshot();
    assert_eq!(
        (
            graph.models().count(),
            graph.twin_count(),
            graph.relationship_count()
        ),
        (0, 0, 0)
    );
    let list: Value = server
        .call(Method::GET, "/jobs/deletions", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["value"][0]["id"], "wipe");
    // PUT with an ID works too, on an empty instance.
    let response = server
        .call(Method::PUT, "/jobs/deletions/again", &token)
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        finished(&server, &token, "deletions", "again").await["status"],
        "succeeded"
    );
    let audited = audit_job_entries(&server);
    assert!(
        audited.iter().any(|e| e["jobId"] == "wipe"
            && e["jobType"] == "deletions"
            && e["status"] == "succeeded"),
        "{audited:?}"
    );
}

/// Serves `body` once over plain HTTP on loopback; the request line it got comes back.
async fn serve_once(body: String) -> (String, tokio::task::JoinHandle<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/container/plant.ndjson",
        listener.local_addr().unwrap()
    );
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            request.extend_from_slice(&buf[..n]);
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        String::from_utf8_lossy(&request)
            .lines()
            .next()
            .unwrap()
            .to_owned()
    });
    (url, task)
}

#[tokio::test]
async fn an_import_from_a_url_needs_the_egress_allowlist() {
    use twinguard_server::egress::{Egress, EgressPolicy, Rule};
    use twinguard_server::jobs::UrlInput;
    let server = TestServer::start().await;
    let token = server.admin_token().await;
    let (twins, relationships) = generated_graph(50);
    let file = import_file(&[node_model()], &twins, &relationships);
    let (url, served) = serve_once(file).await;
    let url = format!("{url}?sig=secret-sas-token");

    // Nothing is reachable by default.
    let refused = server
        .call_json(
            Method::PUT,
            "/jobs/imports/fetched",
            &token,
            &json!({"inputBlobUri": url, "outputBlobUri": "https://example.com/out"}),
        )
        .await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "inputBlobUri is not on the egress allowlist"
    );
    // Plain http is for loopback only, whatever the allowlist says.
    let refused = server
        .call_json(
            Method::PUT,
            "/jobs/imports/fetched",
            &token,
            &json!({"inputBlobUri": "http://203.0.113.7/plant.ndjson"}),
        )
        .await;
    assert_eq!(refused.status(), 400);

    let rule: Rule = "127.0.0.1".parse().unwrap();
    server.state.jobs.set_url_input(UrlInput {
        egress: Egress::new(EgressPolicy::new([rule])),
        roots: vec![],
    });
    let created = server
        .call_json(
            Method::PUT,
            "/jobs/imports/fetched",
            &token,
            &json!({"inputBlobUri": url, "outputBlobUri": "https://example.com/out"}),
        )
        .await;
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
    let job = finished(&server, &token, "imports", "fetched").await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // The URL is shown without its query, which may hold a SAS token.
    let shown = job["inputBlobUri"].as_str().unwrap();
    assert!(shown.ends_with("/container/plant.ndjson"), "{shown}");
    assert!(!job.to_string().contains("secret-sas-token"));
    assert!(
        served
            .await
            .unwrap()
            .starts_with("GET /container/plant.ndjson?sig=secret-sas-token")
    );
    let graph = server.state.service.snapshot();
    assert_eq!((graph.twin_count(), graph.relationship_count()), (50, 150));
}
