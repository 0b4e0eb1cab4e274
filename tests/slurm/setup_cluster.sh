#!/usr/bin/env bash
# Start (or reuse) a one-node SLURM cluster on loopback for the project's tests. Run as root.
#
#   bash tests/slurm/setup_cluster.sh [BASE_DIR]        # BASE_DIR defaults to /tmp/safedata-slurm
#   export SLURM_CONF=BASE_DIR/slurm.conf               # what clients (sbatch, squeue, tests) need
#
# Installs Debian's slurm-wlm when sbatch/slurmctld/slurmd are missing, writes BASE_DIR/slurm.conf from
# tests/slurm/slurm.conf.in (this host's short hostname, nproc CPUs, total memory from `free`), starts
# slurmctld and slurmd as daemons and waits until the node is idle. Progress goes to stderr; the last
# line on stdout is the SLURM_CONF path. Idempotent: a cluster already running with the same config is
# reused (same config, both daemons alive); a running cluster whose config changed is restarted keeping
# its jobs; a cold start begins with an empty job queue. Stop it with tests/slurm/stop_cluster.sh [BASE_DIR].
#
# Authentication: auth/none + cred/none when the installed SLURM ships those plugins (Debian 12's 22.05
# does; SLURM >= 23.11 dropped them), otherwise munge. SAFEDATA_SLURM_AUTH=none|munge forces one.
# Ports: SAFEDATA_SLURM_CTLD_PORT (default 6817), SAFEDATA_SLURM_SLURMD_PORT (default 6818).
# Timeout for the node to become idle: SAFEDATA_SLURM_WAIT (seconds, default 60).
set -euo pipefail

BASE="${1:-/tmp/safedata-slurm}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/slurm.conf.in"
CONF="$BASE/slurm.conf"
CTLD_PORT="${SAFEDATA_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${SAFEDATA_SLURM_SLURMD_PORT:-6818}"
WAIT_S="${SAFEDATA_SLURM_WAIT:-60}"

log() { echo "setup_cluster: $*" >&2; }
die() {
    echo "setup_cluster: ERROR: $*" >&2
    for f in "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log"; do
        if [ -s "$f" ]; then echo "----- last lines of $f -----" >&2; tail -n 25 "$f" >&2; fi
    done
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and runs slurmctld/slurmd as root)"
[ -f "$TEMPLATE" ] || die "template $TEMPLATE not found"
case "$BASE" in /*) ;; *) BASE="$(pwd)/$BASE"; CONF="$BASE/slurm.conf" ;; esac

# ---- 1. install -------------------------------------------------------------------------------------
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null; then
    command -v apt-get >/dev/null || die "sbatch/slurmctld/slurmd missing and no apt-get to install slurm-wlm"
    log "installing slurm-wlm with apt-get ..."
    apt-get update -q >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >&2 || die "apt-get install slurm-wlm failed"
fi
for b in sbatch squeue sinfo scontrol slurmctld slurmd; do
    command -v "$b" >/dev/null || die "$b not found after installing slurm-wlm"
done
log "$(slurmctld -V 2>/dev/null || echo "slurm (unknown version)")"

# ---- 2. authentication plugin -----------------------------------------------------------------------
PLUGIN_DIR=""
for d in /usr/lib/*/slurm-wlm /usr/lib/slurm-wlm /usr/lib64/slurm /usr/lib/slurm /usr/local/lib/slurm; do
    if [ -d "$d" ] && ls "$d"/auth_*.so >/dev/null 2>&1; then PLUGIN_DIR="$d"; break; fi
done
[ -n "$PLUGIN_DIR" ] || die "cannot find SLURM's plugin directory (auth_*.so)"

AUTH="${SAFEDATA_SLURM_AUTH:-}"
if [ -z "$AUTH" ]; then
    if [ -f "$PLUGIN_DIR/auth_none.so" ] && [ -f "$PLUGIN_DIR/cred_none.so" ]; then AUTH=none; else AUTH=munge; fi
fi
case "$AUTH" in
none)
    [ -f "$PLUGIN_DIR/auth_none.so" ] && [ -f "$PLUGIN_DIR/cred_none.so" ] \
        || die "auth/none requested but $PLUGIN_DIR lacks auth_none.so/cred_none.so" ;;
munge)
    [ -f "$PLUGIN_DIR/auth_munge.so" ] || die "no auth_munge.so in $PLUGIN_DIR"
    if ! command -v munged >/dev/null || ! command -v munge >/dev/null; then
        log "installing munge ..."
        apt-get update -q >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q munge >&2 || die "apt-get install munge failed"
    fi
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        if [ ! -s /etc/munge/munge.key ]; then
            log "creating /etc/munge/munge.key"
            mkdir -p /etc/munge
            if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force >&2
            else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
        fi
        MUNGE_USER=root
        id munge >/dev/null 2>&1 && MUNGE_USER=munge
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown "$MUNGE_USER" /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
        chmod 0700 /etc/munge /var/log/munge /var/lib/munge
        chmod 0755 /run/munge
        chmod 0400 /etc/munge/munge.key
        log "starting munged as $MUNGE_USER"
        if [ "$MUNGE_USER" = root ]; then munged --force >&2 || die "munged failed to start"
        else runuser -u munge -- munged >&2 || die "munged failed to start"; fi
        for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munged is not answering (munge -n | unmunge fails)"
    fi ;;
