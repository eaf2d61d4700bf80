"""Training as a user runs it: the CLI, its run folder, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmcore.config import load_config
from lmcore.errors import LmcoreError
from lmcore.track.metrics import read_metrics
from lmcore.trainer import train
from tests.conftest import REPO, needs_native, run_cli, tiny_overrides


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def test_train_eval_generate_from_the_command_line(tmp_path: Path):
    run = tmp_path / "run"
    proc = run_cli("train", "--config", "configs/tiny.yaml", f"run.dir={run}", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["step"] == 63 and not summary["stopped_early"]
    assert summary["val_ppl"] < 60  # 691-word vocabulary: a model that learned something

    # The run folder holds what a user needs to reproduce and inspect the run.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["dir"] == str(run) and saved["model"]["hidden_dim"] == 64
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000050", "step_00000063"]
    final = run / "checkpoints" / "step_00000063"
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json",
                 "tokenizer.json", "config.yaml", "manifest.json", "rank_00000.safetensors"):
        assert (final / name).is_file(), name
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [10, 20, 30, 40, 50, 60, 63]
    # the end: the last validation, then the last checkpoint (which records it)
    assert rows[-2]["step"] == 63 and "val/ppl" in rows[-2]
    assert rows[-1]["step"] == 63 and rows[-1]["event"] == "checkpoint"

    # Not a terminal: plain progress lines (SLURM log files), not a progress bar.
    assert "step 10/63 loss=" in proc.stderr and "\r" not in proc.stderr

    proc = run_cli("eval", "--config", "configs/tiny.yaml", f"run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["masked_ppl"] == pytest.approx(summary["val_ppl"], rel=1e-6)  # same reviews
    assert result["num_targets"] == 11116
    assert json.loads((final / "eval_test.json").read_text())["masked_ppl"] == result["masked_ppl"]

    proc = run_cli("generate", "--config", "configs/tiny.yaml", f"run.dir={run}", "--prompt", "the movie was")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[0]
    assert line.startswith("the movie was >>> ") and len(line.split(">>>")[1].split()) > 3


def test_old_checkpoints_are_pruned_to_keep_checkpoints(tmp_path: Path):
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"train.max_steps": 40,
                                                              "train.keep_checkpoints": 2}))
    train(cfg, progress=False)
    kept = sorted(p.name for p in (tmp_path / "r/checkpoints").iterdir())
    assert kept == ["step_00000030", "step_00000040"]
    # every file as readable by the group as anything else the user writes (umask applied),
    # not the 0600 that mkstemp and safetensors give
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "r/checkpoints/step_00000040").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_stop_and_resume_gives_the_same_weights_as_one_straight_run(tmp_path: Path, batching: str):
    # Dropout and 2 layers on purpose: RNG state and carried LSTM state must survive the stop.
    extra = {"data.batching": batching, "data.seq_len": 32, "model.dropout": 0.1, "model.num_layers": 2,
             "train.checkpoint_interval": 7}
    straight = train(load_config(None, tiny_overrides(tmp_path / "a", **extra, **{"train.max_steps": 30})),
                     progress=False)
    first = train(load_config(None, tiny_overrides(tmp_path / "b", **extra, **{"train.max_steps": 15})),
                  progress=False)
    assert first.step == 15
    resumed = train(load_config(None, tiny_overrides(tmp_path / "b", **extra, **{"train.max_steps": 30})),
                    progress=False)
    assert resumed.step == 30
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The metrics log continues without repeating or going back in steps.
    steps = [r["step"] for r in read_metrics(tmp_path / "b/metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_a_damaged_latest_checkpoint_is_skipped_on_resume(tmp_path: Path):
    run = tmp_path / "r"
    train(load_config(None, tiny_overrides(run, **{"train.max_steps": 20})), progress=False)
    latest = run / "checkpoints/step_00000020/model.safetensors"
    data = bytearray(latest.read_bytes())
    data[-10] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_00000020.*checksum"):
        resumed = train(load_config(None, tiny_overrides(run, **{"train.max_steps": 25})), progress=False)
    assert resumed.step == 25  # continued from step 10, the last good one


def test_when_every_checkpoint_is_damaged_the_run_refuses_rather_than_start_over(tmp_path: Path):
    run = tmp_path / "r"
    train(load_config(None, tiny_overrides(run, **{"train.max_steps": 20})), progress=False)
    for ckpt in (run / "checkpoints").iterdir():
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    from lmcore.errors import CheckpointError

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="skipping")  # the one error line says it all
        with pytest.raises(CheckpointError, match="holds 2 checkpoint.*none can be read.*step_00000020"):
            train(load_config(None, tiny_overrides(run, **{"train.max_steps": 25})), progress=False)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing overwritten, nothing pruned


@needs_native("bf16")
@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_mixed_precision_bf16_trains(tmp_path: Path, softmax: str):
    """bf16 autocast with either softmax (the adaptive one's matmuls in bf16, its log-softmaxes in
    fp32: torch's own mixes dtypes under autocast and fails)."""
    extra = {"model.softmax": "adaptive", "model.adaptive_cutoffs": "[20]"} if softmax == "adaptive" else {}
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"train.max_steps": 20,
                                                              "train.mixed_precision": "bf16", **extra}))
    result = train(cfg, progress=False)
    assert result.step == 20 and result.val_ppl < 400


