"""The notebook's language model: Embedding -> LSTM -> Linear(vocab), with explicit state.

`forward` takes and returns the recurrent state, so packed training can carry it across
windows and generation can read a prompt once and then feed one token per step.
With targets, it returns the summed loss over real targets only, and projects only the
positions that are scored: padding never reaches the vocabulary projection.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from lmcore.config import ModelConfig
from lmcore.data.batching import IGNORE
from lmcore.errors import CheckpointError, ConfigError, first_line
from lmcore.loss import Dtypes, adaptive_cross_entropy, linear_cross_entropy
from lmcore.schema import Reader, Value

State = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V) when no targets were given
    loss_sum: torch.Tensor | None  # summed NLL over scored targets (float32)
    num_targets: int
    state: State


def adaptive_cutoffs(cfg: ModelConfig, vocab_size: int) -> list[int]:
    """The configured cutoffs that fall inside this vocabulary; a clear error if none do."""
    cutoffs = [c for c in cfg.adaptive_cutoffs if c < vocab_size]
    if not cutoffs:
        raise ConfigError(
            f"model.adaptive_cutoffs={list(cfg.adaptive_cutoffs)} has no cutoff below the vocabulary "
            f"size {vocab_size}: give smaller ones (e.g. model.adaptive_cutoffs=[{max(1, vocab_size // 4)}]) "
            "or use model.softmax=full")
    return cutoffs


class LSTMLM(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig, pad_id: int, loss_chunk: int = 128):
        super().__init__()
        self.vocab_size = vocab_size
        self.cfg = cfg
        self.loss_chunk = loss_chunk  # rows per chunk of the fused projection + loss; 0 = plain
        self.loss_dtypes: Dtypes | None = None  # its three matmuls' precisions; None: autocast's
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(
            cfg.embedding_dim,
            cfg.hidden_dim,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        out_dim = cfg.hidden_dim
        self.proj: nn.Linear | None = None
        if cfg.tie_weights and cfg.hidden_dim != cfg.embedding_dim:
            # Tying needs the head's input size to equal the embedding size.
            self.proj = nn.Linear(cfg.hidden_dim, cfg.embedding_dim, bias=False)
            out_dim = cfg.embedding_dim
        self.adaptive: nn.AdaptiveLogSoftmaxWithLoss | None = None
        if cfg.softmax == "adaptive":
            cutoffs = adaptive_cutoffs(cfg, vocab_size)
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(out_dim, vocab_size, cutoffs,
                                                          div_value=cfg.adaptive_div)
        else:
            self.head = nn.Linear(out_dim, vocab_size)
            if cfg.tie_weights:
                self.head.weight = self.embedding.weight

    def architecture(self) -> dict:
        """What a checkpoint must match to be loaded into this model."""
        return {"vocab_size": self.vocab_size, **asdict(self.cfg)}

    # -- from saved weights ---------------------------------------------------------------------
    @staticmethod
    def model_config(architecture: dict[str, Any], where: object) -> ModelConfig:
        """A saved architecture as a ModelConfig; keys a newer lmcore wrote are refused, clearly."""
        reader = Reader(lambda key: f"{where}: architecture {key}",
                        lambda key: f"{where} has an architecture key this lmcore does not know ('{key}': "
                                    "written by a newer lmcore? upgrade lmcore to use it)", CheckpointError)
        given = {k: v for k, v in architecture.items() if k != "vocab_size"}
        return reader.build(ModelConfig, Value.of(given))

    @classmethod
    def from_weights(cls, architecture: dict[str, Any], pad_id: int, weights: bytes, where: object) -> LSTMLM:
        """The model an architecture and a model.safetensors (its bytes) describe, in eval mode."""
        model = cls(architecture["vocab_size"], cls.model_config(architecture, where), pad_id)
        model.load_weights(weights, where)
        return model.eval()

    def load_weights(self, weights: bytes, where: object) -> None:
        """Load a model.safetensors (its bytes); tied weights are stored once, under either name."""
        try:
            state = load_tensors(weights)
            missing, unexpected = self.load_state_dict(state, strict=False)
        except (SafetensorError, ValueError, RuntimeError) as e:  # not safetensors; shapes that do not fit
            raise CheckpointError(f"cannot load weights from {where}: {first_line(e)}") from None
        storage = {name: (t.data_ptr(), tuple(t.shape)) for name, t in self.state_dict().items()}
        loaded = {storage[name] for name in state if name in storage}
        missing = [k for k in missing if storage.get(k) not in loaded]
        if missing or unexpected:
            raise CheckpointError(f"weights in {where} do not fit the model (missing {missing}, unexpected "
                                  f"{list(unexpected)})")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LSTMLM:
        """A model exported by `lmcore export` (config.json + model.safetensors), its weights
        checked against the sha256 config.json records. The tokenizer is folder/tokenizer.json
        (lmcore.data.tokenizer.WordTokenizer.load)."""
        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            weights = (folder / "model.safetensors").read_bytes()
            architecture, expected = config["lmcore"]["architecture"], config["lmcore"]["weights_sha256"]
            pad_id = config["pad_token_id"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder} is not an lmcore export ({first_line(e)}); make one with "
                                  "lmcore export RUN_OR_CHECKPOINT OUT_DIR") from None
        if hashlib.sha256(weights).hexdigest() != expected:
            raise CheckpointError(f"{folder}/model.safetensors does not match the sha256 config.json records "
                                  "(truncated or edited)")
        return cls.from_weights(architecture, pad_id, weights, folder)

    def features(self, input_ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        x = self.dropout(self.embedding(input_ids))
        h, state = self.lstm(x, state)
        h = self.dropout(h)
        if self.proj is not None:
            h = self.proj(h)
        return h, state

    def forward(
        self,
        input_ids: torch.Tensor,
        state: State | None = None,
        targets: torch.Tensor | None = None,
    ) -> LMOutput:
        h, state = self.features(input_ids, state)
        if targets is None:
            return LMOutput(self.logits(h), None, 0, state)
        keep = targets != IGNORE
        scored = h[keep]  # (N, D): only real targets are projected
        if self.adaptive is not None:  # (its matmuls in autocast's precision, its log-softmaxes in fp32)
            loss_sum = adaptive_cross_entropy(self.adaptive, scored, targets[keep])
        else:
            # (without gradients: eval and validation, in autocast's precision: eval.precision)
            dtypes = self.loss_dtypes if torch.is_grad_enabled() else None
            loss_sum = linear_cross_entropy(scored, self.head.weight, self.head.bias, targets[keep],
                                            self.loss_chunk, dtypes)
        return LMOutput(None, loss_sum, int(scored.shape[0]), state)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary for features h (..., D); for the adaptive softmax these
        are its exact log-probabilities, which sample the same way."""
        if self.adaptive is None:
            return self.head(h)
        shape = h.shape[:-1]
        with torch.autocast(h.device.type, enabled=False):  # as in forward
            return self.adaptive.log_prob(h.reshape(-1, h.shape[-1]).float()).reshape(*shape, -1)


def detach_state(state: State) -> State:
    return state[0].detach(), state[1].detach()
