//! A real twinguard server on a free port over a temporary data directory, and an HTTPS client
//! that trusts its CA.

use reqwest::{Client, Method, RequestBuilder};
use serde_json::Value;
use tempfile::TempDir;
use twinguard_server::startup::{Application, ServeConfig};

pub const API: &str = "api-version=2023-10-31";

/// With `TWINGUARD_TEST_STORE=postgresql` every test server keeps its main store in a
/// PostgreSQL database of its own (created on the machine's server, dropped with the
/// [`TestServer`]): `scripts/test.sh` runs the API tests once on each backend.
const STORE_ENV: &str = "TWINGUARD_TEST_STORE";

/// The databases of the servers running in this process, by data directory (a server started
/// again on the same directory finds its database).
static DATABASES: std::sync::Mutex<
    Vec<(
        std::path::PathBuf,
        twinguard_store_postgres::testdb::TestDatabase,
    )>,
> = std::sync::Mutex::new(Vec::new());

/// The PostgreSQL store for a server on `dir`, when the environment asks for one.
fn test_store(dir: &std::path::Path) -> Option<twinguard_server::startup::StoreConfig> {
    match std::env::var(STORE_ENV).as_deref() {
        Ok("postgresql") => {}
        Ok("redb") | Err(_) => return None,
        Ok(other) => panic!("{STORE_ENV}={other}: expected postgresql or redb"),
    }
    let mut databases = DATABASES.lock().unwrap();
    let url = match databases.iter().find(|(d, _)| d == dir) {
        Some((_, db)) => db.url(),
        None => {
            let db = twinguard_store_postgres::testdb::TestDatabase::create()
                .unwrap()
                .expect("TWINGUARD_TEST_STORE=postgresql needs PostgreSQL");
            let url = db.url();
            databases.push((dir.to_owned(), db));
            url
        }
    };
    Some(twinguard_server::startup::StoreConfig::Postgres(
        twinguard_server::startup::PostgresConfig {
            url,
            ca_file: None,
            pool_size: 4,
        },
    ))
}

/// A PostgreSQL database of the test's own, dropped with it, and the store configuration of
/// nodes on it; `None` on a machine without PostgreSQL.
pub fn shared_store() -> Option<(
    twinguard_store_postgres::testdb::TestDatabase,
    twinguard_server::startup::StoreConfig,
)> {
    let db = twinguard_store_postgres::testdb::TestDatabase::create().unwrap()?;
    let store = twinguard_server::startup::StoreConfig::Postgres(
        twinguard_server::startup::PostgresConfig {
            url: db.url(),
            ca_file: None,
            pool_size: 4,
        },
    );
    Some((db, store))
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Its database goes with it (dropped with FORCE: the server task may still run).
        if let Ok(mut databases) = DATABASES.lock() {
            databases.retain(|(d, _)| d != self.dir.path());
        }
    }
}

pub struct TestServer {
    pub base: String,
    /// The device plane's base URL (signed telemetry).
    pub device_base: String,
    pub client: Client,
    /// The data directory; kept alive as long as the server.
    pub dir: TempDir,
    pub state: twinguard_server::app::AppState,
    admin_id: String,
    admin_secret: String,
}

/// An HTTPS client trusting only the data directory's CA, optionally connecting from a given
/// local address (any of 127.0.0.0/8 works on loopback).
pub fn https_client(data_dir: &std::path::Path, from: Option<std::net::IpAddr>) -> Client {
    let ca = std::fs::read(data_dir.join("tls/ca.pem")).unwrap();
    Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .local_address(from)
        .build()
        .unwrap()
}

