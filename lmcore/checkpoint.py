"""Checkpoints as folders of safetensors and JSON: nothing is ever unpickled.

    RUN/checkpoints/step_00000200/
        model.safetensors       weights
        optimizer.safetensors   optimizer tensors   + optimizer.json (the rest)
        rank_00000.safetensors  per-rank RNG and carried LSTM state
        trainer_state.json      step, data position, counters
        tokenizer.json, config.yaml
        manifest.json           sha256 of every file above, architecture, vocabulary

A checkpoint is written into a temporary folder and renamed into place once complete
(manifest last), so a crash leaves either the old set or the new one. Loading verifies
every checksum and falls back to the previous checkpoint if one is damaged.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from lmcore.errors import CheckpointError
from lmcore.fileio import atomic_write_json, fsync_dir, sha256_file, usual_permissions

MANIFEST = "manifest.json"
FORMAT = "lmcore-checkpoint"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        import os

        os.fsync(f.fileno())


# -- optimizer state without pickle ------------------------------------------------------
def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, meta


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = t
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- writing ------------------------------------------------------------------------------
class CheckpointWriter:
    """Writes one checkpoint from every rank. Call the steps in order, with barriers between
    (the trainer does): begin (rank 0), write_rank (all), finish (rank 0)."""

    def __init__(self, run_dir: str | Path, step: int):
        self.root = checkpoints_dir(run_dir)
        self.final = self.root / step_dir_name(step)
        self.tmp = self.root / f".tmp-{step_dir_name(step)}"

    def begin(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob(".tmp-*"):  # debris of killed earlier writes and prunes
            shutil.rmtree(p, ignore_errors=True)
        self.tmp.mkdir()

    def abort(self) -> None:
        """Drop the unfinished folder (a failed write): the checkpoints before it stay."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write_rank(self, rank: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.tmp / f"rank_{rank:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        usual_permissions(path)
        _fsync(path)

    def write_main(self, model: torch.nn.Module, optimizer_state: dict[str, Any],
                   trainer_state: dict[str, Any], tokenizer_json: str, config_yaml: str) -> None:
        save_model(model, str(self.tmp / "model.safetensors"))
        tensors, meta = optimizer_to_files(optimizer_state)
        save_file(tensors, str(self.tmp / "optimizer.safetensors"))
        for name in ("model.safetensors", "optimizer.safetensors"):
            usual_permissions(self.tmp / name)
        (self.tmp / "optimizer.json").write_text(json.dumps(meta))
        (self.tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (self.tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (self.tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")

    def finish(self, architecture: dict[str, Any], tokenizer_fingerprint: str, step: int,
               keep: int) -> Path:
        files = {}
        for f in sorted(self.tmp.iterdir()):
            _fsync(f)
            files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        atomic_write_json(self.tmp / MANIFEST, {
            "format": FORMAT, "version": 1, "step": step, "architecture": architecture,
            "tokenizer_fingerprint": tokenizer_fingerprint, "files": files,
        })
        fsync_dir(self.tmp)
        if self.final.exists():  # the same step saved again (e.g. after a requeue)
            shutil.rmtree(self.final)
        self.tmp.rename(self.final)
        fsync_dir(self.root)
        prune(self.root, keep, self.final.name)
        return self.final


def _remove(p: Path) -> None:
    gone = p.with_name(f".tmp-del-{p.name}")
    p.rename(gone)  # atomic: never a half-deleted checkpoint under its own name
    shutil.rmtree(gone, ignore_errors=True)


def prune(root: Path, keep: int, current: str | None = None) -> None:
    ckpts = list_checkpoints(root)
    if current is not None:
        for p in [p for p in ckpts if p.name > current]:  # skipped as damaged when this job resumed
            _remove(p)
        ckpts = [p for p in ckpts if p.name <= current]
    for old in ckpts[:-keep]:
        _remove(old)


# -- reading ------------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint folders (with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
             and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a complete lmcore checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError("not an lmcore checkpoint")
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v and "bytes" in v
                                                  for v in files.values()):
            raise ValueError("no file list")
        if not isinstance(manifest.get("architecture"), dict) or "tokenizer_fingerprint" not in manifest:
            raise ValueError("incomplete manifest")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None
    return manifest


def verify(ckpt: Path) -> dict[str, Any]:
    """The manifest, once every file's checksum matches; CheckpointError otherwise."""
    manifest = read_manifest(ckpt)
    for name, info in manifest["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {name}")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: {name} fails its checksum (truncated or corrupted)")
    return manifest


def latest_valid(run_dir: str | Path, problems: list[str] | None = None) -> Path | None:
    """The newest checkpoint that verifies. Damaged ones are skipped with a warning, or, when
    a `problems` list is given, their problems are appended to it for the caller to report."""
    for ckpt in reversed(list_checkpoints(checkpoints_dir(run_dir))):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            if problems is None:
                warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
            else:
                problems.append(str(e))
    return None


def resolve(path_or_run: str | Path) -> Path:
    """A checkpoint folder, or the latest valid checkpoint of a run folder."""
    p = Path(path_or_run)
    if (p / MANIFEST).is_file():
        verify(p)
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist; pass a run folder or a checkpoint folder")
    problems: list[str] = []
    ckpt = latest_valid(p, problems)
    if ckpt is None:
        why = f" ({'; '.join(problems)})" if problems else ""
        raise CheckpointError(f"no valid checkpoint in {p}{why}; train first, or pass a checkpoint folder")
    for problem in problems:
        warnings.warn(f"skipping damaged checkpoint: {problem}", stacklevel=2)
    return ckpt


def check_compatible(manifest: dict[str, Any], architecture: dict[str, Any], fingerprint: str,
                     where: Path) -> None:
    if manifest["tokenizer_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"checkpoint {where} was trained with another vocabulary (tokenizer "
            f"{manifest['tokenizer_fingerprint']}, this run {fingerprint}); "
            "use the tokenizer.json saved with the checkpoint, or a new run.dir"
        )
    theirs = manifest["architecture"]
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs config {v!r}" for k, v in architecture.items()
            if theirs.get(k) != v]
    if diff:
        raise CheckpointError(
            f"checkpoint {where} has another architecture ({'; '.join(diff)}); "
            "set the model config to match it, or use a new run.dir"
        )


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot load weights from {ckpt}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {ckpt} do not fit the model (missing {missing}, unexpected {unexpected})"
        )


def _damaged(ckpt: Path, name: str, e: BaseException) -> CheckpointError:
    why = str(e).splitlines()[0] if str(e) else repr(e)
    return CheckpointError(f"checkpoint {ckpt}: {name} cannot be read ({why})")


def load_optimizer_state(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "optimizer.json").read_text())
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (SafetensorError, ValueError, OSError) as e:
        raise _damaged(ckpt, "optimizer.safetensors/optimizer.json", e) from None
    return optimizer_from_files(tensors, meta)


def load_rank_state(ckpt: Path, rank: int) -> dict[str, torch.Tensor] | None:
    path = ckpt / f"rank_{rank:05d}.safetensors"
    try:
        return load_file(str(path)) if path.is_file() else None
    except (SafetensorError, OSError) as e:
        raise _damaged(ckpt, path.name, e) from None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        for key in ("step", "epoch", "index", "tokens_seen", "train_seconds", "world_size"):
            state[key]
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise _damaged(ckpt, "trainer_state.json", e) from None
    return state


def load_for_inference(path_or_run: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer, checkpoint folder) built from the checkpoint's own architecture."""
    from lmcore.config import ModelConfig
    from lmcore.data.tokenizer import WordTokenizer
    from lmcore.model import LSTMLM

    ckpt = resolve(path_or_run)
    manifest = read_manifest(ckpt)
    tok = WordTokenizer.load(ckpt / "tokenizer.json")
    arch = dict(manifest["architecture"])
    vocab_size = arch.pop("vocab_size")
    if vocab_size != len(tok) or manifest["tokenizer_fingerprint"] != tok.fingerprint:
        raise CheckpointError(f"checkpoint {ckpt}: tokenizer.json does not match the weights")
    model = LSTMLM(vocab_size, ModelConfig(**arch), tok.pad_id)
    load_weights(model, ckpt)
    model.to(device).eval()
    return model, tok, ckpt
