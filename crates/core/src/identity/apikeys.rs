//! API keys: long-lived credentials for integrations that cannot run an OAuth flow.
//!
//! A key looks like `tgk_<id>_<secret>`: the ID is public (logs, reports, revocation name it),
//! the secret is 256 random bits and exists only in the answer that created it; the directory
//! keeps a SHA-256 digest. A key is bound to an owner and to one role at one scope, and never
//! grants more than its owner holds right now: if the owner loses that role or is disabled, the
//! key stops working. Keys cannot carry sensitive actions (role, identity and key changes,
//! approvals): those need a person who just passed MFA. A key owned by a person acts as that
//! person and obeys their MFA rule, which no key can pass, so it carries read actions only. A
//! key cannot change any credential (no self-service), and only an administrator who covers
//! the owner's every grant, and who holds the key's role at its scope, creates, rotates or
//! revokes one.
//!
//! Every key has a risk class with a rotation period (high 30 days, low 90 by default) and an
//! expiry (by default the end of that period). Rotation issues a successor and leaves the old
//! key valid for an overlap window, so a deployment can switch without downtime.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use std::net::IpAddr;

use super::{
    Directory, LoginFailure, Refusal, State, bounded, check_name, credentials, not_found, to_json,
};
use crate::auth::{Action, Credential, Grant, Principal, Scope};
use crate::error::{DomainError, DomainResult};
use crate::store::{Mutation, Table};

const PREFIX: &str = "tgk_";
const DAY: u64 = 86_400;
/// Longest expiry a key may be given.
pub const MAX_LIFETIME_SECS: u64 = 365 * DAY;
/// Default overlap of a rotated key with its successor.
pub const DEFAULT_OVERLAP_SECS: u64 = DAY;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Risk {
    High,
    Low,
}

impl Risk {
    pub fn rotation_period_secs(self) -> u64 {
        match self {
            Risk::High => 30 * DAY,
            Risk::Low => 90 * DAY,
        }
    }
}

/// What the API shows of a key; never its secret or digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// The public part of the key, `tgk_<id>_...`.
    pub id: String,
    pub name: String,
    pub owner_id: String,
    pub role_id: String,
    pub scope: Scope,
    pub risk: Risk,
    pub created_at: u64,
    pub expires_at: u64,
    /// When the key should be rotated: created + the risk class's period.
    pub rotate_by: u64,
    pub revoked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct KeyRecord {
    key: ApiKey,
    digest: String,
}

/// A key as an administrator asks for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewApiKey {
    pub name: String,
    pub owner_id: String,
    pub role_id: String,
    #[serde(default = "instance")]
    pub scope: Scope,
    pub risk: Risk,
    /// Seconds from now; defaults to the risk class's rotation period.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

fn instance() -> Scope {
    Scope::Instance
}

/// A created key: its description and the full key, shown once.
#[derive(Debug)]
pub struct CreatedKey {
    pub key: ApiKey,
    pub secret: Zeroizing<String>,
}

