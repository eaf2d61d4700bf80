#!/usr/bin/env bash
# Create .venv and install lmcore with its dev tools. Idempotent: a second run takes seconds.
#   LMCORE_VENV=path         where the venv goes (default: .venv in the repo)
#   LMCORE_TORCH=spec        the torch to install first (default: torch==2.13.0)
#   LMCORE_TORCH_INDEX=url   an extra pip index for torch (e.g. PyTorch's CPU wheel index)
# torch goes in first and pinned: with no torch present, resolving lmcore's `torch>=` range
# would pull a multi-GB CUDA build onto machines that have no GPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LMCORE_VENV:-$repo/.venv}"
torch_spec="${LMCORE_TORCH:-torch==2.13.0}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${LMCORE_TORCH_INDEX:-}" ]; then
    "${pip[@]}" "$torch_spec" --extra-index-url "$LMCORE_TORCH_INDEX"
  else
    "${pip[@]}" "$torch_spec"
  fi
fi
if ! "$venv/bin/python" -c "import lmcore, pytest, submitit, wandb, matplotlib, datasets" >/dev/null 2>&1; then
  "${pip[@]}" -e "$repo[dev]"
fi
echo "lmcore installed in $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
