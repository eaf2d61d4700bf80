"""What a training job carries from step to step and from checkpoint to checkpoint.

TrainState (where training stands) and RankState (what differs per rank) save and load
themselves (state_dict / load_state_dict) into every checkpoint; StepOutput is one optimizer
step's figures and TrainResult a finished job's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmcore.errors import CheckpointError
from lmcore.model import LSTMLM


@dataclass
class TrainState:
    """Where training stands: trainer_state.json in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    index: int = 0  # the next batch of the epoch
    tokens_seen: int = 0  # real targets so far, all ranks
    train_seconds: float = 0.0  # optimizer steps only: validation and checkpoints excluded
    world_size: int = 1
    skipped_steps: int = 0  # non-finite steps skipped (train.nonfinite=skip)
    best_val: float = math.inf  # the lowest validation perplexity so far
    best_step: int = -1  # its step (-1: none yet)
    stale_validations: int = 0  # validations since the best one (train.early_stop_patience)
    loss_precision: str = ""  # the fused loss's matmuls, "out,grad_h,grad_w"; "": autocast's
    mixed_precision: str = ""  # the autocast the run used (no, bf16; train.mixed_precision=auto decides)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))
            elif f.name not in _NEWER_KEYS:
                raise CheckpointError(f"trainer_state.json has no {f.name!r}")


# keys older checkpoints lack: their defaults are right for them
_NEWER_KEYS = ("skipped_steps", "best_val", "best_step", "stale_validations", "loss_precision",
               "mixed_precision")


@dataclass
class RankState:
    """What differs between ranks: rank_NNNNN.safetensors in every checkpoint."""

    lstm: tuple[torch.Tensor, torch.Tensor] | None = None  # packed: carried across windows
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, targets, seconds

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"torch_rng": torch.get_rng_state(), "window": torch.tensor(self.window, dtype=torch.float64)}
        if self.lstm is not None:
            out.update(h=self.lstm[0], c=self.lstm[1])
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        torch.set_rng_state(state["torch_rng"])
        self.lstm = (state["h"].to(device), state["c"].to(device)) if "h" in state else None
        if "window" in state:  # older checkpoints: the next row starts a fresh window
            self.window = state["window"].tolist()


@dataclass
class StepOutput:
    loss_sum: float  # this rank's summed NLL
    targets: int  # this rank's real targets
    grad_norm: float
    lr: float


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    stopped_early: bool  # a stop was requested (signal): resume to finish
    val_ppl: float | None
    model: LSTMLM | None = None  # the trained (unwrapped) model, for callers in-process
    rank: int = 0
    world_size: int = 1
    best: dict[str, Any] | None = None  # the best validation: step, val_ppl (and its checkpoint, keep_best)
    early_stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "val_ppl": self.val_ppl, "stopped_early": self.stopped_early, "rank": self.rank,
                "world_size": self.world_size, "run_dir": str(self.run_dir),
                "best": self.best, "early_stopped": self.early_stopped,
                "weights_sha256": weights_digest(self.model) if self.model is not None else None}


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order: equal on all ranks of a healthy DDP run."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
