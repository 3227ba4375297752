#!/usr/bin/env bash
# The embedded store against PostgreSQL (issue 20), one node each, in the same run on the release
# build, alternating which goes first in each round (ABBA), on a fresh data directory (and for
# PostgreSQL a fresh database on 127.0.0.1:5432) every time:
#
#   1. durable writes: TWINS twins created through the API by `twinguard-bench load` (256 in
#      flight over 8 HTTP/2 connections), writes per second and the server's CPU per write;
#   2. authenticated GET /digitaltwins/{id} under wrk (2 threads, 64 connections, DURATION s):
#      requests per second and the server's CPU per request (reads come from memory on both);
#   3. twin creation under wrk (PUT, 64 connections, DURATION s): requests per second and the
#      server's CPU per write;
#   4. signed telemetry over the HTTPS device plane (`twinguard-bench ingest`, MESSAGES messages
#      of one reading in batches of 250, 32 in flight): readings per second and the server's
#      CPU per reading. On PostgreSQL each batch's replay windows are decided in the store
#      (read in the writer's group, committed expecting what was read) and the device records
#      it changes go into the change log.
#
#   bash bench/stores.sh                                # 2 rounds, 10,000 twins, 10 s phases
#   ROUNDS=4 TWINS=20000 DURATION=15 bash bench/stores.sh
#   BASELINE=/path/to/other/release/twinguard bash bench/stores.sh
#
# With BASELINE, the "embedded" runs are that build's binary on PostgreSQL instead: two builds
# on the same database, in the same run (a change's cost to a node on PostgreSQL).
#
# CPU per operation is the server's own (utime + stime from /proc/PID/stat over the phase): the
# load generator and PostgreSQL share the two cores, so rates move with whatever else runs,
# and the server's own cost per operation is the figure to compare. PostgreSQL's own CPU is
# printed apart (its backends' CPU over the phase, from pg_stat_activity's PIDs), since with
# PostgreSQL a write costs both.
#
# Prints one line per round, mode and phase, then the ratios PostgreSQL / embedded of the means.
set -euo pipefail
cd "$(dirname "$0")/.."

TWINS=${TWINS:-10000}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10}
MESSAGES=${MESSAGES:-20000}
PGADDR=${PGADDR:-127.0.0.1:5432}
BASELINE=${BASELINE:-}

command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v psql >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql-client >/dev/null; }

