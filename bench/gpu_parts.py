"""The torch side of bench/gpu_check.py: one part per child process,

    python bench/gpu_check.py part NAME PLAN.json RESULTS.jsonl

NAME is setup, resume, train, eval or gen (bench/gpu_gen.py). A part runs its units one
after the other and appends one JSON line per unit to RESULTS as soon as the unit ends
({"unit": NAME, "status": "ok" | "failed" | "not_run" | "not_applicable", ...}), so that what
it finished survives when the driver kills it at its time limit. A unit that fails is recorded
with the reason (its traceback goes to stderr, in the logs) and the part goes on.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from children import last_json
from generate_speed import notebook_ids, notebook_model, save_reference_checkpoint, write_prompts
from safetensors.torch import load_file
from sections.train import model_flops_per_token

import lmcore
from lmcore.config import DataConfig, load_config
from lmcore.data.cache import fit_tokenizer, load_split, strided
from lmcore.jobs import run_job
from lmcore.track.metrics import read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEED_CONFIG = REPO / "configs" / "imdb_seed.yaml"

# name: (what it is, overrides of configs/imdb_seed.yaml, cuDNN enabled)
TRAIN_VARIANTS: dict[str, tuple[str, list[str], bool]] = {
    "fp32": ("padded, fp32, fused loss (configs/imdb_seed.yaml as is)", [], True),
    "fp32_plain_ce": ("padded, fp32, plain PyTorch cross-entropy (train.loss_chunk=0)",
                      ["train.loss_chunk=0"], True),
    "bf16": ("padded, bf16 autocast, fused loss", ["train.mixed_precision=bf16"], True),
    "bf16_plain_ce": ("padded, bf16 autocast, plain cross-entropy",
                      ["train.mixed_precision=bf16", "train.loss_chunk=0"], True),
    "packed_fp32": ("packed windows (data.seq_len), fp32, fused loss", ["data.batching=packed"], True),
    "packed_bf16": ("packed, bf16 autocast, fused loss",
                    ["data.batching=packed", "train.mixed_precision=bf16"], True),
    "fp32_no_cudnn": ("padded, fp32, fused loss, torch.backends.cudnn.enabled=False (PyTorch's own LSTM "
                      "kernels instead of cuDNN's)", [], False),
}


class Skip(Exception):
    """A unit that does not run here; status is "not_run" or "not_applicable"."""

    def __init__(self, status: str, why: str):
        super().__init__(why)
        self.status, self.why = status, why


class Part:
    """One part's plan, and its results file, written one unit at a time."""

    def __init__(self, plan: dict, results: Path):
        self.plan, self.results = plan, results
        self.work = Path(plan["work"])
        self.device = plan["device"]

    def emit(self, unit: str, result: dict) -> None:
        with open(self.results, "a", encoding="utf-8") as f:
            f.write(json.dumps({"unit": unit, **result}) + "\n")

    def unit(self, name: str, fn: Callable[..., dict], *args: Any) -> dict:
        """Run one unit: its result, or why it did not run or failed (the traceback to stderr)."""
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = {"status": "ok", **fn(*args)}
        except Skip as e:
            result = {"status": e.status, "why": e.why}
        except Exception as e:  # recorded, and the part goes on
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:500]
            result = {"status": "failed", "why": f"{type(e).__name__}: {first}"}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        self.emit(name, result)
        return result

    def fresh(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def setup_value(self, key: str) -> Any:
        value = (self.plan.get("setup") or {}).get(key)
        if not value:
            raise Skip("not_run", f"the setup part did not produce {key!r} (see parts.setup)")
        return value

    def common(self, train: bool = False) -> list[str]:
        """Overrides of every run of ours: the data, no W&B, no validation; training runs take the
        dry run's small sizes too."""
        return [f"data.source={self.plan['data']}", "tracking.wandb_mode=disabled", "data.val_split=",
                "train.eval_interval=0", *(self.plan["train_overrides"] if train else [])]

    def reference(self, mode: str, *args: str) -> dict:
        """One run of the reference on this part's device (bench/gpu_reference.py); its JSON line."""
        cmd = [sys.executable, str(HERE / "gpu_reference.py"), "--reference", self.plan["reference"],
               "--device", self.device, "--", mode, "--data", self.plan["data"], *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:])
        lines = [last_json(line) for line in proc.stdout.splitlines()]
        out = next((j for j in lines if j and "mode" in j), None)
        clock = next((j["step_clock"] for j in lines if j and "step_clock" in j), None)
        if proc.returncode != 0 or out is None or clock is None:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise RuntimeError(f"the reference exited with {proc.returncode}: {tail}")
        out.update(step_clock=clock, process_wall_s=round(time.perf_counter() - t0, 2))
        return out


