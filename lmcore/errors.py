"""One exception type for every user-facing failure: the CLI prints it as one line."""


class LmcoreError(Exception):
    """Bad input or a state the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(LmcoreError):
    pass


class DataError(LmcoreError):
    pass


class CheckpointError(LmcoreError):
    pass
