"""train: training at the notebook's model size with the full softmax. The reference
(`seed_reference.py train --steps N`, run before and after ours: ref_train.py) against
configs/imdb_seed.yaml (padded, fp32) and its packed / bf16 / loss_precision=auto variants:
real (non-pad) tokens/s, seconds per step, peak RSS of each training process, and the model FLOP
rate as a fraction of the step's own ceiling (bench/ceiling.py, measured in the peak section).

Timed: the optimizer steps only, steady state (the first --warmup-steps left out). Ours from
train_seconds/tokens_seen in metrics.jsonl, logged every step (validation and checkpoint
writes excluded); the reference's from the difference of two of its runs (ref_train.py).
"""

from __future__ import annotations

import statistics
from typing import Any

from children import proc_fields, read_jsonl
from context import TARGETS, Bench
from report import table

from . import peak
from .ref_train import reference_training

TRAIN_VARIANTS = {
    "seed": ("configs/imdb_seed.yaml as is: padded, fp32", []),
    "packed": ("packed 32 x 256-token windows, fp32", ["data.batching=packed"]),
    "bf16": ("padded, bf16 autocast", ["train.mixed_precision=bf16"]),
    "packed_bf16": ("packed, bf16 autocast", ["data.batching=packed", "train.mixed_precision=bf16"]),
    "packed_auto": ("packed, fp32 LSTM, each loss matmul in its fastest precision",
                    ["data.batching=packed", "train.loss_precision=auto"]),
    "packed_bf16_auto": ("packed, bf16 LSTM, each loss matmul in its fastest precision",
                         ["data.batching=packed", "train.mixed_precision=bf16", "train.loss_precision=auto"]),
}


def model_flops_per_token(vocab: int, emb: int = 300, hidden: int = 256) -> int:
    return 6 * (vocab * hidden + 4 * hidden * (emb + hidden))


def our_train_run(b: Bench, variant: str) -> dict:
    desc, overrides = TRAIN_VARIANTS[variant]
    run_dir = b.fresh(f"train-{variant}")
    n, w = b.args.our_steps, b.args.warmup_steps
    c = b.child(f"ours-train-{variant}", b.lmcore(
        "train", "configs/imdb_seed.yaml", f"run.dir={run_dir}", f"train.max_steps={n}",
        "train.log_interval=1", "train.eval_interval=0", "data.val_split=",
        f"train.checkpoint_interval={n + 1}", "train.resume=never", *overrides))
    rows = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_seconds" in r}
    last, warm = rows[n], rows[w]
    dt = last["train_seconds"] - warm["train_seconds"]
    run = {"variant": variant, "what": desc, "overrides": overrides, "steps": n,
           "train_s": round(last["train_seconds"], 3),
           "s_per_step": round(dt / (n - w), 3),
           "real_tokens_per_s": round((last["tokens_seen"] - warm["tokens_seen"]) / dt, 1),
           "s_per_step_with_warmup": round(last["train_seconds"] / n, 3),
           "real_tokens_per_s_with_warmup": round(last["tokens_seen"] / last["train_seconds"], 1),
           "tokens_per_step": round(last["tokens_seen"] / n, 1),
           # robust to a burst of other load: the median of the steady steps' own rates
           "real_tokens_per_s_median_step": round(statistics.median(
               (rows[i]["tokens_seen"] - rows[i - 1]["tokens_seen"])
               / (rows[i]["train_seconds"] - rows[i - 1]["train_seconds"])
               for i in range(w + 1, n + 1)), 1),
           "step_seconds": [round(rows[i]["train_seconds"] - (rows[i - 1]["train_seconds"] if i > 1
                                                              else 0.0), 3) for i in range(1, n + 1)],
           **proc_fields(c)}
    print(f"    ours {variant}: steps {w + 1}-{n}: {run['s_per_step']} s/step, "
          f"{run['real_tokens_per_s']} real tokens/s ({run['real_tokens_per_s_with_warmup']} with the "
          f"first {w}), peak RSS "
          f"{run['peak_rss_mb']} MB (other CPU load {run['other_cpu_cores']} cores)", flush=True)
    return run


