//! The data directory and what first start puts in it: a local CA and server certificate, the
//! token signing key, the instance identity and the first admin client credential. Nothing is
//! built in; every secret is generated here, on this machine (control AC-8).
//!
//! ```text
//! DIR/store.redb                    the embedded store (not with serve --store postgresql://...)
//! DIR/history.redb                  accepted readings' history, by twin, name and time
//! DIR/instance.json                 instance ID and token issuer
//! DIR/restore-incomplete            only while `twinguard restore` runs (the server will not start)
//! DIR/audit-archive/NAME/           audit trails brought in by `twinguard restore`
//! DIR/tls/ca.pem                    the CA certificates clients trust (`crate::ca`)
//! DIR/secrets/ca.json               the CA ring: certificates and keys (0600)
//! DIR/tls/server.pem, server-key.pem  the API certificate and key (0600)
//! DIR/secrets/token-keys.json      the Ed25519 token signing keys, rotated (0600)
//! DIR/secrets/instance.kek          on a shared store only: the key-encryption key that opens
//!                                   the instance's material sealed in the store (`crate::vault`),
//!                                   which there replaces ca.json, token-keys.json, event-key
//!                                   and mqtt-receipt-key (0600)
//! DIR/secrets/admin-client.json     {"client_id","client_secret","token_endpoint"} (0600)
//! DIR/secrets/mqtt-receipt-key      the Ed25519 key MQTT receipts are signed with (0600)
//! DIR/mqtt/session.json             the MQTT session's random client ID (0600)
//! DIR/mqtt/receipt-key.jwk          the receipt key's public JWK, for devices (0600)
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::ca::{Ca, CaRing};
use crate::signing_keys::KeyRing;
use crate::vault::Material;

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Instance {
    pub version: u32,
    pub instance_id: String,
    pub issuer: String,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn store_path(&self) -> PathBuf {
        self.root.join("store.redb")
    }

    /// Accepted readings' history, merged from the main store's log (see the telemetry crate).
    pub fn history_path(&self) -> PathBuf {
        self.root.join("history.redb")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("tls/ca.pem")
    }
    /// Where instances before the CA ring kept the CA's key; adopted into the ring at start.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("tls/ca-key.pem")
    }
    /// The CA ring, on the embedded store (`crate::ca`).
    pub fn ca_ring(&self) -> PathBuf {
        self.root.join("secrets/ca.json")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls/server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls/server-key.pem")
    }
    pub fn token_keys(&self) -> PathBuf {
        self.root.join("secrets/token-keys.json")
    }
    pub fn admin_client(&self) -> PathBuf {
        self.root.join("secrets/admin-client.json")
    }
    /// `DIR/<name>`, created owner-only (0700) if missing.
    pub fn private_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.root.join(name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
        Ok(path)
    }
    fn instance_file(&self) -> PathBuf {
        self.root.join("instance.json")
    }

    /// Creates whatever is missing: directories, instance identity, TLS material (the server
    /// certificate names `localhost`, `127.0.0.1`, `::1` and `extra_names`), the signing keys,
    /// all as files (the embedded store's way; on a shared store, [`DataDir::prepare_dirs`] and
    /// [`DataDir::tls`] with the store's sealed material). Existing material is kept, except a
    /// server certificate within [`RENEW_BEFORE_DAYS`] of its expiry, which is issued anew by the
    /// local CA.
    pub fn prepare(&self, extra_names: &[String]) -> anyhow::Result<Instance> {
        let instance = self.prepare_dirs()?;
        let ring = crate::ca::load(self, &Material::Files)?;
        self.install_ca(extra_names, &ring)?;
        if !self.token_keys().exists() {
            let now = OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
            KeyRing::generate(now)?.save(&self.token_keys())?;
        }
        Ok(instance)
    }

    /// The directories and the instance identity, created if missing.
    pub fn prepare_dirs(&self) -> anyhow::Result<Instance> {
        // Everything under the data directory is the server's own: directories 0700, files
        // 0600, whatever the umask. The certificates are public, but nobody else needs them
        // here (clients get the CA from the operator).
        for dir in ["", "tls", "secrets"] {
            let path = self.root.join(dir);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
        }
        self.instance()
    }

    /// Writes this node's files from the CA `ring`: the trust bundle `tls/ca.pem` (every
    /// authority of the ring) and a server certificate issued by the issuing authority, anew
    /// when it is missing, near its expiry, or another authority issued it.
    pub fn install_ca(&self, extra_names: &[String], ring: &CaRing) -> anyhow::Result<()> {
        let bundle = ring.bundle_pem();
        if fs::read_to_string(self.ca_cert()).ok().as_deref() != Some(&bundle) {
            write_public(&self.ca_cert(), bundle.as_bytes())?;
        }
        if self.server_cert_due(ring.issuing().fingerprint())? {
            self.issue_server_cert(extra_names, ring.issuing())?;
        }
        Ok(())
    }

    /// This node's key-encryption key for the instance's sealed material (`crate::vault`).
    pub fn kek(&self) -> PathBuf {
        self.root.join("secrets/instance.kek")
    }

    /// The instance's identity, as the first start recorded it.
    pub fn instance(&self) -> anyhow::Result<Instance> {
        let path = self.instance_file();
        if path.exists() {
            let text = fs::read_to_string(&path)?;
            return serde_json::from_str(&text)
                .with_context(|| format!("reading {}", path.display()));
        }
        let instance_id = uuid::Uuid::new_v4().to_string();
        let instance = Instance {
            version: 1,
            issuer: format!("urn:twinguard:{instance_id}"),
            instance_id,
        };
        write_private(&path, &serde_json::to_vec_pretty(&instance)?)?;
        Ok(instance)
    }

    /// The instance's identity if the directory has one; unlike [`DataDir::instance`], creates
    /// nothing.
    pub fn existing_instance(&self) -> anyhow::Result<Option<Instance>> {
        if self.instance_file().exists() {
            self.instance().map(Some)
        } else {
            Ok(None)
        }
    }

    /// Takes `instance` as this directory's identity (a restore): only a directory without
    /// one, created owner-only if missing.
    pub fn adopt_instance(&self, instance: &Instance) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.instance_file().exists(),
            "{} already has an instance identity",
            self.root.display()
        );
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        write_private(&self.instance_file(), &serde_json::to_vec_pretty(instance)?)
    }

    /// Present while a restore into this directory has not finished (`twinguard restore`);
    /// the server refuses to start beside it.
    pub fn restore_marker(&self) -> PathBuf {
        self.root.join("restore-incomplete")
    }

    fn server_cert_meta(&self) -> PathBuf {
        self.root.join("tls/server.json")
    }

    /// True when the server certificate is missing, its record is, it expires within
    /// [`RENEW_BEFORE_DAYS`], or an authority other than `issuer` (a fingerprint) issued it.
    fn server_cert_due(&self, issuer: &str) -> anyhow::Result<bool> {
        if !self.server_cert().exists() {
            return Ok(true);
        }
        let Ok(text) = fs::read_to_string(self.server_cert_meta()) else {
            return Ok(true);
        };
        let meta: ServerCertMeta = serde_json::from_str(&text)?;
        if meta.issuer.as_deref() != Some(issuer) {
            return Ok(true);
        }
        let renew_at = meta.not_after - Duration::days(RENEW_BEFORE_DAYS).whole_seconds();
        Ok(OffsetDateTime::now_utc().unix_timestamp() >= renew_at)
    }

    /// Issues a server certificate valid for [`SERVER_CERT_DAYS`] with the local CA's key.
    fn issue_server_cert(&self, extra_names: &[String], ca: &Ca) -> anyhow::Result<()> {
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        names.extend(extra_names.iter().filter(|n| !n.is_empty()).cloned());
        names.sort();
        names.dedup();
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut server = CertificateParams::new(names)?;
        server
            .distinguished_name
            .push(DnType::CommonName, "twinguard");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        server.not_before = now - Duration::hours(1);
        server.not_after = now + Duration::days(SERVER_CERT_DAYS);
        let server_cert = ca.sign(|issuer| server.signed_by(&server_key, issuer))??;
        write_private(&self.server_key(), server_key.serialize_pem().as_bytes())?;
        write_public(&self.server_cert(), server_cert.pem().as_bytes())?;
        let meta = ServerCertMeta {
            not_after: server.not_after.unix_timestamp(),
            issuer: Some(ca.fingerprint().to_owned()),
        };
        write_public(&self.server_cert_meta(), &serde_json::to_vec(&meta)?)?;
        tracing::info!(not_after = %server.not_after, issuer = ca.fingerprint(), "issued the server certificate");
        Ok(())
    }
}

