//! `twinguard anomaly nab`: runs the stream anomaly detector (DI-6) over the Numenta Anomaly
//! Benchmark corpus and writes NAB's results format, for NAB's own scorer
//! (`scripts/nab-score.sh`). One configuration, the detector's default, for the whole corpus.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use twinguard_telemetry::anomaly::DetectorConfig;

#[derive(Args, Debug)]
pub struct NabArgs {
    /// NAB's data directory, holding `<category>/<file>.csv` (e.g. ../shared/data/nab/data).
    #[arg(long)]
    pub data: PathBuf,
    /// NAB's labelled windows (default: <data>/../labels/combined_windows.json). Only the
    /// `label` column of the output uses them; the detector never sees them.
    #[arg(long)]
    pub windows: Option<PathBuf>,
    /// Directory to write `<category>/twinguard_<file>.csv` into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_nab(args: NabArgs) -> anyhow::Result<()> {
    let windows = args.windows.clone().unwrap_or_else(|| {
        args.data
            .join("..")
            .join("labels")
            .join("combined_windows.json")
    });
    let summary =
        twinguard_telemetry::nab::run(&args.data, &windows, &args.out, &DetectorConfig::default())
            .with_context(|| format!("scoring the NAB corpus in {}", args.data.display()))?;
    println!(
        "scored {} files ({} rows, {} in {} labelled windows); results in {}",
        summary.files,
        summary.rows,
        summary.labelled_rows,
        summary.windows,
        args.out.display()
    );
    Ok(())
}
