"""The versions of the libraries whose private parts lmcore uses, checked where it uses them.

submitit (the sbatch script builder `_make_sbatch_string`, a job's `_sub_jobs` and
`_results_timeout_s`, `JobEnvironment._usr_sig`) and accelerate (`AcceleratorState._reset_state`)
are bounded in pyproject.toml to the versions this lmcore is tested with; one installed beside
the bounds (with --no-deps, or by conda) stops with one line saying which version is needed,
instead of failing later and mysteriously.
"""

from __future__ import annotations

import re
from importlib import metadata

from lmcore.errors import LmcoreError

TESTED = {"submitit": ((1, 5), (1, 6)), "accelerate": ((1, 0), (2, 0))}  # [lowest, below)


def _release(version: str) -> tuple[int, ...]:
    """'1.5.4' -> (1, 5, 4); '2.0.0rc1' -> (2, 0, 0)."""
    parts = []
    for piece in version.split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.group() != piece:
            break
    return tuple(parts)


def require(package: str) -> None:
    lowest, below = TESTED[package]
    try:
        found = metadata.version(package)
    except metadata.PackageNotFoundError:
        raise LmcoreError(f"{package} is not installed: pip install '{package}'") from None
    if not lowest <= _release(found)[:2] < below:
        wanted = f">={'.'.join(map(str, lowest))},<{'.'.join(map(str, below))}"
        raise LmcoreError(f"{package} {found} is installed, but lmcore uses parts of {package} that only the "
                          f"versions it is tested with have: pip install '{package}{wanted}'")
