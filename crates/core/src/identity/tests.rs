#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use super::*;
use crate::auth::{DATA_READER, OPERATOR};
use crate::clock::SystemClock;
use crate::store::MemoryStore;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn directory() -> (Directory, Principal) {
    let store = Arc::new(MemoryStore::default());
    let dir = Directory::open(store, Arc::new(SystemClock)).unwrap();
    let (admin, secret) = Directory::new_admin_credential();
    dir.bootstrap_admin(&admin, &secret).unwrap();
    let admin = dir.principal(&admin, false, 0, 0).unwrap();
    (dir, admin)
}

fn user(dir: &Directory, admin: &Principal, name: &str) -> Identity {
    let new = NewIdentity {
        kind: IdentityKind::User,
        name: name.into(),
        display_name: None,
        groups: vec![],
        password: Some(Zeroizing::new("a long enough password".into())),
    };
    dir.create_identity(admin, new).unwrap().0
}

/// A new application named `name`, in no group.
fn application(name: &str) -> NewIdentity {
    NewIdentity {
        kind: IdentityKind::Application,
        name: name.into(),
        display_name: None,
        groups: vec![],
        password: None,
    }
}

fn code_now(secret: &str) -> String {
    let totp = totp_rs::Builder::new()
        .with_secret(totp_rs::Secret::try_from_base32(secret).unwrap())
        .build()
        .unwrap();
    totp.generate_current().to_string()
}

#[test]
fn bootstrap_admin_holds_data_owner_and_security_admin() {
    let (dir, admin) = directory();
    assert!(admin.authorize(Action::TwinsWrite).is_ok());
    assert!(admin.authorize(Action::RolesWrite).is_ok());
    assert!(admin.authorize(Action::AuditRead).is_ok());
    let (again, secret) = Directory::new_admin_credential();
    assert!(dir.bootstrap_admin(&again, &secret).is_err(), "only once");
}

#[test]
fn client_credentials_check_secret_and_disabled_state() {
    let (dir, admin) = directory();
    let new = NewIdentity {
        kind: IdentityKind::ServiceAccount,
        name: "historian".into(),
        display_name: None,
        groups: vec![],
        password: None,
    };
    let (svc, secret) = dir.create_identity(&admin, new).unwrap();
    let secret = secret.unwrap();
    assert_eq!(
        dir.authenticate_client(LOCAL, &svc.id, &secret)
            .map(|a| a.kind),
        Ok(PrincipalKind::ServiceAccount)
    );
    assert_eq!(
        dir.authenticate_client(LOCAL, &svc.id, "wrong"),
        Err(Refusal::Failed(LoginFailure::WrongSecret))
    );
    assert_eq!(
        dir.authenticate_client(LOCAL, "nobody", &secret),
        Err(Refusal::Failed(LoginFailure::Unknown))
    );
    let patch = IdentityPatch {
        disabled: Some(true),
        ..IdentityPatch::default()
    };
    dir.update_identity(&admin, &svc.id, patch).unwrap();
    assert_eq!(
        dir.authenticate_client(LOCAL, &svc.id, &secret),
        Err(Refusal::Failed(LoginFailure::Disabled))
    );
    assert!(
        dir.principal(&svc.id, false, 0, 0).is_none(),
        "disabled acts no more"
    );
    let rotated = dir.rotate_client_secret(&admin, &svc.id).unwrap();
    assert_ne!(*rotated, *secret);
}

