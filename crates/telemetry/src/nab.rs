//! Runs the anomaly detector over the Numenta Anomaly Benchmark (NAB) corpus and writes NAB's
//! results format, so NAB's own scorer can judge it (DI-6).
//!
//! Input: `data_dir/<category>/<file>.csv` with the header `timestamp,value` and timestamps
//! `YYYY-MM-DD HH:MM:SS` (UTC), plus NAB's `labels/combined_windows.json`. Output:
//! `out_dir/<category>/twinguard_<file>.csv` with `timestamp,value,anomaly_score,label`, the
//! timestamp and value copied from the input row as written. A fresh [`Detector`] with the same
//! configuration scores every file; the labels are written for NAB's format only and never reach
//! the detector.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use time::PrimitiveDateTime;
use time::macros::format_description;

use crate::anomaly::{Detector, DetectorConfig};

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NabSummary {
    /// Data files scored.
    pub files: usize,
    /// Rows scored, over all files.
    pub rows: u64,
    /// Rows inside a labelled anomaly window.
    pub labelled_rows: u64,
    /// Anomaly windows over all scored files.
    pub windows: usize,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NabError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Row {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("cannot parse the windows file {path}: {reason}")]
    Windows { path: PathBuf, reason: String },
    #[error("the windows file has no entry for {file}")]
    NoWindows { file: String },
    #[error("no data files under {0}")]
    NoData(PathBuf),
}

/// One input row: the text as read (kept for the output) and the parsed time and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub timestamp: String,
    pub value: String,
    /// Seconds since the Unix epoch.
    pub time_s: f64,
    /// The value; NaN when the text is not a number (the detector scores it 1).
    pub reading: f64,
}

/// Anomaly windows by file key (`<category>/<file>.csv`), each as (start, end) in Unix seconds,
/// both ends included.
pub type Windows = BTreeMap<String, Vec<(f64, f64)>>;

/// Runs a fresh `Detector` over every `<category>/<file>.csv` under `data_dir` and writes
/// `out_dir/<category>/twinguard_<file>.csv` with `timestamp,value,anomaly_score,label` (label 1
/// when the row's timestamp lies in one of the file's windows in `windows_file`, NAB's
/// combined_windows.json, else 0). Returns counts.
pub fn run(
    data_dir: &Path,
    windows_file: &Path,
    out_dir: &Path,
    config: &DetectorConfig,
) -> Result<NabSummary, NabError> {
    let windows = read_windows(windows_file)?;
    let files = data_files(data_dir)?;
    if files.is_empty() {
        return Err(NabError::NoData(data_dir.to_path_buf()));
    }
    let mut summary = NabSummary::default();
    for (category, name) in files {
        let key = format!("{category}/{name}");
        let file_windows = windows
            .get(&key)
            .ok_or_else(|| NabError::NoWindows { file: key.clone() })?;
        let rows = read_series(&data_dir.join(&category).join(&name))?;
        let scores = score_series(config, &rows);

        let dir = out_dir.join(&category);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| NabError::Io {
                path: dir.clone(),
                source,
            })?;
        let path = dir.join(format!("twinguard_{name}"));
        let labelled = write_results(&path, &rows, &scores, file_windows)?;

        summary.files += 1;
        summary.rows += rows.len() as u64;
        summary.labelled_rows += labelled;
        summary.windows += file_windows.len();
    }
    Ok(summary)
}

/// Scores `rows` in order with a fresh detector.
pub fn score_series(config: &DetectorConfig, rows: &[Row]) -> Vec<f64> {
    let mut detector = Detector::new(config);
    rows.iter()
        .map(|row| detector.update(row.time_s, row.reading))
        .collect()
}

