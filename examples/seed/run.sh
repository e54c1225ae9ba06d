#!/usr/bin/env bash
# The seed scenario, unattended: the nginx WebSocket tutorial with wsgate in nginx's place
# (docs/seed-scenario.md). Needs cargo, node (20) and npm.
#
#   bash examples/seed/run.sh             the tutorial: the Node `ws` echo server
#                                         (server.js) on 127.0.0.1:8010, wsgate on
#                                         127.0.0.1:8020 (wsgate.json), wscat through it
#   bash examples/seed/run.sh --failover  two echo servers (8010, 8011) behind wsgate
#                                         (wsgate-failover.json); the one serving a live
#                                         wscat session is killed mid-session
#
#   WSGATE=path/to/wsgate bash examples/seed/run.sh   use that binary instead of building
#
# Loopback only. Every step has a time limit; everything the script starts is stopped on
# exit, by process id. Ports 8010, 8011 (--failover) and 8020 must be free.
# Exit 0 when the echoes came back through the gateway.
set -euo pipefail

MODE=tutorial
case "${1:-}" in
"") ;;
--failover) MODE=failover ;;
*)
    echo "usage: bash examples/seed/run.sh [--failover]" >&2
    exit 2
    ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
GATEWAY_PORT=8020 # fixed by wsgate.json and wsgate-failover.json
if [ "$MODE" = failover ]; then
    CONFIG="$HERE/wsgate-failover.json"
    BACKEND_PORTS=(8010 8011)
else
    CONFIG="$HERE/wsgate.json"
    BACKEND_PORTS=(8010) # fixed by server.js, as in the tutorial
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/wsgate-seed.XXXXXX")"
PIDS=()

