//! Online anomaly detection for one sensor stream (DI-6).
//!
//! Every reading is scored against the stream's own history, then learned. The detector keeps a
//! fixed amount of state per stream (plain arrays, no heap, see [`Detector`]) and does a bounded
//! amount of work per reading, so the server can call it for every reading.
//!
//! How a reading is scored:
//! 1. **Pattern**: the recent readings are summarised as a short multi-scale vector (the newest
//!    readings alone, older ones averaged over longer and longer segments), each entry in units
//!    of the range of values the stream has shown so far.
//! 2. **Novelty**: the vector is compared with a bounded set of prototypes of the patterns seen
//!    before (an online clustering in the spirit of adaptive resonance: a vector within the match
//!    radius of a prototype refines it, any other takes the place of the least recently matched
//!    prototype). The raw novelty is the distance to the nearest prototype over the match radius.
//! 3. **Daily profile**: the smoothed value is compared with what the stream usually shows at this
//!    time of day (48 half-hour bins with a mean and a mean absolute deviation each); a large
//!    deviation raises the raw score too.
//! 4. **Likelihood**: as in Numenta's anomaly likelihood, the short-term mean of the raw scores is
//!    compared with their long-term distribution (exponentially weighted mean and variance), and
//!    the Gaussian tail probability is mapped to [0, 1] on a log scale: a noisy stream has to be
//!    unusually novel for itself before it scores high.
//! 5. **Range break**: after the warmup, a value beyond the known range by more than a tolerance
//!    scores 1 outright.
//! 6. **Rest**: after a score reaches the alert level, later scores are silenced for a rest
//!    period, so one event raises one alert rather than a burst.
//!
//! The default configuration was tuned on the NAB corpus as a whole (one configuration for every
//! stream, no labels inside the detector); `docs/anomaly.md` says how and what it scores.

/// Entries in a pattern vector.
pub const FEATURES: usize = 8;
/// Readings of history kept for building pattern vectors (the segment lengths must fit).
pub const HISTORY: usize = 64;
/// Prototypes kept per stream.
pub const PROTOTYPES: usize = 48;
/// Most raw scores averaged by the likelihood step.
pub const MAX_SHORT: usize = 16;
/// Time-of-day bins of the daily profile (30 minutes each).
pub const DAY_BINS: usize = 48;
/// Readings averaged when comparing with the daily profile.
const SEASON_SMOOTH: usize = 4;
/// Pattern entries are clamped to this many ranges outside the known range.
const FEATURE_CLAMP: f64 = 4.0;

/// One configuration for every stream (no per-stream tuning).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Readings learned before any score above 0 is given (the stream's learning period).
    pub warmup: u32,
    /// Lengths, newest first, of the segments of recent readings averaged into the entries of a
    /// pattern vector; they are cut so that their sum fits in [`HISTORY`].
    pub segments: [u16; FEATURES],
    /// Mean absolute difference, in units of the known range, under which a pattern matches a
    /// prototype.
    pub match_radius: f64,
    /// How far a matched prototype moves toward the new pattern (0 to 1).
    pub learning_rate: f64,
    /// Raw scores (distances over the match radius) are capped at this value, then divided by
    /// it, so they lie in [0, 1].
    pub raw_cap: f64,
    /// Weight of the daily-profile deviation in the raw score (0 disables the daily profile).
    pub season_weight: f64,
    /// A deviation from the daily profile of this many times the bin's usual deviation (plus the
    /// match radius) counts as much as a pattern one match radius from every prototype.
    pub season_k: f64,
    /// How fast a daily-profile bin follows the readings that fall into it (0 to 1).
    pub season_rate: f64,
    /// Visits a daily-profile bin needs before deviations from it are scored.
    pub season_min_visits: u32,
    /// Raw scores averaged by the likelihood step (1 to [`MAX_SHORT`]).
    pub short_window: u32,
    /// Effective memory, in readings, of the long-term mean and variance of the raw scores.
    pub long_window: u32,
    /// Floor on the standard deviation of the raw scores in the likelihood step.
    pub min_sigma: f64,
    /// A value beyond the known range by more than this fraction of the range scores 1 (after
    /// the warmup); 0 disables the rule.
    pub range_tolerance: f64,
    /// Score at or above which an alert is raised.
    pub alert_level: f64,
    /// Readings after an alert during which scores are 0.
    pub rest: u32,
}

