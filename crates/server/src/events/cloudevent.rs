//! A feed record as the CloudEvent consumers receive (CloudEvents 1.0, structured JSON), and
//! the instance's event key that signs it.
//!
//! The signature is Ed25519 over the exact bytes delivered (see `docs/events.md`): in a NATS
//! header and an MQTT 5 user property (`twinguard-signature`), and in the Standard Webhooks
//! `v1a` scheme for webhooks. The public key is published at `/.well-known/event-keys.json`
//! (a JWKS) and in `DATA_DIR/events/event-key.jwk`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::SigningKey;
use serde_json::Value;
use twinguard_core::feed::FeedEvent;
use twinguard_core::store::{StoreError, Table};
use zeroize::Zeroizing;

use crate::datadir::{DataDir, write_private};
use crate::signing_keys::{EVENT_KEYS, KeyRing, KeysHome, SharedRing};
use crate::tokens::now_secs;
use crate::vault::{Material, names};

/// The instance's event signing keys: a ring that rotates like the token keys
/// (`crate::signing_keys`), a successor published [`crate::signing_keys::PUBLISH_LEAD_SECS`]
/// before it signs, a replaced key published for as long as an event it signed may still be
/// delivered.
pub struct EventKey {
    keys: SharedRing,
    /// The active key as aws-lc-rs signs with it: its Ed25519 took half the time of
    /// ed25519-dalek's on this machine kind (12 against 26 µs for a 730-byte event, measured
    /// once with a throwaway program), and every event is signed. Ed25519 signatures are
    /// deterministic: both give the same bytes. Made again when another key becomes active.
    signer: Mutex<Arc<Signer>>,
    /// `DATA_DIR/events/event-keys.json`, the published set, kept equal to the ring.
    published: Option<PathBuf>,
}

struct Signer {
    kid: String,
    pair: aws_lc_rs::signature::Ed25519KeyPair,
}

impl Signer {
    fn of(key: &crate::signing_keys::SigningKey) -> anyhow::Result<Self> {
        let pair =
            aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&key.pkcs8_der()?)
                .map_err(|_| anyhow::anyhow!("the event key {} does not load", key.kid))?;
        Ok(Self {
            kid: key.kid.clone(),
            pair,
        })
    }
}

/// A signature and the key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSignature {
    /// The signing key's `kid` in the published set.
    pub kid: String,
    /// The Ed25519 signature, base64.
    pub value: String,
}

impl std::fmt::Debug for EventKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventKey").finish_non_exhaustive()
    }
}

/// The ring's name in messages.
const WHAT: &str = "event signing keys";

impl EventKey {
    /// The ring from `secrets/event-key` (or the shared store's sealed record), made at first
    /// use. A key kept alone there before the ring becomes a ring of one, under the `kid` it
    /// was published with.
    pub fn load_or_create(data_dir: &DataDir, material: &Material) -> anyhow::Result<Self> {
        let private = data_dir.root().join("secrets/event-key");
        let stored =
            material.secret(names::EVENT_KEY, &private, "the event signing key", || {
                KeyRing::generate(now_secs())?.to_json()
            })?;
        let ring = match legacy_key(&stored)? {
            None => KeyRing::from_json(&stored)?,
            Some(ring) => match material {
                Material::Files => {
                    write_private(&private, &ring.to_json()?)?;
                    ring
                }
                // Another node may have made the ring first: then its ring is taken.
                Material::Sealed(vault) => {
                    let updated =
                        vault.update(names::EVENT_KEY, "the event signing key", |plain| {
                            legacy_key(plain)?.map(|ring| ring.to_json()).transpose()
                        })?;
                    KeyRing::from_json(&updated.plain)?
                }
            },
        };
        let home = match material {
            Material::Files => KeysHome::File(private),
            Material::Sealed(vault) => KeysHome::Sealed(vault.clone()),
        };
        let events = data_dir.private_dir("events")?;
        // The single key's file from before the ring: the set below replaces it.
        let _ = std::fs::remove_file(events.join("event-key.jwk"));
        let key = Self::new(ring, home, Some(events.join("event-keys.json")))?;
        key.publish()?;
        Ok(key)
    }

    /// A ring of the one key `key`, kept nowhere (tests).
    pub fn from_key(key: SigningKey) -> anyhow::Result<Self> {
        let pem = ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(
            &key,
            ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF,
        )
        .map_err(|_| anyhow::anyhow!("cannot encode the event key"))?;
        let ring = KeyRing::of_one(Zeroizing::new(pem.to_string()), "test".into(), now_secs())?;
        Self::new(ring, KeysHome::Memory, None)
    }

    fn new(ring: KeyRing, home: KeysHome, published: Option<PathBuf>) -> anyhow::Result<Self> {
        let first = Arc::new(Signer::of(ring.active(now_secs()))?);
        Ok(Self {
            keys: SharedRing::new(names::EVENT_KEY, WHAT, EVENT_KEYS, ring, home),
            signer: Mutex::new(first),
            published,
        })
    }

