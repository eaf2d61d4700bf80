"""Hyperparameter sweeps: one base config, a list of points (each a list of overrides), one run
folder per point.

    lmcore sweep --config tiny --grid optim.lr=1e-3,3e-3 model.hidden_dim=256,512 --dir runs/lr
    lmcore submit sweep --cluster local --config tiny --points points.yaml --dir runs/lr

The points and their names: lmcore.points. Each point runs in SWEEP_DIR/NAME with
tracking.group = the sweep's name (SWEEP_DIR's) unless the config or the overrides set one.
Every point's config is built with lmcore.config.load_config before anything runs or is
submitted, so a bad key or value is the config's own one-line error and nothing is written.
SWEEP_DIR/sweep.json (written atomically) lists the points.

Points run one after another here (`run_sweep`, through lmcore.jobs.run_job: a finished point
resumes to nothing) or as one SLURM array (lmcore.slurm.submit.plan, kind "sweep").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcore import fileio
from lmcore.config import Config, load_config
from lmcore.errors import LmcoreError, write_failed
from lmcore.points import (
    Point,
    SweepError,
    grid_points,
    not_per_point,
    parse_grid,
    read_points,
)
from lmcore.track.compare import SWEEP_MANIFEST as MANIFEST


@dataclass
class Sweep:
    """A base config (file + overrides common to every point), its points, and the folder they run in."""

    dir: Path
    config: str | None
    overrides: list[str]
    points: list[Point]
    group: str = ""  # tracking.group the sweep sets on every point ("" = the user set their own)
    configs: list[Config] = field(default_factory=list, repr=False)  # each point's, checked

    @property
    def name(self) -> str:
        return self.dir.name

    def run_dir(self, point: Point) -> Path:
        return self.dir / point.name

    def point_overrides(self, point: Point) -> list[str]:
        """What load_config gets for a point: the sweep's group first (the user's own wins), the
        common overrides, the point's, and its run folder."""
        group = [f"tracking.group={self.group}"] if self.group else []
        return [*group, *self.overrides, *point.overrides, f"run.dir={self.run_dir(point)}"]

    def manifest(self) -> dict[str, Any]:
        return {"sweep": self.name, "config": self.config, "overrides": list(self.overrides),
                "group": self.group or None,
                "points": [{"name": p.name, "overrides": list(p.overrides), "run_dir": str(self.run_dir(p))}
                           for p in self.points]}


# -- building a sweep ----------------------------------------------------------------------------
def build(config: str | None, overrides: Sequence[str], grid: Sequence[str] = (),
          points_file: str | None = None, sweep_dir: str | None = None) -> Sweep:
    """A sweep with every point's config checked; raises LmcoreError (one line) on bad input,
    having written nothing."""
    overrides = list(overrides)
    for text in overrides:
        not_per_point(text, "the command line")
    base = load_config(config, overrides)  # the common part's errors, before any point's
    if grid and points_file:
        raise SweepError("give the points either as --grid or as --points FILE, not both")
    if points_file:
        points = read_points(points_file)
    else:
        axes = parse_grid(grid)
        constant = [f"{k}={vs[0]}" for k, vs in axes if len(vs) == 1]  # an axis of one value: common
        overrides += constant
        points = grid_points([(k, vs) for k, vs in axes if len(vs) > 1], bool(constant))
    if not points:
        raise SweepError("the sweep has no points: give --grid KEY=V1,V2 ... or --points FILE")
    folder = Path(sweep_dir) if sweep_dir else Path("runs") / default_name(config, overrides, points)
    _check_folder(folder)
    sweep = Sweep(folder, config, overrides, points, "" if base.tracking.group else folder.name)
    sweep.configs = [_point_config(sweep, p) for p in points]
    _no_duplicates(sweep)
    return sweep


def default_name(config: str | None, overrides: Sequence[str], points: Sequence[Point]) -> str:
    """'sweep-tiny-1a2b3c4d': the config's name and a digest of the whole sweep (the same command
    gives the same folder, so a rerun resumes it)."""
    stem = Path(config).stem if config else "defaults"
    stem = re.sub(r"[^A-Za-z0-9.+-]+", "-", stem).strip("-.") or "config"
    spec = json.dumps([config, list(overrides), [list(p.overrides) for p in points]])
    return f"sweep-{stem}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


