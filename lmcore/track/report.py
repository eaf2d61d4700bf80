"""`lmcore report RUN_DIR`: curves and a summary from metrics.jsonl, no W&B needed.

Writes into OUT (default RUN_DIR/report):
  loss.png        train and validation loss against optimizer step and against wall time
  perplexity.png  the same for perplexity (log scale; validation = masked perplexity)
  training.png    learning rate, gradient norm and tokens/s against step (when logged)
  report.md       a short summary (final and best figures, checkpoints, eval results)
`lmcore report --compare RUN...` (write_compare) writes into OUT (default: the runs' common parent
folder/compare; a sweep folder stands for its points):
  compare.png     validation perplexity against step and against training time, a line per run
  compare.md      a table of the runs sorted by best validation perplexity (runs without
                  validation rows last, said as such)
Wall time is the clock time since the run's first logged row, time spent waiting for a
requeue included; the summary also gives the pure training time (train_seconds).
What no trainer writes is left out, not drawn: rows without a step in 0 .. 2^63-1, values that
are not finite numbers or beyond +-1e100, times beyond +-1e11 s (year 5000), and values <= 0
on a log axis.
matplotlib is imported only when drawing, with the Agg backend (no display needed).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmcore import fileio
from lmcore.errors import LmcoreError, first_line, write_failed
from lmcore.reading import json_value
from lmcore.rundir import RunDir
from lmcore.track.metrics import read_metrics

TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#d62728"
MAX_VALUE = 1e100  # beyond this a logged figure is damage, not a measurement (and breaks axis arithmetic)
MAX_TIME = 1e11  # seconds of Unix time: the year 5138


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Draw the PNGs and write report.md; returns the path of report.md."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir).metrics
    if not path.is_file():
        hint = " (no such folder)" if not run_dir.exists() else ""
        raise LmcoreError(f"{run_dir}{hint} has no metrics.jsonl; pass a run folder that a training "
                          "job has written (run.dir)")
    rows = _rows(path)
    if not rows:
        raise LmcoreError(f"{path} has no metrics rows yet; train for at least train.log_interval steps "
                          "and try again")
    out_dir = Path(out) if out else RunDir(run_dir).report
    data = _Series(rows)
    files: dict[str, bytes] = {}
    for name, draw in (("loss.png", _draw_loss), ("perplexity.png", _draw_ppl),
                       ("training.png", _draw_training)):
        fig = draw(data)
        if fig is not None:
            files[name] = _png(fig)
    files["report.md"] = _summary_markdown(run_dir, data, [n for n in files if n.endswith(".png")]).encode()
    _publish(files, out_dir, "the report", "metrics.jsonl is untouched")
    return str(out_dir / "report.md")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _publish(files: dict[str, bytes], out_dir: Path, what: str, kept: str) -> None:
    """All files appear together: written aside first, then renamed into place."""
    tmp = None
    try:
        tmp = fileio.new_temp_dir(out_dir.parent, prefix=f".{out_dir.name}-")
        for name, data_bytes in files.items():
            fileio.write_new(tmp / name, data_bytes)
        fileio.publish_files(tmp, out_dir)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise LmcoreError(write_failed(f"{what} in {out_dir}", e, kept,
                                       "run it again (or pass --out with another folder)", out_dir)) from None


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        return [r for r in read_metrics(path, tolerant=True) if _step(r.get("step"))]
    except (OSError, UnicodeDecodeError) as e:
        raise LmcoreError(f"cannot read {path} ({first_line(e)}); pass a run folder whose metrics.jsonl is "
                          "readable") from None


class _Series:
    """Columns of metrics.jsonl: per key, (step, wall seconds since start, value) points."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows
        times = [r["time"] for r in rows if _time(r.get("time"))]
        self.t0 = min(times) if times else None
        self.events = [r for r in rows if r.get("event")]

    def points(self, key: str, positive: bool = False) -> tuple[list[int], list[float], list[float]]:
        steps, walls, values = [], [], []
        for r in self.rows:
            v = r.get(key)
            if not _finite(v) or (positive and v <= 0):
                continue
            steps.append(r["step"])
            t = r.get("time")
            walls.append((t - self.t0) if _time(t) and self.t0 is not None else math.nan)
            values.append(float(v))
        return steps, walls, values

    def has(self, key: str) -> bool:
        return bool(self.points(key)[0])

    def last(self, key: str) -> tuple[int, float] | None:
        steps, _, values = self.points(key)
        return (steps[-1], values[-1]) if steps else None

    def best(self, key: str) -> tuple[int, float] | None:
        steps, _, values = self.points(key)
        if not steps:
            return None
        i = min(range(len(values)), key=values.__getitem__)
        return steps[i], values[i]


