#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing slurm/train.sbatch for real.
#
#   bash slurm/local_cluster.sh start [STATE_DIR]   # install if needed, start, wait until idle
#   bash slurm/local_cluster.sh status [STATE_DIR]  # exit 0 when the node answers idle / mixed / allocated
#   bash slurm/local_cluster.sh stop [STATE_DIR]    # cancel jobs, stop the daemons it started
#   export SLURM_CONF=$(bash slurm/local_cluster.sh conf [STATE_DIR])   # for sbatch, sinfo, ...
#
# Must run as root (the daemons run as root and jobs run as the submitting user). Installs
# Debian's slurm-wlm and munge with apt-get when they are missing. Everything it writes (config,
# munge key and socket, spool, state, logs, pid files) lives under STATE_DIR (default
# $TRAINER_SLURM_DIR or /tmp/trainer-slurm); nothing in the repository or /etc is touched, so
# client commands need SLURM_CONF=STATE_DIR/slurm.conf. Starting a running cluster is a no-op.
#
# The config is the smallest that runs in a container without systemd or cgroups: one node
# (this host's short name, all its CPUs, modest memory), one partition `debug` (default),
# select/cons_tres on cores, proctrack/linuxproc, task/none, no accounting.
#
# Exit codes: 0 ok; 1 failure (logs printed); 2 usage; 3 Slurm / munge missing and could not
# be installed (tests skip on 3 only).
set -euo pipefail

ACTION=${1:-}
STATE_DIR=${2:-${TRAINER_SLURM_DIR:-/tmp/trainer-slurm}}
HOST=$(hostname -s)
CONF=${STATE_DIR}/slurm.conf
MUNGE_DIR=${STATE_DIR}/munge
MUNGE_SOCKET=${MUNGE_DIR}/munge.socket.2
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
export SLURM_CONF=${CONF}

log() { echo "local_cluster: $*" >&2; }

# Is the process whose id is in pid file $1 alive?
alive() {
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {
    sinfo -h -n "${HOST}" -o '%T' 2>/dev/null | head -n 1
}

is_up() {
    alive "${MUNGE_DIR}/munged.pid" && alive "${STATE_DIR}/slurmctld.pid" \
        && alive "${STATE_DIR}/slurmd.pid" \
        && [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing) ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        log "slurm-wlm / munge are not installed and this is not root: cannot install them"
        exit 3
    fi
    log "installing slurm-wlm and munge with apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurm-wlm munge; } >"${STATE_DIR}/apt.log" 2>&1; then
        tail -n 20 "${STATE_DIR}/apt.log" >&2
        log "apt-get could not install slurm-wlm and munge (log: ${STATE_DIR}/apt.log)"
        exit 3
    fi
}

write_config() {
    local cpus mem_mb
    # nproc honours OMP_NUM_THREADS (a test run with OMP_NUM_THREADS=1 would give a 1-CPU node on
    # which every 2-CPU job pends forever): the machine's own count, whatever the caller's threads.
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # Half the machine's memory, at most 4 GB: jobs here do not request memory (CR_Core does
    # not track it), and a RealMemory above what slurmd finds would drain the node.
    mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024 / 2); print (m > 4096 ? 4096 : m)}' /proc/meminfo)
    cat >"${CONF}" <<CONF
# Written by slurm/local_cluster.sh: a one-node test cluster. State lives in ${STATE_DIR}.
ClusterName=trainer-local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again after 10 s, not Slurm's default 120 (the requeue test waits on it)
AuthInfo=socket=${MUNGE_SOCKET},cred_expire=10
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/spool
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log
SlurmdLogFile=${STATE_DIR}/log/slurmd.log
# No systemd, no cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=10
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    if alive "${MUNGE_DIR}/munged.pid"; then
        return
    fi
    mkdir -p "${MUNGE_DIR}"
    chmod 700 "${MUNGE_DIR}"
    if [[ ! -s "${MUNGE_DIR}/munge.key" ]]; then
        dd if=/dev/urandom of="${MUNGE_DIR}/munge.key" bs=1024 count=1 status=none
        chmod 400 "${MUNGE_DIR}/munge.key"
    fi
    # --force: run as root and accept a state dir under /tmp (sticky, world-writable parent).
    munged --force \
        --key-file="${MUNGE_DIR}/munge.key" \
        --socket="${MUNGE_SOCKET}" \
        --pid-file="${MUNGE_DIR}/munged.pid" \
        --log-file="${MUNGE_DIR}/munged.log" \
        --seed-file="${MUNGE_DIR}/munged.seed"
}

start_daemons() {
    mkdir -p "${STATE_DIR}/ctld" "${STATE_DIR}/spool" "${STATE_DIR}/log"
    start_munge
    if ! alive "${STATE_DIR}/slurmctld.pid"; then
        slurmctld -f "${CONF}"
    fi
    if ! alive "${STATE_DIR}/slurmd.pid"; then
        slurmd -f "${CONF}"
    fi
}

wait_idle() {
    local state=""
    for _ in $(seq 1 60); do
        state=$(node_state || true)
        case "${state}" in
            idle* | mixed* | allocated* | completing*) return 0 ;;
            down* | drain*)
                # A node that was down when slurmctld last saw it comes back on request.
                scontrol update nodename="${HOST}" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "node ${HOST} did not become idle within 60 s (state: '${state:-no answer}')"
    for file in "${STATE_DIR}/log/slurmctld.log" "${STATE_DIR}/log/slurmd.log" "${MUNGE_DIR}/munged.log"; do
        [[ -f "${file}" ]] && { echo "--- ${file}" >&2; tail -n 25 "${file}" >&2; }
    done
    return 1
}

start() {
    if [[ -f "${CONF}" ]] && is_up; then
        log "already running (SLURM_CONF=${CONF})"
        return 0
    fi
    mkdir -p "${STATE_DIR}"
    install_packages
    if ! alive "${STATE_DIR}/slurmctld.pid"; then
        write_config  # rewritten only while slurmctld is down, so a running one keeps its config
    fi
    start_daemons
    wait_idle
    log "up: node ${HOST}, partition debug; export SLURM_CONF=${CONF}"
}

# Send TERM to the process in pid file $1 and wait up to 20 s for it to end.
stop_pid_file() {
    local file=$1 pid
    alive "${file}" || return 0
    pid=$(cat "${file}")
    kill "${pid}" 2>/dev/null || true
    for _ in $(seq 1 40); do
        kill -0 "${pid}" 2>/dev/null || return 0
        sleep 0.5
    done
    log "process ${pid} (${file}) did not stop; sending KILL"
    kill -9 "${pid}" 2>/dev/null || true
}

stop() {
    if alive "${STATE_DIR}/slurmctld.pid"; then
        scancel --quiet --state=PENDING,RUNNING --partition=debug 2>/dev/null || true
    fi
    stop_pid_file "${STATE_DIR}/slurmd.pid"
    stop_pid_file "${STATE_DIR}/slurmctld.pid"
    stop_pid_file "${MUNGE_DIR}/munged.pid"
    log "stopped"
}

case "${ACTION}" in
    start) start ;;
    stop) stop ;;
    status) is_up ;;
    conf) echo "${CONF}" ;;
    *)
        echo "usage: $0 start|stop|status|conf [STATE_DIR]" >&2
        exit 2 ;;
esac
