"""The resume part of bench/gpu_check.py (run through bench/gpu_parts.py resume): is a run that
stops and resumes still bit-exact with one that never stopped, on this device?

For each configuration: a straight run of N steps, a second straight run (is training itself
deterministic here?), and a run of N/2 steps resumed to N in the same run folder (its metrics
must then hold each step once: it resumed rather than started over). The final weights
(model.safetensors) are compared tensor by tensor. What holds is said in the verdict: bit-exact;
or differing, and whether two straight runs differ too (nondeterministic kernels on this device,
not the resume) or agree (something a checkpoint does not restore on this device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from gpu_parts import SEED_CONFIG, Part
from safetensors.torch import load_file

from lmcore.config import load_config
from lmcore.jobs import run_job
from lmcore.track.metrics import read_metrics

# name: (what it exercises, overrides of configs/imdb_seed.yaml)
RESUME_CONFIGS: dict[str, tuple[str, list[str]]] = {
    "padded_fp32": ("configs/imdb_seed.yaml as is (padded, fp32, fused loss)", []),
    "packed_bf16_dropout": ("packed (the LSTM state carried across windows and saved), bf16 autocast, "
                            "dropout 0.1 (the random streams saved)",
                            ["data.batching=packed", "train.mixed_precision=bf16", "model.dropout=0.1"]),
}


def train_to(part: Part, run_dir: Path, steps: int, extra: list[str]) -> Path:
    cfg = load_config(SEED_CONFIG, [*part.common(), f"run.dir={run_dir}", f"train.max_steps={steps}",
                                    "train.log_interval=1", "train.checkpoint_interval=1000000", *extra])
    result = run_job("train", cfg, progress=False).result or {}
    return Path(result["checkpoint"])


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    if set(a) != set(b):
        return {"bit_exact": False, "why": f"different tensors: {sorted(set(a) ^ set(b))}"}
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max((float((a[k].float() - b[k].float()).abs().max()) for k in unequal), default=0.0)
    return {"bit_exact": not unequal, "tensors_differing": unequal, "max_abs_difference": worst}


def check(part: Part, name: str) -> dict:
    what, extra = RESUME_CONFIGS[name]
    r = part.plan["resume"]
    n, half = r["steps"], r["steps"] // 2
    straight = weights(train_to(part, part.fresh(f"resume-{name}/straight"), n, extra))
    again = weights(train_to(part, part.fresh(f"resume-{name}/straight_again"), n, extra))
    run = part.fresh(f"resume-{name}/resumed")
    train_to(part, run, half, extra)
    resumed = weights(train_to(part, run, n, extra))
    steps = [row["step"] for row in read_metrics(run / "metrics.jsonl") if "train/loss" in row]
    vs_straight, repeat = difference(straight, resumed), difference(straight, again)
    if vs_straight["bit_exact"]:
        verdict = f"resume is bit-exact: {half} + {n - half} steps end with the weights of {n} straight steps"
    elif not repeat["bit_exact"]:
        verdict = ("resume differs, and so do two straight runs (max difference "
                   f"{repeat['max_abs_difference']:.3g}): training is not deterministic on this device, so "
                   "bit-exact resume cannot be shown here")
    else:
        verdict = ("resume DIFFERS while two straight runs agree: something the checkpoint does not "
                   f"restore on this device (max difference {vs_straight['max_abs_difference']:.3g}; "
                   f"tensors {vs_straight['tensors_differing']})")
    return {"what": what, "overrides": extra, "steps": n, "stopped_at": half,
            "resumed_not_restarted": steps == list(range(1, n + 1)), "resumed_vs_straight": vs_straight,
            "straight_vs_straight": repeat, "bit_exact": vs_straight["bit_exact"],
            "deterministic": repeat["bit_exact"], "verdict": verdict}


def resume(part: Part) -> None:
    for name in part.plan["resume"]["configs"]:
        part.unit(name, check, part, name)