impl Default for DetectorConfig {
    /// The configuration that reached the NAB score reported in `docs/benchmarks.md`.
    fn default() -> Self {
        Self {
            warmup: 150,
            segments: [1, 1, 2, 2, 4, 4, 8, 8],
            match_radius: 0.08,
            learning_rate: 0.4,
            raw_cap: 5.0,
            season_weight: 2.0,
            season_k: 3.0,
            season_rate: 0.1,
            season_min_visits: 6,
            short_window: 13,
            long_window: 300,
            min_sigma: 0.04,
            range_tolerance: 0.02,
            alert_level: 0.4,
            rest: 30,
        }
    }
}

/// Format of [`Detector::to_bytes`].
const STATE_FORMAT: u8 = 1;
/// Length of [`Detector::to_bytes`].
const STATE_BYTES: usize = 1
    + 32
    + HISTORY * 8
    + 2
    + 16
    + 2
    + PROTOTYPES * (FEATURES * 4 + 8)
    + DAY_BINS * (4 + 4 + 2)
    + MAX_SHORT * 4
    + 2
    + 2
    + 24
    + 16;

/// SHA-256 of the configuration's JSON form: stored state names the configuration it was
/// learned under.
fn config_digest(config: &DetectorConfig) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(serde_json::to_vec(config).unwrap_or_default()).into()
}

/// Reads little-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn f32(&mut self) -> Option<f32> {
        self.take().map(f32::from_le_bytes)
    }
    fn f64(&mut self) -> Option<f64> {
        self.take().map(f64::from_le_bytes)
    }
}

/// A remembered pattern.
#[derive(Debug, Clone, Copy)]
struct Prototype {
    centre: [f32; FEATURES],
    /// `seen` when the prototype last matched (the least recent is replaced first).
    last_used: u64,
}

/// Per-stream state. Its size is fixed, whatever the number of readings: 3,248 bytes on x86-64
/// (`size_of::<Detector>()`, at most 3.5 KiB; the detector owns no heap memory). An update costs
/// one pass over the 48 prototypes and the 30-reading pattern window.
#[derive(Debug, Clone)]
pub struct Detector {
    config: DetectorConfig,
    /// Segment lengths cut to fit [`HISTORY`], and their sum.
    segments: [usize; FEATURES],
    span: usize,
    /// Ring of the last [`HISTORY`] finite values; `head` is the next slot to write.
    history: [f64; HISTORY],
    head: usize,
    /// Known range of the finite values.
    low: f64,
    high: f64,
    prototypes: [Prototype; PROTOTYPES],
    prototype_count: usize,
    /// Daily profile: per time-of-day bin, the mean of the smoothed value and its mean absolute
    /// deviation (both in units of the known range), and the visits.
    season_mean: [f32; DAY_BINS],
    season_dev: [f32; DAY_BINS],
    season_visits: [u16; DAY_BINS],
    likelihood: Likelihood,
    /// Readings learned.
    seen: u64,
    /// `seen` up to which scores are silenced.
    rest_until: u64,
}

impl Detector {
    pub fn new(config: &DetectorConfig) -> Self {
        let mut segments = [1usize; FEATURES];
        let mut span = 0usize;
        for (slot, &len) in segments.iter_mut().zip(config.segments.iter()) {
            let room = HISTORY.saturating_sub(span).max(1);
            *slot = usize::from(len).clamp(1, room);
            span += *slot;
        }
        Self {
            config: config.clone(),
            segments,
            span: span.min(HISTORY),
            history: [0.0; HISTORY],
            head: 0,
            low: f64::INFINITY,
            high: f64::NEG_INFINITY,
            prototypes: [Prototype {
                centre: [0.0; FEATURES],
                last_used: 0,
            }; PROTOTYPES],
            prototype_count: 0,
            season_mean: [0.0; DAY_BINS],
            season_dev: [0.0; DAY_BINS],
            season_visits: [0; DAY_BINS],
            likelihood: Likelihood::new(),
            seen: 0,
            rest_until: 0,
        }
    }