cleanup() {
    local pid
    exec 4>&- 2>/dev/null || true
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n==> %s\n' "$*"; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to 10 s for something to listen on 127.0.0.1:PORT.
wait_port() {
    local port="$1" what="$2" i
    for i in $(seq 1 100); do
        port_busy "$port" && return 0
        sleep 0.1
    done
    echo "run.sh: $what did not listen on 127.0.0.1:$port within 10 s" >&2
    return 1
}

# Drops npm's warnings from wscat's output.
no_npm_noise() { grep -v '^npm warn' || true; }

for port in "${BACKEND_PORTS[@]}" "$GATEWAY_PORT"; do
    if port_busy "$port"; then
        echo "run.sh: 127.0.0.1:$port is already in use; stop what runs there first" >&2
        exit 1
    fi
done

step "npm install (ws, wscat) in examples/seed"
cd "$HERE"
timeout 180 npm install --no-audit --no-fund --loglevel=error

if [ -z "${WSGATE:-}" ]; then
    step "cargo build --bin wsgate"
    (cd "$ROOT" && timeout 900 cargo build --quiet --bin wsgate)
    WSGATE="$ROOT/target/debug/wsgate"
fi

step "the wsgate config (examples/seed/${CONFIG##*/})"
cat "$CONFIG"
step "wsgate --check --config examples/seed/${CONFIG##*/}"
"$WSGATE" --check --config "$CONFIG"

# Backends: the tutorial's server.js as it is on 8010; for 8011 the same file with the port
# changed (written to the scratch folder, `ws` found through NODE_PATH).
BACKEND_PIDS=()
for port in "${BACKEND_PORTS[@]}"; do
    if [ "$port" = 8010 ]; then
        step "node server.js   (backend, 127.0.0.1:8010)"
        node "$HERE/server.js" >"$WORK/server-8010.log" 2>&1 &
    else
        step "node server.js with port $port   (backend, 127.0.0.1:$port)"
        sed "s/port: 8010/port: $port/" "$HERE/server.js" >"$WORK/server-$port.js"
        NODE_PATH="$HERE/node_modules" node "$WORK/server-$port.js" >"$WORK/server-$port.log" 2>&1 &
    fi
    PIDS+=("$!")
    BACKEND_PIDS+=("$!")
    wait_port "$port" "node server.js ($port)"
done

step "wsgate --config examples/seed/${CONFIG##*/}   (gateway, 127.0.0.1:$GATEWAY_PORT)"
RUST_LOG=info "$WSGATE" --config "$CONFIG" >"$WORK/wsgate.log" 2>&1 &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
wait_port "$GATEWAY_PORT" "wsgate"

if [ "$MODE" = tutorial ]; then
    step "npx wscat --connect ws://127.0.0.1:$GATEWAY_PORT -x 'Hello' -x 'Welcome to wsgate' -w 1"
    # -x sends each message once connected, -w 1 waits a second for the answers, then
    # wscat closes. wscat also quits when its stdin ends, so its stdin is a FIFO held open
    # by a `sleep` meanwhile. Not on a terminal, wscat prints only the messages it receives.
    mkfifo "$WORK/stdin"
    sleep 60 >"$WORK/stdin" &
    PIDS+=("$!")
    set +e
    timeout 30 npx wscat --connect "ws://127.0.0.1:$GATEWAY_PORT" \
        -x 'Hello' -x 'Welcome to wsgate' -w 1 <"$WORK/stdin" >"$WORK/wscat.out" 2>&1
    wscat_rc=$?
    set -e
    no_npm_noise <"$WORK/wscat.out"
    echo "(wscat exit status $wscat_rc)"
fi

# The tutorial's interactive session: `script` gives wscat a terminal; a line is typed once
# the previous answer is on the screen, and Ctrl-D ends the session. In --failover mode the
# backend that answered the first line is killed (SIGKILL, no close frame) before the next.
step "npx wscat --connect ws://127.0.0.1:$GATEWAY_PORT   (interactive, on a pseudo-terminal)"
if ! command -v script >/dev/null 2>&1; then
    echo "(skipped: no \`script\` command; it is in util-linux)"
    [ "$MODE" = tutorial ] || exit 1
else
    mkfifo "$WORK/tty_in"
    TERM=dumb timeout 30 script -qfec \
        "npx wscat --no-color --connect ws://127.0.0.1:$GATEWAY_PORT" /dev/null \
        <"$WORK/tty_in" >"$WORK/tty_out" 2>&1 &
    TTY_PID=$!
    PIDS+=("$TTY_PID")
    exec 4>"$WORK/tty_in"
    # Waits up to 20 s for TEXT in wscat's output.
    wait_output() {
        local i
        for i in $(seq 1 200); do
            grep -qF "$1" "$WORK/tty_out" && return 0
            sleep 0.1
        done
        echo "run.sh: wscat did not print \"$1\" within 20 s" >&2
        return 1
    }
    # The backend whose log shows TEXT (--failover).
    kill_backend_that_got() {
        local i port
        for i in "${!BACKEND_PORTS[@]}"; do
            port="${BACKEND_PORTS[$i]}"
            if grep -qF "$1" "$WORK/server-$port.log"; then
                echo "[run.sh: kill -9 the echo server on $port, which answered]" >>"$WORK/events"
                { kill -9 "${BACKEND_PIDS[$i]}" && wait "${BACKEND_PIDS[$i]}"; } 2>/dev/null
                return 0
            fi
        done
        return 1
    }
    set +e
    if [ "$MODE" = tutorial ]; then
        wait_output "Connected" &&
            printf 'Hello\r' >&4 && wait_output "from client: Hello" &&
            printf 'Welcome to wsgate\r' >&4 && wait_output "from client: Welcome"
    else
        wait_output "Connected" &&
            printf 'Hello\r' >&4 && wait_output "from client: Hello" &&
            kill_backend_that_got "from client: Hello" && sleep 0.5 &&
            printf 'Still there?\r' >&4 && wait_output "from client: Still there?"
    fi
    printf '\004' >&4 # Ctrl-D
    exec 4>&-
    wait "$TTY_PID"
    set -e
    # What the terminal shows: drop colour and cursor escapes, keep what each line ends
    # with after its carriage returns.
    awk '{ gsub(/\033\[[0-9;]*[A-Za-z]/, ""); n = split($0, part, "\r"); line = "";
           for (i = n; i >= 1; i--) if (part[i] != "") { line = part[i]; break }
           if (line != "" && line !~ /^npm warn/) print line }' "$WORK/tty_out" |
        tee "$WORK/tty_screen"
    [ -f "$WORK/events" ] && cat "$WORK/events"
fi

# Stop the gateway the way systemd would (SIGTERM: drain, exit 0), then show the logs.
sleep 0.2
kill -TERM "$GATEWAY_PID"
timeout 15 tail --pid="$GATEWAY_PID" -f /dev/null || true
for port in "${BACKEND_PORTS[@]}"; do
    step "echo server $port output"
    cat "$WORK/server-$port.log"
done
step "wsgate log"
cat "$WORK/wsgate.log"

if [ "$MODE" = tutorial ]; then
    expected="Server received from client: Hello"
    if grep -qxF "$expected" "$WORK/wscat.out"; then
        step "OK: the echo came back through wsgate"
        exit 0
    fi
    step "FAILED: wscat did not print \"$expected\""
else
    if grep -qF "< Server received from client: Still there?" "$WORK/tty_screen" &&
        grep -q "failed over" "$WORK/wsgate.log"; then
        step "OK: the session outlived its echo server"
        exit 0
    fi
    step "FAILED: no answer after the echo server was killed, or no failover in the log"
fi
exit 1
