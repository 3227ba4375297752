#!/usr/bin/env bash
# What issue 17's resource protections cost: GET-twin and point-query throughput of the release
# build with the protections on (the shipped server) and off (`serve
# --dangerous-unbounded-resources`, a hidden flag only this script passes), on the same data
# directory, alternating on/off in every round (ABBA order, so a drift of the shared host falls
# on both), in the same run.
#
#   bash bench/protections.sh                      # 10,000 twins, 6 rounds, 10 s per load
#   ROUNDS=2 DURATION=5 bash bench/protections.sh  # a smoke run
#
# "Off" means: no connection gate, idle wrapper, HTTP limits or header timeout; no query work
# budget, page byte cap, deadline, cap per principal or server-wide query slots; no log rate
# limit. The write-ahead audit intent and the bounded audit entries stay on in both: the first
# is correctness, the second costs a length check on the short values these requests carry.
#
# Figures per round and mode: wrk's requests per second, and the server's CPU time per request
# (user + system from /proc, which varies less than throughput when wrk shares the two cores).
# The summary gives the mean of each and the on/off ratio: throughput on/off (1.00 = no cost)
# and CPU per request off/on (the same sense: below 1.00 means the protections cost CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

TWINS=${TWINS:-10000}
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-10}
QUERY_ONLY=8c4b2e71-9a3d-4f6b-b0e2-7d5a1c9e3f42

command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }

cargo build --release --locked -p twinguard -p twinguard-bench 2>&1 | tail -n 1
TG=target/release/twinguard
TB=target/release/twinguard-bench
WORK=$(mktemp -d /tmp/twinguard-protections.XXXXXX)
DATA="$WORK/data"
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

