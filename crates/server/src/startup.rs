//! Start-up: the data directory, the store, the services, the TLS listener. Tests build the same
//! [`Application`] the binary runs, on port 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;
use serde_json::json;
use twinguard_core::clock::SystemClock;
use twinguard_core::follow::ChangeFollower;
use twinguard_core::identity::Directory;
use twinguard_core::service::OwnerStore;
use twinguard_core::service::TwinService;
use twinguard_core::store::{Mutation, Owner, Store, Table};
use twinguard_store_postgres::{Hold, PgOptions, PgStore};
use twinguard_store_redb::RedbStore;
use twinguard_telemetry::service::TelemetryEvent;

use crate::app::{AppState, router};
use crate::ca::Authority;
use crate::datadir::{DataDir, write_private};
use crate::external::ExternalIssuers;
use crate::signing_keys::KeyRing;
use crate::tokens::{KeysHome, TokenService};
use crate::vault::{Material, Vault};

/// The history store's page cache: merges append to each stream's last leaf, so this holds
/// those of a few thousand streams.
const HISTORY_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// How long requests in flight may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    /// Extra DNS names or IP addresses for the server certificate, used when it is first made.
    pub tls_names: Vec<String>,
    /// Trusted external OpenID Connect issuers (a JSON file), if any.
    pub issuers: Option<PathBuf>,
    /// A file each new audit checkpoint is also written to (a witness location), if any.
    pub audit_witness: Option<PathBuf>,
    /// Where the audit trail is forwarded (SIEM sinks).
    pub siem: Vec<crate::siem::Sink>,
    /// Address of the device plane's HTTPS listener (signed telemetry); `None` turns it off.
    pub device_listen: Option<SocketAddr>,
    /// An MQTT broker to take signed telemetry from, if any.
    pub mqtt: Option<crate::mqtt::MqttConfig>,
    /// How long accepted readings stay in the history; `None` keeps them for ever.
    pub history_retention: Option<std::time::Duration>,
    /// The address clients reach the API at, from which every link the server hands out is
    /// built (`nextLink`, discovery metadata, the token endpoint). `None` derives it from the
    /// listener: its IP and port, or for an unspecified IP the first TLS name (else 127.0.0.1).
    /// Never taken from a request's `Host` or `:authority`.
    pub public_url: Option<PublicUrl>,
    /// How long and how many connections each listener keeps (see [`crate::connections`]).
    pub connections: crate::connections::ConnectionPolicy,
    /// Turns issue 17's resource protections off, for the benchmark's reference run only
    /// (`bench/protections.sh`): no connection limits or timeouts (no connection gate, no idle
    /// wrapper, hyper's HTTP defaults, a handshake timeout of a day), no query work budget,
    /// page byte cap, deadline, cap per principal or server-wide query slots. Dangerous: any
    /// client can then exhaust the server. The write-ahead audit intent stays: it is
    /// correctness (a refused write is not applied), not a protection. Set only by the hidden
    /// `serve --dangerous-unbounded-resources`, which also drops the log's rate limit.
    pub dangerous_unbounded_resources: bool,
    /// The destinations twinguard may connect to on its own (event endpoints, import URLs):
    /// NS-4.
    pub egress: crate::egress::EgressPolicy,
    /// Trust anchors (PEM) for https import URLs; without them only http on loopback is fetched.
    pub egress_ca: Option<PathBuf>,
    /// The only directory event endpoints' credential files (`passwordFile`, `credentialsFile`,
    /// `nkeyFile`, `secretFile`, `caFile`) may be in; `None`: `DATA_DIR/endpoint-credentials`.
    pub endpoint_credentials: Option<PathBuf>,
    /// Most change-feed records kept for endpoints that lag (`None`:
    /// [`crate::events::DEFAULT_BACKLOG`]); past it, the oldest go and the lagging endpoints
    /// skip them (counted in `twinguard_events_skipped_total`).
    pub event_backlog: Option<u64>,
    /// How outbound connections resolve names (`None`: the system resolver; tests give a DNS
    /// of their own).
    pub egress_lookup: Option<crate::egress::SharedLookup>,
    /// Where the main store is: the embedded redb file (the default) or PostgreSQL.
    pub store: StoreConfig,
}

/// Where the main store (graph, identities, events, device registry, history log) is kept. The
/// history is `DATA_DIR/history.redb` beside the embedded store, and in PostgreSQL beside a
/// PostgreSQL store (`docs/storage.md`).
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    /// `DATA_DIR/store.redb`.
    #[default]
    Embedded,
    /// A PostgreSQL database (see the `twinguard-store-postgres` crate).
    Postgres(PostgresConfig),
}

