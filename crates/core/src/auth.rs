//! Who may do what. Permissions are the Azure Digital Twins data actions; built-in roles keep the
//! ADT role IDs so role assignments written for ADT mean the same here. Every domain operation
//! asks [`Principal::authorize`] first and refuses by default.

use std::collections::BTreeSet;
use std::fmt;

use crate::error::DomainError;

/// An ADT data action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Action {
    TwinsRead,
    TwinsWrite,
    TwinsDelete,
    RelationshipsRead,
    RelationshipsWrite,
    RelationshipsDelete,
    ModelsRead,
    ModelsWrite,
    ModelsDelete,
    Query,
    EventRoutesRead,
    EventRoutesWrite,
    EventRoutesDelete,
    Commands,
}

impl Action {
    pub const ALL: [Action; 14] = [
        Action::TwinsRead,
        Action::TwinsWrite,
        Action::TwinsDelete,
        Action::RelationshipsRead,
        Action::RelationshipsWrite,
        Action::RelationshipsDelete,
        Action::ModelsRead,
        Action::ModelsWrite,
        Action::ModelsDelete,
        Action::Query,
        Action::EventRoutesRead,
        Action::EventRoutesWrite,
        Action::EventRoutesDelete,
        Action::Commands,
    ];

    /// The ADT data action string, e.g. `Microsoft.DigitalTwins/digitaltwins/read`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TwinsRead => "Microsoft.DigitalTwins/digitaltwins/read",
            Self::TwinsWrite => "Microsoft.DigitalTwins/digitaltwins/write",
            Self::TwinsDelete => "Microsoft.DigitalTwins/digitaltwins/delete",
            Self::RelationshipsRead => "Microsoft.DigitalTwins/digitaltwins/relationships/read",
            Self::RelationshipsWrite => "Microsoft.DigitalTwins/digitaltwins/relationships/write",
            Self::RelationshipsDelete => "Microsoft.DigitalTwins/digitaltwins/relationships/delete",
            Self::ModelsRead => "Microsoft.DigitalTwins/models/read",
            Self::ModelsWrite => "Microsoft.DigitalTwins/models/write",
            Self::ModelsDelete => "Microsoft.DigitalTwins/models/delete",
            Self::Query => "Microsoft.DigitalTwins/query/action",
            Self::EventRoutesRead => "Microsoft.DigitalTwins/eventroutes/read",
            Self::EventRoutesWrite => "Microsoft.DigitalTwins/eventroutes/write",
            Self::EventRoutesDelete => "Microsoft.DigitalTwins/eventroutes/delete",
            Self::Commands => "Microsoft.DigitalTwins/digitaltwins/commands/action",
        }
    }

    fn is_read(self) -> bool {
        matches!(
            self,
            Self::TwinsRead
                | Self::RelationshipsRead
                | Self::ModelsRead
                | Self::Query
                | Self::EventRoutesRead
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role's stable ID (a UUID in its canonical lowercase form).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoleId(String);

impl RoleId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Azure Digital Twins Data Owner: every data action.
pub const DATA_OWNER: &str = "bcd981a7-7f74-457b-83e1-cceb9e632ffe";
/// Azure Digital Twins Data Reader: read and query only.
pub const DATA_READER: &str = "d57506d4-4c8d-48b1-8587-93c323f6a5a3";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub id: RoleId,
    pub name: &'static str,
    pub actions: BTreeSet<Action>,
}

/// The built-in roles. Their IDs never change.
pub fn builtin_roles() -> Vec<Role> {
    vec![
        Role {
            id: RoleId(DATA_OWNER.to_owned()),
            name: "Azure Digital Twins Data Owner",
            actions: Action::ALL.into_iter().collect(),
        },
        Role {
            id: RoleId(DATA_READER.to_owned()),
            name: "Azure Digital Twins Data Reader",
            actions: Action::ALL.into_iter().filter(|a| a.is_read()).collect(),
        },
    ]
}

/// Looks up a built-in role by ID; unknown IDs grant nothing.
pub fn role(id: &str) -> Option<Role> {
    builtin_roles().into_iter().find(|r| r.id.as_str() == id)
}

/// An authenticated caller and what its role assignments allow. Only token verification builds
/// one; the domain only reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub roles: Vec<RoleId>,
    actions: BTreeSet<Action>,
}

impl Principal {
    /// Resolves role IDs to the union of their actions. Unknown role IDs are ignored: they grant
    /// nothing, and deny is the default.
    pub fn new(subject: impl Into<String>, role_ids: &[String]) -> Self {
        let mut roles = Vec::new();
        let mut actions = BTreeSet::new();
        for id in role_ids {
            if let Some(role) = role(id) {
                actions.extend(role.actions.iter().copied());
                roles.push(role.id);
            }
        }
        Self {
            subject: subject.into(),
            roles,
            actions,
        }
    }

    /// The access decision for one action on the whole instance.
    pub fn authorize(&self, action: Action) -> Result<(), DomainError> {
        if self.actions.contains(&action) {
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
        let reader = Principal::new("r", &[DATA_READER.to_owned()]);
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
    fn data_owner_can_do_every_action() {
        let owner = Principal::new("o", &[DATA_OWNER.to_owned()]);
        assert!(Action::ALL.iter().all(|a| owner.authorize(*a).is_ok()));
    }

    #[test]
    fn unknown_roles_grant_nothing() {
        let nobody = Principal::new("n", &["00000000-0000-0000-0000-000000000000".to_owned()]);
        assert!(Action::ALL.iter().all(|a| nobody.authorize(*a).is_err()));
        assert!(nobody.roles.is_empty());
    }
}
