//! Tokens of external OpenID Connect issuers (Keycloak, Entra ID, any OIDC provider).
//!
//! Each trusted issuer is configured by the operator (`--issuers FILE`): its exact `iss`, where
//! its keys are (a JWKS URL fetched by twinguard, or a JWKS file), the audiences it must name,
//! the algorithms it may use (asymmetric only; pinned per issuer), and how its claims map to
//! twinguard: which claim is the subject, which claims carry groups and roles, and which group
//! or role values mean which directory group or role. Nothing in a token chooses where keys come
//! from: `jku`, `x5u`, `jwk` and `x5c` headers are ignored, and `kid` only selects among the keys
//! already fetched for the issuer the token claims. Keys are refreshed every ten minutes, and at
//! most every thirty seconds when a token names a `kid` not yet known (the issuer rotated).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::tokens::{CLOCK_SKEW_SECS, now_secs};

/// How often keys are fetched again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);
/// Least time between fetches caused by unknown `kid`s.
const UNKNOWN_KID_COOLDOWN: Duration = Duration::from_secs(30);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClaimNames {
    #[serde(default = "default_subject")]
    subject: String,
    #[serde(default)]
    groups: Option<String>,
    #[serde(default)]
    roles: Option<String>,
}

fn default_subject() -> String {
    "sub".into()
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            subject: default_subject(),
            groups: None,
            roles: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Kind {
    #[default]
    User,
    Application,
}

/// One trusted issuer, as the operator writes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerConfig {
    issuer: String,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    jwks_file: Option<PathBuf>,
    /// CA certificates (PEM) that the JWKS server's certificate must chain to.
    #[serde(default)]
    ca_file: Option<PathBuf>,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    #[serde(default)]
    principal_kind: Kind,
    #[serde(default)]
    claims: ClaimNames,
    /// External group value -> directory group ID: members get the group's role assignments,
    /// scopes included.
    #[serde(default)]
    group_map: HashMap<String, String>,
    /// External role value -> twinguard role ID, held at instance scope.
    #[serde(default)]
    role_map: HashMap<String, String>,
}

/// What a verified external token says about its caller, mapped to twinguard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalCaller {
    pub subject: String,
    pub application: bool,
    pub group_ids: Vec<String>,
    pub role_ids: Vec<String>,
    pub mfa: bool,
    pub auth_time: u64,
    pub exp: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Signed with a key this issuer has not published (yet): refresh and retry once.
    UnknownKey,
    Invalid,
}

struct Keys {
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    fetched: Option<Instant>,
    last_forced: Option<Instant>,
}

pub struct Issuer {
    config: IssuerConfig,
    client: Option<reqwest::Client>,
    validation: Validation,
    keys: RwLock<Keys>,
}

fn is_loopback_http(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    url.scheme() == "http"
        && (host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()))
}

