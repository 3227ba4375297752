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
//! The KEK rotates while the nodes serve (`twinguard kek`; [`KekRing`], [`Vault::rotate_to_newest`]):
//! a node's file may hold a few keys, a record names the one that sealed it, and the store's
//! records, not the file, decide which key seals next.
//!
//! Writes go through the identity records' door (`Table::Secrets` is theirs) with the record
//! they were decided on as an expectation: two nodes creating the same material at once leave
//! one, and a rotation commits only over the ring it started from.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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

/// One key-encryption key.
pub struct Kek {
    key: RandomizedNonceKey,
    id: KekId,
}

/// The short, public name of a KEK that a sealed record carries.
pub type KekId = [u8; KEK_ID_LEN];

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

/// The KEK's ID in a sealed record, if it has the record's shape at all.
pub fn sealed_under(sealed: &[u8]) -> Option<KekId> {
    sealed
        .strip_prefix(MAGIC)?
        .get(..KEK_ID_LEN)?
        .try_into()
        .ok()
}

/// A KEK ID as the operator reads it.
pub fn id_text(id: &KekId) -> String {
    hex::encode(id)
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

    pub fn id(&self) -> KekId {
        self.id
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

/// Most keys a KEK file may hold: during a rotation two, the instance's and its successor.
const MAX_KEKS: usize = 4;

/// The KEKs a node holds: its file's lines, one key each (32 bytes in base64), oldest first.
/// Each opens what is sealed under it. Which one seals is the store's choice, not the file's
/// ([`Vault`]): a key added to the file seals nothing until `twinguard kek rotate` reseals the
/// store's records under it, so nodes may get the new file in any order.
pub struct KekRing {
    keys: Vec<Kek>,
}

impl std::fmt::Debug for KekRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| id_text(&k.id)))
            .finish()
    }
}

impl KekRing {
    /// A ring of one key.
    pub fn single(kek: Kek) -> Self {
        Self { keys: vec![kek] }
    }

    /// The KEKs in `path`, which is made with one new key if it is missing. A file that others
    /// may read, or that holds anything but keys, is refused.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            write_private(path, new_key_line()?.as_bytes())?;
            tracing::info!(path = %path.display(), "created the instance's key-encryption key");
        }
        Self::load(path)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let ring = Self {
            keys: parse(&read_private(path)?, path)?
                .into_iter()
                .map(|(_, kek)| kek)
                .collect(),
        };
        anyhow::ensure!(
            ring.keys.len() <= MAX_KEKS,
            "{} holds more than {MAX_KEKS} keys: retire the old ones (twinguard kek retire)",
            path.display()
        );
        Ok(ring)
    }

    /// Adds a new key at the end of the file in `path` (which must hold the instance's): it
    /// opens what is sealed under it from now on, and seals nothing yet. Returns its ID.
    pub fn add_to_file(path: &Path) -> anyhow::Result<KekId> {
        let mut text = read_private(path)?;
        let held = parse(&text, path)?.len();
        anyhow::ensure!(
            held < MAX_KEKS,
            "{} already holds {MAX_KEKS} keys: retire the old ones first (twinguard kek retire)",
            path.display()
        );
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&new_key_line()?);
        let (_, added) = parse(&text, path)?
            .pop()
            .context("the new key did not read back")?;
        write_private(path, text.as_bytes())?;
        Ok(added.id)
    }

    /// Keeps in the file in `path` only the keys `keep` names, all of which it must hold.
    pub fn keep_in_file(path: &Path, keep: &BTreeSet<KekId>) -> anyhow::Result<()> {
        let lines = parse(&read_private(path)?, path)?;
        let kept: Vec<_> = lines
            .into_iter()
            .filter(|(_, kek)| keep.contains(&kek.id))
            .collect();
        anyhow::ensure!(
            !kept.is_empty() && kept.len() == keep.len(),
            "{} does not hold every key to keep",
            path.display()
        );
        let text: Zeroizing<String> = Zeroizing::new(
            kept.iter()
                .map(|(line, _)| format!("{}\n", line.as_str()))
                .collect(),
        );
        write_private(path, text.as_bytes())
    }

    /// The key added last: what `twinguard kek rotate` reseals under.
    pub fn newest(&self) -> &Kek {
        // `load` refuses a file without keys; `single` makes one.
        &self.keys[self.keys.len() - 1]
    }

    pub fn get(&self, id: &KekId) -> Option<&Kek> {
        self.keys.iter().find(|k| &k.id == id)
    }

    pub fn ids(&self) -> Vec<KekId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Record `name`'s plain bytes, under whichever of the ring's keys sealed it.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let id = sealed_under(sealed).ok_or(OpenError::Altered)?;
        self.get(&id).ok_or(OpenError::OtherKek)?.open(name, sealed)
    }
}