#[test]
fn user_login_with_totp_accepts_each_code_once_and_recovery_codes() {
    // Each failure comes from its own address, so that the throttle, which a success no
    // longer resets, does not stand in the way of what this test is about.
    let elsewhere = |n: u8| IpAddr::from([192, 0, 2, n]);
    let (dir, admin) = directory();
    let alice = user(&dir, &admin, "alice");
    let login = dir
        .authenticate_user(LOCAL, "alice", "a long enough password", None)
        .unwrap();
    assert!(!login.mfa);
    assert_eq!(
        dir.authenticate_user(elsewhere(1), "alice", "wrong password!!", None),
        Err(Refusal::Failed(LoginFailure::WrongSecret))
    );
    assert_eq!(
        dir.authenticate_user(elsewhere(2), "mallory", "a long enough password", None),
        Err(Refusal::Failed(LoginFailure::Unknown))
    );
    let me = dir.principal(&alice.id, false, 0, 0).unwrap();
    let enrolment = dir.begin_totp(&me, LOCAL, None, "twinguard").unwrap();
    assert!(enrolment.uri.starts_with("otpauth://totp/twinguard:alice"));
    assert!(dir.confirm_totp(&me, elsewhere(9), "000000").is_err());
    let confirmed_with = code_now(&enrolment.secret);
    let recovery = dir.confirm_totp(&me, LOCAL, &confirmed_with).unwrap();
    assert_eq!(recovery.len(), credentials::RECOVERY_CODES);
    assert!(
        dir.begin_totp(&me, LOCAL, None, "twinguard").is_err(),
        "no silent re-enrolment"
    );
    // Enrolled: the password alone no longer logs in.
    assert_eq!(
        dir.authenticate_user(elsewhere(3), "alice", "a long enough password", None),
        Err(Refusal::Failed(LoginFailure::WrongCode))
    );
    // The confirmation's code is spent. (Taken from the confirmation, not computed again: a
    // 30 s step boundary between the two made this test fail now and then.)
    assert_eq!(
        dir.authenticate_user(
            elsewhere(4),
            "alice",
            "a long enough password",
            Some(&confirmed_with)
        ),
        Err(Refusal::Failed(LoginFailure::WrongCode))
    );
    let login = dir
        .authenticate_user(LOCAL, "alice", "a long enough password", Some(&recovery[0]))
        .unwrap();
    assert!(login.mfa);
    assert_eq!(
        dir.authenticate_user(
            elsewhere(5),
            "alice",
            "a long enough password",
            Some(&recovery[0])
        ),
        Err(Refusal::Failed(LoginFailure::WrongCode))
    );
}

#[test]
fn people_need_mfa_for_privileged_roles_and_step_up_for_sensitive_actions() {
    let (dir, admin) = directory();
    let bob = user(&dir, &admin, "bob");
    dir.assign(&admin, &bob.id, OPERATOR, Scope::Instance)
        .unwrap();
    let now = dir.now();
    let password_only = dir.principal(&bob.id, false, now, 0).unwrap();
    assert!(password_only.authorize(Action::TwinsRead).is_ok());
    assert!(matches!(
        password_only.authorize(Action::Commands),
        Err(DomainError::MfaRequired { .. })
    ));
    let fresh = dir.principal(&bob.id, true, now, 0).unwrap();
    assert!(fresh.authorize(Action::Approve).is_ok());
    let stale = dir
        .principal(&bob.id, true, now - STEP_UP_WINDOW_SECS - 5, 0)
        .unwrap();
    assert!(stale.authorize(Action::Commands).is_ok());
    assert!(matches!(
        stale.authorize(Action::Approve),
        Err(DomainError::StepUpRequired { .. })
    ));
}

#[test]
fn groups_custom_roles_and_assignments_resolve_to_current_grants() {
    let (dir, admin) = directory();
    let carol = user(&dir, &admin, "carol");
    let readers = dir
        .create_identity(
            &admin,
            NewIdentity {
                kind: IdentityKind::Group,
                name: "plant-readers".into(),
                display_name: None,
                groups: vec![],
                password: None,
            },
        )
        .unwrap()
        .0;
    let scope = Scope::Subtree {
        root: "site".into(),
        relationships: vec!["contains".into()],
    };
    dir.assign(&admin, &readers.id, DATA_READER, scope.clone())
        .unwrap();
    assert!(
        dir.principal(&carol.id, false, 0, 0)
            .unwrap()
            .grants()
            .is_empty()
    );
    dir.update_identity(
        &admin,
        &carol.id,
        IdentityPatch {
            groups: Some(vec![readers.id.clone()]),
            ..IdentityPatch::default()
        },
    )
    .unwrap();
    let carol_now = dir.principal(&carol.id, false, 0, 0).unwrap();
    assert_eq!(carol_now.grants().len(), 1);
    assert_eq!(carol_now.grants()[0].scope, scope);

    let role = dir
        .create_role(
            &admin,
            "Twin patcher",
            "",
            &[
                "Microsoft.DigitalTwins/digitaltwins/read".into(),
                "Microsoft.DigitalTwins/digitaltwins/write".into(),
            ],
        )
        .unwrap();
    assert!(role.privileged);
    let a = dir
        .assign(&admin, &carol.id, &role.id, Scope::Instance)
        .unwrap();
    assert!(dir.delete_role(&admin, &role.id).is_err(), "still assigned");
    assert!(dir.delete_role(&admin, DATA_READER).is_err(), "built in");
    dir.unassign(&admin, &a.id).unwrap();
    dir.delete_role(&admin, &role.id).unwrap();
    assert!(
        dir.create_role(&admin, "bad", "", &["twinguard/none".into()])
            .is_err()
    );
    // Deleting the group removes its grants from its members at once.
    dir.delete_identity(&admin, &readers.id).unwrap();
    assert!(
        dir.principal(&carol.id, false, 0, 0)
            .unwrap()
            .grants()
            .is_empty()
    );
    assert!(dir.identity(&admin, &carol.id).unwrap().groups.is_empty());
}

