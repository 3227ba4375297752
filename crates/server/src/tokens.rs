//! The OAuth 2.0 authorization server's token logic: the client-credentials, password (+TOTP)
//! and refresh-token grants, JWT access tokens, their verification, and revocation.
//!
//! Access tokens are RFC 9068 `at+jwt` JWTs signed with EdDSA (Ed25519). They name the subject
//! and how it authenticated (`amr`, `auth_time`), never its roles: the grants are read from the
//! directory on every request, so disabling an identity or removing a role assignment takes
//! effect at once. Verification pins the algorithm, requires `exp`, `nbf`, `iat`, `iss`, `aud`
//! and `sub` with their JSON types, and ignores every header field but `alg`, `typ` and `kid`.
//!
//! A token is a session of its subject and dies with it: it carries the subject's session
//! generation (`gen`), which every credential reset increments; a person's token names its
//! refresh family (`sid`), whose revocation ends it; a token obtained with a client certificate
//! is bound to it (RFC 8705 `cnf`), and only such a session may renew that certificate. Every
//! secret is checked behind the directory's one throttle ([`Directory::guarded`]).

use std::collections::HashMap;
use std::net::IpAddr;

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use twinguard_core::auth::{Credential, Principal, PrincipalKind};
use twinguard_core::identity::{Authenticated, Directory, LoginFailure, Refusal};
use twinguard_core::store::{Expect, Mutation, Store, StoreError, Table};
use twinguard_core::throttle::RetryAfter;
use zeroize::Zeroizing;

use crate::external::{
    ExternalCaller, ExternalIssuers, Rejected, unverified_claim, unverified_issuer,
};
use crate::metrics;
use crate::refresh::{Family, Redeemed, RefreshTokens};
use crate::signing_keys::{KeyRing, SharedRing};
use crate::vault::names;

/// The audience ADT clients ask for; twinguard accepts it as its own.
pub const ADT_AUDIENCE: &str = "https://digitaltwins.azure.net";
/// Lifetime of an access token issued to a workload.
pub const TOKEN_LIFETIME_SECS: u64 = 3_600;
/// Lifetime of an access token issued to a person; the refresh token renews it.
pub const USER_TOKEN_LIFETIME_SECS: u64 = 900;
/// Allowed clock difference when checking `exp`, `nbf` and `iat`.
pub const CLOCK_SKEW_SECS: u64 = 30;
/// Longest bearer token accepted; anything larger is refused unparsed.
pub const MAX_TOKEN_LEN: usize = 8_192;
/// Longest client assertion `jti` taken (it becomes a store key).
const MAX_JTI_LEN: usize = 256;
/// Verified tokens remembered at most.
const VERIFIED_CACHE_SIZE: usize = 16_384;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Claims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    /// The client the token was issued to (RFC 9068); for people, `twinguard-login`.
    client_id: String,
    /// Authentication methods (RFC 8176): `pwd`, `otp`, `mfa`.
    amr: Vec<String>,
    /// When the subject authenticated (seconds); refreshes keep it.
    auth_time: u64,
    /// The subject's session generation when it authenticated.
    #[serde(default, rename = "gen")]
    generation: u64,
    /// The refresh family a person's token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<String>,
    /// RFC 8705: the SHA-256 thumbprint of the client certificate the token was issued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cnf: Option<Confirmation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Confirmation {
    #[serde(rename = "x5t#S256")]
    x5t_s256: String,
}

/// A verified access token: who, how and when it authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub subject: String,
    pub mfa: bool,
    pub auth_time: u64,
    pub jti: String,
    pub exp: u64,
    /// The subject's session generation the token was issued in.
    pub generation: u64,
    /// The refresh family of a person's token.
    pub family: Option<String>,
    /// The token was issued for a client certificate (bound to its thumbprint).
    pub certificate: Option<String>,
    /// Set for an external issuer's token: the groups and roles its claims map to.
    pub external: Option<ExternalCaller>,
}

/// What the token endpoint hands out.
#[derive(Debug)]
pub struct Issued {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: Option<Zeroizing<String>>,
    /// The identity the token was issued to.
    pub subject: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unknown client or wrong secret; the two are not told apart.
    #[error("invalid client credentials")]
    InvalidClient,
    /// Unknown user, wrong password, missing or wrong code, disabled, or a bad refresh token;
    /// never told apart.
    #[error("invalid grant")]
    InvalidGrant,
    #[error("invalid or expired token")]
    InvalidToken,
    /// An external issuer's token signed with a key not fetched yet.
    #[error("unknown signing key")]
    UnknownKey,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing failed")]
    Signing,
    /// The directory could not check the credential now (store, or password checks at their
    /// cap); nothing was counted against the caller.
    #[error("temporarily unavailable")]
    Unavailable,
    /// Too many recent failures from this address or on this account; nothing was checked.
    #[error("too many failed attempts")]
    Throttled(RetryAfter),
}

