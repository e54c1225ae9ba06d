#!/usr/bin/env bash
# A wsgate cluster on one machine, on loopback, for trying scale-out and rolling restarts:
#
#   Redis  ←  chat1, chat2 (examples/chat_server --redis: rooms shared through Redis pub/sub)
#              ↑ pool "chat" (ip_hash, health-checked, on_backend_loss: reconnect)
#   wsgate gw1, gw2 (listeners with "proxy_protocol": true; the same pool config)
#              ↑ PROXY protocol v2
#   HAProxy (TCP mode, leastconn, health checks)  ←  clients: ws://127.0.0.1:$HAPROXY_PORT/
#
#   deploy/cluster.sh start            start everything (fails if already started)
#   deploy/cluster.sh status           what runs, where, and HAProxy's view of the gateways
#   deploy/cluster.sh stop             stop everything it started (by PID) and remove its folder
#   deploy/cluster.sh restart gw1      rolling restart of one gateway: SIGTERM (its clients get
#                                      1001 and reconnect through HAProxy), wait, start again
#   deploy/cluster.sh reload           SIGHUP both gateways (after editing their configs)
#
# Settings (environment; ports default to free ones, picked at start):
#   WSGATE_CLUSTER_DIR   state folder (configs, logs, pids, Redis dir); default
#                        ${TMPDIR:-/tmp}/wsgate-cluster-$USER
#   REDIS_PORT CHAT1_PORT CHAT2_PORT GW1_PORT GW2_PORT GW1_ADMIN_PORT GW2_ADMIN_PORT
#   HAPROXY_PORT HAPROXY_STATS_PORT
#   WSGATE_BIN CHAT_SERVER_BIN   binaries; default target/$PROFILE/wsgate and
#                        target/$PROFILE/examples/chat_server, built with cargo if missing
#   PROFILE              debug (default) or release
#   REDIS_SERVER HAPROXY  the commands (default: redis-server, haproxy from PATH)
#   KEEP_LOGS=1          stop keeps the state folder (logs) instead of removing it
#
# Only loopback addresses are used. Everything started is recorded in $DIR/pids/ and stopped
# by that PID only (after checking the PID still runs the program it started).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${WSGATE_CLUSTER_DIR:-${TMPDIR:-/tmp}/wsgate-cluster-${USER:-$(id -u)}}"
PROFILE="${PROFILE:-debug}"
WSGATE_BIN="${WSGATE_BIN:-$ROOT/target/$PROFILE/wsgate}"
CHAT_SERVER_BIN="${CHAT_SERVER_BIN:-$ROOT/target/$PROFILE/examples/chat_server}"
REDIS_SERVER="${REDIS_SERVER:-redis-server}"
HAPROXY="${HAPROXY:-haproxy}"
TEMPLATE="$ROOT/deploy/haproxy.cfg.in"
# How long any one component may take to start or stop (seconds).
START_TIMEOUT=15
STOP_TIMEOUT=15
# wsgate's drain_ms in the generated configs.
DRAIN_MS=5000

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }

# --- ports ------------------------------------------------------------------------------------

# True when something accepts on 127.0.0.1:$1.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# pick_port VAR: leaves VAR as set in the environment, else sets it to a port nothing listens
# on (from a random start in 20000-31999, below Linux's ephemeral range, skipping ports picked
# earlier in this run).
TAKEN=" "
pick_port() {
    local var="$1" p i
    if [[ -n "${!var:-}" ]]; then
        TAKEN+="${!var} "
        return 0
    fi
    p=$((20000 + RANDOM % 12000))
    for ((i = 0; i < 200; i++)); do
        if [[ "$TAKEN" != *" $p "* ]] && ! port_busy "$p"; then
            TAKEN+="$p "
            printf -v "$var" '%s' "$p"
            return 0
        fi
        p=$((p + 1))
        ((p > 31999)) && p=20000
    done
    die "no free port found for $var"
}

# --- processes --------------------------------------------------------------------------------