#[test]
fn only_security_admins_administer_and_everyone_reads_themselves() {
    let (dir, admin) = directory();
    let dave = user(&dir, &admin, "dave");
    dir.assign(&admin, &dave.id, DATA_READER, Scope::Instance)
        .unwrap();
    let me = dir.principal(&dave.id, false, 0, 0).unwrap();
    assert!(dir.identities(&me).is_err());
    assert!(dir.identity(&me, &dave.id).is_ok());
    assert!(dir.identity(&me, &admin.subject).is_err());
    assert!(dir.assignments(&me, Some(&dave.id)).is_ok());
    assert!(dir.assignments(&me, None).is_err());
    assert!(
        dir.assign(&me, &dave.id, crate::auth::DATA_OWNER, Scope::Instance)
            .is_err(),
        "no self-elevation"
    );
    assert!(
        dir.create_identity(
            &me,
            NewIdentity {
                kind: IdentityKind::User,
                name: "eve".into(),
                display_name: None,
                groups: vec![],
                password: None,
            }
        )
        .is_err()
    );
}

#[test]
fn directory_survives_reopen_and_migrates_legacy_clients() {
    let store = Arc::new(MemoryStore::default());
    let legacy = serde_json::json!({"secretSha256": credentials::secret_digest("s3cret"), "roles": [DATA_READER], "createdAt": 1});
    store
        .commit(&[Mutation::put(
            Table::Clients,
            "legacy-id",
            serde_json::to_vec(&legacy).unwrap(),
        )])
        .unwrap();
    let dir = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    assert!(
        dir.authenticate_client(LOCAL, "legacy-id", "s3cret")
            .is_ok()
    );
    let p = dir.principal("legacy-id", false, 0, 0).unwrap();
    assert!(p.authorize(Action::Query).is_ok());
    assert!(p.authorize(Action::TwinsWrite).is_err());
    assert!(store.scan(Table::Clients).unwrap().is_empty());
    drop(dir);
    let again = Directory::open(store, Arc::new(SystemClock)).unwrap();
    assert!(
        again
            .authenticate_client(LOCAL, "legacy-id", "s3cret")
            .is_ok()
    );
    assert!(
        again
            .principal("legacy-id", false, 0, 0)
            .unwrap()
            .authorize(Action::Query)
            .is_ok()
    );
}

#[test]
fn names_that_hide_characters_or_pass_for_another_name_are_refused() {
    let (dir, admin) = directory();
    let new = application;
    for name in [
        "\u{430}dmin",
        "admin\u{200b}",
        "ops\u{202e}nimda",
        "admin\u{2028}",
        " admin",
        "adm\u{ad}in",
    ] {
        assert!(
            dir.create_identity(&admin, new(name)).is_err(),
            "{name:?} was accepted"
        );
    }
    for name in ["ingest-app", "приложение", "アプリ", "José García"] {
        assert!(
            dir.create_identity(&admin, new(name)).is_ok(),
            "{name} was refused"
        );
    }
}

/// Two directories on one shared store, as on two nodes: node B learns what node A changes
/// (a new identity, a disabled one, a deleted one) at its change follower's next step, and
/// reads everything again when the store's change log no longer reaches back to it.
#[test]
fn a_node_follows_identities_created_disabled_and_deleted_on_another() {
    use crate::follow::ChangeFollower;
    let store = Arc::new(MemoryStore::shared());
    let follower = ChangeFollower::start(store.clone()).unwrap().unwrap();
    let a = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    let b = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    follower.register(b.clone());
    let (admin_id, secret) = Directory::new_admin_credential();
    a.bootstrap_admin(&admin_id, &secret).unwrap();
    let admin = a.principal(&admin_id, false, 0, 0).unwrap();
    assert!(
        b.principal(&admin_id, false, 0, 0).is_none(),
        "not yet read"
    );
    assert!(follower.step().unwrap() > 0);
    assert!(b.principal(&admin_id, false, 0, 0).is_some());

    let acts = |dir: &Directory, id: &str| {
        dir.generation(id)
            .and_then(|g| dir.principal(id, false, 0, g))
            .is_some()
    };
    let u = user(&a, &admin, "operator-1");
    let v = user(&a, &admin, "operator-2");
    follower.step().unwrap();
    assert!(acts(&b, &u.id) && acts(&b, &v.id));
    // The session B validates was issued before the disable: its generation is the old one.
    let before = b.generation(&u.id).unwrap();
    let disable = IdentityPatch {
        disabled: Some(true),
        ..IdentityPatch::default()
    };
    a.update_identity(&admin, &u.id, disable.clone()).unwrap();
    assert!(
        b.principal(&u.id, false, 0, before).is_some(),
        "until B follows"
    );
    follower.step().unwrap();
    assert!(b.principal(&u.id, false, 0, before).is_none());
    assert!(!acts(&b, &u.id));
    // The name index follows too: the name of a deleted identity is free again on B.
    a.delete_identity(&admin, &v.id).unwrap();
    follower.step().unwrap();
    assert!(b.generation(&v.id).is_none());
    let again = user(&b, &admin, "operator-2");
    assert_ne!(again.id, v.id);

    // A follower the log no longer reaches reads the tables whole.
    follower.step().unwrap();
    let w = user(&a, &admin, "operator-3");
    follower.step().unwrap();
    let generation = b.generation(&w.id).unwrap();
    a.update_identity(&admin, &w.id, disable).unwrap();
    store.forget_changes();
    assert!(b.principal(&w.id, false, 0, generation).is_some());
    follower.step().unwrap();
    assert!(b.principal(&w.id, false, 0, generation).is_none());
}