pub struct TokenService {
    issuer: String,
    audiences: Vec<String>,
    keys: SharedRing,
    validation: Validation,
    directory: Arc<Directory>,
    verified: RwLock<HashMap<String, (Arc<Session>, u64)>>,
    /// Revoked access tokens by `jti`, with their expiry.
    revoked: RwLock<HashMap<String, u64>>,
    refresh: RefreshTokens,
    external: ExternalIssuers,
    /// This server's token endpoint URL, an audience client assertions may name.
    token_endpoint: RwLock<Option<String>>,
    /// `jti`s of client assertions already used, keyed `client \u{1f} jti`, until they expire
    /// (RFC 7523 3, replay); also in the store (`Table::UsedAssertions`).
    used_assertions: std::sync::Mutex<HashMap<String, u64>>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The identity ID (from the `urn:twinguard:identity:` URI SAN) and serial number (hex) of a
/// client certificate the TLS layer verified.
fn certificate_identity(der: &[u8]) -> Option<(String, String)> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let serial = hex::encode(cert.tbs_certificate.raw_serial());
    let san = cert.subject_alternative_name().ok()??;
    let id = san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => uri.strip_prefix(crate::ca::IDENTITY_URI_PREFIX),
        _ => None,
    })?;
    Some((id.to_owned(), serial))
}

/// RFC 8705 3.1: base64url SHA-256 of the certificate's DER.
fn thumbprint(der: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}

/// A refusal from the directory's throttle or check, as the token endpoint answers it.
fn refused(refusal: Refusal, wrong: TokenError) -> TokenError {
    match refusal {
        Refusal::Throttled(wait) => TokenError::Throttled(wait),
        Refusal::Failed(LoginFailure::Unavailable) => TokenError::Unavailable,
        Refusal::Failed(_) => wrong,
    }
}

pub use crate::signing_keys::KeysHome;

/// The key ring's name in messages.
const RING: &str = "token signing keys";

/// The `client_id` claim of tokens from a person's login.
const LOGIN_CLIENT: &str = "twinguard-login";

