//! Rotating refresh tokens (OAuth 2.0 Security BCP, RFC 9700 section 4.14.2). Each login starts
//! a family; every refresh spends the presented token and issues the next one of the family.
//! A spent token presented again means two parties hold the family, so the whole family is
//! revoked. Tokens are 256-bit random strings stored only as SHA-256 digests; every change is
//! durable before the answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use twinguard_core::identity::credentials::{random_secret, secret_digest};
use twinguard_core::store::{Mutation, Store, StoreError, Table};
use zeroize::Zeroizing;

use crate::tokens::now_secs;

/// A family's absolute lifetime: after it, the person logs in again.
pub const FAMILY_LIFETIME_SECS: u64 = 12 * 3_600;
/// Prefix that makes refresh tokens recognisable (and findable by secret scanners).
const PREFIX: &str = "tgr_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Status {
    Active,
    Spent,
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Record {
    family: String,
    subject: String,
    mfa: bool,
    auth_time: u64,
    family_expires: u64,
    status: Status,
}

/// A refresh token that was valid and is now spent.
#[derive(Debug, Clone)]
pub struct Valid {
    pub family: String,
    pub subject: String,
    pub mfa: bool,
    pub auth_time: u64,
    pub family_expires: u64,
}

#[derive(Debug)]
pub enum Redeemed {
    Valid(Valid),
    /// A spent token again: the family is now revoked.
    Reused {
        subject: String,
    },
    Invalid,
}

pub struct RefreshTokens {
    store: Arc<dyn Store>,
    records: Mutex<HashMap<String, Record>>,
}

fn to_json(record: &Record) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError(e.to_string()))
}

