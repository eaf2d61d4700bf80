"""The bulk generation job: input order, byte-identical output however the work is split
(batch size, SLURM array shards, DDP ranks, threads), resume after SIGKILL / stop requests,
bad input as one clear line before any work, refusal to mix parameters or checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmcore.config import load_config
from lmcore.data.sample_corpus import sample_reviews
from lmcore.fileio import atomic_write_json, sha256_file
from lmcore.gen.folder import (
    MANIFEST_FILE,
    MERGED_FILE,
    PARAMS_FILE,
    REJECTS_FILE,
    GenerationError,
    done_chunks,
)
from lmcore.gen.job import generate_shard
from lmcore.gen.merge import merge_outputs
from lmcore.gen.prompts import PromptSource
from lmcore.jobs import run_job
from lmcore.runtime.precision import auto_precision
from tests.conftest import REPO, tiny_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """In-process runs use one thread (fast for a tiny model); subprocesses keep the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model trained on the sample corpus (it has learned where reviews end)."""
    from lmcore.trainer import train

    run = tmp_path_factory.mktemp("genrun")
    cfg = load_config(None, tiny_overrides(run, **{"train.max_steps": 30, "data.val_split": "",
                                                   "data.cache_dir": str(run / "cache"),
                                                   "tracking.wandb_mode": "disabled"}))
    train(cfg, progress=False)
    return run


def prompts_jsonl(path: Path, n: int = 40) -> Path:
    """n prompts of 0 to 12 words from the sample corpus; one empty, one of unknown words only,
    string and integer ids."""
    texts = [r["text"] for r in sample_reviews("test", n)]
    rows = []
    for i, t in enumerate(texts):
        words = t.split()[: (i * 5) % 13]
        rows.append({"id": f"r{i}" if i % 2 else i, "prompt": " ".join(words)})
    rows[3]["prompt"] = ""
    rows[4]["prompt"] = "zqxj vvkqw ünïcödé"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def gen_cfg(run: Path, out: Path, **g):
    values = {"run.dir": run, "generate.output_dir": out, "generate.max_new_tokens": 12,
              "generate.chunk_size": 7, "tracking.wandb_mode": "disabled",
              **{f"generate.{k}": v for k, v in g.items()}}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MERGED_FILE).read_text(encoding="utf-8").splitlines()]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmcore.cli", "generate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


# -- the output -------------------------------------------------------------------------------
def test_merged_output_is_in_input_order_with_all_fields_and_a_manifest(run_dir, tmp_path, capsys):
    prompts = prompts_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    cfg = gen_cfg(run_dir, out, prompts=prompts, samples_per_prompt=2, temperature=0.8, top_p=0.95)
    outcome = run_job("generate", cfg)
    assert outcome.exit_code == 0 and outcome.reports
    summary = outcome.result
    assert summary["complete"] and summary["rows"] == 80 and summary["chunks_total"] == 6
    assert summary["merged"] == str(out / MERGED_FILE)

    rows = read_rows(out)
    given = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(p["id"], s) for p in given for s in (0, 1)]
    assert [r["index"] for r in rows] == [i for i in range(40) for _ in (0, 1)]
    for r in rows:
        assert r["prompt"] == given[r["index"]]["prompt"]
        assert r["finish_reason"] in ("eos", "length")
        assert r["num_tokens"] == len(r["completion"].split())
        assert r["num_tokens"] == 12 or r["finish_reason"] == "eos"
        assert "<unk>" not in r["completion"].split() and "<bos>" not in r["completion"]
        assert r["params"] == {"temperature": 0.8, "top_k": 0, "top_p": 0.95, "max_new_tokens": 12, "seed": 0}
    assert rows[6]["completion"] != rows[7]["completion"]  # samples of one prompt differ
    assert {r["finish_reason"] for r in rows} == {"eos", "length"}  # the tiny model does end reviews

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"][MERGED_FILE]["sha256"] == sha256_file(out / MERGED_FILE)
    c = manifest["counts"]
    empty = sum(1 for p in given if not p["prompt"].split())
    assert (c["prompts"], c["rows"], c["empty_prompts"], c["unknown_only_prompts"]) == (40, 80, empty, 1)
    assert c["new_tokens"] == sum(r["num_tokens"] for r in rows)
    assert c["finish_eos"] + c["finish_length"] == 80
    ck = json.loads((out / PARAMS_FILE).read_text())["checkpoint"]
    assert manifest["checkpoint"]["model_sha256"] == ck["model_sha256"] == sha256_file(
        Path(ck["path"]) / "model.safetensors")
    assert manifest["sampling"]["temperature"] == 0.8 and manifest["precision"] == auto_precision("cpu")


def test_text_prompts_and_unconditional_samples(run_dir, tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("the movie was\n\nzqxj qqqv\nan awful film\n", encoding="utf-8")
    out = tmp_path / "text"
    assert generate_shard(gen_cfg(run_dir, out, prompts=text), progress=False)["complete"]
    merge_outputs(gen_cfg(run_dir, out, prompts=text))
    rows = read_rows(out)
    assert [(r["id"], r["prompt"]) for r in rows] == [(1, "the movie was"), (2, ""), (3, "zqxj qqqv"),
                                                     (4, "an awful film")]
    assert rows[2]["prompt_unknown"] == rows[2]["prompt_tokens"] == 2

    out = tmp_path / "uncond"
    cfg = gen_cfg(run_dir, out, num_samples=9, chunk_size=4)
    assert generate_shard(cfg, progress=False)["chunks_total"] == 3
    merge_outputs(cfg)
    rows = read_rows(out)
    assert [(r["id"], r["prompt"], r["prompt_tokens"]) for r in rows] == [(i, "", 0) for i in range(9)]
    assert len({r["completion"] for r in rows}) == 9


def test_greedy_and_top_k_1_agree_and_greedy_is_the_argmax(run_dir, tmp_path):
    from lmcore.checkpoint import resolve

    prompts = prompts_jsonl(tmp_path / "p.jsonl", 12)
    runs = {}
    for name, g in {"greedy": {"temperature": 0.0}, "top1": {"temperature": 2.0, "top_k": 1}}.items():
        cfg = gen_cfg(run_dir, tmp_path / name, prompts=prompts, **g)
        generate_shard(cfg, progress=False)
        merge_outputs(cfg)
        runs[name] = [r["completion"] for r in read_rows(tmp_path / name)]
    assert runs["greedy"] == runs["top1"]

    model, tok = resolve(run_dir).build_model()
    banned = [tok.unk_id, tok.pad_id, tok.bos_id]
    for row in read_rows(tmp_path / "greedy")[:5]:  # the notebook's way, re-running the prefix
        ids = [tok.bos_id, *tok.encode(row["prompt"])]
        words = []
        for _ in range(12):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            logits[banned] = float("-inf")
            nxt = int(logits.argmax())
            if nxt == tok.eos_id:
                break
            words.append(tok.itos[nxt])
            ids.append(nxt)
        assert row["completion"] == " ".join(words)


# -- determinism however the work is split ---------------------------------------------------
SPLIT = {"temperature": 0.9, "top_p": 0.95, "samples_per_prompt": 2}


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(prompts, merged output) of one process with the default batch size."""
    tmp = tmp_path_factory.mktemp("ref")
    prompts = prompts_jsonl(tmp / "p.jsonl", 60)
    cfg = gen_cfg(run_dir, tmp / "out", prompts=prompts, **SPLIT)
    generate_shard(cfg, progress=False)
    merge_outputs(cfg)
    return prompts, tmp / "out" / MERGED_FILE


