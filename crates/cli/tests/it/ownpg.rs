//! PostgreSQL clusters of a test's own, for what the machine's shared server cannot be put
//! through: cut off by the network, stopped as a site is lost, replaced by a promoted standby.
//! Debian's server programs, run as the postgres user; each cluster in a directory of its own,
//! with its socket there too (the machine's server keeps the usual one).

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::Command;

/// The certificate Debian makes for `localhost` (package ssl-cert), which the machine's
/// PostgreSQL serves too; it is its own CA.
pub const SERVER_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
pub const SERVER_KEY: &str = "/etc/ssl/private/ssl-cert-snakeoil.key";

/// Runs `program` with `args`, failing the test with its output if it fails; its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    try_run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run`], with the failure as an error: the command and its output.
fn try_run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program).args(args).output().unwrap();
    if !output.status.success() {
        return Err(format!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The newest PostgreSQL server programs Debian installed.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server programs (/usr/lib/postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("initdb under /usr/lib/postgresql")
}

/// A PostgreSQL cluster in a directory of its own, stopped at once when dropped.
pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    /// The network namespace it runs in, if not the host's.
    namespace: Option<String>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A new, empty cluster (initdb), to be started on `port`.
    pub fn init(port: u16) -> Self {
        let cluster = Self::empty(port);
        cluster.as_postgres(
            "initdb",
            &[
                "-D",
                cluster.data_arg(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-instructions",
            ],
        );
        cluster
    }

    /// A standby of `primary` (pg_basebackup, streaming), to be started on `port`, which
    /// names itself `name` to the primary (for `synchronous_standby_names`).
    pub fn standby_of(primary: &Cluster, name: &str, port: u16) -> Self {
        let cluster = Self::empty(port);
        let primary_port = primary.port.to_string();
        cluster.as_postgres(
            "pg_basebackup",
            &[
                "-h",
                primary.data_arg(),
                "-p",
                &primary_port,
                "-U",
                "postgres",
                "-D",
                cluster.data_arg(),
                "-R",
                "-X",
                "stream",
            ],
        );
        let conninfo = format!(
            "\nprimary_conninfo = 'host={} port={} user=postgres application_name={name}'\n",
            primary.data_arg(),
            primary.port
        );
        // The primary's socket lock file came along (its socket is in its data directory): it
        // would keep the standby off the primary's port for good.
        for entry in std::fs::read_dir(&cluster.data).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        let auto = cluster.data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap();
        text.push_str(&conninfo);
        std::fs::write(auto, text).unwrap();
        cluster
    }

    fn empty(port: u16) -> Self {
        // The cluster belongs to the postgres user, who must reach it through the directory.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let data = dir.path().join("data");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&data)
            .unwrap();
        let uid: u32 = run("id", &["-u", "postgres"]).trim().parse().unwrap();
        let gid: u32 = run("id", &["-g", "postgres"]).trim().parse().unwrap();
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
        Self {
            bin: postgres_bin(),
            data,
            namespace: None,
            port,
            _dir: dir,
        }
    }

    fn data_arg(&self) -> &str {
        self.data.to_str().unwrap()
    }

    /// Runs server program `program` as the postgres user (in the cluster's namespace, if it
    /// has one).
    fn as_postgres(&self, program: &str, args: &[&str]) -> String {
        self.try_as_postgres(program, args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    fn try_as_postgres(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let binary = self.bin.join(program);
        let mut all: Vec<&str> = Vec::new();
        if let Some(namespace) = &self.namespace {
            all.extend(["netns", "exec", namespace.as_str()]);
        }
        all.extend(["runuser", "-u", "postgres", "--", binary.to_str().unwrap()]);
        all.extend_from_slice(args);
        if self.namespace.is_some() {
            try_run("ip", &all)
        } else {
            try_run(all[0], &all[1..])
        }
    }

    /// The port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Replaces the cluster's client authentication rules.
    pub fn allow(&self, rules: &[String]) {
        std::fs::write(self.data.join("pg_hba.conf"), rules.join("\n") + "\n").unwrap();
    }

    /// Starts the cluster with `settings` (in `namespace`, if given), and waits until it
    /// takes connections.
    pub fn start(&mut self, settings: &[(&str, &str)], namespace: Option<&str>) {
        self.namespace = namespace.map(str::to_owned);
        let port = self.port.to_string();
        let mut options = format!(
            "-c port={port} -c unix_socket_directories={}",
            self.data_arg()
        );
        for (name, value) in settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        let log = self.data.join("server.log");
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data_arg(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the cluster at once, as a lost site would (`-m immediate`: no shutdown
    /// checkpoint, clients cut off).
    pub fn stop_at_once(&self) {
        self.as_postgres(
            "pg_ctl",
            &["-D", self.data_arg(), "-m", "immediate", "stop"],
        );
    }

    /// Stops the cluster cleanly and starts it again on `port` with `settings`: a server that
    /// clients reach at another address from now on.
    pub fn restart_on(&mut self, port: u16, settings: &[(&str, &str)]) {
        self.as_postgres(
            "pg_ctl",
            &["-D", self.data_arg(), "-m", "fast", "-w", "stop"],
        );
        self.port = port;
        let namespace = self.namespace.clone();
        self.start(settings, namespace.as_deref());
    }

    /// Promotes a standby to primary, waiting until it takes writes.
    pub fn promote(&self) {
        self.as_postgres("pg_ctl", &["-D", self.data_arg(), "-w", "promote"]);
    }

    /// Runs `sql` through the cluster's socket; the rows' first columns, one per line.
    pub fn sql(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let binary = self.bin.join("psql");
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                binary.to_str().unwrap(),
                "-h",
                self.data_arg(),
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ],
        )
    }

    /// The server's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// A port nothing listens on now, on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
