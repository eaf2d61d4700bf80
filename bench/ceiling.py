"""The machine's own ceiling for each job: every matmul of a training step, an eval batch and a
generation step at its real shape and operand layout, timed in fp32, bf16, fp16 and (inference
only) int8, and combined by FLOPs into the job's ceiling: the model FLOP rate a job would reach
if it spent its whole time in these matmuls at the speed measured here.

    python bench/helpers.py ceiling [--vocab 40135]     # one JSON line (bench.py's peak section)

A 2048x2048 matmul says little about a step whose largest matmul is 128 x 257 @ 257 x 40,135:
measured here (AMX machine, 2 threads) the square one runs bf16 at ~3x fp32 while the loss's
weight-gradient matmul gains far less. The job's ceiling in one precision is
sum(FLOPs) / sum(FLOPs_i / rate_i); "best" takes the LSTM's matmuls together in the faster of
fp32 and bf16 (autocast runs them alike) and each output-layer matmul in its fastest precision
(int8 only where lmcore runs it: the generation output layer). What the ceiling leaves out
(the softmax's exp pass, the optimizer, Python) is what a job loses below it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from lmcore.loss import COLS, FORWARD_ROWS, GRAD_W_ROWS
from lmcore.runtime.precision import cpu_supports

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Matmul:
    """C (m x n) = A (m x k) @ B (k x n); a_t / b_t: the operand is a transposed view, as the job
    passes it; per_token: how many of these one real token costs (1 / rows it covers)."""

    name: str
    m: int
    k: int
    n: int
    per_token: float
    a_t: bool = False
    b_t: bool = False
    int8: bool = False  # lmcore has an int8 kernel for it (torch._int_mm, generation's output layer)
    k_bf16: int = 0  # bf16 runs it with this inner size instead (the same FLOPs in fewer, larger calls)

    @property
    def flops_per_token(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.per_token


def train_matmuls(vocab: int, emb: int, hidden: int, streams: int, seq: int, chunk: int) -> list[Matmul]:
    """Packed training (every row a real token): the LSTM's input projection over the whole
    window, its recurrent matmul per time step, their gradients, and the fused loss's three
    matmuls per chunk (lmcore/loss.py: the bias folded in as one more input column)."""
    rows, g = streams * seq, 4 * hidden
    return [
        Matmul("lstm_ih", rows, emb, g, 1 / rows, b_t=True),
        Matmul("lstm_hh", streams, hidden, g, 1 / streams, b_t=True),
        Matmul("lstm_ih_grad_x", rows, g, emb, 1 / rows),
        Matmul("lstm_ih_grad_w", g, rows, emb, 1 / rows, a_t=True),
        Matmul("lstm_hh_grad_h", streams, g, hidden, 1 / streams),
        Matmul("lstm_hh_grad_w", g, streams, hidden, 1 / streams, a_t=True),
        Matmul("out", chunk, hidden + 1, vocab, 1 / chunk, b_t=True),
        Matmul("out_grad_h", chunk, vocab, hidden, 1 / chunk),
        Matmul("out_grad_w", vocab, chunk, hidden + 1, 1 / chunk, a_t=True,
               k_bf16=max(chunk, GRAD_W_ROWS // chunk * chunk)),  # bf16: several chunks per matmul
    ]


def eval_matmuls(vocab: int, emb: int, hidden: int, reviews: int, seq: int) -> list[Matmul]:
    """An eval batch: forward only, the loss in FORWARD_ROWS-row chunks of COLS-word blocks
    (lmcore/loss.py: forward_only)."""
    rows, g = reviews * seq, 4 * hidden
    return [Matmul("lstm_ih", rows, emb, g, 1 / rows, b_t=True),
            Matmul("lstm_hh", reviews, hidden, g, 1 / reviews, b_t=True),
            Matmul("out", FORWARD_ROWS, hidden + 1, min(COLS, vocab), vocab / min(COLS, vocab) / FORWARD_ROWS,
                   b_t=True)]


def gen_matmuls(vocab: int, emb: int, hidden: int, rows: int, int8_rows: int) -> list[Matmul]:
    """One decoding step of `rows` rows: the LSTM cell and the output layer (int8 in blocks of
    int8_rows rows, as lmcore/gen/decoder.py runs it)."""
    g = 4 * hidden
    return [Matmul("lstm_ih", rows, emb, g, 1 / rows, b_t=True),
            Matmul("lstm_hh", rows, hidden, g, 1 / rows, b_t=True),
            Matmul("out", rows, hidden, vocab, 1 / rows, b_t=True),
            Matmul("out_int8", int8_rows, hidden, vocab, 1 / int8_rows, b_t=True, int8=True)]


def _operands(mm: Matmul, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    def make(r: int, c: int, transposed: bool) -> torch.Tensor:
        if dtype == torch.int8:
            t = torch.randint(-127, 128, (c, r) if transposed else (r, c), dtype=torch.int8)
        else:
            t = torch.randn((c, r) if transposed else (r, c)).to(dtype)
        return t.t() if transposed else t

    k = mm.k_bf16 if mm.k_bf16 and dtype == torch.bfloat16 else mm.k
    return make(mm.m, k, mm.a_t), make(k, mm.n, mm.b_t)


def gflops(mm: Matmul, dtype: torch.dtype, min_seconds: float, repeats: int = 5) -> dict[str, float]:
    """Best and median GFLOP/s of `repeats` timings, each as many calls as fill min_seconds."""
    a, b = _operands(mm, dtype)
    k = a.shape[1]
    out = torch.empty(mm.m, mm.n, dtype=torch.int32 if dtype == torch.int8 else dtype)
    if dtype == torch.int8:
        def call() -> None:
            torch._int_mm(a, b, out=out)
    else:
        def call() -> None:
            torch.mm(a, b, out=out)
    call()
    t = time.perf_counter()
    call()
    calls = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        rates.append(2.0 * mm.m * k * mm.n * calls / (time.perf_counter() - t) / 1e9)
    return {"best": round(max(rates), 1), "median": round(statistics.median(rates), 1)}


# Only what this CPU runs natively: lmcore refuses bf16 and fp16 elsewhere (runtime/precision.py).
NATIVE = tuple(p for p in PRECISIONS if cpu_supports(p))
LSTM_PRECISIONS = tuple(p for p in ("fp32", "bf16") if p in NATIVE)  # fp32 or bf16 autocast, all six alike
OUT_PRECISIONS = {job: tuple(p for p in ps if p in NATIVE or p == "int8")  # the output layer's, each alone
                  for job, ps in {"train": ("fp32", "bf16", "fp16"), "eval": ("fp32", "bf16", "fp16"),
                              "gen": ("fp32", "bf16", "int8")}.items()}


def job_ceiling(job: str, matmuls: list[Matmul], min_seconds: float) -> dict[str, Any]:
    """Each matmul timed in each precision, and the job's ceiling: in one precision throughout
    (fp32, bf16, fp16), and "best": the LSTM's matmuls together in the faster of fp32 and bf16,
    each output-layer matmul in its fastest of OUT_PRECISIONS[job] (int8: the out_int8 row)."""
    rows, total = {}, sum(m.flops_per_token for m in matmuls if not m.int8)
    for mm in matmuls:
        names = ("int8",) if mm.int8 else NATIVE
        shape = f"{mm.m}x{mm.k} @ {mm.k}x{mm.n}" + (f" (bf16: {mm.m}x{mm.k_bf16} @ {mm.k_bf16}x{mm.n})"
                                                      if mm.k_bf16 and "bf16" in names else "")
        rows[mm.name] = {"shape": shape, "a_t": mm.a_t, "b_t": mm.b_t,
                         "gflop_per_token": round(mm.flops_per_token / 1e9, 6),
                         **{p: gflops(mm, torch.int8 if p == "int8" else PRECISIONS[p], min_seconds)
                            for p in names}}
    floats = [m for m in matmuls if not m.int8]

    def seconds(mm: Matmul, p: str) -> float:
        row = rows[mm.name + "_int8"] if p == "int8" else rows[mm.name]
        return mm.flops_per_token / (row[p]["best"] * 1e9)

    ceilings = {p: round(total / sum(seconds(m, p) for m in floats) / 1e9, 1) for p in NATIVE}
    lstm = [m for m in floats if m.name.startswith("lstm")]
    lstm_p = min(LSTM_PRECISIONS, key=lambda p: sum(seconds(m, p) for m in lstm))
    choice = {"lstm": lstm_p}
    best_secs = sum(seconds(m, lstm_p) for m in lstm)
    for mm in (m for m in floats if not m.name.startswith("lstm")):
        options = [p for p in OUT_PRECISIONS[job] if p != "int8" or mm.name + "_int8" in rows]
        choice[mm.name] = min(options, key=lambda p, mm=mm: seconds(mm, p))
        best_secs += seconds(mm, choice[mm.name])
    ceilings["best"] = round(total / best_secs / 1e9, 1)
    return {"matmuls": rows, "gflop_per_token": round(total / 1e9, 6), "ceiling_gflops": ceilings,
            "best_choice": choice}


def ceiling(vocab: int, min_seconds: float = 0.25, emb: int = 300, hidden: int = 256, streams: int = 32,
            seq: int = 256, chunk: int = 128, eval_reviews: int = 64, gen_rows: int = 256,
            int8_rows: int = 128) -> dict:
    """The three jobs' ceilings at the notebook's model size (bench.py's train, eval and gen);
    each timing fills min_seconds."""
    jobs = {"train": train_matmuls(vocab, emb, hidden, streams, seq, chunk),
            "eval": eval_matmuls(vocab, emb, hidden, eval_reviews, seq),
            "gen": gen_matmuls(vocab, emb, hidden, gen_rows, int8_rows)}
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "vocab": vocab,
            "min_seconds": min_seconds,
            **{job: job_ceiling(job, mms, min_seconds) for job, mms in jobs.items()}}
