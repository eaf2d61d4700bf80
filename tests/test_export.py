"""`lmcore export`: a Hugging Face-style model folder that loads without lmcore's run folder and
that eval and generate take as a checkpoint, with the same figure and the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import Checkpoint, resolve
from lmcore.data.tokenizer import WordTokenizer
from lmcore.model import LSTMLM
from tests.conftest import run_cli, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("exp") / "run"
    overrides = tiny_overrides(run, **{"train.max_steps": 12, "data.val_split": ""})
    proc = run_cli("train", *overrides, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return run


def test_an_export_loads_back_and_scores_and_generates_as_its_checkpoint(trained: Path, tmp_path: Path):
    out = tmp_path / "model"
    proc = run_cli("export", str(trained), str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "manifest.json",
                                                     "model.safetensors", "tokenizer.json"]
    ckpt = resolve(trained)
    model = LSTMLM.from_pretrained(out)  # no run folder, no lmcore checkpoint layout needed
    original, tok = ckpt.build_model()
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert WordTokenizer.load(out / "tokenizer.json").fingerprint == tok.fingerprint
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tok) and config["eos_token_id"] == tok.eos_id
    assert "## Evaluation protocol" in (out / "README.md").read_text()
    assert json.loads(proc.stdout)["fingerprint"] == Checkpoint.open(out).fingerprint  # lmcore verify OUT

    scores = [json.loads(run_cli("eval", *tiny_overrides(trained), "eval.split=train", "eval.limit=20",
                                 f"eval.checkpoint={c}").stdout) for c in (ckpt.path, out)]
    assert scores[0]["masked_ppl"] == scores[1]["masked_ppl"] and scores[0]["num_targets"] > 100
    prompts = ["--prompt", "the movie", "--prompt", "", "generate.max_new_tokens=12"]
    texts = [run_cli("generate", *tiny_overrides(trained), f"generate.checkpoint={c}", *prompts).stdout
             for c in (ckpt.path, out)]
    assert texts[0] == texts[1] and texts[0].count("\n") == 2


def test_an_export_into_a_folder_that_is_not_empty_needs_force(trained: Path, tmp_path: Path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_cli("export", str(trained), str(out))
    assert proc.returncode == 2 and proc.stderr.startswith("lmcore: error: ") and "--force" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing half-written
    assert run_cli("export", str(trained), str(out), "--force").returncode == 0
    assert "notes.txt" not in [p.name for p in out.iterdir()]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_edited_export_is_refused(trained: Path, tmp_path: Path):
    out = tmp_path / "model"
    assert run_cli("export", str(trained), str(out)).returncode == 0
    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(Exception, match="does not match the sha256"):
        LSTMLM.from_pretrained(out)
    proc = run_cli("eval", *tiny_overrides(trained), f"eval.checkpoint={out}")
    assert proc.returncode == 2 and "fails its checksum" in proc.stderr
