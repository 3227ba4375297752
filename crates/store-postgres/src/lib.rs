//! A PostgreSQL store: every [`Table`] of twinguard-core's [`Store`] trait in one PostgreSQL
//! table, `records (tbl, key, value)`, so that several nodes can share one durable store.
//!
//! # Design
//!
//! - **tokio-postgres and deadpool-postgres**, not sqlx: sqlx checks its queries at build time
//!   against a live database or a committed offline cache (friction in CI and for every
//!   contributor), while this backend has five fixed statements. We need `bytea` keys compared
//!   in byte order and explicit transactions, both plain in tokio-postgres. deadpool keeps a
//!   pool of connections (8 by default), so history reads and group commits do not wait on one
//!   connection.
//! - **Keys and values are `bytea`.** Keys are the contract's UTF-8 strings, stored as their bytes:
//!   `bytea` compares bytewise, which is the UTF-8 byte order the contract requires, and holds
//!   U+0000, which `text` cannot. Values are bytes (some records are binary), never `jsonb`.
//! - **One table, not one per [`Table`]:** `records (tbl text, key bytea, value bytea, primary
//!   key (tbl, key))`. `tbl` is [`Table::name`], the same stable name the redb backend uses, so a
//!   new [`Table`] needs no migration, and a commit that touches several tables is one upsert and
//!   one delete statement. The primary key's B-tree serves every read (`tbl = $1 and key >= $2
//!   order by key`).
//! - **Migrations** are numbered; `twinguard_schema` holds one row per applied version. They run
//!   at [`PgStore::connect`] in one transaction holding `pg_advisory_xact_lock`, so nodes starting
//!   at once apply each migration exactly once. A database whose schema is newer than this binary
//!   knows is refused.
//! - **A commit counter** (`twinguard_head`, migration 2) that every commit moves as its first
//!   statement, so writers sharing the database can fence their commits at the state they
//!   decided on ([`Store::commit_at`]; `docs/storage.md`, "The commit fence").
//! - **A commit is one transaction**, returning after `COMMIT` succeeded: durable as the server's
//!   `synchronous_commit` makes it, and a server with `synchronous_commit = off` is refused at
//!   connect. Mutations are deduplicated first (the last change of a key wins), then applied
//!   with multi-row statements over `unnest` arrays rather than one round trip each.
//! - **Synchronous trait, asynchronous driver:** the store owns a small tokio runtime (two
//!   workers) that runs every query; the calling thread waits on a channel. That works from the
//!   writer thread and from inside another tokio runtime alike (no `block_on` on a runtime
//!   worker), and dropping the store from an async context does not panic (the runtime is shut
//!   down in the background).
//! - **TLS** with rustls (tokio-postgres-rustls), the server certificate verified against the
//!   roots of a CA file. Without a CA file the connection is in plaintext, which is allowed only
//!   to loopback hosts (and Unix sockets); a non-loopback host without TLS is refused, and so is
//!   `sslmode=require` without a CA file (TLS we cannot verify is not offered, nor is `prefer`'s
//!   silent fall back to plaintext).
//! - Errors carry PostgreSQL's code and message or the driver's, never the connection string.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;
use twinguard_core::store::{
    CHANGE_LOG_COMMITS, Change, Fenced, GRAPH_CHANGED, Mutation, Owner, Store, StoreError, Table,
    history_key_time, history_range_times,
};

mod audit;
#[doc(hidden)]
pub mod testdb;

pub use audit::AuditNode;

/// The schema migrations, in order: `(version, description, SQL)`. Append only; a released
/// migration never changes.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "records: every table's keys and values",
        "CREATE TABLE records (
        tbl text COLLATE \"C\" NOT NULL,
        key bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (tbl, key)
    )",
    ),
    (
        2,
        "twinguard_head: the commit counter that fences writers sharing the database",
        "CREATE TABLE twinguard_head (id int PRIMARY KEY CHECK (id = 1), seq bigint NOT NULL);
         INSERT INTO twinguard_head VALUES (1, 0)",
    ),
    (
        3,
        "twinguard_changes: the keys of followed tables each commit changed",
        "CREATE TABLE twinguard_changes (
        seq bigint NOT NULL,
        tbl text COLLATE \"C\" NOT NULL,
        key bytea NOT NULL
    );
    CREATE INDEX twinguard_changes_seq ON twinguard_changes (seq)",
    ),
    (
        4,
        "twinguard_history: readings' history, partitioned by day of measurement",
        "CREATE TABLE twinguard_history (
        key bytea NOT NULL,
        at_ms bigint NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (key, at_ms)
    ) PARTITION BY RANGE (at_ms);
    CREATE TABLE twinguard_history_default PARTITION OF twinguard_history DEFAULT;
    CREATE INDEX twinguard_history_default_at ON twinguard_history_default (at_ms)",
    ),
    (
        5,
        "twinguard_audit: each node's audit log, its checkpoints and its key",
        "CREATE TABLE twinguard_audit_nodes (
        node text COLLATE \"C\" PRIMARY KEY,
        verifier_key text NOT NULL,
        registered timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE twinguard_audit (
        node text COLLATE \"C\" NOT NULL REFERENCES twinguard_audit_nodes,
        seq bigint NOT NULL,
        entry bytea NOT NULL,
        PRIMARY KEY (node, seq)
    );
    CREATE TABLE twinguard_audit_checkpoints (
        node text COLLATE \"C\" NOT NULL REFERENCES twinguard_audit_nodes,
        size bigint NOT NULL,
        note text NOT NULL,
        PRIMARY KEY (node, size)
    )",
    ),
];

/// The history (`Table::History`) is kept in `twinguard_history`, one partition a day of
/// measurement time (`twinguard_history_d<days since 1970-01-01>`), made when a commit first
/// holds a reading of that day: retention drops whole days ([`Store::drop_history_before`]),
/// and a read of one stream's time range looks only at the days it spans. Days further back
/// than this, or ahead of today by more than [`HISTORY_DAYS_AHEAD`], go to the default
/// partition, so that no stream of odd timestamps makes thousands of tables.
const HISTORY_DAYS_BACK: i64 = 400;
const HISTORY_DAYS_AHEAD: i64 = 2;
const DAY_MS: i64 = 86_400_000;
/// The advisory lock under which history partitions are made and dropped: `twhistor`.
const HISTORY_LOCK: i64 = 0x7477_6869_7374_6f72;

/// The key of the advisory lock held while migrating: `twinguard` as ASCII, in a `bigint`.
const MIGRATION_LOCK: i64 = 0x7477_696e_6775_6172;

/// The first key of the session advisory lock on the database ([`PgStore::lock`]): `twsv` as
/// ASCII; the second is a hash of the schema the tables are in, so deployments in schemas of
/// their own (`search_path`) do not lock each other out.
const SERVING_LOCK: i32 = 0x7477_7376;

