#!/usr/bin/env bash
# The same load over one, two and three twinguard nodes on one PostgreSQL database (issue 20),
# in the same run on the release build, on a fresh database each time, rounds alternating the
# order (1 2 3, then 3 2 1):
#
#   1. TWINS twins created through node 1 (`twinguard-bench load`), then nodes 2..N started from
#      copies of node 1's files (docs/cluster.md), each following the others;
#   2. authenticated GET /digitaltwins/{id}: one wrk per node at once, 64 connections in all
#      split between them, DURATION s: requests per second in all, and the nodes' CPU per
#      request (reads are served from each node's memory);
#   3. twin creation PUTs the same way: writes per second in all, the nodes' CPU and
#      PostgreSQL's per acknowledged write, and the answers that were not 2xx (a write that a
#      node could not decide on a current view is answered 503, retryable).
#
#   bash bench/nodes.sh                                  # 2 rounds, 10,000 twins, 10 s phases
#   ROUNDS=1 TWINS=2000 DURATION=5 bash bench/nodes.sh   # a quick look
#
# CPU is the nodes' own (utime + stime from /proc/PID/stat over the phase, summed over the
# nodes) and PostgreSQL's (every postgres process): wrk and every node share the two cores, so
# the rates say what this machine carries, and the CPU per operation says what a node costs.
# Prints one line per round, node count and phase, then the means, each against one node.
set -euo pipefail
cd "$(dirname "$0")/.."

TWINS=${TWINS:-10000}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10}
PGADDR=${PGADDR:-127.0.0.1:5432}
CONNECTIONS=64

command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v psql >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql-client >/dev/null; }

cargo build --release --locked -p twinguard -p twinguard-bench 2>&1 | tail -n 1
TG=target/release/twinguard
TB=target/release/twinguard-bench
WORK=$(mktemp -d /tmp/twinguard-nodes.XXXXXX)
PIDS=()
DB=
PSQL=(psql -h "${PGADDR%:*}" -p "${PGADDR##*:}" -U postgres -d postgres -qAt)
stop_nodes() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    stop_nodes
    [ -n "$DB" ] && "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

TICK=$(getconf CLK_TCK)
ticks_of() { local total=0 pid; for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] && total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
done; echo "$total"; }
nodes_ticks() { ticks_of "${PIDS[@]}"; }
# Every process named postgres: the server and its backends (nothing else uses it meanwhile).
pg_ticks() { ticks_of $(pgrep -x postgres || true); }
per_op_us() { awk -v t="$1" -v n="$2" -v k="$TICK" 'BEGIN {printf "%.1f", (n > 0 ? t / k / n * 1e6 : 0)}'; }

BASES=()
start_node() { # $1 data dir, $2... extra serve arguments -> appends to BASES and PIDS
    local dir=$1 line
    shift
    mkfifo "$WORK/out"
    TWINGUARD_LOG=warn "$TG" serve --data-dir "$dir" --api-listen 127.0.0.1:0 \
        --device-listen 127.0.0.1:0 "$@" >"$WORK/out" 2>"$dir.log" &
    PIDS+=($!)
    exec 3<"$WORK/out"
    read -r line <&3
    cat <&3 >/dev/null &
    exec 3<&-
    rm -f "$WORK/out"
    BASES+=("${line#twinguard: api listening on }")
}

copy_node_files() { # $1 from, $2 to: the files a node needs (docs/cluster.md)
    mkdir -p -m 700 "$2/secrets"
    cp -p "$1/instance.json" "$2/"
    cp -p "$1/secrets/instance.kek" "$1/secrets/admin-client.json" "$2/secrets/"
}

