"""Perplexity over real tokens, sharded across ranks with exactly one process's answer.

Every review is scored on its own: `<bos>` + its first `truncate` words + `<eos>`, the
targets being those words and the `<eos>` (never padding). Batches are fixed by the data
alone (grouped by length) and dealt round-robin to ranks; each batch's summed NLL comes
back to every rank and is added with math.fsum, which is exact whatever the order, so
1 process and N processes give the same figure and no review is counted twice.

The notebook's own figure (torchmetrics' Perplexity over all 257 positions of its rows,
padding and the `<eos>` it puts after the padding included, as the notebook computes it) is
available for comparison only: it is not a perplexity of the text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmcore import fileio
from lmcore.checkpoint import resolve
from lmcore.config import Config
from lmcore.data.batching import eval_batches, review_rows, rows_to_batch
from lmcore.data.cache import TokenizedSplit, load_split, strided
from lmcore.data.tokenizer import WordTokenizer
from lmcore.errors import LmcoreError, write_failed
from lmcore.model import LSTMLM
from lmcore.rundir import RunDir
from lmcore.runtime.accelerator import lost_contact, make_accelerator, peer_gone
from lmcore.runtime.precision import eval_precision
from lmcore.track.wandb_init import open_tracker

NOTEBOOK_CHUNK = 512  # positions per chunk of the notebook figure's logits (80 MB at 40k words)


@dataclass
class EvalResult:
    masked_ppl: float
    masked_loss: float
    num_targets: int
    num_reviews: int
    seconds: float
    tokens_per_s: float
    notebook_unmasked_ppl: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def notebook_rows(docs: list[np.ndarray], tok: WordTokenizer, truncate: int) -> np.ndarray:
    """The notebook's rows: `<bos>` words, padding, and `<eos>` in the last column."""
    rows = np.full((len(docs), truncate + 2), tok.pad_id, dtype=np.int64)
    rows[:, 0] = tok.bos_id
    rows[:, -1] = tok.eos_id
    for r, d in enumerate(docs):
        d = d[:truncate]
        rows[r, 1 : len(d) + 1] = d
    return rows


def notebook_nll(model: LSTMLM, rows: torch.Tensor) -> tuple[float, int]:
    """The notebook's figure for one batch of its rows, computed as it computes it: torchmetrics'
    Perplexity (no ignore_index) on the logits of every position, pads and the <eos> after them
    included. In chunks of positions, so that a batch's logits never exist at once (16k positions
    x 40k words would be 2.6 GB)."""
    from torchmetrics.text import Perplexity  # here: its import pulls in matplotlib, +38 MB RSS, 0.7 s

    h, _ = model.features(rows[:, :-1])
    h, targets = h.reshape(-1, h.shape[-1]), rows[:, 1:].reshape(-1)
    metric = Perplexity().to(rows.device)
    for lo in range(0, len(h), NOTEBOOK_CHUNK):
        logits = model.logits(h[lo : lo + NOTEBOOK_CHUNK]).float()
        metric.update(logits.unsqueeze(0), targets[lo : lo + NOTEBOOK_CHUNK].unsqueeze(0))
    return float(metric.total_log_probs), int(metric.count)


def _sum_over_ranks(local: list[tuple[float, int]], num_batches: int, accelerator) -> tuple[float, int]:
    """Per-batch (nll, count) from every rank, added exactly."""
    world = accelerator.num_processes if accelerator is not None else 1
    if world == 1:
        return math.fsum(x for x, _ in local), sum(n for _, n in local)
    per_rank = math.ceil(num_batches / world)
    t = torch.zeros(per_rank, 2, dtype=torch.float64, device=accelerator.device)
    for j, (x, n) in enumerate(local):
        t[j, 0], t[j, 1] = x, n
    everything = accelerator.gather(t).cpu()  # gather, not gather_for_metrics: no duplicates made
    return math.fsum(everything[:, 0].tolist()), int(everything[:, 1].sum().item())


