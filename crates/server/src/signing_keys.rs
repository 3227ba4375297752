//! Signing key rings and their rotation: the token signing keys (control AC-2) and the event
//! key (`crate::events`).
//!
//! Keys are Ed25519. A new key is published in the JWKS [`PUBLISH_LEAD_SECS`] before it starts
//! signing, so verifiers that cache the JWKS know it before they meet it; the key it replaces
//! keeps verifying for as long as the ring's [`Policy`] says (for tokens, until every token it
//! signed has expired), then leaves the set. The active key is rotated after
//! [`ROTATE_AFTER_SECS`]. A ring lives in a file of `DIR/secrets/` (0600), or, on a store
//! several nodes share, sealed in the store (`crate::vault`), where a rotation on one node is
//! every node's ([`SharedRing`]). Times are Unix seconds passed in by the caller, so tests
//! control them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LockResult, Mutex, RwLock, RwLockReadGuard};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, EncodingKey};
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use twinguard_core::store::StoreError;

use crate::datadir::write_private;
use crate::tokens::{CLOCK_SKEW_SECS, TOKEN_LIFETIME_SECS};
use crate::vault::Vault;

/// Age after which the signing key is replaced.
pub const ROTATE_AFTER_SECS: u64 = 30 * 24 * 3_600;
/// How long a new key is published before it signs (well above the JWKS cache lifetime).
pub const PUBLISH_LEAD_SECS: u64 = 3_600;

/// How long a ring keeps a replaced key: for as long after its successor began to sign as
/// anything it signed may still be verified.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub keep_after_successor_secs: u64,
}

/// Event keys verify for as long as an event signed before the successor may still be
/// delivered (an endpoint's `maxAgeSeconds` is at most seven days), and an hour more.
pub const EVENT_KEYS: Policy = Policy {
    keep_after_successor_secs: 7 * 86_400 + PUBLISH_LEAD_SECS,
};

