#!/usr/bin/env bash
# Import jobs against single PUTs (issue 19): the same graph, N twins and 3N relationships, created
# by one import job (`PUT /jobs/imports/{id}`, the NDJSON file as the body) and by single PUTs
# (256 in flight over 8 HTTP/2 connections), on one server, in the same run, alternating which
# goes first in each round (ABBA, so the growing graph and a drift of the shared host fall on
# both). The import's time runs from the start of the upload to the job's `succeeded`.
#
#   bash bench/import.sh                     # 100,000 twins + 300,000 relationships, 2 rounds
#   TWINS=10000 ROUNDS=2 bash bench/import.sh  # a smoke run
#
# Prints one line per round and mode, then twins per second for both and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."

TWINS=${TWINS:-100000}
ROUNDS=${ROUNDS:-2}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release --locked -p twinguard -p twinguard-bench 2>&1 | tail -n 1
TG=$TARGET/release/twinguard
TB=$TARGET/release/twinguard-bench
WORK=$(mktemp -d /tmp/twinguard-import.XXXXXX)
DATA="$WORK/data"
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkfifo "$WORK/out"
TWINGUARD_LOG=warn "$TG" serve --data-dir "$DATA" --api-listen 127.0.0.1:0 --device-listen off \
    >"$WORK/out" 2>>"$WORK/server.log" &
SERVER_PID=$!
read -r line <"$WORK/out"
rm -f "$WORK/out"
BASE=${line#twinguard: api listening on }

echo "date=$(date -u +%FT%TZ) cores=$(nproc) commit=$(git rev-parse --short HEAD) twins=$TWINS relationships=$((TWINS * 3)) rounds=$ROUNDS"
"$TB" --data-dir "$DATA" --base "$BASE" import --twins "$TWINS" --relationships-per-twin 3 --rounds "$ROUNDS"