@needs_native("bf16")
def test_mixed_precision_auto_is_the_hardwares_choice_and_a_resume_in_another_one_says_so(tmp_path: Path):
    from lmcore.runtime.precision import cpu_fast_bf16

    run = tmp_path / "r"

    def train_to(steps: int, precision: str) -> tuple[str, list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(load_config(None, tiny_overrides(run, **{"train.max_steps": steps,
                                                                   "train.mixed_precision": precision})),
                           progress=False)
        state = json.loads((result.checkpoint / "trainer_state.json").read_text())
        said = [str(w.message) for w in caught if "not bit-identical" in str(w.message)]
        return state["mixed_precision"], said

    assert train_to(4, "no") == ("no", [])
    used, said = train_to(8, "bf16")
    assert used == "bf16" and said == ["train.mixed_precision=bf16 is bf16 here, the run used no before: the "
                                       "resumed run is not bit-identical to an uninterrupted one"]
    auto = "bf16" if cpu_fast_bf16() else "no"  # no CUDA in the test suite: the CPU rule
    used, said = train_to(12, "auto")
    assert used == auto and len(said) == (auto != "bf16")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_stop_signal_checkpoints_and_exits_with_the_requeue_status(tmp_path: Path, sig: signal.Signals):
    run = tmp_path / "r"
    args = [sys.executable, "-m", "lmcore.cli", "train", *tiny_overrides(run, **{"train.max_steps": 100000,
                                                                                "train.log_interval": 1})]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)  # a few steps in
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    summary = json.loads(out)
    assert summary["stopped_early"] and summary["step"] > 0
    ckpt = Path(summary["checkpoint"])
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == summary["step"]
    assert f"received {sig.name}" in err
    resumed = train(load_config(None, tiny_overrides(run, **{"train.max_steps": summary["step"] + 3})),
                    progress=False)
    assert resumed.step == summary["step"] + 3


