"""Quality against training time: masked test perplexity (every 10th test review, the notebook's
tokenizer and vocabulary: exactly bench.py's time-to-quality measure) against training seconds,
for the notebook's recipe and for ours, up to a budget.

    python bench/quality.py                                  # 60 min of training per recipe
    python bench/quality.py --budget-min 5                   # a quick look
    python bench/quality.py --budget-min 60 --work W         # resumes W's runs: train in parts
    python bench/quality.py --recipe best=configs/imdb_best.yaml:250 \
        --recipe notebook=configs/imdb_seed.yaml:100

Each recipe is an ordinary lmcore run in WORK/NAME with train.max_train_seconds = the budget, so
it checkpoints as usual and a rerun with the same or a larger budget resumes it (a finished one
does nothing). The test reviews are only measured, never selected on: recipes choose nothing from
them (no keep_best, no early stopping here). Writes WORK/quality.json, quality.png (perplexity
against training minutes), quality.md (perplexity at 5, 15, 30 and 60 minutes: the last
validation at or before each mark) and samples.md: completions of the same prompts with the
same seed from each recipe's final model, so that the perplexities can be read as text.
Training seconds count optimizer steps only (validation, checkpoints, data loading and process
start excluded), as in bench.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKS_MIN = (5, 15, 30, 60)
PROMPTS = ("this movie was", "the acting in this film", "i would not recommend", "the best thing about it is",
           "my wife and i")
SAMPLING = ("generate.temperature=0.8", "generate.top_k=50", "generate.max_new_tokens=30", "generate.seed=0",
            "generate.precision=fp32")
HOLDOUT_EVERY = 25  # 1,000 of the 25,000 training reviews
VALIDATION = {"test": ["data.val_split=test", "data.val_stride=10"],
              "holdout": ["data.val_split=holdout", f"data.holdout_every={HOLDOUT_EVERY}",
                          "data.val_stride=1"]}
VAL_LABEL = {"test": "every 10th test review (2,500)",
             "holdout": f"every {HOLDOUT_EVERY}th training review (1,000), kept out of training"}
DEFAULT_RECIPES = ("notebook=configs/imdb_seed.yaml:100", "ours=configs/imdb_fast.yaml:250")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imdb"))
    p.add_argument("--budget-min", type=float, default=60.0, help="training minutes per recipe")
    p.add_argument("--recipe", action="append", metavar="NAME=CONFIG[:EVAL_EVERY]",
                   help="a run to measure (repeatable); EVAL_EVERY: steps between validations")
    p.add_argument("--work", default=str(REPO / "bench" / "results" / "quality"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--override", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="an override for one recipe, e.g. ours:train.batch_size=32")
    p.add_argument("--val", choices=("test", "holdout"), default="test",
                   help="test: every 10th test review (reported, never selected on); holdout: every "
                        f"{HOLDOUT_EVERY}th training review, kept out of training (for choosing a recipe)")
    p.add_argument("--no-samples", action="store_true", help="skip samples.md")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the table and the plot from WORK/quality.json")
    args = p.parse_args()
    work = Path(args.work)
    if args.report_only:
        result = json.loads((work / "quality.json").read_text())
        write(result, work)
        print_table(result)
        return
    work.mkdir(parents=True, exist_ok=True)
    recipes = [parse_recipe(r) for r in (args.recipe or DEFAULT_RECIPES)]
    result = {"budget_min": args.budget_min, "data": args.data, "val": args.val, "machine": machine(),
              "recipes": earlier_recipes(work / "quality.json", args.val, args.data)}
    for name, config, every in recipes:
        extra = [o.split(":", 1)[1] for o in args.override if o.startswith(f"{name}:")]
        result["recipes"][name] = train(name, config, every, extra, args, work / name)
        write(result, work)  # after each recipe: a long run interrupted keeps what it measured
    if not args.no_samples:  # every recipe of the table: a resumed run's samples are redone
        completions = {name: samples(work / name, work / f"{name}-samples") for name in result["recipes"]}
        (work / "samples.md").write_text(samples_markdown(completions))
    print_table(result)


def earlier_recipes(path: Path, val: str, data: str) -> dict:
    """The recipes an earlier call measured in the same work folder on the same validation set:
    measuring one more recipe keeps the others in the table and the plot."""
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
        recipes = earlier["recipes"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path} is not a quality.json ({e}): use another --work") from None
    if (earlier.get("val", "test"), earlier.get("data")) != (val, data):
        raise SystemExit(f"{path} was measured with --val {earlier.get('val', 'test')} on "
                         f"{earlier.get('data')}: use another --work")
    return recipes


def parse_recipe(text: str) -> tuple[str, str, int]:
    name, sep, rest = text.partition("=")
    config, _, every = rest.partition(":")
    if not sep or not name or not config:
        raise SystemExit(f"--recipe {text!r}: expected NAME=CONFIG[:EVAL_EVERY]")
    return name, config, int(every or 200)


def train(name: str, config: str, every: int, extra: list[str], args, run: Path) -> dict:
    overrides = [f"run.dir={run}", f"data.source={args.data}", *VALIDATION[args.val], "data.val_limit=0",
                 "train.max_steps=1000000000", f"train.eval_interval={every}",
                 f"train.log_interval={min(every, 50)}", f"train.checkpoint_interval={every}",
                 f"train.max_train_seconds={args.budget_min * 60:g}", "train.keep_checkpoints=1",
                 "tracking.wandb_mode=disabled", *([f"run.threads={args.threads}"] if args.threads else []),
                 *extra]
    cmd = [sys.executable, "-m", "lmcore", "train", "--config", config, "--no-progress", *overrides]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    curve = validations(run / "metrics.jsonl")
    print(f"[{name}] {len(curve)} validations, {time.time() - t0:.0f} s wall this time", flush=True)
    return {"config": config, "overrides": overrides[1:], "eval_every_steps": every, "curve": curve,
            "at_minutes": {f"{m:g}": at(curve, m) for m in marks(args.budget_min)}}


def samples(run: Path, out: Path) -> list[str]:
    """The run's completions of PROMPTS from its last checkpoint (bulk generation, one shard)."""
    shutil.rmtree(out, ignore_errors=True)  # an earlier folder may come from an earlier checkpoint
    prompts = out.with_name(out.name + ".jsonl")
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    cmd = [sys.executable, "-m", "lmcore", "generate", f"run.dir={run}", f"generate.prompts={prompts}",
           f"generate.output_dir={out}", "tracking.wandb_mode=disabled", *SAMPLING]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{run.name}] generation exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return [r["completion"] for r in sorted(rows, key=lambda r: r["id"])]