# -- checks --------------------------------------------------------------------------------------
def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise SweepError(f"sweep folder {folder} is a file, not a folder; pass another --dir")
    manifest = folder / MANIFEST
    if manifest.exists() and not manifest.is_file():
        raise SweepError(f"sweep folder {folder} holds {MANIFEST} as something other than a file: move it "
                         "away, or pass another --dir")
    if not folder.name or folder.name in (".", ".."):
        raise SweepError(f"sweep folder {str(folder)!r} has no name (the W&B group): pass --dir PATH/NAME")


def _point_config(sweep: Sweep, point: Point) -> Config:
    try:
        return load_config(sweep.config, sweep.point_overrides(point))
    except LmcoreError as e:
        if point.where:  # the config's message names the override; say which line of the file
            raise type(e)(f"points file {point.where}: {e}") from None
        raise


def _no_duplicates(sweep: Sweep) -> None:
    """Two points that resolve to the same config (1e-3 and 0.001) would train the same model twice."""
    seen: dict[str, Point] = {}
    for point, cfg in zip(sweep.points, sweep.configs, strict=True):
        data = cfg.to_dict()
        data["run"].pop("dir")
        key = json.dumps(data, sort_keys=True)
        if key in seen:
            first = seen[key]
            raise SweepError(f"points {' '.join(first.overrides) or 'base'} and "
                             f"{' '.join(point.overrides) or 'base'} give the same config: drop one")
        seen[key] = point
    names = [p.name for p in sweep.points]
    if len(set(names)) != len(names):  # cannot happen (see point_name); refuse rather than share a folder
        dup = next(n for n in names if names.count(n) > 1)
        raise SweepError(f"two points would share the folder {dup}: make their overrides differ")


# -- the manifest --------------------------------------------------------------------------------
def write_manifest(sweep: Sweep) -> Callable[[], None]:
    """SWEEP_DIR/sweep.json, atomically. Returns what undoes it if nothing runs after all (an
    sbatch refusal): the file and the folder removed if this call created them."""
    path = sweep.dir / MANIFEST
    made_dir, had_file = not sweep.dir.exists(), path.exists()
    try:
        fileio.make_dir(sweep.dir)
        fileio.atomic_write_json(path, sweep.manifest())
    except OSError as e:
        _undo(sweep.dir, path, made_dir, had_file)
        raise LmcoreError(write_failed(path, e, "nothing was run or submitted",
                                       "run the same command again (or pass --dir with another folder)",
                                       sweep.dir)) from None
    return lambda: _undo(sweep.dir, path, made_dir, had_file)


def _undo(folder: Path, path: Path, made_dir: bool, had_file: bool) -> None:
    if not had_file:
        path.unlink(missing_ok=True)
    if made_dir:
        with contextlib.suppress(OSError):  # not empty (or gone): leave it
            folder.rmdir()


# -- running it here -----------------------------------------------------------------------------
@dataclass
class PointResult:
    point: Point
    run_dir: Path
    result: dict[str, Any] | None = None  # what the training job reported
    error: str = ""  # a failed point (with keep_going)
    stopped: bool = False  # a stop request: rerun the sweep to resume


def run_sweep(sweep: Sweep, stop_requested: Callable[[], bool] = lambda: False, progress: bool = True,
              keep_going: bool = False, announce: Callable[[str], None] = lambda line: None
              ) -> Iterator[PointResult]:
    """Train each point in turn in this process, through the one dispatcher. A finished point
    resumes to nothing; a stop request ends the sweep after the point it stopped (checkpointed).
    A failing point raises, or with keep_going is reported and the next one runs."""
    from lmcore.jobs import run_job  # deferred: torch (1.5 s) only when a point trains

    total = len(sweep.points)
    for i, (point, cfg) in enumerate(zip(sweep.points, sweep.configs, strict=True), 1):
        run_dir = sweep.run_dir(point)
        if stop_requested():
            yield PointResult(point, run_dir, stopped=True)
            return
        announce(f"sweep point {i}/{total}: {point.name} ({' '.join(point.overrides) or 'the base config'})")
        try:
            outcome = run_job("train", cfg, stop_requested, progress)
        except LmcoreError as e:
            if not keep_going:
                raise type(e)(f"sweep point {point.name}: {e}") from None
            yield PointResult(point, run_dir, error=str(e))
            continue
        yield PointResult(point, run_dir, outcome.result, stopped=outcome.stopped)
        if outcome.stopped:
            return
