//! The instance's private material on a store several nodes share (issue 20, scope 5).
//!
//! On the embedded store, the token signing keys, the CA key, the event key and the MQTT
//! receipt key are files in the data directory, as they always were. On a shared store
//! (PostgreSQL), every node must sign and verify with the same keys, and copying private keys
//! between machines by hand is how they leak; so they live in the store, in `Table::Secrets`,
//! each record sealed with AES-256-GCM under a **key-encryption key** (KEK) that each node
//! reads from its own file, `DIR/secrets/instance.kek` (0600). The database alone opens
//! nothing: a dump, a replica or a backup of it holds no usable private key. The KEK is the one
//! secret an operator gives a new node (with `instance.json`); a KMS can take its place later.
//!
//! A sealed record is `TGS1 ‖ kek-id (8) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`. The additional
//! data names the record, so a sealed value moved to another name does not open; `kek-id` (the
//! first 8 bytes of SHA-256 over a label and the KEK) tells "another KEK" from "altered", so a
//! node given the wrong file says so instead of failing obscurely. The AEAD also means a writer
//! of the database cannot swap in a key of its own: it would have to seal it under the KEK.
//!
//! Writes go through the identity records' door (`Table::Secrets` is theirs) with the record
//! they were decided on as an expectation: two nodes creating the same material at once leave
//! one, and a rotation commits only over the ring it started from.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use twinguard_core::store::{Expect, Mutation, Store, Table};
use zeroize::Zeroizing;

use crate::datadir::write_private;

/// The record names of `Table::Secrets`.
pub mod names {
    /// The token signing key ring (`signing_keys::KeyRing`, as JSON).
    pub const TOKEN_KEYS: &str = "token-keys";
    /// The local CA: certificate and key, as JSON.
    pub const CA: &str = "ca";
    /// The key CloudEvents are signed with (PKCS#8 PEM).
    pub const EVENT_KEY: &str = "event-key";
    /// The key MQTT receipts are signed with (PKCS#8 PEM).
    pub const RECEIPT_KEY: &str = "mqtt-receipt-key";
    /// The key store positions are sealed with for clients (32 bytes).
    pub const POSITION_KEY: &str = "position-key";
    /// The group name of the nodes' shared MQTT subscription.
    pub const MQTT_SHARE_GROUP: &str = "mqtt-share-group";
    /// The key of the order the graph iterates in (16 bytes: `twinguard_core::graph::order`).
    pub const ORDER_KEY: &str = "graph-order-key";
}

const MAGIC: &[u8; 4] = b"TGS1";
const KEK_ID_LEN: usize = 8;
const TAG_LEN: usize = 16;
const AAD_LABEL: &[u8] = b"twinguard instance secret\0";

/// The key-encryption key of a node: the instance's, as the node's own file holds it.
pub struct Kek {
    key: RandomizedNonceKey,
    id: [u8; KEK_ID_LEN],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").finish_non_exhaustive()
    }
}

/// Why a sealed record did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("it is sealed under another key-encryption key than this node's")]
    OtherKek,
    #[error("it does not open under this node's key-encryption key: altered, or not this record")]
    Altered,
}

impl Kek {
    pub fn new(raw: &[u8; 32]) -> anyhow::Result<Self> {
        let mut digest = Sha256::new();
        digest.update(b"twinguard kek id\0");
        digest.update(raw);
        let mut id = [0u8; KEK_ID_LEN];
        id.copy_from_slice(&digest.finalize()[..KEK_ID_LEN]);
        Ok(Self {
            key: RandomizedNonceKey::new(&AES_256_GCM, raw)
                .map_err(|_| anyhow::anyhow!("AES-256-GCM is not available"))?,
            id,
        })
    }

