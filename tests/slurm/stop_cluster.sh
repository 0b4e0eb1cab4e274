#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/setup_cluster.sh [BASE_DIR] (default /tmp/safedata-slurm).
# Stops only the slurmd and slurmctld whose pids are in BASE_DIR/run/; keeps config, state and logs.
# Exits 0 when nothing is running.
set -euo pipefail

BASE="${1:-/tmp/safedata-slurm}"
log() { echo "stop_cluster: $*" >&2; }

stop_one() {  # stop_one NAME
    local name="$1" pidfile="$BASE/run/$1.pid" pid
    [ -s "$pidfile" ] || { log "$name: no pid file"; return 0; }
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [ -z "$pid" ] || [ ! -d "/proc/$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
        log "$name: not running (stale pid file)"
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        [ -d "/proc/$pid" ] || { rm -f "$pidfile"; return 0; }
        sleep 0.5
    done
    log "$name (pid $pid) ignored SIGTERM for 20 s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
    if [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        echo "stop_cluster: ERROR: could not stop $name (pid $pid)" >&2
        return 1
    fi
    rm -f "$pidfile"
}

rc=0
stop_one slurmd || rc=1
stop_one slurmctld || rc=1
exit "$rc"
