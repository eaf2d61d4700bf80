"""One permissions rule for everything lmcore writes (lmcore/fileio.py): what open() and mkdir()
give under the user's umask, so that a group sharing a cluster folder can read run folders,
checkpoints, token caches and generation folders (mkstemp, mkdtemp and safetensors alone would
leave 0600 files and 0700 folders)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_overrides


def lmcore(*args: str, cwd: Path, umask: int) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "LMCORE_CACHE": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, "-m", "lmcore", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr


def test_run_folder_checkpoints_cache_and_generations_follow_the_umask(tmp_path: Path):
    umask = 0o027  # a group-readable setup: files 0640, folders 0750
    run = tmp_path / "run"
    overrides = tiny_overrides(run, **{"train.max_steps": 10, "data.val_split": ""})
    lmcore("train", *overrides, cwd=tmp_path, umask=umask)
    lmcore("eval", *overrides, "eval.split=train", "eval.limit=8", cwd=tmp_path, umask=umask)
    lmcore("generate", *overrides, f"generate.output_dir={tmp_path / 'gen'}", "generate.num_samples=3",
           "generate.chunk_size=2", cwd=tmp_path, umask=umask)
    lmcore("report", str(run), cwd=tmp_path, umask=umask)
    checked = 0
    for folder in (run, tmp_path / "cache", tmp_path / "gen"):
        for p in [folder, *folder.rglob("*")]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            expected = (0o777 if p.is_dir() else 0o666) & ~umask
            assert mode == expected, f"{p.relative_to(tmp_path)}: {oct(mode)}, expected {oct(expected)}"
            checked += 1
    assert checked > 30  # run files, checkpoints, cache entries, chunks, merged output, report