    /// The public key set consumers verify with.
    pub fn jwks(&self) -> Value {
        match self.keys.read() {
            Ok(ring) => ring.jwks(),
            Err(poisoned) => poisoned.into_inner().jwks(),
        }
    }

    /// The Ed25519 signature of `bytes` by the key active now.
    pub fn sign(&self, bytes: &[u8]) -> EventSignature {
        self.sign_at(bytes, now_secs())
    }

    /// [`EventKey::sign`] at `now` (Unix seconds).
    pub fn sign_at(&self, bytes: &[u8], now: u64) -> EventSignature {
        let signer = self.signer(now);
        EventSignature {
            kid: signer.kid.clone(),
            value: STANDARD.encode(signer.pair.sign(bytes).as_ref()),
        }
    }

    fn signer(&self, now: u64) -> Arc<Signer> {
        let ring = match self.keys.read() {
            Ok(ring) => ring,
            Err(poisoned) => poisoned.into_inner(),
        };
        let active = ring.active(now);
        let mut cached = match self.signer.lock() {
            Ok(cached) => cached,
            Err(poisoned) => poisoned.into_inner(),
        };
        if cached.kid != active.kid {
            match Signer::of(active) {
                Ok(signer) => *cached = Arc::new(signer),
                // Checked when the ring was read; should it fail, the last key signs on.
                Err(e) => tracing::error!(error = %e, "the active event key was not taken"),
            }
        }
        cached.clone()
    }

    /// Rotates the ring when it is due (see `crate::signing_keys`), where it is kept.
    pub fn rotate_if_due(&self) -> anyhow::Result<()> {
        self.rotate_at(now_secs())
    }

    /// [`EventKey::rotate_if_due`] at `now` (Unix seconds).
    pub fn rotate_at(&self, now: u64) -> anyhow::Result<()> {
        if self.keys.rotate_at(now)? {
            self.publish()?;
        }
        Ok(())
    }

    /// Writes the published set to `events/event-keys.json` when it differs.
    fn publish(&self) -> anyhow::Result<()> {
        let Some(path) = &self.published else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&self.jwks())?;
        if std::fs::read(path).ok().as_deref() != Some(bytes.as_slice()) {
            write_private(path, &bytes)?;
        }
        Ok(())
    }
}

/// The event signing keys as other nodes sharing the store rotate them.
impl twinguard_core::follow::Follower for EventKey {
    fn follows(&self, table: Table) -> bool {
        table == Table::Secrets
    }

    fn changed(&self, _table: Table, keys: &[String]) -> Result<Vec<String>, StoreError> {
        if keys.iter().any(|k| k == names::EVENT_KEY) {
            self.reload()?;
        }
        Ok(Vec::new())
    }

    fn reload(&self) -> Result<Vec<(Table, String)>, StoreError> {
        self.keys.reload()?;
        self.publish().map_err(|e| StoreError(e.to_string()))?;
        Ok(Vec::new())
    }
}

