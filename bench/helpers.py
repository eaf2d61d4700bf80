"""The parts of bench.py that need torch, run as child processes so that the driver stays small
(a child's ru_maxrss starts from the parent's peak RSS at fork time):

    python bench/helpers.py peak [--size 2048]          # matmul GFLOP/s, fp32 and bf16
    python bench/helpers.py ceiling [--vocab 40135]     # each job's matmuls at their real shapes
    python bench/helpers.py setup --data DIR            # warm and time the token cache
    python bench/helpers.py checkpoints --data DIR --work DIR [--checkpoint RUN]

Each prints one JSON line; bench.py (context.Bench.helper) runs them and reads it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from ceiling import ceiling
from context import EVAL_STRIDE
from generate_speed import notebook_ids, notebook_model, save_reference_checkpoint

from lmcore.config import DataConfig
from lmcore.data.cache import cache_root, fit_tokenizer, load_split, strided
from lmcore.runtime.precision import cpu_has_vnni, cpu_supports


def peak(size: int) -> dict[str, Any]:
    """size x size matmul GFLOP/s in fp32 and bf16: best and median of 10, after 3 warm-ups. bf16
    only where the CPU has it natively (oneDNN's reference path ran 0.3 GFLOP/s on an AVX2 EPYC:
    ten minutes for this loop); elsewhere its figures are None."""
    out: dict[str, Any] = {"size": size, "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "bf16_gflops": None, "bf16_gflops_median": None}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if not cpu_supports(name):
            continue
        x = torch.randn(size, size).to(dtype)
        y = torch.randn(size, size).to(dtype)
        for _ in range(3):
            x @ y
        times = []
        for _ in range(10):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        flops = 2 * size**3
        out[f"{name}_gflops"] = round(flops / min(times) / 1e9, 1)
        out[f"{name}_gflops_median"] = round(flops / statistics.median(times) / 1e9, 1)
    out["higher"] = "bf16" if (out["bf16_gflops"] or 0) > out["fp32_gflops"] else "fp32"
    return out


def setup(data: str) -> dict[str, Any]:
    """Fit the tokenizer and encode both splits through lmcore's token cache, timing each; the
    validation set's size (every EVAL_STRIDE-th test review) for the ttq and eval checks."""
    cfg = DataConfig(source=data)
    root = cache_root(cfg)

    def entries() -> set[str]:
        return {str(q) for sub in ("tokenizers", "splits") if (root / sub).is_dir()
                for q in (root / sub).iterdir()}

    before = entries()
    t = time.perf_counter()
    tok = fit_tokenizer(cfg)
    tok_s = time.perf_counter() - t
    t = time.perf_counter()
    load_split(cfg, "train", tok)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    test = load_split(cfg, "test", tok)
    test_s = time.perf_counter() - t
    val = strided(test, EVAL_STRIDE)
    lens = val.lengths()
    targets = int(sum(min(int(n), cfg.truncate) + 1 for n in lens))
    return {"cache": str(root), "built_new_entries": len(entries() - before),
            "tokenizer_s": round(tok_s, 2), "encode_train_s": round(train_s, 2),
            "encode_test_s": round(test_s, 2), "vocab": len(tok),
            "native": {p: cpu_supports(p) for p in ("bf16", "fp16")}, "vnni": cpu_has_vnni(),
            "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "val_reviews": len(val), "val_targets": targets}


def checkpoints(data: str, checkpoint: str, work: Path) -> dict[str, Any]:
    """An lmcore checkpoint (given, or random weights) and the reference's copy of it."""
    model, tok, ckpt, weights = notebook_model(checkpoint, data, work / "random_run")
    ref = work / "reference_lm.pt"
    save_reference_checkpoint(model, notebook_ids(tok, data), ref)
    return {"checkpoint": str(ckpt), "reference_checkpoint": str(ref), "weights": weights}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/helpers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=["peak", "ceiling", "setup", "checkpoints"])
    p.add_argument("--vocab", type=int, default=40135)
    p.add_argument("--min-seconds", type=float, default=0.25, help="ceiling: seconds per timing")
    p.add_argument("--data")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--checkpoint", default="")
    p.add_argument("--work")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.name == "peak":
        out = peak(a.size)
    elif a.name == "ceiling":
        out = ceiling(a.vocab, a.min_seconds)
    elif a.name == "setup":
        out = setup(a.data)
    else:
        out = checkpoints(a.data, a.checkpoint, Path(a.work))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
