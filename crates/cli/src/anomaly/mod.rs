//! `twinguard anomaly ...`: the stream anomaly detector (DI-6) on the Numenta Anomaly Benchmark.
//!
//! - `nab` runs a configuration (the detector's default, or a tuned one) over NAB's files and
//!   writes NAB's results format, for NAB's own scorer (`scripts/nab-score.sh`).
//! - `split`, `tune` and `evaluate` are the held-out procedure (`scripts/nab-heldout.sh`,
//!   `docs/anomaly.md`): split the corpus in two, tune on one half with a port of NAB's scorer,
//!   run the result on the other half.

pub mod nab_sweep;
pub mod split;
pub mod tune;

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use split::Split;
use tune::{LoadedFile, Tuned};

/// NAB's data directory and labels, shared by the subcommands.
#[derive(Args, Debug, Clone)]
pub struct Corpus {
    /// NAB's data directory, holding `<category>/<file>.csv` (e.g. ../shared/data/nab/data).
    #[arg(long)]
    pub data: PathBuf,
    /// NAB's labelled windows (default: <data>/../labels/combined_windows.json). The detector
    /// never sees them; `nab` writes them to the `label` column for NAB's format, `tune` and
    /// `evaluate` score with them.
    #[arg(long)]
    pub windows: Option<PathBuf>,
}

impl Corpus {
    fn windows_file(&self) -> PathBuf {
        self.windows.clone().unwrap_or_else(|| {
            self.data
                .join("..")
                .join("labels")
                .join("combined_windows.json")
        })
    }

    /// Every `<category>/<file>.csv` one level below the data directory, sorted.
    fn keys(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let read =
            |dir: &Path| fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()));
        for category in read(&self.data)? {
            let category = category?.path();
            let Some(category_name) = category.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !category.is_dir() {
                continue;
            }
            for file in read(&category)? {
                let file = file?.path();
                if let Some(name) = file.file_name().and_then(|n| n.to_str())
                    && file.is_file()
                    && name.ends_with(".csv")
                {
                    out.push(format!("{category_name}/{name}"));
                }
            }
        }
        out.sort();
        anyhow::ensure!(
            !out.is_empty(),
            "no data files under {}",
            self.data.display()
        );
        Ok(out)
    }

    /// The files of `half` of `split` (or every file without a split).
    fn select(&self, split: Option<&Path>, half: &str) -> anyhow::Result<Vec<String>> {
        match split {
            None => self.keys(),
            Some(path) => {
                let split: Split = read_json(path)?;
                split
                    .half(half)
                    .ok_or_else(|| anyhow::anyhow!("--half is a, b or all, not {half:?}"))
            }
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[derive(Args, Debug)]
pub struct NabArgs {
    #[command(flatten)]
    pub corpus: Corpus,
    /// Directory to write `<category>/twinguard_<file>.csv` into (created if missing; other
    /// files in it are left alone).
    #[arg(long)]
    pub out: PathBuf,
    /// A configuration written by `anomaly tune` (default: the detector's default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Only the files of one half of this split (`anomaly split`), chosen with --half.
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// a, b or all.
    #[arg(long, default_value = "all")]
    pub half: String,
    /// Map the scores monotonically so that the configuration's threshold (found on its tuning
    /// files) becomes 0.5: NAB then scores at the fixed threshold 0.5, chosen by no test label.
    #[arg(long, requires = "config")]
    pub calibrate: bool,
}

pub fn run_nab(args: NabArgs) -> anyhow::Result<()> {
    let tuned = match &args.config {
        Some(path) => read_json::<Tuned>(path)?,
        None => Tuned::from_default(0.5),
    };
    let keys = args.corpus.select(args.split.as_deref(), &args.half)?;
    let files = tune::load(&args.corpus.data, &args.corpus.windows_file(), &keys)
        .with_context(|| format!("reading the NAB corpus in {}", args.corpus.data.display()))?;
    let scores = tune::score_files(&tuned.detector, &files, 2);
    let (mut rows, mut labelled) = (0u64, 0u64);
    for (file, scores) in files.iter().zip(&scores) {
        let written: Vec<f64> = if args.calibrate {
            scores
                .iter()
                .map(|&s| tune::calibrate(s, tuned.threshold))
                .collect()
        } else {
            scores.clone()
        };
        labelled += write_results(&args.out, file, &written)?;
        rows += file.rows.len() as u64;
    }
    println!(
        "scored {} files ({rows} rows, {labelled} in {} labelled windows) with {}{}; results in {}",
        files.len(),
        files.iter().map(|f| f.windows.len()).sum::<usize>(),
        args.config
            .as_ref()
            .map_or("the default configuration".to_owned(), |p| p
                .display()
                .to_string()),
        if args.calibrate {
            format!(", threshold {} mapped to 0.5", tuned.threshold)
        } else {
            String::new()
        },
        args.out.display()
    );
    Ok(())
}

/// Writes `out/<category>/twinguard_<file>.csv`; returns the rows labelled 1.
fn write_results(out: &Path, file: &LoadedFile, scores: &[f64]) -> anyhow::Result<u64> {
    let (category, name) = file
        .key
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("{} is not <category>/<file>", file.key))?;
    let dir = out.join(category);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("twinguard_{name}"));
    let mut w = BufWriter::new(
        fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?,
    );
    writeln!(w, "timestamp,value,anomaly_score,label")?;
    let mut labelled = 0;
    for (row, &score) in file.rows.iter().zip(scores) {
        let label = file
            .windows
            .iter()
            .any(|&(start, end)| start <= row.time_s && row.time_s <= end);
        labelled += u64::from(label);
        writeln!(
            w,
            "{},{},{},{}",
            row.timestamp,
            row.value,
            twinguard_telemetry::nab::format_score(score),
            u8::from(label)
        )?;
    }
    w.flush()?;
    Ok(labelled)
}