impl TestServer {
    /// The URL of this server's PostgreSQL database, when the suite runs on PostgreSQL.
    pub fn database_url(&self) -> Option<String> {
        let databases = DATABASES.lock().unwrap();
        databases
            .iter()
            .find(|(d, _)| d == self.dir.path())
            .map(|(_, db)| db.url())
    }

    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server whose configuration `adjust` changes first.
    pub async fn start_with(adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), adjust).await
    }

    /// A server on the data directory `dir` (which may be, say, a small file system of its own).
    pub async fn start_in(dir: TempDir, adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        let app = Self::build_in(&dir, adjust);
        Self::run(app, dir)
    }

    /// The application on `dir`, built but not yet serving: a test may prepare what must be
    /// there before the server runs (see [`TestServer::run`]).
    pub fn build_in(dir: &TempDir, adjust: impl FnOnce(&mut ServeConfig)) -> Application {
        let mut config = ServeConfig {
            data_dir: dir.path().to_owned(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            tls_names: vec![],
            issuers: None,
            audit_witness: None,
            siem: vec![],
            device_listen: Some("127.0.0.1:0".parse().unwrap()),
            mqtt: None,
            history_retention: None,
            public_url: None,
            connections: Default::default(),
            dangerous_unbounded_resources: false,
            egress: Default::default(),
            egress_ca: None,
            store: Default::default(),
            endpoint_credentials: None,
            event_backlog: None,
            egress_lookup: None,
        };
        if let Some(store) = test_store(dir.path()) {
            config.store = store;
        }
        adjust(&mut config);
        Application::build(&config).unwrap()
    }

    /// Serves `app`, built on `dir` by [`TestServer::build_in`].
    pub fn run(app: Application, dir: TempDir) -> Self {
        // The listener itself: a configured public URL need not resolve here.
        let base = app.listener_url();
        if std::env::var(STORE_ENV).as_deref() == Ok("postgresql") {
            assert!(
                !dir.path().join("store.redb").exists(),
                "the main store is not in PostgreSQL"
            );
        }
        let device_base = format!("https://{}", app.device_addr().unwrap());
        let state = app.state().clone();
        tokio::spawn(app.run());
        let client = https_client(dir.path(), None);
        let admin: Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("secrets/admin-client.json")).unwrap(),
        )
        .unwrap();
        Self {
            base,
            device_base,
            client,
            state,
            admin_id: admin["client_id"].as_str().unwrap().to_owned(),
            admin_secret: admin["client_secret"].as_str().unwrap().to_owned(),
            dir,
        }
    }

    /// A data directory for another node of this one's instance: only the instance files of
    /// this one's (`docs/cluster.md`), so nothing else is shared but the store.
    pub fn node_files(&self) -> TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "instance.json",
            "secrets/instance.kek",
            "secrets/admin-client.json",
        ] {
            std::fs::create_dir_all(dir.path().join(name).parent().unwrap()).unwrap();
            std::fs::copy(self.dir.path().join(name), dir.path().join(name)).unwrap();
        }
        dir
    }

    /// Two nodes of one instance, each configured by `adjust` (which gives them a shared
    /// store, [`shared_store`]): B's data directory holds only A's instance files.
    pub async fn two_nodes(adjust: impl Fn(&mut ServeConfig)) -> (Self, Self) {
        let a = Self::start_in(tempfile::tempdir().unwrap(), &adjust).await;
        let b = Self::start_in(a.node_files(), &adjust).await;
        (a, b)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn token_for(&self, client_id: &str, secret: &str) -> reqwest::Response {
        self.client
            .post(self.url("/oauth2/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
            ])
            .send()
            .await
            .unwrap()
    }

    pub async fn admin_token(&self) -> String {
        let response = self
            .token_for(&self.admin_id.clone(), &self.admin_secret.clone())
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// A token for a new application holding only `role` at instance scope.
    pub async fn token_with_role(&self, role: &str) -> String {
        self.token_with_scoped_role(role, serde_json::json!({"kind": "instance"}))
            .await
    }

    /// A token for a new application holding `role` at `scope`, created through the admin API.
    pub async fn token_with_scoped_role(&self, role: &str, scope: Value) -> String {
        let admin = self.admin_token().await;
        let name = format!("app-{}", uuid_like());
        let created: Value = self
            .admin_call(reqwest::Method::POST, "/admin/identities", &admin)
            .json(&serde_json::json!({"kind": "application", "name": name}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["identity"]["id"].as_str().unwrap().to_owned();
        let secret = created["clientSecret"].as_str().unwrap().to_owned();
        let assigned = self
            .admin_call(reqwest::Method::POST, "/admin/roleassignments", &admin)
            .json(&serde_json::json!({"principalId": id, "roleId": role, "scope": scope}))
            .send()
            .await
            .unwrap();
        assert_eq!(assigned.status(), 201);
        let response = self.token_for(&id, &secret).await;
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Calls twinguard's own API and returns the JSON answer (any status).
    pub async fn admin_json(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Value {
        let mut request = self.admin_call(method, path, token);
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.unwrap().json().await.unwrap()
    }

    /// A request to twinguard's own API (no `api-version`) with a bearer token.
    pub fn admin_call(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token)
    }

    pub fn admin_credentials(&self) -> (String, String) {
        (self.admin_id.clone(), self.admin_secret.clone())
    }

    /// Sends a request without a body to an ADT route with a bearer token.
    pub async fn call(&self, method: Method, path: &str, token: &str) -> reqwest::Response {
        self.adt(method, path, token).send().await.unwrap()
    }

    /// Sends a JSON body to an ADT route with a bearer token.
    pub async fn call_json<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: &B,
    ) -> reqwest::Response {
        self.adt(method, path, token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// A request to an ADT route (`api-version` added) with a bearer token.
    pub fn adt(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.client
            .request(method, format!("{}{path}{sep}{API}", self.base))
            .bearer_auth(token)
    }
}

/// A unique suffix for names in one test run.
pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}
