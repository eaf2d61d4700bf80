"""The gen part of bench/gpu_check.py (run through bench/gpu_parts.py gen): bulk generation speed
against the notebook's loop, and whether the output is byte-identical across batch sizes.

Speed: the reference's `gen` (its prompts one at a time, the whole prefix re-run for every word)
against lmcore's bulk job (lmcore.gen.job.generate_shard) on the same random weights, T = 0.3,
for each precision (fp32, bf16, int8: the output layer as torch._int_mm), new tokens over the
decoding loop's time on both sides; the job's wall time is reported too.

Identity: the same prompts generated at several batch sizes, and the first batch size twice;
the chunk files (every completion, in prompt order) compared byte for byte. On the CPU every
operation of the decoder is row-local and shape-stable, so the bytes must agree; on CUDA the
decoder pads each step to the batch size (the same kernels every step), and whether the bytes
agree across batch sizes is measured here, not claimed: the result says what holds (run to run
at one batch size, across batch sizes, how many rows differ and where the first one does).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from gpu_parts import Part, Skip

from lmcore.config import load_config
from lmcore.gen.job import generate_shard


def reference_gen(part: Part) -> dict:
    g = part.plan["gen"]
    j = part.reference("gen", "--ckpt", part.setup_value("reference_checkpoint"), "--prompts",
                       str(g["ref_prompts"]), "--max-len", str(g["new_tokens"]))
    return {"prompts": j["prompts"], "new_tokens": j["new_tokens"], "seconds": j["gen_s"],
            "new_tokens_per_s": j["gen_tokens_per_s"]}


def check_precision(precision: str) -> None:
    if precision == "int8" and not hasattr(torch, "_int_mm"):
        raise Skip("not_applicable", f"torch {torch.__version__} has no torch._int_mm")


def gen_run(part: Part, precision: str, batch_size: int, prompts: str, tag: str) -> tuple[dict, Path]:
    """One bulk generation job in this process: its figures and its output folder."""
    g = part.plan["gen"]
    out = part.fresh(f"gen/{tag}")
    cfg = load_config(None, [
        f"run.dir={part.work / 'gen-run'}", f"generate.checkpoint={part.setup_value('checkpoint')}",
        f"generate.prompts={prompts}", f"generate.output_dir={out}", f"generate.batch_size={batch_size}",
        "generate.temperature=0.3", f"generate.max_new_tokens={g['new_tokens']}",
        f"generate.precision={precision}", "tracking.wandb_mode=disabled"])
    t0 = time.perf_counter()
    res = generate_shard(cfg, progress=False)
    wall = time.perf_counter() - t0
    return {"batch_size": batch_size, "prompts": res["prompts"], "new_tokens": res["new_tokens"],
            "decode_tokens_per_s": res["new_tokens_per_s"], "job_wall_s": round(wall, 3),
            "job_tokens_per_s": round(res["new_tokens"] / wall, 1), "device": res["device"]}, out


def our_speed(part: Part, precision: str) -> dict:
    check_precision(precision)
    g = part.plan["gen"]
    runs = [gen_run(part, precision, g["batch_size"], part.setup_value("prompts"), f"speed-{precision}-{i}")[0]
            for i in range(g["repeats"])]
    dec = [r["decode_tokens_per_s"] for r in runs]
    return {"precision": precision, "batch_size": g["batch_size"], "best": max(dec),
            "median": statistics.median(dec), "job_best": max(r["job_tokens_per_s"] for r in runs),
            "runs": runs}


def chunk_output(out: Path) -> tuple[bytes, dict[tuple[Any, int], str]]:
    """The chunk files' bytes, in order, and each (prompt id, sample)'s completion."""
    data = b"".join(p.read_bytes() for p in sorted((out / "chunks").glob("chunk-*.jsonl")))
    rows = {}
    for line in data.decode("utf-8").splitlines():
        r = json.loads(line)
        rows[(r["id"], r["sample"])] = r["completion"]
    return data, rows


def compare(a: tuple[bytes, dict], b: tuple[bytes, dict]) -> dict:
    same = [k for k in a[1] if b[1].get(k) == a[1][k]]
    out: dict[str, Any] = {"bytes_identical": a[0] == b[0], "rows": len(a[1]), "rows_identical": len(same),
                           "row_keys_match": set(a[1]) == set(b[1])}
    diff = [k for k in a[1] if k not in set(same)]
    if diff:
        k = diff[0]
        wa, wb = a[1][k].split(), b[1].get(k, "").split()
        at = next((i for i, (x, y) in enumerate(zip(wa, wb, strict=False)) if x != y), min(len(wa), len(wb)))
        out["first_difference"] = {"id": k[0], "sample": k[1], "at_word": at, "words": len(wa)}
    return out


def identity(part: Part, precision: str) -> dict:
    check_precision(precision)
    sizes = part.plan["gen"]["identity_batch_sizes"]
    prompts = part.setup_value("identity_prompts")
    runs = [(f"batch{bs}", bs) for bs in sizes] + [(f"batch{sizes[0]}_again", sizes[0])]
    outputs, figures = {}, {}
    for name, bs in runs:
        figures[name], out = gen_run(part, precision, bs, prompts, f"identity-{precision}-{name}")
        outputs[name] = chunk_output(out)
    base = f"batch{sizes[0]}"
    comparisons = {name: compare(outputs[base], outputs[name]) for name, _ in runs[1:]}
    across = all(comparisons[f"batch{bs}"]["bytes_identical"] for bs in sizes[1:])
    again = comparisons[f"{base}_again"]["bytes_identical"]
    verdict = (f"byte-identical across batch sizes {sizes} and run to run" if across and again else
               f"run to run at batch {sizes[0]}: {'identical' if again else 'DIFFERENT'}; across batch sizes "
               f"{sizes}: {'identical' if across else 'DIFFERENT'} (rows identical: " + ", ".join(
                   f"{n} {c['rows_identical']}/{c['rows']}" for n, c in comparisons.items()) + ")")
    return {"precision": precision, "batch_sizes": sizes, "prompts": figures[base]["prompts"],
            "identical_across_batch_sizes": across, "identical_run_to_run": again, "verdict": verdict,
            "compared_with": base, "comparisons": comparisons, "runs": figures}


def generation(part: Part) -> None:
    part.unit("reference", reference_gen, part)
    precisions = part.plan["gen"]["precisions"]
    for precision in precisions:
        part.unit(f"ours_{precision}", our_speed, part, precision)
    for precision in precisions:
        part.unit(f"identity_{precision}", identity, part, precision)