impl TokenService {
    /// `keys` sign and verify; the ring is saved to `keys_home` when it rotates.
    pub fn new(
        issuer: String,
        keys: KeyRing,
        keys_home: KeysHome,
        store: Arc<dyn Store>,
        directory: Arc<Directory>,
        external: ExternalIssuers,
    ) -> anyhow::Result<Self> {
        let audiences = vec![ADT_AUDIENCE.to_owned(), issuer.clone()];
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer.as_str()]);
        validation.set_audience(&audiences);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.leeway = CLOCK_SKEW_SECS;
        let now = now_secs();
        let mut revoked = HashMap::new();
        let mut expired = Vec::new();
        for (jti, bytes) in store.scan(Table::RevokedTokens)? {
            let exp: u64 = serde_json::from_slice(&bytes).unwrap_or(0);
            if exp + CLOCK_SKEW_SECS < now {
                expired.push(Mutation::delete(Table::RevokedTokens, jti));
            } else {
                revoked.insert(jti, exp);
            }
        }
        let mut used_assertions = HashMap::new();
        for (key, bytes) in store.scan(Table::UsedAssertions)? {
            let exp: u64 = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            if exp + CLOCK_SKEW_SECS < now {
                expired.push(Mutation::delete(Table::UsedAssertions, key));
            } else {
                used_assertions.insert(key, exp);
            }
        }
        store.commit(&expired)?;
        Ok(Self {
            issuer,
            audiences,
            keys: SharedRing::new(
                names::TOKEN_KEYS,
                RING,
                crate::signing_keys::TOKEN_KEYS,
                keys,
                keys_home,
            ),
            validation,
            refresh: RefreshTokens::open(store.clone())?,
            external,
            token_endpoint: RwLock::new(None),
            used_assertions: std::sync::Mutex::new(used_assertions),
            directory,
            verified: RwLock::new(HashMap::new()),
            revoked: RwLock::new(revoked),
            store,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    pub fn external(&self) -> &ExternalIssuers {
        &self.external
    }

    /// Verifies a bearer token of ours or of a trusted external issuer. An external token
    /// signed with a key not yet known makes the issuer's keys be fetched again (rate limited)
    /// and the token checked once more.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Session>, TokenError> {
        match self.verify_cached(token) {
            Err(TokenError::UnknownKey) => {
                if let Some(issuer) = unverified_issuer(token)
                    .as_deref()
                    .and_then(|iss| self.external.get(iss))
                {
                    issuer.refresh_for_unknown_kid().await;
                }
                match self.verify_cached(token) {
                    Err(TokenError::UnknownKey) => Err(TokenError::InvalidToken),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// The JSON Web Key Set (RFC 7517) of the keys that verify this server's tokens.
    pub fn jwks(&self) -> serde_json::Value {
        self.keys.read().map(|ring| ring.jwks()).unwrap_or_default()
    }

    /// Rotates the signing key when it is due (see [`crate::signing_keys`]) and saves the ring.
    pub fn rotate_keys_if_due(&self) -> anyhow::Result<()> {
        self.rotate_keys_at(now_secs())
    }

    /// [`TokenService::rotate_keys_if_due`] at `now` (Unix seconds). On a shared store the
    /// rotation is decided on the ring as stored and committed only over it: of nodes rotating
    /// at once, one publishes the successor and the others take its ring.
    pub fn rotate_keys_at(&self, now: u64) -> anyhow::Result<()> {
        self.keys.rotate_at(now).map(|_| ())
    }

    /// Runs `f` on the signing key ring (tests sign with the server's own key through it).
    #[doc(hidden)]
    pub fn with_key_ring<T>(&self, f: impl FnOnce(&KeyRing) -> T) -> T {
        match self.keys.read() {
            Ok(ring) => f(&ring),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// The client-credentials grant from `address`, subject to the failure backoff: while the
    /// address or the client must wait, no credential is checked at all.
    pub fn issue_for_client(
        &self,
        address: IpAddr,
        client_id: &str,
        client_secret: &str,
    ) -> Result<Issued, TokenError> {
        match self
            .directory
            .authenticate_client(address, client_id, client_secret)
        {
            Ok(who) => self.issue(&who, client_id, now_secs(), None, None),
            Err(refusal) => {
                if let Refusal::Failed(why) = refusal {
                    tracing::warn!(%address, reason = %why, "client authentication failed");
                    metrics::auth_failure(metrics::Method::ClientSecret);
                }
                Err(refused(refusal, TokenError::InvalidClient))
            }
        }
    }

    /// Deletes the used client-assertion `jti`s whose assertions have expired, whichever node
    /// recorded them (each node forgets its own as it goes, but not the others'). Returns how
    /// many. Blocking: a scan and a commit.
    pub fn forget_expired_assertions(&self) -> Result<usize, StoreError> {
        let now = now_secs();
        let expired: Vec<Mutation> = self
            .store
            .scan(Table::UsedAssertions)?
            .into_iter()
            .filter(|(_, bytes)| {
                let exp = std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(0);
                exp + CLOCK_SKEW_SECS < now
            })
            .map(|(key, _)| Mutation::delete(Table::UsedAssertions, key))
            .collect();
        if !expired.is_empty() {
            self.store.commit(&expired)?;
        }
        if let Ok(mut used) = self.used_assertions.lock() {
            used.retain(|_, e| *e + CLOCK_SKEW_SECS >= now);
        }
        Ok(expired.len())
    }

    /// Records the URL clients reach the token endpoint at (an accepted assertion audience).
    pub fn set_token_endpoint(&self, url: String) {
        if let Ok(mut endpoint) = self.token_endpoint.write() {
            *endpoint = Some(url);
        }
    }

    /// The client-credentials grant with `private_key_jwt` client authentication (RFC 7523
    /// section 2.2, OIDC Core 9): the client signs a short-lived assertion with a key whose
    /// public half it registered; no shared secret exists.
    pub fn issue_for_assertion(
        &self,
        address: IpAddr,
        client_id: Option<&str>,
        assertion: &str,
    ) -> Result<Issued, TokenError> {
        let claimed = unverified_claim(assertion, "sub").unwrap_or_default();
        let account = client_id.unwrap_or(&claimed).to_owned();
        let checked = self.directory.guarded(address, Some(&account), || {
            self.check_assertion(client_id, &claimed, assertion)
                .ok_or(LoginFailure::WrongSecret)
        });
        match checked {
            Ok(who) => self.issue(&who, &who.id.clone(), now_secs(), None, None),
            Err(refusal) => {
                if let Refusal::Failed(_) = refusal {
                    tracing::warn!(%address, client_id = %account.chars().take(64).collect::<String>(), "client assertion refused");
                    metrics::auth_failure(metrics::Method::ClientAssertion);
                }
                Err(refused(refusal, TokenError::InvalidClient))
            }
        }
    }

    /// The client-credentials grant for a workload that presented a client certificate of the
    /// instance CA in the TLS handshake (RFC 8705 section 2.1 style): the certificate must name
    /// `client_id` and be one recorded for it, unrevoked.
    pub fn issue_for_certificate(
        &self,
        address: IpAddr,
        client_id: &str,
        certificate: &[u8],
    ) -> Result<Issued, TokenError> {
        let who = self.directory.guarded(address, Some(client_id), || {
            certificate_identity(certificate)
                .filter(|(id, _)| id == client_id)
                .ok_or(LoginFailure::WrongSecret)
                .and_then(|(id, serial)| self.directory.authenticate_certificate(&id, &serial))
        });
        match who {
            Ok(who) => {
                let bound = Confirmation {
                    x5t_s256: thumbprint(certificate),
                };
                self.issue(&who, client_id, now_secs(), None, Some(bound))
            }
            Err(refusal) => {
                if let Refusal::Failed(why) = refusal {
                    tracing::warn!(%address, reason = %why, "client certificate authentication failed");
                    metrics::auth_failure(metrics::Method::ClientCertificate);
                }
                Err(refused(refusal, TokenError::InvalidClient))
            }
        }
    }

    fn check_assertion(
        &self,
        client_id: Option<&str>,
        claimed: &str,
        assertion: &str,
    ) -> Option<Authenticated> {
        if assertion.len() > MAX_TOKEN_LEN || client_id.is_some_and(|c| c != claimed) {
            return None;
        }
        let (jwks, _) = self.directory.client_keys(claimed)?;
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).ok()?;
        let header = jsonwebtoken::decode_header(assertion).ok()?;
        let jwk = set.find(header.kid.as_deref()?)?;
        let allowed = [
            Algorithm::EdDSA,
            Algorithm::ES256,
            Algorithm::RS256,
            Algorithm::PS256,
        ];
        let alg = crate::external::key_algorithm(jwk, &allowed)?;
        if alg != header.alg {
            return None;
        }
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).ok()?;
        let mut audiences = vec![self.issuer.clone()];
        if let Ok(Some(endpoint)) = self.token_endpoint.read().map(|e| e.clone()) {
            audiences.push(endpoint);
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[claimed]);
        validation.sub = Some(claimed.to_owned());
        validation.set_audience(&audiences);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.leeway = CLOCK_SKEW_SECS;
        let claims = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &validation)
            .ok()?
            .claims;
        let now = now_secs();
        let exp = claims.get("exp")?.as_u64()?;
        // Assertions are single-use and short-lived: at most five minutes ahead.
        if exp > now + 300 + CLOCK_SKEW_SECS {
            return None;
        }
        let jti = claims.get("jti")?.as_str()?;
        if jti.is_empty() || jti.len() > MAX_JTI_LEN {
            return None;
        }
        // Per client: one client's `jti` cannot use up another's.
        let key = format!("{claimed}\u{1f}{jti}");
        {
            let mut used = self.used_assertions.lock().ok()?;
            if used.contains_key(&key) {
                return None;
            }
            let mut batch = vec![Mutation::put(
                Table::UsedAssertions,
                key.clone(),
                exp.to_string().into_bytes(),
            )];
            let expired: Vec<String> = used
                .iter()
                .filter(|(_, e)| **e + CLOCK_SKEW_SECS < now)
                .map(|(k, _)| k.clone())
                .collect();
            batch.extend(
                expired
                    .iter()
                    .map(|k| Mutation::delete(Table::UsedAssertions, k.clone())),
            );
            // Recorded durably, and only if no node recorded it first (on a shared store the
            // writer checks the record is still absent): single use across restarts and nodes.
            let recorded = self
                .store
                .commit_expecting(
                    &batch,
                    &[Expect {
                        table: Table::UsedAssertions,
                        key: key.clone(),
                        value: None,
                    }],
                )
                .map_err(|e| tracing::error!(error = %e, "cannot record a client assertion's jti"))
                .ok()?;
            for k in &expired {
                used.remove(k);
            }
            if !recorded {
                tracing::warn!(
                    client = claimed,
                    "a client assertion's jti was already used on another node"
                );
                return None;
            }
            used.insert(key, exp);
        }
        self.directory.workload(claimed)
    }

    /// A person's login with password and, when enrolled, a one-time code. Runs argon2: call
    /// it off the async runtime.
    pub fn issue_for_user(
        &self,
        address: IpAddr,
        username: &str,
        password: &str,
        code: Option<&str>,
    ) -> Result<Issued, TokenError> {
        match self
            .directory
            .authenticate_user(address, username, password, code)
        {
            Ok(who) => {
                let now = now_secs();
                let refresh = self.refresh.issue(Family {
                    subject: who.id.clone(),
                    mfa: who.mfa,
                    auth_time: now,
                    generation: who.generation,
                    continues: None,
                })?;
                self.issue(&who, LOGIN_CLIENT, now, Some(refresh), None)
            }
            Err(refusal) => {
                if let Refusal::Failed(why) = refusal {
                    tracing::warn!(%address, reason = %why, "login failed");
                    metrics::auth_failure(metrics::Method::Password);
                }
                Err(refused(refusal, TokenError::InvalidGrant))
            }
        }
    }

    /// The refresh-token grant: the token is spent and a new one of the same family issued.
    /// Presenting a spent token again revokes its whole family (someone copied it).
    /// Refresh tokens are 256-bit random values, so a wrong one is no guess worth counting
    /// per account, but it is counted against the address like every other failed secret.
    pub fn refresh(&self, address: IpAddr, token: &str) -> Result<Issued, TokenError> {
        let redeemed = self.directory.guarded(address, None, || {
            match self.refresh.redeem(token) {
                Ok(Redeemed::Valid(r)) => Ok(r),
                Ok(Redeemed::Reused { subject }) => {
                    tracing::warn!(%address, %subject, "a spent refresh token was presented again; its family is revoked");
                    Err(LoginFailure::WrongSecret)
                }
                Ok(Redeemed::Invalid) => {
                    tracing::warn!(%address, "invalid refresh token");
                    Err(LoginFailure::WrongSecret)
                }
                Err(e) => {
                    tracing::error!(error = %e, "refresh token store failed");
                    Err(LoginFailure::Unavailable)
                }
            }
        });
        let redeemed = match redeemed {
            Ok(r) => r,
            Err(refusal) => {
                if let Refusal::Failed(LoginFailure::WrongSecret) = refusal {
                    metrics::auth_failure(metrics::Method::RefreshToken);
                }
                return Err(refused(refusal, TokenError::InvalidGrant));
            }
        };
        // A family of an earlier generation (the password or MFA was reset since) is dead.
        let Some(principal) = self.directory.principal(
            &redeemed.subject,
            redeemed.mfa,
            redeemed.auth_time,
            redeemed.generation,
        ) else {
            return Err(TokenError::InvalidGrant);
        };
        let who = Authenticated {
            id: redeemed.subject.clone(),
            kind: principal.kind,
            mfa: redeemed.mfa,
            generation: redeemed.generation,
        };
        let next = self.refresh.issue(Family {
            subject: redeemed.subject.clone(),
            mfa: redeemed.mfa,
            auth_time: redeemed.auth_time,
            generation: redeemed.generation,
            continues: Some((redeemed.family, redeemed.family_expires)),
        })?;
        self.issue(&who, LOGIN_CLIENT, redeemed.auth_time, Some(next), None)
    }

    fn issue(
        &self,
        who: &Authenticated,
        client_id: &str,
        auth_time: u64,
        refresh: Option<crate::refresh::IssuedRefresh>,
        cnf: Option<Confirmation>,
    ) -> Result<Issued, TokenError> {
        let now = now_secs();
        let lifetime = if who.kind == PrincipalKind::User {
            USER_TOKEN_LIFETIME_SECS
        } else {
            TOKEN_LIFETIME_SECS
        };
        let amr = match (who.kind, who.mfa) {
            (PrincipalKind::User, true) => vec!["pwd", "otp", "mfa"],
            (PrincipalKind::User, false) => vec!["pwd"],
            _ => vec![],
        };
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: who.id.clone(),
            aud: self.audiences.clone(),
            exp: now + lifetime,
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            client_id: client_id.to_owned(),
            amr: amr.into_iter().map(str::to_owned).collect(),
            auth_time,
            generation: who.generation,
            sid: refresh.as_ref().map(|r| r.family.clone()),
            cnf,
        };
        let ring = self.keys.read().map_err(|_| TokenError::Signing)?;
        let key = ring.active(now);
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some("at+jwt".into());
        header.kid = Some(key.kid.clone());
        let access_token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|_| TokenError::Signing)?;
        Ok(Issued {
            access_token,
            expires_in: lifetime,
            refresh_token: refresh.map(|r| r.token),
            subject: who.id.clone(),
        })
    }

    /// RFC 7009 revocation. A refresh token revokes its family; an access token of ours is
    /// refused from now until it expires. Anything else is ignored, as the RFC asks.
    pub fn revoke(&self, token: &str) -> Result<(), TokenError> {
        if self.refresh.revoke(token)? {
            return Ok(());
        }
        let Ok(session) = self.verify(token) else {
            return Ok(());
        };
        // Revoking a token already revoked costs nothing (the endpoint is unauthenticated).
        if self.is_revoked(&session.jti) {
            return Ok(());
        }
        self.store.commit(&[Mutation::put(
            Table::RevokedTokens,
            session.jti.clone(),
            session.exp.to_string().into_bytes(),
        )])?;
        if let Ok(mut revoked) = self.revoked.write() {
            let now = now_secs();
            revoked.retain(|_, exp| *exp + CLOCK_SKEW_SECS >= now);
            revoked.insert(session.jti, session.exp);
        }
        if let Ok(mut cache) = self.verified.write() {
            cache.remove(token);
        }
        Ok(())
    }

    fn is_revoked(&self, jti: &str) -> bool {
        self.revoked
            .read()
            .map(|r| !r.is_empty() && r.contains_key(jti))
            .unwrap_or(true)
    }

    /// The caller a verified session stands for now, or `None` if it may no longer act: its
    /// identity was deleted or disabled, a credential of it was reset since the session began
    /// (another generation), or the session's refresh family is no longer live (revoked or
    /// expired).
    ///
    /// A session bound to a client certificate counts as a certificate session only on a
    /// request that presents that certificate in its TLS handshake (`peer_certificate`, DER):
    /// proof of possession, as RFC 8705 binds tokens, so a stolen bearer token alone cannot
    /// renew the certificate.
    pub fn principal(
        &self,
        session: &Session,
        peer_certificate: Option<&[u8]>,
    ) -> Option<Principal> {
        match &session.external {
            None => {
                if session
                    .family
                    .as_deref()
                    .is_some_and(|f| !self.refresh.family_live(f))
                {
                    return None;
                }
                let possessed = session
                    .certificate
                    .as_deref()
                    .zip(peer_certificate)
                    .is_some_and(|(bound, der)| bound == thumbprint(der));
                let credential = if possessed {
                    Credential::CertificateToken
                } else {
                    Credential::Token
                };
                self.directory
                    .principal(
                        &session.subject,
                        session.mfa,
                        session.auth_time,
                        session.generation,
                    )
                    .map(|p| p.presented(credential))
            }
            Some(ext) => Some(self.directory.external_principal(
                &ext.subject,
                ext.application,
                &ext.group_ids,
                &ext.role_ids,
                ext.mfa,
                ext.auth_time,
            )),
        }
    }

    /// [`TokenService::verify`] with a cache of recently verified tokens, so a client that
    /// reuses its token pays for the signature check once. Entries expire with their token.
    pub fn verify_cached(&self, token: &str) -> Result<Arc<Session>, TokenError> {
        let now = now_secs();
        if let Ok(cache) = self.verified.read()
            && let Some((session, exp)) = cache.get(token)
            && now < exp + CLOCK_SKEW_SECS
        {
            if self.is_revoked(&session.jti) {
                return Err(TokenError::InvalidToken);
            }
            return Ok(session.clone());
        }
        let session = Arc::new(self.verify_any(token)?);
        if self.is_revoked(&session.jti) {
            return Err(TokenError::InvalidToken);
        }
        if let Ok(mut cache) = self.verified.write() {
            if cache.len() >= VERIFIED_CACHE_SIZE {
                cache.retain(|_, (_, e)| now < *e);
                if cache.len() >= VERIFIED_CACHE_SIZE {
                    cache.clear();
                }
            }
            cache.insert(token.to_owned(), (session.clone(), session.exp));
        }
        Ok(session)
    }

    /// Chooses the verifier by the token's claimed issuer: ours, or a configured external one.
    fn verify_any(&self, token: &str) -> Result<Session, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::InvalidToken);
        }
        let claimed = unverified_issuer(token);
        let external = claimed
            .as_deref()
            .filter(|iss| *iss != self.issuer)
            .and_then(|iss| self.external.get(iss));
        let Some(issuer) = external else {
            return self.verify(token);
        };
        match issuer.verify(token) {
            Ok(caller) => Ok(Session {
                subject: caller.subject.clone(),
                mfa: caller.mfa,
                auth_time: caller.auth_time,
                // External tokens are revoked at their issuer; the signature stands in for an ID.
                jti: token.rsplit('.').next().unwrap_or_default().to_owned(),
                exp: caller.exp,
                generation: 0,
                family: None,
                certificate: None,
                external: Some(caller),
            }),
            Err(Rejected::UnknownKey) => Err(TokenError::UnknownKey),
            Err(Rejected::Invalid) => Err(TokenError::InvalidToken),
        }
    }

    /// Verifies a bearer token of ours: signature and claims.
    pub fn verify(&self, token: &str) -> Result<Session, TokenError> {
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
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation)
            .map_err(|_| TokenError::InvalidToken)?
            .claims;
        if claims.iat > now_secs() + CLOCK_SKEW_SECS || claims.auth_time > claims.iat {
            return Err(TokenError::InvalidToken);
        }
        Ok(Session {
            mfa: claims.amr.iter().any(|m| m == "mfa"),
            subject: claims.sub,
            auth_time: claims.auth_time,
            jti: claims.jti,
            exp: claims.exp,
            generation: claims.generation,
            family: claims.sid,
            certificate: claims.cnf.map(|c| c.x5t_s256),
            external: None,
        })
    }
}

