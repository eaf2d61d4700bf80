#!/usr/bin/env bash
# Install the Debian packages of the local multi-node SLURM cluster: slurmctld, slurmd,
# the client commands, munge, slurmdbd with a MariaDB server (accounting, the real sacct),
# iproute2 (bridge, veths, network namespaces) and util-linux (nsenter, unshare).
# Idempotent: does nothing when they are all installed. Runs `apt-get update` only when the
# install fails without it. Needs root.
set -euo pipefail

packages=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client iproute2
    util-linux python3)

missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "${pkg}" 2>/dev/null || true)"
    if [[ "${status}" != "installed" ]]; then
        missing+=("${pkg}")
    fi
done

if [[ "${#missing[@]}" -eq 0 ]]; then
    echo "install.sh: already installed: ${packages[*]}"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install.sh: missing packages (${missing[*]}); run as root to install them" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

echo "install.sh: installing ${missing[*]}"
if ! apt_install; then
    echo "install.sh: install failed; running apt-get update and trying again" >&2
    apt-get update -q
    apt_install
fi

# Where an init system runs, Debian also enables its packaged services (they read
# /etc/slurm, /etc/munge and /etc/mysql; mariadb listens on 127.0.0.1:3306); start.sh runs
# its own daemons, with its own files, and does not use them.
echo "install.sh: installed ${missing[*]}"
