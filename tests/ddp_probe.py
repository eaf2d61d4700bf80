"""Run under a launcher with 2 processes by tests/test_ddp.py: trains a few steps, then
writes what each rank sees (world size, a digest of its parameters) for the test to compare."""

import hashlib
import json
import sys
from pathlib import Path

from lmcore.config import load_config
from lmcore.trainer import train

out_dir = Path(sys.argv[1])
cfg = load_config(None, sys.argv[2:])
result = train(cfg, progress=False)
rank, world = result.rank, result.world_size
digest = hashlib.sha256()
for name, p in sorted(result.model.state_dict().items()):
    digest.update(name.encode())
    digest.update(p.detach().cpu().contiguous().numpy().tobytes())
(out_dir / f"rank{rank}.json").write_text(json.dumps(
    {"rank": rank, "world": world, "params_sha256": digest.hexdigest(), "step": result.step}))