    /// The KEK in `path` (32 bytes in base64, one line), made if the file is missing. A file
    /// that others may read, or that holds anything but one key, is refused.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            let mut raw = Zeroizing::new([0u8; 32]);
            aws_lc_rs::rand::fill(raw.as_mut())
                .map_err(|_| anyhow::anyhow!("no randomness for the key-encryption key"))?;
            let text = Zeroizing::new(format!("{}\n", STANDARD.encode(raw.as_ref())));
            write_private(path, text.as_bytes())?;
            tracing::info!(path = %path.display(), "created the instance's key-encryption key");
        }
        Self::load(path)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .permissions()
            .mode();
        anyhow::ensure!(
            mode & 0o077 == 0,
            "{} may be read by others (mode {:o}): make it the owner's only (chmod 600)",
            path.display(),
            mode & 0o777
        );
        let text = Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        );
        let raw = STANDARD
            .decode(text.trim())
            .ok()
            .map(Zeroizing::new)
            .and_then(|raw| <[u8; 32]>::try_from(raw.as_slice()).ok())
            .map(Zeroizing::new)
            .with_context(|| {
                format!(
                    "{} does not hold a key-encryption key (32 bytes in base64)",
                    path.display()
                )
            })?;
        Self::new(&raw)
    }

    fn aad(name: &str) -> Vec<u8> {
        let mut aad = AAD_LABEL.to_vec();
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    /// `plain` sealed as record `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut sealed = plain.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(Self::aad(name)), &mut sealed)
            .map_err(|_| anyhow::anyhow!("sealing {name} failed"))?;
        let mut out = Vec::with_capacity(MAGIC.len() + KEK_ID_LEN + NONCE_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Record `name`'s plain bytes, if `sealed` is that record sealed under this KEK, unaltered.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let rest = sealed.strip_prefix(MAGIC).ok_or(OpenError::Altered)?;
        let (id, rest) = rest
            .split_at_checked(KEK_ID_LEN)
            .ok_or(OpenError::Altered)?;
        if id != self.id {
            return Err(OpenError::OtherKek);
        }
        let (nonce, body) = rest.split_at_checked(NONCE_LEN).ok_or(OpenError::Altered)?;
        if body.len() < TAG_LEN {
            return Err(OpenError::Altered);
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Altered)?;
        let mut body = Zeroizing::new(body.to_vec());
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(Self::aad(name)), &mut body)
            .map_err(|_| OpenError::Altered)?
            .len();
        body.truncate(plain_len);
        Ok(body)
    }
}

/// A record of `Table::Secrets` as read: its plain bytes and the sealed value they came from
/// (what a replacement expects).
pub struct Opened {
    pub plain: Zeroizing<Vec<u8>>,
    pub sealed: Vec<u8>,
}

/// Sealed records of one shared store.
pub struct Vault {
    kek: Kek,
    /// The identity records' view of the store: through the writer's door once it runs.
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

/// Attempts at creating or adopting one record while other nodes commit.
const ATTEMPTS: usize = 8;

impl Vault {
    pub fn new(kek: Kek, store: Arc<dyn Store>) -> Self {
        Self { kek, store }
    }

    /// Record `name` as stored, opened; `what` names it in errors.
    pub fn read(&self, name: &str, what: &str) -> anyhow::Result<Option<Opened>> {
        let Some(sealed) = self
            .store
            .get_many(Table::Secrets, &[name.to_owned()])?
            .pop()
            .flatten()
        else {
            return Ok(None);
        };
        let plain = self.kek.open(name, &sealed).map_err(|e| match e {
            OpenError::OtherKek => anyhow::anyhow!(
                "{what} in the store is sealed under another key-encryption key than this \
                 node's (secrets/instance.kek): give this node a copy of the instance's file"
            ),
            OpenError::Altered => anyhow::anyhow!(
                "{what} in the store does not open under this node's key-encryption key: it \
                 was altered, or moved from another record; refusing to use it"
            ),
        })?;
        Ok(Some(Opened { plain, sealed }))
    }

