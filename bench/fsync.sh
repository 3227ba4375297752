#!/usr/bin/env bash
# The cost of an fdatasync on this machine's disk when a file grows (appending, as the audit log
# did) and when it overwrites blocks written ahead (as it does now, docs/audit.md): 3,000 syncs
# of 3 KB each way, in the data directory's file system.
#
#   bash bench/fsync.sh [DIR]    # DIR defaults to the repository's target/
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target}
mkdir -p "$DIR"
python3 - "$DIR" <<'PY'
import os, sys, time

def run(ahead):
    path = os.path.join(sys.argv[1], "fsync-bench.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        if ahead:
            os.write(fd, b"\0" * (64 << 20))
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        waits = []
        cpu = time.process_time()
        for _ in range(3000):
            os.write(fd, b"x" * 3000)
            t = time.perf_counter()
            os.fdatasync(fd)
            waits.append(time.perf_counter() - t)
        cpu = time.process_time() - cpu
    finally:
        os.close(fd)
        os.remove(path)
    waits.sort()
    pct = lambda q: waits[int(q * (len(waits) - 1))] * 1e3
    name = "written_ahead" if ahead else "appending"
    print(f"fdatasync {name} p50_ms={pct(0.5):.3f} p99_ms={pct(0.99):.3f} cpu_us_per_sync={cpu / 3000 * 1e6:.1f}")
    return pct(0.5)

grow = run(False)
ahead = run(True)
print(f"p50_ratio_written_ahead_to_appending={ahead / grow:.2f}")
PY
