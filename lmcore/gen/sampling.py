"""Sampling: the per-row random streams and the draw of one token per row from logits.

Plain sampling is inverse-CDF in two levels: per row, the mass of each vocabulary chunk (its
log-sum-exp, from the log-softmax kernel while the chunk is in cache), then a cumulative sum
inside the one chunk the uniform falls in. No sort unless top-p needs one (and then first
among the top 64, then 1024 candidates, sorting the whole row only for rows whose nucleus is
larger); greedy and top-k=1 are an argmax. Every operation is row-local, so a row's token
cannot depend on its batch. Each row draws from its own counter-based stream keyed by (seed,
prompt id, sample index): splitmix64 in numpy, the same numbers on every machine and library
version.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmcore.loss import lse_, ref_columns

CHUNK = 2048  # vocabulary columns per chunk of the sampling pass (in cache while used)
TOP_P_CANDIDATES = (64, 1024)  # nucleus search: these many top tokens first, then a full sort
# torch's fp32 exp takes a slow path wherever a result underflows (an input below ~-87.3):
# measured on the AMX VM (2 threads, 256 x 40,960), 2 ms for inputs in [-80, 0] but 110-300 ms
# below -88 and 38 ms for -inf; a trained model at temperature 0.3 puts ~2% of the vocabulary
# there, banned words and padding columns are -inf always. So sampling's exponentials take
# max(x, EXP_FLOOR) (exp(-87) = 1.6e-38, a normal float), and the CDF search never stops below
# CDF_FLOOR: all 40k words at the floor add up to 7e-34, so no floored word can be drawn. What
# moves: a word whose probability is below 1e-30 of its chunk's mass is no longer drawn when the
# uniform falls within 1e-30 of it. (The chunks' masses come from the log-softmax kernel, whose
# exp slows far less there: 128 x 2,048 on 1 thread of the AMD EPYC, 2026-12-07, 147 us, and
# 264-273 us with most inputs below -88.)
EXP_FLOOR = -87.0
CDF_FLOOR = 1e-30


def floored_exp_(x: torch.Tensor) -> torch.Tensor:
    """exp(max(x, EXP_FLOOR)) in place: the fast path of exp for every input (see above)."""
    return x.clamp_min_(EXP_FLOOR).exp_()


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    max_new_tokens: int = 50

    @property
    def greedy(self) -> bool:
        """Greedy decoding: temperature 0, or top-k 1 (the same argmax, by construction)."""
        return self.temperature == 0 or self.top_k == 1

    def to_dict(self) -> dict:
        return asdict(self)


# -- per-row random streams ------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def row_key(seed: int, prompt_id: int | str, sample_index: int = 0) -> int:
    """The 64-bit key of one (seed, prompt id, sample) stream. Ids 7 and "7" differ."""
    payload = json.dumps([int(seed), prompt_id, int(sample_index)], ensure_ascii=True,
                         separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(payload.encode("ascii"), digest_size=8).digest(), "little")


def row_uniforms(keys: Sequence[int] | np.ndarray, steps: int) -> np.ndarray:
    """(len(keys), steps) uniforms in [0, 1): output t of the splitmix64 stream seeded by
    each key (53-bit floats). Pure integer arithmetic: identical on every platform."""
    k = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    t = np.arange(1, steps + 1, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        z = k + t * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# -- sampling from logits ---------------------------------------------------------------------
def chunk_layout(vocab: int) -> tuple[int, int]:
    """(chunk width, number of chunks): chunks of about CHUNK columns, width a multiple of 16,
    covering the vocabulary with as little padding as possible."""
    if vocab <= CHUNK:
        return vocab, 1
    n = math.ceil(vocab / CHUNK)
    width = math.ceil(math.ceil(vocab / n) / 16) * 16
    return width, math.ceil(vocab / width)


def _inverse_cdf(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose CDF reaches target (M, 1). A zero-probability entry is
    a flat stretch of the CDF, never the first to reach a positive target."""
    return torch.searchsorted(cdf, target.clamp_min(CDF_FLOOR)).clamp_max(cdf.shape[1] - 1).squeeze(1)


def _sample_sorted(vals: torch.Tensor, u: torch.Tensor, top_p: float, ref: torch.Tensor | None = None,
                   total: torch.Tensor | None = None) -> torch.Tensor:
    """Positions drawn from candidates sorted by logit, descending (M, K). total: the whole
    row's mass relative to ref, a logit at least the row's largest up to rounding (top-p alone:
    the nucleus is a share of every token); None: the candidates are all there is (top-k)."""
    ref = vals[:, :1] if ref is None else ref
    e = floored_exp_(vals - ref)
    if top_p < 1.0:
        cs = e.cumsum(dim=1)
        whole = cs[:, -1:] if total is None else total
        before = cs - e  # mass of strictly more likely candidates
        e = e.masked_fill(before >= top_p * whole, 0.0)
    cs = e.cumsum(dim=1)
    return _inverse_cdf(cs, u.unsqueeze(1) * cs[:, -1:])


