"""One rank of an `lmcore` job under plain sbatch + srun (no submitit):

    srun python -m lmcore.slurm.task train --config CONFIG [overrides]

srun starts one copy per task, on every node; each sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT from its own SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and
the job's node list (lmcore/slurm/env.py), then runs `lmcore ARGS`. Nothing in the batch
script needs escaping, so no node can end up believing it is rank 0. `lmcore train`
checkpoints on TERM/USR2 and exits with status 3: the script requeues on that.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lmcore.slurm.env import export_for_task

    values = export_for_task()  # before torch is imported: OMP_NUM_THREADS is read at import
    if values["RANK"] == "0":
        print(f"lmcore[slurm]: {values['WORLD_SIZE']} rank(s), rendezvous {values['MASTER_ADDR']}:"
              f"{values['MASTER_PORT']}", file=sys.stderr, flush=True)
    from lmcore.cli import main as cli_main

    cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
