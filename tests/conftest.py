"""Shared fixtures: every test writes into its own temp folders, never into ~/.cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMCORE_SHARED", REPO.parent / "shared"))
IMDB = SHARED / "data" / "imdb"


def needs_native(precision: str) -> pytest.MarkDecorator:
    """For a test that runs a job in bf16 or fp16: skipped, saying why, on a CPU without it natively,
    where lmcore refuses it (tests/test_precision.py::test_a_precision_the_cpu_lacks_is_refused)."""
    from lmcore.runtime.precision import cpu_supports

    return pytest.mark.skipif(not cpu_supports(precision), reason=f"this CPU has no native {precision}: "
                              "lmcore refuses it here (test_a_precision_the_cpu_lacks_is_refused)")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "lmcore-cache"  # shared by the session: fast reruns
    monkeypatch.setenv("LMCORE_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300
            ) -> subprocess.CompletedProcess:
    """Run `lmcore ARGS` as a user would, in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmcore.cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_overrides(run_dir: Path, **extra: object) -> list[str]:
    """A small, fast model on the built-in sample corpus."""
    values = {"run.dir": str(run_dir), "data.source": "sample", "model.embedding_dim": 32,
              "model.hidden_dim": 32, "train.batch_size": 16, "train.log_interval": 5,
              "train.checkpoint_interval": 10, "train.epochs": 1, "optim.lr": 0.01, **extra}
    return [f"{k}={v}" for k, v in values.items()]


# -- the local SLURM cluster (tests/test_slurm_cluster.py, tests/test_slurm_multinode.py) ----------
@pytest.fixture(scope="module")
def slurm():
    """The local cluster's environment (SLURM_CONF, PATH) for one test module; skips without a
    cluster, fails in CI."""
    from tests.slurm_helpers import cluster_env, require_cluster  # it imports this module

    require_cluster()
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ.update(cluster_env())
    yield cluster_env()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def submitted(slurm):
    """Collects submissions; cancels whatever is still queued when the test ends."""
    subs: list = []
    yield subs
    ids = [s.job_id for s in subs]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
