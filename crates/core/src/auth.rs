//! Who may do what, and where. Permissions are the Azure Digital Twins data actions plus
//! twinguard's own; roles are sets of actions with IDs that never change (the ADT role IDs for
//! the ADT roles, so assignments written for ADT mean the same here); a [`Grant`] is a role held
//! at a [`Scope`]. Every domain operation asks the caller's [`Principal`] and refuses by default.
//! The decisions that need the twin graph (is this twin inside that subtree?) live in
//! [`crate::access`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dtmi::Dtmi;
use crate::error::DomainError;

macro_rules! actions {
    ($($variant:ident => $name:literal, $kind:ident;)*) => {
        /// A permission. The `Microsoft.DigitalTwins/...` strings are ADT's data actions;
        /// `twinguard/...` are twinguard's own.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[non_exhaustive]
        pub enum Action {
            $($variant,)*
        }

        impl Action {
            pub const ALL: &'static [Action] = &[$(Action::$variant,)*];

            /// The action's stable name, e.g. `Microsoft.DigitalTwins/digitaltwins/read`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            fn kind(self) -> Kind {
                match self {
                    $(Self::$variant => Kind::$kind,)*
                }
            }
        }
    };
}

/// How much an action can change or reveal; decides MFA and step-up (see [`Action::is_privileged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Reads twin data.
    Read,
    /// Changes twin data, models, routes, or moves a physical asset.
    Change,
    /// Reads security-relevant records (audit trail, identities).
    SecurityRead,
    /// Changes who may do what, keys, or approves commands to physical assets.
    Sensitive,
}

actions! {
    TwinsRead => "Microsoft.DigitalTwins/digitaltwins/read", Read;
    TwinsWrite => "Microsoft.DigitalTwins/digitaltwins/write", Change;
    TwinsDelete => "Microsoft.DigitalTwins/digitaltwins/delete", Change;
    RelationshipsRead => "Microsoft.DigitalTwins/digitaltwins/relationships/read", Read;
    RelationshipsWrite => "Microsoft.DigitalTwins/digitaltwins/relationships/write", Change;
    RelationshipsDelete => "Microsoft.DigitalTwins/digitaltwins/relationships/delete", Change;
    ModelsRead => "Microsoft.DigitalTwins/models/read", Read;
    ModelsWrite => "Microsoft.DigitalTwins/models/write", Change;
    ModelsDelete => "Microsoft.DigitalTwins/models/delete", Change;
    Query => "Microsoft.DigitalTwins/query/action", Read;
    EventRoutesRead => "Microsoft.DigitalTwins/eventroutes/read", Read;
    EventRoutesWrite => "Microsoft.DigitalTwins/eventroutes/write", Change;
    EventRoutesDelete => "Microsoft.DigitalTwins/eventroutes/delete", Change;
    Commands => "Microsoft.DigitalTwins/digitaltwins/commands/action", Change;
    JobsRead => "Microsoft.DigitalTwins/jobs/read", Read;
    JobsWrite => "Microsoft.DigitalTwins/jobs/write", Change;
    JobsDelete => "Microsoft.DigitalTwins/jobs/delete", Change;
    DevicesRead => "twinguard/devices/read", Read;
    DevicesWrite => "twinguard/devices/write", Change;
    TelemetryWrite => "twinguard/telemetry/write", Change;
    QuarantineReview => "twinguard/quarantine/review/action", Change;
    Approve => "twinguard/approvals/approve/action", Sensitive;
    AuditRead => "twinguard/audit/read", SecurityRead;
    KeysWrite => "twinguard/keys/write", Sensitive;
    IdentitiesRead => "twinguard/identities/read", SecurityRead;
    IdentitiesWrite => "twinguard/identities/write", Sensitive;
    RolesWrite => "twinguard/roles/write", Sensitive;
    MetricsRead => "twinguard/metrics/read", Read;
    EndpointsRead => "twinguard/endpoints/read", SecurityRead;
    EndpointsWrite => "twinguard/endpoints/write", Sensitive;
}

