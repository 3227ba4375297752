#!/usr/bin/env bash
# The anomaly detector's held-out NAB score, end to end (docs/anomaly.md, "Held-out procedure").
#
#   scripts/nab-heldout.sh --nab /work/nab-checkout --venv /work/nab-venv [--budget 400] [--seed 18]
#
# 1. `anomaly split`: NAB's 58 files into halves a and b (seeded, stratified by category).
# 2. `anomaly tune` on a, on b, and on all 58 files (same budget and seed), each with the port of
#    NAB's scorer; each tuned file records the threshold NAB's optimizer would pick on its own
#    tuning files.
# 3. Held out: the configuration tuned on a scores b's files and the one tuned on b scores a's,
#    each calibrated so that its own tuning threshold becomes 0.5; NAB's run.py then scores all 58
#    files at the fixed threshold 0.5 (no optimize step, so no test label chooses anything).
#    Because NAB's corpus score is a sum over files, the halves combine exactly: the corpus raw
#    score is a's raw plus b's raw, normalized once against NAB's null (-116) and perfect (116).
# 4. For comparison, in-sample: the configuration tuned on all 58, and the shipped default, each
#    scored by NAB's run.py with its usual optimize step (threshold picked on all labels).
#
# Bounded: the cost is proportional to --budget (about 0.25 s of detector time per candidate on
# the whole corpus), and each tuning run is killed after --max-minutes. Results go to --work
# (default: a new temporary directory). The NAB checkout is modified as by nab-score.sh.
set -euo pipefail

usage() {
    echo "usage: $0 --nab NAB_CHECKOUT [--venv DIR] [--budget N] [--seed S] [--max-minutes M] [--work DIR] [--bin TWINGUARD]" >&2
    exit 2
}

here="$(cd "$(dirname "$0")" && pwd)"
nab="" venv="" budget=400 seed=18 max_minutes=30 work="" bin=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nab) nab="${2:-}"; shift 2 ;;
        --venv) venv="${2:-}"; shift 2 ;;
        --budget) budget="${2:-}"; shift 2 ;;
        --seed) seed="${2:-}"; shift 2 ;;
        --max-minutes) max_minutes="${2:-}"; shift 2 ;;
        --work) work="${2:-}"; shift 2 ;;
        --bin) bin="${2:-}"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n "$nab" ]] || usage
nab="$(cd "$nab" && pwd)"
venv="${venv:-$nab/.venv}"
work="${work:-$(mktemp -d /tmp/nab-heldout.XXXXXX)}"
mkdir -p "$work"
if [[ -z "$bin" ]]; then
    (cd "$here/.." && cargo build --release -q -p twinguard)
    bin="$here/../target/release/twinguard"
fi
data="$nab/data"
windows="$nab/labels/combined_windows.json"
corpus=(--data "$data" --windows "$windows")

echo "== split (seed $seed)"
"$bin" anomaly split "${corpus[@]}" --seed "$seed" --out "$work/split.json"

for half in a b all; do
    echo "== tune on $half (budget $budget, seed $seed)"
    timeout "$((max_minutes * 60))" "$bin" anomaly tune "${corpus[@]}" --split "$work/split.json" \
        --half "$half" --budget "$budget" --seed "$seed" --out "$work/tuned-$half.json" 2>"$work/tune-$half.log"
done

echo "== held out: tuned on a -> b, tuned on b -> a, calibrated to 0.5"
rm -rf "$work/heldout"
"$bin" anomaly nab "${corpus[@]}" --config "$work/tuned-a.json" --split "$work/split.json" --half b --calibrate --out "$work/heldout"
"$bin" anomaly nab "${corpus[@]}" --config "$work/tuned-b.json" --split "$work/split.json" --half a --calibrate --out "$work/heldout"
"$here/nab-score.sh" --nab "$nab" --venv "$venv" --results "$work/heldout" --threshold 0.5 | tee "$work/heldout.txt"
# The halves' own scores, from NAB's per-file rows (its corpus score is their sum).
"$venv/bin/python" - "$nab" "$work/split.json" <<'PY' | tee -a "$work/heldout.txt"
import csv, json, sys
nab, split = sys.argv[1], json.load(open(sys.argv[2]))
def rows(path):
    return {r["File"]: float(r["Score"]) for r in csv.DictReader(open(path)) if r["File"]}
ours = rows(f"{nab}/results/twinguard/twinguard_standard_scores.csv")
null = rows(f"{nab}/results/null/null_standard_scores.csv")
labels = json.load(open(f"{nab}/labels/combined_windows.json"))
total = {"raw": 0.0, "null": 0.0, "perfect": 0.0}
for tuned, tested in (("b", "a"), ("a", "b")):
    raw = sum(ours[f] for f in split[tested])
    base = sum(null[f] for f in split[tested])
    perfect = sum(len(labels[f]) for f in split[tested])
    for k, v in (("raw", raw), ("null", base), ("perfect", perfect)):
        total[k] += v
    print(f"half {tested} (tuned on {tuned}): {100 * (raw - base) / (perfect - base):.2f} standard, NAB's scorer")
print(f"held-out corpus: {100 * (total['raw'] - total['null']) / (total['perfect'] - total['null']):.2f} standard, NAB's scorer (raw {total['raw']:.2f}, null {total['null']:.0f}, perfect {total['perfect']:.0f})")
PY
cp "$nab/results/twinguard/twinguard_standard_scores.csv" "$work/heldout-standard-scores.csv"

echo "== held out, threshold picked by NAB's optimizer on all labels (for comparison)"
"$here/nab-score.sh" --nab "$nab" --venv "$venv" --results "$work/heldout" | tee "$work/heldout-optimized.txt"

echo "== in-sample: tuned on all 58"
rm -rf "$work/insample"
"$bin" anomaly nab "${corpus[@]}" --config "$work/tuned-all.json" --out "$work/insample"
"$here/nab-score.sh" --nab "$nab" --venv "$venv" --results "$work/insample" | tee "$work/insample.txt"

echo "== in-sample: the shipped default"
rm -rf "$work/default"
"$bin" anomaly nab "${corpus[@]}" --out "$work/default"
"$here/nab-score.sh" --nab "$nab" --venv "$venv" --results "$work/default" | tee "$work/default.txt"

echo
echo "== summary (standard profile, NAB's scorer; work in $work)"
grep -h "^half \|^held-out corpus" "$work/heldout.txt"
echo "held out, threshold optimized on all labels: $(grep -h 'NAB standard' "$work/heldout-optimized.txt")"
echo "in-sample, tuned on all 58 (budget $budget, seed $seed): $(grep -h 'NAB standard' "$work/insample.txt")"
echo "in-sample, shipped default: $(grep -h 'NAB standard' "$work/default.txt")"
