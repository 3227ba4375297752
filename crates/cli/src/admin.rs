//! `twinguard admin ...` and `twinguard mfa enroll`: the identity API from the command line.
//!
//! On the server's machine no options are needed: the CA, the first administrator's credential
//! and the token endpoint (hence the server's address) come from the data directory. Secrets are
//! read from standard input, never from arguments (which other users can see in `ps`).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct Connection {
    /// Data directory to take the CA and the admin credential from.
    #[arg(long, env = "TWINGUARD_DATA_DIR", default_value = "twinguard-data")]
    data_dir: PathBuf,
    /// Server URL, e.g. https://twin.plant.example:8443 (default: the data directory's last run).
    #[arg(long, env = "TWINGUARD_SERVER")]
    server: Option<String>,
    /// CA certificate the server's certificate chains to (default: DATA_DIR/tls/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client credential file with client_id and client_secret (default:
    /// DATA_DIR/secrets/admin-client.json).
    #[arg(long)]
    credentials: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    User,
    Group,
    Application,
    ServiceAccount,
    Device,
}

impl Kind {
    fn wire(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Group => "group",
            Kind::Application => "application",
            Kind::ServiceAccount => "serviceAccount",
            Kind::Device => "device",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Users, groups, applications, service accounts and devices.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Built-in and custom roles.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Who holds which role where.
    #[command(subcommand)]
    Assignment(AssignmentCommand),
    /// API keys.
    #[command(subcommand)]
    Apikey(ApiKeyCommand),
    /// Event endpoints (where routes deliver) and their dead letters.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// The instance's CA, rotated while the nodes serve: add, rotate, retire (docs/storage.md).
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// The authorities (retiring, issuing, next) and the trust bundle clients should hold.
    Show,
    /// A new authority, trusted at once and issuing nothing yet: give clients the new bundle.
    Add,
    /// The newest authority issues: each node presents a certificate of it from its next
    /// handshake, and new client certificates chain to it.
    Rotate,
    /// The authorities older than the issuing one leave the trust bundle. Refused while live
    /// client certificates they issued are recorded, unless --force.
    Retire {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    List,
    Show {
        name: String,
    },
    /// Create or replace an endpoint from a JSON body (a file, or - for standard input), e.g.
    /// {"type": "natsJetStream", "url": "nats://127.0.0.1:4222", "subject": "twins.events"}.
    Put {
        name: String,
        #[arg(long)]
        body: PathBuf,
    },
    Delete {
        name: String,
    },
    /// The events that exhausted their delivery attempts.
    DeadLetters {
        name: String,
    },
    /// Send a dead letter again now; it leaves the store once delivered.
    Replay {
        name: String,
        sequence: u64,
    },
    /// Drop a dead letter.
    Discard {
        name: String,
        sequence: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    List,
    Show {
        id: String,
    },
    /// Create an identity; a user's initial password is read from standard input with
    /// --password-stdin; applications and service accounts get a client secret, printed once.
    Create {
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long)]
        name: String,
        #[arg(long)]
        display_name: Option<String>,
        /// Group ID to join (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Set a user's password, read from standard input.
    SetPassword {
        id: String,
    },
    /// Remove a user's second factor so they can enrol again.
    ResetMfa {
        id: String,
    },
    /// Issue the one-time code (printed once, valid 24 hours) with which a person who holds
    /// privileged roles enrols a first authenticator; hand it over out of band.
    EnrolmentCode {
        id: String,
    },
    /// Issue a new client secret (printed once); the old one stops working at once.
    RotateSecret {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    List,
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Action name or prefix pattern ending in `*` (repeatable).
        #[arg(long = "action", required = true)]
        actions: Vec<String>,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AssignmentCommand {
    List {
        #[arg(long)]
        principal: Option<String>,
    },
    /// Assign a role; the scope is JSON, e.g.
    /// '{"kind":"subtree","root":"site-1","relationships":["contains"]}'.
    Create {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        role: String,
        #[arg(long, default_value = r#"{"kind":"instance"}"#)]
        scope: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    List,
    /// Keys past their rotation date.
    Overdue,
    /// Create a key (printed once).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        owner: String,
        #[arg(long)]
        role: String,
        #[arg(long, default_value = r#"{"kind":"instance"}"#)]
        scope: String,
        #[arg(long, value_parser = ["high", "low"])]
        risk: String,
    },
    /// Issue a successor (printed once); the old key works for the overlap.
    Rotate {
        id: String,
        #[arg(long, default_value_t = 86_400)]
        overlap_seconds: u64,
    },
    Revoke {
        id: String,
    },
}

pub(crate) struct Api {
    client: Client,
    base: String,
    token: String,
}

fn read_secret(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let secret = line.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        bail!("nothing was read from standard input");
    }
    Ok(secret)
}

pub(crate) fn https_client(ca: &std::path::Path) -> anyhow::Result<Client> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    Ok(Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .build()?)
}

impl Connection {
    fn ca(&self) -> PathBuf {
        self.ca
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tls/ca.pem"))
    }

    fn base(&self, recorded_endpoint: Option<&str>) -> anyhow::Result<String> {
        if let Some(server) = &self.server {
            return Ok(server.trim_end_matches('/').to_owned());
        }
        recorded_endpoint
            .and_then(|e| e.strip_suffix("/oauth2/token"))
            .map(str::to_owned)
            .context("no --server given and the data directory records no token endpoint")
    }

    pub(crate) async fn admin(&self) -> anyhow::Result<Api> {
        let path = self
            .credentials
            .clone()
            .unwrap_or_else(|| self.data_dir.join("secrets/admin-client.json"));
        let file: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let base = self.base(file["token_endpoint"].as_str())?;
        let client = https_client(&self.ca())?;
        let field = |name: &str| {
            file[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("{} has no {name}", path.display()))
        };
        let response = client
            .post(format!("{base}/oauth2/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", &field("client_id")?),
                ("client_secret", &field("client_secret")?),
            ])
            .send()
            .await?;
        let token = token_from(response).await?;
        Ok(Api {
            client,
            base,
            token,
        })
    }
}

async fn token_from(response: reqwest::Response) -> anyhow::Result<String> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match body["access_token"].as_str() {
        Some(token) if status.is_success() => Ok(token.to_owned()),
        _ => bail!(
            "the token endpoint refused: {status} {}",
            body["error"].as_str().unwrap_or("")
        ),
    }
}

