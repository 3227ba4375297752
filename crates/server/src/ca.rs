//! The instance's certificate authority, and its rotation while every node serves
//! (`docs/storage.md`, "Rotating the CA").
//!
//! The CA issues the nodes' server certificates and workloads' client certificates. It is kept
//! as a ring of at most [`MAX_AUTHORITIES`] authorities, oldest first, one of them issuing:
//!
//! 1. `add`: a new authority at the end of the ring. It is trusted at once (it joins the trust
//!    bundle, `DATA_DIR/tls/ca.pem`, and the verifier of client certificates) and issues
//!    nothing yet, so clients can be given the bundle before anything chains to it.
//! 2. `rotate`: the newest authority issues. Each node issues itself a server certificate under
//!    it and serves that from its next handshake on; workloads' certificates are issued under
//!    it. Certificates of the older authorities stay trusted.
//! 3. `retire`: the authorities older than the issuing one leave the ring, and with it the trust
//!    bundle and the verifier. Refused while a live client certificate one of them issued is
//!    recorded, unless forced.
//!
//! Nodes on a shared store take the ring from its sealed record (`crate::vault::names::CA`) and
//! follow its changes (`twinguard_core::follow`); the embedded store's node keeps it in
//! `DATA_DIR/secrets/ca.json`. Either way a node changes its TLS configuration in place: no
//! listener closes and no connection drops.

use std::sync::{Arc, Mutex, OnceLock, RwLock};

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use rcgen::{IsCa, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use twinguard_core::store::{StoreError, Table};
use zeroize::Zeroizing;

use crate::datadir::{DataDir, write_private};
use crate::vault::{Material, Vault, names, remove_moved};

/// Authorities a ring holds at most: the one retiring, the one issuing and the next.
pub const MAX_AUTHORITIES: usize = 3;

/// Days a workload's client certificate is valid; it renews with `POST /me/certificate`.
pub const CLIENT_CERT_DAYS: i64 = 30;

/// Days an authority is valid.
const CA_DAYS: i64 = 3_650;

/// A client certificate issued to a workload.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    pub pem: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// The issuing authority's fingerprint ([`Ca::fingerprint`]).
    pub issuer: String,
}

/// The prefix of the URI SAN naming the identity a client certificate belongs to.
pub const IDENTITY_URI_PREFIX: &str = "urn:twinguard:identity:";

/// The URI SAN naming the identity a client certificate belongs to.
pub fn identity_uri(identity_id: &str) -> String {
    format!("{IDENTITY_URI_PREFIX}{identity_id}")
}

/// One authority: its certificate and key.
#[derive(Clone)]
pub struct Ca {
    cert_pem: String,
    key_pem: Zeroizing<String>,
    fingerprint: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// An authority as stored.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredCa {
    cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl Ca {
    fn new(cert_pem: String, key_pem: Zeroizing<String>) -> anyhow::Result<Self> {
        KeyPair::from_pem(&key_pem).context("the CA key is not a PEM key")?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .context("the CA certificate is not PEM")?;
        let fingerprint = hex::encode(Sha256::digest(der.as_ref()));
        Ok(Self {
            cert_pem,
            key_pem,
            fingerprint,
        })
    }

    fn generate() -> anyhow::Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let serial = random_serial();
        // Each authority has a subject of its own, so a verifier never mistakes one for another.
        let mut params = ca_params(&format!("twinguard local CA {}", hex::encode(&serial[..4])))?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(CA_DAYS);
        let cert = params.self_signed(&key)?;
        Self::new(cert.pem(), Zeroizing::new(key.serialize_pem()))
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the certificate (DER), lowercase hex: how records and answers name it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The issuer that signs with this authority's key under its own subject.
    pub(crate) fn sign<T>(&self, f: impl FnOnce(&Issuer<'_, KeyPair>) -> T) -> anyhow::Result<T> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key)
            .context("the CA certificate cannot sign")?;
        Ok(f(&issuer))
    }

    /// Signs a client certificate for workload `identity_id` from its CSR. Only the CSR's
    /// public key is used (its proof of possession is checked); the subject, names, usages and
    /// validity are the CA's choice: the identity's URI, client authentication only,
    /// [`CLIENT_CERT_DAYS`].
    pub fn issue_client_cert(
        &self,
        identity_id: &str,
        csr_pem: &str,
    ) -> anyhow::Result<ClientCertificate> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("the certificate signing request is not valid: {e}"))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, identity_id);
        params.subject_alt_names = vec![rcgen::SanType::URI(identity_uri(identity_id).try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let serial = random_serial();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(CLIENT_CERT_DAYS);
        let request = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let signed = self.sign(|issuer| request.signed_by(issuer))??;
        Ok(ClientCertificate {
            pem: signed.pem(),
            serial: hex::encode(serial),
            not_after: u64::try_from((now + Duration::days(CLIENT_CERT_DAYS)).unix_timestamp())
                .unwrap_or(0),
            issuer: self.fingerprint.clone(),
        })
    }
}

/// An authority's parameters. Its certificate carries them; a certificate it issues names it
/// by its subject, read back from the certificate when it signs.
fn ca_params(name: &str) -> anyhow::Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// Sixteen random bytes for a certificate's serial number: positive and without a leading zero
/// byte, so DER keeps all sixteen as given.
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x01;
    serial
}

