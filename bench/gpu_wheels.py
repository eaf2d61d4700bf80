"""What the GPU check carries to the GPU machine, and the installer that runs there.

    python bench/gpu_wheels.py prepare [DIR]      # here (bash bench/gpu_check.sh --prepare): DIR = .gpucheck
    python3 bench/gpu_wheels.py install DIR/wheels --target T --report R.json      # there, no network

The GPU machine's image (Python 3.12, torch, accelerate, torchmetrics, numpy, safetensors, pyyaml, ...)
lacks datasets, wandb and submitit, and reaches no package index. prepare makes DIR, git-ignored
and named in the device call's `carry`:
  wheels/            `pip download` of the three (the versions installed here) and their dependencies
                     for CPython 3.12 on manylinux x86-64, less those the image has (IMAGE_HAS), which
                     would take 90 of the 64 MiB a call may carry (pyarrow, numpy, pandas)
  data/              IMDB train whole (it fixes the vocabulary, hence the model's size) and every 10th
                     test review (the 2,500 the check evaluates; prepared.json says so)
  seed_reference.py  the reference (../shared does not travel)
install puts, with pip --no-index --no-deps, every wheel whose package this Python lacks into
--target, then imports each of the three with --target on PYTHONPATH; the report says what was
installed, skipped and why, and what imports. A wheel that fails, or one of the three that does
not import, is a problem of the check's result (gpu_check.py), and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LMCORE_SHARED", REPO.parent / "shared"))
WANTED = ("datasets", "wandb", "submitit")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]
# The image's packages (the device tool's KINDS.md, read 2026-11-17). One missing here is only
# carried for nothing (install skips what is installed); one wrongly here fails the import, loudly.
_IMAGE_HAS = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox
etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py
hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
IMAGE_HAS = frozenset(_IMAGE_HAS.split())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, list[str]]:
    """(package, [python-abi-platform tags]) from a wheel's file name."""
    parts = path.name.removesuffix(".whl").split("-")
    if len(parts) < 5:
        raise ValueError(f"{path.name} is not a wheel's file name")
    py, abi, plat = parts[-3:]
    return canonical(parts[0]), [f"{x}-{y}-{z}" for x in py.split(".") for y in abi.split(".")
                                 for z in plat.split(".")]


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- prepare (here) -----------------------------------------------------------------------------------
def download(folder: Path, python_version: str) -> None:
    specs = [f"{p}=={installed(p)}" if installed(p) else p for p in WANTED]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                        "--implementation", "cp", "--python-version", python_version,
                        *[f"--platform={p}" for p in PLATFORMS], "-d", tmp, *specs], check=True)
        folder.mkdir(parents=True, exist_ok=True)
        dropped = []
        for whl in sorted(Path(tmp).glob("*.whl")):
            if wheel_name(whl)[0] in IMAGE_HAS:
                dropped.append(whl.name)
            else:
                shutil.move(str(whl), folder / whl.name)
    print(f"{specs}: {len(list(folder.glob('*.whl')))} wheels in {folder}; left out (the image has them): "
          + ", ".join(dropped))


def prepare(folder: Path, shared: Path, wheels: bool, python_version: str) -> None:
    data, src = folder / "data", shared / "data" / "imdb"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "train.jsonl.gz", data / "train.jsonl.gz")
    with gzip.open(src / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = f.readlines()[::10]
    with gzip.open(data / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines)
    digest = hashlib.sha256((src / "test.jsonl.gz").read_bytes()).hexdigest()
    (data / "prepared.json").write_text(json.dumps({
        "train": str(src / "train.jsonl.gz"), "test": f"every 10th review of {src / 'test.jsonl.gz'} "
        f"(sha256 {digest}): {len(lines)} reviews", "eval_stride": 1}, indent=1) + "\n")
    shutil.copyfile(shared / "bench" / "seed_reference.py", folder / "seed_reference.py")
    if wheels:
        download(folder / "wheels", python_version)
    mib = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(f"{folder}: {mib:.1f} MiB to carry (a call carries at most 64 MiB, the working tree included)")
    if mib > 60:
        raise SystemExit(f"gpu_wheels: {folder} is {mib:.1f} MiB, too much to carry")


# -- install (there) ----------------------------------------------------------------------------------
def pip_install(wheels: list[Path], target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                           *map(str, wheels)], capture_output=True, text=True)


def importable(module: str, target: Path) -> str:
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    code = f"import {module}; print(getattr({module}, '__version__', '?'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": path})
    last = (p.stderr.strip().splitlines() or ["?"])[-1]
    return f"imports, version {p.stdout.strip()}" if p.returncode == 0 else f"does not import: {last[:300]}"


def install(folder: Path, target: Path, modules: tuple[str, ...] = WANTED) -> dict:
    """Install the wheels this Python lacks into target; the report (see the module's doc)."""
    todo, skipped = [], []
    for whl in sorted(folder.glob("*.whl")):
        present = installed(wheel_name(whl)[0])
        if present:
            skipped.append({"wheel": whl.name, "why": f"{present} is installed"})
        else:
            todo.append(whl)
    report: dict = {"wheels_folder": str(folder), "found": folder.is_dir(), "target": str(target),
                    "installed": [], "skipped": skipped, "failed": []}
    if todo:
        target.mkdir(parents=True, exist_ok=True)
        if pip_install(todo, target).returncode == 0:
            report["installed"] = [w.name for w in todo]
        else:  # one at a time, to say which
            for w in todo:
                p = pip_install([w], target)
                if p.returncode == 0:
                    report["installed"].append(w.name)
                else:
                    why = (p.stderr.strip().splitlines() or ["?"])[-1]
                    report["failed"].append({"wheel": w.name, "why": why})
    report["imports"] = {m: importable(m, target) for m in modules}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_wheels.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["prepare", "install"])
    p.add_argument("folder", nargs="?", default=str(REPO / ".gpucheck"))
    p.add_argument("--target", default="/tmp/gpucheck-site", help="install: where the wheels go")
    p.add_argument("--report", help="install: the report (JSON) here too")
    p.add_argument("--shared", default=str(SHARED), help="prepare: the folder with data/imdb and bench/")
    p.add_argument("--no-wheels", action="store_true", help="prepare: data and reference only")
    p.add_argument("--python-version", default="3.12", help="prepare: the GPU machine's Python")
    a = p.parse_args(argv)
    if a.action == "prepare":
        prepare(Path(a.folder), Path(a.shared), not a.no_wheels, a.python_version)
        return 0
    report = install(Path(a.folder), Path(a.target))
    text = json.dumps(report, indent=1)
    if a.report:
        Path(a.report).write_text(text + "\n")
    print(text)
    bad = report["failed"] or [m for m, s in report["imports"].items() if not s.startswith("imports")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
