"""A bulk generation output folder: its layout, its shards and chunks, and its params.json.

    OUTPUT_DIR/
      params.json              what the folder holds: checkpoint, prompts file, sampling
                               parameters, chunk size, precision; checked on every start
      rejects.jsonl            bad prompt lines (generate.bad_lines=skip)
      chunks/chunk-00000012.jsonl   the completions of input lines 12*C .. 13*C-1
      generations.jsonl        the merged output, in input order   (after the merge)
      manifest.json            counts, checksums, parameters       (after the merge)

A folder holds one experiment: params.json is claimed once (atomically, first writer wins)
and every later start, on any shard or rank, must match it or is refused, naming the field.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmcore import fileio
from lmcore.errors import ConfigError, LmcoreError, first_line, write_failed
from lmcore.gen.prompts import PromptSource, ScanResult
from lmcore.reading import json_value
from lmcore.runtime.precision import auto_precision
from lmcore.slurm.env import array_task

FORMAT = "lmcore-generations"
VERSION = 1
PARAMS_FILE = "params.json"
MANIFEST_FILE = "manifest.json"
MERGED_FILE = "generations.jsonl"
REJECTS_FILE = "rejects.jsonl"
CHUNKS_DIR = "chunks"


class GenerationError(LmcoreError):
    pass


# -- where this process stands ---------------------------------------------------------------
def resolve_shard(num_shards: int, shard_index: int, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(shard, number of shards): explicit values, else the SLURM array task's, else (0, 1)."""
    task = array_task(env)
    n = num_shards or (task[1] if task else 1)
    s = shard_index if shard_index >= 0 else (task[0] if task else 0)
    if not 0 <= s < n:
        raise ConfigError(f"generate.shard_index {s} is out of range for {n} shards (0 .. {n - 1}); "
                          "set generate.num_shards to the array size")
    return s, n


def chunk_name(c: int) -> str:
    return f"chunk-{c:08d}.jsonl"


def chunk_path(out: Path, c: int) -> Path:
    return out / CHUNKS_DIR / chunk_name(c)


def done_chunks(out: Path) -> set[int]:
    folder = out / CHUNKS_DIR
    if not folder.is_dir():
        return set()
    found = set()
    for p in folder.iterdir():
        name = p.name
        if name.startswith("chunk-") and name.endswith(".jsonl"):
            with contextlib.suppress(ValueError):
                found.add(int(name[6:-6]))
    return found


def check_output_dir(out: Path) -> None:
    """The output folder, and what the job writes in it, can be what they must be: refused with
    one line before anything is claimed (a file where the folder or its chunks folder goes, a
    folder where params.json goes), rather than failing half-way."""
    hint = "remove it, or set generate.output_dir to another folder"
    for p in (out, *out.parents):  # the folder, or the nearest ancestor that exists
        if p.exists():
            if not p.is_dir():
                where = f"generate.output_dir {out}" if p == out else f"{p} (a parent of generate.output_dir)"
                raise GenerationError(f"{where} is a file, not a folder: {hint}")
            break
    for name, folder in ((PARAMS_FILE, False), (REJECTS_FILE, False), (MANIFEST_FILE, False),
                         (MERGED_FILE, False), (CHUNKS_DIR, True), (".locks", True)):
        try:
            mode = os.stat(out / name).st_mode
        except OSError:
            continue  # absent (or unreachable: the write that needs it says so)
        if folder and not stat.S_ISDIR(mode):
            raise GenerationError(f"{out / name} is a file, not a folder (the job writes its {name} there): "
                                  f"{hint}")
        if not folder and not stat.S_ISREG(mode):
            raise GenerationError(f"{out / name} is not a regular file (the job writes its {name} there): "
                                  f"{hint}")


# -- the folder's parameters -----------------------------------------------------------------
def sampling_dict(g) -> dict[str, Any]:
    return {"temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p,
            "max_new_tokens": g.max_new_tokens, "samples_per_prompt": g.samples_per_prompt, "seed": g.seed}


def job_params(cfg, ckpt: dict, source: PromptSource, scan: ScanResult, precision: str) -> dict[str, Any]:
    g = cfg.generate
    prompts = {"source": source.describe(), **scan.describe(), "chunks": len(scan.chunk_records)}
    return {"format": FORMAT, "version": VERSION, "checkpoint": ckpt, "prompts": prompts,
            "sampling": sampling_dict(g), "chunk_size": g.chunk_size, "precision": precision}


