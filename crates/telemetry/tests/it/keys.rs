//! Device key rotation (control DI-3, issue 20 scope item 5): a device gets a new key while it
//! sends, the old one is believed until its overlap ends, and at every decision a message is
//! believed exactly when the registry holds the key that signed it.

use std::sync::{Condvar, Mutex};
use std::thread::ThreadId;

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use serde_json::json;
use twinguard_core::auth::{DATA_OWNER, Principal};
use twinguard_core::error::DomainError;
use twinguard_telemetry::envelope::{DeviceKey, sign_cose, signing_key_from_pem};
use twinguard_telemetry::manage::{MAX_KEY_OVERLAP_SECONDS, NewDevice, NewKey, StatusChange};
use twinguard_telemetry::registry::Device;
use twinguard_telemetry::{Outcome, Transport, Verdict};

use crate::pipeline::Plant;

/// Holds the second clock read of one thread (see `TestClock::pause`).
#[derive(Default)]
pub(crate) struct Pause {
    state: Mutex<PauseState>,
    changed: Condvar,
}

#[derive(Default)]
struct PauseState {
    armed: bool,
    /// The first thread to read the clock after arming.
    thread: Option<ThreadId>,
    holding: bool,
}

impl Pause {
    pub(crate) fn arm(&self) {
        *self.state.lock().unwrap() = PauseState {
            armed: true,
            ..Default::default()
        };
    }

    pub(crate) fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        if !state.armed {
            return;
        }
        let me = std::thread::current().id();
        match state.thread {
            None => state.thread = Some(me),
            Some(first) if first == me => {
                state.holding = true;
                self.changed.notify_all();
                while state.armed {
                    state = self.changed.wait(state).unwrap();
                }
                state.holding = false;
            }
            Some(_) => {}
        }
    }

    pub(crate) fn holding(&self) -> bool {
        self.state.lock().unwrap().holding
    }

    pub(crate) fn release(&self) {
        self.state.lock().unwrap().armed = false;
        self.changed.notify_all();
    }
}

pub(crate) fn public(key: &SigningKey) -> DeviceKey {
    DeviceKey::from_bytes(key.verifying_key().as_bytes()).unwrap()
}

fn generated(overlap_seconds: u64) -> NewKey {
    NewKey {
        public_key: None,
        generate: true,
        overlap_seconds,
    }
}

pub(crate) fn given(key: &SigningKey, overlap_seconds: u64) -> NewKey {
    NewKey {
        public_key: Some(public(key).to_jwk()),
        generate: false,
        overlap_seconds,
    }
}

/// Rotates `t1` to a key made by the registry; returns the device record and the new key.
pub(crate) async fn rotate(plant: &Plant, overlap_seconds: u64) -> (Device, SigningKey) {
    let rotated = plant
        .telemetry
        .rotate_device_key(&plant.admin, "t1", generated(overlap_seconds))
        .await
        .unwrap();
    let pem = rotated.private_key.unwrap();
    (rotated.device, signing_key_from_pem(pem.as_str()).unwrap())
}

/// A new message of `t1` (next sequence number, the clock's time) signed with `key`.
fn signed(plant: &mut Plant, key: &SigningKey, value: f64) -> Vec<u8> {
    let message = plant.message("t1", "temperature", json!(value));
    sign_cose(&message, key)
}

async fn answer(
    plant: &mut Plant,
    key: &SigningKey,
    value: f64,
) -> (Verdict, Option<&'static str>) {
    let bytes = signed(plant, key, value);
    let outcome = plant.send(bytes).await;
    (outcome.status, outcome.reason)
}

const ACCEPTED: (Verdict, Option<&str>) = (Verdict::Accepted, None);
const BAD_SIGNATURE: (Verdict, Option<&str>) = (Verdict::Rejected, Some("bad_signature"));

