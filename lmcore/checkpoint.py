"""Checkpoints as folders of safetensors and JSON: nothing is ever unpickled.

    RUN/checkpoints/step_00000200/
        model.safetensors       weights
        optimizer.safetensors   optimizer tensors   + optimizer.json (the rest)
        rank_00000.safetensors  per-rank RNG and carried LSTM state
        trainer_state.json      step, data position, counters (lmcore.trainer.TrainState)
        tokenizer.json, config.yaml
        manifest.json           sha256 of every file above, architecture, vocabulary

Writing (CheckpointWriter): into a temporary folder, manifest last, renamed into place, so a
crash leaves the old set or the new one. Reading (Checkpoint.open): every file is read once,
checked against the manifest, and its bytes are what gets loaded, so a file swapped after the
check is never used. The manifest catches truncation and bit rot; it does not authenticate:
someone who edits the weights can write a matching manifest. Compare `lmcore verify`'s
fingerprint with the one the checkpoint's author published.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from lmcore import fileio
from lmcore.data.tokenizer import WordTokenizer
from lmcore.errors import CheckpointError, LmcoreError, first_line
from lmcore.model import LSTMLM
from lmcore.reading import json_value
from lmcore.rundir import STEP_PREFIX, RunDir

MANIFEST = "manifest.json"
FORMAT = "lmcore-checkpoint"
VERSION = 1


# -- optimizer state without pickle ------------------------------------------------------
def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = t
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (tied embedding and output weights)."""
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


# -- writing ------------------------------------------------------------------------------
class CheckpointWriter:
    """Writes one checkpoint from every rank. Call the steps in order, with barriers between
    (the trainer does): begin (rank 0), write_rank (all), write_main and finish (rank 0)."""

    def __init__(self, run: RunDir, step: int):
        self.root = run.checkpoints
        self.final = run.step_dir(step)
        self.tmp = self.root / f".tmp-{self.final.name}"

    def begin(self) -> None:
        fileio.make_dir(self.root)
        for p in self.root.glob(".tmp-*"):  # debris of killed earlier writes and prunes
            shutil.rmtree(p, ignore_errors=True)
        fileio.make_dir(self.tmp)

    def abort(self) -> None:
        """Drop the unfinished folder (a failed write): the checkpoints before it stay."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write_rank(self, rank: int, tensors: dict[str, torch.Tensor]) -> None:
        fileio.save_tensors(self.tmp / f"rank_{rank:05d}.safetensors", tensors)

    def write_main(self, model: torch.nn.Module, optimizer_state: dict[str, Any],
                   trainer_state: dict[str, Any], tokenizer_json: str, config_yaml: str) -> None:
        fileio.save_tensors(self.tmp / "model.safetensors", model_tensors(model))
        tensors, meta = optimizer_to_files(optimizer_state)
        fileio.save_tensors(self.tmp / "optimizer.safetensors", tensors)
        fileio.write_new(self.tmp / "optimizer.json", json.dumps(meta).encode())
        fileio.write_new(self.tmp / "trainer_state.json", json.dumps(trainer_state, indent=2).encode())
        fileio.write_new(self.tmp / "tokenizer.json", tokenizer_json.encode("utf-8"))
        fileio.write_new(self.tmp / "config.yaml", config_yaml.encode("utf-8"))

    def finish(self, architecture: dict[str, Any], tokenizer_fingerprint: str, step: int, keep: int,
               protect: str | None = None) -> Path:
        files = {f.name: {"sha256": fileio.sha256_file(f), "bytes": f.stat().st_size}
                 for f in sorted(self.tmp.iterdir())}
        fileio.atomic_write_json(self.tmp / MANIFEST, {
            "format": FORMAT, "version": VERSION, "step": step, "architecture": architecture,
            "tokenizer_fingerprint": tokenizer_fingerprint, "files": files})
        fileio.publish_dir(self.tmp, self.final, replace=True)  # the same step again after a requeue
        try:
            prune(self.root, keep, self.final.name, protect)
        except OSError as e:  # the new checkpoint is complete; an old one left over is no harm
            warnings.warn(f"could not remove an old checkpoint in {self.root} ({first_line(e)}); it stays, "
                          "and the next checkpoint tries again", stacklevel=2)
        return self.final


def prune(root: Path, keep: int, current: str | None = None, protect: str | None = None) -> None:
    """Keep the newest `keep` checkpoints (up to `current`) and `protect` (the best one)."""
    ckpts = list_checkpoints(root)
    if current is not None:
        for p in [p for p in ckpts if p.name > current]:  # skipped as damaged when this job resumed
            fileio.remove_tree(p)
        ckpts = [p for p in ckpts if p.name <= current]
    for old in ckpts[:-keep]:
        if old.name != protect:
            fileio.remove_tree(old)


# -- reading ------------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint folders (with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


# A file a manifest lists is a plain name inside its folder: never a path out of it.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REQUIRED = ("model.safetensors", "tokenizer.json")


def _parse_manifest(path: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = json_value(data)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError("not an lmcore checkpoint")
        _check_file_list(manifest.get("files"))
        step = manifest.get("step", 0)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step {step!r} is not a step number")
        arch = manifest.get("architecture")
        if not isinstance(arch, dict) or not isinstance(manifest.get("tokenizer_fingerprint"), str):
            raise ValueError("incomplete manifest")
        vocab = arch.get("vocab_size")
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
            raise ValueError(f"architecture vocab_size {vocab!r} is not a positive integer")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None
    LSTMLM.model_config(arch, f"checkpoint {path.parent}")  # every other key, by the config's own rules
    return manifest


def _check_file_list(files: Any) -> None:
    if not isinstance(files, dict):
        raise ValueError("no file list")
    for name, info in files.items():
        if not _FILE_NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"it lists {name[:80]!r}, which is not a file name inside the folder")
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and info["bytes"] >= 0
                and isinstance(info.get("sha256"), str) and _SHA256.fullmatch(info["sha256"])):
            raise ValueError(f"the entry of {name} is not a size and a sha256")
    missing = [n for n in _REQUIRED if n not in files]
    if missing:
        raise ValueError(f"it does not list {', '.join(missing)}")


def _read(folder: Path, name: str, missing: str, size: int | None = None) -> bytes:
    """A file's bytes; only a regular file is opened for good (a FIFO would block, a device never
    end), and one whose size is not the manifest's is not read at all."""
    path = folder / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(missing) from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {folder}: {name} cannot be read ({first_line(e)})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"checkpoint {folder}: {name} is not a regular file")
        if size is not None and st.st_size != size:
            raise CheckpointError(f"checkpoint {folder}: {name} fails its checksum (truncated or corrupted)")
        try:
            return f.read()
        except OSError as e:
            raise CheckpointError(f"checkpoint {folder}: {name} cannot be read ({first_line(e)})") from None