# alive NAME: NAME's recorded process exists (and is not a zombie).
alive() {
    local f="$DIR/pids/$1" pid
    [[ -f "$f" ]] || return 1
    read -r pid _ <"$f" || return 1
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

# pid_of NAME: the recorded PID, if that process is alive and still runs the program it was
# started with (a PID reused by another program is never signalled).
pid_of() {
    local f="$DIR/pids/$1" pid want
    alive "$1" || return 1
    read -r pid want <"$f"
    # (" (deleted)": the binary was rebuilt or upgraded since; still the same program.)
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" =~ ^"$want"( \(deleted\))?$ ]] || return 1
    echo "$pid"
}

# spawn NAME PROGRAM ARGS...: starts PROGRAM in the background (RUST_LOG as set, default
# info), output to $DIR/logs/NAME.log; records its PID and program.
spawn() {
    local name="$1" prog
    prog="$(command -v "$2")" || die "$2 not found"
    shift 2
    RUST_LOG="${RUST_LOG:-info}" "$prog" "$@" </dev/null >>"$DIR/logs/$name.log" 2>&1 &
    echo "$! $(readlink -f "$prog")" >"$DIR/pids/$name"
}

# wait_log NAME REGEX: waits (bounded) for a line matching REGEX in NAME's log; prints it.
wait_log() {
    local name="$1" re="$2" deadline=$((SECONDS + START_TIMEOUT)) line
    while ((SECONDS < deadline)); do
        if line="$(grep -E -m1 -- "$re" "$DIR/logs/$name.log" 2>/dev/null)"; then
            echo "$line"
            return 0
        fi
        if ! alive "$name"; then
            echo "--- $name log ---" >&2
            cat "$DIR/logs/$name.log" >&2 || true
            die "$name exited during start"
        fi
        sleep 0.05
    done
    cat "$DIR/logs/$name.log" >&2 || true
    die "$name: no line matching /$re/ within ${START_TIMEOUT}s"
}

# wait_port PORT NAME: waits (bounded) until 127.0.0.1:PORT accepts.
wait_port() {
    local deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        port_busy "$1" && return 0
        alive "$2" || { cat "$DIR/logs/$2.log" >&2; die "$2 exited during start"; }
        sleep 0.05
    done
    die "$2: nothing accepts on 127.0.0.1:$1 after ${START_TIMEOUT}s"
}

# stop_one NAME [SIGNAL]: signals NAME's recorded PID and waits (bounded) for it to exit.
stop_one() {
    local name="$1" sig="${2:-TERM}" pid deadline
    if ! pid="$(pid_of "$name")"; then
        rm -f "$DIR/pids/$name"
        return 0
    fi
    kill "-$sig" "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    # (A zombie counts as gone: the process has exited, its parent has not reaped it yet.)
    while alive "$name" && ((SECONDS < deadline)); do
        sleep 0.05
    done
    if alive "$name"; then
        echo "cluster.sh: $name (pid $pid) still running after ${STOP_TIMEOUT}s: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/pids/$name"
    echo "stopped $name (pid $pid)"
}

# --- configs ----------------------------------------------------------------------------------

# gateway_config NAME PORT ADMIN_PORT: a wsgate config; every instance gets the same pools.
gateway_config() {
    cat <<EOF
{
  "listeners": [
    { "name": "public", "bind": "127.0.0.1:$2", "proxy_protocol": true,
      "routes": [ { "path": "/", "pool": "chat" } ] }
  ],
  "pools": {
    "chat": {
      "balance": "ip_hash",
      "backends": [
        { "address": "127.0.0.1:$CHAT1_PORT" },
        { "address": "127.0.0.1:$CHAT2_PORT" }
      ],
      "health_check": { "kind": "websocket", "path": "/", "interval_ms": 200, "timeout_ms": 1000,
                        "healthy_after": 2, "unhealthy_after": 2 },
      "on_backend_loss": "reconnect",
      "replay_first_messages": 1,
      "http": true
    }
  },
  "timeouts": { "drain_ms": $DRAIN_MS },
  "headers": { "forwarded": true, "set": { "X-Gateway": "$1" } },
  "admin": { "bind": "127.0.0.1:$3" }
}
EOF
}

haproxy_config() {
    local servers
    servers="    server gw1 127.0.0.1:$GW1_PORT send-proxy-v2 check port $GW1_ADMIN_PORT
    server gw2 127.0.0.1:$GW2_PORT send-proxy-v2 check port $GW2_ADMIN_PORT"
    local line
    while IFS= read -r line; do
        case "$line" in
            @SERVERS@) echo "$servers" ;;
            *)
                line="${line//@STATE_DIR@/$DIR}"
                line="${line//@BIND@/127.0.0.1:$HAPROXY_PORT}"
                line="${line//@STATS_BIND@/127.0.0.1:$HAPROXY_STATS_PORT}"
                echo "$line"
                ;;
        esac
    done <"$TEMPLATE"
}