#[derive(Args, Debug)]
pub struct SplitArgs {
    #[command(flatten)]
    pub corpus: Corpus,
    /// Seed of the shuffle within each category.
    #[arg(long, default_value_t = 18)]
    pub seed: u64,
    /// The split file to write (JSON: seed, a, b).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_split(args: SplitArgs) -> anyhow::Result<()> {
    let split = Split::new(&args.corpus.keys()?, args.seed);
    write_json(&args.out, &split)?;
    println!(
        "split {} files with seed {}: {} in a, {} in b; written to {}",
        split.a.len() + split.b.len(),
        split.seed,
        split.a.len(),
        split.b.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct TuneArgs {
    #[command(flatten)]
    pub corpus: Corpus,
    /// The split file (`anomaly split`); without it, every file.
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// The half to tune on: a, b or all.
    #[arg(long, default_value = "all")]
    pub half: String,
    /// Candidate configurations to score (the run's cost is proportional to it).
    #[arg(long, default_value_t = 400)]
    pub budget: u32,
    #[arg(long, default_value_t = 18)]
    pub seed: u64,
    /// Threads scoring files.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// The tuned configuration to write (JSON, read by `nab --config` and `evaluate`).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_tune(args: TuneArgs) -> anyhow::Result<()> {
    let keys = args.corpus.select(args.split.as_deref(), &args.half)?;
    let files = tune::load(&args.corpus.data, &args.corpus.windows_file(), &keys)?;
    eprintln!(
        "tuning on {} files ({}), budget {}, seed {}",
        files.len(),
        args.half,
        args.budget,
        args.seed
    );
    let (detector, best) = tune::search(
        &files,
        args.budget.max(1),
        args.seed,
        args.jobs,
        |round, score, _| {
            eprintln!("  candidate {round}: {score:.2}");
        },
    );
    let tuned = Tuned {
        format: 1,
        detector,
        threshold: best.threshold,
        tuning_score: best.score,
        tuned_on: args.half.clone(),
        tuning_files: files.len(),
        seed: args.seed,
        budget: args.budget,
    };
    write_json(&args.out, &tuned)?;
    println!(
        "tuned on {} files ({}): {:.2} (port of NAB's scorer, standard, in-sample) at threshold {}; written to {}",
        files.len(),
        args.half,
        best.score,
        best.threshold,
        args.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub corpus: Corpus,
    /// A configuration from `anomaly tune` (default: the detector's default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// The files to score: a, b or all.
    #[arg(long, default_value = "all")]
    pub half: String,
}

/// Prints the port's standard score of a configuration on some files, at the configuration's own
/// threshold (held out when the files are not the ones it was tuned on) and at the threshold
/// that is best for these files (which reads their labels). A quick estimate; NAB's scorer
/// gives the reported numbers.
pub fn run_evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    let tuned = match &args.config {
        Some(path) => read_json::<Tuned>(path)?,
        None => Tuned::from_default(DEFAULT_THRESHOLD),
    };
    let keys = args.corpus.select(args.split.as_deref(), &args.half)?;
    let files = tune::load(&args.corpus.data, &args.corpus.windows_file(), &keys)?;
    let scores = tune::score_files(&tuned.detector, &files, 2);
    let cost = nab_sweep::STANDARD;
    let corpus = tune::corpus(&files, &scores, cost);
    let own = corpus.at(tuned.threshold, cost);
    let best = corpus.best(cost);
    println!(
        "{} files ({}): standard {:.2} at the configuration's threshold {} ({} rows flagged in windows, {} outside); {:.2} at these files' best threshold {}",
        files.len(),
        args.half,
        corpus.normalize(own.score, cost),
        tuned.threshold,
        own.counts.tp,
        own.counts.fp,
        corpus.normalize(best.score, cost),
        best.threshold
    );
    Ok(())
}

/// The default configuration's operating point on the whole corpus (NAB's optimizer, standard
/// profile; `docs/benchmarks.md`).
const DEFAULT_THRESHOLD: f64 = 0.407734;
