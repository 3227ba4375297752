//! The `twinguard` binary: parses the command line, sets up logging and starts things.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod anomaly;
mod backup;
mod demo;
mod device;
mod kek;
mod sim;
use twinguard_server::datadir::DataDir;
use twinguard_server::startup::{
    Application, ServeConfig, StoreConfig, init, install_crypto_provider,
};

#[derive(Debug, Parser)]
#[command(
    name = "twinguard",
    version,
    about = "A digital twin server that treats every layer as hostile"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `serve`'s MQTT options (boxed: they would make every `Command` as big).
#[derive(Debug, clap::Args)]
struct MqttArgs {
    /// Take signed telemetry from this MQTT broker: mqtt://HOST:PORT or mqtts://HOST:PORT.
    #[arg(long, env = "TWINGUARD_MQTT_URL")]
    mqtt_url: Option<String>,
    /// Topic filter to subscribe to.
    #[arg(long, default_value = "twinguard/telemetry/#")]
    mqtt_topic: String,
    /// CA certificate (PEM) the broker's certificate must chain to (mqtts).
    #[arg(long)]
    mqtt_ca: Option<PathBuf>,
    /// User name to log in to the broker with (credentials go only over mqtts:// or to a
    /// loopback broker).
    #[arg(long, env = "TWINGUARD_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// File whose first line is the broker password (never the password itself on the
    /// command line).
    #[arg(long, env = "TWINGUARD_MQTT_PASSWORD_FILE", requires = "mqtt_username")]
    mqtt_password_file: Option<PathBuf>,
    /// Topic prefix of the signed receipts twinguard publishes for each message it decided on:
    /// PREFIX/DEVICE (see docs/telemetry-format.md).
    #[arg(long, default_value = twinguard_server::mqtt::receipt::DEFAULT_PREFIX)]
    mqtt_receipt_topic: String,
}

/// Where the main store is (`serve` and `init`).
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The main store: `redb` (DATA_DIR/store.redb, the default) or a PostgreSQL URL,
    /// postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE. Give a password through the
    /// environment variable rather than the command line. Beside PostgreSQL the readings'
    /// history is kept there too; beside redb in DATA_DIR/history.redb (docs/storage.md).
    #[arg(long = "store", env = "TWINGUARD_STORE", hide_env_values = true)]
    store: Option<String>,
    /// CA certificates (PEM) the PostgreSQL server's certificate must chain to: TLS, verified
    /// against the URL's host name. Without it the connection is plaintext, allowed only to a
    /// loopback host.
    #[arg(long, env = "TWINGUARD_STORE_CA")]
    store_ca: Option<PathBuf>,
    /// Connections to PostgreSQL in the pool.
    #[arg(long, env = "TWINGUARD_STORE_POOL_SIZE", default_value_t = 8)]
    store_pool_size: usize,
}

