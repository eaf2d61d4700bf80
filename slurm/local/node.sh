#!/usr/bin/env bash
# Kill or restart one node of the local cluster of STATE_DIR (see start.sh), to try what a
# real node failure does to a job:
#
#   slurm/local/node.sh kill NODE [STATE_DIR]    # SIGKILL every process in NODE's network
#                                                # namespace (its slurmd, slurmstepd and the
#                                                # job's tasks, by PID), then mark NODE down
#   slurm/local/node.sh start NODE [STATE_DIR]   # start NODE's slurmd again; it returns to
#                                                # service when it registers (ReturnToService=2)
#
# NODE is node1..nodeN. Nothing outside that node's namespace is touched.
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/local/common.sh
source "${here}/common.sh"

die() {
    echo "node.sh: $*" >&2
    exit 2
}

[[ $# -ge 2 ]] || die "usage: slurm/local/node.sh kill|start NODE [STATE_DIR]"
action="$1" node="$2"
state_dir="$(lmcore_slurm_state_dir "${3:-}")"
[[ -s "${state_dir}/cluster.env" ]] || die "no cluster in ${state_dir}: start one with slurm/local/start.sh"
# shellcheck source=/dev/null
source "${state_dir}/cluster.env"
# shellcheck disable=SC2154 # nodes comes from cluster.env
if ! [[ "${node}" =~ ^node([1-9][0-9]*)$ ]] || ((BASH_REMATCH[1] > nodes)); then
    die "no node '${node}' in this cluster: it has node1..node${nodes}"
fi
index="${BASH_REMATCH[1]}"
netns="$(lmcore_slurm_node_netns "${index}")"
export SLURM_CONF="${state_dir}/etc/slurm.conf"

case "${action}" in
kill)
    mapfile -t pids < <(ip netns pids "${netns}" 2>/dev/null)
    if [[ "${#pids[@]}" -gt 0 ]]; then
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    rm -f "$(lmcore_slurm_pid_file "${state_dir}" "slurmd-${node}")"
    # what slurmctld would conclude after SlurmdTimeout, at once
    scontrol update "nodename=${node}" state=down reason="killed by node.sh"
    echo "node.sh: killed ${node} (${#pids[@]} processes: ${pids[*]:-none}) and marked it down"
    ;;
start)
    if pid="$(lmcore_slurm_daemon_pid "${state_dir}" "slurmd-${node}")"; then
        die "the slurmd of ${node} already runs (pid ${pid})"
    fi
    lmcore_slurm_in_node "${netns}" "${node}" "${state_dir}/etc/hosts" \
        slurmd -f "${SLURM_CONF}" -N "${node}" || die "slurmd of ${node} did not start"
    deadline="$((SECONDS + 60))"
    until [[ "$(sinfo -h -n "${node}" -o '%t' 2>/dev/null)" =~ ^(idle|mix|alloc)$ ]]; do
        ((SECONDS < deadline)) || die "${node} did not return to service in 60 s (sinfo -R says why)"
        sleep 0.2
    done
    echo "node.sh: ${node} is back"
    ;;
*)
    die "unknown action '${action}': kill or start"
    ;;
esac