/// The ring as stored: sealed in the shared store, or `DATA_DIR/secrets/ca.json`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredRing {
    authorities: Vec<StoredCa>,
    issuing: usize,
}

/// Either form a stored CA takes: the ring, or the one authority an instance from before the
/// ring stored.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyStored {
    Ring(StoredRing),
    One(StoredCa),
}

/// Why a step of the rotation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("the ring already holds a newer authority than the issuing one: rotate to it first")]
    NextPending,
    #[error("the ring holds {MAX_AUTHORITIES} authorities: retire the older ones first")]
    Full,
    #[error("no authority is newer than the issuing one: add one first")]
    NothingToRotateTo,
    #[error("no authority is older than the issuing one: nothing to retire")]
    NothingToRetire,
    #[error(
        "{0} live client certificates were issued by the authorities to retire: they would fail \
         their next handshake; renew or revoke them first, or retire with force"
    )]
    LiveCertificates(usize),
}

/// The authorities, oldest first, and which of them issues.
#[derive(Debug, Clone)]
pub struct CaRing {
    authorities: Vec<Ca>,
    issuing: usize,
}

impl CaRing {
    /// A ring of one new authority.
    pub fn generate() -> anyhow::Result<Self> {
        Ok(Self::one(Ca::generate()?))
    }

    fn one(ca: Ca) -> Self {
        Self {
            authorities: vec![ca],
            issuing: 0,
        }
    }

    pub fn from_json(bytes: &[u8]) -> anyhow::Result<Self> {
        let stored: AnyStored =
            serde_json::from_slice(bytes).context("the stored CA is not readable")?;
        let (authorities, issuing) = match stored {
            AnyStored::Ring(ring) => (ring.authorities, ring.issuing),
            AnyStored::One(one) => (vec![one], 0),
        };
        anyhow::ensure!(
            (1..=MAX_AUTHORITIES).contains(&authorities.len()) && issuing < authorities.len(),
            "the stored CA ring is malformed"
        );
        let authorities = authorities
            .into_iter()
            .map(|a| Ca::new(a.cert_pem, a.key_pem))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            authorities,
            issuing,
        })
    }

    pub fn to_json(&self) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        Ok(Zeroizing::new(serde_json::to_vec(&StoredRing {
            authorities: self
                .authorities
                .iter()
                .map(|a| StoredCa {
                    cert_pem: a.cert_pem.clone(),
                    key_pem: a.key_pem.clone(),
                })
                .collect(),
            issuing: self.issuing,
        })?))
    }

    /// The authority that issues.
    pub fn issuing(&self) -> &Ca {
        &self.authorities[self.issuing]
    }

    /// Every authority's certificate, oldest first: what clients and the verifier of client
    /// certificates trust.
    pub fn bundle_pem(&self) -> String {
        self.authorities
            .iter()
            .map(|a| a.cert_pem.trim_end().to_owned() + "\n")
            .collect()
    }

    /// The authorities newer than the issuing one (added, not rotated to).
    pub fn after_issuing(&self) -> Vec<String> {
        self.authorities[self.issuing + 1..]
            .iter()
            .map(|a| a.fingerprint.clone())
            .collect()
    }

    /// Adds a new authority at the end, trusted and not issuing.
    pub fn add(&mut self) -> anyhow::Result<Result<(), Refused>> {
        if self.issuing + 1 < self.authorities.len() {
            return Ok(Err(Refused::NextPending));
        }
        if self.authorities.len() >= MAX_AUTHORITIES {
            return Ok(Err(Refused::Full));
        }
        self.authorities.push(Ca::generate()?);
        Ok(Ok(()))
    }

    /// Makes the newest authority the issuing one.
    pub fn rotate(&mut self) -> Result<(), Refused> {
        if self.issuing + 1 == self.authorities.len() {
            return Err(Refused::NothingToRotateTo);
        }
        self.issuing = self.authorities.len() - 1;
        Ok(())
    }

    /// Removes the authorities older than the issuing one.
    pub fn retire(&mut self) -> Result<(), Refused> {
        if self.issuing == 0 {
            return Err(Refused::NothingToRetire);
        }
        self.authorities.drain(..self.issuing);
        self.issuing = 0;
        Ok(())
    }

    /// The ring as `GET /admin/ca` shows it: no key, of course.
    pub fn view(&self) -> serde_json::Value {
        let authorities: Vec<serde_json::Value> = self
            .authorities
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let state = match i.cmp(&self.issuing) {
                    std::cmp::Ordering::Less => "retiring",
                    std::cmp::Ordering::Equal => "issuing",
                    std::cmp::Ordering::Greater => "next",
                };
                let (not_before, not_after) = validity(&a.cert_pem).unwrap_or((0, 0));
                serde_json::json!({
                    "fingerprint": a.fingerprint,
                    "state": state,
                    "notBefore": not_before,
                    "notAfter": not_after,
                    "certificate": a.cert_pem,
                })
            })
            .collect();
        serde_json::json!({"authorities": authorities, "bundle": self.bundle_pem()})
    }
}

