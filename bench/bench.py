"""lmcore against the seed notebook's reference, in the same run, on the real IMDB data.

    .venv/bin/python bench/bench.py                          # every section (~15 min on 2 cores)
    .venv/bin/python bench/bench.py --only train,peak --ref-steps 3 --our-steps 10
    .venv/bin/python bench/bench.py --only ttq --ttq-budget-s 120
    .venv/bin/python -m bench --only peak                    # the same, from the repository root

Sections (--only, comma-separated; default all):
  peak   the machine's ceilings: a 2048x2048 matmul in fp32 and bf16, and each job's own
         (bench/ceiling.py): its matmuls at their real shapes in fp32, bf16, fp16 and int8,
         combined by FLOPs; train, eval and gen report their model FLOP rate against it
  train  training at the notebook's model size with the full softmax: the reference
         (`seed_reference.py train --steps N`, run before and after ours) against
         configs/imdb_seed.yaml (padded, fp32) and its packed / bf16 / loss_precision=auto
         variants: real (non-pad) tokens/s, seconds per step, peak RSS of each training
         process, and the model FLOP rate as a fraction of the step's ceiling
  ttq    time to quality: the reference's time for 216 steps (measured here: its first W steps
         + the rest at its steady seconds per step), the steps it needs for masked test
         perplexity 541.9 (../shared/notes/baseline.md), against the training seconds
         configs/imdb_fast.yaml needs to reach <= 541.9 on the same 2,500 reviews (every 10th
         test review, the notebook's vocabulary), validating every --ttq-eval-every steps;
         as shipped (fp32) and with bf16 autocast (--ttq-variants), the faster counts
  eval   masked test perplexity throughput: `seed_reference.py eval --stride 10` against
         `lmcore eval eval.stride=10 eval.notebook_figure=false` on the same weights (the
         figures must agree: a correctness check)
  gen    generation: bench/generate_speed.py (the notebook's loop against the bulk job)

Every comparison runs both sides in this one process tree, one after the other, with the same
threads; ratios are the figures that carry from machine to machine, absolute numbers are
printed beside them. Each section prints reference, ours, ratio, target and pass/fail; the
whole result goes to --out (JSON) and a markdown table beside it (same name, .md).

What is timed: training = the optimizer steps only on both sides, steady state (the first
--warmup-steps left out): ours from train_seconds/tokens_seen in metrics.jsonl (validation and
checkpoint writes excluded); the reference prints only whole-run figures, so it runs N steps
and, once, the first W steps on the same batches (its shuffle is seeded) and the difference is
taken. Excluded everywhere and reported apart: process start and imports, reading
the data, tokenizer fit and encoding (ours: the on-disk token cache, warmed up front by a
setup step that is timed; --fresh-cache starts from an empty cache in the work folder),
model construction. Peak memory is the peak RSS of each child process (os.wait4's ru_maxrss:
the whole life of the process, loading included); this driver never imports torch, so its own
footprint (a few tens of MB, reported) is the only thing that can leak into a child's figure.

Layout: this file parses the options, runs the sections and writes the results; context.py is
what every section gets (options, the result, the commands of both sides), children.py runs
and measures the child processes, helpers.py holds the parts that need torch (run as
children), report.py the tables, and sections/NAME.py each section.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from children import NOISY_CORES, LoadSampler, self_maxrss_mb, stop_on_sigterm
from context import REPO, SHARED, TARGETS, Bench
from report import machine_info, markdown, table
from sections import eval as eval_section  # `eval`: the section's name (not the builtin)
from sections import gen, peak, train, ttq
from sections.train import TRAIN_VARIANTS
from sections.ttq import TTQ_VARIANTS

# In the order they run; each takes the shared context (context.Bench).
SECTIONS = {"peak": peak.run, "train": train.run, "ttq": ttq.run, "eval": eval_section.run, "gen": gen.run}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"sections, comma-separated: {','.join(SECTIONS)}")
    p.add_argument("--data", default=str(SHARED / "data" / "imdb"),
                   help="folder with train.jsonl.gz and test.jsonl.gz (default: ../shared/data/imdb)")
    p.add_argument("--reference", default=str(SHARED / "bench" / "seed_reference.py"),
                   help="the reference script (default: ../shared/bench/seed_reference.py)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "bench.json"),
                   help="JSON result (a markdown table goes beside it, .md)")
    p.add_argument("--work", help="folder for runs, checkpoints and logs (default: a temp folder, removed at "
                                  "the end unless --keep-work)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--fresh-cache", action="store_true",
                   help="an empty token cache in the work folder instead of $LMCORE_CACHE / ~/.cache/lmcore")
    p.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0 = torch's default)")
    p.add_argument("--ceiling-min-seconds", type=float, default=0.25,
                   help="peak: seconds per timing of each job's matmuls at their real shapes")
    p.add_argument("--child-timeout", type=float, default=3600,
                   help="seconds before a child process is killed")
    g = p.add_argument_group("train")
    g.add_argument("--warmup-steps", type=int, default=2,
                   help="first steps left out of the steady-state figures, on both sides")
    g.add_argument("--ref-steps", type=int, default=6, help="reference training steps per run")
    g.add_argument("--ref-repeats", type=int, default=2,
                   help="reference training runs (the first before ours, the others after)")
    g.add_argument("--our-steps", type=int, default=12, help="our training steps per variant")
    g.add_argument("--train-variants", default=",".join(TRAIN_VARIANTS),
                   help=f"ours, comma-separated: {','.join(TRAIN_VARIANTS)}")
    g = p.add_argument_group("time to quality")
    g.add_argument("--ttq-config", default="configs/imdb_fast.yaml")
    g.add_argument("--ttq-variants", default=",".join(TTQ_VARIANTS),
                   help=f"ours, comma-separated: {','.join(TTQ_VARIANTS)} (the target takes the fastest)")
    g.add_argument("--ttq-budget-s", type=float, default=0,
                   help="training seconds allowed (0: 1.5 x the goal, the reference's 216-step time / 10)")
    g.add_argument("--ttq-eval-every", type=int, default=10, help="validate every K steps")
    g.add_argument("--ttq-max-steps", type=int, default=0, help="cap on steps (0 = the config's)")
    g.add_argument("--ttq-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the ttq run (repeatable)")
    g.add_argument("--ttq-continue", action="store_true",
                   help="keep training to the budget after reaching the target (best ppl within the budget)")
    _eval_and_gen_options(p)
    return p


def _eval_and_gen_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("eval")
    g.add_argument("--eval-repeats", type=int, default=1, help="(ours, reference) pairs, one after the other")
    g.add_argument("--eval-checkpoint", help="an lmcore run or checkpoint of the notebook's architecture to "
                                             "score (default: random weights, torch.manual_seed(0))")
    g.add_argument("--eval-limit", type=int, default=0,
                   help="reviews of the stride-10 set (0 = all 2,500; rounded up to a multiple of 32)")
    g.add_argument("--eval-precisions", default="fp32,bf16",
                   help="our eval.precision values (the fastest whose figure agrees is the target's)")
    g = p.add_argument_group("generation (bench/generate_speed.py)")
    g.add_argument("--gen-prompts", type=int, default=1000, help="our prompts")
    g.add_argument("--gen-ref-prompts", type=int, default=40, help="the reference's prompts")
    g.add_argument("--gen-new-tokens", type=int, default=50, help="new tokens per prompt, both sides")
    g.add_argument("--gen-repeats", type=int, default=2)
    g.add_argument("--gen-precisions", default="fp32,bf16,int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    if min(args.ref_steps, args.our_steps) <= args.warmup_steps or args.warmup_steps < 1:
        p.error("need --ref-steps and --our-steps above --warmup-steps (>= 1)")
    precisions = args.eval_precisions.split(",")
    if not set(precisions) <= {"fp32", "bf16", "auto"}:
        p.error(f"--eval-precisions {args.eval_precisions!r}: fp32, bf16 or auto, comma-separated")
    args.ttq_variants = [v for v in args.ttq_variants.split(",") if v]
    if not args.ttq_variants or not set(args.ttq_variants) <= set(TTQ_VARIANTS):
        p.error(f"--ttq-variants {','.join(args.ttq_variants)!r}: {', '.join(TTQ_VARIANTS)}, comma-separated")
    if min(args.ref_repeats, args.eval_repeats, args.gen_repeats, args.ttq_eval_every) < 1:
        p.error("--ref-repeats, --eval-repeats, --gen-repeats and --ttq-eval-every must be >= 1")
    args.data = Path(args.data).resolve()
    args.reference = Path(args.reference).resolve()
    if not args.reference.is_file():
        p.error(f"reference script {args.reference} not found (--reference PATH)")
    if any(s != "peak" for s in args.sections):
        for f in ("train.jsonl.gz", "test.jsonl.gz"):
            if not (args.data / f).is_file():
                p.error(f"{args.data / f} not found: --data must be a folder with train.jsonl.gz and "
                        "test.jsonl.gz (the reference reads only those)")
    return args


def run_sections(bench: Bench) -> None:
    """The setup step (when a section needs the data), then each section asked for, in order."""
    args, r = bench.args, bench.result
    if any(s in args.sections for s in ("train", "ttq", "eval", "gen")):
        print("\n== setup (excluded from the figures)", flush=True)
        bench.setup()
        drop_unsupported(bench)
    order = [s for s in SECTIONS if s in args.sections]
    for s in order:
        print(f"\n== {s}", flush=True)
        l0 = os.getloadavg()[0]
        t = time.perf_counter()
        SECTIONS[s](bench)
        r.setdefault("section_meta", {})[s] = {"seconds": round(time.perf_counter() - t, 1),
                                               "load_1min_start": round(l0, 2),
                                               "load_1min_end": round(os.getloadavg()[0], 2)}


def drop_unsupported(bench: Bench) -> None:
    """Leave out the variants that need bf16 where the CPU has none natively (lmcore refuses
    them there, runtime/precision.py), and int8 generation without VNNI, saying so; the result
    records what was left out."""
    args, r = bench.args, bench.result
    if not r["setup"]["vnni"] and "int8" in args.gen_precisions.split(","):  # int8 ~15x slower than fp32
        args.gen_precisions = ",".join(p for p in args.gen_precisions.split(",") if p != "int8") or "fp32"
        r["left_out_no_vnni"] = {"gen_precisions": ["int8"]}
        print("  this CPU has no VNNI: left out gen_precisions int8 (torch._int_mm ~15x slower than fp32 "
              "there; bench/ceiling.py's out_int8 row measures it)", flush=True)
    if r["setup"]["native"]["bf16"]:
        return
    dropped = {}
    for opt in ("train_variants", "eval_precisions", "gen_precisions"):
        kept = [v for v in getattr(args, opt).split(",") if v and "bf16" not in v]
        dropped[opt] = [v for v in getattr(args, opt).split(",") if v and "bf16" in v]
        setattr(args, opt, ",".join(kept or (["fp32"] if opt != "train_variants" else ["seed"])))
    dropped["ttq_variants"] = [v for v in args.ttq_variants if v == "bf16"]
    args.ttq_variants = [v for v in args.ttq_variants if v != "bf16"] or ["fp32"]
    r["left_out_no_native_bf16"] = dropped
    print(f"  this CPU has no native bf16 ({r['setup']['cpu']}): left out "
          + "; ".join(f"{k} {','.join(v)}" for k, v in dropped.items() if v), flush=True)


def write_results(bench: Bench, load: dict, seconds: float) -> Path:
    """The run's totals into the result, which goes to --out (JSON) and, with targets, .md."""
    args, r = bench.args, bench.result
    r["load"] = load
    r["seconds"] = round(seconds, 1)
    r["driver_peak_rss_mb"] = round(self_maxrss_mb(), 1)
    r["noisy_children"] = {c["name"]: c["other_cpu_cores"] for c in r.get("children", [])
                           if (c["other_cpu_cores"] or 0) > NOISY_CORES}
    peak = r["sections"].get("peak") or {}
    r["torch"] = peak.get("torch") or (r.get("setup") or {}).get("torch", "?")  # (--only without peak)
    r["threads_used"] = peak.get("threads", args.threads or os.cpu_count())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    if r["targets"]:
        out.with_suffix(".md").write_text(markdown(r))
    return out


