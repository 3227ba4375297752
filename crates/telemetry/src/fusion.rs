//! N-version sensing (control DI-7): a property fed by a group of independent sensors shows the
//! group's fused value — the median of numbers, the majority of discrete values — only when a
//! quorum of fresh members agrees with it (within the tolerance); a member that disagrees with
//! an agreeing quorum is marked suspect. Without an agreeing quorum the property shows its
//! estimate. With three members, one liar cannot move the twin beyond the tolerance around the
//! honest value, whatever the others' timing: with both honest members fresh the median stays in
//! their range, and with one of them silent the liar needs the honest one's agreement.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use twinguard_core::graph::Quality;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// For numbers: the median of the fresh members' latest readings.
    Median,
    /// For discrete values (booleans, strings, enum values, integers): the value most members
    /// report, if more than half of the fresh members report it.
    Majority,
}

/// A sensor group: the devices that feed one twin property together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SensorGroup {
    /// The group's ID (set from the URL).
    #[serde(default)]
    pub id: String,
    pub twin: String,
    pub property: String,
    /// The member devices (2 to 16).
    pub devices: Vec<String>,
    pub method: Method,
    /// Largest distance from the fused value a numeric member may report and still agree.
    #[serde(default)]
    pub tolerance: f64,
    /// Fresh members that must agree for the group to show a value: a majority of the members
    /// (the default) or more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
    /// Seconds a member's latest reading counts as fresh.
    #[serde(default = "default_fresh")]
    pub fresh_seconds: f64,
}

fn default_fresh() -> f64 {
    60.0
}

impl SensorGroup {
    pub fn quorum(&self) -> usize {
        self.quorum.unwrap_or(self.devices.len() / 2 + 1)
    }

    pub fn check_definition(&self) -> Result<(), String> {
        let mut unique = self.devices.clone();
        unique.sort();
        unique.dedup();
        if unique.len() != self.devices.len() || !(2..=16).contains(&self.devices.len()) {
            return Err("a group has 2 to 16 distinct devices".into());
        }
        if !self.tolerance.is_finite() || self.tolerance < 0.0 {
            return Err("tolerance must be a non-negative number".into());
        }
        if !self.fresh_seconds.is_finite() || self.fresh_seconds <= 0.0 {
            return Err("freshSeconds must be positive".into());
        }
        // A quorum below a majority would let a minority of the members decide the value
        // against the rest.
        let quorum = self.quorum();
        if quorum <= self.devices.len() / 2 || quorum > self.devices.len() {
            return Err(
                "quorum must be a majority of the devices, at most the number of devices".into(),
            );
        }
        Ok(())
    }
}

/// One member's latest reading: `(device, value, time_s)`.
pub type Latest = (String, Value, f64);

/// Whether a member's value agrees with the fused one.
type Agrees = Box<dyn Fn(&Value) -> bool>;

/// What the group says now.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    /// `None` when the group has lost quorum (too few fresh members, or no majority).
    pub value: Option<Value>,
    pub quality: Quality,
    /// The members whose readings agree with the fused value.
    pub sources: Vec<String>,
    /// The fresh members that disagree with a quorum that agrees.
    pub suspects: Vec<String>,
    /// Enough members are fresh, but too few of them agree for a value.
    pub disagreement: bool,
}

