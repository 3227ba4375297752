//! A port of NAB's scoring (`nab/sweeper.py` and the threshold search of `nab/optimizer.py`, NAB
//! commit `ea702d75`), so that `twinguard anomaly tune` can score thousands of candidate
//! configurations without Python in the loop. It is for the search only: every number this
//! project reports comes from NAB's own `run.py` (`scripts/nab-score.sh`, `scripts/nab-heldout.sh`).
//!
//! What is ported, line for line:
//! - Each file's first `min(floor(0.15 n), 750)` rows are probationary and not scored.
//! - A row inside a labelled window would earn `tp × S(p) / S(-1)` if flagged, where `p` is its
//!   position relative to the window's right edge (`-(right - i + 1) / width`) and
//!   `S(p) = 2 sigmoid(-5p) - 1`; a window counts once, at its best flagged row, and an
//!   unflagged window costs `fn`.
//! - A flagged row outside every window costs `fp × S(distance past the previous window's right
//!   edge / (width - 1))`, or `fp × -1` before the first window.
//! - The threshold sweep: rows sorted by score, highest first; a row is flagged at threshold `t`
//!   when its score is at least `t`; the threshold with the highest corpus total wins (the first,
//!   i.e. the highest, among equals, as Python's stable sort keeps them).
//! - Normalisation as `run.py --normalize`: `100 (score - null) / (perfect - null)`, where null is
//!   the total with nothing flagged and perfect is `tp` times the number of windows.
//!
//! Differences: the running total is updated incrementally instead of being re-summed at each
//! threshold (rounding differences around 1e-12), and a window whose end is not one of the file's
//! timestamps ends at the last row before it (NAB raises an error instead).

/// The weights of one NAB profile (`config/profiles.json`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostMatrix {
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
}

/// NAB's `standard` profile.
pub const STANDARD: CostMatrix = CostMatrix {
    tp: 1.0,
    fp: 0.11,
    fn_: 1.0,
};
/// NAB's `probationaryPercent`.
const PROBATION_PERCENT: f64 = 0.15;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// NAB's `scaledSigmoid`.
fn scaled_sigmoid(position: f64) -> f64 {
    if position > 3.0 {
        -1.0
    } else {
        2.0 * sigmoid(-5.0 * position) - 1.0
    }
}

/// One scorable row: its anomaly score, what it earns if flagged, and its window (an index
/// unique over the corpus), if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub score: f64,
    pub sweep: f64,
    pub window: Option<u32>,
}

/// The scorable rows of a set of files, ready for the sweep.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    points: Vec<Point>,
    /// Windows that have at least one scorable row (NAB's null score is `-fn` times this).
    scored_windows: u32,
    /// Windows in the labels of the files added (NAB's perfect score is `tp` times this).
    labelled_windows: u32,
}