/// How to reach the PostgreSQL store.
#[derive(Clone)]
pub struct PostgresConfig {
    /// `postgresql://user[:password]@host[:port]/database[?...]`; may hold a password, so it is
    /// never printed (see the `Debug` impl).
    pub url: String,
    /// CA certificates (PEM) the server's certificate must chain to; without it the
    /// connection is plaintext, which only a loopback host is allowed.
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool.
    pub pool_size: usize,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &"(not shown)")
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PostgresConfig {
    /// A store on the database with a pool of `pool_size` connections.
    fn connect(&self, pool_size: usize) -> Result<PgStore, twinguard_core::store::StoreError> {
        PgStore::connect(
            &self.url,
            &PgOptions {
                pool_size,
                ca_file: self.ca_file.clone(),
                ..PgOptions::default()
            },
        )
    }
}

impl StoreConfig {
    /// Parses `--store`: `redb` (the embedded default) or a `postgresql://` (or `postgres://`)
    /// URL.
    pub fn parse(
        store: Option<&str>,
        ca_file: Option<PathBuf>,
        pool_size: usize,
    ) -> anyhow::Result<Self> {
        match store.map(str::trim) {
            None | Some("redb") => {
                anyhow::ensure!(
                    ca_file.is_none(),
                    "--store-ca is for a PostgreSQL store (--store postgresql://...)"
                );
                Ok(Self::Embedded)
            }
            Some(url) if url.starts_with("postgresql://") || url.starts_with("postgres://") => {
                anyhow::ensure!(pool_size > 0, "--store-pool-size must be at least 1");
                Ok(Self::Postgres(PostgresConfig {
                    url: url.to_owned(),
                    ca_file,
                    pool_size,
                }))
            }
            // Not the text itself: it may be a connection string with a password.
            Some(_) => anyhow::bail!("--store takes `redb` or a postgresql:// URL"),
        }
    }

    /// With PostgreSQL, a connection pool of its own for this node's audit log in the
    /// database (`crate::audit::Audit::open`): audit groups neither wait for the main pool's
    /// connections nor hold them.
    pub fn audit_database(&self) -> anyhow::Result<Option<Arc<PgStore>>> {
        match self {
            Self::Embedded => Ok(None),
            Self::Postgres(pg) => Ok(Some(Arc::new(
                pg.connect(2)
                    .context("connecting to PostgreSQL for the audit log")?,
            ))),
        }
    }

    /// Opens the main store for a serving node. With PostgreSQL, other nodes may serve the
    /// same database; waits up to 30 s for a backup or restore that holds it.
    pub fn open(&self, data_dir: &DataDir) -> anyhow::Result<Arc<dyn Store>> {
        self.open_holding(data_dir, Hold::Serve, std::time::Duration::from_secs(30))
    }

    /// Opens the main store; with PostgreSQL, holding the database as `hold` says and waiting
    /// at most `wait` for the other kind of holder to let go ([`PgStore::lock`]).
    pub fn open_holding(
        &self,
        data_dir: &DataDir,
        hold: Hold,
        wait: std::time::Duration,
    ) -> anyhow::Result<Arc<dyn Store>> {
        match self {
            Self::Embedded => Ok(Arc::new(
                RedbStore::open(&data_dir.store_path()).context("opening the store")?,
            )),
            Self::Postgres(pg) => {
                let store = pg
                    .connect(pg.pool_size)
                    .context("connecting to the PostgreSQL store")?;
                store
                    .lock(hold, wait)
                    .context("taking the PostgreSQL store")?;
                Ok(Arc::new(store))
            }
        }
    }
}

/// Moves the history that a node kept in `DATA_DIR/history.redb` (before history was kept in
/// PostgreSQL) into `store`, then renames the file `history.redb.moved`. Idempotent: records are
/// written under their own keys, so a move cut short is done again at the next start.
fn adopt_local_history(data_dir: &DataDir, store: &dyn Store) -> anyhow::Result<()> {
    let path = data_dir.history_path();
    if !path.exists() {
        return Ok(());
    }
    let local = RedbStore::open(&path).context("opening the local history store to move it")?;
    let mut moved = 0usize;
    let mut from = String::new();
    loop {
        let rows = local.range_from(Table::History, &from, 4_096)?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        from = format!("{last}\0");
        moved += rows.len();
        let puts: Vec<Mutation> = rows
            .into_iter()
            .map(|(key, value)| Mutation::put(Table::History, key, value))
            .collect();
        store
            .commit(&puts)
            .context("moving the local history into PostgreSQL")?;
    }
    drop(local);
    let moved_to = path.with_extension("redb.moved");
    std::fs::rename(&path, &moved_to).with_context(|| format!("renaming {}", path.display()))?;
    tracing::info!(records = moved, file = %moved_to.display(), "moved the local history into PostgreSQL");
    Ok(())
}

