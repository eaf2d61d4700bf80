"""`lmcore` command line: thin wrappers over the library, one subcommand per job.

Every user-fixable problem ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

from lmcore.errors import LmcoreError

EPILOG = """\
overrides are dotted keys after the options, e.g.
  lmcore train --config configs/imdb_seed.yaml optim.lr=3e-4 train.max_steps=200 run.dir=runs/a
Several processes (DDP) run the same command under a launcher:
  torchrun --standalone --nproc_per_node 2 jobs/train.py --config configs/tiny.yaml
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. optim.lr=3e-4 run.dir=runs/x")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to look) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"lmcore: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmcore", description="Train, evaluate and generate with a word-level LSTM language model.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train (or resume) a model; checkpoints go to run.dir",
                       description="Train a model, resuming from run.dir's latest checkpoint if any "
                                   "(train.resume=never to refuse).", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.add_argument("--stop-signals", default="TERM,USR2", metavar="SIGS",
                   help="signals that save a checkpoint and exit with status 3 so the job can be "
                        "requeued and resumed (default: TERM,USR2; '' for none)")

    p = sub.add_parser("eval", help="masked perplexity of a checkpoint on a split",
                       description="Evaluate a checkpoint (eval.checkpoint, or run.dir's latest) on "
                                   "eval.split; writes eval_SPLIT.json beside the checkpoint.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--checkpoint", help="checkpoint or run folder (overrides eval.checkpoint)")

    p = sub.add_parser("generate", help="sample text from a checkpoint (a few lines, or bulk to files)",
                       description="Generate completions for --prompt texts, a prompts file "
                                   "(generate.prompts) or generate.num_samples unconditional samples. "
                                   "With generate.output_dir: the bulk job (sharded, resumable JSONL).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--checkpoint", help="checkpoint or run folder (overrides generate.checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--merge", action="store_true",
                   help="merge the finished shards in generate.output_dir into one file + manifest")

    p = sub.add_parser("report", help="plots and a summary of a run folder (no W&B needed)",
                       description="Draw PNG plots from RUN_DIR/metrics.jsonl and write a summary.")
    p.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    p.add_argument("--out", help="where to write (default: RUN_DIR/report)")

    sub.add_parser("submit", help="submit train/eval/generate/pipeline to SLURM (see 'lmcore submit -h')",
                   add_help=False)

    p = sub.add_parser("config", help="print the resolved config as YAML",
                       description="Print the config that a job would run with.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["submit"]:  # its own parser: profiles, job kinds, dry runs
        from lmcore.slurm.cli import main as submit_main

        return submit_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come before and after options: argparse leaves the later ones over.
    for item in extra:
        if item.startswith("-") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    from lmcore.config import load_config

    if args.command == "report":
        from lmcore.track.report import write_report

        print(write_report(args.run_dir, args.out))
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(cfg.to_yaml(), end="")
        return 0
    if args.command == "train":
        from lmcore.runtime.signals import STOPPED_EXIT, StopFlag, parse_signals
        from lmcore.trainer import train

        with StopFlag(parse_signals(args.stop_signals)) as stop:
            result = train(cfg, stop_requested=stop, progress=not args.no_progress)
        if result.checkpoint is not None and _is_main():
            print(json.dumps({"step": result.step, "checkpoint": str(result.checkpoint),
                              "val_ppl": result.val_ppl, "stopped_early": result.stopped_early}))
        return STOPPED_EXIT if result.stopped_early else 0
    if args.command == "eval":
        from lmcore.evaluate import run_eval

        if args.checkpoint:
            cfg.eval.checkpoint = args.checkpoint
        result = run_eval(cfg)
        if result is not None:
            print(json.dumps(result))
        return 0
    if args.command == "generate":
        if args.checkpoint:
            cfg.generate.checkpoint = args.checkpoint
        if args.merge or cfg.generate.output_dir:
            from lmcore.gen.job import cli_generate

            return cli_generate(cfg, merge=args.merge)
        from lmcore.gen.decoder import run_generate

        for line in run_generate(cfg, args.prompt):
            print(line)
        return 0
    raise AssertionError(args.command)


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


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
    sys.exit(code)


if __name__ == "__main__":
    main()
