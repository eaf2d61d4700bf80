"""A run folder's layout, in one place: every module asks RunDir where a file goes.

    RUN/
      config.yaml       the resolved config of the last training job here
      tokenizer.json    the vocabulary
      metrics.jsonl     every logged figure (lmcore.track.metrics)
      jobs.jsonl        one row per SLURM job that trained here (`lmcore status RUN` reads it)
      wandb_run.json    the W&B run id, kept across requeues (lmcore.track.wandb_init)
      best.json         the best validation's checkpoint (train.keep_best; checkpoint=best)
      wandb/            W&B's own files (unless tracking.dir says otherwise)
      report/           what `lmcore report` draws
      checkpoints/step_XXXXXXXX/   one folder per checkpoint (lmcore.checkpoint)
      .lock             held by the job writing here (lmcore.runtime.lock)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmcore.errors import LmcoreError

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def jobs(self) -> Path:
        return self.path / "jobs.jsonl"

    @property
    def wandb_state(self) -> Path:
        return self.path / "wandb_run.json"

    @property
    def best(self) -> Path:
        return self.path / "best.json"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def check_kinds(self) -> None:
        """Refuse a run folder whose entries are of the wrong kind (a folder where lmcore keeps a
        file, a file where it keeps its checkpoints), before a job spends time on it."""
        if self.path.exists() and not self.path.is_dir():
            raise LmcoreError(f"run.dir {self.path} is a file, not a folder; set run.dir to a folder")
        for p in (self.config, self.tokenizer, self.metrics, self.jobs, self.wandb_state, self.best):
            if p.exists() and not p.is_file():
                raise LmcoreError(f"run.dir {self.path} holds {p.name} as something other than a file (a "
                                  "folder?), where lmcore keeps a file: move it away, or use another run.dir")
        if self.checkpoints.exists() and not self.checkpoints.is_dir():
            raise LmcoreError(f"run.dir {self.path} holds a file named {CHECKPOINTS}, where lmcore keeps its "
                              "checkpoint folders: move it away, or use another run.dir")

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    @classmethod
    def of_checkpoint(cls, ckpt: Path) -> RunDir | None:
        """The run folder a checkpoint folder belongs to (RUN/checkpoints/step_X -> RUN)."""
        ckpt = Path(ckpt)
        return cls(ckpt.parent.parent) if ckpt.parent.name == CHECKPOINTS else None


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"