@dataclass
class Checkpoint:
    """A checkpoint folder whose every file matched its manifest; holds the bytes it checked."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes] = field(repr=False)
    fingerprint: str = ""  # sha256 of manifest.json: it names every file's sha256, so it covers them all

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        raw = _read(path, MANIFEST, f"{path} is not a complete lmcore checkpoint (no {MANIFEST})")
        manifest = _parse_manifest(path / MANIFEST, raw)
        files = {}
        for name, info in manifest["files"].items():
            data = _read(path, name, f"checkpoint {path} is missing {name}", info["bytes"])
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise CheckpointError(f"checkpoint {path}: {name} fails its checksum (truncated or "
                                      "corrupted)")
            files[name] = data
        return cls(path, manifest, files, hashlib.sha256(raw).hexdigest())

    @property
    def step(self) -> int:
        return int(self.manifest.get("step", 0))

    @property
    def model_sha256(self) -> str:
        return self.manifest["files"]["model.safetensors"]["sha256"]

    def summary(self) -> dict[str, Any]:
        """What `lmcore verify` prints: enough to compare with what the author published."""
        return {"checkpoint": str(self.path), "verified_files": len(self.files),
                "step": self.manifest.get("step"), "fingerprint": self.fingerprint,
                "weights_sha256": self.model_sha256,
                "tokenizer_fingerprint": self.manifest["tokenizer_fingerprint"]}

    def info(self) -> dict[str, Any]:
        """What identifies the weights (recorded by jobs that use them)."""
        return {"path": str(self.path), "step": self.manifest.get("step"), "model_sha256": self.model_sha256,
                "tokenizer_fingerprint": self.manifest["tokenizer_fingerprint"],
                "architecture": self.manifest.get("architecture")}

    def _json(self, name: str) -> Any:
        try:
            return json_value(self.files[name])
        except (KeyError, ValueError) as e:
            raise self._unreadable(name, e) from None

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_tensors(self.files[name])
        except (KeyError, SafetensorError, ValueError) as e:
            raise self._unreadable(name, e) from None

    def _unreadable(self, name: str, e: BaseException) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path}: {name} cannot be read ({first_line(e)})")

    def tokenizer(self) -> WordTokenizer:
        try:
            tok = WordTokenizer.from_json(self.files["tokenizer.json"].decode("utf-8"),
                                          f"{self.path}/tokenizer.json")
        except (KeyError, UnicodeDecodeError, LmcoreError) as e:
            raise CheckpointError(f"checkpoint {self.path}: tokenizer.json cannot be read ({first_line(e)})"
                                  ) from None
        if tok.fingerprint != self.manifest["tokenizer_fingerprint"]:
            raise CheckpointError(f"checkpoint {self.path}: tokenizer.json does not match the weights")
        return tok

    def load_weights(self, model: LSTMLM) -> None:
        model.load_weights(self.files["model.safetensors"], self.path)

    def optimizer_state(self) -> dict[str, Any]:
        return optimizer_from_files(self._tensors("optimizer.safetensors"), self._json("optimizer.json"))

    def trainer_state(self) -> dict[str, Any]:
        return self._json("trainer_state.json")

    def rank_state(self, rank: int) -> dict[str, torch.Tensor] | None:
        name = f"rank_{rank:05d}.safetensors"
        return self._tensors(name) if name in self.files else None

    def check_compatible(self, architecture: dict[str, Any], fingerprint: str) -> None:
        if self.manifest["tokenizer_fingerprint"] != fingerprint:
            raise CheckpointError(
                f"checkpoint {self.path} was trained with another vocabulary (tokenizer "
                f"{self.manifest['tokenizer_fingerprint']}, this run {fingerprint}); use the tokenizer.json "
                "saved with the checkpoint, or a new run.dir")
        LSTMLM.model_config(self.manifest["architecture"], f"checkpoint {self.path}")  # a newer lmcore's?
        theirs = self.manifest["architecture"]
        diff = [f"{k}: checkpoint {theirs.get(k)!r} vs config {v!r}" for k, v in architecture.items()
                if theirs.get(k) != v]
        if diff:
            raise CheckpointError(f"checkpoint {self.path} has another architecture ({'; '.join(diff)}); "
                                  "set the model config to match it, or use a new run.dir")

    def build_model(self, device: torch.device | str = "cpu") -> tuple[LSTMLM, WordTokenizer]:
        """The model with these weights (in eval mode) and its tokenizer."""
        tok = self.tokenizer()
        vocab = self.manifest["architecture"].get("vocab_size")
        if vocab != len(tok):
            raise CheckpointError(f"checkpoint {self.path}: tokenizer.json does not match the weights")
        weights = self.files["model.safetensors"]
        model = LSTMLM.from_weights(self.manifest["architecture"], tok.pad_id, weights,
                                    f"checkpoint {self.path}")
        return model.to(device).eval(), tok


def _best(run: RunDir) -> Checkpoint:
    try:
        record = json_value(run.best.read_bytes())
        step = record["step"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"step {step!r}")
    except FileNotFoundError:
        raise CheckpointError(f"run {run.path} has no best checkpoint (no {run.best.name}): train it with "
                              "train.keep_best=true and a validation set (data.val_split), or name a "
                              "checkpoint") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{run.best} is damaged ({first_line(e)}); name a checkpoint instead") from None
    return Checkpoint.open(run.step_dir(step))


@dataclass
class Latest:
    checkpoint: Checkpoint | None  # the newest that verifies
    count: int  # checkpoint folders found
    problems: list[str]  # why newer ones were skipped, newest first


def find_latest(run: RunDir) -> Latest:
    """The newest checkpoint of a run that verifies (listing the folder once)."""
    found = list_checkpoints(run.checkpoints)
    problems: list[str] = []
    for path in reversed(found):
        try:
            return Latest(Checkpoint.open(path), len(found), problems)
        except CheckpointError as e:
            problems.append(str(e))
    return Latest(None, len(found), problems)


BEST = "best"  # checkpoint=best, or RUN/best: the best validation's checkpoint (train.keep_best)


def resolve(path_or_run: str | Path, run_dir: str | Path | None = None) -> Checkpoint:
    """A checkpoint folder, the latest valid checkpoint of a run folder (damaged newer ones are
    skipped with a warning), or RUN/best ("best" alone: run_dir's best)."""
    if str(path_or_run) == BEST and run_dir is not None:
        path_or_run = Path(run_dir) / BEST
    p = Path(path_or_run)
    if (p / MANIFEST).is_file():
        return Checkpoint.open(p)
    if p.name == BEST and not p.exists():
        return _best(RunDir(p.parent))
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist; pass a run folder or a checkpoint folder")
    latest = find_latest(RunDir(p))
    if latest.checkpoint is None:
        why = f" ({'; '.join(latest.problems)})" if latest.problems else ""
        raise CheckpointError(f"no valid checkpoint in {p}{why}; train first, or pass a checkpoint folder")
    for problem in latest.problems:
        warnings.warn(f"skipping damaged checkpoint: {problem}", stacklevel=2)
    return latest.checkpoint

