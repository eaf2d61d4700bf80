"""`lmcore report RUN_DIR`: PNG curves and a markdown summary from metrics.jsonl alone."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lmcore.errors import LmcoreError
from lmcore.track.report import write_report
from tests.conftest import REPO, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    return struct.unpack(">II", data[16:24])


def write_run(run: Path, requeue_gap_s: float = 3600.0) -> None:
    """A run folder as a trainer leaves it: two jobs (a requeue after an hour), a torn last line."""
    rows, t = [], 1_700_000_000.0
    for step in range(10, 210, 10):
        if step == 110:
            t += requeue_gap_s
        t += 30.0
        loss = 6.0 / math.sqrt(step / 10)
        rows.append({"step": step, "time": t, "train/loss": loss, "train/ppl": math.exp(loss),
                     "lr": 1e-3 * (1 - step / 400), "grad_norm": 2.0 / step ** 0.5,
                     "tokens_per_s": 5000 + step, "epoch": step // 100, "tokens_seen": 1000 * step,
                     "train_seconds": 3.0 * step})
        if step % 50 == 0:
            vloss = loss * 0.95
            rows.append({"step": step, "time": t + 5, "val/ppl": math.exp(vloss), "val/loss": vloss,
                         "val/targets": 999})
            rows.append({"step": step, "time": t + 6, "event": "checkpoint",
                         "path": str(run / "checkpoints" / f"step_{step:08d}")})
    run.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 210, "time": 17'  # killed mid-write
    (run / "metrics.jsonl").write_text(text)
    ckpt = run / "checkpoints" / "step_00000200"
    ckpt.mkdir(parents=True)
    (ckpt / "eval_test.json").write_text(json.dumps({"masked_ppl": 7.25, "num_targets": 12345}))


def test_report_draws_the_curves_and_summarises_the_run(tmp_path: Path):
    run = tmp_path / "run"
    write_run(run)
    report = Path(write_report(run))
    assert report == run / "report" / "report.md"
    for name in ("loss.png", "perplexity.png", "training.png"):
        width, height = png_size(report.parent / name)
        assert width >= 800 and height >= 300, name
    text = report.read_text()
    assert "![loss](loss.png)" in text and "![perplexity](perplexity.png)" in text
    assert "| last logged step | 200 |" in text
    best = math.exp(0.95 * 6.0 / math.sqrt(20))
    assert f"| best validation masked perplexity | {best:#.4g} (step 200) |" in text
    assert "| tokens seen | 200,000 |" in text
    assert "training time (train_seconds) | 10m 00s" in text  # 600 s of training
    assert "wall time, first to last logged row | 1h 09m" in text  # the requeue wait included
    assert "- step 200: `" in text and "step_00000200" in text
    assert "| step_00000200 | test | 7.250 | 12345 |" in text

    out = tmp_path / "elsewhere"
    assert write_report(run, out) == str(out / "report.md")
    assert (out / "perplexity.png").is_file()


def test_report_with_no_curves_yet(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "time": 1.0, "event": "checkpoint",
                                                   "path": "p"}) + "\n")
    report = Path(write_report(run))
    assert "nothing to plot" in report.read_text()
    assert not list(report.parent.glob("*.png"))


def test_report_refuses_what_is_not_a_run(tmp_path: Path):
    with pytest.raises(LmcoreError, match="no such folder.*no metrics.jsonl"):
        write_report(tmp_path / "missing")
    with pytest.raises(LmcoreError, match="has no metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(LmcoreError, match="no metrics rows yet"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "ti')  # only a torn line
    with pytest.raises(LmcoreError, match="no metrics rows yet"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_report_from_the_command_line(tmp_path: Path):
    run = tmp_path / "run"
    write_run(run)
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "report" / "report.md")
    proc = run_cli("report", str(tmp_path / "nothing-here"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("lmcore: error:") and "metrics.jsonl" in proc.stderr
    # matplotlib is imported only when a report is drawn
    probe = subprocess.run([sys.executable, "-c", "import sys, lmcore.track.report, lmcore.cli; "
                            "print('matplotlib' in sys.modules)"], capture_output=True, text=True, cwd=REPO)
    assert probe.stdout.strip() == "False", probe.stderr


def test_report_leaves_out_absurd_values_and_damaged_lines(tmp_path: Path):
    """Figures no trainer writes (a negative step, times of +-1e308, a perplexity of 0 on a log
    axis, a 400-digit step or value, a bool step) and damaged lines (nested 100000 deep, not
    UTF-8, a lone surrogate) are left out: the report is written, all its files together."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in (
        {"step": -5, "train/loss": 1, "time": -1e308},
        {"step": 1, "train/loss": 0, "train/ppl": 0, "time": 1e308},
        {"step": 2, "train/loss": 3.0, "train/ppl": 20.0, "time": 1_700_000_000.0, "train_seconds": 1e308},
        {"step": 10 ** 400, "train/loss": 1.0}, {"step": True, "train/loss": 1.0},
        {"step": 3, "train/loss": 10 ** 400, "tokens_seen": -1e308, "time": 1_700_000_060.0},
    )]
    lines += ['{"step": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
              '{"step": 5, "train/loss": "\\ud800"}']
    (run / "metrics.jsonl").write_bytes("\n".join(lines).encode() + b'\n{"step": 6, "k": "\xff"}\n')
    report = Path(write_report(run))
    assert sorted(p.name for p in report.parent.iterdir()) == ["loss.png", "perplexity.png", "report.md"]
    text = report.read_text()
    assert "| last logged step | 3 |" in text and "| final train loss | 3.000 (step 2) |" in text
    assert "| final train perplexity | 20.00 (step 2) |" in text
    assert "| wall time, first to last logged row | 1m 00s |" in text
    assert "training time" not in text and "tokens seen" not in text
    proc = run_cli("report", str(run))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
