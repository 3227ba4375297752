#!/usr/bin/env bash
# twinguard benchmarks on this machine, each beside a reference measured in the same run.
#
#   bash bench/run.sh            # full run: 100k twins + 300k relationships, then 1M twins
#   QUICK=1 bash bench/run.sh    # 10k twins + 30k relationships, then 100k twins (smoke run)
#
# Prints one line per figure; docs/benchmarks.md records a run and the command.
set -euo pipefail
cd "$(dirname "$0")/.."

TWINS=${TWINS:-100000}
MEM_TWINS=${MEM_TWINS:-1000000}
DURATION=${DURATION:-15}
if [ -n "${QUICK:-}" ]; then TWINS=10000; MEM_TWINS=100000; DURATION=5; fi

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx-light

cargo build --release --locked -p twinguard -p twinguard-bench 2>&1 | tail -n 1
TG=target/release/twinguard
TB=target/release/twinguard-bench
WORK=$(mktemp -d /tmp/twinguard-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

start_server() { # $1 data dir -> sets BASE and SERVER_PID
    mkfifo "$WORK/out.$$"
    TWINGUARD_LOG=warn "$TG" serve --data-dir "$1" --api-listen 127.0.0.1:0 --device-listen off >"$WORK/out.$$" 2>"$1.log" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    read -r line <"$WORK/out.$$"
    rm -f "$WORK/out.$$"
    BASE=${line#twinguard: api listening on }
}

rss_mib() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; twins=$TWINS relationships=$((TWINS * 3))"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# 1. Load a graph through the API, then probe query latency.
DATA="$WORK/graph"
start_server "$DATA"
before=$(cpu_ticks "$SERVER_PID")
"$TB" --data-dir "$DATA" --base "$BASE" load --twins "$TWINS" --relationships-per-twin 3
after=$(cpu_ticks "$SERVER_PID")
echo "server_cpu_us_per_write=$(awk -v t=$((after - before)) -v n=$((TWINS * 4)) -v k="$TICK" 'BEGIN {printf "%.1f", t / k / n * 1e6}')"
echo "rss_after_graph_mib=$(rss_mib "$SERVER_PID")"
"$TB" --data-dir "$DATA" --base "$BASE" latency --twins "$TWINS" --count 2000 \
    --query "SELECT * FROM DIGITALTWINS WHERE \$dtId = '{id}'"
"$TB" --data-dir "$DATA" --base "$BASE" latency --twins "$TWINS" --count 1000 \
    --query "SELECT B FROM DIGITALTWINS MATCH (A)-[:link*..3]->(B) WHERE A.\$dtId = '{id}'" --min-items 3

# 2. Authenticated GET /digitaltwins/{id} under wrk; nginx serving the same JSON over TLS with the
#    same certificate is measured after the write phase below.
TOKEN=$("$TB" --data-dir "$DATA" --base "$BASE" token)
cat >"$WORK/get.lua" <<LUA
math.randomseed(42)
wrk.headers["Authorization"] = "Bearer $TOKEN"
request = function()
  return wrk.format("GET", "/digitaltwins/t" .. math.random(0, $((TWINS - 1))) .. "?api-version=2023-10-31")
end
LUA
curl -s --cacert "$DATA/tls/ca.pem" -H "Authorization: Bearer $TOKEN" \
    "$BASE/digitaltwins/t1?api-version=2023-10-31" >"$WORK/twin.json"
echo "twin_json_bytes=$(wc -c <"$WORK/twin.json")"
wrk -t2 -c64 -d"${DURATION}s" --latency -s "$WORK/get.lua" "$BASE" >"$WORK/wrk-tg.txt"

# 3. Twin creation with wrk as the client (C, HTTP/1.1 keep-alive): the write path without the
#    Rust load generator's own CPU cost. Afterwards a COUNT query checks that every 2xx answer
#    left a twin behind.
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
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $TOKEN"}, body)
end
LUA
wrk -t2 -c64 -d"${DURATION}s" --latency -s "$WORK/put.lua" "$BASE" >"$WORK/wrk-put.txt"
PUT_TOTAL=$(awk '/requests in/ {print $1}' "$WORK/wrk-put.txt")
PUT_BAD=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk-put.txt"); PUT_BAD=${PUT_BAD:-0}
CREATED=$(curl -s --cacert "$DATA/tls/ca.pem" -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d '{"query": "SELECT COUNT() FROM DIGITALTWINS WHERE STARTSWITH($dtId, '"'w'"')"}' \
    "$BASE/query?api-version=2023-10-31" | sed 's/.*"COUNT":\([0-9]*\).*/\1/')
echo "put_twin rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-put.txt") p50=$(awk '$1 == "50%" {print $2}' "$WORK/wrk-put.txt") p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk-put.txt") requests=$PUT_TOTAL non2xx=$PUT_BAD twins_created=$CREATED"
# wrk stops counting at the deadline while up to one request per connection is still in flight,
# so the store may hold up to 64 more twins than wrk saw acknowledged, never fewer.
ACKED=$((PUT_TOTAL - PUT_BAD))
if [ "$CREATED" -lt "$ACKED" ] || [ "$CREATED" -gt $((ACKED + 64)) ]; then
    echo "put_twin: FAILED: $ACKED acknowledged creations but $CREATED twins found" >&2
    exit 1
fi

mkdir -p "$WORK/www"
cp "$WORK/twin.json" "$WORK/www/twin.json"
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 10000000;
  server {
    listen 127.0.0.1:18443 ssl;
    ssl_certificate $DATA/tls/server.pem;
    ssl_certificate_key $DATA/tls/server-key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    root $WORK/www;
    location /digitaltwins/ { default_type application/json; try_files /twin.json =404; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf"
sleep 0.5
wrk -t2 -c64 -d"${DURATION}s" --latency -s "$WORK/get.lua" https://127.0.0.1:18443 >"$WORK/wrk-nginx.txt"
kill "$(cat "$WORK/nginx.pid")"
rm -f "$WORK/nginx.pid"

rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
p() { awk -v q="$2" '$1 == q {print $2}' "$1"; }
TG_RPS=$(rps "$WORK/wrk-tg.txt"); NG_RPS=$(rps "$WORK/wrk-nginx.txt")
echo "get_twin rps=$TG_RPS p50=$(p "$WORK/wrk-tg.txt" 50%) p99=$(p "$WORK/wrk-tg.txt" 99%) non2xx=$(grep -c 'Non-2xx' "$WORK/wrk-tg.txt" || true)"
echo "nginx_static rps=$NG_RPS p50=$(p "$WORK/wrk-nginx.txt" 50%) p99=$(p "$WORK/wrk-nginx.txt" 99%)"
echo "get_twin_to_nginx_ratio=$(awk -v a="$TG_RPS" -v b="$NG_RPS" 'BEGIN {printf "%.2f", a / b}')"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true

# 4. Resident memory after loading MEM_TWINS twins (no relationships).
DATA="$WORK/memory"
start_server "$DATA"
echo "rss_empty_mib=$(rss_mib "$SERVER_PID")"
"$TB" --data-dir "$DATA" --base "$BASE" load --twins "$MEM_TWINS" --relationships-per-twin 0
echo "rss_after_${MEM_TWINS}_twins_mib=$(rss_mib "$SERVER_PID")"
STORE_MIB=$(du -m "$DATA/store.redb" | cut -f1)
echo "store_file_mib=$STORE_MIB"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
# Restart: how long loading the store takes.
start=$(date +%s.%N)
start_server "$DATA"
echo "restart_seconds=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e - s}') rss_after_restart_mib=$(rss_mib "$SERVER_PID")"
