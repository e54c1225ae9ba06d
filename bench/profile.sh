#!/usr/bin/env bash
# Per-message cost of the proxies under a fixed closed-loop load (64 B, 50 connections),
# measured as differences between a short and a long run so setup costs cancel out; and
# per-session cost under a handshake load (10 concurrent clients, each in a loop: connect,
# upgrade, one echo, close).
#
#   bench/profile.sh syscalls  [targets]   syscalls per echoed message (perf tracepoint counts)
#                                          and TCP segments per message (the whole machine's)
#   bench/profile.sh cpu [targets]         user and kernel CPU µs per echoed message (/proc), and
#                                          the top symbols of a perf cpu-clock profile
#   bench/profile.sh callgrind [targets]   user-space instructions per message + top functions
#   bench/profile.sh massif [targets]      heap per idle session (1,000 sessions), wsgate
#   bench/profile.sh callgrind-handshake [targets]   instructions per session, 2 s vs 8 s of load
#   bench/profile.sh syscalls-handshake [targets]    syscalls per session (perf tracepoint
#                                          counts over 5 s of load / the sessions it completed)
#                                          and TCP segments per session (the whole machine's)
#   bench/profile.sh cpu-handshake [targets]         user and kernel CPU µs per session (/proc),
#                                          3 runs of 5 s after a 1 s warm-up, each and the median;
#                                          then µs per session in each syscall (perf cpu-clock)
#
# targets: any of wsgate-message wsgate-tunnel nginx haproxy floor floor-actors (default: the
# first four for syscalls, wsgate-message wsgate-tunnel for callgrind). floor is
# target/release/floor-proxy (bench/loadgen/src/bin/floor_proxy.rs): the least a proxy on
# wsgate's runtime can do (a byte tunnel after passing the heads through), its lower bound;
# floor-actors is floor-proxy --actors: that plus the design card's actors (an xactor actor
# per connection, the backend from a pool actor by a mailbox call).
# Needs perf (linux-perf) / valgrind; builds nothing: run bench/compare.sh --quick (or
# cargo build --release -p wsgate -p wsgate-loadgen) first.
# Output goes to bench/results/profile-<stamp>/ (callgrind.out files, annotated listings).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:-syscalls}
shift || true
if [ $# -gt 0 ]; then TARGETS="$*"
elif [ "$MODE" = callgrind ]; then TARGETS="wsgate-message wsgate-tunnel"
else TARGETS="wsgate-message wsgate-tunnel nginx haproxy"; fi
CONNS=50
SHORT=${SHORT:-100}   # messages per connection, short run
LONG=${LONG:-500}     # messages per connection, long run
[ "$MODE" = callgrind ] && SHORT=${SHORT_CG:-40} LONG=${LONG_CG:-200}
[ "$MODE" = cpu ] && SHORT=${SHORT_CPU:-100} LONG=${LONG_CPU:-2000}
[ "$MODE" = massif ] && [ $# -eq 0 ] && TARGETS="wsgate-message wsgate-tunnel"
[ "$MODE" = callgrind-handshake ] && [ $# -eq 0 ] && TARGETS="wsgate-message wsgate-tunnel nginx haproxy"
HS_CONNS=${HS_CONNS:-10} HS_SECS=${HS_SECS:-5} HS_REPS=${HS_REPS:-3} # syscalls-handshake, cpu-handshake

WSGATE=$ROOT/target/release/wsgate
LOADGEN=$ROOT/target/release/loadgen
ECHO=$ROOT/target/release/echo-backend
FLOOR=$ROOT/target/release/floor-proxy
OUT=$ROOT/bench/results/profile-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/wsgate-profile.XXXXXX)
declare -a PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 500); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_log() {
    local file=$1 pat=$2 deadline=$((SECONDS + ${3:-20}))
    while [ $SECONDS -lt $deadline ]; do
        grep -q "$pat" "$file" 2>/dev/null && return 0
        sleep 0.01
    done
    echo "timed out waiting for '$pat' in $file" >&2; cat "$file" >&2; return 1
}

# Stops pid $1 and waits for it (bounded by $2 seconds), then KILL.
stop_wait() {
    local p=$1 n=$(( ${2:-5} * 50 ))
    kill -"${3:-TERM}" "$p" 2>/dev/null || true
    for _ in $(seq "$n"); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}

BPORT=19180 PPORT=19181
"$ECHO" --bind "127.0.0.1:$BPORT" --secs 3600 >"$TMP/echo.out" 2>&1 &
PIDS+=($!)
wait_log "$TMP/echo.out" "listening on"

for t in message tunnel; do
    cat >"$TMP/wsgate-$t.json" <<EOF
{
  "listeners": [ { "name": "bench", "bind": "127.0.0.1:$PPORT", "routes": [ { "path": "/", "pool": "echo" } ] } ],
  "pools": { "echo": { "backends": [ { "address": "127.0.0.1:$BPORT" } ], "relay": "$t" } },
  "timeouts": { "idle_ms": 3600000, "drain_ms": 1000 },
  "limits": { "max_sessions": 100000 }
}
EOF
done
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process MASTER;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    server {
        listen 127.0.0.1:$PPORT;
        location / {
            proxy_pass http://127.0.0.1:$BPORT;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 3600s;
        }
    }
}
EOF
sed 's/MASTER/on/' "$TMP/nginx/nginx.conf" >"$TMP/nginx/on.conf"
sed 's/MASTER/off/' "$TMP/nginx/nginx.conf" >"$TMP/nginx/off.conf"
cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend fe
    bind 127.0.0.1:$PPORT
    default_backend be
