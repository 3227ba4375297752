//! Credential primitives: argon2id for human passwords, SHA-256 for random machine secrets (256
//! bits of entropy need no slow hash), RFC 6238 TOTP with single use of each code, and recovery
//! codes. All comparisons of secrets are constant time.

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use totp_rs::{Builder, Secret, Totp};
use zeroize::Zeroizing;

/// Shortest password accepted (NIST SP 800-63B asks for at least 8; we ask for more).
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest password accepted: bounds the hashing work an attacker can ask for.
pub const MAX_PASSWORD_LEN: usize = 256;
/// Recovery codes issued with a TOTP enrolment.
pub const RECOVERY_CODES: usize = 10;
/// TOTP time steps accepted either side of the current one (clock drift of the phone).
const TOTP_SKEW: u16 = 1;

/// argon2id with the OWASP-recommended parameters (19 MiB, 2 passes, 1 lane).
fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::DEFAULT)
}

/// argon2 computations that may run at once in the process (each holds 19 MiB and a core for
/// tens of milliseconds), and callers that may wait for one. Past both, a password operation is
/// refused as busy at once: an attacker who floods logins, password changes or resets holds at
/// most this much memory and these threads, whatever route the passwords come in by.
pub const ARGON2_RUNNING: usize = 2;
pub const ARGON2_WAITING: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("a password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters long")]
    PasswordLength,
    #[error("the password could not be hashed")]
    Hashing,
    #[error("too many password checks are running; retry shortly")]
    Busy,
}

/// The process-wide cap on argon2 work (see [`ARGON2_RUNNING`]).
struct Slots {
    /// (running, waiting)
    counts: std::sync::Mutex<(usize, usize)>,
    freed: std::sync::Condvar,
}

struct Slot(&'static Slots);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.0.counts.lock() {
            counts.0 = counts.0.saturating_sub(1);
        }
        self.0.freed.notify_one();
    }
}

fn argon2_slot() -> Result<Slot, CredentialError> {
    static SLOTS: Slots = Slots {
        counts: std::sync::Mutex::new((0, 0)),
        freed: std::sync::Condvar::new(),
    };
    let mut counts = SLOTS.counts.lock().map_err(|_| CredentialError::Busy)?;
    if counts.0 >= ARGON2_RUNNING {
        if counts.1 >= ARGON2_WAITING {
            return Err(CredentialError::Busy);
        }
        counts.1 += 1;
        while counts.0 >= ARGON2_RUNNING {
            counts = SLOTS
                .freed
                .wait(counts)
                .map_err(|_| CredentialError::Busy)?;
        }
        counts.1 -= 1;
    }
    counts.0 += 1;
    Ok(Slot(&SLOTS))
}

/// Hashes a new password; the result is a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
pub fn hash_password(password: &str) -> Result<String, CredentialError> {
    let chars = password.chars().count();
    if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&chars) {
        return Err(CredentialError::PasswordLength);
    }
    let _slot = argon2_slot()?;
    argon2()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|_| CredentialError::Hashing)
}

/// A valid hash of a password nobody knows: checked when the user does not exist, so an
/// unknown user costs the same time as a wrong password.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let decoy = URL_SAFE_NO_PAD.encode(raw);
        hash_password(&decoy).unwrap_or_default()
    })
}

/// Checks `password` against a stored hash, or against a decoy when there is none. `Busy` when
/// the process already runs as many argon2 checks as it allows.
pub fn verify_password(password: &str, stored: Option<&str>) -> Result<bool, CredentialError> {
    if password.len() > MAX_PASSWORD_LEN * 4 {
        return Ok(false);
    }
    let (hash, real) = match stored {
        Some(h) => (h, true),
        None => (decoy_hash(), false),
    };
    let Ok(parsed) = PasswordHash::new(hash) else {
        return Ok(false);
    };
    let _slot = argon2_slot()?;
    let ok = argon2()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    Ok(ok && real)
}

/// SHA-256 of a machine secret, hex.
pub fn secret_digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time comparison of a presented secret with a stored digest.
pub fn secret_matches(secret: &str, stored_digest: Option<&str>) -> bool {
    let presented = secret_digest(secret);
    let expected = stored_digest.unwrap_or("");
    let equal: bool = presented.as_bytes().ct_eq(expected.as_bytes()).into();
    equal && stored_digest.is_some()
}

/// A fresh random secret of `bytes` bytes, base64url.
pub fn random_secret(bytes: usize) -> Zeroizing<String> {
    let mut raw = Zeroizing::new(vec![0u8; bytes]);
    rand::rng().fill_bytes(raw.as_mut());
    Zeroizing::new(URL_SAFE_NO_PAD.encode(raw.as_slice()))
}

/// A user's TOTP enrolment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TotpState {
    /// The shared secret, base32 (what the authenticator app holds).
    pub secret: String,
    /// False until the user proves the app works by entering a code.
    pub confirmed: bool,
    /// The last time step accepted; a code of this step or an earlier one never works again.
    pub last_step: u64,
}

fn totp(secret_b32: &str, account: &str, issuer: &str) -> Option<Totp> {
    let secret = Secret::try_from_base32(secret_b32).ok()?;
    Builder::new()
        .with_secret(secret)
        .with_skew(TOTP_SKEW)
        .with_account_name(account.replace(':', "_"))
        .with_issuer(Some(issuer.replace(':', "_")))
        .build()
        .ok()
}

