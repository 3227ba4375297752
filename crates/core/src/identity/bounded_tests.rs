//! Property: administration never escalates. Over generated directories (custom roles drawn
//! from administrative and data actions, assignments at several scopes, group memberships) an
//! administrator holding a random mix of permissions tries every administrative operation on
//! every identity; each one that succeeds must give it nothing it did not hold, judged by a
//! brute-force oracle over (action, scope) pairs written independently of `Principal::covers`.
//! And none that the oracle allows is refused, so the bound is not simply "refuse everything".

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;

use super::apikeys::{NewApiKey, Risk};
use super::*;
use crate::clock::SystemClock;
use crate::store::MemoryStore;

const POOL: [Action; 8] = [
    Action::TwinsRead,
    Action::TwinsWrite,
    Action::Query,
    Action::AuditRead,
    Action::KeysWrite,
    Action::IdentitiesWrite,
    Action::RolesWrite,
    Action::DevicesWrite,
];

fn scope(n: u8) -> Scope {
    match n % 3 {
        0 => Scope::Instance,
        1 => Scope::Subtree {
            root: "site-1".into(),
            relationships: vec!["contains".into()],
        },
        _ => Scope::Subtree {
            root: "site-2".into(),
            relationships: vec!["contains".into()],
        },
    }
}

/// The (action, scope) pairs `grants` hold.
fn pairs(grants: &[Grant]) -> BTreeSet<(Action, String)> {
    grants
        .iter()
        .flat_map(|g| {
            let s = serde_json::to_string(&g.scope).unwrap();
            g.actions.iter().map(move |a| (a, s.clone()))
        })
        .collect()
}

/// The oracle: `actor` holds every pair of `target`, at instance scope or at that scope.
fn holds_all(actor: &BTreeSet<(Action, String)>, target: &BTreeSet<(Action, String)>) -> bool {
    let instance = serde_json::to_string(&Scope::Instance).unwrap();
    target
        .iter()
        .all(|(a, s)| actor.contains(&(*a, instance.clone())) || actor.contains(&(*a, s.clone())))
}

#[derive(Debug, Clone)]
struct World {
    /// Action masks (indexes into POOL) of four custom roles.
    roles: Vec<u8>,
    /// (identity 0..5, role 0..4, scope) assignments; identity 5 is the group.
    assignments: Vec<(u8, u8, u8)>,
    /// The actor's (app-0's) own roles; the first at instance scope.
    actor: Vec<(u8, u8)>,
    /// Identities 0..5 that are members of the group.
    members: Vec<u8>,
    /// Operations: (kind, target identity, role, scope).
    ops: Vec<(u8, u8, u8, u8)>,
}

fn world() -> impl Strategy<Value = World> {
    (
        proptest::collection::vec(1u8..=255, 4),
        proptest::collection::vec((1u8..6, 0u8..4, 0u8..3), 0..12),
        proptest::collection::vec((0u8..4, 0u8..3), 1..4),
        proptest::collection::vec(0u8..5, 0..3),
        proptest::collection::vec((0u8..9, 0u8..6, 0u8..4, 0u8..3), 4..16),
    )
        .prop_map(|(roles, assignments, actor, members, ops)| World {
            roles,
            assignments,
            actor,
            members,
            ops,
        })
}