backend be
    server echo 127.0.0.1:$BPORT
EOF

# Starts target $1, optionally under the wrapper in $WRAP; sets TPID (the process doing the
# proxying: nginx's worker, not its master).
start() {
    local t=$1
    : >"$TMP/proxy.err"
    STOPPID=""
    case "$t" in
        wsgate-*)
            ASYNC_STD_THREAD_COUNT=1 RUST_LOG="warn,wsgate_actors=info,wsgate_actors::session=warn" \
                ${WRAP:-} "$WSGATE" --config "$TMP/$t.json" 2>"$TMP/proxy.err" >/dev/null &
            TPID=$!
            PIDS+=("$TPID")
            wait_log "$TMP/proxy.err" "listening on" 120 ;;
        nginx)
            if [ -n "${WRAP:-}" ]; then
                $WRAP nginx -p "$TMP/nginx" -c "$TMP/nginx/off.conf" 2>"$TMP/proxy.err" &
                TPID=$!
            else
                nginx -p "$TMP/nginx" -c "$TMP/nginx/on.conf" 2>"$TMP/proxy.err" &
                STOPPID=$!
                PIDS+=("$STOPPID")
                "$LOADGEN" wait-port --addr "127.0.0.1:$PPORT" --timeout-ms 10000
                TPID=$(pgrep -P "$STOPPID" | head -1)
            fi
            PIDS+=("$TPID") ;;
        haproxy)
            ${WRAP:-} haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/proxy.err" 2>&1 &
            TPID=$!
            PIDS+=("$TPID") ;;
        floor|floor-actors)
            local actors=()
            [ "$t" = floor-actors ] && actors=(--actors)
            ASYNC_STD_THREAD_COUNT=1 ${WRAP:-} "$FLOOR" --listen "127.0.0.1:$PPORT" \
                --backend "127.0.0.1:$BPORT" "${actors[@]}" 2>"$TMP/proxy.err" >/dev/null &
            TPID=$!
            PIDS+=("$TPID")
            wait_log "$TMP/proxy.err" "listening on" 120 ;;
        *) echo "unknown target: $t" >&2; exit 2 ;;
    esac
    STOPPID=${STOPPID:-$TPID}
    "$LOADGEN" wait-port --addr "127.0.0.1:$PPORT" --timeout-ms 120000
}

load() { # messages per connection
    "$LOADGEN" closed --addr "127.0.0.1:$PPORT" --conns $CONNS --size 64 --msgs "$1" --secs 600 \
        --target profile | jq -c '{msgs, rate, faults}' >&2
}

# $HS_CONNS clients in a handshake loop for $1 seconds; prints the sessions completed (the
# record's summary goes to stderr).
hs_load() { # seconds
    local rec
    rec=$("$LOADGEN" handshake --addr "127.0.0.1:$PPORT" --conns "$HS_CONNS" --secs "$1" --target profile)
    jq -c '{sessions, rate, faults}' <<<"$rec" >&2
    jq -r '.sessions' <<<"$rec"
}