impl TotpState {
    /// A new, unconfirmed enrolment with a 160-bit secret (RFC 4226's recommendation).
    pub fn generate() -> Self {
        let mut raw = [0u8; 20];
        rand::rng().fill_bytes(&mut raw);
        Self {
            secret: Secret::from(raw.to_vec()).to_base32(),
            confirmed: false,
            last_step: 0,
        }
    }

    /// The `otpauth://totp/...` URI authenticator apps scan.
    pub fn uri(&self, account: &str, issuer: &str) -> Option<String> {
        totp(&self.secret, account, issuer)?.to_url().ok()
    }

    /// The URI as a QR code, PNG.
    pub fn qr_png(&self, account: &str, issuer: &str) -> Option<Vec<u8>> {
        totp(&self.secret, account, issuer)?.to_qr_png().ok()
    }

    /// Accepts `code` at `now` (Unix seconds) once: on success records its step and returns
    /// true; a replayed or older code is refused.
    pub fn accept(&mut self, code: &str, now: u64) -> bool {
        let Some(totp) = totp(&self.secret, "x", "x") else {
            return false;
        };
        match totp.check(code.trim(), now) {
            Some(step) if step > self.last_step => {
                self.last_step = step;
                true
            }
            _ => false,
        }
    }
}

/// Fresh recovery codes (shown once) and their digests (stored).
pub fn recovery_codes() -> (Vec<String>, Vec<String>) {
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut raw = [0u8; 8];
            rand::rng().fill_bytes(&mut raw);
            let code = raw.chunks(2).map(hex::encode).collect::<Vec<_>>().join("-");
            let digest = secret_digest(&code);
            (code, digest)
        })
        .unzip()
}

/// Uses up a recovery code: removes its digest from `stored` and returns true if it was there.
pub fn use_recovery_code(stored: &mut Vec<String>, code: &str) -> bool {
    let code = code.trim().to_ascii_lowercase();
    let position = stored
        .iter()
        .position(|d| secret_matches(&code, Some(d.as_str())));
    match position {
        Some(i) => {
            stored.swap_remove(i);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 rows, truncated to the 6 digits authenticator apps show.
    #[test]
    fn rfc6238_test_vectors() {
        let secret = Secret::from(b"12345678901234567890".to_vec()).to_base32();
        let totp = Builder::new()
            .with_secret(Secret::try_from_base32(&secret).unwrap_or(Secret::from(vec![])))
            .with_digits(8)
            .build()
            .ok();
        let Some(totp) = totp else {
            unreachable!("the RFC secret builds")
        };
        for (time, expected) in [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            assert_eq!(totp.generate(time).to_string(), expected, "T = {time}");
        }
    }

    #[test]
    fn a_code_is_accepted_once_and_older_codes_never() {
        let mut state = TotpState::generate();
        let totp = totp(&state.secret, "a", "b").unwrap_or_else(|| unreachable!());
        let now = 1_800_000_000;
        let code = totp.generate(now).to_string();
        assert!(state.accept(&code, now));
        assert!(!state.accept(&code, now), "replayed");
        let previous = totp.generate(now - 30).to_string();
        assert!(!state.accept(&previous, now), "an earlier step");
        let next = totp.generate(now + 30).to_string();
        assert!(state.accept(&next, now + 30));
        assert!(!state.accept("000000x", now + 60));
    }

    #[test]
    fn otpauth_uri_names_issuer_account_and_secret() {
        let state = TotpState::generate();
        let uri = state.uri("alice", "twinguard").unwrap_or_default();
        assert!(uri.starts_with("otpauth://totp/twinguard:alice?"), "{uri}");
        assert!(uri.contains(&format!("secret={}", state.secret)), "{uri}");
        let png = state.qr_png("alice", "twinguard").unwrap_or_default();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let hash = hash_password("correct horse battery").unwrap_or_default();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert_eq!(
            verify_password("correct horse battery", Some(&hash)),
            Ok(true)
        );
        assert_eq!(
            verify_password("correct horse battery!", Some(&hash)),
            Ok(false)
        );
        assert_eq!(verify_password("correct horse battery", None), Ok(false));
        assert_eq!(hash_password("short"), Err(CredentialError::PasswordLength));
    }

    #[test]
    fn recovery_codes_work_once() {
        let (codes, mut stored) = recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODES);
        assert!(use_recovery_code(&mut stored, &codes[3].to_uppercase()));
        assert!(!use_recovery_code(&mut stored, &codes[3]));
        assert_eq!(stored.len(), RECOVERY_CODES - 1);
    }

    #[test]
    fn argon2_work_is_capped_and_the_overflow_is_refused_at_once() {
        let hash = hash_password("correct horse battery").unwrap_or_default();
        let callers = ARGON2_RUNNING + ARGON2_WAITING + 16;
        let start = std::sync::Arc::new(std::sync::Barrier::new(callers));
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                let (hash, start) = (hash.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    verify_password("correct horse battery", Some(&hash))
                })
            })
            .collect();
        let results: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or(Err(CredentialError::Hashing)))
            .collect();
        let busy = results
            .iter()
            .filter(|r| **r == Err(CredentialError::Busy))
            .count();
        let checked = results.iter().filter(|r| **r == Ok(true)).count();
        assert_eq!(busy + checked, callers, "{results:?}");
        assert!(
            busy >= 1,
            "more callers than slots and places to wait: some are refused"
        );
        assert!(checked > ARGON2_RUNNING, "waiting callers get their turn");
    }
}