/// How often a lost lock on the database is tried again, how long that waits for the lock, and
/// for a connection ([`PgStore::check_held`]).
const RELOCK_EVERY: Duration = Duration::from_secs(1);
const RELOCK_WAIT: Duration = Duration::from_millis(200);
const RELOCK_CONNECT: Duration = Duration::from_secs(2);

/// The lock on the database a store holds, on a connection of its own.
struct Held {
    hold: Hold,
    client: tokio_postgres::Client,
    /// When it was last found lost or tried again; `None` while held.
    lost_at: Option<std::time::Instant>,
}

/// How a store holds the database ([`PgStore::lock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A serving node: any number of them at once (a shared lock).
    Serve,
    /// A backup or restore: no node serves meanwhile (the lock alone).
    Alone,
}

/// Rows per statement in a commit, and bytes of values per upsert statement: a group commit of
/// thousands of mutations is a few statements, each a bounded message.
const ROWS_PER_STATEMENT: usize = 10_000;
const BYTES_PER_STATEMENT: usize = 16 * 1024 * 1024;

/// Longest error message kept from the driver or the server.
const MAX_ERROR_CHARS: usize = 512;

const UPSERT: &str = "INSERT INTO records (tbl, key, value) \
     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
     ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value";
const DELETE: &str = "DELETE FROM records AS r USING unnest($1::text[], $2::bytea[]) AS d(tbl, key) \
     WHERE r.tbl = d.tbl AND r.key = d.key";
/// The timeline of the server the connection is to: the first 8 hex digits of the name of the
/// WAL file it writes now. A promotion and a point-in-time recovery start a new timeline, a
/// higher one than any before. (Not `pg_control_checkpoint()`, which names the timeline of the
/// last checkpoint and, after a fast promotion, the old one until the next.) Fails on a server
/// in recovery (a standby), which takes no commit either.
macro_rules! timeline {
    () => {
        "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint"
    };
}

/// Every commit's first statement: the counter moves on by one (the row lock it takes
/// serialises committers), unconditionally or only from the counter the writer expects. Under
/// READ COMMITTED a committer that waited for the row re-checks `seq = $1` on the version the
/// other committed, so of two writers fenced at one value exactly one updates a row.
/// Each also answers the database's timeline (see [`Counter`]), and a fenced one moves the
/// counter only on the timeline the writer expects.
const BUMP: &str = concat!(
    "UPDATE twinguard_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, ",
    timeline!()
);
const BUMP_FROM: &str = concat!(
    "UPDATE twinguard_head SET seq = seq + 1 WHERE id = 1 AND seq = $1 AND ",
    timeline!(),
    " = $2 RETURNING seq, ",
    timeline!()
);
const HEAD: &str = concat!(
    "SELECT seq, ",
    timeline!(),
    " FROM twinguard_head WHERE id = 1"
);
/// Takes the commit turn ([`Store::hold_turn`]): a writer waits for it 5 s at most, and holds
/// it idle 5 s at most.
const TAKE_TURN: &str = concat!(
    "BEGIN; SET LOCAL idle_in_transaction_session_timeout = '5s'; ",
    "SET LOCAL lock_timeout = '5s'; ",
    "SELECT seq FROM twinguard_head WHERE id = 1 FOR UPDATE"
);
/// The change log: the keys of followed tables (`Table::followed`) each commit changed, written
/// in the commit, read by the other nodes (`Store::changes_after`), trimmed every
/// [`TRIM_CHANGES_EVERY`] commits to the last [`CHANGE_LOG_COMMITS`].
const LOG_CHANGES: &str = "INSERT INTO twinguard_changes (seq, tbl, key) \
     SELECT $1, * FROM unnest($2::text[], $3::bytea[])";
const TRIM_CHANGES: &str = "DELETE FROM twinguard_changes WHERE seq <= $1";
const CHANGES: &str = "SELECT seq, tbl, key FROM twinguard_changes \
     WHERE seq > $1 AND seq <= $2 ORDER BY seq";
const TRIM_CHANGES_EVERY: u64 = 1_024;
const SCAN: &str = "SELECT key, value FROM records WHERE tbl = $1 ORDER BY key";
const HISTORY_UPSERT: &str = "INSERT INTO twinguard_history (key, at_ms, value) \
     SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[]) \
     ON CONFLICT (key, at_ms) DO UPDATE SET value = EXCLUDED.value";
const HISTORY_DELETE: &str = "DELETE FROM twinguard_history AS h \
     USING unnest($1::bytea[], $2::bigint[]) AS d(key, at_ms) \
     WHERE h.key = d.key AND h.at_ms = d.at_ms";
/// History reads take the table's name too (unused), so that they bind as the others do.
const HISTORY_SCAN: &str =
    "SELECT key, value FROM twinguard_history WHERE $1::text IS NOT NULL ORDER BY key";
const HISTORY_GET_MANY: &str = "SELECT key, value FROM twinguard_history \
     WHERE $1::text IS NOT NULL AND key = ANY($2::bytea[])";
const HISTORY_RANGE_FROM: &str = "SELECT key, value FROM twinguard_history \
     WHERE $1::text IS NOT NULL AND key >= $2 ORDER BY key LIMIT $3";
/// A range of one stream's history also bounds the measurement time, so that only the days it
/// spans are read (pruned at execution, the bounds being parameters).
const HISTORY_RANGE: &str = "SELECT key, value FROM twinguard_history \
     WHERE $1::text IS NOT NULL AND key >= $2 AND key < $3 AND at_ms BETWEEN $5 AND $6 \
     ORDER BY key LIMIT $4";
const GET_MANY: &str = "SELECT key, value FROM records WHERE tbl = $1 AND key = ANY($2::bytea[])";
const RANGE_FROM: &str =
    "SELECT key, value FROM records WHERE tbl = $1 AND key >= $2 ORDER BY key LIMIT $3";
const RANGE: &str = "SELECT key, value FROM records WHERE tbl = $1 AND key >= $2 AND key < $3 \
     ORDER BY key LIMIT $4";

/// How to reach the database, besides its URL.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections in the pool (at least 1).
    pub pool_size: usize,
    /// PEM file of the CA certificates that sign the server's certificate. `Some` means TLS,
    /// verified, with the host name of the URL; `None` means plaintext, allowed only to
    /// loopback hosts and Unix sockets.
    pub ca_file: Option<PathBuf>,
    /// How long opening one connection may take (unless the URL sets `connect_timeout`).
    pub connect_timeout: Duration,
    /// How long a query may wait for a free connection of the pool.
    pub wait_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            ca_file: None,
            connect_timeout: Duration::from_secs(10),
            wait_timeout: Duration::from_secs(30),
        }
    }
}

