"""The one dispatcher: run a job of some kind with a config, and say what it did.

Called by the command line (lmcore/cli.py, which prints the result), by the SLURM entry point
on the nodes (lmcore/slurm/entry.py, which hands it to submitit), and so by every launcher
(`torchrun ... lmcore train`, jobs/*.py, sbatch scripts).

    train      train or resume run.dir                      lmcore.trainer
    eval       masked perplexity of a checkpoint             lmcore.evaluate
    generate   this process's share of a bulk generation     lmcore.gen.job
               (merged at once when it was the only shard)
    merge      a bulk generation folder into one file        lmcore.gen.merge
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcore.config import Config
from lmcore.evaluate import run_eval
from lmcore.gen.folder import MANIFEST_FILE, MERGED_FILE
from lmcore.gen.job import generate_shard
from lmcore.gen.merge import merge_outputs
from lmcore.runtime.signals import STOPPED_EXIT
from lmcore.trainer import train

KINDS = ("train", "eval", "generate", "merge")


@dataclass
class Outcome:
    result: dict[str, Any] | None  # what the job reports
    stopped: bool = False  # ended early on a stop request, with its state saved: rerun to finish
    reports: bool = True  # this process is the one that reports (rank 0)

    @property
    def exit_code(self) -> int:
        return STOPPED_EXIT if self.stopped else 0


def run_job(kind: str, cfg: Config, stop_requested: Callable[[], bool] = lambda: False,
            progress: bool = True) -> Outcome:
    if kind == "train":
        r = train(cfg, stop_requested, progress)
        return Outcome(r.to_dict(), r.stopped_early, reports=r.rank == 0)
    if kind == "eval":
        result = run_eval(cfg)
        return Outcome(result, reports=result is not None)
    if kind == "generate":
        return _generate(cfg, stop_requested, progress)
    if kind == "merge":
        return Outcome(_merged(cfg, merge_outputs(cfg)))
    raise ValueError(f"job kind must be one of {', '.join(KINDS)}; got {kind!r}")


def _generate(cfg: Config, stop_requested: Callable[[], bool], progress: bool) -> Outcome:
    result = generate_shard(cfg, stop_requested, progress)
    main = result["rank"] == 0
    if main and result["complete"] and result["num_shards"] == 1:  # nothing else to wait for
        merged = _merged(cfg, merge_outputs(cfg))
        result.update(merged=merged["merged"], sha256=merged["sha256"])
    return Outcome(result, result["stopped"], reports=main)


def _merged(cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    out = Path(cfg.generate.output_dir)
    return {"merged": str(out / MERGED_FILE), "manifest": str(out / MANIFEST_FILE), **manifest["counts"],
            "sha256": manifest["files"][MERGED_FILE]["sha256"]}
