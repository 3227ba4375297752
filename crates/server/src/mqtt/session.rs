//! twinguard's MQTT session identity. The client ID names the broker's persistent session, and
//! whoever connects with it takes the session over, with every message queued in it. So it is
//! a secret: 128 random bits, made at first use and kept in `DATA_DIR/mqtt/session.json`
//! (0600), never derived from anything public. Releases before issue 18 used
//! `twinguard-<instance ID>`, and the instance ID is in the public token issuer; a session
//! left under that ID is drained once (see [`super::drain_legacy`]) and then ended.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::datadir::{DataDir, write_private};

/// `DATA_DIR/mqtt/session.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Session {
    /// Format version, 1.
    pub version: u32,
    /// The persistent session's client ID: `twinguard-` and 32 random hex digits.
    pub client_id: String,
    /// The derivable client ID of releases before issue 18, while the session it may name has
    /// not been drained and ended yet; `None` once that is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_client_id: Option<String>,
}

pub fn path(data_dir: &DataDir) -> PathBuf {
    data_dir.root().join("mqtt/session.json")
}

/// The client ID releases before issue 18 used, derivable from the public issuer.
pub fn legacy_client_id(instance_id: &str) -> String {
    format!("twinguard-{instance_id}")
}

/// A new random client ID.
pub fn random_client_id() -> String {
    let mut raw = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
    format!("twinguard-{}", hex::encode(raw))
}

impl Session {
    /// The session file, created at first use with a random client ID and the legacy ID to
    /// drain.
    pub fn load_or_create(data_dir: &DataDir, instance_id: &str) -> anyhow::Result<Self> {
        let path = path(data_dir);
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let session: Self = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", path.display()))?;
            anyhow::ensure!(
                session.version == 1,
                "{}: unknown version {}",
                path.display(),
                session.version
            );
            return Ok(session);
        }
        let session = Self {
            version: 1,
            client_id: random_client_id(),
            legacy_client_id: Some(legacy_client_id(instance_id)),
        };
        session.save(data_dir)?;
        tracing::info!(path = %path.display(), "created the MQTT session identity");
        Ok(session)
    }

    pub fn save(&self, data_dir: &DataDir) -> anyhow::Result<()> {
        write_private(&path(data_dir), &serde_json::to_vec_pretty(self)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_client_id_is_128_random_bits_and_never_the_instance() {
        let a = random_client_id();
        let b = random_client_id();
        assert_ne!(a, b);
        let hex = a.strip_prefix("twinguard-").unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn the_session_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path());
        data_dir.private_dir("mqtt").unwrap();
        let first = Session::load_or_create(&data_dir, "abc").unwrap();
        assert_eq!(first.legacy_client_id.as_deref(), Some("twinguard-abc"));
        assert_ne!(first.client_id, "twinguard-abc");
        let again = Session::load_or_create(&data_dir, "abc").unwrap();
        assert_eq!(first, again);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path(&data_dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