/// The algorithm a JWK's key type supports, checked against what the issuer may use.
pub(crate) fn key_algorithm(
    jwk: &jsonwebtoken::jwk::Jwk,
    allowed: &[Algorithm],
) -> Option<Algorithm> {
    let family_ok = |a: &Algorithm| {
        matches!(
            (&jwk.algorithm, a),
            (
                AlgorithmParameters::RSA(_),
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512,
            ) | (
                AlgorithmParameters::EllipticCurve(_),
                Algorithm::ES256 | Algorithm::ES384
            ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
        )
    };
    let declared = jwk
        .common
        .key_algorithm
        .and_then(|ka| ka.to_string().parse::<Algorithm>().ok());
    match declared {
        Some(a) => (allowed.contains(&a) && family_ok(&a)).then_some(a),
        None => allowed.iter().copied().find(family_ok),
    }
}

impl Issuer {
    fn new(config: IssuerConfig) -> anyhow::Result<Self> {
        if config.issuer.is_empty() || config.audiences.is_empty() || config.algorithms.is_empty() {
            bail!("an issuer needs its iss, audiences and algorithms");
        }
        if config
            .algorithms
            .iter()
            .any(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            bail!(
                "issuer {}: only asymmetric algorithms can be trusted",
                config.issuer
            );
        }
        let client = match (&config.jwks_uri, &config.jwks_file) {
            (Some(uri), None) => {
                let url = reqwest::Url::parse(uri).context("jwksUri")?;
                if url.scheme() != "https" && !is_loopback_http(&url) {
                    bail!(
                        "issuer {}: jwksUri must be https (http only on loopback)",
                        config.issuer
                    );
                }
                let mut builder = reqwest::Client::builder()
                    .use_rustls_tls()
                    .tls_built_in_root_certs(false)
                    .https_only(url.scheme() == "https")
                    .timeout(Duration::from_secs(10))
                    .redirect(reqwest::redirect::Policy::none());
                if let Some(ca) = &config.ca_file {
                    let pem =
                        std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                    for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                        builder = builder.add_root_certificate(cert);
                    }
                } else if url.scheme() == "https" {
                    bail!("issuer {}: an https jwksUri needs a caFile", config.issuer);
                }
                Some(builder.build()?)
            }
            (None, Some(_)) => None,
            _ => bail!(
                "issuer {}: give exactly one of jwksUri and jwksFile",
                config.issuer
            ),
        };
        let mut validation = Validation::new(config.algorithms[0]);
        validation.algorithms = config.algorithms.clone();
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&config.audiences);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.leeway = CLOCK_SKEW_SECS;
        Ok(Self {
            config,
            client,
            validation,
            keys: RwLock::new(Keys {
                by_kid: HashMap::new(),
                fetched: None,
                last_forced: None,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.issuer
    }

    async fn fetch(&self) -> anyhow::Result<JwkSet> {
        let bytes = match (&self.client, &self.config.jwks_uri, &self.config.jwks_file) {
            (Some(client), Some(uri), _) => {
                let response = client.get(uri).send().await?.error_for_status()?;
                if response.content_length().unwrap_or(0) as usize > MAX_JWKS_BYTES {
                    bail!("the JWKS is too large");
                }
                let bytes = response.bytes().await?;
                if bytes.len() > MAX_JWKS_BYTES {
                    bail!("the JWKS is too large");
                }
                bytes.to_vec()
            }
            (_, _, Some(file)) => tokio::fs::read(file).await?,
            _ => bail!("no key source"),
        };
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Fetches the issuer's keys and replaces the known set. Keys without a `kid`, symmetric
    /// keys and keys of algorithms the issuer may not use are skipped.
    pub async fn refresh(&self) -> anyhow::Result<usize> {
        let set = self.fetch().await?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let Some(alg) = key_algorithm(jwk, &self.config.algorithms) else {
                continue;
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                by_kid.insert(kid, (key, alg));
            }
        }
        let count = by_kid.len();
        if let Ok(mut keys) = self.keys.write() {
            keys.by_kid = by_kid;
            keys.fetched = Some(Instant::now());
        }
        Ok(count)
    }

    /// A refresh caused by an unknown `kid`, at most once per cooldown.
    pub async fn refresh_for_unknown_kid(&self) {
        let due = self.keys.write().is_ok_and(|mut keys| {
            let due = keys
                .last_forced
                .is_none_or(|t| t.elapsed() >= UNKNOWN_KID_COOLDOWN);
            if due {
                keys.last_forced = Some(Instant::now());
            }
            due
        });
        if due && let Err(e) = self.refresh().await {
            tracing::warn!(issuer = %self.config.issuer, error = %e, "fetching the issuer's keys failed");
        }
    }

    fn stale(&self) -> bool {
        self.keys
            .read()
            .map(|k| k.fetched.is_none_or(|t| t.elapsed() >= REFRESH_EVERY))
            .unwrap_or(true)
    }

    /// Verifies `token` as this issuer's and maps its claims.
    pub fn verify(&self, token: &str) -> Result<ExternalCaller, Rejected> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejected::Invalid)?;
        if !self.config.algorithms.contains(&header.alg) {
            return Err(Rejected::Invalid);
        }
        let kid = header.kid.ok_or(Rejected::Invalid)?;
        let claims = {
            let keys = self.keys.read().map_err(|_| Rejected::Invalid)?;
            let (key, alg) = keys.by_kid.get(&kid).ok_or(Rejected::UnknownKey)?;
            if *alg != header.alg {
                return Err(Rejected::Invalid);
            }
            jsonwebtoken::decode::<Value>(token, key, &self.validation)
                .map_err(|_| Rejected::Invalid)?
                .claims
        };
        self.map_claims(&claims).ok_or(Rejected::Invalid)
    }

    /// Maps verified claims; `None` if a mapped claim has the wrong JSON type.
    fn map_claims(&self, claims: &Value) -> Option<ExternalCaller> {
        let now = now_secs();
        let iat = claims.get("iat")?.as_u64()?;
        if iat > now + CLOCK_SKEW_SECS {
            return None;
        }
        let exp = claims.get("exp")?.as_u64()?;
        let subject = claim(claims, &self.config.claims.subject)?.as_str()?;
        if subject.is_empty() {
            return None;
        }
        let strings = |name: &Option<String>| -> Option<Vec<String>> {
            match name.as_deref().and_then(|n| claim(claims, n)) {
                None => Some(vec![]),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                Some(_) => None,
            }
        };
        let groups = strings(&self.config.claims.groups)?;
        let roles = strings(&self.config.claims.roles)?;
        let amr = match claims.get("amr") {
            None => vec![],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()?,
            Some(_) => return None,
        };
        let auth_time = match claims.get("auth_time") {
            None => iat,
            Some(v) => v.as_u64()?,
        };
        // Authentication cannot happen after the token was issued: an `auth_time` in the
        // future would otherwise count as a fresh step-up for as long as it lies ahead.
        if auth_time > iat.saturating_add(crate::tokens::CLOCK_SKEW_SECS) {
            return None;
        }
        let mapped = |values: &[String], map: &HashMap<String, String>| {
            values.iter().filter_map(|v| map.get(v).cloned()).collect()
        };
        Some(ExternalCaller {
            subject: format!("{}#{subject}", self.config.issuer),
            application: self.config.principal_kind == Kind::Application,
            group_ids: mapped(&groups, &self.config.group_map),
            role_ids: mapped(&roles, &self.config.role_map),
            mfa: amr
                .iter()
                .any(|m| matches!(m.as_str(), "mfa" | "otp" | "hwk")),
            auth_time,
            exp,
        })
    }
}

/// A claim by name; dots reach into objects (`realm_access.roles` in Keycloak tokens).
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

/// The trusted external issuers.
#[derive(Default)]
pub struct ExternalIssuers {
    issuers: Vec<Issuer>,
}

impl ExternalIssuers {
    /// Reads the issuer list (a JSON array of issuer objects).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let configs: Vec<IssuerConfig> =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        let issuers = configs
            .into_iter()
            .map(Issuer::new)
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { issuers })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The configured issuer whose `iss` is exactly `iss`.
    pub fn get(&self, iss: &str) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.config.issuer == iss)
    }

    /// Fetches the keys of every issuer that are due; failures are logged and the old keys
    /// kept, so a flapping identity provider does not lock everybody out.
    pub async fn refresh_due(&self) {
        for issuer in &self.issuers {
            if issuer.stale()
                && let Err(e) = issuer.refresh().await
            {
                tracing::warn!(issuer = %issuer.config.issuer, error = %e, "fetching the issuer's keys failed");
            }
        }
    }
}