*) die "SAFEDATA_SLURM_AUTH must be none or munge, not '$AUTH'" ;;
esac
log "auth plugin: auth/$AUTH, cred/$AUTH (plugins in $PLUGIN_DIR)"

# ---- 3. config --------------------------------------------------------------------------------------
HOST="$(hostname -s 2>/dev/null || hostname)"
[ -n "$HOST" ] || die "cannot determine the short hostname"
# GNU nproc honours OMP_NUM_THREADS (a test run under OMP_NUM_THREADS=1 would make a 1-CPU node, where array
# tasks can never run at once); the node gets the CPUs this process may run on.
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
MEM="$(free -m | awk '/^Mem:/ {print $2}')"
[ -n "$MEM" ] && [ "$MEM" -gt 0 ] || MEM=1000
mkdir -p "$BASE/state" "$BASE/spool" "$BASE/log" "$BASE/run"
chmod 0755 "$BASE" "$BASE/spool" "$BASE/log" "$BASE/run"
chmod 0700 "$BASE/state"

NEW_CONF="$BASE/slurm.conf.new"
sed -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM|g" -e "s|@BASE@|$BASE|g" \
    -e "s|@AUTH@|$AUTH|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    "$TEMPLATE" > "$NEW_CONF"
if grep -q '@[A-Z_]*@' "$NEW_CONF"; then die "unfilled placeholder in $NEW_CONF: $(grep -o '@[A-Z_]*@' "$NEW_CONF" | head -1)"; fi

running() {  # running NAME PIDFILE -> 0 when that pid is alive and is NAME
    local pid
    [ -s "$2" ] || return 1
    pid="$(cat "$2" 2>/dev/null)"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

export SLURM_CONF="$CONF"
REUSE=0
KEEP_STATE=0
if [ -f "$CONF" ] && cmp -s "$NEW_CONF" "$CONF" \
    && running slurmctld "$BASE/run/slurmctld.pid" && running slurmd "$BASE/run/slurmd.pid"; then
    REUSE=1
    rm -f "$NEW_CONF"
    log "slurmctld and slurmd already running with this config: reusing them"
else
    if running slurmctld "$BASE/run/slurmctld.pid" || running slurmd "$BASE/run/slurmd.pid"; then
        log "stopping the running daemons (config changed or one daemon missing)"
        bash "$HERE/stop_cluster.sh" "$BASE" >&2 || die "could not stop the old daemons"
        KEEP_STATE=1  # jobs of the running cluster survive the restart
    fi
    mv -f "$NEW_CONF" "$CONF"
    chmod 0644 "$CONF"
fi

# ---- 4. start ---------------------------------------------------------------------------------------
start_daemon() {  # start_daemon NAME ARGS...
    local name="$1"; shift
    "$@" >>"$BASE/log/$name.stdout" 2>&1 || die "$name failed to start: $* (see $BASE/log/$name.log)"
    for _ in $(seq 1 20); do
        running "$name" "$BASE/run/$name.pid" && return 0
        sleep 0.5
    done
    die "$name did not stay up (no live pid in $BASE/run/$name.pid)"
}
if [ "$REUSE" -eq 0 ]; then
    # Refuse to fight another SLURM already bound to our ports (e.g. a second base dir).
    if command -v ss >/dev/null && ss -ltn 2>/dev/null | awk '{print $4}' | grep -Eq "[:.]($CTLD_PORT|$SLURMD_PORT)\$"; then
        die "port $CTLD_PORT or $SLURMD_PORT is already in use (another SLURM?); stop it or set SAFEDATA_SLURM_CTLD_PORT/SAFEDATA_SLURM_SLURMD_PORT"
    fi
    if [ "$KEEP_STATE" -eq 1 ]; then
        log "starting slurmctld (config $CONF), recovering its jobs"
        start_daemon slurmctld slurmctld -f "$CONF"
    else
        # A cold start (after a reboot, a killed session, stop_cluster.sh) forgets old jobs, so none is rerun.
        log "starting slurmctld (config $CONF) with a clean job state"
        start_daemon slurmctld slurmctld -c -f "$CONF"
    fi
    log "starting slurmd (node $HOST)"
    start_daemon slurmd slurmd -f "$CONF" -N "$HOST"
fi

# ---- 5. wait until the node is idle -----------------------------------------------------------------
deadline=$(( $(date +%s) + WAIT_S ))
resumed=0
state=""
while :; do
    state="$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -1 || true)"
    case "$state" in
    idle|mix|alloc|comp) break ;;  # usable (a reused cluster may be busy with jobs)
    down*|drain*|drng*|fail*|inval*)
        if [ "$resumed" -eq 0 ]; then
            log "node state '$state': resuming it"
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi ;;
    esac
    running slurmctld "$BASE/run/slurmctld.pid" || die "slurmctld died"
    running slurmd "$BASE/run/slurmd.pid" || die "slurmd died"
    [ "$(date +%s)" -lt "$deadline" ] || die "node $HOST not idle after ${WAIT_S}s (last state: '${state:-no answer from slurmctld}')"
    sleep 1
done
log "node $HOST is $state ($CPUS CPUs, ${MEM} MB); partition debug is the default"
log "clients need: export SLURM_CONF=$CONF"
echo "$CONF"