    /// Scores one reading against the stream's history, then learns it, and silences scores
    /// for the rest period after an alert (step 6): the form NAB scores, where one event should
    /// raise one alert. `time_s` is seconds since the Unix epoch (used for the daily profile; a
    /// non-finite time skips it), `value` the reading. Returns a score in [0, 1]; higher is more
    /// anomalous, 0 during the warmup. Never panics: a non-finite value scores 1.0 and is not
    /// learned.
    pub fn update(&mut self, time_s: f64, value: f64) -> f64 {
        if !value.is_finite() {
            return 1.0;
        }
        let Some(score) = self.score(time_s, value) else {
            return 0.0;
        };
        if self.seen <= self.rest_until {
            return 0.0;
        }
        if score >= self.config.alert_level {
            self.rest_until = self.seen.saturating_add(u64::from(self.config.rest));
        }
        score
    }

    /// Scores one reading against the stream's history, then learns it: steps 1 to 5, with no
    /// rest period, so every reading after the warmup gets its own score (the form the server
    /// uses to hold readings back). `None` during the warmup, when the stream has no basis for
    /// a score yet. A non-finite value scores 1.0 and is not learned. A caller that must not
    /// learn from a reading it ends up refusing scores a clone and keeps it only on acceptance.
    pub fn score(&mut self, time_s: f64, value: f64) -> Option<f64> {
        if !value.is_finite() {
            return Some(1.0);
        }
        let range_break = self.breaks_range(value);
        self.push_value(value);
        self.seen = self.seen.saturating_add(1);
        if self.seen < self.span as u64 {
            return None;
        }

        let pattern = self.pattern();
        let distance = self.learn_pattern(&pattern);
        let cap = self.config.raw_cap.max(1e-9);
        let mut raw = (distance / self.config.match_radius.max(1e-9)).min(cap);
        if self.config.season_weight > 0.0 {
            let season = self.config.season_weight * self.learn_season(time_s);
            raw = raw.max(season.min(cap));
        }
        let likelihood = self.likelihood.score(raw / cap, &self.config);
        if self.seen <= u64::from(self.config.warmup) {
            return None;
        }
        Some(if range_break || !likelihood.is_finite() {
            1.0
        } else {
            likelihood.clamp(0.0, 1.0)
        })
    }