/// A certificate's validity, Unix seconds.
fn validity(pem: &str) -> Option<(i64, i64)> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// Where the ring is kept.
#[derive(Debug, Clone)]
enum Home {
    File(std::path::PathBuf),
    Sealed(Arc<Vault>),
}

/// The ring from `material` (made if the instance has none): on the embedded store
/// `DATA_DIR/secrets/ca.json`; on a shared store the sealed record, adopting what the data
/// directory held before (then removed from it, so copies of the directory carry no key).
pub fn load(data_dir: &DataDir, material: &Material) -> anyhow::Result<CaRing> {
    let (cert, key, ring) = (data_dir.ca_cert(), data_dir.ca_key(), data_dir.ca_ring());
    // What the directory holds: the ring's file, or the pair of files from before the ring.
    let local: Option<Zeroizing<Vec<u8>>> = if ring.exists() {
        Some(Zeroizing::new(
            std::fs::read(&ring).with_context(|| format!("reading {}", ring.display()))?,
        ))
    } else if cert.exists() && key.exists() {
        let stored = StoredCa {
            cert_pem: std::fs::read_to_string(&cert)?,
            key_pem: Zeroizing::new(std::fs::read_to_string(&key)?),
        };
        Some(Zeroizing::new(serde_json::to_vec(&stored)?))
    } else {
        None
    };
    let bytes = match material {
        Material::Files => {
            let bytes = match local {
                Some(bytes) if ring.exists() => bytes,
                Some(legacy) => CaRing::from_json(&legacy)?.to_json()?,
                None => CaRing::generate()?.to_json()?,
            };
            if !ring.exists() {
                write_private(&ring, &bytes)?;
            }
            // Also after a stop between the ring's write and the key's removal.
            if key.exists() {
                remove_moved(&key, "the CA key", &ring.display().to_string())?;
            }
            bytes
        }
        Material::Sealed(vault) => {
            let stored = vault.get_or_store(
                names::CA,
                "the instance's CA",
                local.as_ref().map(|l| l.as_slice()),
                || CaRing::generate()?.to_json(),
            )?;
            for path in [&ring, &key] {
                if path.exists() {
                    remove_moved(path, "the CA key", "the shared store")?;
                }
            }
            stored
        }
    };
    CaRing::from_json(&bytes)
}

/// The live CA of a node: the ring, where it is kept, and the TLS configuration that serves
/// this node's certificate from it.
pub struct Authority {
    ring: RwLock<Arc<CaRing>>,
    home: Home,
    data_dir: DataDir,
    tls_names: Vec<String>,
    /// The listeners' configuration, once they are built: changed in place after a rotation.
    tls: OnceLock<RustlsConfig>,
    /// One change at a time on this node: a ring, its files and the TLS configuration agree.
    change: Mutex<()>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// What a step of the rotation came to.
#[derive(Debug)]
pub enum Step {
    Done(Arc<CaRing>),
    Refused(Refused),
}

impl Authority {
    /// The ring from `material`, with this node's files written from it
    /// ([`DataDir::install_ca`]).
    pub fn open(
        data_dir: &DataDir,
        tls_names: &[String],
        material: &Material,
    ) -> anyhow::Result<Self> {
        let ring = load(data_dir, material)?;
        data_dir.install_ca(tls_names, &ring)?;
        Ok(Self {
            ring: RwLock::new(Arc::new(ring)),
            home: match material {
                Material::Files => Home::File(data_dir.ca_ring()),
                Material::Sealed(vault) => Home::Sealed(vault.clone()),
            },
            data_dir: data_dir.clone(),
            tls_names: tls_names.to_vec(),
            tls: OnceLock::new(),
            change: Mutex::new(()),
        })
    }