/// The follower reads a changed identity while this node disables it: the disable is not
/// undone by the older value the follower read (the read and its effect hold the directory's
/// lock, which the disable holds across its commit). With the read outside the lock, the
/// identity came back enabled here until the next step.
#[test]
fn a_follower_read_racing_a_local_change_does_not_undo_it() {
    use crate::follow::ChangeFollower;
    let store = Arc::new(MemoryStore::shared());
    let follower = ChangeFollower::start(store.clone()).unwrap().unwrap();
    let node = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    follower.register(node.clone());
    let (admin_id, secret) = Directory::new_admin_credential();
    node.bootstrap_admin(&admin_id, &secret).unwrap();
    let admin = node.principal(&admin_id, false, 0, 0).unwrap();
    let u = user(&node, &admin, "operator-1");
    let racing = {
        let (node, id) = (node.clone(), u.id.clone());
        let (done, finished) = std::sync::mpsc::channel();
        store.run_during_next_read(move || {
            let disable = IdentityPatch {
                disabled: Some(true),
                ..IdentityPatch::default()
            };
            node.update_identity(&admin, &id, disable).unwrap();
            done.send(()).unwrap();
        });
        finished
    };
    follower.step().unwrap();
    racing.recv().unwrap();
    let generation = node.generation(&u.id).unwrap();
    assert!(
        node.principal(&u.id, false, 0, generation).is_none(),
        "the local disable was undone by the follower's older read"
    );
}

