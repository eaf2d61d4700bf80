#!/usr/bin/env bash
# The GPU check (bench/README.md, "GPU check"): at most ~7.5 minutes on one H200.
#   bash bench/gpu_check.sh --prepare   # here, once: .gpucheck/ (wheels, IMDB, the reference), ~40 MiB
#   bash bench/gpu_check.sh             # on the GPU machine (carry .gpucheck): $OUT/gpu_check.json
#   bash bench/gpu_check.sh --dry-run   # on the CPU, the same code at tiny sizes (tests/test_gpu_check.py)
# Further options go to bench/gpu_check.py (--help). PYTHON: the interpreter (default python3, the
# one holding torch there). Exit status 1 if anything did not install, run or hold (the JSON's
# "problems"); the JSON is written either way.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
if [ "${1:-}" = "--prepare" ]; then
  shift
  exec "$python" bench/gpu_wheels.py prepare .gpucheck "$@"
fi
site="${GPUCHECK_SITE:-/tmp/gpucheck-site}"
report="$(mktemp -t gpucheck-install.XXXXXX.json)"
# A wheel that fails is recorded and the measurements still run: the result says so, and fails.
"$python" bench/gpu_wheels.py install .gpucheck/wheels --target "$site" --report "$report" >/dev/null \
  || echo "gpu_check: not every wheel installed or imports: see \"install\" in the result" >&2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0
"$python" bench/gpu_check.py --install-report "$report" "$@" || rc=$?
rm -f "$report"
exit "$rc"
