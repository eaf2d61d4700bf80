#!/usr/bin/env bash
# The test suite, from a fresh machine: install, lint, start the local SLURM cluster
# (slurm/local/) where possible, pytest, stop the cluster again. Extra arguments go to pytest.
#
# The SLURM integration tests (tests/test_slurm_cluster.py, tests/test_local_cluster.py) need
# that cluster (2 nodes in network namespaces, slurmdbd + MariaDB), which needs root and
# apt-get. Without them the tests are skipped with the reason -- except in CI (CI=true),
# where a cluster that cannot start fails the run at once.
#   LMCORE_SLURM_DIR=path   the cluster's state folder (default /tmp/lmcore-slurm)
#   LMCORE_SLURM_TESTS=off  do not install/start a cluster (the SLURM tests then skip; not in CI)
#   LMCORE_SLURM_GRACE_TIME preemption grace time of the cluster started here (default 10 s
#                           here, 30 s in start.sh: the preemption test waits it out)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
venv="${LMCORE_VENV:-$repo/.venv}"
"$venv/bin/ruff" check lmcore jobs tests bench

in_ci=false
case "${CI:-}" in true | TRUE | True | 1 | yes) in_ci=true ;; esac
export LMCORE_SLURM_DIR="${LMCORE_SLURM_DIR:-/tmp/lmcore-slurm}"
export LMCORE_SLURM_GRACE_TIME="${LMCORE_SLURM_GRACE_TIME:-10}"
# a small MaxArraySize, so that a generation of more shards than that is several arrays
export LMCORE_SLURM_MAX_ARRAY_SIZE="${LMCORE_SLURM_MAX_ARRAY_SIZE:-4}"
slurm_fail() {
    if [ "$in_ci" = true ]; then
        echo "scripts/test.sh: error: the SLURM integration tests cannot run in CI: $*" >&2
        exit 1
    fi
    echo "scripts/test.sh: warning: $*; the SLURM integration tests will be skipped" >&2
}
started=false
if [ "${LMCORE_SLURM_TESTS:-auto}" = off ] && [ "$in_ci" = false ]; then
    echo "scripts/test.sh: LMCORE_SLURM_TESTS=off: no local SLURM cluster" >&2
elif [ "$(id -u)" -ne 0 ]; then
    slurm_fail "the local SLURM cluster needs root (slurm/local/README.md)"
elif ! command -v apt-get >/dev/null 2>&1 && ! command -v slurmctld >/dev/null 2>&1; then
    slurm_fail "no apt-get to install SLURM (slurm/local/install.sh)"
else
    already_up=false
    if [ -f "$LMCORE_SLURM_DIR/etc/slurm.conf" ] &&
        SLURM_CONF="$LMCORE_SLURM_DIR/etc/slurm.conf" scontrol ping 2>/dev/null | grep -q "is UP"; then
        already_up=true # someone's cluster: use it, leave it running
    fi
    if ! bash slurm/local/install.sh; then
        slurm_fail "installing SLURM failed (slurm/local/install.sh)"
    elif ! bash slurm/local/start.sh "$LMCORE_SLURM_DIR"; then
        slurm_fail "the local SLURM cluster did not start (slurm/local/start.sh; logs in $LMCORE_SLURM_DIR/log)"
    elif [ "$already_up" = false ]; then
        started=true
    fi
fi
cluster_pid=""
cleanup() {
    # the cluster's tests first (an interrupted run), then the cluster if we started it; a failed
    # run keeps its exit status
    if [ -n "$cluster_pid" ]; then kill "$cluster_pid" 2>/dev/null || true; fi
    if [ "$started" = true ]; then bash "$repo/slurm/local/stop.sh" "$LMCORE_SLURM_DIR" >/dev/null || true; fi
}
trap cleanup EXIT

# The whole suite (no arguments, as CI runs it): the tests that wait on the cluster (scheduling,
# grace times, requeues: its CPUs mostly idle) run in a second pytest beside the others, whose
# output follows once both are done. With arguments, or LMCORE_TEST_SPLIT=off: one pytest.
cluster_tests=(tests/test_slurm_cluster.py tests/test_slurm_multinode.py tests/test_local_cluster.py
               tests/test_sweep.py)
if [ "$#" -gt 0 ] || [ "${LMCORE_TEST_SPLIT:-on}" = off ]; then
    "$venv/bin/python" -m pytest "$@"
    exit
fi
split="$(mktemp -d "${TMPDIR:-/tmp}/lmcore-tests.XXXXXX")"
"$venv/bin/python" -m pytest "${cluster_tests[@]}" --basetemp "$split/cluster" >"$split/cluster.log" 2>&1 &
cluster_pid=$!
ignore=()
for t in "${cluster_tests[@]}"; do ignore+=("--ignore=$t"); done
rest=0
"$venv/bin/python" -m pytest "${ignore[@]}" --basetemp "$split/rest" || rest=$?
cluster=0
wait "$cluster_pid" || cluster=$?
cluster_pid=""
echo "================ the cluster's tests (${cluster_tests[*]}), run beside the others ================"
cat "$split/cluster.log"
rm -rf "$split"
echo "scripts/test.sh: exit status $rest (the other tests), $cluster (the cluster's tests)"
[ "$rest" -eq 0 ] && [ "$cluster" -eq 0 ]
