"""Hyperparameter sweeps: one base config, a list of points (each a list of overrides), one run
folder per point.

    lmcore sweep --config tiny --grid optim.lr=1e-3,3e-3 model.hidden_dim=256,512 --dir runs/lr
    lmcore submit sweep --cluster local --config tiny --points points.yaml --dir runs/lr

Points come from a grid (`KEY=V1,V2,...` per axis, their cartesian product, the first axis
varying slowest; a list value is written in brackets, `model.adaptive_cutoffs=[100,200],[500,900]`)
or from a file (`.yaml`/`.yml`: a list of mappings, dotted keys or nested sections; any other
file: one point per line, `key=value ...` as on the command line, `#` comments). Each point runs
in SWEEP_DIR/NAME, NAME made from its own overrides only (`lr-3e-3_hidden_dim-512`: stable,
filesystem-safe, unique; a hash is added where characters had to be replaced), with
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
import itertools
import json
import math
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmcore import fileio
from lmcore.config import Config, load_config
from lmcore.errors import ConfigError, LmcoreError, first_line, write_failed
from lmcore.overrides import normalize
from lmcore.reading import regular_file
from lmcore.schema import leaf_paths
from lmcore.track.report import SWEEP_MANIFEST as MANIFEST

MAX_POINTS = 1000  # checking a point's config takes ~5 ms; more is a typo, or several sweeps
MAX_NAME = 100  # characters of a point's folder name
_SAFE = re.compile(r"[A-Za-z0-9.+-]*")  # what a value may hold and stay as it is in a name
# Keys the sweep sets for every point: not to be varied (run.dir) or kept apart from the names.
_PER_POINT = ("run.dir",)


class SweepError(ConfigError):
    """A grid, points file or sweep folder that cannot make a sweep."""


@dataclass(frozen=True)
class Point:
    name: str  # its folder in SWEEP_DIR
    overrides: tuple[str, ...]  # what this point sets, as command-line overrides
    where: str = ""  # where it was given ("points.yaml:4"); "" for a grid


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
        _not_per_point(text, "the command line")
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


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['optim.lr=1e-3,3e-3', 'model.adaptive_cutoffs=[1,2],[3,4]'] -> [(key, [value, ...]), ...]:
    values split at the commas outside brackets."""
    axes: list[tuple[str, list[str]]] = []
    for raw in normalize(list(items)):
        key, eq, values = raw.partition("=")
        key = key.replace("-", "_")
        if not eq or not key or any(not part for part in key.split(".")) or "." not in key:
            full = [k for k in leaf_paths(Config) if k.rsplit(".", 1)[-1] == key]
            hint = f" (did you mean {full[0]}?)" if full else ""
            raise SweepError(f"grid entry {raw!r} must look like section.key=V1,V2,...{hint}, e.g. "
                             "optim.lr=1e-3,3e-3")
        _not_per_point(f"{key}=", "the grid")
        if any(k == key for k, _ in axes):
            raise SweepError(f"grid key {key} is given twice; give all its values in one entry: "
                             f"{key}=V1,V2,...")
        axes.append((key, split_values(values, raw)))
    return axes


def split_values(text: str, entry: str) -> list[str]:
    """'1e-3,3e-3' -> ['1e-3', '3e-3']; '[1,2],[3,4]' -> ['[1,2]', '[3,4]'] (no split inside brackets)."""
    if not text.strip():
        raise SweepError(f"grid entry {entry!r} has no values: write KEY=V1,V2,...")
    values, start = [], 0
    closing = {"]": "[", "}": "{", ")": "("}
    stack: list[str] = []
    for i, c in enumerate(text):
        if c in "[{(":
            stack.append(c)
        elif c in closing:
            if not stack or stack[-1] != closing[c]:
                raise SweepError(f"grid entry {entry!r} has an unmatched {c!r}")
            stack.pop()
        elif c == "," and not stack:
            values.append(text[start:i])
            start = i + 1
    if stack:
        raise SweepError(f"grid entry {entry!r} has an unclosed {stack[-1]!r}")
    values.append(text[start:])
    values = [v.strip() for v in values]
    if any(not v for v in values):
        raise SweepError(f"grid entry {entry!r} has an empty value (two commas in a row, or one at an end)")
    return values


def grid_points(axes: list[tuple[str, list[str]]], has_base: bool = False) -> list[Point]:
    """The cartesian product of the axes, the first axis varying slowest. No axis (every value
    given once): one point, the base config."""
    count = math.prod(len(vs) for _, vs in axes)
    if count > MAX_POINTS:
        sizes = " x ".join(str(len(vs)) for _, vs in axes)
        raise SweepError(f"the grid makes {count} points ({sizes}), more than {MAX_POINTS}: split it into "
                         "several sweeps")
    if not axes:
        return [Point("base", ())] if has_base else []
    return [_point(tuple(f"{k}={v}" for (k, _), v in zip(axes, combo, strict=True)))
            for combo in itertools.product(*(vs for _, vs in axes))]


