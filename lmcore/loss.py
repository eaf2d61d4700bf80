"""Linear + cross-entropy in row chunks, never holding all logits at once.

With a 40k-word vocabulary the logits of one batch (5.7k real tokens) take 0.9 GB in
fp32, and reading and writing them several times (softmax, its gradient) costs more than
the matmuls. Here each chunk of rows is projected, turned into its loss *and* its
gradients while it is still in cache, and dropped; backward only scales the stored
gradients. Three matmuls per chunk, as the plain version, and memory of one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, dtype: torch.dtype | None, grad_enabled: bool
                ) -> torch.Tensor:
        # needs_input_grad is set even under no_grad: eval must not pay for gradients.
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:3])
        fp32 = dtype is None and h.dtype == weight.dtype == torch.float32 and (
            bias is None or bias.dtype == torch.float32)
        k = h.shape[1]
        fold = fp32 and bias is not None
        if fold:
            # The bias as one more input column: h gets a column of ones, the weight the bias.
            # The matmul then adds it (addmm would first copy it into every row of the logits,
            # one more pass over them), and the weight-gradient matmul yields the bias gradient
            # as its last column. Measured: 14% off the forward matmul of a 128-row chunk.
            w = torch.cat([weight, bias.unsqueeze(1)], dim=1)
            h_in = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        else:
            w = weight.to(dtype) if dtype is not None else weight
            h_in = h
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if needs_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if needs_grad and bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # One logits buffer for every chunk: a fresh tensor above glibc's mmap threshold
        # (32 MB) per chunk costs more in page faults than the softmax does.
        buf = torch.empty(min(chunk, h.shape[0]), weight.shape[0], dtype=torch.float32, device=h.device)
        for lo in range(0, h.shape[0], chunk):
            hc_c = h_in[lo : lo + chunk]
            hc_c = hc_c.to(dtype) if dtype is not None else hc_c
            logits = buf[: hc_c.shape[0]]
            if fp32:
                torch.mm(hc_c, w.t(), out=logits)
            else:
                logits.copy_(hc_c @ w.t())
                if bias is not None:
                    logits += bias.float()
            tc = targets[lo : lo + chunk].unsqueeze(1)
            row_max = logits.amax(dim=1, keepdim=True)
            total += (row_max - logits.gather(1, tc)).sum()
            mass = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)  # logits now exp(l - max)
            total += mass.log().sum()
            if needs_grad:
                # d(sum of losses)/d(logits) = softmax - one_hot, in place.
                logits.div_(mass)
                logits.scatter_add_(1, tc, torch.full_like(tc, -1.0, dtype=logits.dtype))
                if fp32:  # straight into the gradients, no temporaries
                    torch.mm(logits, w[:, :k], out=grad_h[lo : lo + chunk])
                    grad_w.addmm_(logits.t(), hc_c)
                else:
                    g = logits.to(dtype) if dtype is not None else logits
                    grad_h[lo : lo + chunk] = (g @ w).to(h.dtype)
                    grad_w += (g.t() @ hc_c).float()
                    if grad_b is not None:
                        grad_b += logits.sum(0)
        if needs_grad and fold:
            grad_b, grad_w = grad_w[:, k].contiguous(), grad_w[:, :k].contiguous()
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype),
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
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of softmax(h @ weight.T + bias) against targets, as float32.
    chunk = 0 uses the plain PyTorch path (all logits at once)."""
    if chunk <= 0 or h.shape[0] == 0:
        return F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")
    dtype = _compute_dtype(h.device.type)
    with torch.autocast(h.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, chunk, dtype,
                                                torch.is_grad_enabled())
