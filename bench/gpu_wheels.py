"""What bench/gpu_check.sh carries to the GPU machine, and the installer that runs there.

    python bench/gpu_wheels.py prepare [DIR]           # here: DIR (default .gpucheck) = wheels + data + reference
    python bench/gpu_wheels.py build DIR               # here: only the wheels
    python3 bench/gpu_wheels.py install DIR --target T --report R.json    # there (no network)

The GPU machine's image (Python 3.12, torch, accelerate, torchmetrics, numpy, safetensors, pyyaml,
tqdm, ...) lacks datasets, wandb and submitit. None of the three is needed by the GPU check
(local data files, tracking.wandb_mode=disabled, no SLURM: tests/test_gpu_check.py runs the dry
run with all three blocked), so a missing or broken wheel is reported, not fatal.

build: `pip download` of the three (at the versions installed here, else the newest) and their
dependencies for CPython 3.12 on manylinux x86-64, then drops the wheels of the packages the image
already has (IMAGE_HAS, from /work/.library/device/KINDS.md as read on 2026-11-17), which would
otherwise take 90 of the 64 MiB a call may carry (pyarrow, numpy, pandas).
install: installs, with pip --no-index --no-deps into --target, only the wheels whose package is
not installed there and whose tags this interpreter takes, then imports each of the three; the
report says what was installed, skipped (and why), and what imports.

prepare also copies the data (train.jsonl.gz whole: it fixes the vocabulary, hence the model's
size; test.jsonl.gz as every 10th review, the 2,500 the check evaluates, with prepared.json saying
so, so the check evaluates it with stride 1) and the reference script into DIR.
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
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]
IMAGE_HAS = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml
regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, str, list[str]]:
    """(package, version, [python-abi-platform tags]) from a wheel's file name."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"{path.name} is not a wheel file name")
    py, abi, plat = parts[-3:]
    tags = [f"{x}-{y}-{z}" for x in py.split(".") for y in abi.split(".") for z in plat.split(".")]
    return canonical(parts[0]), parts[1], tags


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def supported_tags() -> set[str] | None:
    try:
        from packaging.tags import sys_tags
    except ImportError:
        return None  # no packaging: let pip decide
    return {str(t) for t in sys_tags()}


# -- build (here) ------------------------------------------------------------------------------------------
def build(folder: Path, python_version: str) -> dict:
    specs = [f"{p}=={installed(p)}" if installed(p) else p for p in WANTED]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", tmp, *specs]
        subprocess.run(cmd, check=True)
        folder.mkdir(parents=True, exist_ok=True)
        kept, dropped = [], []
        for whl in sorted(Path(tmp).glob("*.whl")):
            (dropped if wheel_name(whl)[0] in IMAGE_HAS else kept).append(whl.name)
            if whl.name in kept:
                shutil.move(str(whl), folder / whl.name)
    size = sum(f.stat().st_size for f in folder.glob("*.whl"))
    print(f"{len(kept)} wheels in {folder} ({size / 2**20:.1f} MiB); left out, the image has them: {', '.join(dropped)}")
    return {"specs": specs, "kept": kept, "dropped_image_has": dropped, "mib": round(size / 2**20, 1)}


def prepare(folder: Path, shared: Path, wheels: bool, python_version: str) -> None:
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    src = shared / "data" / "imdb"
    shutil.copyfile(src / "train.jsonl.gz", data / "train.jsonl.gz")
    with gzip.open(src / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = f.readlines()[::10]
    with gzip.open(data / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines)
    digest = hashlib.sha256((src / "test.jsonl.gz").read_bytes()).hexdigest()
    (data / "prepared.json").write_text(json.dumps({
        "train": f"{src / 'train.jsonl.gz'} as is", "test": f"every 10th review of {src / 'test.jsonl.gz'} "
        f"(sha256 {digest}): {len(lines)} reviews", "eval_stride": 1}, indent=1) + "\n")
    shutil.copyfile(shared / "bench" / "seed_reference.py", folder / "seed_reference.py")
    if wheels:
        build(folder / "wheels", python_version)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {size / 2**20:.1f} MiB to carry")


# -- install (there) --------------------------------------------------------------------------------------
def select(folder: Path) -> tuple[list[Path], list[dict]]:
    """The wheels to install, and those left out with the reason."""
    tags, todo, skipped = supported_tags(), [], []
    for whl in sorted(folder.glob("*.whl")):
        name, version, wtags = wheel_name(whl)
        present = installed(name)
        if present:
            skipped.append({"wheel": whl.name, "why": f"{name} {present} is installed"})
        elif tags is not None and not tags.intersection(wtags):
            skipped.append({"wheel": whl.name, "why": f"this Python ({sys.version.split()[0]}) takes none of its tags"})
        else:
            todo.append(whl)
    return todo, skipped


def pip_install(wheels: list[Path], target: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]
    return subprocess.run(cmd, capture_output=True, text=True)


def importable(module: str, target: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    code = f"import {module}; print(getattr({module}, '__version__', '?'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    last = (p.stderr.strip().splitlines() or ["?"])[-1]
    return f"imports, version {p.stdout.strip()}" if p.returncode == 0 else f"does not import: {last[:300]}"


def install(folder: Path, target: Path) -> dict:
    todo, skipped = select(folder) if folder.is_dir() else ([], [])
    report = {"wheels_folder": str(folder), "found": folder.is_dir(), "target": str(target), "installed": [],
              "skipped": skipped, "failed": []}
    if todo:
        target.mkdir(parents=True, exist_ok=True)
        if pip_install(todo, target).returncode == 0:
            report["installed"] = [w.name for w in todo]
        else:  # one at a time, to say which
            for w in todo:
                p = pip_install([w], target)
                ok = p.returncode == 0
                (report["installed"] if ok else report["failed"]).append(
                    w.name if ok else {"wheel": w.name, "why": (p.stderr.strip().splitlines() or ["?"])[-1]})
    report["imports"] = {m: importable(m, target) for m in WANTED}
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/gpu_wheels.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["prepare", "build", "install"])
    p.add_argument("folder", nargs="?", default=str(REPO / ".gpucheck"))
    p.add_argument("--target", default="/tmp/gpucheck-site", help="install: where the wheels go (on PYTHONPATH)")
    p.add_argument("--report", help="install: write the report (JSON) here too")
    p.add_argument("--shared", default=str(SHARED), help="prepare: the folder with data/imdb and bench/")
    p.add_argument("--no-wheels", action="store_true", help="prepare: data and reference only")
    p.add_argument("--python-version", default="3.12", help="build: the GPU machine's Python")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    if a.action == "prepare":
        prepare(folder, Path(a.shared), not a.no_wheels, a.python_version)
    elif a.action == "build":
        build(folder, a.python_version)
    else:
        report = install(folder, Path(a.target))
        text = json.dumps(report, indent=1)
        if a.report:
            Path(a.report).write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
