"""The GPU check (issue 15): lmcore against the notebook's reference on one CUDA device, one JSON.

    bash bench/gpu_check.sh --prepare        # here, once: .gpucheck/ (wheels, data, reference) to carry
    bash bench/gpu_check.sh                  # on the GPU machine: installs the wheels, then runs this
    python bench/gpu_check.py --dry-run      # on the CPU, tiny sizes (tests/test_gpu_check.py)

The parts run in this order, each a child process (`gpu_check.py part NAME`: bench/gpu_parts.py)
killed at its own time limit inside the total budget (--budget-s), so the run has a known upper
bound; the units a part finished before it was killed are kept:
  setup   torch, CUDA, cuDNN, bf16, torch._int_mm, the packages the wheels brought, the matmul peak
          (unit env); the token cache, random notebook-size weights in both formats, the prompts
  resume  N/2 steps resumed to N against N straight steps, bit for bit (and two straight runs)
  train   real tokens/s, the reference against ours: fp32, bf16; fused loss, plain cross-entropy;
          packed; cuDNN off
  eval    masked-perplexity throughput on the same weights; the two perplexities must agree
  gen     bulk generation new tokens/s (fp32, bf16, int8) against the notebook's loop, and whether
          the output is byte-identical across batch sizes and run to run (bench/gpu_gen.py)
Every figure is measured in this run. A unit that cannot apply says why (int8 where torch._int_mm
refuses the shapes: "not_applicable"); a unit that failed, ran out of time or did not run, a
wheel that did not install, a resume that is not bit-exact on a deterministic device or
perplexities that disagree are problems: listed in the JSON's "problems", and the exit status is 1.
--dry-run runs the same code on the CPU at tiny sizes on the built-in sample corpus (written as
IMDB-format files both sides read); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from children import read_jsonl, run_child
from context import REPO, SHARED
from report import table

PREPARED = REPO / ".gpucheck"  # what `bash bench/gpu_check.sh --prepare` makes (carried, git-ignored)
PARTS = ["setup", "resume", "train", "eval", "gen"]
VARIANTS = ["fp32", "fp32_plain_ce", "bf16", "bf16_plain_ce", "packed_fp32", "packed_bf16", "fp32_no_cudnn"]
# Seconds each part may take at most; on the GPU they add up to the default budget (7 min). The dry
# run's are only a net: a shared 2-core machine can be several times slower than an idle one.
LIMITS = {"real": {"setup": 100, "resume": 90, "train": 110, "eval": 50, "gen": 65},
          "dry": {"setup": 120, "resume": 120, "train": 120, "eval": 120, "gen": 120}}
SIZES: dict[str, dict[str, Any]] = {
    "real": {"peak_size": 8192, "train_overrides": [],
             "train": {"ref_warmup": 5, "ref_steps": 45, "warmup": 10, "steps": 60}, "resume": {"steps": 20},
             "eval": {"repeats": 2},
             "gen": {"prompts": 1000, "new_tokens": 50, "batch_size": 256, "repeats": 2, "ref_prompts": 40,
                     "identity_prompts": 256, "identity_batch_sizes": [256, 64, 7]}},
    # the notebook's model and 258-token rows for eval and gen (the reference has no other);
    # a small one for our training runs, which only exercise the code paths here
    "dry": {"peak_size": 256, "train_overrides": ["train.batch_size=4", "data.truncate=32", "data.seq_len=32",
                                                  "model.embedding_dim=32", "model.hidden_dim=32"],
            "train": {"ref_warmup": 1, "ref_steps": 2, "warmup": 1, "steps": 2}, "resume": {"steps": 2},
            "eval": {"repeats": 1},
            "gen": {"prompts": 16, "new_tokens": 4, "batch_size": 16, "repeats": 1, "ref_prompts": 2,
                    "identity_prompts": 20, "identity_batch_sizes": [20, 7]}},
}
RESERVE_S = 5  # kept back from the budget for writing the result
EVAL_AGREE = 5e-3  # masked perplexities within 0.5% (the reference scores <eos> after the padding)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the sample corpus")
    p.add_argument("--data", help="train.jsonl.gz + test.jsonl.gz (default .gpucheck/data, else "
                                  "../shared/data/imdb; --dry-run: the sample corpus)")
    p.add_argument("--reference", help="seed_reference.py (default .gpucheck/, else ../shared/bench/)")
    p.add_argument("--eval-stride", type=int, default=0,
                   help="evaluate every Nth test review (0: DATA/prepared.json's, else 10)")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    p.add_argument("--out", default=str(out / "gpu_check.json"), help="the JSON (its logs beside it)")
    p.add_argument("--work", help="runs, checkpoints, logs (default: a temp folder, removed after)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--budget-s", type=float, default=0, help="seconds for all parts (0: the limits' sum)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, in the order above")
    p.add_argument("--variants", default=",".join(VARIANTS), help="our training variants")
    p.add_argument("--install-report", help="bench/gpu_wheels.py install's JSON, kept in the result")
    a = p.parse_args(argv)
    a.mode = "dry" if a.dry_run else "real"
    a.device = "cpu" if a.dry_run else "cuda"
    a.budget_s = a.budget_s or sum(LIMITS[a.mode].values()) + RESERVE_S
    asked, a.variants = a.parts.split(","), [v for v in a.variants.split(",") if v]
    a.parts = [s for s in PARTS if s in asked]
    bad = sorted((set(asked) - set(PARTS)) | (set(a.variants) - set(VARIANTS)))
    if not a.parts or bad:
        p.error(f"--parts of {','.join(PARTS)}, --variants of {','.join(VARIANTS)}; unknown: {bad}")
    return a


def write_sample_data(folder: Path) -> Path:
    """The built-in sample corpus as IMDB-format files (the reference reads only those)."""
    sys.path.insert(0, str(REPO))  # this checkout's lmcore (the GPU machine has none installed)
    from lmcore.data.sample_corpus import sample_reviews  # pure Python: no torch in the driver

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 400), ("test", 300)):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                         for r in sample_reviews(split, n))
    return folder


def first_file(*candidates: Path) -> Path:
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SystemExit(f"gpu_check: none of {', '.join(map(str, candidates))} exists (on the GPU machine: "
                     "`bash bench/gpu_check.sh --prepare` here first, and carry .gpucheck)")


def inputs(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The data folder, the eval stride and the reference script; SystemExit if one is missing."""
    if a.data:
        folders = [Path(a.data)]
    elif a.dry_run:
        folders = [write_sample_data(work / "data")]
    else:
        folders = [PREPARED / "data", SHARED / "data" / "imdb"]
    data = next((f for f in folders if (f / "train.jsonl.gz").is_file()), folders[0]).resolve()
    for split in ("train", "test"):
        first_file(data / f"{split}.jsonl.gz")
    meta = data / "prepared.json"
    prepared = json.loads(meta.read_text()) if meta.is_file() else {}
    refs = [Path(a.reference)] if a.reference else [PREPARED / "seed_reference.py",
                                                    SHARED / "bench" / "seed_reference.py"]
    ref = first_file(*refs)
    from gpu_reference import describe  # the patches apply, or SystemExit now rather than in each part

    return {"data": str(data), "data_prepared": prepared or None,
            "eval_stride": a.eval_stride or int(prepared.get("eval_stride", 10)),
            "reference": str(ref), "reference_info": describe(ref)}


