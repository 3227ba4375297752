//! The data directory and what first start puts in it: a local CA and server certificate, the
//! token signing key, the instance identity and the first admin client credential. Nothing is
//! built in; every secret is generated here, on this machine (control AC-8).
//!
//! ```text
//! DIR/store.redb                    the embedded store
//! DIR/instance.json                 instance ID and token issuer
//! DIR/tls/ca.pem                    the CA certificate clients trust
//! DIR/tls/ca-key.pem                the CA key (0600)
//! DIR/tls/server.pem, server-key.pem  the API certificate and key (0600)
//! DIR/secrets/token-signing-key.pem the Ed25519 token signing key (0600)
//! DIR/secrets/admin-client.json     {"client_id","client_secret","token_endpoint"} (0600)
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};

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
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("tls/ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("tls/ca-key.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls/server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls/server-key.pem")
    }
    pub fn signing_key(&self) -> PathBuf {
        self.root.join("secrets/token-signing-key.pem")
    }
    pub fn admin_client(&self) -> PathBuf {
        self.root.join("secrets/admin-client.json")
    }
    fn instance_file(&self) -> PathBuf {
        self.root.join("instance.json")
    }

    /// Creates whatever is missing: directories, instance identity, TLS material (the server
    /// certificate names `localhost`, `127.0.0.1`, `::1` and `extra_names`), the signing key.
    /// Existing material is never replaced.
    pub fn prepare(&self, extra_names: &[String]) -> anyhow::Result<Instance> {
        for (dir, mode) in [("", 0o700), ("tls", 0o755), ("secrets", 0o700)] {
            let path = self.root.join(dir);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
            if !dir.is_empty() || mode == 0o700 {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
            }
        }
        let instance = self.instance()?;
        if !self.ca_cert().exists() || !self.server_cert().exists() {
            self.create_tls(extra_names)?;
        }
        if !self.signing_key().exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
            write_private(&self.signing_key(), key.serialize_pem().as_bytes())?;
        }
        Ok(instance)
    }

    fn instance(&self) -> anyhow::Result<Instance> {
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

    fn create_tls(&self, extra_names: &[String]) -> anyhow::Result<()> {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "twinguard local CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, &ca_key);

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
        server.not_after = rcgen::date_time_ymd(2028, 1, 1);
        let server_cert = server.signed_by(&server_key, &issuer)?;

        write_private(&self.ca_key(), ca_key.serialize_pem().as_bytes())?;
        write_private(&self.server_key(), server_key.serialize_pem().as_bytes())?;
        write_public(&self.server_cert(), server_cert.pem().as_bytes())?;
        write_public(&self.ca_cert(), ca_cert.pem().as_bytes())?;
        Ok(())
    }
}

/// Writes a file readable by the owner only, atomically (temporary file, fsync, rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, bytes, 0o644)
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
    Ok(())
}