def test_gradient_accumulation_equals_one_bigger_batch(tmp_path: Path):
    # Loss is normalised by the real targets of the whole step, so 2 x 8 reviews == 1 x 16.
    base = {"train.max_steps": 4, "data.val_split": ""}
    one = train(load_config(None, tiny_overrides(tmp_path / "a", **base, **{"train.batch_size": 16})),
                progress=False)
    acc = train(load_config(None, tiny_overrides(tmp_path / "b", **base, **{"train.batch_size": 8,
                                                                            "train.grad_accum": 2})),
                progress=False)
    a, b = weights(one.checkpoint), weights(acc.checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_learning_rate_schedules():
    from lmcore.optim import lr_at

    const = load_config(None, ["optim.lr=0.01"]).optim
    assert [lr_at(s, const, 100) for s in (0, 50, 99)] == [0.01, 0.01, 0.01]  # the notebook's
    cos = load_config(None, ["optim.lr=0.01", "optim.schedule=cosine", "optim.warmup_steps=10",
                             "optim.min_lr_ratio=0.1"]).optim
    assert lr_at(0, cos, 110) == pytest.approx(0.001)  # warmup from lr/10 ...
    assert lr_at(9, cos, 110) == pytest.approx(0.01)  # ... to lr
    assert lr_at(60, cos, 110) == pytest.approx(0.0055)  # half way down the cosine
    assert lr_at(110, cos, 110) == pytest.approx(0.001)  # the floor
    timed = load_config(None, ["optim.lr=0.01", "optim.schedule=cosine", "optim.horizon=time",
                               "train.max_train_seconds=60"]).optim
    # over the time budget: the step count does not matter, the fraction of the budget spent does
    assert [lr_at(s, timed, 10, spent) for s, spent in ((0, 0.0), (5, 0.5), (7, 1.0), (9, 1.5))] == \
        pytest.approx([0.01, 0.0055, 0.001, 0.001])
    wsd = load_config(None, ["optim.lr=0.01", "optim.schedule=wsd", "optim.cooldown_fraction=0.2",
                             "optim.min_lr_ratio=0.1"]).optim
    # constant for 80 of 100 steps, then linearly down to the floor
    assert [lr_at(s, wsd, 100) for s in (0, 80, 90, 100, 120)] == \
        pytest.approx([0.01, 0.01, 0.0055, 0.001, 0.001])
    with pytest.raises(LmcoreError, match=r"optim.horizon=time .* needs optim.schedule=cosine or wsd and "
                                          r"train.max_train_seconds > 0"):
        load_config(None, ["optim.schedule=cosine", "optim.horizon=time"])


def test_a_cosine_over_the_time_budget_follows_the_training_clock(tmp_path: Path):
    run = tmp_path / "run"
    proc = run_cli("train", "--no-progress", *tiny_overrides(run, **{
        "train.max_steps": 100000, "data.val_split": "", "train.log_interval": 1, "optim.schedule": "cosine",
        "optim.horizon": "time", "optim.min_lr_ratio": 0.1, "train.max_train_seconds": 3}))
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "lr" in r]
    lrs, seconds = [r["lr"] for r in rows], [0.0] + [r["train_seconds"] for r in rows]
    # each step's rate is the cosine at the training time spent before it, down to 0.001 at 3 s
    assert lrs == pytest.approx([0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * min(1.0, t / 3)))
                                 for t in seconds[:-1]], rel=1e-9)
    assert len(rows) > 2 and lrs == sorted(lrs, reverse=True) and seconds[-1] >= 3


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log_file(capsys):
    from lmcore.track.progress import Progress

    for plain in (False, True):
        bar = Progress(total=4, force_plain=plain)
        for _ in range(4):
            bar.update(1, {"loss": 1.5}, log_line=True)
        bar.close()
    err = capsys.readouterr().err
    assert "\r" in err and "4/4" in err  # tqdm redraws one line
    assert err.count("train: step") == 4 and "step 4/4 loss=1.5" in err


