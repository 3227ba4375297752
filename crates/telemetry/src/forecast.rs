//! The fallback a degraded property shows (control DI-8): Holt's linear method with a damped
//! trend, updated online with each accepted reading, so each stream keeps three numbers and a
//! clock. Readings are treated as evenly spaced at the stream's running mean interval, which is
//! what a forecast over a short outage needs; it is marked `estimated` wherever it is shown.
//!
//! Hand-written rather than taken from augurs: augurs fits its models to a stored series in
//! batch, while this must update in constant memory per stream on every reading.

/// Smoothing of the level.
const ALPHA: f64 = 0.5;
/// Smoothing of the trend.
const BETA: f64 = 0.1;
/// Trend damping per step: a forecast levels off instead of running away.
const PHI: f64 = 0.9;
/// Readings needed before a forecast is offered.
const WARM_UP: u32 = 5;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forecaster {
    level: f64,
    trend: f64,
    last_time: f64,
    mean_interval: f64,
    seen: u32,
}

impl Forecaster {
    /// Learns an accepted reading taken at `time_s`. Non-finite values are ignored.
    pub fn update(&mut self, time_s: f64, value: f64) {
        if !value.is_finite() || !time_s.is_finite() {
            return;
        }
        match self.seen {
            0 => self.level = value,
            _ => {
                let dt = time_s - self.last_time;
                if dt > 0.0 {
                    self.mean_interval = if self.seen == 1 {
                        dt
                    } else {
                        0.9 * self.mean_interval + 0.1 * dt
                    };
                }
                let previous = self.level;
                self.level = ALPHA * value + (1.0 - ALPHA) * (previous + PHI * self.trend);
                self.trend = BETA * (self.level - previous) + (1.0 - BETA) * PHI * self.trend;
            }
        }
        self.last_time = self.last_time.max(time_s);
        self.seen = self.seen.saturating_add(1);
    }

    /// The value expected at `time_s`, once enough readings were seen.
    pub fn forecast(&self, time_s: f64) -> Option<f64> {
        if self.seen < WARM_UP || self.mean_interval <= 0.0 {
            return None;
        }
        let steps = ((time_s - self.last_time) / self.mean_interval).clamp(0.0, 10_000.0);
        // Sum of PHI^1..PHI^steps, the damped trend's total contribution.
        let damped = PHI * (1.0 - PHI.powf(steps)) / (1.0 - PHI);
        let value = self.level + damped * self.trend;
        value.is_finite().then_some(value)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_stream_forecasts_its_level() {
        let mut f = Forecaster::default();
        for i in 0..50 {
            f.update(i as f64 * 10.0, 21.0);
        }
        assert!((f.forecast(600.0).unwrap() - 21.0).abs() < 1e-9);
    }

    #[test]
    fn a_rising_stream_forecasts_a_rise_that_levels_off() {
        let mut f = Forecaster::default();
        for i in 0..100 {
            f.update(i as f64, 20.0 + i as f64 * 0.1);
        }
        let soon = f.forecast(101.0).unwrap();
        let later = f.forecast(10_000.0).unwrap();
        assert!(soon > 29.8 && soon < 30.5, "{soon}");
        assert!(later > soon && later < 32.0, "{later}");
    }

    #[test]
    fn no_forecast_before_the_warm_up_or_from_bad_values() {
        let mut f = Forecaster::default();
        f.update(0.0, 1.0);
        f.update(1.0, f64::NAN);
        assert_eq!(f.forecast(2.0), None);
    }
}