/// Two nodes on one shared store: a one-time code (here recovery codes, as a TOTP step lasts
/// 30 s) presented to both at once logs in on exactly one. First forced: node A logs in with
/// the code while node B reads the record for it; then three rounds released together. With
/// the used code recorded from what each node read, both logins succeeded.
#[test]
fn a_one_time_code_presented_to_two_nodes_at_once_logs_in_once() {
    use crate::follow::ChangeFollower;
    let store = Arc::new(MemoryStore::shared());
    let follower = ChangeFollower::start(store.clone()).unwrap().unwrap();
    let a = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    let b = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    follower.register(b.clone());
    let (admin_id, secret) = Directory::new_admin_credential();
    a.bootstrap_admin(&admin_id, &secret).unwrap();
    let admin = a.principal(&admin_id, false, 0, 0).unwrap();
    let alice = user(&a, &admin, "alice");
    let me = a.principal(&alice.id, false, 0, 0).unwrap();
    let enrolment = a.begin_totp(&me, LOCAL, None, "twinguard").unwrap();
    let recovery = a
        .confirm_totp(&me, LOCAL, &code_now(&enrolment.secret))
        .unwrap();
    follower.step().unwrap();
    let password = "a long enough password";
    let (done, finished) = std::sync::mpsc::channel();
    store.run_during_next_read({
        let (a, code) = (a.clone(), recovery[0].clone());
        move || {
            let on_a = a.authenticate_user(LOCAL, "alice", password, Some(&code));
            done.send(on_a.is_ok()).unwrap();
        }
    });
    let on_b = b.authenticate_user(
        IpAddr::from([192, 0, 2, 7]),
        "alice",
        password,
        Some(&recovery[0]),
    );
    assert!(finished.recv().unwrap(), "node A logs in");
    assert_eq!(
        on_b.map(|_| ()),
        Err(Refusal::Failed(LoginFailure::WrongCode))
    );
    // Three more rounds: each loser's failure counts against the account, which the throttle
    // answers after a few more.
    for (round, code) in recovery.iter().enumerate().skip(1).take(3) {
        let barrier = std::sync::Barrier::new(2);
        let login = |dir: &Directory, n: u8| {
            barrier.wait();
            let from = IpAddr::from([192, 0, 2, n]);
            dir.authenticate_user(from, "alice", "a long enough password", Some(code))
        };
        let (on_a, on_b) = std::thread::scope(|s| {
            let on_a = s.spawn(|| login(&a, 1));
            let on_b = s.spawn(|| login(&b, 2));
            (on_a.join().unwrap(), on_b.join().unwrap())
        });
        let ok = [&on_a, &on_b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {on_a:?} {on_b:?}");
        for refused in [on_a, on_b].into_iter().filter_map(Result::err) {
            assert_eq!(
                refused,
                Refusal::Failed(LoginFailure::WrongCode),
                "round {round}"
            );
        }
    }
}

/// Node A edits records that node B has just changed, before A's follower has read B's
/// change: A decides on the records as stored, so B's change stands. A disabled identity stays
/// disabled when A changes its display name; a key revoked on B cannot be rotated on A (which
/// would have written it back unrevoked with a live successor); a password reset on B is not
/// undone, and the old password no longer logs in on A with the new session generation.
#[test]
fn a_node_editing_a_record_another_node_just_changed_does_not_undo_the_change() {
    use crate::identity::apikeys::{NewApiKey, Risk};
    let store = Arc::new(MemoryStore::shared());
    let a = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    let (admin_id, secret) = Directory::new_admin_credential();
    a.bootstrap_admin(&admin_id, &secret).unwrap();
    let admin = a.principal(&admin_id, false, 0, 0).unwrap();
    let u = user(&a, &admin, "operator-1");
    let v = user(&a, &admin, "operator-2");
    let key = a
        .create_api_key(
            &admin,
            NewApiKey {
                name: "export".into(),
                owner_id: admin_id.clone(),
                role_id: crate::auth::DATA_OWNER.into(),
                scope: crate::auth::Scope::Instance,
                risk: Risk::Low,
                expires_in: None,
            },
        )
        .unwrap();
    let b = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();

    let disable = IdentityPatch {
        disabled: Some(true),
        ..IdentityPatch::default()
    };
    b.update_identity(&admin, &u.id, disable).unwrap();
    let rename = IdentityPatch {
        display_name: Some("Operator One".into()),
        ..IdentityPatch::default()
    };
    let edited = a.update_identity(&admin, &u.id, rename).unwrap();
    assert!(edited.disabled, "the disable made on B stands");
    let again = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    assert!(
        again
            .generation(&u.id)
            .is_some_and(|g| again.principal(&u.id, false, 0, g).is_none())
    );

    b.revoke_api_key(&admin, &key.key.id).unwrap();
    assert!(matches!(
        a.rotate_api_key(&admin, &key.key.id, None),
        Err(DomainError::Conflict(_))
    ));
    let again = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    assert!(
        again.authenticate_api_key(LOCAL, &key.secret).is_err(),
        "the key revoked on B stays revoked"
    );

    b.set_password(&admin, &v.id, "a new long enough password")
        .unwrap();
    assert_eq!(
        a.authenticate_user(LOCAL, "operator-2", "a long enough password", None)
            .map(|_| ()),
        Err(Refusal::Failed(LoginFailure::WrongSecret)),
        "the old password, checked against what A knew, gets no session"
    );
    assert!(
        a.authenticate_user(LOCAL, "operator-2", "a new long enough password", None)
            .is_ok()
    );
}

/// Guesses on one account spread over two nodes (from addresses that each stay under their
/// own limit) hold the account back on both once the nodes have published and followed each
/// other's counts: 30 failures on each node, against an account limit of 50. Each node alone
/// saw 30 and let the next guess through.
/// Role and assignment edits on a node that has not followed another's changes are decided on
/// the stored records: no assignment to a role or an identity another node deleted, no role
/// deleted or identity deleted while another node's assignment holds it (its assignments go
/// with it), no second role of a name another node took.
#[test]
fn role_and_assignment_edits_are_decided_on_the_stored_records() {
    let store = Arc::new(MemoryStore::shared());
    let a = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    let (admin_id, secret) = Directory::new_admin_credential();
    a.bootstrap_admin(&admin_id, &secret).unwrap();
    let admin = a.principal(&admin_id, false, 0, 0).unwrap();
    let (u, v, w) = (
        user(&a, &admin, "u"),
        user(&a, &admin, "v"),
        user(&a, &admin, "w"),
    );
    let actions = ["Microsoft.DigitalTwins/digitaltwins/read".to_owned()];
    let gone = a.create_role(&admin, "Gone", "", &actions).unwrap();
    let held = a.create_role(&admin, "Held", "", &actions).unwrap();
    // B knows all of that, and follows nothing from here on.
    let b = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    a.delete_role(&admin, &gone.id).unwrap();
    a.delete_identity(&admin, &w.id).unwrap();
    let assigned = a.assign(&admin, &v.id, &held.id, Scope::Instance).unwrap();
    a.create_role(&admin, "Taken", "", &actions).unwrap();

    assert!(matches!(
        b.assign(&admin, &u.id, &gone.id, Scope::Instance),
        Err(DomainError::NotFound { .. })
    ));
    assert!(matches!(
        b.assign(&admin, &w.id, DATA_READER, Scope::Instance),
        Err(DomainError::NotFound { .. })
    ));
    assert!(matches!(
        b.delete_role(&admin, &held.id),
        Err(DomainError::Conflict(_))
    ));
    assert!(matches!(
        b.create_role(&admin, "taken", "", &actions),
        Err(DomainError::Conflict(_))
    ));
    b.delete_identity(&admin, &v.id).unwrap();
    let left: Vec<String> = store
        .scan(Table::RoleAssignments)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(!left.contains(&assigned.id), "v's assignment went with v");
    // Every stored assignment names a stored identity and role.
    let c = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    for assignment in c.assignments(&admin, None).unwrap() {
        assert!(c.identity(&admin, &assignment.principal_id).is_ok());
        assert!(c.role(&assignment.role_id).is_ok());
    }
}

/// Guesses from one address spread over two nodes wait as on one node: 3 on each are under
/// the 5 an address may fail freely on one node, 6 in all are not. An attacker failing from
/// more addresses than a node publishes (10,000) makes no more records than that.
#[test]
fn guesses_from_one_address_spread_over_two_nodes_are_throttled_as_on_one() {
    use crate::follow::ChangeFollower;
    let store = Arc::new(MemoryStore::shared());
    let (follow_a, follow_b) = (
        ChangeFollower::start(store.clone()).unwrap().unwrap(),
        ChangeFollower::start(store.clone()).unwrap().unwrap(),
    );
    let a = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    let b = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    follow_a.register(a.clone());
    follow_b.register(b.clone());
    let attacker = IpAddr::from([192, 0, 2, 7]);
    let guess = |dir: &Directory, n: u32| {
        let account = format!("user:nobody-{n}");
        dir.guarded(attacker, Some(&account), || {
            Err::<(), _>(LoginFailure::WrongSecret)
        })
    };
    for n in 0..3 {
        assert!(matches!(guess(&a, n), Err(Refusal::Failed(_))));
        assert!(matches!(guess(&b, 10 + n), Err(Refusal::Failed(_))));
    }
    assert!(
        matches!(guess(&a, 20), Err(Refusal::Failed(_))),
        "4 failures on one node: not throttled yet"
    );
    a.publish_failures().unwrap();
    b.publish_failures().unwrap();
    follow_a.step().unwrap();
    follow_b.step().unwrap();
    for dir in [&a, &b] {
        assert!(
            matches!(guess(dir, 30), Err(Refusal::Throttled(_))),
            "7 failures from the address in all"
        );
    }

    for n in 0..10_050u32 {
        let from = IpAddr::from(std::net::Ipv6Addr::from(
            (0x2001_0db8_u128 << 96) | (u128::from(n) << 64),
        ));
        let _ = a.guarded(from, None, || Err::<(), _>(LoginFailure::WrongSecret));
    }
    let mut publications = 0;
    while a.publish_failures().unwrap() > 0 {
        publications += 1;
    }
    // 9,999 addresses under the bound, 1,000 a publication; the 51 past the bound wait for
    // their next failure.
    assert_eq!(publications, 10, "at most 1,000 addresses a publication");
    let addresses = store
        .scan(Table::Backoff)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.contains("\u{1f}addr:2001:db8:"))
        .count();
    assert_eq!(
        addresses,
        10_000 - 1,
        "the bound, less the attacker's first address"
    );
}

