#!/usr/bin/env bash
# Install the Debian packages of a local single-node SLURM cluster (slurmctld, slurmd,
# the client commands and munge). Idempotent: does nothing when they are all installed.
# Runs `apt-get update` only when the install fails without it. Needs root.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)

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
# /etc/slurm and /etc/munge); start.sh runs its own daemons and does not use them.
echo "install.sh: installed ${missing[*]}"
