#!/usr/bin/env python3
"""Reference numbers for the port of NAB's scorer (crates/cli/src/anomaly/nab_sweep.rs).

Runs NAB's own Sweeper (nab/sweeper.py) and the threshold choice of nab/optimizer.py over three
small synthetic files and prints what the Rust test `the_port_matches_nabs_scorer` asserts.

    PYTHONPATH=/work/nab-checkout /work/nab-venv/bin/python scripts/nab-sweep-reference.py

The files (the Rust test builds the same ones): rows at times 300 s apart, score of row i
((i * 37 + 11) % 101) / 100 (ties included); file 1 has 200 rows and windows over rows 50..=70
and 150..=180; file 2 has 120 rows and windows over rows 10..=30 (partly probationary) and
90..=119 (to the end); file 3 has 80 rows and no window.
"""
from nab.sweeper import Sweeper

FILES = [(200, [(50, 70), (150, 180)]), (120, [(10, 30), (90, 119)]), (80, [])]
PROFILES = {
    "standard": {"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 1.0},
    "reward_low_FP_rate": {"tpWeight": 1.0, "fpWeight": 0.22, "fnWeight": 1.0},
    "reward_low_FN_rate": {"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 2.0},
}

for name, cost in PROFILES.items():
    sweeper = Sweeper(probationPercent=0.15, costMatrix=cost)
    rows = []
    for f, (n, windows) in enumerate(FILES):
        times = [i * 300 for i in range(n)]
        scores = [((i * 37 + 11) % 101) / 100 for i in range(n)]
        limits = [(times[a], times[b]) for a, b in windows]
        rows.extend(sweeper.calcSweepScore(times, scores, limits, "file%d" % f))
    by_threshold = sweeper.calcScoreByThreshold(rows)
    best = sorted(by_threshold, key=lambda x: x.score, reverse=True)[0]
    print("%s: %d thresholds; best %r at %r (tp %d fp %d fn %d tn %d)" % (
        name, len(by_threshold), best.score, best.threshold, best.tp, best.fp, best.fn, best.tn))
    print("  nothing flagged: %r" % by_threshold[0].score)
    for t in (0.5, 0.9):
        row = [x for x in by_threshold if x.threshold == t][0]
        print("  at %r: %r (tp %d fp %d fn %d tn %d)" % (t, row.score, row.tp, row.fp, row.fn, row.tn))
