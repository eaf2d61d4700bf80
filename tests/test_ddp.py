"""Real 2-process DDP on CPU (gloo), launched the way users launch it: torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SMALL = ["data.source=sample", "model.embedding_dim=32", "model.hidden_dim=32", "train.max_steps=3"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*TORCHRUN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_ranks_train_in_sync_and_match_one_process_with_the_same_global_batch(tmp_path: Path):
    probe = tmp_path / "probe"
    probe.mkdir()
    torchrun("tests/ddp_probe.py", str(probe), *SMALL, "train.batch_size=8", f"run.dir={tmp_path / 'ddp'}")
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]  # a real process group, not two lone copies
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]  # gradients were averaged
    assert [r["step"] for r in ranks] == [3, 3]

    # 2 ranks x 8 reviews == 1 process x 16 reviews: the loss is weighted per real token.
    proc = run_cli("train", *SMALL, "train.batch_size=16", f"run.dir={tmp_path / 'one'}", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    two = load_file(str(tmp_path / "ddp/checkpoints/step_00000003/model.safetensors"))
    one = load_file(str(tmp_path / "one/checkpoints/step_00000003/model.safetensors"))
    assert set(two) == set(one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)


def test_a_cosine_over_the_time_budget_follows_rank_zeros_clock_on_every_rank(tmp_path: Path):
    """Each rank's own clock would give it its own learning rate, and the weights would drift apart."""
    probe = tmp_path / "probe"
    probe.mkdir()
    torchrun("tests/ddp_probe.py", str(probe), *SMALL, "train.batch_size=8", "optim.schedule=cosine",
             "optim.horizon=time", "train.max_train_seconds=2", f"run.dir={tmp_path / 'ddp'}")
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]


def test_two_rank_eval_equals_one_process_eval(tmp_path: Path):
    run = tmp_path / "run"
    proc = run_cli("train", *SMALL, "train.batch_size=16", f"run.dir={run}", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    # 200 test reviews in batches of 64: 4 batches, dealt unevenly (2 + 2 with a short last one).
    torchrun("jobs/eval.py", "data.source=sample", f"run.dir={run}", "eval.batch_size=64")
    ckpt = run / "checkpoints/step_00000003"
    two = json.loads((ckpt / "eval_test.json").read_text())
    assert two["world_size"] == 2
    proc = run_cli("eval", "data.source=sample", f"run.dir={run}", "eval.batch_size=64")
    assert proc.returncode == 0, proc.stderr
    one = json.loads(proc.stdout)
    assert one["world_size"] == 1
    assert two["num_targets"] == one["num_targets"] == 11116  # no review counted twice
    assert two["masked_ppl"] == one["masked_ppl"]
    assert two["notebook_unmasked_ppl"] == one["notebook_unmasked_ppl"]