# -- small helpers --------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_peak(into: dict) -> Iterator[None]:
    """into["cuda_peak_mb"]: the CUDA allocator's peak over the block (None on the CPU)."""
    on = torch.cuda.is_available()
    if on:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        into["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if on else None


@contextlib.contextmanager
def cudnn_enabled(flag: bool) -> Iterator[None]:
    before = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = flag
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = before


def imports(module: str) -> str:
    """The module's version if it imports here (the wheels' folder is on PYTHONPATH), else why not."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # an import can fail in any way
        return f"does not import: {type(e).__name__}: {str(e)[:300]}"
    return f"imports, version {getattr(mod, '__version__', '?')} from {Path(mod.__file__ or '?').parent}"


def matmul_peak(device: str, size: int) -> dict:
    """size x size matmul TFLOP/s in fp32 and bf16 on the device: best of 10 after 3 warm-ups."""
    out: dict[str, Any] = {"size": size}
    cuda = device == "cuda"
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(size, size, device=device).to(dtype)
        y = torch.randn(size, size, device=device).to(dtype)
        times = []
        for i in range(13):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            x @ y
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
        out[f"{name}_tflops"] = round(2 * size**3 / min(times) / 1e12, 3)
    return out


# -- env and setup ------------------------------------------------------------------------------------
def env_info(part: Part) -> dict:
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "lmcore": lmcore.__version__,
        "cpus": os.cpu_count(), "cuda_available": cuda, "device_used": part.device,
        "has_torch_int_mm": hasattr(torch, "_int_mm"),
        "cudnn_available": torch.backends.cudnn.is_available(),
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "packages": {p: imports(p) for p in ("accelerate", "torchmetrics", "numpy", "safetensors", "yaml",
                                              "datasets", "wandb", "submitit")},
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                    cuda_runtime=torch.version.cuda)
    info["matmul_peak"] = matmul_peak(part.device, part.plan["peak_size"])
    return info


def setup(part: Part) -> dict:
    """The token cache (fit and encode, timed), the random-weight checkpoint in lmcore's and the
    reference's formats, and the prompt files: what every later part uses, excluded from figures."""
    data = part.plan["data"]
    cfg = DataConfig(source=data)
    t = time.perf_counter()
    tok = fit_tokenizer(cfg)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    train_split = load_split(cfg, "train", tok)
    test = load_split(cfg, "test", tok)
    encode_s = time.perf_counter() - t
    weights = part.fresh("weights")
    model, tok, ckpt, what = notebook_model("", data, weights / "run")
    ref_ckpt = weights / "reference_lm.pt"
    save_reference_checkpoint(model, notebook_ids(tok, data), ref_ckpt)
    g = part.plan["gen"]
    prompts, identity = weights / "prompts.jsonl", weights / "identity_prompts.jsonl"
    write_prompts(data, g["prompts"], prompts)
    write_prompts(data, g["identity_prompts"], identity)
    val = strided(test, part.plan["eval_stride"])
    return {"vocab": len(tok), "hidden": model.cfg.hidden_dim, "tokenizer_s": round(fit_s, 2),
            "encode_s": round(encode_s, 2),
            "train_reviews": len(train_split), "test_reviews": len(test),
            "eval_reviews": len(val), "checkpoint": str(ckpt), "reference_checkpoint": str(ref_ckpt),
            "weights": what, "prompts": str(prompts), "identity_prompts": str(identity)}


def setup_part(part: Part) -> None:
    env = part.unit("env", env_info, part)
    if part.device == "cuda" and not env.get("cuda_available"):
        raise SystemExit("torch sees no CUDA device")  # the driver stops: no figure would mean anything
    part.unit("setup", setup, part)


# -- train ----------------------------------------------------------------------------------------------
def reference_train(part: Part) -> dict:
    """The reference's steady state: its step clock (gpu_reference.py) after its first W steps."""
    t = part.plan["train"]
    j = part.reference("train", "--steps", str(t["ref_steps"]))
    clock, w = j.pop("step_clock"), t["ref_warmup"]
    (s0, r0, c0), (s1, r1, c1) = clock[w - 1], clock[-1]  # [steps, real tokens, seconds]
    rates = [(b[1] - a[1]) / (b[2] - a[2]) for a, b in zip(clock[w - 1:-1], clock[w:], strict=True)]
    return {"steps": s1, "warmup_steps_excluded": s0, "s_per_step": round((c1 - c0) / (s1 - s0), 4),
            "real_tokens_per_s": round((r1 - r0) / (c1 - c0), 1),
            "real_tokens_per_s_median_step": round(statistics.median(rates), 1),
            "real_tokens_per_s_with_warmup": j["real_tokens_per_s"], "vocab": j["vocab"],
            "last_loss": j["last_loss"], "run": j}


def our_train(part: Part, variant: str) -> dict:
    desc, overrides, cudnn = TRAIN_VARIANTS[variant]
    t = part.plan["train"]
    n, w = t["steps"], t["warmup"]
    run_dir = part.fresh(f"train-{variant}")
    cfg = load_config(SEED_CONFIG, [*part.common(train=True), f"run.dir={run_dir}", f"train.max_steps={n}",
                                    "train.log_interval=1", f"train.checkpoint_interval={n + 1}",
                                    "train.resume=never", *overrides])
    m = cfg.model
    flops = model_flops_per_token(int(part.setup_value("vocab")), m.embedding_dim, m.hidden_dim)
    out: dict[str, Any] = {"what": desc, "overrides": overrides, "cudnn_enabled": cudnn,
                           "model_flops_per_token": flops}
    if not cudnn and part.device != "cuda":
        out["note"] = "cuDNN is a CUDA library: on the CPU this variant runs the same kernels as fp32"
    with cudnn_enabled(cudnn), cuda_peak(out):
        run_job("train", cfg, progress=False)
    rows = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "train_seconds" in r}
    last, first = rows[n], rows[w]
    dt = last["train_seconds"] - first["train_seconds"]
    rates = [(rows[i]["tokens_seen"] - rows[i - 1]["tokens_seen"])
             / (rows[i]["train_seconds"] - rows[i - 1]["train_seconds"]) for i in range(w + 1, n + 1)]
    out.update(steps=n, warmup_steps_excluded=w, s_per_step=round(dt / (n - w), 4),
               real_tokens_per_s=round((last["tokens_seen"] - first["tokens_seen"]) / dt, 1),
               real_tokens_per_s_median_step=round(statistics.median(rates), 1),
               real_tokens_per_s_with_warmup=round(last["tokens_seen"] / last["train_seconds"], 1),
               tokens_per_step=round(last["tokens_seen"] / n, 1), last_loss=round(last["train/loss"], 4))
    return out