fn actions(mask: u8) -> Vec<String> {
    POOL.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, a)| a.as_str().to_owned())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn administration_never_gives_the_administrator_more_than_it_holds(w in world()) {
        let dir = Directory::open(Arc::new(MemoryStore::default()), Arc::new(SystemClock)).unwrap();
        let (root_id, secret) = Directory::new_admin_credential();
        dir.bootstrap_admin(&root_id, &secret).unwrap();
        let root = dir.principal(&root_id, false, 0, 0).unwrap();
        let role_ids: Vec<String> = w
            .roles
            .iter()
            .enumerate()
            .map(|(i, mask)| dir.create_role(&root, &format!("r{i}"), "", &actions(*mask)).unwrap().id)
            .collect();
        let group = dir
            .create_identity(&root, NewIdentity {
                kind: IdentityKind::Group,
                name: "g".into(),
                display_name: None,
                groups: vec![],
                password: None,
            })
            .unwrap()
            .0
            .id;
        let mut ids: Vec<String> = (0..5)
            .map(|i| {
                let groups = if w.members.contains(&i) { vec![group.clone()] } else { vec![] };
                dir.create_identity(&root, NewIdentity {
                    kind: IdentityKind::Application,
                    name: format!("app-{i}"),
                    display_name: None,
                    groups,
                    password: None,
                })
                .unwrap()
                .0
                .id
            })
            .collect();
        ids.push(group.clone());
        for (who, role, at) in &w.assignments {
            dir.assign(&root, &ids[*who as usize], &role_ids[*role as usize], scope(*at)).unwrap();
        }
        for (i, (role, at)) in w.actor.iter().enumerate() {
            let at = if i == 0 { 0 } else { *at };
            dir.assign(&root, &ids[0], &role_ids[*role as usize], scope(at)).unwrap();
        }
        // The actor is app-0, a workload (no MFA rule), holding whatever it was given.
        let actor_id = ids[0].clone();
        for (kind, target, role, at) in &w.ops {
            let Some(actor) = dir.principal(&actor_id, false, 0, dir.generation(&actor_id).unwrap()) else {
                break;
            };
            let mine = pairs(actor.grants());
            let target_id = ids[*target as usize].clone();
            let theirs = |id: &str| pairs(&dir.state.read().resolve(id));
            let role_id = role_ids[*role as usize].clone();
            let role_pairs = pairs(&[Grant {
                role: RoleId(role_id.clone()),
                actions: ActionSet::parse(&actions(w.roles[*role as usize])).unwrap(),
                scope: scope(*at),
            }]);
            let instance = |a: Action| actor.holds_everywhere(a);
            let (name, allowed, ok) = match kind {
                0 => (
                    "rotate a client secret",
                    instance(Action::KeysWrite) && holds_all(&mine, &theirs(&target_id)),
                    target_id != group && dir.rotate_client_secret(&actor, &target_id).is_ok(),
                ),
                1 => (
                    "reset MFA",
                    instance(Action::IdentitiesWrite) && holds_all(&mine, &theirs(&target_id)),
                    dir.reset_mfa(&actor, &target_id).is_ok(),
                ),
                2 => (
                    "join the group",
                    instance(Action::IdentitiesWrite)
                        && holds_all(&mine, &theirs(&target_id))
                        && (dir.identity(&root, &target_id).unwrap().groups.contains(&group)
                            || holds_all(&mine, &theirs(&group))),
                    target_id != group
                        && dir
                            .update_identity(&actor, &target_id, IdentityPatch {
                                groups: Some(vec![group.clone()]),
                                ..IdentityPatch::default()
                            })
                            .is_ok(),
                ),
                3 => (
                    "assign a role",
                    instance(Action::RolesWrite) && holds_all(&mine, &role_pairs),
                    dir.assign(&actor, &target_id, &role_id, scope(*at)).is_ok(),
                ),
                4 => {
                    let listed = dir.assignments(&root, Some(&target_id)).unwrap();
                    let Some(a) = listed.first() else { continue };
                    let removed = pairs(&[Grant {
                        role: RoleId(a.role_id.clone()),
                        actions: dir.state.read().role(&a.role_id).unwrap().actions,
                        scope: a.scope.clone(),
                    }]);
                    (
                        "remove an assignment",
                        instance(Action::RolesWrite) && holds_all(&mine, &removed),
                        dir.unassign(&actor, &a.id).is_ok(),
                    )
                }
                5 => {
                    let new = NewApiKey {
                        name: "k".into(),
                        owner_id: target_id.clone(),
                        role_id: role_id.clone(),
                        scope: scope(*at),
                        risk: Risk::Low,
                        expires_in: None,
                    };
                    let created = dir.create_api_key(&actor, new);
                    // Keys also need the owner to hold the role and carry no sensitive action;
                    // judge only what the actor could gain.
                    let gained_nothing = created.is_err()
                        || (holds_all(&mine, &theirs(&target_id)) && holds_all(&mine, &role_pairs));
                    prop_assert!(gained_nothing, "a key for {target} with role {role}");
                    continue;
                }
                6 => (
                    "issue a client certificate",
                    instance(Action::KeysWrite) && holds_all(&mine, &theirs(&target_id)),
                    target_id != group && dir.authorize_certificate(&actor, &target_id).is_ok(),
                ),
                7 => (
                    "disable",
                    instance(Action::IdentitiesWrite) && holds_all(&mine, &theirs(&target_id)),
                    target_id != actor_id
                        && dir
                            .update_identity(&actor, &target_id, IdentityPatch {
                                disabled: Some(true),
                                ..IdentityPatch::default()
                            })
                            .is_ok(),
                ),
                _ => (
                    "enrolment code",
                    false,
                    // Workloads have no second factor: refused whoever asks.
                    dir.issue_enrolment_code(&actor, &target_id).is_ok(),
                ),
            };
            let eligible = match kind {
                0 | 2 | 6 => target_id != group,
                7 => target_id != actor_id,
                _ => true,
            };
            prop_assert_eq!(ok, allowed && eligible, "{} on identity {}", name, target);
        }
    }
}
