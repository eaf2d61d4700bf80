"""One exception type for every user-facing failure: the CLI prints it as one line."""


class LmcoreError(Exception):
    """Bad input or a state the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(LmcoreError):
    pass


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