/// Fuses the members' latest readings `(device, value, time_s)` at `now_s`.
pub fn fuse(group: &SensorGroup, latest: &[Latest], now_s: f64) -> Fused {
    let fresh: Vec<&Latest> = latest
        .iter()
        .filter(|(device, _, t)| group.devices.contains(device) && now_s - t <= group.fresh_seconds)
        .collect();
    let lost = Fused {
        value: None,
        quality: Quality::Estimated,
        sources: Vec::new(),
        suspects: Vec::new(),
        disagreement: false,
    };
    if fresh.len() < group.quorum() {
        return lost;
    }
    let (value, agrees): (Value, Agrees) = match group.method {
        Method::Median => {
            let mut numbers: Vec<f64> = fresh.iter().filter_map(|(_, v, _)| v.as_f64()).collect();
            if numbers.is_empty() {
                return lost;
            }
            numbers.sort_by(f64::total_cmp);
            let n = numbers.len();
            let median = if n % 2 == 1 {
                numbers[n / 2]
            } else {
                (numbers[n / 2 - 1] + numbers[n / 2]) / 2.0
            };
            let tolerance = group.tolerance;
            (
                serde_json::Number::from_f64(median).map_or(Value::Null, Value::Number),
                Box::new(move |v: &Value| {
                    v.as_f64().is_some_and(|x| (x - median).abs() <= tolerance)
                }),
            )
        }
        Method::Majority => {
            let mut counts: Vec<(&Value, usize)> = Vec::new();
            for (_, v, _) in &fresh {
                match counts.iter_mut().find(|(c, _)| *c == v) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((v, 1)),
                }
            }
            let Some((winner, n)) = counts.into_iter().max_by_key(|(_, n)| *n) else {
                return lost;
            };
            if n * 2 <= fresh.len() {
                return Fused {
                    disagreement: true,
                    ..lost
                };
            }
            let winner = winner.clone();
            let expected = winner.clone();
            (winner, Box::new(move |v: &Value| *v == expected))
        }
    };
    let (sources, suspects): (Vec<&Latest>, Vec<&Latest>) =
        fresh.into_iter().partition(|(_, v, _)| agrees(v));
    // Only a value that stands on an agreeing quorum is shown. Without one nobody can tell the
    // liar from the honest, so no member is blamed and the twin falls back to its estimate: a
    // fresh member's agreement is what counts, never its mere freshness.
    if sources.len() < group.quorum() {
        return Fused {
            disagreement: true,
            ..lost
        };
    }
    Fused {
        value: Some(value),
        quality: Quality::Good,
        sources: sources.into_iter().map(|(d, _, _)| d.clone()).collect(),
        suspects: suspects.into_iter().map(|(d, _, _)| d.clone()).collect(),
        disagreement: false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn group(method: Method) -> SensorGroup {
        SensorGroup {
            id: "g".into(),
            twin: "boiler".into(),
            property: "temperature".into(),
            devices: vec!["a".into(), "b".into(), "c".into()],
            method,
            tolerance: 1.0,
            quorum: None,
            fresh_seconds: 60.0,
        }
    }

    fn r(d: &str, v: Value, t: f64) -> (String, Value, f64) {
        (d.into(), v, t)
    }

    #[test]
    fn one_lying_sensor_of_three_cannot_move_the_median_and_is_suspect() {
        let g = group(Method::Median);
        for lie in [1e6, -1e6, 80.0, 21.9 + 5.0] {
            let f = fuse(
                &g,
                &[
                    r("a", json!(21.0), 100.0),
                    r("b", json!(21.4), 100.0),
                    r("c", json!(lie), 100.0),
                ],
                101.0,
            );
            let v = f.value.unwrap().as_f64().unwrap();
            assert!((21.0..=21.4).contains(&v), "{lie} moved the value to {v}");
            assert_eq!(f.suspects, vec!["c".to_string()]);
            assert_eq!(f.quality, Quality::Good);
        }
    }

    #[test]
    fn a_group_without_quorum_has_no_value() {
        let g = group(Method::Median);
        let f = fuse(
            &g,
            &[r("a", json!(21.0), 100.0), r("b", json!(21.0), 10.0)],
            101.0,
        );
        assert_eq!(f.value, None);
        assert_eq!(f.quality, Quality::Estimated);
    }

    #[test]
    fn two_fresh_members_that_disagree_give_no_value_and_blame_nobody() {
        // The finding of 2026-12: with the third member silent, one honest and one liar made a
        // quorum by freshness and their median (53) was shown. Agreement is what counts now.
        let g = group(Method::Median);
        let f = fuse(
            &g,
            &[r("a", json!(21.1), 100.0), r("b", json!(85.0), 100.0)],
            101.0,
        );
        assert_eq!(f.value, None);
        assert_eq!(f.quality, Quality::Estimated);
        assert!(f.disagreement);
        assert!(f.suspects.is_empty());
        // Within the tolerance the pair agrees, and the value stays within it of either.
        let f = fuse(
            &g,
            &[r("a", json!(21.0), 100.0), r("b", json!(21.8), 100.0)],
            101.0,
        );
        assert_eq!(f.quality, Quality::Good);
        assert!((f.value.unwrap().as_f64().unwrap() - 21.0).abs() <= g.tolerance);
    }

    #[test]
    fn the_majority_wins_for_discrete_values() {
        let g = group(Method::Majority);
        let f = fuse(
            &g,
            &[
                r("a", json!("open"), 1.0),
                r("b", json!("open"), 1.0),
                r("c", json!("closed"), 1.0),
            ],
            2.0,
        );
        assert_eq!(f.value, Some(json!("open")));
        assert_eq!(f.suspects, vec!["c".to_string()]);
        let split = fuse(
            &g,
            &[r("a", json!(true), 1.0), r("b", json!(false), 1.0)],
            2.0,
        );
        assert_eq!(split.value, None);
    }

    #[test]
    fn readings_from_outsiders_are_ignored() {
        let g = group(Method::Median);
        let f = fuse(
            &g,
            &[
                r("a", json!(1.0), 1.0),
                r("b", json!(1.0), 1.0),
                r("mallory", json!(99.0), 1.0),
            ],
            2.0,
        );
        assert_eq!(f.value.unwrap().as_f64(), Some(1.0));
        assert!(f.suspects.is_empty());
    }
}
