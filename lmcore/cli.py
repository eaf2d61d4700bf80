"""`lmcore` command line: thin wrappers over the library, one subcommand per job.

Every user-fixable problem ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

from lmcore import __version__
from lmcore.errors import LmcoreError
from lmcore.overrides import OverrideSyntaxError, add_point_arguments, normalize, unknown_argument
from lmcore.runtime.leave import leave, multi_rank

# Each command imports what it needs when it runs, so that `lmcore --help`, completion and
# bad-argument errors take a few tens of milliseconds (yaml alone is ~15 ms, torch ~1.5 s).

EPILOG = """\
overrides are dotted keys after the options, as key=value, --key=value or --key value:
  lmcore train --config imdb_seed optim.lr=3e-4 --train.max_steps 200 run.dir=runs/a
--config takes a built-in name (lmcore configs) or a YAML file. Several processes (DDP) run
the same command under a launcher:
  torchrun --standalone --nproc_per_node 2 --no-python lmcore train --config tiny
"""
JOB_HELP = {
    "train": ("train (or resume) a model; checkpoints go to run.dir",
              "Train a model, resuming from run.dir's latest checkpoint if any (train.resume=never to "
              "refuse)."),
    "eval": ("masked perplexity of a checkpoint on a split",
             "Evaluate a checkpoint (eval.checkpoint, or run.dir's latest) on eval.split; writes "
             "eval_SPLIT.json beside the checkpoint."),
    "generate": ("sample text from a checkpoint (a few lines, or bulk to files)",
                 "Generate completions for --prompt texts, a prompts file (generate.prompts) or "
                 "generate.num_samples unconditional samples. With generate.output_dir: the bulk job "
                 "(sharded, resumable JSONL)."),
    "config": ("print the resolved config as YAML (--explain: every key)",
               "Print the config that a job would run with; --explain lists every key with its type, "
               "default, allowed values and what it does."),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to look) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"lmcore: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _job_parser(sub, name: str) -> argparse.ArgumentParser:
    short, long = JOB_HELP[name]
    p = sub.add_parser(name, help=short, description=long, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", metavar="NAME_OR_FILE",
                   help="a built-in config (lmcore configs) or a YAML file; defaults apply when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. optim.lr=3e-4 run.dir=runs/x")
    return p


SWEEP_EPILOG = """\
examples:
  lmcore sweep --config tiny train.max_steps=200 --grid optim.lr=1e-3,3e-3 model.hidden_dim=64,128
  lmcore sweep --config tiny --points points.yaml --dir runs/lr-sweep
  lmcore report --compare runs/lr-sweep