def print_summary(r: dict, out: Path) -> None:
    print("\n== summary")
    table("targets (same run, same data)", ["target", "reference", "ours", "ratio", "goal", "pass"],
          [[t["name"], t["reference"], t["ours"], t["ratio"], t["target"],
            "-" if t["pass"] is None else ("pass" if t["pass"] else "FAIL")] for t in r["targets"]])
    print(f"load average (1 min) during the run: mean {r['load']['mean']}, max {r['load']['max']}; "
          f"{r['seconds']} s in all; driver peak RSS {r['driver_peak_rss_mb']} MB")
    if r["noisy_children"]:
        print("warning: other processes took CPU time while these ran (cores busy on average): "
              + ", ".join(f"{n} {v}" for n, v in r["noisy_children"].items()))
    print(f"written {out}" + (f" and {out.with_suffix('.md')}" if r["targets"] else ""))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    signal.signal(signal.SIGINT, stop_on_sigterm)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="lmcore-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    r = bench.result
    r.update(command=shlex.join(["python", "bench/bench.py", *argv]),
             started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine_info(),
             sections_run=args.sections,
             data=str(args.data), reference=str(args.reference), work=str(work), targets_def=TARGETS)
    load0 = os.getloadavg()
    print(f"bench: {r['machine'].get('cpu')}, {r['machine']['cpus']} CPUs; load average {load0[0]:.2f} "
          f"{load0[1]:.2f} {load0[2]:.2f}; work folder {work}", flush=True)
    if load0[0] > 0.5 * (os.cpu_count() or 1):
        print("bench: warning: the machine is busy; absolute figures (and ratios, less so) will suffer",
              flush=True)
    sampler = LoadSampler().start()
    t_all = time.perf_counter()
    try:
        run_sections(bench)
    finally:
        out = write_results(bench, sampler.stop(), time.perf_counter() - t_all)
        if not args.work and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(r, out)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("bench: interrupted; the results so far are in --out", file=sys.stderr)
        sys.exit(130)