@torch.no_grad()
def evaluate(model: LSTMLM, split: TokenizedSplit, tok: WordTokenizer, batch_size: int,
             truncate: int, accelerator=None, notebook_figure: bool = False,
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> EvalResult:
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    groups = eval_batches(split, batch_size, truncate)
    mine = groups[rank::world]
    masked: list[tuple[float, int]] = []
    unmasked: list[tuple[float, int]] = []
    for idx in mine:
        docs = [split.doc(int(i)) for i in idx]
        batch = rows_to_batch(review_rows(docs, tok.bos_id, tok.eos_id, tok.pad_id, truncate), tok.pad_id)
        with autocast():
            # the class's forward: accelerate wraps a prepared model's own one in training's
            # autocast, and scoring is in the precision asked for here
            out = type(model).forward(model, batch.inputs.to(device), targets=batch.targets.to(device))
        masked.append((float(out.loss_sum), out.num_targets))
        if notebook_figure and truncate:
            rows = torch.from_numpy(notebook_rows(docs, tok, truncate)).to(device)
            with autocast():
                unmasked.append(notebook_nll(model, rows))
    nll, count = _sum_over_ranks(masked, len(groups), accelerator)
    seconds = time.perf_counter() - t0
    notebook_ppl = None
    if notebook_figure and truncate:
        u_nll, u_count = _sum_over_ranks(unmasked, len(groups), accelerator)
        notebook_ppl = perplexity(u_nll / u_count)
    model.train(was_training)
    loss = nll / max(count, 1)
    return EvalResult(
        masked_ppl=perplexity(loss), masked_loss=loss, num_targets=count, num_reviews=len(split),
        seconds=round(seconds, 3), tokens_per_s=round(count / seconds, 1) if seconds else 0.0,
        notebook_unmasked_ppl=notebook_ppl,
    )


def perplexity(loss: float) -> float:
    """exp(loss); inf past float's range (a diverged model), never an OverflowError."""
    return math.exp(loss) if loss < 709.0 else math.inf


def run_eval(cfg: Config) -> dict | None:
    """The eval job: checkpoint -> masked perplexity on cfg.eval.split -> JSON beside it.
    Returns the result on rank 0 (None elsewhere)."""
    acc = make_accelerator(cfg)
    ckpt = resolve(cfg.eval.checkpoint or cfg.run.dir, cfg.run.dir)
    model, tok = ckpt.build_model(acc.device)
    with acc.main_process_first():  # rank 0 builds the token cache, the others then read it
        split = load_split(cfg.data, cfg.eval.split, tok)
    split = strided(split, cfg.eval.stride, cfg.eval.limit)
    precision, autocast = eval_precision(cfg.eval.precision, acc.device)
    try:
        res = evaluate(model, split, tok, cfg.eval.batch_size, cfg.data.truncate, acc,
                       notebook_figure=cfg.eval.notebook_figure, autocast=autocast)
    except RuntimeError as e:  # a rank is gone: nothing was written
        if not peer_gone(e):
            raise
        raise lost_contact(acc.process_index, None, e, "nothing was written") from None
    out = {
        "checkpoint": str(ckpt.path), "split": cfg.eval.split, "data": cfg.data.source,
        "stride": cfg.eval.stride, "limit": cfg.eval.limit, "truncate": cfg.data.truncate,
        "world_size": acc.num_processes, "precision": precision, **res.to_dict(),
    }
    if out["notebook_unmasked_ppl"] is not None:
        out["notebook_unmasked_ppl_note"] = (
            "the notebook's figure: loss over every position of its padded rows, pads and the "
            "<eos> after the padding counted; not a perplexity of the text")
    if acc.is_main_process:
        path = ckpt.path / f"eval_{cfg.eval.split}.json"
        try:
            fileio.atomic_write_json(path, out)
        except OSError as e:
            raise LmcoreError(write_failed(path, e, f"the masked perplexity is {res.masked_ppl:.4f}",
                                           "run the eval again to keep the result", ckpt.path)) from None
        run = RunDir.of_checkpoint(ckpt.path)
        tracker = open_tracker(cfg, run.path if run else ckpt.path, job="eval", enabled=True)
        tracker.summary({f"eval/{cfg.eval.split}/{k}": v for k, v in out.items()
                         if k != "notebook_unmasked_ppl_note"})
        tracker.finish()
    acc.wait_for_everyone()
    return out if acc.is_main_process else None
