"""The bulk generation output folder (lmcore/gen/folder.py): which shard a process is, which
chunks are done, and params.json: claimed once (the first writer wins, complete), then every
later start must agree with it or is refused, naming what differs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from lmcore.fileio import FILE_MODE
from lmcore.gen.folder import (
    PARAMS_FILE,
    GenerationError,
    chunk_path,
    claim_params,
    done_chunks,
    params_diff,
    read_params,
    resolve_shard,
)


def params(**changes) -> dict:
    p = {"format": "lmcore-generations", "version": 1, "chunk_size": 4, "precision": "fp32",
         "checkpoint": {"path": "run/checkpoints/step_00000010", "model_sha256": "aa",
                        "tokenizer_fingerprint": "t"},
         "prompts": {"kind": "jsonl", "sha256": "ff", "lines": 10, "records": 10, "chunks": 3},
         "sampling": {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "max_new_tokens": 5,
                      "samples_per_prompt": 1, "seed": 0}}
    for dotted, value in changes.items():
        node = p
        *path, last = dotted.split("__")
        for k in path:
            node = node[k]
        node[last] = value
    return p


def test_shard_and_count_come_from_the_slurm_array_unless_given():
    assert resolve_shard(0, -1, {}) == (0, 1)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "3",
           "SLURM_ARRAY_TASK_STEP": "2"}  # --array=3-7:2 -> tasks 3, 5, 7
    assert resolve_shard(0, -1, env) == (1, 3)
    assert resolve_shard(4, 2, env) == (2, 4)  # explicit values win
    with pytest.raises(Exception, match="shard_index 5 is out of range for 3 shards"):
        resolve_shard(3, 5, {})


def test_a_chunk_is_done_when_its_file_is_there_and_not_before(tmp_path: Path):
    out = tmp_path / "out"
    assert done_chunks(out) == set()
    chunk_path(out, 2).parent.mkdir(parents=True)
    chunk_path(out, 2).write_text("{}\n")
    (chunk_path(out, 0).parent / ".chunk-00000000.jsonl.x.tmp").write_text("half")  # a killed writer's
    assert chunk_path(out, 2).name == "chunk-00000002.jsonl" and done_chunks(out) == {2}


def test_params_are_claimed_once_and_a_rerun_with_the_same_settings_is_welcome(tmp_path: Path):
    out = tmp_path / "out"
    claim_params(out, params())
    assert read_params(out) == params()
    assert (out / PARAMS_FILE).stat().st_mode & 0o777 == FILE_MODE
    claim_params(out, params(checkpoint__path="moved/elsewhere"))  # paths may differ: files move


@pytest.mark.parametrize("change, named", [
    ({"sampling__temperature": 1.0}, "generate.temperature: folder 0.8, now 1.0"),
    ({"checkpoint__model_sha256": "bb"}, "the folder was made from checkpoint run/checkpoints/step_00000010"),
    ({"prompts__sha256": "00"}, "prompts (sha256 of the file)"),
    ({"precision": "int8"}, "precision: folder 'fp32', now 'int8'"),
], ids=["sampling", "checkpoint", "prompts", "precision"])
def test_a_start_with_other_settings_is_refused_naming_them(tmp_path: Path, change, named):
    out = tmp_path / "out"
    claim_params(out, params())
    before = (out / PARAMS_FILE).read_bytes()
    with pytest.raises(GenerationError, match="holds generations made with other settings") as e:
        claim_params(out, params(**change))
    assert named in str(e.value) and "\n" not in str(e.value)
    assert (out / PARAMS_FILE).read_bytes() == before
    assert params_diff(params(), params(**change))


def test_racing_claims_leave_one_complete_params_file(tmp_path: Path):
    out = tmp_path / "out"
    errors: list[BaseException] = []

    def claim(temperature: float) -> None:
        try:
            claim_params(out, params(sampling__temperature=temperature))
        except GenerationError as e:
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(0.8 if i % 2 else 0.5,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = json.loads((out / PARAMS_FILE).read_text())["sampling"]["temperature"]
    assert len(errors) == 4 and all(f"folder {winner}" in str(e) for e in errors)
    assert [p.name for p in out.iterdir()] == [PARAMS_FILE]  # no temporary files left


def test_chunk_files_without_params_are_not_adopted(tmp_path: Path):
    out = tmp_path / "out"
    chunk_path(out, 0).parent.mkdir(parents=True)
    chunk_path(out, 0).write_text("{}\n")
    with pytest.raises(GenerationError, match="holds chunk files but no params.json"):
        claim_params(out, params())
