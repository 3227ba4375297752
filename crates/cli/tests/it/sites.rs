//! Two sites (RS-3): nodes over a PostgreSQL primary with a synchronous standby
//! (`synchronous_commit = remote_apply`), both clusters of the test's own. The primary's site is
//! lost under a write load (stopped at once), the standby is promoted, and the nodes, whose URL
//! names both hosts with `target_session_attrs=read-write`, reconnect to it by themselves.
//! And a node that applied commits a promoted standby never had finds, by itself, that the
//! database now holds another history.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::ownpg::{Cluster, free_port};
use crate::postgres::{read_twin, start_copy};
use crate::process::Server;

/// What the writers saw: the twins acknowledged (with when), and the attempts that failed.
#[derive(Default)]
struct Load {
    acknowledged: Vec<(String, Instant)>,
    failed: usize,
}

/// Writes twins `{name}-0`, `{name}-1`, ... to `server` until `stop`, each until acknowledged
/// (a failure is retried after 100 ms, as a client would), recording each acknowledgement.
async fn write_until(server: &Server, token: &str, name: &str, stop: Instant, load: &Mutex<Load>) {
    let mut i = 0;
    while Instant::now() < stop {
        let id = format!("{name}-{i}");
        let answer = server
            .client
            .put(server.url(&format!("/digitaltwins/{id}")))
            .bearer_auth(token)
            .json(&json!({"$metadata": {"$model": "dtmi:site:Pump;1"}}))
            .send()
            .await;
        let acknowledged = answer.is_ok_and(|r| r.status() == 200);
        {
            let mut load = load.lock().unwrap();
            match acknowledged {
                true => load.acknowledged.push((id, Instant::now())),
                false => load.failed += 1,
            }
        }
        match acknowledged {
            true => i += 1,
            false => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Two nodes over a primary and its synchronous standby, four writers through them. After
/// 3 s the link between the sites drops (the standby stops receiving), a second later the primary is stopped at once and the standby promoted; the writers go on
/// for 12 s.
/// Every write acknowledged, before the loss or after, is read on both nodes and on a third
/// node started afterwards on the promoted standby alone, which has only the database to go
/// by; the nodes take writes again after the promotion by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_promoted_under_write_load_has_every_acknowledged_write() {
    if twinguard_store_postgres::testdb::skipped() {
        return;
    }
    let (primary_port, standby_port) = (free_port(), free_port());
    let rules = [
        "local all postgres trust",
        "local replication postgres trust",
        "host all postgres 127.0.0.1/32 trust",
    ]
    .map(str::to_owned);
    let mut primary = Cluster::init(primary_port);
    primary.allow(&rules);
    primary.start(
        &[
            ("listen_addresses", "127.0.0.1"),
            ("synchronous_standby_names", "site_b"),
            ("synchronous_commit", "remote_apply"),
        ],
        None,
    );
    let mut standby = Cluster::standby_of(&primary, "site_b", standby_port);
    standby.start(&[("listen_addresses", "127.0.0.1")], None);
    let started = Instant::now();
    while primary
        .sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'site_b'")
        .trim()
        != "sync"
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the standby is not synchronous: {}",
            standby.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let url = format!(
        "postgresql://postgres@127.0.0.1:{primary_port},127.0.0.1:{standby_port}/postgres\
         ?target_session_attrs=read-write"
    );
    let flags = ["--store", url.as_str()];
    let first = tempfile::tempdir().unwrap();
    let a = Server::start_with(first.path(), &flags, None);
    let token_a = a.admin_token(first.path()).await;
    let (_second, b, token_b) = start_copy(first.path(), &flags).await;
    a.upload_interface(&token_a, "dtmi:site:Pump;1").await;

    let load = Arc::new(Mutex::new(Load::default()));
    let lost_at = Instant::now() + Duration::from_secs(4);
    let stop = lost_at + Duration::from_secs(12);
    let writers = async {
        tokio::join!(
            write_until(&a, &token_a, "a1", stop, &load),
            write_until(&a, &token_a, "a2", stop, &load),
            write_until(&b, &token_b, "b1", stop, &load),
            write_until(&b, &token_b, "b2", stop, &load),
        )
    };
    let failover = async {
        // The link between the sites goes first, a second before the primary's site: the
        // standby stops receiving (its primary is forgotten). Writes acknowledged in that
        // second would be on the primary alone.
        tokio::time::sleep_until((lost_at - Duration::from_secs(1)).into()).await;
        tokio::task::block_in_place(|| {
            standby.sql("ALTER SYSTEM SET primary_conninfo = ''");
            standby.sql("SELECT pg_reload_conf()");
        });
        tokio::time::sleep_until(lost_at.into()).await;
        let lost = tokio::task::block_in_place(|| {
            primary.stop_at_once();
            let lost = Instant::now();
            standby.promote();
            lost
        });
        (lost, lost.elapsed())
    };
    let (_, (lost, promoted_in)) = tokio::join!(writers, failover);

    let load = std::mem::take(&mut *load.lock().unwrap());
    let before = load
        .acknowledged
        .iter()
        .filter(|(_, at)| *at < lost)
        .count();
    let after = load.acknowledged.len() - before;
    let first_after = load
        .acknowledged
        .iter()
        .map(|(_, at)| *at)
        .filter(|at| *at > lost)
        .min()
        .map(|at| at - lost);
    assert!(before >= 10, "{before} writes acknowledged before the loss");
    // Each node took writes again by itself, though the other writes on as fast as it can
    // (the commit turn: `docs/storage.md`, "The commit fence").
    let mut per_node = Vec::new();
    for node in ["a", "b"] {
        let taken = load
            .acknowledged
            .iter()
            .filter(|(id, at)| id.starts_with(node) && *at > lost)
            .count();
        per_node.push(taken);
        assert!(
            taken >= 5,
            "node {node} acknowledged {taken} writes after the promotion: {}",
            standby.log()
        );
    }

    // Both nodes back in service, and each current with the other's last writes.
    let settled = Instant::now();
    for server in [&a, &b] {
        while server.readiness().await.0 != 200 {
            assert!(
                settled.elapsed() < Duration::from_secs(30),
                "a node is not ready again"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A node that starts now has only the promoted standby to go by.
    let standby_url = format!("postgresql://postgres@127.0.0.1:{standby_port}/postgres");
    let (_third, c, token_c) = start_copy(first.path(), &["--store", standby_url.as_str()]).await;
    let mut missing = Vec::new();
    for (id, _) in &load.acknowledged {
        for (node, server, token) in [
            ("A", &a, &token_a),
            ("B", &b, &token_b),
            ("C", &c, &token_c),
        ] {
            if read_twin(server, token, id).await.0 != 200 {
                missing.push(format!("{id} on {node}"));
            }
        }
    }
    assert!(missing.is_empty(), "acknowledged and lost: {missing:?}");
    println!(
        "primary lost after {before} acknowledged writes; promoted in {promoted_in:?}; first \
         write acknowledged {first_after:?} after the loss; {after} after it ({} by A, {} by B); \
         {} attempts failed and were retried; all {} on the two nodes and on a new one over the promoted \
         standby",
        per_node[0],
        per_node[1],
        load.failed,
        load.acknowledged.len()
    );
}

/// The rules the clusters of these tests take connections by: the postgres user, over their
/// sockets and loopback.
fn trusted() -> [String; 3] {
    [
        "local all postgres trust",
        "local replication postgres trust",
        "host all postgres 127.0.0.1/32 trust",
    ]
    .map(str::to_owned)
}

/// Waits up to 30 s for `done`, failing with `what` and `log`.
async fn settle(what: &str, log: impl Fn() -> String, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: {}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The commit counter of the cluster's database (without its timeline).
fn counter(cluster: &Cluster) -> u64 {
    cluster
        .sql("SELECT seq FROM twinguard_head")
        .trim()
        .parse()
        .unwrap()
}

/// An application identity made through `server`: its client ID and secret.
async fn new_application(server: &Server, token: &str, name: &str) -> (String, String) {
    let made: serde_json::Value = server
        .request(
            token,
            reqwest::Method::POST,
            "/admin/identities",
            json!({"kind": "application", "name": name, "groups": []}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        made["identity"]["id"].as_str().unwrap().to_owned(),
        made["clientSecret"].as_str().unwrap().to_owned(),
    )
}

/// The token endpoint's status for an application's credentials.
async fn token_status(server: &Server, (id, secret): &(String, String)) -> u16 {
    server
        .client_token_request(id, secret)
        .await
        .status()
        .as_u16()
}

async fn put_twin(server: &Server, token: &str, id: &str) -> u16 {
    server
        .request(
            token,
            reqwest::Method::PUT,
            &format!("/digitaltwins/{id}?api-version=2023-10-31"),
            json!({"$metadata": {"$model": "dtmi:site:Pump;1"}}),
        )
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Node A works on a primary whose standby stops receiving, and applies a twin and an
/// application there that the standby never gets (an asynchronous standby's last second, or
/// a commit the primary showed before its synchronous standby had it). The primary's site is
/// lost, the standby promoted, and node B writes the new history on it: a twin, then
/// applications until its commit counter has passed where A stood, so that the numbers alone
/// look like the history A knew, moved on. Only then can A reach the promoted standby (it is
/// moved to the primary's address). By itself A must forget what was lost (the twin is not
/// found, the application gets no token), have everything of the new history (B's twin and
/// applications), and take writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_applied_commits_a_promoted_standby_never_had_forgets_them() {
    if twinguard_store_postgres::testdb::skipped() {
        return;
    }
    let (primary_port, standby_port) = (free_port(), free_port());
    let listen = [("listen_addresses", "127.0.0.1")];
    let mut primary = Cluster::init(primary_port);
    primary.allow(&trusted());
    primary.start(&listen, None);
    let mut standby = Cluster::standby_of(&primary, "site_b", standby_port);
    standby.start(&listen, None);
    let streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'";
    settle(
        "the standby does not stream",
        || standby.log(),
        async || primary.sql(streaming).trim() == "1",
    )
    .await;

    let primary_url = format!("postgresql://postgres@127.0.0.1:{primary_port}/postgres");
    let first = tempfile::tempdir().unwrap();
    let a = Server::start_with(first.path(), &["--store", primary_url.as_str()], None);
    let token_a = a.admin_token(first.path()).await;
    a.upload_interface(&token_a, "dtmi:site:Pump;1").await;
    assert_eq!(put_twin(&a, &token_a, "before").await, 200);
    let before = new_application(&a, &token_a, "before").await;
    let shipped = primary.sql("SELECT pg_current_wal_lsn()");
    settle(
        "the standby does not catch up",
        || standby.log(),
        async || {
            standby.sql(&format!(
                "SELECT pg_last_wal_replay_lsn() >= '{}'::pg_lsn",
                shipped.trim()
            )) == "t\n"
        },
    )
    .await;

    // The link drops: what A applies from here on, the standby never gets.
    standby.sql("ALTER SYSTEM SET primary_conninfo = ''");
    standby.sql("SELECT pg_reload_conf()");
    settle(
        "the standby still streams",
        || standby.log(),
        async || primary.sql(streaming).trim() == "0",
    )
    .await;
    assert_eq!(put_twin(&a, &token_a, "lost").await, 200);
    let lost = new_application(&a, &token_a, "lost").await;
    assert_eq!(token_status(&a, &lost).await, 200);
    let stood = counter(&primary);
    primary.stop_at_once();
    standby.promote();
    let promoted_at = counter(&standby);
    assert!(promoted_at < stood, "the standby has A's last commits");

    // The new history, written by B over the promoted standby at its own address.
    let standby_url = format!("postgresql://postgres@127.0.0.1:{standby_port}/postgres");
    let (_second, b, token_b) = start_copy(first.path(), &["--store", standby_url.as_str()]).await;
    assert_eq!(put_twin(&b, &token_b, "kept").await, 200);
    let mut made = Vec::new();
    while counter(&standby) <= stood + 1 {
        let name = format!("new-{}", made.len());
        made.push(new_application(&b, &token_b, &name).await);
    }
    let passed = counter(&standby);
    b.kill();
    // A's address now leads to the new history.
    standby.restart_on(primary_port, &listen);

    settle(
        "A is not ready again",
        || standby.log(),
        async || a.readiness().await.0 == 200,
    )
    .await;
    settle(
        "A kept the lost twin or lacks the new history's",
        || standby.log(),
        async || {
            read_twin(&a, &token_a, "kept").await.0 == 200
                && read_twin(&a, &token_a, "lost").await.0 == 404
        },
    )
    .await;
    assert_eq!(read_twin(&a, &token_a, "before").await.0, 200);
    assert_eq!(
        token_status(&a, &before).await,
        200,
        "an application made before"
    );
    for application in &made {
        assert_eq!(
            token_status(&a, application).await,
            200,
            "an application of the new history"
        );
    }
    let refused = token_status(&a, &lost).await;
    assert!(
        (400..500).contains(&refused),
        "the lost application got {refused}"
    );
    assert_eq!(put_twin(&a, &token_a, "after").await, 200);
    println!(
        "A stood at commit {stood}, the promoted standby at {promoted_at}, and at {passed} \
         after B made a twin and {} applications; A forgot the lost twin and application and \
         has the new history",
        made.len()
    );
}
