"""The context every section of bench.py gets: options, work folder, child environment, the
result being built, and the commands of both sides. Imports neither torch nor lmcore (see
children.py: the driver's own footprint must stay small).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from children import run_child

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("LMCORE_SHARED", REPO.parent / "shared"))

EVAL_STRIDE = 10
# Targets of the performance issue (ratios; same run, same data).
TARGETS = {
    "train_ratio": 8.0,  # real tokens/s, ours / reference
    "ceiling_fraction": 0.8,  # our model FLOP rate / the job's ceiling (bench/ceiling.py), each job
    "ttq_ratio": 150.0,  # reference's 216-step seconds / our seconds to <= 541.9
    "eval_ratio": 8.0,  # real tokens/s
    "gen_ratio": 200.0,  # new tokens/s
    "memory_fraction": 1 / 8,  # our training peak RSS / the reference's
}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        env["WANDB_MODE"] = "disabled"
        env["PYTHONUNBUFFERED"] = "1"
        if args.fresh_cache:
            env["LMCORE_CACHE"] = str(work / "token-cache")
        self.env = env
        self.result: dict[str, Any] = {"sections": {}, "targets": []}
        self.ref_train: list[dict] = []  # reference training runs (the train and ttq sections share them)
        self.ref_warm: dict | None = None  # its run of the first --warmup-steps steps

    # -- processes ---------------------------------------------------------------------------
    def child(self, name: str, cmd: list[str], poll=None, timeout: float | None = None,
              want_json: bool = True, ok_codes: tuple[int, ...] = (0,)) -> dict:
        """Run cmd to the end (children.run_child), record it in result["children"], and stop the
        bench if it failed."""
        res = run_child(name, cmd, logs=self.logs, cwd=REPO, env=self.env,
                        timeout=timeout or self.args.child_timeout, poll=poll)
        self.result.setdefault("children", []).append(
            {"name": name, **{k: res[k] for k in ("rc", "wall_s", "cpu_s", "other_cpu_cores",
                                                  "peak_rss_mb")}})
        if res["rc"] not in ok_codes or (want_json and res["json"] is None):
            tail = (self.logs / f"{name}.err").read_text(errors="replace")[-3000:]
            raise SystemExit(f"bench: {name} failed (exit {res['rc']}); command:\n  {' '.join(cmd)}\n"
                             f"stderr tail:\n{tail}")
        return res

    def fresh(self, name: str) -> Path:
        """A folder of the work folder, emptied: a --work reused from an earlier bench starts clean."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def reference(self, mode: str, *extra: str) -> list[str]:
        cmd = [sys.executable, str(self.args.reference), mode, "--data", str(self.args.data), *extra]
        if self.args.threads:
            cmd += ["--threads", str(self.args.threads)]
        return cmd

    def lmcore(self, job: str, config: str, *overrides: str) -> list[str]:
        cmd = [sys.executable, "-m", "lmcore.cli", job, "--config", str(REPO / config)]
        if job == "train":
            cmd.append("--no-progress")
        return cmd + [f"data.source={self.args.data}", "tracking.wandb_mode=disabled",
                      f"run.threads={self.args.threads}", *overrides]

    def helper(self, name: str, *extra: str) -> dict:
        """Run bench/helpers.py NAME (what needs torch) as a child; its JSON line."""
        cmd = [sys.executable, str(HERE / "helpers.py"), name, "--threads", str(self.args.threads), *extra]
        return self.child(f"helper-{name}", cmd)["json"]

    def target(self, name: str, what: str, ref: Any, ours: Any, unit: str, ratio: float | None,
               target: str, ok: bool | None, note: str = "") -> dict:
        row = {"name": name, "what": what, "reference": ref, "ours": ours, "unit": unit,
               "ratio": None if ratio is None else round(ratio, 3), "target": target,
               "pass": ok, "note": note}
        self.result["targets"].append(row)
        return row

    # -- the setup step ----------------------------------------------------------------------
    def setup(self) -> None:
        """Warm the token cache (ours) and time it: setup, excluded from every figure."""
        r = self.helper("setup", "--data", str(self.args.data))
        self.result["setup"] = r
        print(f"  vocabulary {r['vocab']}; tokenizer {r['tokenizer_s']} s, encoding train "
              f"{r['encode_train_s']} s, test {r['encode_test_s']} s ({r['built_new_entries']} new cache "
              f"entries in {r['cache']}); validation set: {r['val_reviews']} reviews, "
              f"{r['val_targets']} targets", flush=True)
