//! A node cut off from its database by the network rather than by the database: a PostgreSQL
//! of its own in a network namespace (Debian's iproute2), reached over TLS through two links,
//! one per node. Taking one link down drops that node's packets silently, as a failed switch
//! or a firewall would: no reset, no refusal, the node's connections simply stop answering.
//! (`a_node_cut_off_from_its_database_reports_not_ready_and_refuses_writes` cuts it off at the
//! database instead, which closes the node's connections at once.)

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::ownpg::{Cluster, SERVER_CERT, SERVER_KEY, run};
use crate::postgres::{read_twin, start_copy};
use crate::process::Server;

/// The host's end of link `i` of `namespace` (`tgpartN`): `tgpNhI`, short enough for a
/// device name (15 bytes).
fn host_end(namespace: &str, i: usize) -> String {
    format!("tgp{}h{i}", namespace.trim_start_matches("tgpart"))
}

/// One link between the host and the database's namespace: a veth pair.
struct Link {
    /// The namespace's end (taken down to cut the link).
    inside: String,
    db_address: String,
}

/// A PostgreSQL cluster alone in a network namespace, reachable only through its links.
struct NetnsPostgres {
    namespace: String,
    links: Vec<Link>,
    /// Stopped before the namespace goes.
    cluster: Option<Cluster>,
}

impl NetnsPostgres {
    /// A namespace with `links` veth pairs to the host, and a new PostgreSQL cluster in it
    /// listening on the namespace's end of each, TLS only.
    fn start(links: usize) -> Self {
        let n = std::process::id() % 100_000;
        let namespace = format!("tgpart{n}");
        // Left over from a run that was killed: nothing else uses these names.
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .output();
        for i in 0..links {
            let _ = Command::new("ip")
                .args(["link", "del", &host_end(&namespace, i)])
                .output();
        }
        run("ip", &["netns", "add", &namespace]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", namespace.as_str()];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        inside(&["ip", "link", "set", "lo", "up"]);
        let mut rules = vec!["local all postgres trust".to_owned()];
        let links: Vec<Link> = (0..links)
            .map(|i| {
                let (host, db) = (host_end(&namespace, i), format!("tgp{n}d{i}"));
                let subnet = format!("10.{}.{}", 231 + i, n % 250);
                run(
                    "ip",
                    &[
                        "link", "add", &host, "type", "veth", "peer", "name", &db, "netns",
                        &namespace,
                    ],
                );
                run(
                    "ip",
                    &["addr", "add", &format!("{subnet}.1/30"), "dev", &host],
                );
                run("ip", &["link", "set", &host, "up"]);
                inside(&["ip", "addr", "add", &format!("{subnet}.2/30"), "dev", &db]);
                inside(&["ip", "link", "set", &db, "up"]);
                rules.push(format!("hostssl all postgres {subnet}.1/32 trust"));
                Link {
                    inside: db,
                    db_address: format!("{subnet}.2"),
                }
            })
            .collect();
        let mut cluster = Cluster::init(5432);
        cluster.allow(&rules);
        let listen: Vec<&str> = links.iter().map(|l| l.db_address.as_str()).collect();
        let listen = listen.join(",");
        cluster.start(
            &[
                ("listen_addresses", listen.as_str()),
                ("ssl", "on"),
                ("ssl_cert_file", SERVER_CERT),
                ("ssl_key_file", SERVER_KEY),
            ],
            Some(&namespace),
        );
        Self {
            namespace,
            links,
            cluster: Some(cluster),
        }
    }

    /// The URL a node uses to reach the database through link `i`, over TLS verified
    /// against [`SERVER_CERT`] (which names `localhost`).
    fn url(&self, i: usize) -> String {
        format!(
            "postgresql://postgres@localhost:5432/postgres?hostaddr={}",
            self.links[i].db_address
        )
    }

    /// Takes link `i` down (`false`) or up again: its packets are dropped, silently.
    fn set_link(&self, i: usize, up: bool) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.namespace,
                "ip",
                "link",
                "set",
                &self.links[i].inside,
                if up { "up" } else { "down" },
            ],
        );
    }
}

