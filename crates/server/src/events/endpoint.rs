//! Endpoints: where routes send events. A Security Admin names each one
//! (`PUT /admin/endpoints/{name}`); its destination must be admitted by the egress allowlist
//! when it is created and again at every connection.
//!
//! Credentials are never stored or echoed: an endpoint names files the server reads when it
//! connects (`passwordFile`, `secretFile`, `caFile`), and answers show the file names only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::egress::{Destination, EgressPolicy};

/// Most endpoints an instance holds.
pub const MAX_ENDPOINTS: usize = 64;

/// An endpoint as a Security Admin gives it, and as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    /// `natsJetStream`, `mqtt` or `webhook`.
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    /// NATS: the subject published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// MQTT: the topic published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// NATS or MQTT user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// A file holding the NATS or MQTT password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// NATS: a `.creds` file (the user's JWT and nkey seed, as `nsc` writes it) for a server in
    /// operator (decentralised JWT) mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// NATS: a file holding a user nkey seed (`SU...`) for a server that lists the user's
    /// public nkey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_file: Option<PathBuf>,
    /// Webhooks: a file holding the Standard Webhooks secret (`whsec_` and base64) that the `v1`
    /// HMAC signature uses. Without it only the Ed25519 `v1a` signature is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// PEM trust anchors for a TLS destination (`https`, `tls`, `mqtts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Attempts before an event is dead-lettered (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Age (from the event's commit) after which an event is dead-lettered (default a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<u64>,
    /// The first retry's delay; each next one doubles, up to a minute (default 200 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff_ms: Option<u64>,
}

/// The kinds of endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nats,
    Mqtt,
    Webhook,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nats => "natsJetStream",
            Self::Mqtt => "mqtt",
            Self::Webhook => "webhook",
        }
    }
}

/// A checked endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub kind: Kind,
    pub url: Url,
    pub spec: EndpointSpec,
    /// The only directory its credential files may be in (see [`Endpoint::check`]).
    credentials: PathBuf,
}

/// Where endpoints may reach and where their credential files may be.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub egress: &'a EgressPolicy,
    /// `serve --endpoint-credentials`, by default `DATA_DIR/endpoint-credentials`.
    pub credentials: &'a Path,
}