    /// Readings learned so far (saturating).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The learned state as bytes, so that a restart resumes the stream where it was instead of
    /// handing it a fresh warmup: a format byte, a SHA-256 of the configuration (state learned
    /// under another configuration is not resumed), then every field, little-endian (3,3 KB).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_BYTES);
        out.push(STATE_FORMAT);
        out.extend_from_slice(&config_digest(&self.config));
        for v in self.history {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.head as u16).to_le_bytes());
        out.extend_from_slice(&self.low.to_le_bytes());
        out.extend_from_slice(&self.high.to_le_bytes());
        out.extend_from_slice(&(self.prototype_count as u16).to_le_bytes());
        for p in &self.prototypes {
            for c in p.centre {
                out.extend_from_slice(&c.to_le_bytes());
            }
            out.extend_from_slice(&p.last_used.to_le_bytes());
        }
        for v in self.season_mean.iter().chain(&self.season_dev) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in self.season_visits {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let l = &self.likelihood;
        for v in l.raw {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(l.head as u16).to_le_bytes());
        out.extend_from_slice(&(l.len as u16).to_le_bytes());
        out.extend_from_slice(&l.mean.to_le_bytes());
        out.extend_from_slice(&l.var.to_le_bytes());
        out.extend_from_slice(&l.samples.to_le_bytes());
        out.extend_from_slice(&self.seen.to_le_bytes());
        out.extend_from_slice(&self.rest_until.to_le_bytes());
        out
    }

    /// Reads [`Detector::to_bytes`]; `None` when the bytes are not a state of this format and
    /// configuration, or hold an index out of range.
    pub fn from_bytes(config: &DetectorConfig, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != STATE_BYTES || bytes[0] != STATE_FORMAT {
            return None;
        }
        if bytes[1..33] != config_digest(config) {
            return None;
        }
        let mut r = Reader(&bytes[33..]);
        let mut d = Self::new(config);
        for v in &mut d.history {
            *v = r.f64()?;
        }
        d.head = usize::from(r.u16()?);
        d.low = r.f64()?;
        d.high = r.f64()?;
        d.prototype_count = usize::from(r.u16()?);
        for p in &mut d.prototypes {
            for c in &mut p.centre {
                *c = r.f32()?;
            }
            p.last_used = r.u64()?;
        }
        for v in d.season_mean.iter_mut().chain(d.season_dev.iter_mut()) {
            *v = r.f32()?;
        }
        for v in &mut d.season_visits {
            *v = r.u16()?;
        }
        for v in &mut d.likelihood.raw {
            *v = r.f32()?;
        }
        d.likelihood.head = usize::from(r.u16()?);
        d.likelihood.len = usize::from(r.u16()?);
        d.likelihood.mean = r.f64()?;
        d.likelihood.var = r.f64()?;
        d.likelihood.samples = r.u64()?;
        d.seen = r.u64()?;
        d.rest_until = r.u64()?;
        let in_range = d.head < HISTORY
            && d.prototype_count <= PROTOTYPES
            && d.likelihood.head < MAX_SHORT
            && d.likelihood.len <= MAX_SHORT;
        in_range.then_some(d)
    }

    /// Whether `value` leaves the known range by more than the tolerance; then widens the range.
    fn breaks_range(&mut self, value: f64) -> bool {
        let tolerance = self.config.range_tolerance;
        let mut broken = false;
        if tolerance > 0.0 && self.seen > u64::from(self.config.warmup) && self.high > self.low {
            let margin = (self.high - self.low) * tolerance;
            broken = value > self.high + margin || value < self.low - margin;
        }
        self.low = self.low.min(value);
        self.high = self.high.max(value);
        broken
    }

    fn push_value(&mut self, value: f64) {
        self.history[self.head] = value;
        self.head = (self.head + 1) % HISTORY;
    }

    /// The `back`-th most recent value (0 is the newest).
    fn recent(&self, back: usize) -> f64 {
        self.history[(self.head + HISTORY - 1 - back % HISTORY) % HISTORY]
    }

    /// The known range's width, never 0.
    fn scale(&self) -> f64 {
        let magnitude = self.high.abs().max(self.low.abs()).max(1.0);
        (self.high - self.low).max(1e-9 * magnitude)
    }

    /// The multi-scale pattern of the recent values, in units of the known range.
    fn pattern(&self) -> [f32; FEATURES] {
        let scale = self.scale();
        let mut out = [0.0f32; FEATURES];
        let mut back = 0usize;
        for (entry, &len) in out.iter_mut().zip(self.segments.iter()) {
            let mut sum = 0.0;
            for _ in 0..len {
                sum += self.recent(back);
                back += 1;
            }
            let mut x = (sum / len as f64 - self.low) / scale;
            if x.is_nan() {
                x = FEATURE_CLAMP;
            }
            *entry = x.clamp(-FEATURE_CLAMP, 1.0 + FEATURE_CLAMP) as f32;
        }
        out
    }

    /// Distance from `pattern` to the nearest prototype (mean absolute difference), then learns
    /// the pattern: it refines the nearest prototype if it matches, else replaces the least
    /// recently matched one.
    fn learn_pattern(&mut self, pattern: &[f32; FEATURES]) -> f64 {
        let mut best = f64::INFINITY;
        let mut best_index = 0usize;
        for (i, proto) in self.prototypes[..self.prototype_count].iter().enumerate() {
            let mut d = 0.0f32;
            for (a, b) in proto.centre.iter().zip(pattern.iter()) {
                d += (a - b).abs();
            }
            let d = f64::from(d) / FEATURES as f64;
            if d < best {
                best = d;
                best_index = i;
            }
        }
        let now = self.seen;
        if best <= self.config.match_radius {
            let rate = self.config.learning_rate.clamp(0.0, 1.0) as f32;
            if let Some(proto) = self.prototypes.get_mut(best_index) {
                for (c, p) in proto.centre.iter_mut().zip(pattern.iter()) {
                    *c += rate * (p - *c);
                }
                proto.last_used = now;
            }
        } else {
            let slot = if self.prototype_count < PROTOTYPES {
                self.prototype_count += 1;
                self.prototype_count - 1
            } else {
                self.prototypes
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, p)| p.last_used)
                    .map_or(0, |(i, _)| i)
            };
            if let Some(proto) = self.prototypes.get_mut(slot) {
                *proto = Prototype {
                    centre: *pattern,
                    last_used: now,
                };
            }
        }
        if best.is_finite() { best } else { 1.0 }
    }

    /// Deviation of the recent values from the daily profile at `time_s`, over the allowed
    /// deviation (0 when the time is not finite or the bin has too few visits); then learns it.
    fn learn_season(&mut self, time_s: f64) -> f64 {
        if !time_s.is_finite() {
            return 0.0;
        }
        let day_fraction = time_s.rem_euclid(86_400.0) / 86_400.0;
        let bin = ((day_fraction * DAY_BINS as f64) as usize).min(DAY_BINS - 1);
        let mut sum = 0.0;
        for back in 0..SEASON_SMOOTH {
            sum += self.recent(back);
        }
        let smooth = (sum / SEASON_SMOOTH as f64 - self.low) / self.scale();
        if !smooth.is_finite() {
            return 0.0;
        }
        let (Some(mean), Some(dev), Some(visits)) = (
            self.season_mean.get_mut(bin),
            self.season_dev.get_mut(bin),
            self.season_visits.get_mut(bin),
        ) else {
            return 0.0;
        };
        let deviation = (smooth - f64::from(*mean)).abs();
        let score = if u32::from(*visits) >= self.config.season_min_visits {
            let allowed = self.config.season_k * f64::from(*dev) + self.config.match_radius;
            deviation / allowed.max(1e-9)
        } else {
            0.0
        };
        let first_visits = 1.0 / (f64::from(*visits) + 1.0);
        let rate = first_visits.max(self.config.season_rate.clamp(0.0, 1.0));
        *mean += (rate * (smooth - f64::from(*mean))) as f32;
        *dev += (rate * (deviation - f64::from(*dev))) as f32;
        *visits = visits.saturating_add(1);
        score
    }
}

