"""W&B runs opened for lmcore's jobs: which mode, which run id, where the files go.

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

import json
import math
import netrc
import os
import secrets
import string
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lmcore import fileio
from lmcore.errors import first_line
from lmcore.rundir import RunDir
from lmcore.slurm.env import array_job_id
from lmcore.track.tracker import Tracker, redacted, teardown_quietly

JOBS = ("train", "eval", "generate")
DEFAULT_INIT_TIMEOUT = 30.0
DEFAULT_FINISH_TIMEOUT = 120.0
_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                 "disabled": "disabled"}


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
        warnings.warn(f"W&B could not start ({redacted(e)}); W&B tracking is off for this job, "
                      "metrics.jsonl is still written", stacklevel=2)
        teardown_quietly()
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
        import wandb  # deferred, as everywhere: optional, and a second to import

        return str(wandb.Settings().base_url)
    except Exception:
        return "https://api.wandb.ai"


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_state(run_dir: Path) -> dict[str, Any]:
    """RUN/wandb_run.json ({"run_id", "last_step", ...}), or {} if there is none."""
    path = RunDir(run_dir).wandb_state
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable {path} ({redacted(e)}); a new W&B run is started",
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
    wandb = _import_wandb(wandb_dir)
    if wandb is None:
        return Tracker()
    if mode == "online" and not api_key_configured():  # wandb would fail, or prompt on a terminal
        warnings.warn(f"W&B online asked for ({why}) but no API key is configured (WANDB_API_KEY or "
                      "~/.netrc); logging offline instead", stacklevel=3)
        mode, why = "offline", "no API key for online"
    state = read_state(run_dir)
    run_id, init = _init_args(cfg, run_dir, job, state, wandb_dir)
    run, mode, why = _start(wandb, mode, why, init)
    floor = -1 if job == "generate" else _floor(run, mode, state, wandb_dir, run_id)
    state_path = None
    if job == "train" or (job == "eval" and not state):  # the jobs that own the run folder's id
        state = {**state, "run_id": run_id, "project": t.project, "entity": t.entity, "last_step": floor}
        state_path = RunDir(run_dir).wandb_state
    tracker = Tracker(run, mode, run_id, state_path, state, floor)
    if state_path is not None:
        tracker._save_state()
    _announce(run, mode, why, run_id, job, t.project, wandb_dir)
    return tracker


def _floor(run, mode: str, state: dict, wandb_dir: Path, run_id: str) -> int:
    """The last step W&B already holds for this run: rows up to it are not sent again, rows after
    it are (metrics.jsonl's rows are replayed when a run resumes, see lmcore.track.metrics).

    Online, the server says (its next step). Offline, the earlier segments' own files say: a job
    stopped by SIGTERM takes wandb's service down with it (slurmstepd signals every process of the
    step), and the rows the service had not flushed yet are lost from that segment; counting them
    as sent would lose them for good. When the files cannot be read, wandb_run.json's last step."""
    if mode == "online":
        try:
            return int(getattr(run, "starting_step", 0) or 0) - 1
        except Exception:
            return state.get("last_step", -1)
    written = last_written_step(wandb_dir, run_id)
    return state.get("last_step", -1) if written is None else written


def last_written_step(wandb_dir: Path, run_id: str, timeout_s: float = 60.0) -> int | None:
    """The highest history step in this run's offline segments under wandb_dir (-1: none), read
    with wandb's own reader (`wandb leet inspect --json`); None when it cannot be read."""
    files = sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"), reverse=True)
    for path in files:
        try:
            proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                                  capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0 and not proc.stdout:
            return None
        steps = [json.loads(line).get("history", {}).get("item", {}).get("_step")
                 for line in proc.stdout.splitlines() if '"history"' in line]
        steps = [int(s) for s in steps if isinstance(s, (int, float))]
        if steps:
            return max(steps)
    return -1


def _import_wandb(wandb_dir: Path):
    """The wandb module, or None (with one warning) when it is missing or cannot write."""
    problem = _unwritable(wandb_dir)
    if problem:
        warnings.warn(f"W&B folder {wandb_dir} is not writable ({problem}); W&B tracking is off for this "
                      "job, metrics.jsonl is still written", stacklevel=4)
        return None
    try:
        import wandb  # deferred: a second to import, and optional
    except ImportError:
        warnings.warn("wandb is not installed (pip install 'lmcore[wandb]'); W&B tracking is off, "
                      "metrics.jsonl is still written", stacklevel=4)
        return None
    return wandb


def _init_args(cfg, run_dir: Path, job: str, state: dict, wandb_dir: Path) -> tuple[str, dict[str, Any]]:
    """(run id, wandb.init's arguments) for this job: train continues the run folder's run, eval
    adds to its summary, generate makes its own run that names the training run."""
    t = cfg.tracking
    name = t.name or run_dir.resolve().name
    init: dict[str, Any] = {
        "project": t.project or None, "entity": t.entity or None, "group": _group(t.group),
        "tags": list(t.tags) or None, "name": f"{name}-generate" if job == "generate" else name,
        "dir": str(wandb_dir),
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
        init.update(id=run_id, resume="allow", job_type=job, config={**cfg.to_dict(), "lmcore": {"job": job}})
    return run_id, init


def _start(wandb, mode: str, why: str, init: dict[str, Any]):
    """(run, mode, why): online if asked and possible, else offline."""
    if mode == "online":
        try:
            return wandb.init(mode="online", settings=_settings(wandb, online=True), **init), mode, why
        except Exception as e:
            teardown_quietly()  # frees the run id for the offline attempt
            warnings.warn(f"W&B online start failed ({redacted(e)}); logging offline instead", stacklevel=4)
            mode, why = "offline", "online start failed"
    return wandb.init(mode="offline", settings=_settings(wandb, online=False), **init), mode, why


def _announce(run, mode: str, why: str, run_id: str, job: str, project: str, wandb_dir: Path) -> None:
    if mode == "online":
        try:
            where = run.url or f"{project}/{run_id}"
        except Exception:
            where = f"{project}/{run_id}"
        _notice(f"W&B run {where} ({job})")
    else:
        _notice(f"W&B offline ({why}): run {run_id} ({job}) in {wandb_dir / 'wandb'}; "
                f"upload later with: wandb sync {wandb_dir / 'wandb'}")


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
    array = array_job_id()
    return f"slurm-array-{array}" if array else None


def _unwritable(folder: Path) -> str | None:
    """Why W&B could not write into folder, or None. (wandb itself would silently fall
    back to the system temp folder, where offline runs get lost on cluster nodes.)"""
    try:
        fileio.make_dir(folder)
        probe = folder / f".wandb-probe-{os.getpid()}-{time.monotonic_ns()}"
        fileio.atomic_write_bytes(probe, b"")
        probe.unlink()
    except OSError as e:
        return first_line(e)
    return None


def _notice(text: str) -> None:  # one line on stderr, as warnings are
    print(f"lmcore: {text}", file=sys.stderr, flush=True)
