"""Bulk generation entry point for launchers (DDP ranks split each shard's chunks).

    torchrun --standalone --nproc_per_node 2 jobs/generate.py --config tiny \
        generate.prompts=prompts.jsonl generate.output_dir=runs/tiny/gen
    python jobs/generate.py --merge generate.output_dir=runs/tiny/gen
"""

import sys

from lmcore.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
