//! Signed checkpoints in the C2SP formats that transparency-log tooling reads: `tlog-checkpoint`
//! (origin, tree size, base64 root hash, one per line) inside a `signed-note` with Ed25519
//! signatures (key type `0x01`).
//!
//! - A signature line is `— <key name> <base64(key ID || signature)>`, the key ID being the first
//!   four bytes of `SHA-256(<key name> "\n" 0x01 <public key>)`; the signature covers the note's
//!   text, up to and including its last newline.
//! - A verifier key is `<name>+<key ID, hex>+<base64(0x01 || public key)>`; a signer key is
//!   `PRIVATE+KEY+<name>+<key ID, hex>+<base64(0x01 || seed)>`.

use aws_lc_rs::rand::SecureRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

const ED25519_TYPE: u8 = 0x01;
const DASH: &str = "\u{2014} ";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed key: {0}")]
    Key(&'static str),
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("no valid signature by the expected key")]
    NotSigned,
    #[error("malformed checkpoint: {0}")]
    Checkpoint(&'static str),
}

fn key_id(name: &str, public: &[u8]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ED25519_TYPE]);
    h.update(public);
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(['+', ' ', '\n', '\t'])
        && !name.chars().any(char::is_control)
}

/// Signs notes with an Ed25519 key.
pub struct NoteSigner {
    name: String,
    id: [u8; 4],
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NoteSigner {
    /// A new key named `name`; returns the signer and its signer-key text (keep it secret).
    pub fn generate(name: &str) -> Result<(Self, String), NoteError> {
        if !valid_name(name) {
            return Err(NoteError::Key(
                "the key name must be non-empty, without '+' or spaces",
            ));
        }
        let mut seed = [0u8; 32];
        aws_lc_rs::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| NoteError::Key("no randomness"))?;
        let signer = Self::from_seed(name, &seed)?;
        let mut encoded = vec![ED25519_TYPE];
        encoded.extend_from_slice(&seed);
        let text = format!(
            "PRIVATE+KEY+{name}+{}+{}",
            hex::encode(signer.id),
            STANDARD.encode(&encoded)
        );
        Ok((signer, text))
    }

    fn from_seed(name: &str, seed: &[u8]) -> Result<Self, NoteError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| NoteError::Key("not an Ed25519 seed"))?;
        let id = key_id(name, pair.public_key().as_ref());
        Ok(Self {
            name: name.to_owned(),
            id,
            pair,
        })
    }

    /// Reads a signer key text (`PRIVATE+KEY+...`).
    pub fn from_key(text: &str) -> Result<Self, NoteError> {
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::Key("not a signer key"))?;
        // Names have no '+'; base64 may, so split from the left.
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(_id), Some(encoded)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::Key("expected name+id+key"));
        };
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| NoteError::Key("the key is not base64"))?;
        match bytes.split_first() {
            Some((&ED25519_TYPE, seed)) if seed.len() == 32 => Self::from_seed(name, seed),
            _ => Err(NoteError::Key("not an Ed25519 key")),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key text auditors are given.
    pub fn verifier_key(&self) -> String {
        let mut encoded = vec![ED25519_TYPE];
        encoded.extend_from_slice(self.pair.public_key().as_ref());
        format!(
            "{}+{}+{}",
            self.name,
            hex::encode(self.id),
            STANDARD.encode(&encoded)
        )
    }

    /// The signed note of `text` (which must end with a newline).
    pub fn sign(&self, text: &str) -> String {
        let signature = self.pair.sign(text.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(signature.as_ref());
        format!("{text}\n{DASH}{} {}\n", self.name, STANDARD.encode(&blob))
    }
}

/// Verifies notes signed by one Ed25519 key.
#[derive(Debug, Clone)]
pub struct NoteVerifier {
    name: String,
    id: [u8; 4],
    public: Vec<u8>,
}

impl NoteVerifier {
    /// Reads a verifier key text (`<name>+<id>+<base64>`), checking the ID matches the key.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id_hex), Some(encoded)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::Key("expected name+id+key"));
        };
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| NoteError::Key("the key is not base64"))?;
        let public = match bytes.split_first() {
            Some((&ED25519_TYPE, public)) if public.len() == 32 => public.to_vec(),
            _ => return Err(NoteError::Key("not an Ed25519 verifier key")),
        };
        let id = key_id(name, &public);
        if hex::encode(id) != id_hex.to_ascii_lowercase() || !valid_name(name) {
            return Err(NoteError::Key("the key ID does not match the key"));
        }
        Ok(Self {
            name: name.to_owned(),
            id,
            public,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Verifies a signed note and returns its text; other keys' signatures are ignored.
    pub fn verify<'n>(&self, note: &'n str) -> Result<&'n str, NoteError> {
        let split = note
            .rfind("\n\n")
            .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let text = &note[..split + 1];
        let signatures = &note[split + 2..];
        if !signatures.ends_with('\n') {
            return Err(NoteError::Malformed(
                "the signatures do not end with a newline",
            ));
        }
        let key = UnparsedPublicKey::new(&ED25519, &self.public);
        for line in signatures.lines() {
            let rest = line.strip_prefix(DASH).ok_or(NoteError::Malformed(
                "a signature line does not start with an em dash",
            ))?;
            let Some((name, encoded)) = rest.rsplit_once(' ') else {
                return Err(NoteError::Malformed("a signature line has no signature"));
            };
            if name != self.name {
                continue;
            }
            let Ok(blob) = STANDARD.decode(encoded) else {
                continue;
            };
            if blob.len() == 4 + 64
                && blob[..4] == self.id
                && key.verify(text.as_bytes(), &blob[4..]).is_ok()
            {
                return Ok(text);
            }
        }
        Err(NoteError::NotSigned)
    }
}