/// The PostgreSQL store. See the crate documentation.
pub struct PgStore {
    pool: Pool,
    /// The connection settings, for the lock's own connection.
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// The lock on the database, once taken ([`PgStore::lock`]).
    held: std::sync::Mutex<Option<Held>>,
    /// The days whose history partition this store made or found (see [`HISTORY_DAYS_BACK`]).
    history_days: std::sync::Mutex<std::collections::HashSet<i64>>,
    /// The commit turn, while this store holds it ([`Store::hold_turn`]): a connection in a
    /// transaction that holds the commit counter's row.
    turn: std::sync::Mutex<Option<deadpool_postgres::Object>>,
    /// Runs every query; `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the connection string: it may hold a password.
        f.debug_struct("PgStore")
            .field("pool_size", &self.pool.status().max_size)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // `shutdown_background` does not block, so dropping the store inside an async context
        // does not panic as dropping a runtime there would.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn bounded(message: String) -> StoreError {
    let message = if message.chars().count() > MAX_ERROR_CHARS {
        let cut: String = message.chars().take(MAX_ERROR_CHARS).collect();
        format!("{cut}...")
    } else {
        message
    };
    StoreError(message)
}

/// A driver error as a store error: the server's code and message, or the driver's own text
/// (which names no host, user or password).
fn pg_err(context: &str, e: &tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => bounded(format!(
            "PostgreSQL {context}: {} ({})",
            db.message(),
            db.code().code()
        )),
        None => {
            // The driver's text and its causes (an I/O or TLS error): "error performing TLS
            // handshake" alone would not say that the certificate was refused.
            let mut message = format!("PostgreSQL {context}: {e}");
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            bounded(message)
        }
    }
}

fn pool_err(context: &str, e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(context, &e),
        other => bounded(format!("PostgreSQL {context}: {other}")),
    }
}

fn is_loopback(host: &Host) -> bool {
    match host {
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        Host::Unix(_) => true,
    }
}

