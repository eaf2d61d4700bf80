"""Bad inputs through the real command line: one clear line, exit status 2, nothing half-written.

Whatever the user got wrong (a path, a file, a config key, a checkpoint), `lmcore` says so in
one line on stderr that starts with "lmcore: error:", names the culprit, exits with 2, shows
no traceback, and leaves no run folder, checkpoint or temp file behind.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, tiny_overrides

# A run that only has to get as far as the error: a tiny model, one step, no validation.
FAST = {"model.embedding_dim": 8, "model.hidden_dim": 8, "train.batch_size": 4, "train.max_steps": 1,
        "data.truncate": 16, "data.val_split": ""}
CORPUS_A = [f"the film was good and the actors were fine number {i}" for i in range(12)]
CORPUS_B = [f"une histoire triste sans aucun acteur connu numero {i}" for i in range(12)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def train(run_dir: Path, source: Path | str, env: dict | None = None, **extra: object
          ) -> subprocess.CompletedProcess:
    return run_cli("train", "--no-progress", *tiny_overrides(run_dir, **{"data.source": source, **FAST,
                                                                          **extra}), env=env)


def one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    """The failure as a user sees it; returns the message after 'lmcore: error: '."""
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything, everything
    assert proc.returncode == 2, f"exit {proc.returncode}\n{everything}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got:\n{proc.stderr}"
    assert lines[0].startswith("lmcore: error: ") and lines[0].strip() != "lmcore: error:", lines[0]
    assert proc.stdout == "", f"a failed job printed a result:\n{proc.stdout}"
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0].removeprefix("lmcore: error: ")


def debris(root: Path) -> list[str]:
    """Temp files and folders that an interrupted write would leave."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(".tmp-"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- data files ---------------------------------------------------------------------------