@dataclass(frozen=True)
class ChunkRefs:
    """Per vocabulary chunk of the sampling pass, the column that lse_ takes its log-sum-exp
    from: one whose logit is finite in every row, best a large one; None for a chunk that is
    -inf throughout (banned words and padding only), which gets no mass. Fixed per decoder, so
    that a row's numbers never depend on the other rows."""
    cols: tuple[int | None, ...]

    @classmethod
    def of(cls, row: torch.Tensor, width: int) -> ChunkRefs:
        """From a row whose -inf entries are those of every row of logits (the output layer's
        bias, with banned words and padding at -inf): per chunk the column of its largest value."""
        cols = ref_columns(row, width)
        return cls(tuple(c if bool(row[i * width + c] > float("-inf")) else None for i, c in enumerate(cols)))


def chunk_lse(logits: torch.Tensor, width: int, refs: ChunkRefs) -> torch.Tensor:
    """(M, chunks): each row's log-sum-exp over each chunk of width columns of its logits (the
    lowest float for a chunk with no mass, so that exp(it - anything) is 0, not nan)."""
    m = logits.shape[0]
    lse = torch.full((m, len(refs.cols)), torch.finfo(logits.dtype).min, dtype=logits.dtype,
                     device=logits.device)
    buf = torch.empty(m, width, dtype=logits.dtype, device=logits.device)
    for c, col in enumerate(refs.cols):
        if col is not None:
            lse_(buf.copy_(logits[:, c * width : (c + 1) * width]), lse[:, c], col)
    return lse


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams, width: int,
                refs: ChunkRefs) -> torch.Tensor:
    """One token per row of (M, Vp) logits, already divided by the temperature, banned and
    padding columns at -inf, Vp a multiple of width; u: (M,) uniforms in [0, 1); refs: the
    chunks' reference columns (ChunkRefs.of the pattern of -inf)."""
    if params.greedy:
        return logits.argmax(dim=1)
    u = u.to(device=logits.device, dtype=logits.dtype)
    m, vp = logits.shape
    if params.top_k:
        k = min(params.top_k, vp)
        vals, idx = torch.topk(logits, k, dim=1)
        return idx.gather(1, _sample_sorted(vals, u, params.top_p).unsqueeze(1)).squeeze(1)
    lse = chunk_lse(logits, width, refs)
    if params.top_p < 1.0:
        top = lse.amax(dim=1, keepdim=True)  # the row's largest logit or more, up to rounding
        total = torch.exp(lse - top).sum(dim=1, keepdim=True)
        return _top_p(logits, u, params.top_p, top, total)
    at = torch.arange(m, device=logits.device) * (vp // width)  # row r's chunk c: row at[r] + c
    by_chunk = logits.reshape(-1, width)
    return sample_by_chunks(lse, u, lambda chunk: by_chunk.index_select(0, at + chunk), width)


def sample_by_chunks(lse: torch.Tensor, u: torch.Tensor, chunk_logits: Callable[[torch.Tensor], torch.Tensor],
                     width: int) -> torch.Tensor:
    """Inverse CDF in two levels: the chunk from the chunks' log-sum-exps (M, chunks), then the
    word inside it; chunk_logits(chunk ids (M,)) gives each row's chosen chunk (M, width). Only
    one chunk per row is looked at twice."""
    mass = torch.exp(lse - lse.amax(dim=1, keepdim=True))  # (M, chunks), relative to the largest
    cum = mass.cumsum(dim=1)
    target = (u.unsqueeze(1) * cum[:, -1:]).clamp_min(CDF_FLOOR)
    chunk = _inverse_cdf(cum, target)
    col = chunk.unsqueeze(1)
    before = cum.gather(1, col) - mass.gather(1, col)
    frac = ((target - before) / mass.gather(1, col)).clamp_(0.0, 1.0)
    cdf = floored_exp_(chunk_logits(chunk) - lse.gather(1, col)).cumsum(dim=1)
    return chunk * width + _inverse_cdf(cdf, frac * cdf[:, -1:])


def _top_p(logits: torch.Tensor, u: torch.Tensor, top_p: float, ref: torch.Tensor,
           total: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling without sorting whole rows unless the nucleus is that large."""
    m, vp = logits.shape
    out = torch.empty(m, dtype=torch.long, device=logits.device)
    rows = torch.arange(m, device=logits.device)
    for k in (*[c for c in TOP_P_CANDIDATES if c < vp], vp):
        sub = logits if len(rows) == m else logits[rows]
        if k < vp:
            vals, idx = torch.topk(sub, k, dim=1)
            mass = floored_exp_(vals - ref[rows]).cumsum(dim=1)[:, -1]  # as _sample_sorted sums it
            covered = mass >= top_p * total[rows].squeeze(1)
        else:
            vals, idx = torch.sort(sub, dim=1, descending=True, stable=True)
            covered = torch.ones(len(rows), dtype=torch.bool, device=logits.device)
        if bool(covered.any()):
            pos = _sample_sorted(vals[covered], u[rows][covered], top_p, ref[rows][covered],
                                 total[rows][covered])
            out[rows[covered]] = idx[covered].gather(1, pos.unsqueeze(1)).squeeze(1)
        rows = rows[~covered]
        if len(rows) == 0:
            break
    return out