--grid takes KEY=V1,V2,... per axis (a list value in brackets: model.adaptive_cutoffs=[100,200],[500,900]);
put the overrides common to every point before --grid. A points file is YAML (.yaml/.yml: a list of
mappings) or one line of KEY=VALUE overrides per point.
"""


def _sweep_options(p: argparse.ArgumentParser) -> None:
    """The options that say what a sweep is (lmcore sweep and lmcore submit sweep)."""
    p.add_argument("--config", "-c", metavar="NAME_OR_FILE",
                   help="the base config: a built-in name (lmcore configs) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides common to every point, e.g. train.max_steps=200")
    add_point_arguments(p)


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train every point of a hyperparameter grid here, one after another",
                       description="Train one run per point of a sweep, one after another in this process: "
                                   "the cartesian product of --grid axes, or the points of a file. Every "
                                   "point's config is checked before the first one trains; each runs in "
                                   "SWEEP_DIR/NAME (NAME from its overrides) and resumes like any run, so a "
                                   "rerun skips finished points. On SLURM: lmcore submit sweep.",
                       epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _sweep_options(p)
    p.add_argument("--keep-going", action="store_true",
                   help="after a point fails, go on with the next one (exit status 1 at the end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.add_argument("--stop-signals", default="TERM,USR2", metavar="SIGS",
                   help="signals that checkpoint the point in training and end the sweep with status 3 "
                        "(rerun to resume; default: TERM,USR2)")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="plots and a summary of a run folder; --compare: of several runs",
                       description="Draw PNG plots from RUN_DIR/metrics.jsonl and write a summary. With "
                                   "--compare: the validation curves of several runs in one PNG and a table "
                                   "sorted by best validation perplexity (a sweep folder stands for its "
                                   "points).")
    p.add_argument("run_dir", nargs="+", metavar="RUN_DIR",
                   help="a run folder (holds metrics.jsonl); with --compare, several, or sweep folders")
    p.add_argument("--compare", action="store_true",
                   help="compare the runs: compare.png + compare.md (default --out: their parent/compare)")
    p.add_argument("--out", help="where to write (default: RUN_DIR/report)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmcore", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Train, evaluate and generate with a word-level LSTM language model.")
    parser.add_argument("--version", action="version", version=f"lmcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _job_parser(sub, "train")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.add_argument("--stop-signals", default="TERM,USR2", metavar="SIGS",
                   help="signals that save a checkpoint and exit with status 3 so the job can be "
                        "requeued and resumed (default: TERM,USR2; '' for none)")
    p = _job_parser(sub, "eval")
    p.add_argument("--checkpoint", help="checkpoint or run folder (overrides eval.checkpoint)")
    p = _job_parser(sub, "generate")
    p.add_argument("--checkpoint", help="checkpoint or run folder (overrides generate.checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--merge", action="store_true",
                   help="merge the finished shards in generate.output_dir into one file + manifest")
    p = _job_parser(sub, "config")
    p.add_argument("--explain", action="store_true", help="every key: type, value, default, allowed, help")
    _sweep_parser(sub)
    _report_parser(sub)
    p = sub.add_parser("verify", help="check a checkpoint's files and print its fingerprint",
                       description="Read every file of a checkpoint (or a run folder's latest), check it "
                                   "against the manifest, and print the checkpoint's fingerprint (sha256 of "
                                   "its manifest, which holds every file's sha256) and the weights' sha256. "
                                   "The manifest catches truncation and bit rot; it does not authenticate: "
                                   "compare the fingerprint with the one the checkpoint's author published.")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder")
    p = sub.add_parser("export", help="write a Hugging Face-style model folder from a checkpoint",
                       description="Write config.json, model.safetensors, tokenizer.json and a README.md "
                                   "model card into OUT_DIR; it loads with LSTMLM.from_pretrained(OUT_DIR), "
                                   "and eval and generate take it as a checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (its latest checkpoint)")
    p.add_argument("out_dir", help="the folder to write (must be empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace a folder that is not empty")
    sub.add_parser("submit", help="submit train/eval/generate/pipeline to SLURM (see 'lmcore submit -h')",
                   add_help=False)
    p = sub.add_parser("status", help="a run's progress and its SLURM jobs (submissions, requeues, states)",
                       description="What the run folder knows (steps, checkpoints, last figures) beside what "
                                   "SLURM's accounting (sacct -D) knows of every job that trained in it.")
    p.add_argument("run_dir", help="a run folder (run.dir)")
    p.add_argument("--json", action="store_true", help="the same as JSON")
    sub.add_parser("configs", help="list the built-in configs and cluster profiles")
    sub.add_parser("sbatch-template", help="print the plain sbatch script (> job.sbatch, then sbatch it)")
    p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)",
                       description="Print a completion script: eval \"$(lmcore completion bash)\" in "
                                   "~/.bashrc, or eval \"$(lmcore completion zsh)\" in ~/.zshrc.")
    p.add_argument("shell", choices=["bash", "zsh"])
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--slurm-task"]:  # srun lmcore --slurm-task ...: ranks from SLURM, before torch loads
        import socket

        from lmcore.slurm.env import export_for_task

        values = export_for_task()
        print(f"lmcore[slurm]: rank {values['RANK']} of {values['WORLD_SIZE']} on {socket.gethostname()}, "
              f"rendezvous {values['MASTER_ADDR']}:{values['MASTER_PORT']}", file=sys.stderr, flush=True)
        argv = argv[1:]
    if argv[:1] == ["submit"]:  # its own parser: profiles, job kinds, dry runs
        from lmcore.slurm.cli import main as submit_main

        return submit_main(argv[1:])
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(normalize(argv))
    except OverrideSyntaxError as e:
        parser.error(str(e))
    # Overrides may come before and after options: argparse leaves the later ones over.
    for item in extra:
        if item.startswith("-") or "=" not in item:
            parser.error(unknown_argument(item))
    args.overrides = [*getattr(args, "overrides", []), *extra]
    return _command(args)


def _command(args: argparse.Namespace) -> int:
    if args.command in ("report", "verify", "export", "status", "configs", "sbatch-template", "completion"):
        print(_tool(args), end="")
        return 0
    if args.command == "sweep":
        return _sweep(args)
    from lmcore.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        from lmcore.explain import explain_text

        print(explain_text(cfg) if args.explain else cfg.to_yaml(), end="")
        return 0
    if getattr(args, "checkpoint", None):
        getattr(cfg, "eval" if args.command == "eval" else "generate").checkpoint = args.checkpoint
    if args.command == "generate" and not (args.merge or cfg.generate.output_dir):
        from lmcore.gen.preview import preview

        for line in preview(cfg, args.prompt):
            print(line)
        return 0
    return _run_job("merge" if getattr(args, "merge", False) else args.command, cfg, args)


def _tool(args: argparse.Namespace) -> str:
    """The text the commands that run no job print."""
    if args.command == "report":
        from lmcore.track.report import write_report

        if args.compare:
            from lmcore.track.compare import write_compare

            return write_compare(args.run_dir, args.out) + "\n"
        if len(args.run_dir) > 1:
            raise LmcoreError(f"report takes one RUN_DIR (got {len(args.run_dir)}); to compare runs: "
                              "lmcore report --compare RUN...")
        return write_report(args.run_dir[0], args.out) + "\n"
    if args.command == "verify":
        from lmcore.checkpoint import resolve

        return json.dumps(resolve(args.checkpoint).summary()) + "\n"
    if args.command == "export":
        from lmcore.export import export

        return json.dumps(export(args.checkpoint, args.out_dir, args.force)) + "\n"
    if args.command == "status":
        from lmcore.slurm.status import as_json, status, text

        report = status(args.run_dir)
        return as_json(report) + "\n" if args.json else text(report)
    if args.command == "configs":
        from lmcore.presets import listing

        return listing()
    if args.command == "sbatch-template":
        from lmcore.presets import SBATCH_TEMPLATE

        return SBATCH_TEMPLATE.read_text(encoding="utf-8")
    from lmcore.completion import script

    return script(args.shell, build_parser())


def _run_job(kind: str, cfg, args: argparse.Namespace) -> int:
    from lmcore.jobs import run_job
    from lmcore.runtime.signals import StopFlag, parse_signals

    signals = parse_signals(args.stop_signals) if kind == "train" else None
    if kind in ("train", "generate"):  # stop signals save the work done and exit with STOPPED_EXIT
        with StopFlag(signals) as stop:
            outcome = run_job(kind, cfg, stop, progress=not getattr(args, "no_progress", False))
    else:
        outcome = run_job(kind, cfg)
    if outcome.reports and outcome.result is not None:
        print(json.dumps(outcome.result))
    return outcome.exit_code


def _sweep(args: argparse.Namespace) -> int:
    """lmcore sweep: every point checked, sweep.json written, then the points trained in turn."""
    from lmcore.runtime.signals import STOPPED_EXIT, StopFlag, parse_signals
    from lmcore.sweep import build, run_sweep, write_manifest

    signals = parse_signals(args.stop_signals)
    sweep = build(args.config, args.overrides, args.grid, args.points, args.dir)
    write_manifest(sweep)
    _notice(f"sweep {sweep.name}: {len(sweep.points)} point(s) in {sweep.dir}")
    failed, stopped = [], False
    with StopFlag(signals) as stop:
        for done in run_sweep(sweep, stop, progress=not args.no_progress, keep_going=args.keep_going,
                              announce=_notice):
            if done.error:
                failed.append(done.point.name)
                print(f"lmcore: error: sweep point {done.point.name}: {done.error}", file=sys.stderr)
            elif done.stopped:
                stopped = True
            if done.result is not None:
                print(json.dumps({"point": done.point.name, **done.result}), flush=True)
    if stopped:
        _notice(f"sweep {sweep.name} stopped; run the same command again to resume it")
        return STOPPED_EXIT
    if failed:
        _notice(f"sweep {sweep.name}: {len(failed)} of {len(sweep.points)} point(s) failed: "
                f"{', '.join(failed)}")
        return 1
    _notice(f"sweep {sweep.name} done; compare the points: lmcore report --compare {sweep.dir}")
    return 0


def _notice(line: str) -> None:
    print(f"lmcore: {line}", file=sys.stderr, flush=True)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lmcore: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> None:
    warnings.showwarning = _one_line_warning  # log files get one line per warning
    try:
        code = run(argv)
    except LmcoreError as e:
        print(f"lmcore: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("lmcore: interrupted", file=sys.stderr)
        code = 130
    if multi_rank():
        # gloo's threads would meet the interpreter's teardown and can abort the process (exit
        # -6 for 2 after a lost peer, a clean-clone CI of 2026-12-06): runtime/leave.py
        leave(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