impl Action {
    /// Reads twin data and changes nothing.
    pub fn is_read(self) -> bool {
        self.kind() == Kind::Read
    }

    /// Actions a person may only hold when they log in with a second factor: everything that
    /// changes state (a twin write can move machinery) or reads security records.
    pub fn is_privileged(self) -> bool {
        self.kind() != Kind::Read
    }

    /// Actions that also need step-up: an MFA-backed login within the last few minutes.
    pub fn needs_step_up(self) -> bool {
        self.kind() == Kind::Sensitive
    }

    /// Whether the action is one of ADT's own (the ADT roles hold only those).
    pub fn is_adt(self) -> bool {
        self.as_str().starts_with("Microsoft.DigitalTwins/")
    }

    fn bit(self) -> u64 {
        1 << (self as u32)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action '{0}'")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .iter()
            .copied()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownAction(s.to_owned()))
    }
}

/// A set of actions, as a bit set: checks on every request are one AND.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ActionSet(u64);

impl ActionSet {
    pub const EMPTY: ActionSet = ActionSet(0);

    pub fn contains(self, action: Action) -> bool {
        self.0 & action.bit() != 0
    }

    pub fn insert(&mut self, action: Action) {
        self.0 |= action.bit();
    }

    pub fn union(self, other: ActionSet) -> ActionSet {
        ActionSet(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL
            .iter()
            .copied()
            .filter(move |a| self.contains(*a))
    }

    /// Parses action names; a trailing `*` matches every action with that prefix, as in ADT's
    /// role definitions (`Microsoft.DigitalTwins/digitaltwins/*`). A pattern that matches
    /// nothing is an error, so a typo cannot silently grant less than intended.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<ActionSet, UnknownAction> {
        let mut set = ActionSet::EMPTY;
        for name in names {
            let name = name.as_ref().trim();
            match name.strip_suffix('*') {
                Some(prefix) => {
                    let prefix = prefix.to_ascii_lowercase();
                    let matching: Vec<Action> = Action::ALL
                        .iter()
                        .copied()
                        .filter(|a| a.as_str().to_ascii_lowercase().starts_with(&prefix))
                        .collect();
                    if matching.is_empty() {
                        return Err(UnknownAction(name.to_owned()));
                    }
                    matching.into_iter().for_each(|a| set.insert(a));
                }
                None => set.insert(name.parse()?),
            }
        }
        Ok(set)
    }

    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Action::as_str).collect()
    }
}

impl FromIterator<Action> for ActionSet {
    fn from_iter<I: IntoIterator<Item = Action>>(iter: I) -> Self {
        let mut set = ActionSet::EMPTY;
        for a in iter {
            set.insert(a);
        }
        set
    }
}

/// A role's stable ID (a UUID in its canonical lowercase form).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoleId(pub String);

