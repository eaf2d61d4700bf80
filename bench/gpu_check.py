"""The GPU check: lmcore against the notebook's reference on one CUDA device, in one run, one JSON.

    python bench/gpu_check.py                      # on the GPU machine (bench/gpu_check.sh runs this)
    python bench/gpu_check.py --dry-run            # on the CPU, tiny sizes, well under a minute

Parts, in this order, each a child process (bench/gpu_parts.py PART) with its own time limit
inside the total budget (--budget-s), killed when it runs over (what it finished is kept):
  env     torch, CUDA, cuDNN, bf16, torch._int_mm, the packages present; the matmul peak
  setup   the token cache, random notebook-size weights in both formats, the prompt files
  resume  stop at N/2 and resume to N against N straight steps, bit for bit (bench/gpu_resume.py)
  train   real tokens/s: the reference (fp32, plain cross-entropy, nn.LSTM) against ours in fp32
          and bf16, fused loss and plain cross-entropy (train.loss_chunk=0), padded and packed,
          and with cuDNN off
  eval    masked perplexity throughput on the same weights, ours fp32 and bf16; figures must agree
  gen     bulk generation new tokens/s (fp32, bf16, int8) against the notebook's loop, and whether
          the output is byte-identical across batch sizes (bench/gpu_gen.py)
The reference runs on the same device through bench/gpu_reference.py (its source, with its
tensors placed on the device). Every figure is measured in this run; a unit that cannot run says
why (status not_run / not_applicable / failed / timeout) instead of vanishing. --dry-run does
all of it on the CPU at tiny sizes on the built-in sample corpus, written out as IMDB-format
files both sides can read, and the result says "dry_run": true: its figures mean nothing.

Data (--data DIR: train.jsonl.gz and test.jsonl.gz): default the first of .gpucheck/data (what
`bash bench/gpu_check.sh --prepare` makes to carry to the GPU machine) and ../shared/data/imdb.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from children import read_jsonl, run_child
from context import REPO, SHARED
from gpu_summary import summarize

PREPARED = REPO / ".gpucheck"
PARTS = ["env", "setup", "resume", "train", "eval", "gen"]
ALL_VARIANTS = ["fp32", "fp32_plain_ce", "bf16", "bf16_plain_ce", "packed_fp32", "packed_bf16", "fp32_no_cudnn"]
# Seconds each part may take at most (then it is killed); the total budget caps them all.
LIMITS = {"real": {"env": 45, "setup": 90, "resume": 75, "train": 150, "eval": 60, "gen": 100},
          "dry": {"env": 60, "setup": 60, "resume": 90, "train": 120, "eval": 60, "gen": 90}}
SIZES: dict[str, dict[str, Any]] = {
    "real": {"peak_size": 8192, "our_overrides": [],
             "train": {"ref_warmup": 5, "ref_steps": 40, "warmup": 10, "steps": 60},
             "resume": {"steps": 20}, "eval": {"limit": 0, "repeats": 2},
             "gen": {"prompts": 1000, "new_tokens": 50, "batch_size": 256, "repeats": 2, "ref_prompts": 40,
                     "identity_prompts": 256, "identity_batch_sizes": [256, 64, 7]}},
    "dry": {"peak_size": 256, "our_overrides": ["train.batch_size=8"],
            "train": {"ref_warmup": 1, "ref_steps": 2, "warmup": 1, "steps": 3},
            "resume": {"steps": 2}, "eval": {"limit": 0, "repeats": 1},
            "gen": {"prompts": 24, "new_tokens": 4, "batch_size": 16, "repeats": 1, "ref_prompts": 2,
                    "identity_prompts": 20, "identity_batch_sizes": [20, 5, 1]}},
}
RESERVE_S = 5  # kept back from the budget for writing the result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the sample corpus")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda for the real run (required), cpu for --dry-run")
    p.add_argument("--data", help="folder with train.jsonl.gz and test.jsonl.gz (see above)")
    p.add_argument("--eval-stride", type=int, default=0,
                   help="evaluate every Nth test review (0: DATA/prepared.json's eval_stride, else 10)")
    p.add_argument("--reference", help="seed_reference.py (default: .gpucheck/ or ../shared/bench/)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    p.add_argument("--work", help="runs, checkpoints and logs (default: a temp folder, removed unless --keep-work)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--budget-s", type=float, default=0, help="seconds for all parts (0: 420, dry 300)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help="our training variants")
    p.add_argument("--precisions", default="fp32,bf16,int8", help="generation precisions")
    p.add_argument("--install-report", help="the wheel installer's JSON (bench/gpu_wheels.py), kept in the result")
    a = p.parse_args(argv)
    a.mode = "dry" if a.dry_run else "real"
    a.budget_s = a.budget_s or (300 if a.dry_run else 420)
    a.parts = [s for s in a.parts.split(",") if s]
    unknown = [s for s in a.parts if s not in PARTS]
    if unknown or not a.parts:
        p.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    if a.device == "auto":
        a.device = "cpu" if a.dry_run else "cuda"
    return a


def first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def write_sample_data(folder: Path) -> Path:
    """The built-in sample corpus as IMDB-format files (the reference reads only those)."""
    if str(REPO) not in sys.path:  # this checkout's lmcore (on the GPU machine it is not installed)
        sys.path.insert(0, str(REPO))
    from lmcore.data.sample_corpus import sample_reviews  # pure Python: no torch in this process

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 400), ("test", 300)):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            for r in sample_reviews(split, n):
                f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
    return folder


def resolve_inputs(a: argparse.Namespace, work: Path) -> dict:
    """The data folder, the eval stride, the reference script (or why there is none)."""
    if a.data:
        data = Path(a.data).resolve()
    elif a.dry_run:
        data = write_sample_data(work / "data")
    else:
        data = first_existing(PREPARED / "data", SHARED / "data" / "imdb") or PREPARED / "data"
    for f in ("train.jsonl.gz", "test.jsonl.gz"):
        if not (data / f).is_file():
            raise SystemExit(f"gpu_check: {data / f} not found: --data must be a folder with train.jsonl.gz and "
                             "test.jsonl.gz (on the GPU machine: carry .gpucheck, made by "
                             "`bash bench/gpu_check.sh --prepare`)")
    prepared = json.loads((data / "prepared.json").read_text()) if (data / "prepared.json").is_file() else {}
    stride = a.eval_stride or int(prepared.get("eval_stride", 10))
    ref = Path(a.reference).resolve() if a.reference else first_existing(
        PREPARED / "seed_reference.py", SHARED / "bench" / "seed_reference.py")
    out: dict[str, Any] = {"data": str(data), "data_prepared": prepared or None, "eval_stride": stride}
    if ref is not None and ref.is_file():
        from gpu_reference import describe

        out.update(reference=str(ref), reference_info=describe(ref))
    else:
        out.update(reference=None, reference_missing=f"no reference script (looked at {a.reference or ''} "
                   f"{PREPARED / 'seed_reference.py'} {SHARED / 'bench' / 'seed_reference.py'})")
    return out


def child_env(a: argparse.Namespace, work: Path) -> dict:
    env = dict(os.environ)
    env.update(LMCORE_CACHE=str(work / "token-cache"), WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # this checkout's lmcore first (an installed one may be another copy); the wheels' folder stays
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # lmcore takes the GPU when it sees one
    return env


def run_part(name: str, plan: dict, limit: float, work: Path, env: dict) -> dict:
    """One part as a child process, killed after `limit` seconds: its units and how it ended."""
    plan_path, results = work / "plans" / f"{name}.json", work / "parts" / f"{name}.jsonl"
    for folder in ("plans", "parts", "logs"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    plan_path.write_text(json.dumps(plan, indent=1))
    cmd = [sys.executable, str(REPO / "bench" / "gpu_parts.py"), name, "--plan", str(plan_path),
           "--results", str(results)]
    c = run_child(f"part-{name}", cmd, logs=work / "logs", cwd=REPO, env=env, timeout=limit)
    rows = read_jsonl(results)
    units = {r.pop("unit"): r for r in rows}
    done = units.pop("_done", None) is not None
    status = "ok" if done and c["rc"] == 0 else "timeout" if c["wall_s"] > limit else "failed"
    out = {"status": status, "seconds": c["wall_s"], "limit_s": round(limit, 1), "units": units}
    if status != "ok":
        err = (work / "logs" / f"part-{name}.err").read_text(errors="replace").strip().splitlines()
        out["why"] = (f"killed at its time limit ({limit:.0f} s)" if status == "timeout"
                      else f"exit {c['rc']}: {err[-1] if err else '(no stderr)'}")
        out["stderr_tail"] = err[-15:]
    return out


def run_parts(a: argparse.Namespace, plan: dict, work: Path) -> dict:
    env, t0, parts = child_env(a, work), time.perf_counter(), {}
    for name in a.parts:
        left = a.budget_s - RESERVE_S - (time.perf_counter() - t0)
        limit = min(LIMITS[a.mode][name], left)
        if limit < 5:
            parts[name] = {"status": "not_run", "why": f"the budget of {a.budget_s:.0f} s was spent", "units": {}}
            continue
        print(f"== {name} (at most {limit:.0f} s)", flush=True)
        parts[name] = r = run_part(name, plan, limit, work, env)
        print(f"   {r['status']} in {r['seconds']} s" + (f": {r['why']}" if r.get("why") else ""), flush=True)
        if name == "env":
            info = r["units"].get("info", {})
            if a.device == "cuda" and not info.get("cuda_available"):
                raise SystemExit("gpu_check: torch sees no CUDA device here; use --dry-run for the CPU check "
                                 f"(env part: {r.get('why') or info.get('why') or 'cuda_available false'})")
        if name == "setup":
            plan["setup"] = r["units"].get("setup", {})
    return parts


def make_plan(a: argparse.Namespace, work: Path) -> dict:
    sizes = json.loads(json.dumps(SIZES[a.mode]))
    sizes["train"]["variants"] = [v for v in a.variants.split(",") if v]
    sizes["resume"]["configs"] = ["padded_fp32", "packed_bf16_dropout"]
    sizes["gen"]["precisions"] = [v for v in a.precisions.split(",") if v]
    return {"dry_run": a.dry_run, "device": a.device, "work": str(work), **resolve_inputs(a, work), **sizes}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="lmcore-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = make_plan(a, work)
    result: dict[str, Any] = {"gpu_check": 1, "dry_run": a.dry_run, "device": a.device,
                              "command": shlex.join(["python", "bench/gpu_check.py", *argv]),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": a.budget_s,
                              "limits_s": {k: LIMITS[a.mode][k] for k in a.parts}, "plan": plan}
    if a.install_report and Path(a.install_report).is_file():
        result["install"] = json.loads(Path(a.install_report).read_text())
    try:
        result["parts"] = run_parts(a, plan, work)
    finally:
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result.update(summarize(result.get("parts", {}), plan))
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        if not a.work and not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwritten {out} ({result['seconds']} s{', dry run: the figures mean nothing' if a.dry_run else ''})")


if __name__ == "__main__":
    main()
