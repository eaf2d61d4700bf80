"""Precisions: what is fast on this hardware (generate.precision and eval.precision `auto`), and
the precision of each matmul of the fused loss (train.loss_precision).

With the full softmax, three matmuls per chunk of rows dominate a training step: the logits
(chunk x hidden+1 @ hidden+1 x vocab), the input gradient (chunk x vocab @ vocab x hidden) and the
weight gradient (vocab x chunk @ chunk x hidden+1, a transposed operand). Which precision is
fastest differs per matmul and per CPU: measured on a 2-core AVX512-FP16 machine without AMX
(torch 2.13, 2 threads), the 128-row weight-gradient matmul ran 136 GFLOP/s in fp32 and 259 in
fp16 while the input-gradient one was about equal; with AMX, bf16 is far ahead. So "auto" times
the fused loss itself (forward and backward of one chunk at the run's shape: the casts, the
bias pass and fp16's scaling included) with each matmul in fp32, bf16 and fp16 in turn, keeps a
lower precision only where it saves at least MARGIN of the chunk's time, and checks the
combination (measured on the AMX machine of 2026-12-01, one 128-row chunk of the notebook's
model: 92.6 ms all fp32; a bf16 forward 57.8; a bf16 input gradient 108.8, the cast of the
chunk's 40,135-wide gradient costing more than its matmul saves; an fp16 weight gradient
80.5; the forward and the weight gradient together no faster than all fp32, so the best single
change wins: the bf16 forward). That takes a few seconds, once per machine: the result is cached by CPU, torch
version, threads and shape (delete CACHE/precision/ to measure again). The run keeps its choice
in its train state, so every rank and every resume uses the same one (a requeue onto another
kind of node changes nothing: bit-exact resume holds).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from lmcore import fileio
from lmcore.errors import ConfigError
from lmcore.loss import MATMULS, Dtypes, linear_cross_entropy

NAMES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MARGIN = 0.05  # a lower precision must save 5% of a chunk's time: timings differ by ~2-3% run to run
CACHE_VERSION = 4  # 3: the uniform candidates; 4: measured again after the grouped bf16 weight gradient


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def cpu_fast_bf16(vendor: str | None = None, flags: set[str] | None = None) -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU (or on one with this vendor_id and flags).
    Measured here (2 threads, 2048^2, GFLOP/s):
    Intel with AMX, bf16 705-927 against fp32 220-284; AMD with AVX512_BF16 (an EPYC without
    AVX512_FP16, 2026-12-06), 415 against 183, and 320 against 74-80 at the fused loss's shapes;
    but Intel's AVX512_BF16 without AMX, 150-175 against 280-350 (2026-11-28, 12-01)."""
    vendor = _cpuinfo("vendor_id") if vendor is None else vendor
    flags = cpu_flags() if flags is None else flags
    return "amx_bf16" in flags or ("avx512_bf16" in flags and vendor == "AuthenticAMD")


