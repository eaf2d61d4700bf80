"""The merge of a bulk generation folder: every chunk checked, one file in input order.

    OUTPUT_DIR/generations.jsonl   the rows of chunk 0, 1, 2, ... as written (input order)
    OUTPUT_DIR/manifest.json       counts, sha256 of the merged file and of rejects.jsonl,
                                   the sampling parameters and the checkpoint's fingerprint

Every row is checked on the way: each prompt's samples in order, prompts in input order
within their chunk, no duplicate, no row of another chunk, the last prompt complete. A chunk
that fails is named, with what to do (delete it and rerun the generate job: only that chunk
is redone).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lmcore import fileio
from lmcore.config import Config
from lmcore.errors import ConfigError, LmcoreError, first_line, write_failed
from lmcore.gen.folder import (
    CHUNKS_DIR,
    FORMAT,
    MANIFEST_FILE,
    MERGED_FILE,
    PARAMS_FILE,
    REJECTS_FILE,
    VERSION,
    GenerationError,
    check_output_dir,
    chunk_path,
    done_chunks,
    read_params,
)
from lmcore.reading import json_value, regular_file

REDO = "delete the chunk file and rerun the generate job (it redoes only that chunk)"
# The fields of a row that the merge checks and counts, with the type each must have.
ROW_FIELDS = {"index": int, "sample": int, "num_tokens": int, "finish_reason": str, "prompt_tokens": int,
              "prompt_unknown": int}


@dataclass
class MergeCounts:
    prompts: int = 0
    rows: int = 0
    new_tokens: int = 0
    finish_eos: int = 0
    finish_length: int = 0
    empty_prompts: int = 0
    unknown_only_prompts: int = 0

    def add(self, row: dict[str, Any], first_sample: bool) -> None:
        self.rows += 1
        self.new_tokens += row["num_tokens"]
        if row["finish_reason"] == "eos":
            self.finish_eos += 1
        else:
            self.finish_length += 1
        if first_sample:
            self.prompts += 1
            self.empty_prompts += row["prompt_tokens"] == 0
            self.unknown_only_prompts += 0 < row["prompt_tokens"] == row["prompt_unknown"]


def merge_outputs(cfg: Config) -> dict[str, Any]:
    """Check that every chunk is there and consistent, write OUT/generations.jsonl (input
    order) and OUT/manifest.json; return the manifest."""
    if not cfg.generate.output_dir:
        raise ConfigError("set generate.output_dir to the folder to merge")
    out = Path(cfg.generate.output_dir)
    check_output_dir(out)
    params = read_params(out)
    if params is None:
        raise GenerationError(f"no generations in {out} (no {PARAMS_FILE}); run the generate job first")
    _check_params(out, params)
    cs, total = params["chunk_size"], params["prompts"]["chunks"]
    missing = [c for c in range(total) if c not in done_chunks(out)]
    if missing:
        shown = ", ".join(str(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise GenerationError(f"{out}: {len(missing)} of {total} chunks are not written yet (chunks {shown}; "
                              f"chunk c holds input lines c*{cs} .. (c+1)*{cs}-1); rerun the generate job "
                              "for the shards that did not finish, then merge")
    merged = _Merged(out, params)
    try:
        fileio.atomic_write(out / MERGED_FILE, merged.write)
    except OSError as e:
        raise GenerationError(write_failed(out / MERGED_FILE, e, f"the chunks in {out} are intact",
                                           "merge again", out)) from None
    if merged.counts.prompts != params["prompts"]["records"]:
        raise GenerationError(f"{out}: the chunks hold {merged.counts.prompts} prompts, the input has "
                              f"{params['prompts']['records']}; delete the chunks folder and rerun")
    for p in (out / CHUNKS_DIR).glob(".chunk-*.tmp"):  # debris of killed writers
        p.unlink(missing_ok=True)
    return _write_manifest(out, params, merged)


def _check_params(out: Path, params: dict[str, Any]) -> None:
    """What the merge reads from params.json is there, with sensible values."""
    def count(section: dict[str, Any] | None, key: str, least: int) -> bool:
        v = section.get(key) if isinstance(section, dict) else None
        return type(v) is int and least <= v < 1 << 63

    prompts, sampling = params.get("prompts"), params.get("sampling")
    bad = [name for name, ok in (("chunk_size", count(params, "chunk_size", 1)),
                                 ("prompts.chunks", count(prompts, "chunks", 0)),
                                 ("prompts.records", count(prompts, "records", 0)),
                                 ("sampling.samples_per_prompt", count(sampling, "samples_per_prompt", 1)))
           if not ok]
    if bad:
        raise GenerationError(f"{out / PARAMS_FILE} is unreadable or damaged (no valid {', '.join(bad)}); "
                              "rerun the generate job into a new generate.output_dir")


def _row_key(raw: bytes) -> tuple[dict[str, Any], tuple[int, int]]:
    """The row on a line of a chunk file and its (index, sample); ValueError if it is not one."""
    row = json_value(raw)
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    for key, kind in ROW_FIELDS.items():
        v = row.get(key)
        if type(v) is not kind or (kind is int and not 0 <= v < 1 << 63):
            raise ValueError(f"field {key!r} is {json.dumps(v)[:40]}")
    return row, (row["index"], row["sample"])


class _Merged:
    """generations.jsonl: the chunks' rows, checked and counted as they are copied."""

    def __init__(self, out: Path, params: dict[str, Any]):
        self.out, self.params = out, params
        self.counts, self.sha, self.size = MergeCounts(), hashlib.sha256(), 0

    def write(self, f: BinaryIO) -> None:
        for c in range(self.params["prompts"]["chunks"]):
            for raw in self._checked_rows(c):
                self.sha.update(raw)
                self.size += len(raw)
                f.write(raw)

    def _checked_rows(self, c: int):
        path, cs = chunk_path(self.out, c), self.params["chunk_size"]
        sp = self.params["sampling"]["samples_per_prompt"]
        last = (-1, sp - 1)  # (index, sample) of the row before
        try:
            regular_file(path, "chunk file")
            src = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except (LmcoreError, OSError) as e:
            why = first_line(e) if isinstance(e, OSError) else "not a regular file"
            raise GenerationError(f"cannot read {path} ({why}); {REDO}") from None
        with src:
            for n, raw in enumerate(src, 1):
                try:
                    row, key = _row_key(raw)
                except ValueError as e:
                    raise GenerationError(f"{path}:{n}: not a generation row ({first_line(e)}); {REDO}"
                                          ) from None
                self.counts.add(row, first_sample=key[1] == 0)
                if last[1] < sp - 1:  # the next sample of the same prompt
                    ok = key == (last[0], last[1] + 1)
                else:  # the first sample of a later prompt of this chunk
                    ok = key[1] == 0 and key[0] > last[0] and key[0] // cs == c
                if not ok:
                    raise GenerationError(f"{path}:{n}: row (index {key[0]}, sample {key[1]}) is out of "
                                          f"place (duplicate, missing or foreign row); {REDO}")
                last = key
                yield raw
        if last[1] != sp - 1:
            raise GenerationError(f"{path}: the last prompt has {last[1] + 1} of {sp} samples; {REDO}")


def _write_manifest(out: Path, params: dict[str, Any], merged: _Merged) -> dict[str, Any]:
    files = {MERGED_FILE: {"sha256": merged.sha.hexdigest(), "bytes": merged.size,
                           "rows": merged.counts.rows}}
    rejected = 0
    if (out / REJECTS_FILE).is_file():
        data = (out / REJECTS_FILE).read_bytes()
        rejected = data.count(b"\n")
        files[REJECTS_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                               "rows": rejected}
    manifest = {
        "format": FORMAT, "version": VERSION, "checkpoint": params["checkpoint"],
        "prompts": params["prompts"], "sampling": params["sampling"], "precision": params["precision"],
        "chunk_size": params["chunk_size"], "chunks": params["prompts"]["chunks"],
        "counts": {**asdict(merged.counts), "rejected_lines": rejected}, "files": files,
    }
    try:
        fileio.atomic_write_json(out / MANIFEST_FILE, manifest)
    except OSError as e:
        raise GenerationError(write_failed(out / MANIFEST_FILE, e, f"{out / MERGED_FILE} is complete",
                                           "merge again", out)) from None
    return manifest
