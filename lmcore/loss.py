"""Linear + cross-entropy in row chunks, never holding all logits at once.

With a 40k-word vocabulary the logits of one batch (5.7k real tokens) take 0.9 GB in
fp32, and reading and writing them several times (softmax, its gradient) costs more than
the matmuls. Here each chunk of rows is projected, turned into its loss *and* its
gradients while it is still in cache, and dropped; backward only scales the stored
gradients. Three matmuls per chunk, as the plain version, and memory of one chunk.

Each of the three may run in its own precision (`dtypes`: fp32, bf16 or fp16, chosen by
train.loss_precision; lmcore/runtime/precision.py); the softmax, the loss and the sums of the
gradients stay in fp32, and fp16's gradient is scaled so that small probabilities survive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MATMULS = ("out", "out_grad_h", "out_grad_w")  # per chunk: logits, d/dh, d/dweight
FORWARD_ROWS, COLS = 1024, 2048  # rows per chunk and vocabulary columns per block of the forward-only loss
ROW_MULTIPLE = 64  # adaptive softmax under autocast: rows padded to this (_rows_padded)
LAST_CHUNK_MULTIPLE = 16  # a low-precision fused loss: its last chunk's rows padded to this
GRAD_W_ROWS = 512  # a bf16 weight gradient: rows of softmax gradient per matmul (_Operands)
FP16_RANGE = 60000.0  # below fp16's largest finite value, 65,504
F32 = torch.float32

Dtypes = tuple[torch.dtype | None, torch.dtype | None, torch.dtype | None]


def _autocast_dtypes(device_type: str) -> Dtypes:
    if torch.is_autocast_enabled(device_type):
        d = torch.get_autocast_dtype(device_type)
        return d, d, d
    return None, None, None


def fp16_grad_scale(rows: int, h_in: torch.Tensor, w: torch.Tensor) -> float:
    """The power of two the softmax gradient g is multiplied by before its cast to fp16 (and
    divided by after, exactly): as large as fp16's range allows for both gradient matmuls, so
    that small probabilities do not flush to zero. |g| <= 1 entrywise and sums to at most 2 per
    row, so a chunk's d/dweight entry is at most rows * max|h| and a d/dh entry 2 * max|w|."""
    bound = max(rows * float(h_in.abs().max()), 2.0 * float(w.abs().max()), 1e-30)
    return float(2.0 ** min(24, max(0, math.floor(math.log2(FP16_RANGE / bound)))))


