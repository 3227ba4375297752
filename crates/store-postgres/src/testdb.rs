//! Test support (not for production code): a uniquely named database on the PostgreSQL server
//! at 127.0.0.1:5432 (or `TWINGUARD_TEST_POSTGRES_ADDR`; user `postgres`, trust authentication),
//! created through the `postgres` maintenance database and dropped when the guard is dropped,
//! also when a test fails.
//!
//! Tests that need PostgreSQL fail when it is unreachable, with a message saying so, unless the
//! environment sets `TWINGUARD_SKIP_POSTGRES=1`; then [`TestDatabase::create`] returns `None`
//! and the test returns without checking anything.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The server's `HOST:PORT`: 127.0.0.1:5432 unless [`ADDR_ENV`] names another (loopback, as
/// the connections are plaintext).
pub fn addr() -> String {
    std::env::var(ADDR_ENV).unwrap_or_else(|_| "127.0.0.1:5432".to_owned())
}

/// Names the PostgreSQL server's `HOST:PORT` for the tests.
pub const ADDR_ENV: &str = "TWINGUARD_TEST_POSTGRES_ADDR";

/// The maintenance database tests connect to, to create and drop their own.
fn admin_url() -> String {
    format!("postgresql://postgres@{}/postgres", addr())
}

/// Set to `1` to skip the tests that need PostgreSQL.
pub const SKIP_ENV: &str = "TWINGUARD_SKIP_POSTGRES";

/// Whether the environment asks to skip the tests that need PostgreSQL.
pub fn skipped() -> bool {
    std::env::var_os(SKIP_ENV).is_some_and(|v| v == "1")
}

/// Runs `sql` (one or more statements) against `url` on a thread and runtime of its own, so
/// that it works wherever it is called from, async contexts included; returns the first
/// column of each row of the last statement's result, as text.
pub fn query(url: &str, sql: &str) -> Result<Vec<Option<String>>, String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    let worker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
            config.connect_timeout(Duration::from_secs(5));
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| with_causes(&e))?;
            let connection = tokio::spawn(connection);
            let messages = client
                .simple_query(&sql)
                .await
                .map_err(|e| with_causes(&e))?;
            let mut out = Vec::new();
            for message in messages {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                    out.push(row.get(0).map(str::to_owned));
                }
            }
            drop(client);
            let _ = connection.await;
            Ok(out)
        })
    });
    worker
        .join()
        .map_err(|_| "the query thread panicked".to_owned())?
}

/// An error and its causes, as one line.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// A database of its own for one test, dropped with the guard.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
}

impl TestDatabase {
    /// Creates a fresh database; `Ok(None)` when [`SKIP_ENV`] is set. An unreachable server is
    /// an error that says how to skip.
    pub fn create() -> Result<Option<Self>, String> {
        if skipped() {
            eprintln!("{SKIP_ENV}=1: skipping a test that needs PostgreSQL");
            return Ok(None);
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "twinguard_test_{}_{}_{}",
            std::process::id(),
            nanos,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        query(&admin_url(), &format!("CREATE DATABASE \"{name}\"")).map_err(|e| {
            format!(
                "this test needs PostgreSQL on {} (user postgres, trust authentication; \
                 {ADDR_ENV} names another HOST:PORT) to create a database, and could not: \
                 {e}. Set {SKIP_ENV}=1 to skip the PostgreSQL tests.",
                addr()
            )
        })?;
        Ok(Some(Self { name }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of this database (plaintext, loopback).
    pub fn url(&self) -> String {
        format!("postgresql://postgres@{}/{}", addr(), self.name)
    }

    /// Cuts the database off (no new connection is allowed, every open one is ended), or lets
    /// connections in again: a database that is unreachable for the nodes using it.
    pub fn set_reachable(&self, reachable: bool) -> Result<(), String> {
        query(
            &admin_url(),
            &format!(
                "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {reachable}",
                self.name
            ),
        )?;
        if !reachable {
            query(
                &admin_url(),
                &format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                    self.name
                ),
            )?;
        }
        Ok(())
    }

    /// Runs `sql` in this database (see [`query`]).
    pub fn query(&self, sql: &str) -> Result<Vec<Option<String>>, String> {
        query(&self.url(), sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // FORCE ends the connections a test left open (PostgreSQL 13 and later).
        if let Err(e) = query(
            &admin_url(),
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        ) {
            eprintln!("could not drop the test database {}: {e}", self.name);
        }
    }
}