/// The ring of one that a key stored alone (PKCS #8 PEM, before the ring) becomes, under the
/// `kid` it was published with (its RFC 7638 thumbprint); `None` for a stored ring.
fn legacy_key(stored: &[u8]) -> anyhow::Result<Option<KeyRing>> {
    if !stored.starts_with(b"-----BEGIN") {
        return Ok(None);
    }
    let pem = Zeroizing::new(
        String::from_utf8(stored.to_vec())
            .map_err(|_| anyhow::anyhow!("the stored event key is not PEM"))?,
    );
    let key = twinguard_telemetry::envelope::signing_key_from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("the stored event key: {e}"))?;
    let kid = twinguard_telemetry::envelope::DeviceKey::from_bytes(key.verifying_key().as_bytes())
        .map_err(|e| anyhow::anyhow!("the stored event key: {e}"))?
        .thumbprint();
    Ok(Some(KeyRing::of_one(pem, kid, now_secs())?))
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
    use serde_json::json;

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
        let sig = STANDARD.decode(key.sign(&bytes).value).unwrap();
        let sig = Signature::from_slice(&sig).unwrap();
        let public = SigningKey::from_bytes(&[7; 32]).verifying_key();
        assert!(public.verify(&bytes, &sig).is_ok());
        let mut altered = bytes.clone();
        altered[10] ^= 1;
        assert!(public.verify(&altered, &sig).is_err());
    }

    /// The published key with `kid`, as a consumer takes it from the set.
    fn published(jwks: &Value, kid: &str) -> ed25519_dalek::VerifyingKey {
        let jwk = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid)
            .unwrap_or_else(|| panic!("{kid} is not published in {jwks}"));
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwk["x"].as_str().unwrap())
            .unwrap();
        ed25519_dalek::VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap()
    }

    fn verifies(key: &EventKey, bytes: &[u8], signature: &EventSignature) -> bool {
        let sig = Signature::from_slice(&STANDARD.decode(&signature.value).unwrap()).unwrap();
        published(&key.jwks(), &signature.kid)
            .verify(bytes, &sig)
            .is_ok()
    }

    const DAY: u64 = 86_400;

    /// A successor is published an hour before it signs; the replaced key stays published for
    /// as long as an event it signed may still be delivered (seven days and the hour), then
    /// leaves. Every signature verifies with the published key its `kid` names, and the ring
    /// and `events/event-keys.json` survive a restart.
    #[test]
    fn the_event_key_rotates_publishing_the_successor_first_and_keeping_the_old_one_for_deliveries()
    {
        use crate::signing_keys::PUBLISH_LEAD_SECS;
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::new(root.path());
        dir.prepare_dirs().unwrap();
        let key = EventKey::load_or_create(&dir, &Material::Files).unwrap();
        let t0 = now_secs();
        let bytes = b"an event";
        let first = key.sign_at(bytes, t0);
        assert!(verifies(&key, bytes, &first));
        key.rotate_at(t0 + DAY).unwrap();
        assert_eq!(
            key.jwks()["keys"].as_array().unwrap().len(),
            1,
            "young: kept"
        );

        let due = t0 + 31 * DAY;
        key.rotate_at(due).unwrap();
        assert_eq!(key.jwks()["keys"].as_array().unwrap().len(), 2);
        assert_eq!(
            key.sign_at(bytes, due).kid,
            first.kid,
            "published, not signing yet"
        );
        let switched = due + PUBLISH_LEAD_SECS;
        let second = key.sign_at(bytes, switched);
        assert_ne!(second.kid, first.kid);
        assert!(verifies(&key, bytes, &second));
        let on_disk: Value = serde_json::from_slice(
            &std::fs::read(root.path().join("events/event-keys.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(on_disk, key.jwks());
        let again = EventKey::load_or_create(&dir, &Material::Files).unwrap();
        assert_eq!(
            again.jwks(),
            key.jwks(),
            "the ring is kept in secrets/event-key"
        );

        key.rotate_at(switched + 7 * DAY).unwrap();
        assert!(
            verifies(&key, bytes, &first),
            "still delivering events it signed"
        );
        key.rotate_at(switched + 7 * DAY + PUBLISH_LEAD_SECS + 1)
            .unwrap();
        let jwks = key.jwks();
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids, [second.kid.as_str()]);
    }

    /// A data directory from before the ring, its key alone in `secrets/event-key`: the key
    /// stays, published under the `kid` it had (its RFC 7638 thumbprint), the file now a ring.
    #[test]
    fn an_event_key_kept_alone_before_the_ring_signs_on_under_its_kid() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::new(root.path());
        dir.prepare_dirs().unwrap();
        let (public, pem) = twinguard_telemetry::envelope::generate_key().unwrap();
        std::fs::write(root.path().join("secrets/event-key"), pem.as_bytes()).unwrap();
        let key = EventKey::load_or_create(&dir, &Material::Files).unwrap();
        let signed = key.sign(b"an event");
        assert_eq!(signed.kid, public.thumbprint());
        assert!(verifies(&key, b"an event", &signed));
        let stored = std::fs::read(root.path().join("secrets/event-key")).unwrap();
        assert!(
            KeyRing::from_json(&stored).is_ok(),
            "the file is a ring now"
        );
        let again = EventKey::load_or_create(&dir, &Material::Files).unwrap();
        assert_eq!(again.sign(b"an event"), signed);
    }

    /// On a shared store, a rotation on node A is node B's after one step of B's change
    /// follower: B publishes A's successor and signs with it once it is active.
    #[test]
    fn a_rotation_of_the_event_key_on_one_node_is_every_nodes() {
        use twinguard_core::follow::ChangeFollower;
        use twinguard_core::service::{OwnerStore, TwinService};
        use twinguard_core::store::{MemoryStore, Owner, Store};
        let store = Arc::new(MemoryStore::shared());
        let twins =
            TwinService::open(store.clone(), Arc::new(twinguard_core::clock::SystemClock)).unwrap();
        let owned = OwnerStore::new(Owner::Identity, store.clone());
        owned.connect(twins.door(Owner::Identity));
        let owned: Arc<dyn Store> = Arc::new(owned);
        let follower = ChangeFollower::start(store.clone()).unwrap().unwrap();
        let node = || {
            let root = tempfile::tempdir().unwrap();
            let dir = DataDir::new(root.path());
            dir.prepare_dirs().unwrap();
            let vault =
                crate::vault::Vault::new(crate::vault::Kek::new(&[4; 32]).unwrap(), owned.clone());
            let material = Material::Sealed(Arc::new(vault));
            (
                Arc::new(EventKey::load_or_create(&dir, &material).unwrap()),
                root,
            )
        };
        let (a, _a_dir) = node();
        let (b, _b_dir) = node();
        follower.register(b.clone());
        assert_eq!(a.jwks(), b.jwks(), "one ring");

        let due = now_secs() + 31 * DAY;
        a.rotate_at(due).unwrap();
        assert_eq!(a.jwks()["keys"].as_array().unwrap().len(), 2);
        assert_ne!(a.jwks(), b.jwks());
        follower.step().unwrap();
        assert_eq!(b.jwks(), a.jwks(), "B follows A's rotation");
        let switched = due + crate::signing_keys::PUBLISH_LEAD_SECS;
        assert_eq!(a.sign_at(b"e", switched), b.sign_at(b"e", switched));
    }
}