def cpu_has_vnni() -> bool:
    """Whether oneDNN has a fast int8 matmul here: without VNNI, torch._int_mm at generation's
    output shape ran 4.0 GOP/s against fp32's 58 (AVX2 EPYC, 2026-12-02)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def cpu_supports(name: str) -> bool:
    """Whether this CPU runs `name` natively through oneDNN. Without it (an AVX2-only CPU, such
    as the AMD EPYC VM of 2026-12-02) oneDNN has no bf16 LSTM at all ("could not create a
    primitive descriptor for the LSTM forward propagation primitive") and bf16 matmuls fall back
    to a reference path: 2048^2 at 0.3 GFLOP/s there against fp32's 106."""
    if name == "fp32":
        return True
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[name]
    return bool(getattr(torch.ops.mkldnn, check)())


def require_supported(name: str, device: torch.device | str, setting: str) -> None:
    """A one-line ConfigError where `setting`=`name` cannot run on this device's hardware."""
    if torch.device(device).type == "cpu" and not cpu_supports(name):
        raise ConfigError(f"{setting}={name}: this CPU has no native {name} "
                          f"({torch.backends.cpu.get_cpu_capability()}): oneDNN has no bf16 LSTM there and "
                          f"runs such matmuls ~300x slower than fp32: use {setting}=auto or fp32")


def auto_precision(device: torch.device | str) -> str:
    """What is fast here: bf16 on CUDA (when supported) and on CPUs where bf16 matmuls beat fp32
    (cpu_fast_bf16: AMX, or AMD's AVX512_BF16), else fp32. A rule on the hardware, not a timing,
    so every task of a job decides the same."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_fast_bf16() and cpu_supports("bf16") else "fp32"
    return "fp32"


def eval_precision(setting: str, device: torch.device) -> tuple[str, Callable[[], AbstractContextManager]]:
    """eval.precision as (fp32 or bf16, a context factory for the forward passes in it): the
    eval job and validation during training both score this way."""
    precision = auto_precision(device) if setting == "auto" else setting
    require_supported(precision, device, "eval.precision")
    if precision == "fp32":
        return precision, nullcontext
    return precision, lambda: torch.autocast(device.type, dtype=NAMES[precision])


def dtypes_of(choice: str) -> Dtypes | None:
    """'fp16,fp32,fp16' (out, out_grad_h, out_grad_w) -> the dtypes; 'autocast' or '' -> None."""
    if choice in ("", "autocast"):
        return None
    parts = choice.split(",")
    if len(parts) != len(MATMULS) or any(p not in NAMES for p in parts):
        raise ValueError(f"a loss precision is 'autocast' or three of {', '.join(NAMES)}, comma-separated; "
                         f"got {choice!r}")
    return tuple(NAMES[p] for p in parts)  # type: ignore[return-value]


def resolve(setting: str, chunk: int, hidden: int, vocab: int, cache_dir: Path,
            device: str = "cpu") -> tuple[str, str]:
    """(the choice: 'autocast' or 'out,grad_h,grad_w'; a line saying why)."""
    if setting == "autocast":
        return "autocast", "the loss's matmuls follow train.mixed_precision"
    if setting in NAMES:
        require_supported(setting, device, "train.loss_precision")
        return ",".join([setting] * len(MATMULS)), f"all three loss matmuls in {setting}"
    lows = tuple(p for p in ("bf16", "fp16") if cpu_supports(p))
    if not lows:  # nothing to measure: a probe would spend minutes in oneDNN's reference path
        return ",".join(["fp32"] * len(MATMULS)), (
            f"auto: this CPU has no native bf16 or fp16 ({torch.backends.cpu.get_cpu_capability()}), "
            "so all three loss matmuls in fp32")
    ms = _cached_probe(chunk, hidden, vocab, cache_dir, lows)
    names = ("fp32", *lows)
    why = "; ".join(f"{m} {p} ({', '.join(f'{q} {ms[m][q]:.1f}' for q in names)} ms)"
                    for m, p in zip(MATMULS, ms["picks"], strict=True))
    uniform = ", ".join(f"all {p} {t:.1f} ms" for p, t in ms["uniform"].items())
    return ",".join(ms["picks"]), (f"auto, one {chunk}-row chunk forward and backward: {why}; {uniform}; "
                                   f"the choice {ms['combined']:.1f} ms")


def _machine() -> str:
    desc = [platform.machine(), platform.processor(), torch.backends.cpu.get_cpu_capability()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        desc += [ln.split(":", 1)[1].strip() for ln in lines
                 if ln.startswith(("model name", "flags", "Features", "CPU part"))][:3]
    except OSError:
        pass
    return " | ".join(desc)


def _cached_probe(chunk: int, hidden: int, vocab: int, cache_dir: Path, lows: tuple[str, ...]) -> dict:
    key = "\n".join(map(str, (CACHE_VERSION, _machine(), torch.__version__, torch.get_num_threads(),
                              chunk, hidden, vocab, ",".join(lows))))
    path = cache_dir / "precision" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and _well_formed(cached["ms"], lows):
            return cached["ms"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass  # absent or unreadable: measure again
    ms = probe(chunk, hidden, vocab, lows=lows)
    try:
        fileio.atomic_write_json(path, {"key": key, "ms": ms})
    except OSError as e:  # a cache that cannot be written costs the next run a few seconds
        warnings.warn(f"the loss-precision probe was not cached in {path} ({e.strerror or e}); the next "
                      "run measures again", stacklevel=2)
    return ms


def _well_formed(ms: dict, lows: tuple[str, ...]) -> bool:
    return (all(isinstance(ms[m][p], float) for m in MATMULS for p in ("fp32", *lows))
            and all(isinstance(ms["uniform"][p], float) for p in lows)
            and isinstance(ms["combined"], float) and len(ms["picks"]) == 3
            and set(ms["picks"]) <= {"fp32", *lows})


def probe(chunk: int, hidden: int, vocab: int, seconds: float = 0.1,
          lows: tuple[str, ...] = ("bf16", "fp16")) -> dict:
    """Milliseconds of the fused loss's forward and backward over one chunk at the run's shape:
    each matmul in fp32, bf16 and fp16 with the others in fp32; the picks (a lower precision
    where it saves MARGIN of the chunk's time; the best single change if the picks together do
    worse) and their time ('combined'). Best of 3 timings of `seconds` each."""
    h = torch.tanh(torch.randn(chunk, hidden)).requires_grad_()  # an LSTM's output
    w = (torch.randn(vocab, hidden) * 0.05).requires_grad_()
    b = torch.zeros(vocab, requires_grad=True)
    t = torch.randint(0, vocab, (chunk,))

    def ms_of(dtypes: Dtypes) -> float:
        def call() -> None:
            h.grad = w.grad = b.grad = None
            linear_cross_entropy(h, w, b, t, chunk, dtypes).backward()

        return round(_best_time(call, seconds) * 1e3, 3)

    base = ms_of((None, None, None))
    out: dict = {m: {"fp32": base} for m in MATMULS}
    for i, m in enumerate(MATMULS):
        for name in lows:
            dtypes = [None, None, None]
            dtypes[i] = NAMES[name]
            out[m][name] = ms_of(tuple(dtypes))  # type: ignore[arg-type]
    picks = [min(("fp32", *lows), key=lambda p, m=m: out[m][p] / (1.0 if p == "fp32" else 1 - MARGIN))
             for m in MATMULS]
    candidates = [(picks, ms_of(tuple(NAMES[p] for p in picks)) if picks != ["fp32"] * 3 else base)]
    # The savings need not add up (a low-precision forward gives up the folded bias, say), and
    # changes can pay together what neither pays alone (both gradient matmuls in bf16 share one
    # cast of the softmax gradient: measured on AMX, all-bf16 beat every single change): so also
    # the single change that saved most, and each precision throughout.
    m1, p1 = min(((m, p) for m in MATMULS for p in lows), key=lambda mp: out[mp[0]][mp[1]])
    single = ["fp32"] * 3
    single[MATMULS.index(m1)] = p1
    candidates.append((single, out[m1][p1]))
    out["uniform"] = {name: ms_of((NAMES[name],) * 3) for name in lows}
    candidates += [([name] * 3, t) for name, t in out["uniform"].items()]
    picks, combined = min(candidates, key=lambda c: c[1])
    if combined > base * (1 - MARGIN):
        picks, combined = ["fp32"] * 3, base
    out["combined"] = combined
    out["picks"] = picks
    return out


def _best_time(call, seconds: float) -> float:
    call()
    t = time.perf_counter()
    call()
    n = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            call()
        best = min(best, (time.perf_counter() - t) / n)
    return best
