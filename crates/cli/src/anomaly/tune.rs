//! `twinguard anomaly tune` and `evaluate`: a seeded search over the detector's configuration on
//! a set of NAB files, each candidate scored with the port of NAB's scorer ([`super::nab_sweep`]).
//!
//! The search: candidate 0 is the centre of the search space below (not the shipped default,
//! which was itself tuned on the whole corpus and would leak the other half's labels into a
//! held-out run); then a third of the budget draws uniformly from the space; the rest perturbs
//! one to three coordinates of the best candidate so far with a Gaussian step that shrinks as the
//! budget is spent, keeping a candidate only if it scores strictly better. A candidate's score is
//! NAB's normalized standard score of the files at the threshold NAB's optimizer would pick for
//! them. Everything is drawn from one SplitMix64 stream, so a seed and a budget reproduce a run.

use std::path::Path;

use serde::{Deserialize, Serialize};
use twinguard_telemetry::anomaly::DetectorConfig;
use twinguard_telemetry::nab::{self, Row};

use super::nab_sweep::{self, Corpus, CostMatrix};
use super::split::SplitMix64;

/// One NAB file in memory.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// `<category>/<file>.csv`, as in NAB's labels.
    pub key: String,
    pub rows: Vec<Row>,
    pub windows: Vec<(f64, f64)>,
}

/// Reads the named files (`<category>/<file>.csv` under `data`) and their windows.
pub fn load(data: &Path, windows_file: &Path, keys: &[String]) -> anyhow::Result<Vec<LoadedFile>> {
    let windows = nab::read_windows(windows_file)?;
    keys.iter()
        .map(|key| {
            let file_windows = windows.get(key).ok_or_else(|| {
                anyhow::anyhow!("{key} has no entry in {}", windows_file.display())
            })?;
            Ok(LoadedFile {
                key: key.clone(),
                rows: nab::read_series(&data.join(key))?,
                windows: file_windows.clone(),
            })
        })
        .collect()
}