#[tokio::test]
async fn a_rotated_key_overlaps_the_old_one_until_its_time_and_one_replay_window_spans_both() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let old = plant.keys["t1"].clone();
    assert_eq!(answer(&mut plant, &old, 1.0).await, ACCEPTED);

    let (device, new) = rotate(&plant, 3600).await;
    assert_eq!(device.key_thumbprint, public(&new).thumbprint());
    let previous = device.previous_key.clone().unwrap();
    assert_eq!(previous.key_thumbprint, public(&old).thumbprint());
    assert_eq!(previous.until, "2027-01-15T09:00:00Z");
    assert_eq!(plant.telemetry.device(&plant.admin, "t1").unwrap(), device);

    // During the overlap both keys are believed, in one batch too.
    assert_eq!(answer(&mut plant, &old, 2.0).await, ACCEPTED);
    assert_eq!(answer(&mut plant, &new, 3.0).await, ACCEPTED);
    let batch = vec![
        signed(&mut plant, &new, 4.0),
        signed(&mut plant, &old, 5.0),
        signed(&mut plant, &new, 6.0),
    ];
    let outcomes = plant
        .telemetry
        .ingest(batch, Transport::Mqtt)
        .await
        .unwrap();
    assert!(
        outcomes.iter().all(|o| o.status == Verdict::Accepted),
        "{outcomes:?}"
    );

    // The replay window is the device's: a message the old key signed and the registry
    // accepted, signed again with the new key, is the same message.
    let message = plant.message("t1", "temperature", json!(7.0));
    let by_old = plant.send(sign_cose(&message, &old)).await;
    assert_eq!(by_old.status, Verdict::Accepted);
    let by_new = plant.send(sign_cose(&message, &new)).await;
    assert_eq!(
        (by_new.status, by_new.reason),
        (Verdict::Rejected, Some("replay"))
    );

    // The overlap ends at its instant: the old key is refused as any wrong key is.
    plant.advance(3599);
    assert_eq!(answer(&mut plant, &old, 8.0).await, ACCEPTED);
    plant.advance(1);
    assert_eq!(answer(&mut plant, &old, 9.0).await, BAD_SIGNATURE);
    assert_eq!(answer(&mut plant, &new, 10.0).await, ACCEPTED);
    assert_eq!(plant.twin()["temperature"], json!(10.0));

    // The registry as a restart reads it believes the same.
    let reopened = plant.reopen();
    let bytes = signed(&mut plant, &old, 11.0);
    let outcome = reopened
        .ingest(vec![bytes], Transport::Https)
        .await
        .unwrap();
    assert_eq!(outcome[0].reason, Some("bad_signature"));
}

#[tokio::test]
async fn a_rotation_without_overlap_refuses_the_old_key_at_once_and_retiring_ends_an_overlap() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let k1 = plant.keys["t1"].clone();

    // A key the device made itself, its public half given; no overlap: a leaked key.
    let k2 = SigningKey::from_bytes(&[42; 32]);
    let rotated = plant
        .telemetry
        .rotate_device_key(&plant.admin, "t1", given(&k2, 0))
        .await
        .unwrap();
    assert!(rotated.private_key.is_none());
    assert!(rotated.device.previous_key.is_none());
    assert_eq!(answer(&mut plant, &k1, 1.0).await, BAD_SIGNATURE);
    assert_eq!(answer(&mut plant, &k2, 2.0).await, ACCEPTED);

    // A rotation during an overlap ends the older key's at once: one previous key at most.
    let (_, k3) = rotate(&plant, 600).await;
    let (device, k4) = rotate(&plant, 600).await;
    assert_eq!(
        device.previous_key.unwrap().key_thumbprint,
        public(&k3).thumbprint()
    );
    assert_eq!(answer(&mut plant, &k2, 3.0).await, BAD_SIGNATURE);
    assert_eq!(answer(&mut plant, &k3, 4.0).await, ACCEPTED);
    assert_eq!(answer(&mut plant, &k4, 5.0).await, ACCEPTED);

    // Retiring the previous key ends the overlap now; a second time changes nothing.
    let retired = plant
        .telemetry
        .retire_previous_key(&plant.admin, "t1")
        .await
        .unwrap();
    assert!(retired.previous_key.is_none());
    assert_eq!(answer(&mut plant, &k3, 6.0).await, BAD_SIGNATURE);
    assert_eq!(answer(&mut plant, &k4, 7.0).await, ACCEPTED);
    let again = plant
        .telemetry
        .retire_previous_key(&plant.admin, "t1")
        .await
        .unwrap();
    assert_eq!(again, retired);

    // A rollback to the previous key during its overlap is a rotation like any other.
    let (_, k5) = rotate(&plant, 600).await;
    let back = plant
        .telemetry
        .rotate_device_key(&plant.admin, "t1", given(&k4, 0))
        .await
        .unwrap();
    assert_eq!(back.device.key_thumbprint, public(&k4).thumbprint());
    assert_eq!(answer(&mut plant, &k5, 8.0).await, BAD_SIGNATURE);
    assert_eq!(answer(&mut plant, &k4, 9.0).await, ACCEPTED);
}

