"""`lmcore report RUN_DIR`: curves and a summary from metrics.jsonl, no W&B needed.

Writes into OUT (default RUN_DIR/report):
  loss.png        train and validation loss against optimizer step and against wall time
  perplexity.png  the same for perplexity (log scale; validation = masked perplexity)
  training.png    learning rate, gradient norm and tokens/s against step (when logged)
  report.md       a short summary (final and best figures, checkpoints, eval results)
Several runs side by side (`lmcore report --compare`): lmcore.track.compare.
Wall time is the clock time since the run's first logged row, time spent waiting for a
requeue included; the summary also gives the pure training time (train_seconds).
What no trainer writes is left out, not drawn: rows without a step in 0 .. 2^63-1, values that
are not finite numbers or beyond +-1e100, times beyond +-1e11 s (year 5000), and values <= 0
on a log axis.
matplotlib is imported only when drawing, with the Agg backend (no display needed).
"""

from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path
from typing import Any

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
