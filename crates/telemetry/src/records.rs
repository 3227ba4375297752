//! What the pipeline stores besides the twin: quarantined readings (control DI-5, DI-6, DI-4)
//! and the history of accepted ones, each under keys that sort the way they are read.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ingest::rfc3339_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Review {
    Pending,
    Released,
    Discarded,
}

/// A reading with a valid signature that was not applied, kept for a reviewer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quarantined {
    pub id: String,
    pub device: String,
    pub seq: u64,
    /// `None` when the reading named no twin and the device is bound to several.
    pub twin: Option<String>,
    pub name: String,
    pub value: Value,
    /// RFC 3339 time the reading was measured.
    pub source_time: String,
    pub received: String,
    /// Stable reason codes, e.g. `above_max`, `anomaly`, `firmware_unknown`.
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_score: Option<f64>,
    pub status: Review,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
}

/// Quarantine keys sort by arrival: milliseconds, then the order of arrival within this run,
/// then a random suffix that keeps keys of different runs apart.
pub fn quarantine_key(received_ms: i64, order: u64, suffix: &str) -> String {
    format!("{:016}-{order:012}-{suffix}", received_ms.max(0))
}

/// One accepted reading in the history, as the history endpoint answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub time: String,
    pub value: Value,
    pub device: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_score: Option<f64>,
    /// Measured more than five minutes before it arrived, or before the stream's last accepted
    /// reading: kept in the history, never shown by the twin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

/// What a history record's value holds: the reading's value and anomaly score. Its time, device
/// and sequence number are in its key ([`history_key`]), so the value does not repeat them.
/// Records written before 2026-12 also carry `time`, `device` and `seq` here; they are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredReading {
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_score: Option<f64>,
    /// See [`HistoryEntry::late`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

const SEP: char = '\u{1f}';

/// History keys: twin, name, then the measurement time in zero-padded milliseconds, so a range
/// of keys is a range of time; device and sequence number keep keys unique.
pub fn history_key(twin: &str, name: &str, time_ms: i64, device: &str, seq: u64) -> String {
    format!(
        "{}{SEP}{time:016}{SEP}{device}{SEP}{seq:020}",
        history_prefix(twin, name),
        time = time_ms.max(0)
    )
}

/// The first key of `twin`'s `name` at `time_ms`.
pub fn history_bound(twin: &str, name: &str, time_ms: i64) -> String {
    stream_bound(&history_prefix(twin, name), time_ms)
}

/// The stream (twin and name) of a history key: what every key of one stream starts with. Read
/// from the key's end, as in [`parse_history_key`].
pub fn history_stream(key: &str) -> Option<&str> {
    key.rsplitn(4, SEP).nth(3)
}

/// The first key of `stream` (see [`history_stream`]) at `time_ms`.
pub fn stream_bound(stream: &str, time_ms: i64) -> String {
    format!("{stream}{SEP}{:016}", time_ms.max(0))
}

/// A key after every key of `stream` and before those of any other stream: times are digits,
/// which sort before DEL.
pub fn stream_end(stream: &str) -> String {
    format!("{stream}{SEP}\u{7f}")
}

/// The measurement time (ms), device and sequence number of a [`history_key`]. Device IDs never
/// hold the separator, so the key is read from its end; the twin and name are not needed.
pub fn parse_history_key(key: &str) -> Option<(i64, &str, u64)> {
    let mut parts = key.rsplitn(4, SEP);
    let seq = parts.next()?.parse().ok()?;
    let device = parts.next()?;
    let time_ms = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((time_ms, device, seq))
}

/// A stored history record as the reading it records, with its measurement time in ms; `None`
/// when the key or the value cannot be read.
pub fn history_entry(key: &str, value: &[u8]) -> Option<(i64, HistoryEntry)> {
    let (time_ms, device, seq) = parse_history_key(key)?;
    let stored: StoredReading = serde_json::from_slice(value).ok()?;
    Some((
        time_ms,
        HistoryEntry {
            time: rfc3339_ms(time_ms),
            value: stored.value,
            device: device.to_owned(),
            seq,
            anomaly_score: stored.anomaly_score,
            late: stored.late,
        },
    ))
}

fn history_prefix(twin: &str, name: &str) -> String {
    format!("{twin}{SEP}{name}")
}

/// One bucket of a downsampled history.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bucket {
    pub start: String,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub last: f64,
}