def read_points(path: str | Path) -> list[Point]:
    """A points file: YAML (.yaml/.yml, a list of mappings) or one override line per point."""
    p = regular_file(path, "points file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"points file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise SweepError(f"points file {p} cannot be read ({first_line(e)})") from None
    raw = _yaml_points(p, text) if p.suffix.lower() in (".yaml", ".yml") else _line_points(p, text)
    if len(raw) > MAX_POINTS:
        raise SweepError(f"points file {p} holds {len(raw)} points, more than {MAX_POINTS}: split it into "
                         "several sweeps")
    points = []
    for where, overrides in raw:
        seen: dict[str, str] = {}
        for text_ in overrides:
            key = text_.partition("=")[0]
            _not_per_point(text_, where)
            if key in seen:
                raise SweepError(f"points file {where}: {key} is given twice in one point")
            seen[key] = text_
        points.append(_point(tuple(overrides), where))
    return points


def _line_points(path: Path, text: str) -> list[tuple[str, list[str]]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            tokens = normalize(shlex.split(line, comments=True))
        except ValueError as e:  # an unclosed quote; normalize's "needs a value"
            raise SweepError(f"points file {where}: {first_line(e)}") from None
        for t in tokens:
            key = t.partition("=")[0]
            if "=" not in t or "." not in key or any(not part for part in key.split(".")):
                raise SweepError(f"points file {where}: {t!r} must look like section.key=value")
        out.append((where, tokens))
    return out


def _yaml_points(path: Path, text: str) -> list[tuple[str, list[str]]]:
    try:
        doc = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        cause = e.problem or "syntax error"
        raise SweepError(f"points file {path} is not valid YAML: {cause}{pos}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"points file {path} is not valid YAML ({first_line(e)})") from None
    except RecursionError:
        raise SweepError(f"points file {path} nests lists or mappings too deeply") from None
    if doc is None:
        return []
    if not isinstance(doc, yaml.SequenceNode):
        raise SweepError(f"points file {path} must hold a list of mappings, one per point, e.g. "
                         "'- {optim.lr: 1e-3, model.hidden_dim: 256}'")
    out = []
    for node in doc.value:
        where = f"{path}:{node.start_mark.line + 1}"
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null" and not node.value:
            raise SweepError(f"points file {where}: an empty point; write {{}} for the base config")
        if not isinstance(node, yaml.MappingNode):
            raise SweepError(f"points file {where}: a point must be a mapping of keys to values")
        out.append((where, _flatten(node, "", path)))
    return out


def _flatten(node: yaml.MappingNode, prefix: str, path: Path) -> list[str]:
    """A YAML mapping (dotted keys or nested sections) -> overrides 'a.b=text', the text as written."""
    out = []
    for key_node, value in node.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode) or not key_node.value:
            raise SweepError(f"points file {where}: a key must be a plain name")
        key = f"{prefix}{key_node.value}"
        if isinstance(value, yaml.MappingNode):
            out += _flatten(value, f"{key}.", path)
        elif isinstance(value, yaml.SequenceNode):
            items = []
            for item in value.value:
                if not isinstance(item, yaml.ScalarNode):
                    raise SweepError(f"points file {where}: {key} must be a list of plain values")
                items.append(item.value if _SAFE.fullmatch(item.value) else json.dumps(item.value))
            out.append(f"{key}=[{', '.join(items)}]")
        elif value.tag == "tag:yaml.org,2002:null" and value.style is None:
            raise SweepError(f"points file {where}: {key} has no value; write one, or leave the key out")
        else:
            out.append(f"{key}={value.value}")
    return out


def _not_per_point(override: str, where: str) -> None:
    key = override.partition("=")[0]
    if key in _PER_POINT:
        raise SweepError(f"{key} is set by the sweep for each point (SWEEP_DIR/POINT); choose SWEEP_DIR "
                         f"with --dir instead of {key} (in {where})")


# -- names ---------------------------------------------------------------------------------------
def _short_keys() -> dict[str, str]:
    """Dotted key -> its name in folder names: the last part where no other section has it."""
    paths = list(leaf_paths(Config))
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (n if last.count(n) == 1 else p) for p, n in zip(paths, last, strict=True)}


def point_name(overrides: Sequence[str]) -> str:
    """A folder name from a point's overrides: 'lr-3e-3_hidden_dim-512'. Keys never hold '-' and
    values kept as they are never hold '_', so such a name is unique to its overrides; where a
    value had to be changed (characters outside [A-Za-z0-9.+-], lists) or the name is too long,
    8 hex digits of the overrides' sha256 are added."""
    if not overrides:
        return "base"
    short = _short_keys()
    parts, exact = [], True
    for text in overrides:
        key, _, value = text.partition("=")
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):  # a list: its items joined by '+'
            items = [v.strip() for v in split_values(value[1:-1], text)] if value[1:-1].strip() else []
            exact = exact and all(_SAFE.fullmatch(v) and "+" not in v for v in items)
            value = "+".join(items) or "empty"
        if not _SAFE.fullmatch(value) or not value:
            exact = False
            value = re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "x"
        parts.append(f"{short.get(key, key)}-{value}")
    name = "_".join(parts)
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    if len(name) > MAX_NAME:
        return f"{name[:MAX_NAME - 9]}-{digest}"
    return name if exact else f"{name}-{digest}"


def _point(overrides: tuple[str, ...], where: str = "") -> Point:
    return Point(point_name(overrides), overrides, where)


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
