#!/usr/bin/env bash
# wsgate vs nginx vs haproxy (and direct-to-backend) on the same echo backend.
#
#   bench/compare.sh            full run: 3 interleaved repetitions, ~13 minutes
#   bench/compare.sh --quick    smoke: 1 repetition, short durations, ~3 minutes
#
# Options (after --quick they override its values):
#   --reps N  --closed-secs S  --open-secs S  --open-rate R  --conns N  --sizes "64 65536"
#   --idle-sessions N  --idle-hold S  --idle-procs N  --hs-secs S  --hs-conns N
#   --targets "direct wsgate-message wsgate-tunnel nginx haproxy"   (the default; add
#              "floor" for floor-proxy, the least a proxy on wsgate's runtime can do, and
#              "floor-actors" for floor-proxy --actors, that plus the design card's actors)
#   --tests "closed open idle handshake"   --no-build   --out FILE.json
#   --quiet-budget S   total seconds the run may wait, before runs, for other processes on
#                      the machine to go quiet (default 20; 0 = never wait)
#   --hs-direct   also measure the handshake rate direct to the backend (+20 s per repetition)
#   --pin         proxies on the last CPU, the backend and the load generator on the others
#                 (taskset); without it the scheduler places everything
#
# Every proxy runs on one worker thread/process. Every process it starts is killed on exit.
# Prints one markdown table; raw records go to bench/results/<stamp>.jsonl and .json.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPS=3 CLOSED_SECS=10 OPEN_SECS=4 OPEN_RATE=5000 CONNS=50 SIZES="64 65536"
IDLE_SESSIONS=9000 IDLE_HOLD=10 IDLE_PROCS=6 HS_SECS=20 HS_CONNS=50
TARGETS="direct wsgate-message wsgate-tunnel nginx haproxy"
TESTS="closed open idle handshake"
BUILD=1 OUT="" MODE=full HS_DIRECT=0 QUIET_BUDGET=20 PIN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick REPS=1 CLOSED_SECS=3 OPEN_SECS=3 IDLE_SESSIONS=2000 IDLE_HOLD=3 HS_SECS=5 ;;
        --reps) REPS=$2; shift ;;
        --closed-secs) CLOSED_SECS=$2; shift ;;
        --open-secs) OPEN_SECS=$2; shift ;;
        --open-rate) OPEN_RATE=$2; shift ;;
        --conns) CONNS=$2; shift ;;
        --sizes) SIZES=$2; shift ;;
        --idle-sessions) IDLE_SESSIONS=$2; shift ;;
        --idle-hold) IDLE_HOLD=$2; shift ;;
        --idle-procs) IDLE_PROCS=$2; shift ;;
        --hs-secs) HS_SECS=$2; shift ;;
        --hs-conns) HS_CONNS=$2; shift ;;
        --targets) TARGETS=$2; shift ;;
        --tests) TESTS=$2; shift ;;
        --hs-direct) HS_DIRECT=1 ;;
        --pin) PIN=1 ;;
        --quiet-budget) QUIET_BUDGET=$2; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
START_TS=$(date +%s)

# ---------------------------------------------------------------- tools
if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
    log "installing nginx and haproxy from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx haproxy >/dev/null
fi
# Debian's nginx package starts a system instance on install where it can; it is not ours
# and not needed, but it is left alone (we listen on other ports).

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
    log "building (release): wsgate and the load generator"
    cargo build --release -q -p wsgate -p wsgate-loadgen
fi
WSGATE=$ROOT/target/release/wsgate
LOADGEN=$ROOT/target/release/loadgen
ECHO=$ROOT/target/release/echo-backend
FLOOR=$ROOT/target/release/floor-proxy
for b in "$WSGATE" "$LOADGEN" "$ECHO"; do [ -x "$b" ] || { echo "missing $b" >&2; exit 1; }; done

# --pin: command prefixes placing the proxy, and everything else we start, on their CPUs.
ON_PROXY_CPU=() ON_OTHER_CPUS=()
if [ "$PIN" = 1 ]; then
    LAST_CPU=$(( $(nproc) - 1 ))
    [ "$LAST_CPU" -ge 1 ] || { echo "--pin needs 2 CPUs or more" >&2; exit 2; }
    ON_PROXY_CPU=(taskset -c "$LAST_CPU") ON_OTHER_CPUS=(taskset -c "0-$((LAST_CPU - 1))")
fi

# ---------------------------------------------------------------- processes and cleanup
TMP=$(mktemp -d /tmp/wsgate-bench.XXXXXX)
declare -a PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops one process we started: TERM, wait (bounded), KILL.
stop_pid() {
    local p=$1
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    local keep=()
    for q in "${PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    PIDS=("${keep[@]}")
}