SYSCALLS="recvfrom sendto read write readv writev epoll_wait epoll_pwait epoll_pwait2 epoll_ctl futex sendmsg recvmsg close accept4 sched_yield mmap munmap madvise brk timerfd_settime"
# What a session adds (syscalls-handshake): its sockets' setup and teardown.
SYSCALLS="$SYSCALLS socket connect setsockopt getsockopt shutdown ioctl fcntl"
EVENTS="raw_syscalls:sys_enter"
for s in $SYSCALLS; do EVENTS="$EVENTS,syscalls:sys_enter_$s"; done

# Syscall counts of the proxy over one load of $2 messages per connection, and the TCP
# segments the machine sent during it (into $3.segs).
count_syscalls() { # target msgs outfile
    start "$1"
    perf stat -x, -e "$EVENTS" -p "$TPID" -o "$3" &
    local perf=$!
    PIDS+=("$perf")
    sleep 0.3 # perf attaches asynchronously; nothing to poll for
    local segs0
    segs0=$(out_segs)
    load "$2"
    echo $(( $(out_segs) - segs0 )) >"$3.segs"
    stop_wait "$perf" 5 INT
    stop_wait "$STOPPID" 5
}

# TCP segments sent by the whole machine so far (OutSegs of /proc/net/snmp).
out_segs() { awk '$1 == "Tcp:" { if (h) { for (i = 1; i <= NF; i++) if (k[i] == "OutSegs") print $i } else { for (i = 1; i <= NF; i++) k[i] = $i; h = 1 } }' /proc/net/snmp; }