/// Days a server certificate is valid (the CA/Browser Forum's 397-day ceiling).
pub const SERVER_CERT_DAYS: i64 = 397;
/// A server certificate this close to its expiry is issued anew at start-up.
pub const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServerCertMeta {
    /// Expiry of `server.pem`, Unix seconds.
    not_after: i64,
    /// The fingerprint of the authority that issued it (absent before the CA ring: issued
    /// again at the next start).
    #[serde(default)]
    issuer: Option<String>,
}

/// Writes a file readable by the owner only, atomically (temporary file, fsync, rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, bytes, 0o600)
}

/// Certificates and their metadata: public, yet kept owner-only like everything in the data
/// directory.
fn write_public(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, bytes, 0o600)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    // The rename is durable only once the directory entry is.
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;

    fn verify_chain(dir: &DataDir) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca = CertificateDer::from_pem_file(dir.ca_cert()).unwrap();
        let server = CertificateDer::from_pem_file(dir.server_cert()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca).unwrap();
        let verifier = WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .unwrap();
        for name in ["localhost", "127.0.0.1"] {
            let name = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&server, &[], &name, &[], UnixTime::now())
                .unwrap();
        }
    }

    #[test]
    fn a_server_certificate_near_expiry_is_renewed_by_the_same_ca_at_start_up() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::new(root.path());
        dir.prepare(&[]).unwrap();
        verify_chain(&dir);
        let ca_before = fs::read(dir.ca_cert()).unwrap();
        let server_before = fs::read(dir.server_cert()).unwrap();

        // Still far from expiry: nothing changes.
        dir.prepare(&[]).unwrap();
        assert_eq!(fs::read(dir.server_cert()).unwrap(), server_before);

        // Ten days left: renewed, by the same CA.
        let soon = OffsetDateTime::now_utc() + Duration::days(10);
        let meta = ServerCertMeta {
            not_after: soon.unix_timestamp(),
            issuer: serde_json::from_slice::<ServerCertMeta>(
                &fs::read(dir.server_cert_meta()).unwrap(),
            )
            .unwrap()
            .issuer,
        };
        fs::write(dir.server_cert_meta(), serde_json::to_vec(&meta).unwrap()).unwrap();
        dir.prepare(&[]).unwrap();
        assert_ne!(fs::read(dir.server_cert()).unwrap(), server_before);
        assert_eq!(fs::read(dir.ca_cert()).unwrap(), ca_before);
        verify_chain(&dir);
    }

    #[test]
    fn secrets_are_private_and_the_secrets_directory_is_closed() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::new(root.path());
        dir.prepare(&[]).unwrap();
        for path in [dir.ca_ring(), dir.server_key(), dir.token_keys()] {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let mode = fs::metadata(root.path().join("secrets"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }
}
