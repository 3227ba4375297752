#!/usr/bin/env bash
# Event delivery (issue 19) on the release build, in one run against this machine's NATS server:
#
#   1. writes per second and the server's CPU per write with delivery off (no endpoint, no
#      route: the change feed is still written and trimmed, it has no off switch) and on (a
#      natsJetStream endpoint and a route `true`), alternating off/on in ABBA order;
#   2. events per second delivered end to end (first write to the last event a JetStream
#      consumer received), in every "on" round;
#   3. at half of the peak write rate with delivery on, offered open loop for LATENCY_SECONDS,
#      alternating off/on in ABBA order: the server's CPU per write with delivery off and on at
#      the same load (the cost of delivery, free of how batching changes with the rate), and in
#      the "on" rounds the time from each write's HTTP acknowledgement to the consumer
#      receiving its event: p50, p99, max.
#
#   bash bench/events.sh                                   # 2 rounds of 20,000 writes, 10 s latency
#   ROUNDS=4 WRITES=50000 LATENCY_SECONDS=30 bash bench/events.sh   # a longer run
#
# Needs a NATS server with JetStream at NATS (default 127.0.0.1:4222). The benchmark creates a
# stream of its own (twinguard-bench-PID-MILLIS, limited to an hour and 2 GiB in case it is
# killed) and deletes it at the end; the server runs on a fresh temporary data directory with
# `--egress-allow NATS` and is stopped at the end.
#
# Writes: `load` creates TWINS twins first; each write then sets one twin's `temperature` to a
# value unique over the run (even writes PATCH, odd writes PUT the whole twin), 256 at a time
# over 8 HTTP/2 connections like `load`. Every write makes one `Twin.Update` event; the consumer
# matches it to its write by that value. CPU per write counts from the first write until all
# the phase's work is done (with delivery on: until the last event was received), from
# /proc/PID/stat, which varies less than throughput when the load generator shares the cores.
set -euo pipefail
cd "$(dirname "$0")/.."

TWINS=${TWINS:-10000}
WRITES=${WRITES:-20000}
ROUNDS=${ROUNDS:-2}
LATENCY_SECONDS=${LATENCY_SECONDS:-10}
NATS=${NATS:-127.0.0.1:4222}

(exec 3<>"/dev/tcp/${NATS%:*}/${NATS##*:}") 2>/dev/null ||
    { echo "no NATS server at $NATS (start one with: nats-server -js)" >&2; exit 1; }

cargo build --release --locked -p twinguard -p twinguard-bench 2>&1 | tail -n 1
TG=target/release/twinguard
TB=target/release/twinguard-bench
WORK=$(mktemp -d /tmp/twinguard-events.XXXXXX)
DATA="$WORK/data"
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkfifo "$WORK/out"
TWINGUARD_LOG=warn "$TG" serve --data-dir "$DATA" --api-listen 127.0.0.1:0 --device-listen off \
    --egress-allow "$NATS" >"$WORK/out" 2>"$WORK/server.log" &
SERVER_PID=$!
read -r line <"$WORK/out"
rm -f "$WORK/out"
BASE=${line#twinguard: api listening on }
# The broker's CPU per event, when it runs on this machine (it shares the two cores).
NATS_PID=$(pgrep -x nats-server | head -n 1 || true)

echo "date=$(date -u +%FT%TZ) cores=$(nproc) commit=$(git rev-parse --short HEAD) twins=$TWINS writes_per_round=$WRITES rounds=$ROUNDS latency_seconds=$LATENCY_SECONDS nats=$NATS"
"$TB" --data-dir "$DATA" --base "$BASE" events --nats "nats://$NATS" --twins "$TWINS" \
    --writes "$WRITES" --rounds "$ROUNDS" --latency-seconds "$LATENCY_SECONDS" \
    --server-pid "$SERVER_PID" ${NATS_PID:+--broker-pid "$NATS_PID"}
echo "store_file_kib=$(du -k "$DATA/store.redb" | cut -f1)"
if grep -qiE 'error|panic' "$WORK/server.log"; then
    echo "the server logged errors:" >&2
    grep -iE 'error|panic' "$WORK/server.log" | head -n 5 >&2
    exit 1
fi
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=
