"""gen: generation, bench/generate_speed.py as a child (the notebook's loop against the bulk
job; see its docstring for how it times both sides). The ratio is median over median of the
decoding loop's new tokens/s (random weights, so `<eos>` almost never comes and both sides
produce nearly every token asked)."""

from __future__ import annotations

import json
import sys

from children import proc_fields
from context import HERE, TARGETS, Bench
from report import table

from . import peak


def run(b: Bench) -> None:
    a = b.args
    out = b.fresh("gen") / "generate_speed.json"
    cmd = [sys.executable, str(HERE / "generate_speed.py"), "--data", str(a.data),
           "--reference", str(a.reference), "--prompts", str(a.gen_prompts), "--new-tokens",
           str(a.gen_new_tokens), "--ref-prompts", str(a.gen_ref_prompts), "--ref-max-len",
           str(a.gen_new_tokens), "--repeats", str(a.gen_repeats), "--precisions", a.gen_precisions,
           "--threads", str(a.threads), "--work", str(b.work / "gen"), "--out", str(out)]
    c = b.child("gen", cmd, want_json=False)
    g = json.loads(out.read_text())
    summ = g["summary"]
    ref = summ["reference"]
    configs = {k: v for k, v in summ.items() if k != "reference"}
    best_name, best = max(configs.items(), key=lambda kv: kv[1]["median"])
    b.result["sections"]["gen"] = {
        "generate_speed": g, "reference_median": ref["median"], "best_config": best_name,
        "ours_median": best["median"], "ratio_median": best["ratio_median"],
        "ratio_best": best["ratio_best"], **proc_fields(c)}
    table("generation (new tokens/s, T = 0.3, random weights)",
          ["side", "best", "median", "ratio (median)"],
          [["reference (notebook loop)", ref["best"], ref["median"], 1.0]]
          + [[k, v["best"], v["median"], v["ratio_median"]] for k, v in configs.items()])
    b.target("generation", f"generation new tokens/s (best: {best_name})", ref["median"],
             best["median"], "new tokens/s", best["ratio_median"], f">= {TARGETS['gen_ratio']:g}x",
             best["ratio_median"] >= TARGETS["gen_ratio"],
             f"medians of {len(ref['runs'])} reference runs and {a.gen_repeats} of ours; decoder loop "
             f"time; job wall ratio {best['ratio_job_best']}x (best/best)")
    _ceiling_target(b, best_name, best["median"])


def _ceiling_target(b: Bench, config: str, new_tps: float) -> None:
    """The best configuration's model FLOP rate (the LSTM cell and the output layer per new
    token) against a decoding step's own ceiling (bench/ceiling.py)."""
    gflops = float(f"{new_tps * peak.run(b)['jobs']['gen']['gflop_per_token']:.4g}")
    f = peak.fraction(b, "gen", gflops, ("bf16",) if "bf16" in config else ("fp32",))  # int8: vs fp32
    b.result["sections"]["gen"].update(model_gflops=gflops, **f)
    b.target("gen_ceiling_fraction", f"generation model FLOP rate / a decoding step's ceiling, each "
             f"matmul in its fastest precision ({config})", f["best_mix_ceiling_gflops"], gflops,
             "GFLOP/s", f["fraction_of_best_mix"], f">= {TARGETS['ceiling_fraction']:g}",
             f["fraction_of_best_mix"] >= TARGETS["ceiling_fraction"],
             f"of the {f['ceiling_precision']} ceiling ({f['ceiling_gflops']} GFLOP/s): "
             f"{f['fraction_of_ceiling']}")
