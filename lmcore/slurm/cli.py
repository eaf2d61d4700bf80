"""`lmcore submit {train,eval,generate,pipeline,sweep} --cluster PROFILE --config CONFIG [overrides]`.

Called by lmcore.cli with the arguments after `submit`; returns the exit status. Bad input
(profile, config, sbatch's refusal) raises LmcoreError: one line, exit status 2, nothing
submitted. A job that ends without a result under --wait: one line, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence

from lmcore.deps import require
from lmcore.overrides import OverrideSyntaxError, add_point_arguments, normalize, unknown_argument
from lmcore.slurm import JobFailedError

MAX_SHARDS = 100_000  # array tasks of one generation; more is a typo, and planning them takes minutes

EPILOG = """\
examples:
  lmcore submit train --cluster local --config tiny run.dir=runs/slurm1
  lmcore submit generate --cluster gpu_example --config imdb_seed --shards 64 \\
      generate.prompts=prompts.jsonl generate.output_dir=gen/
  lmcore submit pipeline --cluster local --config tiny --dry-run
  lmcore submit sweep --cluster local --config tiny train.max_steps=200 \
      --grid optim.lr=1e-3,3e-3 model.hidden_dim=64,128 --dir runs/lr-sweep --parallel 2

PROFILE and CONFIG are built-in names (lmcore configs) or YAML files. Generation is a job array
(one shard per task, profile array_parallelism at once) plus a merge job; a pipeline chains
train -> eval -> generate -> merge with afterok dependencies. A sweep is a job array of training
runs, one per point (see 'lmcore sweep --help'), at most --parallel (else the profile's
array_parallelism) at once. Jobs checkpoint and requeue themselves on the profile's warning
signal (USR2 by default) and resume where they stopped.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        print(f"lmcore: error: {message} (see 'lmcore submit --help')", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    usage = ("lmcore submit {train,eval,generate,pipeline,sweep} --cluster PROFILE [--config CONFIG]\n"
             "                     [--dry-run] [--shards N] [--wait] [--timeout S] [--json] [KEY=VALUE ...]\n"
             "                     sweep: [--grid KEY=V1,V2 ... | --points FILE] [--dir SWEEP_DIR] "
             "[--parallel N]")
    p = _Parser(prog="lmcore submit", usage=usage,
                description="Submit lmcore jobs to SLURM through submitit. KEY=VALUE: dotted config "
                            "overrides, as for the other commands.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("kind", choices=["train", "eval", "generate", "pipeline", "sweep"], help="what to submit")
    p.add_argument("--cluster", required=True, metavar="PROFILE",
                   help="cluster profile: a built-in name (lmcore configs) or a YAML file")
    p.add_argument("--config", "-c", help="run config: a built-in name or a YAML file; defaults apply when "
                                          "omitted")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); submit nothing")
    p.add_argument("--shards", type=int, default=0,
                   help="generation shards = array tasks (default: generate.num_shards, else 1)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, metavar="S",
                   help="with --wait: give up waiting after S seconds (the jobs keep running)")
    p.add_argument("--json", action="store_true", help="print job ids, logs (and results) as JSON")
    add_point_arguments(p)
    p.add_argument("--parallel", type=int, default=0, metavar="N",
                   help="sweep: at most N points at once (default: the profile's array_parallelism)")
    return p


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(normalize(list(argv)))
    except OverrideSyntaxError as e:
        parser.error(str(e))
    for item in extra:
        if item.startswith("-") or "=" not in item:
            parser.error(unknown_argument(item))
    if not 0 <= args.shards <= MAX_SHARDS:
        parser.error(f"--shards must be in 0..{MAX_SHARDS}")
    if args.kind != "sweep" and (args.grid or args.points or args.dir or args.parallel):
        parser.error("--grid, --points, --dir and --parallel are for 'lmcore submit sweep'")
    if args.kind == "sweep" and args.shards:
        parser.error("--shards is for generate and pipeline; a sweep is one array task per point")
    if not 0 <= args.parallel <= MAX_SHARDS:
        parser.error(f"--parallel must be in 0..{MAX_SHARDS}")
    require("submitit")  # before lmcore.slurm.submit imports it: one clear line, not an ImportError
    from lmcore.config import load_config
    from lmcore.slurm.profile import load_profile
    from lmcore.slurm.submit import check_fits, dry_run_text, max_array_size, plan, submit_plan

    profile = load_profile(args.cluster)
    sweep = None
    if args.kind == "sweep":  # every point's config is checked here, before sbatch
        from lmcore.sweep import build, write_manifest

        sweep = build(args.config, extra, args.grid, args.points, args.dir)
        specs = plan("sweep", profile, None, max_array_size=max_array_size(), points=sweep.configs,
                     parallel=args.parallel)
    else:
        cfg = load_config(args.config, extra)  # a bad config stops here, before sbatch
        specs = plan(args.kind, profile, cfg, shards=args.shards, max_array_size=max_array_size())
    if args.dry_run:
        grid = ["--grid", *args.grid] if args.grid else ["--points", args.points] if args.points else []
        summary = " ".join(shlex.quote(x) for x in [args.config or "defaults", *extra, *grid])
        print(dry_run_text(specs, profile, summary), end="")
        return 0
    check_fits(specs, profile)
    undo = write_manifest(sweep) if sweep is not None else None
    try:
        submitted = submit_plan(specs, profile)
    except BaseException:
        if undo is not None:  # nothing was submitted: no sweep.json claims it was
            undo()
        raise
    report = [_announce(spec, sub, args.json) for spec, sub in zip(specs, submitted, strict=True)]
    sys.stdout.flush()
    status = _wait_all(report, submitted, args) if args.wait else 0
    if args.json:
        print(json.dumps({"jobs": report}, default=str))
    return status


def _announce(spec, sub, quiet: bool) -> dict:
    """What was submitted, said once: ids, log files, how to watch and cancel it."""
    from lmcore.slurm.submit import describe

    out, err = sub.log_paths()
    entry = {"kind": sub.kind, "job_id": sub.job_id, "tasks": [j.job_id for j in sub.jobs], "stdout": out,
             "stderr": err}
    if not quiet:
        print(f"submitted {describe(spec).replace(' job:', f' job {sub.job_id}:', 1)}")
        several = spec.params["ntasks_per_node"] > 1 or spec.params["nodes"] > 1
        ranks = "  (a pair per task/rank: _0_ is rank 0)" if several else ""
        print(f"  logs:  {out}\n         {err}{ranks}")
        print(f"  watch: squeue -j {sub.job_id}    cancel: scancel {sub.job_id}")
        if spec.kind == "merge":
            print(f"  the merged generations go to {spec.calls[0].cfg['generate']['output_dir']}")
    return entry


def _wait_all(report: list[dict], submitted: list, args: argparse.Namespace) -> int:
    """--wait: each job's results, in order; 1 at the first job that ends without one."""
    from lmcore.slurm.submit import wait

    for entry, sub in zip(report, submitted, strict=True):
        try:
            entry["results"] = wait(sub, args.timeout)
        except JobFailedError as e:
            entry["error"] = str(e)
            print(f"lmcore: error: {e}", file=sys.stderr)
            return 1
        if not args.json:
            print(json.dumps({"kind": sub.kind, "job_id": sub.job_id, "results": entry["results"]},
                             default=str))
    return 0
