"""Running lmcore's jobs on SLURM: cluster profiles, submitit submission, the job entry point.

    lmcore submit train --cluster local --config tiny        # see `lmcore submit -h`

    profile  Profile: where and with what resources jobs run (configs/slurm/*.yaml)
    submit   plan, submit_plan, wait: profile + config -> submitit jobs, dry runs
    entry    LmcoreJob: what runs on the nodes (ranks, stop signals, checkpoint, requeue)
    env      what SLURM's environment says: ranks and rendezvous, array task, CPUs
    cli      `lmcore submit`
"""

from __future__ import annotations

__all__ = ["profile", "submit", "entry", "env", "cli", "ProfileError", "SubmitError", "JobFailedError"]

from lmcore.errors import LmcoreError


class ProfileError(LmcoreError):
    """A cluster profile is missing, malformed or holds a value SLURM would not take."""


class SubmitError(LmcoreError):
    """sbatch refused a job, or SLURM is not available here."""


class JobFailedError(LmcoreError):
    """A submitted job ended without a result (failed, cancelled, timed out)."""