/// Reads a NAB data file (`timestamp,value` with a header).
pub fn read_series(path: &Path) -> Result<Vec<Row>, NabError> {
    let text = fs::read_to_string(path).map_err(|source| NabError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let row_error = |line: usize, reason: &str| NabError::Row {
        path: path.to_path_buf(),
        line,
        reason: reason.to_owned(),
    };
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if index == 0 {
            if !line.starts_with("timestamp") {
                return Err(row_error(1, "expected the header timestamp,value"));
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (timestamp, value) = line
            .split_once(',')
            .ok_or_else(|| row_error(index + 1, "expected timestamp,value"))?;
        let time_s = parse_time(timestamp)
            .ok_or_else(|| row_error(index + 1, "timestamp is not YYYY-MM-DD HH:MM:SS"))?;
        rows.push(Row {
            timestamp: timestamp.to_owned(),
            value: value.to_owned(),
            time_s,
            reading: value.trim().parse().unwrap_or(f64::NAN),
        });
    }
    Ok(rows)
}

/// Reads NAB's combined_windows.json: `{ "<category>/<file>.csv": [[start, end], ...] }`.
pub fn read_windows(path: &Path) -> Result<Windows, NabError> {
    let text = fs::read_to_string(path).map_err(|source| NabError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let windows_error = |reason: String| NabError::Windows {
        path: path.to_path_buf(),
        reason,
    };
    let raw: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(&text).map_err(|e| windows_error(e.to_string()))?;
    let mut out = Windows::new();
    for (file, list) in raw {
        let mut parsed = Vec::with_capacity(list.len());
        for (start, end) in list {
            let start_s = parse_time(&start)
                .ok_or_else(|| windows_error(format!("bad window start {start:?} for {file}")))?;
            let end_s = parse_time(&end)
                .ok_or_else(|| windows_error(format!("bad window end {end:?} for {file}")))?;
            parsed.push((start_s, end_s));
        }
        out.insert(file, parsed);
    }
    Ok(out)
}

/// Parses `YYYY-MM-DD HH:MM:SS` with an optional fraction of a second, as UTC, into seconds
/// since the Unix epoch.
pub fn parse_time(text: &str) -> Option<f64> {
    let text = text.trim();
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let parsed = PrimitiveDateTime::parse(whole, format).ok()?;
    let mut seconds = parsed.assume_utc().unix_timestamp() as f64;
    if let Some(fraction) = fraction {
        if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        seconds += format!("0.{fraction}").parse::<f64>().ok()?;
    }
    Some(seconds)
}

/// `(category, file name)` of every `.csv` file one level below `data_dir`, sorted.
fn data_files(data_dir: &Path) -> Result<Vec<(String, String)>, NabError> {
    let io_error = |path: &Path, source| NabError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for category in fs::read_dir(data_dir).map_err(|e| io_error(data_dir, e))? {
        let category = category.map_err(|e| io_error(data_dir, e))?.path();
        if !category.is_dir() {
            continue;
        }
        let Some(category_name) = category.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        for file in fs::read_dir(&category).map_err(|e| io_error(&category, e))? {
            let file = file.map_err(|e| io_error(&category, e))?.path();
            let Some(file_name) = file.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if file.is_file() && file_name.ends_with(".csv") {
                out.push((category_name.to_owned(), file_name.to_owned()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes one results file; returns the number of rows labelled 1.
fn write_results(
    path: &Path,
    rows: &[Row],
    scores: &[f64],
    windows: &[(f64, f64)],
) -> Result<u64, NabError> {
    let io_error = |source| NabError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error)?;
    let mut out = BufWriter::new(file);
    writeln!(out, "timestamp,value,anomaly_score,label").map_err(io_error)?;
    let mut labelled = 0u64;
    for (row, score) in rows.iter().zip(scores) {
        let label = windows
            .iter()
            .any(|&(start, end)| start <= row.time_s && row.time_s <= end);
        labelled += u64::from(label);
        writeln!(
            out,
            "{},{},{},{}",
            row.timestamp,
            row.value,
            format_score(*score),
            u8::from(label)
        )
        .map_err(io_error)?;
    }
    out.flush().map_err(io_error)?;
    Ok(labelled)
}

/// Scores are written with six decimals, the precision NAB's threshold sweep works at.
pub fn format_score(score: f64) -> String {
    format!("{:.6}", score.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nab_timestamps_parse_as_utc_seconds() {
        assert_eq!(parse_time("1970-01-01 00:00:00"), Some(0.0));
        assert_eq!(parse_time("2014-04-10 07:15:00"), Some(1_397_114_100.0));
        assert_eq!(
            parse_time("2014-04-10 07:15:00.000000"),
            Some(1_397_114_100.0)
        );
        assert_eq!(parse_time("2014-04-10 07:15:00.5"), Some(1_397_114_100.5));
        assert_eq!(parse_time("2014-04-10T07:15:00"), None);
        assert_eq!(parse_time("2014-04-10 07:15:00."), None);
    }

    #[test]
    fn a_corpus_is_scored_and_labelled_in_nab_format() {
        let dir = std::env::temp_dir().join(format!("twinguard-nab-test-{}", std::process::id()));
        let data = dir.join("data").join("cat");
        fs::create_dir_all(&data).unwrap();
        let mut csv = String::from("timestamp,value\n");
        for i in 0..400u32 {
            let minute = i % 60;
            let hour = i / 60;
            let value = if i == 300 { 500.0 } else { f64::from(i % 5) };
            csv.push_str(&format!("2020-01-01 {hour:02}:{minute:02}:00,{value}\n"));
        }
        fs::write(data.join("f.csv"), csv).unwrap();
        let windows = dir.join("windows.json");
        fs::write(
            &windows,
            r#"{"cat/f.csv": [["2020-01-01 04:50:00.000000", "2020-01-01 05:10:00.000000"]]}"#,
        )
        .unwrap();
        let out = dir.join("out");
        let summary = run(
            &dir.join("data"),
            &windows,
            &out,
            &DetectorConfig::default(),
        )
        .unwrap();
        assert_eq!(
            summary,
            NabSummary {
                files: 1,
                rows: 400,
                labelled_rows: 21,
                windows: 1
            }
        );
        let written = fs::read_to_string(out.join("cat").join("twinguard_f.csv")).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines[0], "timestamp,value,anomaly_score,label");
        assert_eq!(lines.len(), 401);
        assert!(lines[1].starts_with("2020-01-01 00:00:00,0,"));
        let spike: Vec<&str> = lines[301].split(',').collect();
        assert_eq!(spike[0], "2020-01-01 05:00:00");
        assert_eq!(spike[1], "500");
        assert!(spike[2].parse::<f64>().unwrap() >= 0.9);
        assert_eq!(spike[3], "1");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_missing_from_the_windows_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("twinguard-nab-miss-{}", std::process::id()));
        let data = dir.join("data").join("cat");
        fs::create_dir_all(&data).unwrap();
        fs::write(
            data.join("f.csv"),
            "timestamp,value\n2020-01-01 00:00:00,1\n",
        )
        .unwrap();
        let windows = dir.join("windows.json");
        fs::write(&windows, "{}").unwrap();
        let err = run(
            &dir.join("data"),
            &windows,
            &dir.join("out"),
            &DetectorConfig::default(),
        );
        assert!(matches!(err, Err(NabError::NoWindows { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
