#!/usr/bin/env bash
# Before/after of one change: two wsgate builds (and nginx) alternated on the same echo
# backend, one figure per run: closed loop (the default), messages per proxy CPU-second; with
# `--test handshake`, 50 clients in a handshake loop (connect, upgrade, one echo, close),
# sessions per proxy CPU-second.
#
#   bench/ab.sh BEFORE_BINARY AFTER_BINARY [--test closed|handshake] [--relay message|tunnel]
#               [--size 64] [--reps 4] [--secs 6]
#
# Build BEFORE with e.g. `git worktree add /tmp/before REV && (cd /tmp/before &&
# CARGO_TARGET_DIR=/tmp/before-target cargo build --release -p wsgate)`. Prints one line per
# run and the medians; ratios are per repetition (the runs of a repetition are back to back).
# Needs nginx and a release build of the load generator (`cargo build --release -p
# wsgate-loadgen`). Like compare.sh, every process runs on the machine's scheduler, and the
# wsgate processes with ASYNC_STD_THREAD_COUNT=1.
set -euo pipefail

[ $# -ge 2 ] || { sed -n '2,12p' "$0"; exit 2; }
A=$1 B=$2
shift 2
RELAY=message SIZE=64 REPS=4 SECS=6 TEST=closed
while [ $# -gt 0 ]; do
    case "$1" in
        --test) TEST=$2; shift ;;
        --relay) RELAY=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --reps) REPS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        *) echo "ab.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
# The load and the figure read from its record.
case "$TEST" in
    handshake) LOAD=(handshake --conns 50 --secs "$SECS") FIGURE=sessions_per_cpu_s ;;
    closed) LOAD=(closed --conns 50 --size "$SIZE" --secs "$SECS") FIGURE=msgs_per_cpu_s ;;
    *) echo "ab.sh: --test closed|handshake, not $TEST" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOADGEN=$ROOT/target/release/loadgen ECHO=$ROOT/target/release/echo-backend
for b in "$A" "$B" "$LOADGEN" "$ECHO"; do [ -x "$b" ] || { echo "missing $b" >&2; exit 1; }; done
command -v nginx >/dev/null || { echo "needs nginx (apt-get install nginx)" >&2; exit 1; }

TMP=$(mktemp -d /tmp/wsgate-ab.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"' EXIT
BPORT=19380 PPORT=19381
"$ECHO" --bind "127.0.0.1:$BPORT" --secs 3600 >"$TMP/echo.out" 2>&1 &
PIDS+=($!)
"$LOADGEN" wait-port --addr "127.0.0.1:$BPORT" --timeout-ms 10000
cat >"$TMP/wsgate.json" <<EOF
{ "listeners": [ { "name": "ab", "bind": "127.0.0.1:$PPORT", "routes": [ { "path": "/", "pool": "echo" } ] } ],
  "pools": { "echo": { "backends": [ { "address": "127.0.0.1:$BPORT" } ], "relay": "$RELAY" } },
  "timeouts": { "idle_ms": 3600000, "drain_ms": 1000 }, "limits": { "max_sessions": 100000 } }
EOF
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; master_process off; pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off; client_body_temp_path $TMP/nginx/body; proxy_temp_path $TMP/nginx/proxy;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    server {
        listen 127.0.0.1:$PPORT;
        location / {
            proxy_pass http://127.0.0.1:$BPORT; proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 3600s;
        }
    }
}
EOF

declare -A GOT=()
for rep in $(seq "$REPS"); do
    for t in before after nginx; do
        case $t in
            before) ASYNC_STD_THREAD_COUNT=1 RUST_LOG=warn "$A" --config "$TMP/wsgate.json" 2>"$TMP/err" & ;;
            after) ASYNC_STD_THREAD_COUNT=1 RUST_LOG=warn "$B" --config "$TMP/wsgate.json" 2>"$TMP/err" & ;;
            nginx) nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" 2>"$TMP/err" & ;;
        esac
        p=$!
        PIDS+=("$p")
        "$LOADGEN" wait-port --addr "127.0.0.1:$PPORT" --timeout-ms 10000
        rec=$("$LOADGEN" "${LOAD[@]}" --addr "127.0.0.1:$PPORT" --target "$t" --pid "$p")
        GOT[$t,$rep]=$(jq -r ".$FIGURE" <<<"$rec")
        printf 'rep %s %-6s %s/s %8.0f  per proxy CPU-s %8.0f  faults %s\n' "$rep" "$t" "$TEST" \
            "$(jq -r '.rate' <<<"$rec")" "${GOT[$t,$rep]}" "$(jq -c '.faults' <<<"$rec")"
        kill "$p"
        wait "$p" 2>/dev/null || true
    done
done
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
col() { for r in $(seq "$REPS"); do echo "${GOT[$1,$r]}"; done | median; }
ratio() { for r in $(seq "$REPS"); do echo "${GOT[$1,$r]} ${GOT[$2,$r]}" | awk '{print $1 / $2}'; done | median; }
printf 'medians over %s reps (%s, %s relay, %s B): before %.0f, after %.0f, nginx %.0f; after/before %.3f, before/nginx %.3f, after/nginx %.3f\n' \
    "$REPS" "$TEST" "$RELAY" "$SIZE" "$(col before)" "$(col after)" "$(col nginx)" \
    "$(ratio after before)" "$(ratio before nginx)" "$(ratio after nginx)"
