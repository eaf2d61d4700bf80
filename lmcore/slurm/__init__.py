"""Running lmcore's jobs on SLURM: cluster profiles, submitit submission, the job entry point.

    lmcore submit train --cluster local --config configs/tiny.yaml        # see `lmcore submit -h`

Modules: `profile` (the typed cluster profile, from configs/slurm/*.yaml), `submit` (profile ->
submitit executor, dry runs, waiting), `entry` (what runs on the nodes: rank setup, stop
signals, checkpoint and requeue), `ranks` (torch.distributed variables from SLURM's),
`task` (launcher for plain sbatch scripts), `cli` (`lmcore submit`).
"""

from __future__ import annotations

from lmcore.errors import LmcoreError


class ProfileError(LmcoreError):
    """A cluster profile is missing, malformed or holds a value SLURM would not take."""


class SubmitError(LmcoreError):
    """sbatch refused a job, or SLURM is not available here."""


class JobFailedError(LmcoreError):
    """A submitted job ended without a result (failed, cancelled, timed out)."""