def _finite(v: Any) -> bool:
    """A number a trainer could have logged: not a bool, not NaN or infinite, within +-MAX_VALUE
    (compared first: math.isfinite of a 400-digit integer overflows)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= MAX_VALUE


def _time(v: Any) -> bool:
    return _finite(v) and abs(v) <= MAX_TIME


def _step(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 63


# --- figures --------------------------------------------------------------------------


def _figure(ncols: int, width: float = 6.0, height: float = 4.2):
    # deferred: matplotlib is optional and slow to import; Agg via savefig, never pyplot, never a display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _time_axis(data: _Series) -> tuple[float, str]:
    walls = [r["time"] - data.t0 for r in data.rows if _time(r.get("time")) and data.t0 is not None]
    span = max(walls, default=0.0)
    if span >= 3 * 3600:
        return 3600.0, "hours"
    if span >= 3 * 60:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _draw_pair(data: _Series, train_key: str, val_key: str, ylabel: str, title: str, log: bool):
    if not (data.points(train_key, positive=log)[0] or data.points(val_key, positive=log)[0]):
        return None
    fig, (by_step, by_time) = _figure(2)
    scale, unit = _time_axis(data)
    for key, label, color, style in ((train_key, "train", TRAIN_COLOR, "-"),
                                     (val_key, "validation", VAL_COLOR, "-o")):
        steps, walls, values = data.points(key, positive=log)
        if not steps:
            continue
        kw = {"color": color, "label": label, "markersize": 4, "linewidth": 1.5}
        by_step.plot(steps, values, style, **kw)
        by_time.plot([w / scale for w in walls], values, style, **kw)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel(f"wall time since the first logged row ({unit})")
    for ax in (by_step, by_time):
        ax.set_ylabel(ylabel)
        if log:
            _log_axis(ax)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    by_step.set_title(f"{title} against step")
    by_time.set_title(f"{title} against wall time")
    return fig


def _log_axis(ax) -> None:
    """A log y axis labelled 20, 50, 300 rather than 2x10^1."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_loss(data: _Series):
    return _draw_pair(data, "train/loss", "val/loss", "loss (nats per target token)", "loss", log=False)


def _draw_ppl(data: _Series):
    return _draw_pair(data, "train/ppl", "val/ppl", "masked perplexity", "perplexity", log=True)