impl Api {
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            bail!(
                "{status}: {} ({})",
                body["error"]["message"].as_str().unwrap_or(&text),
                body["error"]["code"].as_str().unwrap_or("")
            );
        }
        if status == StatusCode::NO_CONTENT || text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text)?)
    }
}

impl Api {
    /// Every item of a paged list, `{"value": [...]}` as one answer: follows each page's
    /// `nextLink`. Only the link's path and query are used, on this connection's server, so a
    /// link never sends the token anywhere else. Stops after [`MAX_LIST_PAGES`] pages.
    pub(crate) async fn list(&self, path: &str) -> anyhow::Result<Value> {
        let mut items = Vec::new();
        let mut next = Some(path.to_owned());
        let mut pages = 0usize;
        while let Some(path) = next.take() {
            pages += 1;
            if pages > MAX_LIST_PAGES {
                bail!("the list did not end after {MAX_LIST_PAGES} pages");
            }
            let mut page = self.call(Method::GET, &path, None).await?;
            match page.get_mut("value").map(Value::take) {
                Some(Value::Array(mut value)) => items.append(&mut value),
                _ => bail!("the server answered a list without a value array"),
            }
            next = match page.get("nextLink").and_then(Value::as_str) {
                Some(link) => Some(path_of(link)?),
                None => None,
            };
        }
        Ok(json!({ "value": items }))
    }
}

/// Most pages [`Api::list`] follows (a million items at the largest page size).
const MAX_LIST_PAGES: usize = 1_000;

/// The path and query of a next link.
fn path_of(link: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(link).with_context(|| format!("a next link {link:?}"))?;
    Ok(match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    })
}

pub(crate) fn print(value: &Value) -> anyhow::Result<()> {
    if !value.is_null() {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(())
}

fn scope(text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).context("--scope must be JSON, e.g. {\"kind\":\"instance\"}")
}