/// Downsamples numeric `(time_ms, value)` points into buckets of `interval_ms` starting at
/// `from_ms`; non-numeric values are left out.
pub fn downsample(points: &[(i64, f64)], from_ms: i64, interval_ms: i64) -> Vec<(i64, Bucket)> {
    let mut out: Vec<(i64, Bucket)> = Vec::new();
    for &(t, v) in points {
        let start = from_ms + (t - from_ms).div_euclid(interval_ms.max(1)) * interval_ms.max(1);
        match out.last_mut() {
            Some((s, b)) if *s == start => {
                b.count += 1;
                b.min = b.min.min(v);
                b.max = b.max.max(v);
                b.mean += (v - b.mean) / b.count as f64;
                b.last = v;
            }
            _ => out.push((
                start,
                Bucket {
                    start: String::new(),
                    count: 1,
                    min: v,
                    max: v,
                    mean: v,
                    last: v,
                },
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store's reading of history keys and bounds (PostgreSQL partitions history by the
    /// time it finds there) agrees with the keys made here.
    #[test]
    fn the_store_reads_the_measurement_time_of_history_keys_and_bounds() {
        use twinguard_core::store::{history_key_time, history_range_times};
        for time in [0, 1, 1_764_000_000_123, 9_999_999_999_999_990] {
            let key = history_key("pump\u{1f}7", "flow\u{1f}x", time, "dev-1", 42);
            assert_eq!(history_key_time(&key), Some(time), "{key:?}");
            let (from, to) = (
                history_bound("pump\u{1f}7", "flow\u{1f}x", time),
                history_bound("pump\u{1f}7", "flow\u{1f}x", time + 5),
            );
            assert_eq!(history_range_times(&from, &to), Some((time, time + 4)));
            // A paged read goes on after the last key it got.
            let next = format!("{key}\u{0}");
            assert_eq!(history_range_times(&next, &to), Some((time, time + 4)));
        }
        // Bounds of two streams, or the end of a stream, bound no time.
        let (a, b) = (history_bound("a", "x", 5), history_bound("b", "x", 9));
        assert_eq!(history_range_times(&a, &b), None);
        assert_eq!(
            history_range_times(&a, &stream_end(&history_prefix("a", "x"))),
            None
        );
        assert_eq!(history_key_time(&a), None);
    }

    #[test]
    fn history_keys_sort_by_time_within_a_property() {
        let a = history_key("t", "temp", 999, "d", 5);
        let b = history_key("t", "temp", 1_000, "d", 1);
        let c = history_key("t", "tempo", 0, "d", 1);
        assert!(a < b);
        assert!(history_bound("t", "temp", 0) <= a);
        assert!(b < history_bound("t", "temp", 1_001));
        assert!(c > history_bound("t", "temp", i64::MAX));
    }

    #[test]
    fn a_history_record_is_read_back_as_the_reading_it_records() {
        let key = history_key("pump-1", "flow", 1_764_563_283_123, "meter.7", 42);
        let stored = serde_json::to_vec(&StoredReading {
            value: serde_json::json!(20.5),
            anomaly_score: Some(0.25),
            late: false,
        })
        .unwrap();
        let (time_ms, entry) = history_entry(&key, &stored).unwrap();
        assert_eq!(time_ms, 1_764_563_283_123);
        assert_eq!(
            entry,
            HistoryEntry {
                time: "2025-12-01T04:28:03.123Z".into(),
                value: serde_json::json!(20.5),
                device: "meter.7".into(),
                seq: 42,
                anomaly_score: Some(0.25),
                late: false,
            }
        );
        // A record of the earlier format, which repeated time, device and seq in its value.
        let old = br#"{"time":"2025-12-01T04:28:03.123Z","value":20.5,"device":"meter.7","seq":42,"anomalyScore":0.25}"#;
        assert_eq!(history_entry(&key, old).unwrap().1, entry);
        // Twin IDs and names may hold anything but the separator; the key is read from its end.
        let key = history_key("site/a b:c", "x.y", 0, "d", 1);
        assert_eq!(parse_history_key(&key), Some((0, "d", 1)));
        assert_eq!(parse_history_key("no separators"), None);
        assert!(history_entry(&key, b"not json").is_none());
    }

    #[test]
    fn downsampling_summarises_each_interval() {
        let points = [(0, 1.0), (500, 3.0), (1_000, 10.0), (2_500, 4.0)];
        let buckets = downsample(&points, 0, 1_000);
        assert_eq!(buckets.len(), 3);
        assert_eq!(
            (buckets[0].1.count, buckets[0].1.mean, buckets[0].1.max),
            (2, 2.0, 3.0)
        );
        assert_eq!(buckets[2].0, 2_000);
    }
}
