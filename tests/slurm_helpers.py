"""The local SLURM cluster of slurm/local/ for the integration tests: find it or say why not,
a test profile, bounded waits. scripts/test.sh starts the cluster where it can (root + apt)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lmcore.slurm.profile import Profile, profile_from_dict
from tests.conftest import REPO

STATE_DIR = Path(os.environ.get("LMCORE_SLURM_DIR", "/tmp/lmcore-slurm"))
# A small model on the built-in corpus; no validation (speed).
SMALL = ["data.source=sample", "model.embedding_dim=32", "model.hidden_dim=32", "train.batch_size=8",
         "data.val_split=", "train.log_interval=10"]


def cluster_env() -> dict[str, str]:
    """What `source STATE_DIR/env.sh` sets: the config (the client commands, the real sacct
    included, find slurmctld and slurmdbd through it)."""
    return {"SLURM_CONF": str(STATE_DIR / "etc" / "slurm.conf")}


def cluster_problem() -> str | None:
    """None when the local cluster answers; else why it cannot be used."""
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (run slurm/local/install.sh as root)"
    if not (STATE_DIR / "etc" / "slurm.conf").is_file():
        return f"no local cluster in {STATE_DIR} (run slurm/local/start.sh as root)"
    env = {**os.environ, **cluster_env()}
    try:
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    if "is UP" not in ping.stdout:
        return f"slurmctld of {STATE_DIR} is not up ({ping.stdout.strip() or ping.stderr.strip()}); " \
               "run slurm/local/start.sh"
    # submitit reads job states with sacct: without slurmdbd it sees every job as UNKNOWN.
    try:
        acct = subprocess.run(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"], env=env, capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sacct failed: {e}"
    if acct.returncode != 0:
        return f"sacct of {STATE_DIR} does not answer ({acct.stderr.strip()}); is its slurmdbd up?"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def skip_or_fail(problem: str | None, what: str = "no local SLURM cluster") -> None:
    """Nothing when problem is None; else skip, but in CI (CI=true) fail: the SLURM tests
    must run there."""
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"SLURM integration tests cannot run in CI: {problem}", pytrace=False)
    pytest.skip(f"{what}: {problem}")


def require_cluster() -> None:
    """Skip without a cluster, but in CI (CI=true) fail: the SLURM tests must run there."""
    skip_or_fail(cluster_problem())


def local_profile(tmp_path: Path, **values) -> Profile:
    """configs/slurm/local.yaml with logs in the test's folder."""
    data = yaml.safe_load((REPO / "configs" / "slurm" / "local.yaml").read_text())
    data.update(log_dir=str(tmp_path / "logs"), **values)
    return profile_from_dict(data, name="test-local")


def write_profile(path: Path, profile_values: dict) -> Path:
    path.write_text(yaml.safe_dump(profile_values), encoding="utf-8")
    return path


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> float:
    """Poll until predicate() holds; fail with the job's log tail after timeout_s."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            tail = ""
            if log is not None and log.exists():
                tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")
        time.sleep(0.2)
    return time.monotonic() - t0


def squeue_ids(env: dict[str, str]) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=20).stdout
    return {line.split("_")[0] for line in out.split()}