/// Numenta-style anomaly likelihood over a stream of raw scores in [0, 1].
#[derive(Debug, Clone)]
struct Likelihood {
    /// Ring of the last raw scores; `head` is the next slot to write.
    raw: [f32; MAX_SHORT],
    head: usize,
    len: usize,
    /// Long-term distribution of the short-term mean raw score.
    mean: f64,
    var: f64,
    samples: u64,
}

impl Likelihood {
    fn new() -> Self {
        Self {
            raw: [0.0; MAX_SHORT],
            head: 0,
            len: 0,
            mean: 0.0,
            var: 0.0,
            samples: 0,
        }
    }

    /// Log-scaled tail probability of the short-term mean raw score, then learns it.
    fn score(&mut self, raw: f64, config: &DetectorConfig) -> f64 {
        let short = (config.short_window as usize).clamp(1, MAX_SHORT);
        self.raw[self.head] = raw as f32;
        self.head = (self.head + 1) % MAX_SHORT;
        self.len = (self.len + 1).min(MAX_SHORT);
        let n = short.min(self.len);
        let mut sum = 0.0;
        for back in 0..n {
            sum += f64::from(self.raw[(self.head + MAX_SHORT - 1 - back) % MAX_SHORT]);
        }
        let mean_short = sum / n as f64;

        let score = if self.samples == 0 {
            0.0
        } else {
            let sigma = self.var.sqrt().max(config.min_sigma.max(1e-6));
            log_tail_score((mean_short - self.mean) / sigma)
        };

        self.samples = self.samples.saturating_add(1);
        let alpha = (1.0 / self.samples as f64).max(1.0 / f64::from(config.long_window.max(1)));
        let delta = mean_short - self.mean;
        self.mean += alpha * delta;
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta);
        score
    }
}

/// Maps a z-score to [0, 1]: `ln(Q(z)) / ln(1e-10)` where `Q` is the upper Gaussian tail, so a
/// tail probability of 1e-10 or less scores 1 and a z-score at or below 0 scores about 0.
fn log_tail_score(z: f64) -> f64 {
    if !z.is_finite() {
        return if z > 0.0 { 1.0 } else { 0.0 };
    }
    let ln_tail = ln_erfc(z / std::f64::consts::SQRT_2) - std::f64::consts::LN_2;
    let floor = (1e-10f64).ln();
    (ln_tail.max(floor) / floor).clamp(0.0, 1.0)
}