impl RoleId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Azure Digital Twins Data Owner: every ADT data action.
pub const DATA_OWNER: &str = "bcd981a7-7f74-457b-83e1-cceb9e632ffe";
/// Azure Digital Twins Data Reader: ADT read and query actions.
pub const DATA_READER: &str = "d57506d4-4c8d-48b1-8587-93c323f6a5a3";
/// twinguard Model Uploader: read, upload and decommission models.
pub const MODEL_UPLOADER: &str = "5f0d6a3e-2b51-4c8e-9d7a-1c3e4b2a9f10";
/// twinguard Query Only: run queries, nothing else.
pub const QUERY_ONLY: &str = "8c4b2e71-9a3d-4f6b-b0e2-7d5a1c9e3f42";
/// twinguard Telemetry Writer: submit telemetry (devices and gateways).
pub const TELEMETRY_WRITER: &str = "2e9a7c14-6b3f-4d81-a5c0-9f8e2d7b1a63";
/// twinguard Operator: read the twin, send commands, review quarantine, approve commands.
pub const OPERATOR: &str = "4a1f8d2c-7e5b-4c93-8b16-3d9e0a6f2c84";
/// twinguard Auditor: read the audit trail, identities and the twin; change nothing.
pub const AUDITOR: &str = "9b3e6f50-1c8a-4d27-9e4b-6a2f7c1d5e95";
/// twinguard Security Admin: identities, role assignments, keys and devices.
pub const SECURITY_ADMIN: &str = "1d7c4a9e-3f62-4b58-a0d9-8e5b2c6f4a17";
/// twinguard Monitoring: scrape the metrics (counts, never data).
pub const MONITORING: &str = "6c2d9f84-0b7e-4e1a-9c35-2f8a7d4b1e06";
/// twinguard Instance Owner: every action. Held by the first administrator, the root of all
/// delegation: administrators hand out only what they hold (see [`Principal::covers`]), so
/// someone must hold everything.
pub const INSTANCE_OWNER: &str = "0f3b6c2e-8d41-4a7f-b5e9-2c6a1d8e4f70";

/// A role: a named set of actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub id: RoleId,
    pub name: String,
    pub description: String,
    pub actions: ActionSet,
    pub builtin: bool,
}

impl Role {
    /// A person holding this role must log in with a second factor.
    pub fn is_privileged(&self) -> bool {
        self.actions.iter().any(Action::is_privileged)
    }
}

fn builtin(id: &str, name: &str, description: &str, actions: ActionSet) -> Role {
    Role {
        id: RoleId(id.to_owned()),
        name: name.to_owned(),
        description: description.to_owned(),
        actions,
        builtin: true,
    }
}

/// The built-in roles. Their IDs never change; see `docs/identity.md`.
pub fn builtin_roles() -> Vec<Role> {
    use Action::*;
    let adt = || Action::ALL.iter().copied().filter(|a| a.is_adt());
    let set = |actions: &[Action]| actions.iter().copied().collect::<ActionSet>();
    vec![
        builtin(
            DATA_OWNER,
            "Azure Digital Twins Data Owner",
            "Full access to the twin graph, models, queries and event routes.",
            adt().collect(),
        ),
        builtin(
            DATA_READER,
            "Azure Digital Twins Data Reader",
            "Read twins, relationships, models and event routes, and run queries.",
            adt().filter(|a| a.is_read()).collect(),
        ),
        builtin(
            MODEL_UPLOADER,
            "twinguard Model Uploader",
            "Read, upload, decommission and delete models.",
            set(&[ModelsRead, ModelsWrite, ModelsDelete]),
        ),
        builtin(
            QUERY_ONLY,
            "twinguard Query Only",
            "Run queries; no direct reads or writes.",
            set(&[Query]),
        ),
        builtin(
            TELEMETRY_WRITER,
            "twinguard Telemetry Writer",
            "Submit signed telemetry for the twins in scope.",
            set(&[TelemetryWrite]),
        ),
        builtin(
            OPERATOR,
            "twinguard Operator",
            "Read the twin, send commands, review quarantined readings and approve commands.",
            set(&[
                TwinsRead,
                RelationshipsRead,
                ModelsRead,
                Query,
                Commands,
                QuarantineReview,
                Approve,
            ]),
        ),
        builtin(
            AUDITOR,
            "twinguard Auditor",
            "Read the audit trail, identities and the twin graph; change nothing.",
            set(&[
                AuditRead,
                IdentitiesRead,
                TwinsRead,
                RelationshipsRead,
                ModelsRead,
                Query,
                EventRoutesRead,
            ]),
        ),
        builtin(
            SECURITY_ADMIN,
            "twinguard Security Admin",
            "Manage identities, roles and role assignments, API keys, devices and event endpoints; read the audit trail.",
            set(&[
                EndpointsRead,
                EndpointsWrite,
                IdentitiesRead,
                IdentitiesWrite,
                RolesWrite,
                KeysWrite,
                DevicesRead,
                DevicesWrite,
                AuditRead,
                MetricsRead,
            ]),
        ),
        builtin(
            MONITORING,
            "twinguard Monitoring",
            "Scrape the Prometheus metrics; no twin data, no audit trail.",
            set(&[MetricsRead]),
        ),
        builtin(
            INSTANCE_OWNER,
            "twinguard Instance Owner",
            "Every action; the first administrator's, from which every other grant is delegated.",
            Action::ALL.iter().copied().collect(),
        ),
    ]
}