def train(part: Part) -> None:
    part.unit("reference", reference_train, part)
    for v in part.plan["train"]["variants"]:
        part.unit(f"ours_{v}", our_train, part, v)


# -- eval -----------------------------------------------------------------------------------------------
def reference_eval(part: Part) -> dict:
    j = part.reference("eval", "--ckpt", part.setup_value("reference_checkpoint"),
                       "--stride", str(part.plan["eval_stride"]))
    return {"masked_ppl": j["masked_ppl"], "targets": j["real_tokens"], "seconds": j["eval_s"],
            "real_tokens_per_s": round(j["real_tokens"] / j["eval_s"], 1) if j["eval_s"] else None}


def our_eval(part: Part, precision: str) -> dict:
    """The eval job on the setup's weights (forward only, as the reference's timed loop is), run
    `repeats` times; the figures are the first run's (cold, as the reference's one run is)."""
    runs = []
    for _ in range(part.plan["eval"]["repeats"]):
        cfg = load_config(SEED_CONFIG, [
            *part.common(), f"run.dir={part.work / 'eval-run'}",
            f"eval.checkpoint={part.setup_value('checkpoint')}",
            f"eval.stride={part.plan['eval_stride']}", "eval.notebook_figure=false", "eval.split=test",
            f"train.mixed_precision={'bf16' if precision == 'bf16' else 'no'}"])
        j = run_job("eval", cfg).result or {}
        runs.append({"masked_ppl": round(j["masked_ppl"], 4), "targets": j["num_targets"],
                     "reviews": j["num_reviews"], "seconds": j["seconds"],
                     "real_tokens_per_s": j["tokens_per_s"]})
    return {**runs[0], "runs": runs}


