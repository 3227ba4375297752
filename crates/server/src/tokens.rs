//! OAuth 2.0 client credentials and the JWT access tokens issued for them.
//!
//! Clients are stored with a SHA-256 hash of their secret (secrets are 256-bit random values,
//! so a fast hash is the right tool; human passwords, which need a slow hash, come with the
//! identity issue). Tokens are RFC 9068 `at+jwt` JWTs signed with EdDSA (Ed25519). Verification
//! pins the algorithm, requires `exp`, `nbf`, `iat`, `iss` and `aud`, and ignores every header
//! field but `alg`, `typ` and `kid`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use twinguard_core::auth::Principal;
use twinguard_core::clock::SystemClock;
use twinguard_core::store::{Mutation, Store, StoreError, Table};
use twinguard_core::throttle::{Policy, RetryAfter, Throttle};
use zeroize::Zeroizing;

use crate::signing_keys::KeyRing;

/// The audience ADT clients ask for; twinguard accepts it as its own.
pub const ADT_AUDIENCE: &str = "https://digitaltwins.azure.net";
/// Lifetime of an access token.
pub const TOKEN_LIFETIME_SECS: u64 = 3_600;
/// Allowed clock difference when checking `exp`, `nbf` and `iat`.
pub const CLOCK_SKEW_SECS: u64 = 30;
/// Longest bearer token accepted; anything larger is refused unparsed.
pub const MAX_TOKEN_LEN: usize = 8_192;
/// Verified tokens remembered at most.
const VERIFIED_CACHE_SIZE: usize = 16_384;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClientRecord {
    secret_sha256: String,
    roles: Vec<String>,
    created_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    client_id: String,
    roles: Vec<String>,
}

/// A newly created client; the secret exists only here and in the file it is written to.
#[derive(Debug)]
pub struct NewClient {
    pub client_id: String,
    pub client_secret: Zeroizing<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unknown client or wrong secret; the two are not told apart.
    #[error("invalid client credentials")]
    InvalidClient,
    #[error("invalid or expired token")]
    InvalidToken,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing failed")]
    Signing,
    /// Too many recent failures from this address or on this client; nothing was checked.
    #[error("too many failed attempts")]
    Throttled(RetryAfter),
}

