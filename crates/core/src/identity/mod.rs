//! The identity directory: users, groups, applications, service accounts and devices; custom
//! roles; and role assignments (principal x role x scope). Authentication turns a credential into
//! an identity ID; [`Directory::principal`] turns that ID into the grants it holds *now*, so
//! disabling an identity or removing an assignment takes effect on the next request, whatever
//! tokens are in flight.
//!
//! Every administrative operation takes the caller's [`Principal`] and decides access here, in
//! the domain, like the twin operations do.

pub mod apikeys;
pub mod credentials;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::auth::{
    Action, ActionSet, Credential, DATA_OWNER, Grant, INSTANCE_OWNER, Principal, PrincipalKind,
    Role, RoleId, SECURITY_ADMIN, Scope, builtin_role, builtin_roles,
};
use crate::clock::Clock;
use crate::edit::{Edit, EditLock};
use crate::error::{DomainError, DomainResult};
use crate::store::{Expect, Mutation, Store, StoreError, Table};
use crate::throttle::{Policy, Published, RetryAfter, Throttle};
use credentials::{CredentialError, TotpState};

/// How long after an MFA-backed login a person may perform sensitive actions (step-up).
pub const STEP_UP_WINDOW_SECS: u64 = 300;
/// Longest identity or role name.
const MAX_NAME_LEN: usize = 128;
/// Most role assignments per principal; bounds the work of every access decision.
const MAX_ASSIGNMENTS_PER_PRINCIPAL: usize = 64;
/// How long an MFA enrolment code issued by an administrator stays usable.
pub const ENROLMENT_CODE_LIFETIME_SECS: u64 = 24 * 3_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentityKind {
    User,
    Group,
    Application,
    ServiceAccount,
    Device,
}

impl IdentityKind {
    /// The kind of caller this identity authenticates as; groups never authenticate.
    fn principal_kind(self) -> Option<PrincipalKind> {
        match self {
            Self::User => Some(PrincipalKind::User),
            Self::Application => Some(PrincipalKind::Application),
            Self::ServiceAccount => Some(PrincipalKind::ServiceAccount),
            Self::Device => Some(PrincipalKind::Device),
            Self::Group => None,
        }
    }

    /// Workloads authenticate with a client secret (or, later, a key or certificate).
    fn is_workload(self) -> bool {
        matches!(self, Self::Application | Self::ServiceAccount)
    }
}

/// What the API shows of an identity; credentials never leave the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub id: String,
    pub kind: IdentityKind,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    pub disabled: bool,
    /// IDs of the groups this identity belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
    pub created_at: u64,
    /// Whether a second factor is enrolled and confirmed.
    #[serde(default)]
    pub mfa_enrolled: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Credentials {
    /// argon2id PHC string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    /// SHA-256 of the client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    totp: Option<TotpState>,
    /// SHA-256 of each unused recovery code.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    recovery: Vec<String>,
    /// Public keys (a JWKS) for `private_key_jwt` client authentication (RFC 7523).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_keys: Option<serde_json::Value>,
    /// Serial numbers (hex) of client certificates issued by the instance CA, with expiry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    certificates: Vec<IssuedCertificate>,
    /// The session generation: every reset or rotation of a credential increments it, and a
    /// session (access or refresh token) of another generation is dead.
    #[serde(default, skip_serializing_if = "is_zero")]
    generation: u64,
    /// A one-time code an administrator issued for a person's first MFA enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enrolment: Option<EnrolmentCode>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EnrolmentCode {
    /// SHA-256 of the code.
    digest: String,
    expires_at: u64,
}

/// The most live (unrevoked, unexpired) client certificates one workload holds: a renewal a
/// day of 30-day certificates stays under it.
pub const MAX_LIVE_CERTIFICATES: usize = 32;

/// A client certificate issued to a workload by the instance CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuedCertificate {
    pub serial: String,
    pub not_after: u64,
    pub revoked: bool,
    /// The fingerprint of the authority that issued it (absent on records from before the
    /// CA could rotate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Record {
    identity: Identity,
    credentials: Credentials,
}

/// A role assignment: `principal_id` holds `role_id` at `scope`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleAssignment {
    pub id: String,
    pub principal_id: String,
    pub role_id: String,
    pub scope: Scope,
    pub created_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RoleRecord {
    id: String,
    name: String,
    description: String,
    actions: Vec<String>,
}

/// A role as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub actions: Vec<&'static str>,
    pub builtin: bool,
    /// A person holding it must log in with a second factor.
    pub privileged: bool,
}

impl From<&Role> for RoleView {
    fn from(r: &Role) -> Self {
        Self {
            id: r.id.to_string(),
            name: r.name.clone(),
            description: r.description.clone(),
            actions: r.actions.names(),
            builtin: r.builtin,
            privileged: r.is_privileged(),
        }
    }
}

/// A new identity as an administrator describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewIdentity {
    pub kind: IdentityKind,
    pub name: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// A user's initial password.
    #[serde(default)]
    pub password: Option<Zeroizing<String>>,
}

/// Changes to an identity; absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityPatch {
    #[serde(default)]
    pub disabled: Option<bool>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub groups: Option<Vec<String>>,
}

/// Who authenticated, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub id: String,
    pub kind: PrincipalKind,
    /// A second factor was checked.
    pub mfa: bool,
    /// The identity's session generation at authentication (see [`Directory::principal`]).
    pub generation: u64,
}

/// Why a secret check let nobody in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many recent failures from this address or on this account: nothing was checked.
    Throttled(RetryAfter),
    Failed(LoginFailure),
}

impl From<Refusal> for DomainError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Throttled(wait) => DomainError::Throttled {
                retry_after_secs: wait.seconds(),
            },
            Refusal::Failed(LoginFailure::Unavailable) => DomainError::Unavailable,
            Refusal::Failed(_) => {
                DomainError::InvalidArgument("the password or code is not valid".into())
            }
        }
    }
}

/// A TOTP enrolment in progress, shown to the user once.
#[derive(Debug)]
pub struct TotpEnrolment {
    pub secret: Zeroizing<String>,
    pub uri: Zeroizing<String>,
    pub qr_png: Vec<u8>,
}

/// Why a login failed. The API answers every variant the same way; the variant is for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginFailure {
    #[error("unknown identity")]
    Unknown,
    #[error("identity disabled")]
    Disabled,
    #[error("wrong secret")]
    WrongSecret,
    #[error("missing or wrong one-time code")]
    WrongCode,
    #[error("the directory is unavailable")]
    Unavailable,
}

#[derive(Default)]
struct State {
    records: HashMap<String, Record>,
    /// Lower-cased name to ID; names are unique across kinds.
    by_name: HashMap<String, String>,
    roles: BTreeMap<String, Role>,
    assignments: BTreeMap<String, RoleAssignment>,
    /// Resolved grants per identity; cleared on every change.
    grants: HashMap<String, Arc<[Grant]>>,
    /// API keys by public ID.
    api_keys: HashMap<String, apikeys::KeyRecord>,
}

impl State {
    /// Every identity, role, role assignment and API key `store` holds.
    fn read(store: &dyn Store) -> Result<Self, StoreError> {
        let mut state = State::default();
        for table in FOLLOWED {
            for (key, bytes) in store.scan(table)? {
                state.put(table, key, &bytes)?;
            }
        }
        Ok(state)
    }

    /// Takes in the stored record `key` of `table`, replacing what was there.
    fn put(&mut self, table: Table, key: String, bytes: &[u8]) -> Result<(), StoreError> {
        if table == Table::Identities {
            let record: Record =
                serde_json::from_slice(bytes).map_err(|_| corrupt("identity", &key))?;
            // A change of credentials only (a used TOTP step, at each login) keeps the
            // resolved grants: they follow from the identity's groups and roles alone.
            let same_identity = self
                .records
                .get(&key)
                .is_some_and(|old| old.identity == record.identity);
            if same_identity {
                self.records.insert(key, record);
                return Ok(());
            }
            self.remove(table, &key);
            self.by_name
                .insert(record.identity.name.to_lowercase(), key.clone());
            self.records.insert(key, record);
            self.grants.clear();
            return Ok(());
        }
        self.remove(table, &key);
        match table {
            Table::Roles => {
                let record: RoleRecord =
                    serde_json::from_slice(bytes).map_err(|_| corrupt("role", &key))?;
                let actions =
                    ActionSet::parse(&record.actions).map_err(|_| corrupt("role", &key))?;
                self.roles.insert(
                    key,
                    Role {
                        id: RoleId(record.id),
                        name: record.name,
                        description: record.description,
                        actions,
                        builtin: false,
                    },
                );
            }
            Table::RoleAssignments => {
                let a: RoleAssignment =
                    serde_json::from_slice(bytes).map_err(|_| corrupt("role assignment", &key))?;
                self.assignments.insert(key, a);
            }
            Table::ApiKeys => {
                apikeys::load(self, key.clone(), bytes).ok_or_else(|| corrupt("API key", &key))?;
            }
            _ => {}
        }
        self.grants.clear();
        Ok(())
    }

    /// Forgets the record `key` of `table`.
    fn remove(&mut self, table: Table, key: &str) {
        match table {
            Table::Identities => {
                if let Some(old) = self.records.remove(key) {
                    let name = old.identity.name.to_lowercase();
                    if self.by_name.get(&name).is_some_and(|id| id == key) {
                        self.by_name.remove(&name);
                    }
                }
            }
            Table::Roles => {
                self.roles.remove(key);
            }
            Table::RoleAssignments => {
                self.assignments.remove(key);
            }
            Table::ApiKeys => {
                self.api_keys.remove(key);
            }
            _ => {}
        }
        self.grants.clear();
    }