impl Endpoint {
    /// Checks `spec` for an endpoint called `name`: the destination against the egress
    /// allowlist, and every credential file against the credentials directory. A file is read
    /// only if its real path (symbolic links resolved) lies inside that directory, when the
    /// endpoint is created and again at every read: a Security Admin cannot make twinguard send
    /// its own keys (or any other file it can read) to a destination as a password or secret.
    pub fn check(name: &str, spec: EndpointSpec, rules: Rules<'_>) -> Result<Self, String> {
        let egress = rules.egress;
        twinguard_core::graph::validate::check_endpoint_name(name).map_err(|e| e.to_string())?;
        let kind = match spec.kind.as_str() {
            "natsJetStream" => Kind::Nats,
            "mqtt" => Kind::Mqtt,
            "webhook" => Kind::Webhook,
            _ => return Err("type must be natsJetStream, mqtt or webhook".into()),
        };
        if spec.url.len() > 2_048 {
            return Err("the url is longer than 2048 characters".into());
        }
        let url = Url::parse(&spec.url).map_err(|_| "the url is not a URL".to_owned())?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("the url must not carry credentials; use username and passwordFile".into());
        }
        let schemes: &[&str] = match kind {
            Kind::Nats => &["nats", "tls"],
            Kind::Mqtt => &["mqtt", "mqtts"],
            Kind::Webhook => &["https", "http"],
        };
        if !schemes.contains(&url.scheme()) {
            return Err(format!(
                "a {} endpoint's url must use {}",
                kind.as_str(),
                schemes.join(" or ")
            ));
        }
        let tls = matches!(url.scheme(), "https" | "tls" | "mqtts");
        if tls && spec.ca_file.is_none() {
            return Err("a TLS destination needs caFile (its trust anchors)".into());
        }
        if url.scheme() == "http" && !is_loopback(&url) {
            return Err("a webhook must use https (http only to a loopback address)".into());
        }
        match kind {
            Kind::Nats => {
                let subject = spec.subject.as_deref().unwrap_or("");
                if subject.is_empty()
                    || subject.len() > 256
                    || subject
                        .chars()
                        .any(|c| c.is_whitespace() || c == '*' || c == '>')
                {
                    return Err(
                        "a NATS endpoint needs a subject without spaces or wildcards".into(),
                    );
                }
                if spec.topic.is_some() || spec.secret_file.is_some() {
                    return Err("a NATS endpoint takes subject, not topic or secretFile".into());
                }
                let ways = [
                    spec.password_file.is_some(),
                    spec.credentials_file.is_some(),
                    spec.nkey_file.is_some(),
                ];
                if ways.iter().filter(|w| **w).count() > 1 {
                    return Err(
                        "a NATS endpoint takes one of passwordFile, credentialsFile and nkeyFile"
                            .into(),
                    );
                }
                if spec.username.is_some()
                    && (spec.credentials_file.is_some() || spec.nkey_file.is_some())
                {
                    return Err("credentialsFile and nkeyFile name the user themselves".into());
                }
            }
            Kind::Mqtt => {
                let topic = spec.topic.as_deref().unwrap_or("");
                if topic.is_empty() || topic.len() > 256 || topic.contains(['+', '#', '\0']) {
                    return Err("an MQTT endpoint needs a topic without wildcards".into());
                }
                if spec.subject.is_some()
                    || spec.secret_file.is_some()
                    || spec.credentials_file.is_some()
                    || spec.nkey_file.is_some()
                {
                    return Err("an MQTT endpoint takes topic, username and passwordFile, not subject, secretFile, credentialsFile or nkeyFile".into());
                }
            }
            Kind::Webhook => {
                if spec.subject.is_some()
                    || spec.topic.is_some()
                    || spec.username.is_some()
                    || spec.password_file.is_some()
                    || spec.credentials_file.is_some()
                    || spec.nkey_file.is_some()
                {
                    return Err("a webhook takes url, secretFile and caFile only".into());
                }
            }
        }
        if spec.password_file.is_some() && spec.username.is_none() {
            return Err("passwordFile needs username".into());
        }
        let credentials = spec.password_file.is_some()
            || spec.credentials_file.is_some()
            || spec.nkey_file.is_some();
        if credentials && !tls && !is_loopback(&url) {
            return Err("credentials go only over TLS or to a loopback address".into());
        }
        for file in [
            &spec.password_file,
            &spec.secret_file,
            &spec.ca_file,
            &spec.credentials_file,
            &spec.nkey_file,
        ]
        .into_iter()
        .flatten()
        {
            read_contained(file, rules.credentials)?;
        }
        if let Some(secret) = &spec.secret_file {
            read_webhook_secret(secret, rules.credentials)?;
        }
        let destination = Destination::from_url(&url).map_err(|e| e.to_string())?;
        egress.may_reach(&destination).map_err(|e| e.to_string())?;
        let endpoint = Self {
            name: name.to_owned(),
            kind,
            url,
            spec,
            credentials: rules.credentials.to_owned(),
        };
        if kind == Kind::Nats {
            endpoint.nats_auth(async_nats::ConnectOptions::new())?;
        }
        Ok(endpoint)
    }

    pub fn max_attempts(&self) -> u32 {
        self.spec.max_attempts.unwrap_or(30).clamp(1, 1_000)
    }

    pub fn max_age(&self) -> Duration {
        Duration::from_secs(
            self.spec
                .max_age_seconds
                .unwrap_or(86_400)
                .clamp(1, 7 * 86_400),
        )
    }

    pub fn initial_backoff(&self) -> Duration {
        Duration::from_millis(self.spec.initial_backoff_ms.unwrap_or(200).clamp(1, 60_000))
    }

    /// The password from `passwordFile`, read now.
    pub fn password(&self) -> Result<Option<zeroize::Zeroizing<String>>, String> {
        match &self.spec.password_file {
            None => Ok(None),
            Some(path) => {
                let bytes = zeroize::Zeroizing::new(read_contained(path, &self.credentials)?);
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| format!("{} is not text", path.display()))?;
                Ok(Some(zeroize::Zeroizing::new(text.trim_end().to_owned())))
            }
        }
    }

    /// How the endpoint proves itself to NATS: user and password, a `.creds` file or an nkey
    /// seed, read now (from inside the credentials directory) and checked by async-nats's
    /// parser.
    pub fn nats_auth(
        &self,
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, String> {
        let text = |path: &Path| -> Result<zeroize::Zeroizing<String>, String> {
            let bytes = zeroize::Zeroizing::new(read_contained(path, &self.credentials)?);
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| format!("{} is not text", path.display()))?;
            Ok(zeroize::Zeroizing::new(text.to_owned()))
        };
        if let Some(path) = &self.spec.credentials_file {
            // As written (the parser wants the line ends).
            return options
                .credentials(&text(path)?)
                .map_err(|_| format!("{} is not a NATS .creds file", path.display()));
        }
        if let Some(path) = &self.spec.nkey_file {
            let seed = zeroize::Zeroizing::new(text(path)?.trim().to_owned());
            // Checked here: async-nats would only find a bad seed when it connects.
            nkeys::KeyPair::from_seed(&seed)
                .ok()
                .filter(|k| k.public_key().starts_with('U'))
                .ok_or_else(|| format!("{} does not hold a user nkey seed", path.display()))?;
            return Ok(options.nkey(seed.to_string()));
        }
        match (&self.spec.username, self.password()?) {
            (Some(user), Some(password)) => {
                Ok(options.user_and_password(user.clone(), password.to_string()))
            }
            _ => Ok(options),
        }
    }

    /// The webhook's HMAC secret from `secretFile`, read now.
    pub fn webhook_secret(&self) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, String> {
        self.spec
            .secret_file
            .as_ref()
            .map(|p| read_webhook_secret(p, &self.credentials))
            .transpose()
    }

    /// The trust anchors from `caFile`, read now.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        self.spec
            .ca_file
            .as_ref()
            .map(|p| read_contained(p, &self.credentials))
            .transpose()
    }
}

