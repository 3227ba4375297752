//! Runs `twinguard serve` as a child process, as the operator contract describes it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub struct Server {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Server {
    /// Starts the binary on a free port and waits for its `api listening` line.
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[], None)
    }

    /// [`Server::start`] with extra `serve` arguments, and optionally under a given umask
    /// (octal, set by a shell that then executes the binary).
    pub fn start_with(data_dir: &Path, extra: &[&str], umask: Option<&str>) -> Self {
        Self::start_logging(data_dir, extra, umask, "warn")
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_env(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_full(data_dir, &[], None, "warn", env)
    }

    /// [`Server::start_with`] logging at `level` (`TWINGUARD_LOG`) to `DIR/server.log`.
    pub fn start_logging(
        data_dir: &Path,
        extra: &[&str],
        umask: Option<&str>,
        level: &str,
    ) -> Self {
        Self::start_full(data_dir, extra, umask, level, &[])
    }

    fn start_full(
        data_dir: &Path,
        extra: &[&str],
        umask: Option<&str>,
        level: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let binary = env!("CARGO_BIN_EXE_twinguard");
        let mut command = match umask {
            Some(mask) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("umask {mask} && exec \"$0\" \"$@\""))
                    .arg(binary);
                sh
            }
            None => Command::new(binary),
        };
        let mut child = command
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args([
                "--api-listen",
                "127.0.0.1:0",
                "--device-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("TWINGUARD_LOG", level)
            // Retention on, as a deployment would run: the tests' readings are recent, so
            // nothing they send may go (the crash test reads every accepted one back).
            .env("TWINGUARD_HISTORY_RETENTION_DAYS", "30")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(data_dir.join("server.log")).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        // Keep draining stdout into DIR/server.out so the child never writes to a closed pipe.
        let mut out = std::fs::File::create(data_dir.join("server.out")).unwrap();
        std::io::Write::write_all(&mut out, line.as_bytes()).unwrap();
        std::thread::spawn(move || std::io::copy(&mut reader, &mut out));
        let base = line
            .trim()
            .strip_prefix("twinguard: api listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca = std::fs::read(data_dir.join("tls/ca.pem")).unwrap();
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Self {
            child,
            base,
            client,
        }
    }

    /// A token from the credential file the first start wrote.
    pub async fn admin_token(&self, data_dir: &Path) -> String {
        let response: Value = self
            .admin_token_request(data_dir)
            .await
            .json()
            .await
            .unwrap();
        response["access_token"].as_str().unwrap().to_owned()
    }

    /// The token endpoint's answer to the credential file the first start wrote.
    pub async fn admin_token_request(&self, data_dir: &Path) -> reqwest::Response {
        let admin: Value = serde_json::from_slice(
            &std::fs::read(data_dir.join("secrets/admin-client.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            admin["token_endpoint"],
            format!("{}/oauth2/token", self.base)
        );
        self.client_token_request(
            admin["client_id"].as_str().unwrap(),
            admin["client_secret"].as_str().unwrap(),
        )
        .await
    }

    /// The token endpoint's answer to an application's client credentials.
    pub async fn client_token_request(&self, id: &str, secret: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/oauth2/token", self.base))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", id),
                ("client_secret", secret),
            ])
            .send()
            .await
            .unwrap()
    }

    /// `/readyz`: its status and body; with `token` (of a caller holding the metrics
    /// permission), the body says why a node is not ready.
    pub async fn readiness(&self, token: Option<&str>) -> (u16, Value) {
        let mut request = self.client.get(format!("{}/readyz", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Uploads an empty DTDL v3 interface `model_id` with `token`, and checks it was taken.
    pub async fn upload_interface(&self, token: &str, model_id: &str) {
        let model = serde_json::json!([{"@context": "dtmi:dtdl:context;3", "@id": model_id, "@type": "Interface"}]);
        let path = "/models?api-version=2023-10-31";
        let response = self
            .request(token, reqwest::Method::POST, path, model)
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }

    /// Sends `body` as JSON to `path` on the API with `token`.
    pub fn request(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> impl std::future::Future<Output = reqwest::Result<reqwest::Response>> + use<> {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
    }

    /// The device plane's address, from the line that follows the api line on stdout.
    pub fn device_plane(&self, data_dir: &Path) -> String {
        // Give the drain a moment to write it.
        for _ in 0..50 {
            let out = std::fs::read_to_string(data_dir.join("server.out")).unwrap();
            let found = out.lines().find_map(|l| {
                l.strip_prefix("twinguard: device plane listening on ")
                    .map(str::to_owned)
            });
            if let Some(address) = found {
                return address;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the server printed no device plane address");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}?api-version=2023-10-31", self.base)
    }

    /// Runs `serve` with `extra` arguments where it is expected to refuse to start: its output
    /// once it exits (at once, when it refuses); one that is still running after 30 s is
    /// stopped and the test fails.
    pub fn start_refused(data_dir: &Path, extra: &[&str]) -> std::process::Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_twinguard"))
            .args([
                "serve",
                "--api-listen",
                "127.0.0.1:0",
                "--device-listen",
                "off",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the server started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
