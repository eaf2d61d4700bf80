"""`lmcore report --compare RUN...`: several runs side by side, from their metrics.jsonl.

Writes into OUT (default: the runs' common parent folder/compare; a sweep folder stands for its
points, in its order):
  compare.png  validation perplexity against step and against training time, a line per run
  compare.md   a table of the runs sorted by best validation masked perplexity, lowest first
               (runs without validation rows last, said as such)
The figures are the training job's validation rows (val/ppl in metrics.jsonl), never the test
results of `lmcore eval`; the table names each run's validation split (from its config.yaml)
and warns when the runs were validated on different reviews.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmcore.errors import LmcoreError, first_line
from lmcore.reading import json_value
from lmcore.rundir import RunDir
from lmcore.track.report import (
    _duration,
    _figure,
    _finite,
    _fmt,
    _log_axis,
    _png,
    _publish,
    _rows,
    _Series,
    _time,
)

SWEEP_MANIFEST = "sweep.json"  # what lmcore.sweep writes into a sweep's folder: its points
_POINT_NAME = re.compile(r"[A-Za-z0-9._+-]+")
COLORS = 10  # the best runs get a colour and a legend entry; the others are grey lines
_NOT_DIFFERENCES = ("run.dir", "tracking.")  # config keys that differ between any two runs


@dataclass
class _Run:
    path: Path
    overrides: list[str] | None  # the sweep point's, or None (then: what differs in config.yaml)
    data: _Series | None = None  # None: no metrics.jsonl (yet)
    config: dict[str, Any] = field(default_factory=dict)  # config.yaml, flattened ({}: none)
    label: str = ""

    @property
    def best(self) -> tuple[int, float] | None:
        return self.data.best("val/ppl") if self.data else None


def sweep_manifest(folder: Path, strict: bool = True) -> dict[str, Any] | None:
    """FOLDER/sweep.json (a sweep's points), or None where there is none. A damaged one is an
    error when strict, else taken as none."""
    path = Path(folder) / SWEEP_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json_value(path.read_bytes())
        points = manifest["points"]
        if not isinstance(points, list) or not all(
                isinstance(p, dict) and isinstance(p.get("name"), str) and _POINT_NAME.fullmatch(p["name"])
                and p["name"] not in (".", "..") and isinstance(p.get("overrides"), list)
                and all(isinstance(o, str) for o in p["overrides"]) for p in points):
            raise ValueError("its points are not a list of names with overrides")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not strict:
            return None
        raise LmcoreError(f"{path} is not a sweep manifest lmcore can read ({first_line(e)}); pass the run "
                          "folders themselves") from None
    return manifest


def write_compare(runs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> str:
    """compare.png and compare.md for runs (run folders; a sweep folder stands for its points);
    returns the path of compare.md."""
    found = _compared_runs(runs)
    for run in found:
        metrics = RunDir(run.path).metrics
        if metrics.is_file():
            run.data = _Series(_rows(metrics))
        run.config = _flat_config(run.path)
    _label(found)
    _differences(found)
    found.sort(key=_rank)
    out_dir = Path(out) if out else _common_parent(found) / "compare"
    files: dict[str, bytes] = {}
    fig = _draw(found)
    if fig is not None:
        files["compare.png"] = _png(fig)
    files["compare.md"] = _markdown(found, "compare.png" in files).encode()
    _publish(files, out_dir, "the comparison", "the runs are untouched")
    return str(out_dir / "compare.md")


def _compared_runs(paths: list[str | os.PathLike]) -> list[_Run]:
    runs: list[_Run] = []
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise LmcoreError(f"{p} does not exist; pass run folders (run.dir) or a sweep folder")
        if not p.is_dir():
            raise LmcoreError(f"{p} is not a folder; pass run folders (run.dir) or a sweep folder")
        manifest = sweep_manifest(p) if not RunDir(p).metrics.exists() else None
        if manifest is not None:  # a sweep: its points, in its order
            runs += [_Run(p / pt["name"], list(pt["overrides"])) for pt in manifest["points"]]
            continue
        # a point named on its own still shows its overrides, from its sweep's manifest
        parent = sweep_manifest(p.resolve().parent, strict=False) or {"points": []}
        point = next((pt for pt in parent["points"] if pt["name"] == p.resolve().name), None)
        runs.append(_Run(p, list(point["overrides"]) if point else None))
    unique: dict[Path, _Run] = {}
    for run in runs:
        unique.setdefault(run.path.resolve(), run)
    return list(unique.values())


def _label(runs: list[_Run]) -> None:
    names = [r.path.resolve().name for r in runs]
    for run, name in zip(runs, names, strict=True):
        run.label = name if names.count(name) == 1 else str(run.path)


def _differences(runs: list[_Run]) -> None:
    """For runs that are not sweep points: the config keys whose values differ between the runs."""
    configs = [r.config for r in runs if r.config]  # runs not started have none
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if not k.startswith(_NOT_DIFFERENCES)
              and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    for run in runs:
        if run.overrides is None:
            run.overrides = [f"{k}={_plain(run.config[k])}" for k in differ if k in run.config]


def _flat_config(run_dir: Path) -> dict[str, Any]:
    """RUN/config.yaml as {'optim.lr': 0.001, ...}; {} where there is none or it cannot be read
    (a comparison of what can be read beats none)."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return {}
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    if isinstance(data, dict):
        walk(data, "")
    return out


def _plain(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_plain(x) for x in v) + "]"
    return str(v)


def _nth(n: Any) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return "?"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def validation_split(config: dict[str, Any]) -> str:
    """Which reviews a run validated on, in words: 'test, every 10th review'."""
    if not config:
        return "unknown (no config.yaml)"
    if "data.val_split" not in config:
        return "unknown"
    split = config["data.val_split"]
    if not split:
        return "none"
    stride, limit = config.get("data.val_stride", 1), config.get("data.val_limit", 0)
    text = str(split)
    if split == "holdout":
        text = f"holdout (every {_nth(config.get('data.holdout_every'))} review of " \
               f"{config.get('data.train_split', 'train')})"
    if stride != 1:
        text += f", every {_nth(stride)} review"
    if isinstance(limit, int) and limit > 0:
        text += f", at most {limit}"
    return text


def _rank(run: _Run) -> tuple[int, float]:
    best = run.best
    if best is not None:
        return (0, best[1])
    return (1, 0.0) if run.data is not None else (2, 0.0)


def _common_parent(runs: list[_Run]) -> Path:
    parents = [str(r.path.absolute().parent) for r in runs]
    return Path(os.path.commonpath(parents)) if parents else Path.cwd()


def _val_points(data: _Series) -> tuple[list[int], list[float], list[float]]:
    """(steps, training seconds, validation perplexity) of the validation rows; nan seconds where
    a row has none."""
    steps, secs, ppl = [], [], []
    for r in data.rows:
        v, t = r.get("val/ppl"), r.get("train_seconds")
        if _finite(v) and v > 0:
            steps.append(r["step"])
            secs.append(float(t) if _time(t) and t >= 0 else math.nan)
            ppl.append(float(v))
    return steps, secs, ppl


def _draw(runs: list[_Run]):
    drawn = [r for r in runs if r.data is not None and _val_points(r.data)[0]]
    if not drawn:
        return None
    fig, (by_step, by_time) = _figure(2)
    span = max((t for r in drawn for t in _val_points(r.data)[1] if t == t), default=0.0)
    scale, unit = (3600.0, "hours") if span >= 3 * 3600 else (60.0, "minutes") if span >= 3 * 60 else (
        1.0, "seconds")
    for i, run in reversed(list(enumerate(drawn))):  # the best drawn last, on top
        steps, secs, ppl = _val_points(run.data)
        coloured = i < COLORS
        kw = {"color": f"C{i}" if coloured else "#bbbbbb", "linewidth": 1.5 if coloured else 0.8,
              "markersize": 3, "label": run.label if coloured else None, "zorder": 3 if coloured else 2}
        by_step.plot(steps, ppl, "-o", **kw)
        timed = [(t / scale, v) for t, v in zip(secs, ppl, strict=True) if t == t]
        if timed:
            by_time.plot([t for t, _ in timed], [v for _, v in timed], "-o", **kw)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel(f"training time, optimizer steps only ({unit})")
    for ax in (by_step, by_time):
        ax.set_ylabel("validation masked perplexity")
        _log_axis(ax)
        ax.grid(True, which="major", alpha=0.3)
    by_step.set_title("validation perplexity against step")
    by_time.set_title("validation perplexity against training time")
    handles, labels = by_step.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda j: [r.label for r in drawn].index(labels[j]))
    title = "best first" if len(drawn) <= COLORS else f"best {COLORS} of {len(drawn)}"
    fig.legend([handles[j] for j in order], [labels[j] for j in order], loc="outside right upper",
               fontsize="small", title=title)
    return fig


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _figures(run: _Run) -> list[str]:
    """The table's figures for one run, from its validation rows (never test results)."""
    if run.data is None:
        return ["no metrics.jsonl yet", "–", "–", "–", "–"]
    best, data = run.best, run.data
    last = data.last("val/ppl")
    tokens, secs = data.last("tokens_seen"), data.last("train_seconds")
    return [_fmt(best[1]) if best else "no validation rows", str(best[0]) if best else "–",
            f"{_fmt(last[1])} (step {last[0]})" if last else "–",
            f"{int(tokens[1]):,}" if tokens else "–", _duration(secs[1]) if secs else "–"]


def _markdown(runs: list[_Run], image: bool) -> str:
    lines = [f"# Comparison of {len(runs)} run(s)", "",
             "Sorted by best validation masked perplexity, lowest first: the training job's validation "
             "rows (`val/ppl` in metrics.jsonl) on the split in the column *validation split*, not the "
             "test results of `lmcore eval`. Runs without validation rows last.", ""]
    splits = {validation_split(r.config) for r in runs if r.best is not None}
    if len(splits) > 1:
        lines += ["**The runs were validated on different reviews** (see *validation split*): their "
                  "perplexities are not comparable.", ""]
    lines += ["![validation perplexity](compare.png)" if image else
              "No validation rows in any run: nothing to plot.", ""]
    columns = ["#", "run", "overrides", "best val ppl", "at step", "last val ppl", "train tokens",
               "training time", "validation split"]
    lines += ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    for i, run in enumerate(runs, 1):
        overrides = " ".join(f"`{_cell(o)}`" for o in run.overrides or []) or "–"
        cells = [str(i), _cell(run.label), overrides, *_figures(run), _cell(validation_split(run.config))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)
