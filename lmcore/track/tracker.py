"""Weights & Biases tracking that can never stop a job: online, offline or off.

`open_tracker(cfg, run_dir, job, enabled)` gives a `Tracker`; every method of it swallows
W&B errors: the first one is reported as one warning line and the tracker turns into a
no-op for the rest of the job. `metrics.jsonl` in the run folder (lmcore.track.metrics) is
written whatever happens here, and `lmcore report RUN_DIR` draws it without W&B.

Mode (`tracking.wandb_mode`; when it is not auto it wins over $WANDB_MODE):
  online / offline / disabled  as asked. online falls back to offline, with one warning
      line, when no API key is configured (at once: wandb is not even asked, so it cannot
      prompt on a terminal) or when wandb.init fails (no network, a bad key): wandb.init
      waits at most $WANDB_INIT_TIMEOUT seconds (default 30) for the server. run.finish()
      waits at most $WANDB_FINISH_TIMEOUT seconds (default 120) for the upload; what is left
      stays in RUN/wandb/run-*/ for `wandb sync --include-online RUN/wandb`.
  auto  $WANDB_MODE when it is set (online, offline, disabled; also dryrun/run, and
      WANDB_DISABLED=true); else online when an API key is configured ($WANDB_API_KEY,
      $WANDB_IDENTITY_TOKEN_FILE or a ~/.netrc / $NETRC entry for the W&B host), else offline
      with a one-line notice. lmcore only checks that a key is there: it never reads,
      prints or writes one.
Only the process that passes enabled=True (rank 0 under DDP) touches W&B at all; a job
prints one line saying where its W&B data goes.

One W&B run per run folder, across requeues. The run id lives in RUN/wandb_run.json
(with the last step sent to W&B); a requeued or resumed `lmcore train` opens the same id
with resume="allow" (online: W&B continues the run, or creates it if it was never
uploaded). The eval job opens that same run too and only adds to its summary; a generate
job makes its own run (job_type "generate", same group) that records the training run's
id in its config as lmcore.train_run_id.

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

Offline runs and requeues. Offline data goes to TRACKING_DIR/wandb/offline-run-<time>-<id>/
(TRACKING_DIR = tracking.dir, default the run folder). Every job that opens the run, each
requeue and each eval, writes its own offline-run-* folder with the same run id. Upload
them all from a machine with network and a key with

    wandb sync RUN/wandb        (or: wandb sync RUN/wandb/offline-run-*)

What wandb 0.31 does with them: `wandb sync` groups the .wandb files of one run id and
uploads them one after another in order of start time (`wandb sync --help`; wandb PR
#10708, "sync multiple instances of the same run (such as resumed runs) sequentially");
each file was written with resume="allow", so each continues the same run; if one of
them fails, the later ones of that run are not uploaded. (With older wandb, users reported
one folder replacing another instead: wandb issue #3841.) The upload itself needs
network and a key, so it is not tested here; what is tested: every segment carries the
same run id, `wandb sync --dry-run RUN/wandb` (no network needed) lists all of them, and
the steps of each segment are all above those of the one before, so the appended history
is monotonic. Sync a run's offline segments before a later job of the same run goes
online, or the older steps arrive after newer ones. A synced .wandb file gets a
.wandb.synced marker and is skipped by the next `wandb sync`.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import secrets
import string
import sys
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lmcore.fileio import atomic_write_json

STATE_FILE = "wandb_run.json"
JOBS = ("train", "eval", "generate")
TABLE_MAX_ROWS = 500  # rows of a W&B table; the full output stays in the job's files
DEFAULT_INIT_TIMEOUT = 30.0
DEFAULT_FINISH_TIMEOUT = 120.0
_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                 "disabled": "disabled"}


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

    @property
    def active(self) -> bool:
        return self._run is not None

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
            import wandb

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
        warnings.warn(f"W&B {what} failed ({_one_line(e)}); W&B tracking is off for the rest of "
                      "this job, metrics.jsonl is still written", stacklevel=3)
        run, self._run = run or self._run, None
        self.mode = "disabled"
        if run is not None and what != "finish":
            # End the run (bounded by finish_timeout online); fails fast if wandb is gone.
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)
        _teardown_quietly()  # wandb's service: nothing is left to wait for

    def _mark_done(self, step: int) -> None:
        if self._state_path is not None and step > self._state.get("last_step", -1):
            self._state["last_step"] = step
            self._save_state()

    def _save_state(self) -> None:
        try:
            atomic_write_json(self._state_path, self._state)
        except OSError as e:
            if not self._state_warned:
                self._state_warned = True
                warnings.warn(f"could not write {self._state_path} ({e.strerror or e}); a requeued job "
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


def open_tracker(cfg, run_dir: str | os.PathLike, job: str, enabled: bool = True) -> Tracker:
    """The tracker for one job on a run folder (job: "train", "eval" or "generate").

    enabled=False (DDP ranks other than 0) gives a no-op tracker without importing wandb.
    Never raises for W&B problems: they warn (one line) and give a no-op tracker.
    """
    if job not in JOBS:
        raise ValueError(f"job must be one of {', '.join(JOBS)}; got {job!r}")
    if not enabled:
        return Tracker()
    try:
        return _open(cfg, Path(run_dir), job)
    except Exception as e:  # whatever wandb does, the job goes on
        warnings.warn(f"W&B could not start ({_one_line(e)}); W&B tracking is off for this job, "
                      "metrics.jsonl is still written", stacklevel=2)
        _teardown_quietly()
        return Tracker()


def resolve_mode(config_mode: str) -> tuple[str, str]:
    """(mode, why): the mode to try first for tracking.wandb_mode, and the reason."""
    if config_mode in ("online", "offline", "disabled"):
        return config_mode, f"tracking.wandb_mode={config_mode}"
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env in _MODE_ALIASES:
            return _MODE_ALIASES[env], f"WANDB_MODE={env}"
        warnings.warn(f"WANDB_MODE={env!r} is not one of online, offline, disabled; ignoring it",
                      stacklevel=3)
    if api_key_configured():
        return "online", "an API key is configured"
    return "offline", "no API key: WANDB_API_KEY or ~/.netrc"


def api_key_configured() -> bool:
    """Whether W&B credentials are set up (without reading or checking the key itself)."""
    if os.environ.get("WANDB_API_KEY", "").strip() or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        entries = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError):
        return False
    hosts = {"api.wandb.ai", urlsplit(_base_url()).netloc}
    return any((auth := entries.authenticators(h)) and auth[2] for h in hosts if h)


def _base_url() -> str:
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    try:
        import wandb

        return str(wandb.Settings().base_url)
    except Exception:
        return "https://api.wandb.ai"


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_state(run_dir: Path) -> dict[str, Any]:
    """RUN/wandb_run.json ({"run_id", "last_step", ...}), or {} if there is none."""
    path = Path(run_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable {path} ({_one_line(e)}); a new W&B run is started",
                      stacklevel=3)
        return {}
    if not isinstance(state, dict) or not isinstance(state.get("run_id"), str) or not state["run_id"]:
        return {}
    if not isinstance(state.get("last_step"), int) or isinstance(state["last_step"], bool):
        state["last_step"] = -1
    return state


def _open(cfg, run_dir: Path, job: str) -> Tracker:
    t = cfg.tracking
    mode, why = resolve_mode(t.wandb_mode)
    if mode == "disabled":
        return Tracker()
    wandb_dir = Path(t.dir) if t.dir else run_dir
    problem = _unwritable(wandb_dir)
    if problem:
        warnings.warn(f"W&B folder {wandb_dir} is not writable ({problem}); W&B tracking is off for this "
                      "job, metrics.jsonl is still written", stacklevel=3)
        return Tracker()
    try:
        import wandb
    except ImportError:
        warnings.warn("wandb is not installed (pip install 'lmcore[wandb]'); W&B tracking is off, "
                      "metrics.jsonl is still written", stacklevel=3)
        return Tracker()

    if mode == "online" and not api_key_configured():  # wandb would fail, or prompt on a terminal
        warnings.warn(f"W&B online asked for ({why}) but no API key is configured (WANDB_API_KEY or "
                      "~/.netrc); logging offline instead", stacklevel=3)
        mode, why = "offline", "no API key for online"

    state = read_state(run_dir)
    owns_state = job != "generate" and (job == "train" or not state)
    name = t.name or run_dir.resolve().name
    if job == "generate":
        name = f"{name}-generate"
    init: dict[str, Any] = {
        "project": t.project or None, "entity": t.entity or None, "group": _group(t.group),
        "tags": list(t.tags) or None, "name": name, "dir": str(wandb_dir),
    }
    if job == "generate":
        run_id = new_run_id()
        config = {**cfg.to_dict(), "lmcore": {"job": job, "train_run_id": state.get("run_id")}}
        init.update(id=run_id, job_type=job, config=config)
    elif state and job == "eval":  # the training run: add to its summary, keep its config
        run_id = state["run_id"]
        init.update(id=run_id, resume="allow")
    else:
        run_id = state.get("run_id") or new_run_id()
        init.update(id=run_id, resume="allow", job_type=job,
                    config={**cfg.to_dict(), "lmcore": {"job": job}})

    run = None
    if mode == "online":
        try:
            run = wandb.init(mode="online", settings=_settings(wandb, online=True), **init)
        except Exception as e:
            _teardown_quietly()  # frees the run id for the offline attempt
            warnings.warn(f"W&B online start failed ({_one_line(e)}); logging offline instead",
                          stacklevel=3)
            mode, why = "offline", "online start failed"
    if run is None:
        run = wandb.init(mode="offline", settings=_settings(wandb, online=False), **init)

    floor = -1
    if job != "generate":
        try:  # online: the server's next step after a resume (0 offline)
            server_next = int(getattr(run, "starting_step", 0) or 0)
        except Exception:
            server_next = 0
        floor = max(state.get("last_step", -1), server_next - 1)
    state_path = None
    if owns_state:
        state = {**state, "run_id": run_id, "project": t.project, "entity": t.entity,
                 "last_step": max(floor, state.get("last_step", -1))}
        state_path = run_dir / STATE_FILE
    tracker = Tracker(run, mode, run_id, state_path, state, floor)
    if state_path is not None:
        tracker._save_state()
    if mode == "online":
        try:
            where = run.url or f"{t.project}/{run_id}"
        except Exception:
            where = f"{t.project}/{run_id}"
        _notice(f"W&B run {where} ({job})")
    else:
        _notice(f"W&B offline ({why}): run {run_id} ({job}) in {wandb_dir / 'wandb'}; "
                f"upload later with: wandb sync {wandb_dir / 'wandb'}")
    return tracker


def _settings(wandb, online: bool):
    values: dict[str, Any] = {"silent": True, "console": "off", "reinit": "create_new"}
    if online:
        values["init_timeout"] = _env_seconds("WANDB_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT)
        values["finish_timeout"] = _env_seconds("WANDB_FINISH_TIMEOUT", DEFAULT_FINISH_TIMEOUT)
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is not None:  # older wandb: leave out what it does not know
        values = {k: v for k, v in values.items() if k in fields}
    return wandb.Settings(**values)


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


def _group(configured: str) -> str | None:
    """tracking.group; else $WANDB_RUN_GROUP (wandb reads it); else the SLURM array's job id."""
    if configured:
        return configured
    if os.environ.get("WANDB_RUN_GROUP"):
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"slurm-array-{array}" if array else None


def _unwritable(folder: Path) -> str | None:
    """Why W&B could not write into folder, or None. (wandb itself would silently fall
    back to the system temp folder, where offline runs get lost on cluster nodes.)"""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".wandb-probe-{os.getpid()}-{time.monotonic_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def _teardown_quietly() -> None:
    """Stop wandb's service process after a failure (and its atexit traceback with it)."""
    if "wandb" not in sys.modules:
        return
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


def _notice(text: str) -> None:
    print(f"lmcore: {text}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    line = f"{type(e).__name__}: {first}" if first else type(e).__name__
    key = os.environ.get("WANDB_API_KEY", "").strip()
    if key and len(key) >= 8:
        line = line.replace(key, "***")
    return line[:240]
