#!/usr/bin/env bash
# The test suite, from a fresh machine: install, then pytest. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
venv="${LMCORE_VENV:-$repo/.venv}"
"$venv/bin/ruff" check lmcore jobs tests
"$venv/bin/python" -m pytest "$@"