cargo build --release --locked -p twinguard -p twinguard-bench 2>&1 | tail -n 1
TG=target/release/twinguard
TB=target/release/twinguard-bench
WORK=$(mktemp -d /tmp/twinguard-stores.XXXXXX)
SERVER_PID=
DB=
PSQL=(psql -h "${PGADDR%:*}" -p "${PGADDR##*:}" -U postgres -d postgres -qAt)
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    [ -n "$DB" ] && "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# PostgreSQL's CPU ticks: every process named postgres (the server and its backends; nothing
# else uses this PostgreSQL during the run).
pg_ticks() {
    local total=0 pid
    for pid in $(pgrep -x postgres || true); do
        [ -r "/proc/$pid/stat" ] && total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
per_op_us() { awk -v t="$1" -v n="$2" -v k="$TICK" 'BEGIN {printf "%.1f", (n > 0 ? t / k / n * 1e6 : 0)}'; }

start_server() { # $1 data dir, $2... extra serve arguments -> BASE, PLANE, SERVER_PID
    local dir=$1
    shift
    mkfifo "$WORK/out"
    TWINGUARD_LOG=warn "$TG" serve --data-dir "$dir" --api-listen 127.0.0.1:0 \
        --device-listen 127.0.0.1:0 "$@" >"$WORK/out" 2>"$dir.log" &
    SERVER_PID=$!
    exec 3<"$WORK/out"
    read -r line <&3
    read -r plane <&3
    cat <&3 >/dev/null &
    exec 3<&-
    rm -f "$WORK/out"
    BASE=${line#twinguard: api listening on }
    PLANE=${plane#twinguard: device plane listening on }
}

run_mode() { # $1 mode (embedded|postgresql), $2 round
    local mode=$1 round=$2 data="$WORK/$1-$2" extra=()
    TG=target/release/twinguard
    [ "$mode" = embedded ] && [ -n "$BASELINE" ] && TG=$BASELINE
    if [ "$mode" = postgresql ] || [ -n "$BASELINE" ]; then
        DB="twinguard_bench_$$_$round"
        "${PSQL[@]}" -c "CREATE DATABASE \"$DB\"" >/dev/null
        extra=(--store "postgresql://postgres@$PGADDR/$DB")
    fi
    start_server "$data" "${extra[@]}"

    local s0 p0 s1 p1 out rate
    s0=$(cpu_ticks "$SERVER_PID"); p0=$(pg_ticks)
    out=$("$TB" --data-dir "$data" --base "$BASE" load --twins "$TWINS" --relationships-per-twin 0 | grep '^load twins=')
    s1=$(cpu_ticks "$SERVER_PID"); p1=$(pg_ticks)
    rate=$(sed 's/.*writes_per_s=\([0-9]*\).*/\1/' <<<"$out")
    echo "round=$round mode=$mode phase=load writes_per_s=$rate server_cpu_us_per_write=$(per_op_us $((s1 - s0)) "$TWINS") postgres_cpu_us_per_write=$(per_op_us $((p1 - p0)) "$TWINS")"
    echo "$mode load $rate $(per_op_us $((s1 - s0)) "$TWINS")" >>"$WORK/results"

    local token
    token=$("$TB" --data-dir "$data" --base "$BASE" token)
    cat >"$WORK/get.lua" <<LUA
math.randomseed(42)
wrk.headers["Authorization"] = "Bearer $token"
request = function()
  return wrk.format("GET", "/digitaltwins/t" .. math.random(0, $((TWINS - 1))) .. "?api-version=2023-10-31")
end
LUA
    s0=$(cpu_ticks "$SERVER_PID")
    wrk -t2 -c64 -d"${DURATION}s" -s "$WORK/get.lua" "$BASE" >"$WORK/wrk.txt"
    s1=$(cpu_ticks "$SERVER_PID")
    local requests rps bad
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt")
    bad=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk.txt"); bad=${bad:-0}
    echo "round=$round mode=$mode phase=get rps=$rps non2xx=$bad server_cpu_us_per_request=$(per_op_us $((s1 - s0)) "$requests")"
    echo "$mode get $rps $(per_op_us $((s1 - s0)) "$requests")" >>"$WORK/results"

    cat >"$WORK/put.lua" <<LUA
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
local counter = 0
local body = '{"\$metadata": {"\$model": "dtmi:bench:Node;1"}, "name": "w", "temperature": 21.5, "status": "ok"}'
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/digitaltwins/w" .. tid .. "-" .. counter .. "?api-version=2023-10-31",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $token"}, body)
end
LUA
    s0=$(cpu_ticks "$SERVER_PID"); p0=$(pg_ticks)
    wrk -t2 -c64 -d"${DURATION}s" -s "$WORK/put.lua" "$BASE" >"$WORK/wrk.txt"
    s1=$(cpu_ticks "$SERVER_PID"); p1=$(pg_ticks)
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt")
    bad=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk.txt"); bad=${bad:-0}
    echo "round=$round mode=$mode phase=put rps=$rps non2xx=$bad server_cpu_us_per_write=$(per_op_us $((s1 - s0)) "$requests") postgres_cpu_us_per_write=$(per_op_us $((p1 - p0)) "$requests")"
    echo "$mode put $rps $(per_op_us $((s1 - s0)) "$requests")" >>"$WORK/results"

    s0=$(cpu_ticks "$SERVER_PID"); p0=$(pg_ticks)
    out=$("$TB" --data-dir "$data" --base "$BASE" ingest --device-plane "$PLANE" \
        --messages "$MESSAGES" --no-latency | grep '^ingest_https readings_per_message=1 batch=250 ')
    s1=$(cpu_ticks "$SERVER_PID"); p1=$(pg_ticks)
    rate=$(sed 's/.*readings_per_s=\([0-9]*\).*/\1/' <<<"$out")
    # The CPU over the whole command (its set-up, the warm-up and all three of its phases),
    # per reading of the whole command: MESSAGES x 1 + MESSAGES/10 x 10 + MESSAGES/2 x 1
    # readings, and 2,000 of warm-up.
    local readings=$((MESSAGES + MESSAGES / 10 * 10 + MESSAGES / 2 + 2000))
    echo "round=$round mode=$mode phase=ingest readings_per_s=$rate server_cpu_us_per_reading=$(per_op_us $((s1 - s0)) "$readings") postgres_cpu_us_per_reading=$(per_op_us $((p1 - p0)) "$readings")"
    echo "$mode ingest $rate $(per_op_us $((s1 - s0)) "$readings")" >>"$WORK/results"

    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    if [ -n "$DB" ]; then
        "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null
        DB=
    fi
}

[ -n "$BASELINE" ] && echo "embedded below means $BASELINE on PostgreSQL"
echo "machine: $(nproc) cores; twins=$TWINS messages=$MESSAGES rounds=$ROUNDS duration=${DURATION}s; PostgreSQL $("${PSQL[@]}" -c 'SHOW server_version')"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) -eq 1 ]; then order="embedded postgresql"; else order="postgresql embedded"; fi
    for mode in $order; do run_mode "$mode" "$round"; done
done

awk '
{ rate[$1" "$2] += $3; cpu[$1" "$2] += $4; n[$1" "$2]++ }
END {
  for (p in n) if (p ~ /^embedded/) {
    split(p, parts, " "); phase = parts[2]; q = "postgresql " phase
    printf "%s: embedded %.0f/s %.1f us, postgresql %.0f/s %.1f us; rate ratio %.2f, server cpu ratio %.2f\n",
      phase, rate[p] / n[p], cpu[p] / n[p], rate[q] / n[q], cpu[q] / n[q],
      (rate[q] / n[q]) / (rate[p] / n[p]), (cpu[q] / n[q]) / (cpu[p] / n[p])
  }
}' "$WORK/results"
