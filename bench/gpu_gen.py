"""The gen part of bench/gpu_check.py (`gpu_check.py part gen`): bulk generation speed against the
notebook's loop, and whether the output is byte-identical across batch sizes.

Speed: the reference's `gen` (its prompts one at a time, the whole prefix re-run for every word)
against lmcore's bulk job (lmcore.gen.job.generate_shard) on the same random weights, T = 0.3,
for each precision (fp32, bf16, int8: the output layer as torch._int_mm), new tokens over the
decoding loop's time on both sides; the job's wall time is reported too.

Identity: the same prompts generated at several batch sizes, and the first batch size twice; the
chunk files (every completion, in prompt order) compared byte for byte. On the CPU every operation
of the decoder is row-local and shape-stable, so the bytes must agree; on CUDA the decoder pads each
step to the batch size (the same kernels every step), and whether the bytes agree across batch
sizes is measured, not claimed: the result says what holds (run to run at one batch size, across
batch sizes, how many rows differ and where the first one does).

int8: torch._int_mm has shape rules on CUDA that the CPU's lacks (a least number of rows among
them); each batch size's matmul shapes are tried first, and a batch size it refuses is left out
with the reason (the whole precision is "not_applicable" when no batch size is left).
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
from lmcore.gen.decoder import INT8_ROWS, MIN_ROWS
from lmcore.gen.job import generate_shard
from lmcore.gen.sampling import chunk_layout


def reference_gen(part: Part) -> dict:
    g = part.plan["gen"]
    j = part.reference("gen", "--ckpt", part.setup_value("reference_checkpoint"), "--prompts",
                       str(g["ref_prompts"]), "--max-len", str(g["new_tokens"]))
    return {"prompts": j["prompts"], "new_tokens": j["new_tokens"], "seconds": j["gen_s"],
            "new_tokens_per_s": j["gen_tokens_per_s"]}


def int8_refuses(part: Part, batch_size: int) -> str | None:
    """Why torch._int_mm refuses the decoder's int8 matmuls at this batch size here, or None: the
    blocks of INT8_ROWS rows of a step padded as the job pads it, against the padded vocabulary."""
    if not hasattr(torch, "_int_mm"):
        return f"torch {torch.__version__} has no torch._int_mm"
    cuda = part.device == "cuda"
    rows = batch_size if cuda else max(batch_size, MIN_ROWS)  # lmcore.gen.job: fixed_rows on CUDA
    width, n = chunk_layout(int(part.setup_value("vocab")))
    k, cols, dev = int(part.setup_value("hidden")), width * n, part.device
    head = torch.zeros(cols, k, dtype=torch.int8, device=dev)
    for m in sorted({min(rows, INT8_ROWS), rows % INT8_ROWS} - {0}):
        out = torch.empty(m, cols, dtype=torch.int32, device=dev)
        try:
            torch._int_mm(torch.zeros(m, k, dtype=torch.int8, device=dev), head.t(), out=out)
        except RuntimeError as e:
            return f"torch._int_mm refuses {m} x {k} @ {k} x {cols}: {str(e).splitlines()[0]}"
    return None


def usable_sizes(part: Part, precision: str, sizes: list[int]) -> tuple[list[int], dict[int, str]]:
    """The batch sizes this precision runs at here, and those refused with the reason."""
    refused = {bs: why for bs in sizes if precision == "int8" and (why := int8_refuses(part, bs))}
    if len(refused) == len(sizes):
        raise Skip("not_applicable", "; ".join(sorted(set(refused.values()))))
    return [bs for bs in sizes if bs not in refused], refused


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
    g = part.plan["gen"]
    usable_sizes(part, precision, [g["batch_size"]])
    prompts = part.setup_value("prompts")
    runs = [gen_run(part, precision, g["batch_size"], prompts, f"speed-{precision}-{i}")[0]
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
    sizes, refused = usable_sizes(part, precision, part.plan["gen"]["identity_batch_sizes"])
    prompts = part.setup_value("identity_prompts")
    runs = [(f"batch{bs}", bs) for bs in sizes] + [(f"batch{sizes[0]}_again", sizes[0])]
    outputs, figures = {}, {}
    for name, bs in runs:
        figures[name], out = gen_run(part, precision, bs, prompts, f"identity-{precision}-{name}")
        outputs[name] = chunk_output(out)
    base = f"batch{sizes[0]}"
    comparisons = {name: compare(outputs[base], outputs[name]) for name, _ in runs[1:]}
    across = all(comparisons[f"batch{bs}"]["bytes_identical"] for bs in sizes[1:]) if sizes[1:] else None
    again = comparisons[f"{base}_again"]["bytes_identical"]
    word = {True: "identical", False: "DIFFERENT", None: "not compared (one batch size)"}
    verdict = (f"byte-identical across batch sizes {sizes} and run to run" if across and again else
               f"run to run at batch {sizes[0]}: {word[again]}; across batch sizes {sizes}: {word[across]} "
               "(rows identical: " + ", ".join(f"{n} {c['rows_identical']}/{c['rows']}"
                                               for n, c in comparisons.items()) + ")")
    if refused:
        verdict += f"; left out: {refused}"
    return {"precision": precision, "batch_sizes": sizes, "refused": refused,
            "prompts": figures[base]["prompts"],
            "identical_across_batch_sizes": across, "identical_run_to_run": again, "verdict": verdict,
            "compared_with": base, "comparisons": comparisons, "runs": figures}


def generation(part: Part) -> None:
    part.unit("reference", reference_gen, part)
    precisions = part.plan["gen"]["precisions"]
    for precision in precisions:
        part.unit(f"ours_{precision}", our_speed, part, precision)
    for precision in precisions:
        part.unit(f"identity_{precision}", identity, part, precision)
