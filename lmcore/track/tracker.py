"""Weights & Biases tracking that can never stop a job: online, offline or off.

lmcore.track.wandb_init.open_tracker gives a `Tracker`; every method of it swallows
W&B errors: the first one is reported as one warning line and the tracker turns into a
no-op for the rest of the job. `metrics.jsonl` in the run folder (lmcore.track.metrics) is
written whatever happens here, and `lmcore report RUN_DIR` draws it without W&B.

Step axis: every row is logged with step=<global optimizer step> (W&B's `_step` is the
optimizer step, the same number as metrics.jsonl's "step"). W&B drops rows whose step is
below the run's current step ("step must only increase"), so after resuming from a
checkpoint older than the last logged row the tracker itself skips every row with a step
at or below the last step W&B already has (wandb_run.json's last_step: the last step whose
row W&B has written, updated as rows complete; for online runs also the server's), instead
of tripping that warning. Exact resume makes the skipped rows the same figures W&B already
holds, up to timing (tokens_per_s); metrics.jsonl keeps the rows written after the resume.
A job killed without warning (SIGKILL, node failure; not the SIGTERM/USR2 that lmcore
turns into checkpoint + clean exit) can leave a hole in W&B's history: offline, wandb
flushes its file every 15 s, so rows of the last seconds before the kill are lost with the
process (metrics.jsonl has them); the row still being assembled is not lost: the next job
logs it again.

What goes where: numeric and string values of a row go to the W&B history at its step
(rows of the same step are merged into one W&B row); an event row such as
{"event": "checkpoint", "path": P} is logged as {"checkpoint/path": P,
"checkpoint/step": step}, so a chart shows where checkpoints were saved and the summary
holds the latest path. Other values (lists, dicts, None) are not sent. The resolved config
is the run config.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lmcore import fileio
from lmcore.errors import first_line

TABLE_MAX_ROWS = 500  # rows of a W&B table; the full output stays in the job's files


class Tracker:
    """A W&B run, or nothing. Never raises: a failure warns once and makes it a no-op.

    mode is the mode actually in use ("online", "offline" or "disabled"; "disabled" after
    a failure), run_id the W&B run id (None when disabled).
    """

    def __init__(self, run: Any = None, mode: str = "disabled", run_id: str | None = None,
                 state_path: Path | None = None, state: dict | None = None, floor: int = -1):
        self._run = run
        self.mode = mode if run is not None else "disabled"
        self.run_id = run_id if run is not None else None
        self._state_path = state_path  # None: this job does not own the run folder's id
        self._state = dict(state or {})
        self._floor = floor  # steps <= floor are already in W&B (an earlier job of this run)
        self._current = -1  # last step sent by this job
        self._state_warned = False

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Send one metrics row at the global optimizer step (see the module docstring)."""
        if self._run is None or step <= self._floor or step < self._current:
            return
        row = history_row(step, values)
        if not row:
            return
        try:
            self._run.log(row, step=int(step))
        except Exception as e:  # tracking must never stop training
            self._fail("log", e)
            return
        if step > self._current:
            # W&B writes a step's row once a later step starts (or at finish): the previous
            # step is now in the run, this one is not yet.
            self._mark_done(self._current)
            self._current = int(step)

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary values (eval results, throughput): shown in the runs table."""
        if self._run is None:
            return
        try:
            self._run.summary.update({k: v for k, v in values.items() if _is_scalar(v)})
        except Exception as e:
            self._fail("summary", e)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """Log a table (e.g. generated samples); at most TABLE_MAX_ROWS rows are sent."""
        if self._run is None:
            return
        try:
            import wandb  # deferred, as everywhere: optional, and a second to import

            data = [[_cell(v) for v in row] for row in rows[:TABLE_MAX_ROWS]]
            table = wandb.Table(columns=list(columns), data=data)
            if self._current >= 0:
                self._run.log({name: table}, step=self._current)
            else:
                self._run.log({name: table})
        except Exception as e:
            self._fail("table", e)

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run (online: waits at most WANDB_FINISH_TIMEOUT s for the upload)."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:
            self._fail("finish", e, run)
            return
        self._mark_done(self._current)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def __repr__(self) -> str:
        return f"Tracker(mode={self.mode!r}, run_id={self.run_id!r})"

    def _fail(self, what: str, e: BaseException, run: Any = None) -> None:
        warnings.warn(f"W&B {what} failed ({redacted(e)}); W&B tracking is off for the rest of "
                      "this job, metrics.jsonl is still written", stacklevel=3)
        run, self._run = run or self._run, None
        self.mode = "disabled"
        if run is not None and what != "finish":
            # End the run (bounded by finish_timeout online); fails fast if wandb is gone.
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)
        teardown_quietly()  # wandb's service: nothing is left to wait for

    def _mark_done(self, step: int) -> None:
        if self._state_path is not None and step > self._state.get("last_step", -1):
            self._state["last_step"] = step
            self._save_state()

    def _save_state(self) -> None:
        try:
            fileio.atomic_write_json(self._state_path, self._state)
        except OSError as e:
            if not self._state_warned:
                self._state_warned = True
                warnings.warn(f"could not write {self._state_path} ({first_line(e)}); a requeued job "
                              "may start a new W&B run", stacklevel=4)


def history_row(step: int, values: dict[str, Any]) -> dict[str, Any]:
    """The W&B history entry for one metrics.jsonl row (without its step and time)."""
    event = values.get("event")
    fields = {k: v for k, v in values.items() if k not in ("step", "time", "event")}
    if isinstance(event, str) and event:
        row: dict[str, Any] = {f"{event}/step": int(step)}
        row.update({f"{event}/{k}": v for k, v in fields.items() if _is_scalar(v)})
        return row
    return {k: v for k, v in fields.items() if _is_scalar(v)}


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def _cell(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)


# --- opening a run -------------------------------------------------------------------


def teardown_quietly() -> None:
    """Stop wandb's service process after a failure (and its atexit traceback with it)."""
    if "wandb" not in sys.modules:
        return
    try:
        import wandb  # deferred, as everywhere: optional, and a second to import

        wandb.teardown()
    except Exception:
        pass


def redacted(e: BaseException) -> str:
    """An exception as one line, never with the API key in it."""
    line = f"{type(e).__name__}: {first_line(e)}"
    key = os.environ.get("WANDB_API_KEY", "").strip()
    if key and len(key) >= 8:
        line = line.replace(key, "***")
    return line[:240]