#[test]
fn guesses_on_one_account_spread_over_two_nodes_are_throttled_as_on_one() {
    use crate::follow::ChangeFollower;
    let store = Arc::new(MemoryStore::shared());
    let (follow_a, follow_b) = (
        ChangeFollower::start(store.clone()).unwrap().unwrap(),
        ChangeFollower::start(store.clone()).unwrap().unwrap(),
    );
    let a = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    let b = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    follow_a.register(a.clone());
    follow_b.register(b.clone());
    let (admin_id, secret) = Directory::new_admin_credential();
    a.bootstrap_admin(&admin_id, &secret).unwrap();
    let admin = a.principal(&admin_id, false, 0, 0).unwrap();
    user(&a, &admin, "alice");
    follow_b.step().unwrap();
    let account = Some("user:alice");
    let address = |node: u8, n: u8| IpAddr::from([10, 0, node, n]);
    let guess = |dir: &Directory, from: IpAddr| {
        dir.guarded(from, account, || Err::<(), _>(LoginFailure::WrongSecret))
    };
    for n in 0..30 {
        assert!(matches!(guess(&a, address(1, n)), Err(Refusal::Failed(_))));
        assert!(matches!(guess(&b, address(2, n)), Err(Refusal::Failed(_))));
    }
    let fresh = address(3, 1);
    assert!(
        matches!(guess(&a, fresh), Err(Refusal::Failed(_))),
        "each node alone lets the next guess through"
    );
    assert!(a.publish_failures().unwrap() > 0 && b.publish_failures().unwrap() > 0);
    follow_a.step().unwrap();
    follow_b.step().unwrap();
    for dir in [&a, &b] {
        assert!(
            matches!(guess(dir, address(3, 2)), Err(Refusal::Throttled(_))),
            "61 failures on the account in all"
        );
    }
    // A node that starts now counts them too.
    let c = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    assert!(matches!(
        guess(&c, address(3, 3)),
        Err(Refusal::Throttled(_))
    ));
    // Guesses on names nobody holds stay on their node: no record for an attacker's inventions.
    for n in 0..3 {
        let _ = a.guarded(address(4, n), Some("user:invented"), || {
            Err::<(), _>(LoginFailure::WrongSecret)
        });
    }
    a.publish_failures().unwrap();
    let invented = store
        .scan(Table::Backoff)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.ends_with("\u{1f}user:invented"))
        .count();
    assert_eq!(invented, 0);
}