DATA_CASES = {
    # id: (file name or None for a path that does not exist, bytes, what the message must name)
    "nonexistent-path": (None, b"", ["does not exist", "data.source"]),
    "empty-file": ("train.jsonl", b"", ["holds no texts"]),
    "malformed-jsonl-line": ("train.jsonl", b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n',
                             [":3:", "malformed JSON"]),
    "not-utf8": ("train.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n', [":2:", "UTF-8"]),
    "no-text-field": ("train.jsonl", b'{"review": "good", "label": 1}\n',
                      ["'text'", "review", "data.text_field"]),
}


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_bad_data_file(tmp_path, case):
    name, content, names = DATA_CASES[case]
    data = tmp_path / "data" / (name or "missing.jsonl")
    if name is not None:
        data.parent.mkdir()
        data.write_bytes(content)
    run = tmp_path / "run"
    proc = train(run, data, env={"LMCORE_CACHE": str(tmp_path / "cache")})
    one_error_line(proc, str(data), *names)
    assert not run.exists(), "a failed run left a run folder"
    assert debris(tmp_path) == []


# -- config -------------------------------------------------------------------------------
CONFIG_CASES = {
    # id: (arguments after `lmcore train`, what the message must name)
    "unknown-key": (["optim.lrr=0.1"], ["optim.lrr", "did you mean", "weight_decay"]),
    "unknown-section": (["optimizer.lr=0.1"], ["'optimizer'", "did you mean 'optim'", "model"]),
    "lr-not-a-number": (["optim.lr=abc"], ["optim.lr", "number", "abc"]),
    "batch-size-not-an-integer": (["train.batch_size=1.5"], ["train.batch_size", "integer", "1.5"]),
    "invalid-choice": (["data.batching=foo"], ["data.batching", "padded", "packed", "foo"]),
    "missing-config-file": (["--config", "no/such/config.yaml"], ["no/such/config.yaml", "does not exist"]),
    "override-without-equals": (["optim.lr"], ["'optim.lr'", "section.key=value"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_config(tmp_path, case):
    args, names = CONFIG_CASES[case]
    run = tmp_path / "run"
    proc = run_cli("train", *args, f"run.dir={run}")
    one_error_line(proc, *names)
    assert not run.exists()


def test_adaptive_cutoffs_that_leave_no_cluster_below_the_vocabulary(tmp_path):
    """imdb_fast's cutoffs ([2000, 10000]) on a small corpus: say so, not a torch traceback."""
    data = write_jsonl(tmp_path / "a.jsonl", CORPUS_A)
    run = tmp_path / "run"
    proc = train(run, data, env={"LMCORE_CACHE": str(tmp_path / "cache")},
                 **{"data.min_count": 1, "model.softmax": "adaptive",
                    "model.adaptive_cutoffs": "[2000,10000]"})
    msg = one_error_line(proc, "model.adaptive_cutoffs=[2000, 10000]", "model.softmax=full")
    assert "vocabulary size 25" in msg  # 9 words, 12 numbers, 4 specials
    assert not run.exists(), "a failed run left a run folder"
    assert debris(tmp_path) == []


# -- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny run on corpus A, trained once and copied by each test that damages it."""
    root = tmp_path_factory.mktemp("trained")
    corpus_a = write_jsonl(root / "a.jsonl", CORPUS_A)
    corpus_b = write_jsonl(root / "b.jsonl", CORPUS_B)
    # Module-scoped, so the autouse env isolation has not run yet: isolate this process by hand.
    env = {"LMCORE_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "HF_HOME": str(root / "hf-home")}
    proc = train(root / "run", corpus_a, env=env, **{"data.min_count": 1})
    assert proc.returncode == 0, proc.stderr
    (ckpt,) = (root / "run" / "checkpoints").iterdir()
    return {"run": root / "run", "checkpoint": ckpt, "a": corpus_a, "b": corpus_b}


def copy_run(trained: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    return run


def test_resume_on_data_with_another_vocabulary(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = snapshot(run / "checkpoints")
    proc = train(run, trained["b"], **{"data.min_count": 1, "train.resume": "auto"})
    one_error_line(proc, "vocabulary", "run.dir")
    assert snapshot(run / "checkpoints") == before, "the old checkpoint was overwritten"
    assert debris(run) == []


def test_resume_with_another_architecture(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = snapshot(run / "checkpoints")
    proc = train(run, trained["a"], **{"data.min_count": 1, "train.resume": "auto", "model.hidden_dim": 16})
    message = one_error_line(proc, "architecture", "hidden_dim")
    assert "8" in message and "16" in message  # both sides of the mismatch
    assert snapshot(run / "checkpoints") == before
    assert debris(run) == []


def test_eval_on_a_run_folder_without_checkpoints(tmp_path):
    run = tmp_path / "fresh-run"
    run.mkdir()
    proc = run_cli("eval", f"run.dir={run}", "data.source=sample")
    one_error_line(proc, str(run), "no valid checkpoint")
    assert list(run.iterdir()) == []


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:20])


def _truncate_and_fix_manifest(path: Path) -> None:
    """Damage the file and update its checksum, so only the tokenizer's own check can tell."""
    _truncate(path)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                    "bytes": path.stat().st_size}
    manifest_path.write_text(json.dumps(manifest))


DAMAGE = {
    # id: (damage to the copied checkpoint's tokenizer.json, evaluate the checkpoint or its run folder)
    "missing-tokenizer": (lambda p: p.unlink(), "checkpoint"),
    "truncated-tokenizer": (_truncate, "checkpoint"),
    "truncated-tokenizer-manifest-updated": (_truncate_and_fix_manifest, "checkpoint"),
    "missing-tokenizer-in-run-folder": (lambda p: p.unlink(), "run"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_eval_with_a_damaged_tokenizer(trained, tmp_path, case):
    damage, target = DAMAGE[case]
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / trained["checkpoint"].name
    damage(ckpt / "tokenizer.json")
    before = snapshot(run)
    where = ckpt if target == "checkpoint" else run
    proc = run_cli("eval", "--checkpoint", str(where), f"data.source={trained['a']}", "eval.split=train")
    one_error_line(proc, str(ckpt), "tokenizer.json")
    assert snapshot(run) == before, "eval wrote into a damaged checkpoint"
    assert debris(run) == []


@pytest.mark.parametrize("what, sizes, expected", [
    ("the model", {"model.embedding_dim": 65536, "model.hidden_dim": 65536}, "does not fit in memory"),
    ("a step", {"model.embedding_dim": 4096, "model.hidden_dim": 16384, "data.truncate": 256,
                "train.batch_size": 16}, "out of memory at step 1"),
], ids=["model", "step"])
def test_a_job_that_runs_out_of_memory_says_what_to_lower(tmp_path: Path, what, sizes, expected):
    """Under a real 8 GB address-space limit (RLIMIT_AS, as `ulimit -v` sets it): torch's allocator
    fails, and the job says how much it asked for and which setting to lower, in one line."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmcore.cli", "train", "--no-progress",
           *tiny_overrides(run, **{**FAST, **sizes})]
    limit = 8 * 2**30
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    line = one_error_line(proc, expected, "GiB for one tensor")
    assert ("model.hidden_dim" if what == "the model" else "train.batch_size") in line
    assert not run.exists()  # nothing trained: no run folder left