/// The keys of a KEK file's text, each with its line; `path` names the file in errors.
fn parse(text: &str, path: &Path) -> anyhow::Result<Vec<(Zeroizing<String>, Kek)>> {
    let bad = || {
        format!(
            "{} does not hold key-encryption keys (32 bytes in base64, one a line)",
            path.display()
        )
    };
    let mut keys: Vec<(Zeroizing<String>, Kek)> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let raw = STANDARD
            .decode(line)
            .ok()
            .map(Zeroizing::new)
            .and_then(|raw| <[u8; 32]>::try_from(raw.as_slice()).ok())
            .map(Zeroizing::new)
            .with_context(bad)?;
        let kek = Kek::new(&raw)?;
        anyhow::ensure!(
            keys.iter().all(|(_, k)| k.id != kek.id),
            "{} holds a key twice",
            path.display()
        );
        keys.push((Zeroizing::new(line.to_owned()), kek));
    }
    anyhow::ensure!(!keys.is_empty(), bad());
    Ok(keys)
}

/// A new key as one line of a KEK file.
fn new_key_line() -> anyhow::Result<Zeroizing<String>> {
    let mut raw = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(raw.as_mut())
        .map_err(|_| anyhow::anyhow!("no randomness for the key-encryption key"))?;
    Ok(Zeroizing::new(format!(
        "{}\n",
        STANDARD.encode(raw.as_ref())
    )))
}

/// A file only its owner may read, read whole.
fn read_private(path: &Path) -> anyhow::Result<Zeroizing<String>> {
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
    Ok(Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    ))
}

/// A record of `Table::Secrets` as read: its plain bytes and the sealed value they came from
/// (what a replacement expects).
pub struct Opened {
    pub plain: Zeroizing<Vec<u8>>,
    pub sealed: Vec<u8>,
}

/// A record of `Table::Secrets` after [`Vault::update`].
pub struct Updated {
    /// Its plain bytes as the store holds them now.
    pub plain: Zeroizing<Vec<u8>>,
    /// Whether this update wrote them.
    pub changed: bool,
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resealed {
    /// Records sealed again under the new key.
    pub records: usize,
    /// Records already under it.
    pub already: usize,
    pub to: KekId,
}

/// Sealed records of one shared store.
pub struct Vault {
    keys: RwLock<Arc<KekRing>>,
    /// The node's KEK file, read again when a record names a key the node does not hold (a
    /// rotation on another node, after the operator gave this node the new file).
    file: Option<PathBuf>,
    read_again: Mutex<Option<Instant>>,
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
/// How often at most a node reads its KEK file again.
const READ_AGAIN_EVERY: Duration = Duration::from_secs(1);

impl Vault {
    /// A vault with one KEK and no file behind it.
    pub fn new(kek: Kek, store: Arc<dyn Store>) -> Self {
        Self::with_ring(KekRing::single(kek), None, store)
    }