    /// The ring as this node holds it.
    pub fn ring(&self) -> Arc<CaRing> {
        match self.ring.read() {
            Ok(ring) => ring.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Hands over the listeners' TLS configuration, which later changes of the ring reload.
    pub fn serve_with(&self, tls: RustlsConfig) {
        let _ = self.tls.set(tls);
    }

    /// Changes the ring by `step`, stored first (on a shared store expecting the ring it read,
    /// so of nodes changing it at once none loses the other's change), then taken by this
    /// node. Blocking: call it off the runtime.
    pub fn change(
        &self,
        step: impl Fn(&mut CaRing) -> anyhow::Result<Result<(), Refused>>,
    ) -> anyhow::Result<Step> {
        let _one = self
            .change
            .lock()
            .map_err(|_| anyhow::anyhow!("the CA lock is poisoned"))?;
        let ring = match &self.home {
            Home::File(path) => {
                let mut ring = (*self.ring()).clone();
                if let Err(refused) = step(&mut ring)? {
                    return Ok(Step::Refused(refused));
                }
                write_private(path, &ring.to_json()?)?;
                ring
            }
            Home::Sealed(vault) => {
                let mut refused = None;
                let updated = vault.update(names::CA, "the instance's CA", |plain| {
                    let mut ring = CaRing::from_json(plain)?;
                    match step(&mut ring)? {
                        Ok(()) => Ok(Some(ring.to_json()?)),
                        Err(r) => {
                            refused = Some(r);
                            Ok(None)
                        }
                    }
                })?;
                if let Some(refused) = refused {
                    return Ok(Step::Refused(refused));
                }
                CaRing::from_json(&updated.plain)?
            }
        };
        let ring = Arc::new(ring);
        self.take(ring.clone())?;
        Ok(Step::Done(ring))
    }

    /// Takes `ring`: the trust bundle and this node's server certificate follow it, then the
    /// listeners' TLS configuration, then what the node issues with. Call it holding `change`.
    fn take(&self, ring: Arc<CaRing>) -> anyhow::Result<()> {
        self.data_dir.install_ca(&self.tls_names, &ring)?;
        if let Some(tls) = self.tls.get() {
            tls.reload_from_config(Arc::new(crate::tls::rustls_config(&self.data_dir)?));
        }
        match self.ring.write() {
            Ok(mut held) => *held = ring,
            Err(poisoned) => *poisoned.into_inner() = ring,
        }
        Ok(())
    }

    /// Reads the ring again from the shared store, after another node changed it. A ring that
    /// does not open or install is not taken: this node keeps the one it has, and says so.
    fn read_again(&self) -> Result<(), StoreError> {
        let Home::Sealed(vault) = &self.home else {
            return Ok(());
        };
        let _one = self
            .change
            .lock()
            .map_err(|_| StoreError("the CA lock is poisoned".into()))?;
        let taken = vault
            .read(names::CA, "the instance's CA")
            .and_then(|stored| stored.ok_or_else(|| anyhow::anyhow!("the CA is missing")))
            .and_then(|stored| CaRing::from_json(&stored.plain))
            .and_then(|ring| {
                if ring.to_json()? == self.ring().to_json()? {
                    return Ok(false);
                }
                self.take(Arc::new(ring)).map(|()| true)
            });
        match taken {
            Ok(true) => tracing::info!(
                issuing = self.ring().issuing().fingerprint(),
                "took the CA ring another node changed"
            ),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "the stored CA ring was not taken"),
        }
        Ok(())
    }
}

/// The CA ring as other nodes sharing the store change it.
impl twinguard_core::follow::Follower for Authority {
    fn follows(&self, table: Table) -> bool {
        table == Table::Secrets
    }

    fn changed(&self, _table: Table, keys: &[String]) -> Result<Vec<String>, StoreError> {
        if keys.iter().any(|k| k == names::CA) {
            self.read_again()?;
        }
        Ok(Vec::new())
    }

