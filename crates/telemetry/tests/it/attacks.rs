//! The telemetry attacks of the review of 2026-12 (issue 18), each acting as the attacker did
//! against `2eec417`, and the tests that close their classes: time is not a weapon, fusion
//! counts agreement, the detector cannot be trained by an attacker, a review cannot launder a
//! reading, and a device's quarantine has a quota.

use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use serde_json::{Value, json};
use twinguard_core::auth::{OPERATOR, Principal};
use twinguard_telemetry::envelope::{Reading, sign_cose};
use twinguard_telemetry::ingest::QUARANTINE_QUOTA;
use twinguard_telemetry::manage::{Decision, HistoryQuery};
use twinguard_telemetry::policy::Policy;
use twinguard_telemetry::records::HistoryEntry;
use twinguard_telemetry::registry::Binding;
use twinguard_telemetry::service::TelemetryEvent;
use twinguard_telemetry::{Outcome, Verdict};

use super::pipeline::{Plant, group};

const MINUTE_MS: i64 = 60_000;

/// Limits and a rate of change of 1 °C/s on the boilers' temperature.
async fn rate_policy(plant: &Plant) {
    let policy: Policy = serde_json::from_value(json!({
        "model": "dtmi:test:Boiler;1", "property": "temperature",
        "min": -40.0, "max": 150.0, "maxRatePerSecond": 1.0
    }))
    .unwrap();
    plant
        .telemetry
        .put_policy(&plant.admin, "boiler-temp", policy)
        .await
        .unwrap();
}

/// Sends one reading of `value` for `device` measured at `time_ms`, in a message stamped
/// `message_ms`.
async fn dated(
    plant: &mut Plant,
    device: &str,
    value: f64,
    message_ms: i64,
    time_ms: i64,
) -> Outcome {
    let mut m = plant.message(device, "temperature", json!(value));
    m.time = message_ms;
    m.readings[0].time = Some(time_ms);
    let bytes = plant.cose(&m);
    plant.send(bytes).await
}

fn history_of(plant: &Plant, twin: &str, name: &str) -> Vec<HistoryEntry> {
    plant
        .telemetry
        .history(
            &plant.admin,
            twin,
            name,
            HistoryQuery {
                from_ms: 0,
                to_ms: i64::MAX,
                interval_ms: None,
                limit: 10_000,
            },
        )
        .unwrap()
        .readings
        .unwrap_or_default()
}

fn temperature(plant: &Plant) -> Value {
    plant.twin()["temperature"].clone()
}

#[tokio::test]
async fn a_backdated_reading_neither_moves_the_twin_nor_opens_the_rate_limit() {
    // Finding 1: a reading a year old was accepted, became the stream's last reading, and the
    // jump "now" that followed was measured against it over a year, so it passed.
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    rate_policy(&plant).await;
    assert_eq!(
        plant.reading("t1", "temperature", json!(21.1)).await.status,
        Verdict::Accepted
    );
    for (age_ms, late) in [
        (365 * 24 * 60 * MINUTE_MS, false), // beyond the backfill limit: held for its time
        (60 * MINUTE_MS, true),             // within it: history only, marked late
        (6 * MINUTE_MS, true),
    ] {
        plant.advance(2);
        let now = plant.now_ms();
        let back = dated(&mut plant, "t1", 85.0, now, now - age_ms - 2_000).await;
        let reading = &back.readings[0];
        if late {
            assert_eq!(reading.status, Verdict::Accepted, "{age_ms}: {back:?}");
            assert!(reading.late, "{age_ms}: {back:?}");
        } else {
            assert_eq!(reading.reasons, vec!["reading_time"], "{age_ms}");
        }
        assert_eq!(temperature(&plant), json!(21.1), "{age_ms}");
        plant.advance(1);
        let jump = plant.reading("t1", "temperature", json!(85.0)).await;
        assert_eq!(
            jump.readings[0].reasons,
            vec!["rate_of_change"],
            "after a reading {age_ms} ms old the jump was {jump:?}"
        );
        assert_eq!(temperature(&plant), json!(21.1), "{age_ms}");
    }
    // Fresh but measured before the stream's last accepted reading: late as well.
    plant.advance(1);
    plant.reading("t1", "temperature", json!(21.2)).await;
    let now = plant.now_ms();
    let before = dated(&mut plant, "t1", 21.3, now, now - 1_000).await;
    assert!(before.readings[0].late, "{before:?}");
    assert_eq!(temperature(&plant), json!(21.2));
    // The late readings are in the history, marked late; the held ones are not.
    let history = history_of(&plant, "boiler-1", "temperature");
    assert_eq!(history.iter().filter(|h| h.late).count(), 3);
    let values = |late: bool| -> Vec<Value> {
        let picked = history.iter().filter(|h| h.late == late);
        picked.map(|h| h.value.clone()).collect()
    };
    assert_eq!(values(true), vec![json!(85.0), json!(85.0), json!(21.3)]);
    assert_eq!(values(false), vec![json!(21.1), json!(21.2)]);
}

