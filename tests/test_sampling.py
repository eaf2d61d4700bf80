"""Sampling (lmcore/gen/sampling.py): one token per row drawn from logits by inverse CDF in two
levels, exactly the textbook distribution for plain sampling, temperature, top-k and top-p; and
the per-row random streams every (seed, prompt id, sample) draws from, the same on any machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmcore.gen.sampling import (
    CHUNK,
    ChunkRefs,
    SamplingParams,
    chunk_layout,
    pick_tokens,
    row_key,
    row_uniforms,
)

BANNED = [0, 1, 2]  # <unk>, <pad>, <bos>: never drawn


def draw(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams, banned: list[int]) -> torch.Tensor:
    """One token per row of raw logits, as the decoder draws it (banned words masked, the
    temperature applied, the vocabulary padded to whole sampling chunks)."""
    logits = logits.detach().float().clone()
    logits[:, banned] = float("-inf")
    if not params.greedy and params.temperature != 1.0:
        logits /= params.temperature
    width, n = chunk_layout(logits.shape[1])
    logits = F.pad(logits, (0, n * width - logits.shape[1]), value=float("-inf"))
    return pick_tokens(logits, u, params, width, ChunkRefs.of(logits[0], width))


def _reference_probs(logits: torch.Tensor, params: SamplingParams) -> np.ndarray:
    """The textbook distribution (float64, full sort): temperature, top-k, then top-p."""
    x = logits.double().clone()
    x[BANNED] = float("-inf")
    x = x / params.temperature
    if params.top_k:
        kth = torch.topk(x, params.top_k).values[-1]
        x[x < kth] = float("-inf")
    p = torch.softmax(x, 0)
    if params.top_p < 1:
        sp, order = p.sort(descending=True)
        before = sp.cumsum(0) - sp
        drop = order[before >= params.top_p]
        p[drop] = 0
        p = p / p.sum()
    return p.numpy()


DISTRIBUTIONS = {
    "T1": SamplingParams(1.0), "T0.5": SamplingParams(0.5), "top-k": SamplingParams(1.0, top_k=50),
    "top-p": SamplingParams(1.0, top_p=0.9), "T0.3-top-p": SamplingParams(0.3, top_p=0.5),
    "flat-top-p-full-sort": SamplingParams(5.0, top_p=0.99),
    "top-k+p": SamplingParams(1.0, top_k=200, top_p=0.7),
}


@pytest.mark.parametrize("params", DISTRIBUTIONS.values(), ids=list(DISTRIBUTIONS))
def test_inverse_cdf_gives_the_right_distribution(params):
    """Evenly spaced uniforms (i + 0.5) / N hit token j about N * p_j times: the exact
    distribution, checked to within a few counts per token, over several chunks."""
    torch.manual_seed(1)
    vocab = 3 * CHUNK + 77
    logits = torch.randn(vocab) * 3
    logits[5000] = 9.0  # a peak in a later chunk
    n = 6000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picks = draw(logits.expand(n, vocab), u, params, BANNED)
    counts = np.bincount(picks.numpy(), minlength=vocab)
    p = _reference_probs(logits, params)
    assert counts[BANNED].sum() == 0
    assert counts[p == 0].sum() == 0  # nothing outside the top-k / nucleus
    assert np.abs(counts - n * p).max() <= 3


def test_a_chunk_whose_words_are_all_banned_is_never_drawn():
    """A whole sampling chunk at -inf has no mass (not nan): its words are never drawn, and the
    others keep the textbook distribution."""
    torch.manual_seed(2)
    vocab = 3 * CHUNK + 77
    width, _ = chunk_layout(vocab)
    banned = [*BANNED, *range(width, 2 * width)]
    logits = torch.randn(vocab) * 3
    n = 6000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picks = draw(logits.expand(n, vocab), u, SamplingParams(1.0), banned)
    counts = np.bincount(picks.numpy(), minlength=vocab)
    x = logits.double().clone()
    x[banned] = float("-inf")
    p = torch.softmax(x, 0).numpy()
    assert counts[banned].sum() == 0
    assert np.abs(counts - n * p).max() <= 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.0001, 0.0001, 0.0001, 0.0001, 0.5, 0.3, 0.2]]))
    picks = {int(draw(logits.clone(), torch.tensor([u]), SamplingParams(1.0, top_p=0.75), [0, 1, 2]))
             for u in torch.linspace(0, 0.999, 200).tolist()}
    assert picks == {4, 5}


def test_row_streams_are_splitmix64_keyed_by_seed_id_and_sample():
    # splitmix64 from state 0: first output 0xE220A8397B1DCDAF (the published test value)
    assert row_uniforms([0], 1)[0, 0] == (0xE220A8397B1DCDAF >> 11) / 2**53
    keys = {row_key(0, 7), row_key(0, "7"), row_key(0, 7, 1), row_key(1, 7)}
    assert len(keys) == 4  # ids 7 and "7" differ, so do samples and seeds
    u = row_uniforms([row_key(0, i) for i in range(1000)], 50)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(row_uniforms([row_key(0, 3)], 50)[0], u[3])  # a row's stream alone
