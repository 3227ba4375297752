//! The token signing keys and their rotation (control AC-2).
//!
//! Keys are Ed25519. A new key is published in the JWKS [`PUBLISH_LEAD_SECS`] before it starts
//! signing, so verifiers that cache the JWKS know it before they meet it; the key it replaces
//! keeps verifying until every token it signed has expired, then leaves the set. The active key
//! is rotated after [`ROTATE_AFTER_SECS`]. The ring lives in `DIR/secrets/token-keys.json` (0600),
//! or, on a store several nodes share, sealed in the store (`crate::vault`).
//! Times are Unix seconds passed in by the caller, so tests control them.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, EncodingKey};
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::datadir::write_private;
use crate::tokens::{CLOCK_SKEW_SECS, TOKEN_LIFETIME_SECS};

/// Age after which the signing key is replaced.
pub const ROTATE_AFTER_SECS: u64 = 30 * 24 * 3_600;
/// How long a new key is published before it signs (well above the JWKS cache lifetime).
pub const PUBLISH_LEAD_SECS: u64 = 3_600;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredKey {
    kid: String,
    created_at: u64,
    activates_at: u64,
    pkcs8_pem: Zeroizing<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredRing {
    version: u32,
    keys: Vec<StoredKey>,
}

pub struct SigningKey {
    pub kid: String,
    pub created_at: u64,
    pub activates_at: u64,
    pkcs8_pem: Zeroizing<String>,
    public_x: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("activates_at", &self.activates_at)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    fn from_pem(
        pem: Zeroizing<String>,
        created_at: u64,
        activates_at: u64,
    ) -> anyhow::Result<Self> {
        let pair = KeyPair::from_pem(&pem)?;
        let raw = pair.public_key_raw();
        let public_x = URL_SAFE_NO_PAD.encode(raw);
        let kid = Sha256::digest(raw)
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            kid,
            created_at,
            activates_at,
            encoding: EncodingKey::from_ed_der(&pair.serialize_der()),
            decoding: DecodingKey::from_ed_components(&public_x)?,
            public_x,
            pkcs8_pem: pem,
        })
    }

    fn generate(now: u64, activates_at: u64) -> anyhow::Result<Self> {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        Self::from_pem(Zeroizing::new(pair.serialize_pem()), now, activates_at)
    }
}

/// The signing keys, ordered by activation time.
#[derive(Debug)]
pub struct KeyRing {
    keys: Vec<SigningKey>,
}

impl KeyRing {
    /// A ring with one key, active at once.
    pub fn generate(now: u64) -> anyhow::Result<Self> {
        Ok(Self {
            keys: vec![SigningKey::generate(now, now)?],
        })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Self::from_json(&Zeroizing::new(std::fs::read(path)?))
    }

    /// The ring from its stored form (the file, or the shared store's sealed record).
    pub fn from_json(bytes: &[u8]) -> anyhow::Result<Self> {
        let stored: StoredRing = serde_json::from_slice(bytes)?;
        anyhow::ensure!(
            stored.version == 1,
            "unsupported key ring version {}",
            stored.version
        );
        let mut keys = stored
            .keys
            .into_iter()
            .map(|k| SigningKey::from_pem(k.pkcs8_pem, k.created_at, k.activates_at))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!keys.is_empty(), "the key ring is empty");
        keys.sort_by_key(|k| k.activates_at);
        Ok(Self { keys })
    }

    /// The ring's stored form.
    pub fn to_json(&self) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        let stored = StoredRing {
            version: 1,
            keys: self
                .keys
                .iter()
                .map(|k| StoredKey {
                    kid: k.kid.clone(),
                    created_at: k.created_at,
                    activates_at: k.activates_at,
                    pkcs8_pem: k.pkcs8_pem.clone(),
                })
                .collect(),
        };
        Ok(Zeroizing::new(serde_json::to_vec_pretty(&stored)?))
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_private(path, self.to_json()?.as_slice())
    }

    /// The key that signs at `now`: the newest one already active (the first key otherwise).
    pub fn active(&self, now: u64) -> &SigningKey {
        let mut active = &self.keys[0];
        for key in &self.keys {
            if key.activates_at <= now {
                active = key;
            }
        }
        active
    }

    /// A key by ID, for verification; `kid` only ever selects among these keys.
    pub fn get(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// Every key in the ring as a JSON Web Key Set (RFC 7517, RFC 8037).
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "x": k.public_x,
                    "kid": k.kid, "alg": "EdDSA", "use": "sig",
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// Publishes a successor when the active key is due and none is pending, and drops keys
    /// whose tokens have all expired. Returns whether the ring changed.
    pub fn rotate_if_due(&mut self, now: u64) -> anyhow::Result<bool> {
        let mut changed = false;
        let active_since = self.active(now).activates_at;
        let pending = self.keys.iter().any(|k| k.activates_at > now);
        if !pending && now.saturating_sub(active_since) >= ROTATE_AFTER_SECS {
            self.keys
                .push(SigningKey::generate(now, now + PUBLISH_LEAD_SECS)?);
            changed = true;
        }
        // A key is retired once its successor has signed for longer than a token lives.
        let retire_before = now.saturating_sub(TOKEN_LIFETIME_SECS + CLOCK_SKEW_SECS);
        let successors: Vec<u64> = self.keys.iter().skip(1).map(|k| k.activates_at).collect();
        let before = self.keys.len();
        let mut index = 0;
        self.keys.retain(|_| {
            let keep = successors
                .get(index)
                .is_none_or(|next| *next > retire_before);
            index += 1;
            keep
        });
        Ok(changed || self.keys.len() != before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3_600;

    #[test]
    fn a_new_key_is_published_before_it_signs_and_the_old_one_verifies_until_its_tokens_expire() {
        let t0 = 1_800_000_000;
        let mut ring = KeyRing::generate(t0).unwrap();
        let first = ring.active(t0).kid.clone();
        assert!(
            !ring.rotate_if_due(t0 + DAY).unwrap(),
            "a young key is kept"
        );

        let due = t0 + 31 * DAY;
        assert!(ring.rotate_if_due(due).unwrap());
        assert_eq!(ring.kids().len(), 2, "the successor is published");
        assert_eq!(ring.active(due).kid, first, "but does not sign yet");
        let second = ring.kids()[1].to_owned();

        let switched = due + PUBLISH_LEAD_SECS;
        assert_eq!(ring.active(switched).kid, second);
        assert!(!ring.rotate_if_due(switched).unwrap());
        assert!(
            ring.get(&first).is_some(),
            "tokens of the first key are still valid"
        );

        let all_expired = switched + TOKEN_LIFETIME_SECS + CLOCK_SKEW_SECS + 1;
        assert!(ring.rotate_if_due(all_expired).unwrap());
        assert_eq!(ring.kids(), [second.as_str()]);
    }

    #[test]
    fn the_ring_survives_a_save_and_load_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token-keys.json");
        let mut ring = KeyRing::generate(1_800_000_000).unwrap();
        ring.rotate_if_due(1_800_000_000 + 31 * DAY).unwrap();
        ring.save(&path).unwrap();
        let loaded = KeyRing::load(&path).unwrap();
        assert_eq!(loaded.kids(), ring.kids());
        assert_eq!(loaded.jwks(), ring.jwks());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
