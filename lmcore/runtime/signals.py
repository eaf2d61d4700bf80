"""Stop requests from the scheduler: SLURM's warning signal (USR2 by default) and SIGTERM.

A handler only sets a flag; the training loop checks it between steps, all ranks agree on
the step (any_rank), a checkpoint is written there, and the job ends with STOPPED_EXIT so
that a wrapper (submitit, an sbatch script) requeues it; the requeued job resumes.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from lmcore.errors import ConfigError

# Exit status of a job that stopped early on request, with a checkpoint saved. Chosen apart
# from 0 (done), 1 (crash) and 2 (bad input) so that wrappers can requeue on it alone.
STOPPED_EXIT = 3


def parse_signals(names: str) -> list[signal.Signals]:
    """'USR2,TERM' -> [SIGUSR2, SIGTERM]; unknown names are a one-line error."""
    out = []
    for raw in names.split(","):
        name = raw.strip().upper()
        if not name:
            continue
        full = name if name.startswith("SIG") else f"SIG{name}"
        try:
            sig = signal.Signals[full]
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                raise KeyError(full)
            out.append(sig)
        except KeyError:
            raise ConfigError(f"unknown signal {raw.strip()!r}; use names like USR2, TERM, USR1") from None
    return out


class StopFlag:
    """Context manager: while inside, the given signals set `requested` instead of killing."""

    def __init__(self, signals: list[signal.Signals] | None = None):
        self.signals = signals if signals is not None else [signal.SIGTERM, signal.SIGUSR2]
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum)
            print(f"lmcore: received {self.requested.name}: checkpointing at the next step, then "
                  f"exiting with status {STOPPED_EXIT}", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested is not None

    def __enter__(self) -> StopFlag:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            # Once stopping, a second stop signal must not kill the job on its way out.
            signal.signal(s, signal.SIG_IGN if self.requested else prev)  # type: ignore[arg-type]