/// The API's public base URL: `https://host[:port]`, no path, query, fragment or user info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl(String);

impl PublicUrl {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(text.trim())
            .map_err(|e| anyhow::anyhow!("the public URL is not a URL: {e}"))?;
        anyhow::ensure!(url.scheme() == "https", "the public URL must be https");
        anyhow::ensure!(
            url.username().is_empty() && url.password().is_none(),
            "the public URL must not carry user information"
        );
        anyhow::ensure!(
            url.path() == "/" && url.query().is_none() && url.fragment().is_none(),
            "the public URL is a scheme, host and port only: no path, query or fragment"
        );
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("the public URL needs a host"))?;
        Ok(Self(match url.port() {
            Some(port) => format!("https://{host}:{port}"),
            None => format!("https://{host}"),
        }))
    }

    /// The default: the listener's address, or for an unspecified one (`0.0.0.0`, `::`) the
    /// first TLS name, else loopback.
    fn derived(listener: SocketAddr, tls_names: &[String]) -> Self {
        let bracket = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let host = if listener.ip().is_unspecified() {
            match tls_names.first() {
                Some(name) => match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => bracket(ip),
                    Err(_) => name.clone(),
                },
                None => "127.0.0.1".to_owned(),
            }
        } else {
            bracket(listener.ip())
        };
        Self(format!("https://{host}:{}", listener.port()))
    }

    /// The base URL without a trailing slash; paths are appended to it.
    /// The host (name or address, IPv6 in brackets), without scheme or port: events' `source`.
    pub fn host(&self) -> &str {
        let rest = self.0.trim_start_matches("https://");
        match rest.rfind(':') {
            Some(i) if !rest[i..].contains(']') => &rest[..i],
            _ => rest,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub struct Application {
    listener: std::net::TcpListener,
    local_addr: SocketAddr,
    /// The device plane's listener, if configured.
    device_listener: Option<std::net::TcpListener>,
    mqtt: Option<crate::mqtt::Prepared>,
    tls: RustlsConfig,
    state: AppState,
    data_dir: DataDir,
    siem: Vec<crate::siem::Sink>,
    connections: crate::connections::ConnectionPolicy,
    /// [`ServeConfig::dangerous_unbounded_resources`].
    unbounded: bool,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// Installs the process-wide rustls crypto provider (aws-lc-rs) once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// What [`init`] opened.
pub struct Initialised {
    pub store: Arc<dyn Store>,
    pub tokens: Arc<TokenService>,
    /// The identity records' view of the store (to be connected to the twin writer's door
    /// once it runs: [`OwnerStore::connect`]).
    pub identity: Arc<OwnerStore>,
    /// On a shared store, the follower of other nodes' changes, with the directory and the
    /// token service registered.
    pub follower: Option<Arc<ChangeFollower>>,
    /// The instance's CA.
    pub ca: Arc<Authority>,
    /// Where the instance's private material lives.
    pub material: Material,
}

/// Creates the data directory's keys, certificates and first admin client if they are missing.
/// On a shared store, the instance's private material is read from the store, sealed under
/// the node's key-encryption key (`crate::vault`), and made there if the instance has none.
pub fn init(
    data_dir: &DataDir,
    tls_names: &[String],
    issuers: Option<&std::path::Path>,
    store: &StoreConfig,
) -> anyhow::Result<Initialised> {
    let external = match issuers {
        Some(path) => ExternalIssuers::load(path)?,
        None => ExternalIssuers::default(),
    };
    let unfinished = "a restore into this instance did not finish (twinguard restore): restore \
        again into a new data directory and an empty store";
    anyhow::ensure!(!data_dir.restore_marker().exists(), unfinished);
    let instance = data_dir.prepare_dirs()?;
    let store = store.open(data_dir)?;
    anyhow::ensure!(
        !twinguard_core::store::restore_unfinished(store.as_ref())?,
        unfinished
    );
    // Before the owners load: a commit another node makes while they do is handed to them again.
    let follower = ChangeFollower::start(store.clone())?;
    // Identities, credentials and tokens are written only to the identity tables.
    let identity_store = Arc::new(OwnerStore::new(Owner::Identity, store.clone()));
    let identity: Arc<dyn Store> = identity_store.clone();
    let material = match store.head()? {
        None => Material::Files,
        Some(_) => Material::Sealed(Arc::new(
            Vault::from_file(&data_dir.kek(), identity.clone())
                .context("the instance's key-encryption key")?,
        )),
    };
    let ca = Arc::new(Authority::open(data_dir, tls_names, &material)?);
    let (keys, keys_home) = token_keys(data_dir, &material)?;
    let directory = Arc::new(
        Directory::open(identity.clone(), Arc::new(SystemClock))
            .context("loading the identity directory")?,
    );
    let tokens = Arc::new(TokenService::new(
        instance.issuer,
        keys,
        keys_home,
        identity,
        directory.clone(),
        external,
    )?);
    tokens.rotate_keys_if_due()?;
    if directory.is_empty() {
        // First start: write the credential for its owner first, then register it, so a crash
        // in between leaves no registered credential that nobody holds.
        let (client_id, client_secret) = Directory::new_admin_credential();
        let file = json!({
            "client_id": client_id,
            "client_secret": client_secret.as_str(),
            "token_endpoint": serde_json::Value::Null,
        });
        write_private(&data_dir.admin_client(), &serde_json::to_vec_pretty(&file)?)?;
        directory
            .bootstrap_admin(&client_id, &client_secret)
            .map_err(|e| anyhow::anyhow!("registering the first administrator: {e}"))?;
        tracing::info!(path = %data_dir.admin_client().display(), "created the first admin client credential");
    } else if !data_dir.admin_client().exists() {
        tracing::warn!(path = %data_dir.admin_client().display(), "the first admin credential file is missing; administer with another identity");
    }
    if let Some(follower) = &follower {
        follower.register(directory.clone());
        follower.register(tokens.clone());
        follower.register(ca.clone());
    }
    Ok(Initialised {
        store,
        tokens,
        identity: identity_store,
        follower,
        ca,
        material,
    })
}

/// The token signing key ring and where it is kept: `DIR/secrets/token-keys.json`, or the
/// shared store's sealed record (which adopts the file, then removes it).
fn token_keys(data_dir: &DataDir, material: &Material) -> anyhow::Result<(KeyRing, KeysHome)> {
    let path = data_dir.token_keys();
    let stored = material.secret(
        crate::vault::names::TOKEN_KEYS,
        &path,
        "the token signing keys",
        || KeyRing::generate(crate::tokens::now_secs())?.to_json(),
    )?;
    let keys = KeyRing::from_json(&stored).context("reading the token signing keys")?;
    let home = match material {
        Material::Files => KeysHome::File(path),
        Material::Sealed(vault) => KeysHome::Sealed(vault.clone()),
    };
    Ok((keys, home))
}

/// Orders this process's graphs under the instance's order key (`twinguard_core::graph::order`),
/// made once: every node iterates the same twins in the same order, also after a restart, so a
/// query's continuation token resumes at the same row on whichever node it reaches. Before the
/// graph is loaded (and, on a shared store, before the writer reads the store's counter: making
/// the key is a commit).
fn order_graphs(data_dir: &DataDir, material: &Material) -> anyhow::Result<()> {
    let key = material.secret(
        crate::vault::names::ORDER_KEY,
        &data_dir.root().join("secrets/graph-order.key"),
        "the graph order key",
        || {
            let mut key = zeroize::Zeroizing::new(vec![0u8; 16]);
            aws_lc_rs::rand::fill(&mut key)
                .map_err(|_| anyhow::anyhow!("no random bytes for the graph order key"))?;
            Ok(key)
        },
    )?;
    let key: [u8; 16] = key
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("the graph order key is not 16 bytes"))?;
    if !twinguard_core::graph::order::set_order_key(key) {
        // Expected only where one process serves several instances (tests): the first key
        // stays. Anywhere else a graph was made before this, and pages would not resume alike
        // on every node.
        tracing::warn!("this process already orders its graphs under another key");
    }
    Ok(())
}

/// How often a node on a shared store looks for other nodes' commits (`TwinService::follow`).
pub const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs `job` on the blocking pool every `period` (one run at a time), logging `failure` with
/// the error when it fails.
fn every<T, E: std::fmt::Display + Send + 'static>(
    period: std::time::Duration,
    failure: &'static str,
    job: impl Fn() -> Result<T, E> + Send + Sync + 'static,
) {
    let job = Arc::new(job);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let job = job.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || job().map(|_| ())).await {
                tracing::warn!(error = %e, "{failure}");
            }
        }
    });
}

