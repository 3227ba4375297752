//! The device registry (controls DI-3, DI-4): each device has its own Ed25519 public key, the
//! twins and property names it may write (least privilege), a status, and the firmware it last
//! attested. There are no shared or default credentials: a device exists only once registered
//! with its own key.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::envelope::DeviceKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    /// Its messages are refused until it is resumed.
    Suspended,
    /// Its key is refused for good.
    Revoked,
}

/// What a device may write: properties or telemetry `names` of `twin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub twin: String,
    pub names: Vec<String>,
}

/// A registered device, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub id: String,
    /// The public key as a JWK (`kty` OKP, `crv` Ed25519).
    pub public_key: serde_json::Value,
    /// RFC 7638 thumbprint of the key.
    pub key_thumbprint: String,
    /// The key this one replaced, still accepted until its `until` so that a device can switch
    /// keys without losing a message (see [`Device::keys`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key: Option<PreviousKey>,
    /// The device model, whose firmware allowlist applies.
    pub device_model: String,
    pub bindings: Vec<Binding>,
    pub status: Status,
    /// The firmware digest the device last reported in a signed message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// Set when a sensor group found the device disagreeing with its peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect: Option<Suspect>,
    /// Set when the device's readings waiting for review reached its quota: further readings
    /// that would be held are refused, not stored, until reviews make room. Cleared when an
    /// administrator sets the device's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_full: Option<QuarantineFull>,
    pub created: String,
}

/// A device's key before its last rotation, accepted until `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviousKey {
    pub public_key: serde_json::Value,
    pub key_thumbprint: String,
    /// RFC 3339, UTC: messages this key signs are refused from this instant on.
    pub until: String,
}

/// The keys a device's messages may be signed with, parsed once (checking a key costs a point
/// decompression and a scalar multiplication) and kept beside the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    pub current: DeviceKey,
    /// The previous key and the Unix millisecond from which it is refused.
    pub previous: Option<(DeviceKey, i64)>,
}

impl DeviceKeys {
    /// The previous key, while it is still accepted at `now_ms`.
    pub fn previous_at(&self, now_ms: i64) -> Option<&DeviceKey> {
        self.previous
            .as_ref()
            .and_then(|(key, until)| (now_ms < *until).then_some(key))
    }

    /// Whether a message signed with `key` is believed at `now_ms`.
    pub fn accept(&self, key: &DeviceKey, now_ms: i64) -> bool {
        self.current == *key || self.previous_at(now_ms) == Some(key)
    }
}

/// When a device reached its quarantine quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineFull {
    pub since: String,
    /// The quota it reached.
    pub quota: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Suspect {
    pub group: String,
    pub since: String,
    pub last_value: serde_json::Value,
    pub fused_value: serde_json::Value,
}

impl Device {
    /// The device's keys; `None` if the stored current key does not parse (a previous key that
    /// does not, or whose `until` does not, is dropped: it is refused rather than believed).
    pub fn keys(&self) -> Option<DeviceKeys> {
        let current = DeviceKey::from_jwk(&self.public_key).ok()?;
        let previous = self.previous_key.as_ref().and_then(|p| {
            let key = DeviceKey::from_jwk(&p.public_key).ok()?;
            let until = OffsetDateTime::parse(&p.until, &Rfc3339).ok()?;
            Some((key, (until.unix_timestamp_nanos() / 1_000_000) as i64))
        });
        Some(DeviceKeys { current, previous })
    }

    /// The thumbprints of the keys this record names: its key and its previous one, whether
    /// that one's overlap has ended or not (the record still names it, so no other device may
    /// take it; see `Table::DeviceKeys`).
    pub fn thumbprints(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.key_thumbprint.as_str())
            .chain(self.previous_key.iter().map(|p| p.key_thumbprint.as_str()))
    }

    /// The twin a reading without a `twin` field goes to: the only bound twin, if there is one.
    pub fn default_twin(&self) -> Option<&str> {
        match self.bindings.as_slice() {
            [only] => Some(&only.twin),
            _ => None,
        }
    }

    /// Whether the device may write `name` on `twin`.
    pub fn may_write(&self, twin: &str, name: &str) -> bool {
        self.bindings
            .iter()
            .any(|b| b.twin == twin && b.names.iter().any(|n| n == name))
    }
}

/// Checks a device ID: 1 to 128 characters of `A-Za-z0-9._:-` (the rule of the envelope's
/// `device` field).
pub fn check_device_id(id: &str) -> Result<(), String> {
    if crate::envelope::is_device_id(id) {
        Ok(())
    } else {
        Err("a device ID is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'".into())
    }
}

/// Approved firmware digests for one device model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FirmwareList {
    #[serde(default)]
    pub device_model: String,
    /// Lowercase hex SHA-256 digests.
    pub digests: Vec<String>,
}

impl FirmwareList {
    pub fn check_definition(&self) -> Result<(), String> {
        let hex =
            |d: &String| d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if self.digests.iter().all(hex) && self.digests.len() <= 1024 {
            Ok(())
        } else {
            Err("digests are at most 1024 lowercase hex SHA-256 values".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_restricted_to_a_safe_alphabet() {
        assert!(check_device_id("boiler-1.temp:a_b").is_ok());
        for bad in ["", "a b", "a/b", "ä", &"x".repeat(129)] {
            assert!(check_device_id(bad).is_err(), "{bad}");
        }
    }
}
