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
use serde_json::{Value, json};
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
    /// Loads the key from `secrets/event-key` (or the shared store's sealed record), creating
    /// it (and `events/event-key.jwk`) at first use.
    pub fn load_or_create(
        data_dir: &DataDir,
        material: &crate::vault::Material,
    ) -> anyhow::Result<Self> {
        let public = data_dir.root().join("events/event-key.jwk");
        let (key, kid) = crate::mqtt::receipt::load_or_create_key(
            material,
            crate::vault::names::EVENT_KEY,
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

/// The CloudEvent for `event`: ADT's attributes and payload, with `source` the instance's host
/// name and the extension attribute `twinsequence` (the event's position among its twin's
/// events, 1, 2, 3...). Telemetry carries `telemetrysourcetime` when the sender gave one.
///
/// Serialized straight from the feed record's fields: a delivery builds no JSON tree. The
/// fields are in alphabetical order, the order the event's bytes have always had (a JSON
/// object of `serde_json` sorts its keys), so consumers see the same bytes as before.
#[derive(serde::Serialize)]
struct CloudEvent<'a> {
    data: &'a Value,
    datacontenttype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataschema: Option<&'a str>,
    id: &'a str,
    source: &'a str,
    specversion: &'static str,
    subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetrysourcetime: Option<&'a str>,
    time: &'a str,
    twinsequence: u64,
    #[serde(rename = "type")]
    event_type: &'a str,
}

impl<'a> CloudEvent<'a> {
    fn of(event: &'a FeedEvent, source: &'a str) -> Self {
        Self {
            data: &event.data,
            datacontenttype: "application/json",
            dataschema: event.dataschema.as_deref(),
            id: &event.id,
            source,
            specversion: "1.0",
            subject: &event.subject,
            telemetrysourcetime: event.source_time.as_deref(),
            time: &event.time,
            twinsequence: event.twin_seq,
            event_type: &event.event_type,
        }
    }
}

/// The CloudEvent for `event` as the JSON bytes delivered and signed.
pub fn cloud_event_bytes(event: &FeedEvent, source: &str) -> Vec<u8> {
    // Borrowed strings, a JSON value and numbers always serialize.
    serde_json::to_vec(&CloudEvent::of(event, source)).unwrap_or_default()
}

/// The CloudEvent for `event` as a JSON value, for route filters that look into it.
pub fn to_cloud_event(event: &FeedEvent, source: &str) -> Value {
    serde_json::to_value(CloudEvent::of(event, source)).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier};

    /// How the event's bytes were built before they were serialized from its fields: a JSON
    /// object, whose keys `serde_json` keeps sorted.
    fn reference_bytes(event: &FeedEvent, source: &str) -> Vec<u8> {
        let mut ce = serde_json::Map::new();
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
        serde_json::to_vec(&Value::Object(ce)).unwrap()
    }

    #[test]
    fn the_event_bytes_are_those_of_the_json_object_built_before() {
        let mut event = FeedEvent {
            seq: 1,
            id: "0b1c\"quoted\"".into(),
            event_type: twinguard_core::feed::TELEMETRY.into(),
            subject: "pump-\u{e9}/components/motor".into(),
            twin: "pump-\u{e9}".into(),
            twin_seq: u64::MAX,
            time: "2026-12-05T08:00:00.123456Z".into(),
            dataschema: None,
            component: Some("motor".into()),
            source_time: None,
            data: json!({"z": [1, 2.5, null], "a": {"\n": "\u{1f}"}, "m": true}),
        };
        for (schema, source_time) in [
            (None, None),
            (Some("dtmi:x:Motor;1"), None),
            (None, Some("2026-12-05T07:59:59Z")),
            (Some("dtmi:x:Motor;1"), Some("2026-12-05T07:59:59Z")),
        ] {
            event.dataschema = schema.map(str::to_owned);
            event.source_time = source_time.map(str::to_owned);
            let bytes = cloud_event_bytes(&event, "twins.example.com");
            assert_eq!(
                String::from_utf8(bytes.clone()).unwrap(),
                String::from_utf8(reference_bytes(&event, "twins.example.com")).unwrap()
            );
            assert_eq!(
                to_cloud_event(&event, "twins.example.com"),
                serde_json::from_slice::<Value>(&bytes).unwrap()
            );
        }
    }

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