impl RefreshTokens {
    /// Loads the live tokens and forgets expired families.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let now = now_secs();
        let mut records = HashMap::new();
        let mut expired = Vec::new();
        for (digest, bytes) in store.scan(Table::RefreshTokens)? {
            match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) if r.family_expires > now => {
                    records.insert(digest, r);
                }
                _ => expired.push(Mutation::delete(Table::RefreshTokens, digest)),
            }
        }
        store.commit(&expired)?;
        Ok(Self {
            store,
            records: Mutex::new(records),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Record>>, StoreError> {
        self.records
            .lock()
            .map_err(|_| StoreError("refresh token lock poisoned".into()))
    }

    /// Issues a token for `subject`; `family` continues an existing family.
    pub fn issue(
        &self,
        subject: &str,
        mfa: bool,
        auth_time: u64,
        family: Option<(String, u64)>,
    ) -> Result<Zeroizing<String>, StoreError> {
        let now = now_secs();
        let (family, family_expires) = family
            .unwrap_or_else(|| (uuid::Uuid::new_v4().to_string(), now + FAMILY_LIFETIME_SECS));
        let token = Zeroizing::new(format!("{PREFIX}{}", random_secret(32).as_str()));
        let digest = secret_digest(&token);
        let record = Record {
            family,
            subject: subject.to_owned(),
            mfa,
            auth_time,
            family_expires,
            status: Status::Active,
        };
        let mut records = self.lock()?;
        let mut muts = vec![Mutation::put(
            Table::RefreshTokens,
            digest.clone(),
            to_json(&record)?,
        )];
        // Forget expired families as new tokens come in, so the table stays bounded.
        let expired: Vec<String> = records
            .iter()
            .filter(|(_, r)| r.family_expires <= now)
            .map(|(d, _)| d.clone())
            .collect();
        muts.extend(
            expired
                .iter()
                .map(|d| Mutation::delete(Table::RefreshTokens, d.clone())),
        );
        self.store.commit(&muts)?;
        for d in expired {
            records.remove(&d);
        }
        records.insert(digest, record);
        Ok(token)
    }

    /// Spends `token`. See [`Redeemed`].
    pub fn redeem(&self, token: &str) -> Result<Redeemed, StoreError> {
        if !token.starts_with(PREFIX) {
            return Ok(Redeemed::Invalid);
        }
        let digest = secret_digest(token);
        let mut records = self.lock()?;
        let Some(record) = records.get(&digest).cloned() else {
            return Ok(Redeemed::Invalid);
        };
        if record.family_expires <= now_secs() {
            return Ok(Redeemed::Invalid);
        }
        match record.status {
            Status::Revoked => Ok(Redeemed::Invalid),
            Status::Spent => {
                self.revoke_family(&mut records, &record.family)?;
                Ok(Redeemed::Reused {
                    subject: record.subject,
                })
            }
            Status::Active => {
                let spent = Record {
                    status: Status::Spent,
                    ..record.clone()
                };
                self.store.commit(&[Mutation::put(
                    Table::RefreshTokens,
                    digest.clone(),
                    to_json(&spent)?,
                )])?;
                records.insert(digest, spent);
                Ok(Redeemed::Valid(Valid {
                    family: record.family,
                    subject: record.subject,
                    mfa: record.mfa,
                    auth_time: record.auth_time,
                    family_expires: record.family_expires,
                }))
            }
        }
    }

    /// Revokes the family of `token`; false if it is not one of ours.
    pub fn revoke(&self, token: &str) -> Result<bool, StoreError> {
        if !token.starts_with(PREFIX) {
            return Ok(false);
        }
        let digest = secret_digest(token);
        let mut records = self.lock()?;
        let Some(family) = records.get(&digest).map(|r| r.family.clone()) else {
            return Ok(false);
        };
        self.revoke_family(&mut records, &family)?;
        Ok(true)
    }

    fn revoke_family(
        &self,
        records: &mut HashMap<String, Record>,
        family: &str,
    ) -> Result<(), StoreError> {
        let mut muts = Vec::new();
        let mut changed = Vec::new();
        for (digest, r) in records.iter() {
            if r.family == family && r.status != Status::Revoked {
                let revoked = Record {
                    status: Status::Revoked,
                    ..r.clone()
                };
                muts.push(Mutation::put(
                    Table::RefreshTokens,
                    digest.clone(),
                    to_json(&revoked)?,
                ));
                changed.push((digest.clone(), revoked));
            }
        }
        self.store.commit(&muts)?;
        records.extend(changed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use twinguard_core::store::MemoryStore;

    use super::*;

    #[test]
    fn rotation_spends_each_token_and_reuse_revokes_the_family() {
        let store = Arc::new(MemoryStore::default());
        let tokens = RefreshTokens::open(store.clone()).unwrap();
        let first = tokens.issue("alice", true, 100, None).unwrap();
        let Redeemed::Valid(v) = tokens.redeem(&first).unwrap() else {
            unreachable!("a fresh token redeems")
        };
        assert_eq!(
            (v.subject.as_str(), v.mfa, v.auth_time),
            ("alice", true, 100)
        );
        let second = tokens
            .issue(
                "alice",
                true,
                100,
                Some((v.family.clone(), v.family_expires)),
            )
            .unwrap();
        // The attacker replays the first token: the family dies, including the second token.
        assert!(matches!(
            tokens.redeem(&first).unwrap(),
            Redeemed::Reused { .. }
        ));
        assert!(matches!(tokens.redeem(&second).unwrap(), Redeemed::Invalid));
        // Durable: a restart remembers the revocation.
        let reopened = RefreshTokens::open(store).unwrap();
        assert!(matches!(
            reopened.redeem(&second).unwrap(),
            Redeemed::Invalid
        ));
        assert!(matches!(
            reopened.redeem("tgr_unknown").unwrap(),
            Redeemed::Invalid
        ));
    }

    #[test]
    fn revoking_a_token_revokes_its_family_only() {
        let tokens = RefreshTokens::open(Arc::new(MemoryStore::default())).unwrap();
        let a = tokens.issue("alice", false, 1, None).unwrap();
        let b = tokens.issue("alice", false, 1, None).unwrap();
        assert!(tokens.revoke(&a).unwrap());
        assert!(!tokens.revoke("not ours").unwrap());
        assert!(matches!(tokens.redeem(&a).unwrap(), Redeemed::Invalid));
        assert!(matches!(tokens.redeem(&b).unwrap(), Redeemed::Valid(_)));
    }
}
