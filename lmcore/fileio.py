"""Every file and folder lmcore writes goes through this module.

- Atomic: a file is written to a temporary name beside its target, fsynced and renamed over it;
  a folder (a checkpoint, a cache entry) is filled under a temporary name and renamed into
  place. A reader sees the old version or the new one, never half of one.
- One permissions rule: what lmcore publishes gets the permissions open() and mkdir() would give
  under the process's umask (files 0666, folders 0777, less the umask), so the rest of a group
  on a shared cluster can read run folders, checkpoints, token caches and generation folders.
  mkstemp, mkdtemp and safetensors would otherwise leave 0600 files and 0700 folders.
- One place for tests to inject faults: WRITERS names every function here that writes, and
  tests/fault_inject.py makes any of them raise OSError (ENOSPC, EACCES, EROFS, EIO) for chosen
  paths. Callers use them as `fileio.NAME(...)` so that the patched function is the one called.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK

# The functions below that write; tests inject faults into each (tests/test_write_faults.py).
WRITERS = ("make_dir", "atomic_write", "write_new", "save_tensors", "append_line", "new_temp_dir",
           "publish_dir", "publish_files", "remove_tree", "create_exclusive", "open_lock")


def usual_permissions(path: str | os.PathLike) -> None:
    os.chmod(path, DIR_MODE if os.path.isdir(path) else FILE_MODE)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike) -> Path:
    """The folder and its parents (as mkdir -p; existing ones are fine)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) with a binary file open on a temporary name beside path, fsync it, then
    rename it over path. On any error the temporary file is removed and path is untouched."""
    path = Path(path)
    make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_new(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """A file inside a folder that is still private (published later by publish_dir): written
    (data, or by data(f)) and fsynced, not renamed."""
    with open(path, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    usual_permissions(path)


# safetensors' order of the tensors in a file: by dtype as below, then by name (its serializer's
# sort, reproduced so that the bytes are those safetensors.torch.save gives; tests check it).
_SAFETENSORS_DTYPES = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                       "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


def save_tensors(path: str | os.PathLike, tensors: dict) -> None:
    """A safetensors file inside a private folder (see write_new); tensors: name -> tensor.
    Streamed: the header, then each tensor's own bytes, so a checkpoint costs no copy of what
    it saves (safetensors.torch.save builds the whole file in memory, after a bytes copy of
    every tensor: measured +160 MB peak RSS at the notebook's model and its Adam state)."""
    import torch  # deferred: this module is imported before torch is
    from safetensors.torch import _TYPES

    names = {dtype: name for name, dtype in _TYPES.items() if name in _SAFETENSORS_DTYPES}
    parts = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    order = sorted(parts, key=lambda k: (_SAFETENSORS_DTYPES.index(names[parts[k].dtype]), k))
    header, offset = {}, 0
    for k in order:
        t = parts[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors pads it

    def write(f: BinaryIO) -> None:
        f.write(len(head).to_bytes(8, "little") + head)
        for k in order:
            if parts[k].numel():
                f.write(memoryview(parts[k].reshape(-1).view(torch.uint8).numpy()))

    write_new(path, write)


def append_line(path: str | os.PathLike, line: str) -> None:
    """One line appended and fsynced (metrics.jsonl): a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line if line.endswith("\n") else line + "\n")
        f.flush()
        os.fsync(f.fileno())


def new_temp_dir(parent: str | os.PathLike, prefix: str = ".tmp-") -> Path:
    """An empty private folder in parent, to be filled and then published with publish_dir."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=make_dir(parent)))
    usual_permissions(tmp)
    return tmp


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, replace: bool = False) -> bool:
    """Rename a filled temp folder into place. replace: an existing final folder is removed
    first; else, if another process published first, theirs is kept (returns False)."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.iterdir():
        usual_permissions(f)
    fsync_dir(tmp)
    if replace and final.exists():
        remove_tree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if replace or not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_dir(final.parent)
    return True


def publish_files(tmp: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Move every file of a filled temp folder into folder (made if needed), each by an atomic
    rename, then remove the temp folder: a set of files that appears together, over older ones."""
    tmp, folder = Path(tmp), make_dir(folder)
    for f in sorted(tmp.iterdir()):
        usual_permissions(f)
        os.replace(f, folder / f.name)
    tmp.rmdir()
    fsync_dir(folder)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a folder atomically under its own name: renamed away first, then deleted, so a
    reader never sees it half-deleted."""
    path = Path(path)
    gone = path.with_name(f".tmp-del-{path.name}")
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Create path with data unless it exists (exactly one of several racing processes wins,
    complete: it appears by hard link, fully written). True if this call created it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create instead
            try:
                with open(path, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except FileExistsError:
                return False
        fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def open_lock(path: str | os.PathLike) -> int:
    """A file descriptor of the lock file at path (created if needed), for flock."""
    make_dir(Path(path).parent)
    # never through a symlink (ELOOP), never blocking on a FIFO; only a regular file is a lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, FILE_MODE)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
