"""Evaluation against an independent oracle: torchmetrics' Perplexity (the notebook's metric) on
the full logits gives the masked figure when told to ignore the unscored targets, and the
notebook's own figure when not; lmcore computes both without ever holding a batch's logits."""

from __future__ import annotations

import math

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