/// The rustls client configuration: aws-lc-rs (the process's one provider, named here so that
/// no process-wide default is needed), and only the roots of `ca_file`.
fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| bounded(format!("reading the PostgreSQL CA file: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| bounded(format!("reading the PostgreSQL CA file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bounded(format!("a certificate of the PostgreSQL CA file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(StoreError(
            "the PostgreSQL CA file holds no certificate".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bounded(format!("PostgreSQL TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// How long data sent to the database may go unacknowledged by its TCP peer before the
/// connection is dropped (`TCP_USER_TIMEOUT`). Not a query timeout: a slow query's request is
/// acknowledged at once, only a dead link leaves it unacknowledged.
pub const UNACKNOWLEDGED: Duration = Duration::from_secs(10);

/// tokio-postgres' (and libpq's) keepalive idle time: two hours.
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Parses `url` and applies the TLS rules of the crate documentation.
fn config(
    url: &str,
    options: &PgOptions,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| pg_err("connection string is not valid", &e))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(options.connect_timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name("twinguard");
    }
    // A link that silently stops carrying packets (a partition, a failed switch) would hold a
    // query until TCP gives up, about 15 minutes: the node's writer, its probes and its
    // followers with it. Data sent and not acknowledged for `UNACKNOWLEDGED` drops the
    // connection, and an idle one is probed (unless the URL says otherwise).
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(UNACKNOWLEDGED);
    }
    if config.get_keepalives()
        && config.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE
        && config.get_keepalives_interval().is_none()
        && config.get_keepalives_retries().is_none()
    {
        config
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
    }
    let loopback = config.get_hosts().iter().all(is_loopback)
        && config.get_hostaddrs().iter().all(|ip| ip.is_loopback());
    let tls = match &options.ca_file {
        Some(ca_file) => {
            if config.get_ssl_mode() == SslMode::Disable {
                return Err(StoreError(
                    "PostgreSQL: sslmode=disable and a CA file contradict each other".into(),
                ));
            }
            config.ssl_mode(SslMode::Require);
            tls_config(ca_file)?
        }
        None => {
            if config.get_ssl_mode() == SslMode::Require {
                return Err(StoreError(
                    "PostgreSQL: sslmode=require needs a CA file to verify the server's \
                     certificate"
                        .into(),
                ));
            }
            if !loopback {
                return Err(StoreError(
                    "PostgreSQL: refusing to connect to a host that is not loopback without \
                     TLS; give a CA file to verify the server's certificate"
                        .into(),
                ));
            }
            config.ssl_mode(SslMode::Disable);
            // Never used (TLS is off), but the pool takes one connector type.
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| bounded(format!("PostgreSQL TLS: {e}")))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        }
    };
    Ok((config, MakeRustlsConnect::new(tls)))
}

impl PgStore {
    /// Connects to the database of `url` (`postgresql://user@host:port/db?...` or
    /// `host=... dbname=...`), applies the schema migrations it lacks, and checks that commits
    /// will be durable. Fails if the database is unreachable, refuses the TLS rules, or has a
    /// newer schema than this binary knows.
    pub fn connect(url: &str, options: &PgOptions) -> Result<Self, StoreError> {
        if options.pool_size == 0 {
            return Err(StoreError(
                "PostgreSQL: the pool needs at least one connection".into(),
            ));
        }
        let (pg_config, tls) = config(url, options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("twinguard-pg")
            .enable_all()
            .build()
            .map_err(|e| bounded(format!("starting the PostgreSQL store's runtime: {e}")))?;
        let manager = Manager::from_config(
            pg_config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| bounded(format!("PostgreSQL pool: {e}")))?;
        let store = Self {
            pool,
            config: pg_config,
            tls,
            held: std::sync::Mutex::new(None),
            history_days: std::sync::Mutex::new(std::collections::HashSet::new()),
            turn: std::sync::Mutex::new(None),
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        };
        let pool = store.pool.clone();
        store.run(async move { prepare(&pool).await })?;
        store.load_history_days()?;
        Ok(store)
    }

    /// Starts `fut` on the store's runtime; the function returned waits for it.
    fn start<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> impl FnOnce() -> Result<T, StoreError> + Send + 'static {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        move || {
            rx.recv()
                .map_err(|_| StoreError("the PostgreSQL store's runtime stopped".into()))?
        }
    }

    /// Runs `fut` on the store's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.start(fut)()
    }

    /// Holds the database as `hold` says, with a session advisory lock on a connection of its
    /// own, outside the pool, kept until the store is dropped: serving nodes share it, and a
    /// backup or restore takes it alone, so neither starts while the other runs. Waits up to
    /// `wait` for the other kind to let go. Once that connection is lost, commits fail until
    /// the lock is taken again (tried at most once a second, see [`PgStore::check_held`]).
    pub fn lock(&self, hold: Hold, wait: Duration) -> Result<(), StoreError> {
        let client = self.take_lock(hold, wait, None)?;
        let mut held = self
            .held
            .lock()
            .map_err(|_| StoreError("PostgreSQL: the lock's state is poisoned".into()))?;
        *held = Some(Held {
            hold,
            client,
            lost_at: None,
        });
        Ok(())
    }

    /// A new connection holding the lock, waiting at most `wait` for it (and at most
    /// `connect_within` for the connection, if given).
    fn take_lock(
        &self,
        hold: Hold,
        wait: Duration,
        connect_within: Option<Duration>,
    ) -> Result<tokio_postgres::Client, StoreError> {
        // Its keepalives and unacknowledged-data bound (`config`) notice a silent network
        // failure within about half a minute, so that commits stop rather than go on without
        // the lock.
        let (mut config, tls) = (self.config.clone(), self.tls.clone());
        if let Some(within) = connect_within {
            config.connect_timeout(within);
        }
        self.run(async move {
            let (client, connection) = config
                .connect(tls)
                .await
                .map_err(|e| pg_err("connection for the lock on the database", &e))?;
            tokio::spawn(connection);
            let millis = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX).max(1);
            client
                .batch_execute(&format!("SET lock_timeout = {millis}"))
                .await
                .map_err(|e| pg_err("lock on the database", &e))?;
            let take = match hold {
                Hold::Serve => "SELECT pg_advisory_lock_shared($1, hashtext(current_schema()))",
                Hold::Alone => "SELECT pg_advisory_lock($1, hashtext(current_schema()))",
            };
            match client.execute(take, &[&SERVING_LOCK]).await {
                Ok(_) => Ok(client),
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    Err(StoreError(
                        match hold {
                            Hold::Serve => {
                                "PostgreSQL: a backup or restore holds this database; start \
                                 the node once it is done"
                            }
                            Hold::Alone => {
                                "PostgreSQL: the database is in use (a twinguard node serves \
                                 it, or a backup or restore runs); backup and restore work on \
                                 a stopped instance: stop every node"
                            }
                        }
                        .into(),
                    ))
                }
                Err(e) => Err(pg_err("lock on the database", &e)),
            }
        })
    }

    /// Fails while the connection holding the lock on the database is gone. A lost lock is
    /// taken again, at most once a second: a serving node whose link to the database came back
    /// goes on, unless a backup or restore took the database meanwhile.
    fn check_held(&self) -> Result<(), StoreError> {
        let mut held = self
            .held
            .lock()
            .map_err(|_| StoreError("PostgreSQL: the lock's state is poisoned".into()))?;
        let Some(held) = held.as_mut() else {
            return Ok(());
        };
        if !held.client.is_closed() {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let lost = || {
            StoreError(
                "PostgreSQL: the connection holding this node's lock on the database is lost"
                    .into(),
            )
        };
        match held.lost_at {
            None => tracing::warn!("the connection holding the lock on the database is lost"),
            Some(at) if now.duration_since(at) < RELOCK_EVERY => return Err(lost()),
            Some(_) => {}
        }
        held.lost_at = Some(now);
        match self.take_lock(held.hold, RELOCK_WAIT, Some(RELOCK_CONNECT)) {
            Ok(client) => {
                tracing::info!("the lock on the database is held again");
                held.client = client;
                held.lost_at = None;
                Ok(())
            }
            Err(e) => Err(StoreError(format!(
                "{}; taking it again: {}",
                lost().0,
                e.0
            ))),
        }
    }

    /// One commit: the counter moved first (from `expected` only, if given), then the
    /// deletes and upserts, in one transaction. A counter that is not `expected`, or is on
    /// another timeline, applies nothing and answers [`Fenced::Stale`]. Made in the commit
    /// turn if this store holds it ([`Store::hold_turn`]), which it ends.
    fn commit_plan(&self, plan: Plan, expected: Option<Counter>) -> Result<Fenced, StoreError> {
        self.check_held()?;
        let days = self.new_history_days(&plan.history_put_times);
        let pool = self.pool.clone();
        let turn = self.turn.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.run(async move {
            let mut client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            make_history_partitions(&mut client, &days).await;
            if let Some(turn) = turn {
                drop(client);
                let applied = apply_plan(&turn, &plan, expected).await;
                if let Ok(Fenced::Committed(_)) = applied {
                    if let Err(e) = turn.batch_execute("COMMIT").await {
                        // Not back to the pool in a transaction.
                        drop(deadpool_postgres::Object::take(turn));
                        return Err(pg_err("commit", &e));
                    }
                    return applied;
                }
                release(turn).await;
                return applied;
            }
            let txn = client
                .transaction()
                .await
                .map_err(|e| pg_err("commit", &e))?;
            let applied = apply_plan(&txn, &plan, expected).await?;
            if let Fenced::Committed(_) = applied {
                txn.commit().await.map_err(|e| pg_err("commit", &e))?;
            }
            // A stale commit rolls back as the transaction is dropped.
            Ok(applied)
        })
    }

    /// The days of `times` that may have a partition of their own and that this store has not
    /// made or found yet; noted as made (a failure is not retried at every commit).
    fn new_history_days(&self, times: &[i64]) -> Vec<i64> {
        if times.is_empty() {
            return Vec::new();
        }
        let today = now_ms().div_euclid(DAY_MS);
        let mut known = self.history_days.lock().unwrap_or_else(|p| p.into_inner());
        let mut days: Vec<i64> = times
            .iter()
            .map(|at| at.div_euclid(DAY_MS))
            .filter(|day| (today - HISTORY_DAYS_BACK..=today + HISTORY_DAYS_AHEAD).contains(day))
            .filter(|day| known.insert(*day))
            .collect();
        days.sort_unstable();
        days.dedup();
        days
    }

    /// The days that have a history partition in the database.
    async fn history_partitions(client: &tokio_postgres::Client) -> Result<Vec<i64>, StoreError> {
        let rows = client
            .query(
                // The table the search path finds: a schema of its own holds its own.
                "SELECT c.relname::text FROM pg_inherits i \
                 JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'twinguard_history'::regclass",
                &[],
            )
            .await
            .map_err(|e| pg_err("listing the history partitions", &e))?;
        let mut days = Vec::new();
        for row in rows {
            let name: String = row
                .try_get(0)
                .map_err(|e| pg_err("listing the history partitions", &e))?;
            if let Some(day) = name
                .strip_prefix("twinguard_history_d")
                .and_then(|d| d.parse().ok())
            {
                days.push(day);
            }
        }
        Ok(days)
    }

    /// Learns which days already have a history partition (at connection).
    fn load_history_days(&self) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        let days = self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            Self::history_partitions(&client).await
        })?;
        self.history_days
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(days);
        Ok(())
    }

    /// The schema version of the database (the highest applied migration).
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            let row = client
                .query_one("SELECT max(version) FROM twinguard_schema", &[])
                .await
                .map_err(|e| pg_err("reading the schema version", &e))?;
            row.try_get::<_, Option<i32>>(0)
                .map(|v| v.unwrap_or(0))
                .map_err(|e| pg_err("reading the schema version", &e))
        })
    }

    /// Runs `read` on a connection of the pool.
    fn records(&self, read: Read) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            read.run(&client).await
        })
    }
}

/// One read of records, on whichever connection runs it: the pool's ([`PgStore`]) or a
/// snapshot's ([`PgSnapshot`]).
enum Read {
    Scan(Table),
    From(Table, String, usize),
    Range(Table, String, String, usize),
}

