"""Run `lmcore ARGS` with an OSError injected into one of lmcore's writes.

    python -m tests.fault_inject WRITER PATTERN ERRNO [--nth N] [--midway] [--also W P] -- ARGS...

Every write lmcore makes goes through a function of lmcore.fileio named in fileio.WRITERS
(atomic_write_json and the like go through atomic_write). The N-th call (default the first) of
WRITER whose target path matches PATTERN (fnmatch, against the whole path) raises
OSError(ERRNO), as the kernel does on a full disk (ENOSPC), a denied folder (EACCES), a
read-only mount (EROFS) or a failing disk (EIO). By default it fails before anything is written
(the create is refused); with --midway the writer first writes half of what it was given (a
file filled up halfway, a line cut short), as a disk that fills up during the write does.
Nothing else changes: the same command line, the same process, lmcore's own error handling.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import os
import sys
from pathlib import Path

from lmcore import fileio

ERRNOS = {"ENOSPC": errno.ENOSPC, "EACCES": errno.EACCES, "EROFS": errno.EROFS, "EIO": errno.EIO}
# Which argument of each writer is the path it writes.
TARGET_ARG = {"publish_dir": 1, "publish_files": 1}


def inject(writer: str, pattern: str, code: int, nth: int = 1, midway: bool = False) -> None:
    if writer not in fileio.WRITERS:
        raise SystemExit(f"fault_inject: {writer} is not one of lmcore.fileio.WRITERS: {fileio.WRITERS}")
    real = getattr(fileio, writer)
    seen = {"n": 0}

    def faulty(*args, **kwargs):
        target = str(Path(args[TARGET_ARG.get(writer, 0)]).absolute())
        if fnmatch.fnmatch(target, pattern):
            seen["n"] += 1
            if seen["n"] == nth:
                if midway:
                    _half(writer, real, args)
                raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    setattr(fileio, writer, faulty)


class _Cut(Exception):
    pass


def _half(writer: str, real, args: tuple) -> None:
    """Do half of the write, then let the caller's fault follow."""
    if writer == "atomic_write":
        path, write = args

        def half(f):
            write(f)
            f.flush()
            f.truncate(f.tell() // 2)
            raise _Cut

        with contextlib.suppress(_Cut):  # the caller gets the injected fault, just below
            real(path, half)
    elif writer in ("write_new", "append_line"):
        path, data = args
        with open(path, "ab" if writer == "append_line" else "wb") as f:
            raw = data.encode("utf-8") if isinstance(data, str) else data
            f.write(raw[: len(raw) // 2])
    elif writer == "save_tensors":
        Path(args[0]).write_bytes(b"\x00" * 16)  # the start of a file that never got its tensors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fault_inject")
    p.add_argument("writer")
    p.add_argument("pattern")
    p.add_argument("errno", choices=sorted(ERRNOS))
    p.add_argument("--nth", type=int, default=1)
    p.add_argument("--midway", action="store_true")
    p.add_argument("--also", nargs=2, metavar=("WRITER", "PATTERN"),
                   help="a second writer and pattern that fail (first call) with the same errno")
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        p.error("the lmcore arguments come after --")
    cut = argv.index("--")
    a, args = p.parse_args(argv[:cut]), argv[cut + 1:]
    inject(a.writer, a.pattern, ERRNOS[a.errno], a.nth, a.midway)
    if a.also:
        inject(*a.also, ERRNOS[a.errno])
    from lmcore.cli import main as lmcore_main  # after the patch: every module sees the faulty writer

    lmcore_main(args)


if __name__ == "__main__":
    main()
