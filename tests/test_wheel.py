"""Installed the way users install it: the wheel built from this tree, installed into a fresh
virtual environment (not editable; the checkout is never on its path), then used from an empty
folder with the README's commands and built-in names only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmcore import __version__
from tests.conftest import REPO

TORCH = os.environ.get("LMCORE_TORCH", "torch==2.13.0")  # as scripts/setup.sh: the CPU build on disk


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the venv's bin folder, an empty working folder, the environment of a user's shell)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LMCORE_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", WANDB_MODE="disabled", LMCORE_CACHE=str(root / "cache"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(REPO)], root,
        env)
    (wheel,) = (root / "dist").glob("lmcore-*.whl")
    run([sys.executable, "-m", "venv", str(root / "venv")], root, env)
    pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, TORCH], root, env)
    run([*pip, f"{wheel}[slurm]"], root, env)
    empty = root / "work"
    empty.mkdir()
    return root / "venv" / "bin", empty, env


def test_the_wheel_holds_the_configs_profiles_and_sbatch_template(user):
    bin_, cwd, env = user
    where = run([str(bin_ / "python"), "-c", "import lmcore; print(lmcore.__file__)"], cwd, env).stdout
    assert "site-packages" in where and str(REPO) not in where  # the installed copy, not the checkout
    assert run([str(bin_ / "lmcore"), "--version"], cwd, env).stdout.strip() == f"lmcore {__version__}"
    dash_m = run([str(bin_ / "python"), "-m", "lmcore", "--version"], cwd, env).stdout
    assert dash_m.strip() == f"lmcore {__version__}"
    listing = run([str(bin_ / "lmcore"), "configs"], cwd, env).stdout
    builtin = ("tiny", "imdb_seed", "imdb_fast", "imdb_best", "local", "gpu_example")
    assert all(f"  {n} " in listing for n in builtin)
    template = run([str(bin_ / "lmcore"), "sbatch-template"], cwd, env).stdout
    assert template == (REPO / "slurm" / "lmcore.sbatch").read_text()


def test_the_quick_start_with_built_in_names_from_an_empty_folder(user):
    bin_, cwd, env = user
    lmcore = str(bin_ / "lmcore")
    trained = json.loads(run([lmcore, "train", "--config", "tiny", "run.dir=runs/q", "--train.max_steps",
                              "20", "--no-progress"], cwd, env).stdout)
    assert trained["step"] == 20 and (cwd / "runs" / "q" / "checkpoints" / "step_00000020").is_dir()
    scored = json.loads(run([lmcore, "eval", "--config", "tiny", "run.dir=runs/q"], cwd, env).stdout)
    assert scored["num_targets"] > 1000
    lines = run([lmcore, "generate", "--config", "tiny", "run.dir=runs/q", "--prompt", "the movie was"], cwd,
                env).stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("the movie was >>> ")
    script = run([lmcore, "submit", "train", "--cluster", "local", "--config", "tiny", "--dry-run"], cwd,
                 env).stdout
    assert script.startswith("#!/bin/bash") and "#SBATCH --partition=debug" in script


def test_a_two_process_launch_of_the_installed_command(user):
    """The launch line `lmcore train --help` shows: torchrun --no-python lmcore ..."""
    bin_, cwd, env = user
    proc = run([str(bin_ / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                str(bin_ / "lmcore"), "train", "--config", "tiny", "run.dir=runs/ddp", "train.max_steps=4",
                "data.val_split=", "--no-progress"], cwd, env)
    assert json.loads(proc.stdout.splitlines()[-1])["world_size"] == 2