    /// Record `name`: the stored one if there is one; else `local` (material this data
    /// directory held before, adopted) or, without it, what `make` makes, stored expecting no
    /// record, so that of nodes starting at once one's material is everyone's. A stored record
    /// that differs from `local` is refused: the data directory is then another instance's, or
    /// a copy of this one's that the store has moved on from, and which is right is the
    /// operator's call.
    pub fn get_or_store(
        &self,
        name: &str,
        what: &str,
        local: Option<&[u8]>,
        make: impl Fn() -> anyhow::Result<Zeroizing<Vec<u8>>>,
    ) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        for _ in 0..ATTEMPTS {
            if let Some(stored) = self.read(name, what)? {
                if let Some(local) = local {
                    anyhow::ensure!(
                        local == stored.plain.as_slice(),
                        "this data directory's {what} differs from the one in the store; if \
                         the directory is a copy of this instance's, remove its file and start \
                         again to use the store's"
                    );
                }
                return Ok(stored.plain);
            }
            let plain = match local {
                Some(local) => Zeroizing::new(local.to_vec()),
                None => make()?,
            };
            let put = [Mutation::put(
                Table::Secrets,
                name,
                self.kek.seal(name, &plain)?,
            )];
            let absent = [Expect {
                table: Table::Secrets,
                key: name.to_owned(),
                value: None,
            }];
            if self.store.commit_expecting(&put, &absent)? {
                tracing::info!(record = name, "stored {what}, sealed, in the shared store");
                return Ok(plain);
            }
        }
        anyhow::bail!("other nodes kept committing while {what} was stored")
    }

    /// Replaces record `name` with `plain` if it still holds `expected` (sealed, as read):
    /// false when another node changed it first.
    pub fn replace(&self, name: &str, expected: &[u8], plain: &[u8]) -> anyhow::Result<bool> {
        let put = [Mutation::put(
            Table::Secrets,
            name,
            self.kek.seal(name, plain)?,
        )];
        let expect = [Expect {
            table: Table::Secrets,
            key: name.to_owned(),
            value: Some(expected.to_vec()),
        }];
        Ok(self.store.commit_expecting(&put, &expect)?)
    }
}

/// Where a node's private material lives: files in its data directory (the embedded store),
/// or sealed records of the shared store.
#[derive(Debug, Clone)]
pub enum Material {
    Files,
    Sealed(Arc<Vault>),
}

impl Material {
    /// Secret `name`, kept at `local` among the files, or sealed in the store (where what
    /// `local` held before is adopted, and the file then removed, so that copies of the data
    /// directory no longer carry it). `make` makes a new one.
    pub fn secret(
        &self,
        name: &str,
        local: &Path,
        what: &str,
        make: impl Fn() -> anyhow::Result<Zeroizing<Vec<u8>>>,
    ) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        let file = if local.exists() {
            Some(Zeroizing::new(
                std::fs::read(local).with_context(|| format!("reading {}", local.display()))?,
            ))
        } else {
            None
        };
        match self {
            Self::Files => {
                if let Some(file) = file {
                    return Ok(file);
                }
                let made = make()?;
                write_private(local, &made)?;
                tracing::info!(path = %local.display(), "created {what}");
                Ok(made)
            }
            Self::Sealed(vault) => {
                let plain =
                    vault.get_or_store(name, what, file.as_deref().map(|f| &f[..]), make)?;
                if file.is_some() {
                    remove_moved(local, what)?;
                }
                Ok(plain)
            }
        }
    }

    /// [`Material::secret`] for a private key in PEM.
    pub fn private_pem(
        &self,
        name: &str,
        local: &Path,
        what: &str,
        make: impl Fn() -> anyhow::Result<Zeroizing<String>>,
    ) -> anyhow::Result<Zeroizing<String>> {
        let pem = self.secret(name, local, what, || {
            make().map(|pem| Zeroizing::new(pem.as_bytes().to_vec()))
        })?;
        String::from_utf8(pem.to_vec())
            .map(Zeroizing::new)
            .with_context(|| format!("{what} is not PEM"))
    }
}