#[tokio::test]
async fn a_future_dated_reading_cannot_stretch_the_rate_limit() {
    // A message stamped four minutes ahead (inside the clock-skew window) with a reading five
    // seconds after it: measured against the last reading over 245 s, a jump of 64 °C passed a
    // limit of 1 °C/s. Judged at its arrival, it is a jump in one second.
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    rate_policy(&plant).await;
    plant.reading("t1", "temperature", json!(21.1)).await;
    plant.advance(1);
    let ahead = plant.now_ms() + 4 * MINUTE_MS;
    let out = dated(&mut plant, "t1", 85.0, ahead, ahead + 5_000).await;
    assert_eq!(out.readings[0].reasons, vec!["rate_of_change"], "{out:?}");
    assert_eq!(temperature(&plant), json!(21.1));
}

#[tokio::test]
async fn a_future_time_does_not_keep_a_member_fresh() {
    // Members a and b honest, c stamps its readings four minutes ahead. Once b and c have been
    // silent past the group's 30 s, a alone is no quorum, whatever time c claimed.
    let mut plant = Plant::new().await;
    for d in ["a", "b", "c"] {
        plant.device(d, &["temperature"]).await;
    }
    plant
        .telemetry
        .put_group(&plant.admin, "g", group(&["a", "b", "c"]))
        .await
        .unwrap();
    for _ in 0..5 {
        plant.reading("a", "temperature", json!(21.0)).await;
        plant.reading("b", "temperature", json!(21.0)).await;
        let ahead = plant.now_ms() + 4 * MINUTE_MS;
        dated(&mut plant, "c", 21.5, ahead, ahead).await;
        plant.advance(1);
    }
    assert_eq!(plant.twin()["$metadata"]["temperature"]["quality"], "good");
    plant.advance(40);
    plant.reading("a", "temperature", json!(21.0)).await;
    let meta = &plant.twin()["$metadata"]["temperature"];
    assert_eq!(meta["quality"], "estimated", "{meta}");
}

#[tokio::test]
async fn one_liar_with_another_member_silent_cannot_move_a_group() {
    // Finding 2: b silent, c lying (and backdating): the two fresh members made a "quorum" by
    // freshness alone and their median, 53, was shown (as suspect). A value needs agreement.
    let mut plant = Plant::new().await;
    for d in ["a", "b", "c"] {
        plant.device(d, &["temperature"]).await;
    }
    plant
        .telemetry
        .put_group(&plant.admin, "g", group(&["a", "b", "c"]))
        .await
        .unwrap();
    for _ in 0..10 {
        for d in ["a", "b", "c"] {
            plant.reading(d, "temperature", json!(21.1)).await;
        }
        plant.advance(1);
    }
    plant.advance(31); // b falls silent
    for step in 0..20 {
        plant.reading("a", "temperature", json!(21.1)).await;
        let now = plant.now_ms();
        let lie = if step % 2 == 0 {
            plant.reading("c", "temperature", json!(85.0)).await
        } else {
            dated(&mut plant, "c", 85.0, now, now - 500).await
        };
        assert_ne!(lie.status, Verdict::Rejected);
        let shown = temperature(&plant).as_f64().unwrap();
        assert!(
            (shown - 21.1).abs() <= 1.0,
            "step {step}: the liar moved the twin to {shown}"
        );
        let meta = &plant.twin()["$metadata"]["temperature"];
        assert_eq!(meta["quality"], "estimated", "{meta}");
        plant.advance(1);
    }
}