/// Looks up a built-in role by ID.
pub fn builtin_role(id: &str) -> Option<Role> {
    builtin_roles().into_iter().find(|r| r.id.as_str() == id)
}

/// Where a role assignment applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum Scope {
    /// Everything in the instance.
    Instance,
    /// The twin `root` and every twin reachable from it along relationships named in
    /// `relationships` (the containment relationships of the ontology, e.g. `contains`).
    #[serde(rename_all = "camelCase")]
    Subtree {
        root: String,
        relationships: Vec<String>,
    },
    /// Twins of `model` or of a model that extends it, and those models.
    Model { model: String },
    /// Relationships with one of these names, wherever their twins are.
    Relationships { names: Vec<String> },
    /// The event routes with these IDs.
    EventRoutes { ids: Vec<String> },
}

impl Scope {
    /// Checks the scope is well formed: names present, the model a DTMI.
    pub fn validate(&self) -> Result<(), DomainError> {
        let bad = |m: &str| Err(DomainError::InvalidArgument(format!("invalid scope: {m}")));
        match self {
            Scope::Instance => Ok(()),
            Scope::Subtree {
                root,
                relationships,
            } => {
                if root.is_empty() {
                    bad("a subtree needs a root twin")
                } else if relationships.is_empty() || relationships.iter().any(String::is_empty) {
                    bad("a subtree needs the names of its containment relationships")
                } else {
                    Ok(())
                }
            }
            Scope::Model { model } => match Dtmi::parse(model) {
                Ok(_) => Ok(()),
                Err(e) => bad(&e.to_string()),
            },
            Scope::Relationships { names: list } | Scope::EventRoutes { ids: list } => {
                if list.is_empty() || list.iter().any(String::is_empty) {
                    bad("the list of names is empty")
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A role held at a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub role: RoleId,
    pub actions: ActionSet,
    pub scope: Scope,
}

/// What kind of caller a principal is; people are subject to MFA rules, workloads are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PrincipalKind {
    User,
    Application,
    ServiceAccount,
    Device,
}

/// The credential a request presented. Derived credentials are attenuated by it: an API key
/// cannot change credentials at all, and only a session that came from a client certificate
/// may renew that certificate (re-enrolment, as in EST, RFC 7030 4.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Credential {
    /// An access token from a password login, a client secret, a client assertion or an
    /// external issuer, or the server's own internal caller.
    #[default]
    Token,
    /// An access token obtained with a client certificate of the instance CA.
    CertificateToken,
    /// An API key: a standing credential bound to one role; no self-service.
    ApiKey,
}

/// An authenticated caller and its grants. Only the server's authentication builds one, per
/// request, from the identity directory; the domain only reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub kind: PrincipalKind,
    /// What the caller presented.
    pub credential: Credential,
    pub(crate) grants: Arc<[Grant]>,
    /// Union of the actions held at instance scope: the fast path for unscoped callers.
    instance: ActionSet,
    /// Union of the actions held anywhere.
    any: ActionSet,
    /// The caller authenticated with a second factor.
    mfa: bool,
    /// ... recently enough for sensitive actions.
    step_up: bool,
}

impl Principal {
    pub fn new(
        subject: impl Into<String>,
        kind: PrincipalKind,
        grants: Arc<[Grant]>,
        mfa: bool,
        step_up: bool,
    ) -> Self {
        let mut instance = ActionSet::EMPTY;
        let mut any = ActionSet::EMPTY;
        for g in grants.iter() {
            any = any.union(g.actions);
            if g.scope == Scope::Instance {
                instance = instance.union(g.actions);
            }
        }
        Self {
            subject: subject.into(),
            kind,
            credential: Credential::Token,
            grants,
            instance,
            any,
            mfa,
            step_up,
        }
    }

