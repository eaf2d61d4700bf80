"""Checkpoints (lmcore/checkpoint.py): a folder of safetensors and JSON, written atomically, read
once and checked against its manifest; what is loaded is what was checked; damage, a newer
lmcore's architecture, and the usual file permissions."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from lmcore import fileio
from lmcore.checkpoint import Checkpoint, CheckpointWriter, find_latest, list_checkpoints, resolve
from lmcore.config import ModelConfig
from lmcore.data.tokenizer import WordTokenizer
from lmcore.errors import CheckpointError
from lmcore.fileio import FILE_MODE
from lmcore.model import LSTMLM
from lmcore.rundir import RunDir

TOK = WordTokenizer([f"w{i}" for i in range(30)])


def trained(**arch) -> tuple[LSTMLM, torch.optim.Adam]:
    """A tiny model after one Adam step, so the optimizer has state to save."""
    torch.manual_seed(0)
    model = LSTMLM(len(TOK), ModelConfig(embedding_dim=8, hidden_dim=8, **arch), TOK.pad_id)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    out = model(torch.tensor([[2, 5, 6, 7]]), targets=torch.tensor([[5, 6, 7, 3]]))
    out.loss_sum.backward()
    opt.step()
    return model, opt


def save(run: Path, step: int, model: LSTMLM, opt, keep: int = 3) -> Path:
    writer = CheckpointWriter(RunDir(run), step)
    writer.begin()
    writer.write_rank(0, {"h": torch.arange(6.0)})
    writer.write_main(model, opt.state_dict(), {"step": step}, TOK.to_json(), "run: {}\n")
    return writer.finish(model.architecture(), TOK.fingerprint, step, keep)


def test_a_saved_checkpoint_loads_back_bit_identical(tmp_path: Path):
    model, opt = trained()
    path = save(tmp_path / "run", 10, model, opt)
    assert path == tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt = Checkpoint.open(path)
    assert ckpt.step == 10 and ckpt.trainer_state() == {"step": 10}
    again, tok = ckpt.build_model()
    assert tok.itos == TOK.itos
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    opt2 = torch.optim.Adam(again.parameters(), lr=0.01)
    opt2.load_state_dict(ckpt.optimizer_state())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(ckpt.rank_state(0)["h"], torch.arange(6.0)) and ckpt.rank_state(1) is None


def test_tied_weights_are_stored_once_and_loaded_into_both(tmp_path: Path):
    model, opt = trained(tie_weights=True)
    ckpt = Checkpoint.open(save(tmp_path / "run", 1, model, opt))
    again, _ = ckpt.build_model()
    assert again.head.weight is again.embedding.weight
    assert torch.equal(again.head.weight, model.head.weight)


def test_what_is_loaded_is_what_was_checked(tmp_path: Path):
    """A weights file swapped after the check is never read: the checked bytes are loaded."""
    model, opt = trained()
    path = save(tmp_path / "run", 1, model, opt)
    ckpt = Checkpoint.open(path)
    (path / "model.safetensors").write_bytes(b"swapped after the check")
    again, _ = ckpt.build_model()
    assert torch.equal(again.head.weight, model.head.weight)
    with pytest.raises(CheckpointError, match="model.safetensors fails its checksum"):
        Checkpoint.open(path)  # opened again, the swap is seen


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "optimizer.json").write_text("{}"), "optimizer.json fails its checksum"),
    (lambda p: (p / "model.safetensors").unlink(), "is missing model.safetensors"),
    (lambda p: (p / "manifest.json").write_text("not json"), "manifest.json is damaged"),
    (lambda p: (p / "manifest.json").unlink(), "not a complete lmcore checkpoint"),
], ids=["edited", "missing-file", "damaged-manifest", "no-manifest"])
def test_damage_is_one_clear_error_naming_the_file(tmp_path: Path, damage, message):
    model, opt = trained()
    path = save(tmp_path / "run", 1, model, opt)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as e:
        Checkpoint.open(path)
    assert "\n" not in str(e.value)


def test_a_checkpoint_of_a_newer_lmcore_is_refused_clearly(tmp_path: Path):
    model, opt = trained()
    path = save(tmp_path / "run", 1, model, opt)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["architecture"]["attention_heads"] = 4  # a key this version does not know
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="key this lmcore does not know.*attention_heads.*upgrade"):
        Checkpoint.open(path).build_model()


def test_the_latest_good_checkpoint_is_found_and_damaged_newer_ones_are_named(tmp_path: Path):
    model, opt = trained()
    run = tmp_path / "run"
    for step in (10, 20, 30):
        save(run, step, model, opt)
    (run / "checkpoints" / "step_00000030" / "model.safetensors").write_bytes(b"bit rot")
    latest = find_latest(RunDir(run))
    assert latest.checkpoint.path.name == "step_00000020" and latest.count == 3
    assert len(latest.problems) == 1 and "step_00000030" in latest.problems[0]
    with pytest.warns(UserWarning, match="skipping damaged checkpoint.*step_00000030"):
        assert resolve(run).path.name == "step_00000020"  # what eval and generate take
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nowhere")


def test_only_the_last_k_are_kept_and_files_get_the_usual_permissions(tmp_path: Path):
    model, opt = trained()
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        save(run, step, model, opt, keep=2)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    for f in (run / "checkpoints" / "step_00000004").iterdir():
        assert f.stat().st_mode & 0o777 == FILE_MODE, f  # safetensors alone would give 0600
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_latest(RunDir(run)).problems == []
    assert os.access(run / "checkpoints" / "step_00000004", os.R_OK)


def test_tensor_files_are_streamed_as_the_very_bytes_safetensors_writes(tmp_path: Path):
    # (no whole-file copy in memory at a checkpoint; the format and order stay safetensors' own)
    from safetensors.torch import load, save

    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]
    tensors = {f"t{i}": (torch.randn(3, i + 1, generator=g) * 50).to(d) for i, d in enumerate(dtypes)}
    bf16 = torch.bfloat16
    tensors |= {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "strided": torch.randn(5, 8)[:, ::2],
                "b.second": torch.ones(2, dtype=bf16), "a.first": torch.zeros(2, dtype=bf16)}
    path = tmp_path / "f.safetensors"
    fileio.save_tensors(path, tensors)
    data = path.read_bytes()
    assert data == save({k: v.contiguous() for k, v in tensors.items()})
    back = load(data)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
