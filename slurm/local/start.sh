#!/usr/bin/env bash
# Start a local multi-node SLURM cluster whose files all lie in STATE_DIR, for tests and
# CI: munged and slurmctld on this host, one slurmd per node, each in a network + UTS
# namespace of its own (own host name, own address on a private bridge), and accounting:
# slurmdbd with a MariaDB server in STATE_DIR, in a namespace of their own. Needs root
# (CAP_NET_ADMIN, CAP_SYS_ADMIN) and the packages of install.sh.
#
#   slurm/local/start.sh [--nodes N] [STATE_DIR]   # default: ${LMCORE_SLURM_DIR:-/tmp/lmcore-slurm}
#   source STATE_DIR/env.sh                       # SLURM_CONF for the client commands
#
# Idempotent: when the daemons of STATE_DIR are running it only says so.
# Environment (see README.md):
#   LMCORE_SLURM_NODES          number of nodes (default 2; --nodes overrides it)
#   LMCORE_SLURM_CPUS_PER_NODE  CPUs declared per node (default: the CPUs / nodes, at least 2)
#   LMCORE_SLURM_GRACE_TIME     preemption grace time of partition debug, s (default 30)
#   LMCORE_SLURM_MAX_ARRAY_SIZE MaxArraySize (default 1001)
#   LMCORE_SLURM_CRED_EXPIRE    job credential lifetime in seconds (default 10, at least 5);
#                               a requeued job starts again about this long after requeue
#   LMCORE_SLURM_START_TIMEOUT  seconds to wait for the cluster to be ready (default 120)
#   LMCORE_SLURM_ID, LMCORE_SLURM_SUBNET, LMCORE_SLURM_PORT: names, subnet, ports (common.sh)
set -Eeuo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/local/common.sh
source "${here}/common.sh"
# shellcheck source=slurm/local/net.sh
source "${here}/net.sh"

log() { echo "start.sh: $*"; }
die() {
    echo "start.sh: error: $*" >&2
    exit 1
}
usage() {
    sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit "${1:-0}"
}

# --- arguments and settings ----------------------------------------------------------
nodes="${LMCORE_SLURM_NODES:-2}"
state_arg=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n | --nodes)
            [[ $# -ge 2 ]] || die "$1 needs a number"
            nodes="$2"
            shift 2
            ;;
        --nodes=*)
            nodes="${1#--nodes=}"
            shift
            ;;
        -h | --help) usage 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            [[ -z "${state_arg}" ]] || die "one state folder only (got '${state_arg}' and '$1')"
            state_arg="$1"
            shift
            ;;
    esac
done

state_dir="$(lmcore_slurm_state_dir "${state_arg}")"
timeout_s="${LMCORE_SLURM_START_TIMEOUT:-120}"
cred_expire="${LMCORE_SLURM_CRED_EXPIRE:-10}"
grace_time="${LMCORE_SLURM_GRACE_TIME:-30}"
max_array_size="${LMCORE_SLURM_MAX_ARRAY_SIZE:-1001}"
cpus_per_node="${LMCORE_SLURM_CPUS_PER_NODE:-}"

is_number() { [[ "$1" =~ ^[0-9]+$ ]]; }
# Whether VALUE is a whole number in MIN..MAX.
in_range() { is_number "$1" && (($1 >= $2 && $1 <= $3)); }
in_range "${nodes}" 1 99 || die "the number of nodes must be 1..99 (got '${nodes}')"
# slurmctld ignores a cred_expire under 5 (logs "invalid") and falls back to 120 s.
in_range "${cred_expire}" 5 86400 ||
    die "LMCORE_SLURM_CRED_EXPIRE must be a number of seconds >= 5 (got '${cred_expire}')"
in_range "${grace_time}" 0 86400 ||
    die "LMCORE_SLURM_GRACE_TIME must be a number of seconds (got '${grace_time}')"
in_range "${max_array_size}" 1 4000001 ||
    die "LMCORE_SLURM_MAX_ARRAY_SIZE must be 1..4000001 (got '${max_array_size}')"
