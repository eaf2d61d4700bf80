"""Batched, stateful sampling: read each prompt once, then feed one token per step.

The notebook re-ran the whole prefix for every new word, one prompt at a time, and
resampled until the draw was not `<unk>`. Here all prompts of a batch are read in one
packed LSTM call, the state is carried, and `<unk>`, `<pad>`, `<bos>` get probability
zero before sampling, which is exactly the distribution that resampling produced.

Determinism: each row draws its uniforms from its own generator, seeded by the caller
(e.g. from (seed, prompt id, sample index)), and samples by inverse CDF, so what a row
gets does not depend on which other rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmcore.model import LSTMLM
from lmcore.tokenizer import WordTokenizer


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 50


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"


def sample_next(logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams,
                banned: list[int]) -> torch.Tensor:
    """One token per row from (B, V) logits, by inverse CDF on the given (B,) uniforms."""
    logits = logits.float()
    logits[:, banned] = float("-inf")
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        pick = _inverse_cdf(sorted_p.cumsum(dim=-1), uniforms)
        return order.gather(1, pick.unsqueeze(1)).squeeze(1)
    cdf = probs.cumsum(dim=-1)
    return _inverse_cdf(cdf, uniforms)


def _inverse_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """First index whose CDF reaches u * total. A zero-probability token is a flat stretch
    of the CDF, never the first to reach a positive target, so banned tokens cannot come out
    (the floor keeps u = 0 from landing on a leading zero)."""
    target = (uniforms * cdf[:, -1]).clamp_min(1e-30).unsqueeze(1)
    return torch.searchsorted(cdf, target).clamp_max(cdf.shape[1] - 1).squeeze(1)


@torch.no_grad()
def generate_batch(model: LSTMLM, tok: WordTokenizer, prompts: list[list[int]],
                   generators: list[torch.Generator], params: SamplingParams,
                   device: torch.device | str = "cpu") -> list[Completion]:
    """Complete each prompt (ids, `<bos>` not included) with up to max_new_tokens tokens."""
    n = len(prompts)
    rows = [[tok.bos_id, *p] for p in prompts]
    lengths = torch.tensor([len(r) for r in rows])
    padded = torch.full((n, int(lengths.max())), tok.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = torch.tensor(r)
    uniforms = torch.stack([torch.rand(max(params.max_new_tokens, 1), generator=g, dtype=torch.float64)
                            for g in generators]).float()
    banned = [tok.unk_id, tok.pad_id, tok.bos_id]

    # Read every prompt once; the packed call leaves each row's state at its own last token.
    emb = model.embedding(padded.to(device))
    packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
    out, state = model.lstm(packed)
    out, _ = pad_packed_sequence(out, batch_first=True)
    last = out[torch.arange(n), lengths - 1].unsqueeze(1)
    if model.proj is not None:
        last = model.proj(last)
    logits = model.head(last)[:, -1]

    new: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    reason = ["length"] * n
    for t in range(params.max_new_tokens):
        nxt = sample_next(logits, uniforms[:, t].to(logits.device), params, banned).cpu()
        for i in range(n):
            if finished[i]:
                continue
            token = int(nxt[i])
            if token == tok.eos_id:
                finished[i], reason[i] = True, "eos"
            else:
                new[i].append(token)
        if all(finished) or t == params.max_new_tokens - 1:
            break
        out = model(nxt.view(n, 1).to(device), state)
        logits, state = out.logits[:, -1], out.state
    return [Completion(ids, r) for ids, r in zip(new, reason, strict=True)]


def row_generator(seed: int, prompt_index: int, sample_index: int = 0) -> torch.Generator:
    """A generator owned by one (prompt, sample): the same draws in any batch or shard."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + prompt_index) * 1_000_003 + sample_index)
    return g


def run_generate(cfg, prompt_texts: list[str] | None = None) -> list[str]:
    """A few completions printed as lines: for the quick start and a quick look at a model."""
    from lmcore.checkpoint import load_for_inference

    model, tok, _ = load_for_inference(cfg.generate.checkpoint or cfg.run.dir)
    g = cfg.generate
    params = SamplingParams(g.temperature, g.top_k, g.top_p, g.max_new_tokens)
    texts = list(prompt_texts or [])
    if not texts and g.prompts:
        from pathlib import Path

        texts = [line.rstrip("\n") for line in Path(g.prompts).read_text(encoding="utf-8").splitlines()]
    if not texts:
        texts = [""] * g.num_samples
    prompts = [tok.encode(t) for t in texts]
    gens = [row_generator(g.seed, i) for i in range(len(prompts))]
    done = generate_batch(model, tok, prompts, gens, params)
    return [f"{t} >>> {tok.decode(c.token_ids)}".strip() for t, c in zip(texts, done, strict=True)]
