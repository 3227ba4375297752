#!/usr/bin/env bash
# Scores the anomaly detector's NAB results with NAB's own scorer (a measurement, not part of CI).
#
#   cargo run --release -p twinguard -- anomaly nab --data ../shared/data/nab/data --out /tmp/nab-results
#   scripts/nab-score.sh --nab /work/nab-checkout --results /tmp/nab-results
#
# --nab is a checkout of github:numenta/NAB that the operator fetched beforehand (this script
# downloads nothing but NAB's Python dependencies from PyPI). The checkout is modified: the
# results are copied to its results/twinguard/, and NAB's runner records the optimized thresholds
# in config/thresholds.json and the scores in results/final_results.json. Keep it outside the repo.
#
# What runs: NAB's `run.py -d twinguard --optimize --score --normalize`, i.e. the threshold is
# optimized over the whole corpus for each profile (as NAB does for every detector), each file is
# scored at that threshold, and the total is normalized against NAB's null detector (0) and a
# perfect detector (100). Prints the standard, reward_low_FP_rate and reward_low_FN_rate scores.
#
# With --threshold T the optimize step is skipped: NAB scores every profile at the fixed threshold T
# (run.py -d twinguard --score --normalize -t FILE, FILE naming T for twinguard). This is how the
# held-out score is computed (scripts/nab-heldout.sh, docs/anomaly.md): no test label picks T.
#
# Python: a virtualenv (default <nab>/.venv, or --venv DIR) with the versions below, which run
# NAB's scorer on Python 3.11 (NAB's requirements.txt pins pandas 0.23, which does not build there).
set -euo pipefail

usage() {
    echo "usage: $0 --nab NAB_CHECKOUT --results RESULTS_DIR [--venv DIR] [--threshold T]" >&2
    exit 2
}

nab=""
results=""
venv=""
threshold=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nab) nab="${2:-}"; shift 2 ;;
        --results) results="${2:-}"; shift 2 ;;
        --venv) venv="${2:-}"; shift 2 ;;
        --threshold) threshold="${2:-}"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n "$nab" && -n "$results" ]] || usage
nab="$(cd "$nab" && pwd)"
results="$(cd "$results" && pwd)"
venv="${venv:-$nab/.venv}"

if [[ ! -f "$nab/run.py" || ! -d "$nab/results/null" ]]; then
    echo "$nab does not look like a NAB checkout (run.py, results/null/)" >&2
    exit 1
fi
if ! find "$results" -name 'twinguard_*.csv' -print -quit | grep -q .; then
    echo "no twinguard_*.csv under $results: run 'twinguard anomaly nab --out $results' first" >&2
    exit 1
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q "pandas==1.5.3" "numpy==1.26.4" "simplejson" "python-dateutil"

rm -rf "$nab/results/twinguard"
mkdir -p "$nab/results/twinguard"
cp -r "$results"/. "$nab/results/twinguard/"
# Score files from an earlier run would be read as data files.
find "$nab/results/twinguard" -maxdepth 1 -name 'twinguard_*_scores.csv' -delete

cd "$nab"
if [[ -n "$threshold" ]]; then
    fixed="$nab/config/twinguard_fixed_thresholds.json"
    "$venv/bin/python" -c 'import json, sys; json.dump({"twinguard": {p: {"threshold": float(sys.argv[1]), "score": None} for p in ("standard", "reward_low_FP_rate", "reward_low_FN_rate")}}, open(sys.argv[2], "w"))' "$threshold" "$fixed"
    "$venv/bin/python" run.py -d twinguard --score --normalize --skipConfirmation -t "$fixed"
    echo "threshold: fixed at $threshold for every profile (not optimized)"
else
    "$venv/bin/python" run.py -d twinguard --optimize --score --normalize --skipConfirmation
fi
"$venv/bin/python" - <<'EOF'
import json
scores = json.load(open("results/final_results.json"))["twinguard"]
for profile in ("standard", "reward_low_FP_rate", "reward_low_FN_rate"):
    print(f"twinguard NAB {profile}: {scores[profile]:.2f}")
EOF
echo "NAB commit: $(git -C "$nab" rev-parse HEAD 2>/dev/null || echo unknown)"