/// Two rotations on one node to one key, the second landing while the first reads its
/// device's record: the first is refused, so the key stays with one device. The check that no
/// other device holds the key runs under the lock that queues the change; made before the
/// read, it passed for both and two devices held one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rotations_on_one_node_to_one_key_give_it_to_one_device() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    plant.device("t2", &["temperature"]).await;
    let key = SigningKey::from_bytes(&[9; 32]);
    let (telemetry, admin) = (plant.telemetry.clone(), plant.admin.clone());
    let runtime = tokio::runtime::Handle::current();
    let during = std::sync::Arc::new(Mutex::new(None));
    plant.store.run_during_next_read({
        let (key, during) = (key.clone(), during.clone());
        move || {
            let rotated =
                runtime.block_on(telemetry.rotate_device_key(&admin, "t2", given(&key, 0)));
            *during.lock().unwrap() = Some(rotated.map(|r| r.device.key_thumbprint));
        }
    });
    let first = plant
        .telemetry
        .rotate_device_key(&plant.admin, "t1", given(&key, 0))
        .await;
    let second = during.lock().unwrap().take().expect("the hook ran");
    assert_eq!(second.unwrap(), public(&key).thumbprint());
    assert!(
        matches!(first, Err(DomainError::Conflict(_))),
        "t1 took the key t2 holds: {first:?}"
    );
    let holders: Vec<String> = plant
        .telemetry
        .devices(&plant.admin)
        .unwrap()
        .into_iter()
        .filter(|d| d.key_thumbprint == public(&key).thumbprint())
        .map(|d| d.id)
        .collect();
    assert_eq!(holders, ["t2"]);
}

#[tokio::test]
async fn a_rotation_that_would_share_a_key_revive_a_revoked_device_or_exceed_its_bounds_is_refused()
{
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    plant.device("t2", &["temperature"]).await;
    let t2_first = plant.keys["t2"].clone();
    let rotated = plant
        .telemetry
        .rotate_device_key(&plant.admin, "t2", generated(600))
        .await
        .unwrap();
    let t2_now = signing_key_from_pem(rotated.private_key.unwrap().as_str()).unwrap();
    let before = plant.telemetry.device(&plant.admin, "t1").unwrap();
    let t1_key = plant.keys["t1"].clone();

    let conflict = |r: Result<_, DomainError>| matches!(r, Err(DomainError::Conflict(_)));
    let (telemetry, admin) = (plant.telemetry.clone(), plant.admin.clone());
    let rotation = |key: NewKey| {
        let (telemetry, admin) = (telemetry.clone(), admin.clone());
        async move { telemetry.rotate_device_key(&admin, "t1", key).await }
    };
    // Another device's key, current or previous, and the device's own current key.
    assert!(conflict(rotation(given(&t2_now, 0)).await));
    assert!(conflict(rotation(given(&t2_first, 0)).await));
    assert!(conflict(rotation(given(&t1_key, 600)).await));
    // A new device may not register a key another device still holds as its previous one.
    let taken = plant
        .telemetry
        .register_device(
            &plant.admin,
            "t3",
            NewDevice {
                public_key: Some(public(&t2_first).to_jwk()),
                generate: false,
                device_model: "thermo-1".into(),
                bindings: vec![],
            },
        )
        .await;
    assert!(matches!(taken, Err(DomainError::Conflict(_))));
    // Bounds, the body's either-or, the role, an absent device.
    let too_long = rotation(generated(MAX_KEY_OVERLAP_SECONDS + 1)).await;
    assert!(matches!(too_long, Err(DomainError::InvalidArgument(_))));
    let both = NewKey {
        public_key: Some(public(&SigningKey::from_bytes(&[7; 32])).to_jwk()),
        generate: true,
        overlap_seconds: 0,
    };
    assert!(matches!(
        rotation(both).await,
        Err(DomainError::InvalidArgument(_))
    ));
    let owner = Principal::with_roles("owner", &[DATA_OWNER]);
    let forbidden = plant
        .telemetry
        .rotate_device_key(&owner, "t1", generated(0))
        .await;
    assert!(
        matches!(forbidden, Err(DomainError::Forbidden { .. })),
        "{forbidden:?}"
    );
    let retire = plant.telemetry.retire_previous_key(&owner, "t2").await;
    assert!(matches!(retire, Err(DomainError::Forbidden { .. })));
    let absent = plant
        .telemetry
        .rotate_device_key(&plant.admin, "t9", generated(0))
        .await;
    assert!(matches!(absent, Err(DomainError::NotFound { .. })));
    // Nothing refused changed the device.
    assert_eq!(plant.telemetry.device(&plant.admin, "t1").unwrap(), before);
    assert_eq!(answer(&mut plant, &t1_key, 1.0).await, ACCEPTED);

    // A revoked device stays revoked: no new key brings it back.
    plant.set_status("t1", StatusChange::Revoke).await.unwrap();
    assert!(conflict(rotation(generated(0)).await));
    let retire = plant
        .telemetry
        .retire_previous_key(&plant.admin, "t1")
        .await;
    assert!(matches!(retire, Err(DomainError::Conflict(_))));
    assert_eq!(
        answer(&mut plant, &t1_key, 2.0).await,
        (Verdict::Rejected, Some("revoked"))
    );
}