/// The `iss` claim of a token, read without verification: it only chooses which configured
/// issuer's pinned keys and rules then judge the token.
pub fn unverified_issuer(token: &str) -> Option<String> {
    unverified_claim(token, "iss")
}

/// A string claim of a JWT, read without verification (only to find whose keys judge it).
pub(crate) fn unverified_claim(token: &str, name: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get(name)?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(extra: Value) -> anyhow::Result<Issuer> {
        let mut base = serde_json::json!({
            "issuer": "https://idp.test",
            "jwksUri": "http://127.0.0.1:9/jwks.json",
            "audiences": ["https://digitaltwins.azure.net"],
            "algorithms": ["RS256"]
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        Issuer::new(serde_json::from_value(base)?)
    }

    #[test]
    fn configurations_that_cannot_be_trusted_are_refused_at_start() {
        crate::startup::install_crypto_provider();
        assert!(config(serde_json::json!({})).is_ok());
        for (why, extra) in [
            (
                "symmetric algorithm",
                serde_json::json!({"algorithms": ["HS256"]}),
            ),
            ("no algorithms", serde_json::json!({"algorithms": []})),
            ("no audiences", serde_json::json!({"audiences": []})),
            (
                "plain http off loopback",
                serde_json::json!({"jwksUri": "http://idp.test/jwks.json"}),
            ),
            (
                "https without a CA",
                serde_json::json!({"jwksUri": "https://idp.test/jwks.json"}),
            ),
            ("no key source", serde_json::json!({"jwksUri": null})),
            (
                "two key sources",
                serde_json::json!({"jwksFile": "/tmp/jwks.json"}),
            ),
            ("unknown field", serde_json::json!({"trustHeaderJku": true})),
        ] {
            assert!(config(extra).is_err(), "{why}");
        }
    }

    #[test]
    fn claim_paths_reach_into_objects() {
        let claims = serde_json::json!({"realm_access": {"roles": ["a"]}, "sub": "s"});
        assert_eq!(
            claim(&claims, "realm_access.roles"),
            Some(&serde_json::json!(["a"]))
        );
        assert_eq!(claim(&claims, "sub"), Some(&serde_json::json!("s")));
        assert_eq!(claim(&claims, "realm_access.groups"), None);
    }
}