    /// A vault with the KEKs in `path` (made if missing), read again when a record needs a key
    /// the node does not hold yet.
    pub fn from_file(path: &Path, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        Ok(Self::with_ring(
            KekRing::load_or_create(path)?,
            Some(path.to_owned()),
            store,
        ))
    }

    fn with_ring(ring: KekRing, file: Option<PathBuf>, store: Arc<dyn Store>) -> Self {
        Self {
            keys: RwLock::new(Arc::new(ring)),
            file,
            read_again: Mutex::new(None),
            store,
        }
    }

    /// The KEKs the node holds now.
    pub fn ring(&self) -> Arc<KekRing> {
        match self.keys.read() {
            Ok(ring) => ring.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The KEK file read again, if there is one and it was not read in the last second (a
    /// writer of the database naming keys that do not exist makes the node read one small file
    /// a second, no more).
    fn read_again(&self) -> Option<Arc<KekRing>> {
        let path = self.file.as_ref()?;
        {
            let mut last = self.read_again.lock().ok()?;
            if last.is_some_and(|at| at.elapsed() < READ_AGAIN_EVERY) {
                return None;
            }
            *last = Some(Instant::now());
        }
        match KekRing::load(path) {
            Ok(ring) => {
                let ring = Arc::new(ring);
                tracing::info!(keys = ?ring, "read the key-encryption key file again");
                if let Ok(mut keys) = self.keys.write() {
                    *keys = ring.clone();
                }
                Some(ring)
            }
            Err(e) => {
                tracing::error!(error = %e, "the key-encryption key file did not read");
                None
            }
        }
    }

    /// Record `name`'s plain bytes, reading the KEK file again if the record needs a key the
    /// node does not hold yet.
    fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        match self.ring().open(name, sealed) {
            Err(OpenError::OtherKek) => match self.read_again() {
                Some(ring) => ring.open(name, sealed),
                None => Err(OpenError::OtherKek),
            },
            opened => opened,
        }
    }

    /// `plain` sealed as record `name` under KEK `id`, or, without one, the key the store's
    /// records are sealed under (the ring's newest on a store that has none yet).
    fn seal(&self, name: &str, plain: &[u8], id: Option<KekId>) -> anyhow::Result<Vec<u8>> {
        let id = match id {
            Some(id) => Some(id),
            None => self
                .store
                .scan(Table::Secrets)?
                .first()
                .and_then(|(_, sealed)| sealed_under(sealed)),
        };
        let Some(id) = id else {
            return self.ring().newest().seal(name, plain);
        };
        let ring = match self.ring() {
            ring if ring.get(&id).is_some() => ring,
            _ => self.read_again().unwrap_or_else(|| self.ring()),
        };
        let kek = ring.get(&id).with_context(|| {
            format!(
                "the store's records are sealed under key-encryption key {}, which this node's \
                 file (secrets/instance.kek) does not hold: give it the instance's file",
                id_text(&id)
            )
        })?;
        kek.seal(name, plain)
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
        let plain = self.open(name, &sealed).map_err(|e| match e {
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
                self.seal(name, &plain, None)?,
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

    /// Changes record `name` as the store holds it: `change` gets its plain bytes and answers
    /// new ones, or `None` to leave the record as it is. The new bytes replace the record only
    /// if it still holds what was read; when another node changed it first, `change` decides
    /// again on that node's record (at most 8 times). `what` names the record in errors.
    pub fn update(
        &self,
        name: &str,
        what: &str,
        mut change: impl FnMut(&[u8]) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>>,
    ) -> anyhow::Result<Updated> {
        for _ in 0..8 {
            let stored = self
                .read(name, what)?
                .ok_or_else(|| anyhow::anyhow!("{what} is missing from the store"))?;
            let Some(plain) = change(&stored.plain)? else {
                return Ok(Updated {
                    plain: stored.plain,
                    changed: false,
                });
            };
            if self.replace(name, &stored.sealed, &plain)? {
                return Ok(Updated {
                    plain,
                    changed: true,
                });
            }
        }
        anyhow::bail!("other nodes kept changing {what}")
    }

    /// Replaces record `name` with `plain` if it still holds `expected` (sealed, as read):
    /// false when another node changed it first. The new value is sealed under the KEK that
    /// sealed `expected`, so a node never moves a record back to a key a rotation left.
    fn replace(&self, name: &str, expected: &[u8], plain: &[u8]) -> anyhow::Result<bool> {
        let put = [Mutation::put(
            Table::Secrets,
            name,
            self.seal(name, plain, sealed_under(expected))?,
        )];
        let expect = [Expect {
            table: Table::Secrets,
            key: name.to_owned(),
            value: Some(expected.to_vec()),
        }];
        Ok(self.store.commit_expecting(&put, &expect)?)
    }

    /// The KEKs the store's records are sealed under.
    pub fn keys_in_use(&self) -> anyhow::Result<BTreeSet<KekId>> {
        self.store
            .scan(Table::Secrets)?
            .iter()
            .map(|(name, sealed)| {
                sealed_under(sealed)
                    .with_context(|| format!("record {name} of the store is not a sealed record"))
            })
            .collect()
    }

    /// Seals every record of the store again under the ring's newest key, in one commit that
    /// expects each record as read: a node that changes one meanwhile makes the rotation read
    /// again. Every record must open under this ring first.
    pub fn rotate_to_newest(&self) -> anyhow::Result<Resealed> {
        let ring = self.ring();
        let to = ring.newest();
        for _ in 0..ATTEMPTS {
            let mut puts = Vec::new();
            let mut expects = Vec::new();
            let mut already = 0;
            for (name, sealed) in self.store.scan(Table::Secrets)? {
                if sealed_under(&sealed) == Some(to.id) {
                    already += 1;
                    continue;
                }
                let plain = ring.open(&name, &sealed).map_err(|e| {
                    anyhow::anyhow!("record {name} of the store does not open: {e}")
                })?;
                puts.push(Mutation::put(
                    Table::Secrets,
                    name.clone(),
                    to.seal(&name, &plain)?,
                ));
                expects.push(Expect {
                    table: Table::Secrets,
                    key: name,
                    value: Some(sealed),
                });
            }
            if puts.is_empty() || self.store.commit_expecting(&puts, &expects)? {
                return Ok(Resealed {
                    records: puts.len(),
                    already,
                    to: to.id,
                });
            }
        }
        anyhow::bail!("nodes kept changing the sealed records during the rotation")
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
                    remove_moved(local, what, "the shared store")?;
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

/// Removes a private file whose content is kept elsewhere now (`kept_in`: the shared store,
/// sealed, or another file), durably: the directory is synced after the removal.
pub fn remove_moved(path: &Path, what: &str, kept_in: &str) -> anyhow::Result<()> {
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    tracing::info!(path = %path.display(), "{what} is kept in {kept_in} now; removed the file");
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
        let made = KekRing::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = KekRing::load_or_create(&path).unwrap();
        let sealed = made.newest().seal("x", b"y").unwrap();
        assert_eq!(again.open("x", &sealed).unwrap().as_slice(), b"y");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let loose = KekRing::load(&path).unwrap_err().to_string();
        assert!(loose.contains("chmod 600"), "{loose}");

        for junk in ["", "short", &STANDARD.encode([1u8; 31]), &"A".repeat(100)] {
            write_private(&path, junk.as_bytes()).unwrap();
            assert!(KekRing::load(&path).is_err(), "{junk:?}");
        }
    }

    /// A node's KEK file, as the operator would lay it out: one per node.
    fn node_file(dir: &Path, node: &str) -> PathBuf {
        dir.join(format!("{node}.kek"))
    }

    fn store_material(vault: &Vault) {
        for name in [names::CA, names::EVENT_KEY, names::TOKEN_KEYS] {
            vault
                .get_or_store(name, name, None, || {
                    Ok(Zeroizing::new(format!("{name} v1").into_bytes()))
                })
                .unwrap();
        }
    }

    fn sealed_records(store: &dyn Store) -> Vec<(String, Vec<u8>)> {
        store.scan(Table::Secrets).unwrap()
    }

    #[test]
    fn a_rotation_reseals_every_record_under_the_new_key_and_retiring_the_old_one_leaves_it_nothing()
     {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::shared());
        let (a_file, b_file) = (node_file(dir.path(), "a"), node_file(dir.path(), "b"));
        let a = Vault::from_file(&a_file, store.clone()).unwrap();
        store_material(&a);
        std::fs::copy(&a_file, &b_file).unwrap();
        let b = Vault::from_file(&b_file, store.clone()).unwrap();
        let old = a.ring().ids()[0];
        let before = sealed_records(store.as_ref());
        assert!(before.iter().all(|(_, s)| sealed_under(s) == Some(old)));

        // The operator adds a key on A and rotates there; B's file does not have it yet.
        let new = KekRing::add_to_file(&a_file).unwrap();
        assert_ne!(new, old);
        let tool = Vault::from_file(&a_file, store.clone()).unwrap();
        let done = tool.rotate_to_newest().unwrap();
        assert_eq!((done.records, done.already, done.to), (3, 0, new));
        assert_eq!(tool.keys_in_use().unwrap(), BTreeSet::from([new]));
        let after = sealed_records(store.as_ref());
        for ((name, was), (_, now)) in before.iter().zip(&after) {
            assert_ne!(was, now, "{name} sealed again");
            assert_eq!(
                tool.ring().open(name, now).unwrap().as_slice(),
                format!("{name} v1").as_bytes()
            );
        }
        assert_eq!(
            tool.rotate_to_newest().unwrap(),
            Resealed {
                records: 0,
                already: 3,
                to: new
            },
            "a second rotation has nothing to do"
        );

        // A still holds only the old key in memory: it reads its file again and opens.
        assert_eq!(a.ring().ids(), [old]);
        let ca = a.read(names::CA, "the CA").unwrap().unwrap();
        assert_eq!(ca.plain.as_slice(), b"ca v1");
        assert_eq!(a.ring().ids(), [old, new]);
        // B, whose file lacks the new key, opens nothing and says what to do.
        let refused = b.read(names::CA, "the CA").err().unwrap().to_string();
        assert!(refused.contains("secrets/instance.kek"), "{refused}");

        // A replacement by A seals under the store's key, not the first of A's file, and so
        // does a record made after the rotation.
        let ring = a.read(names::TOKEN_KEYS, "ring").unwrap().unwrap();
        assert!(
            a.replace(names::TOKEN_KEYS, &ring.sealed, b"token-keys v2")
                .unwrap()
        );
        a.get_or_store(names::RECEIPT_KEY, "the receipt key", None, || {
            Ok(Zeroizing::new(b"receipt".to_vec()))
        })
        .unwrap();
        assert_eq!(a.keys_in_use().unwrap(), BTreeSet::from([new]));

        // B gets the file; then the old key is retired from it.
        std::fs::copy(&a_file, &b_file).unwrap();
        std::thread::sleep(READ_AGAIN_EVERY);
        assert_eq!(
            b.read(names::TOKEN_KEYS, "ring")
                .unwrap()
                .unwrap()
                .plain
                .as_slice(),
            b"token-keys v2"
        );
        KekRing::keep_in_file(&b_file, &b.keys_in_use().unwrap()).unwrap();
        let retired = Vault::from_file(&b_file, store.clone()).unwrap();
        assert_eq!(retired.ring().ids(), [new]);
        for (name, sealed) in sealed_records(store.as_ref()) {
            assert!(retired.ring().open(&name, &sealed).is_ok(), "{name}");
        }
        // A file with the old key alone opens none of the store's records.
        let only_old = node_file(dir.path(), "old");
        std::fs::copy(&a_file, &only_old).unwrap();
        KekRing::keep_in_file(&only_old, &BTreeSet::from([old])).unwrap();
        let old_ring = KekRing::load(&only_old).unwrap();
        for (name, sealed) in sealed_records(store.as_ref()) {
            assert_eq!(
                old_ring.open(&name, &sealed).unwrap_err(),
                OpenError::OtherKek,
                "{name}"
            );
        }
    }

    #[test]
    fn a_rotation_racing_a_nodes_replacement_loses_neither() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn Store> = Arc::new(MemoryStore::shared());
            let file = node_file(dir.path(), "a");
            let node = Arc::new(Vault::from_file(&file, store.clone()).unwrap());
            store_material(&node);
            let new = KekRing::add_to_file(&file).unwrap();
            // The node holds both keys, the old one first.
            let node = Arc::new(Vault::from_file(&file, store.clone()).unwrap());
            let tool = Vault::from_file(&file, store.clone()).unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let replacer = {
                let (node, barrier) = (node.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    for _ in 0..10 {
                        loop {
                            let stored = node.read(names::TOKEN_KEYS, "ring").unwrap().unwrap();
                            let next: u32 = String::from_utf8(stored.plain.to_vec())
                                .unwrap()
                                .rsplit('v')
                                .next()
                                .unwrap()
                                .parse()
                                .unwrap();
                            let plain = format!("token-keys v{}", next + 1);
                            if node
                                .replace(names::TOKEN_KEYS, &stored.sealed, plain.as_bytes())
                                .unwrap()
                            {
                                break;
                            }
                        }
                    }
                })
            };
            barrier.wait();
            // Replacements back to back can beat every attempt of one rotation; the operator
            // then runs it again, as here, while the replacer may still be at work.
            while let Err(e) = tool.rotate_to_newest() {
                assert!(e.to_string().contains("kept changing"), "{e}");
            }
            replacer.join().unwrap();
            assert_eq!(
                tool.keys_in_use().unwrap(),
                BTreeSet::from([new]),
                "round {round}: every record under the new key"
            );
            let ring = tool.read(names::TOKEN_KEYS, "ring").unwrap().unwrap();
            assert_eq!(
                ring.plain.as_slice(),
                b"token-keys v11",
                "round {round}: no replacement lost"
            );
        }
    }

    #[test]
    fn a_kek_file_takes_a_few_distinct_keys_and_keeps_those_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instance.kek");
        let first = KekRing::load_or_create(&path).unwrap().ids()[0];
        let mut ids = vec![first];
        for _ in 1..MAX_KEKS {
            ids.push(KekRing::add_to_file(&path).unwrap());
        }
        assert_eq!(KekRing::load(&path).unwrap().ids(), ids, "oldest first");
        let full = KekRing::add_to_file(&path).unwrap_err().to_string();
        assert!(full.contains("retire"), "{full}");
        let keep = BTreeSet::from([ids[1], ids[3]]);
        KekRing::keep_in_file(&path, &keep).unwrap();
        assert_eq!(KekRing::load(&path).unwrap().ids(), [ids[1], ids[3]]);
        assert!(
            KekRing::keep_in_file(&path, &BTreeSet::from([ids[0]])).is_err(),
            "not held"
        );
        assert!(
            KekRing::keep_in_file(&path, &BTreeSet::new()).is_err(),
            "never empty"
        );
        assert_eq!(
            KekRing::load(&path).unwrap().ids(),
            [ids[1], ids[3]],
            "unchanged"
        );

        let text = std::fs::read_to_string(&path).unwrap();
        let line = text.lines().next().unwrap();
        write_private(&path, format!("{line}\n{line}\n").as_bytes()).unwrap();
        let twice = KekRing::load(&path).unwrap_err().to_string();
        assert!(twice.contains("twice"), "{twice}");
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