impl StoreArgs {
    fn config(self) -> anyhow::Result<StoreConfig> {
        StoreConfig::parse(self.store.as_deref(), self.store_ca, self.store_pool_size)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Initialise the data directory if needed, then serve the API over HTTPS.
    Serve {
        /// Where the store, keys, certificates and first admin credential live.
        #[arg(long, env = "TWINGUARD_DATA_DIR", default_value = "twinguard-data")]
        data_dir: PathBuf,
        /// Address of the API listener; port 0 picks a free port.
        #[arg(long, env = "TWINGUARD_API_LISTEN", default_value = "127.0.0.1:8443")]
        api_listen: SocketAddr,
        /// Extra DNS names or IPs for the server certificate (used when it is first created).
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
        /// JSON file listing trusted external OpenID Connect issuers (see docs/identity.md).
        #[arg(long, env = "TWINGUARD_ISSUERS")]
        issuers: Option<PathBuf>,
        /// A file each new audit checkpoint is also written to, kept where the server's
        /// operators cannot roll it back (see docs/audit.md).
        #[arg(long, env = "TWINGUARD_AUDIT_WITNESS")]
        audit_witness: Option<PathBuf>,
        /// Forward the audit trail as JSON lines to this file (rotated at 64 MiB, 5 kept).
        #[arg(long)]
        siem_file: Option<PathBuf>,
        /// Forward the audit trail to this syslog collector over TLS (RFC 5424/5425), HOST:PORT.
        #[arg(long, requires = "siem_ca")]
        siem_syslog: Option<String>,
        /// CA certificate (PEM) the syslog collector's certificate must chain to.
        #[arg(long)]
        siem_ca: Option<PathBuf>,
        /// Name the collector's certificate must carry (default: the host of --siem-syslog).
        #[arg(long)]
        siem_server_name: Option<String>,
        /// Message body sent to the syslog collector.
        #[arg(long, value_parser = ["json", "cef"], default_value = "json")]
        siem_format: String,
        /// Address of the device plane: the HTTPS listener for signed telemetry ("off" to
        /// disable it); port 0 picks a free port.
        #[arg(
            long,
            env = "TWINGUARD_DEVICE_LISTEN",
            default_value = "127.0.0.1:8444"
        )]
        device_listen: String,
        #[command(flatten)]
        mqtt: Box<MqttArgs>,
        /// Keep accepted readings in the history for this many days after their measurement
        /// time, then remove them (checked every minute). Without it history is kept for ever.
        #[arg(long, env = "TWINGUARD_HISTORY_RETENTION_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
        history_retention_days: Option<u32>,
        /// The address clients reach the API at, https://HOST[:PORT]: every link the server
        /// hands out (list paging, discovery metadata, the token endpoint) is built from it.
        /// Default: the listen address, or for 0.0.0.0 / [::] the first --tls-name.
        #[arg(long, env = "TWINGUARD_PUBLIC_URL")]
        public_url: Option<String>,
        /// A destination twinguard may connect to on its own (event endpoints): a host name
        /// (`hooks.example.com`, `*.example.com`) or an address range (`203.0.113.0/24`), with
        /// an optional port (`host:443`, `[2001:db8::/32]:443`). Repeatable. Loopback, private,
        /// link-local and metadata addresses only when an address rule names them. Nothing is
        /// allowed by default.
        #[arg(long = "egress-allow")]
        egress_allow: Vec<String>,
        #[command(flatten)]
        balancer: Box<BalancerArgs>,
        /// A file of egress rules, one a line (`#` comments), added to --egress-allow.
        #[arg(long, env = "TWINGUARD_EGRESS_ALLOW_FILE")]
        egress_allow_file: Option<PathBuf>,
        /// PEM trust anchors for https import URLs (`/jobs/imports` with `inputBlobUri`).
        #[arg(long)]
        egress_ca: Option<PathBuf>,
        /// The only directory event endpoints' credential files (passwordFile, credentialsFile,
        /// nkeyFile, secretFile, caFile) may be in. Default: DATA_DIR/endpoint-credentials.
        #[arg(long, env = "TWINGUARD_ENDPOINT_CREDENTIALS")]
        endpoint_credentials: Option<PathBuf>,
        /// Most change-feed events kept for event endpoints that lag behind (default
        /// 1,000,000): past it the oldest are dropped and the lagging endpoints skip them
        /// (twinguard_events_skipped_total), so a receiver that is down cannot fill the disk.
        #[arg(long, env = "TWINGUARD_EVENT_BACKLOG", value_parser = clap::value_parser!(u64).range(1000..))]
        event_backlog: Option<u64>,
        /// DANGEROUS, benchmarks only: issue 17's resource protections off (connection limits
        /// and timeouts, query limits and slots, the log's rate limit) so `bench/protections.sh`
        /// can measure what they cost. Hidden from --help, no environment variable, no
        /// config file entry.
        #[arg(long, hide = true)]
        dangerous_unbounded_resources: bool,
        #[command(flatten)]
        store: Box<StoreArgs>,
    },
    /// Administer identities, roles, role assignments and API keys through the API.
    Admin {
        #[command(flatten)]
        connection: admin::Connection,
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// Devices, firmware allowlists, validation policies, sensor groups and quarantine review.
    Device {
        #[command(flatten)]
        connection: admin::Connection,
        #[command(subcommand)]
        command: device::DeviceCommand,
    },
    /// Simulate a device that signs its readings, honestly or not.
    Sim(sim::SimArgs),
    /// Run the server with a small plant and simulated devices, some hostile, and report what
    /// the defences did.
    Demo(demo::DemoArgs),
    /// The anomaly detector on its own.
    #[command(subcommand)]
    Anomaly(AnomalyCommand),
    /// A person's second factor.
    #[command(subcommand)]
    Mfa(MfaCommand),
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Write a signed bundle of a stopped instance: every record of its stores and its audit
    /// trail (see docs/backup.md).
    Backup {
        #[arg(long, env = "TWINGUARD_DATA_DIR", default_value = "twinguard-data")]
        data_dir: PathBuf,
        /// The bundle to write: a new file.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Verify a bundle, then restore it into an empty store and a data directory that is new
    /// or the instance's own.
    Restore {
        /// The bundle `twinguard backup` wrote.
        #[arg(long)]
        bundle: PathBuf,
        /// The instance's audit checkpoint key (a copy of DATA_DIR/audit/checkpoint.pub kept
        /// apart from the bundle): a bundle not signed with it is refused.
        #[arg(long)]
        key: PathBuf,
        /// Verify the bundle and say what it holds; restore nothing.
        #[arg(long, conflicts_with = "data_dir")]
        verify_only: bool,
        #[arg(
            long,
            env = "TWINGUARD_DATA_DIR",
            required_unless_present = "verify_only"
        )]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Rotate the key-encryption key that seals the instance's private material in a
    /// PostgreSQL store, while the nodes serve: add, rotate, retire (see docs/storage.md).
    Kek {
        #[arg(long, env = "TWINGUARD_DATA_DIR", default_value = "twinguard-data")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        command: kek::KekCommand,
    },
    /// Create the data directory's CA, keys and first admin credential, then exit.
    Init {
        #[arg(long, env = "TWINGUARD_DATA_DIR", default_value = "twinguard-data")]
        data_dir: PathBuf,
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify a log offline: recompute the tree, check every checkpoint's signature and their
    /// consistency, and name the first bad entry. Exits non-zero on any finding.
    Verify {
        /// The log directory (DATA_DIR/audit).
        #[arg(long)]
        log: PathBuf,
        /// The checkpoint verifier key (DATA_DIR/audit/checkpoint.pub, or a copy kept apart).
        #[arg(long)]
        key: PathBuf,
        /// A checkpoint kept elsewhere (a witness): proves the log was not rolled back past it.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Verify every node's log kept in the instance's PostgreSQL database (docs/audit.md,
    /// "Several nodes"), each against its node's checkpoint key. Exits non-zero on any finding,
    /// on a log whose key is not given, and on a given key without a log.
    VerifyNodes {
        /// The database: postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
        #[arg(long = "store", env = "TWINGUARD_STORE", hide_env_values = true)]
        store: String,
        /// CA certificates (PEM) the PostgreSQL server's certificate must chain to.
        #[arg(long, env = "TWINGUARD_STORE_CA")]
        store_ca: Option<PathBuf>,
        /// Each node's checkpoint verifier key (its DATA_DIR/audit/checkpoint.pub, copied
        /// apart when the node was set up); once per node.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AnomalyCommand {
    /// Score the Numenta Anomaly Benchmark corpus with the detector's one configuration and
    /// write NAB's results format (see docs/anomaly.md).
    Nab(anomaly::NabArgs),
    /// Split NAB's files into two halves, stratified by category, from a seed (JSON).
    Split(anomaly::SplitArgs),
    /// Search the detector's configuration on some of NAB's files with a port of NAB's scorer.
    Tune(anomaly::TuneArgs),
    /// Score a configuration on some of NAB's files with the port of NAB's scorer (an estimate;
    /// the reported numbers come from NAB's own scorer).
    Evaluate(anomaly::EvaluateArgs),
}

#[derive(Debug, Subcommand)]
enum MfaCommand {
    /// Enrol an authenticator app (TOTP): shows a QR code here in the terminal.
    Enroll(admin::Enrol),
}

/// mimalloc instead of the system allocator: the request path allocates many small, short-lived
/// buffers, and glibc's malloc showed up as a fifth of the server's CPU under write load. Built
/// with `no_thp`: otherwise it asks for transparent huge pages, and under telemetry ingestion
/// the kernel spent 18 % of the server's CPU zeroing fresh 2 MiB pages (`clear_page_erms`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Whatever the process creates is its owner's only, even a file some code path (or a
    // library) creates without an explicit mode; every file twinguard creates also sets 0600.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let mut cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TWINGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The demo is read by a person in a terminal: its server log goes to a file it names.
    let mut _demo_dir = None;
    if let Command::Demo(args) = &mut cli.command {
        match demo::prepare(args) {
            Ok((scratch, log)) => {
                _demo_dir = scratch;
                init_logging(std::sync::Mutex::new(log), filter, true);
            }
            Err(e) => {
                eprintln!("twinguard: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let rate_limited = !matches!(
            cli.command,
            Command::Serve {
                dangerous_unbounded_resources: true,
                ..
            }
        );
        init_logging(std::io::stderr, filter, rate_limited);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `twinguard audit verify-nodes`: each node's log in the database, checked as `audit verify`
/// checks a log directory, against the keys the auditor holds.
fn verify_node_logs(url: &str, ca_file: Option<PathBuf>, keys: &[PathBuf]) -> anyhow::Result<()> {
    use anyhow::Context;
    use twinguard_audit::note::NoteVerifier;
    let mut given: Vec<(String, String, NoteVerifier, &std::path::Path)> = Vec::new();
    for path in keys {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let verifier =
            NoteVerifier::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let key = text.trim().to_owned();
        given.push((
            twinguard_server::audit::node_name(&key),
            key,
            verifier,
            path,
        ));
    }
    let store = twinguard_store_postgres::PgStore::connect(
        url,
        &twinguard_store_postgres::PgOptions {
            pool_size: 1,
            ca_file,
            ..Default::default()
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("connecting to PostgreSQL")?;
    let nodes = store.audit_nodes().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut findings = Vec::new();
    for node in &nodes {
        let Some((_, key, verifier, _)) = given.iter().find(|(name, ..)| *name == node.node) else {
            findings.push(format!(
                "node {}: its log is vouched for by a key that was not given",
                node.node
            ));
            continue;
        };
        if node.verifier_key.trim() != key {
            findings.push(format!(
                "node {}: the database names another key for it than the one given",
                node.node
            ));
            continue;
        }
        let mut lines: Vec<Vec<u8>> = Vec::new();
        loop {
            let page = store
                .audit_entries(&node.node, lines.len() as u64)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let Some(&(last, _)) = page.last() else {
                break;
            };
            lines.extend(page.into_iter().map(|(_, entry)| entry));
            if last + 1 != lines.len() as u64 {
                // A gap in the indexes: the entries below name it (each carries its own).
                break;
            }
        }
        let mut notes: Vec<(String, String)> = Vec::new();
        let mut from = 0;
        loop {
            let page = store
                .audit_checkpoints(&node.node, from)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let Some(&(last, _)) = page.last() else {
                break;
            };
            from = last + 1;
            notes.extend(
                page.into_iter()
                    .map(|(size, note)| (format!("the checkpoint of size {size}"), note)),
            );
        }
        let slices: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
        match twinguard_audit::verify::verify_entries(&slices, &notes, verifier) {
            Ok(report) => println!(
                "twinguard: node {}: audit log verified: {} entries, {} signed checkpoints, all consistent",
                node.node, report.entries, report.checkpoints
            ),
            Err(finding) => findings.push(format!("node {}: {finding}", node.node)),
        }
    }
    for (name, _, _, path) in &given {
        if !nodes.iter().any(|n| n.node == *name) {
            findings.push(format!(
                "the key {} (node {name}) has no log in the database",
                path.display()
            ));
        }
    }
    if findings.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("audit verification FAILED:\n  {}", findings.join("\n  "))
    }
}

fn verify_audit(
    log: &std::path::Path,
    key: &std::path::Path,
    checkpoint: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let key_text =
        std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let verifier = twinguard_audit::note::NoteVerifier::parse(&key_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let witness = checkpoint
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    match twinguard_audit::verify::verify(log, &verifier, witness.as_deref()) {
        Ok(report) => {
            println!(
                "twinguard: audit log verified: {} entries, {} signed checkpoints, all consistent",
                report.entries, report.checkpoints
            );
            Ok(())
        }
        Err(finding) => anyhow::bail!("audit log verification FAILED: {finding}"),
    }
}

/// What `serve` is told of the load balancers in front of it.
#[derive(Debug, clap::Args)]
struct BalancerArgs {
    /// A TCP load balancer in front of this node (an address or range, repeatable):
    /// connections from it must start with a PROXY protocol v2 header (HAProxy's
    /// `send-proxy-v2`), whose client address then counts for connection limits, the
    /// authentication backoff and the audit trail. From any other address no header is
    /// read. None by default.
    #[arg(
        long = "proxy-protocol-from",
        env = "TWINGUARD_PROXY_PROTOCOL_FROM",
        value_delimiter = ','
    )]
    proxy_protocol_from: Vec<String>,
}

/// `--proxy-protocol-from`: addresses (`10.0.0.5`) or ranges (`10.0.0.0/24`).
fn proxy_networks(values: &[String]) -> anyhow::Result<Vec<ipnet::IpNet>> {
    use anyhow::Context;
    values
        .iter()
        .map(|value| {
            let value = value.trim();
            value
                .parse::<ipnet::IpNet>()
                .or_else(|_| value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .with_context(|| {
                    format!("--proxy-protocol-from takes an address or a range, not {value:?}")
                })
        })
        .collect()
}

/// The egress allowlist from `--egress-allow` rules and an optional file of them.
fn egress_policy(
    rules: &[String],
    file: Option<&std::path::Path>,
) -> anyhow::Result<twinguard_server::egress::EgressPolicy> {
    use anyhow::Context;
    let mut text = rules.join("\n");
    if let Some(path) = file {
        let lines =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        text.push('\n');
        text.push_str(&lines);
    }
    twinguard_server::egress::EgressPolicy::from_lines(&text)
        .map_err(|(line, e)| anyhow::anyhow!("egress rule {line}: {e}"))
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    install_crypto_provider();
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// SIGTERM (service managers) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// JSON lines to `writer`, filtered by `TWINGUARD_LOG` and rate-limited per call site, so no
/// input floods the log (`twinguard_server::logging`); `rate_limited` is false only for
/// `serve --dangerous-unbounded-resources`.
fn init_logging<W>(writer: W, filter: tracing_subscriber::EnvFilter, rate_limited: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let limited = rate_limited.then(twinguard_server::logging::RateLimited::with_reporter);
    tracing_subscriber::registry()
        .with(twinguard_server::logging::layer(writer, filter, limited))
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            data_dir,
            api_listen,
            tls_names,
            issuers,
            audit_witness,
            siem_file,
            siem_syslog,
            siem_ca,
            siem_server_name,
            siem_format,
            device_listen,
            mqtt,
            history_retention_days,
            public_url,
            egress_allow,
            balancer,
            egress_allow_file,
            egress_ca,
            endpoint_credentials,
            event_backlog,
            dangerous_unbounded_resources,
            store,
        } => {
            let store = (*store).config()?;
            let egress = egress_policy(&egress_allow, egress_allow_file.as_deref())?;
            let public_url = public_url
                .as_deref()
                .map(twinguard_server::startup::PublicUrl::parse)
                .transpose()?;
            let mut siem = Vec::new();
            if let Some(path) = siem_file {
                siem.push(twinguard_server::siem::Sink::File {
                    path,
                    max_bytes: 64 << 20,
                    keep: 5,
                });
            }
            if let (Some(address), Some(ca)) = (siem_syslog, siem_ca) {
                let host = address
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
                    .unwrap_or_else(|| address.clone());
                siem.push(twinguard_server::siem::Sink::Syslog {
                    server_name: siem_server_name.unwrap_or(host),
                    address,
                    ca,
                    format: if siem_format == "cef" {
                        twinguard_server::siem::Format::Cef
                    } else {
                        twinguard_server::siem::Format::Json
                    },
                });
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let device_listen = match device_listen.as_str() {
                "off" => None,
                addr => Some(
                    addr.parse::<SocketAddr>()
                        .map_err(|_| anyhow::anyhow!("--device-listen must be HOST:PORT or off"))?,
                ),
            };
            let MqttArgs {
                mqtt_url,
                mqtt_topic,
                mqtt_ca,
                mqtt_username,
                mqtt_password_file,
                mqtt_receipt_topic,
            } = *mqtt;
            let mqtt = mqtt_url.map(|url| twinguard_server::mqtt::MqttConfig {
                url,
                topic: mqtt_topic,
                ca: mqtt_ca,
                username: mqtt_username,
                password_file: mqtt_password_file,
                receipt_prefix: mqtt_receipt_topic,
            });
            runtime.block_on(async {
                let app = Application::build(&ServeConfig {
                    data_dir,
                    api_listen,
                    tls_names,
                    issuers,
                    audit_witness,
                    siem,
                    device_listen,
                    mqtt,
                    history_retention: history_retention_days
                        .map(|days| std::time::Duration::from_secs(u64::from(days) * 86_400)),
                    public_url,
                    connections: twinguard_server::connections::ConnectionPolicy {
                        proxies: proxy_networks(&balancer.proxy_protocol_from)?,
                        ..Default::default()
                    },
                    dangerous_unbounded_resources,
                    egress,
                    egress_ca,
                    endpoint_credentials,
                    event_backlog,
                    egress_lookup: None,
                    store,
                })?;
                println!("twinguard: api listening on {}", app.listener_url());
                if app.base_url() != app.listener_url() {
                    println!("twinguard: links name the public URL {}", app.base_url());
                }
                if let Some(addr) = app.device_addr() {
                    println!("twinguard: device plane listening on https://{addr}");
                }
                app.run_until(shutdown_signal()).await
            })
        }
        Command::Backup {
            data_dir,
            out,
            store,
        } => backup::backup(&data_dir, &store.config()?, &out),
        Command::Kek {
            data_dir,
            store,
            command,
        } => kek::run(command, &data_dir, &store.config()?),
        Command::Restore {
            bundle,
            key,
            verify_only: _,
            data_dir,
            store,
        } => backup::restore(&bundle, &key, data_dir.as_deref(), &store.config()?),
        Command::Admin {
            connection,
            command,
        } => client_runtime()?.block_on(admin::run(connection, command)),
        Command::Device {
            connection,
            command,
        } => client_runtime()?.block_on(device::run(connection, command)),
        Command::Sim(args) => client_runtime()?.block_on(sim::run(args)),
        Command::Demo(args) => {
            install_crypto_provider();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(demo::run(args))
        }
        Command::Anomaly(AnomalyCommand::Nab(args)) => anomaly::run_nab(args),
        Command::Anomaly(AnomalyCommand::Split(args)) => anomaly::run_split(args),
        Command::Anomaly(AnomalyCommand::Tune(args)) => anomaly::run_tune(args),
        Command::Anomaly(AnomalyCommand::Evaluate(args)) => anomaly::run_evaluate(args),
        Command::Mfa(MfaCommand::Enroll(args)) => client_runtime()?.block_on(admin::enrol(args)),
        Command::Audit(AuditCommand::Verify {
            log,
            key,
            checkpoint,
        }) => verify_audit(&log, &key, checkpoint.as_deref()),
        Command::Audit(AuditCommand::VerifyNodes {
            store,
            store_ca,
            keys,
        }) => {
            install_crypto_provider();
            verify_node_logs(&store, store_ca, &keys)
        }
        Command::Init {
            data_dir,
            tls_names,
            store,
        } => {
            install_crypto_provider();
            let store = store.config()?;
            let dir = DataDir::new(data_dir);
            init(&dir, &tls_names, None, &store)?;
            println!(
                "twinguard: initialised {}; CA at {}, admin credential at {}",
                dir.root().display(),
                dir.ca_cert().display(),
                dir.admin_client().display()
            );
            Ok(())
        }
    }
}