/// A checkpoint: the log's origin, its size and root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The note text of the checkpoint (C2SP tlog-checkpoint).
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// Parses a checkpoint's text (extension lines after the root are allowed and ignored).
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let mut lines = text.lines();
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(NoteError::Checkpoint("no origin"))?;
        let size = lines
            .next()
            .filter(|s| {
                s.bytes().all(|b| b.is_ascii_digit()) && !(s.len() > 1 && s.starts_with('0'))
            })
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(NoteError::Checkpoint("the size is not a decimal number"))?;
        let root = lines
            .next()
            .and_then(|r| STANDARD.decode(r).ok())
            .and_then(|r| <[u8; 32]>::try_from(r).ok())
            .ok_or(NoteError::Checkpoint(
                "the root is not a base64 SHA-256 hash",
            ))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn signed_checkpoints_round_trip_and_tampering_is_caught() {
        let (signer, secret) = NoteSigner::generate("twinguard.test/audit").unwrap();
        let again = NoteSigner::from_key(&secret).unwrap();
        assert_eq!(again.verifier_key(), signer.verifier_key());
        let verifier = NoteVerifier::parse(&signer.verifier_key()).unwrap();
        let checkpoint = Checkpoint {
            origin: "twinguard.test/audit".into(),
            size: 42,
            root: [7u8; 32],
        };
        let note = signer.sign(&checkpoint.text());
        assert!(note.contains("\n\n\u{2014} twinguard.test/audit "));
        let text = verifier.verify(&note).unwrap();
        assert_eq!(Checkpoint::parse(text).unwrap(), checkpoint);
        let tampered = note.replace("\n42\n", "\n43\n");
        assert_eq!(verifier.verify(&tampered), Err(NoteError::NotSigned));
        let (other, _) = NoteSigner::generate("twinguard.test/audit").unwrap();
        assert_eq!(
            verifier.verify(&other.sign(&checkpoint.text())),
            Err(NoteError::NotSigned)
        );
        // A wrong key ID in the verifier key is refused outright.
        let vkey = signer.verifier_key();
        let mut parts: Vec<&str> = vkey.split('+').collect();
        parts[1] = "00000000";
        assert!(NoteVerifier::parse(&parts.join("+")).is_err());
    }

    /// The key ID of the C2SP signed-note example key `PeterNeumann` (from golang.org/x/mod's
    /// note package documentation): `PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW`.
    #[test]
    fn verifier_keys_of_other_implementations_parse() {
        let key = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        let verifier = NoteVerifier::parse(key).unwrap();
        assert_eq!(verifier.name(), "PeterNeumann");
        let note = "If you think cryptography is the answer to your problem,\n\
                    then you don't know what your problem is.\n\
                    \n\
                    \u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
        assert!(verifier.verify(note).is_ok());
    }
}