# One wrk per node at once, the connections split between them; -> REQUESTS, RPS, BAD (sums)
spread() { # $1 lua script
    local i n=${#BASES[@]} per=$((CONNECTIONS / ${#BASES[@]})) wrks=()
    for i in $(seq 0 $((n - 1))); do
        wrk -t1 -c"$per" -d"${DURATION}s" -s "$1" "${BASES[$i]}" >"$WORK/wrk-$i.txt" &
        wrks+=($!)
    done
    wait "${wrks[@]}"
    REQUESTS=0; RPS=0; BAD=0
    for i in $(seq 0 $((n - 1))); do
        REQUESTS=$((REQUESTS + $(awk '/requests in/ {print $1}' "$WORK/wrk-$i.txt")))
        RPS=$(awk -v a="$RPS" -v b="$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-$i.txt")" 'BEGIN {printf "%.0f", a + b}')
        BAD=$((BAD + $(awk '/Non-2xx/ {print $NF; f=1} END {if (!f) print 0}' "$WORK/wrk-$i.txt")))
    done
}

run_nodes() { # $1 node count, $2 round
    local count=$1 round=$2 first="$WORK/node-$2-$1-1" i
    DB="twinguard_nodes_$$_${round}_$count"
    "${PSQL[@]}" -c "CREATE DATABASE \"$DB\"" >/dev/null
    local store=(--store "postgresql://postgres@$PGADDR/$DB")
    BASES=()
    start_node "$first" "${store[@]}"
    "$TB" --data-dir "$first" --base "${BASES[0]}" load --twins "$TWINS" --relationships-per-twin 0 >/dev/null
    for i in $(seq 2 "$count"); do
        copy_node_files "$first" "$WORK/node-$round-$count-$i"
        start_node "$WORK/node-$round-$count-$i" "${store[@]}"
    done
    local token
    token=$("$TB" --data-dir "$first" --base "${BASES[0]}" token)
    sleep 1

    cat >"$WORK/get.lua" <<LUA
math.randomseed(42)
wrk.headers["Authorization"] = "Bearer $token"
request = function()
  return wrk.format("GET", "/digitaltwins/t" .. math.random(0, $((TWINS - 1))) .. "?api-version=2023-10-31")
end
LUA
    local s0 s1 p0 p1
    s0=$(nodes_ticks)
    spread "$WORK/get.lua"
    s1=$(nodes_ticks)
    echo "round=$round nodes=$count phase=get rps=$RPS non2xx=$BAD nodes_cpu_us_per_request=$(per_op_us $((s1 - s0)) "$REQUESTS")"
    echo "$count get $RPS $(per_op_us $((s1 - s0)) "$REQUESTS") 0 $BAD $REQUESTS" >>"$WORK/results"

    # Each wrk (one per node) names its twins by a random prefix of its own.
    cat >"$WORK/put.lua" <<LUA
math.randomseed(os.time() + math.floor(os.clock() * 1e6))
local prefix = "w" .. math.random(1, 1e9)
local counter = 0
local body = '{"\$metadata": {"\$model": "dtmi:bench:Node;1"}, "name": "w", "temperature": 21.5, "status": "ok"}'
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/digitaltwins/" .. prefix .. "-" .. counter .. "?api-version=2023-10-31",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $token"}, body)
end
LUA
    s0=$(nodes_ticks); p0=$(pg_ticks)
    spread "$WORK/put.lua"
    s1=$(nodes_ticks); p1=$(pg_ticks)
    local acknowledged=$((REQUESTS - BAD))
    local wps
    wps=$(awk -v r="$RPS" -v a="$acknowledged" -v n="$REQUESTS" 'BEGIN {printf "%.0f", (n > 0 ? r * a / n : 0)}')
    echo "round=$round nodes=$count phase=put acknowledged_per_s=$wps non2xx=$BAD nodes_cpu_us_per_write=$(per_op_us $((s1 - s0)) "$acknowledged") postgres_cpu_us_per_write=$(per_op_us $((p1 - p0)) "$acknowledged")"
    echo "$count put $wps $(per_op_us $((s1 - s0)) "$acknowledged") $(per_op_us $((p1 - p0)) "$acknowledged") $BAD $REQUESTS" >>"$WORK/results"

    stop_nodes
    "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null
    DB=
}

echo "machine: $(nproc) cores; twins=$TWINS rounds=$ROUNDS duration=${DURATION}s connections=$CONNECTIONS; PostgreSQL $("${PSQL[@]}" -c 'SHOW server_version')"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) -eq 1 ]; then order="1 2 3"; else order="3 2 1"; fi
    for count in $order; do run_nodes "$count" "$round"; done
done

awk '
{ k = $1" "$2; rate[k] += $3; cpu[k] += $4; pg[k] += $5; bad[k] += $6; total[k] += $7; n[k]++ }
END {
  split("get put", phases, " ")
  for (i = 1; i <= 2; i++) for (c = 1; c <= 3; c++) {
    k = c" "phases[i]; one = "1 "phases[i]
    if (!(k in n)) continue
    printf "%s over %d node(s): %.0f/s, nodes %.1f us", phases[i], c, rate[k] / n[k], cpu[k] / n[k]
    if (phases[i] == "put") printf " + postgres %.1f us", pg[k] / n[k]
    printf " per op, %d of %d answers not 2xx; against one node: rate %.2f, nodes cpu %.2f\n",
      bad[k], total[k], (rate[k] / n[k]) / (rate[one] / n[one]), (cpu[k] / n[k]) / (cpu[one] / n[one])
  }
}' "$WORK/results"
