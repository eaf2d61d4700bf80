# shellcheck shell=bash
# Helpers shared by start.sh and stop.sh (sourced, not run).

# The folder that holds everything of one local cluster, as an absolute path.
lmcore_slurm_state_dir() {
    local dir="${1:-${LMCORE_SLURM_DIR:-/tmp/lmcore-slurm}}"
    if [[ "${dir}" =~ [[:space:]] ]]; then
        echo "slurm/local: the state folder must not contain white space: '${dir}'" >&2
        return 1
    fi
    realpath -m -- "${dir}"
}

# The PIDs files of the three daemons, by daemon name.
lmcore_slurm_pid_file() {
    local state_dir="$1" name="$2"
    echo "${state_dir}/run/${name}.pid"
}

# Prints the PID of daemon NAME if its PID file names a live process that is this
# cluster's daemon (its command line names a file in STATE_DIR); else prints nothing
# and returns 1. This guards against stale PID files and reused PIDs.
lmcore_slurm_daemon_pid() {
    local state_dir="$1" name="$2" pid_file pid cmdline
    pid_file="$(lmcore_slurm_pid_file "${state_dir}" "${name}")"
    [[ -s "${pid_file}" ]] || return 1
    pid="$(tr -dc '0-9' <"${pid_file}")"
    [[ -n "${pid}" ]] || return 1
    [[ -r "/proc/${pid}/cmdline" ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null || true)"
    [[ "${cmdline}" == *"${name}"* && "${cmdline}" == *"${state_dir}/"* ]] || return 1
    echo "${pid}"
}

# The daemons of one cluster, in start order (used by the scripts that source this file).
# shellcheck disable=SC2034
LMCORE_SLURM_DAEMONS=(munged slurmctld slurmd)
