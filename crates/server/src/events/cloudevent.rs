//! A feed record as the CloudEvent consumers receive (CloudEvents 1.0, structured JSON), and
//! the instance's event key that signs it.
//!
//! The signature is Ed25519 over the exact bytes delivered (see `docs/events.md`): in a NATS
//! header and an MQTT 5 user property (`twinguard-signature`), and in the Standard Webhooks
//! `v1a` scheme for webhooks. The public key is published at `/.well-known/event-keys.json`
//! (a JWKS) and in `DATA_DIR/events/event-key.jwk`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::SigningKey;
use serde_json::{Map, Value, json};
use twinguard_core::feed::FeedEvent;

use crate::datadir::DataDir;

/// The instance's event signing key.
pub struct EventKey {
    /// The same key as aws-lc-rs signs with: its Ed25519 took half the time of ed25519-dalek's
    /// on this machine kind (12 against 26 µs for a 730-byte event, measured once with a
    /// throwaway program), and every event is signed. Ed25519 signatures are deterministic: both give the same bytes.
    key: aws_lc_rs::signature::Ed25519KeyPair,
    kid: String,
    jwk: Value,
}

impl std::fmt::Debug for EventKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl EventKey {
    /// Loads the key from `secrets/event-key`, creating it (and `events/event-key.jwk`) at
    /// first use.
    pub fn load_or_create(data_dir: &DataDir) -> anyhow::Result<Self> {
        let public = data_dir.root().join("events/event-key.jwk");
        let (key, kid) = crate::mqtt::receipt::load_or_create_key(
            &data_dir.root().join("secrets/event-key"),
            &public,
            "the event signing key",
        )?;
        let jwk = serde_json::from_slice(&std::fs::read(&public)?)?;
        Ok(Self {
            key: pair(&key)?,
            kid,
            jwk,
        })
    }

    /// A key for tests.
    pub fn from_key(key: SigningKey) -> anyhow::Result<Self> {
        Ok(Self {
            kid: "test".into(),
            jwk: json!({}),
            key: pair(&key)?,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key set consumers verify with.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk]})
    }

    /// The base64 Ed25519 signature of `bytes`.
    pub fn sign(&self, bytes: &[u8]) -> String {
        STANDARD.encode(self.key.sign(bytes).as_ref())
    }
}

/// aws-lc-rs's key pair for `key` (its public half checked against the seed's).
fn pair(key: &SigningKey) -> anyhow::Result<aws_lc_rs::signature::Ed25519KeyPair> {
    let seed = zeroize::Zeroizing::new(key.to_bytes());
    let pair = aws_lc_rs::signature::Ed25519KeyPair::from_seed_and_public_key(
        seed.as_slice(),
        key.verifying_key().as_bytes(),
    )
    .map_err(|_| anyhow::anyhow!("the event key is not a valid Ed25519 key"))?;
    Ok(pair)
}

/// The CloudEvent for `event`, as JSON bytes: ADT's attributes and payload, with `source` the
/// instance's host name and the extension attribute `twinsequence` (the event's position among
/// its twin's events, 1, 2, 3...). Telemetry carries `telemetrysourcetime` when the sender gave
/// one.
pub fn to_cloud_event(event: &FeedEvent, source: &str) -> Value {
    let mut ce = Map::new();
    ce.insert("specversion".into(), "1.0".into());
    ce.insert("id".into(), event.id.clone().into());
    ce.insert("type".into(), event.event_type.clone().into());
    ce.insert("source".into(), source.into());
    ce.insert("subject".into(), event.subject.clone().into());
    ce.insert("time".into(), event.time.clone().into());
    ce.insert("datacontenttype".into(), "application/json".into());
    if let Some(schema) = &event.dataschema {
        ce.insert("dataschema".into(), schema.clone().into());
    }
    ce.insert("twinsequence".into(), event.twin_seq.into());
    if let Some(time) = &event.source_time {
        ce.insert("telemetrysourcetime".into(), time.clone().into());
    }
    ce.insert("data".into(), event.data.clone());
    Value::Object(ce)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier};

    #[test]
    fn a_cloud_event_carries_adt_attributes_and_verifies() {
        let event = FeedEvent {
            seq: 7,
            id: "e1".into(),
            event_type: twinguard_core::feed::TWIN_UPDATE.into(),
            subject: "room1".into(),
            twin: "room1".into(),
            twin_seq: 3,
            time: "2026-12-05T08:00:00Z".into(),
            dataschema: Some("dtmi:x:Room;1".into()),
            component: None,
            source_time: None,
            data: json!({"modelId": "dtmi:x:Room;1", "patch": []}),
        };
        let ce = to_cloud_event(&event, "twins.example.com");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "Microsoft.DigitalTwins.Twin.Update");
        assert_eq!(ce["source"], "twins.example.com");
        assert_eq!(ce["subject"], "room1");
        assert_eq!(ce["twinsequence"], 3);
        assert!(ce.get("telemetrysourcetime").is_none());
        let key = EventKey::from_key(SigningKey::from_bytes(&[7; 32])).unwrap();
        let bytes = serde_json::to_vec(&ce).unwrap();
        let sig = STANDARD.decode(key.sign(&bytes)).unwrap();
        let sig = Signature::from_slice(&sig).unwrap();
        let public = SigningKey::from_bytes(&[7; 32]).verifying_key();
        assert!(public.verify(&bytes, &sig).is_ok());
        let mut altered = bytes.clone();
        altered[10] ^= 1;
        assert!(public.verify(&altered, &sig).is_err());
    }
}