if [[ -n "${cpus_per_node}" ]]; then
    in_range "${cpus_per_node}" 1 4096 ||
        die "LMCORE_SLURM_CPUS_PER_NODE must be a number >= 1 (got '${cpus_per_node}')"
fi

for cmd in munged mungekey slurmctld slurmd slurmdbd sacctmgr scontrol sinfo mariadbd \
    mariadb-install-db mariadb ip nsenter unshare setsid ss python3; do
    command -v "${cmd}" >/dev/null 2>&1 ||
        die "'${cmd}' not found; run slurm/local/install.sh first (as root)"
done
[[ "$(id -u)" -eq 0 ]] || die "must run as root (namespaces, and slurmd launches the jobs)"
# A container's root may lack them: bridge/veths/namespaces, and the hosts bind mounts.
cap_eff="$((16#$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)))"
(((cap_eff >> 12) & 1)) || die "needs CAP_NET_ADMIN (bridge, veths, network namespaces)"
(((cap_eff >> 21) & 1)) || die "needs CAP_SYS_ADMIN (namespaces, bind mounts)"

conf_dir="${state_dir}/etc"
conf="${conf_dir}/slurm.conf"
dbd_conf="${conf_dir}/slurmdbd.conf"
hosts_file="${conf_dir}/hosts"
munge_key="${state_dir}/munge/munge.key"
munge_socket="${state_dir}/munge-socket/munge.socket.2"
db_dir="${state_dir}/db"
db_socket="${state_dir}/run/mariadb.sock"
db_pass_file="${conf_dir}/db.pass"
log_dir="${state_dir}/log"
run_dir="${state_dir}/run"
ledger="$(lmcore_slurm_ledger "${state_dir}")"
cluster_env="${state_dir}/cluster.env"

# --- running already? ----------------------------------------------------------------
# The cluster recorded in cluster.env (its node count), all of whose daemons run.
recorded_cluster_runs() {
    local name n
    [[ -f "${cluster_env}" ]] || return 1
    n="$(sed -n 's/^nodes=//p' "${cluster_env}")"
    is_number "${n}" || return 1
    for name in $(lmcore_slurm_daemons "${n}"); do
        lmcore_slurm_daemon_pid "${state_dir}" "${name}" >/dev/null || return 1
    done
}