/// The detector's scores for each file, as written to a results file, computed on `jobs`
/// threads.
pub fn score_files(config: &DetectorConfig, files: &[LoadedFile], jobs: usize) -> Vec<Vec<f64>> {
    let jobs = jobs.clamp(1, files.len().max(1));
    let mut out: Vec<Vec<f64>> = vec![Vec::new(); files.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..jobs)
            .map(|job| {
                scope.spawn(move || {
                    files
                        .iter()
                        .enumerate()
                        .skip(job)
                        .step_by(jobs)
                        .map(|(i, file)| {
                            let scores = nab::score_series(config, &file.rows)
                                .into_iter()
                                .map(nab_sweep::as_written)
                                .collect();
                            (i, scores)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            // A scoring thread cannot panic on input (the detector never panics); if one did,
            // its files keep empty scores and score as nothing flagged.
            if let Ok(done) = handle.join() {
                for (i, scores) in done {
                    out[i] = scores;
                }
            }
        }
    });
    out
}

/// The files and scores prepared for NAB's sweep under `cost`.
pub fn corpus(files: &[LoadedFile], scores: &[Vec<f64>], cost: CostMatrix) -> Corpus {
    let mut corpus = Corpus::new();
    for (file, scores) in files.iter().zip(scores) {
        let times: Vec<f64> = file.rows.iter().map(|r| r.time_s).collect();
        corpus.add_file(&times, scores, &file.windows, cost);
    }
    corpus
}

/// What a tuning run produced: the configuration, the threshold NAB's optimizer picks for it on
/// the files it was tuned on, and how it was found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuned {
    /// Format of this file (1).
    pub format: u32,
    pub detector: DetectorConfig,
    /// The standard profile's optimal threshold on the tuning files (port of NAB's optimizer).
    pub threshold: f64,
    /// The tuning files' normalized standard score at that threshold (port; in-sample).
    pub tuning_score: f64,
    /// Which files it was tuned on (`a`, `b` or `all` of the split file) and how many.
    pub tuned_on: String,
    pub tuning_files: usize,
    pub seed: u64,
    pub budget: u32,
}

impl Tuned {
    /// The shipped default, with `threshold` as its operating point.
    pub fn from_default(threshold: f64) -> Self {
        Self {
            format: 1,
            detector: DetectorConfig::default(),
            threshold,
            tuning_score: f64::NAN,
            tuned_on: "default".to_owned(),
            tuning_files: 0,
            seed: 0,
            budget: 0,
        }
    }
}

/// Maps a score monotonically so that `threshold` becomes 0.5 (scores below it stay below 0.5 as
/// written, scores at or above it are at least 0.5): results of configurations tuned apart can
/// then be scored by NAB at one fixed threshold, 0.5, that no test label chose.
pub fn calibrate(score: f64, threshold: f64) -> f64 {
    let t = threshold.clamp(1e-6, 1.0 - 1e-6);
    let s = score.clamp(0.0, 1.0);
    if s >= t {
        (0.5 + 0.5 * (s - t) / (1.0 - t)).max(0.5)
    } else {
        (0.5 * s / t).min(0.499_999)
    }
}

/// One dimension of the search space, as a coordinate in [0, 1].
struct Param {
    name: &'static str,
    low: f64,
    high: f64,
    log: bool,
}

const SEGMENT_LAYOUTS: [[u16; 8]; 4] = [
    [1, 1, 1, 1, 2, 2, 4, 4],
    [1, 1, 2, 2, 4, 4, 8, 8],
    [1, 2, 2, 4, 4, 8, 8, 16],
    [1, 1, 2, 4, 8, 8, 16, 16],
];

const PARAMS: [Param; 15] = [
    Param {
        name: "warmup",
        low: 50.0,
        high: 600.0,
        log: true,
    },
    Param {
        name: "segments",
        low: 0.0,
        high: 3.999,
        log: false,
    },
    Param {
        name: "match_radius",
        low: 0.01,
        high: 0.3,
        log: true,
    },
    Param {
        name: "learning_rate",
        low: 0.05,
        high: 0.9,
        log: false,
    },
    Param {
        name: "raw_cap",
        low: 1.5,
        high: 12.0,
        log: true,
    },
    Param {
        name: "season_weight",
        low: 0.0,
        high: 4.0,
        log: false,
    },
    Param {
        name: "season_k",
        low: 1.0,
        high: 8.0,
        log: true,
    },
    Param {
        name: "season_rate",
        low: 0.02,
        high: 0.5,
        log: true,
    },
    Param {
        name: "season_min_visits",
        low: 2.0,
        high: 20.0,
        log: true,
    },
    Param {
        name: "short_window",
        low: 1.0,
        high: 16.0,
        log: false,
    },
    Param {
        name: "long_window",
        low: 50.0,
        high: 2000.0,
        log: true,
    },
    Param {
        name: "min_sigma",
        low: 0.005,
        high: 0.2,
        log: true,
    },
    Param {
        name: "range_tolerance",
        low: 0.0,
        high: 0.2,
        log: false,
    },
    Param {
        name: "alert_level",
        low: 0.2,
        high: 0.9,
        log: false,
    },
    Param {
        name: "rest",
        low: 0.0,
        high: 200.0,
        log: false,
    },
];

fn value(param: &Param, u: f64) -> f64 {
    let u = u.clamp(0.0, 1.0);
    if param.log {
        (param.low.ln() + u * (param.high.ln() - param.low.ln())).exp()
    } else {
        param.low + u * (param.high - param.low)
    }
}

/// The configuration at a point of the search space.
pub fn config_at(point: &[f64; 15]) -> DetectorConfig {
    let mut c = DetectorConfig::default();
    for (param, &u) in PARAMS.iter().zip(point) {
        let v = value(param, u);
        let int = v.round().max(0.0);
        match param.name {
            "warmup" => c.warmup = int as u32,
            "segments" => c.segments = SEGMENT_LAYOUTS[(v as usize).min(SEGMENT_LAYOUTS.len() - 1)],
            "match_radius" => c.match_radius = v,
            "learning_rate" => c.learning_rate = v,
            "raw_cap" => c.raw_cap = v,
            "season_weight" => c.season_weight = v,
            "season_k" => c.season_k = v,
            "season_rate" => c.season_rate = v,
            "season_min_visits" => c.season_min_visits = int as u32,
            "short_window" => c.short_window = int as u32,
            "long_window" => c.long_window = int as u32,
            "min_sigma" => c.min_sigma = v,
            "range_tolerance" => c.range_tolerance = v,
            "alert_level" => c.alert_level = v,
            "rest" => c.rest = int as u32,
            _ => {}
        }
    }
    c
}

/// A candidate's result on the tuning files.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation {
    pub score: f64,
    pub threshold: f64,
}

/// Scores `config` on `files` as NAB's optimizer would (standard profile).
pub fn evaluate(config: &DetectorConfig, files: &[LoadedFile], jobs: usize) -> Evaluation {
    let scores = score_files(config, files, jobs);
    let corpus = corpus(files, &scores, nab_sweep::STANDARD);
    let best = corpus.best(nab_sweep::STANDARD);
    Evaluation {
        score: corpus.normalize(best.score, nab_sweep::STANDARD),
        threshold: best.threshold,
    }
}

/// Runs the search; `progress` hears about every improvement.
pub fn search(
    files: &[LoadedFile],
    budget: u32,
    seed: u64,
    jobs: usize,
    mut progress: impl FnMut(u32, f64, &DetectorConfig),
) -> (DetectorConfig, Evaluation) {
    let mut rng = SplitMix64::new(seed);
    let mut best_point = [0.5f64; 15];
    let mut best_config = config_at(&best_point);
    let mut best = evaluate(&best_config, files, jobs);
    progress(0, best.score, &best_config);
    let random_phase = budget / 3;
    for round in 1..budget {
        let mut point = best_point;
        if round <= random_phase {
            for u in &mut point {
                *u = rng.unit();
            }
        } else {
            let left = f64::from(budget - round) / f64::from((budget - random_phase).max(1));
            let sigma = 0.03 + 0.2 * left;
            let changes = 1 + rng.below(3);
            for _ in 0..changes {
                let i = rng.below(point.len());
                point[i] = (point[i] + sigma * rng.normal()).clamp(0.0, 1.0);
            }
        }
        let config = config_at(&point);
        let result = evaluate(&config, files, jobs);
        if result.score > best.score {
            best = result;
            best_point = point;
            best_config = config;
            progress(round, best.score, &best_config);
        }
    }
    (best_config, best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_keeps_the_order_and_puts_the_threshold_at_one_half() {
        for t in [0.05, 0.407734, 0.9, 0.999_999] {
            assert_eq!(calibrate(t, t), 0.5);
            assert!(nab_sweep::as_written(calibrate(t - 1e-6, t)) < 0.5);
            assert!(nab_sweep::as_written(calibrate(t + 1e-6, t)) >= 0.5);
            assert_eq!(calibrate(0.0, t), 0.0);
            assert_eq!(calibrate(1.0, t), 1.0);
            let mut last = -1.0;
            for i in 0..=100 {
                let c = calibrate(f64::from(i) / 100.0, t);
                assert!(c >= last, "not monotone at {i} for {t}");
                last = c;
            }
        }
    }

    #[test]
    fn every_point_of_the_search_space_is_a_usable_configuration() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..200 {
            let mut point = [0.0; 15];
            for u in &mut point {
                *u = rng.unit();
            }
            let c = config_at(&point);
            assert!((50..=600).contains(&c.warmup));
            assert!(c.match_radius > 0.0 && c.raw_cap >= 1.5 && c.min_sigma > 0.0);
            assert!((1..=16).contains(&c.short_window));
        }
        let lowest = config_at(&[0.0; 15]);
        assert_eq!(lowest.segments, SEGMENT_LAYOUTS[0]);
        assert_eq!(config_at(&[1.0; 15]).segments, SEGMENT_LAYOUTS[3]);
    }
}
