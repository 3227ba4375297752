//! Two sites (RS-3): nodes over a PostgreSQL primary with a synchronous standby
//! (`synchronous_commit = remote_apply`), both clusters of the test's own. The primary's site is
//! lost under a write load (stopped at once), the standby is promoted, and the nodes, whose URL
//! names both hosts with `target_session_attrs=read-write`, reconnect to it by themselves.

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
    // Each node took writes again by itself.
    for node in ["a", "b"] {
        let taken = load
            .acknowledged
            .iter()
            .filter(|(id, at)| id.starts_with(node) && *at > lost)
            .count();
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
         write acknowledged {first_after:?} after the loss; {after} after it; {} attempts \
         failed and were retried; all {} on the two nodes and on a new one over the promoted \
         standby",
        load.failed,
        load.acknowledged.len()
    );
}
