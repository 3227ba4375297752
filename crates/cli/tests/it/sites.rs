//! Two sites (RS-3): nodes over a PostgreSQL primary with a synchronous standby
//! (`synchronous_commit = remote_apply`), both clusters of the test's own. The primary's site is
//! lost under a write load (stopped at once), the standby is promoted, and the nodes, whose URL
//! names both hosts with `target_session_attrs=read-write`, reconnect to it by themselves.
//! And a node that applied commits a promoted standby never had finds, by itself, that the
//! database now holds another history.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use crate::ownpg::{Cluster, free_port};
use crate::postgres::{read_twin, start_copy};
use crate::process::Server;

/// What the writers saw: the twins acknowledged (with when), the attempts that failed, and
/// of those the ones that got no answer at all (the client gave up after its 20 s), and how
/// long the slowest refusal took.
#[derive(Default)]
struct Load {
    acknowledged: Vec<(String, Instant)>,
    failed: usize,
    unanswered: usize,
    slowest_refusal: Duration,
}

/// Writes twins `{name}-0`, `{name}-1`, ... to `server` until `stop`, each until acknowledged
/// (a failure is retried after 100 ms, as a client would), recording each acknowledgement.
async fn write_until(server: &Server, token: &str, name: &str, stop: Instant, load: &Mutex<Load>) {
    let mut i = 0;
    while Instant::now() < stop {
        let id = format!("{name}-{i}");
        let sent = Instant::now();
        let answer = server
            .client
            .put(server.url(&format!("/digitaltwins/{id}")))
            .bearer_auth(token)
            .json(&json!({"$metadata": {"$model": "dtmi:site:Pump;1"}}))
            .send()
            .await;
        let acknowledged = answer.as_ref().is_ok_and(|r| r.status() == 200);
        {
            let mut load = load.lock().unwrap();
            match acknowledged {
                true => load.acknowledged.push((id, Instant::now())),
                false => {
                    load.failed += 1;
                    load.unanswered += usize::from(answer.is_err());
                    load.slowest_refusal = load.slowest_refusal.max(sent.elapsed());
                }
            }
        }
        match acknowledged {
            true => i += 1,
            false => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Two writers through each node (`a1`, `a2` through A; `b1`, `b2` through B) until `stop`.
async fn two_writers_each(
    (a, token_a): (&Server, &str),
    (b, token_b): (&Server, &str),
    stop: Instant,
    load: &Mutex<Load>,
) {
    tokio::join!(
        write_until(a, token_a, "a1", stop, load),
        write_until(a, token_a, "a2", stop, load),
        write_until(b, token_b, "b1", stop, load),
        write_until(b, token_b, "b2", stop, load),
    );
}

/// Stops `cluster` at once at `at`, as a lost site: when the stop began (requests sent from
/// then on may meet the outage) and when it ended.
async fn lose_site(cluster: &Cluster, at: Instant) -> (Instant, Instant) {
    tokio::time::sleep_until(at.into()).await;
    let losing = Instant::now();
    tokio::task::block_in_place(|| cluster.stop_at_once());
    (losing, Instant::now())
}

/// The standby's settings: it listens on loopback.
const STANDBY: [(&str, &str); 1] = [("listen_addresses", "127.0.0.1")];

/// A primary and its synchronous standby `site_b` (`remote_apply`), two clusters of the test's
/// own, with the standby confirmed synchronous; and the URL nodes reach them by, naming both
/// with `target_session_attrs=read-write`.
fn synchronous_sites() -> (Cluster, Cluster, String) {
    let (primary_port, standby_port) = (free_port(), free_port());
    let mut primary = Cluster::init(primary_port);
    primary.allow(&trusted());
    primary.start(&[("listen_addresses", "127.0.0.1")], None);
    let mut standby = Cluster::standby_of(&primary, "site_b", standby_port);
    // In the primary's configuration, where the operator can change them (not on its command
    // line), and after the base backup, so that a promoted standby waits for no standby.
    primary.sql("ALTER SYSTEM SET synchronous_standby_names = 'site_b'");
    primary.sql("ALTER SYSTEM SET synchronous_commit = 'remote_apply'");
    primary.sql("SELECT pg_reload_conf()");
    standby.start(&STANDBY, None);
    wait_synchronous(&primary, &standby);
    let url = format!(
        "postgresql://postgres@127.0.0.1:{primary_port},127.0.0.1:{standby_port}/postgres\
         ?target_session_attrs=read-write"
    );
    (primary, standby, url)
}

/// Waits up to 30 s until the primary names `site_b` its synchronous standby.
fn wait_synchronous(primary: &Cluster, standby: &Cluster) {
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
    let (primary, standby, url) = synchronous_sites();
    let standby_port = standby.port();
    let (first, _second, (a, token_a), (b, token_b)) = two_nodes(&url).await;

    let load = Arc::new(Mutex::new(Load::default()));
    let lost_at = Instant::now() + Duration::from_secs(4);
    let stop = lost_at + Duration::from_secs(12);
    let writers = two_writers_each((&a, &token_a), (&b, &token_b), stop, &load);
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
        while server.readiness(None).await.0 != 200 {
            assert!(
                settled.elapsed() < Duration::from_secs(30),
                "a node is not ready again"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_every_write_on_them_and_a_new_node(
        &load,
        first.path(),
        standby_port,
        [(&a, &token_a), (&b, &token_b)],
    )
    .await;
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
        async || a.readiness(None).await.0 == 200,
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

/// Two nodes over `url`, A and B (started from a copy of A's files), with the interface the
/// writers' twins use: the data directories, and each node with an administrator's token.
async fn two_nodes(url: &str) -> (TempDir, TempDir, (Server, String), (Server, String)) {
    let flags = ["--store", url];
    let first = tempfile::tempdir().unwrap();
    let a = Server::start_with(first.path(), &flags, None);
    let token_a = a.admin_token(first.path()).await;
    let (second, b, token_b) = start_copy(first.path(), &flags).await;
    a.upload_interface(&token_a, "dtmi:site:Pump;1").await;
    (first, second, (a, token_a), (b, token_b))
}

/// Asserts that every acknowledged write is served by each of `nodes` (name, server, token).
async fn assert_every_write_on(load: &Load, nodes: &[(&str, &Server, &String)]) {
    let mut missing = Vec::new();
    for (id, _) in &load.acknowledged {
        for (node, server, token) in nodes {
            if read_twin(server, token, id).await.0 != 200 {
                missing.push(format!("{id} on {node}"));
            }
        }
    }
    assert!(missing.is_empty(), "acknowledged and lost: {missing:?}");
}

/// Asserts that every acknowledged write is served by A and B (with their tokens) and by a node that
/// starts now from a copy of `first`'s files over the promoted standby on `port` alone, which
/// has only the database to go by.
async fn assert_every_write_on_them_and_a_new_node(
    load: &Load,
    first: &std::path::Path,
    port: u16,
    [(a, token_a), (b, token_b)]: [(&Server, &String); 2],
) {
    let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres");
    let (_third, c, token_c) = start_copy(first, &["--store", url.as_str()]).await;
    assert_every_write_on(
        load,
        &[("A", a, token_a), ("B", b, token_b), ("C", &c, &token_c)],
    )
    .await;
}

/// Whether any write was acknowledged between `from` and `to`.
fn acknowledged_between(load: &Load, from: Instant, to: Instant) -> Vec<String> {
    load.acknowledged
        .iter()
        .filter(|(_, at)| *at > from && *at < to)
        .map(|(id, _)| id.clone())
        .collect()
}

/// How many writes of node `node` (its writers' names start with it) were acknowledged in the
/// 5 s after `from`.
fn acknowledged_by_within(load: &Load, node: &str, from: Instant) -> usize {
    let to = from + Duration::from_secs(5);
    load.acknowledged
        .iter()
        .filter(|(id, at)| id.starts_with(node) && *at > from && *at < to)
        .count()
}

/// The standby's site is lost, twice, under a write load through two nodes over a primary
/// whose one synchronous standby it is. The primary cannot confirm a commit without it: no
/// write is acknowledged until the standby is back (the first time) or until the operator
/// drops it from `synchronous_standby_names` (the second), and every request meanwhile is
/// answered (503 once its audit entry or its commit is not confirmed within 10 s), not left
/// hanging; reads before and after are served. Each node takes writes again
/// by itself within 5 s of either, and every acknowledged write is then on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_standbys_site_stops_acknowledgements_until_it_is_back_or_dropped() {
    if twinguard_store_postgres::testdb::skipped() {
        return;
    }
    let (primary, mut standby, url) = synchronous_sites();
    let (first, _second, (a, token_a), (b, token_b)) = two_nodes(&url).await;
    assert_eq!(put_twin(&a, &token_a, "before").await, 200);
    settle("B does not read A's twin", String::new, async || {
        read_twin(&b, &token_b, "before").await.0 == 200
    })
    .await;

    let load = Arc::new(Mutex::new(Load::default()));
    let start = Instant::now();
    let at = |secs: u64| start + Duration::from_secs(secs);
    // The first outage outlasts the clients' 20 s timeout; the second is short.
    let (lost_at, back_at, lost_again_at, dropped_at) = (at(3), at(25), at(30), at(37));
    let stop = at(42);
    let writers = two_writers_each((&a, &token_a), (&b, &token_b), stop, &load);
    // Reads of a twin written before, on both nodes, all along: when each was sent, its
    // status (none: no answer within the client's 20 s), and how long the answer took.
    let reads = async {
        let mut reads = Vec::new();
        while Instant::now() < stop {
            for (server, token) in [(&a, &token_a), (&b, &token_b)] {
                let sent = Instant::now();
                let answer = server
                    .client
                    .get(server.url("/digitaltwins/before"))
                    .bearer_auth(token)
                    .send()
                    .await;
                let took = sent.elapsed();
                let (status, said) = match answer {
                    Ok(r) => (
                        Some(r.status().as_u16()),
                        r.text().await.unwrap_or_default(),
                    ),
                    Err(_) => (None, String::new()),
                };
                reads.push((sent, status, took, said));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        reads
    };
    // Administration on A across the first loss: an identity created every 500 ms, from
    // before the loss to the standby's return, so that some edit is committing when the
    // standby goes. The database holds that commit; A must go on answering its reads
    // meanwhile, since every request reads the identity directory such an edit changes. Each:
    // when it was sent, its status (none: no answer within the client's 20 s), how long it took.
    let administration = async {
        let mut edits = tokio::task::JoinSet::new();
        let mut tick = lost_at - Duration::from_millis(1500);
        for n in 0.. {
            if tick >= back_at {
                break;
            }
            tokio::time::sleep_until(tick.into()).await;
            let body = json!({"kind": "serviceAccount", "name": format!("made-in-outage-{n}")});
            let request = a.request(&token_a, reqwest::Method::POST, "/admin/identities", body);
            edits.spawn(async move {
                let sent = Instant::now();
                let answer = request.await;
                (
                    sent,
                    answer.ok().map(|r| r.status().as_u16()),
                    sent.elapsed(),
                )
            });
            tick += Duration::from_millis(500);
        }
        edits.join_all().await
    };
    // Readiness of both nodes, every 500 ms: when each probe was sent, its status and body.
    let probes = async {
        let mut probes = Vec::new();
        while Instant::now() < stop {
            for (server, token) in [(&a, &token_a), (&b, &token_b)] {
                let sent = Instant::now();
                let probe = server.client.get(server.url("/readyz")).bearer_auth(token);
                let answer = probe.send().await;
                let (status, body) = match answer {
                    Ok(r) => (
                        Some(r.status().as_u16()),
                        r.json::<serde_json::Value>().await.unwrap_or_default(),
                    ),
                    Err(_) => (None, serde_json::Value::Null),
                };
                probes.push((sent, status, body));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        probes
    };
    let sites = async {
        let (losing, lost) = lose_site(&standby, lost_at).await;
        tokio::time::sleep_until(back_at.into()).await;
        // The outage ends as the standby starts: it takes the primary's stream, and the held
        // commits are released, before `start` returns and `back` is taken.
        let returning = Instant::now();
        let back = tokio::task::block_in_place(|| {
            standby.start(&STANDBY, None);
            let back = Instant::now();
            wait_synchronous(&primary, &standby);
            back
        });
        let (losing_again, lost_again) = lose_site(&standby, lost_again_at).await;
        tokio::time::sleep_until(dropped_at.into()).await;
        // Likewise the second ends as the operator starts dropping the standby.
        let dropping = Instant::now();
        let dropped = tokio::task::block_in_place(|| {
            primary.sql("ALTER SYSTEM SET synchronous_standby_names = ''");
            primary.sql("SELECT pg_reload_conf()");
            Instant::now()
        });
        (
            losing,
            lost,
            returning,
            back,
            losing_again,
            lost_again,
            dropping,
            dropped,
        )
    };
    let (
        _,
        reads,
        administered,
        probes,
        (losing, lost, returning, back, losing_again, lost_again, dropping, dropped),
    ) = tokio::join!(writers, reads, administration, probes, sites);
    let load = std::mem::take(&mut *load.lock().unwrap());

    // A commit the standby confirmed just before it went is acknowledged just after.
    let slack = Duration::from_millis(500);
    let first_outage = acknowledged_between(&load, lost + slack, returning);
    let second_outage = acknowledged_between(&load, lost_again + slack, dropping);
    assert!(
        first_outage.is_empty(),
        "acknowledged without the standby: {first_outage:?}"
    );
    assert!(
        second_outage.is_empty(),
        "acknowledged without the standby: {second_outage:?}"
    );
    assert_eq!(
        load.unanswered, 0,
        "writes left unanswered by the client's 20 s"
    );
    // Every read is answered; outside the outages each is served. A second's margin on each
    // side: a read sent just before the loss may have its audit entry written just after.
    let margin = Duration::from_secs(1);
    let settled = |at: Instant| {
        at + margin < losing
            || (at > back + margin && at + margin < losing_again)
            || at > dropped + margin
    };
    let unanswered = reads
        .iter()
        .filter(|(_, status, ..)| status.is_none())
        .count();
    assert_eq!(unanswered, 0, "reads left unanswered by the client's 20 s");
    let refused: Vec<_> = reads
        .iter()
        .filter(|(at, status, ..)| settled(*at) && *status != Some(200))
        .map(|(at, status, took, said)| {
            format!("{status:?} at {:?} after {took:?}: {said}", *at - start)
        })
        .collect();
    if !refused.is_empty() {
        for dir in [first.path(), _second.path()] {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            eprintln!(
                "{}",
                log.lines()
                    .filter(|l| l.contains("audit"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert!(
        refused.is_empty(),
        "reads refused outside the outages: {refused:?}"
    );
    let refused_in_outages = reads.iter().filter(|(_, s, ..)| *s == Some(503)).count();
    // Readiness: from a second past the bound of a held commit (5 s) into the first outage
    // until the standby returns, each node reports its audit trail's commits held (every
    // request waits for its entry there; the twin writer's commit is held only when a write
    // reached it), and is not ready; before the loss and a second after each way out, it is
    // ready.
    let held_from = lost + twinguard_server::routes::health::HELD_COMMIT + margin;
    let (mut held_probes, mut store_held) = (0, 0);
    let mut wrong_probes = Vec::new();
    for (sent, status, body) in &probes {
        let at = format!("{:?}", *sent - start);
        if *sent > held_from && *sent + margin < returning {
            held_probes += 1;
            store_held += usize::from(body["store"] == "held");
            if *status != Some(503) || body["audit"] != "held" || body["status"] != "not ready" {
                wrong_probes.push(format!("in the outage at {at}: {status:?} {body}"));
            }
        } else if settled(*sent) && *status != Some(200) {
            wrong_probes.push(format!("outside the outages at {at}: {status:?} {body}"));
        }
    }
    assert!(
        held_probes >= 20,
        "{held_probes} probes while commits were held"
    );
    assert!(wrong_probes.is_empty(), "readiness: {wrong_probes:?}");
    // Every edit was answered; none acknowledged without the standby.
    let unanswered_edits = administered.iter().filter(|(_, s, _)| s.is_none()).count();
    assert_eq!(
        unanswered_edits, 0,
        "edits left unanswered by the client's 20 s"
    );
    let edits_acknowledged: Vec<_> = administered
        .iter()
        .filter(|(sent, status, took)| {
            let answered = *sent + *took;
            *status == Some(201) && answered > lost + slack && answered < returning
        })
        .collect();
    assert!(
        edits_acknowledged.is_empty(),
        "edits acknowledged without the standby: {edits_acknowledged:?}"
    );
    let edits_refused = administered
        .iter()
        .filter(|(_, s, _)| *s == Some(503))
        .count();
    // Whether each took effect, both nodes agree.
    let listed = async |server: &Server, token: &str| {
        let listing: serde_json::Value = server
            .client
            .get(server.url("/admin/identities"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut names: Vec<String> = listing["value"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["name"].as_str())
            .filter(|n| n.starts_with("made-in-outage"))
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    };
    let made_on_a = listed(&a, &token_a).await;
    settle(
        "B lists other identities made in the outage than A",
        String::new,
        async || listed(&b, &token_b).await == made_on_a,
    )
    .await;
    // The first outage was longer than the bound: requests were refused, not held.
    assert!(refused_in_outages > 0, "no read refused in a 22 s outage");
    assert!(load.failed > 0, "no write refused in a 22 s outage");
    let slowest_read = reads
        .iter()
        .map(|(_, _, took, _)| *took)
        .max()
        .unwrap_or_default();
    let before = load
        .acknowledged
        .iter()
        .filter(|(_, at)| *at < lost)
        .count();
    assert!(before >= 10, "{before} writes acknowledged before the loss");
    let mut again = Vec::new();
    for from in [back, dropped] {
        for node in ["a", "b"] {
            let taken = acknowledged_by_within(&load, node, from);
            assert!(
                taken >= 5,
                "node {node} acknowledged {taken} writes within 5 s"
            );
            again.push(taken);
        }
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_every_write_on(&load, &[("A", &a, &token_a), ("B", &b, &token_b)]).await;
    println!(
        "/readyz on both nodes: 503 with the audit trail's commits held in all {held_probes} \
         probes from 6 s into the first outage ({store_held} with the store's held too), ready \
         outside the outages"
    );
    println!(
        "{before} writes acknowledged before the standby's loss; none during either outage; \
         within 5 s of its return {} by A and {} by B, of its dropping {} and {}; {} attempts \
         refused and retried, the slowest refusal after {:?}; of {} reads {refused_in_outages} \
         refused (503) during the outages, the slowest answered in {slowest_read:?}; all {} \
         acknowledged writes on both nodes; of {} identity creations on A across the \
         first loss {edits_refused} refused (503), the slowest answered in {:?}, and {} \
         identities exist on both nodes",
        again[0],
        again[1],
        again[2],
        again[3],
        load.failed,
        load.slowest_refusal,
        reads.len(),
        load.acknowledged.len(),
        administered.len(),
        administered
            .iter()
            .map(|(_, _, took)| *took)
            .max()
            .unwrap_or_default(),
        made_on_a.len(),
    );
}

/// Waits up to 30 s until the primary counts `standbys` standbys in its quorum (`ANY 1`).
fn wait_quorum(primary: &Cluster, standbys: usize) {
    let started = Instant::now();
    loop {
        let counted = primary
            .sql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'")
            .trim()
            .parse::<usize>()
            .unwrap_or(0);
        if counted == standbys {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{counted} standbys in the quorum, not {standbys}: {}",
            primary.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How far a standby has replayed the primary's WAL, in bytes.
fn replayed(standby: &Cluster) -> u128 {
    let bytes = standby.sql("SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')");
    bytes.trim().parse().unwrap_or_else(|_| panic!("{bytes}"))
}

/// Three sites: a primary and two standbys, `synchronous_standby_names = 'ANY 1 (site_b,
/// site_c)'` with `remote_apply`, so that a commit is acknowledged once either standby has
/// applied it. Under a write load through two nodes:
/// - site C is lost for 6 s: writes are acknowledged throughout, confirmed by B alone; C then
///   starts again and catches up;
/// - site B's link drops (C alone confirms from then on), and a second later the primary's
///   site is lost. The operator promotes the standby that replayed furthest, which must be C
///   (promoting B would lose the last second's acknowledged writes).
/// Every acknowledged write is then on both nodes and on a new node over the promoted standby
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_keep_writing_through_a_lost_standby_and_a_lost_primary() {
    if twinguard_store_postgres::testdb::skipped() {
        return;
    }
    let ports = [free_port(), free_port(), free_port()];
    let mut primary = Cluster::init(ports[0]);
    primary.allow(&trusted());
    primary.start(&[("listen_addresses", "127.0.0.1")], None);
    let mut site_b = Cluster::standby_of(&primary, "site_b", ports[1]);
    let mut site_c = Cluster::standby_of(&primary, "site_c", ports[2]);
    primary.sql("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (site_b, site_c)'");
    primary.sql("ALTER SYSTEM SET synchronous_commit = 'remote_apply'");
    primary.sql("SELECT pg_reload_conf()");
    site_b.start(&STANDBY, None);
    site_c.start(&STANDBY, None);
    wait_quorum(&primary, 2);
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}/postgres\
         ?target_session_attrs=read-write",
        ports[0], ports[1], ports[2]
    );
    let (first, _second, (a, token_a), (b, token_b)) = two_nodes(&url).await;

    let load = Arc::new(Mutex::new(Load::default()));
    let start = Instant::now();
    let at = |secs: u64| start + Duration::from_secs(secs);
    let (c_lost_at, c_back_at, b_cut_at, primary_lost_at, stop) =
        (at(3), at(9), at(14), at(15), at(22));
    let writers = two_writers_each((&a, &token_a), (&b, &token_b), stop, &load);
    let sites = async {
        let (_, c_lost) = lose_site(&site_c, c_lost_at).await;
        tokio::time::sleep_until(c_back_at.into()).await;
        let c_back = tokio::task::block_in_place(|| {
            site_c.start(&STANDBY, None);
            let back = Instant::now();
            wait_quorum(&primary, 2);
            back
        });
        tokio::time::sleep_until(b_cut_at.into()).await;
        tokio::task::block_in_place(|| {
            site_b.sql("ALTER SYSTEM SET primary_conninfo = ''");
            site_b.sql("SELECT pg_reload_conf()");
        });
        let (_, primary_lost) = lose_site(&primary, primary_lost_at).await;
        // The operator's choice: the standby that replayed furthest has every commit either
        // standby confirmed, since the WAL is one line.
        let promoted = tokio::task::block_in_place(|| {
            let (b_at, c_at) = (replayed(&site_b), replayed(&site_c));
            let promoted = if c_at > b_at { &site_c } else { &site_b };
            promoted.promote();
            (promoted.port(), b_at, c_at)
        });
        (c_lost, c_back, primary_lost, promoted)
    };
    let (_, (c_lost, c_back, primary_lost, (promoted_port, b_at, c_at))) =
        tokio::join!(writers, sites);
    let load = std::mem::take(&mut *load.lock().unwrap());

    assert_eq!(
        promoted_port, ports[2],
        "site B replayed as far as C ({b_at} and {c_at} bytes) though its link was cut"
    );
    // Writing went on while C was lost, through each node, and after the promotion.
    let mut taken = Vec::new();
    for (from, what) in [(c_lost, "site C's loss"), (primary_lost, "the promotion")] {
        for node in ["a", "b"] {
            let n = acknowledged_by_within(&load, node, from);
            assert!(
                n >= 5,
                "node {node} acknowledged {n} writes within 5 s of {what}"
            );
            taken.push(n);
        }
    }
    assert_eq!(
        load.unanswered, 0,
        "writes left unanswered by the client's 20 s"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_every_write_on_them_and_a_new_node(
        &load,
        first.path(),
        promoted_port,
        [(&a, &token_a), (&b, &token_b)],
    )
    .await;
    println!(
        "site C lost: within 5 s {} writes acknowledged by A and {} by B; C back after {:?}; \
         B's link cut, then the primary lost: C had replayed {} bytes more than B and was \
         promoted; within 5 s {} by A and {} by B; {} attempts refused and retried; all {} \
         acknowledged writes on both nodes and on a new one over the promoted standby",
        taken[0],
        taken[1],
        c_back - c_lost,
        c_at.saturating_sub(b_at),
        taken[2],
        taken[3],
        load.failed,
        load.acknowledged.len()
    );
}