/// The first node on a new shared store: its directory, with the first administrator.
fn first_node() -> (Arc<MemoryStore>, Directory, Principal) {
    let store = Arc::new(MemoryStore::shared());
    let dir = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    let (admin, secret) = Directory::new_admin_credential();
    dir.bootstrap_admin(&admin, &secret).unwrap();
    let admin = dir.principal(&admin, false, 0, 0).unwrap();
    (store, dir, admin)
}

/// Two nodes create an identity of one name (in another case) before either has followed the
/// other: the name is claimed in the store, so the second creation is a conflict although its
/// node's memory did not know the name; deciding on memory, both landed and one name answered
/// for two identities. Then, at once on two threads, round after round: one creation each.
/// Deleting an identity frees its name on every node.
#[test]
fn one_name_created_on_two_nodes_is_taken_once() {
    let (store, a, admin) = first_node();
    let b = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    let a = Arc::new(a);
    let new = application;
    let alice = a.create_identity(&admin, new("alice")).unwrap().0;
    assert!(
        matches!(
            b.create_identity(&admin, new("Alice")),
            Err(DomainError::Conflict(_))
        ),
        "B did not know the name, the store did"
    );
    let named = |name: &str| {
        store
            .scan(Table::Identities)
            .unwrap()
            .iter()
            .filter(|(_, v)| {
                serde_json::from_slice::<serde_json::Value>(v).unwrap()["identity"]["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .count()
    };
    assert_eq!(named("alice"), 1);

    // The name is free again once its identity is gone, on the node that never knew it.
    a.delete_identity(&admin, &alice.id).unwrap();
    b.create_identity(&admin, new("alice")).unwrap();
    assert_eq!(named("alice"), 1);

    for round in 0..50 {
        let name = format!("app-{round}");
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let made: Vec<bool> = [a.clone(), b.clone()]
            .into_iter()
            .map(|dir| {
                let (barrier, admin, name) = (barrier.clone(), admin.clone(), name.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    dir.create_identity(&admin, new(&name)).is_ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(made.iter().filter(|m| **m).count(), 1, "round {round}");
        assert_eq!(named(&name), 1, "round {round}");
    }
}

/// Identities stored before names were claimed get their claims when a node opens the store,
/// so a node that has not read them yet still cannot take their names.
#[test]
fn names_stored_before_claims_are_claimed_at_open() {
    let (store, a, admin) = first_node();
    // Node C loaded the store before the identity below was made, and has not followed since.
    let c = Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    user(&a, &admin, "operator-1");
    // As an earlier version left the store: no claims.
    let claims: Vec<Mutation> = store
        .scan(Table::Names)
        .unwrap()
        .into_iter()
        .map(|(k, _)| Mutation::delete(Table::Names, k))
        .collect();
    assert_eq!(claims.len(), 2);
    store.commit(&claims).unwrap();
    // A node opening the store claims them again.
    Directory::open(store.clone(), Arc::new(SystemClock)).unwrap();
    assert_eq!(store.scan(Table::Names).unwrap().len(), 2);
    let new = NewIdentity {
        kind: IdentityKind::User,
        name: "OPERATOR-1".into(),
        display_name: None,
        groups: vec![],
        password: None,
    };
    assert!(matches!(
        c.create_identity(&admin, new),
        Err(DomainError::Conflict(_))
    ));
}

/// Custom role names are claimed like identity names: two nodes creating one role name at
/// once, round after round, make one role each round (each node reads the roles as stored
/// before deciding, but another node's creation can land between that read and the commit);
/// deleting the role frees its name.
#[test]
fn one_role_name_created_on_two_nodes_at_once_is_taken_once() {
    let (store, a, admin) = first_node();
    let b = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    let a = Arc::new(a);
    let actions = ["Microsoft.DigitalTwins/digitaltwins/read".to_owned()];
    let roles_named = |name: &str| {
        store
            .scan(Table::Roles)
            .unwrap()
            .iter()
            .filter(|(_, v)| {
                serde_json::from_slice::<serde_json::Value>(v).unwrap()["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .count()
    };
    for round in 0..50 {
        let name = format!("Role {round}");
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let made: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .map(|dir| {
                let (barrier, admin, name, actions) = (
                    barrier.clone(),
                    admin.clone(),
                    name.clone(),
                    actions.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    dir.create_role(&admin, &name, "", &actions).ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(made.len(), 1, "round {round}");
        assert_eq!(roles_named(&name), 1, "round {round}");
    }
    let role = a.create_role(&admin, "Pumps", "", &actions).unwrap();
    a.delete_role(&admin, &role.id).unwrap();
    b.create_role(&admin, "pumps", "", &actions).unwrap();
}

/// A workload renewing in a loop (or a leaked certificate renewing for itself) cannot grow its
/// record without end: at [`MAX_LIVE_CERTIFICATES`] live ones, a new certificate is refused
/// before the CA would sign it and when it would be recorded. Expired and revoked ones do
/// not count, and are no longer recorded once another is: they authenticate nothing either way.
#[test]
fn a_workload_holds_a_bounded_number_of_live_certificates() {
    let (dir, admin) = directory();
    let app = dir
        .create_identity(&admin, application("historian"))
        .unwrap()
        .0
        .id;
    let now = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap();
    let cert = |serial: usize, not_after: u64| IssuedCertificate {
        serial: format!("{serial:x}"),
        not_after,
        revoked: false,
        issuer: None,
    };
    // Serials are hex: certificate 99 is "63".
    let full = |r: DomainResult<()>| matches!(r, Err(DomainError::Conflict(m)) if m.contains("live client certificates"));
    for serial in 1000..1040 {
        dir.record_certificate(&admin, &app, cert(serial, now - 1))
            .unwrap();
    }
    for serial in 0..MAX_LIVE_CERTIFICATES {
        dir.record_certificate(&admin, &app, cert(serial, now + 3600))
            .unwrap();
    }
    assert!(full(dir.authorize_certificate(&admin, &app)));
    assert!(full(dir.record_certificate(
        &admin,
        &app,
        cert(99, now + 3600)
    )));
    assert!(dir.authenticate_certificate(&app, "63").is_err());
    let last = format!("{:x}", MAX_LIVE_CERTIFICATES - 1);
    for serial in ["0", last.as_str()] {
        assert!(
            dir.authenticate_certificate(&app, serial).is_ok(),
            "{serial}"
        );
    }

    // A revocation makes room; the revoked certificate stays refused once it is forgotten.
    dir.revoke_certificate(&admin, &app, "0").unwrap();
    dir.authorize_certificate(&admin, &app).unwrap();
    dir.record_certificate(&admin, &app, cert(99, now + 3600))
        .unwrap();
    assert!(dir.authenticate_certificate(&app, "0").is_err());
    assert!(dir.authenticate_certificate(&app, "63").is_ok());
    assert!(matches!(
        dir.revoke_certificate(&admin, &app, "0"),
        Err(DomainError::NotFound { .. })
    ));
    assert!(full(dir.authorize_certificate(&admin, &app)));
    let state = dir.state.read();
    assert_eq!(
        state.records[&app].credentials.certificates.len(),
        MAX_LIVE_CERTIFICATES,
        "the 40 expired certificates and the revoked one are no longer recorded"
    );
}
