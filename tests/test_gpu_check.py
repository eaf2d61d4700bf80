"""bench/gpu_check.sh in its dry mode: the GPU check's code end to end on the CPU, against the real
reference, so that it is known to run before a GPU is lent (figures at this size mean nothing;
what is checked is that every part and unit ran, every figure is a measured number, and the
checks hold as they must on the CPU). Also the wheel installer the GPU machine runs, on wheels
made here, and the loud failures: a missing reference, no CUDA device in the real mode."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from lmcore.runtime.precision import cpu_supports
from tests.conftest import IMDB, REPO, SHARED

REFERENCE = SHARED / "bench" / "seed_reference.py"
needs_reference = pytest.mark.skipif(not REFERENCE.is_file(), reason=f"the reference {REFERENCE} is absent")


def _check(*args: str, tmp_path: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPUCHECK_SITE": str(tmp_path / "site"),
           "LMCORE_SHARED": str(SHARED), **env}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@needs_reference
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "res" / "gpu_check.json"
    proc = _check("--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["device"] == "cpu" and res["ok"] and res["problems"] == []
    assert list(res["parts"]) == ["setup", "resume", "train", "eval", "gen"]
    for name, part in res["parts"].items():
        assert part["status"] == "ok", (name, part)
        bad = {u: r for u, r in part["units"].items() if r["status"] != "ok"}
        assert not bad, (name, bad)
        assert all(r["seconds"] > 0 for r in part["units"].values()), name
    # every figure measured: a positive finite number, ours over the reference's of the same run
    plan = res["plan"]  # where the CPU has no native bf16, the bf16 parts are left out, and said
    bf16 = cpu_supports("bf16")
    assert bool(plan["left_out_no_native_bf16"]) is not bf16
    assert bf16 or "this CPU has no native bf16: the dry run leaves out" in proc.stdout
    rows = res["figures"]
    assert len(rows) == 3 + (7 if bf16 else 4) + (2 if bf16 else 1) + (3 if bf16 else 2)
    for row in rows:
        assert isinstance(row["value"], float | int) and math.isfinite(row["value"]) and row["value"] > 0, row
        assert row["ratio"] and row["ratio"] > 0, row
    units = {p: part["units"] for p, part in res["parts"].items()}
    name = "ours_bf16" if bf16 else "ours_packed_fp32"
    assert {r["value"] for r in rows if r["what"] == f"train: {name}"} == {
        units["train"][name]["real_tokens_per_s"]}
    ref = units["train"]["reference"]
    assert ref["steps"] == 2 and ref["warmup_steps_excluded"] == 1 and ref["s_per_step"] > 0
    assert units["setup"]["env"]["matmul_peak"]["fp32_tflops"] > 0
    # the checks: on the CPU resume is bit-exact and generation byte-identical across batch sizes
    checks = res["checks"]
    for c in ("resume_padded_fp32", "resume_packed_bf16_dropout")[:2 if bf16 else 1]:
        assert checks[c]["bit_exact"] is True and checks[c]["deterministic"] is True, checks[c]
    for p in ("fp32", "bf16", "int8") if bf16 else ("fp32", "int8"):
        c = checks[f"gen_{p}"]
        assert c["identical_across_batch_sizes"] is True and c["identical_run_to_run"] is True, c
        assert units["gen"][f"identity_{p}"]["batch_sizes"] == [20, 7]
    agree = checks["eval_agree"]
    assert agree["agree"] is True and agree["targets"][0] == agree["targets"][1] > 0
    # the installer ran (nothing to install here: the venv has the three) and the logs came along
    assert all(s.startswith("imports") for s in res["install"]["imports"].values()), res["install"]
    with tarfile.open(out.with_name("gpu_check_logs.tar.gz")) as tar:
        assert "logs/part-gen.err" in tar.getnames()


def _wheel(folder: Path, name: str, version: str = "0.1", broken: bool = False) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    if broken:
        path.write_bytes(b"not a zip")
        return path
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"__version__ = '{version}'\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_wheel_installer(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "bench" / "gpu_wheels.py")
    gpu_wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_wheels)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_probe")
    _wheel(wheels, "pytest", "0.0")  # installed here: skipped, never downgraded
    report = gpu_wheels.install(wheels, tmp_path / "site", modules=("gpucheck_probe",))
    assert report["installed"] == ["gpucheck_probe-0.1-py3-none-any.whl"] and not report["failed"]
    assert [s["wheel"] for s in report["skipped"]] == ["pytest-0.0-py3-none-any.whl"]
    assert report["imports"] == {"gpucheck_probe": "imports, version 0.1"}
    _wheel(wheels, "gpucheck_broken", broken=True)
    report = gpu_wheels.install(wheels, tmp_path / "site2", modules=("gpucheck_probe", "gpucheck_absent"))
    assert [f["wheel"] for f in report["failed"]] == ["gpucheck_broken-0.1-py3-none-any.whl"]
    assert report["installed"] == ["gpucheck_probe-0.1-py3-none-any.whl"]
    assert report["imports"]["gpucheck_absent"].startswith("does not import")


def test_missing_reference_fails_at_once(tmp_path):
    proc = _check("--dry-run", "--reference", str(tmp_path / "none.py"), "--out", str(tmp_path / "r.json"),
                  tmp_path=tmp_path, timeout=120)
    assert proc.returncode != 0 and "none.py" in proc.stderr and "== env" not in proc.stdout


@needs_reference
@pytest.mark.skipif(not (IMDB / "train.jsonl.gz").is_file(), reason=f"{IMDB} is absent")
def test_real_mode_without_cuda_fails_loudly(tmp_path):
    env_parts = ("--parts", "setup", "--data", str(IMDB), "--out", str(tmp_path / "r.json"))
    proc = _check(*env_parts, tmp_path=tmp_path, timeout=300, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode != 0 and "torch sees no CUDA device" in proc.stderr, proc.stderr[-2000:]