#[tokio::test]
async fn one_signed_batch_cannot_fill_the_quarantine() {
    // Finding 3: one signed 2 MB batch naming an unbound twin created 15,360 quarantine
    // records in 0.3 s. Now a device has a quota of held readings; beyond it the readings that
    // would be held are refused (not stored), the device is flagged once, and that is audited.
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    let events = Arc::new(Mutex::new(Vec::<TelemetryEvent>::new()));
    let sink = events.clone();
    plant
        .telemetry
        .set_audit_sink(move |e| sink.lock().unwrap().push(e));
    let mut held = 0;
    let mut refused = 0;
    for _ in 0..5 {
        let mut m = plant.message("t1", "temperature", json!(1.0));
        m.readings = (0..256)
            .map(|i| Reading {
                name: "temperature".into(),
                value: json!(f64::from(i)),
                twin: Some("boiler-2".into()),
                time: None,
            })
            .collect();
        let bytes = plant.cose(&m);
        let out = plant.send(bytes).await;
        for r in &out.readings {
            match r.status {
                Verdict::Quarantined => held += 1,
                Verdict::Rejected => {
                    assert_eq!(
                        r.reasons.last().map(String::as_str),
                        Some("quarantine_quota")
                    );
                    refused += 1;
                }
                Verdict::Accepted => panic!("an unbound reading was accepted"),
            }
        }
    }
    assert_eq!(held, QUARANTINE_QUOTA);
    assert_eq!(refused, 5 * 256 - QUARANTINE_QUOTA);
    assert_eq!(plant.pending().len() as u64, QUARANTINE_QUOTA);
    let device = plant.telemetry.device(&plant.admin, "t1").unwrap();
    assert!(device.quarantine_full.is_some());
    let audited = events.lock().unwrap().clone();
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(
        (audited[0].event, audited[0].device.as_str()),
        ("device.quarantineFull", "t1")
    );
    // Its good readings still flow; a review makes room for one more held reading.
    plant.advance(1);
    let good = plant.reading("t1", "temperature", json!(20.0)).await;
    assert_eq!(good.status, Verdict::Accepted);
    let unbound = |plant: &mut Plant| {
        let mut m = plant.message("t1", "temperature", json!(3.0));
        m.readings[0].twin = Some("boiler-2".into());
        plant.cose(&m)
    };
    let b = unbound(&mut plant);
    assert_eq!(plant.send(b).await.reason, Some("quarantine_quota"));
    let first = plant.pending()[0].id.clone();
    plant
        .telemetry
        .review(&plant.admin, &first, Decision::Discard)
        .await
        .unwrap();
    let b = unbound(&mut plant);
    assert_eq!(plant.send(b).await.status, Verdict::Quarantined);
    // The count is rebuilt from the store at a restart.
    let reopened = plant.reopen();
    plant.telemetry = reopened;
    let b = unbound(&mut plant);
    assert_eq!(plant.send(b).await.reason, Some("quarantine_quota"));
}

#[tokio::test]
async fn a_review_cannot_launder_a_reading() {
    // Finding 5: a device bound only to boiler-1's temperature (and a name the model does not
    // define) sent readings for boiler-2 and for the undefined name; an Operator, who may not
    // write twins, released both, and boiler-2 took the value as good.
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature", "bogus"]).await;
    let mut other = plant.message("t1", "temperature", json!(99.0));
    other.readings[0].twin = Some("boiler-2".into());
    let b = plant.cose(&other);
    assert_eq!(plant.send(b).await.readings[0].reasons, vec!["not_bound"]);
    let undefined = plant.reading("t1", "bogus", json!(1.0)).await;
    assert_eq!(undefined.readings[0].reasons, vec!["not_in_model"]);
    let pending = plant.pending();
    assert_eq!(pending.len(), 2);

    let operator = Principal::with_roles("operator", &[OPERATOR]);
    for q in &pending {
        for who in [&operator, &plant.admin] {
            let released = plant.telemetry.review(who, &q.id, Decision::Release).await;
            assert!(released.is_err(), "{} released {q:?}", who.subject);
        }
    }
    let boiler_2 = plant.twins.twin(&plant.admin, "boiler-2").unwrap();
    assert!(serde_json::to_value(boiler_2.json()).unwrap()["temperature"].is_null());
    assert!(history_of(&plant, "boiler-2", "temperature").is_empty());
    assert!(history_of(&plant, "boiler-1", "bogus").is_empty());
    // Discarding is what is left, and the Operator may do it.
    for q in &pending {
        plant
            .telemetry
            .review(&operator, &q.id, Decision::Discard)
            .await
            .unwrap();
    }
    assert!(plant.pending().is_empty());
}