    fn role(&self, id: &str) -> Option<Role> {
        builtin_role(id).or_else(|| self.roles.get(id).cloned())
    }

    fn resolve(&self, id: &str) -> Arc<[Grant]> {
        let Some(record) = self.records.get(id) else {
            return Arc::from(Vec::new());
        };
        let mut holders = vec![id];
        holders.extend(
            record
                .identity
                .groups
                .iter()
                .filter(|g| {
                    self.records.get(g.as_str()).is_some_and(|r| {
                        r.identity.kind == IdentityKind::Group && !r.identity.disabled
                    })
                })
                .map(String::as_str),
        );
        self.assignments
            .values()
            .filter(|a| holders.contains(&a.principal_id.as_str()))
            .filter_map(|a| {
                self.role(&a.role_id).map(|role| Grant {
                    role: role.id,
                    actions: role.actions,
                    scope: a.scope.clone(),
                })
            })
            .collect::<Vec<_>>()
            .into()
    }
}

pub struct Directory {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// Read by every request; changed by edits that let go of it while the store works.
    state: EditLock<State>,
    /// The one throttle every check of a secret goes through ([`Directory::guarded`]).
    throttle: Throttle,
    /// This process's name in the failures it publishes ([`Directory::publish_failures`]).
    node: String,
    /// The addresses whose failures this node keeps published ([`MAX_PUBLISHED_ADDRESSES`]).
    published_addresses: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Times a login reads its identity's record again after another node changed it first.
const CREDENTIAL_ATTEMPTS: usize = 4;

/// The tables the directory keeps in memory.
const FOLLOWED: [Table; 4] = [
    Table::Identities,
    Table::Roles,
    Table::RoleAssignments,
    Table::ApiKeys,
];

/// The key of identity name `name`'s claim in [`Table::Names`]: names are unique across
/// kinds, whatever the case.
fn name_key(name: &str) -> String {
    format!("identity\u{1f}{}", name.to_lowercase())
}

/// The key of custom role name `name`'s claim in [`Table::Names`], whatever the case.
fn role_name_key(name: &str) -> String {
    format!("role\u{1f}{}", name.to_lowercase())
}

/// Longest account name whose failures are published to the other nodes (longer ones, which
/// no real account has, are throttled on each node alone).
const MAX_PUBLISHED_ACCOUNT: usize = 256;

/// Addresses whose failures a node keeps published at once: anyone can fail from many
/// addresses (an IPv6 /48 holds 65,536 of the /64s the throttle counts by), so their records
/// are bounded; beyond, further addresses are throttled on each node alone until some are
/// forgotten.
const MAX_PUBLISHED_ADDRESSES: usize = 10_000;

/// Address records a node writes per publication at most (5,000 a second at one publication
/// every 200 ms), so that a botnet failing from many addresses cannot turn its failures into
/// an unbounded stream of writes; an address left out is published with its next failure.
const MAX_ADDRESSES_PER_PUBLICATION: usize = 1_000;

/// What other nodes sharing the store change (see [`crate::follow`]): a disabled identity, a
/// reset credential, a revoked API key or a changed role holds here once the keys are read.
impl crate::follow::Follower for Directory {
    fn follows(&self, table: Table) -> bool {
        FOLLOWED.contains(&table) || table == Table::Backoff
    }

    /// Read in an edit's turn, which the directory's own changes hold across their commit: no
    /// change of this node lands between the read and the update, so none is undone. While an
    /// edit of this node holds the turn, the keys are handed back for the next step.
    fn changed(&self, table: Table, keys: &[String]) -> Result<Vec<String>, StoreError> {
        if table == Table::Backoff {
            self.read_failures(keys)?;
            return Ok(Vec::new());
        }
        let Ok(mut state) = self.state.edit_within(crate::edit::FOLLOWER_WAIT) else {
            return Ok(keys.to_vec());
        };
        let values = state.unlocked(|| self.store.get_many(table, keys))?;
        for (key, value) in keys.iter().zip(values) {
            match value {
                Some(bytes) => state.put(table, key.clone(), &bytes)?,
                None => state.remove(table, key),
            }
        }
        Ok(Vec::new())
    }

    fn reload(&self) -> Result<Vec<(Table, String)>, StoreError> {
        let mut state = self.write_state()?;
        *state = state.unlocked(|| State::read(self.store.as_ref()))?;
        drop(state);
        let keys: Vec<String> = self
            .store
            .scan(Table::Backoff)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        self.read_failures(&keys)?;
        Ok(Vec::new())
    }
}

impl Directory {
    /// Takes in the failures other nodes published under `keys` (`node \u{1f} account`).
    fn read_failures(&self, keys: &[String]) -> Result<(), StoreError> {
        let values = self.store.get_many(Table::Backoff, keys)?;
        for (key, value) in keys.iter().zip(values) {
            let Some((node, account)) = key.split_once('\u{1f}') else {
                continue;
            };
            if node == self.node {
                continue;
            }
            let published = value.as_deref().and_then(Published::from_bytes);
            self.throttle.set_remote(node, account, published);
        }
        Ok(())
    }

    /// Publishes this node's failed secret checks per account and per address for the other
    /// nodes that share the store (each node's count is a record of its own; the throttle adds
    /// them up), so an attacker who spreads guesses on one account, or from one address, over
    /// several nodes waits as on one. Returns how many were published. Blocking: call it off
    /// the request path, every so often (the server: every 200 ms on a shared store).
    pub fn publish_failures(&self) -> Result<usize, StoreError> {
        let unpublished = self.throttle.take_unpublished();
        // Only accounts that exist: guesses on invented names (which anyone can make up) are
        // throttled on each node, and never become records in the store. Addresses up to
        // `MAX_PUBLISHED_ADDRESSES` at once.
        let known = {
            let state = self.state.read();
            let mut addresses = self
                .published_addresses
                .lock()
                .map_err(|_| StoreError("the published addresses are poisoned".into()))?;
            let mut this_time = 0;
            let mut later = Vec::new();
            let known: Vec<_> = unpublished
                .into_iter()
                .filter(|(account, published)| {
                    if !account.starts_with("addr:") {
                        return account.len() <= MAX_PUBLISHED_ACCOUNT
                            && known_account(&state, account);
                    }
                    if this_time == MAX_ADDRESSES_PER_PUBLICATION {
                        later.push(account.clone());
                        return false;
                    }
                    this_time += 1;
                    match published {
                        None => addresses.remove(account),
                        Some(_) if addresses.contains(account) => true,
                        Some(_) if addresses.len() < MAX_PUBLISHED_ADDRESSES => {
                            addresses.insert(account.clone())
                        }
                        Some(_) => false,
                    }
                })
                .collect();
            self.throttle.publish_later(later);
            known
        };
        let muts: Vec<Mutation> = known
            .into_iter()
            .map(|(account, published)| {
                let key = format!("{}\u{1f}{account}", self.node);
                match published {
                    Some(p) => Mutation::put(Table::Backoff, key, p.to_bytes()),
                    None => Mutation::delete(Table::Backoff, key),
                }
            })
            .collect();
        if !muts.is_empty() {
            self.store.commit(&muts)?;
        }
        Ok(muts.len())
    }

    /// Deletes the published failures that every node has forgotten by now (their last failure
    /// older than the throttle's quiet period), whichever node published them.
    pub fn forget_old_failures(&self) -> Result<usize, StoreError> {
        let horizon = self
            .now()
            .saturating_sub(Policy::default().forget_after.whole_seconds().max(0) as u64);
        let old: Vec<Mutation> = self
            .store
            .scan(Table::Backoff)?
            .into_iter()
            .filter(|(_, bytes)| {
                Published::from_bytes(bytes).is_none_or(|p| p.last_failure < horizon as i64)
            })
            .map(|(key, _)| Mutation::delete(Table::Backoff, key))
            .collect();
        if !old.is_empty() {
            self.store.commit(&old)?;
        }
        // This node's addresses among them no longer count against its bound.
        if let Ok(mut addresses) = self.published_addresses.lock() {
            for m in &old {
                if let Some((node, account)) = m.key.split_once('\u{1f}')
                    && node == self.node
                {
                    addresses.remove(account);
                }
            }
        }
        Ok(old.len())
    }
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").finish_non_exhaustive()
    }
}

fn corrupt(what: &str, key: &str) -> StoreError {
    StoreError(format!("stored {what} '{key}' is unreadable"))
}

fn to_json<T: Serialize>(value: &T) -> DomainResult<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|_| DomainError::Internal("a directory record did not serialize"))
}

fn not_found(kind: &'static str, id: &str) -> DomainError {
    DomainError::NotFound {
        kind,
        id: id.to_owned(),
    }
}

fn check_name(name: &str) -> DomainResult<()> {
    // The identifier grammar (`crate::text`): no hidden, reordering or line-breaking character,
    // no edge whitespace, no Latin mixed with Greek or Cyrillic, so `аdmin` cannot pass for
    // `admin` in a listing or the audit trail.
    let ok = !name.trim().is_empty()
        && name.len() <= MAX_NAME_LEN
        && crate::text::check_identifier(name).is_ok();
    if ok {
        Ok(())
    } else {
        Err(DomainError::InvalidArgument(format!(
            "a name must be 1 to {MAX_NAME_LEN} characters of the identifier grammar: no control, format or separator characters, no surrounding spaces, no Latin mixed with Greek or Cyrillic"
        )))
    }
}