def _draw_training(data: _Series):
    panels = [(k, label) for k, label in (("lr", "learning rate"), ("grad_norm", "gradient norm"),
                                          ("tokens_per_s", "tokens / s")) if data.has(k)]
    if not panels:
        return None
    fig, axes = _figure(len(panels), width=4.5)
    for ax, (key, label) in zip(axes, panels, strict=True):
        steps, _, values = data.points(key)
        ax.plot(steps, values, "-", color=TRAIN_COLOR, linewidth=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    return fig


# --- summary --------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 4) -> str:
    if not _finite(v):
        return "–"
    if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:#.{digits}g}"


def _duration(seconds: float) -> str:
    if not _finite(seconds):
        return "–"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _summary_markdown(run_dir: Path, data: _Series, images: list[str]) -> str:
    lines = [f"# Run report: {run_dir.resolve().name}", "",
             f"Run folder `{run_dir}`, {len(data.rows)} rows of `metrics.jsonl`.", ""]
    table = []
    last_step = max(r["step"] for r in data.rows)
    table.append(("last logged step", str(last_step)))
    finals = (("train/loss", "final train loss"), ("train/ppl", "final train perplexity"),
              ("val/loss", "final validation loss"), ("val/ppl", "final validation masked perplexity"))
    for key, label in finals:
        last = data.last(key)
        if last:
            table.append((label, f"{_fmt(last[1])} (step {last[0]})"))
    best = data.best("val/ppl")
    if best:
        table.append(("best validation masked perplexity", f"{_fmt(best[1])} (step {best[0]})"))
    for key, label in (("tokens_seen", "tokens seen"), ("epoch", "epoch (from 0)")):
        last = data.last(key)
        if last:
            table.append((label, f"{int(last[1]):,}"))
    secs = data.last("train_seconds")
    if secs:
        table.append(("training time (train_seconds)", _duration(secs[1])))
    if data.t0 is not None:
        end = max(r["time"] for r in data.rows if _time(r.get("time")))
        table.append(("wall time, first to last logged row", _duration(end - data.t0)))
    _, _, tps = data.points("tokens_per_s")
    if tps:
        table.append(("tokens / s (mean of logged windows)", f"{sum(tps) / len(tps):,.0f}"))
    lines += ["| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in table], ""]

    for name in images:
        lines += [f"![{name[:-4]}]({name})", ""]
    if not images:
        lines += ["No loss or perplexity rows yet: nothing to plot.", ""]

    ckpts = [r for r in data.events if r.get("event") == "checkpoint"]
    if ckpts:
        lines += ["## Checkpoints", ""]
        lines += [f"- step {r['step']}: `{r.get('path', '')}`" for r in ckpts[-10:]]
        if len(ckpts) > 10:
            lines.append(f"- … and {len(ckpts) - 10} earlier")
        lines.append("")
    evals = _eval_results(run_dir)
    if evals:
        lines += ["## Evaluations", "", "| checkpoint | split | masked perplexity | targets |",
                  "| --- | --- | --- | --- |"]
        for ckpt, split, res in evals:
            targets = res.get("num_targets", "–")
            lines.append(f"| {ckpt} | {split} | {_fmt(res.get('masked_ppl'))} | {targets} |")
        lines.append("")
    return "\n".join(lines)


def _eval_results(run_dir: Path) -> list[tuple[str, str, dict]]:
    """eval_SPLIT.json files that `lmcore eval` left beside the run's checkpoints."""
    found = []
    for path in sorted(RunDir(run_dir).checkpoints.glob("step_*/eval_*.json")):
        if not path.is_file():  # a FIFO would block the read for ever
            continue
        try:
            res = json_value(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(res, dict):
            found.append((path.parent.name, path.stem[len("eval_"):], res))
    return found




# --- comparing runs (`lmcore report --compare RUN...`) ---------------------------------------

SWEEP_MANIFEST = "sweep.json"  # what lmcore.sweep writes into a sweep's folder: its points
_POINT_NAME = re.compile(r"[A-Za-z0-9._+-]+")
COMPARE_COLORS = 10  # the best runs get a colour and a legend entry; the others are grey lines
_NOT_DIFFERENCES = ("run.dir", "tracking.")  # config keys that differ between any two runs


@dataclass
class _Run:
    path: Path
    overrides: list[str] | None  # the sweep point's, or None (then: what differs in config.yaml)
    data: _Series | None = None  # None: no metrics.jsonl (yet)
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
    _label(found)
    _differences(found)
    found.sort(key=_rank)
    out_dir = Path(out) if out else _common_parent(found) / "compare"
    files: dict[str, bytes] = {}
    fig = _draw_compare(found)
    if fig is not None:
        files["compare.png"] = _png(fig)
    files["compare.md"] = _compare_markdown(found, "compare.png" in files).encode()
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
    if all(r.overrides is not None for r in runs):
        return
    configs = {r.path: c for r in runs if (c := _flat_config(r.path))}  # runs not started have none
    keys = sorted({k for c in configs.values() for k in c})
    differ = [k for k in keys if not k.startswith(_NOT_DIFFERENCES)
              and len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
    for run in runs:
        if run.overrides is None:
            c = configs.get(run.path, {})
            run.overrides = [f"{k}={_plain(c[k])}" for k in differ if k in c]


def _flat_config(run_dir: Path) -> dict[str, Any]:
    path = RunDir(run_dir).config
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return {}
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
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


def _draw_compare(runs: list[_Run]):
    drawn = [r for r in runs if r.data is not None and _val_points(r.data)[0]]
    if not drawn:
        return None
    fig, (by_step, by_time) = _figure(2)
    span = max((t for r in drawn for t in _val_points(r.data)[1] if t == t), default=0.0)
    scale, unit = (3600.0, "hours") if span >= 3 * 3600 else (60.0, "minutes") if span >= 3 * 60 else (
        1.0, "seconds")
    palette = [f"C{i}" for i in range(COMPARE_COLORS)]
    for i, run in reversed(list(enumerate(drawn))):  # the best drawn last, on top
        steps, secs, ppl = _val_points(run.data)
        best = i < COMPARE_COLORS
        kw = {"color": palette[i] if best else "#bbbbbb", "linewidth": 1.5 if best else 0.8,
              "markersize": 3, "label": run.label if best else None, "zorder": 3 if best else 2}
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
    title = "best first" if len(drawn) <= COMPARE_COLORS else f"best {COMPARE_COLORS} of {len(drawn)}"
    fig.legend([handles[j] for j in order], [labels[j] for j in order], loc="outside right upper",
               fontsize="small", title=title)
    return fig


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _compare_markdown(runs: list[_Run], image: bool) -> str:
    lines = [f"# Comparison of {len(runs)} run(s)", "",
             "Sorted by best validation masked perplexity, lowest first; runs without validation rows "
             "last.", ""]
    if image:
        lines += ["![validation perplexity](compare.png)", ""]
    else:
        lines += ["No validation rows in any run: nothing to plot.", ""]
    columns = ["#", "run", "overrides", "best val ppl", "at step", "last val ppl", "train tokens",
               "training time"]
    lines += ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    for i, run in enumerate(runs, 1):
        overrides = " ".join(f"`{_cell(o)}`" for o in run.overrides or []) or "–"
        best, data = run.best, run.data
        if data is None:
            figures = ["no metrics.jsonl yet", "–", "–", "–", "–"]
        else:
            last = data.last("val/ppl")
            tokens, secs = data.last("tokens_seen"), data.last("train_seconds")
            figures = [_fmt(best[1]) if best else "no validation rows", str(best[0]) if best else "–",
                       f"{_fmt(last[1])} (step {last[0]})" if last else "–",
                       f"{int(tokens[1]):,}" if tokens else "–", _duration(secs[1]) if secs else "–"]
        lines.append(f"| {i} | {_cell(run.label)} | {overrides} | " + " | ".join(figures) + " |")
    lines.append("")
    return "\n".join(lines)
