#!/usr/bin/env bash
# Stop the local SLURM cluster of STATE_DIR (see start.sh) and remove what start.sh made
# outside STATE_DIR: the daemons it started (found by the PIDs in their PID files, never by
# name), then the namespaces, veths, bridge and /run/netns mount listed in its ledger
# (STATE_DIR/run/created), nothing else. Logs, job state and the database stay in STATE_DIR.
#
#   slurm/local/stop.sh [STATE_DIR]      # default: ${LMCORE_SLURM_DIR:-/tmp/lmcore-slurm}
#
# Jobs still pending or running are cancelled first (and waited for), so that no job
# process (slurmstepd) outlives the cluster; any left in a node's namespace is killed.
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/local/common.sh
source "${here}/common.sh"
# shellcheck source=slurm/local/net.sh
source "${here}/net.sh"

state_dir="$(lmcore_slurm_state_dir "${1:-}")"
timeout_s="${LMCORE_SLURM_STOP_TIMEOUT:-30}"
run_dir="${state_dir}/run"
ledger="$(lmcore_slurm_ledger "${state_dir}")"

log() { echo "stop.sh: $*"; }

# Sends SIGTERM to the named daemons, then waits for them to exit (SIGKILL after the
# timeout). Removes their PID files.
stop_daemons() {
    local name pid deadline i
    local -a names=() pids=()
    for name in "$@"; do
        if pid="$(lmcore_slurm_daemon_pid "${state_dir}" "${name}")"; then
            kill -TERM "${pid}" 2>/dev/null || true
            names+=("${name}")
            pids+=("${pid}")
        else
            rm -f "$(lmcore_slurm_pid_file "${state_dir}" "${name}")"
        fi
    done
    deadline="$((SECONDS + timeout_s))"
    for i in "${!pids[@]}"; do
        name="${names[i]}"
        pid="${pids[i]}"
        while [[ -e "/proc/${pid}" ]]; do
            if ((SECONDS >= deadline)); then
                log "${name} (pid ${pid}) still alive after ${timeout_s} s; sending SIGKILL"
                kill -KILL "${pid}" 2>/dev/null || true
                sleep 0.5
                break
            fi
            sleep 0.1
        done
        rm -f "$(lmcore_slurm_pid_file "${state_dir}" "${name}")"
        log "stopped ${name} (pid ${pid})"
    done
}

# Cancels every job of this cluster and waits until none runs any more.
cancel_jobs() {
    local ids=() deadline
    lmcore_slurm_daemon_pid "${state_dir}" slurmctld >/dev/null || return 0
    export SLURM_CONF="${state_dir}/etc/slurm.conf"
    mapfile -t ids < <(squeue -h -o '%A' 2>/dev/null | sort -u)
    [[ "${#ids[@]}" -gt 0 ]] || return 0
    log "cancelling jobs: ${ids[*]}"
    scancel "${ids[@]}" 2>/dev/null || true
    deadline="$((SECONDS + timeout_s))"
    while [[ -n "$(squeue -h -t CF,R,CG,S -o '%A' 2>/dev/null)" ]]; do
        if ((SECONDS >= deadline)); then
            log "jobs still running after ${timeout_s} s; stopping anyway"
            return 0
        fi
        sleep 0.2
    done
}

# The slurmd daemons with a PID file (any number of nodes; slurmd.pid: the single-node
# cluster of before).
slurmd_names() {
    local f
    for f in "${run_dir}"/slurmd.pid "${run_dir}"/slurmd-*.pid; do
        [[ -e "${f}" ]] && basename "${f}" .pid
    done
    return 0
}

cancel_jobs
mapfile -t slurmds < <(slurmd_names)
# slurmctld before slurmdbd (it sends what accounting it still holds), the database after
# slurmdbd, munged last: the others may still talk to each other while they shut down.
stop_daemons "${slurmds[@]}" slurmctld
stop_daemons slurmdbd
stop_daemons mariadbd
stop_daemons munged
net_down
leftover="$(find "${state_dir}/spool" -mindepth 2 -maxdepth 2 -type s -name '*_*' 2>/dev/null || true)"
if [[ -n "${leftover}" ]]; then
    log "warning: job step sockets left (slurmstepd killed?): ${leftover//$'\n'/ }"
fi
log "stopped the cluster of ${state_dir}; logs stay in ${state_dir}/log"