impl Read {
    async fn run(
        self,
        client: &deadpool_postgres::ClientWrapper,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let history = |table: Table| table == Table::History;
        let (sql, table, bounds, limit, times) = match self {
            Read::Scan(table) if history(table) => (HISTORY_SCAN, table, vec![], None, None),
            Read::Scan(table) => (SCAN, table, vec![], None, None),
            Read::From(_, _, 0) | Read::Range(_, _, _, 0) => return Ok(Vec::new()),
            Read::From(table, from, limit) => {
                let sql = if history(table) {
                    HISTORY_RANGE_FROM
                } else {
                    RANGE_FROM
                };
                (sql, table, vec![from.into_bytes()], Some(limit), None)
            }
            Read::Range(_, from, to, _) if from >= to => return Ok(Vec::new()),
            Read::Range(table, from, to, limit) if history(table) => {
                let times = history_range_times(&from, &to).unwrap_or((i64::MIN, i64::MAX));
                let bounds = vec![from.into_bytes(), to.into_bytes()];
                (HISTORY_RANGE, table, bounds, Some(limit), Some(times))
            }
            Read::Range(table, from, to, limit) => {
                let bounds = vec![from.into_bytes(), to.into_bytes()];
                (RANGE, table, bounds, Some(limit), None)
            }
        };
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_err("read", &e))?;
        let tbl = table.name();
        let limit = limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&tbl];
        for bound in &bounds {
            params.push(bound);
        }
        if let Some(limit) = &limit {
            params.push(limit);
        }
        if let Some((from, to)) = &times {
            params.push(from);
            params.push(to);
        }
        let rows = client
            .query(&statement, &params)
            .await
            .map_err(|e| pg_err("read", &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let key: Vec<u8> = row.try_get(0).map_err(|e| pg_err("read", &e))?;
            let value: Vec<u8> = row.try_get(1).map_err(|e| pg_err("read", &e))?;
            let key = String::from_utf8(key).map_err(|_| {
                StoreError(format!(
                    "PostgreSQL: a key of table {} is not UTF-8",
                    table.name()
                ))
            })?;
            out.push((key, value));
        }
        Ok(out)
    }
}

/// A place in the database's history: the commit counter (`twinguard_head.seq`) on the
/// timeline of the server that answered. The positions the store answers ([`Store::head`],
/// [`Fenced`], [`Change::seq`]) hold the timeline above the counter's [`COUNTER_BITS`], so
/// that within one history they move on by one per commit, as the contract asks, and a new
/// history (a standby promoted, a point-in-time recovery) numbers each of its commits above
/// every position of the old one, even where its counter reuses the old numbers. A node that
/// stood at a commit the new history never had (one the old primary showed before its
/// standby had it) then sees the counter move on rather than stand still, and the change log
/// read from the old history answers that it does not reach back ([`Store::changes_after`]):
/// the node reads everything again (`docs/sites.md`, "A new history").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counter {
    timeline: u64,
    seq: u64,
}

/// The bits of a position that hold the commit counter: 2^44 commits, 55 years at 10,000
/// commits a second. A commit that would go past them fails.
pub const COUNTER_BITS: u32 = 44;
/// The highest timeline a position holds, which keeps positions below 2^63.
const MAX_TIMELINE: u64 = (1 << (63 - COUNTER_BITS)) - 1;

impl Counter {
    /// The position `position` names.
    fn of(position: u64) -> Self {
        Self {
            timeline: position >> COUNTER_BITS,
            seq: position & ((1 << COUNTER_BITS) - 1),
        }
    }

    /// A row whose first columns are the counter and the timeline (`HEAD`, `BUMP`).
    fn from_row(row: &tokio_postgres::Row, what: &str) -> Result<Self, StoreError> {
        let seq: i64 = row.try_get(0).map_err(|e| pg_err(what, &e))?;
        let timeline: i64 = row.try_get(1).map_err(|e| pg_err(what, &e))?;
        match (u64::try_from(seq), u64::try_from(timeline)) {
            (Ok(seq), Ok(timeline)) if seq >> COUNTER_BITS == 0 && timeline <= MAX_TIMELINE => {
                Ok(Self { timeline, seq })
            }
            _ => Err(StoreError(format!(
                "PostgreSQL: {what}: the commit counter ({seq}) or the timeline ({timeline}) \
                 is beyond what a position holds"
            ))),
        }
    }

    fn position(self) -> u64 {
        (self.timeline << COUNTER_BITS) | self.seq
    }

    /// The counter as PostgreSQL's `bigint`s: the counter, the timeline.
    fn sql(self) -> (i64, i64) {
        // Both fit: `of` leaves 44 and 20 bits.
        (self.seq as i64, self.timeline as i64)
    }
}

/// The commit counter as `client` sees it.
async fn read_head(client: &deadpool_postgres::ClientWrapper) -> Result<Counter, StoreError> {
    let row = client
        .query_one(HEAD, &[])
        .await
        .map_err(|e| pg_err("reading the commit counter", &e))?;
    Counter::from_row(&row, "reading the commit counter")
}

/// A read-only view of the database as of one moment ([`Store::snapshot`]): a connection of
/// the pool in a `REPEATABLE READ, READ ONLY` transaction, rolled back when the view is dropped
/// (the connection then goes back to the pool; one whose rollback fails is closed instead).
pub struct PgSnapshot {
    client: Arc<tokio::sync::Mutex<Option<deadpool_postgres::Object>>>,
    handle: tokio::runtime::Handle,
}

/// The snapshot's connection, held for one read.
type Pinned = tokio::sync::OwnedMutexGuard<Option<deadpool_postgres::Object>>;

impl PgSnapshot {
    /// Runs `read` on the snapshot's connection, on the store's runtime, and waits for it.
    fn run<T: Send + 'static, F>(
        &self,
        read: impl FnOnce(Pinned) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let client = self.client.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(read(client.lock_owned().await).await);
        });
        rx.recv()
            .map_err(|_| StoreError("the PostgreSQL store's runtime stopped".into()))?
    }

    fn records(&self, read: Read) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.run(move |held| async move { read.run(open(&held)?).await })
    }
}

/// Ends the transaction `client` is in and gives it back to the pool; closes it instead if
/// the rollback fails, rather than pool a connection in a transaction.
async fn release(client: deadpool_postgres::Object) {
    if client.batch_execute("ROLLBACK").await.is_err() {
        drop(deadpool_postgres::Object::take(client));
    }
}

/// The connection of a snapshot not yet dropped.
fn open(held: &Pinned) -> Result<&deadpool_postgres::ClientWrapper, StoreError> {
    held.as_ref()
        .map(|object| &**object)
        .ok_or_else(|| StoreError("PostgreSQL: the snapshot is closed".into()))
}

impl Drop for PgSnapshot {
    fn drop(&mut self) {
        let client = self.client.clone();
        self.handle.spawn(async move {
            if let Some(object) = client.lock().await.take() {
                release(object).await;
            }
        });
    }
}

