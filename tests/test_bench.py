"""bench/bench.py end to end on tiny IMDB-format data, against the real reference script.

Smoke test only: every section runs for a step or two (the figures mean nothing at this
size); what is checked is that both sides run, the JSON and the markdown table come out with
a figure, a ratio and a verdict per target, and the correctness checks hold (the same
evaluation targets on both sides, the same perplexity up to the reference's <eos> placement).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmcore.data.sample_corpus import sample_reviews
from lmcore.runtime.precision import cpu_supports
from tests.conftest import REPO, SHARED

REFERENCE = SHARED / "bench" / "seed_reference.py"
BENCH = REPO / "bench" / "bench.py"


def _write_imdb_like(folder: Path) -> None:
    folder.mkdir(parents=True)
    for split, n in (("train", 400), ("test", 300)):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            for r in sample_reviews(split, n):
                f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")


def _bench(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"the reference script {REFERENCE} is absent")
def test_bench_all_sections_tiny(tmp_path):
    data, out = tmp_path / "data", tmp_path / "res" / "bench.json"
    _write_imdb_like(data)
    proc = _bench(
        "--data", str(data), "--reference", str(REFERENCE), "--out", str(out),
        "--work", str(tmp_path / "work"),
        "--warmup-steps", "1", "--ref-steps", "2", "--ref-repeats", "1", "--our-steps", "2",
        "--train-variants", "seed", "--ttq-eval-every", "1", "--ttq-max-steps", "2",
        # the budget would be 1.5x the tiny reference's time / 150: a loaded machine's first step can pass it
        "--ttq-budget-s", "600",
        # the tiny vocabulary (~470 words) is below imdb_fast's first cutoff (2000)
        "--ttq-override", "model.adaptive_cutoffs=[100,200]",
        "--gen-prompts", "4", "--gen-ref-prompts", "2", "--gen-new-tokens", "3", "--gen-repeats", "1",
        "--gen-precisions", "fp32", "--ceiling-min-seconds", "0.005")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["sections"]) == {"peak", "train", "ttq", "eval", "gen"}
    names = [t["name"] for t in res["targets"]]
    assert names == ["train_throughput", "train_ceiling_fraction", "train_memory", "time_to_quality",
                     "eval_throughput", "eval_ceiling_fraction", "generation", "gen_ceiling_fraction"]
    for t in res["targets"]:
        assert t["reference"] is not None and isinstance(t["pass"], bool), t
        if t["name"].endswith("_ceiling_fraction"):  # a tiny model is a tiny fraction of any ceiling
            assert t["ours"] > 0 and t["ratio"] is not None and t["reference"] > 0, t
        elif t["name"] != "time_to_quality" or t["ours"] is not None:
            assert t["ours"] and t["ratio"] and t["ratio"] > 0, t

    peak = res["sections"]["peak"]
    native = {p for p, has in res["setup"]["native"].items() if has}  # this CPU's, measured by the bench
    assert native == {p for p in ("bf16", "fp16") if cpu_supports(p)}
    assert peak["fp32_gflops"] > 0 and peak["higher"] in ("fp32", "bf16")
    assert (peak["bf16_gflops"] > 0) if "bf16" in native else peak["bf16_gflops"] is None
    for job, matmuls in (("train", 9), ("eval", 3), ("gen", 4)):  # every matmul of the job, timed
        j = peak["jobs"][job]
        assert len(j["matmuls"]) == matmuls and set(j["ceiling_gflops"]) == {"fp32", *native, "best"}
        # "best" lets each part take its fastest precision: never below one precision throughout
        assert j["ceiling_gflops"]["best"] >= max(v for p, v in j["ceiling_gflops"].items() if p != "best")
    assert "int8" in peak["jobs"]["gen"]["matmuls"]["out_int8"]
    train = res["sections"]["train"]
    (ours,) = train["ours"]
    assert ours["variant"] == "seed" and ours["steps"] == 2 and ours["real_tokens_per_s"] > 0
    assert len(train["reference_runs"]) == 1 and train["reference_warmup_run"]["steps"] == 1
    assert ours["peak_rss_mb"] > 50 and train["reference_peak_rss_mb"] > 50  # whole processes, torch loaded
    assert res["driver_peak_rss_mb"] < 100  # the driver never imports torch

    setup = res["setup"]
    ttq = res["sections"]["ttq"]
    assert [v["step"] for v in ttq["validations"]] == [1, 2]
    assert ttq["val_targets_match"] is True and setup["val_targets"] > 0
    # the shipped config and its bf16 run (where the CPU has bf16; said and recorded where not): the
    # target takes the faster of those that reached it
    if "bf16" in native:
        assert [r["variant"] for r in ttq["variants"]] == ["fp32", "bf16"]
    else:
        assert [r["variant"] for r in ttq["variants"]] == ["fp32"]
        assert res["left_out_no_native_bf16"]["ttq_variants"] == ["bf16"]
        assert "this CPU has no native bf16" in proc.stdout
    assert ttq["best_variant"] in ("fp32", "bf16") and all(r["val_targets_match"] for r in ttq["variants"])
    assert ttq["reference_seconds_for_216_steps"] > 0

    ev = res["sections"]["eval"]
    assert ev["figures_agree"] is True, ev
    assert ev["ours"][0]["targets"] == ev["reference"][0]["targets"] == setup["val_targets"]

    gen = res["sections"]["gen"]
    assert gen["reference_median"] > 0 and gen["ours_median"] > 0

    md = out.with_suffix(".md").read_text()
    assert "| target | reference | ours | ratio | goal | pass |" in md and "Machine:" in md
    assert "== summary" in proc.stdout


def test_bench_bad_arguments(tmp_path):
    proc = _bench("--only", "train,nope", timeout=60)
    assert proc.returncode == 2 and "unknown section 'nope'" in proc.stderr
    if REFERENCE.is_file():
        proc = _bench("--only", "train", "--data", str(tmp_path), "--reference", str(REFERENCE), timeout=60)
        assert proc.returncode == 2 and "train.jsonl.gz not found" in proc.stderr
    proc = _bench("--reference", str(tmp_path / "missing.py"), timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr
    # `python -m bench` runs the same driver
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nope"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown section 'nope'" in proc.stderr


def test_bench_driver_is_torch_free():
    """The driver and what it imports stay off torch and lmcore (a child's peak RSS starts from
    the driver's): imported as the script sees them, from bench/."""
    code = ("import sys, bench; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lmcore', 'numpy')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO / "bench", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