/// Revocations and refresh families as other nodes sharing the store change them (see
/// `twinguard_core::follow`): a token revoked on one node is refused on this one once its ID
/// is read.
impl twinguard_core::follow::Follower for TokenService {
    fn follows(&self, table: Table) -> bool {
        matches!(
            table,
            Table::RevokedTokens | Table::RefreshTokens | Table::Secrets
        )
    }

    /// Revocations only ever grow until they expire (which each node forgets by itself), so
    /// a revocation read is added and an absent one changes nothing: a read that raced this
    /// node's own revocation cannot undo it.
    fn changed(&self, table: Table, keys: &[String]) -> Result<Vec<String>, StoreError> {
        if table == Table::RefreshTokens {
            return self.refresh.changed(keys);
        }
        if table == Table::Secrets {
            if keys.iter().any(|k| k == names::TOKEN_KEYS) {
                self.keys.reload()?;
            }
            return Ok(Vec::new());
        }
        let stored = self.store.get_many(Table::RevokedTokens, keys)?;
        let mut revoked = self
            .revoked
            .write()
            .map_err(|_| StoreError("the revocation list is poisoned".into()))?;
        for (jti, bytes) in keys.iter().zip(stored) {
            if let Some(bytes) = bytes {
                // Unreadable expiry: kept revoked for as long as any token lives.
                let exp = serde_json::from_slice(&bytes).unwrap_or(u64::MAX / 2);
                revoked.insert(jti.clone(), exp);
            }
        }
        Ok(Vec::new())
    }

