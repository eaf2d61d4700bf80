"""One job per run folder: a second job pointed at the same folder refuses, clearly.

An advisory `flock` on RUN/.lock, held by the main process for the whole job. The kernel
drops it when the process dies (even by SIGKILL), so a crashed job never leaves a stale
lock behind. The file also says who holds it, for the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from lmcore.errors import LmcoreError


class RunLock:
    def __init__(self, folder: str | Path, what: str = "run folder", hint: str = "run.dir"):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.what, self.hint = what, hint
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LmcoreError(f"{self.what} {self.folder} cannot be used ({e.strerror or e}); "
                              f"set {self.hint} to a folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {info.get('pid')} on {info.get('host')}"
                holder += f", SLURM job {info['slurm_job']})" if info.get("slurm_job") else ")"
            except (ValueError, OSError):
                pass
            os.close(fd)
            raise LmcoreError(
                f"{self.what} {self.folder} is in use by another job{holder}; wait for it to end, "
                f"or use another {self.hint}"
            ) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                 "slurm_job": os.environ.get("SLURM_JOB_ID", "")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
