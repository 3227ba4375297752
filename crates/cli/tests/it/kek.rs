//! `twinguard kek`: the key-encryption key of a PostgreSQL instance rotated while two nodes
//! serve (`docs/storage.md`, "Rotating the key-encryption key").

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use twinguard_store_postgres::testdb::TestDatabase;

use crate::postgres::{Pair, copy_node_files, database, read_twin, sealed_records, two_nodes};
use crate::process::Server;

fn kek(data_dir: &Path, url: &str, step: &str) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .args(["kek", "--data-dir"])
        .arg(data_dir)
        .args(["--store", url, step])
        .output()
        .unwrap()
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The KEK IDs the store's sealed records carry (bytes 5 to 12 of each, after `TGS1`).
fn keys_in_use(db: &TestDatabase) -> Vec<String> {
    db.query(
        "SELECT DISTINCT encode(substring(value from 5 for 8), 'hex') FROM records \
         WHERE tbl = 'secrets' ORDER BY 1",
    )
    .unwrap()
    .into_iter()
    .flatten()
    .collect()
}

/// Replaces `to`'s KEK file with `from`'s, as an operator copies it to a node.
fn give_kek_file(from: &Path, to: &Path) {
    let target = to.join("secrets/instance.kek");
    std::fs::write(
        &target,
        std::fs::read(from.join("secrets/instance.kek")).unwrap(),
    )
    .unwrap();
}

/// Both nodes answer reads with the other's token all along: `failures` counts any other
/// answer, `served` the reads.
fn keep_reading(
    pair: &Pair,
    stop: Arc<AtomicBool>,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
) {
    let served = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let nodes = [
        (
            pair.a.client.clone(),
            pair.a.url("/digitaltwins/kek-1"),
            pair.admin_b.clone(),
        ),
        (
            pair.b.client.clone(),
            pair.b.url("/digitaltwins/kek-1"),
            pair.admin_a.clone(),
        ),
    ];
    let task = {
        let (served, failures) = (served.clone(), failures.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (client, url, token) in &nodes {
                    let answer = client.get(url).bearer_auth(token).send().await;
                    match answer {
                        Ok(r) if r.status() == 200 => served.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("{url}: {other:?}");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    (task, served, failures)
}

/// The operator adds a key on node A, copies A's file to B, rotates and retires while both
/// serve: reads with tokens issued before go on being answered on both nodes throughout;
/// afterwards every sealed record carries the new key's ID alone, both nodes took the re-sealed
/// token keys without complaint, a node restarted on the new file serves with the instance's
/// keys, and a node given the old file is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_encryption_key_rotates_while_the_nodes_serve() {
    let Some((db, url)) = database() else {
        return;
    };
    let flags = ["--store", url.as_str()];
    let pair = two_nodes(&flags).await;
    let (first, second) = (pair.first_dir.path(), pair.second_dir.path());
    pair.a
        .upload_interface(&pair.admin_a, "dtmi:kek:Thing;1")
        .await;
    let response = pair
        .a
        .client
        .put(pair.a.url("/digitaltwins/kek-1"))
        .bearer_auth(&pair.admin_a)
        .json(&serde_json::json!({"$metadata": {"$model": "dtmi:kek:Thing;1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // B follows A's write before the reads begin (a follow step is 100 ms).
    for _ in 0..50 {
        if read_twin(&pair.b, &pair.admin_b, "kek-1").await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = sealed_records(&db);
    let old = keys_in_use(&db);
    assert_eq!(old.len(), 1);
    let old_files = tempfile::tempdir().unwrap();
    copy_node_files(first, old_files.path());

    let stop = Arc::new(AtomicBool::new(false));
    let (reading, served, failures) = keep_reading(&pair, stop.clone());

    let added = kek(first, &url, "add");
    assert!(added.status.success(), "{}", said(&added));
    let new = said(&added).split_whitespace().nth(3).unwrap().to_owned();
    assert_eq!(new.len(), 16, "{}", said(&added));
    assert_eq!(keys_in_use(&db), old, "adding a key seals nothing");
    give_kek_file(first, second);

    let rotated = kek(first, &url, "rotate");
    assert!(rotated.status.success(), "{}", said(&rotated));
    assert!(
        said(&rotated).contains(&format!(
            "Sealed {} records again under key-encryption key {new}",
            records.len()
        )),
        "{}",
        said(&rotated)
    );
    assert_eq!(keys_in_use(&db), std::slice::from_ref(&new));
    assert_eq!(
        sealed_records(&db),
        records,
        "the same records, none in the clear"
    );

    // The nodes follow the re-sealed token keys (a follow step is 100 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retired = kek(first, &url, "retire");
    assert!(retired.status.success(), "{}", said(&retired));
    assert!(
        said(&retired).contains(&format!("Removed key-encryption keys {}", old[0])),
        "{}",
        said(&retired)
    );
    give_kek_file(first, second);
    assert_eq!(
        std::fs::read_to_string(first.join("secrets/instance.kek"))
            .unwrap()
            .lines()
            .count(),
        1
    );

    stop.store(true, Ordering::Relaxed);
    reading.await.unwrap();
    let (served, failures) = (
        served.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    eprintln!("reads answered during the rotation: {served}, others: {failures}");
    assert!(served >= 20, "{served}");
    assert_eq!(failures, 0);
    for dir in [first, second] {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
        assert!(!log.contains("were not taken"), "{log}");
    }

    // B again, on its new file: the instance's CA and token keys.
    let Pair { a, admin_a, b, .. } = pair;
    drop(b);
    let b = Server::start_with(second, &flags, None);
    let (status, twin) = read_twin(&b, &admin_a, "kek-1").await;
    assert_eq!(status, 200, "{twin}");
    let (status, _) = read_twin(&a, &admin_a, "kek-1").await;
    assert_eq!(status, 200);

    // A node given the file from before the rotation opens nothing.
    let refused = Server::start_refused(old_files.path(), &flags);
    assert!(!refused.status.success());
    let refused = String::from_utf8_lossy(&refused.stderr);
    assert!(refused.contains("another key-encryption key"), "{refused}");
    assert_eq!(
        keys_in_use(&db),
        [new],
        "nothing sealed under the old key again"
    );
}
