//! Store positions as clients see them: sealed. A write's answer names the position of the
//! store that holds it (`Twinguard-Position`), and a client presents it to any node
//! (`Twinguard-Min-Position`, `crate::http::consistency`). The number itself would tell a client
//! how many commits everyone made between two of its own requests, including writes to twins it
//! may not see; so the header carries the position sealed with AES-256-GCM under an instance key
//! and a fresh random nonce: only a node can open it, it says nothing of order or distance, two
//! tokens of the same position differ (so equal tokens do not tell that nobody wrote in
//! between), and a forged or altered one fails its tag.
//!
//! The key is sealed in the main store (`crate::vault`, record `position-key`), so every node
//! sharing the store uses the same one; it is made at the first start on a shared store.

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use twinguard_core::store::{Expect, Mutation, Store, Table};
use zeroize::Zeroizing;

use crate::vault::{Vault, names};

/// The `Table::Meta` key under which earlier versions kept the position key in plain.
pub const KEY_RECORD: &str = "position.key";

/// Longest token accepted: a nonce, eight bytes and a tag, in base64url.
const MAX_TOKEN: usize = 64;

pub struct PositionSeal {
    key: RandomizedNonceKey,
}

impl std::fmt::Debug for PositionSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PositionSeal").finish_non_exhaustive()
    }
}

impl PositionSeal {
    pub fn new(key: &[u8; 32]) -> anyhow::Result<Self> {
        Ok(Self {
            key: RandomizedNonceKey::new(&AES_256_GCM, key)
                .map_err(|_| anyhow::anyhow!("AES-256-GCM is not available"))?,
        })
    }

    /// The instance's seal, from its key sealed in the shared store (`crate::vault`), made
    /// (once, whichever node is first) if missing. A key an earlier version kept in plain in
    /// `Table::Meta` is adopted, then removed from there.
    pub fn load_or_create(store: &dyn Store, vault: &Vault) -> anyhow::Result<Self> {
        let legacy = store
            .get_many(Table::Meta, &[KEY_RECORD.to_owned()])?
            .pop()
            .flatten();
        let plain = legacy
            .as_ref()
            .map(|value| {
                STANDARD
                    .decode(value)
                    .ok()
                    .filter(|raw| raw.len() == 32)
                    .map(Zeroizing::new)
                    .ok_or_else(|| anyhow::anyhow!("the stored position key is unreadable"))
            })
            .transpose()?;
        let raw = vault.get_or_store(
            names::POSITION_KEY,
            "the position key",
            plain.as_ref().map(|p| p.as_slice()),
            || {
                let mut raw = Zeroizing::new(vec![0u8; 32]);
                aws_lc_rs::rand::fill(&mut raw)
                    .map_err(|_| anyhow::anyhow!("no randomness for the position key"))?;
                Ok(raw)
            },
        )?;
        if let Some(legacy) = legacy {
            store.commit_expecting(
                &[Mutation::delete(Table::Meta, KEY_RECORD)],
                &[Expect {
                    table: Table::Meta,
                    key: KEY_RECORD.to_owned(),
                    value: Some(legacy),
                }],
            )?;
        }
        let raw = <[u8; 32]>::try_from(raw.as_slice())
            .map(Zeroizing::new)
            .map_err(|_| anyhow::anyhow!("the stored position key is unreadable"))?;
        Self::new(&raw)
    }

    /// The token a client is given for `position`.
    pub fn seal(&self, position: u64) -> Option<String> {
        let mut sealed = position.to_be_bytes().to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::empty(), &mut sealed)
            .ok()?;
        let mut token = nonce.as_ref().to_vec();
        token.extend_from_slice(&sealed);
        Some(URL_SAFE_NO_PAD.encode(token))
    }

    /// The position a token names, if it is one of this instance's, unaltered.
    pub fn open(&self, token: &str) -> Option<u64> {
        let token = token.trim();
        if token.len() > MAX_TOKEN {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let (nonce, sealed) = bytes.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut sealed)
            .ok()?;
        Some(u64::from_be_bytes(<[u8; 8]>::try_from(&*plain).ok()?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use twinguard_core::store::MemoryStore;

    use super::*;

    #[test]
    fn a_sealed_position_opens_to_itself_and_says_nothing_of_its_order_or_equality() {
        let seal = PositionSeal::new(&[7u8; 32]).unwrap();
        for position in [0, 1, 2, 41, 42, u64::MAX] {
            let token = seal.seal(position).unwrap();
            assert!(token.len() <= MAX_TOKEN);
            assert_eq!(seal.open(&token), Some(position));
        }
        // The same position twice: two different tokens, both opening to it.
        let (a, b) = (seal.seal(42).unwrap(), seal.seal(42).unwrap());
        assert_ne!(a, b);
        assert_eq!((seal.open(&a), seal.open(&b)), (Some(42), Some(42)));
        // Another instance's key opens none of them.
        let other = PositionSeal::new(&[8u8; 32]).unwrap();
        assert_eq!(other.open(&a), None);
    }

    #[test]
    fn an_altered_or_made_up_token_is_refused() {
        let seal = PositionSeal::new(&[7u8; 32]).unwrap();
        let token = seal.seal(42).unwrap();
        let bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[i] ^= 1;
            assert_eq!(
                seal.open(&URL_SAFE_NO_PAD.encode(&altered)),
                None,
                "byte {i}"
            );
        }
        for junk in ["", "42", "soon", &"A".repeat(48), &"A".repeat(65), "é"] {
            assert_eq!(seal.open(junk), None, "{junk}");
        }
    }

    #[test]
    fn nodes_starting_at_once_on_one_store_share_one_key() {
        for _ in 0..20 {
            let store = Arc::new(MemoryStore::shared());
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let starts: Vec<_> = (0..2)
                .map(|_| {
                    let (store, barrier) = (store.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let vault = Vault::new(
                            crate::vault::Kek::new(&[3; 32]).unwrap(),
                            store.clone() as Arc<dyn Store>,
                        );
                        PositionSeal::load_or_create(store.as_ref(), &vault).unwrap()
                    })
                })
                .collect();
            let seals: Vec<PositionSeal> = starts.into_iter().map(|s| s.join().unwrap()).collect();
            let token = seals[0].seal(9).unwrap();
            assert_eq!(seals[1].open(&token), Some(9));
        }
    }

    /// A position key that an earlier version kept in plain is taken into the vault and
    /// removed from `Table::Meta`: tokens clients hold stay good, and the database no longer
    /// holds the key in the clear.
    #[test]
    fn a_position_key_kept_in_plain_is_sealed_and_removed() {
        let store = Arc::new(MemoryStore::shared());
        let old = PositionSeal::new(&[9u8; 32]).unwrap();
        let held = old.seal(17).unwrap();
        store
            .commit(&[Mutation::put(
                Table::Meta,
                KEY_RECORD,
                STANDARD.encode([9u8; 32]).into_bytes(),
            )])
            .unwrap();
        let vault = Vault::new(
            crate::vault::Kek::new(&[3; 32]).unwrap(),
            store.clone() as Arc<dyn Store>,
        );
        let seal = PositionSeal::load_or_create(store.as_ref(), &vault).unwrap();
        assert_eq!(seal.open(&held), Some(17));
        assert!(
            store
                .scan(Table::Meta)
                .unwrap()
                .iter()
                .all(|(k, _)| k != KEY_RECORD),
            "the plain key is gone"
        );
        let again = PositionSeal::load_or_create(store.as_ref(), &vault).unwrap();
        assert_eq!(again.open(&held), Some(17));
    }
}