# Waits (bounded) for a line matching $2 in file $1.
wait_log() {
    local file=$1 pat=$2 deadline=$((SECONDS + 10))
    while [ $SECONDS -lt $deadline ]; do
        grep -q "$pat" "$file" 2>/dev/null && return 0
        sleep 0.01
    done
    echo "timed out waiting for '$pat' in $file:" >&2; cat "$file" >&2; return 1
}

BPORT=19080
declare -A PORT=([direct]=$BPORT [wsgate-message]=19081 [wsgate-tunnel]=19082 [nginx]=19083 [haproxy]=19084 [floor]=19085 [floor-actors]=19086)

# ---------------------------------------------------------------- backend (own process)
"${ON_OTHER_CPUS[@]}" "$ECHO" --bind "127.0.0.1:$BPORT" --secs 3600 >"$TMP/echo.out" 2>"$TMP/echo.err" &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
wait_log "$TMP/echo.out" "listening on"

# ---------------------------------------------------------------- proxy configs
write_configs() {
    local t
    for t in message tunnel; do
        mkdir -p "$TMP/wsgate-$t"
        cat >"$TMP/wsgate-$t/config.json" <<EOF
{
  "listeners": [
    { "name": "bench", "bind": "127.0.0.1:${PORT[wsgate-$t]}", "routes": [ { "path": "/", "pool": "echo" } ] }
  ],
  "pools": { "echo": { "backends": [ { "address": "127.0.0.1:$BPORT" } ], "relay": "$t" } },
  "timeouts": { "idle_ms": 3600000, "drain_ms": 1000 },
  "limits": { "max_sessions": 100000 }
}
EOF
    done
    mkdir -p "$TMP/nginx/logs"
    cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 19500; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream echo { server 127.0.0.1:$BPORT; }
    server {
        listen 127.0.0.1:${PORT[nginx]};
        location / {
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }
    }
}
EOF
    mkdir -p "$TMP/haproxy"
    cat >"$TMP/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 9800
defaults
    mode http
    maxconn 9800
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-request 10s
    timeout tunnel 1h
frontend fe
    bind 127.0.0.1:${PORT[haproxy]}
    default_backend be
backend be
    server echo 127.0.0.1:$BPORT
EOF
}
write_configs

# Starts target $1; sets TPID (root pid of the proxy, empty for direct) and TADDR.
start_target() {
    local t=$1
    TADDR=127.0.0.1:${PORT[$t]} TPID=""
    case "$t" in
        direct) return 0 ;;
        wsgate-message|wsgate-tunnel)
            local d=$TMP/${t}
            : >"$d/stderr"
            # Per-session access lines off (as nginx's access_log off); the listener line stays.
            ASYNC_STD_THREAD_COUNT=1 RUST_LOG="warn,wsgate_actors=info,wsgate_actors::session=warn" \
                "${ON_PROXY_CPU[@]}" "$WSGATE" --config "$d/config.json" 2>"$d/stderr" >/dev/null &
            TPID=$!
            PIDS+=("$TPID")
            wait_log "$d/stderr" "listening on"
            ;;
        nginx)
            "${ON_PROXY_CPU[@]}" nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" 2>"$TMP/nginx/stderr" &
            TPID=$!
            PIDS+=("$TPID")
            "$LOADGEN" wait-port --addr "$TADDR" --timeout-ms 10000
            ;;
        haproxy)
            "${ON_PROXY_CPU[@]}" haproxy -db -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy/stdout" 2>"$TMP/haproxy/stderr" &
            TPID=$!
            PIDS+=("$TPID")
            "$LOADGEN" wait-port --addr "$TADDR" --timeout-ms 10000
            ;;
        floor|floor-actors)
            [ -x "$FLOOR" ] || { echo "missing $FLOOR" >&2; exit 1; }
            : >"$TMP/floor.err"
            local actors=()
            [ "$t" = floor-actors ] && actors=(--actors)
            ASYNC_STD_THREAD_COUNT=1 "${ON_PROXY_CPU[@]}" "$FLOOR" --listen "$TADDR" --backend "127.0.0.1:$BPORT" \
                "${actors[@]}" 2>"$TMP/floor.err" >/dev/null &
            TPID=$!
            PIDS+=("$TPID")
            wait_log "$TMP/floor.err" "listening on"
            ;;
        *) echo "unknown target: $t" >&2; exit 2 ;;
    esac
}

stop_target() { [ -n "$TPID" ] && stop_pid "$TPID"; TPID=""; }

