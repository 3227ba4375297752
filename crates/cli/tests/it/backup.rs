//! `twinguard backup` and `twinguard restore` as an operator runs them (control RS-6): a bundle
//! of a stopped instance restores into a fresh data directory (and into PostgreSQL) that serves
//! every twin, relationship and model byte for byte, its audit trail verifies offline, and a
//! bundle altered in one byte is refused before anything is written.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::json;
use twinguard_core::store::{Mutation, RESTORE_MARKER, Store, Table};
use twinguard_store_postgres::testdb::TestDatabase;
use twinguard_store_redb::RedbStore;

use crate::postgres::copy_admin_credential;
use crate::process::Server;

fn twinguard(args: &[&str], paths: &[&Path]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_twinguard"));
    command.args(args);
    for path in paths {
        command.arg(path);
    }
    command.output().unwrap()
}

/// `twinguard restore` of `bundle` with `key` into `data_dir`, with `store` options.
fn restore(bundle: &Path, key: &Path, data_dir: &Path, store: &[&str]) -> Output {
    let mut args = vec!["restore"];
    args.extend_from_slice(store);
    args.push("--bundle");
    twinguard(
        &args,
        &[
            bundle,
            Path::new("--key"),
            key,
            Path::new("--data-dir"),
            data_dir,
        ],
    )
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The paths whose answers must read the same after a restore.
const READS: [&str; 8] = [
    "/models",
    "/models/dtmi:backup:Pump;1",
    "/digitaltwins/pump-1",
    "/digitaltwins/pump-2",
    "/digitaltwins/plant",
    "/digitaltwins/plant/relationships",
    "/digitaltwins/plant/relationships/feeds-1",
    "/digitaltwins/pump-2/incomingrelationships",
];

/// A small plant: two models, three twins, two relationships, one patched twin.
async fn build_plant(server: &Server, token: &str) {
    let models = json!([
        {"@context": "dtmi:dtdl:context;3", "@id": "dtmi:backup:Pump;1", "@type": "Interface",
         "contents": [{"@type": "Property", "name": "flow", "schema": "double"},
                      {"@type": "Property", "name": "label", "schema": "string"}]},
        {"@context": "dtmi:dtdl:context;3", "@id": "dtmi:backup:Plant;1", "@type": "Interface",
         "contents": [{"@type": "Relationship", "name": "feeds", "target": "dtmi:backup:Pump;1"}]}
    ]);
    let sent = server
        .request(
            token,
            reqwest::Method::POST,
            "/models?api-version=2023-10-31",
            models,
        )
        .await
        .unwrap();
    assert_eq!(sent.status(), 201);
    for (id, body) in [
        (
            "pump-1",
            json!({"$metadata": {"$model": "dtmi:backup:Pump;1"}, "flow": 1.5, "label": "ünïcode ✓"}),
        ),
        (
            "pump-2",
            json!({"$metadata": {"$model": "dtmi:backup:Pump;1"}, "flow": 2.0}),
        ),
        (
            "plant",
            json!({"$metadata": {"$model": "dtmi:backup:Plant;1"}}),
        ),
    ] {
        let sent = server
            .request(
                token,
                reqwest::Method::PUT,
                &format!("/digitaltwins/{id}?api-version=2023-10-31"),
                body,
            )
            .await
            .unwrap();
        assert_eq!(sent.status(), 200);
    }
    for (rel, target) in [("feeds-1", "pump-1"), ("feeds-2", "pump-2")] {
        let sent = server
            .request(
                token,
                reqwest::Method::PUT,
                &format!("/digitaltwins/plant/relationships/{rel}?api-version=2023-10-31"),
                json!({"$targetId": target, "$relationshipName": "feeds"}),
            )
            .await
            .unwrap();
        assert_eq!(sent.status(), 200);
    }
    let sent = server
        .request(
            token,
            reqwest::Method::PATCH,
            "/digitaltwins/pump-2?api-version=2023-10-31",
            json!([{"op": "replace", "path": "/flow", "value": 3.25}]),
        )
        .await
        .unwrap();
    assert_eq!(sent.status(), 204);
}

/// Each of [`READS`] with the exact bytes of its answer.
async fn answers(server: &Server, token: &str) -> Vec<(String, u16, Vec<u8>)> {
    let mut out = Vec::new();
    for path in READS {
        let response = server
            .client
            .get(server.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        out.push((
            path.to_owned(),
            status,
            response.bytes().await.unwrap().to_vec(),
        ));
    }
    let query = server
        .client
        .post(server.url("/query"))
        .bearer_auth(token)
        .json(&json!({"query": "SELECT T, R FROM DIGITALTWINS T JOIN P RELATED T.feeds R WHERE T.$dtId = 'plant'"}))
        .send()
        .await
        .unwrap();
    let status = query.status().as_u16();
    out.push((
        "query".into(),
        status,
        query.bytes().await.unwrap().to_vec(),
    ));
    out
}

/// A server of its own with the plant, stopped; returns its directory, the answers it gave,
/// and the operator's copy of its audit key.
async fn instance_with_a_plant(
    keep: &Path,
) -> (
    tempfile::TempDir,
    Vec<(String, u16, Vec<u8>)>,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.admin_token(dir.path()).await;
    build_plant(&server, &token).await;
    let before = answers(&server, &token).await;
    for (path, status, body) in &before {
        assert_eq!(*status, 200, "{path}: {}", String::from_utf8_lossy(body));
    }
    // A running instance is not backed up: its store is in use.
    let refused = twinguard(
        &["backup", "--data-dir"],
        &[dir.path(), Path::new("--out"), &keep.join("running.bundle")],
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("stop the server first"),
        "{}",
        text(&refused)
    );
    assert!(!keep.join("running.bundle").exists());
    // Let a checkpoint cover the trail, then stop.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    server.kill();
    let key = keep.join("checkpoint.pub");
    std::fs::copy(dir.path().join("audit/checkpoint.pub"), &key).unwrap();
    (dir, before, key)
}

fn backup(data_dir: &Path, out: &Path) {
    let made = twinguard(
        &["backup", "--data-dir"],
        &[data_dir, Path::new("--out"), out],
    );
    assert!(made.status.success(), "{}", text(&made));
    assert!(
        text(&made).contains("3 twins, 2 relationships"),
        "{}",
        text(&made)
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(out).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

fn archived_trail(data_dir: &Path) -> std::path::PathBuf {
    let mut trails: Vec<_> = std::fs::read_dir(data_dir.join("audit-archive"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(trails.len(), 1, "{trails:?}");
    trails.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_instance_answers_byte_for_byte_and_its_audit_trail_verifies() {
    let keep = tempfile::tempdir().unwrap();
    let (source, before, key) = instance_with_a_plant(keep.path()).await;
    let bundle = keep.path().join("plant.bundle");
    backup(source.path(), &bundle);

    // One byte altered in the middle (inside a record): refused, and nothing is written.
    let mut altered = std::fs::read(&bundle).unwrap();
    let middle = altered.len() / 2;
    altered[middle] ^= 0x20;
    let altered_path = keep.path().join("altered.bundle");
    std::fs::write(&altered_path, &altered).unwrap();
    let target = tempfile::tempdir().unwrap();
    let fresh = target.path().join("restored");
    let refused = restore(&altered_path, &key, &fresh, &[]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("was refused"), "{}", text(&refused));
    assert!(
        !fresh.exists(),
        "a refused bundle must not touch the target"
    );

    // The whole bundle restores into a new data directory.
    let restored = restore(&bundle, &key, &fresh, &[]);
    assert!(restored.status.success(), "{}", text(&restored));
    assert!(!fresh.join("restore-incomplete").exists());

    // Its audit trail up to the backup verifies offline with the operator's key.
    let trail = archived_trail(&fresh);
    let verified = twinguard(
        &["audit", "verify", "--log"],
        &[&trail, Path::new("--key"), &key],
    );
    assert!(verified.status.success(), "{}", text(&verified));

    // Served again (with the first admin credential the operator kept), every answer is the
    // same to the byte.
    copy_admin_credential(source.path(), &fresh);
    let server = Server::start(&fresh);
    let token = server.admin_token(&fresh).await;
    let after = answers(&server, &token).await;
    for ((path, status, body), (_, was_status, was)) in after.iter().zip(&before) {
        assert_eq!(status, was_status, "{path}");
        assert_eq!(
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(was),
            "{path}"
        );
    }
    assert_eq!(after.len(), before.len());
    drop(server);

    // Restoring again into the same, now used, instance is refused: only an empty store.
    let again = restore(&bundle, &key, &fresh, &[]);
    assert!(!again.status.success());
    assert!(text(&again).contains("empty"), "{}", text(&again));

    // A data directory of another instance is refused.
    let other = tempfile::tempdir().unwrap();
    let init = twinguard(&["init", "--data-dir"], &[other.path()]);
    assert!(init.status.success(), "{}", text(&init));
    let foreign = restore(&bundle, &key, other.path(), &[]);
    assert!(!foreign.status.success());
    assert!(
        text(&foreign).contains("belongs to instance"),
        "{}",
        text(&foreign)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_of_an_embedded_store_restores_into_postgresql() {
    let db = match TestDatabase::create() {
        Ok(Some(db)) => db,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let url = db.url();
    let keep = tempfile::tempdir().unwrap();
    let (source, before, key) = instance_with_a_plant(keep.path()).await;
    let bundle = keep.path().join("plant.bundle");
    backup(source.path(), &bundle);

    let target = tempfile::tempdir().unwrap();
    let restored = restore(&bundle, &key, target.path(), &["--store", url.as_str()]);
    assert!(restored.status.success(), "{}", text(&restored));
    assert!(!target.path().join("store.redb").exists());
    copy_admin_credential(source.path(), target.path());
    let server = Server::start_with(target.path(), &["--store", url.as_str()], None);
    let token = server.admin_token(target.path()).await;
    let after = answers(&server, &token).await;
    assert_eq!(after, before);
}

#[test]
fn a_bundle_signed_by_another_instance_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    // Each started and stopped once: each has its own audit key.
    for d in [dir.path(), other.path()] {
        Server::start(d).kill();
    }
    let bundle = dir.path().join("b.bundle");
    let made = twinguard(
        &["backup", "--data-dir"],
        &[dir.path(), Path::new("--out"), &bundle],
    );
    assert!(made.status.success(), "{}", text(&made));
    let checked = twinguard(
        &["restore", "--verify-only", "--bundle"],
        &[
            &bundle,
            Path::new("--key"),
            &dir.path().join("audit/checkpoint.pub"),
        ],
    );
    assert!(checked.status.success(), "{}", text(&checked));
    let wrong = twinguard(
        &["restore", "--verify-only", "--bundle"],
        &[
            &bundle,
            Path::new("--key"),
            &other.path().join("audit/checkpoint.pub"),
        ],
    );
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("does not verify"), "{}", text(&wrong));
}

#[test]
fn a_server_does_not_start_on_a_restore_that_did_not_finish() {
    let dir = tempfile::tempdir().unwrap();
    // Started once, so the instance has its audit key (a backup needs it to sign).
    Server::start(dir.path()).kill();
    let serve = |dir: &Path| Server::start_refused(dir, &[]);
    // The data directory's marker.
    std::fs::write(dir.path().join("restore-incomplete"), b"x").unwrap();
    let refused = serve(dir.path());
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("did not finish"),
        "{}",
        text(&refused)
    );
    std::fs::remove_file(dir.path().join("restore-incomplete")).unwrap();
    // The store's marker (a data directory copied in without its own marker).
    RedbStore::open(&dir.path().join("store.redb"))
        .unwrap()
        .commit(&[Mutation::put(Table::Meta, RESTORE_MARKER, b"x".to_vec())])
        .unwrap();
    let refused = serve(dir.path());
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("did not finish"),
        "{}",
        text(&refused)
    );
    // And a backup of it is refused too.
    let bundle = dir.path().join("b.bundle");
    let made = twinguard(
        &["backup", "--data-dir"],
        &[dir.path(), Path::new("--out"), &bundle],
    );
    assert!(!made.status.success());
    assert!(text(&made).contains("did not finish"), "{}", text(&made));
    assert!(!bundle.exists());
}

/// A bundle of a PostgreSQL instance restored into another database: the twins come back, and
/// the instance's sealed material does not (it opens only under the source's key-encryption
/// key); in particular the key that sealed the old database's store positions does not come
/// back (the new database counts its commits afresh, so a position handed out before must not
/// open there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_instance_restores_into_another_database_with_material_of_its_own() {
    let (source_db, target_db) = match (TestDatabase::create(), TestDatabase::create()) {
        (Ok(Some(a)), Ok(Some(b))) => (a, b),
        (Ok(None), _) | (_, Ok(None)) => return,
        (Err(e), _) | (_, Err(e)) => panic!("{e}"),
    };
    let keep = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    let url = source_db.url();
    let server = Server::start_with(source.path(), &["--store", url.as_str()], None);
    let token = server.admin_token(source.path()).await;
    build_plant(&server, &token).await;
    let marker = json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:pg:Marker;1",
        "@type": "Interface"}]);
    let written = server
        .client
        .post(server.url("/models"))
        .bearer_auth(&token)
        .json(&marker)
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 201);
    let old_position = written.headers()["twinguard-position"]
        .to_str()
        .unwrap()
        .to_owned();
    let before = answers(&server, &token).await;
    // Nor is a serving PostgreSQL instance: its nodes share the database, a backup takes it
    // alone.
    let running = keep.path().join("running.bundle");
    let refused = twinguard(
        &["backup", "--store", url.as_str(), "--data-dir"],
        &[source.path(), Path::new("--out"), &running],
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("the database is in use"),
        "{}",
        text(&refused)
    );
    assert!(!running.exists());
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    server.kill();
    let key = keep.path().join("checkpoint.pub");
    std::fs::copy(source.path().join("audit/checkpoint.pub"), &key).unwrap();
    let bundle = keep.path().join("pg.bundle");
    let made = twinguard(
        &["backup", "--store", url.as_str(), "--data-dir"],
        &[source.path(), Path::new("--out"), &bundle],
    );
    assert!(made.status.success(), "{}", text(&made));

    let target = tempfile::tempdir().unwrap();
    let target_url = target_db.url();
    // Into the source's own database (not empty): refused before the new directory is touched.
    let refused = restore(&bundle, &key, target.path(), &["--store", url.as_str()]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("not empty"), "{}", text(&refused));
    assert_eq!(std::fs::read_dir(target.path()).unwrap().count(), 0);
    // Nor into a database whose records were emptied but which keeps the audit logs of the
    // nodes that served it.
    source_db.query("DELETE FROM records").unwrap();
    let refused = restore(&bundle, &key, target.path(), &["--store", url.as_str()]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("holds the audit log of 1 node that served it"),
        "{}",
        text(&refused)
    );
    assert_eq!(std::fs::read_dir(target.path()).unwrap().count(), 0);
    let restored = restore(
        &bundle,
        &key,
        target.path(),
        &["--store", target_url.as_str()],
    );
    assert!(restored.status.success(), "{}", text(&restored));
    // The bundle holds none of the instance's sealed material (it opens only under the
    // source's key-encryption key): the restored instance makes its own.
    let sealed = |db: &TestDatabase| {
        db.query("SELECT count(*) FROM records WHERE tbl = 'secrets'")
            .unwrap()
    };
    assert_eq!(sealed(&target_db), vec![Some("0".to_owned())]);
    copy_admin_credential(source.path(), target.path());
    let server = Server::start_with(target.path(), &["--store", target_url.as_str()], None);
    let token = server.admin_token(target.path()).await;
    assert_eq!(answers(&server, &token).await, before);
    assert_ne!(sealed(&target_db), vec![Some("0".to_owned())]);
    // A position the source handed out does not open on the restored database; one of its own
    // does.
    let present = |position: String| {
        server
            .client
            .get(server.url("/models/dtmi:pg:Marker;1"))
            .bearer_auth(&token)
            .header("twinguard-min-position", position)
            .send()
    };
    assert_eq!(present(old_position).await.unwrap().status(), 400);
    let own = server
        .client
        .post(server.url("/models"))
        .bearer_auth(&token)
        .json(
            &json!([{"@context": "dtmi:dtdl:context;3", "@id": "dtmi:pg:Marker;2",
            "@type": "Interface"}]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 201);
    let own = own
        .headers()
        .get("twinguard-position")
        .map(|p| p.to_str().unwrap().to_owned());
    assert_eq!(
        present(own.expect("a write names its position"))
            .await
            .unwrap()
            .status(),
        200
    );
}

/// A bundle of a PostgreSQL instance carries every node's audit log as the database keeps it
/// (`docs/backup.md`): two nodes answer requests, both stop, node A's data directory is lost
/// whole, and a bundle taken from node B's restores into a new directory where each node's log
/// verifies with the key kept apart for that node, and holds the entry of every request that
/// node answered (found by its correlation ID). A node's log does not verify with the other
/// node's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_carries_every_nodes_audit_log_from_the_database_after_a_node_is_lost() {
    let Some((_db, url)) = crate::postgres::database() else {
        return;
    };
    let crate::postgres::Pair {
        first_dir,
        a,
        admin_a,
        second_dir,
        b,
        admin_b,
    } = crate::postgres::two_nodes(&["--store", url.as_str()]).await;
    let keep = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (keep.path().join("a.pub"), keep.path().join("b.pub"));
    std::fs::copy(first_dir.path().join("audit/checkpoint.pub"), &key_a).unwrap();
    std::fs::copy(second_dir.path().join("audit/checkpoint.pub"), &key_b).unwrap();

    let answered = crate::postgres::answered_in_turn([(&a, &admin_a), (&b, &admin_b)], 12).await;
    // A checkpoint covers every entry (one a second), then both stop and A's disk is lost.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    a.kill();
    b.kill();
    drop(first_dir);

    let bundle = keep.path().join("instance.bundle");
    let made = twinguard(
        &["backup", "--store", url.as_str(), "--data-dir"],
        &[second_dir.path(), Path::new("--out"), &bundle],
    );
    assert!(made.status.success(), "{}", text(&made));
    assert!(
        text(&made).contains("the audit logs of 2 nodes from the database"),
        "{}",
        text(&made)
    );
    let target = tempfile::tempdir().unwrap();
    let restored = restore(&bundle, &key_b, target.path(), &[]);
    assert!(restored.status.success(), "{}", text(&restored));
    let archive = archived_trail(target.path());

    let verify = |log: &Path, key: &Path| {
        twinguard(
            &["audit", "verify", "--log"],
            &[log, Path::new("--key"), key],
        )
    };
    for (key, ids) in [(&key_a, &answered[0]), (&key_b, &answered[1])] {
        let node = twinguard_server::audit::node_name(&std::fs::read_to_string(key).unwrap());
        let log = archive.join("nodes").join(&node);
        let checked = verify(&log, key);
        assert!(checked.status.success(), "node {node}: {}", text(&checked));
        assert!(
            text(&checked).contains("signed checkpoints, all consistent"),
            "{}",
            text(&checked)
        );
        let entries = std::fs::read_to_string(log.join("entries.jsonl")).unwrap();
        for id in ids {
            assert_eq!(
                entries.matches(id.as_str()).count(),
                1,
                "node {node}: the entry of request {id}"
            );
        }
        let other = if key == &key_a { &key_b } else { &key_a };
        assert!(!verify(&log, other).status.success(), "node {node}");
    }
    assert_eq!(
        std::fs::read_dir(archive.join("nodes")).unwrap().count(),
        2,
        "one log per node"
    );
}
