"""Folders written by an earlier lmcore keep working: tests/fixtures/v0_1 holds a run folder
(trained to step 6, checkpoint every 3 steps) and a generation folder whose job stopped after 2
of its 3 chunks, both made by lmcore 0.1 (commit 164257a) with the commands in
tests/fixtures/v0_1/README.md. This version resumes the run, evaluates its checkpoint to the
figure 0.1 wrote, and finishes the generation to the bytes 0.1's uninterrupted job wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmcore.checkpoint import Checkpoint
from lmcore.track.metrics import read_metrics
from tests.conftest import REPO, run_cli

FIXTURE = REPO / "tests" / "fixtures" / "v0_1"
# What 0.1 was run with (its run/config.yaml holds the same): a tiny model on the sample corpus.
COMMON = ["data.source=sample", "model.embedding_dim=8", "model.hidden_dim=8", "train.batch_size=16",
          "optim.lr=0.01", "run.threads=1", "data.val_split=test", "data.val_stride=20",
          "train.log_interval=2", "tracking.wandb_mode=disabled", "model.dropout=0.1", "run.dir=run"]
GENERATE = ["generate.checkpoint=run/checkpoints/step_00000006", "generate.prompts=prompts.jsonl",
            "generate.output_dir=gen", "generate.chunk_size=2", "generate.samples_per_prompt=2",
            "generate.temperature=0.8", "generate.max_new_tokens=12", "generate.precision=fp32"]

STRAIGHT_9_STEPS_VAL_PPL = 510.43059025227586


@pytest.fixture
def old(tmp_path: Path) -> Path:
    dest = tmp_path / "v0_1"
    shutil.copytree(FIXTURE, dest)
    return dest


def test_a_run_folder_of_0_1_resumes_and_keeps_its_history(old: Path):
    proc = run_cli("train", *COMMON, "train.max_steps=9", "train.checkpoint_interval=3", cwd=old)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from run/checkpoints/step_00000006 at step 6" in proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["step"] == 9
    # 0.1 trained straight to step 9 validates at this figure (tests/fixtures/v0_1/README.md)
    assert result["val_ppl"] == pytest.approx(STRAIGHT_9_STEPS_VAL_PPL, rel=1e-6)
    Checkpoint.open(old / "run" / "checkpoints" / "step_00000009")
    steps = [r["step"] for r in read_metrics(old / "run" / "metrics.jsonl") if "train/loss" in r]
    assert steps == [2, 4, 6, 8, 9]  # 0.1's rows kept, this version's appended


def test_a_checkpoint_of_0_1_evaluates_to_the_figure_0_1_wrote(old: Path):
    ckpt = old / "run" / "checkpoints" / "step_00000006"
    written = json.loads((ckpt / "eval_test.json").read_text())
    proc = run_cli("eval", *COMMON, "eval.stride=20", f"eval.checkpoint={ckpt}", cwd=old)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["num_targets"] == written["num_targets"] == 902
    # to float32 rounding: since 2026-12-02 a forward without gradients sums the softmax over
    # 2,048-word blocks (lmcore/loss.py forward_only), other last bits than 0.1's (measured 5.4e-7)
    assert result["masked_ppl"] == pytest.approx(written["masked_ppl"], rel=2e-6)


def test_a_generation_folder_of_0_1_is_finished_to_the_bytes_0_1_wrote(old: Path):
    proc = run_cli("generate", *COMMON, *GENERATE, cwd=old)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["chunks_done_before"], summary["chunks_written"], summary["complete"]) == (2, 1, True)
    expected = (old / "expected_generations.jsonl").read_bytes()
    assert (old / "gen" / "generations.jsonl").read_bytes() == expected
    assert not (old / "gen" / ".locks").exists()  # the shard lock goes with the job
