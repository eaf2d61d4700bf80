"""Run under a launcher with 2 processes by tests/test_ddp.py: one job of KIND through lmcore's
dispatcher, then the names of the threads this process still has, for the test to check that none
of gloo's is left at the interpreter's exit (one can abort the process: runtime/accelerator.py)."""

import json
import os
import sys
from pathlib import Path

from lmcore.config import load_config
from lmcore.jobs import run_job

out_dir, kind = Path(sys.argv[1]), sys.argv[2]
run_job(kind, load_config(None, sys.argv[3:]), progress=False)
tasks = Path("/proc/self/task")
threads = sorted((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks))
(out_dir / f"{kind}{os.environ['RANK']}.json").write_text(json.dumps({"threads": threads}))
