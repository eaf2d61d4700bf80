"""metrics.jsonl in the run folder: every logged figure, whatever the tracking mode.

One JSON object per line with the global optimizer step. On resume, rows from after the
checkpoint's step (written by the run that died) are dropped, so the step column only
ever increases. With a tracker (lmcore.track.tracker), every row also goes to W&B; the file is
written first, so a W&B problem can never cost a row here. On resume the rows kept are offered
to the tracker again: those an earlier job sent but W&B lost (a SIGTERM takes wandb's service
down before it flushes) are sent now, the rest are skipped (lmcore.track.wandb_init._floor).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lmcore import fileio
from lmcore.errors import LmcoreError, write_failed
from lmcore.reading import json_value
from lmcore.track.tracker import Tracker


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True, resume_step: int = 0,
                 tracker: Tracker | None = None):
        self.path = path
        self.enabled = enabled
        self.tracker = tracker
        if not enabled:
            return
        kept: list[bytes] = []
        try:
            fileio.make_dir(path.parent)
            if path.exists():  # rows past the step resumed from are the ones to be redone
                kept = [line for line in path.read_bytes().splitlines()
                        if (step := _step_of(line)) is not None and step <= resume_step]
                fileio.atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
        except OSError as e:
            raise self._failed(e, "nothing was trained yet") from None
        if tracker is not None:  # rows an earlier job sent but W&B lost: the tracker skips the rest
            for line in kept:
                row = json_value(line)
                tracker.log(row.pop("step"), {k: v for k, v in row.items() if k != "time"})

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        try:
            fileio.append_line(self.path, json.dumps(row))
        except OSError as e:
            raise self._failed(e, f"its rows up to step {step - 1} and the checkpoints are intact") from None
        if self.tracker is not None:
            self.tracker.log(step, values)

    def _failed(self, e: OSError, kept: str) -> LmcoreError:
        return LmcoreError(write_failed(self.path, e, kept, "run the same command again to resume",
                                        self.path.parent))


def _step_of(line: bytes) -> int | None:
    """The step of a row; None for a line that is not a row (a torn last line from a killed run,
    or damage: not UTF-8, not JSON, nested too deeply, a step that is not an integer)."""
    try:
        step = json_value(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if type(step) is int else None


def read_metrics(path: Path, tolerant: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; tolerant=True skips lines that are not JSON objects (a
    torn last line of a killed run, or damage: nested too deeply, an over-long number, a lone
    surrogate, not UTF-8), else they raise ValueError."""
    rows = []
    for line in Path(path).read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            row = json_value(line)
        except ValueError:
            if tolerant:
                continue
            raise
        if isinstance(row, dict) or not tolerant:
            rows.append(row)
    return rows