pub struct TokenService {
    issuer: String,
    audiences: Vec<String>,
    keys: RwLock<KeyRing>,
    keys_path: PathBuf,
    validation: Validation,
    clients: RwLock<HashMap<String, ClientRecord>>,
    verified: RwLock<HashMap<String, (Arc<Principal>, u64)>>,
    throttle: Throttle,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TokenService {
    /// `keys` sign and verify; the ring is saved to `keys_path` when it rotates.
    pub fn new(
        issuer: String,
        keys: KeyRing,
        keys_path: PathBuf,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Self> {
        let audiences = vec![ADT_AUDIENCE.to_owned(), issuer.clone()];
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer.as_str()]);
        validation.set_audience(&audiences);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.leeway = CLOCK_SKEW_SECS;
        let mut clients = HashMap::new();
        for (id, bytes) in store.scan(Table::Clients)? {
            let record: ClientRecord = serde_json::from_slice(&bytes)?;
            clients.insert(id, record);
        }
        Ok(Self {
            issuer,
            audiences,
            keys: RwLock::new(keys),
            keys_path,
            validation,
            clients: RwLock::new(clients),
            verified: RwLock::new(HashMap::new()),
            throttle: Throttle::new(Policy::default(), Arc::new(SystemClock)),
            store,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The JSON Web Key Set (RFC 7517) of the keys that verify this server's tokens.
    pub fn jwks(&self) -> serde_json::Value {
        self.keys.read().map(|ring| ring.jwks()).unwrap_or_default()
    }

    /// Rotates the signing key when it is due (see [`crate::signing_keys`]) and saves the ring.
    pub fn rotate_keys_if_due(&self) -> anyhow::Result<()> {
        let mut ring = self
            .keys
            .write()
            .map_err(|_| anyhow::anyhow!("key ring lock poisoned"))?;
        if ring.rotate_if_due(now_secs())? {
            ring.save(&self.keys_path)?;
            tracing::info!(kids = ?ring.kids(), "token signing keys rotated");
        }
        Ok(())
    }

    pub fn client_count(&self) -> usize {
        self.clients.read().map(|c| c.len()).unwrap_or(0)
    }

    /// A fresh client ID and a 256-bit secret, not yet registered: the caller saves the secret
    /// where its owner will find it, then calls [`TokenService::register_client`].
    pub fn new_client() -> NewClient {
        let mut raw = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(raw.as_mut());
        NewClient {
            client_id: uuid::Uuid::new_v4().to_string(),
            client_secret: Zeroizing::new(URL_SAFE_NO_PAD.encode(raw.as_ref())),
        }
    }

    /// Registers `client` with `roles`; only the secret's hash is stored.
    pub fn register_client(
        &self,
        client: &NewClient,
        roles: Vec<String>,
    ) -> Result<(), TokenError> {
        let NewClient {
            client_id,
            client_secret,
        } = client;
        let record = ClientRecord {
            secret_sha256: sha256_hex(client_secret.as_bytes()),
            roles,
            created_at: now_secs(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|_| TokenError::Signing)?;
        self.store
            .commit(&[Mutation::put(Table::Clients, client_id.clone(), bytes)])?;
        if let Ok(mut clients) = self.clients.write() {
            clients.insert(client_id.clone(), record);
        }
        Ok(())
    }

    /// The client-credentials grant: checks the secret in constant time and issues a token.
    /// The client-credentials grant from `address`, subject to the failure backoff: while the
    /// address or the client must wait, no credential is checked at all.
    pub fn issue_from(
        &self,
        address: IpAddr,
        client_id: &str,
        client_secret: &str,
    ) -> Result<String, TokenError> {
        self.throttle
            .check(address, client_id)
            .map_err(TokenError::Throttled)?;
        let issued = self.issue(client_id, client_secret);
        match &issued {
            Err(TokenError::InvalidClient) => self.throttle.failed(address, client_id),
            Ok(_) => self.throttle.succeeded(address),
            Err(_) => {}
        }
        issued
    }

    pub fn issue(&self, client_id: &str, client_secret: &str) -> Result<String, TokenError> {
        let presented = sha256_hex(client_secret.as_bytes());
        let record = self
            .clients
            .read()
            .ok()
            .and_then(|c| c.get(client_id).cloned());
        // Compare against a dummy hash for unknown clients so both paths do the same work.
        let expected = record
            .as_ref()
            .map_or_else(|| "0".repeat(64), |r| r.secret_sha256.clone());
        let matches: bool = presented.as_bytes().ct_eq(expected.as_bytes()).into();
        let Some(record) = record.filter(|_| matches) else {
            return Err(TokenError::InvalidClient);
        };
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: client_id.to_owned(),
            aud: self.audiences.clone(),
            exp: now + TOKEN_LIFETIME_SECS,
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            client_id: client_id.to_owned(),
            roles: record.roles,
        };
        let ring = self.keys.read().map_err(|_| TokenError::Signing)?;
        let key = ring.active(now);
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some("at+jwt".into());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.encoding).map_err(|_| TokenError::Signing)
    }

    /// [`TokenService::verify`] with a cache of recently verified tokens, so a client that
    /// reuses its token pays for the signature check once. Entries expire with their token.
    pub fn verify_cached(&self, token: &str) -> Result<Arc<Principal>, TokenError> {
        let now = now_secs();
        if let Ok(cache) = self.verified.read()
            && let Some((principal, exp)) = cache.get(token)
            && now < exp + CLOCK_SKEW_SECS
        {
            return Ok(principal.clone());
        }
        let (principal, exp) = self.verify(token)?;
        let principal = Arc::new(principal);
        if let Ok(mut cache) = self.verified.write() {
            if cache.len() >= VERIFIED_CACHE_SIZE {
                cache.retain(|_, (_, e)| now < *e);
                if cache.len() >= VERIFIED_CACHE_SIZE {
                    cache.clear();
                }
            }
            cache.insert(token.to_owned(), (principal.clone(), exp));
        }
        Ok(principal)
    }

    /// Verifies a bearer token and returns the caller it names and the token's expiry.
    pub fn verify(&self, token: &str) -> Result<(Principal, u64), TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::InvalidToken);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::InvalidToken)?;
        if header.alg != Algorithm::EdDSA
            || header
                .typ
                .as_deref()
                .is_some_and(|t| !t.eq_ignore_ascii_case("at+jwt"))
        {
            return Err(TokenError::InvalidToken);
        }
        // `kid` only selects among our own keys; a token naming no known key is refused.
        let ring = self.keys.read().map_err(|_| TokenError::InvalidToken)?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| ring.get(kid))
            .ok_or(TokenError::InvalidToken)?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation)
            .map_err(|_| TokenError::InvalidToken)?;
        if data.claims.iat > now_secs() + CLOCK_SKEW_SECS {
            return Err(TokenError::InvalidToken);
        }
        Ok((
            Principal::with_roles(
                data.claims.sub,
                &data.claims.roles.iter().map(String::as_str).collect::<Vec<_>>(),
            ),
            data.claims.exp,
        ))
    }
}
