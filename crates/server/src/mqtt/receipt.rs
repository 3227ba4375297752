//! Receipts: what twinguard, not the broker, decided about a device's message. After a message
//! is ingested and its outcome is durable, twinguard publishes a COSE_Sign1 receipt on
//! `<prefix>/<device>`, signed with its own receipt key. A broker that acknowledged a message
//! proves nothing (an attacker holding twinguard's session acknowledges too); a receipt that
//! verifies with the receipt key does. A device re-sends each message until it holds a receipt
//! for its `seq` (see docs/telemetry-format.md).
//!
//! Only messages whose signature verified get a receipt: the outcome names a device and a
//! sequence number only then, so nobody can make twinguard sign a statement about a message the
//! device did not sign.

use std::path::{Path, PathBuf};

use anyhow::Context;
use aws_lc_rs::signature::Ed25519KeyPair;
use coset::{CoseSign1Builder, HeaderBuilder, TaggedCborSerializable, iana};
use ed25519_dalek::SigningKey;
use serde::Serialize;
use sha2::{Digest, Sha256};
use twinguard_telemetry::envelope::{DeviceKey, generate_key, signing_key_from_pem};
use twinguard_telemetry::{Outcome, Verdict};

use crate::datadir::{DataDir, write_private};
use crate::vault::Material;

/// The default topic prefix receipts are published under.
pub const DEFAULT_PREFIX: &str = "twinguard/receipts";

/// The receipt key: private in `secrets/mqtt-receipt-key` (PKCS#8 PEM, 0600), public as a JWK in
/// `mqtt/receipt-key.jwk` for devices and anyone else who checks receipts.
pub struct ReceiptKey {
    /// Signs with aws-lc-rs, as the event key does: 9 µs a signature against ed25519-dalek's
    /// 18 on this project's machine, one for each message a receipt answers (Ed25519
    /// signatures are deterministic: the bytes are the same).
    pair: Ed25519KeyPair,
    /// The RFC 7638 thumbprint of the public key: the receipts' `kid`.
    kid: String,
}

impl std::fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

pub fn private_path(data_dir: &DataDir) -> PathBuf {
    data_dir.root().join("secrets/mqtt-receipt-key")
}

pub fn public_path(data_dir: &DataDir) -> PathBuf {
    data_dir.root().join("mqtt/receipt-key.jwk")
}

impl ReceiptKey {
    /// Loads the receipt key, creating it (and its public JWK) at first use.
    pub fn load_or_create(data_dir: &DataDir, material: &Material) -> anyhow::Result<Self> {
        let (key, kid) = load_or_create_key(
            material,
            crate::vault::names::RECEIPT_KEY,
            &private_path(data_dir),
            &public_path(data_dir),
            "the MQTT receipt key",
        )?;
        let pair = Ed25519KeyPair::from_seed_and_public_key(
            key.as_bytes(),
            key.verifying_key().as_bytes(),
        )
        .map_err(|_| anyhow::anyhow!("the MQTT receipt key does not load"))?;
        Ok(Self { pair, kid })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The receipt for one message's outcome, if it has one (its signature verified).
    pub fn receipt(&self, outcome: &Outcome, envelope: &[u8], time: &str) -> Option<Receipt> {
        let device = outcome.device.as_ref()?;
        let seq = outcome.seq?;
        let body = Body {
            device,
            seq,
            status: match outcome.status {
                Verdict::Accepted => "accepted",
                Verdict::Quarantined => "quarantined",
                Verdict::Rejected => "rejected",
            },
            reason: outcome.reason,
            time,
            digest: serde_bytes(Sha256::digest(envelope).as_slice()),
        };
        let mut payload = Vec::new();
        if let Err(e) = ciborium::into_writer(&body, &mut payload) {
            tracing::error!(error = %e, "a receipt could not be encoded");
            return None;
        }
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::EdDSA)
            .key_id(self.kid.as_bytes().to_vec())
            .content_type(RECEIPT_CONTENT_TYPE.to_owned())
            .build();
        let sign1 = CoseSign1Builder::new()
            .protected(protected)
            .payload(payload)
            .create_signature(b"", |data| self.pair.sign(data).as_ref().to_vec())
            .build();
        match sign1.to_tagged_vec() {
            Ok(bytes) => Some(Receipt {
                device: device.clone(),
                bytes,
            }),
            Err(e) => {
                tracing::error!(error = %e, "a receipt could not be encoded");
                None
            }
        }
    }
}

/// The COSE content type of a receipt's payload.
pub const RECEIPT_CONTENT_TYPE: &str = "application/vnd.twinguard.receipt+cbor";

/// A signed receipt ready to publish.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub device: String,
    pub bytes: Vec<u8>,
}

/// A receipt's CBOR payload.
#[derive(Serialize)]
struct Body<'a> {
    device: &'a str,
    seq: u64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    time: &'a str,
    /// SHA-256 of the envelope as it arrived: binds the receipt to the exact message.
    digest: ciborium::Value,
}

fn serde_bytes(bytes: &[u8]) -> ciborium::Value {
    ciborium::Value::Bytes(bytes.to_vec())
}

/// The topic a device's receipts go to: `<prefix>/<device>`, the device ID with `%`, `/`, `+`,
/// `#` and NUL percent-encoded, since a topic level cannot hold them.
pub fn topic(prefix: &str, device: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + device.len());
    out.push_str(prefix.trim_end_matches('/'));
    out.push('/');
    for c in device.chars() {
        match c {
            '%' | '/' | '+' | '#' | '\0' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// An Ed25519 key of the instance's own: private at `private` (PKCS#8 PEM, 0600) or, on a
/// shared store, sealed in it as record `name` (`crate::vault::Material`), created at first use,
/// and its public half as a JWK at `public` (with `kid`, the RFC 7638 thumbprint). Returns the
/// key and its `kid`.
pub fn load_or_create_key(
    material: &Material,
    name: &str,
    private: &Path,
    public: &Path,
    what: &str,
) -> anyhow::Result<(SigningKey, String)> {
    for dir in [private.parent(), public.parent()].into_iter().flatten() {
        use std::os::unix::fs::DirBuilderExt;
        // Owner-only, as everything under the data directory.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let pem = material.private_pem(name, private, what, || {
        let (_, pem) = generate_key().with_context(|| format!("generating {what}"))?;
        Ok(pem)
    })?;
    let key = signing_key_from_pem(&pem).with_context(|| what.to_owned())?;
    let public_key = DeviceKey::from_bytes(key.verifying_key().as_bytes())
        .with_context(|| format!("the public half of {what}"))?;
    let kid = public_key.thumbprint();
    let mut jwk = public_key.to_jwk();
    jwk["kid"] = kid.clone().into();
    jwk["alg"] = "EdDSA".into();
    jwk["use"] = "sig".into();
    write_if_changed(public, &serde_json::to_vec_pretty(&jwk)?)?;
    Ok((key, kid))
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    write_private(path, bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_device_id_becomes_one_topic_level() {
        assert_eq!(topic("twinguard/receipts", "t1"), "twinguard/receipts/t1");
        assert_eq!(
            topic("twinguard/receipts/", "a/b+#%c"),
            "twinguard/receipts/a%2Fb%2B%23%25c"
        );
    }
}
