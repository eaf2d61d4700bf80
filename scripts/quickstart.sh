#!/usr/bin/env bash
# The quick start, end to end, offline: install, train a small model on the built-in sample
# corpus, evaluate it, and print a few generated lines. About 2 minutes on a laptop CPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
lmcore=("${LMCORE_VENV:-$repo/.venv}/bin/lmcore")
run_dir="${1:-runs/quickstart}"

echo "== train ($run_dir)"
"${lmcore[@]}" train --config tiny "run.dir=$run_dir"
echo "== eval"
"${lmcore[@]}" eval --config tiny "run.dir=$run_dir"
echo "== generate"
"${lmcore[@]}" generate --config tiny "run.dir=$run_dir" \
  --prompt "the movie was" --prompt "i really wanted to like" --prompt ""