    /// An application holding built-in roles at instance scope (tests and tools).
    pub fn with_roles(subject: impl Into<String>, role_ids: &[&str]) -> Self {
        let grants: Vec<Grant> = role_ids
            .iter()
            .filter_map(|id| builtin_role(id))
            .map(|r| Grant {
                role: r.id,
                actions: r.actions,
                scope: Scope::Instance,
            })
            .collect();
        Self::new(
            subject,
            PrincipalKind::Application,
            grants.into(),
            false,
            false,
        )
    }

    /// The same caller, marked as having presented `credential`.
    pub fn presented(mut self, credential: Credential) -> Self {
        self.credential = credential;
        self
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Whether the caller holds `action` at `scope`: at instance scope, or at exactly that
    /// scope. This is the order used to bound administration by the actor: an administrator
    /// may only act on an identity whose every grant it covers.
    pub fn holds_at(&self, action: Action, scope: &Scope) -> bool {
        self.holds_everywhere(action)
            || self
                .grants
                .iter()
                .any(|g| g.actions.contains(action) && g.scope == *scope)
    }

    /// Whether every action of every grant in `grants` is one the caller holds at that grant's
    /// scope (see [`Principal::holds_at`]); then acting for their holder gives the caller
    /// nothing it does not have.
    pub fn covers(&self, grants: &[Grant]) -> bool {
        grants
            .iter()
            .all(|g| g.actions.iter().all(|a| self.holds_at(a, &g.scope)))
    }

    /// The caller holds `action` somewhere, and, for a sensitive action, has stepped up. The
    /// check at the door of every operation; scoped operations then check the resource.
    pub fn authorize(&self, action: Action) -> Result<(), DomainError> {
        if !self.any.contains(action) {
            return Err(DomainError::Forbidden {
                action: action.as_str(),
            });
        }
        let person = self.kind == PrincipalKind::User;
        if action.is_privileged() && person && !self.mfa {
            return Err(DomainError::MfaRequired {
                action: action.as_str(),
            });
        }
        if action.needs_step_up() && person && !self.step_up {
            return Err(DomainError::StepUpRequired {
                action: action.as_str(),
            });
        }
        Ok(())
    }

    /// The caller holds `action` for the whole instance.
    pub fn holds_everywhere(&self, action: Action) -> bool {
        self.instance.contains(action)
    }

    /// [`Principal::authorize`], for an action that only exists instance-wide.
    pub fn authorize_instance(&self, action: Action) -> Result<(), DomainError> {
        self.authorize(action)?;
        if self.holds_everywhere(action) {
            Ok(())
        } else {
            Err(DomainError::Forbidden {
                action: action.as_str(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_reader_can_read_and_query_but_not_write() {
        let reader = Principal::with_roles("r", &[DATA_READER]);
        assert!(reader.authorize(Action::TwinsRead).is_ok());
        assert!(reader.authorize(Action::Query).is_ok());
        for write in [
            Action::TwinsWrite,
            Action::ModelsWrite,
            Action::RelationshipsDelete,
        ] {
            assert!(reader.authorize(write).is_err(), "{write}");
        }
    }

    #[test]
    fn data_owner_holds_every_adt_action_and_nothing_of_twinguards() {
        let owner = Principal::with_roles("o", &[DATA_OWNER]);
        for a in Action::ALL {
            assert_eq!(owner.authorize(*a).is_ok(), a.is_adt(), "{a}");
        }
    }

    #[test]
    fn unknown_roles_grant_nothing() {
        let nobody = Principal::with_roles("n", &["00000000-0000-0000-0000-000000000000"]);
        assert!(Action::ALL.iter().all(|a| nobody.authorize(*a).is_err()));
        assert!(nobody.grants().is_empty());
    }

    #[test]
    fn builtin_role_ids_are_unique_uuids_and_stable() {
        let roles = builtin_roles();
        let mut ids: Vec<&str> = roles.iter().map(|r| r.id.as_str()).collect();
        for id in &ids {
            assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), roles.len());
        // The ADT IDs are a contract with existing role assignments.
        assert_eq!(
            builtin_role(DATA_OWNER).map(|r| r.name),
            Some("Azure Digital Twins Data Owner".to_owned())
        );
        assert_eq!(
            builtin_role("d57506d4-4c8d-48b1-8587-93c323f6a5a3").map(|r| r.name),
            Some("Azure Digital Twins Data Reader".to_owned())
        );
    }

    #[test]
    fn action_patterns_expand_like_adt_role_definitions() {
        let set = ActionSet::parse(&["Microsoft.DigitalTwins/digitaltwins/*"]).unwrap_or_default();
        assert!(set.contains(Action::TwinsRead));
        assert!(set.contains(Action::RelationshipsDelete));
        assert!(set.contains(Action::Commands));
        assert!(!set.contains(Action::ModelsRead));
        assert!(ActionSet::parse(&["twinguard/nothing/*"]).is_err());
        assert!(ActionSet::parse(&["Microsoft.DigitalTwins/twins/read"]).is_err());
        let exact = ActionSet::parse(&["twinguard/audit/read"]).unwrap_or_default();
        assert_eq!(exact.names(), vec!["twinguard/audit/read"]);
    }

    #[test]
    fn sensitive_actions_need_step_up_for_people_only() {
        let grants: Arc<[Grant]> = vec![Grant {
            role: RoleId(SECURITY_ADMIN.into()),
            actions: ActionSet::parse(&["twinguard/roles/write"]).unwrap_or_default(),
            scope: Scope::Instance,
        }]
        .into();
        let no_mfa = Principal::new("p", PrincipalKind::User, grants.clone(), false, false);
        assert!(matches!(
            no_mfa.authorize(Action::RolesWrite),
            Err(DomainError::MfaRequired { .. })
        ));
        let stale = Principal::new("p", PrincipalKind::User, grants.clone(), true, false);
        assert!(matches!(
            stale.authorize(Action::RolesWrite),
            Err(DomainError::StepUpRequired { .. })
        ));
        let fresh = Principal::new("p", PrincipalKind::User, grants.clone(), true, true);
        assert!(fresh.authorize(Action::RolesWrite).is_ok());
        let app = Principal::new("a", PrincipalKind::Application, grants, false, false);
        assert!(app.authorize(Action::RolesWrite).is_ok());
    }

    #[test]
    fn scopes_reject_empty_lists_and_bad_models() {
        assert!(Scope::Instance.validate().is_ok());
        assert!(
            Scope::Subtree {
                root: "b1".into(),
                relationships: vec![],
            }
            .validate()
            .is_err()
        );
        assert!(
            Scope::Model {
                model: "dtmi:x:y;1".into()
            }
            .validate()
            .is_ok()
        );
        assert!(
            Scope::Model {
                model: "not a dtmi".into()
            }
            .validate()
            .is_err()
        );
        let json =
            serde_json::json!({"kind": "subtree", "root": "b1", "relationships": ["contains"]});
        let scope: Scope = serde_json::from_value(json).unwrap_or(Scope::Instance);
        assert_eq!(
            scope,
            Scope::Subtree {
                root: "b1".into(),
                relationships: vec!["contains".into()]
            }
        );
    }
}