def test_same_bytes_with_other_batch_sizes_and_three_array_shards(run_dir, reference, tmp_path, monkeypatch):
    prompts, ref = reference
    small = gen_cfg(run_dir, tmp_path / "b3", prompts=prompts, batch_size=3, **SPLIT)
    generate_shard(small, progress=False)
    merge_outputs(small)
    assert (tmp_path / "b3" / MERGED_FILE).read_bytes() == ref.read_bytes()

    out = tmp_path / "shards"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    for task in (2, 0, 1):  # as a SLURM array would run them: any order
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        res = generate_shard(gen_cfg(run_dir, out, prompts=prompts, batch_size=5, **SPLIT), progress=False)
        assert (res["shard"], res["num_shards"], res["shard_complete"]) == (task, 3, True)
        assert res["complete"] == (task == 1)
    merge_outputs(gen_cfg(run_dir, out, prompts=prompts, **SPLIT))
    assert (out / MERGED_FILE).read_bytes() == ref.read_bytes()


def test_int8_gives_the_same_bytes_with_other_batch_sizes_and_shards(run_dir, reference, tmp_path,
                                                                     monkeypatch):
    """generate.precision=int8: integer sums are exact, so splitting the work changes nothing;
    the folder records int8, and its outputs differ from fp32's only where a draw moved."""
    prompts, ref = reference
    whole = gen_cfg(run_dir, tmp_path / "whole", prompts=prompts, precision="int8", **SPLIT)
    generate_shard(whole, progress=False)
    merge_outputs(whole)
    expected = (tmp_path / "whole" / MERGED_FILE).read_bytes()
    assert json.loads((tmp_path / "whole" / "manifest.json").read_text())["precision"] == "int8"

    out = tmp_path / "shards"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    for task in (1, 2, 0):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        generate_shard(gen_cfg(run_dir, out, prompts=prompts, batch_size=3, precision="int8", **SPLIT),
                       progress=False)
    merge_outputs(gen_cfg(run_dir, out, prompts=prompts, precision="int8", **SPLIT))
    assert (out / MERGED_FILE).read_bytes() == expected
    fp32_rows = [json.loads(x) for x in ref.read_bytes().splitlines()]
    int8_rows = [json.loads(x) for x in expected.splitlines()]
    assert [r["id"] for r in int8_rows] == [r["id"] for r in fp32_rows]