def run(b: Bench) -> None:
    pk = peak.run(b)
    variants = [v for v in b.args.train_variants.split(",") if v]
    for v in variants:
        if v not in TRAIN_VARIANTS:
            raise SystemExit(f"bench: unknown train variant {v!r}; "
                             f"choose from {', '.join(TRAIN_VARIANTS)}")
    reference_training(b, 1)  # the warm-up run and one run before ours
    ours = [our_train_run(b, v) for v in variants]
    reference_training(b, b.args.ref_repeats)  # the others after ours
    refs = b.ref_train
    ref_tps = statistics.mean(r["real_tokens_per_s"] for r in refs)
    ref_sps = statistics.mean(r["s_per_step"] for r in refs)
    ref_rss = max(r["peak_rss_mb"] for r in [*refs, b.ref_warm])
    vocab = (b.result.get("setup") or {}).get("vocab") or 40135
    flops_token = model_flops_per_token(vocab)
    for o in ours:
        o["ratio_real_tokens_per_s"] = round(o["real_tokens_per_s"] / ref_tps, 2)
        o["model_gflops"] = round(o["real_tokens_per_s"] * flops_token / 1e9, 1)
        bf16 = pk["bf16_gflops"]  # None where the CPU has no native bf16
        o["fraction_of_bf16_peak"] = round(o["model_gflops"] / bf16, 3) if bf16 else None
        o["fraction_of_fp32_peak"] = round(o["model_gflops"] / pk["fp32_gflops"], 3)
        own = tuple(p for p in peak.run(b)["jobs"]["train"]["ceiling_gflops"] if p != "best") if (
            "auto" in o["variant"]) else (
            ("bf16",) if "bf16" in o["variant"] else ("fp32",))
        o.update(peak.fraction(b, "train", o["model_gflops"], own))
        o["rss_fraction_of_reference"] = round(o["peak_rss_mb"] / ref_rss, 3)
    b.result["sections"]["train"] = {
        "reference_warmup_run": b.ref_warm, "reference_runs": refs, "ours": ours,
        "warmup_steps_excluded": b.args.warmup_steps,
        "reference_real_tokens_per_s": round(ref_tps, 1), "reference_s_per_step": round(ref_sps, 3),
        "reference_peak_rss_mb": ref_rss, "model_flops_per_real_token": flops_token,
        "flops_note": "6 x (vocab x hidden + 4 x hidden x (embedding + hidden)) per real token: "
                      "forward + backward of the output projection and the LSTM matmuls"}
    head = ["run", "s/step", "real tok/s", "ratio", "GFLOP/s", "of its ceiling", "of best mix",
            "peak RSS MB", "RSS / ref"]
    rows: list[list[Any]] = [[f"reference (mean of {len(refs)})", ref_sps, ref_tps, 1.0, None, None, None,
                              ref_rss, 1.0]]
    rows += [[o["variant"], o["s_per_step"], o["real_tokens_per_s"], o["ratio_real_tokens_per_s"],
              o["model_gflops"], o["fraction_of_ceiling"], o["fraction_of_best_mix"], o["peak_rss_mb"],
              o["rss_fraction_of_reference"]] for o in ours]
    table(f"training (notebook size, full softmax; steps after the first {b.args.warmup_steps})",
          head, rows)
    _targets(b, pk, ours, ref_tps, ref_rss)


def _targets(b: Bench, pk: dict, ours: list[dict], ref_tps: float, ref_rss: float) -> None:
    best = max(ours, key=lambda o: o["real_tokens_per_s"])
    ratio = best["ratio_real_tokens_per_s"]
    b.target("train_throughput", f"training real tokens/s (best variant: {best['variant']})",
             round(ref_tps, 1), best["real_tokens_per_s"], "real tokens/s", ratio,
             f">= {TARGETS['train_ratio']:g}x", ratio >= TARGETS["train_ratio"],
             "all variants: "
             + ", ".join(f"{o['variant']} {o['ratio_real_tokens_per_s']}x" for o in ours))
    b.target("train_ceiling_fraction",
             f"model FLOP rate / the step's ceiling, each matmul in its fastest precision (best variant: "
             f"{best['variant']})", best["best_mix_ceiling_gflops"], best["model_gflops"], "GFLOP/s",
             best["fraction_of_best_mix"], f">= {TARGETS['ceiling_fraction']:g}",
             best["fraction_of_best_mix"] >= TARGETS["ceiling_fraction"],
             f"of its own precision's ceiling ({best['ceiling_precision']} {best['ceiling_gflops']} "
             f"GFLOP/s): {best['fraction_of_ceiling']}; 2048^2 peaks fp32 {pk['fp32_gflops']}, "
             f"bf16 {pk['bf16_gflops']}")
    seed = next((o for o in ours if o["variant"] == "seed"), ours[0])
    b.target("train_memory", f"training peak RSS ({seed['variant']})", ref_rss, seed["peak_rss_mb"],
             "MB", seed["rss_fraction_of_reference"], f"<= {TARGETS['memory_fraction']:.3f}",
             seed["rss_fraction_of_reference"] <= TARGETS["memory_fraction"],
             "all variants: " + ", ".join(f"{o['variant']} {o['peak_rss_mb']}" for o in ours))