impl Drop for NetnsPostgres {
    fn drop(&mut self) {
        drop(self.cluster.take());
        // Each pair goes with its host end (the namespace itself is torn down lazily, so
        // its ends could outlive its deletion for a while).
        for i in 0..self.links.len() {
            let _ = Command::new("ip")
                .args(["link", "del", &host_end(&self.namespace, i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output();
    }
}

/// `PUT /digitaltwins/{id}` on `server`: the status, or `None` if no answer came in time.
async fn put(server: &Server, token: &str, id: &str) -> Option<u16> {
    server
        .client
        .put(server.url(&format!("/digitaltwins/{id}")))
        .bearer_auth(token)
        .json(&json!({"$metadata": {"$model": "dtmi:part:Valve;1"}}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Polls `check` every 200 ms until it holds; fails the test with `what` after `within`.
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

/// Two nodes on one database, each through a link of its own; node A's link is cut silently
/// for 20 s under writes on node B. While cut, A acknowledges no write: a write sent to it is
/// answered 503 once the store's bound on unacknowledged data drops the connection, not left
/// hanging (before that bound, it hung past the client's 60 s); it reports not ready; it serves
/// no read sent more than the documented 5 s (plus a second of slack) after the cut (in the
/// runs so far none at all: its audit log, kept in the database, cannot record them). Once the link is back, A is ready again by itself, serves what B wrote
/// meanwhile, and takes writes again; every write acknowledged by either node is on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_partitioned_from_its_database_acknowledges_nothing_serves_nothing_stale_and_catches_up()
 {
    if twinguard_store_postgres::testdb::skipped() {
        return;
    }
    let db = NetnsPostgres::start(2);
    let (url_a, url_b) = (db.url(0), db.url(1));
    let flags_a = ["--store", url_a.as_str(), "--store-ca", SERVER_CERT];
    let flags_b = ["--store", url_b.as_str(), "--store-ca", SERVER_CERT];
    let first = tempfile::tempdir().unwrap();
    let a = Server::start_with(first.path(), &flags_a, None);
    let token_a = a.admin_token(first.path()).await;
    let (_second, b, token_b) = start_copy(first.path(), &flags_b).await;
    a.upload_interface(&token_a, "dtmi:part:Valve;1").await;
    assert_eq!(put(&a, &token_a, "before").await, Some(200));
    until("B reads A's write", Duration::from_secs(10), || async {
        read_twin(&b, &token_b, "before").await.0 == 200
    })
    .await;
    assert_eq!(a.readiness(None).await.0, 200);

    db.set_link(0, false);
    let cut = Instant::now();
    // A write sent to A now: never acknowledged, and answered rather than left hanging.
    let write_on_a = async {
        let status = put(&a, &token_a, "during-a").await;
        (status, cut.elapsed())
    };
    // Meanwhile B goes on writing, and A's reads and readiness are watched for 20 s.
    let watch = async {
        let (mut written_on_b, mut served_until) = (Vec::new(), None);
        let (mut refused, mut slowest) = (0, Duration::ZERO);
        while cut.elapsed() < Duration::from_secs(20) {
            let id = format!("during-b-{}", written_on_b.len());
            if put(&b, &token_b, &id).await == Some(200) {
                written_on_b.push(id);
            }
            let sent = cut.elapsed();
            let status = read_twin(&a, &token_a, "before").await.0;
            slowest = slowest.max(cut.elapsed() - sent);
            match status {
                200 => served_until = Some(sent),
                status => {
                    assert_eq!(status, 503, "a read on the cut-off node");
                    refused += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (written_on_b, served_until, refused, slowest)
    };
    // And A's readiness, as a balancer polls it.
    let not_ready = until("A reports not ready", Duration::from_secs(20), || async {
        a.readiness(None).await.0 == 503
    });
    let ((during_a, answered), (written_on_b, served_until, refused, slowest), not_ready) =
        tokio::join!(write_on_a, watch, not_ready);
    assert_eq!(during_a, Some(503), "a write on the cut-off node");
    if let Some(sent) = served_until {
        assert!(
            sent <= Duration::from_secs(6),
            "a read was served {sent:?} after the cut"
        );
    }
    assert!(written_on_b.len() >= 10, "B wrote {}", written_on_b.len());

    db.set_link(0, true);
    let healed = Instant::now();
    let caught_up = until("A ready again", Duration::from_secs(60), || async {
        a.readiness(None).await.0 == 200
    })
    .await;
    for id in &written_on_b {
        assert_eq!(read_twin(&a, &token_a, id).await.0, 200, "{id} on A");
    }
    assert_eq!(read_twin(&b, &token_b, "during-a").await.0, 404);
    assert_eq!(put(&a, &token_a, "after").await, Some(200));
    until(
        "B reads A's write after",
        Duration::from_secs(10),
        || async { read_twin(&b, &token_b, "after").await.0 == 200 },
    )
    .await;
    println!(
        "cut off: a write answered 503 after {answered:?}; not ready after {not_ready:?}; \
         reads on A: last served {served_until:?} after the cut, {refused} refused, the slowest \
         answered in {slowest:?}; {} writes on B meanwhile; ready again {caught_up:?} after the \
         link returned ({:?} in all)",
        written_on_b.len(),
        healed.elapsed()
    );
}
