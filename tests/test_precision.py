"""train.loss_precision: the fused loss's three matmuls in fp32, bf16 or fp16, or "auto": each in
the precision measured fastest at its shape on this CPU, once (cached), said in the log, and kept
by the run so that a resume decides nothing again."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.errors import ConfigError
from lmcore.gen.decoder import Decoder
from lmcore.model import LSTMLM
from lmcore.runtime import precision
from lmcore.runtime.accelerator import autocast_of
from lmcore.runtime.precision import cpu_supports, dtypes_of, eval_precision, probe, resolve
from tests.conftest import needs_native, run_cli, tiny_overrides

CHOICE = re.compile(r"loss matmuls \(out, out_grad_h, out_grad_w\): (\S+) \((.*)\)")


def train(run_dir, *extra: str):
    proc = run_cli("train", *tiny_overrides(run_dir, **{"run.threads": 1, "data.val_split": "",
                                                        "tracking.wandb_mode": "disabled"}),
                   *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def said(proc) -> tuple[str, str]:
    found = CHOICE.findall(proc.stdout + proc.stderr)
    assert len(found) == 1, proc.stdout + proc.stderr
    return found[0]


def test_auto_measures_once_says_what_it_picked_and_a_resume_keeps_it(tmp_path):
    cache = tmp_path / "cache"
    auto = ("train.loss_precision=auto", f"data.cache_dir={cache}")
    first = train(tmp_path / "a", *auto, "train.max_steps=4")
    choice, why = said(first)
    assert dtypes_of(choice) is not None
    lows = [p for p in ("bf16", "fp16") if cpu_supports(p)]
    if not lows:  # nothing to choose from: said, and nothing measured
        cpu = torch.backends.cpu.get_cpu_capability()
        assert (choice, why) == ("fp32,fp32,fp32", f"auto: this CPU has no native bf16 or fp16 ({cpu}), "
                                                   "so all three loss matmuls in fp32")
        assert not (cache / "precision").exists()
        return
    assert why.startswith("auto, one 128-row chunk forward and backward: out ")
    (probe_file,) = (cache / "precision").glob("*.json")
    ms = json.loads(probe_file.read_text())["ms"]
    assert choice == ",".join(ms["picks"])
    for m, pick in zip(("out", "out_grad_h", "out_grad_w"), ms["picks"], strict=True):
        rates = ", ".join(f"{p} {ms[m][p]:.1f}" for p in ("fp32", *lows))
        assert f"{m} {pick} ({rates} ms)" in why
    assert ", ".join(f"all {p} {ms['uniform'][p]:.1f} ms" for p in lows) in why
    base = ms["out"]["fp32"]
    if ms["picks"] != ["fp32"] * 3:  # a lower precision only where it saved 5% of the chunk's time
        assert ms["combined"] <= 0.95 * base
    # never slower than all fp32, nor than a precision throughout that saves 5%
    assert ms["combined"] <= min([base] + [t for t in ms["uniform"].values() if t <= 0.95 * base])
    stamp = probe_file.stat().st_mtime_ns

    # another run on this machine: the cached figures, the same choice
    again = train(tmp_path / "b", *auto, "train.max_steps=2")
    assert said(again) == (choice, why) and probe_file.stat().st_mtime_ns == stamp

    # the first run resumed: its own earlier choice, whatever a probe would say now
    probe_file.unlink()
    resumed = train(tmp_path / "a", *auto, "train.max_steps=8")
    assert said(resumed) == (choice, "auto: the run's earlier choice")
    assert not list((cache / "precision").glob("*.json"))  # nothing was measured again
    (last,) = sorted((tmp_path / "a" / "checkpoints").glob("step_*"))[-1:]
    assert json.loads((last / "trainer_state.json").read_text())["loss_precision"] == choice

    # resumed with another explicit precision: it is used, with a warning that says so (fp32 where
    # auto chose the CPU's one low precision throughout: bf16 on the AMD EPYC of 2026-12-06)
    other = next(p for p in (*lows, "fp32") if choice != ",".join([p] * 3))
    switched = train(tmp_path / "a", f"train.loss_precision={other}", "train.max_steps=10")
    assert said(switched)[0] == ",".join([other] * 3)
    assert f"is not what the run used before ({choice})" in switched.stderr

@pytest.mark.parametrize("setting", [pytest.param(p, marks=needs_native(p)) for p in ("fp16", "bf16")])
def test_an_explicit_precision_trains_all_three_matmuls_in_it(tmp_path, setting):
    proc = train(tmp_path / "r", f"train.loss_precision={setting}", "train.max_steps=6")
    assert said(proc) == (f"{setting},{setting},{setting}", f"all three loss matmuls in {setting}")
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses and all(0 < x < 20 for x in losses)


def test_the_default_follows_autocast_and_says_nothing_more(tmp_path):
    proc = train(tmp_path / "r", "train.max_steps=2")
    assert not CHOICE.findall(proc.stdout + proc.stderr)
    follows = ("autocast", "the loss's matmuls follow train.mixed_precision")
    assert resolve("autocast", 128, 32, 100, tmp_path) == follows


def test_the_probe_times_every_matmul_in_every_precision():
    ms = probe(chunk=16, hidden=8, vocab=64, seconds=0.001)  # (the tiny shape runs on any CPU)
    assert set(ms) == {"out", "out_grad_h", "out_grad_w", "uniform", "combined", "picks"}
    assert set(ms["uniform"]) == {"bf16", "fp16"} and min(ms["uniform"].values()) > 0
    assert all(set(ms[m]) == {"fp32", "bf16", "fp16"} and min(ms[m].values()) > 0
               for m in ("out", "out_grad_h", "out_grad_w"))
    assert len(ms["picks"]) == 3 and ms["combined"] > 0


@pytest.mark.parametrize("vendor, flags, fast", [
    ("GenuineIntel", "avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile", True),  # bf16 705-927, fp32 220-284
    ("GenuineIntel", "avx512f avx512_bf16 avx512_fp16 avx512_vnni", False),  # bf16 150-175, fp32 280-350
    ("AuthenticAMD", "avx512f avx512_bf16 avx512_vnni", True),  # bf16 415, fp32 183 (2026-12-06)
    ("AuthenticAMD", "avx2 fma", False),  # no native bf16 at all: 0.3 against 106
])
def test_auto_is_bf16_on_the_cpus_where_it_measured_faster(vendor, flags, fast):
    assert precision.cpu_fast_bf16(vendor, set(flags.split())) is fast


def test_a_bad_choice_string_is_refused():
    with pytest.raises(ValueError, match="three of fp32, bf16, fp16"):
        dtypes_of("fp16,fp8,fp32")
    assert dtypes_of("autocast") is None and dtypes_of("") is None  # "": a checkpoint older than the key


def test_a_precision_the_cpu_lacks_is_refused(tmp_path, monkeypatch):
    """bf16 or fp16 where the CPU has neither natively (an AVX2-only CPU: oneDNN has no bf16 LSTM
    there, and its bf16 matmuls ran 0.3 GFLOP/s against fp32's 106): every setting that takes a
    precision refuses it in one line that says what to use; "auto" picks fp32 without measuring."""
    monkeypatch.setattr(precision, "cpu_supports", lambda name: name == "fp32")
    model = LSTMLM(50, ModelConfig(embedding_dim=8, hidden_dim=8), 1)
    calls = {"train.mixed_precision": autocast_of,
             "eval.precision": lambda p: eval_precision(p, torch.device("cpu")),
             "train.loss_precision": lambda p: resolve(p, 128, 32, 100, tmp_path),
             "generate.precision": lambda p: Decoder.check(model, p, "cpu")}
    for setting, call in calls.items():
        both = setting in ("train.mixed_precision", "train.loss_precision")
        for p in ("bf16", "fp16") if both else ("bf16",):
            with pytest.raises(ConfigError, match=f"^{setting}={p}: this CPU has no native {p} .*: use "
                                                  f"{setting}=auto or fp32$"):
                call(p)
    assert autocast_of("auto") == "no" and eval_precision("auto", torch.device("cpu"))[0] == "fp32"
    assert resolve("auto", 128, 32, 100, tmp_path)[0] == "fp32,fp32,fp32"
    assert not (tmp_path / "precision").exists()  # nothing measured


@pytest.mark.skipif(cpu_supports("bf16"),
                    reason="this CPU has bf16: test_mixed_precision_bf16_trains runs it")
def test_bf16_on_a_cpu_without_it_is_one_line_and_trains_nothing(tmp_path):
    proc = run_cli("train", *tiny_overrides(tmp_path / "r", **{"train.mixed_precision": "bf16",
                                                               "tracking.wandb_mode": "disabled"}))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "train.mixed_precision=bf16: this CPU has no native bf16" in proc.stderr
    assert not list((tmp_path / "r").glob("checkpoints/step_*"))