pub async fn run(connection: Connection, command: AdminCommand) -> anyhow::Result<()> {
    let api = connection.admin().await?;
    let out = match command {
        AdminCommand::Identity(c) => identity(&api, c).await?,
        AdminCommand::Role(c) => match c {
            RoleCommand::List => api.list("/admin/roles").await?,
            RoleCommand::Create {
                name,
                description,
                actions,
            } => {
                let body = json!({"name": name, "description": description, "actions": actions});
                api.call(Method::POST, "/admin/roles", Some(body)).await?
            }
            RoleCommand::Delete { id } => {
                api.call(Method::DELETE, &format!("/admin/roles/{id}"), None)
                    .await?
            }
        },
        AdminCommand::Assignment(c) => match c {
            AssignmentCommand::List { principal } => {
                let path = match principal {
                    Some(p) => format!("/admin/roleassignments?principalId={p}"),
                    None => "/admin/roleassignments".to_owned(),
                };
                api.list(&path).await?
            }
            AssignmentCommand::Create {
                principal,
                role,
                scope: text,
            } => {
                let body =
                    json!({"principalId": principal, "roleId": role, "scope": scope(&text)?});
                api.call(Method::POST, "/admin/roleassignments", Some(body))
                    .await?
            }
            AssignmentCommand::Delete { id } => {
                api.call(
                    Method::DELETE,
                    &format!("/admin/roleassignments/{id}"),
                    None,
                )
                .await?
            }
        },
        AdminCommand::Endpoint(c) => match c {
            EndpointCommand::List => api.list("/admin/endpoints").await?,
            EndpointCommand::Show { name } => {
                api.call(Method::GET, &format!("/admin/endpoints/{name}"), None)
                    .await?
            }
            EndpointCommand::Put { name, body } => {
                let text = if body.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&body)?
                };
                let body: serde_json::Value = serde_json::from_str(&text)?;
                api.call(Method::PUT, &format!("/admin/endpoints/{name}"), Some(body))
                    .await?
            }
            EndpointCommand::Delete { name } => {
                api.call(Method::DELETE, &format!("/admin/endpoints/{name}"), None)
                    .await?
            }
            EndpointCommand::DeadLetters { name } => {
                api.list(&format!("/admin/endpoints/{name}/deadletters"))
                    .await?
            }
            EndpointCommand::Replay { name, sequence } => {
                api.call(
                    Method::POST,
                    &format!("/admin/endpoints/{name}/deadletters/{sequence}/replay"),
                    None,
                )
                .await?
            }
            EndpointCommand::Discard { name, sequence } => {
                api.call(
                    Method::DELETE,
                    &format!("/admin/endpoints/{name}/deadletters/{sequence}"),
                    None,
                )
                .await?
            }
        },
        AdminCommand::Ca(c) => match c {
            CaCommand::Show => api.call(Method::GET, "/admin/ca", None).await?,
            CaCommand::Add => api.call(Method::POST, "/admin/ca/add", None).await?,
            CaCommand::Rotate => api.call(Method::POST, "/admin/ca/rotate", None).await?,
            CaCommand::Retire { force } => {
                let path = format!("/admin/ca/retire?force={force}");
                api.call(Method::POST, &path, None).await?
            }
        },
        AdminCommand::Apikey(c) => match c {
            ApiKeyCommand::List => api.list("/admin/apikeys").await?,
            ApiKeyCommand::Overdue => api.list("/admin/apikeys/overdue").await?,
            ApiKeyCommand::Create {
                name,
                owner,
                role,
                scope: text,
                risk,
            } => {
                let body = json!({"name": name, "ownerId": owner, "roleId": role,
                    "scope": scope(&text)?, "risk": risk});
                api.call(Method::POST, "/admin/apikeys", Some(body)).await?
            }
            ApiKeyCommand::Rotate {
                id,
                overlap_seconds,
            } => {
                let body = json!({"overlapSeconds": overlap_seconds});
                api.call(
                    Method::POST,
                    &format!("/admin/apikeys/{id}/rotate"),
                    Some(body),
                )
                .await?
            }
            ApiKeyCommand::Revoke { id } => {
                api.call(Method::DELETE, &format!("/admin/apikeys/{id}"), None)
                    .await?
            }
        },
    };
    print(&out)
}

async fn identity(api: &Api, command: IdentityCommand) -> anyhow::Result<Value> {
    let one = |id: &str| format!("/admin/identities/{id}");
    match command {
        IdentityCommand::List => api.list("/admin/identities").await,
        IdentityCommand::Show { id } => api.call(Method::GET, &one(&id), None).await,
        IdentityCommand::Create {
            kind,
            name,
            display_name,
            groups,
            password_stdin,
        } => {
            let mut body = json!({"kind": kind.wire(), "name": name, "groups": groups});
            if let Some(d) = display_name {
                body["displayName"] = json!(d);
            }
            if password_stdin {
                body["password"] = json!(read_secret("password: ")?);
            }
            api.call(Method::POST, "/admin/identities", Some(body))
                .await
        }
        IdentityCommand::Disable { id } => {
            api.call(Method::PATCH, &one(&id), Some(json!({"disabled": true})))
                .await
        }
        IdentityCommand::Enable { id } => {
            api.call(Method::PATCH, &one(&id), Some(json!({"disabled": false})))
                .await
        }
        IdentityCommand::Delete { id } => api.call(Method::DELETE, &one(&id), None).await,
        IdentityCommand::SetPassword { id } => {
            let body = json!({"password": read_secret("new password: ")?});
            api.call(Method::PUT, &format!("{}/password", one(&id)), Some(body))
                .await
        }
        IdentityCommand::ResetMfa { id } => {
            api.call(Method::DELETE, &format!("{}/mfa", one(&id)), None)
                .await
        }
        IdentityCommand::EnrolmentCode { id } => {
            api.call(
                Method::POST,
                &format!("{}/mfa/enrolmentcode", one(&id)),
                None,
            )
            .await
        }
        IdentityCommand::RotateSecret { id } => {
            api.call(Method::POST, &format!("{}/secret", one(&id)), None)
                .await
        }
    }
}