/// Sends a new message of `t1` signed with `key` on a task of its own, and returns once the
/// batch waits in the clock read before its decision (its signature checked).
async fn held(plant: &mut Plant, key: &SigningKey) -> tokio::task::JoinHandle<Outcome> {
    let bytes = signed(plant, key, 20.0);
    plant.clock.pause();
    let telemetry = plant.telemetry.clone();
    let sending = tokio::spawn(async move {
        telemetry
            .ingest(vec![bytes], Transport::Https)
            .await
            .unwrap()
            .remove(0)
    });
    let started = std::time::Instant::now();
    while !plant.clock.paused() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the batch never reached its decision"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    sending
}

/// The race the decision under the lock closes: a message's signature is checked without the
/// lock, with the keys the registry held when its batch began. The batch is held between that
/// check and its decision (in the clock read that precedes the decision) while the key is
/// rotated out with no overlap, or the device suspended; the message is then refused. Without
/// the check at the decision, both would be accepted after the change was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_out_or_a_device_suspended_while_its_message_is_checked_refuses_it() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let old = plant.keys["t1"].clone();

    let outcome = |o: Outcome| (o.status, o.reason);

    let sending = held(&mut plant, &old).await;
    let (_, new) = rotate(&plant, 0).await;
    plant.clock.resume();
    assert_eq!(outcome(sending.await.unwrap()), BAD_SIGNATURE);

    let sending = held(&mut plant, &new).await;
    plant.set_status("t1", StatusChange::Suspend).await.unwrap();
    plant.clock.resume();
    assert_eq!(
        outcome(sending.await.unwrap()),
        (Verdict::Rejected, Some("suspended"))
    );

    // Held the same way with nothing changed, the message is accepted: the hold itself
    // refuses nothing.
    plant.set_status("t1", StatusChange::Resume).await.unwrap();
    let sending = held(&mut plant, &new).await;
    plant.clock.resume();
    assert_eq!(outcome(sending.await.unwrap()), ACCEPTED);
}

/// One step of a generated key history.
#[derive(Debug, Clone)]
enum Step {
    /// Rotate to a new key with this overlap, in seconds.
    Rotate(u64),
    Retire,
    Advance(i64),
    /// One batch of messages, each signed with the key of this index (modulo the keys made).
    Send(Vec<usize>),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        prop_oneof![Just(0u64), Just(10), Just(100)].prop_map(Step::Rotate),
        Just(Step::Retire),
        (1i64..150).prop_map(Step::Advance),
        prop::collection::vec(0usize..8, 1..5).prop_map(Step::Send),
    ];
    prop::collection::vec(step, 1..24)
}

/// Runs `steps` against the registry and a model of it (the current key, and the previous
/// one with the instant it ends): every message is accepted exactly when the model holds the
/// key that signed it, and refused as a bad signature otherwise.
async fn check(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let mut keys = vec![plant.keys["t1"].clone()];
    // A key the device never held, always refused.
    keys.push(SigningKey::from_bytes(&[3; 32]));
    let mut current = 0usize;
    let mut previous: Option<(usize, i64)> = None;
    for step in steps {
        match step {
            Step::Rotate(overlap) => {
                let (_, key) = rotate(&plant, overlap).await;
                previous = (overlap > 0).then(|| (current, plant.now_ms() + overlap as i64 * 1000));
                keys.push(key);
                current = keys.len() - 1;
            }
            Step::Retire => {
                plant
                    .telemetry
                    .retire_previous_key(&plant.admin, "t1")
                    .await
                    .unwrap();
                previous = None;
            }
            Step::Advance(seconds) => plant.advance(seconds),
            Step::Send(signers) => {
                let signers: Vec<usize> = signers.iter().map(|i| i % keys.len()).collect();
                let batch = signers
                    .iter()
                    .map(|i| signed(&mut plant, &keys[*i], 20.0))
                    .collect();
                let outcomes = plant
                    .telemetry
                    .ingest(batch, Transport::Mqtt)
                    .await
                    .unwrap();
                let now = plant.now_ms();
                for (signer, outcome) in signers.iter().zip(outcomes) {
                    let believed = *signer == current
                        || previous.is_some_and(|(k, until)| k == *signer && now < until);
                    let expected = if believed { ACCEPTED } else { BAD_SIGNATURE };
                    prop_assert_eq!(
                        (outcome.status, outcome.reason),
                        expected,
                        "key {} of {}, current {}, previous {:?}",
                        signer,
                        keys.len(),
                        current,
                        previous
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_message_is_believed_exactly_when_the_registry_holds_its_key_at_the_decision(
        steps in steps()
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(check(steps))?;
    }
}