class _Operands:
    """Each matmul's operands in its own precision (None: fp32), cast once per call, and the
    buffers a low-precision gradient needs, made once and reused by every chunk.

    A low-precision weight gradient is a matmul into a vocab x hidden buffer in that precision,
    then added to the fp32 sum: that add reads and writes 41 MB at the notebook's size, and
    took longer than the matmul (measured on the AMD EPYC of 2026-12-06, 2 threads, bf16, per
    128 rows: matmul 8.8 ms, add 14.5). So bf16 sums the softmax gradients of GRAD_W_ROWS rows
    (several chunks) in one matmul and one add: 23.4 ms per 128 rows -> 11.4 at 512. fp16 stays
    per chunk: its gradient's scale is bounded by the rows of one matmul (fp16_grad_scale)."""

    def __init__(self, h_in: torch.Tensor, w: torch.Tensor, k: int, rows: int, dtypes: Dtypes):
        self.dtypes = dtypes
        d_out, d_gh, d_gw = dtypes
        self.total = h_in.shape[0]
        self.w_out, self.h_out = w.to(d_out or F32), h_in.to(d_out or F32)
        self.out_lo = None if d_out is None else torch.empty(rows, w.shape[0], dtype=d_out, device=w.device)
        self.w_gh = w[:, :k].to(d_gh or F32)
        self.h_gw = h_in.to(d_gw or F32)
        self.scale = fp16_grad_scale(rows, h_in, w) if torch.float16 in (d_gh, d_gw) else 1.0
        # rows per weight-gradient matmul: whole chunks (the last group may be shorter)
        self.group = (min(self.total, max(rows, GRAD_W_ROWS // rows * rows)) if d_gw == torch.bfloat16
                      else rows)
        sizes = {d: rows for d in (d_gh,) if d is not None}
        if d_gw is not None:
            sizes[d_gw] = max(sizes.get(d_gw, 0), self.group)
        self.g_lo = {d: torch.empty(n, w.shape[0], dtype=d, device=w.device) for d, n in sizes.items()}
        self.gw_part = None if d_gw is None else torch.empty(w.shape, dtype=d_gw, device=w.device)

    def chunk_grads(self, g: torch.Tensor, rows: slice, grad_h: torch.Tensor, grad_w: torch.Tensor) -> None:
        """d/dh of the chunk's rows (into grad_h) and its part of d/dweight (added to grad_w)
        from its softmax gradient g (fp32), each matmul in its precision, summed in fp32."""
        _, d_gh, d_gw = self.dtypes
        r = g.shape[0]
        at = rows.start % self.group  # where the chunk sits in its weight-gradient group
        cast = {None: g}
        for d, buf in self.g_lo.items():
            part = buf[at : at + r] if d == d_gw else buf[:r]
            cast[d] = torch.mul(g, self.scale, out=part) if d == torch.float16 else part.copy_(g)
        if d_gh is None and grad_h.dtype == F32:
            torch.mm(g, self.w_gh, out=grad_h[rows])
        else:
            grad_h[rows] = cast[d_gh] @ self.w_gh
            if d_gh == torch.float16:
                grad_h[rows] *= 1.0 / self.scale  # a power of two: exact
        if d_gw is None:
            grad_w.addmm_(g.t(), self.h_gw[rows])
        elif at + r == self.group or rows.start + r == self.total:  # the group is complete
            first = rows.start - at
            torch.mm(self.g_lo[d_gw][: at + r].t(), self.h_gw[first : first + at + r], out=self.gw_part)
            grad_w.add_(self.gw_part, alpha=1.0 / self.scale if d_gw == torch.float16 else 1.0)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, dtypes: Dtypes) -> torch.Tensor:
        k = h.shape[1]
        # (a low-precision forward or weight gradient keeps the bias, and its gradient, in fp32)
        fold = (bias is not None and dtypes[0] is None and dtypes[2] is None
                and h.dtype == weight.dtype == bias.dtype == F32)
        w, h_in = _fold_bias(h, weight, bias, F32) if fold else (weight, h)
        n, pad = h.shape[0], _last_chunk_pad(h.shape[0], chunk, dtypes)
        if pad:  # zero rows, left out of the loss and of every gradient below
            h_in = torch.cat([h_in, h_in.new_zeros(pad, h_in.shape[1])])
            targets = torch.cat([targets, targets.new_zeros(pad)])
        rows_max = min(chunk, n + pad)
        ops = _Operands(h_in, w, k, rows_max, dtypes)
        grad_h = h.new_empty(n + pad, k)
        grad_w = torch.zeros_like(w, dtype=F32)
        grad_b = torch.zeros_like(bias, dtype=F32) if bias is not None and not fold else None
        b32 = None if bias is None or fold else bias.float()
        total = torch.zeros((), dtype=F32, device=h.device)
        # One logits buffer for every chunk: a fresh tensor above glibc's mmap threshold
        # (32 MB) per chunk costs more in page faults than the softmax does.
        buf = torch.empty(rows_max, weight.shape[0], dtype=F32, device=h.device)
        for lo in range(0, n + pad, chunk):
            rows = slice(lo, lo + chunk)
            logits = buf[: min(chunk, n + pad - lo)]
            real = min(chunk, n - lo)  # rows of this chunk that are not padding
            if ops.out_lo is None:
                torch.mm(ops.h_out[rows], ops.w_out.t(), out=logits)
                if b32 is not None:
                    logits += b32
            else:  # the cast to fp32 and the bias in one pass
                raw = torch.mm(ops.h_out[rows], ops.w_out.t(), out=ops.out_lo[: logits.shape[0]])
                _to_f32(raw, b32, logits)
            tc = targets[rows].unsqueeze(1)
            picked = logits.gather(1, tc)
            total += (softmax_lse_(logits) - picked)[:real].sum()  # logits now their softmax
            # d(sum of losses)/d(logits) = softmax - one_hot, in place, then straight into the
            # gradients (no temporaries in fp32).
            logits.scatter_add_(1, tc, torch.full_like(tc, -1.0, dtype=logits.dtype))
            logits[real:] = 0.0
            if grad_b is not None:
                grad_b += logits.sum(0)
            ops.chunk_grads(logits, rows, grad_h, grad_w)
        del ops, w, h_in, buf, logits  # before the copies below: 61 MB less at the peak (measured)
        if fold:
            grad_b, grad_w = grad_w[:, k].contiguous(), grad_w[:, :k].contiguous()
        ctx.save_for_backward(grad_h[:n], grad_w.to(weight.dtype),
                              grad_b.to(bias.dtype) if grad_b is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("linear_cross_entropy: no second backward through the same graph")
        ctx.backward_done = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # Scaled in place: these are this call's own buffers, and a 41 MB temporary each is
        # a round of page faults (backward runs once: the graph keeps no other use of them).
        for g in (grad_h, grad_w, grad_b):
            if g is not None:
                g.mul_(grad_out)
        return grad_h, grad_w, grad_b, None, None, None


def softmax_lse_(x: torch.Tensor) -> torch.Tensor:
    """Each row of x (fp32) turned into its softmax, in place; returns the rows' log-sum-exp
    (R, 1), from the row's max and its largest probability, exp(0) / sum(exp(x - max)), which is
    at least 1 / columns and so never underflows, as the target's can. ATen's softmax kernel takes
    one pass for the max and one fused pass for the exponentials, their sum and the division,
    with a faster exp than torch.exp's: measured on the AMD EPYC of 2026-12-07 (2 threads), 128 x
    40,135 rows: 2.5 ms against 5.0 for amax, sub, exp, sum and div as separate passes. Its
    relative error, about 1e-5 against float64, is beside fp32's sums. Every row is its own: no
    row's result depends on the others, or on how many there are."""
    row_max = torch.amax(x, dim=1, keepdim=True)
    if x.device.type == "cpu":  # in place (checked equal to out-of-place on this kernel)
        torch.ops.aten._softmax.out(x, 1, False, out=x)
    else:
        x.copy_(torch.softmax(x, dim=1))
    return row_max - torch.amax(x, dim=1, keepdim=True).log()


def _last_chunk_pad(n: int, chunk: int, dtypes: Dtypes) -> int:
    """Zero rows that round the last chunk up to a multiple of LAST_CHUNK_MULTIPLE when a matmul
    runs in bf16 or fp16: oneDNN builds a kernel for each new shape, and the last chunk's rows
    differ at every step (measured on the AMX VM, 2 threads: the first input-gradient matmul of a
    new row count took 30-56 ms, the next one 4.5-5.1; the forward and weight gradient less)."""
    last = n % chunk
    if last == 0 or all(d is None for d in dtypes):
        return 0
    return min(-last % LAST_CHUNK_MULTIPLE, chunk - last)


def _to_f32(raw: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = float32(raw) + bias: a copy, then += (a mixed-dtype torch.add takes 2x as long:
    5.4 ms against 1.4 + 1.1 for 256 x 40,960, measured)."""
    out.copy_(raw)
    if bias is not None:
        out += bias


def forward_only(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 chunk: int, dtype: torch.dtype | None) -> torch.Tensor:
    """The summed cross-entropy without gradients (eval, validation): per chunk of rows, the
    logits COLS columns at a time, each block reduced to its rows' log-sum-exp (lse_) and
    then a row's blocks combined; the target's logit is one dot product per row. Without
    gradients to keep, a chunk can have many more rows than training's (each weight block then
    serves more rows) while the logits buffer stays at one block (8 MB at 1024 x 2048). Measured
    on the AMX VM (2 threads, 64 x 256 positions of the notebook's model, median of 6,
    2026-12-02): fp32 7,269 -> 8,279 tokens/s and bf16 12,484 -> 15,228 against the training
    path (128-row chunks of all 40,135 columns); 128-row chunks in blocks were slower (6,228 and
    8,389). dtype: the matmul's precision (None: fp32); the bias rides in it (_fold_bias),
    and the logits, exponentials and sums are fp32."""
    w, h_in = _fold_bias(h, weight, bias, dtype)
    vocab, rows_max = w.shape[0], min(chunk, h.shape[0])
    refs = [0] * -(-vocab // COLS) if bias is None else ref_columns(bias, COLS)
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < vocab:  # as gather would say
        raise IndexError(f"linear_cross_entropy: a target outside [0, {vocab})")
    space = torch.empty(rows_max * min(COLS, vocab), dtype=F32, device=h.device)
    space_lo = None if dtype is None else torch.empty(space.shape, dtype=dtype, device=h.device)
    total = torch.zeros((), dtype=F32, device=h.device)
    for lo in range(0, h.shape[0], chunk):
        hc = h_in[lo : lo + chunk]
        r = hc.shape[0]
        # the target's logit from the matmul's own operands, in fp32: r dot products, not a
        # gather and a where in every block
        picked = (hc.float() * w.index_select(0, targets[lo : lo + r]).float()).sum(1)
        block_lse = torch.empty(r, -(-vocab // COLS), dtype=F32, device=h.device)
        for j, c0 in enumerate(range(0, vocab, COLS)):
            c1 = min(c0 + COLS, vocab)
            block = space[: r * (c1 - c0)].view(r, c1 - c0)  # contiguous at every width
            if space_lo is None:
                torch.mm(hc, w[c0:c1].t(), out=block)
            else:
                block.copy_(torch.mm(hc, w[c0:c1].t(), out=space_lo[: r * (c1 - c0)].view(r, c1 - c0)))
            lse_(block, block_lse[:, j], refs[j])
        total += (torch.logsumexp(block_lse, dim=1) - picked).sum()
    return total


def lse_(x: torch.Tensor, out: torch.Tensor, col: int = 0) -> torch.Tensor:
    """Each row's log-sum-exp of x (fp32) into out, x left as its log-softmax: ATen's log-softmax
    kernel in place (a pass for the max, one for the sum of exponentials, one writing x - max -
    log(sum); the same bits as out of place, checked), then lse = x[:, col] - log_softmax[:, col].
    No exponential is taken there, so nothing underflows; the subtraction is exact to a few ulps
    of |x[:, col] - lse|, least where column col holds a large logit (ref_columns), and x[:, col]
    must be finite. Two passes fewer than softmax_lse_ (its two maxes), and the kernel itself is
    faster: on the AMD EPYC of 2026-12-07 (2 threads, 1,024 x 2,048) 0.54 ms against softmax's
    0.59, and each max 0.05. x must be contiguous (the kernel in place assumes it); out may be a
    strided view."""
    if not x.is_contiguous():
        raise ValueError("lse_: x must be contiguous (a buffer of its own, not a column slice)")
    out.copy_(x[:, col])
    if x.device.type == "cpu":
        torch.ops.aten._log_softmax.out(x, 1, False, out=x)
    else:
        x.copy_(torch.log_softmax(x, dim=1))
    return out.sub_(x[:, col])


def ref_columns(bias: torch.Tensor, width: int) -> list[int]:
    """For lse_: per block of `width` columns, the column of its largest bias, a logit near the
    block's top, so that lse_'s subtraction loses the least (one argmax and one device sync)."""
    blocks = -(-len(bias) // width)
    padded = torch.full((blocks * width,), float("-inf"), dtype=bias.dtype, device=bias.device)
    padded[: len(bias)] = bias
    return padded.view(blocks, width).argmax(dim=1).tolist()


def _fold_bias(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, h) in the matmul's dtype (None: fp32), each written in one pass, with the bias as
    one more input column: h gets a column of ones, the weight the bias. The matmul then adds it
    (adding it after the matmul is one more pass over the logits: 2.1% of a bf16 eval's time in its
    profile; addmm first copies it into every row), and in training the weight-gradient matmul
    yields the bias gradient as its last column. Measured: 14% off the forward matmul of a 128-row
    chunk. In bf16 or fp16 the bias rides as two columns, its rounding and what that rounding
    left, so that the matmul's fp32 sum sees it to ~16 bits and not 8: the logits then carry only
    the rounding of the matmul's output."""
    d, k = dtype or F32, h.shape[1]
    extra = 0 if bias is None else 1 if d == F32 else 2
    w = torch.empty(weight.shape[0], k + extra, dtype=d, device=weight.device)
    h_in = torch.empty(h.shape[0], k + extra, dtype=d, device=h.device)
    w[:, :k].copy_(weight)
    h_in[:, :k].copy_(h)
    if extra:
        w[:, k].copy_(bias)
        h_in[:, k:] = 1.0
    if extra == 2:  # (0 where the bias is not finite: -inf - -inf would be nan)
        rest = bias.float() - w[:, k].float()
        w[:, k + 1].copy_(torch.where(torch.isfinite(bias), rest, 0.0))
    return w, h_in


def adaptive_cross_entropy(m: torch.nn.AdaptiveLogSoftmaxWithLoss, h: torch.Tensor, targets: torch.Tensor
                           ) -> torch.Tensor:
    """Summed cross-entropy of an adaptive softmax: -m(h, targets).output.sum(), the same steps as
    torch's forward, but with the log-softmaxes in fp32 whatever autocast gives the matmuls.
    (torch's own takes autocast's bf16 log-softmax of a cluster and then fails to mix it with its
    fp32 output, so lmcore ran it in fp32.) imdb_fast under bf16 autocast on the AMX VM (2
    threads): 0.204 s a step with this softmax in fp32, 0.156-0.185 with its matmuls in bf16
    (fp32 throughout: 0.237-0.27); the same validation perplexity per step (bench/README.md)."""
    output = torch.zeros(len(targets), dtype=F32, device=h.device)
    gather = torch.empty_like(targets)
    bounds = [0, *m.cutoffs]
    used = 0
    for i in range(len(bounds) - 1):
        mask = (targets >= bounds[i]) & (targets < bounds[i + 1])
        rows = mask.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        if i == 0:
            gather.index_copy_(0, rows, targets[mask])
        else:
            logp = F.log_softmax(_rows_padded(m.tail[i - 1], h.index_select(0, rows)).float(), dim=1)
            gather.index_fill_(0, rows, m.shortlist_size + i - 1)
            output.index_copy_(0, rows, logp.gather(1, (targets[mask] - bounds[i]).unsqueeze(1)).squeeze(1))
        used += rows.numel()
    if used != len(targets):
        raise IndexError(f"adaptive_cross_entropy: a target outside [0, {m.n_classes})")
    head = F.log_softmax(_rows_padded(m.head, h).float(), dim=1)
    output += head.gather(1, gather.unsqueeze(1)).squeeze(1)
    return -output.sum()


def _rows_padded(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), with x's rows padded to a multiple of ROW_MULTIPLE and the result cut back: bf16
    matmuls (oneDNN) build a kernel for each new shape, and a batch's rows per cluster differ at
    every step (measured: 40-88 ms for one 265 x 16 @ 16 x 30,135 tail matmul, against 1.6)."""
    pad = -x.shape[0] % ROW_MULTIPLE
    if pad == 0 or not torch.is_autocast_enabled(x.device.type):  # (fp32 gains nothing: measured)
        return layer(x)
    return layer(torch.cat([x, x.new_zeros(pad, x.shape[1])]))[: x.shape[0]]


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int = 1024, dtypes: Dtypes | None = None
                         ) -> torch.Tensor:
    """Summed cross-entropy of softmax(h @ weight.T + bias) against targets, as float32.
    chunk = 0 uses the plain PyTorch path (all logits at once). dtypes: the precision of the
    forward, input-gradient and weight-gradient matmuls (None each: fp32); by default autocast's."""
    if chunk <= 0 or h.shape[0] == 0:
        return F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")
    if dtypes is None:
        dtypes = _autocast_dtypes(h.device.type)
    with torch.autocast(h.device.type, enabled=False):
        # (requires_grad is set under no_grad too: eval must not pay for gradients)
        wants_grad = any(x is not None and x.requires_grad for x in (h, weight, bias))
        if not (torch.is_grad_enabled() and wants_grad):
            return forward_only(h, weight, bias, targets, max(chunk, FORWARD_ROWS), dtypes[0])
        return _ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, chunk, dtypes)
