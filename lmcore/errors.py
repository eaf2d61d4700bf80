"""One exception type for every user-facing failure: the CLI prints it as one line."""

import errno


class LmcoreError(Exception):
    """Bad input or a state the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(LmcoreError):
    pass


class PeerLostError(LmcoreError):
    """A collective failed or timed out: another rank is gone, and this process's process group
    still holds threads blocked on it."""


class DataError(LmcoreError):
    pass


class CheckpointError(LmcoreError):
    pass


def first_line(e: BaseException) -> str:
    """The first line of an exception's message for a one-line error: an OSError's strerror
    ("No space left on device"), else the first non-empty line, else the type's name."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def remedy(e: BaseException, folder: object = "the folder") -> str:
    """What a user can do about a failed write, from its errno."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space (or raise the quota)"
    if code in (errno.EACCES, errno.EPERM):
        return f"make {folder} writable, or use another folder"
    if code == errno.EROFS:
        return f"{folder} is on a read-only file system: use another folder"
    if code == errno.EIO:
        return f"the disk under {folder} reported an I/O error: check it, or use another folder"
    return f"check {folder}"


def write_failed(what: object, e: BaseException, kept: str, then: str, folder: object = "the folder") -> str:
    """'could not write WHAT (CAUSE); KEPT: REMEDY, then THEN' -- the one line of every failed write."""
    return f"could not write {what} ({first_line(e)}); {kept}: {remedy(e, folder)}, then {then}"
