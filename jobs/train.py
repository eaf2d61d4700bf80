"""Training entry point for launchers: python, torchrun, accelerate launch, srun.

    python jobs/train.py --config tiny
    torchrun --standalone --nproc_per_node 2 jobs/train.py --config tiny
    accelerate launch --multi_gpu --num_processes 8 jobs/train.py --config imdb_seed
"""

import sys

from lmcore.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