/// Removes a private file whose content the store now holds sealed.
pub fn remove_moved(path: &Path, what: &str) -> anyhow::Result<()> {
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    tracing::info!(path = %path.display(), "{what} is in the shared store now; removed the file");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use twinguard_core::store::MemoryStore;

    use super::*;

    fn kek(byte: u8) -> Kek {
        Kek::new(&[byte; 32]).unwrap()
    }

    #[test]
    fn a_sealed_record_opens_only_under_its_kek_with_its_name_unaltered() {
        let k = kek(1);
        let sealed = k.seal("ca", b"the CA's key").unwrap();
        assert_eq!(k.open("ca", &sealed).unwrap().as_slice(), b"the CA's key");
        assert_ne!(
            k.seal("ca", b"the CA's key").unwrap(),
            sealed,
            "fresh nonce"
        );
        assert!(
            !sealed.windows(6).any(|w| w == b"CA's k"),
            "no plaintext in the record"
        );
        assert_eq!(kek(2).open("ca", &sealed).unwrap_err(), OpenError::OtherKek);
        assert_eq!(
            k.open("token-keys", &sealed).unwrap_err(),
            OpenError::Altered,
            "moved to another record"
        );
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x20;
            assert!(k.open("ca", &altered).is_err(), "byte {i}");
        }
        for cut in 0..sealed.len() {
            assert!(k.open("ca", &sealed[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_kek_file_is_made_private_and_a_loose_or_malformed_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instance.kek");
        let made = Kek::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Kek::load_or_create(&path).unwrap();
        let sealed = made.seal("x", b"y").unwrap();
        assert_eq!(again.open("x", &sealed).unwrap().as_slice(), b"y");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let loose = Kek::load(&path).unwrap_err().to_string();
        assert!(loose.contains("chmod 600"), "{loose}");

        for junk in ["", "short", &STANDARD.encode([1u8; 31]), &"A".repeat(100)] {
            write_private(&path, junk.as_bytes()).unwrap();
            assert!(Kek::load(&path).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn nodes_storing_material_at_once_all_end_with_the_same_one() {
        for _ in 0..20 {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::shared());
            let barrier = Arc::new(std::sync::Barrier::new(3));
            let nodes: Vec<_> = (0..3)
                .map(|_| {
                    let (store, barrier) = (store.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let vault = Vault::new(kek(5), store);
                        barrier.wait();
                        vault
                            .get_or_store("event-key", "the event key", None, || {
                                let mut raw = Zeroizing::new(vec![0u8; 32]);
                                aws_lc_rs::rand::fill(&mut raw).unwrap();
                                Ok(raw)
                            })
                            .unwrap()
                    })
                })
                .collect();
            let got: Vec<_> = nodes.into_iter().map(|n| n.join().unwrap()).collect();
            assert!(got.iter().all(|g| g == &got[0]), "one key for every node");
        }
    }

    #[test]
    fn a_node_refuses_material_of_another_kek_or_altered_in_the_store() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::shared());
        let first = Vault::new(kek(1), store.clone());
        first
            .get_or_store("ca", "the CA", Some(b"ours"), || unreachable!())
            .unwrap();
        let stranger = Vault::new(kek(2), store.clone());
        let refused = stranger
            .get_or_store("ca", "the CA", None, || Ok(Zeroizing::new(b"new".to_vec())))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("another key-encryption key"), "{refused}");

        // A writer of the database moves a sealed record under another name.
        let sealed = store.get_many(Table::Secrets, &["ca".into()]).unwrap();
        store
            .commit(&[Mutation::put(
                Table::Secrets,
                "event-key",
                sealed[0].clone().unwrap(),
            )])
            .unwrap();
        let moved = first
            .get_or_store("event-key", "the event key", None, || unreachable!())
            .unwrap_err()
            .to_string();
        assert!(moved.contains("altered"), "{moved}");

        // A data directory whose own file differs from the stored material.
        let differs = first
            .get_or_store("ca", "the CA", Some(b"theirs"), || unreachable!())
            .unwrap_err()
            .to_string();
        assert!(differs.contains("differs"), "{differs}");
    }
}