/// Token keys verify until every token they signed has expired.
pub const TOKEN_KEYS: Policy = Policy {
    keep_after_successor_secs: TOKEN_LIFETIME_SECS + CLOCK_SKEW_SECS,
};

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
    /// The key in `pem` (PKCS #8), named `kid`, or by the first eight bytes of its public key's
    /// SHA-256 without one.
    fn from_pem(
        pem: Zeroizing<String>,
        kid: Option<String>,
        created_at: u64,
        activates_at: u64,
    ) -> anyhow::Result<Self> {
        let pair = KeyPair::from_pem(&pem)?;
        let raw = pair.public_key_raw();
        let public_x = URL_SAFE_NO_PAD.encode(raw);
        let kid = kid.unwrap_or_else(|| hex::encode(&Sha256::digest(raw)[..8]));
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
        Self::from_pem(
            Zeroizing::new(pair.serialize_pem()),
            None,
            now,
            activates_at,
        )
    }

    /// The private key, PKCS #8 DER.
    pub fn pkcs8_der(&self) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        Ok(Zeroizing::new(
            KeyPair::from_pem(&self.pkcs8_pem)?.serialize_der(),
        ))
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

    /// A ring of the one key in `pem` (PKCS #8), named `kid`, active since `now`: how a key
    /// kept alone before its ring becomes one.
    pub fn of_one(pem: Zeroizing<String>, kid: String, now: u64) -> anyhow::Result<Self> {
        Ok(Self {
            keys: vec![SigningKey::from_pem(pem, Some(kid), now, now)?],
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
            .map(|k| SigningKey::from_pem(k.pkcs8_pem, Some(k.kid), k.created_at, k.activates_at))
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

    fn kids_owned(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
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
        self.rotate_by(now, TOKEN_KEYS)
    }

    /// [`KeyRing::rotate_if_due`] under `policy`.
    pub fn rotate_by(&mut self, now: u64, policy: Policy) -> anyhow::Result<bool> {
        let mut changed = false;
        let active_since = self.active(now).activates_at;
        let pending = self.keys.iter().any(|k| k.activates_at > now);
        if !pending && now.saturating_sub(active_since) >= ROTATE_AFTER_SECS {
            self.keys
                .push(SigningKey::generate(now, now + PUBLISH_LEAD_SECS)?);
            changed = true;
        }
        // A key is retired once its successor has signed for longer than the policy keeps it.
        let retire_before = now.saturating_sub(policy.keep_after_successor_secs);
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

/// Where a key ring is kept.
#[derive(Debug)]
pub enum KeysHome {
    /// A file of `DIR/secrets/` (the embedded store).
    File(PathBuf),
    /// Sealed in the store the nodes share (`crate::vault`): a rotation on any node is every
    /// node's, read again when the follower names the record.
    Sealed(Arc<Vault>),
    /// Nowhere: rotated in memory only (tests).
    Memory,
}

/// A key ring as a node holds it: rotated where it is kept, and, on a shared store, read again
/// when another node changed it.
pub struct SharedRing {
    /// The sealed record's name (`crate::vault::names`).
    name: &'static str,
    /// The ring's name in messages, without an article ("token signing keys").
    what: &'static str,
    policy: Policy,
    ring: RwLock<KeyRing>,
    home: KeysHome,
    /// Held while the ring is rotated or read again from the store, so that a follower's read
    /// of an older ring never lands after this node's own rotation.
    change: Mutex<()>,
}

impl std::fmt::Debug for SharedRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRing")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SharedRing {
    pub fn new(
        name: &'static str,
        what: &'static str,
        policy: Policy,
        ring: KeyRing,
        home: KeysHome,
    ) -> Self {
        Self {
            name,
            what,
            policy,
            ring: RwLock::new(ring),
            home,
            change: Mutex::new(()),
        }
    }

    /// The sealed record's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The ring, to sign or verify with.
    pub fn read(&self) -> LockResult<RwLockReadGuard<'_, KeyRing>> {
        self.ring.read()
    }

    fn set(&self, ring: KeyRing) -> anyhow::Result<()> {
        *self
            .ring
            .write()
            .map_err(|_| anyhow::anyhow!("key ring lock poisoned"))? = ring;
        Ok(())
    }

    /// Rotates the ring at `now` when it is due, where it is kept; whether it changed. On a
    /// shared store the rotation is decided on the ring as stored and committed only over it:
    /// of nodes rotating at once, one publishes the successor and the others take its ring.
    pub fn rotate_at(&self, now: u64) -> anyhow::Result<bool> {
        let _change = self
            .change
            .lock()
            .map_err(|_| anyhow::anyhow!("key ring lock poisoned"))?;
        let what = self.what;
        match &self.home {
            KeysHome::File(_) | KeysHome::Memory => {
                let mut ring = self
                    .ring
                    .write()
                    .map_err(|_| anyhow::anyhow!("key ring lock poisoned"))?;
                let rotated = ring.rotate_by(now, self.policy)?;
                if rotated {
                    if let KeysHome::File(path) = &self.home {
                        ring.save(path)?;
                    }
                    tracing::info!(kids = ?ring.kids(), "{what} rotated");
                }
                Ok(rotated)
            }
            KeysHome::Sealed(vault) => {
                let updated = vault.update(self.name, &format!("the {what}"), |plain| {
                    let mut ring = KeyRing::from_json(plain)?;
                    Ok(match ring.rotate_by(now, self.policy)? {
                        true => Some(ring.to_json()?),
                        false => None,
                    })
                })?;
                let ring = KeyRing::from_json(&updated.plain)?;
                if updated.changed {
                    tracing::info!(kids = ?ring.kids(), "{what} rotated");
                }
                // Taken even when nothing was due: it may be another node's rotation.
                let changed = updated.changed || self.read_kids()? != ring.kids_owned();
                self.set(ring)?;
                Ok(changed)
            }
        }
    }

    fn read_kids(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .ring
            .read()
            .map_err(|_| anyhow::anyhow!("key ring lock poisoned"))?
            .kids_owned())
    }

    /// Reads the ring again from the shared store, after another node changed it. A ring that
    /// no longer opens is not taken: this node keeps signing with the ring it has, and says so.
    pub fn reload(&self) -> Result<(), StoreError> {
        let KeysHome::Sealed(vault) = &self.home else {
            return Ok(());
        };
        let _change = self
            .change
            .lock()
            .map_err(|_| StoreError("the key ring lock is poisoned".into()))?;
        let what = self.what;
        let read = vault
            .read(self.name, &format!("the {what}"))
            .and_then(|stored| stored.ok_or_else(|| anyhow::anyhow!("the {what} are missing")))
            .and_then(|stored| KeyRing::from_json(&stored.plain));
        match read {
            Ok(ring) => {
                self.set(ring).map_err(|e| StoreError(e.to_string()))?;
                tracing::info!("read the {what} another node changed");
            }
            Err(e) => tracing::error!(error = %e, "the stored {what} were not taken"),
        }
        Ok(())
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
