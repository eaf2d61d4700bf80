"""Evaluation against an independent oracle: torchmetrics' Perplexity (the notebook's metric) on
the full logits gives the masked figure when told to ignore the unscored targets, and the
notebook's own figure when not; lmcore computes both without ever holding a batch's logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.text import Perplexity

from lmcore.config import ModelConfig
from lmcore.data.batching import IGNORE, eval_batches, review_rows, rows_to_batch
from lmcore.data.cache import TokenizedSplit
from lmcore.data.tokenizer import WordTokenizer
from lmcore.evaluate import evaluate, notebook_rows
from lmcore.model import LSTMLM
from tests.conftest import needs_native

TOK = WordTokenizer([f"w{i}" for i in range(60)])


def split(n: int = 23, seed: int = 0) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(4, len(TOK), size=int(rng.integers(1, 40))) for _ in range(n)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return TokenizedSplit(np.concatenate(docs).astype(np.int32), offsets)


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_masked_and_notebook_figures_equal_torchmetrics_on_the_full_logits(softmax: str):
    torch.manual_seed(0)
    model = LSTMLM(len(TOK), ModelConfig(embedding_dim=8, hidden_dim=12, softmax=softmax,
                                         adaptive_cutoffs=[20]), TOK.pad_id).eval()
    data = split()
    res = evaluate(model, data, TOK, batch_size=5, truncate=30, notebook_figure=True)
    masked, notebook = Perplexity(ignore_index=IGNORE), Perplexity()
    with torch.no_grad():
        for idx in eval_batches(data, 5, 30):
            docs = [data.doc(int(i)) for i in idx]
            batch = rows_to_batch(review_rows(docs, TOK.bos_id, TOK.eos_id, TOK.pad_id, 30), TOK.pad_id)
            masked.update(model(batch.inputs).logits, batch.targets)
            rows = torch.from_numpy(notebook_rows(docs, TOK, 30))
            notebook.update(model(rows[:, :-1]).logits, rows[:, 1:])
    words_and_eos = sum(min(len(data.doc(i)), 30) + 1 for i in range(len(data)))
    assert res.num_targets == int(masked.count) == words_and_eos
    assert res.masked_ppl == pytest.approx(float(masked.compute()), rel=1e-5)
    assert res.notebook_unmasked_ppl == pytest.approx(float(notebook.compute()), rel=1e-5)
    assert math.isfinite(res.masked_loss) and res.notebook_unmasked_ppl != pytest.approx(res.masked_ppl)


def test_a_diverged_models_perplexity_is_infinite_not_an_overflow():
    from lmcore.evaluate import perplexity

    assert perplexity(1.0) == math.exp(1.0)
    assert perplexity(800.0) == math.inf  # math.exp(800) raises OverflowError


@needs_native("bf16")
def test_eval_precision_bf16_is_close_to_fp32_and_says_what_it_ran(tmp_path):
    """`lmcore eval eval.precision=bf16`: the forward in bf16 (the softmax and the sums in fp32)
    gives a figure near fp32's, not fp32's own; the result names the precision it ran."""
    from lmcore.config import load_config
    from lmcore.evaluate import run_eval
    from lmcore.runtime.precision import auto_precision
    from lmcore.trainer import train
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    common = {"data.val_split": "", "data.cache_dir": str(tmp_path / "cache"),
              "tracking.wandb_mode": "disabled", "run.threads": 1}
    train(load_config(None, tiny_overrides(run, **{"train.max_steps": 10, **common})), progress=False)
    got = {}
    for precision in ("fp32", "bf16", "auto"):
        cfg = load_config(None, tiny_overrides(run, **{"eval.precision": precision, "eval.limit": 20,
                                                       "eval.notebook_figure": False, **common}))
        out = run_eval(cfg)
        saved = json.loads((Path(out["checkpoint"]) / "eval_test.json").read_text())
        assert saved["precision"] == out["precision"]
        got[precision] = out
    assert got["fp32"]["precision"] == "fp32" and got["bf16"]["precision"] == "bf16"
    assert got["auto"]["precision"] == auto_precision("cpu")
    fp32, bf16 = got["fp32"]["masked_ppl"], got["bf16"]["masked_ppl"]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.01)
    assert got["bf16"]["num_targets"] == got["fp32"]["num_targets"]


@needs_native("bf16")
def test_validation_during_bf16_training_scores_in_eval_precision(tmp_path):
    """A run trained under bf16 autocast validates in eval.precision (fp32 by default): its
    logged validation figure is exactly what `lmcore eval` in fp32 reports on the same reviews."""
    from lmcore.config import load_config
    from lmcore.evaluate import run_eval
    from lmcore.trainer import train
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    common = {"data.cache_dir": str(tmp_path / "cache"), "tracking.wandb_mode": "disabled", "run.threads": 1,
              "data.val_stride": 2, "data.val_limit": 16, "train.mixed_precision": "bf16"}
    train(load_config(None, tiny_overrides(run, **{"train.max_steps": 10, "train.eval_interval": 10,
                                                   **common})), progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r["val/ppl"] for r in rows if "val/ppl" in r and r["step"] == 10]
    cfg = load_config(None, tiny_overrides(run, **{"eval.split": "test", "eval.stride": 2, "eval.limit": 16,
                                                   "eval.notebook_figure": False, **common}))
    assert run_eval(cfg)["masked_ppl"] == val