# --- commands ---------------------------------------------------------------------------------

start_gateway() {
    local name="$1"
    spawn "$name" "$WSGATE_BIN" --config "$DIR/$name.json"
    wait_log "$name" "listener public listening on " >/dev/null
    wait_log "$name" "admin listening on " >/dev/null
}

start() {
    command -v "$REDIS_SERVER" >/dev/null || die "$REDIS_SERVER not found (Debian: apt-get install redis-server)"
    command -v "$HAPROXY" >/dev/null || die "$HAPROXY not found (Debian: apt-get install haproxy)"
    if [[ -d "$DIR/pids" ]] && [[ -n "$(ls -A "$DIR/pids" 2>/dev/null)" ]]; then
        die "already started in $DIR (deploy/cluster.sh stop first)"
    fi
    if [[ ! -x "$WSGATE_BIN" || ! -x "$CHAT_SERVER_BIN" ]]; then
        say "building wsgate and examples/chat_server ($PROFILE)"
        local flag=()
        [[ "$PROFILE" == release ]] && flag=(--release)
        (cd "$ROOT" && cargo build "${flag[@]}" --bin wsgate --example chat_server)
    fi
    rm -rf "$DIR/logs" "$DIR/redis"
    mkdir -p "$DIR/pids" "$DIR/logs" "$DIR/redis"
    local v
    for v in REDIS_PORT CHAT1_PORT CHAT2_PORT GW1_PORT GW2_PORT GW1_ADMIN_PORT GW2_ADMIN_PORT \
        HAPROXY_PORT HAPROXY_STATS_PORT; do
        pick_port "$v"
    done
    # Stop what did start if a later step fails.
    trap 'echo "cluster.sh: start failed; stopping what started" >&2; stop_all >&2' EXIT

    say "redis-server on 127.0.0.1:$REDIS_PORT (no persistence, dir $DIR/redis)"
    spawn redis "$REDIS_SERVER" --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save '' --appendonly no --dir "$DIR/redis" --daemonize no
    wait_log redis "Ready to accept connections" >/dev/null

    local redis_url="redis://127.0.0.1:$REDIS_PORT"
    for n in 1 2; do
        local port_var="CHAT${n}_PORT"
        say "chat$n on 127.0.0.1:${!port_var} (Redis $redis_url)"
        spawn "chat$n" "$CHAT_SERVER_BIN" --port "${!port_var}" \
            --name "chat$n" --redis "$redis_url"
        wait_log "chat$n" "chat_server chat$n listening on " >/dev/null
    done

    gateway_config gw1 "$GW1_PORT" "$GW1_ADMIN_PORT" >"$DIR/gw1.json"
    gateway_config gw2 "$GW2_PORT" "$GW2_ADMIN_PORT" >"$DIR/gw2.json"
    say "gw1 on 127.0.0.1:$GW1_PORT (admin $GW1_ADMIN_PORT), gw2 on 127.0.0.1:$GW2_PORT (admin $GW2_ADMIN_PORT)"
    start_gateway gw1
    start_gateway gw2

    haproxy_config >"$DIR/haproxy.cfg"
    "$HAPROXY" -c -q -f "$DIR/haproxy.cfg" || die "haproxy rejected $DIR/haproxy.cfg"
    say "haproxy on 127.0.0.1:$HAPROXY_PORT (stats http://127.0.0.1:$HAPROXY_STATS_PORT/)"
    spawn haproxy "$HAPROXY" -f "$DIR/haproxy.cfg" -db
    wait_port "$HAPROXY_PORT" haproxy
    trap - EXIT

    cat >"$DIR/env" <<EOF
REDIS_PORT=$REDIS_PORT
CHAT1_PORT=$CHAT1_PORT
CHAT2_PORT=$CHAT2_PORT
GW1_PORT=$GW1_PORT
GW2_PORT=$GW2_PORT
GW1_ADMIN_PORT=$GW1_ADMIN_PORT
GW2_ADMIN_PORT=$GW2_ADMIN_PORT
HAPROXY_PORT=$HAPROXY_PORT
HAPROXY_STATS_PORT=$HAPROXY_STATS_PORT
EOF
    echo
    echo "cluster up (state in $DIR):"
    echo "  chat page:  http://127.0.0.1:$HAPROXY_PORT/"
    echo "  WebSocket:  ws://127.0.0.1:$HAPROXY_PORT/   e.g. cargo run --example client -- ws://127.0.0.1:$HAPROXY_PORT/"
    echo "  stats:      http://127.0.0.1:$HAPROXY_STATS_PORT/"
    echo "  logs:       $DIR/logs/"
    echo "  stop:       deploy/cluster.sh stop"
}