/// Natural logarithm of the complementary error function (Numerical Recipes' Chebyshev fit,
/// relative error under 1.2e-7), computed in log space so large arguments do not underflow.
fn ln_erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let ln_pos = t.ln() + poly;
    if x >= 0.0 {
        ln_pos
    } else {
        (2.0 - ln_pos.exp()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(detector: &mut Detector, n: usize) {
        for i in 0..n {
            let t = i as f64 * 300.0;
            let v = 10.0 + (i as f64 * 0.3).sin();
            detector.update(t, v);
        }
    }

    #[test]
    fn a_spike_after_a_steady_stream_scores_high() {
        let mut d = Detector::new(&DetectorConfig::default());
        steady(&mut d, 2000);
        let score = d.update(2000.0 * 300.0, 25.0);
        assert!(score >= 0.9, "spike scored {score}");
    }

    #[test]
    fn a_steady_stream_scores_low() {
        let mut d = Detector::new(&DetectorConfig::default());
        steady(&mut d, 1000);
        let mut worst: f64 = 0.0;
        for i in 1000..3000 {
            let v = 10.0 + (i as f64 * 0.3).sin();
            worst = worst.max(d.update(i as f64 * 300.0, v));
        }
        assert!(worst < 0.5, "steady stream scored {worst}");
    }

    #[test]
    fn a_day_that_skips_its_usual_rise_is_flagged_and_normal_days_are_not() {
        // Five-minute readings: 20 at night, 80 from 09:00 to 17:00, with noise; day 10 stays
        // at 20 all day. All its values are within the known range: only the context is new.
        let config = DetectorConfig::default();
        let mut d = Detector::new(&config);
        let midnight = 1_599_955_200.0;
        let mut x: u64 = 7;
        let mut alert_days = Vec::new();
        for i in 0..12 * 288u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 4.0;
            let hour = f64::from(i % 288) / 12.0;
            let day = i / 288;
            let busy = (9.0..17.0).contains(&hour) && day != 10;
            let value = if busy { 80.0 } else { 20.0 } + noise;
            if d.update(midnight + f64::from(i) * 300.0, value) >= config.alert_level {
                alert_days.push(day);
            }
        }
        assert_eq!(alert_days, vec![10]);
    }

    #[test]
    fn scores_stay_in_the_unit_interval() {
        let mut d = Detector::new(&DetectorConfig::default());
        let mut x: u64 = 12345;
        for i in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = (x >> 11) as f64 / (1u64 << 53) as f64 * 1000.0 - 500.0;
            let s = d.update(i as f64, if i % 97 == 0 { v * 1e6 } else { v });
            assert!((0.0..=1.0).contains(&s), "score {s}");
        }
    }

    #[test]
    fn non_finite_values_do_not_poison_the_state() {
        let mut d = Detector::new(&DetectorConfig::default());
        steady(&mut d, 1000);
        let seen = d.seen();
        assert_eq!(d.update(1.0, f64::NAN), 1.0);
        assert_eq!(d.update(1.0, f64::INFINITY), 1.0);
        assert_eq!(d.update(1.0, f64::NEG_INFINITY), 1.0);
        assert_eq!(d.seen(), seen);
        for i in 1000..1500 {
            let v = 10.0 + (i as f64 * 0.3).sin();
            let s = d.update(f64::NAN, v);
            assert!(s.is_finite() && s < 0.5, "score after NaN {s}");
        }
    }

    #[test]
    fn extreme_finite_values_give_defined_scores() {
        let mut d = Detector::new(&DetectorConfig::default());
        for (i, v) in [f64::MAX, -f64::MAX, 0.0, f64::MIN_POSITIVE, 1e300, -1e300]
            .into_iter()
            .cycle()
            .take(600)
            .enumerate()
        {
            let s = d.update(i as f64, v);
            assert!((0.0..=1.0).contains(&s), "score {s}");
        }
    }

    #[test]
    fn memory_does_not_grow_with_the_stream() {
        assert!(std::mem::size_of::<Detector>() <= 3584);
        let mut d = Detector::new(&DetectorConfig::default());
        steady(&mut d, 100_000);
        assert_eq!(d.seen(), 100_000);
        assert!(d.prototype_count <= PROTOTYPES);
    }

    #[test]
    fn alerts_rest_after_they_fire() {
        let mut d = Detector::new(&DetectorConfig::default());
        steady(&mut d, 2000);
        assert!(d.update(0.0, 25.0) >= 0.9);
        // A second spike inside the rest period does not raise a second alert.
        assert!(d.update(0.0, 10.0) < 0.5);
        assert!(d.update(0.0, -25.0) < 0.5);
    }

    #[test]
    fn nothing_is_flagged_during_the_warmup() {
        let config = DetectorConfig::default();
        let mut d = Detector::new(&config);
        for i in 0..config.warmup {
            let v = if i % 7 == 0 { 1e6 } else { f64::from(i) };
            assert_eq!(d.update(f64::from(i), v), 0.0);
        }
    }

    #[test]
    fn the_log_tail_score_is_monotone_and_bounded() {
        let mut last = -1.0;
        for i in -50..=80 {
            let s = log_tail_score(f64::from(i) / 10.0);
            assert!((0.0..=1.0).contains(&s));
            assert!(s >= last);
            last = s;
        }
        assert!(log_tail_score(0.0) < 0.05);
        assert_eq!(log_tail_score(10.0), 1.0);
        // Q(3) is about 1.35e-3.
        let expected = (1.35e-3f64).ln() / (1e-10f64).ln();
        assert!((log_tail_score(3.0) - expected).abs() < 1e-3);
    }

    #[test]
    fn a_stored_state_resumes_exactly_where_it_stopped() {
        let config = DetectorConfig::default();
        let mut live = Detector::new(&config);
        steady(&mut live, 500);
        let bytes = live.to_bytes();
        assert_eq!(bytes.len(), STATE_BYTES);
        let mut resumed = Detector::from_bytes(&config, &bytes).unwrap();
        // The same readings score the same from here on, bit for bit.
        for i in 500..1500 {
            let v = 10.0 + (i as f64 * 0.3).sin() + if i == 1200 { 30.0 } else { 0.0 };
            let t = i as f64 * 300.0;
            assert_eq!(
                live.score(t, v).map(f64::to_bits),
                resumed.score(t, v).map(f64::to_bits)
            );
        }
        // Another configuration, a cut or a bad index is not resumed.
        let other = DetectorConfig {
            warmup: 10,
            ..config.clone()
        };
        assert!(Detector::from_bytes(&other, &bytes).is_none());
        assert!(Detector::from_bytes(&config, &bytes[..bytes.len() - 1]).is_none());
        let mut bad = bytes.clone();
        bad[33 + HISTORY * 8] = 0xff; // `head` beyond the ring
        assert!(Detector::from_bytes(&config, &bad).is_none());
    }

    #[test]
    fn every_reading_after_the_warmup_gets_its_own_score() {
        // `update` silences the readings after an alert (NAB's one alert per event); `score`,
        // which the server uses, does not: a second spike right after the first still scores.
        let mut d = Detector::new(&DetectorConfig::default());
        steady(&mut d, 2000);
        let mut scored = d.clone();
        assert!(d.update(0.0, 25.0) >= 0.9);
        assert!(d.update(0.0, -25.0) < 0.5);
        assert!(scored.score(0.0, 25.0).unwrap() >= 0.9);
        assert!(scored.score(0.0, -25.0).unwrap() >= 0.9);
    }

    #[test]
    fn the_warmup_gives_no_score_rather_than_a_low_one() {
        let config = DetectorConfig::default();
        let mut d = Detector::new(&config);
        for i in 0..config.warmup {
            assert_eq!(d.score(f64::from(i), f64::from(i)), None);
        }
        assert!(d.score(f64::from(config.warmup), 1.0).is_some());
    }

    #[test]
    fn the_default_configuration_round_trips_through_json() {
        let config = DetectorConfig::default();
        let json = serde_json::to_string(&config).unwrap();
        let back: DetectorConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
    }
}