def evaluation(part: Part) -> None:
    part.unit("reference", reference_eval, part)
    for precision in part.plan["eval"]["precisions"]:
        part.unit(f"ours_{precision}", our_eval, part, precision)


# -- resume -----------------------------------------------------------------------------------------------
# name: (what it exercises, overrides of configs/imdb_seed.yaml)
RESUME_CONFIGS: dict[str, tuple[str, list[str]]] = {
    "padded_fp32": ("configs/imdb_seed.yaml as is (padded, fp32, fused loss)", []),
    "packed_bf16_dropout": ("packed (the LSTM state carried across windows and saved), bf16 autocast, "
                            "dropout 0.1 (the random streams saved)",
                            ["data.batching=packed", "train.mixed_precision=bf16", "model.dropout=0.1"]),
}


def train_to(part: Part, run_dir: Path, steps: int, extra: list[str]) -> dict[str, torch.Tensor]:
    """Train (or resume) in run_dir up to `steps`; the final weights."""
    cfg = load_config(SEED_CONFIG, [*part.common(train=True), f"run.dir={run_dir}",
                                    f"train.max_steps={steps}", "train.log_interval=1",
                                    "train.checkpoint_interval=1000000", *extra])
    ckpt = Path((run_job("train", cfg, progress=False).result or {})["checkpoint"])
    return load_file(str(ckpt / "model.safetensors"))


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    if set(a) != set(b):
        return {"bit_exact": False, "why": f"different tensors: {sorted(set(a) ^ set(b))}"}
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max((float((a[k].float() - b[k].float()).abs().max()) for k in unequal), default=0.0)
    return {"bit_exact": not unequal, "tensors_differing": unequal, "max_abs_difference": worst}


def resume_check(part: Part, name: str) -> dict:
    """N straight steps twice (is training deterministic here?), and N/2 resumed to N in one run
    folder (its metrics must hold each step once: it resumed rather than started over)."""
    what, extra = RESUME_CONFIGS[name]
    n = part.plan["resume"]["steps"]
    half = n // 2
    straight = train_to(part, part.fresh(f"resume-{name}/straight"), n, extra)
    again = train_to(part, part.fresh(f"resume-{name}/straight_again"), n, extra)
    run = part.fresh(f"resume-{name}/resumed")
    train_to(part, run, half, extra)
    resumed = train_to(part, run, n, extra)
    steps = [row["step"] for row in read_metrics(run / "metrics.jsonl") if "train/loss" in row]
    vs, repeat = difference(straight, resumed), difference(straight, again)
    if vs["bit_exact"]:
        verdict = f"bit-exact: {half} + {n - half} steps end with the weights of {n} straight steps"
    elif not repeat["bit_exact"]:
        verdict = (f"differs, and so do two straight runs (max {repeat['max_abs_difference']:.3g}): training "
                   "is not deterministic on this device, so bit-exact resume cannot be shown here")
    else:
        verdict = (f"DIFFERS while two straight runs agree: the checkpoint misses something on this device "
                   f"(max {vs['max_abs_difference']:.3g}; tensors {vs['tensors_differing']})")
    return {"what": what, "overrides": extra, "steps": n, "stopped_at": half,
            "resumed_not_restarted": steps == list(range(1, n + 1)), "resumed_vs_straight": vs,
            "straight_vs_straight": repeat, "bit_exact": vs["bit_exact"] and steps == list(range(1, n + 1)),
            "deterministic": repeat["bit_exact"], "verdict": verdict}


def resume(part: Part) -> None:
    for name in part.plan["resume"]["configs"]:
        part.unit(name, resume_check, part, name)


# -- entry point --------------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    from gpu_gen import generation

    known: dict[str, Callable[[Part], Any]] = {
        "setup": setup_part, "resume": resume, "train": train, "eval": evaluation, "gen": generation}
    if len(argv) != 3 or argv[0] not in known:
        raise SystemExit(f"usage: gpu_check.py part {'|'.join(known)} PLAN.json RESULTS.jsonl; got {argv}")
    name, plan, results = argv
    os.environ.setdefault("WANDB_MODE", "disabled")
    part = Part(json.loads(Path(plan).read_text()), Path(results))
    known[name](part)
    part.emit("_done", {"status": "ok"})