# Whether anything of a cluster of STATE_DIR is left: a daemon or a network object.
anything_left() {
    local pid_file
    [[ -s "${ledger}" ]] && return 0
    for pid_file in "${run_dir}"/*.pid; do
        [[ -e "${pid_file}" ]] || continue
        lmcore_slurm_daemon_pid "${state_dir}" "$(basename "${pid_file}" .pid)" >/dev/null && return 0
    done
    return 1
}

write_env_sh() {
    local env_file="${state_dir}/env.sh" tmp
    tmp="$(mktemp "${env_file}.XXXXXX")"
    {
        echo "# Generated by slurm/local/start.sh: source it to use the local SLURM cluster."
        printf 'export LMCORE_SLURM_DIR=%q\n' "${state_dir}"
        printf 'export SLURM_CONF=%q\n' "${conf}"
    } >"${tmp}"
    chmod 644 "${tmp}"
    mv -f "${tmp}" "${env_file}"
}

if recorded_cluster_runs; then
    write_env_sh
    running_nodes="$(sed -n 's/^nodes=//p' "${cluster_env}")"
    log "already running in ${state_dir} (${running_nodes} nodes; source ${state_dir}/env.sh)"
    if [[ "${running_nodes}" != "${nodes}" ]]; then
        log "note: ${nodes} nodes were asked for; stop.sh it first to change the number"
    fi
    exit 0
fi
if anything_left; then
    log "a cluster of ${state_dir} is partly up; stopping it to start afresh"
    "${here}/stop.sh" "${state_dir}"
fi

lmcore_slurm_identity "${state_dir}"
# Unix socket paths are limited to 107 bytes.
for socket in "${munge_socket}" "${db_socket}"; do
    [[ "${#socket}" -lt 100 ]] || die "state folder path too long for a socket: ${socket}"
done
problem="$(net_collision)"
[[ -z "${problem}" ]] ||
    die "${problem}: another cluster? Stop it, use another state folder, or set LMCORE_SLURM_ID/SUBNET/PORT"

t0="${SECONDS}"

# --- files ---------------------------------------------------------------------------
make_dirs() {
    local i
    mkdir -p "${state_dir}"
    chmod 755 "${state_dir}"
    mkdir -p "${conf_dir}" "${state_dir}/munge" "${state_dir}/munge-socket" "${state_dir}/state" \
        "${log_dir}" "${run_dir}" "${db_dir}"
    for ((i = 1; i <= nodes; i++)); do
        mkdir -p "${state_dir}/spool/$(lmcore_slurm_node_name "${i}")"
    done
    chmod 700 "${state_dir}/munge" "${state_dir}/state" "${state_dir}/spool" "${db_dir}"
    chmod 755 "${state_dir}/munge-socket" "${conf_dir}" "${log_dir}" "${run_dir}"
    rm -f "${munge_socket}" "${munge_socket}.lock" "${db_socket}"
    rm -f "${run_dir}"/*.pid
}

# A state folder made with another ClusterName (the single-node slurm/local of before
# named its cluster lmcore): slurmctld would refuse its job state ("CLUSTER NAME MISMATCH"),
# so that state is moved aside; the stand-in sacct's link of then goes.
retire_old_state() {
    local file="${state_dir}/state/clustername" old aside
    if [[ -L "${state_dir}/bin/sacct" ]]; then
        rm -f "${state_dir}/bin/sacct"
        rmdir "${state_dir}/bin" 2>/dev/null || true
    fi
    [[ -s "${file}" ]] || return 0
    old="$(tr -dc 'A-Za-z0-9_-' <"${file}")"
    [[ "${old}" != "${cluster_name}" ]] || return 0
    aside="${state_dir}/state.${old}.$(date +%Y%m%d%H%M%S)"
    mv "${state_dir}/state" "${aside}"
    log "the job state in ${state_dir}/state was cluster '${old}'s; moved it to ${aside}"
}

# What stop.sh (and a later start.sh) reads: the names, addresses and ports used now.
write_cluster_env() {
    local var
    : >"${cluster_env}"
    for var in nodes cluster_id cluster_name bridge subnet bridge_addr db_addr ctld_port \
        slurmd_port dbd_port db_port; do
        printf '%s=%q\n' "${var}" "${!var}" >>"${cluster_env}"
    done
}

make_secrets() {
    [[ -s "${munge_key}" ]] || mungekey -c -k "${munge_key}"
    chmod 600 "${munge_key}"
    if [[ ! -s "${db_pass_file}" ]]; then
        (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"${db_pass_file}")
    fi
    chmod 600 "${db_pass_file}"
}

# One hosts file for every namespace: the controller (ctl, on the bridge), the database
# and the nodes.
write_hosts() {
    local i
    {
        echo "127.0.0.1 localhost"
        echo "${bridge_addr} ctl"
        echo "${db_addr} db"
        for ((i = 1; i <= nodes; i++)); do
            echo "$(lmcore_slurm_node_addr "${i}") $(lmcore_slurm_node_name "${i}")"
        done
    } >"${hosts_file}"
    chmod 644 "${hosts_file}"
}

# Node resources: the CPUs per node are declared (config_overrides lets them exceed the
# hardware, so that 2 nodes x 2 tasks fit on 2 cores); the memory is split between the
# nodes, less a share for the host and the database, so that no node promises memory twice.
node_resources() {
    local hw hw_cpus hw_mem
    hw="$(slurmd -C)"
    hw_cpus="$(sed -n 's/.*\bCPUs=\([0-9]\+\).*/\1/p' <<<"${hw}" | head -n 1)"
    hw_mem="$(sed -n 's/.*\bRealMemory=\([0-9]\+\).*/\1/p' <<<"${hw}" | head -n 1)"
    [[ -n "${hw_cpus}" && -n "${hw_mem}" ]] || die "cannot read CPUs/RealMemory from 'slurmd -C': ${hw}"
    if [[ -z "${cpus_per_node}" ]]; then
        cpus_per_node="$((hw_cpus / nodes > 2 ? hw_cpus / nodes : 2))"
    fi
    mem_per_node="$(((hw_mem - hw_mem / 20 - 768) / nodes))"
    ((mem_per_node >= 256)) || die "too little memory for ${nodes} nodes (${hw_mem} MB)"
    def_mem_per_cpu="$((mem_per_node / cpus_per_node < 1024 ? mem_per_node / cpus_per_node : 1024))"
}