impl Directory {
    /// Loads the directory. Client records of earlier versions (table `clients`: secret digest
    /// and role IDs) become applications holding those roles at instance scope.
    pub fn open(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let state = State::read(store.as_ref())?;
        let directory = Self {
            store,
            throttle: Throttle::new(Policy::default(), clock.clone()),
            node: uuid::Uuid::new_v4().simple().to_string(),
            published_addresses: std::sync::Mutex::new(std::collections::HashSet::new()),
            clock,
            state: EditLock::new(state),
        };
        directory.migrate_clients()?;
        directory.migrate_owner()?;
        directory.claim_names()?;
        // Failures other nodes (and this node's earlier runs) published, on a shared store.
        let published: Vec<String> = directory
            .store
            .scan(Table::Backoff)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        directory.read_failures(&published)?;
        Ok(directory)
    }

    /// Identities stored before names were claimed in the store ([`Table::Names`]) get their
    /// claims. Another node starting at once may claim the same names: then its claims stand.
    fn claim_names(&self) -> Result<(), StoreError> {
        let claimed: std::collections::HashSet<String> = self
            .store
            .scan(Table::Names)?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let state = self.state.read();
        let identities = state.by_name.iter().map(|(name, id)| (name_key(name), id));
        let roles = state
            .roles
            .iter()
            .map(|(id, role)| (role_name_key(&role.name), id));
        let mut missing: Vec<Mutation> = identities
            .chain(roles)
            .filter(|(key, _)| !claimed.contains(key))
            .map(|(key, id)| Mutation::put(Table::Names, key, id.as_bytes().to_vec()))
            .collect();
        drop(state);
        // Two records that shared a name from before claims: the first keeps it.
        missing.sort_by(|a, b| a.key.cmp(&b.key));
        missing.dedup_by(|a, b| a.key == b.key);
        if missing.is_empty() {
            return Ok(());
        }
        let absent: Vec<Expect> = missing
            .iter()
            .map(|m| Expect {
                table: Table::Names,
                key: m.key.clone(),
                value: None,
            })
            .collect();
        self.store.commit_expecting(&missing, &absent)?;
        Ok(())
    }

    /// Commits `muts`, which claim a name (a put of its [`Table::Names`] record `key`), expecting
    /// no claim on it in the store: of nodes creating one name at once, one takes it, and the
    /// others are told it is taken although their memory did not know it yet.
    fn commit_claiming(&self, muts: &[Mutation], key: String, taken: &str) -> DomainResult<()> {
        let absent = Expect {
            table: Table::Names,
            key: key.clone(),
            value: None,
        };
        match self.commit_expecting_all(muts, vec![absent]) {
            Err(DomainError::Superseded) => Err(match self.stored_claim(&key)? {
                Some(_) => DomainError::Conflict(taken.to_owned()),
                None => DomainError::Superseded,
            }),
            other => other,
        }
    }

    /// The deletion of name claim `key` if `id` holds it (two records that shared a name from
    /// before claims keep the one claim until its holder goes).
    fn claim_of(&self, key: &str, id: &str) -> DomainResult<Option<Mutation>> {
        let claim = self.stored_claim(key)?;
        Ok((claim.as_deref() == Some(id.as_bytes())).then(|| Mutation::delete(Table::Names, key)))
    }

