#!/usr/bin/env bash
# A throwaway single-node Slurm cluster on this machine, for trying the sbatch scripts and for tests.
#
#   scripts/slurm_local.sh start  [STATE_DIR]   install (apt) if needed, configure, start, wait until idle
#   scripts/slurm_local.sh status [STATE_DIR]   show the daemons and `sinfo`
#   scripts/slurm_local.sh stop   [STATE_DIR]   stop the daemons and remove everything but STATE_DIR/logs
#
# STATE_DIR defaults to ${TMPDIR:-/tmp}/shield-ds-slurm. Everything lives there: slurm.conf, a private
# munge key and socket, spool and state directories, pid files and logs. Nothing under /etc is changed,
# so clients need `export SLURM_CONF=STATE_DIR/slurm.conf` (or `source STATE_DIR/env.sh`).
# Run as root (slurmd starts job steps as the submitting user). Only 127.0.0.1 is used.
set -euo pipefail

action=${1:-}
STATE_DIR=${2:-${TMPDIR:-/tmp}/shield-ds-slurm}
case "$action" in start|stop|status) ;; *) echo "usage: $0 {start|stop|status} [STATE_DIR]" >&2; exit 2 ;; esac
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
CONF=$STATE_DIR/slurm.conf
LOGS=$STATE_DIR/logs
export SLURM_CONF=$CONF

log() { echo "[slurm_local] $*" >&2; }

pid_alive() {  # pid_alive FILE: the pid in FILE names a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, wait up to 10 s, then KILL
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$file"
}

port_free() {  # nothing listens on 127.0.0.1:PORT
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port_from() {  # the first free port at or after $1
    local port=$1
    while ! port_free "$port"; do port=$((port + 1)); done
    echo "$port"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    if [[ $(id -u) != 0 ]]; then
        log "missing ${missing[*]} and not root: install them (apt-get install slurm-wlm munge) first"; exit 1
    fi
    log "installing ${missing[*]} with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    local host cpus mem_mb ctld_port slurmd_port
    host=$(hostname -s)
    cpus=$(nproc --all)
    # Slurm drains a node whose real memory is below RealMemory: leave 10% headroom.
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    # Ports are picked once per state dir, so a second cluster (another STATE_DIR) does not collide.
    if [[ -s $STATE_DIR/ports ]]; then
        read -r ctld_port slurmd_port <"$STATE_DIR/ports"
    else
        ctld_port=$(free_port_from 16817)
        slurmd_port=$(free_port_from $((ctld_port + 1)))
        echo "$ctld_port $slurmd_port" >"$STATE_DIR/ports"
    fi
    mkdir -p "$STATE_DIR"/{ctld,spool,munge,run} "$LOGS"
    chmod 700 "$STATE_DIR/munge"
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: one node ($host), $cpus CPUs, no GPUs.
ClusterName=shieldlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job: keep it short on a test cluster.
AuthInfo=socket=$STATE_DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule often: a requeued job only becomes eligible later, and waits for the next pass.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to "scontrol show job" for an hour (there is no accounting database).
MinJobAge=3600
KillWait=30
SlurmdTimeout=300
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=7-00:00:00 State=UP OverSubscribe=NO
EOF
    cat >"$STATE_DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF
}

start_munge() {
    local key=$STATE_DIR/munge/munge.key
    pid_alive "$STATE_DIR/run/munged.pid" && return 0
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        chmod 400 "$key"
    fi
    munged --force --key-file="$key" --socket="$STATE_DIR/munge/munge.socket" \
        --pid-file="$STATE_DIR/run/munged.pid" --log-file="$LOGS/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed"
}

wait_idle() {
    local host state
    host=$(hostname -s)
    for _ in $(seq 120); do
        state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mix|alloc) return 0 ;;
            drain*|down*)
                # A restart with the old state can leave the node down: resume it once.
                scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "node $host did not become idle (state: ${state:-unknown}); see $LOGS"
    sinfo -N -l >&2 || true
    return 1
}

start() {
    install_packages
    if pid_alive "$STATE_DIR/run/slurmctld.pid" && pid_alive "$STATE_DIR/run/slurmd.pid" && wait_idle; then
        log "already running"
    else
        write_config
        start_munge
        # -i: ignore saved state from an earlier start of this state dir (jobs and node states).
        pid_alive "$STATE_DIR/run/slurmctld.pid" || slurmctld -i -f "$CONF"
        pid_alive "$STATE_DIR/run/slurmd.pid" || slurmd -f "$CONF"
        wait_idle
        log "started"
    fi
    log "config: $CONF    logs: $LOGS"
    echo "export SLURM_CONF=$CONF"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if pid_alive "$STATE_DIR/run/$name.pid"; then
            echo "$name: running (pid $(cat "$STATE_DIR/run/$name.pid"))"
        else
            echo "$name: stopped"
        fi
    done
    if [[ -f $CONF ]] && pid_alive "$STATE_DIR/run/slurmctld.pid"; then sinfo; fi
    echo "config: $CONF    logs: $LOGS"
}

stop() {
    if [[ -f $CONF ]] && pid_alive "$STATE_DIR/run/slurmctld.pid"; then
        # Cancel what still runs so no job step outlives the cluster.
        scancel --quiet --full --state=RUNNING 2>/dev/null || true
        scancel --quiet 2>/dev/null || true
        # Give slurmd time to end the steps: stopped first, it would leave their processes running.
        for _ in $(seq 60); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_pidfile "$STATE_DIR/run/slurmd.pid" slurmd
    stop_pidfile "$STATE_DIR/run/slurmctld.pid" slurmctld
    stop_pidfile "$STATE_DIR/run/munged.pid" munged
    rm -rf "$STATE_DIR"/{ctld,spool,munge,run} "$STATE_DIR"/{slurm.conf,env.sh,ports}
    log "stopped; logs kept in $LOGS"
}

"$action"