impl Store for PgSnapshot {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.records(Read::Scan(table))
    }

    fn range_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.records(Read::From(table, from.to_owned(), limit))
    }

    fn range(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.records(Read::Range(table, from.to_owned(), to.to_owned(), limit))
    }

    fn head(&self) -> Result<Option<u64>, StoreError> {
        self.run(|held| async move { Ok(Some(read_head(open(&held)?).await?.position())) })
    }

    /// The change log as of the snapshot: the commits up to its counter, exactly.
    fn changes_after(&self, after: u64, upto: u64) -> Result<Option<Vec<Change>>, StoreError> {
        self.run(move |held| async move { read_changes(open(&held)?, after, upto).await })
    }

    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let asked = keys.to_vec();
        self.run(move |held| async move { read_many(open(&held)?, table, &asked).await })
    }

    fn commit(&self, _: &[Mutation]) -> Result<(), StoreError> {
        Err(StoreError("PostgreSQL: a snapshot is read-only".into()))
    }

    fn commit_at(&self, _: &[Mutation], _: u64) -> Result<Fenced, StoreError> {
        Err(StoreError("PostgreSQL: a snapshot is read-only".into()))
    }

    fn commit_expecting(
        &self,
        _: &[Mutation],
        _: &[twinguard_core::store::Expect],
    ) -> Result<bool, StoreError> {
        Err(StoreError("PostgreSQL: a snapshot is read-only".into()))
    }
}

/// Checks durability and applies the missing migrations, under the migration lock.
async fn prepare(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(|e| pool_err("connection", e))?;
    let row = client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .map_err(|e| pg_err("reading synchronous_commit", &e))?;
    let synchronous: String = row
        .try_get(0)
        .map_err(|e| pg_err("reading synchronous_commit", &e))?;
    if synchronous == "off" {
        return Err(StoreError(
            "PostgreSQL: synchronous_commit is off, so a commit could be acknowledged before it \
             is durable; turn it on for this database or role"
                .into(),
        ));
    }
    let txn = client
        .transaction()
        .await
        .map_err(|e| pg_err("migration", &e))?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg_err("taking the migration lock", &e))?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS twinguard_schema (
            version integer PRIMARY KEY,
            description text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(|e| pg_err("creating twinguard_schema", &e))?;
    let row = txn
        .query_one("SELECT max(version) FROM twinguard_schema", &[])
        .await
        .map_err(|e| pg_err("reading the schema version", &e))?;
    let current: i32 = row
        .try_get::<_, Option<i32>>(0)
        .map_err(|e| pg_err("reading the schema version", &e))?
        .unwrap_or(0);
    let known = MIGRATIONS.last().map_or(0, |(v, _, _)| *v);
    if current > known {
        return Err(StoreError(format!(
            "PostgreSQL: the database's schema is version {current}, newer than this binary \
             knows ({known}); run a newer twinguard"
        )));
    }
    for (version, description, sql) in MIGRATIONS {
        if *version <= current {
            continue;
        }
        txn.batch_execute(sql)
            .await
            .map_err(|e| pg_err(&format!("migration {version}"), &e))?;
        txn.execute(
            "INSERT INTO twinguard_schema (version, description) VALUES ($1, $2)",
            &[version, description],
        )
        .await
        .map_err(|e| pg_err(&format!("recording migration {version}"), &e))?;
    }
    txn.commit().await.map_err(|e| pg_err("migration", &e))
}

/// A batch as the statements of one commit: the last change of each key only, puts and deletes
/// apart (their keys are then disjoint, so their order no longer matters).
#[derive(Debug, Default)]
struct Plan {
    put_tables: Vec<&'static str>,
    put_keys: Vec<Vec<u8>>,
    put_values: Vec<Vec<u8>>,
    delete_tables: Vec<&'static str>,
    delete_keys: Vec<Vec<u8>>,
    /// The changed records of followed tables, and the graph's mark if the batch changed the
    /// graph, for the change log (`store::logged_changes`).
    followed_tables: Vec<&'static str>,
    followed_keys: Vec<Vec<u8>>,
    /// History records (`twinguard_history`), with their measurement times.
    history_put_keys: Vec<Vec<u8>>,
    history_put_times: Vec<i64>,
    history_put_values: Vec<Vec<u8>>,
    history_delete_keys: Vec<Vec<u8>>,
    history_delete_times: Vec<i64>,
}

impl Plan {
    fn new(batch: &[Mutation]) -> Self {
        let mut last: HashMap<(Table, &str), usize> = HashMap::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            last.insert((m.table, m.key.as_str()), i);
        }
        let mut plan = Self::default();
        for (i, m) in batch.iter().enumerate() {
            if last.get(&(m.table, m.key.as_str())) != Some(&i) {
                continue;
            }
            if m.table.logged() {
                plan.followed_tables.push(m.table.name());
                plan.followed_keys.push(m.key.as_bytes().to_vec());
            }
            if m.table == Table::History {
                // A key that is not a history key (the contract suite writes any) is kept as
                // measured at 0, in the default partition.
                let at = history_key_time(&m.key).unwrap_or(0);
                let key = m.key.as_bytes().to_vec();
                match &m.value {
                    Some(value) => {
                        plan.history_put_keys.push(key);
                        plan.history_put_times.push(at);
                        plan.history_put_values.push(value.clone());
                    }
                    None => {
                        plan.history_delete_keys.push(key);
                        plan.history_delete_times.push(at);
                    }
                }
                continue;
            }
            match &m.value {
                Some(value) => {
                    plan.put_tables.push(m.table.name());
                    plan.put_keys.push(m.key.as_bytes().to_vec());
                    plan.put_values.push(value.clone());
                }
                None => {
                    plan.delete_tables.push(m.table.name());
                    plan.delete_keys.push(m.key.as_bytes().to_vec());
                }
            }
        }
        if batch.iter().any(|m| m.table.owner() == Owner::Graph) {
            plan.followed_tables.push(Table::Meta.name());
            plan.followed_keys.push(GRAPH_CHANGED.as_bytes().to_vec());
        }
        plan
    }

    /// The upserts as `(start, end)` index ranges, each at most [`ROWS_PER_STATEMENT`] rows and,
    /// unless one value alone is larger, [`BYTES_PER_STATEMENT`] bytes.
    fn put_chunks(&self) -> Vec<(usize, usize)> {
        let mut chunks = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, value) in self.put_values.iter().enumerate() {
            let size = value.len() + self.put_keys.get(i).map_or(0, Vec::len);
            if i > start && (i - start == ROWS_PER_STATEMENT || bytes + size > BYTES_PER_STATEMENT)
            {
                chunks.push((start, i));
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        if start < self.put_values.len() {
            chunks.push((start, self.put_values.len()));
        }
        chunks
    }
}

fn slice<T>(v: &[T], start: usize, end: usize) -> &[T] {
    v.get(start..end).unwrap_or(&[])
}

