//! An edit whose commit waits for the store keeps no request waiting with it: every reader of
//! the directory (each request's principal, listings, client logins) is answered meanwhile.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use super::apikeys::{NewApiKey, Risk};
use super::*;
use crate::auth::DATA_READER;
use crate::clock::SystemClock;
use crate::store::stalling::StallingStore;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const PASSWORD: &str = "a long enough password";

/// What the edits work on: a directory with one record of every kind an edit changes.
struct Plant {
    store: Arc<StallingStore>,
    dir: Arc<Directory>,
    admin: Principal,
    admin_secret: String,
    /// A person with a confirmed second factor, and one of its recovery codes.
    enrolled: Principal,
    recovery_code: String,
    /// A person whose enrolment is begun, not confirmed, and its TOTP secret.
    enrolling: Principal,
    enrolling_secret: String,
    /// A person with no second factor.
    plain: Principal,
    app: String,
    role: String,
    assignment: String,
    api_key: String,
}

fn totp_code(secret: &str) -> String {
    totp_rs::Builder::new()
        .with_secret(totp_rs::Secret::try_from_base32(secret).unwrap())
        .build()
        .unwrap()
        .generate_current()
        .to_string()
}

fn person(dir: &Directory, admin: &Principal, name: &str) -> Principal {
    let new = NewIdentity {
        kind: IdentityKind::User,
        name: name.into(),
        display_name: None,
        groups: vec![],
        password: Some(Zeroizing::new(PASSWORD.into())),
    };
    let id = dir.create_identity(admin, new).unwrap().0.id;
    dir.principal(&id, false, 0, 0).unwrap()
}

fn plant() -> Plant {
    let store = Arc::new(StallingStore::default());
    let dir = Arc::new(Directory::open(store.clone(), Arc::new(SystemClock)).unwrap());
    let (admin_id, admin_secret) = Directory::new_admin_credential();
    dir.bootstrap_admin(&admin_id, &admin_secret).unwrap();
    let admin = dir.principal(&admin_id, false, 0, 0).unwrap();
    let enrolled = person(&dir, &admin, "enrolled");
    let totp_secret = dir
        .begin_totp(&enrolled, LOCAL, None, "twinguard")
        .unwrap()
        .secret
        .to_string();
    let recovery_code = dir
        .confirm_totp(&enrolled, LOCAL, &totp_code(&totp_secret))
        .unwrap()
        .swap_remove(0);
    let enrolling = person(&dir, &admin, "enrolling");
    let enrolling_secret = dir
        .begin_totp(&enrolling, LOCAL, None, "twinguard")
        .unwrap()
        .secret
        .to_string();
    let plain = person(&dir, &admin, "plain");
    let new_app = NewIdentity {
        kind: IdentityKind::Application,
        name: "historian".into(),
        display_name: None,
        groups: vec![],
        password: None,
    };
    let app = dir.create_identity(&admin, new_app).unwrap().0.id;
    let assignment = dir
        .assign(&admin, &app, DATA_READER, Scope::Instance)
        .unwrap()
        .id;
    dir.record_certificate(
        &admin,
        &app,
        IssuedCertificate {
            serial: "0a".into(),
            not_after: u64::MAX / 2,
            revoked: false,
            issuer: None,
        },
    )
    .unwrap();
    let role = dir
        .create_role(&admin, "spare", "", &["twinguard/audit/read".to_owned()])
        .unwrap()
        .id;
    let api_key = dir
        .create_api_key(&admin, api_key_for(&app))
        .unwrap()
        .key
        .id;
    Plant {
        store,
        dir,
        admin,
        admin_secret: admin_secret.to_string(),
        enrolled,
        recovery_code,
        enrolling,
        enrolling_secret,
        plain,
        app,
        role,
        assignment,
        api_key,
    }
}

fn api_key_for(owner: &str) -> NewApiKey {
    NewApiKey {
        name: "export".into(),
        owner_id: owner.into(),
        role_id: DATA_READER.into(),
        scope: Scope::Instance,
        risk: Risk::High,
        expires_in: None,
    }
}