def _nan_on_call(monkeypatch, calls: set[int]) -> None:
    """Make the model's loss NaN on the given forward calls (1-based), as bad data or an
    overflow would."""
    from lmcore.model import LSTMLM

    real = LSTMLM.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out.loss_sum is not None and self.training:
            count["n"] += 1
            if count["n"] in calls:
                out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(LSTMLM, "forward", forward)


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):

    _nan_on_call(monkeypatch, {13})
    run = tmp_path / "r"
    with pytest.raises(LmcoreError, match="non-finite loss or gradient at step 13"):
        train(load_config(None, tiny_overrides(run, **{"train.max_steps": 20})), progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010"]


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """An update that leaves inf in the weights with a finite loss and gradient (an overflow
    inside the optimizer, a flipped bit): the run stops before writing that checkpoint, and
    the one before it stays the latest, so a resume starts from sound weights."""

    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run = tmp_path / "r"
    cfg = load_config(None, tiny_overrides(run, **{"train.max_steps": 3, "train.checkpoint_interval": 1}))
    with pytest.raises(LmcoreError, match=r"weights are non-finite at step 2 .*step_00000001 is intact"):
        train(cfg, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]


def test_nan_steps_can_be_skipped_and_counted(tmp_path, monkeypatch):
    _nan_on_call(monkeypatch, {3, 7})
    run = tmp_path / "r"
    result = train(load_config(None, tiny_overrides(run, **{"train.max_steps": 12,
                                                            "train.nonfinite": "skip"})), progress=False)
    assert result.step == 12 and result.val_ppl is not None and math.isfinite(result.val_ppl)
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 2
    for name, w in weights(result.checkpoint).items():
        assert torch.isfinite(w).all(), name


def test_two_jobs_on_one_run_folder_the_second_refuses(tmp_path: Path):
    from lmcore.runtime.lock import RunLock

    run = tmp_path / "r"
    with RunLock(run):  # another job holds the folder
        with pytest.raises(LmcoreError, match=r"in use by another job \(pid \d+ on .*\); wait"):
            train(load_config(None, tiny_overrides(run, **{"train.max_steps": 3})), progress=False)
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    # Released (as the kernel does when a job dies): the folder can be used again.
    assert train(load_config(None, tiny_overrides(run, **{"train.max_steps": 3})), progress=False).step == 3


def test_a_checkpoint_write_that_fails_midway_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    import errno

    from lmcore import fileio
    from lmcore.checkpoint import Checkpoint
    from lmcore.errors import CheckpointError

    real = fileio.save_tensors
    calls = {"n": 0}

    def save_tensors(path, tensors):  # the disk fills up during checkpoint 2
        calls["n"] += 1
        if calls["n"] == 4:  # checkpoint 1 = rank file, model, optimizer; then checkpoint 2's rank file
            real(path, tensors)
            with open(path, "r+b") as f:
                f.truncate(10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors)

    monkeypatch.setattr(fileio, "save_tensors", save_tensors)
    run = tmp_path / "r"
    with pytest.raises(CheckpointError, match=r"step_00000020 \(No space left on device\); the previous "
                                              r"checkpoint .*step_00000010 is intact"):
        train(load_config(None, tiny_overrides(run, **{"train.max_steps": 30})), progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000010"]  # no debris
    Checkpoint.open(run / "checkpoints/step_00000010")
    monkeypatch.setattr(fileio, "save_tensors", real)  # space freed: the same command resumes
    assert train(load_config(None, tiny_overrides(run, **{"train.max_steps": 30})), progress=False).step == 30


def test_a_training_time_budget_ends_the_run_and_a_larger_one_resumes_it(tmp_path: Path):
    """train.max_train_seconds counts step time only and is kept in the checkpoint: a long run can be
    trained in parts by raising the budget."""
    run = tmp_path / "run"
    args = ["train", "--no-progress",
            *tiny_overrides(run, **{"train.max_steps": 100000, "data.val_split": ""})]
    first = run_cli(*args, "train.max_train_seconds=2")
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout.splitlines()[-1])
    state = json.loads((Path(one["checkpoint"]) / "trainer_state.json").read_text())
    assert 2 <= state["train_seconds"] < 4 and not one["stopped_early"]
    again = json.loads(run_cli(*args, "train.max_train_seconds=2").stdout.splitlines()[-1])
    assert again["step"] == one["step"]  # spent: nothing to do
    more = run_cli(*args, "train.max_train_seconds=4")
    assert more.returncode == 0, more.stderr
    two = json.loads(more.stdout.splitlines()[-1])
    state = json.loads((Path(two["checkpoint"]) / "trainer_state.json").read_text())
    assert two["step"] > one["step"] and state["train_seconds"] >= 4  # resumed: the clock went on