load_env() {
    [[ -f "$DIR/env" ]] || die "not started (no $DIR/env)"
    # shellcheck disable=SC1091
    source "$DIR/env"
}

stop_all() {
    # Front to back: no new clients, then the gateways drain (1001 to their clients), then
    # the backends and Redis.
    local n
    for n in haproxy gw1 gw2 chat1 chat2 redis; do
        stop_one "$n"
    done
}

stop() {
    [[ -d "$DIR" ]] || { echo "not started ($DIR does not exist)"; return 0; }
    stop_all
    if [[ "${KEEP_LOGS:-0}" == 1 ]]; then
        echo "logs kept in $DIR/logs"
        rm -rf "$DIR/pids" "$DIR/env"
    else
        rm -rf "$DIR"
    fi
}

status() {
    load_env
    local n pid rc=0
    for n in redis chat1 chat2 gw1 gw2 haproxy; do
        if pid="$(pid_of "$n")"; then
            printf '%-8s running  pid %s\n' "$n" "$pid"
        else
            printf '%-8s STOPPED\n' "$n"
            rc=1
        fi
    done
    echo "clients:  ws://127.0.0.1:$HAPROXY_PORT/"
    if command -v curl >/dev/null; then
        echo "HAProxy's view (server, status, current sessions):"
        curl -fsS --max-time 2 "http://127.0.0.1:$HAPROXY_STATS_PORT/;csv" 2>/dev/null |
            awk -F, '$1 == "wsgate" && $2 != "BACKEND" { printf "  %-6s %-6s %s\n", $2, $18, $5 }' ||
            echo "  (stats page not answering)"
        local gw port
        for gw in gw1 gw2; do
            port="${gw^^}_ADMIN_PORT"
            printf '%s /metrics: ' "$gw"
            curl -fsS --max-time 2 "http://127.0.0.1:${!port}/metrics" 2>/dev/null |
                awk '/^wsgate_sessions_active /{ printf "sessions_active %s ", $2 } /^wsgate_backend_sessions\{/{ printf "%s ", $0 } END { print "" }' ||
                echo "(not answering)"
        done
    fi
    return $rc
}

restart_gateway() {
    local gw="$1"
    [[ "$gw" == gw1 || "$gw" == gw2 ]] || die "restart: gw1 or gw2"
    load_env
    local t0=$SECONDS
    say "SIGTERM $gw: its clients get 1001 and reconnect through HAProxy to the other gateway"
    stop_one "$gw"
    say "starting $gw again"
    start_gateway "$gw"
    echo "$gw back after $((SECONDS - t0)) s; HAProxy sends it new sessions once 2 checks pass"
}

reload() {
    load_env
    local gw pid
    for gw in gw1 gw2; do
        pid="$(pid_of "$gw")" || die "$gw is not running"
        kill -HUP "$pid"
        echo "SIGHUP $gw (pid $pid): see $DIR/logs/$gw.log for 'reload: ... applied'"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) restart_gateway "${2:-}" ;;
    reload) reload ;;
    *)
        # The comment block at the top of this file.
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
        [[ -n "${1:-}" && "$1" != -h && "$1" != --help ]] && exit 2
        exit 0
        ;;
esac
