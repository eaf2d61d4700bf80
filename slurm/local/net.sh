# shellcheck shell=bash
# shellcheck disable=SC2154 # the identity variables come from common.sh
# The cluster's network (sourced by start.sh and stop.sh, after common.sh and
# lmcore_slurm_identity): a bridge with the host's address, and one network namespace per
# node and one for the database, each joined to the bridge by a veth pair. Every object
# created is written to the ledger first, so that stop.sh removes exactly those.

# The namespaces of the cluster, one "NETNS VETH ADDRESS" a line: the database's, then
# the nodes'.
net_namespaces() {
    local i
    echo "$(lmcore_slurm_db_netns) $(lmcore_slurm_db_veth) ${db_addr}"
    for ((i = 1; i <= nodes; i++)); do
        echo "$(lmcore_slurm_node_netns "${i}") $(lmcore_slurm_node_veth "${i}") $(lmcore_slurm_node_addr "${i}")"
    done
}

# Why the network of this cluster cannot be created, or nothing: a name, the subnet or a
# port already in use.
net_collision() {
    local netns veth addr port
    if ip link show dev "${bridge}" >/dev/null 2>&1; then
        echo "network interface ${bridge} exists already"
        return
    fi
    while read -r netns veth addr; do
        if ip link show dev "${veth}" >/dev/null 2>&1; then
            echo "network interface ${veth} exists already"
            return
        fi
        if [[ -e "/run/netns/${netns}" ]]; then
            echo "network namespace ${netns} exists already"
            return
        fi
    done < <(net_namespaces)
    if subnet_in_use "${subnet}.0/24"; then
        echo "subnet ${subnet}.0/24 overlaps an address or route of this host"
        return
    fi
    # Only slurmctld listens in the host's namespace (the others in their own), but a
    # port taken here is a sign of a clash all the same.
    for port in "${ctld_port}" "${slurmd_port}" "${dbd_port}" "${db_port}"; do
        if [[ -n "$(ss -Htuln "sport = :${port}")" ]]; then
            echo "port ${port} is in use"
            return
        fi
    done
}

# Whether network NET (a.b.c.d/n) overlaps an address or route of this host (another
# cluster's bridge, a VPN, a container network, ...).
subnet_in_use() {
    { ip -4 -o addr show; ip -4 route show table all; } | python3 -c '
import ipaddress, re, sys
net = ipaddress.ip_network(sys.argv[1])
found = re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?\b", sys.stdin.read())
sys.exit(0 if any(ipaddress.ip_network(w, strict=False).overlaps(net) for w in found) else 1)
' "$1"
}

ledger_add() { echo "$1 $2" >>"${ledger}"; }

# Creates network namespace NETNS with address ADDR on a veth VETH to the bridge.
net_add_namespace() {
    local netns="$1" veth="$2" addr="$3"
    # `ip netns add` makes /run/netns and mounts it the first time: stop.sh undoes what
    # was done for this cluster once no namespace is left in it.
    [[ -e /run/netns ]] || ledger_add dir /run/netns
    mountpoint -q /run/netns || ledger_add mount /run/netns
    ledger_add netns "${netns}"
    ip netns add "${netns}"
    ledger_add link "${veth}"
    # The namespace's end is created inside it, as eth0: nothing of it in the host's names.
    ip link add "${veth}" type veth peer name eth0 netns "${netns}"
    ip link set dev "${veth}" master "${bridge}" up
    ip -n "${netns}" addr add "${addr}/24" dev eth0
    ip -n "${netns}" link set dev eth0 up
    ip -n "${netns}" link set dev lo up
}

# The bridge and every namespace.
net_up() {
    local netns veth addr
    ledger_add link "${bridge}"
    ip link add name "${bridge}" type bridge
    ip addr add "${bridge_addr}/24" dev "${bridge}"
    ip link set dev "${bridge}" up
    while read -r netns veth addr; do
        net_add_namespace "${netns}" "${veth}" "${addr}"
    done < <(net_namespaces)
}

# Kills what still runs in namespace NETNS: processes of this cluster's jobs that outlived
# their slurmd (nothing else can be in a namespace start.sh made).
net_kill_namespace_pids() {
    local netns="$1" sig pids
    for sig in TERM KILL; do
        mapfile -t pids < <(ip netns pids "${netns}" 2>/dev/null)
        [[ "${#pids[@]}" -gt 0 ]] || return 0
        echo "stop.sh: sending SIG${sig} to processes left in ${netns}: ${pids[*]}"
        kill "-${sig}" "${pids[@]}" 2>/dev/null || true
        sleep 1
    done
}

# Removes what the ledger lists, newest first; then the ledger.
net_down() {
    local kind name
    [[ -f "${ledger}" ]] || return 0
    while read -r kind name; do
        case "${kind}" in
            netns)
                if [[ -e "/run/netns/${name}" ]]; then
                    net_kill_namespace_pids "${name}"
                    ip netns delete "${name}"
                fi
                ;;
            link)
                if ip link show dev "${name}" >/dev/null 2>&1; then
                    ip link delete dev "${name}"
                fi
                ;;
            mount)
                # Only when no namespace is left in it (another cluster may use it now).
                if mountpoint -q "${name}" && [[ -z "$(ls -A "${name}")" ]]; then
                    umount "${name}"
                fi
                ;;
            dir)
                if [[ -d "${name}" ]] && ! mountpoint -q "${name}" && [[ -z "$(ls -A "${name}")" ]]; then
                    rmdir "${name}"
                fi
                ;;
        esac
    done < <(tac "${ledger}")
    rm -f "${ledger}"
}