def make_plan(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = json.loads(json.dumps(SIZES[a.mode]))
    sizes["train"]["variants"] = a.variants
    sizes["resume"]["configs"] = ["padded_fp32", "packed_bf16_dropout"]
    sizes["gen"]["precisions"] = ["fp32", "bf16", "int8"]
    sizes["eval"]["precisions"] = ["fp32", "bf16"]
    left_out = {}
    if a.device == "cpu" and not cpu_has_bf16():  # lmcore refuses bf16 there (runtime/precision.py)
        for where, key in (("train", "variants"), ("resume", "configs"), ("gen", "precisions"),
                           ("eval", "precisions")):
            left_out[f"{where}.{key}"] = [v for v in sizes[where][key] if "bf16" in v]
            sizes[where][key] = [v for v in sizes[where][key] if "bf16" not in v]
        print("gpu_check: this CPU has no native bf16: the dry run leaves out "
              + "; ".join(f"{k} {','.join(v)}" for k, v in left_out.items() if v), flush=True)
    return {"dry_run": a.dry_run, "device": a.device, "work": str(work), **inputs(a, work), **sizes,
            "left_out_no_native_bf16": left_out}


def cpu_has_bf16() -> bool:
    """lmcore's own answer (runtime/precision.cpu_supports), from a child: this driver stays
    without torch until the wheels are installed."""
    code = "from lmcore.runtime.precision import cpu_supports; print(cpu_supports('bf16'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip() == "True"


def child_env(a: argparse.Namespace, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LMCORE_CACHE=str(work / "token-cache"), WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # this checkout's lmcore first (an installed one may be another copy); the wheels' folder stays
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # lmcore takes a GPU when it sees one
        # one thread per process: two on a shared 2-core machine stall at every parallel region
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_part(name: str, plan: dict, limit: float, work: Path, env: dict) -> dict[str, Any]:
    """One part as a child process, killed after `limit` seconds: its units and how it ended."""
    plan_path, results = work / "plans" / f"{name}.json", work / "parts" / f"{name}.jsonl"
    for folder in ("plans", "parts", "logs"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    plan_path.write_text(json.dumps(plan, indent=1))
    cmd = [sys.executable, str(Path(__file__).resolve()), "part", name, str(plan_path), str(results)]
    c = run_child(f"part-{name}", cmd, logs=work / "logs", cwd=REPO, env=env, timeout=limit)
    units = {r.pop("unit"): r for r in read_jsonl(results)}
    done = units.pop("_done", None) is not None
    status = "ok" if done and c["rc"] == 0 else "timeout" if c["wall_s"] > limit else "failed"
    out = {"status": status, "seconds": c["wall_s"], "limit_s": round(limit, 1), "units": units}
    if status != "ok":
        err = (work / "logs" / f"part-{name}.err").read_text(errors="replace").strip().splitlines()
        out["why"] = (f"killed at its time limit ({limit:.0f} s)" if status == "timeout"
                      else f"exit {c['rc']}: {err[-1] if err else '(no stderr)'}")
        out["stderr_tail"] = err[-15:]
    return out


# -- the summary: every value read from this run's units -----------------------------------------
def unit(parts: dict, part: str, name: str) -> dict | None:
    u = (parts.get(part) or {}).get("units", {}).get(name)
    return u if u and u.get("status") == "ok" else None


def figure_rows(parts: dict, plan: dict) -> list[dict[str, Any]]:
    """Ours against the reference, part by part: (what, value, unit, ratio to the reference)."""
    peak = ((unit(parts, "setup", "env") or {}).get("matmul_peak")) or {}
    tps = "real_tokens_per_s"
    groups = [("train", tps, "real tokens/s", [f"ours_{v}" for v in plan["train"]["variants"]]),
              ("eval", tps, "real tokens/s", [f"ours_{p}" for p in plan["eval"]["precisions"]]),
              ("gen", "median", "new tokens/s", [f"ours_{p}" for p in plan["gen"]["precisions"]])]
    rows = []
    for part, key, what, ours in groups:
        ref = unit(parts, part, "reference")
        ref_v = ref and ref[key if part != "gen" else "new_tokens_per_s"]
        rows.append({"what": f"{part}: reference", "value": ref_v, "unit": what,
                     "ratio": 1.0 if ref_v else None})
        for name in ours:
            u = unit(parts, part, name)
            v = u and u[key]
            row = {"what": f"{part}: {name}", "value": v, "unit": what,
                   "ratio": round(v / ref_v, 2) if v and ref_v else None}
            if part == "train" and v and peak.get("bf16_tflops"):
                tflops = v * u["model_flops_per_token"] / 1e12
                row.update(model_tflops=round(tflops, 2), of_bf16_peak=round(tflops / peak["bf16_tflops"], 3),
                           cuda_peak_mb=u.get("cuda_peak_mb"))
            rows.append(row)
    return rows


def checks(parts: dict, plan: dict) -> dict[str, Any]:
    def field(part: str, name: str, key: str) -> Any:
        u = unit(parts, part, name)
        return u.get(key) if u else None

    out: dict[str, Any] = {}
    for c in plan["resume"]["configs"]:
        out[f"resume_{c}"] = {k: field("resume", c, k) for k in ("bit_exact", "deterministic", "verdict")}
    for p in plan["gen"]["precisions"]:
        out[f"gen_{p}"] = {k: field("gen", f"identity_{p}", k)
                           for k in ("identical_across_batch_sizes", "identical_run_to_run", "verdict")}
    ref, ours = unit(parts, "eval", "reference"), unit(parts, "eval", "ours_fp32")
    if ref and ours:
        rel = ours["masked_ppl"] / ref["masked_ppl"] - 1
        out["eval_agree"] = {"agree": ours["targets"] == ref["targets"] and abs(rel) < EVAL_AGREE,
                             "ours": ours["masked_ppl"], "reference": ref["masked_ppl"],
                             "relative_difference": round(rel, 6), "tolerance": EVAL_AGREE,
                             "targets": [ours["targets"], ref["targets"]]}
    return out


def problems(result: dict) -> list[str]:
    """What makes this run fail: what did not run, and checks that must hold on any device."""
    out = [f"install: {f['wheel']}: {f['why']}" for f in (result.get("install") or {}).get("failed", [])]
    out += [f"install: {m} {s}" for m, s in ((result.get("install") or {}).get("imports") or {}).items()
            if not s.startswith("imports")]
    packages = ((unit(result["parts"], "setup", "env") or {}).get("packages")) or {}
    out += [f"env: {m} {s}" for m, s in packages.items() if not s.startswith("imports")]
    for name, part in result["parts"].items():
        if part["status"] != "ok":
            out.append(f"{name}: {part['status']}: {part.get('why')}")
        out += [f"{name}/{u}: {r['status']}: {r.get('why')}" for u, r in part["units"].items()
                if r["status"] not in ("ok", "not_applicable")]
    for name, c in result["checks"].items():
        if name.startswith("resume_") and c["deterministic"] and c["bit_exact"] is False:
            out.append(f"{name}: {c['verdict']}")
    if result["checks"].get("eval_agree", {}).get("agree") is False:
        out.append(f"eval: the masked perplexities disagree: {result['checks']['eval_agree']}")
    if result["dry_run"]:  # on the CPU the decoder is row-local: any difference is a bug
        out += [f"{n}: {c['verdict']}" for n, c in result["checks"].items()
                if n.startswith("gen_") and c["identical_across_batch_sizes"] is False]
    return out


def summarize(result: dict) -> None:
    parts, plan = result["parts"], result["plan"]
    result["figures"] = figure_rows(parts, plan)
    result["checks"] = checks(parts, plan)
    result["problems"] = problems(result)
    result["ok"] = not result["problems"]
    table("figures (ratio: ours / the reference, same device, same run)", ["what", "value", "unit", "ratio"],
          [[f["what"], f["value"], f["unit"], f["ratio"]] for f in result["figures"]])
    table("checks", ["check", "verdict"],
          [[n, c.get("verdict", c.get("agree"))] for n, c in result["checks"].items()])
    if result["problems"]:
        table("PROBLEMS", ["problem"], [[p[:160]] for p in result["problems"]])


# -- the run ----------------------------------------------------------------------------------------
def write(result: dict, out: Path, work: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if (work / "logs").is_dir():
        with tarfile.open(out.with_name(out.stem + "_logs.tar.gz"), "w:gz") as tar:
            tar.add(work / "logs", arcname="logs")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["part"]:  # a child: the torch side (imported here so that it is imported once)
        from gpu_parts import main as part_main

        part_main(argv[1:])
        return 0
    a = parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="lmcore-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0, out = time.perf_counter(), Path(a.out)
    plan = make_plan(a, work)
    result: dict[str, Any] = {"gpu_check": 1, "dry_run": a.dry_run, "device": a.device,
                              "command": shlex.join(["python", "bench/gpu_check.py", *argv]),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": a.budget_s,
                              "plan": plan, "parts": {}}
    if a.install_report:
        result["install"] = json.loads(Path(a.install_report).read_text())
    env = child_env(a, work)
    try:
        for name in a.parts:
            limit = min(LIMITS[a.mode][name], a.budget_s - RESERVE_S - (time.perf_counter() - t0))
            if limit < 5:
                result["parts"][name] = {"status": "not_run", "why": "the budget was spent", "units": {}}
                continue
            print(f"== {name} (at most {limit:.0f} s)", flush=True)
            result["parts"][name] = r = run_part(name, plan, limit, work, env)
            print(f"   {r['status']} in {r['seconds']} s {r.get('why') or ''}", flush=True)
            if name == "setup":
                env_unit = r["units"].get("env") or {}
                if a.device == "cuda" and not env_unit.get("cuda_available"):
                    raise SystemExit(f"gpu_check: torch sees no CUDA device here ({r.get('why') or env_unit})"
                                     "; --dry-run is the CPU check")
                plan["setup"] = r["units"].get("setup") or {}
            result["seconds"] = round(time.perf_counter() - t0, 1)
            write(result, out, work)  # after every part: a run killed from outside leaves what it had
        summarize(result)
    finally:
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write(result, out, work)
        if not a.work and not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    verdict = "ok" if result.get("ok") else f"{len(result.get('problems', []))} problem(s)"
    print(f"\nwritten {out} ({result['seconds']} s): {verdict}" + ("; a dry run: its figures mean nothing"
                                                                   if a.dry_run else ""))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
