//! Store positions as clients see them: sealed. A write's answer names the position of the
//! store that holds it (`Twinguard-Position`), and a client presents it to any node
//! (`Twinguard-Min-Position`, `crate::http::consistency`). The number itself would tell a client
//! how many commits everyone made between two of its own writes, including writes to twins it
//! may not see; so the header carries the position encrypted under an instance key: one AES-256
//! block (a pseudorandom permutation of the 8-byte position with its padding), which only a
//! node can open and which says nothing about order or distance. A block that does not open to
//! a well-padded 8-byte position (any forged or altered one, but for a 2^-64 chance) is refused.
//!
//! ECB here is one block per value by construction, a permutation on purpose: equal positions
//! give equal tokens, which reveals no more than that two answers came from the same commit.
//!
//! The key is in the main store (`Table::Meta`, `position.key`), so every node sharing the store
//! uses the same one; it is made at the first start on a shared store.

use aws_lc_rs::cipher::{
    AES_256, PaddedBlockDecryptingKey, PaddedBlockEncryptingKey, UnboundCipherKey,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use twinguard_core::store::{Fenced, Mutation, Store, Table};

/// The `Table::Meta` key of the instance's position key.
pub const KEY_RECORD: &str = "position.key";

pub struct PositionSeal {
    encrypt: PaddedBlockEncryptingKey,
    decrypt: PaddedBlockDecryptingKey,
}

impl std::fmt::Debug for PositionSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PositionSeal").finish_non_exhaustive()
    }
}

impl PositionSeal {
    pub fn new(key: &[u8; 32]) -> anyhow::Result<Self> {
        let unbound = || {
            UnboundCipherKey::new(&AES_256, key).map_err(|_| anyhow::anyhow!("not an AES-256 key"))
        };
        Ok(Self {
            encrypt: PaddedBlockEncryptingKey::ecb_pkcs7(unbound()?)
                .map_err(|_| anyhow::anyhow!("AES-256 is not available"))?,
            decrypt: PaddedBlockDecryptingKey::ecb_pkcs7(unbound()?)
                .map_err(|_| anyhow::anyhow!("AES-256 is not available"))?,
        })
    }

    /// The instance's seal, from the store's key record, made (once, whichever node is first)
    /// if missing.
    pub fn load_or_create(store: &dyn Store) -> anyhow::Result<Self> {
        for _ in 0..8 {
            if let Some((_, value)) = store
                .range(Table::Meta, KEY_RECORD, &format!("{KEY_RECORD}\0"), 1)?
                .pop()
            {
                let raw = STANDARD
                    .decode(&value)
                    .ok()
                    .and_then(|raw| <[u8; 32]>::try_from(raw).ok())
                    .ok_or_else(|| anyhow::anyhow!("the stored position key is unreadable"))?;
                return Self::new(&raw);
            }
            let mut raw = [0u8; 32];
            aws_lc_rs::rand::fill(&mut raw)
                .map_err(|_| anyhow::anyhow!("no randomness for the position key"))?;
            let record = [Mutation::put(
                Table::Meta,
                KEY_RECORD,
                STANDARD.encode(raw).into_bytes(),
            )];
            // Fenced, so of two nodes starting at once one key wins and both read it.
            match store.head()? {
                Some(head) => {
                    if let Fenced::Committed(_) = store.commit_at(&record, head)? {
                        return Self::new(&raw);
                    }
                }
                None => {
                    store.commit(&record)?;
                    return Self::new(&raw);
                }
            }
        }
        anyhow::bail!("other nodes kept committing while the position key was made")
    }

    /// The token a client is given for `position`: 32 hex digits.
    pub fn seal(&self, position: u64) -> Option<String> {
        let mut block = position.to_be_bytes().to_vec();
        self.encrypt.encrypt(&mut block).ok()?;
        Some(block.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The position a token names, if it is one of this instance's.
    pub fn open(&self, token: &str) -> Option<u64> {
        let token = token.trim();
        if token.len() != 32 || !token.is_ascii() {
            return None;
        }
        let mut block = (0..16)
            .map(|i| u8::from_str_radix(token.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let context = aws_lc_rs::cipher::DecryptionContext::None;
        let plain = self.decrypt.decrypt(&mut block, context).ok()?;
        Some(u64::from_be_bytes(<[u8; 8]>::try_from(&*plain).ok()?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use twinguard_core::store::MemoryStore;

    use super::*;

    #[test]
    fn a_sealed_position_opens_to_itself_and_says_nothing_of_its_order() {
        let seal = PositionSeal::new(&[7u8; 32]).unwrap();
        for position in [0, 1, 2, 41, 42, u64::MAX] {
            let token = seal.seal(position).unwrap();
            assert_eq!(token.len(), 32);
            assert_eq!(seal.open(&token), Some(position));
        }
        // Neighbours share no prefix worth the name: the tokens are unrelated blocks.
        let (a, b) = (seal.seal(41).unwrap(), seal.seal(42).unwrap());
        let same = a.chars().zip(b.chars()).filter(|(x, y)| x == y).count();
        assert!(same < 8, "{a} {b}");
        // Another instance's key opens none of them.
        let other = PositionSeal::new(&[8u8; 32]).unwrap();
        assert_eq!(other.open(&a), None);
    }

    #[test]
    fn an_altered_or_made_up_token_is_refused() {
        let seal = PositionSeal::new(&[7u8; 32]).unwrap();
        let token = seal.seal(42).unwrap();
        for i in 0..token.len() {
            let mut altered: Vec<char> = token.chars().collect();
            altered[i] = if altered[i] == '0' { '1' } else { '0' };
            let altered: String = altered.into_iter().collect();
            assert_eq!(seal.open(&altered), None, "{altered}");
        }
        for junk in [
            "",
            "42",
            "soon",
            &"z".repeat(32),
            &"0".repeat(31),
            "é".repeat(16).as_str(),
        ] {
            assert_eq!(seal.open(junk), None, "{junk}");
        }
    }

    #[test]
    fn nodes_sharing_a_store_share_one_key() {
        let store = MemoryStore::shared();
        let first = PositionSeal::load_or_create(&store).unwrap();
        let second = PositionSeal::load_or_create(&store).unwrap();
        let token = first.seal(9).unwrap();
        assert_eq!(second.open(&token), Some(9));
    }
}