write_slurm_conf() {
    local i node_list="node[1-${nodes}]"
    ((nodes > 1)) || node_list="node1"
    cat >"${conf}" <<CONF
# Generated by slurm/local/start.sh: a local ${nodes}-node cluster for tests and CI.
ClusterName=${cluster_name}
SlurmctldHost=ctl(${bridge_addr})
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
# slurmctld listens only on the address its host name resolves to: ctl, the bridge's
CommunicationParameters=NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# short credential lifetime: a requeued job may start again after it (default 120 s)
AuthInfo=socket=${munge_socket},cred_expire=${cred_expire}
MailProg=/bin/true
StateSaveLocation=${state_dir}/state
SlurmdSpoolDir=${state_dir}/spool/%n
SlurmctldPidFile=${run_dir}/slurmctld.pid
SlurmdPidFile=${run_dir}/slurmd-%n.pid
SlurmctldLogFile=${log_dir}/slurmctld.log
SlurmdLogFile=${log_dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
# accounting: slurmdbd (in the database namespace); the real sacct answers from it
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=${db_addr}
AccountingStoragePort=${dbd_port}
# slurmdbd's munge socket: without it sacct/slurmctld use /run/munge's, and fail
AccountingStoragePass=${munge_socket}
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# else a requeued job waits ~33 s, not ~11 s
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
# memory is a consumable too; with a default per CPU, two 1-CPU jobs run at once
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=${def_mem_per_cpu}
# the nodes declare more CPUs than the hardware has (see slurm/local/README.md)
SlurmdParameters=config_overrides
# a job of partition high preempts those of partition debug: SIGTERM, GraceTime, requeue
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MaxArraySize=${max_array_size}
MaxJobCount=$((max_array_size * 2 > 10000 ? max_array_size * 2 : 10000))
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=3600
InactiveLimit=0
Waittime=0
CONF
    for ((i = 1; i <= nodes; i++)); do
        echo "NodeName=$(lmcore_slurm_node_name "${i}") NodeAddr=$(lmcore_slurm_node_addr "${i}")" \
            "NodeHostname=$(lmcore_slurm_node_name "${i}") CPUs=${cpus_per_node}" \
            "RealMemory=${mem_per_node} State=UNKNOWN" >>"${conf}"
    done
    cat >>"${conf}" <<CONF
PartitionName=debug Nodes=${node_list} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=${grace_time}
PartitionName=high Nodes=${node_list} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
    chmod 644 "${conf}"
}

write_slurmdbd_conf() {
    (umask 077 && cat >"${dbd_conf}") <<CONF
# Generated by slurm/local/start.sh. slurmdbd finds it next to \$SLURM_CONF. Mode 600.
AuthType=auth/munge
AuthInfo=socket=${munge_socket}
DbdHost=db
DbdAddr=${db_addr}
DbdPort=${dbd_port}
SlurmUser=root
LogFile=${log_dir}/slurmdbd.log
PidFile=${run_dir}/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=${db_addr}
StoragePort=${db_port}
StorageUser=slurm
StoragePass=$(cat "${db_pass_file}")
StorageLoc=slurm_acct_db
CONF
    chmod 600 "${dbd_conf}"
}

# --- daemons -------------------------------------------------------------------------
show_logs() {
    local f
    for f in "${log_dir}"/*.log; do
        [[ -f "${f}" ]] || continue
        echo "----- tail of ${f}" >&2
        tail -n 15 "${f}" >&2
    done
}
fail() {
    trap - ERR
    echo "start.sh: error: $*" >&2
    show_logs
    echo "start.sh: stopping what did start" >&2
    "${here}/stop.sh" "${state_dir}" >&2 || true
    exit 1
}

# Waits until daemon NAME has written its PID file and is alive.
wait_for_pid() {
    local name="$1" deadline="$((SECONDS + 30))"
    until lmcore_slurm_daemon_pid "${state_dir}" "${name}" >/dev/null; do
        ((SECONDS < deadline)) || fail "${name} did not start"
        sleep 0.1
    done
}

# Polls COMMAND... until it succeeds; fails with WHAT after the start timeout.
wait_until() {
    local what="$1" deadline="$((SECONDS + timeout_s))"
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "${what} not ready after ${timeout_s} s"
        sleep 0.2
    done
}

start_munged() {
    munged --key-file="${munge_key}" --socket="${munge_socket}" \
        --pid-file="${run_dir}/munged.pid" --log-file="${log_dir}/munged.log" \
        --seed-file="${state_dir}/munge/munged.seed" || fail "munged did not start"
    wait_for_pid munged
}

# mariadbd's options, for the first install and for the server. Small buffers (a test
# cluster's accounting is tiny); no fsync per commit; slurmdbd wants a long lock wait.
db_options=()
set_db_options() {
    db_options=(--no-defaults --user=root "--datadir=${db_dir}" "--socket=${db_socket}"
        "--port=${db_port}" "--bind-address=${db_addr}" "--pid-file=${run_dir}/mariadbd.pid"
        "--log-error=${log_dir}/mariadb.log" --skip-name-resolve --skip-log-bin
        --innodb-buffer-pool-size=32M --innodb-log-file-size=16M --innodb-log-buffer-size=4M
        --key-buffer-size=4M --aria-pagecache-buffer-size=4M --innodb-lock-wait-timeout=900
        --innodb-flush-log-at-trx-commit=2 --max-connections=50)
}

db_answers() { mariadb --no-defaults "--socket=${db_socket}" -uroot -e 'SELECT 1'; }

# The MariaDB server of STATE_DIR, in the database namespace, bound to the database's
# address and a socket in STATE_DIR. The data folder is made once (mariadb-install-db).
start_mariadb() {
    set_db_options
    if [[ ! -d "${db_dir}/mysql" ]]; then
        log "creating the accounting database in ${db_dir} (once)"
        mariadb-install-db --no-defaults --user=root "--datadir=${db_dir}" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"${log_dir}/mariadb-install.log" 2>&1 ||
            fail "mariadb-install-db failed (see ${log_dir}/mariadb-install.log)"
    fi
    lmcore_slurm_in_node --detach "$(lmcore_slurm_db_netns)" db "${hosts_file}" \
        mariadbd "${db_options[@]}" </dev/null >>"${log_dir}/mariadb.log" 2>&1
    wait_for_pid mariadbd
    wait_until "MariaDB" db_answers
    # slurmdbd's user, with the password of db.pass (idempotent).
    local pass
    pass="$(cat "${db_pass_file}")"
    mariadb --no-defaults "--socket=${db_socket}" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'%' IDENTIFIED BY '${pass}';
        ALTER USER 'slurm'@'%' IDENTIFIED BY '${pass}';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%';" || fail "cannot create the database user"
}

sacctmgr_answers() { sacctmgr -n -P show cluster format=Cluster; }

# slurmdbd, in the database namespace (host name db), then this cluster's record in it.
start_slurmdbd() {
    lmcore_slurm_in_node "$(lmcore_slurm_db_netns)" db "${hosts_file}" \
        env "SLURM_CONF=${conf}" slurmdbd || fail "slurmdbd did not start"
    wait_for_pid slurmdbd
    wait_until "slurmdbd" sacctmgr_answers
    if ! sacctmgr -n -P show cluster format=Cluster | grep -qx "${cluster_name}"; then
        sacctmgr -i add cluster "${cluster_name}" >/dev/null || fail "sacctmgr add cluster failed"
    fi
}

# slurmctld, in this host's network namespace (it listens on the bridge's address) but with
# the host name ctl: it checks that it runs on SlurmctldHost, and NoCtldInAddrAny binds to
# the address that name resolves to.
start_slurmctld() {
    lmcore_slurm_in_node - ctl "${hosts_file}" slurmctld -f "${conf}" || fail "slurmctld did not start"
    wait_for_pid slurmctld
}

start_slurmds() {
    local i node
    for ((i = 1; i <= nodes; i++)); do
        node="$(lmcore_slurm_node_name "${i}")"
        lmcore_slurm_in_node "$(lmcore_slurm_node_netns "${i}")" "${node}" "${hosts_file}" \
            slurmd -f "${conf}" -N "${node}" || fail "slurmd of ${node} did not start"
    done
    for ((i = 1; i <= nodes; i++)); do
        wait_for_pid "slurmd-$(lmcore_slurm_node_name "${i}")"
    done
}

# Ready: every daemon alive, slurmctld answers, every node is up, and slurmctld has
# registered with slurmdbd (so that jobs reach the accounting).
cluster_ready() {
    local name states
    for name in $(lmcore_slurm_daemons "${nodes}"); do
        lmcore_slurm_daemon_pid "${state_dir}" "${name}" >/dev/null || fail "${name} exited"
    done
    [[ "$(scontrol ping 2>/dev/null)" == *"is UP"* ]] || return 1
    states="$(sinfo -h -N -p debug -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc)$')" || return 1
    [[ "${states}" -eq "${nodes}" ]] || return 1
    [[ -n "$(sacctmgr -n -P show cluster "${cluster_name}" format=ControlHost 2>/dev/null)" ]]
}

wait_for_cluster() {
    local deadline="$((SECONDS + timeout_s))"
    until cluster_ready; do
        if ((SECONDS >= deadline)); then
            sinfo -N >&2 || true
            fail "cluster not ready after ${timeout_s} s"
        fi
        sleep 0.2
    done
}

# Jobs in the saved state are left by an unclean stop (stop.sh cancels every job): their
# processes are gone, yet slurmctld keeps a running one's nodes allocated until its time
# limit (one killed that way held both nodes for 28 minutes of a CI run). Cancel them all.
cancel_leftover_jobs() {
    local ids deadline
    mapfile -t ids < <(squeue -h -o '%A' | sort -u)
    [[ "${#ids[@]}" -gt 0 ]] || return 0
    log "cancelling ${#ids[@]} job(s) left by an unclean stop of this cluster: ${ids[*]}"
    scancel "${ids[@]}" || true
    deadline="$((SECONDS + timeout_s))"
    while [[ -n "$(squeue -h -o '%A')" ]]; do
        ((SECONDS < deadline)) || fail "jobs left by an unclean stop still queued after ${timeout_s} s"
        sleep 0.2
    done
}

# --- main ----------------------------------------------------------------------------
node_resources
retire_old_state
make_dirs
trap 'fail "command failed (line ${LINENO}): ${BASH_COMMAND}"' ERR
write_cluster_env
make_secrets
write_hosts
write_slurm_conf
write_slurmdbd_conf
export SLURM_CONF="${conf}"

# Order: munge first (everyone authenticates with it), the database before slurmdbd, the
# cluster's record in slurmdbd before slurmctld registers, the nodes last.
start_munged
net_up
start_mariadb
start_slurmdbd
start_slurmctld
start_slurmds
wait_for_cluster
cancel_leftover_jobs
trap - ERR

write_env_sh
node_list=()
for ((i = 1; i <= nodes; i++)); do
    node_list+=("$(lmcore_slurm_node_name "${i}")=$(lmcore_slurm_node_addr "${i}")")
done
log "cluster ${cluster_name} up in $((SECONDS - t0)) s: ${nodes} nodes (${node_list[*]}), ${cpus_per_node} CPUs" \
    "and ${mem_per_node} MB each; partitions debug (default) and high"
log "bridge ${bridge} ${bridge_addr}/24, slurmctld port ${ctld_port}, slurmdbd ${db_addr}:${dbd_port}"
log "logs in ${log_dir}; use it with: source ${state_dir}/env.sh"
