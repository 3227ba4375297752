//! Where the next page of a history read starts: after the last stored reading the page before
//! read, with the bucket it left open when the read is summarised in buckets (a bucket may span
//! pages; the page that finishes it returns it whole).
//!
//! The continuation token is URL-safe base64 of a small JSON object. It is not secret and not
//! signed: [`HistoryCursor::parse`] accepts only what a read of this twin's property over this
//! window could have produced (a key of this stream inside the window; a bucket only for a
//! summarised read, aligned to its interval, holding that key's time, with consistent figures),
//! so a forged token can at worst change what its own sender is told.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::records::{Bucket, history_bound, history_key, history_stream, parse_history_key};

/// Longest token accepted.
const MAX_TOKEN: usize = 4_096;

/// A bucket still being summarised when a page ended: its start and figures so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenBucket {
    #[serde(rename = "s")]
    pub start_ms: i64,
    #[serde(rename = "n")]
    pub count: u64,
    #[serde(rename = "lo")]
    pub min: f64,
    #[serde(rename = "hi")]
    pub max: f64,
    #[serde(rename = "m")]
    pub mean: f64,
    #[serde(rename = "l")]
    pub last: f64,
}

impl OpenBucket {
    /// A bucket from `start_ms` holding one value.
    #[must_use]
    pub fn new(start_ms: i64, v: f64) -> Self {
        Self {
            start_ms,
            count: 1,
            min: v,
            max: v,
            mean: v,
            last: v,
        }
    }

    /// Adds a value, as `records::downsample` does.
    pub fn add(&mut self, v: f64) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.mean += (v - self.mean) / self.count as f64;
        self.last = v;
    }

    /// The finished bucket, its start written by `rfc3339`.
    #[must_use]
    pub fn finish(&self, rfc3339: impl Fn(i64) -> String) -> Bucket {
        Bucket {
            start: rfc3339(self.start_ms),
            count: self.count,
            min: self.min,
            max: self.max,
            mean: self.mean,
            last: self.last,
        }
    }

    fn is_consistent(&self) -> bool {
        let figures = [self.min, self.max, self.mean, self.last];
        self.count >= 1
            && figures.iter().all(|f| f.is_finite())
            && self.min <= self.max
            && (self.min..=self.max).contains(&self.last)
            // The running mean may stray from [min, max] by rounding only.
            && self.mean >= self.min - self.min.abs() * 1e-9 - 1e-9
            && self.mean <= self.max + self.max.abs() * 1e-9 + 1e-9
    }
}

/// Where a history page continues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryCursor {
    /// The history key of the last stored reading read.
    #[serde(rename = "a")]
    pub after: String,
    /// The bucket left open, for a summarised read.
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<OpenBucket>,
}

/// What a token must agree with: the read it continues.
#[derive(Debug, Clone, Copy)]
pub struct HistoryWindow<'a> {
    pub twin: &'a str,
    pub name: &'a str,
    pub from_ms: i64,
    pub to_ms: i64,
    pub interval_ms: Option<i64>,
}

impl HistoryCursor {
    /// The continuation token.
    #[must_use]
    pub fn token(&self) -> String {
        // A struct of strings and finite numbers always serializes.
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses a token of [`HistoryCursor::token`] for a read of `window`; `None` for anything
    /// such a read could not have produced.
    #[must_use]
    pub fn parse(token: &str, window: HistoryWindow<'_>) -> Option<Self> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let cursor: Self = serde_json::from_slice(&bytes).ok()?;
        let HistoryWindow {
            twin,
            name,
            from_ms,
            to_ms,
            interval_ms,
        } = window;
        let (time_ms, _, _) = parse_history_key(&cursor.after)?;
        // A key of this stream inside the window.
        let stream = history_key(twin, name, 0, "d", 0);
        let inside = history_stream(&cursor.after).is_some()
            && history_stream(&cursor.after) == history_stream(&stream)
            && cursor.after.as_str() >= history_bound(twin, name, from_ms).as_str()
            && cursor.after.as_str() < history_bound(twin, name, to_ms).as_str();
        if !inside || !(from_ms..to_ms).contains(&time_ms) {
            return None;
        }
        match (&cursor.bucket, interval_ms) {
            (None, _) => Some(cursor),
            (Some(_), None) => None,
            (Some(b), Some(interval)) => {
                let aligned = interval > 0
                    && b.start_ms >= from_ms
                    && (b.start_ms - from_ms) % interval == 0
                    && b.start_ms <= time_ms
                    && time_ms - b.start_ms < interval;
                (aligned && b.is_consistent()).then_some(cursor)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: HistoryWindow<'static> = HistoryWindow {
        twin: "pump",
        name: "temp",
        from_ms: 1_000,
        to_ms: 100_000,
        interval_ms: Some(10_000),
    };

    #[test]
    fn a_cursor_round_trips_with_and_without_an_open_bucket() {
        let after = history_key("pump", "temp", 25_000, "dev-1", 7);
        for bucket in [None, Some(OpenBucket::new(21_000, 3.5))] {
            let cursor = HistoryCursor {
                after: after.clone(),
                bucket,
            };
            assert_eq!(
                HistoryCursor::parse(&cursor.token(), WINDOW),
                Some(cursor.clone())
            );
        }
    }

    #[test]
    fn tokens_a_read_could_not_have_produced_are_refused() {
        let key = |twin: &str, t: i64| history_key(twin, "temp", t, "dev-1", 7);
        let token =
            |after: String, bucket: Option<OpenBucket>| HistoryCursor { after, bucket }.token();
        let mut odd = OpenBucket::new(21_000, 3.5);
        odd.min = 9.0;
        let raw = HistoryWindow {
            interval_ms: None,
            ..WINDOW
        };
        for (forged, window) in [
            (String::new(), WINDOW),
            ("not base64!".to_owned(), WINDOW),
            (URL_SAFE_NO_PAD.encode("{\"a\":1}"), WINDOW),
            (token("pump\u{1f}temp".to_owned(), None), WINDOW),
            (token(key("other", 25_000), None), WINDOW),
            (token(key("pump", 500), None), WINDOW),
            (token(key("pump", 100_000), None), WINDOW),
            (
                token(key("pump", 25_000), Some(OpenBucket::new(21_000, 1.0))),
                raw,
            ),
            (
                token(key("pump", 25_000), Some(OpenBucket::new(22_000, 1.0))),
                WINDOW,
            ),
            (
                token(key("pump", 25_000), Some(OpenBucket::new(11_000, 1.0))),
                WINDOW,
            ),
            (token(key("pump", 25_000), Some(odd)), WINDOW),
            ("A".repeat(MAX_TOKEN + 1), WINDOW),
        ] {
            assert_eq!(HistoryCursor::parse(&forged, window), None, "{forged}");
        }
    }
}