    /// Name claim `key` as stored: the ID of the record that holds the name.
    fn stored_claim(&self, key: &str) -> DomainResult<Option<Vec<u8>>> {
        Ok(self
            .store
            .get_many(Table::Names, &[key.to_owned()])
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read a name's claim");
                DomainError::Unavailable
            })?
            .pop()
            .flatten())
    }

    /// Data directories made before administration was bounded by the actor gave the first
    /// administrator Data Owner and Security Admin only, which no longer let it hand out the
    /// Operator or Telemetry Writer roles; it gets Instance Owner, the role that now roots all
    /// delegation. (It could assign itself any role before, so it gains no power it lacked.)
    fn migrate_owner(&self) -> Result<(), StoreError> {
        let mut state = self.write_state()?;
        let Some(id) = state.by_name.get("bootstrap-admin").cloned() else {
            return Ok(());
        };
        let holds = |role: &str| {
            state
                .assignments
                .values()
                .any(|a| a.principal_id == id && a.role_id == role && a.scope == Scope::Instance)
        };
        if !holds(SECURITY_ADMIN) || holds(INSTANCE_OWNER) {
            return Ok(());
        }
        let a = RoleAssignment {
            id: uuid::Uuid::new_v4().to_string(),
            principal_id: id,
            role_id: INSTANCE_OWNER.to_owned(),
            scope: Scope::Instance,
            created_at: self.now(),
        };
        let bytes = serde_json::to_vec(&a)
            .map_err(|_| StoreError("a directory record did not serialize".into()))?;
        state.unlocked(|| {
            self.store
                .commit(&[Mutation::put(Table::RoleAssignments, a.id.clone(), bytes)])
        })?;
        state.assignments.insert(a.id.clone(), a);
        state.grants.clear();
        tracing::info!("the first administrator now holds the Instance Owner role");
        Ok(())
    }

    fn migrate_clients(&self) -> Result<(), StoreError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct LegacyClient {
            secret_sha256: String,
            roles: Vec<String>,
            created_at: u64,
        }
        let legacy = self.store.scan(Table::Clients)?;
        if legacy.is_empty() {
            return Ok(());
        }
        let mut state = self.write_state()?;
        let mut muts = Vec::new();
        let mut added = Vec::new();
        for (id, bytes) in legacy {
            let client: LegacyClient =
                serde_json::from_slice(&bytes).map_err(|_| corrupt("client", &id))?;
            let record = Record {
                identity: Identity {
                    id: id.clone(),
                    kind: IdentityKind::Application,
                    name: format!("client-{id}"),
                    display_name: None,
                    disabled: false,
                    groups: vec![],
                    created_at: client.created_at,
                    mfa_enrolled: false,
                },
                credentials: Credentials {
                    client_secret: Some(client.secret_sha256),
                    ..Credentials::default()
                },
            };
            muts.push(Mutation::put(
                Table::Identities,
                id.clone(),
                to_json(&record)
                    .map_err(|_| StoreError("a directory record did not serialize".into()))?,
            ));
            for role in client.roles {
                let a = RoleAssignment {
                    id: uuid::Uuid::new_v4().to_string(),
                    principal_id: id.clone(),
                    role_id: role,
                    scope: Scope::Instance,
                    created_at: client.created_at,
                };
                muts.push(Mutation::put(
                    Table::RoleAssignments,
                    a.id.clone(),
                    to_json(&a)
                        .map_err(|_| StoreError("a directory record did not serialize".into()))?,
                ));
                added.push(a);
            }
            muts.push(Mutation::delete(Table::Clients, id.clone()));
            state
                .by_name
                .insert(record.identity.name.to_lowercase(), id.clone());
            state.records.insert(id, record);
        }
        state.unlocked(|| self.store.commit(&muts))?;
        for a in added {
            state.assignments.insert(a.id.clone(), a);
        }
        state.grants.clear();
        tracing::info!("migrated OAuth clients into the identity directory");
        Ok(())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.clock.now().unix_timestamp()).unwrap_or(0)
    }

    /// An edit of the directory, in its turn (see [`crate::edit`]).
    fn write_state(&self) -> Result<Edit<'_, State>, StoreError> {
        self.state
            .edit()
            .map_err(|_| StoreError("another directory edit is still waiting for the store".into()))
    }

    fn commit(&self, muts: &[Mutation]) -> DomainResult<()> {
        self.store.commit(muts).map_err(|e| {
            tracing::error!(error = %e, "directory commit failed");
            DomainError::Unavailable
        })
    }

    /// Reads record `key` of `table` from the store into `state`, as another node sharing the
    /// store may have changed it, and returns what a commit decided on it must expect (see
    /// [`Directory::commit_expecting`]). Call it with the directory locked, before deciding.
    fn refresh_record(
        &self,
        state: &mut Edit<'_, State>,
        table: Table,
        key: &str,
    ) -> DomainResult<Expect> {
        let stored = state
            .unlocked(|| self.store.get_many(table, &[key.to_owned()]))
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read a directory record");
                DomainError::Unavailable
            })?
            .pop()
            .flatten();
        match &stored {
            Some(bytes) => state.put(table, key.to_owned(), bytes).map_err(|e| {
                tracing::error!(error = %e, "a stored directory record is unreadable");
                DomainError::Internal("a stored directory record is unreadable")
            })?,
            None => state.remove(table, key),
        }
        Ok(Expect {
            table,
            key: key.to_owned(),
            value: stored,
        })
    }

    /// Reads every record of `table` from the store into `state` (the few tables an edit
    /// decides on whole: roles, role assignments), as another node sharing the store may have
    /// changed them. On a store of one writer, memory is the store: nothing is read.
    fn refresh_table(&self, state: &mut Edit<'_, State>, table: Table) -> DomainResult<()> {
        if state
            .unlocked(|| self.store.head())
            .ok()
            .flatten()
            .is_none()
        {
            return Ok(());
        }
        let stored = state.unlocked(|| self.store.scan(table)).map_err(|e| {
            tracing::error!(error = %e, "cannot read a directory table");
            DomainError::Unavailable
        })?;
        let known: Vec<String> = match table {
            Table::Roles => state.roles.keys().cloned().collect(),
            Table::RoleAssignments => state.assignments.keys().cloned().collect(),
            _ => Vec::new(),
        };
        for key in known {
            if !stored.iter().any(|(k, _)| *k == key) {
                state.remove(table, &key);
            }
        }
        for (key, bytes) in stored {
            state.put(table, key, &bytes).map_err(|e| {
                tracing::error!(error = %e, "a stored directory record is unreadable");
                DomainError::Internal("a stored directory record is unreadable")
            })?;
        }
        Ok(())
    }

    /// Commits `muts` only if the record `expect` names still holds what it was decided on:
    /// [`DomainError::Superseded`] (503, retryable) when another node changed it meanwhile.
    fn commit_expecting(&self, muts: &[Mutation], expect: Expect) -> DomainResult<()> {
        self.commit_expecting_all(muts, vec![expect])
    }

    /// [`Directory::commit_expecting`] for several records.
    fn commit_expecting_all(&self, muts: &[Mutation], expect: Vec<Expect>) -> DomainResult<()> {
        match self.store.commit_expecting(muts, &expect) {
            Ok(true) => Ok(()),
            Ok(false) => Err(DomainError::Superseded),
            Err(e) => {
                tracing::error!(error = %e, "directory commit failed");
                Err(DomainError::Unavailable)
            }
        }
    }

    fn lock(&self) -> DomainResult<Edit<'_, State>> {
        self.write_state().map_err(|_| DomainError::Unavailable)
    }

    /// Number of identities; the first start creates the first administrator when it is zero.
    pub fn is_empty(&self) -> bool {
        self.state.read().records.is_empty()
    }

    /// A client ID and secret for the first administrator, not yet registered: the caller
    /// saves them where their owner will find them, then calls [`Directory::bootstrap_admin`],
    /// so a crash in between leaves no registered credential that nobody holds.
    pub fn new_admin_credential() -> (String, Zeroizing<String>) {
        (
            uuid::Uuid::new_v4().to_string(),
            credentials::random_secret(32),
        )
    }

    /// Registers the first administrator: an application holding Data Owner, Security Admin and
    /// Instance Owner at instance scope. Only the secret's digest is stored.
    pub fn bootstrap_admin(&self, id: &str, secret: &str) -> DomainResult<()> {
        let id = id.to_owned();
        let now = self.now();
        let record = Record {
            identity: Identity {
                id: id.clone(),
                kind: IdentityKind::Application,
                name: "bootstrap-admin".into(),
                display_name: Some("First administrator, created on first start".into()),
                disabled: false,
                groups: vec![],
                created_at: now,
                mfa_enrolled: false,
            },
            credentials: Credentials {
                client_secret: Some(credentials::secret_digest(secret)),
                ..Credentials::default()
            },
        };
        let assignments: Vec<RoleAssignment> = [DATA_OWNER, SECURITY_ADMIN, INSTANCE_OWNER]
            .iter()
            .map(|role| RoleAssignment {
                id: uuid::Uuid::new_v4().to_string(),
                principal_id: id.clone(),
                role_id: (*role).to_owned(),
                scope: Scope::Instance,
                created_at: now,
            })
            .collect();
        let mut state = self.lock()?;
        if state.by_name.contains_key("bootstrap-admin") {
            return Err(DomainError::Conflict(
                "the first administrator already exists".into(),
            ));
        }
        let mut muts = vec![Mutation::put(
            Table::Identities,
            id.clone(),
            to_json(&record)?,
        )];
        for a in &assignments {
            muts.push(Mutation::put(
                Table::RoleAssignments,
                a.id.clone(),
                to_json(a)?,
            ));
        }
        muts.push(Mutation::put(
            Table::Names,
            name_key("bootstrap-admin"),
            id.as_bytes().to_vec(),
        ));
        state.unlocked(|| {
            self.commit_claiming(
                &muts,
                name_key("bootstrap-admin"),
                "the first administrator already exists",
            )
        })?;
        state.by_name.insert("bootstrap-admin".into(), id.clone());
        state.records.insert(id.clone(), record);
        for a in assignments {
            state.assignments.insert(a.id.clone(), a);
        }
        state.grants.clear();
        Ok(())
    }

    // ---- authentication ----

    /// The grants `id` holds now, or `None` if it does not exist, is disabled or is a group.
    fn grants(&self, id: &str) -> Option<(PrincipalKind, Arc<[Grant]>)> {
        {
            let state = self.state.read();
            let record = state.records.get(id)?;
            if record.identity.disabled {
                return None;
            }
            let kind = record.identity.kind.principal_kind()?;
            if let Some(grants) = state.grants.get(id) {
                return Some((kind, grants.clone()));
            }
        }
        let mut state = self.state.cache();
        let kind = state.records.get(id)?.identity.kind.principal_kind()?;
        let grants = state.resolve(id);
        state.grants.insert(id.to_owned(), grants.clone());
        Some((kind, grants))
    }

    /// The caller identity `id` is now: its current grants, with MFA and step-up decided from
    /// how and when it authenticated. `None` if it may not act at all: deleted, disabled, or
    /// the session is of an earlier `generation` (a credential was reset since it began).
    pub fn principal(
        &self,
        id: &str,
        mfa: bool,
        auth_time: u64,
        generation: u64,
    ) -> Option<Principal> {
        if self.generation(id)? != generation {
            return None;
        }
        let (kind, grants) = self.grants(id)?;
        let now = self.now();
        // An `auth_time` in the future is no authentication at all, not a step-up forever.
        let step_up =
            mfa && auth_time <= now && now.saturating_sub(auth_time) <= STEP_UP_WINDOW_SECS;
        Some(Principal::new(id, kind, grants, mfa, step_up))
    }

    /// The session generation of identity `id`: sessions of another generation are dead.
    pub fn generation(&self, id: &str) -> Option<u64> {
        let state = self.state.read();
        Some(state.records.get(id)?.credentials.generation)
    }

    /// Runs `check`, a check of a secret presented from `from` for `account` (when it names
    /// one), behind the one throttle: while the address or the account must wait, `check` does
    /// not run at all; a failure counts against both; a success clears nothing. Every secret
    /// the directory holds is checked through here, and so are the checks that live elsewhere
    /// (client assertions and certificates in the token service).
    pub fn guarded<T>(
        &self,
        from: IpAddr,
        account: Option<&str>,
        check: impl FnOnce() -> Result<T, LoginFailure>,
    ) -> Result<T, Refusal> {
        self.throttle
            .check(from, account)
            .map_err(Refusal::Throttled)?;
        match check() {
            Ok(value) => Ok(value),
            // The server could not check: not the caller's failure.
            Err(LoginFailure::Unavailable) => Err(Refusal::Failed(LoginFailure::Unavailable)),
            Err(why) => {
                self.throttle.failed(from, account);
                Err(Refusal::Failed(why))
            }
        }
    }

    /// A caller authenticated by an external issuer: the role assignments of the directory
    /// groups its claims map to (by group ID or name; scopes included), plus the mapped roles at
    /// instance scope. Values that name no enabled group of the directory grant nothing.
    pub fn external_principal(
        &self,
        subject: &str,
        application: bool,
        group_ids: &[String],
        role_ids: &[String],
        mfa: bool,
        auth_time: u64,
    ) -> Principal {
        let mut grants: Vec<Grant> = Vec::new();
        {
            let state = self.state.read();
            // A mapped value names a directory group by ID or by name.
            let groups: Vec<&str> = group_ids
                .iter()
                .filter_map(|g| {
                    let id = match state.records.get(g) {
                        Some(_) => g.as_str(),
                        None => state.by_name.get(&g.to_lowercase())?.as_str(),
                    };
                    state
                        .records
                        .get(id)
                        .filter(|r| r.identity.kind == IdentityKind::Group && !r.identity.disabled)
                        .map(|_| id)
                })
                .collect();
            grants.extend(
                state
                    .assignments
                    .values()
                    .filter(|a| groups.contains(&a.principal_id.as_str()))
                    .filter_map(|a| {
                        state.role(&a.role_id).map(|role| Grant {
                            role: role.id,
                            actions: role.actions,
                            scope: a.scope.clone(),
                        })
                    }),
            );
            grants.extend(
                role_ids
                    .iter()
                    .filter_map(|id| state.role(id))
                    .map(|role| Grant {
                        role: role.id,
                        actions: role.actions,
                        scope: Scope::Instance,
                    }),
            );
        }
        let kind = if application {
            PrincipalKind::Application
        } else {
            PrincipalKind::User
        };
        let now = self.now();
        let step_up =
            mfa && auth_time <= now && now.saturating_sub(auth_time) <= STEP_UP_WINDOW_SECS;
        Principal::new(subject, kind, grants.into(), mfa, step_up)
    }

    /// The client-credentials check for applications and service accounts, from `from`.
    /// `client_id` is the identity ID.
    pub fn authenticate_client(
        &self,
        from: IpAddr,
        client_id: &str,
        secret: &str,
    ) -> Result<Authenticated, Refusal> {
        self.guarded(from, Some(client_id), || {
            let state = self.state.read();
            let record = state.records.get(client_id);
            let stored = record.and_then(|r| r.credentials.client_secret.as_deref());
            // The digest comparison runs whether or not the client exists.
            let matches = credentials::secret_matches(secret, stored);
            workload_login(record.ok_or(LoginFailure::Unknown)?, matches)
        })
    }

    /// A person's login from `from`: password (argon2id), then, if enrolled, a TOTP or recovery
    /// code. An unknown user costs the same argon2 work as a wrong password. Slow by design:
    /// call it off the async runtime.
    pub fn authenticate_user(
        &self,
        from: IpAddr,
        name: &str,
        password: &str,
        code: Option<&str>,
    ) -> Result<Authenticated, Refusal> {
        let account = person_account(name);
        self.guarded(from, Some(&account), || {
            self.check_user(name, password, code)
        })
    }

    fn check_user(
        &self,
        name: &str,
        password: &str,
        code: Option<&str>,
    ) -> Result<Authenticated, LoginFailure> {
        let (id, hash) = {
            let state = self.state.read();
            let record = state
                .by_name
                .get(&name.to_lowercase())
                .and_then(|id| state.records.get(id))
                .filter(|r| r.identity.kind == IdentityKind::User);
            (
                record.map(|r| r.identity.id.clone()),
                record.and_then(|r| r.credentials.password.clone()),
            )
        };
        let password_ok = credentials::verify_password(password, hash.as_deref())
            .map_err(|_| LoginFailure::Unavailable)?;
        let id = id.ok_or(LoginFailure::Unknown)?;
        if !password_ok {
            return Err(LoginFailure::WrongSecret);
        }
        let now = self.now();
        let mut state = self.lock().map_err(|_| LoginFailure::Unavailable)?;
        // Decided on the record as the store holds it, and the used step or code committed
        // only if the store still holds that record: on a store several nodes share, a code
        // presented to two of them at once logs in on one only.
        for _ in 0..CREDENTIAL_ATTEMPTS {
            let expect = self
                .refresh_record(&mut state, Table::Identities, &id)
                .map_err(|_| LoginFailure::Unavailable)?;
            let record = state.records.get(&id).ok_or(LoginFailure::Unknown)?;
            // The password was checked against what this node knew; a password changed since
            // (on another node) is not the one checked, and its generation must not be had
            // with the old one.
            if record.credentials.password != hash {
                return Err(LoginFailure::WrongSecret);
            }
            if record.identity.disabled {
                return Err(LoginFailure::Disabled);
            }
            let enrolled = record
                .credentials
                .totp
                .as_ref()
                .is_some_and(|t| t.confirmed);
            let generation = record.credentials.generation;
            if !enrolled {
                return Ok(Authenticated {
                    id,
                    kind: PrincipalKind::User,
                    mfa: false,
                    generation,
                });
            }
            let code = code.ok_or(LoginFailure::WrongCode)?;
            let mut updated = record.clone();
            let totp_ok = updated
                .credentials
                .totp
                .as_mut()
                .is_some_and(|totp| totp.accept(code, now));
            let accepted =
                totp_ok || credentials::use_recovery_code(&mut updated.credentials.recovery, code);
            if !accepted {
                return Err(LoginFailure::WrongCode);
            }
            // The used step or code is durable before the login succeeds: a code works once,
            // across restarts and nodes too.
            let bytes = to_json(&updated).map_err(|_| LoginFailure::Unavailable)?;
            let put = Mutation::put(Table::Identities, id.clone(), bytes);
            let committed = state
                .unlocked(|| self.store.commit_expecting(&[put], &[expect]))
                .map_err(|_| LoginFailure::Unavailable)?;
            if committed {
                state.records.insert(id.clone(), updated);
                return Ok(Authenticated {
                    id,
                    kind: PrincipalKind::User,
                    mfa: true,
                    generation,
                });
            }
        }
        tracing::warn!(identity = %id, "an identity record kept changing during a login");
        Err(LoginFailure::Unavailable)
    }

    // ---- self-service ----

    /// The caller itself, if it may change its own credentials: a person (or, for
    /// certificates, a workload) that presented a session, never an API key, which is a
    /// standing credential bound to one role and must not mint others.
    fn self_service(caller: &Principal) -> DomainResult<()> {
        if caller.credential == Credential::ApiKey {
            return Err(DomainError::Forbidden {
                action: "twinguard/self-service",
            });
        }
        Ok(())
    }

    /// Starts a TOTP enrolment for the calling user. A confirmed enrolment is only replaced by
    /// an administrator's reset, so a stolen password alone cannot re-enrol. A person who holds
    /// any privileged action must also present the one-time enrolment code an administrator
    /// issued ([`Directory::issue_enrolment_code`]): otherwise whoever stole the password of a
    /// privileged person who had not enrolled yet would enrol their own authenticator and pass
    /// every MFA check from then on. The code is checked behind the throttle and used up.
    pub fn begin_totp(
        &self,
        caller: &Principal,
        from: IpAddr,
        enrolment_code: Option<&str>,
        issuer: &str,
    ) -> DomainResult<TotpEnrolment> {
        Self::self_service(caller)?;
        if caller.kind != PrincipalKind::User {
            return Err(DomainError::InvalidArgument(
                "only people enrol a second factor".into(),
            ));
        }
        let account = self.person_account_of(&caller.subject)?;
        let now = self.now();
        let totp = TotpState::generate();
        let enrolled = self.guarded(from, Some(&account), || {
            let mut state = self.lock().map_err(|_| LoginFailure::Unavailable)?;
            let privileged = state
                .resolve(&caller.subject)
                .iter()
                .any(|g| g.actions.iter().any(Action::is_privileged));
            let record = state
                .records
                .get(&caller.subject)
                .ok_or(LoginFailure::Unknown)?;
            let mut updated = record.clone();
            if updated
                .credentials
                .totp
                .as_ref()
                .is_some_and(|t| t.confirmed)
            {
                return Ok(Err(DomainError::Conflict(
                    "a second factor is already enrolled; an administrator can reset it".into(),
                )));
            }
            if privileged {
                let issued = updated
                    .credentials
                    .enrolment
                    .take()
                    .filter(|c| c.expires_at > now);
                let matches = credentials::secret_matches(
                    enrolment_code.unwrap_or_default(),
                    issued.as_ref().map(|c| c.digest.as_str()),
                );
                if !matches {
                    return Err(LoginFailure::WrongCode);
                }
            }
            updated.credentials.totp = Some(totp.clone());
            state.unlocked(|| self.persist(&caller.subject, &updated))?;
            let name = updated.identity.name.clone();
            state.records.insert(caller.subject.clone(), updated);
            Ok(Ok(name))
        });
        let name = match enrolled {
            Ok(result) => result?,
            Err(Refusal::Failed(LoginFailure::WrongCode)) => {
                return Err(DomainError::InvalidArgument(
                    "a person who holds privileged roles enrols with the one-time enrolment code an administrator issued".into(),
                ));
            }
            Err(refusal) => return Err(refusal.into()),
        };
        Ok(TotpEnrolment {
            secret: Zeroizing::new(totp.secret.clone()),
            uri: Zeroizing::new(totp.uri(&name, issuer).unwrap_or_default()),
            qr_png: totp.qr_png(&name, issuer).unwrap_or_default(),
        })
    }

    /// Confirms the calling user's enrolment with a first code (behind the throttle) and
    /// returns recovery codes, shown once.
    pub fn confirm_totp(
        &self,
        caller: &Principal,
        from: IpAddr,
        code: &str,
    ) -> DomainResult<Vec<String>> {
        Self::self_service(caller)?;
        let account = self.person_account_of(&caller.subject)?;
        let now = self.now();
        let confirmed = self.guarded(from, Some(&account), || {
            let mut state = self.lock().map_err(|_| LoginFailure::Unavailable)?;
            let record = state
                .records
                .get(&caller.subject)
                .ok_or(LoginFailure::Unknown)?;
            let mut updated = record.clone();
            let Some(totp) = updated.credentials.totp.as_mut().filter(|t| !t.confirmed) else {
                return Ok(Err(DomainError::Conflict(
                    "no enrolment is waiting for confirmation".into(),
                )));
            };
            if !totp.accept(code, now) {
                return Err(LoginFailure::WrongCode);
            }
            totp.confirmed = true;
            let (codes, digests) = credentials::recovery_codes();
            updated.credentials.recovery = digests;
            updated.identity.mfa_enrolled = true;
            state.unlocked(|| self.persist(&caller.subject, &updated))?;
            state.records.insert(caller.subject.clone(), updated);
            Ok(Ok(codes))
        });
        match confirmed {
            Ok(result) => result,
            Err(Refusal::Failed(LoginFailure::WrongCode)) => {
                Err(DomainError::InvalidArgument("the code is not valid".into()))
            }
            Err(refusal) => Err(refusal.into()),
        }
    }

    /// Changes the calling user's own password, given the current one, which is checked
    /// behind the throttle under the same account as a login. Every session of the person,
    /// this one included, ends: they log in again with the new password.
    pub fn change_own_password(
        &self,
        caller: &Principal,
        from: IpAddr,
        current: &str,
        new: &str,
    ) -> DomainResult<()> {
        Self::self_service(caller)?;
        let account = self.person_account_of(&caller.subject)?;
        let stored = {
            let state = self.state.read();
            state
                .records
                .get(&caller.subject)
                .and_then(|r| r.credentials.password.clone())
        };
        let checked = self.guarded(from, Some(&account), || match credentials::verify_password(
            current,
            stored.as_deref(),
        ) {
            Ok(true) => Ok(()),
            Ok(false) => Err(LoginFailure::WrongSecret),
            Err(_) => Err(LoginFailure::Unavailable),
        });
        match checked {
            Ok(()) => {}
            Err(Refusal::Failed(LoginFailure::WrongSecret)) => {
                return Err(DomainError::InvalidArgument(
                    "the current password is wrong".into(),
                ));
            }
            Err(refusal) => return Err(refusal.into()),
        }
        let hash = hash_new_password(new)?;
        self.update_record(None, &caller.subject, |r| {
            r.credentials.password = Some(hash);
            r.credentials.generation += 1;
            Ok(())
        })
        .map(|_| ())
    }

    /// Makes a changed record durable inside a secret check (a used code, an enrolment):
    /// failing to is the server's failure, not the caller's.
    fn persist(&self, id: &str, record: &Record) -> Result<(), LoginFailure> {
        let bytes = to_json(record).map_err(|_| LoginFailure::Unavailable)?;
        self.store
            .commit(&[Mutation::put(Table::Identities, id.to_owned(), bytes)])
            .map_err(|_| LoginFailure::Unavailable)
    }

    /// The throttle account of a person: the same key whether a guess comes in by login or by
    /// a self-service check.
    fn person_account_of(&self, id: &str) -> DomainResult<String> {
        let state = self.state.read();
        let record = state
            .records
            .get(id)
            .filter(|r| r.identity.kind == IdentityKind::User)
            .ok_or_else(|| {
                DomainError::InvalidArgument("only people have passwords and second factors".into())
            })?;
        Ok(person_account(&record.identity.name))
    }

    // ---- administration ----

    /// Changes identity `id`'s record. With an `actor` (an administrator and the action it
    /// uses), the actor must cover everything `id` holds, and every group `id` joins.
    fn update_record(
        &self,
        actor: Option<(&Principal, Action)>,
        id: &str,
        change: impl FnOnce(&mut Record) -> DomainResult<()>,
    ) -> DomainResult<Identity> {
        let mut state = self.lock()?;
        // Decided on the record as stored: a change another node made (a disable, a reset) is
        // not undone by this one.
        let expect = self.refresh_record(&mut state, Table::Identities, id)?;
        let record = state
            .records
            .get(id)
            .ok_or_else(|| not_found("identity", id))?;
        if let Some((caller, action)) = actor {
            bounded(&state, caller, action, id)?;
        }
        let mut updated = record.clone();
        change(&mut updated)?;
        for g in &updated.identity.groups {
            let is_group = state
                .records
                .get(g)
                .is_some_and(|r| r.identity.kind == IdentityKind::Group);
            if !is_group || g == id {
                return Err(DomainError::InvalidArgument(format!(
                    "'{g}' is not a group"
                )));
            }
            if let Some((caller, action)) = actor
                && !record.identity.groups.contains(g)
            {
                bounded(&state, caller, action, g)?;
            }
        }
        state.unlocked(|| {
            self.commit_expecting(
                &[Mutation::put(
                    Table::Identities,
                    id.to_owned(),
                    to_json(&updated)?,
                )],
                expect,
            )
        })?;
        let identity = updated.identity.clone();
        state.records.insert(id.to_owned(), updated);
        state.grants.clear();
        Ok(identity)
    }

    pub fn identities(&self, caller: &Principal) -> DomainResult<Vec<Identity>> {
        caller.authorize_instance(Action::IdentitiesRead)?;
        let state = self.state.read();
        let mut out: Vec<Identity> = state.records.values().map(|r| r.identity.clone()).collect();
        // A total order (names are unique, ids break any tie), so pages neither repeat nor skip.
        out.sort_by(|a, b| (a.name.to_lowercase(), &a.id).cmp(&(b.name.to_lowercase(), &b.id)));
        Ok(out)
    }

    /// An identity; a caller may always read its own.
    pub fn identity(&self, caller: &Principal, id: &str) -> DomainResult<Identity> {
        if caller.subject != id {
            caller.authorize_instance(Action::IdentitiesRead)?;
        }
        let state = self.state.read();
        state
            .records
            .get(id)
            .map(|r| r.identity.clone())
            .ok_or_else(|| not_found("identity", id))
    }

    /// Creates an identity. Applications and service accounts get a client secret, returned
    /// here once and stored only as a digest.
    pub fn create_identity(
        &self,
        caller: &Principal,
        new: NewIdentity,
    ) -> DomainResult<(Identity, Option<Zeroizing<String>>)> {
        caller.authorize_instance(Action::IdentitiesWrite)?;
        check_name(&new.name)?;
        let password = match (&new.password, new.kind) {
            (Some(p), IdentityKind::User) => Some(hash_new_password(p)?),
            (Some(_), _) => {
                return Err(DomainError::InvalidArgument(
                    "only users have passwords".into(),
                ));
            }
            (None, _) => None,
        };
        let secret = new
            .kind
            .is_workload()
            .then(|| credentials::random_secret(32));
        let id = uuid::Uuid::new_v4().to_string();
        let record = Record {
            identity: Identity {
                id: id.clone(),
                kind: new.kind,
                name: new.name.clone(),
                display_name: new.display_name,
                disabled: false,
                groups: new.groups,
                created_at: self.now(),
                mfa_enrolled: false,
            },
            credentials: Credentials {
                password,
                client_secret: secret.as_ref().map(|s| credentials::secret_digest(s)),
                ..Credentials::default()
            },
        };
        let mut state = self.lock()?;
        if state.by_name.contains_key(&new.name.to_lowercase()) {
            return Err(DomainError::Conflict(format!(
                "the name '{}' is taken",
                new.name
            )));
        }
        for g in &record.identity.groups {
            if !state
                .records
                .get(g)
                .is_some_and(|r| r.identity.kind == IdentityKind::Group)
            {
                return Err(DomainError::InvalidArgument(format!(
                    "'{g}' is not a group"
                )));
            }
            bounded(&state, caller, Action::IdentitiesWrite, g)?;
        }
        state.unlocked(|| {
            self.commit_claiming(
                &[
                    Mutation::put(Table::Identities, id.clone(), to_json(&record)?),
                    Mutation::put(Table::Names, name_key(&new.name), id.as_bytes().to_vec()),
                ],
                name_key(&new.name),
                &format!("the name '{}' is taken", new.name),
            )
        })?;
        let identity = record.identity.clone();
        state.by_name.insert(new.name.to_lowercase(), id.clone());
        state.records.insert(id, record);
        Ok((identity, secret))
    }

    pub fn update_identity(
        &self,
        caller: &Principal,
        id: &str,
        patch: IdentityPatch,
    ) -> DomainResult<Identity> {
        caller.authorize_instance(Action::IdentitiesWrite)?;
        self.update_record(Some((caller, Action::IdentitiesWrite)), id, |r| {
            if let Some(disabled) = patch.disabled {
                if disabled && !r.identity.disabled {
                    r.credentials.generation += 1;
                }
                r.identity.disabled = disabled;
            }
            if let Some(name) = patch.display_name {
                r.identity.display_name = Some(name);
            }
            if let Some(groups) = patch.groups {
                r.identity.groups = groups;
            }
            Ok(())
        })
    }

    /// Deletes an identity with its role assignments; a group also leaves its members.
    pub fn delete_identity(&self, caller: &Principal, id: &str) -> DomainResult<()> {
        caller.authorize_instance(Action::IdentitiesWrite)?;
        let mut state = self.lock()?;
        // Its assignments as stored: one another node made moments ago goes with it.
        let expect = self.refresh_record(&mut state, Table::Identities, id)?;
        self.refresh_table(&mut state, Table::RoleAssignments)?;
        let record = state
            .records
            .get(id)
            .ok_or_else(|| not_found("identity", id))?;
        let name = record.identity.name.to_lowercase();
        bounded(&state, caller, Action::IdentitiesWrite, id)?;
        let mut muts = vec![Mutation::delete(Table::Identities, id.to_owned())];
        muts.extend(state.unlocked(|| self.claim_of(&name_key(&name), id))?);
        let gone: Vec<String> = state
            .assignments
            .values()
            .filter(|a| a.principal_id == id)
            .map(|a| a.id.clone())
            .collect();
        for a in &gone {
            muts.push(Mutation::delete(Table::RoleAssignments, a.clone()));
        }
        let mut members = Vec::new();
        for (mid, member) in &state.records {
            if member.identity.groups.iter().any(|g| g == id) {
                let mut updated = member.clone();
                updated.identity.groups.retain(|g| g != id);
                muts.push(Mutation::put(
                    Table::Identities,
                    mid.clone(),
                    to_json(&updated)?,
                ));
                members.push(updated);
            }
        }
        state.unlocked(|| self.commit_expecting(&muts, expect))?;
        state.records.remove(id);
        state.by_name.remove(&name);
        for a in gone {
            state.assignments.remove(&a);
        }
        for m in members {
            state.records.insert(m.identity.id.clone(), m);
        }
        state.grants.clear();
        Ok(())
    }

    /// Sets a user's password (an administrator's reset); every session of the person ends.
    pub fn set_password(&self, caller: &Principal, id: &str, password: &str) -> DomainResult<()> {
        caller.authorize_instance(Action::IdentitiesWrite)?;
        bounded(&self.state.read(), caller, Action::IdentitiesWrite, id)?;
        let hash = hash_new_password(password)?;
        self.update_record(Some((caller, Action::IdentitiesWrite)), id, |r| {
            if r.identity.kind != IdentityKind::User {
                return Err(DomainError::InvalidArgument(
                    "only users have passwords".into(),
                ));
            }
            r.credentials.password = Some(hash);
            r.credentials.generation += 1;
            Ok(())
        })
        .map(|_| ())
    }

    /// Removes a user's second factor and recovery codes, so they can enrol again; every
    /// session of the person ends.
    pub fn reset_mfa(&self, caller: &Principal, id: &str) -> DomainResult<()> {
        caller.authorize_instance(Action::IdentitiesWrite)?;
        self.update_record(Some((caller, Action::IdentitiesWrite)), id, |r| {
            r.credentials.totp = None;
            r.credentials.recovery.clear();
            r.identity.mfa_enrolled = false;
            r.credentials.generation += 1;
            Ok(())
        })
        .map(|_| ())
    }

    /// Issues a one-time code with which person `id` enrols a first authenticator although
    /// they hold privileged roles (see [`Directory::begin_totp`]). The administrator hands it
    /// over out of band; it is stored as a digest, replaces any earlier code and lapses after
    /// [`ENROLMENT_CODE_LIFETIME_SECS`].
    pub fn issue_enrolment_code(
        &self,
        caller: &Principal,
        id: &str,
    ) -> DomainResult<(Zeroizing<String>, u64)> {
        caller.authorize_instance(Action::IdentitiesWrite)?;
        let code = credentials::random_secret(16);
        let expires_at = self.now() + ENROLMENT_CODE_LIFETIME_SECS;
        let digest = credentials::secret_digest(&code);
        self.update_record(Some((caller, Action::IdentitiesWrite)), id, |r| {
            if r.identity.kind != IdentityKind::User {
                return Err(DomainError::InvalidArgument(
                    "only people enrol a second factor".into(),
                ));
            }
            r.credentials.enrolment = Some(EnrolmentCode { digest, expires_at });
            Ok(())
        })?;
        Ok((code, expires_at))
    }

    /// Issues a new client secret for an application or service account; the old one stops
    /// working at once.
    pub fn rotate_client_secret(
        &self,
        caller: &Principal,
        id: &str,
    ) -> DomainResult<Zeroizing<String>> {
        caller.authorize_instance(Action::KeysWrite)?;
        let secret = credentials::random_secret(32);
        let digest = credentials::secret_digest(&secret);
        self.update_record(Some((caller, Action::KeysWrite)), id, |r| {
            if !r.identity.kind.is_workload() {
                return Err(DomainError::InvalidArgument(
                    "only applications and service accounts have client secrets".into(),
                ));
            }
            r.credentials.client_secret = Some(digest);
            r.credentials.generation += 1;
            Ok(())
        })?;
        Ok(secret)
    }

    /// Registers the public keys (a JWKS with at least one key, each with a `kid`) an
    /// application or service account signs its `private_key_jwt` assertions with.
    pub fn set_client_keys(
        &self,
        caller: &Principal,
        id: &str,
        jwks: serde_json::Value,
    ) -> DomainResult<()> {
        caller.authorize_instance(Action::KeysWrite)?;
        let keys = jwks.get("keys").and_then(serde_json::Value::as_array);
        let well_formed = keys.is_some_and(|keys| {
            !keys.is_empty()
                && keys.len() <= 8
                && keys.iter().all(|k| {
                    k.get("kid")
                        .and_then(serde_json::Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                        && k.get("d").is_none()
                        && matches!(
                            k.get("kty").and_then(serde_json::Value::as_str),
                            Some("RSA" | "EC" | "OKP")
                        )
                })
        });
        if !well_formed {
            return Err(DomainError::InvalidArgument(
                "expected a JWKS of 1 to 8 public RSA, EC or OKP keys, each with a kid".into(),
            ));
        }
        self.update_record(Some((caller, Action::KeysWrite)), id, |r| {
            if !r.identity.kind.is_workload() {
                return Err(DomainError::InvalidArgument(
                    "only applications and service accounts have client keys".into(),
                ));
            }
            r.credentials.public_keys = Some(jwks);
            r.credentials.generation += 1;
            Ok(())
        })
        .map(|_| ())
    }

    /// The registered public keys of an enabled workload, for checking its client assertions.
    pub fn client_keys(&self, id: &str) -> Option<(serde_json::Value, PrincipalKind)> {
        let state = self.state.read();
        let record = state.records.get(id)?;
        if record.identity.disabled || !record.identity.kind.is_workload() {
            return None;
        }
        let kind = record.identity.kind.principal_kind()?;
        Some((record.credentials.public_keys.clone()?, kind))
    }

    /// Whether `caller` may have a client certificate issued to workload `id`: an administrator
    /// with the keys permission who covers everything `id` holds, or the workload itself
    /// renewing with a session it opened with its current certificate (re-enrolment, as EST
    /// does). A session from a client secret, an assertion or an API key cannot turn itself
    /// into a 30-day certificate. Decide this before the CA signs anything.
    pub fn authorize_certificate(&self, caller: &Principal, id: &str) -> DomainResult<()> {
        let renewal = caller.subject == id && caller.credential == Credential::CertificateToken;
        if !renewal {
            caller.authorize_instance(Action::KeysWrite)?;
        }
        let state = self.state.read();
        let record = state
            .records
            .get(id)
            .ok_or_else(|| not_found("identity", id))?;
        if !record.identity.kind.is_workload() {
            return Err(DomainError::InvalidArgument(
                "only applications and service accounts get client certificates".into(),
            ));
        }
        if !renewal {
            bounded(&state, caller, Action::KeysWrite, id)?;
        }
        room_for_a_certificate(record, self.now())
    }

    /// Records a client certificate issued to workload `id` (the CA signs it outside the
    /// domain, after [`Directory::authorize_certificate`]). Only the identity's own
    /// certificates, unrevoked and unexpired, authenticate it.
    pub fn record_certificate(
        &self,
        caller: &Principal,
        id: &str,
        certificate: IssuedCertificate,
    ) -> DomainResult<()> {
        self.authorize_certificate(caller, id)?;
        let now = self.now();
        self.update_record(None, id, |r| {
            if !r.identity.kind.is_workload() {
                return Err(DomainError::InvalidArgument(
                    "only applications and service accounts get client certificates".into(),
                ));
            }
            // A revoked or expired certificate authenticates nothing whether it is recorded
            // or not: only the live ones are kept, and they are bounded.
            r.credentials
                .certificates
                .retain(|c| !c.revoked && c.not_after > now);
            room_for_a_certificate(r, now)?;
            r.credentials.certificates.push(certificate);
            Ok(())
        })
        .map(|_| ())
    }

    /// How many recorded client certificates, unrevoked and unexpired, an authority outside
    /// `keep` (fingerprints) issued, or an unknown one: those a retirement of the others
    /// would stop at their next handshake.
    pub fn live_certificates_outside(&self, keep: &[&str]) -> usize {
        let now = self.now();
        let state = self.state.read();
        state
            .records
            .values()
            .flat_map(|r| &r.credentials.certificates)
            .filter(|c| !c.revoked && c.not_after > now)
            .filter(|c| !c.issuer.as_deref().is_some_and(|i| keep.contains(&i)))
            .count()
    }

    /// Revokes one of a workload's certificates at once. One that expired or was revoked
    /// before the workload's last new certificate is no longer recorded: not found.
    pub fn revoke_certificate(
        &self,
        caller: &Principal,
        id: &str,
        serial: &str,
    ) -> DomainResult<()> {
        caller.authorize_instance(Action::KeysWrite)?;
        self.update_record(Some((caller, Action::KeysWrite)), id, |r| {
            let cert = r
                .credentials
                .certificates
                .iter_mut()
                .find(|c| c.serial.eq_ignore_ascii_case(serial))
                .ok_or_else(|| not_found("certificate", serial))?;
            cert.revoked = true;
            r.credentials.generation += 1;
            Ok(())
        })
        .map(|_| ())
    }

    /// Authenticates a workload by a client certificate the TLS layer has already verified
    /// against the instance CA: the certificate must be one recorded for `id` and not revoked.
    /// Call it through [`Directory::guarded`].
    pub fn authenticate_certificate(
        &self,
        id: &str,
        serial: &str,
    ) -> Result<Authenticated, LoginFailure> {
        let now = self.now();
        let state = self.state.read();
        let record = state.records.get(id).ok_or(LoginFailure::Unknown)?;
        let known = record
            .credentials
            .certificates
            .iter()
            .any(|c| c.serial.eq_ignore_ascii_case(serial) && !c.revoked && c.not_after > now);
        workload_login(record, known)
    }

    /// An enabled workload's kind, for a client authenticated by other means (a verified
    /// `private_key_jwt` assertion).
    pub fn workload(&self, id: &str) -> Option<Authenticated> {
        let state = self.state.read();
        workload_login(state.records.get(id)?, true).ok()
    }

    // ---- roles and assignments ----

    /// Built-in and custom roles. Role definitions are not secret: any caller may list them.
    pub fn roles(&self) -> DomainResult<Vec<RoleView>> {
        let state = self.state.read();
        let mut out: Vec<RoleView> = builtin_roles().iter().map(RoleView::from).collect();
        out.extend(state.roles.values().map(RoleView::from));
        Ok(out)
    }

    pub fn role(&self, id: &str) -> DomainResult<RoleView> {
        let state = self.state.read();
        state
            .role(id)
            .map(|r| RoleView::from(&r))
            .ok_or_else(|| not_found("role", id))
    }

    pub fn create_role(
        &self,
        caller: &Principal,
        name: &str,
        description: &str,
        actions: &[String],
    ) -> DomainResult<RoleView> {
        caller.authorize_instance(Action::RolesWrite)?;
        check_name(name)?;
        let set =
            ActionSet::parse(actions).map_err(|e| DomainError::InvalidArgument(e.to_string()))?;
        if set.is_empty() {
            return Err(DomainError::InvalidArgument(
                "a role needs at least one action".into(),
            ));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let record = RoleRecord {
            id: id.clone(),
            name: name.to_owned(),
            description: description.to_owned(),
            actions: set.names().into_iter().map(str::to_owned).collect(),
        };
        let mut state = self.lock()?;
        // The names as stored: one another node took moments ago counts.
        self.refresh_table(&mut state, Table::Roles)?;
        let taken = builtin_roles()
            .iter()
            .map(|r| r.name.clone())
            .chain(state.roles.values().map(|r| r.name.clone()))
            .any(|n| n.eq_ignore_ascii_case(name));
        if taken {
            return Err(DomainError::Conflict(format!(
                "a role named '{name}' exists"
            )));
        }
        state.unlocked(|| {
            self.commit_claiming(
                &[
                    Mutation::put(Table::Roles, id.clone(), to_json(&record)?),
                    Mutation::put(Table::Names, role_name_key(name), id.as_bytes().to_vec()),
                ],
                role_name_key(name),
                &format!("a role named '{name}' exists"),
            )
        })?;
        let role = Role {
            id: RoleId(id.clone()),
            name: record.name,
            description: record.description,
            actions: set,
            builtin: false,
        };
        let view = RoleView::from(&role);
        state.roles.insert(id, role);
        Ok(view)
    }

    /// Deletes a custom role; refused for built-in roles and while any assignment uses it.
    pub fn delete_role(&self, caller: &Principal, id: &str) -> DomainResult<()> {
        caller.authorize_instance(Action::RolesWrite)?;
        if builtin_role(id).is_some() {
            return Err(DomainError::InvalidArgument(
                "built-in roles cannot be deleted".into(),
            ));
        }
        let mut state = self.lock()?;
        // Decided on the stored role and assignments: an assignment another node made moments
        // ago keeps the role.
        let expect = self.refresh_record(&mut state, Table::Roles, id)?;
        if !state.roles.contains_key(id) {
            return Err(not_found("role", id));
        }
        self.refresh_table(&mut state, Table::RoleAssignments)?;
        if state.assignments.values().any(|a| a.role_id == id) {
            return Err(DomainError::Conflict("the role is still assigned".into()));
        }
        let mut muts = vec![Mutation::delete(Table::Roles, id.to_owned())];
        if let Some(key) = state.roles.get(id).map(|role| role_name_key(&role.name)) {
            muts.extend(state.unlocked(|| self.claim_of(&key, id))?);
        }
        state.unlocked(|| self.commit_expecting(&muts, expect))?;
        state.roles.remove(id);
        Ok(())
    }

    /// Role assignments, all or one principal's; a caller may always list its own.
    pub fn assignments(
        &self,
        caller: &Principal,
        principal_id: Option<&str>,
    ) -> DomainResult<Vec<RoleAssignment>> {
        if principal_id != Some(caller.subject.as_str()) {
            caller.authorize_instance(Action::IdentitiesRead)?;
        }
        let state = self.state.read();
        Ok(state
            .assignments
            .values()
            .filter(|a| principal_id.is_none_or(|p| a.principal_id == p))
            .cloned()
            .collect())
    }

    pub fn assign(
        &self,
        caller: &Principal,
        principal_id: &str,
        role_id: &str,
        scope: Scope,
    ) -> DomainResult<RoleAssignment> {
        caller.authorize_instance(Action::RolesWrite)?;
        scope.validate()?;
        let mut state = self.lock()?;
        // Decided on the stored identity and role: one another node deleted moments ago is not
        // found here either, and the commit expects both as read.
        let mut expect = vec![self.refresh_record(&mut state, Table::Identities, principal_id)?];
        if builtin_role(role_id).is_none() {
            expect.push(self.refresh_record(&mut state, Table::Roles, role_id)?);
        }
        if !state.records.contains_key(principal_id) {
            return Err(not_found("identity", principal_id));
        }
        let Some(role) = state.role(role_id) else {
            return Err(not_found("role", role_id));
        };
        // Nobody hands out what they do not hold themselves, at that scope.
        if !caller.covers(&[Grant {
            role: role.id.clone(),
            actions: role.actions,
            scope: scope.clone(),
        }]) {
            return Err(DomainError::Forbidden {
                action: Action::RolesWrite.as_str(),
            });
        }
        let held: Vec<&RoleAssignment> = state
            .assignments
            .values()
            .filter(|a| a.principal_id == principal_id)
            .collect();
        if let Some(same) = held
            .iter()
            .find(|a| a.role_id == role_id && a.scope == scope)
        {
            return Ok((*same).clone());
        }
        if held.len() >= MAX_ASSIGNMENTS_PER_PRINCIPAL {
            return Err(DomainError::Conflict(format!(
                "a principal holds at most {MAX_ASSIGNMENTS_PER_PRINCIPAL} role assignments"
            )));
        }
        let a = RoleAssignment {
            id: uuid::Uuid::new_v4().to_string(),
            principal_id: principal_id.to_owned(),
            role_id: role_id.to_owned(),
            scope,
            created_at: self.now(),
        };
        state.unlocked(|| {
            self.commit_expecting_all(
                &[Mutation::put(
                    Table::RoleAssignments,
                    a.id.clone(),
                    to_json(&a)?,
                )],
                expect,
            )
        })?;
        state.assignments.insert(a.id.clone(), a.clone());
        state.grants.clear();
        Ok(a)
    }

    pub fn unassign(&self, caller: &Principal, id: &str) -> DomainResult<()> {
        caller.authorize_instance(Action::RolesWrite)?;
        let mut state = self.lock()?;
        let expect = self.refresh_record(&mut state, Table::RoleAssignments, id)?;
        let Some(assignment) = state.assignments.get(id) else {
            return Err(not_found("role assignment", id));
        };
        // Taking a role away is bounded like handing it out: only by someone who holds it.
        let held = state.role(&assignment.role_id).map(|role| Grant {
            role: role.id,
            actions: role.actions,
            scope: assignment.scope.clone(),
        });
        if !held.is_none_or(|g| caller.covers(&[g])) {
            return Err(DomainError::Forbidden {
                action: Action::RolesWrite.as_str(),
            });
        }
        state.unlocked(|| {
            self.commit_expecting(
                &[Mutation::delete(Table::RoleAssignments, id.to_owned())],
                expect,
            )
        })?;
        state.assignments.remove(id);
        state.grants.clear();
        Ok(())
    }
}

/// Refuses a new client certificate for a workload that holds [`MAX_LIVE_CERTIFICATES`] live
/// ones (unrevoked, unexpired): each renewal adds one for its lifetime, so without a bound a
/// workload renewing in a loop, or a leaked certificate renewing for itself, would grow the
/// record, and every write and certificate login that reads it, without end.
fn room_for_a_certificate(record: &Record, now: u64) -> DomainResult<()> {
    let live = record
        .credentials
        .certificates
        .iter()
        .filter(|c| !c.revoked && c.not_after > now)
        .count();
    if live >= MAX_LIVE_CERTIFICATES {
        return Err(DomainError::Conflict(format!(
            "the workload holds {MAX_LIVE_CERTIFICATES} live client certificates; revoke one \
             before another is issued"
        )));
    }
    Ok(())
}

/// The outcome of a workload's authentication once its credential was checked (`credential_ok`).
fn workload_login(record: &Record, credential_ok: bool) -> Result<Authenticated, LoginFailure> {
    if !credential_ok || !record.identity.kind.is_workload() {
        return Err(LoginFailure::WrongSecret);
    }
    if record.identity.disabled {
        return Err(LoginFailure::Disabled);
    }
    let kind = record
        .identity
        .kind
        .principal_kind()
        .ok_or(LoginFailure::Unknown)?;
    Ok(Authenticated {
        id: record.identity.id.clone(),
        kind,
        mfa: false,
        generation: record.credentials.generation,
    })
}

/// The actor may administer identity `target` with `action` only if it covers every grant the
/// target holds (see [`Principal::covers`]): then no reset, key, certificate or membership it
/// obtains for the target gives it more than it already has. Refused as forbidden.
fn bounded(state: &State, caller: &Principal, action: Action, target: &str) -> DomainResult<()> {
    if caller.covers(&state.resolve(target)) {
        Ok(())
    } else {
        Err(DomainError::Forbidden {
            action: action.as_str(),
        })
    }
}

/// Whether throttle account `account` names something the directory holds: a person
/// (`user:<name>`), an API key (`key:<id>`), or an identity by its ID (a client).
fn known_account(state: &State, account: &str) -> bool {
    if let Some(name) = account.strip_prefix("user:") {
        return state.by_name.contains_key(name);
    }
    if let Some(id) = account.strip_prefix("key:") {
        return apikeys::known(state, id);
    }
    state.records.contains_key(account)
}

/// The throttle account of a person's name.
fn person_account(name: &str) -> String {
    format!("user:{}", name.to_lowercase())
}

/// argon2id of a new password, with the length rule and the process-wide cap on argon2 work.
fn hash_new_password(password: &str) -> DomainResult<String> {
    credentials::hash_password(password).map_err(|e| match e {
        CredentialError::Busy => DomainError::Unavailable,
        e => DomainError::InvalidArgument(e.to_string()),
    })
}

#[cfg(test)]
mod bounded_tests;
#[cfg(test)]
mod stall_tests;
#[cfg(test)]
mod tests;
