"""metrics.jsonl in the run folder: every logged figure, whatever the tracking mode.

One JSON object per line with the global optimizer step. On resume, rows from after the
checkpoint's step (written by the run that died) are dropped, so the step column only
ever increases.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lmcore.fileio import atomic_write_text


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True, resume_step: int = 0):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a killed run


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