impl Corpus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one file, as NAB's `calcSweepScore`: `times` in seconds (the file's rows in order),
    /// `scores` the detector's scores (already rounded as they are written), `windows` the
    /// file's labelled windows `(start, end)` in seconds, in order.
    pub fn add_file(
        &mut self,
        times: &[f64],
        scores: &[f64],
        windows: &[(f64, f64)],
        cost: CostMatrix,
    ) {
        let n = times.len().min(scores.len());
        let times = &times[..n];
        let max_tp = scaled_sigmoid(-1.0);
        let probation = ((PROBATION_PERCENT * n as f64).floor()).min(PROBATION_PERCENT * 5000.0);
        self.labelled_windows += windows.len() as u32;

        let mut pending = windows.iter().peekable();
        // The open window: (corpus-wide id, right index, width, end time).
        let mut current: Option<(u32, usize, f64, f64)> = None;
        let mut previous: Option<(usize, f64)> = None;
        let mut next_id = self.labelled_windows - windows.len() as u32;
        let mut registered: Option<u32> = None;
        for (i, (&time, &score)) in times.iter().zip(scores).enumerate() {
            if let Some(&&(start, end)) = pending.peek()
                && time == start
            {
                pending.next();
                let left = i;
                let right = times
                    .iter()
                    .position(|&t| t == end)
                    .unwrap_or_else(|| times.iter().rposition(|&t| t <= end).unwrap_or(left));
                let width = (right as f64 - left as f64) + 1.0;
                current = Some((next_id, right, width, end));
                next_id += 1;
            }
            let (sweep, window) = match current {
                Some((id, right, width, _)) => {
                    let position = -(right as f64 - i as f64 + 1.0) / width;
                    (scaled_sigmoid(position) * cost.tp / max_tp, Some(id))
                }
                None => {
                    let unweighted = match previous {
                        None => -1.0,
                        Some((right, width)) => {
                            scaled_sigmoid((right as f64 - i as f64).abs() / (width - 1.0))
                        }
                    };
                    (unweighted * cost.fp, None)
                }
            };
            if i as f64 >= probation {
                if let Some(id) = window
                    && registered != Some(id)
                {
                    registered = Some(id);
                    self.scored_windows += 1;
                }
                self.points.push(Point {
                    score,
                    sweep,
                    window,
                });
            }
            if let Some((_, right, width, end)) = current
                && (time == end || i == right)
            {
                previous = Some((i, width));
                current = None;
            }
        }
    }

    /// NAB's null score for these files: nothing flagged, every scored window missed.
    pub fn null_score(&self, cost: CostMatrix) -> f64 {
        -cost.fn_ * f64::from(self.scored_windows)
    }

    /// NAB's perfect score for these files.
    pub fn perfect_score(&self, cost: CostMatrix) -> f64 {
        cost.tp * f64::from(self.labelled_windows)
    }

    /// `run.py --normalize`: 0 for the null detector, 100 for a perfect one.
    pub fn normalize(&self, raw: f64, cost: CostMatrix) -> f64 {
        let null = self.null_score(cost);
        let span = self.perfect_score(cost) - null;
        if span > 0.0 {
            100.0 * (raw - null) / span
        } else {
            0.0
        }
    }

    /// NAB's `calcScoreByThreshold`: the total and the counts at every distinct threshold, highest
    /// first (the first entry, threshold 1.1, flags nothing).
    pub fn by_threshold(&self, cost: CostMatrix) -> Vec<ThresholdScore> {
        let mut points = self.points.clone();
        points.sort_by(|a, b| b.score.total_cmp(&a.score));
        let windows = self.labelled_windows as usize;
        // Each window's part: -fn until one of its rows is flagged, then its best flagged row.
        let mut parts: Vec<Option<f64>> = vec![None; windows];
        for p in &points {
            if let Some(slot) = p.window.and_then(|w| parts.get_mut(w as usize)) {
                *slot = Some(-cost.fn_);
            }
        }
        let mut total: f64 = parts.iter().flatten().sum();
        let mut counts = Counts {
            tn: points.iter().filter(|p| p.window.is_none()).count() as u64,
            fn_: points.iter().filter(|p| p.window.is_some()).count() as u64,
            ..Counts::default()
        };
        let mut out = Vec::new();
        let mut threshold = 1.1;
        for p in &points {
            if p.score != threshold {
                out.push(ThresholdScore {
                    threshold,
                    score: total,
                    counts,
                });
                threshold = p.score;
            }
            match p.window {
                Some(w) => {
                    counts.tp += 1;
                    counts.fn_ -= 1;
                    if let Some(Some(part)) = parts.get_mut(w as usize)
                        && p.sweep > *part
                    {
                        total += p.sweep - *part;
                        *part = p.sweep;
                    }
                }
                None => {
                    counts.fp += 1;
                    counts.tn -= 1;
                    total += p.sweep;
                }
            }
        }
        out.push(ThresholdScore {
            threshold,
            score: total,
            counts,
        });
        out
    }

    /// NAB's `optimizeThreshold`: the threshold with the highest total (the highest threshold
    /// among equals).
    pub fn best(&self, cost: CostMatrix) -> ThresholdScore {
        let mut best = ThresholdScore {
            threshold: 1.1,
            score: f64::NEG_INFINITY,
            counts: Counts::default(),
        };
        for row in self.by_threshold(cost) {
            if row.score > best.score {
                best = row;
            }
        }
        best
    }

    /// NAB's `scoreDataSet` lookup: the row for `threshold` (flagging scores at or above it).
    pub fn at(&self, threshold: f64, cost: CostMatrix) -> ThresholdScore {
        let rows = self.by_threshold(cost);
        let mut previous = rows.first().copied();
        for row in &rows {
            if row.threshold == threshold {
                return *row;
            }
            if row.threshold < threshold {
                break;
            }
            previous = Some(*row);
        }
        previous.unwrap_or(ThresholdScore {
            threshold,
            score: self.null_score(cost),
            counts: Counts::default(),
        })
    }
}