#[tokio::test]
async fn a_release_checks_the_binding_as_it_is_now() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    rate_policy(&plant).await;
    plant.reading("t1", "temperature", json!(20.0)).await;
    plant.advance(1);
    plant.reading("t1", "temperature", json!(60.0)).await; // held: rate of change
    let id = plant.pending()[0].id.clone();
    plant
        .telemetry
        .set_bindings(
            &plant.admin,
            "t1",
            vec![Binding {
                twin: "boiler-1".into(),
                names: vec!["valve".into()],
            }],
        )
        .await
        .unwrap();
    let refused = plant
        .telemetry
        .review(&plant.admin, &id, Decision::Release)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(temperature(&plant), json!(20.0));
}

/// 400 readings of a steady stream, one a second.
async fn steady(plant: &mut Plant, device: &str, n: usize) {
    for i in 0..n {
        let v = 20.0 + (i as f64 * 0.3).sin();
        let out = plant.reading(device, "temperature", json!(v)).await;
        assert_eq!(out.status, Verdict::Accepted, "{i}: {out:?}");
        plant.advance(1);
    }
}

#[tokio::test]
async fn held_readings_never_train_the_detector_and_every_reading_is_scored() {
    // DI-6 as the review found it: after a score of 0.4 every score was 0 for 30 readings, and
    // held readings were learned. An attacker who got one spike held had 30 free readings.
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    steady(&mut plant, "t1", 400).await;
    for i in 0..40 {
        let out = plant.reading("t1", "temperature", json!(45.0)).await;
        let r = &out.readings[0];
        assert_eq!(r.status, Verdict::Quarantined, "spike {i}: {out:?}");
        assert!(
            r.reasons.iter().any(|x| x == "anomaly"),
            "spike {i}: {out:?}"
        );
        assert!(
            r.anomaly_score.is_some_and(|s| s >= 0.41),
            "spike {i}: {out:?}"
        );
        plant.advance(1);
    }
    assert_eq!(temperature(&plant).as_f64().map(|v| v < 22.0), Some(true));
    // The stream goes on as before: nothing of the spikes was learned.
    steady(&mut plant, "t1", 20).await;
}

#[tokio::test]
async fn the_detector_and_the_rate_limit_survive_a_restart() {
    // Detector state lost at a restart handed an attacker a fresh warmup, and the stream's
    // last reading with it: the first jump after a restart had nothing to be measured against.
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    rate_policy(&plant).await;
    steady(&mut plant, "t1", 400).await;
    assert!(plant.telemetry.checkpoint().await.unwrap() >= 1);
    plant.telemetry = plant.reopen();
    // Fast: the last reading before the restart is still what a jump is measured from.
    plant.advance(1);
    let jump = plant.reading("t1", "temperature", json!(21.0 + 30.0)).await;
    assert!(
        jump.readings[0]
            .reasons
            .iter()
            .any(|r| r == "rate_of_change"),
        "{jump:?}"
    );
    // Slow enough for the rate limit, far outside what the detector learned before it.
    plant.advance(100);
    let spike = plant.reading("t1", "temperature", json!(45.0)).await;
    assert_eq!(spike.readings[0].reasons, vec!["anomaly"], "{spike:?}");
}

#[tokio::test]
async fn a_message_from_an_unregistered_device_is_refused_and_stores_nothing() {
    let mut plant = Plant::new().await;
    plant.device("t1", &["temperature"]).await;
    plant.reading("t1", "temperature", json!(20.0)).await;
    let stranger = SigningKey::from_bytes(&[7; 32]);
    let m = plant.message("ghost", "temperature", json!(99.0));
    let out = plant.send(sign_cose(&m, &stranger)).await;
    assert_eq!(
        (out.status, out.reason),
        (Verdict::Rejected, Some("unknown_device"))
    );
    // The stranger claiming a registered device's name fails its signature.
    let m = plant.message("t1", "temperature", json!(99.0));
    let out = plant.send(sign_cose(&m, &stranger)).await;
    assert_eq!(out.reason, Some("bad_signature"));
    assert!(plant.pending().is_empty());
    assert_eq!(temperature(&plant), json!(20.0));
}