def samples_markdown(completions: dict[str, list[str]]) -> str:
    names = list(completions)
    lines = ["| prompt | " + " | ".join(names) + " |\n", "|" + " --- |" * (len(names) + 1) + "\n"]
    for i, prompt in enumerate(PROMPTS):
        cells = [completions[n][i].replace("|", "\\|") for n in names]
        lines.append(f"| *{prompt}* | " + " | ".join(cells) + " |\n")
    lines.append(f"\nEach recipe's final model; {', '.join(SAMPLING)}.\n")
    return "".join(lines)


def validations(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "train_seconds": round(r["train_seconds"], 2),
             "val_ppl": round(r["val/ppl"], 2), "tokens_seen": r.get("tokens_seen")}
            for r in rows if "val/ppl" in r]


def marks(budget_min: float) -> list[float]:
    """The table's columns: MARKS_MIN up to the budget, and the budget itself."""
    out = [m for m in MARKS_MIN if m <= budget_min + 1e-9]
    return out if budget_min in out else [*out, budget_min]


def at(curve: list[dict], minutes: float) -> dict | None:
    """The last validation at or before `minutes` of training (a run with that budget stops at
    the first step past it: its final validation, a fraction of a second later, counts)."""
    done = [v for v in curve if v["train_seconds"] <= minutes * 60 + 1.0]
    return done[-1] if done else None


def machine() -> dict:
    flags = ""
    with contextlib.suppress(OSError, StopIteration):
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    import torch  # only for its version and thread count

    return {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "amx": "amx_tile" in flags,
            "avx512_fp16": "avx512_fp16" in flags, "date": time.strftime("%Y-%m-%d %H:%M")}


def write(result: dict, work: Path) -> None:
    (work / "quality.json").write_text(json.dumps(result, indent=1))
    (work / "quality.md").write_text(markdown(result))
    plot(result, work / "quality.png")


def markdown(result: dict) -> str:
    columns = marks(result["budget_min"])
    head = "| recipe | " + " | ".join(f"{m:g} min" for m in columns) + " | best | validations |\n"
    lines = [head, "|" + " --- |" * (len(columns) + 3) + "\n"]
    for name, r in result["recipes"].items():
        # a mark the run reached (it ends at its budget, give or take a step), from its curve
        reached = r["curve"][-1]["train_seconds"] / 60 + 0.02 if r["curve"] else 0.0
        cells = [f"{v['val_ppl']:.1f} ({v['train_seconds'] / 60:.1f})"
                 if m <= reached and (v := at(r["curve"], m)) else "–" for m in columns]
        best = min((v["val_ppl"] for v in r["curve"]), default=None)
        tail = f" | {best:.1f} | {len(r['curve'])} |\n" if best is not None else " | – | 0 |\n"
        lines.append(f"| {name} (`{r['config']}`) | " + " | ".join(cells) + tail)
    m = result["machine"]
    lines.append(f"\nMasked perplexity on {VAL_LABEL[result.get('val', 'test')]} at each mark: the last "
                 "validation at or before it (in brackets, its training minute); "
                 f"{m['cpus']} CPUs, torch {m['torch']}, {m['threads']} threads, AMX {m['amx']}, "
                 f"{m['date']}.\n")
    return "".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in result["recipes"].items():
        xs = [v["train_seconds"] / 60 for v in r["curve"]]
        label = f"{name} ({Path(r['config']).name})"
        ax.plot(xs, [v["val_ppl"] for v in r["curve"]], marker=".", label=label)
    ax.set(xlabel="training minutes (optimizer steps only)",
           ylabel=f"masked perplexity, {VAL_LABEL[result.get('val', 'test')].split(' (')[0]}",
           yscale="log",
           title="quality against training time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def print_table(result: dict) -> None:
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