impl Store for PgStore {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.records(Read::Scan(table))
    }

    /// A `REPEATABLE READ, READ ONLY` transaction on a connection of the pool ([`PgSnapshot`]).
    /// Refused, like a commit, once this node's lock on the database is lost.
    fn snapshot(&self) -> Result<Option<Box<dyn Store>>, StoreError> {
        self.check_held()?;
        let pool = self.pool.clone();
        let client = self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|e| pg_err("starting a snapshot", &e))?;
            // The transaction's snapshot is taken at its first query, not at BEGIN: now.
            read_head(&client).await?;
            Ok(client)
        })?;
        Ok(Some(Box::new(PgSnapshot {
            client: Arc::new(tokio::sync::Mutex::new(Some(client))),
            handle: self.handle.clone(),
        })))
    }

    /// A connection of the pool in a transaction that locks the commit counter's row (`FOR
    /// UPDATE`): every other writer's commit waits at its first statement, which moves that
    /// row, until the turn ends. PostgreSQL ends a turn left idle for 5 s (a node that stopped
    /// midway; [`TAKE_TURN`]), so no writer waits on another's for longer; one that waits that
    /// long for the turn gives up and commits without it.
    fn hold_turn(&self) -> Result<bool, StoreError> {
        self.check_held()?;
        self.end_turn();
        let pool = self.pool.clone();
        let turn = self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            match client.batch_execute(TAKE_TURN).await {
                Ok(()) => Ok(client),
                Err(e) => {
                    release(client).await;
                    Err(pg_err("taking the commit turn", &e))
                }
            }
        })?;
        *self.turn.lock().unwrap_or_else(|p| p.into_inner()) = Some(turn);
        Ok(true)
    }

    fn end_turn(&self) {
        if let Some(turn) = self.turn.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.handle.spawn(release(turn));
        }
    }

    /// Drops the history partitions of the days that end at or before `cutoff_ms`, under the
    /// partitions' advisory lock: the number of days dropped. What is left before the cutoff
    /// (that day's first hours, the default partition) the caller deletes record by record.
    fn drop_history_before(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let pool = self.pool.clone();
        let dropped = self.run(async move {
            let mut client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            let days = Self::history_partitions(&client).await?;
            let mut dropped = Vec::new();
            for day in days {
                if (day + 1).saturating_mul(DAY_MS) > cutoff_ms {
                    continue;
                }
                let txn = client
                    .transaction()
                    .await
                    .map_err(|e| pg_err("dropping a history partition", &e))?;
                txn.execute("SELECT pg_advisory_xact_lock($1)", &[&HISTORY_LOCK])
                    .await
                    .map_err(|e| pg_err("dropping a history partition", &e))?;
                txn.batch_execute(&format!("DROP TABLE IF EXISTS twinguard_history_d{day}"))
                    .await
                    .map_err(|e| pg_err("dropping a history partition", &e))?;
                txn.commit()
                    .await
                    .map_err(|e| pg_err("dropping a history partition", &e))?;
                dropped.push(day);
            }
            Ok(dropped)
        })?;
        let mut known = self.history_days.lock().unwrap_or_else(|p| p.into_inner());
        for day in &dropped {
            known.remove(day);
        }
        Ok(dropped.len())
    }

    /// [`read_changes`] on a connection of the pool.
    fn changes_after(&self, after: u64, upto: u64) -> Result<Option<Vec<Change>>, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            read_changes(&client, after, upto).await
        })
    }

    /// One query for all of `keys`.
    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let pool = self.pool.clone();
        let asked = keys.to_vec();
        self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            read_many(&client, table, &asked).await
        })
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            self.check_held()?;
            return Ok(());
        }
        self.commit_plan(Plan::new(batch), None).map(|_| ())
    }

    /// Fails, like a commit, once this node's lock on the database is lost. Also publishes the pool's
    /// use (the server's probe calls it every two seconds, the writer before each group).
    fn head(&self) -> Result<Option<u64>, StoreError> {
        self.check_held()?;
        let status = self.pool.status();
        let in_use = status.size.saturating_sub(status.available);
        metrics::gauge!("twinguard_store_pool_connections", "state" => "in_use").set(in_use as f64);
        metrics::gauge!("twinguard_store_pool_connections", "state" => "idle")
            .set(status.available as f64);
        metrics::gauge!("twinguard_store_pool_waiting").set(status.waiting as f64);
        metrics::gauge!("twinguard_store_pool_max").set(status.max_size as f64);
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("connection", e))?;
            Ok(Some(read_head(&client).await?.position()))
        })
    }

    fn commit_at(&self, batch: &[Mutation], expected: u64) -> Result<Fenced, StoreError> {
        self.commit_plan(Plan::new(batch), Some(Counter::of(expected)))
    }

    fn range_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.records(Read::From(table, from.to_owned(), limit))
    }

    fn range(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.records(Read::Range(table, from.to_owned(), to.to_owned(), limit))
    }
}

/// The rows of the change log, then the counter: rows are trimmed only below the counter
/// less [`CHANGE_LOG_COMMITS`] as it stood when they were trimmed, so if `after` is not below
/// the counter read *after* the rows, no row after `after` was trimmed before they were read.
/// From a position of another timeline than the database's now (a history that a promotion or
/// a recovery left), `None`: which of its commits the new history has, the log cannot tell.
async fn read_changes(
    client: &deadpool_postgres::ClientWrapper,
    after: u64,
    upto: u64,
) -> Result<Option<Vec<Change>>, StoreError> {
    let from = Counter::of(after);
    let to = Counter::of(upto);
    let range = (
        from.sql().0,
        match to.timeline.cmp(&from.timeline) {
            std::cmp::Ordering::Equal => to.sql().0,
            std::cmp::Ordering::Greater => i64::MAX,
            std::cmp::Ordering::Less => from.sql().0,
        },
    );
    let statement = client
        .prepare_cached(CHANGES)
        .await
        .map_err(|e| pg_err("reading the change log", &e))?;
    let rows = client
        .query(&statement, &[&range.0, &range.1])
        .await
        .map_err(|e| pg_err("reading the change log", &e))?;
    let head = read_head(client).await?;
    if from.timeline != head.timeline || from.seq.saturating_add(CHANGE_LOG_COMMITS) < head.seq {
        return Ok(None);
    }
    let mut changes = Vec::with_capacity(rows.len());
    for row in rows {
        let bad = |what: &str| StoreError(format!("PostgreSQL: a change log row has {what}"));
        let seq: i64 = row
            .try_get(0)
            .map_err(|e| pg_err("reading the change log", &e))?;
        let tbl: String = row
            .try_get(1)
            .map_err(|e| pg_err("reading the change log", &e))?;
        let key: Vec<u8> = row
            .try_get(2)
            .map_err(|e| pg_err("reading the change log", &e))?;
        let seq = u64::try_from(seq).map_err(|_| bad("a negative position"))?;
        changes.push(Change {
            seq: Counter { seq, ..head }.position(),
            table: Table::ALL
                .into_iter()
                .find(|t| t.name() == tbl)
                .ok_or_else(|| bad("an unknown table"))?,
            key: String::from_utf8(key).map_err(|_| bad("a key that is not UTF-8"))?,
        });
    }
    Ok(Some(changes))
}