fn is_loopback(url: &Url) -> bool {
    url.host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback())
}

/// Most bytes of a credential file.
const MAX_CREDENTIAL_FILE: u64 = 1 << 20;

/// The contents of `path` if its real path is a regular file inside `dir` (also real), at most
/// [`MAX_CREDENTIAL_FILE`] bytes. The same answer for a file outside as for a missing one.
fn read_contained(path: &Path, dir: &Path) -> Result<Vec<u8>, String> {
    let refused = || {
        format!(
            "{} is not a readable file in the endpoint credentials directory",
            path.display()
        )
    };
    let real = std::fs::canonicalize(path).map_err(|_| refused())?;
    let dir = std::fs::canonicalize(dir).map_err(|_| refused())?;
    if !path.is_absolute() || !real.starts_with(&dir) {
        return Err(refused());
    }
    let meta = std::fs::metadata(&real).map_err(|_| refused())?;
    if !meta.is_file() || meta.len() > MAX_CREDENTIAL_FILE {
        return Err(refused());
    }
    std::fs::read(&real).map_err(|_| refused())
}

/// A Standard Webhooks secret: `whsec_` then base64 of 24 to 64 bytes.
fn read_webhook_secret(path: &Path, dir: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    use base64::Engine;
    let bytes = zeroize::Zeroizing::new(read_contained(path, dir)?);
    let text = zeroize::Zeroizing::new(
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("{} does not hold a whsec_ secret", path.display()))?,
    );
    let encoded = text.trim().strip_prefix("whsec_").unwrap_or(text.trim());
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| format!("{} does not hold a whsec_ secret", path.display()))?;
    if !(24..=64).contains(&bytes.len()) {
        return Err(format!(
            "the secret in {} must be 24 to 64 bytes",
            path.display()
        ));
    }
    Ok(zeroize::Zeroizing::new(bytes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rules(egress: &EgressPolicy) -> Rules<'_> {
        Rules {
            egress,
            credentials: Path::new("/nonexistent-credentials"),
        }
    }

    fn spec(kind: &str, url: &str) -> EndpointSpec {
        EndpointSpec {
            kind: kind.into(),
            url: url.into(),
            subject: (kind == "natsJetStream").then(|| "twins.events".into()),
            topic: (kind == "mqtt").then(|| "twins/events".into()),
            username: None,
            password_file: None,
            credentials_file: None,
            nkey_file: None,
            secret_file: None,
            ca_file: None,
            max_attempts: None,
            max_age_seconds: None,
            initial_backoff_ms: None,
        }
    }

    #[test]
    fn destinations_outside_the_allowlist_are_refused_at_creation() {
        let allow = EgressPolicy::from_lines("127.0.0.1\nhooks.example.com:443").unwrap();
        let loopback_nats = spec("natsJetStream", "nats://127.0.0.1:4222");
        Endpoint::check("nats", loopback_nats.clone(), rules(&allow)).unwrap();
        // Not listed at all.
        assert!(Endpoint::check("nats", loopback_nats, rules(&EgressPolicy::deny_all())).is_err());
        // Loopback that is not listed, private and metadata addresses.
        for url in [
            "nats://127.0.0.2:4222",
            "nats://10.0.0.1:4222",
            "nats://169.254.169.254:4222",
        ] {
            let err =
                Endpoint::check("nats", spec("natsJetStream", url), rules(&allow)).unwrap_err();
            assert!(err.contains("refused"), "{url}: {err}");
        }
        // A listed name on another port.
        let names_only = EgressPolicy::from_lines("hooks.example.com:443").unwrap();
        let other_port = spec("mqtt", "mqtt://hooks.example.com:1883");
        assert!(Endpoint::check("mqtt", other_port, rules(&names_only)).is_err());
    }

    #[test]
    fn malformed_endpoints_are_refused_with_a_reason() {
        let allow = EgressPolicy::from_lines("127.0.0.1\n10.0.0.0/8").unwrap();
        let cases = [
            spec("kafka", "nats://127.0.0.1:4222"),
            spec("natsJetStream", "http://127.0.0.1:4222"),
            spec("webhook", "http://10.0.0.5/hook"),
            spec("webhook", "https://10.0.0.5/hook"),
            spec("webhook", "http://user:pw@127.0.0.1/hook"),
            EndpointSpec {
                subject: Some("a.>".into()),
                ..spec("natsJetStream", "nats://127.0.0.1:4222")
            },
            EndpointSpec {
                topic: Some("a/#".into()),
                ..spec("mqtt", "mqtt://127.0.0.1:1883")
            },
            EndpointSpec {
                username: Some("u".into()),
                password_file: Some("/etc/hostname".into()),
                ..spec("mqtt", "mqtt://10.0.0.5:1883")
            },
        ];
        for case in cases {
            assert!(
                Endpoint::check("end", case.clone(), rules(&allow)).is_err(),
                "{case:?}"
            );
        }
        assert!(
            Endpoint::check(
                "bad name!",
                spec("webhook", "http://127.0.0.1/h"),
                rules(&allow)
            )
            .is_err()
        );
        assert!(
            Endpoint::check(
                "okay",
                spec("webhook", "http://127.0.0.1:9/h"),
                rules(&allow)
            )
            .is_ok()
        );
    }

    #[test]
    fn credential_files_are_read_only_inside_the_credentials_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("credentials");
        std::fs::create_dir(&dir).unwrap();
        let inside = dir.join("pass");
        std::fs::write(&inside, "s3cret\n").unwrap();
        let outside = root.path().join("server-key");
        std::fs::write(&outside, "PRIVATE KEY").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let allow = EgressPolicy::from_lines("127.0.0.1").unwrap();
        let rules = Rules {
            egress: &allow,
            credentials: &dir,
        };
        let with = |file: &Path| EndpointSpec {
            username: Some("u".into()),
            password_file: Some(file.to_owned()),
            ..spec("mqtt", "mqtt://127.0.0.1:1883")
        };
        let endpoint = Endpoint::check("mqtt", with(&inside), rules).unwrap();
        assert_eq!(endpoint.password().unwrap().unwrap().as_str(), "s3cret");
        for refused in [
            outside.clone(),
            link.clone(),
            dir.join("../server-key"),
            Path::new("credentials/pass").to_owned(),
            dir.join("missing"),
        ] {
            let err = Endpoint::check("mqtt", with(&refused), rules).unwrap_err();
            assert!(
                err.contains("credentials directory"),
                "{}: {err}",
                refused.display()
            );
        }
        // Swapped for a link after the endpoint was made: refused at the read.
        std::fs::remove_file(&inside).unwrap();
        std::os::unix::fs::symlink(&outside, &inside).unwrap();
        assert!(endpoint.password().is_err());
    }
}