    fn reload(&self) -> Result<Vec<(Table, String)>, StoreError> {
        self.refresh.reload()?;
        self.keys.reload()?;
        let stored: HashMap<String, u64> = self
            .store
            .scan(Table::RevokedTokens)?
            .into_iter()
            .map(|(jti, bytes)| (jti, serde_json::from_slice(&bytes).unwrap_or(u64::MAX / 2)))
            .collect();
        let mut revoked = self
            .revoked
            .write()
            .map_err(|_| StoreError("the revocation list is poisoned".into()))?;
        revoked.extend(stored);
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;
    use twinguard_core::clock::SystemClock;

    use twinguard_core::follow::ChangeFollower;

    use crate::vault::Vault;
    use twinguard_core::store::MemoryStore;

    use super::*;

    /// Token services of nodes sharing `store` and one signing key ring (as copied from the
    /// first node's data directory), each with a directory of its own.
    struct Nodes {
        store: Arc<MemoryStore>,
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl Nodes {
        fn new(store: &Arc<MemoryStore>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("token-keys.json");
            KeyRing::generate(now_secs()).unwrap().save(&path).unwrap();
            Self {
                store: store.clone(),
                _dir: dir,
                path,
            }
        }

        /// A node as a server builds one: its identity records go through its own twin
        /// writer's door, which checks expectations against the shared store.
        fn node(&self) -> TokenService {
            use twinguard_core::service::{OwnerStore, TwinService};
            use twinguard_core::store::Owner;
            let twins = TwinService::open(self.store.clone(), Arc::new(SystemClock)).unwrap();
            let owned = OwnerStore::new(Owner::Identity, self.store.clone());
            owned.connect(twins.door(Owner::Identity));
            let store: Arc<dyn Store> = Arc::new(owned);
            let directory =
                Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
            TokenService::new(
                "https://twinguard.test".into(),
                KeyRing::load(&self.path).unwrap(),
                KeysHome::File(self.path.clone()),
                store,
                directory,
                ExternalIssuers::default(),
            )
            .unwrap()
        }
    }

    /// A node whose signing keys are sealed in the shared store, as a server on PostgreSQL
    /// keeps them (`startup::init`): the ring is the store's, made by the first node.
    fn sealed_node(store: &Arc<MemoryStore>) -> TokenService {
        use twinguard_core::service::{OwnerStore, TwinService};
        use twinguard_core::store::Owner;
        let twins = TwinService::open(store.clone(), Arc::new(SystemClock)).unwrap();
        let owned = OwnerStore::new(Owner::Identity, store.clone());
        owned.connect(twins.door(Owner::Identity));
        let owned: Arc<dyn Store> = Arc::new(owned);
        let vault = Arc::new(Vault::new(
            crate::vault::Kek::new(&[4; 32]).unwrap(),
            owned.clone(),
        ));
        let ring = vault
            .get_or_store(names::TOKEN_KEYS, RING, None, || {
                KeyRing::generate(now_secs())?.to_json()
            })
            .unwrap();
        let directory = Arc::new(Directory::open(owned.clone(), Arc::new(SystemClock)).unwrap());
        TokenService::new(
            "https://twinguard.test".into(),
            KeyRing::from_json(&ring).unwrap(),
            KeysHome::Sealed(vault),
            owned,
            directory,
            ExternalIssuers::default(),
        )
        .unwrap()
    }

    const DAY: u64 = 24 * 3_600;

    /// The signing keys rotate once for every node: node A rotates, and node B publishes and
    /// verifies with A's new key at its next follow step; with each node's ring its own (as
    /// in a data directory of its own), B would refuse every token A signs after the switch.
    #[test]
    fn a_rotation_on_one_node_is_every_nodes() {
        let store = Arc::new(MemoryStore::shared());
        let follower = ChangeFollower::start(store.clone()).unwrap().unwrap();
        let a = Arc::new(sealed_node(&store));
        let b = Arc::new(sealed_node(&store));
        let c = sealed_node(&store);
        follower.register(b.clone());
        assert_eq!(a.jwks(), b.jwks(), "one ring");

        let due = now_secs() + 31 * DAY;
        a.rotate_keys_at(due).unwrap();
        let kids = |node: &TokenService| node.with_key_ring(|r| r.kids().join(" "));
        assert_eq!(kids(&a).split(' ').count(), 2, "the successor is published");
        assert_ne!(kids(&a), kids(&b));
        follower.step().unwrap();
        assert_eq!(kids(&b), kids(&a), "B follows A's rotation");
        assert_eq!(a.jwks(), b.jwks());
        let switched = due + crate::signing_keys::PUBLISH_LEAD_SECS;
        let signer = |node: &TokenService| node.with_key_ring(|r| r.active(switched).kid.clone());
        assert_eq!(signer(&a), signer(&b), "both sign with the successor");

        // C, due too and never told, decides on the stored ring: no second successor.
        assert_ne!(kids(&c), kids(&a));
        c.rotate_keys_at(due + 60).unwrap();
        assert_eq!(kids(&c), kids(&a));
    }

    /// Of nodes rotating at the same instant, one publishes the successor and every node ends
    /// with its ring (the rotation commits only over the ring it started from).
    #[test]
    fn nodes_rotating_at_once_publish_one_successor() {
        for _ in 0..20 {
            let store = Arc::new(MemoryStore::shared());
            let nodes: Vec<Arc<TokenService>> =
                (0..3).map(|_| Arc::new(sealed_node(&store))).collect();
            let due = now_secs() + 31 * DAY;
            let barrier = Arc::new(std::sync::Barrier::new(nodes.len()));
            let rotations: Vec<_> = nodes
                .iter()
                .map(|node| {
                    let (node, barrier) = (node.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        node.rotate_keys_at(due).unwrap();
                    })
                })
                .collect();
            for rotation in rotations {
                rotation.join().unwrap();
            }
            let stored = store.get_many(Table::Secrets, &[names::TOKEN_KEYS.into()]);
            let kek = crate::vault::Kek::new(&[4; 32]).unwrap();
            let ring = KeyRing::from_json(
                &kek.open(names::TOKEN_KEYS, &stored.unwrap()[0].clone().unwrap())
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(ring.kids().len(), 2, "one successor");
            for node in &nodes {
                assert_eq!(node.jwks(), ring.jwks(), "every node holds the stored ring");
            }
        }
    }

    /// Two nodes on one shared store, each with its own directory and revocation list: an
    /// access token revoked on node A is refused on node B at B's next follow step, and so is
    /// a token of an identity disabled on A.
    #[test]
    fn a_token_revoked_or_an_identity_disabled_on_one_node_is_refused_on_the_other() {
        let store = Arc::new(MemoryStore::shared());
        let follower = ChangeFollower::start(store.clone()).unwrap().unwrap();
        let nodes = Nodes::new(&store);
        let node = || Arc::new(nodes.node());
        let a = node();
        let (id, secret) = Directory::new_admin_credential();
        a.directory().bootstrap_admin(&id, &secret).unwrap();
        let b = node();
        follower.register(b.directory().clone());
        follower.register(b.clone());
        follower.step().unwrap();
        let local = IpAddr::from([127, 0, 0, 1]);
        let on_b = |token: &str| {
            b.verify_cached(token)
                .ok()
                .and_then(|session| b.principal(&session, None))
                .is_some()
        };
        let first = a
            .issue_for_client(local, &id, &secret)
            .unwrap()
            .access_token;
        let second = a
            .issue_for_client(local, &id, &secret)
            .unwrap()
            .access_token;
        assert!(on_b(&first) && on_b(&second));
        a.revoke(&first).unwrap();
        assert!(on_b(&first), "until B follows");
        follower.step().unwrap();
        assert!(!on_b(&first), "revoked on A");
        assert!(on_b(&second));
        let admin = a.directory().principal(&id, false, 0, 0).unwrap();
        let disable = twinguard_core::identity::IdentityPatch {
            disabled: Some(true),
            ..Default::default()
        };
        a.directory().update_identity(&admin, &id, disable).unwrap();
        follower.step().unwrap();
        assert!(!on_b(&second), "its identity disabled on A");
    }

    /// A client assertion is single-use across nodes and restarts: presented to two nodes at
    /// once, one issues a token and the other refuses it; presented again after a restart, it
    /// is refused. (Its `jti` was kept in each node's memory only: a second node, or the same
    /// node after a restart, took it again.)
    #[test]
    fn a_client_assertion_is_used_once_across_nodes_and_restarts() {
        let store = Arc::new(MemoryStore::shared());
        let nodes = Nodes::new(&store);
        let node = || nodes.node();
        let a = node();
        let (admin_id, secret) = Directory::new_admin_credential();
        a.directory().bootstrap_admin(&admin_id, &secret).unwrap();
        let admin = a.directory().principal(&admin_id, false, 0, 0).unwrap();
        let new = twinguard_core::identity::NewIdentity {
            kind: twinguard_core::identity::IdentityKind::ServiceAccount,
            name: "valve".into(),
            display_name: None,
            groups: vec![],
            password: None,
        };
        let valve = a.directory().create_identity(&admin, new).unwrap().0.id;
        let signer = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            signer.public_key_raw(),
        );
        let jwks =
            serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "v1", "x": x}]});
        a.directory().set_client_keys(&admin, &valve, jwks).unwrap();
        let b = node();
        let local = IpAddr::from([127, 0, 0, 1]);
        let key = jsonwebtoken::EncodingKey::from_ed_der(&signer.serialize_der());
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some("v1".into());
        for round in 0..20 {
            let now = now_secs();
            let claims = serde_json::json!({"iss": valve, "sub": valve,
                "aud": "https://twinguard.test", "exp": now + 60, "jti": format!("j-{round}")});
            let assertion = jsonwebtoken::encode(&header, &claims, &key).unwrap();
            let barrier = std::sync::Barrier::new(2);
            let present = |node: &TokenService| {
                barrier.wait();
                node.issue_for_assertion(local, None, &assertion).is_ok()
            };
            let issued = std::thread::scope(|s| {
                let on_a = s.spawn(|| present(&a));
                let on_b = s.spawn(|| present(&b));
                [on_a.join().unwrap(), on_b.join().unwrap()]
            });
            assert_eq!(
                issued.iter().filter(|ok| **ok).count(),
                1,
                "round {round}: {issued:?}"
            );
            if round == 0 {
                let restarted = node();
                assert!(
                    restarted
                        .issue_for_assertion(local, None, &assertion)
                        .is_err(),
                    "after a restart"
                );
            }
        }
    }

    /// The used `jti`s of expired assertions are deleted whichever node recorded them; those
    /// of live assertions stay.
    #[test]
    fn expired_assertion_ids_are_deleted_whoever_recorded_them() {
        let store = Arc::new(MemoryStore::shared());
        let nodes = Nodes::new(&store);
        let node = nodes.node();
        let live = (now_secs() + 300).to_string().into_bytes();
        store
            .commit(&[
                Mutation::put(Table::UsedAssertions, "a\u{1f}old", b"1".to_vec()),
                Mutation::put(Table::UsedAssertions, "b\u{1f}live", live),
            ])
            .unwrap();
        assert_eq!(node.forget_expired_assertions().unwrap(), 1);
        let left: Vec<String> = store
            .scan(Table::UsedAssertions)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, vec!["b\u{1f}live".to_owned()]);
    }
}