/// How often a node on a shared store publishes its failed secret checks per account.
const PUBLISH_FAILURES_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// How often the used client-assertion IDs of expired assertions are deleted.
const ASSERTION_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// How often the server checks that its store answers (`TwinService::probe_store`).
pub const STORE_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The TLS handshake timeout with [`ServeConfig::dangerous_unbounded_resources`]: a day, as
/// good as none for a benchmark (axum-server would otherwise apply its own 10 s).
const UNBOUNDED_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(86_400);

impl Application {
    pub fn build(config: &ServeConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !config.dangerous_unbounded_resources || config.connections.proxies.is_empty(),
            "--proxy-protocol-from needs the connection limits that \
             --dangerous-unbounded-resources turns off"
        );
        install_crypto_provider();
        crate::metrics::install();
        let data_dir = DataDir::new(&config.data_dir);
        let Initialised {
            store,
            tokens,
            identity: identity_store,
            follower,
            ca,
            material,
        } = init(
            &data_dir,
            &config.tls_names,
            config.issuers.as_deref(),
            &config.store,
        )?;
        // Before the writer reads the store's counter: making the key is a commit.
        let positions = match &material {
            Material::Sealed(vault) => Some(Arc::new(
                crate::positions::PositionSeal::load_or_create(store.as_ref(), vault)
                    .context("the store positions' key")?,
            )),
            Material::Files => None,
        };
        order_graphs(&data_dir, &material)?;
        let service = TwinService::open(store.clone(), Arc::new(SystemClock))
            .context("loading the twin graph")?;
        // One door for durable writes: from here on, every owner's commits to the main store go
        // through the twin writer's groups, checked against the tables the owner owns.
        identity_store.connect(service.door(Owner::Identity));
        let owned = |owner| {
            let owned = OwnerStore::new(owner, store.clone());
            owned.connect(service.door(owner));
            Arc::new(owned) as Arc<dyn Store>
        };
        let (event_store, telemetry_store) = (owned(Owner::Events), owned(Owner::Telemetry));
        let service = if config.dangerous_unbounded_resources {
            tracing::warn!(
                "DANGEROUS: resource protections are off (--dangerous-unbounded-resources); \
                 for benchmarks only"
            );
            service.dangerous_unbounded_queries()
        } else {
            service
        };
        // Beside the embedded store, the history store is a file of its own with one writer,
        // the history merger; its commits are checked against telemetry's tables like those
        // through the door. Beside PostgreSQL, history is kept there, shared by the nodes: the
        // telemetry store itself (readings go to it in the ingestion commit).
        let history: Arc<dyn Store> = match &config.store {
            StoreConfig::Embedded => Arc::new(OwnerStore::new(
                Owner::Telemetry,
                Arc::new(
                    RedbStore::open_with_cache(&data_dir.history_path(), HISTORY_CACHE_BYTES)
                        .context("opening the history store")?,
                ),
            )),
            StoreConfig::Postgres(_) => {
                adopt_local_history(&data_dir, telemetry_store.as_ref())?;
                telemetry_store.clone()
            }
        };
        let telemetry = twinguard_telemetry::Telemetry::open(
            service.clone(),
            telemetry_store,
            history,
            Arc::new(SystemClock),
        )
        .context("loading the device registry")?;
        if let Some(follower) = &follower {
            follower.register(Arc::new(telemetry.clone()));
        }
        if let Some(retention) = config.history_retention {
            telemetry.keep_history_for(retention);
        }
        telemetry
            .spawn_history_merger()
            .context("starting the history merger")?;
        let tls = crate::tls::server_config(&data_dir)?;
        ca.serve_with(tls.clone());
        let instance = data_dir.instance()?;
        let audit = crate::audit::Audit::open(
            &data_dir,
            &instance.instance_id,
            config.audit_witness.as_deref(),
            config.store.audit_database()?,
        )?;
        let listener = std::net::TcpListener::bind(config.api_listen)
            .with_context(|| format!("binding {}", config.api_listen))?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let public_url = match &config.public_url {
            Some(url) => url.clone(),
            None => PublicUrl::derived(local_addr, &config.tls_names),
        };
        let device_listener = match config.device_listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding the device plane on {addr}"))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let mqtt = config
            .mqtt
            .clone()
            .map(|m| crate::mqtt::Prepared::new(m, &data_dir, &instance.instance_id, &material))
            .transpose()?;
        let mqtt_status = mqtt
            .as_ref()
            .map(|_| Arc::new(crate::mqtt::MqttStatus::default()));
        let service = Arc::new(service);
        let event_key = Arc::new(crate::events::EventKey::load_or_create(
            &data_dir, &material,
        )?);
        event_key.rotate_if_due()?;
        if let Some(follower) = &follower {
            follower.register(event_key.clone());
        }
        let egress = match &config.egress_lookup {
            Some(lookup) => {
                crate::egress::Egress::with_lookup(config.egress.clone(), lookup.0.clone())
            }
            None => crate::egress::Egress::new(config.egress.clone()),
        };
        let events = crate::events::Events::open(
            service.clone(),
            event_store,
            egress.clone(),
            event_key,
            public_url.host().to_owned(),
            match &config.endpoint_credentials {
                Some(dir) => dir.clone(),
                None => data_dir.private_dir("endpoint-credentials")?,
            },
            config
                .event_backlog
                .unwrap_or(crate::events::DEFAULT_BACKLOG),
        )
        .context("loading the event endpoints")?;
        let jobs = crate::jobs::Jobs::open(data_dir.root(), Some(audit.clone()))
            .context("preparing the jobs' spool directory")?;
        let mut roots = Vec::new();
        if let Some(path) = &config.egress_ca {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            roots = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no PEM certificate", path.display()))?;
        }
        jobs.set_url_input(crate::jobs::UrlInput {
            egress: egress.clone(),
            roots,
        });
        let app = Self {
            listener,
            local_addr,
            device_listener,
            mqtt,
            tls,
            state: AppState::new(crate::app::AppParts {
                service,
                tokens,
                query_slots: Arc::new(tokio::sync::Semaphore::new(
                    if config.dangerous_unbounded_resources {
                        tokio::sync::Semaphore::MAX_PERMITS
                    } else {
                        crate::app::QUERY_SLOTS
                    },
                )),
                ca,
                audit,
                telemetry,
                public_url: Arc::new(public_url),
                mqtt: mqtt_status,
                events,
                jobs,
                positions,
                follower,
            }),
            data_dir,
            siem: config.siem.clone(),
            connections: config.connections.clone(),
            unbounded: config.dangerous_unbounded_resources,
        };
        app.record_token_endpoint()?;
        app.state
            .tokens
            .set_token_endpoint(format!("{}/oauth2/token", app.base_url()));
        Ok(app)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The public base URL: configured, or derived from the listener ([`ServeConfig::public_url`]).
    pub fn base_url(&self) -> String {
        self.state.public_url.as_str().to_owned()
    }

