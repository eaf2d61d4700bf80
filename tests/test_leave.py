"""How a rank of a multi-rank job ends (lmcore/runtime/leave.py): at once, with its status and its
output, skipping the interpreter's teardown, where a gloo thread can abort a finished rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

TEARDOWN = "import atexit; atexit.register(lambda: print('teardown ran', flush=True))\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2"})


def test_a_rank_leaves_with_its_status_and_its_output_but_no_teardown():
    proc = _python(TEARDOWN + "from lmcore.runtime.leave import leave, multi_rank\n"
                              "assert multi_rank()\nprint('the result')\nleave(3)\n")
    assert proc.returncode == 3 and proc.stdout == "the result\n", proc


def _task(result: Path, then: str = "") -> subprocess.CompletedProcess:
    """A process as submitit runs the job: leave_when_written(RESULT), then what follows the job."""
    return _python(TEARDOWN + "from pathlib import Path\nfrom lmcore.runtime import leave\n"
                   f"result = Path({str(result)!r})\nleave.leave_when_written(result)\n{then}")


def test_a_slurm_task_leaves_once_submitit_wrote_its_result(tmp_path: Path):
    written = _task(tmp_path / "a.pkl", "result.write_text('success')\n")
    assert written.returncode == 0 and "teardown ran" not in written.stdout, written
    # submitit wrote nothing: Python's own exit, teardown and all
    missing = _task(tmp_path / "b.pkl")
    assert missing.returncode == 0 and "teardown ran" in missing.stdout, missing
    # it raised after writing (an error pickle): status 1, not a success
    failed = _task(tmp_path / "c.pkl", "result.write_text('error')\nraise RuntimeError('dump failed')\n")
    assert failed.returncode == 1 and "dump failed" in failed.stderr, failed
    assert "teardown ran" in failed.stdout
