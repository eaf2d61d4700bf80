# shellcheck shell=bash
# Helpers shared by start.sh and stop.sh (sourced, not run): the state folder, the names,
# addresses and ports of one cluster, and the daemons' PID files.

# The folder that holds everything of one local cluster, as an absolute path.
lmcore_slurm_state_dir() {
    local dir="${1:-${LMCORE_SLURM_DIR:-/tmp/lmcore-slurm}}"
    if [[ "${dir}" =~ [[:space:]] ]]; then
        echo "slurm/local: the state folder must not contain white space: '${dir}'" >&2
        return 1
    fi
    realpath -m -- "${dir}"
}

# The identity of the cluster of STATE_DIR, as shell variables: its id, ClusterName, network
# names, subnet and ports. Everything is derived from a short hash of the state folder, so
# that two clusters (two state folders) get different names, subnets and ports; the
# LMCORE_SLURM_* variables override it. start.sh writes the result to STATE_DIR/cluster.env,
# which stop.sh reads: it tears down what was started, whatever the environment says now.
#   LMCORE_SLURM_ID      6 characters [a-z0-9] naming the cluster (default: hash of the folder)
#   LMCORE_SLURM_SUBNET  the /24 as its first three numbers, e.g. 10.123.45
#   LMCORE_SLURM_PORT    slurmctld's port; slurmd, slurmdbd and MariaDB use the next three
# shellcheck disable=SC2034 # the variables are used by the scripts that source this file
lmcore_slurm_identity() {
    local state_dir="$1" hash
    hash="$(printf '%s' "${state_dir}" | sha256sum | cut -c1-12)"
    cluster_id="${LMCORE_SLURM_ID:-${hash:0:6}}"
    if [[ ! "${cluster_id}" =~ ^[a-z0-9]{6}$ ]]; then
        echo "slurm/local: LMCORE_SLURM_ID must be 6 characters a-z0-9 (got '${cluster_id}')" >&2
        return 1
    fi
    # ClusterName is also a table name prefix in the database: letters and digits only.
    cluster_name="lmc${cluster_id}"
    # Interface names are at most 15 characters: "lmc" + id + "-v12" is 13.
    bridge="lmc${cluster_id}br"
    # The hash picks 10.A.B.0/24 with A in 100..227, B in 0..255.
    subnet="${LMCORE_SLURM_SUBNET:-10.$((100 + 0x${hash:6:2} % 128)).$((0x${hash:8:2}))}"
    if [[ ! "${subnet}" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]]; then
        echo "slurm/local: LMCORE_SLURM_SUBNET must be three numbers like 10.123.45 (got '${subnet}')" >&2
        return 1
    fi
    bridge_addr="${subnet}.254" # the host side: slurmctld and the client commands
    db_addr="${subnet}.253"     # the database "node": MariaDB and slurmdbd
    # The hash picks a base port in 20000..35992, a multiple of 8.
    ctld_port="${LMCORE_SLURM_PORT:-$((20000 + (0x${hash:0:4} % 2000) * 8))}"
    if [[ ! "${ctld_port}" =~ ^[0-9]+$ ]] || ((ctld_port < 1024 || ctld_port > 65530)); then
        echo "slurm/local: LMCORE_SLURM_PORT must be a port number in 1024..65530 (got '${ctld_port}')" >&2
        return 1
    fi
    slurmd_port="$((ctld_port + 1))"
    dbd_port="$((ctld_port + 2))"
    db_port="$((ctld_port + 3))"
}

# Node I (1-based): its SLURM name and host name, network namespace, host side veth, address.
lmcore_slurm_node_name() { echo "node$1"; }
lmcore_slurm_node_netns() { echo "lmc${cluster_id}-n$1"; }
lmcore_slurm_node_veth() { echo "lmc${cluster_id}-v$1"; }
lmcore_slurm_node_addr() { echo "${subnet}.$1"; }
# The database namespace and its veth.
lmcore_slurm_db_netns() { echo "lmc${cluster_id}-db"; }
lmcore_slurm_db_veth() { echo "lmc${cluster_id}-vdb"; }

# The PID file of daemon NAME (munged, mariadbd, slurmdbd, slurmctld, slurmd-node1, ...).
lmcore_slurm_pid_file() {
    local state_dir="$1" name="$2"
    echo "${state_dir}/run/${name}.pid"
}

# Prints the PID of daemon NAME if its PID file names a live process that is this
# cluster's daemon (the program is NAME up to a '-', and its command line or environment
# names a file in STATE_DIR: slurmdbd finds its config through $SLURM_CONF); else prints
# nothing and returns 1. This guards against stale PID files and reused PIDs.
lmcore_slurm_daemon_pid() {
    local state_dir="$1" name="$2" pid_file pid cmdline environ program
    program="${name%%-*}"
    pid_file="$(lmcore_slurm_pid_file "${state_dir}" "${name}")"
    [[ -s "${pid_file}" ]] || return 1
    pid="$(tr -dc '0-9' <"${pid_file}")"
    [[ -n "${pid}" ]] || return 1
    [[ -r "/proc/${pid}/cmdline" ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null || true)"
    [[ "${cmdline}" == *"${program}"* ]] || return 1
    if [[ "${cmdline}" != *"${state_dir}/"* ]]; then
        environ="$(tr '\0' '\n' <"/proc/${pid}/environ" 2>/dev/null || true)"
        [[ "${environ}" == *"SLURM_CONF=${state_dir}/"* ]] || return 1
    fi
    echo "${pid}"
}

# The daemons of a cluster of N nodes, in start order.
lmcore_slurm_daemons() {
    local n="$1" i
    echo munged mariadbd slurmdbd slurmctld
    for ((i = 1; i <= n; i++)); do
        echo "slurmd-$(lmcore_slurm_node_name "${i}")"
    done
}

# The ledger of what start.sh created outside STATE_DIR (network objects, the /run/netns
# mount), one "KIND NAME" a line, in creation order; stop.sh removes exactly these.
lmcore_slurm_ledger() { echo "$1/run/created"; }

# Runs a command in network namespace NETNS ("-": the host's) with its own host name HOST
# and its own /etc/hosts (HOSTS_FILE bind-mounted in a private mount namespace, so the
# host's stays as it is). nsenter, not `ip netns exec`: that one remounts /sys, which hides
# /sys/fs/cgroup from slurmd. With --detach first, the command runs in a new session in the
# background (for a server that does not daemonize itself).
lmcore_slurm_in_node() {
    local prefix=()
    if [[ "$1" == "--detach" ]]; then
        prefix=(setsid -f)
        shift
    fi
    local netns="$1" host="$2" hosts_file="$3"
    shift 3
    if [[ "${netns}" != "-" ]]; then
        prefix+=(nsenter "--net=/run/netns/${netns}")
    fi
    # shellcheck disable=SC2016 # $1... are the inner shell's arguments
    "${prefix[@]}" unshare --uts --mount --propagation private \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' \
        sh "${host}" "${hosts_file}" "$@"
}