# ---------------------------------------------------------------- machine
NPROC=$(nproc)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
KERNEL=$(uname -r)
NGINX_V=$(nginx -v 2>&1 | sed 's/.*nginx\///')
HAPROXY_V=$(haproxy -v 2>&1 | head -1 | awk '{print $3}')
WSGATE_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
NOTE="Machine: $NPROC cores ($CPU), kernel $KERNEL, ulimit -n $(ulimit -n); the $NPROC cores are shared by the load generator, the echo backend and the proxy. \
Proxies on one worker: wsgate ($WSGATE_REV) ASYNC_STD_THREAD_COUNT=1, nginx $NGINX_V worker_processes 1, haproxy $HAPROXY_V nbthread 1. \
Mode: $MODE; reps $REPS; closed loop $CONNS conns x ${CLOSED_SECS}s sizes [$SIZES]; open loop $OPEN_RATE msg/s over $CONNS conns x ${OPEN_SECS}s (64 B); \
idle $IDLE_SESSIONS sessions held ${IDLE_HOLD}s; handshake $HS_CONNS concurrent x ${HS_SECS}s."
[ "$PIN" = 1 ] && NOTE="$NOTE Pinned (--pin): proxies on CPU $LAST_CPU, backend and load generator on CPUs 0-$((LAST_CPU - 1))."

mkdir -p "$ROOT/bench/results"
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=$ROOT/bench/results/$STAMP.jsonl
ERRLOG=$ROOT/bench/results/$STAMP.log
: >"$RESULTS"
: >"$ERRLOG"
log "$NOTE"

QUIET_WAITED=0
run() { # test target rep extra-args...
    local test=$1 t=$2 rep=$3
    shift 3
    # This machine is shared: wait (bounded by the run's budget) for others' CPU use to drop.
    local left=$((QUIET_BUDGET - QUIET_WAITED))
    if [ "$left" -gt 0 ]; then
        local w
        w=$("$LOADGEN" wait-quiet --max-busy 0.5 --timeout-ms $((left < 10 ? left * 1000 : 10000)))
        QUIET_WAITED=$((QUIET_WAITED + ${w%%.*}))
        [ "${w%%.*}" -ge 1 ] && log "waited ${w% *}s for a quiet machine (busy cores now ${w#* })"
    fi
    start_target "$t"
    local pidarg=()
    [ -n "$TPID" ] && pidarg=(--pid "$TPID")
    local rec
    if rec=$("${ON_OTHER_CPUS[@]}" "$LOADGEN" "$test" --addr "$TADDR" --target "$t" --rep "$rep" --backend-pid "$BACKEND_PID" "${pidarg[@]}" "$@" 2>>"$ERRLOG"); then
        echo "$rec" >>"$RESULTS"
        log "rep $rep $test $* $t: $(echo "$rec" | jq -c '{rate, p50: .latency.p50_us, p99: .latency.p99_us, cpu: .proxy_cpu_s, rss_per_session: .rss_bytes_per_session, other_cores: .foreign_cores, faults} | with_entries(select(.value != null))' 2>/dev/null || echo "$rec")"
    else
        log "rep $rep $test $t: loadgen failed; see below"; tail -5 "$ERRLOG" >&2
    fi
    stop_target
}

for rep in $(seq "$REPS"); do
    for test in $TESTS; do
        case "$test" in
            closed)
                for size in $SIZES; do
                    for t in $TARGETS; do
                        run closed "$t" "$rep" --conns "$CONNS" --size "$size" --secs "$CLOSED_SECS"
                    done
                done ;;
            open)
                for t in $TARGETS; do
                    run open "$t" "$rep" --conns "$CONNS" --rate "$OPEN_RATE" --size 64 --secs "$OPEN_SECS"
                done ;;
            idle)
                for t in $TARGETS; do
                    [ "$t" = direct ] && continue # no proxy: nothing to measure
                    run idle "$t" "$rep" --sessions "$IDLE_SESSIONS" --procs "$IDLE_PROCS" --hold "$IDLE_HOLD"
                done ;;
            handshake)
                for t in $TARGETS; do
                    [ "$t" = direct ] && [ "$HS_DIRECT" = 0 ] && continue
                    run handshake "$t" "$rep" --conns "$HS_CONNS" --secs "$HS_SECS"
                done ;;
            *) echo "unknown test $test" >&2; exit 2 ;;
        esac
    done
done

ELAPSED=$(( $(date +%s) - START_TS ))
NOTE="$NOTE Wall time of this run: ${ELAPSED}s, of which ${QUIET_WAITED}s waiting for other processes to go quiet."
"$LOADGEN" report "$RESULTS" --json "${OUT:-${RESULTS%.jsonl}.json}" --note "$NOTE"
log "raw records: $RESULTS; load generator messages: $ERRLOG; summary: ${OUT:-${RESULTS%.jsonl}.json}"