/// The values of `keys` in `table` (`None` for a key that is absent), in the order asked: one
/// query.
async fn read_many(
    client: &deadpool_postgres::ClientWrapper,
    table: Table,
    keys: &[String],
) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    let asked: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let sql = if table == Table::History {
        HISTORY_GET_MANY
    } else {
        GET_MANY
    };
    let statement = client
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_err("read", &e))?;
    let rows = client
        .query(&statement, &[&table.name(), &asked])
        .await
        .map_err(|e| pg_err("read", &e))?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let key: Vec<u8> = row.try_get(0).map_err(|e| pg_err("read", &e))?;
        let value: Vec<u8> = row.try_get(1).map_err(|e| pg_err("read", &e))?;
        found.insert(key, value);
    }
    Ok(keys
        .iter()
        .map(|k| found.get(k.as_bytes()).cloned())
        .collect())
}

/// A commit's statements, in a transaction `client` has begun: the counter moved first (from
/// `expected` only, if given), then the deletes and upserts. The caller commits on
/// [`Fenced::Committed`] and rolls back otherwise.
async fn apply_plan(
    client: &impl deadpool_postgres::GenericClient,
    plan: &Plan,
    expected: Option<Counter>,
) -> Result<Fenced, StoreError> {
    let moved = match expected.map(Counter::sql) {
        Some((seq, timeline)) => client.query_opt(BUMP_FROM, &[&seq, &timeline]).await,
        None => client.query_opt(BUMP, &[]).await,
    }
    .map_err(|e| pg_err("commit", &e))?;
    // A counter past what a position holds fails here, and rolls back.
    let counter = match moved {
        Some(row) => Counter::from_row(&row, "commit")?,
        None => {
            // Another writer moved the counter first, or the database is another history
            // than the one the writer read: nothing of this batch is applied.
            let row = client
                .query_one(HEAD, &[])
                .await
                .map_err(|e| pg_err("commit", &e))?;
            return Ok(Fenced::Stale(Counter::from_row(&row, "commit")?.position()));
        }
    };
    let head = counter.seq;
    if !plan.delete_keys.is_empty() {
        let delete = client
            .prepare_cached(DELETE)
            .await
            .map_err(|e| pg_err("commit", &e))?;
        let mut start = 0;
        while start < plan.delete_keys.len() {
            let end = (start + ROWS_PER_STATEMENT).min(plan.delete_keys.len());
            let tables = slice(&plan.delete_tables, start, end);
            let keys = slice(&plan.delete_keys, start, end);
            client
                .execute(&delete, &[&tables, &keys])
                .await
                .map_err(|e| pg_err("commit", &e))?;
            start = end;
        }
    }
    if !plan.put_keys.is_empty() {
        let upsert = client
            .prepare_cached(UPSERT)
            .await
            .map_err(|e| pg_err("commit", &e))?;
        for (start, end) in plan.put_chunks() {
            let tables = slice(&plan.put_tables, start, end);
            let keys = slice(&plan.put_keys, start, end);
            let values = slice(&plan.put_values, start, end);
            client
                .execute(&upsert, &[&tables, &keys, &values])
                .await
                .map_err(|e| pg_err("commit", &e))?;
        }
    }
    if !plan.history_delete_keys.is_empty() {
        let delete = client
            .prepare_cached(HISTORY_DELETE)
            .await
            .map_err(|e| pg_err("commit", &e))?;
        for start in (0..plan.history_delete_keys.len()).step_by(ROWS_PER_STATEMENT) {
            let end = (start + ROWS_PER_STATEMENT).min(plan.history_delete_keys.len());
            let keys = slice(&plan.history_delete_keys, start, end);
            let times = slice(&plan.history_delete_times, start, end);
            client
                .execute(&delete, &[&keys, &times])
                .await
                .map_err(|e| pg_err("commit", &e))?;
        }
    }
    if !plan.history_put_keys.is_empty() {
        let upsert = client
            .prepare_cached(HISTORY_UPSERT)
            .await
            .map_err(|e| pg_err("commit", &e))?;
        for start in (0..plan.history_put_keys.len()).step_by(ROWS_PER_STATEMENT) {
            let end = (start + ROWS_PER_STATEMENT).min(plan.history_put_keys.len());
            let keys = slice(&plan.history_put_keys, start, end);
            let times = slice(&plan.history_put_times, start, end);
            let values = slice(&plan.history_put_values, start, end);
            client
                .execute(&upsert, &[&keys, &times, &values])
                .await
                .map_err(|e| pg_err("commit", &e))?;
        }
    }
    let at = i64::try_from(head).unwrap_or(i64::MAX);
    if !plan.followed_keys.is_empty() {
        let log = client
            .prepare_cached(LOG_CHANGES)
            .await
            .map_err(|e| pg_err("commit", &e))?;
        for start in (0..plan.followed_keys.len()).step_by(ROWS_PER_STATEMENT) {
            let end = (start + ROWS_PER_STATEMENT).min(plan.followed_keys.len());
            let tables = slice(&plan.followed_tables, start, end);
            let keys = slice(&plan.followed_keys, start, end);
            client
                .execute(&log, &[&at, &tables, &keys])
                .await
                .map_err(|e| pg_err("commit", &e))?;
        }
    }
    if head % TRIM_CHANGES_EVERY == 0 && head > CHANGE_LOG_COMMITS {
        let below = i64::try_from(head - CHANGE_LOG_COMMITS).unwrap_or(0);
        client
            .execute(TRIM_CHANGES, &[&below])
            .await
            .map_err(|e| pg_err("commit", &e))?;
    }
    Ok(Fenced::Committed(counter.position()))
}

/// Makes the history partitions of `days` that do not exist yet, each in a transaction of its
/// own under the partitions' advisory lock. A day that cannot have one (the default partition
/// already holds readings of it) keeps going to the default partition: logged, not fatal.
async fn make_history_partitions(client: &mut tokio_postgres::Client, days: &[i64]) {
    for day in days {
        let (from, to) = (day * DAY_MS, (day + 1) * DAY_MS);
        let made = async {
            let txn = client.transaction().await?;
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&HISTORY_LOCK])
                .await?;
            txn.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS twinguard_history_d{day} PARTITION OF \
                 twinguard_history FOR VALUES FROM ({from}) TO ({to})"
            ))
            .await?;
            txn.commit().await
        }
        .await;
        if let Err(e) = made {
            let e = pg_err("making a history partition", &e);
            metrics::counter!("twinguard_store_history_partition_failures_total").increment(1);
            tracing::warn!(day, error = %e, "a day of history has no partition of its own; its readings go to the default partition");
        }
    }
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
