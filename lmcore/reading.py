"""What every reader of a file lmcore did not write itself needs (data, prompts, manifests,
metrics, params): one JSON parser whose every failure is a ValueError with a reason a person
can act on, a check that a path is a regular file before it is opened (a FIFO blocks open()
forever, /dev/zero never ends), and the exceptions a damaged compressed file raises.

    value = json_value(line)              # ValueError: "nested too deeply", "not valid Unicode", ...
    regular_file(path, "prompts file")    # LmcoreError unless a regular file (symlinks followed)
    except DECOMPRESS_ERRORS as e:        # truncated, CRC, corrupt deflate data
"""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import zlib
from pathlib import Path
from typing import Any

from lmcore.errors import LmcoreError

# A gzip file whose data is damaged raises any of these while it is read.
DECOMPRESS_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def json_value(text: str | bytes) -> Any:
    """json.loads, with every way a hostile line can break it as a ValueError: bad syntax, nesting
    deep enough to exhaust the stack, an integer longer than Python converts, a lone UTF-16
    surrogate escape (valid JSON, but no text: it cannot be written back as UTF-8)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply (arrays or objects inside each other)") from None
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError):
            raise
        digits = re.search(r"\((\d+) digits\)", str(e))
        limit = digits.group(1) if digits else "the allowed"
        raise ValueError(f"a number of more than {limit} digits") from None
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    if _SURROGATE_ESCAPE.search(raw):
        _check_text(value)
    return value


def _check_text(value: Any) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = v[e.start:e.end].encode("utf-16", "surrogatepass")[2:].hex()
                raise ValueError(f"a lone UTF-16 surrogate (\\u{bad[2:4]}{bad[0:2]}) is not valid "
                                 "Unicode text") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """The path, if it names a regular file (after symlinks); else one line saying what it is."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise LmcoreError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
                if stat.S_ISSOCK(mode) else "not a regular file")
        raise LmcoreError(f"{what} {p} is {kind}, not a regular file: pass a file")
    return p
