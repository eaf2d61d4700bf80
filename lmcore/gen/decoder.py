"""Batched, stateful sampling: read each prompt once, then feed one token per step.

The notebook re-ran the whole prefix for every new word, one prompt at a time, and
resampled until the draw was not `<unk>`. Here a batch of prompts is read once (sorted by
length, one LSTM step per position), the state is carried, and `<unk>`, `<pad>`, `<bos>`
get probability zero before sampling, which is exactly the distribution that resampling
produced (for `<unk>`; the other two never come out of a sensible model anyway).

Speed. Each new token costs one (rows x hidden) @ (hidden x vocab) matmul and one pass
over the logits: the temperature is folded into the output layer, the banned tokens are
-inf in its bias, and the draw is lmcore.gen.sampling's two-level inverse CDF (no sort unless
top-p needs one; greedy and top-k=1 are an argmax). With precision bf16 or int8 and plain
sampling the float logits are never written out at all (Decoder._fused_sample).

Determinism. Each row draws its uniforms from its own counter-based stream keyed by
(seed, prompt id, sample index) (`row_key`, `row_uniforms`: splitmix64 in numpy, the same
numbers on every machine and library version), one uniform per new token. What a row gets
must then not depend on which rows share its batch. On CPU that holds bit for bit because
every operation here is row-local and shape-stable:
  * matmuls always see at least MIN_ROWS rows (MKL takes another kernel, with other last
    bits, for fewer rows; from 16 rows on a row's result is the same whatever the batch);
  * the LSTM cell is written out with exp/tanh/+/*/÷ (torch's sigmoid gives other last bits
    depending on where an element sits in memory; exp and tanh do not);
  * reductions (max, sum, cumsum, topk) run per row.
These are measured properties of the torch/MKL build (tests/test_generate.py checks them:
batches of 1, 5 and 20 rows, shuffled, fp32 and bf16); another BLAS may break them, and
those tests would say so. On CUDA, rows are padded to a fixed count (the job's batch size),
so every step runs the same kernels; identity across batch sizes is not claimed there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmcore.data.tokenizer import WordTokenizer
from lmcore.errors import ConfigError
from lmcore.gen.sampling import ChunkRefs, SamplingParams, chunk_layout, pick_tokens, sample_by_chunks
from lmcore.loss import lse_
from lmcore.model import LSTMLM
from lmcore.runtime.precision import cpu_has_vnni, require_supported

MIN_ROWS = 16  # CPU matmuls with fewer rows use another MKL kernel (other last bits)
INT8_ROWS = 128  # rows per int8 output matmul: oneDNN's VNNI kernel is ~3x slower above ~192
# rows per block of the fused sampling pass: 2 MB of float logits at 2,048 words, 1 MB per
# thread's L2 on 2 threads. 256 rather than 128 halves the pass's small ops per step: int8
# generation's median 11,766 -> 12,513 new tokens/s, 8 runs each in 4 alternating calls (bench/
# generate_speed.py, 256 rows, AMD EPYC, 2 threads, 2026-12-07; bf16 10,045 -> 10,104)
MASS_ROWS = 256


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"


# -- the decoder ------------------------------------------------------------------------------
class Decoder:
    """Generation with a trained LSTMLM: weights laid out once, then any number of batches.

    precision: "fp32"; "bf16" (matmuls in bfloat16, LSTM cell and sampling in float32); or
    "int8" (the output layer only: weights int8 per vocabulary row, the LSTM output int8 at
    the fixed scale 1/127 since |h| < 1, integer products summed exactly in int32, then
    scaled back in float32; on this VNNI CPU its matmul takes ~0.4x fp32's time. Integer sums are
    exact, so a row's logits cannot depend on its batch.)
    fixed_rows: pad every step to this many rows (CUDA: the same kernels every step);
    0 = at least MIN_ROWS.
    """

    @staticmethod
    def check(model: LSTMLM, precision: str, device: torch.device | str | None = None) -> None:
        """Refuse a precision this model, this torch or this hardware cannot run (before a job
        claims anything)."""
        if precision not in ("fp32", "bf16", "int8"):
            raise ConfigError(f"generate.precision must be fp32, bf16 or int8 here, got {precision!r}")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if precision == "bf16":
            require_supported("bf16", device, "generate.precision")
        if precision == "int8" and not hasattr(torch, "_int_mm"):
            raise ConfigError(f"generate.precision=int8 needs torch._int_mm, which torch {torch.__version__} "
                              "lacks: use generate.precision=fp32")
        if precision == "int8" and model.adaptive is not None:
            raise ConfigError("generate.precision=int8 is for the full softmax; this model uses the adaptive "
                              "softmax: use generate.precision=fp32 or bf16")
        if precision == "int8" and device.type == "cpu" and not cpu_has_vnni():
            warnings.warn("generate.precision=int8 on a CPU without VNNI: its int8 matmul is ~15x slower "
                          "than fp32's there (measured on an AVX2 CPU): generate.precision=fp32 is faster",
                          stacklevel=2)

    def __init__(self, model: LSTMLM, tok: WordTokenizer, params: SamplingParams,
                 device: torch.device | str | None = None, precision: str = "fp32", fixed_rows: int = 0):
        self.check(model, precision, device)
        self.params = params
        self.tok = tok
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.int8 = precision == "int8"
        self._raw: torch.Tensor | None = None  # fused: the output matmul's own result (int32, bf16)
        self.mm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.fixed_rows = fixed_rows
        self._buf: torch.Tensor | None = None  # the logits of a step
        self.eos = tok.eos_id
        self.pad = tok.pad_id
        with torch.no_grad():
            dev, f32 = self.device, torch.float32
            lstm = model.lstm
            self.hidden = lstm.hidden_size
            self.emb = model.embedding.weight.detach().to(dev, f32).clone()
            self.layers = []
            for layer in range(lstm.num_layers):
                w_ih = getattr(lstm, f"weight_ih_l{layer}").detach().to(dev, f32)
                w_hh = getattr(lstm, f"weight_hh_l{layer}").detach().to(dev, f32)
                bias = (getattr(lstm, f"bias_ih_l{layer}").detach().to(dev, f32)
                        + getattr(lstm, f"bias_hh_l{layer}").detach().to(dev, f32))
                self.layers.append((w_ih.to(self.mm_dtype), w_hh.to(self.mm_dtype), bias))
            self.proj = None if model.proj is None else model.proj.weight.detach().to(dev, self.mm_dtype)
            self.fold = not params.greedy and params.temperature != 1.0  # divide by the temperature
            self.banned = [tok.unk_id, tok.pad_id, tok.bos_id]  # never emitted
            self.adaptive = model.adaptive
            self._layout_output(model)
        p = params
        # full softmax in bf16 or int8, plain sampling: the float logits never exist in full
        # (see _fused_sample)
        low = self.int8 and self.proj is None or self.mm_dtype == torch.bfloat16
        self.fused = (self.adaptive is None and low and not p.greedy and not p.top_k and p.top_p >= 1.0)

    # -- pieces -------------------------------------------------------------------------------
    def _layout_output(self, model: LSTMLM) -> None:
        """The output layer in sampling's chunks (self.width words each): for the full softmax
        its weight (divided by the temperature where that is folded in; int8: quantized per
        vocabulary row) and its bias, with banned words and padding columns at -inf; and each
        chunk's reference column (ChunkRefs)."""
        dev, f32 = self.device, torch.float32
        if self.adaptive is not None:  # adaptive softmax: its exact log-probabilities
            self.vocab = model.vocab_size
            self.width, n = chunk_layout(self.vocab)
            pattern = torch.zeros(n * self.width)  # where the log-probabilities are -inf
            pattern[self.banned] = float("-inf")
            pattern[self.vocab :] = float("-inf")
            self.refs = ChunkRefs.of(pattern, self.width)
            return
        w = model.head.weight.detach().to(dev, f32).clone()
        b = model.head.bias.detach().to(dev, f32).clone()
        b[self.banned] = float("-inf")
        if self.fold:  # into the output layer
            w /= self.params.temperature
            b /= self.params.temperature
        vocab = w.shape[0]
        self.width, n = chunk_layout(vocab)
        extra = n * self.width - vocab  # padding columns: weight 0, bias -inf
        if extra:
            w = torch.cat([w, w.new_zeros(extra, w.shape[1])])
            b = torch.cat([b, b.new_full((extra,), float("-inf"))])
        self.head_w = w.to(self.mm_dtype)
        self.head_b = b  # added in float32
        self.refs = ChunkRefs.of(b, self.width)
        if self.int8:
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # per vocabulary row
            self.head_q = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
            # a feature quantized as round(h * 127) (|h| < 1 when h is the LSTM's output)
            self.head_mult = scale / 127
            self.head_w = None

    def _rows(self, m: int) -> int:
        return max(m, self.fixed_rows or MIN_ROWS)

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T in the matmul precision, result in float32."""
        return torch.mm(x.to(self.mm_dtype), w.t()).float()

    def _cell(self, layer: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        w_ih, w_hh, bias = self.layers[layer]
        gates = self._mm(x, w_ih).add_(bias).add_(self._mm(h, w_hh))
        n = self.hidden
        # sigmoid as 1 / (1 + exp(-x)): exp, + and / give the same bits wherever a row sits
        sig = torch.exp(gates.neg()).add_(1.0).reciprocal_()
        i, f, o = sig[:, :n], sig[:, n:2 * n], sig[:, 3 * n:]
        g = torch.tanh(gates[:, 2 * n:3 * n])
        c2 = f * c + i * g
        return o * torch.tanh(c2), c2

    def _step(self, tokens: torch.Tensor, hs: list[torch.Tensor], cs: list[torch.Tensor]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = self.emb[tokens]
        new_h, new_c = [], []
        for layer in range(len(self.layers)):
            h, c = self._cell(layer, x, hs[layer], cs[layer])
            new_h.append(h)
            new_c.append(c)
            x = h
        return new_h, new_c

    def _logits(self, h_top: torch.Tensor) -> torch.Tensor:
        """(rows, Vp) float32 logits over the (padded) vocabulary, already divided by the
        temperature, banned and padding columns at -inf."""
        feat = h_top if self.proj is None else self._mm(h_top, self.proj)
        if self.adaptive is None:
            rows = feat.shape[0]
            if self._buf is None or self._buf.shape[0] < rows:
                # One buffer for every step: a fresh 40 MB tensor per step costs more in page
                # faults than the sampling pass does.
                self._buf = torch.empty(rows, self.head_b.shape[0], device=self.device)
            out = self._buf[:rows]
            if self.int8:
                return self._int8_logits(feat, out)
            if self.mm_dtype == torch.float32:
                return torch.addmm(self.head_b, feat, self.head_w.t(), out=out)
            return out.copy_(torch.mm(feat.to(self.mm_dtype), self.head_w.t())).add_(self.head_b)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mm_dtype == torch.bfloat16):
            logp = self.adaptive.log_prob(feat.float())
        logp = logp.float()
        logp[:, self.banned] = float("-inf")
        if self.fold:
            logp.div_(self.params.temperature)
        n = -(-self.vocab // self.width)
        if n * self.width > self.vocab:
            logp = F.pad(logp, (0, n * self.width - self.vocab), value=float("-inf"))
        return logp

    def _int8_logits(self, feat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.proj is None:  # the LSTM's output: |h| < 1, one fixed scale for every row
            q, row_scale = torch.round(feat * 127), None
        else:  # a projection's output is unbounded: q = round(feat * 127 / peak) per row, so
            # the logits take a factor peak (row-local, batch-free)
            row_scale = feat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
            q = torch.round(feat * 127 / row_scale)
        q = q.clamp_(-127, 127).to(torch.int8)
        acc = torch.empty(min(INT8_ROWS, len(q)), out.shape[1], dtype=torch.int32, device=out.device)
        for lo in range(0, len(q), INT8_ROWS):
            part = acc[: min(INT8_ROWS, len(q) - lo)]
            torch._int_mm(q[lo : lo + INT8_ROWS], self.head_q.t(), out=part)
            dest = out[lo : lo + INT8_ROWS]
            if row_scale is None:
                torch.addcmul(self.head_b, part, self.head_mult, out=dest)
            else:
                torch.mul(part, row_scale[lo : lo + INT8_ROWS], out=dest)
                torch.addcmul(self.head_b, dest, self.head_mult, out=dest)
        return out

    def _fused_sample(self, h_top: torch.Tensor, m: int, u: torch.Tensor) -> torch.Tensor:
        """Plain sampling without writing the float logits out: the output matmul's own result
        (int32 for int8, bfloat16 for bf16) is turned into float logits chunk by chunk, in a
        buffer that stays in cache, and reduced there to each chunk's log-sum-exp (lse_); afterwards
        only each row's chosen chunk is made again. The same numbers as _logits + pick_tokens
        (the same elementwise operations on the same values), two passes over 40 MB fewer."""
        feat = h_top if self.proj is None else self._mm(h_top, self.proj)
        rows, vp, w = len(feat), self.head_b.shape[0], self.width
        n = vp // w
        raw_dtype = torch.int32 if self.int8 else self.mm_dtype
        if self._raw is None or self._raw.shape[0] < rows:
            self._raw = torch.empty(rows, vp, dtype=raw_dtype, device=self.device)
        raw = self._raw[:rows]
        if self.int8:  # in blocks: oneDNN's VNNI kernel is ~3x slower above ~192 rows
            q = torch.round(feat * 127).clamp_(-127, 127).to(torch.int8)
            for lo in range(0, rows, INT8_ROWS):
                torch._int_mm(q[lo : lo + INT8_ROWS], self.head_q.t(), out=raw[lo : lo + INT8_ROWS])
        else:  # all rows in one matmul, as _logits does: the same bits
            torch.mm(feat.to(self.mm_dtype), self.head_w.t(), out=raw)
        mult = self.head_mult if self.int8 else None
        lse = torch.full((rows, n), torch.finfo(torch.float32).min, device=self.device)  # as chunk_lse
        buf = torch.empty(min(MASS_ROWS, rows), w, device=self.device)
        for lo in range(0, rows, MASS_ROWS):
            hi = min(lo + MASS_ROWS, rows)
            scratch = buf[: hi - lo]
            for c, ref in enumerate(self.refs.cols):
                if ref is None:
                    continue
                cols = slice(c * w, (c + 1) * w)
                self._float_logits(raw[lo:hi, cols], self.head_b[cols], None if mult is None else mult[cols],
                                   scratch)
                lse_(scratch, lse[lo:hi, c], ref)
        at = torch.arange(m, device=self.device) * n  # row r's chunk c is row r * n + c of (m * n, w)

        def chunk_logits(chunk: torch.Tensor) -> torch.Tensor:  # each row's chosen chunk again
            # (index_select: 0.40 ms a step against advanced indexing's 0.66, torch.profiler, 20
            # steps of 256 rows, int8, AMD EPYC 2026-12-07; the whole step's time moved within noise)
            return self._float_logits(raw[:m].reshape(m * n, w).index_select(0, at + chunk),
                                      self.head_b.view(n, w).index_select(0, chunk),
                                      None if mult is None else mult.view(n, w).index_select(0, chunk))

        return sample_by_chunks(lse[:m], u.to(torch.float32), chunk_logits, w)

    @staticmethod
    def _float_logits(raw: torch.Tensor, bias: torch.Tensor, mult: torch.Tensor | None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits from the output matmul's own result: bias + raw (bf16), or
        bias + raw x the vocabulary rows' scales (int8)."""
        if mult is None:  # a copy, then +=: a mixed-dtype torch.add took 2x as long (measured)
            return (raw.float() if out is None else out.copy_(raw)).add_(bias)
        return torch.addcmul(bias, raw, mult, out=out)

    def _read(self, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """State after `<bos>` + each prompt, rows in the given order (prompts read once:
        equal prompts share the work)."""
        unique: dict[tuple[int, ...], int] = {}
        which = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        seqs = [[self.tok.bos_id, *p] for p in unique]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first
        lens = torch.tensor([len(seqs[i]) for i in order])
        n_unique = len(seqs)
        width = int(lens[0])
        grid = torch.full((n_unique, width), self.pad, dtype=torch.long)
        for r, i in enumerate(order):
            grid[r, : len(seqs[i])] = torch.tensor(seqs[i])
        grid = grid.to(self.device)
        rows = self._rows(n_unique)
        zeros = torch.zeros(rows, self.hidden, device=self.device)
        hs = [zeros.clone() for _ in self.layers]
        cs = [zeros.clone() for _ in self.layers]
        if rows > n_unique:
            grid = torch.cat([grid, grid.new_full((rows - n_unique, width), self.pad)])
        for t in range(width):
            live = int((lens > t).sum())  # rows still reading: a prefix (longest first)
            m = self._rows(live)
            h2, c2 = self._step(grid[:m, t], [h[:m] for h in hs], [c[:m] for c in cs])
            for layer in range(len(self.layers)):
                hs[layer][:live] = h2[layer][:live]
                cs[layer][:live] = c2[layer][:live]
        back = torch.empty(n_unique, dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(n_unique)
        take = self._pad_index(back[torch.tensor(which)].to(self.device))
        return [h[take] for h in hs], [c[take] for c in cs]

    def _pad_index(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self._rows(len(idx))
        if rows > len(idx):
            idx = torch.cat([idx, idx[:1].expand(rows - len(idx))])
        return idx

    # -- the loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], uniforms: np.ndarray | torch.Tensor) -> list[Completion]:
        """Complete each prompt (token ids, `<bos>` not included) with up to max_new_tokens
        tokens; uniforms: (len(prompts), >= max_new_tokens), row i's draws."""
        n, steps = len(prompts), self.params.max_new_tokens
        if n == 0:
            return []
        if steps == 0:
            return [Completion([], "length") for _ in prompts]
        u_all = torch.as_tensor(np.asarray(uniforms)[:, :steps], dtype=torch.float64)
        if u_all.shape != (n, steps):
            raise ValueError(f"uniforms must be ({n}, >= {steps}); got {tuple(np.shape(uniforms))}")
        u_all = u_all.to(self.device)
        hs, cs = self._read(prompts)
        out = torch.zeros(n, steps, dtype=torch.long, device=self.device)
        ends = torch.full((n,), steps, dtype=torch.long, device=self.device)  # eos position
        alive = torch.arange(n, device=self.device)  # original row of each live state row
        for t in range(steps):
            m = len(alive)
            if self.fused:
                nxt = self._fused_sample(hs[-1], m, u_all[alive, t])
            else:
                logits = self._logits(hs[-1])[:m]
                nxt = pick_tokens(logits, u_all[alive, t], self.params, self.width, self.refs)
            out[alive, t] = nxt
            stop = nxt == self.eos
            if bool(stop.any()):
                ends[alive[stop]] = t
                keep = (~stop).nonzero().squeeze(1)
                alive, nxt = alive[keep], nxt[keep]
                if len(alive) == 0:
                    break
                take = self._pad_index(keep)
                hs = [h[take] for h in hs]
                cs = [c[take] for c in cs]
            if t == steps - 1:
                break
            hs, cs = self._step(self._pad_index_tokens(nxt), hs, cs)
        out_l, ends_l = out.cpu().tolist(), ends.cpu().tolist()
        return [Completion(row[:end], "eos" if end < steps else "length")
                for row, end in zip(out_l, ends_l, strict=True)]

    def _pad_index_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self._rows(len(tokens))
        if rows > len(tokens):
            tokens = torch.cat([tokens, tokens.new_full((rows - len(tokens),), self.pad)])
        return tokens