fn split(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Whether the throttle account `key:<id>` names a stored key.
pub(super) fn known(state: &State, id: &str) -> bool {
    state.api_keys.contains_key(&format!("{PREFIX}{id}"))
}

pub(super) fn load(state: &mut State, key: String, bytes: &[u8]) -> Option<()> {
    let record: KeyRecord = serde_json::from_slice(bytes).ok()?;
    state.api_keys.insert(key, record);
    Some(())
}

impl Directory {
    fn mint(&self, template: &ApiKey, expires_at: u64) -> (KeyRecord, Zeroizing<String>) {
        let now = self.now();
        let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let secret = credentials::random_secret(32);
        let full = Zeroizing::new(format!("{PREFIX}{id}_{}", secret.as_str()));
        let key = ApiKey {
            id: format!("{PREFIX}{id}"),
            created_at: now,
            expires_at,
            rotate_by: now + template.risk.rotation_period_secs(),
            revoked: false,
            replaced_by: None,
            ..template.clone()
        };
        let record = KeyRecord {
            key,
            digest: credentials::secret_digest(&full),
        };
        (record, full)
    }

    /// Creates a key for `new.owner_id`, who must hold `new.role_id` at that scope or wider.
    pub fn create_api_key(&self, caller: &Principal, new: NewApiKey) -> DomainResult<CreatedKey> {
        caller.authorize_instance(Action::KeysWrite)?;
        check_name(&new.name)?;
        new.scope.validate()?;
        let lifetime = new.expires_in.unwrap_or(new.risk.rotation_period_secs());
        if lifetime == 0 || lifetime > MAX_LIFETIME_SECS {
            return Err(DomainError::InvalidArgument(format!(
                "a key lives between 1 second and {} days",
                MAX_LIFETIME_SECS / DAY
            )));
        }
        {
            let state = self.state.read();
            let owner = state
                .records
                .get(&new.owner_id)
                .ok_or_else(|| not_found("identity", &new.owner_id))?;
            let role = state
                .role(&new.role_id)
                .ok_or_else(|| not_found("role", &new.role_id))?;
            if role.actions.iter().any(Action::needs_step_up) {
                return Err(DomainError::InvalidArgument(
                    "API keys cannot carry role, identity, key or approval actions".into(),
                ));
            }
            if owner.identity.kind == super::IdentityKind::User && role.is_privileged() {
                return Err(DomainError::InvalidArgument(
                    "a key owned by a person obeys the person's MFA rule, which no key can pass: it carries read actions only".into(),
                ));
            }
            bounded(&state, caller, Action::KeysWrite, &new.owner_id)?;
            // The creator hands out only what it holds itself, at that scope.
            if !caller.covers(&[Grant {
                role: role.id.clone(),
                actions: role.actions,
                scope: new.scope.clone(),
            }]) {
                return Err(DomainError::Forbidden {
                    action: Action::KeysWrite.as_str(),
                });
            }
        }
        if !self.owner_holds(&new.owner_id, &new.role_id, &new.scope) {
            return Err(DomainError::InvalidArgument(
                "the owner does not hold this role at this scope".into(),
            ));
        }
        let template = ApiKey {
            id: String::new(),
            name: new.name,
            owner_id: new.owner_id,
            role_id: new.role_id,
            scope: new.scope,
            risk: new.risk,
            created_at: 0,
            expires_at: 0,
            rotate_by: 0,
            revoked: false,
            replaced_by: None,
        };
        let (record, secret) = self.mint(&template, self.now() + lifetime);
        let put = Mutation::put(Table::ApiKeys, record.key.id.clone(), to_json(&record)?);
        let mut state = self.lock()?;
        state.unlocked(|| self.commit(&[put]))?;
        let key = record.key.clone();
        state.api_keys.insert(key.id.clone(), record);
        Ok(CreatedKey { key, secret })
    }

    /// The owner holds `role` at `scope` itself or at instance scope.
    fn owner_holds(&self, owner: &str, role: &str, scope: &Scope) -> bool {
        self.grants(owner).is_some_and(|(_, grants)| {
            grants.iter().any(|g| {
                g.role.as_str() == role && (g.scope == *scope || g.scope == Scope::Instance)
            })
        })
    }

    /// Authenticates an API key presented from `from`, behind the throttle (the account is the
    /// key's public ID), and returns the caller it stands for now: the owner's kind (so a
    /// person's key obeys the person's MFA rule), the key's one grant, marked as a key.
    pub fn authenticate_api_key(
        &self,
        from: IpAddr,
        presented: &str,
    ) -> Result<Principal, Refusal> {
        let account = split(presented).map(|(id, _)| format!("key:{id}"));
        self.guarded(from, account.as_deref(), || self.check_api_key(presented))
    }

    fn check_api_key(&self, presented: &str) -> Result<Principal, LoginFailure> {
        let (id, _) = split(presented).ok_or(LoginFailure::Unknown)?;
        let now = self.now();
        let (key, role) = {
            let state = self.state.read();
            let record = state.api_keys.get(&format!("{PREFIX}{id}"));
            let stored = record.map(|r| r.digest.as_str());
            if !credentials::secret_matches(presented, stored) {
                return Err(LoginFailure::WrongSecret);
            }
            let key = record.ok_or(LoginFailure::Unknown)?.key.clone();
            let role = state.role(&key.role_id).ok_or(LoginFailure::Disabled)?;
            if key.revoked || key.expires_at <= now {
                return Err(LoginFailure::Disabled);
            }
            (key, role)
        };
        if !self.owner_holds(&key.owner_id, &key.role_id, &key.scope) {
            return Err(LoginFailure::Disabled);
        }
        let (kind, _) = self.grants(&key.owner_id).ok_or(LoginFailure::Disabled)?;
        let grant = Grant {
            role: role.id,
            actions: role.actions,
            scope: key.scope,
        };
        Ok(
            Principal::new(key.owner_id, kind, vec![grant].into(), false, false)
                .presented(Credential::ApiKey),
        )
    }

    /// The key `id` for an administrator who may manage it: one who covers its owner.
    fn manageable(&self, state: &State, caller: &Principal, id: &str) -> DomainResult<KeyRecord> {
        let record = state
            .api_keys
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("API key", id))?;
        bounded(state, caller, Action::KeysWrite, &record.key.owner_id)?;
        Ok(record)
    }

    pub fn api_keys(&self, caller: &Principal) -> DomainResult<Vec<ApiKey>> {
        caller.authorize_instance(Action::KeysWrite)?;
        let state = self.state.read();
        let mut keys: Vec<ApiKey> = state.api_keys.values().map(|r| r.key.clone()).collect();
        // A total order, so pages neither repeat nor skip.
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(keys)
    }

    /// Keys past their rotation date that still work and have no successor.
    pub fn overdue_api_keys(&self, caller: &Principal) -> DomainResult<Vec<ApiKey>> {
        let now = self.now();
        Ok(self
            .api_keys(caller)?
            .into_iter()
            .filter(|k| !k.revoked && k.expires_at > now && k.replaced_by.is_none())
            .filter(|k| k.rotate_by <= now)
            .collect())
    }

    /// Revokes a key at once.
    pub fn revoke_api_key(&self, caller: &Principal, id: &str) -> DomainResult<ApiKey> {
        caller.authorize_instance(Action::KeysWrite)?;
        let mut state = self.lock()?;
        let expect = self.refresh_record(&mut state, Table::ApiKeys, id)?;
        let mut record = self.manageable(&state, caller, id)?;
        record.key.revoked = true;
        state.unlocked(|| {
            self.commit_expecting(
                &[Mutation::put(
                    Table::ApiKeys,
                    id.to_owned(),
                    to_json(&record)?,
                )],
                expect,
            )
        })?;
        let key = record.key.clone();
        state.api_keys.insert(id.to_owned(), record);
        Ok(key)
    }

    /// Issues a successor with the same owner, role, scope and risk class; the old key keeps
    /// working for `overlap_secs` (and no longer than it would have anyway).
    pub fn rotate_api_key(
        &self,
        caller: &Principal,
        id: &str,
        overlap_secs: Option<u64>,
    ) -> DomainResult<CreatedKey> {
        caller.authorize_instance(Action::KeysWrite)?;
        let overlap = overlap_secs.unwrap_or(DEFAULT_OVERLAP_SECS).min(30 * DAY);
        let now = self.now();
        let mut state = self.lock()?;
        // Decided on the key as stored: a revocation another node made is not undone here.
        let expect = self.refresh_record(&mut state, Table::ApiKeys, id)?;
        let mut old = self.manageable(&state, caller, id)?;
        if old.key.revoked || old.key.expires_at <= now {
            return Err(DomainError::Conflict(
                "the key is revoked or expired".into(),
            ));
        }
        // A key has at most one successor: rotating a replaced key again would leave several
        // live keys of which only the last is linked to it.
        if let Some(successor) = &old.key.replaced_by {
            return Err(DomainError::Conflict(format!(
                "the key was already rotated; rotate its successor {successor}"
            )));
        }
        let lifetime = old.key.expires_at.saturating_sub(old.key.created_at).max(1);
        let (new, secret) = self.mint(&old.key, now + lifetime.min(MAX_LIFETIME_SECS));
        old.key.expires_at = old.key.expires_at.min(now + overlap);
        old.key.replaced_by = Some(new.key.id.clone());
        state.unlocked(|| {
            self.commit_expecting(
                &[
                    Mutation::put(Table::ApiKeys, new.key.id.clone(), to_json(&new)?),
                    Mutation::put(Table::ApiKeys, id.to_owned(), to_json(&old)?),
                ],
                expect,
            )
        })?;
        let key = new.key.clone();
        state.api_keys.insert(id.to_owned(), old);
        state.api_keys.insert(key.id.clone(), new);
        Ok(CreatedKey { key, secret })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;
    use crate::auth::{DATA_OWNER, DATA_READER, SECURITY_ADMIN};
    use crate::clock::SystemClock;
    use crate::identity::{IdentityKind, NewIdentity};
    use crate::store::MemoryStore;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn setup() -> (Directory, Principal, String) {
        let dir = Directory::open(Arc::new(MemoryStore::default()), Arc::new(SystemClock)).unwrap();
        let (admin, secret) = Directory::new_admin_credential();
        dir.bootstrap_admin(&admin, &secret).unwrap();
        let admin = dir.principal(&admin, false, 0, 0).unwrap();
        let new = NewIdentity {
            kind: IdentityKind::ServiceAccount,
            name: "historian".into(),
            display_name: None,
            groups: vec![],
            password: None,
        };
        let svc = dir.create_identity(&admin, new).unwrap().0;
        dir.assign(&admin, &svc.id, DATA_READER, Scope::Instance)
            .unwrap();
        (dir, admin, svc.id)
    }

    fn new_key(owner: &str, role: &str, risk: Risk) -> NewApiKey {
        NewApiKey {
            name: "export".into(),
            owner_id: owner.into(),
            role_id: role.into(),
            scope: Scope::Instance,
            risk,
            expires_in: None,
        }
    }

    #[test]
    fn a_key_works_until_revoked_and_never_beyond_its_owner() {
        let (dir, admin, svc) = setup();
        let created = dir
            .create_api_key(&admin, new_key(&svc, DATA_READER, Risk::High))
            .unwrap();
        assert!(created.secret.starts_with(&format!("{}_", created.key.id)));
        assert_eq!(created.key.rotate_by - created.key.created_at, 30 * DAY);
        let p = dir.authenticate_api_key(LOCAL, &created.secret).unwrap();
        assert!(p.authorize(Action::Query).is_ok());
        assert!(p.authorize(Action::TwinsWrite).is_err());
        // A wrong secret with a real ID, or a made-up key, is nothing.
        assert!(
            dir.authenticate_api_key(LOCAL, &format!("{}_AAAA", created.key.id))
                .is_err()
        );
        assert!(dir.authenticate_api_key(LOCAL, "tgk_x_y").is_err());
        // The owner cannot hand out what it does not hold.
        assert!(
            dir.create_api_key(&admin, new_key(&svc, DATA_OWNER, Risk::Low))
                .is_err()
        );
        // Sensitive roles never ride on keys.
        assert!(
            dir.create_api_key(&admin, new_key(&admin.subject, SECURITY_ADMIN, Risk::High))
                .is_err()
        );
        dir.revoke_api_key(&admin, &created.key.id).unwrap();
        assert!(dir.authenticate_api_key(LOCAL, &created.secret).is_err());
    }

    #[test]
    fn owner_losing_the_role_disables_the_key() {
        let (dir, admin, svc) = setup();
        let created = dir
            .create_api_key(&admin, new_key(&svc, DATA_READER, Risk::Low))
            .unwrap();
        let assignment = dir.assignments(&admin, Some(&svc)).unwrap().remove(0);
        dir.unassign(&admin, &assignment.id).unwrap();
        assert!(dir.authenticate_api_key(LOCAL, &created.secret).is_err());
    }

    #[test]
    fn rotation_overlaps_then_the_old_key_expires_and_overdue_keys_are_reported() {
        let (dir, admin, svc) = setup();
        let old = dir
            .create_api_key(&admin, new_key(&svc, DATA_READER, Risk::High))
            .unwrap();
        let new = dir
            .rotate_api_key(&admin, &old.key.id, Some(3_600))
            .unwrap();
        assert!(
            dir.authenticate_api_key(LOCAL, &old.secret).is_ok(),
            "overlap"
        );
        assert!(dir.authenticate_api_key(LOCAL, &new.secret).is_ok());
        let listed = dir.api_keys(&admin).unwrap();
        let old_now = listed.iter().find(|k| k.id == old.key.id).unwrap();
        assert_eq!(old_now.replaced_by.as_deref(), Some(new.key.id.as_str()));
        assert!(old_now.expires_at <= dir.now() + 3_600);
        let no_overlap = dir.rotate_api_key(&admin, &new.key.id, Some(0)).unwrap();
        assert!(
            dir.authenticate_api_key(LOCAL, &new.secret).is_err(),
            "expired at once"
        );
        assert!(dir.authenticate_api_key(LOCAL, &no_overlap.secret).is_ok());
        // Nothing is overdue yet; a key created with an old date is.
        assert!(dir.overdue_api_keys(&admin).unwrap().is_empty());
        {
            let mut state = dir.state.edit().unwrap();
            let record = state.api_keys.get_mut(&no_overlap.key.id).unwrap();
            record.key.rotate_by = 1;
        }
        let overdue = dir.overdue_api_keys(&admin).unwrap();
        assert_eq!(overdue.len(), 1);
        assert_eq!(overdue[0].id, no_overlap.key.id);
    }
}
