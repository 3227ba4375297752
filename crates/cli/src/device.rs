//! `twinguard device ...`: the device registry, firmware allowlists, validation policies, sensor
//! groups and quarantine review from the command line, through the API.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::admin::{Connection, print};

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    List,
    Show {
        id: String,
    },
    /// Register a device. Without --public-key a key pair is generated and the private key is
    /// written to --key-out (mode 0600), the only copy.
    Provision {
        id: String,
        /// The device model whose firmware allowlist applies.
        #[arg(long)]
        model: String,
        /// The device's public key: an SPKI PEM file or a JWK JSON file.
        #[arg(long, conflicts_with = "key_out")]
        public_key: Option<PathBuf>,
        /// Where to write a generated private key.
        #[arg(long)]
        key_out: Option<PathBuf>,
        /// TWIN=NAME[,NAME...]: what the device may write (repeatable).
        #[arg(long = "bind")]
        bindings: Vec<String>,
    },
    /// Give a device a new key. Without --public-key a key pair is generated and the private
    /// key is written to --key-out (mode 0600), the only copy. The old key stays accepted for
    /// --overlap-seconds (default 0: refused from the next message on).
    RotateKey {
        id: String,
        /// The device's new public key: an SPKI PEM file or a JWK JSON file.
        #[arg(long, conflicts_with = "key_out")]
        public_key: Option<PathBuf>,
        /// Where to write a generated private key.
        #[arg(long)]
        key_out: Option<PathBuf>,
        /// Seconds the old key stays accepted (at most 30 days).
        #[arg(long, default_value_t = 0)]
        overlap_seconds: u64,
    },
    /// End a key rotation's overlap: the device's previous key is refused from now on.
    RetirePreviousKey {
        id: String,
    },
    /// Replace what a device may write: TWIN=NAME[,NAME...] (repeatable).
    Bind {
        id: String,
        #[arg(long = "bind", required = true)]
        bindings: Vec<String>,
    },
    Suspend {
        id: String,
    },
    /// Back to active after a suspension; clears a suspect mark.
    Resume {
        id: String,
    },
    /// Refuse the device's key for good.
    Revoke {
        id: String,
    },
    /// Set a device model's approved firmware digests (lowercase hex SHA-256).
    Firmware {
        model: String,
        #[arg(long = "digest", required = true)]
        digests: Vec<String>,
    },
    /// Create or replace a validation policy from a JSON file (see docs/telemetry.md).
    Policy {
        id: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Create or replace a sensor group from a JSON file (see docs/telemetry.md).
    Group {
        id: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// List pending quarantined readings.
    Quarantine,
    /// Apply a quarantined reading to its twin.
    Release {
        id: String,
    },
    /// Close a quarantined reading without applying it.
    Discard {
        id: String,
    },
}

fn bindings(specs: &[String]) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for spec in specs {
        let (twin, names) = spec
            .split_once('=')
            .context("--bind takes TWIN=NAME[,NAME...]")?;
        let names: Vec<&str> = names.split(',').filter(|n| !n.is_empty()).collect();
        out.push(json!({ "twin": twin, "names": names }));
    }
    Ok(Value::Array(out))
}

fn read_json(path: &PathBuf) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

pub async fn run(connection: Connection, command: DeviceCommand) -> anyhow::Result<()> {
    let api = connection.admin().await?;
    let out = match command {
        DeviceCommand::List => api.list("/devices").await?,
        DeviceCommand::Show { id } => {
            api.call(Method::GET, &format!("/devices/{id}"), None)
                .await?
        }
        DeviceCommand::Provision {
            id,
            model,
            public_key,
            key_out,
            bindings: specs,
        } => {
            let mut body = json!({ "deviceModel": model, "bindings": bindings(&specs)? });
            new_key(&mut body, public_key.as_ref(), key_out.as_ref())?;
            let created = api
                .call(Method::PUT, &format!("/devices/{id}"), Some(body))
                .await?;
            keep_private_key(created, key_out.as_ref())?
        }
        DeviceCommand::RotateKey {
            id,
            public_key,
            key_out,
            overlap_seconds,
        } => {
            let mut body = json!({ "overlapSeconds": overlap_seconds });
            new_key(&mut body, public_key.as_ref(), key_out.as_ref())?;
            let rotated = api
                .call(Method::PUT, &format!("/devices/{id}/key"), Some(body))
                .await?;
            keep_private_key(rotated, key_out.as_ref())?
        }
        DeviceCommand::RetirePreviousKey { id } => {
            api.call(Method::DELETE, &format!("/devices/{id}/key/previous"), None)
                .await?
        }
        DeviceCommand::Bind {
            id,
            bindings: specs,
        } => {
            api.call(
                Method::PUT,
                &format!("/devices/{id}/bindings"),
                Some(bindings(&specs)?),
            )
            .await?
        }
        DeviceCommand::Suspend { id } => status(&api, &id, "suspend").await?,
        DeviceCommand::Resume { id } => status(&api, &id, "resume").await?,
        DeviceCommand::Revoke { id } => status(&api, &id, "revoke").await?,
        DeviceCommand::Firmware { model, digests } => {
            api.call(
                Method::PUT,
                &format!("/firmware/{model}"),
                Some(json!({ "digests": digests })),
            )
            .await?
        }
        DeviceCommand::Policy { id, file } => {
            api.call(
                Method::PUT,
                &format!("/policies/{id}"),
                Some(read_json(&file)?),
            )
            .await?
        }
        DeviceCommand::Group { id, file } => {
            api.call(
                Method::PUT,
                &format!("/sensorgroups/{id}"),
                Some(read_json(&file)?),
            )
            .await?
        }
        DeviceCommand::Quarantine => api.list("/quarantine").await?,
        DeviceCommand::Release { id } => {
            api.call(Method::POST, &format!("/quarantine/{id}/release"), None)
                .await?
        }
        DeviceCommand::Discard { id } => {
            api.call(Method::POST, &format!("/quarantine/{id}/discard"), None)
                .await?
        }
    };
    print(&out)
}

/// Sets the key of a registration or rotation body: the public key read from `public_key`
/// (a JWK JSON file, else an SPKI PEM), or `"generate": true` when a private key may be
/// written to `key_out`.
fn new_key(
    body: &mut Value,
    public_key: Option<&PathBuf>,
    key_out: Option<&PathBuf>,
) -> anyhow::Result<()> {
    match public_key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            body["publicKey"] = match serde_json::from_str::<Value>(&text) {
                Ok(jwk @ Value::Object(_)) => jwk,
                _ => Value::String(text),
            };
        }
        None => {
            if key_out.is_none() {
                anyhow::bail!("give --public-key, or --key-out for a generated key");
            }
            body["generate"] = Value::Bool(true);
        }
    }
    Ok(())
}

/// Writes a generated private key from `answer` to `key_out` (0600, the only copy) and takes
/// it out of what is printed.
fn keep_private_key(mut answer: Value, key_out: Option<&PathBuf>) -> anyhow::Result<Value> {
    if let (Some(path), Some(key)) = (key_out, answer.get("privateKey").cloned()) {
        twinguard_server::datadir::write_private(
            path,
            key.as_str().unwrap_or_default().as_bytes(),
        )?;
        eprintln!("private key written to {} (the only copy)", path.display());
        if let Some(obj) = answer.as_object_mut() {
            obj.remove("privateKey");
        }
    }
    Ok(answer)
}

async fn status(api: &crate::admin::Api, id: &str, action: &str) -> anyhow::Result<Value> {
    api.call(Method::POST, &format!("/devices/{id}/{action}"), None)
        .await
}