type EditFn = fn(&Plant) -> DomainResult<()>;

/// Every operation that changes the directory and commits, by name.
fn edits() -> Vec<(&'static str, EditFn)> {
    vec![
        ("create_identity", |p| {
            let new = NewIdentity {
                kind: IdentityKind::ServiceAccount,
                name: "new".into(),
                display_name: None,
                groups: vec![],
                password: None,
            };
            p.dir.create_identity(&p.admin, new).map(|_| ())
        }),
        ("update_identity", |p| {
            let patch = IdentityPatch {
                disabled: Some(true),
                display_name: None,
                groups: None,
            };
            p.dir
                .update_identity(&p.admin, &p.plain.subject, patch)
                .map(|_| ())
        }),
        ("delete_identity", |p| {
            p.dir.delete_identity(&p.admin, &p.app)
        }),
        ("set_password", |p| {
            p.dir
                .set_password(&p.admin, &p.plain.subject, "another long password")
        }),
        ("reset_mfa", |p| {
            p.dir.reset_mfa(&p.admin, &p.enrolled.subject)
        }),
        ("issue_enrolment_code", |p| {
            p.dir
                .issue_enrolment_code(&p.admin, &p.plain.subject)
                .map(|_| ())
        }),
        ("rotate_client_secret", |p| {
            p.dir.rotate_client_secret(&p.admin, &p.app).map(|_| ())
        }),
        ("set_client_keys", |p| {
            let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "k1"}]});
            p.dir.set_client_keys(&p.admin, &p.app, jwks)
        }),
        ("record_certificate", |p| {
            let issued = IssuedCertificate {
                serial: "0b".into(),
                not_after: u64::MAX / 2,
                revoked: false,
                issuer: None,
            };
            p.dir.record_certificate(&p.admin, &p.app, issued)
        }),
        ("revoke_certificate", |p| {
            p.dir.revoke_certificate(&p.admin, &p.app, "0a")
        }),
        ("create_role", |p| {
            let actions = ["twinguard/audit/read".to_owned()];
            p.dir
                .create_role(&p.admin, "another", "", &actions)
                .map(|_| ())
        }),
        ("delete_role", |p| p.dir.delete_role(&p.admin, &p.role)),
        ("assign", |p| {
            p.dir
                .assign(&p.admin, &p.plain.subject, DATA_READER, Scope::Instance)
                .map(|_| ())
        }),
        ("unassign", |p| p.dir.unassign(&p.admin, &p.assignment)),
        ("create_api_key", |p| {
            p.dir
                .create_api_key(&p.admin, api_key_for(&p.app))
                .map(|_| ())
        }),
        ("rotate_api_key", |p| {
            p.dir.rotate_api_key(&p.admin, &p.api_key, None).map(|_| ())
        }),
        ("revoke_api_key", |p| {
            p.dir.revoke_api_key(&p.admin, &p.api_key).map(|_| ())
        }),
        ("begin_totp", |p| {
            p.dir
                .begin_totp(&p.plain, LOCAL, None, "twinguard")
                .map(|_| ())
        }),
        ("confirm_totp", |p| {
            let code = totp_code(&p.enrolling_secret);
            p.dir.confirm_totp(&p.enrolling, LOCAL, &code).map(|_| ())
        }),
        ("change_own_password", |p| {
            p.dir
                .change_own_password(&p.plain, LOCAL, PASSWORD, "another long password")
        }),
        ("a login with a recovery code", |p| {
            p.dir
                .authenticate_user(LOCAL, "enrolled", PASSWORD, Some(&p.recovery_code))
                .map(|_| ())
                .map_err(DomainError::from)
        }),
    ]
}

/// What requests read of the directory, on their own thread: whether each was answered.
fn read_everything(p: &Plant) -> mpsc::Receiver<()> {
    let (done, answered) = mpsc::channel();
    let (dir, admin, secret) = (p.dir.clone(), p.admin.clone(), p.admin_secret.clone());
    std::thread::spawn(move || {
        assert!(dir.principal(&admin.subject, false, 0, 0).is_some());
        assert!(dir.identities(&admin).is_ok());
        assert!(dir.roles().is_ok());
        assert!(dir.api_keys(&admin).is_ok());
        assert!(
            dir.authenticate_client(LOCAL, &admin.subject, &secret)
                .is_ok()
        );
        let _ = done.send(());
    });
    answered
}

