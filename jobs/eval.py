"""Evaluation entry point for launchers (sharded over ranks, same figure as one process).

    torchrun --standalone --nproc_per_node 2 jobs/eval.py --config tiny
"""

import sys

from lmcore.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]])