/// `twinguard mfa enroll`: a person enrols an authenticator app from the terminal. Reads the
/// password (and, with `--enrolment-code`, the administrator's one-time enrolment code), then
/// the first code, from standard input; prints the QR code in the terminal, the `otpauth://`
/// URI and the secret, then the recovery codes (once).
#[derive(Debug, Args)]
pub struct Enrol {
    #[command(flatten)]
    connection: Connection,
    #[arg(long)]
    username: String,
    /// Also read the one-time enrolment code an administrator issued (`twinguard admin
    /// identity enrolment-code`); people who hold privileged roles need it.
    #[arg(long)]
    enrolment_code: bool,
}

pub async fn enrol(args: Enrol) -> anyhow::Result<()> {
    let connection = args.connection;
    let base = match &connection.server {
        Some(s) => s.trim_end_matches('/').to_owned(),
        None => {
            let path = connection.data_dir.join("secrets/admin-client.json");
            let file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap_or_default())
                .unwrap_or(Value::Null);
            connection.base(file["token_endpoint"].as_str())?
        }
    };
    let client = https_client(&connection.ca())?;
    let password = read_secret("password: ")?;
    let enrolment_code = if args.enrolment_code {
        Some(read_secret("enrolment code: ")?)
    } else {
        None
    };
    let response = client
        .post(format!("{base}/oauth2/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", args.username.as_str()),
            ("password", password.as_str()),
        ])
        .send()
        .await?;
    let api = Api {
        token: token_from(response).await?,
        client,
        base,
    };
    let body = enrolment_code.map(|c| json!({"enrolmentCode": c.as_str()}));
    let enrolment = api.call(Method::POST, "/me/mfa/totp", body).await?;
    let uri = enrolment["otpauthUri"].as_str().unwrap_or_default();
    println!("{}", terminal_qr(uri)?);
    println!("otpauth URI: {uri}");
    println!(
        "secret: {}",
        enrolment["secret"].as_str().unwrap_or_default()
    );
    std::io::stdout().flush().ok();
    let code = read_secret("code from the app: ")?;
    let confirmed = api
        .call(
            Method::POST,
            "/me/mfa/totp/confirm",
            Some(json!({"code": code})),
        )
        .await?;
    println!("enrolled. Recovery codes (each works once; keep them offline):");
    for code in confirmed["recoveryCodes"].as_array().into_iter().flatten() {
        println!("  {}", code.as_str().unwrap_or_default());
    }
    Ok(())
}

/// A QR code drawn with Unicode half blocks, two modules per character row, with the quiet zone
/// the standard asks for. Dark modules are drawn as spaces on a light background, so it scans
/// on dark and light terminals alike.
pub fn terminal_qr(text: &str) -> anyhow::Result<String> {
    let qr = qrcodegen::QrCode::encode_text(text, qrcodegen::QrCodeEcc::Medium)
        .map_err(|e| anyhow::anyhow!("the URI does not fit in a QR code: {e:?}"))?;
    let quiet = 2;
    let size = qr.size();
    let dark = |x: i32, y: i32| qr.get_module(x, y);
    let mut out = String::new();
    let mut y = -quiet;
    while y < size + quiet {
        for x in -quiet..size + quiet {
            out.push(match (dark(x, y), dark(x, y + 1)) {
                (false, false) => '\u{2588}',
                (true, false) => '\u{2584}',
                (false, true) => '\u{2580}',
                (true, true) => ' ',
            });
        }
        out.push('\n');
        y += 2;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_qr_is_square_with_a_quiet_zone() {
        let art =
            terminal_qr("otpauth://totp/twinguard:alice?secret=JBSWY3DPEHPK3PXP&issuer=twinguard")
                .unwrap_or_default();
        let lines: Vec<&str> = art.lines().collect();
        let width = lines.first().map(|l| l.chars().count()).unwrap_or(0);
        assert!(width >= 25 + 4, "{width}");
        assert!(lines.iter().all(|l| l.chars().count() == width));
        assert_eq!(lines.len(), width.div_ceil(2));
        // The quiet zone is light all round.
        assert!(lines[0].chars().all(|c| c == '\u{2588}'));
    }
}