# What must agree for two runs to share a folder (paths may differ: files move).
_CHECKED = [
    ("format", ("format",)), ("version", ("version",)),
    ("checkpoint (sha256 of model.safetensors)", ("checkpoint", "model_sha256")),
    ("tokenizer", ("checkpoint", "tokenizer_fingerprint")),
    ("prompts (kind)", ("prompts", "kind")), ("prompts (sha256 of the file)", ("prompts", "sha256")),
    ("prompts (lines or num_samples)", ("prompts", "lines")),
    ("prompts (valid records)", ("prompts", "records")),
    *[(f"generate.{k}", ("sampling", k)) for k in
      ("temperature", "top_k", "top_p", "max_new_tokens", "samples_per_prompt", "seed")],
    ("generate.chunk_size", ("chunk_size",)), ("precision", ("precision",)),
]


def params_diff(theirs: dict, ours: dict) -> list[str]:
    def get(d: dict, path: tuple[str, ...]) -> Any:
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    return [f"{name}: folder {get(theirs, path)!r}, now {get(ours, path)!r}"
            for name, path in _CHECKED if get(theirs, path) != get(ours, path)]


def read_params(out: Path, wait_s: float = 5.0) -> dict | None:
    """OUT/params.json, None if absent; damaged (not a JSON object, not a file) is an error. A
    file that does not parse is retried for wait_s: it may be being written by a process on a
    file system without hard links."""
    path = out / PARAMS_FILE
    deadline = time.monotonic() + wait_s

    def damaged(why: object) -> GenerationError:
        return GenerationError(f"{path} is unreadable or damaged ({why}); delete it only if the folder is "
                               "empty of chunks, or use a new generate.output_dir")

    while True:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise GenerationError(f"generate.output_dir {out} is a file, not a folder: remove it, or set "
                                  "generate.output_dir to another folder") from None
        except OSError as e:
            raise damaged(first_line(e)) from None
        if not stat.S_ISREG(mode):
            raise damaged("not a regular file")
        try:
            value = json_value(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:  # being written by a process without hard links
            if time.monotonic() > deadline:
                raise damaged(first_line(e)) from None
            time.sleep(0.2)
            continue
        if not isinstance(value, dict):
            raise damaged(f"a JSON {type(value).__name__}, not an object")
        return value


def claim_params(out: Path, params: dict) -> None:
    """Create params.json if absent (exactly one creator wins), else require agreement."""
    existing = read_params(out)
    if existing is None:
        if done_chunks(out):
            raise GenerationError(f"output folder {out} holds chunk files but no {PARAMS_FILE}; "
                                  "use a new generate.output_dir")
        created = not out.exists()
        try:
            fileio.make_dir(out)
            fileio.create_exclusive(out / PARAMS_FILE,
                                    (json.dumps(params, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        except OSError as e:
            if created:  # claim nothing: no empty output folder left behind
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise GenerationError(write_failed(out / PARAMS_FILE, e, "nothing was generated",
                                               "run the same command again (or set generate.output_dir to "
                                               "another folder)", out)) from None
        existing = read_params(out)
    diff = params_diff(existing or {}, params)
    if diff:
        hint = ""
        theirs = (existing or {}).get("checkpoint")
        theirs = theirs if isinstance(theirs, dict) else {}
        if theirs.get("model_sha256") != params["checkpoint"]["model_sha256"]:
            hint = f" (the folder was made from checkpoint {theirs.get('path')}: pin generate.checkpoint)"
        raise GenerationError(
            f"output folder {out} holds generations made with other settings ({'; '.join(diff)}){hint}; "
            "mixing them would make one file of two experiments: use a new generate.output_dir, or "
            "the settings the folder was made with")


def resolve_precision(setting: str, out: Path, device: torch.device) -> str:
    """auto: what the folder already uses (outputs depend on it), else what is fast here."""
    if setting != "auto":
        return setting
    existing = read_params(out)
    if existing and existing.get("precision") in ("fp32", "bf16", "int8"):
        return existing["precision"]
    return auto_precision(device)