    fn reload(&self) -> Result<Vec<(Table, String)>, StoreError> {
        self.read_again()?;
        Ok(Vec::new())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_steps_through_add_rotate_and_retire_and_refuses_steps_out_of_order() {
        let mut ring = CaRing::generate().unwrap();
        let first = ring.issuing().fingerprint().to_owned();
        let first_pem = ring.issuing().cert_pem().to_owned();
        assert_eq!(ring.rotate(), Err(Refused::NothingToRotateTo));
        assert_eq!(ring.retire(), Err(Refused::NothingToRetire));

        ring.add().unwrap().unwrap();
        assert_eq!(ring.issuing().fingerprint(), first, "add issues nothing");
        assert_eq!(ring.add().unwrap(), Err(Refused::NextPending));
        assert_eq!(ring.bundle_pem().matches("BEGIN CERTIFICATE").count(), 2);

        ring.rotate().unwrap();
        let second = ring.issuing().fingerprint().to_owned();
        assert_ne!(second, first);
        assert_eq!(
            ring.authorities[0].fingerprint(),
            first,
            "the old one stays, retiring"
        );
        assert!(ring.after_issuing().is_empty());

        ring.add().unwrap().unwrap();
        assert_eq!(ring.add().unwrap(), Err(Refused::NextPending));
        ring.rotate().unwrap();
        assert_eq!(ring.add().unwrap(), Err(Refused::Full));

        assert!(ring.bundle_pem().contains(first_pem.trim()));
        ring.retire().unwrap();
        assert_eq!(ring.authorities.len(), 1);
        assert!(!ring.bundle_pem().contains(first_pem.trim()));
        assert_eq!(ring.retire(), Err(Refused::NothingToRetire));

        let again = CaRing::from_json(&ring.to_json().unwrap()).unwrap();
        assert_eq!(again.issuing().fingerprint(), ring.issuing().fingerprint());
    }

    #[test]
    fn the_one_authority_an_instance_stored_before_the_ring_is_read_as_a_ring_of_one() {
        let ca = Ca::generate().unwrap();
        let legacy = serde_json::to_vec(&StoredCa {
            cert_pem: ca.cert_pem.clone(),
            key_pem: ca.key_pem.clone(),
        })
        .unwrap();
        let ring = CaRing::from_json(&legacy).unwrap();
        assert_eq!(ring.issuing().fingerprint(), ca.fingerprint());
        assert!(CaRing::from_json(br#"{"authorities":[],"issuing":0}"#).is_err());
        let one = String::from_utf8(CaRing::one(ca).to_json().unwrap().to_vec()).unwrap();
        let out_of_range = one.replace("\"issuing\":0", "\"issuing\":1");
        assert!(CaRing::from_json(out_of_range.as_bytes()).is_err());
    }

    /// A data directory from before the ring (`tls/ca.pem`, `tls/ca-key.pem`) keeps its CA: the
    /// ring's file takes it, the loose key file goes, and the server certificate is issued
    /// again, naming the issuer it now records.
    #[test]
    fn a_data_directory_from_before_the_ring_keeps_its_ca_in_the_ring() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::new(root.path());
        dir.prepare(&[]).unwrap();
        let ca = Ca::generate().unwrap();
        std::fs::remove_file(dir.ca_ring()).unwrap();
        std::fs::write(dir.ca_cert(), &ca.cert_pem).unwrap();
        std::fs::write(dir.ca_key(), ca.key_pem.as_bytes()).unwrap();
        let server_before = std::fs::read(dir.server_cert()).unwrap();

        dir.prepare(&[]).unwrap();
        let ring = CaRing::from_json(&std::fs::read(dir.ca_ring()).unwrap()).unwrap();
        assert_eq!(ring.authorities.len(), 1);
        assert_eq!(ring.issuing().fingerprint(), ca.fingerprint());
        assert!(!dir.ca_key().exists(), "the loose key file stays behind");
        assert_eq!(
            std::fs::read_to_string(dir.ca_cert()).unwrap(),
            ring.bundle_pem()
        );
        assert_ne!(std::fs::read(dir.server_cert()).unwrap(), server_before);
        let server = std::fs::read(dir.server_cert()).unwrap();
        let leaf = CertificateDer::from_pem_slice(&server).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
        let (_, issuer) = x509_parser::parse_x509_certificate(ca_der.as_ref()).unwrap();
        assert_eq!(parsed.issuer(), issuer.subject());
    }

    #[test]
    fn a_client_certificate_chains_to_the_authority_that_issued_it_and_to_no_other() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut ring = CaRing::generate().unwrap();
        ring.add().unwrap().unwrap();
        ring.rotate().unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = ring.issuing().issue_client_cert("pump", &csr).unwrap();
        assert_eq!(issued.issuer, ring.issuing().fingerprint());
        let leaf = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        for (i, ca) in ring.authorities.iter().enumerate() {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            let verified =
                verifier.verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now());
            assert_eq!(verified.is_ok(), i == ring.issuing, "authority {i}");
        }
    }
}
