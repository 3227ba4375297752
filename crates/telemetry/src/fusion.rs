//! N-version sensing (control DI-7): a property fed by a group of independent sensors shows the
//! group's fused value — the median of numbers, the majority of discrete values — and a member
//! that disagrees beyond the tolerance is marked suspect. With three members, one liar cannot
//! move the median outside the honest pair's range.

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
    /// Agreeing fresh members needed for a good value; defaults to a majority of the members.
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
        let quorum = self.quorum();
        if quorum == 0 || quorum > self.devices.len() {
            return Err("quorum must be between 1 and the number of devices".into());
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
    /// The fresh members that disagree.
    pub suspects: Vec<String>,
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
                    suspects: fresh.iter().map(|(d, _, _)| d.clone()).collect(),
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
    let sources: Vec<String> = sources.into_iter().map(|(d, _, _)| d.clone()).collect();
    let suspects: Vec<String> = suspects.into_iter().map(|(d, _, _)| d.clone()).collect();
    // A value that stands on an agreeing quorum is good; a dissenter is reported, not believed.
    let quality = if sources.len() >= group.quorum() {
        Quality::Good
    } else {
        Quality::Suspect
    };
    Fused {
        value: Some(value),
        quality,
        sources,
        suspects,
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
    fn two_fresh_members_that_disagree_are_suspect() {
        let g = group(Method::Median);
        let f = fuse(
            &g,
            &[r("a", json!(20.0), 100.0), r("b", json!(30.0), 100.0)],
            101.0,
        );
        assert_eq!(f.quality, Quality::Suspect);
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