/// Lets the store's commits through however the test ends, so no thread is left waiting.
struct Release(Arc<StallingStore>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[test]
fn every_edit_lets_requests_read_the_directory_while_its_commit_waits_for_the_store() {
    let mut waited = Vec::new();
    for (name, edit) in edits() {
        let plant = Arc::new(plant());
        plant.store.stall();
        let _release = Release(plant.store.clone());
        let editing = plant.clone();
        let editor = std::thread::spawn(move || edit(&editing));
        assert!(
            plant.store.wait_for_held(1, Duration::from_secs(10)),
            "{name}: no commit reached the store"
        );
        let reads = read_everything(&plant);
        if reads.recv_timeout(Duration::from_secs(5)).is_err() {
            waited.push(name);
        }
        plant.store.release();
        let result = editor.join().unwrap();
        assert!(result.is_ok(), "{name}: {result:?}");
    }
    assert!(
        waited.is_empty(),
        "readers waited for the store with these edits: {waited:?}"
    );
}

/// While one edit waits for the store, another is refused when its wait for its turn is over,
/// rather than holding its thread for as long as the store holds the first.
#[test]
fn an_edit_behind_one_waiting_for_the_store_gives_up_after_its_wait() {
    let plant = Arc::new(plant());
    plant.store.stall();
    let _release = Release(plant.store.clone());
    let first = plant.clone();
    let editor =
        std::thread::spawn(move || first.dir.reset_mfa(&first.admin, &first.enrolled.subject));
    assert!(plant.store.wait_for_held(1, Duration::from_secs(10)));
    let (done, second) = mpsc::channel();
    let other = plant.clone();
    std::thread::spawn(move || {
        let _ = done.send(
            other
                .dir
                .rotate_client_secret(&other.admin, &other.app)
                .map(|_| ()),
        );
    });
    let refused = second
        .recv_timeout(crate::edit::EDIT_WAIT + Duration::from_secs(5))
        .expect("the second edit waited past its bound");
    assert!(
        matches!(refused, Err(DomainError::Unavailable)),
        "{refused:?}"
    );
    assert!(
        !plant.store.wait_for_held(2, Duration::ZERO),
        "it never reached the store"
    );
    plant.store.release();
    assert!(editor.join().unwrap().is_ok());
}

/// The follower of other nodes' changes hands every owner its keys on one thread: while an
/// edit of this node waits for the store, the directory hands its keys back at once, to be
/// read at the next step, rather than holding the follower (and the other owners' changes,
/// such as revocations) behind the edit.
#[test]
fn the_follower_is_handed_its_keys_back_while_an_edit_waits_for_the_store() {
    use crate::follow::Follower;

    let plant = Arc::new(plant());
    plant.store.stall();
    let _release = Release(plant.store.clone());
    let editing = plant.clone();
    let editor = std::thread::spawn(move || {
        editing
            .dir
            .reset_mfa(&editing.admin, &editing.enrolled.subject)
    });
    assert!(plant.store.wait_for_held(1, Duration::from_secs(10)));
    let (done, followed) = mpsc::channel();
    let following = plant.clone();
    std::thread::spawn(move || {
        let keys = [following.plain.subject.clone()];
        let _ = done.send(following.dir.changed(Table::Identities, &keys));
    });
    let handed_back = followed
        .recv_timeout(Duration::from_secs(2))
        .expect("the follower waited for the edit");
    assert_eq!(
        handed_back.unwrap(),
        std::slice::from_ref(&plant.plain.subject)
    );
    plant.store.release();
    assert!(editor.join().unwrap().is_ok());
    // With the turn free, the keys are taken.
    let taken = plant.dir.changed(
        Table::Identities,
        std::slice::from_ref(&plant.plain.subject),
    );
    assert!(taken.unwrap().is_empty());
}