    /// The listener's own URL (an unspecified address shown as loopback), which local tools
    /// connect to whatever public URL is configured.
    pub fn listener_url(&self) -> String {
        let host = match self.local_addr.ip() {
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_owned(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_owned(),
            ip => ip.to_string(),
        };
        format!("https://{host}:{}", self.local_addr.port())
    }

    /// The device plane's address, if it listens.
    pub fn device_addr(&self) -> Option<SocketAddr> {
        self.device_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Keeps the admin credential file's `token_endpoint` pointing at this run's address.
    fn record_token_endpoint(&self) -> anyhow::Result<()> {
        let path = self.data_dir.admin_client();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let mut file: serde_json::Value = serde_json::from_str(&text)?;
        let endpoint = format!("{}/oauth2/token", self.base_url());
        if file.get("token_endpoint").and_then(|v| v.as_str()) != Some(endpoint.as_str()) {
            file["token_endpoint"] = serde_json::Value::String(endpoint);
            write_private(&path, &serde_json::to_vec_pretty(&file)?)?;
        }
        Ok(())
    }

    /// Serves until the process ends.
    pub async fn run(self) -> anyhow::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `shutdown` completes, then stops accepting connections and gives requests in
    /// flight up to [`SHUTDOWN_GRACE`] to finish. Acknowledged writes are durable either way.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let handle = axum_server::Handle::new();
        let on_shutdown = handle.clone();
        let (tokens, events) = (self.state.tokens.clone(), self.state.events.clone());
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3_600));
            loop {
                hourly.tick().await;
                // Both commit on a shared store: off the runtime's threads.
                let (tokens, events) = (tokens.clone(), events.clone());
                let rotated = tokio::task::spawn_blocking(move || {
                    if let Err(e) = tokens.rotate_keys_if_due() {
                        tracing::error!(error = %e, "token signing key rotation failed");
                    }
                    if let Err(e) = events.key().rotate_if_due() {
                        tracing::error!(error = %e, "event signing key rotation failed");
                    }
                });
                let _ = rotated.await;
            }
        });
        for sink in &self.siem {
            crate::siem::spawn(
                self.state.audit.log().clone(),
                sink.clone(),
                &self.data_dir.root().join("siem"),
            )?;
        }
        let tokens = self.state.tokens.clone();
        tokio::spawn(async move {
            // The first fetch of external issuers' keys runs beside serving: a slow identity
            // provider delays its own tokens only (they fetch again on an unknown kid).
            let mut every_minute = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every_minute.tick().await;
                tokens.external().refresh_due().await;
            }
        });
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            on_shutdown.graceful_shutdown(Some(SHUTDOWN_GRACE));
        });
        let tokens = self.state.tokens.clone();
        every(
            ASSERTION_SWEEP_EVERY,
            "expired client-assertion IDs or old failure counts could not be deleted",
            move || {
                tokens
                    .forget_expired_assertions()
                    .and_then(|_| tokens.directory().forget_old_failures())
            },
        );
        let audit = self.state.audit.clone();
        tokio::spawn(async move {
            let mut every_five_seconds = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                every_five_seconds.tick().await;
                let audit = audit.clone();
                let _ = tokio::task::spawn_blocking(move || audit.measure_disk()).await;
            }
        });
        // On a store that other nodes may write, publish this node's failed secret checks per
        // account for them (off the request path, so a failure answers as fast as before).
        if self.state.service.position().is_some() {
            let directory = self.state.tokens.directory().clone();
            every(
                PUBLISH_FAILURES_EVERY,
                "failed secret checks could not be published to the other nodes",
                move || directory.publish_failures(),
            );
        }
        // On a store that other nodes may write, follow their commits: the graph, then the
        // owners' records (revocations, identities, devices...).
        if self.state.service.position().is_some() {
            let service = self.state.service.clone();
            let follower = self.state.follower.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(FOLLOW_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    // A request waiting for a position asks for a step now.
                    match &follower {
                        Some(asked) => tokio::select! {
                            _ = every.tick() => {}
                            _ = asked.wanted() => {}
                        },
                        None => {
                            every.tick().await;
                        }
                    }
                    let (service, follower) = (service.clone(), follower.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        // A store it cannot read leaves both where they are: the node's reads
                        // are refused once its view is older than the staleness bound.
                        if let Ok(Some(head)) = service.follow()
                            && let Some(follower) = follower
                            && let Err(e) = follower.step_to(head)
                        {
                            tracing::error!(error = %e, "cannot read what other nodes changed in the owners' records");
                        }
                    })
                    .await;
                }
            });
        }
        // Readiness follows the database even while no write comes to find out it is gone.
        // A probe still running at the next tick (a hung connection) counts as unreachable,
        // and no second one is started beside it.
        let service = self.state.service.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(STORE_PROBE_EVERY);
            let mut running: Option<tokio::task::JoinHandle<bool>> = None;
            loop {
                every.tick().await;
                if let Some(probe) = &running
                    && !probe.is_finished()
                {
                    service.mark_store_unreachable();
                    continue;
                }
                let probing = service.clone();
                running = Some(tokio::task::spawn_blocking(move || probing.probe_store()));
            }
        });
        self.state.events.start();
        let telemetry = self.state.telemetry.clone();
        tokio::spawn(async move {
            let mut every_second = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                every_second.tick().await;
                if let Err(e) = telemetry.sweep().await {
                    tracing::error!(error = %e, "the staleness sweep failed");
                }
            }
        });
        // The pipeline's own decisions (a device flagged at its quarantine quota) go to the
        // audit trail; the sink only queues, since it is called under the pipeline's lock.
        let (events, mut queued) = tokio::sync::mpsc::channel::<TelemetryEvent>(1_024);
        self.state.telemetry.set_audit_sink(move |event| {
            if events.try_send(event).is_err() {
                tracing::error!(
                    "the audit queue for telemetry decisions is full; one was not recorded"
                );
            }
        });
        let audit = self.state.audit.clone();
        tokio::spawn(async move {
            while let Some(event) = queued.recv().await {
                let entry = serde_json::json!({
                    "kind": "telemetry",
                    "time": twinguard_core::clock::rfc3339(time::OffsetDateTime::now_utc()),
                    "event": event.event,
                    "device": event.device,
                    "detail": event.detail,
                });
                if let Err(e) = audit
                    .log()
                    .append_async(entry.to_string().into_bytes())
                    .await
                {
                    tracing::error!(error = %e, "a telemetry decision could not be recorded in the audit log");
                }
            }
        });
        let telemetry = self.state.telemetry.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(twinguard_telemetry::service::CHECKPOINT_EVERY);
            loop {
                every.tick().await;
                if let Err(e) = telemetry.checkpoint().await {
                    tracing::error!(error = %e, "the sensor streams' state could not be stored");
                }
            }
        });
        if let (Some(mqtt), Some(status)) = (self.mqtt, self.state.mqtt.clone()) {
            crate::mqtt::spawn(
                mqtt,
                crate::mqtt::MqttContext {
                    data_dir: self.data_dir.clone(),
                    telemetry: self.state.telemetry.clone(),
                    audit: self.state.audit.clone(),
                    status,
                },
            )?;
        }
        if let Some(listener) = self.device_listener {
            let devices = crate::app::device_router(self.state.clone());
            let handle = handle.clone();
            let tls = self.tls.clone();
            let served = if self.unbounded {
                let service = devices.into_make_service_with_connect_info::<SocketAddr>();
                let tls = axum_server::tls_rustls::RustlsAcceptor::new(tls)
                    .handshake_timeout(UNBOUNDED_HANDSHAKE);
                let server = axum_server::from_tcp(listener)?
                    .acceptor(tls)
                    .handle(handle);
                tokio::spawn(server.serve(service))
            } else {
                // `Limited` gives each request its client's address (`ConnectInfo`).
                let service = devices.into_make_service();
                let tls = axum_server::tls_rustls::RustlsAcceptor::new(tls)
                    .handshake_timeout(self.connections.handshake_timeout);
                let gate = crate::connections::Gate::new(self.connections.clone());
                let mut server = axum_server::from_tcp(listener)?
                    .acceptor(crate::connections::Limited::new(gate, tls))
                    .handle(handle);
                self.connections.configure(server.http_builder());
                tokio::spawn(server.serve(service))
            };
            tokio::spawn(async move {
                if let Ok(Err(e)) = served.await {
                    tracing::error!(error = %e, "the device plane listener stopped");
                }
            });
        }
        let telemetry = self.state.telemetry.clone();
        let events = self.state.events.clone();
        let app = router(self.state);
        let served = if self.unbounded {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let tls = crate::tls::ClientCertAcceptor::new(self.tls, UNBOUNDED_HANDSHAKE);
            match axum_server::from_tcp(self.listener) {
                Ok(server) => server.acceptor(tls).handle(handle).serve(app).await,
                Err(e) => Err(e),
            }
        } else {
            // `Limited` gives each request its client's address (`ConnectInfo`).
            let app = app.into_make_service();
            let tls =
                crate::tls::ClientCertAcceptor::new(self.tls, self.connections.handshake_timeout);
            let gate = crate::connections::Gate::new(self.connections.clone());
            match axum_server::from_tcp(self.listener) {
                Ok(server) => {
                    let mut server = server
                        .acceptor(crate::connections::Limited::new(gate, tls))
                        .handle(handle);
                    self.connections.configure(server.http_builder());
                    server.serve(app).await
                }
                Err(e) => Err(e),
            }
        };
        // Another node takes this one's event endpoints at once, not when their leases run out;
        // also when the listener failed.
        events.release().await;
        // What the streams learned since the last checkpoint outlives the process.
        if let Err(e) = telemetry.checkpoint().await {
            tracing::error!(error = %e, "the sensor streams' state could not be stored at shutdown");
        }
        served?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::PublicUrl;

    /// A node that finds a local history file beside a PostgreSQL store (from before history
    /// was kept there) copies every record over, page by page, and renames the file, so a second
    /// start copies nothing again.
    #[test]
    fn a_local_history_file_is_moved_into_the_shared_store_once() {
        use twinguard_core::store::{MemoryStore, Mutation, Store, Table};
        let dir = tempfile::tempdir().unwrap();
        let data_dir = super::DataDir::new(dir.path());
        let records: Vec<Mutation> = (0..5_000)
            .map(|n| Mutation::put(Table::History, format!("t\u{1f}p\u{1f}{n:016}"), vec![1]))
            .collect();
        {
            let local = twinguard_store_redb::RedbStore::open(&data_dir.history_path()).unwrap();
            local.commit(&records).unwrap();
        }
        let shared = MemoryStore::shared();
        super::adopt_local_history(&data_dir, &shared).unwrap();
        assert_eq!(shared.scan(Table::History).unwrap().len(), 5_000);
        assert!(!data_dir.history_path().exists());
        assert!(dir.path().join("history.redb.moved").exists());
        shared
            .commit(&[Mutation::delete(Table::History, records[0].key.clone())])
            .unwrap();
        super::adopt_local_history(&data_dir, &shared).unwrap();
        assert_eq!(
            shared.scan(Table::History).unwrap().len(),
            4_999,
            "moved once"
        );
    }

    #[test]
    fn a_public_url_is_an_https_origin_and_nothing_else() {
        for good in ["https://twins.example.com", "https://twins.example.com/"] {
            assert_eq!(
                PublicUrl::parse(good).unwrap().as_str(),
                "https://twins.example.com"
            );
        }
        assert_eq!(
            PublicUrl::parse("https://[::1]:8443").unwrap().as_str(),
            "https://[::1]:8443"
        );
        for bad in [
            "http://twins.example.com",
            "https://twins.example.com/adt",
            "https://twins.example.com/?x=1",
            "https://twins.example.com/#top",
            "https://user:pass@twins.example.com",
            "twins.example.com",
            "",
        ] {
            assert!(PublicUrl::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn the_default_public_url_is_the_listener_or_the_first_tls_name_for_a_wildcard_listener() {
        let names = vec!["twins.example.com".to_owned()];
        let derived = |addr: &str, names: &[String]| {
            PublicUrl::derived(addr.parse().unwrap(), names)
                .as_str()
                .to_owned()
        };
        assert_eq!(derived("127.0.0.1:8443", &names), "https://127.0.0.1:8443");
        assert_eq!(derived("[::1]:8443", &[]), "https://[::1]:8443");
        assert_eq!(
            derived("0.0.0.0:8443", &names),
            "https://twins.example.com:8443"
        );
        assert_eq!(derived("[::]:8443", &[]), "https://127.0.0.1:8443");
    }
}
