#!/usr/bin/env bash
# Signed telemetry ingestion, end to end (verify, validate, apply, durable), over the HTTPS
# device plane and through the machine's Mosquitto (127.0.0.1:1883), beside this machine's own
# Ed25519 batch verification rate measured in the same run.
#
#   bash bench/ingest.sh             # 40,000 messages per HTTPS phase
#   QUICK=1 bash bench/ingest.sh     # 4,000 (smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES=${MESSAGES:-40000}
if [ -n "${QUICK:-}" ]; then MESSAGES=4000; fi
MQTT=${MQTT:-mqtt://127.0.0.1:1883}
TOPIC="twinguard-bench-$$"

cargo build --release --locked -p twinguard -p twinguard-bench 2>&1 | tail -n 1
WORK=$(mktemp -d /tmp/twinguard-ingest.XXXXXX)
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkfifo "$WORK/out"
TWINGUARD_LOG=warn target/release/twinguard serve --data-dir "$WORK/data" --api-listen 127.0.0.1:0 \
    --device-listen 127.0.0.1:0 --mqtt-url "$MQTT" --mqtt-topic "$TOPIC/#" >"$WORK/out" 2>"$WORK/server.log" &
SERVER_PID=$!
exec 3<"$WORK/out"
read -r api <&3
read -r devices <&3
BASE=${api#twinguard: api listening on }
PLANE=${devices#twinguard: device plane listening on }
cat <&3 >/dev/null &

# The broker's CPU counts too when it runs on this machine (it shares the two cores).
BROKER=()
if [ "$MQTT" = mqtt://127.0.0.1:1883 ] && pid=$(pgrep -o -x mosquitto); then BROKER=(--broker-pid "$pid"); fi

echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ) cores=$(nproc) commit=$(git rev-parse --short HEAD)"
target/release/twinguard-bench --data-dir "$WORK/data" --base "$BASE" ingest \
    --device-plane "$PLANE" --messages "$MESSAGES" --mqtt "$MQTT" --topic "$TOPIC/bench" --server-pid "$SERVER_PID" "${BROKER[@]}"
