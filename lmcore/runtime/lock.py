"""One job per run folder: a second job pointed at the same folder refuses, clearly.

An advisory `flock` on FOLDER/.lock, held by the main process for the whole job. The kernel
drops it when the process dies (even by SIGKILL), so a crashed job never leaves a stale
lock behind. The file also says who holds it, for the error message. A folder the lock
itself created is removed again on release if the job left nothing else in it, or, with
release(discard=True), whatever the job left in it (a job that failed before its first
checkpoint): a job that ends with nothing to show leaves no run folder behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from lmcore import fileio
from lmcore.errors import LmcoreError, write_failed

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, folder: str | Path, what: str = "run folder", hint: str = "run.dir"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what, self.hint = what, hint
        self._fd: int | None = None
        self._created: list[Path] = []  # folders that did not exist before acquire()

    def acquire(self) -> RunLock:
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        if self.path.is_symlink():  # opened, it would truncate whatever the link points to
            raise LmcoreError(f"{self.path} is a symbolic link; lmcore writes its lock only as a plain file: "
                              f"remove the link (or set {self.hint} to another folder)")
        try:
            fd = fileio.open_lock(self.path)
        except OSError as e:
            raise LmcoreError(write_failed(f"the lock of {self.what} {self.folder}", e, "nothing was written",
                                           f"run again (or set {self.hint} to another folder)",
                                           self.folder)) from None
        self._created = missing
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
            self._created = []
            raise LmcoreError(f"{self.what} {self.folder} is in use by another job{holder}; wait for it to "
                              f"end, or use another {self.hint}") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                 "slurm_job": os.environ.get("SLURM_JOB_ID", "")}
        with contextlib.suppress(OSError):  # who holds it is only for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def release(self, discard: bool = False) -> None:
        """Unlock; remove the folder if acquire() created it and the job left nothing in it but
        the lock (or anything, with discard)."""
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if not self._created:
            return
        with contextlib.suppress(OSError):
            if discard:
                fileio.remove_tree(self.folder)
            elif [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
            for p in self._created:  # innermost first
                with contextlib.suppress(OSError):
                    p.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