start_server() { # [extra serve args] -> BASE, SERVER_PID
    mkfifo "$WORK/out"
    TWINGUARD_LOG=warn "$TG" serve --data-dir "$DATA" --api-listen 127.0.0.1:0 --device-listen off "$@" \
        >"$WORK/out" 2>>"$WORK/server.log" &
    SERVER_PID=$!
    read -r line <"$WORK/out"
    rm -f "$WORK/out"
    BASE=${line#twinguard: api listening on }
}
stop_server() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
api() { # method path token [json body]
    curl -sf --cacert "$DATA/tls/ca.pem" -X "$1" -H "Authorization: Bearer $3" \
        -H 'content-type: application/json' ${4:+-d "$4"} "$BASE$2?api-version=2023-10-31"
}
token_of() { # client_id secret
    curl -sf --cacert "$DATA/tls/ca.pem" -d grant_type=client_credentials \
        --data-urlencode "client_id=$1" --data-urlencode "client_secret=$2" "$BASE/oauth2/token" |
        sed 's/.*"access_token":"\([^"]*\)".*/\1/'
}

echo "date=$(date -u +%FT%TZ) cores=$(nproc) commit=$(git rev-parse --short HEAD) twins=$TWINS rounds=$ROUNDS duration=${DURATION}s"

# Setup, once: the graph, and four Query Only applications (the query load runs two
# connections per application, within the cap of two queries at once per principal and the
# eight query slots, so the protected server refuses none of it).
start_server
"$TB" --data-dir "$DATA" --base "$BASE" load --twins "$TWINS" --relationships-per-twin 0 >/dev/null
ADMIN=$("$TB" --data-dir "$DATA" --base "$BASE" token)
for i in 1 2 3 4; do
    created=$(api POST /admin/identities "$ADMIN" "{\"kind\":\"application\",\"name\":\"bench-query-$i\"}")
    id=$(sed 's/.*"identity":{[^}]*"id":"\([^"]*\)".*/\1/' <<<"$created")
    secret=$(sed 's/.*"clientSecret":"\([^"]*\)".*/\1/' <<<"$created")
    api POST /admin/roleassignments "$ADMIN" "{\"principalId\":\"$id\",\"roleId\":\"$QUERY_ONLY\"}" >/dev/null
    echo "$id $secret" >>"$WORK/apps"
done
stop_server

# One round of one mode: a fresh server on the same data, warmed up, then each load.
measure() { # round mode
    if [ "$2" = off ]; then start_server --dangerous-unbounded-resources; else start_server; fi
    ADMIN=$("$TB" --data-dir "$DATA" --base "$BASE" token)
    local tokens=()
    while read -r id secret; do tokens+=("$(token_of "$id" "$secret")"); done <"$WORK/apps"
    # Each load is checked to do real work before it is measured.
    api GET /digitaltwins/t1 "$ADMIN" | grep -q '"$dtId":"t1"'
    api POST /query "${tokens[0]}" '{"query":"SELECT * FROM DIGITALTWINS WHERE $dtId = '"'t1'"'"}' |
        grep -q '"$dtId":"t1"'
    cat >"$WORK/get.lua" <<LUA
math.randomseed(42)
wrk.headers["Authorization"] = "Bearer $ADMIN"
request = function()
  return wrk.format("GET", "/digitaltwins/t" .. math.random(0, $((TWINS - 1))) .. "?api-version=2023-10-31")
end
LUA
    cat >"$WORK/query.lua" <<LUA
local tokens = {"${tokens[0]}", "${tokens[1]}", "${tokens[2]}", "${tokens[3]}"}
local n = 0
function setup(thread)
  n = n + 1
  thread:set("token", tokens[n])
end
request = function()
  local body = '{"query": "SELECT * FROM DIGITALTWINS WHERE \$dtId = \'t' .. math.random(0, $((TWINS - 1))) .. '\'"}'
  return wrk.format("POST", "/query?api-version=2023-10-31",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, body)
end
LUA
    for load in get query; do
        local args=(-t2 -c64)
        [ "$load" = query ] && args=(-t4 -c8)
        wrk "${args[@]}" -d2s -s "$WORK/$load.lua" "$BASE" >/dev/null
        local before after
        before=$(cpu_ticks "$SERVER_PID")
        wrk "${args[@]}" -d"${DURATION}s" -s "$WORK/$load.lua" "$BASE" >"$WORK/wrk.txt"
        after=$(cpu_ticks "$SERVER_PID")
        local requests rps bad
        requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
        rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt")
        bad=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk.txt")
        echo "round=$1 mode=$2 load=$load rps=$rps requests=$requests non2xx=${bad:-0}" \
            "server_cpu_us_per_request=$(awk -v t=$((after - before)) -v n="$requests" -v k="$TICK" 'BEGIN {printf "%.1f", t / k / n * 1e6}')"
    done
    stop_server
}

for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="on off"; else order="off on"; fi
    for mode in $order; do
        measure "$round" "$mode" >>"$WORK/rounds.txt"
        tail -n 2 "$WORK/rounds.txt"
    done
done

grep -q 'DANGEROUS: resource protections are off' "$WORK/server.log" ||
    { echo "the reference server did not run unprotected" >&2; exit 1; }
if grep -v 'non2xx=0 ' "$WORK/rounds.txt" | grep -q round=; then
    echo "some requests failed: the figures are not comparable" >&2
    exit 1
fi
awk '
    { for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
      k = f["load"] " " f["mode"]; rps[k] += f["rps"]; cpu[k] += f["server_cpu_us_per_request"]; n[k]++ }
    END {
      split("get query", loads, " ")
      for (j = 1; j <= 2; j++) {
        l = loads[j]; on = l " on"; off = l " off"
        printf "%s: on rps=%.0f cpu_us=%.1f, off rps=%.0f cpu_us=%.1f; throughput on/off=%.3f cpu off/on=%.3f (%d rounds)\n",
          l, rps[on] / n[on], cpu[on] / n[on], rps[off] / n[off], cpu[off] / n[off],
          (rps[on] / n[on]) / (rps[off] / n[off]), (cpu[off] / n[off]) / (cpu[on] / n[on]), n[on]
      }
    }' "$WORK/rounds.txt"