def test_same_bytes_with_two_ddp_ranks(run_dir, reference, tmp_path):
    prompts, ref = reference
    out = tmp_path / "ddp"
    args = [f"run.dir={run_dir}", f"generate.prompts={prompts}", f"generate.output_dir={out}",
            "generate.max_new_tokens=12", "generate.chunk_size=7", "generate.batch_size=4",
            *[f"generate.{k}={v}" for k, v in SPLIT.items()]]
    proc = subprocess.run([*TORCHRUN, "jobs/generate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("{")]  # rank 0 only
    summary = json.loads(line)
    assert summary["world_size"] == 2 and summary["complete"] and summary["rows"] == 120
    assert (out / MERGED_FILE).read_bytes() == ref.read_bytes()


# -- interruptions ----------------------------------------------------------------------------
def _wait_for_chunks(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while len(done_chunks(out)) < at_least:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no chunks written"
        time.sleep(0.05)


def test_stop_signal_then_sigkill_then_rerun_gives_the_uninterrupted_output(run_dir, tmp_path):
    prompts = prompts_jsonl(tmp_path / "p.jsonl", 400)
    g = {"prompts": prompts, "chunk_size": 10, "max_new_tokens": 25, "batch_size": 4, "temperature": 1.0}
    args = [f"run.dir={run_dir}", f"generate.output_dir={tmp_path / 'out'}",
            *[f"generate.{k}={v}" for k, v in g.items()]]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmcore.cli", "generate", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    # SIGTERM (a SLURM preemption warning): finish the chunk at hand, exit 3 for a requeue.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_chunks(out, proc, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert json.loads(stdout.splitlines()[-1])["stopped"] is True
    after_term = len(done_chunks(out))
    assert 2 <= after_term < 40

    # SIGKILL (node failure): no warning at all.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_chunks(out, proc, after_term + 2)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(done_chunks(out)) < 40, "the run finished before the kill: make the workload bigger"

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["complete"] and summary["chunks_done_before"] >= after_term + 2
    assert not list((out / "chunks").glob(".*.tmp"))  # the merge cleared the killed writer's debris

    cfg = gen_cfg(run_dir, tmp_path / "straight", **{**g, "batch_size": 64})  # 1 thread, other batches
    generate_shard(cfg, progress=False)
    merge_outputs(cfg)
    assert (out / MERGED_FILE).read_bytes() == (tmp_path / "straight" / MERGED_FILE).read_bytes()
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(400))  # no duplicate, none missing


def test_a_stop_request_returns_stopped_and_the_rerun_finishes(run_dir, tmp_path):
    prompts = prompts_jsonl(tmp_path / "p.jsonl", 30)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    cfg = gen_cfg(run_dir, tmp_path / "out", prompts=prompts, chunk_size=5, batch_size=4)
    res = generate_shard(cfg, stop_requested=stop, progress=False)
    assert res["stopped"] and not res["complete"] and 1 <= res["chunks_written"] < 6
    res = generate_shard(cfg, progress=False)
    assert res["complete"] and not res["stopped"]
    assert res["chunks_done_before"] + res["chunks_written"] == 6
    merge_outputs(cfg)
    straight = gen_cfg(run_dir, tmp_path / "straight", prompts=prompts, chunk_size=5)
    generate_shard(straight, progress=False)
    merge_outputs(straight)
    assert (tmp_path / "out" / MERGED_FILE).read_bytes() == (tmp_path / "straight" / MERGED_FILE).read_bytes()


def test_merge_refuses_while_chunks_are_missing(run_dir, tmp_path):
    prompts = prompts_jsonl(tmp_path / "p.jsonl", 30)
    cfg = gen_cfg(run_dir, tmp_path / "out", prompts=prompts, chunk_size=5, num_shards=2, shard_index=0)
    res = generate_shard(cfg, progress=False)
    assert res["shard_complete"] and not res["complete"]
    with pytest.raises(GenerationError, match="3 of 6 chunks are not written yet"):
        merge_outputs(cfg)


# -- bad input ----------------------------------------------------------------------------------
def one_error_line(capsys, argv: list[str], *names: str) -> str:
    from lmcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", *argv])
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcore: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]}"
    return lines[0]


BAD_FILES = {
    "malformed-json": (b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n{"id": 3, "prompt": "c\n',
                       [":3:", "malformed JSON", "bad_lines=skip"]),
    "missing-prompt": (b'{"id": 1, "prompt": "a"}\n{"id": 2, "text": "b"}\n', [":2:", "'prompt'", "text"]),
    "missing-id": (b'{"prompt": "a"}\n', [":1:", "'id'"]),
    "id-not-scalar": (b'{"id": [1], "prompt": "a"}\n', [":1:", "'id'"]),
    "prompt-not-string": (b'{"id": 1, "prompt": null}\n', [":1:", "'prompt'", "string"]),
    "not-an-object": (b'["a", "b"]\n', [":1:", "JSON object"]),
    "duplicate-id": (b'{"id": "x", "prompt": "a"}\n{"id": "y", "prompt": "b"}\n{"id": "x", "prompt": "c"}\n',
                     [":3:", "duplicate id", "line 1"]),
    "not-utf8": (b'{"id": 1, "prompt": "caf\xe9"}\n', [":1:", "UTF-8"]),
    "empty-file": (b"", ["holds no prompts"]),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_prompt_files_fail_before_any_work(run_dir, tmp_path, capsys, case):
    content, names = BAD_FILES[case]
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    out = tmp_path / "out"
    one_error_line(capsys, [f"run.dir={run_dir}", f"generate.prompts={path}", f"generate.output_dir={out}"],
                   str(path), *names)
    assert not out.exists()


BAD_CONFIG = {
    "negative-temperature": (["generate.temperature=-0.5"], ["generate.temperature", "[0, 1000]"]),
    "top-p-above-1": (["generate.top_p=1.5"], ["generate.top_p", "(0, 1]"]),
    "top-p-zero": (["generate.top_p=0"], ["generate.top_p"]),
    "negative-top-k": (["generate.top_k=-1"], ["generate.top_k"]),
    "nothing-to-generate": (["generate.num_samples=0"], ["generate.prompts", "generate.num_samples"]),
    "missing-prompts-file": (["generate.prompts=/nonexistent/p.jsonl"], ["/nonexistent/p.jsonl",
                                                                         "does not exist"]),
    "shard-out-of-range": (["generate.num_shards=2", "generate.shard_index=2"], ["generate.shard_index"]),
    "no-checkpoint": (["run.dir=/nonexistent/run"], ["/nonexistent/run"]),
    "zero-chunk-size": (["generate.chunk_size=0"], ["generate.chunk_size", "(0, 10000000]"]),
}


@pytest.mark.parametrize("case", BAD_CONFIG, ids=list(BAD_CONFIG))
def test_bad_settings_fail_before_any_work(run_dir, tmp_path, capsys, case):
    extra, names = BAD_CONFIG[case]
    out = tmp_path / "out"
    one_error_line(capsys, [f"run.dir={run_dir}", f"generate.output_dir={out}", *extra], *names)
    assert not out.exists()


def test_bad_lines_skip_puts_them_in_rejects_and_the_manifest(run_dir, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": 1, "prompt": "the film"}\n{"id": 2, "prompt": broken}\n\n'
                     b'{"id": 3, "prompt": "a plot"}\n{"id": 1, "prompt": "again"}\n{"id": 4}\n'
                     b'{"id": 5, "prompt": "caf\xe9"}\n{"id": 6, "prompt": "end"}\n')
    cfg = gen_cfg(run_dir, tmp_path / "out", prompts=path, bad_lines="skip", chunk_size=3)
    res = generate_shard(cfg, progress=False)
    assert (res["prompts"], res["rejected_lines"]) == (3, 4)
    manifest = merge_outputs(cfg)
    assert [r["id"] for r in read_rows(tmp_path / "out")] == [1, 3, 6]
    rejects = [json.loads(x) for x in (tmp_path / "out" / REJECTS_FILE).read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [2, 5, 6, 7]
    assert any("duplicate id 1" in r["error"] for r in rejects)
    assert manifest["counts"]["rejected_lines"] == 4 and manifest["counts"]["prompts"] == 3
    assert manifest["prompts"]["blank_lines"] == 1

    # A refused run (other settings) leaves the folder as it was, rejects included.
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    other = tmp_path / "q.jsonl"
    other.write_bytes(b'{"id": 1, "prompt": "x"}\nnot json\n')
    with pytest.raises(GenerationError, match="prompts"):
        generate_shard(gen_cfg(run_dir, tmp_path / "out", prompts=other, bad_lines="skip", chunk_size=3),
                       progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


def test_bad_lines_skip_sets_aside_unusable_json_and_over_long_prompts(run_dir, tmp_path):
    """JSON that parses only into trouble (an id of 5000 digits, nesting 100000 deep, a lone
    surrogate escape) and a prompt of more than generate.max_prompt_words words are bad lines like
    any other: set aside in rejects.jsonl, the rest generated."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "prompt": "the film"}\n'
                    '{"id": ' + "9" * 5000 + ', "prompt": "a"}\n'
                    + "[" * 100_000 + "]" * 100_000 + "\n"
                    '{"id": 4, "prompt": "the movie \\ud800 was"}\n'
                    '{"id": "\\udfff", "prompt": "a"}\n'
                    '{"id": 6, "prompt": "' + "the " * 21 + '"}\n'
                    '{"id": 7, "prompt": "' + "the " * 20 + '"}\n')
    cfg = gen_cfg(run_dir, tmp_path / "out", prompts=path, bad_lines="skip", max_prompt_words=20,
                  max_new_tokens=2)
    res = generate_shard(cfg, progress=False)
    assert (res["prompts"], res["rejected_lines"]) == (2, 5)
    merge_outputs(cfg)
    assert [r["id"] for r in read_rows(tmp_path / "out")] == [1, 7]
    rejects = {r["line"]: r["error"] for r in
               map(json.loads, (tmp_path / "out" / REJECTS_FILE).read_text(encoding="utf-8").splitlines())}
    assert sorted(rejects) == [2, 3, 4, 5, 6]
    assert "more than 4300 digits" in rejects[2] and "nested too deeply" in rejects[3]
    assert "surrogate" in rejects[4] and "surrogate" in rejects[5]
    assert "21 words" in rejects[6] and "generate.max_prompt_words=20" in rejects[6]


def test_a_damaged_gzip_is_a_read_error_not_a_bad_line(run_dir, tmp_path, capsys):
    """Damaged deflate data decodes to garbage before its checksum fails: the file is named as
    unreadable, not its first garbled line."""
    import gzip

    lines = b"".join(b'{"id": %d, "prompt": "the movie was good %d"}\n' % (i, i) for i in range(2000))
    data = bytearray(gzip.compress(lines, mtime=0))
    data[len(data) // 3] ^= 0xFF
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(bytes(data))
    for mode in ("error", "skip"):
        argv = [f"run.dir={run_dir}", f"generate.prompts={path}", f"generate.output_dir={tmp_path / 'out'}",
                f"generate.bad_lines={mode}"]
        line = one_error_line(capsys, argv, f"cannot read prompts file {path}", "gzip")
        assert not re.search(r"\.gz:\d", line)  # no line number: the file, not a line, is at fault
    assert not (tmp_path / "out").exists()


def test_a_folder_made_with_other_settings_or_another_checkpoint_is_refused(run_dir, tmp_path, capsys):
    prompts = prompts_jsonl(tmp_path / "p.jsonl", 8)
    out = tmp_path / "out"
    base = [f"run.dir={run_dir}", f"generate.prompts={prompts}", f"generate.output_dir={out}",
            "generate.max_new_tokens=5"]
    generate_shard(load_config(None, base), progress=False)
    one_error_line(capsys, [*base, "generate.temperature=0.5"], str(out),
                   "generate.temperature: folder 1.0, now 0.5")
    one_error_line(capsys, [*base, "generate.seed=3"], "generate.seed")
    prompts.write_text(prompts.read_text() + '{"id": "new", "prompt": "more"}\n')
    one_error_line(capsys, base, "prompts (sha256 of the file)")

    # Another checkpoint: the same architecture, other weights.
    import shutil

    from lmcore.checkpoint import resolve

    src = resolve(run_dir).path
    other = tmp_path / "other" / "checkpoints" / src.name
    shutil.copytree(src, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "model.safetensors"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": sha256_file(other / "model.safetensors"),
                                              "bytes": (other / "model.safetensors").stat().st_size}
    atomic_write_json(other / "manifest.json", manifest)
    prompts.write_text("".join(prompts.read_text().splitlines(keepends=True)[:-1]))
    one_error_line(capsys, [*base, f"generate.checkpoint={other}"],
                   "checkpoint (sha256 of model.safetensors)")


# -- pieces -------------------------------------------------------------------------------------
def test_prompts_are_streamed_not_loaded(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write(json.dumps({"id": i, "prompt": f"the movie number {i} was long and dull"}) + "\n")
    size = path.stat().st_size
    source = PromptSource(path)
    tracemalloc.start()
    scan = source.scan(chunk_size=1000)
    n = sum(1 for _ in source.records(lambda i: i % 7 == 0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert scan.records == 100_000 and len(scan.chunk_records) == 100 and n == -(-100_000 // 7)
    # What stays in memory: an 8-byte hash per id (duplicate check, sorted once), not the prompts.
    assert peak < min(24 * 100_000 + (1 << 20), size / 3), f"peak {peak} bytes for a {size}-byte file"


# -- tracking -----------------------------------------------------------------------------------
class RecordingTracker:
    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        if name not in ("log", "summary", "table", "finish"):
            raise AttributeError(name)

        def record(*args):
            self.calls.append((name, *args))
        return record


class BrokenRun:
    """A W&B run whose every call fails (the service died, the disk filled up)."""

    def __getattr__(self, name):
        raise RuntimeError("W&B is down")


def test_throughput_and_samples_go_to_the_tracker_and_a_broken_one_changes_nothing(run_dir, tmp_path,
                                                                                   monkeypatch):
    import lmcore.gen.job
    from lmcore.track.tracker import Tracker

    prompts = prompts_jsonl(tmp_path / "p.jsonl", 30)
    tracker = RecordingTracker()
    opened = []
    monkeypatch.setattr(lmcore.gen.job, "open_tracker",
                        lambda cfg, run, job, enabled=True: opened.append((run, job, enabled)) or tracker)
    cfg = gen_cfg(run_dir, tmp_path / "a", prompts=prompts, chunk_size=10)
    generate_shard(cfg, progress=False)
    assert opened == [(run_dir, "generate", True)]  # the training run's folder: W&B links the runs
    names = [c[0] for c in tracker.calls]
    assert names == ["log", "log", "log", "summary", "table", "finish"]
    assert tracker.calls[0][2]["generate/new_tokens_per_s"] > 0 and tracker.calls[2][1] == 30
    assert tracker.calls[3][1]["generate/new_tokens"] > 0
    _, name, columns, rows = tracker.calls[4]
    assert name == "generate/samples" and columns[0] == "id" and len(rows) == 20

    monkeypatch.setattr(lmcore.gen.job, "open_tracker", lambda *a, **k: Tracker(BrokenRun(), "offline", "x"))
    with pytest.warns(UserWarning, match="W&B log failed"):  # once: the tracker is off after that
        generate_shard(gen_cfg(run_dir, tmp_path / "b", prompts=prompts, chunk_size=10), progress=False)

    def cannot_start(*a, **k):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(lmcore.gen.job, "open_tracker", cannot_start)
    with pytest.warns(UserWarning, match="tracking is off"):
        generate_shard(gen_cfg(run_dir, tmp_path / "c", prompts=prompts, chunk_size=10), progress=False)
    for name in ("b", "c"):
        merge_outputs(gen_cfg(run_dir, tmp_path / name, prompts=prompts, chunk_size=10))
        merge_outputs(cfg)
        assert (tmp_path / name / MERGED_FILE).read_bytes() == (tmp_path / "a" / MERGED_FILE).read_bytes()