# User and kernel clock ticks of all of pid $1's threads so far.
ticks() { awk '{u += $14; s += $15} END {print u, s}' /proc/"$1"/task/*/stat; }

# Instructions counted in callgrind output $1.
cg_total() { grep -h '^summary:' "$1" | awk '{print $2}'; }

# Annotated listings of callgrind output $1: $2-inclusive.txt and $2-self.txt.
cg_annotate() {
    callgrind_annotate --inclusive=yes "$1" >"$2-inclusive.txt" 2>/dev/null || true
    callgrind_annotate "$1" >"$2-self.txt" 2>/dev/null || true
}

# The top 25 symbols (dso, symbol) of perf recording $1, into $2.
perf_top() {
    perf report -i "$1" --no-children --sort dso,sym --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -25 >"$2" || true
}

case "$MODE" in
    syscalls)
        printf '%-16s %-26s %s\n' target syscall per_message | tee "$OUT/syscalls.txt"
        for t in $TARGETS; do
            count_syscalls "$t" "$SHORT" "$OUT/$t-short.csv"
            count_syscalls "$t" "$LONG" "$OUT/$t-long.csv"
            msgs=$(( (LONG - SHORT) * CONNS ))
            awk -F, -v m="$msgs" -v t="$t" '
                FNR == NR { if ($3 != "") short[$3] = $1; next }
                $3 != "" { d = ($1 - short[$3]) / m; if (d > 0.005) printf "%-16s %-26s %.2f\n", t, $3, d }' \
                "$OUT/$t-short.csv" "$OUT/$t-long.csv" |
                sort -k3 -nr | tee -a "$OUT/syscalls.txt"
            # The whole machine's segments (clients, proxy, backend), as for handshakes.
            awk -v a="$(cat "$OUT/$t-short.csv.segs")" -v b="$(cat "$OUT/$t-long.csv.segs")" \
                -v m="$msgs" -v t="$t" \
                'BEGIN { printf "%-16s %-26s %.2f\n", t, "tcp segments (all sockets)", (b - a) / m }' |
                tee -a "$OUT/syscalls.txt"
        done ;;
    callgrind)
        for t in $TARGETS; do
            for n in "$SHORT" "$LONG"; do
                WRAP="valgrind --tool=callgrind --callgrind-out-file=$OUT/$t-$n.callgrind" start "$t"
                load "$n"
                stop_wait "$STOPPID" 60
            done
            a=$(cg_total "$OUT/$t-$SHORT.callgrind")
            b=$(cg_total "$OUT/$t-$LONG.callgrind")
            per=$(( (b - a) / ((LONG - SHORT) * CONNS) ))
            echo "$t: $per user-space instructions per echoed 64 B message (both directions)" | tee -a "$OUT/summary.txt"
            cg_annotate "$OUT/$t-$LONG.callgrind" "$OUT/$t"
        done ;;
    callgrind-handshake)
        for t in $TARGETS; do
            declare -A SESS=()
            for secs in 2 8; do
                WRAP="valgrind --tool=callgrind --callgrind-out-file=$OUT/$t-hs$secs.callgrind" start "$t"
                SESS[$secs]=$(hs_load "$secs")
                stop_wait "$STOPPID" 60
            done
            a=$(cg_total "$OUT/$t-hs2.callgrind")
            b=$(cg_total "$OUT/$t-hs8.callgrind")
            per=$(( (b - a) / (SESS[8] - SESS[2]) ))
            echo "$t: $per user-space instructions per session (${SESS[2]} and ${SESS[8]} sessions)" | tee -a "$OUT/summary.txt"
            cg_annotate "$OUT/$t-hs8.callgrind" "$OUT/$t-hs"
        done ;;
    syscalls-handshake)
        # Counted over one load, after the proxy has started (its setup is not counted);
        # divided by the sessions that load completed.
        printf '%-16s %-26s %s\n' target syscall per_session | tee "$OUT/syscalls-handshake.txt"
        for t in $TARGETS; do
            start "$t"
            perf stat -x, -e "$EVENTS" -p "$TPID" -o "$OUT/$t-hs.csv" &
            hs_perf=$!
            PIDS+=("$hs_perf")
            sleep 0.3 # perf attaches asynchronously; nothing to poll for
            segs0=$(out_segs)
            n=$(hs_load "$HS_SECS")
            segs1=$(out_segs)
            stop_wait "$hs_perf" 5 INT
            stop_wait "$STOPPID" 5
            echo "$t: $n sessions" >&2
            awk -F, -v n="$n" -v t="$t" '
                $3 != "" { d = $1 / n; if (d > 0.005) printf "%-16s %-26s %.2f\n", t, $3, d }' \
                "$OUT/$t-hs.csv" | sort -k3 -nr | tee -a "$OUT/syscalls-handshake.txt"
            # Segments are the kernel's unit of work on loopback: each is sent, received
            # and often answered. Counted for the whole machine (clients, proxy, backend).
            awk -v d=$((segs1 - segs0)) -v n="$n" -v t="$t" \
                'BEGIN { printf "%-16s %-26s %.2f\n", t, "tcp segments (all sockets)", d / n }' |
                tee -a "$OUT/syscalls-handshake.txt"
        done ;;
    cpu-handshake)
        # User and kernel CPU of the proxy per session (utime/stime of all its threads from
        # /proc, before and after each load), $HS_REPS loads on one proxy process after a
        # warm-up load.
        printf '%-16s %-8s %9s %12s %12s %12s\n' target run sessions user_us sys_us total_us |
            tee "$OUT/cpu-handshake.txt"
        hz=$(getconf CLK_TCK)
        for t in $TARGETS; do
            start "$t"
            hs_load 1 >/dev/null
            : >"$TMP/cpu-hs-runs"
            for rep in $(seq "$HS_REPS"); do
                read -r u0 s0 < <(ticks "$TPID")
                n=$(hs_load "$HS_SECS")
                read -r u1 s1 < <(ticks "$TPID")
                awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v n="$n" -v hz="$hz" \
                    'BEGIN { printf "%d %.2f %.2f %.2f\n", n, u * 1e6 / hz / n, s * 1e6 / hz / n, (u + s) * 1e6 / hz / n }' |
                    tee -a "$TMP/cpu-hs-runs" |
                    awk -v t="$t" -v r="$rep" '{ printf "%-16s %-8s %9d %12.2f %12.2f %12.2f\n", t, r, $1, $2, $3, $4 }' |
                    tee -a "$OUT/cpu-handshake.txt"
            done
            # Median of each column on its own.
            for col in 1 2 3 4; do
                sort -g -k"$col","$col" "$TMP/cpu-hs-runs" | awk -v c="$col" '{ v[NR] = $c }
                    END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
            done | paste -sd' ' | awk -v t="$t" '{ printf "%-16s %-8s %9d %12.2f %12.2f %12.2f\n", t, "median", $1, $2, $3, $4 }' |
                tee -a "$OUT/cpu-handshake.txt"
            # Where the time goes: perf cpu-clock samples of one more load, as top symbols and
            # as µs per session inside each syscall (its kernel work, including the loopback
            # softirq it runs for the peer), in $OUT/cpu-handshake-syscalls.txt.
            perf record -q -e cpu-clock -F 1999 -g -p "$TPID" -o "$OUT/$t-hs.perf" &
            hs_perf=$!
            PIDS+=("$hs_perf")
            sleep 0.3
            n=$(hs_load "$HS_SECS")
            stop_wait "$hs_perf" 10 INT
            perf_top "$OUT/$t-hs.perf" "$OUT/$t-hs-kernel.txt"
            # A syscall's time is its entry point's inclusive share. Some entry points are tail
            # calls, rarely on the stack: for those their callee counts (the larger of the two).
            perf report -i "$OUT/$t-hs.perf" --children --sort sym --stdio -g none 2>/dev/null |
                awk -v n="$n" -v t="$t" -v list="$SYSCALLS" '
                    BEGIN { alias["read"] = "ksys_read"; alias["write"] = "ksys_write"
                            alias["readv"] = "do_readv"; alias["writev"] = "do_writev" }
                    /^# Event count/ { ns = $NF }
                    / \[k\] / { sub("%", "", $1); pct[$NF] = $1 }
                    END {
                        printf "%-16s %-18s %9.2f\n", t, "(total)", ns / 1e3 / n
                        k = split(list, names, " ")
                        for (i = 1; i <= k; i++) {
                            s = names[i]; m = pct["__x64_sys_" s] + 0
                            if ((s in alias) && pct[alias[s]] + 0 > m) m = pct[alias[s]] + 0
                            us = m * ns / 1e5 / n
                            if (us >= 0.05) printf "%-16s %-18s %9.2f\n", t, s, us
                        }
                    }' |
                sort -k3 -gr >>"$OUT/cpu-handshake-syscalls.txt" || true
            stop_wait "$STOPPID" 5
        done
        printf '\n%-16s %-18s %9s\n' target syscall us_per_session
        cat "$OUT/cpu-handshake-syscalls.txt" ;;
    massif)
        for t in $TARGETS; do
            WRAP="valgrind --tool=massif --detailed-freq=1 --max-snapshots=60 --massif-out-file=$OUT/$t.massif" start "$t"
            "$LOADGEN" idle --addr "127.0.0.1:$PPORT" --sessions 1000 --procs 2 --hold 3 --target profile \
                | jq -c '{established, faults}' >&2
            stop_wait "$STOPPID" 60
            ms_print --threshold=2 "$OUT/$t.massif" >"$OUT/$t-massif.txt"
            # Largest useful-heap column of the snapshot table.
            peak=$(awk 'NR > 1 && $1 ~ /^[0-9]+$/ && NF >= 5 { gsub(",", "", $4); if ($4 + 0 > m) m = $4 + 0 } END { print m }' "$OUT/$t-massif.txt")
            echo "$t: peak useful heap $peak B = $((peak / 1000)) B per session (1,000 sessions); tree: $OUT/$t-massif.txt" | tee -a "$OUT/summary.txt"
        done ;;
    cpu)
        # User and kernel CPU of the proxy per echo (utime/stime of all its threads from
        # /proc, between a short and a long load), then where the kernel time goes (perf
        # cpu-clock samples of one more long load, kernel symbols).
        printf '%-16s %12s %12s %12s\n' target user_us sys_us total_us | tee "$OUT/cpu.txt"
        hz=$(getconf CLK_TCK)
        for t in $TARGETS; do
            start "$t"
            load "$SHORT"
            read -r u0 s0 < <(ticks "$TPID")
            load "$LONG"
            read -r u1 s1 < <(ticks "$TPID")
            msgs=$(( LONG * CONNS ))
            awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v m="$msgs" -v hz="$hz" -v t="$t" \
                'BEGIN { printf "%-16s %12.2f %12.2f %12.2f\n", t, u * 1e6 / hz / m, s * 1e6 / hz / m, (u + s) * 1e6 / hz / m }' |
                tee -a "$OUT/cpu.txt"
            perf record -q -e cpu-clock -F 1999 -g -p "$TPID" -o "$OUT/$t.perf" &
            local_perf=$!
            PIDS+=("$local_perf")
            sleep 0.3
            load "$LONG"
            stop_wait "$local_perf" 10 INT
            perf_top "$OUT/$t.perf" "$OUT/$t-kernel.txt"
            stop_wait "$STOPPID" 5
        done ;;
    *) echo "usage: bench/profile.sh syscalls|cpu|callgrind|callgrind-handshake|syscalls-handshake|cpu-handshake|massif [targets]" >&2; exit 2 ;;
esac
echo "output: $OUT" >&2