/// Row counts at a threshold (scorable rows only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub tp: u64,
    pub tn: u64,
    pub fp: u64,
    pub fn_: u64,
}

/// NAB's `ThresholdScore`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdScore {
    pub threshold: f64,
    pub score: f64,
    pub counts: Counts,
}

/// A score as NAB reads it back from the results file (6 decimals, see `format_score`).
pub fn as_written(score: f64) -> f64 {
    (score.clamp(0.0, 1.0) * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NAB's `reward_low_FP_rate` profile.
    pub const REWARD_LOW_FP: CostMatrix = CostMatrix {
        tp: 1.0,
        fp: 0.22,
        fn_: 1.0,
    };
    /// NAB's `reward_low_FN_rate` profile.
    pub const REWARD_LOW_FN: CostMatrix = CostMatrix {
        tp: 1.0,
        fp: 0.11,
        fn_: 2.0,
    };

    /// The synthetic files of `scripts/nab-sweep-reference.py`: (rows, windows as row ranges).
    fn synthetic(cost: CostMatrix) -> Corpus {
        let files: [(usize, &[(usize, usize)]); 3] = [
            (200, &[(50, 70), (150, 180)]),
            (120, &[(10, 30), (90, 119)]),
            (80, &[]),
        ];
        let mut corpus = Corpus::new();
        for (n, windows) in files {
            let times: Vec<f64> = (0..n).map(|i| (i * 300) as f64).collect();
            let scores: Vec<f64> = (0..n)
                .map(|i| ((i * 37 + 11) % 101) as f64 / 100.0)
                .collect();
            let limits: Vec<(f64, f64)> =
                windows.iter().map(|&(a, b)| (times[a], times[b])).collect();
            corpus.add_file(&times, &scores, &limits, cost);
        }
        corpus
    }

    fn counts(tp: u64, fp: u64, fn_: u64, tn: u64) -> Counts {
        Counts { tp, tn, fp, fn_ }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Reference numbers printed by NAB's own `Sweeper` (NAB commit ea702d75, Python 3.11,
    /// pandas 1.5.3) with `PYTHONPATH=<NAB checkout> python scripts/nab-sweep-reference.py`.
    #[test]
    fn the_port_matches_nabs_scorer() {
        // (profile, best score, best threshold, best counts, score at 0.5, score at 0.9, null)
        let reference = [
            (
                STANDARD,
                0.9901108226871557,
                0.91,
                counts(9, 25, 86, 220),
                -9.019001156253179,
                0.8239948381341564,
                -4.0,
            ),
            (
                REWARD_LOW_FP,
                -0.28440374123985623,
                0.98,
                counts(3, 7, 92, 238),
                -21.949735309720175,
                -1.9883479633707721,
                -4.0,
            ),
            (
                REWARD_LOW_FN,
                0.9901108226871557,
                0.91,
                counts(9, 25, 86, 220),
                -9.019001156253179,
                0.8239948381341564,
                -8.0,
            ),
        ];
        for (cost, best_score, best_threshold, best_counts, at_half, at_nine, null) in reference {
            let corpus = synthetic(cost);
            let rows = corpus.by_threshold(cost);
            assert_eq!(rows.len(), 102);
            assert!(close(rows[0].score, null) && close(corpus.null_score(cost), null));
            let best = corpus.best(cost);
            assert!(
                close(best.score, best_score),
                "{cost:?}: {} vs {best_score}",
                best.score
            );
            assert_eq!(best.threshold, best_threshold);
            assert_eq!(best.counts, best_counts);
            let half = corpus.at(0.5, cost);
            assert!(
                close(half.score, at_half),
                "{cost:?}: {} vs {at_half}",
                half.score
            );
            assert_eq!(half.counts, counts(47, 126, 48, 119));
            let nine = corpus.at(0.9, cost);
            assert!(
                close(nine.score, at_nine),
                "{cost:?}: {} vs {at_nine}",
                nine.score
            );
            assert_eq!(nine.counts, counts(11, 27, 84, 218));
        }
    }

    #[test]
    fn normalization_puts_null_at_0_and_perfect_at_100() {
        let corpus = synthetic(STANDARD);
        assert_eq!(corpus.normalize(-4.0, STANDARD), 0.0);
        assert_eq!(corpus.normalize(4.0, STANDARD), 100.0);
        assert_eq!(Corpus::new().normalize(1.0, STANDARD), 0.0);
    }
}
