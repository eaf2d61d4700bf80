"""How a rank of a multi-rank job ends: at once, once what it writes is written, without the
interpreter's teardown.

A gloo process group outlives the work (lmcore does not destroy it, see below; torch keeps it
alive past destroy_process_group anyway once torch._dynamo is imported after it, as the first
optimizer does), and its threads then meet the interpreter's teardown. A thread that drops the
tensors of the last collective after finalization began needs the GIL, CPython ends it in the
middle of C++, and the process aborts ("terminate called without an active exception", SIGABRT).
srun (--kill-on-bad-exit=1, as lmcore submits) then kills the other ranks, and SLURM marks a job
whose results are written FAILED: the jobs that wait on it (afterok) never start. Measured on a
2-core VM, torch 2.13, a bare 2-rank gloo script: 11 and 7 of 30 runs aborted at exit (two
tries); 0 of 30 when leaving this way.

Destroying the group first is no cure: its destructor joins those threads while holding the
GIL, and one that waits for the GIL to drop a tensor deadlocks it (seen in CI, a 2-rank training
stopped by a signal: rank 1 hung in ~ProcessGroupGloo). So a multi-rank process never destroys
its group; it leaves here. No torch import: the CLI uses this.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import NoReturn


def multi_rank() -> bool:
    """Whether this process is one of several ranks (a launcher set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def leave(code: int) -> NoReturn:
    """End the process with `code` now: output flushed, no atexit handlers, no teardown. Files
    that matter are closed by then (atomic writes); W&B is finished by the job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave_when_written(result: Path) -> None:
    """For a result that another library writes after the job returns (submitit): at the
    interpreter's exit, leave with status 0 if `result` exists and nothing raised since. An
    uncaught exception (submitit could not write it) keeps Python's own exit and its status 1.
    An atexit handler registered last runs first, while the interpreter is still whole."""
    raised: list[bool] = []
    previous = sys.excepthook

    def note(*exc_info) -> None:
        raised.append(True)
        previous(*exc_info)

    def at_exit() -> None:
        if not raised and result.exists():
            leave(0)

    sys.excepthook = note
    atexit.register(at_exit)
