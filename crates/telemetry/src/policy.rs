//! Validation policies (control DI-5): physical limits kept as their own resource per model and
//! property, so ontologies stay unmodified. A policy applies to every twin of its model and of
//! the models that extend it.

use serde::{Deserialize, Serialize};

/// Limits for one property (or telemetry) of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// The policy's ID (set from the URL).
    #[serde(default)]
    pub id: String,
    /// The DTMI of the model the policy applies to.
    pub model: String,
    /// The property or telemetry name.
    pub property: String,
    /// Lowest physically possible value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Highest physically possible value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The unit the limits are stated in (e.g. `degreeCelsius`); devices must send this unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Largest believable change per second between consecutive accepted readings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_per_second: Option<f64>,
    /// Seconds without an accepted reading after which the stream is stale and the twin falls
    /// back to a forecast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after_seconds: Option<f64>,
    /// Anomaly score at or above which a reading is held for review (default 0.41, the operating
    /// point NAB's optimiser chose for the detector; above 1.0 turns the detector's veto off for
    /// this property, though it still scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_threshold: Option<f64>,
}

/// The detector's operating point on NAB's standard profile (threshold 0.4077, docs/anomaly.md).
pub const DEFAULT_ANOMALY_THRESHOLD: f64 = 0.41;

/// Why a value broke a policy; the stable reason codes of quarantined readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    NotANumber,
    BelowMin,
    AboveMax,
    RateOfChange,
}

impl Violation {
    pub fn code(self) -> &'static str {
        match self {
            Self::NotANumber => "not_a_number",
            Self::BelowMin => "below_min",
            Self::AboveMax => "above_max",
            Self::RateOfChange => "rate_of_change",
        }
    }
}

impl Policy {
    /// Checks the policy's own consistency.
    pub fn check_definition(&self) -> Result<(), String> {
        let finite = |v: Option<f64>| v.is_none_or(f64::is_finite);
        if !finite(self.min)
            || !finite(self.max)
            || !finite(self.max_rate_per_second)
            || !finite(self.stale_after_seconds)
            || !finite(self.anomaly_threshold)
        {
            return Err("limits must be finite numbers".into());
        }
        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            return Err("min is greater than max".into());
        }
        if self.max_rate_per_second.is_some_and(|r| r <= 0.0)
            || self.stale_after_seconds.is_some_and(|s| s <= 0.0)
        {
            return Err("maxRatePerSecond and staleAfterSeconds must be positive".into());
        }
        if self.anomaly_threshold.is_some_and(|t| t <= 0.0) {
            return Err("anomalyThreshold must be positive (above 1 turns the veto off)".into());
        }
        let chars = self.property.chars().count();
        if chars == 0 || chars > 64 {
            return Err("property must be 1 to 64 characters".into());
        }
        if twinguard_core::dtmi::Dtmi::parse(&self.model).is_err() {
            return Err("model must be a DTMI".into());
        }
        Ok(())
    }

    /// True when the policy sets any numeric limit.
    fn numeric(&self) -> bool {
        self.min.is_some() || self.max.is_some() || self.max_rate_per_second.is_some()
    }

    /// The violations of `value` measured at `time_s`, given the stream's previous accepted
    /// reading `(value, time_s)`.
    pub fn check(
        &self,
        value: &serde_json::Value,
        time_s: f64,
        previous: Option<(f64, f64)>,
    ) -> Vec<Violation> {
        let mut out = Vec::new();
        if !self.numeric() {
            return out;
        }
        let Some(v) = value.as_f64() else {
            out.push(Violation::NotANumber);
            return out;
        };
        if self.min.is_some_and(|min| v < min) {
            out.push(Violation::BelowMin);
        }
        if self.max.is_some_and(|max| v > max) {
            out.push(Violation::AboveMax);
        }
        if let (Some(rate), Some((before, at))) = (self.max_rate_per_second, previous) {
            // Readings closer than a millisecond are judged as a millisecond apart.
            let dt = (time_s - at).abs().max(0.001);
            if (v - before).abs() / dt > rate {
                out.push(Violation::RateOfChange);
            }
        }
        out
    }

    pub fn anomaly_threshold(&self) -> f64 {
        self.anomaly_threshold.unwrap_or(DEFAULT_ANOMALY_THRESHOLD)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn boiler() -> Policy {
        serde_json::from_value(json!({
            "model": "dtmi:example:Boiler;1",
            "property": "temperature",
            "min": -40.0,
            "max": 150.0,
            "unit": "degreeCelsius",
            "maxRatePerSecond": 2.0,
        }))
        .unwrap()
    }

    #[test]
    fn values_outside_the_physical_limits_are_violations() {
        let p = boiler();
        assert!(p.check(&json!(20.5), 10.0, None).is_empty());
        assert_eq!(p.check(&json!(151), 10.0, None), vec![Violation::AboveMax]);
        assert_eq!(p.check(&json!(-41), 10.0, None), vec![Violation::BelowMin]);
        assert_eq!(
            p.check(&json!("hot"), 10.0, None),
            vec![Violation::NotANumber]
        );
    }

    #[test]
    fn a_jump_faster_than_the_rate_limit_is_a_violation() {
        let p = boiler();
        assert!(p.check(&json!(25.0), 12.0, Some((21.0, 10.0))).is_empty());
        assert_eq!(
            p.check(&json!(90.0), 12.0, Some((21.0, 10.0))),
            vec![Violation::RateOfChange]
        );
    }

    #[test]
    fn inconsistent_or_unknown_definitions_are_refused() {
        assert!(boiler().check_definition().is_ok());
        let mut p = boiler();
        p.min = Some(200.0);
        assert!(p.check_definition().is_err());
        let mut p = boiler();
        p.anomaly_threshold = Some(-1.0);
        assert!(p.check_definition().is_err());
        let mut p = boiler();
        p.model = String::new();
        assert!(p.check_definition().is_err());
        assert!(
            serde_json::from_value::<Policy>(json!({"model": "m", "property": "p", "minimum": 1}))
                .is_err()
        );
    }
}
