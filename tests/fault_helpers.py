"""Helpers for the fault and bad-input suites (tests/test_faults.py, tests/test_bad_input_catalogue.py).

Real `python -m lmcore.cli ...` child processes with their output in files (a killed child
never blocks on a full pipe), seeded random fault points (the seed is printed: rerun with
LMCORE_FAULT_SEED=N), checks of the invariants that every fault must keep, and a tiny
pre-trained run shared by both modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides

SLOW = os.environ.get("LMCORE_SLOW_FAULTS", "") == "1"
slow = pytest.mark.skipif(not SLOW, reason="heavier fault variant: set LMCORE_SLOW_FAULTS=1 to run it")
LMCORE = [sys.executable, "-m", "lmcore.cli"]

# The run every fault test starts from and compares against: small, fast, and with dropout so
# that a resume must restore the RNG state, not only the weights, to be bit-identical.
TRAIN_STEPS = 60
TRAIN_EXTRA: dict[str, object] = {
    "run.threads": 1, "data.val_split": "", "model.dropout": 0.1, "train.max_steps": TRAIN_STEPS,
    "train.checkpoint_interval": 2, "train.keep_checkpoints": 2, "train.log_interval": 1,
    "tracking.wandb_mode": "disabled",
}


def train_overrides(run_dir: Path, cache: Path, **extra: object) -> list[str]:
    return tiny_overrides(run_dir, **{**TRAIN_EXTRA, "data.cache_dir": str(cache), **extra})


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **extra}
    return {k: v for k, v in env.items() if v is not None}


# -- child processes --------------------------------------------------------------------------
@dataclass
class Child:
    proc: subprocess.Popen
    out: Path
    err: Path
    t0: float  # wall clock at start: rows of metrics.jsonl newer than this are this child's

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"child {self.proc.args} did not end in {timeout} s; stderr:\n"
                                 f"{self.stderr()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stdout(self) -> str:
        return self.out.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")


def start(args: list[str], logs: Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> Child:
    """`python -m lmcore.cli ARGS` (or another argv when args[0] is an executable path)."""
    logs.mkdir(parents=True, exist_ok=True)
    argv = args if args and args[0] == sys.executable else [*LMCORE, *args]
    out, err = logs / "stdout", logs / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(argv, cwd=cwd, env=env or child_env(), stdout=o, stderr=e)
    return Child(proc, out, err, time.time())


def wait_until(condition: Callable[[], bool], child: Child | None, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child is not None and child.poll() is not None:
            raise AssertionError(f"the child ended (exit {child.poll()}) before {what}; stderr:\n"
                                 f"{child.stderr()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def fault_seed(what: str) -> int:
    raw = os.environ.get("LMCORE_FAULT_SEED", "")
    seed = int(raw) if raw else random.SystemRandom().randrange(1 << 32)
    print(f"{what}: fault seed {seed} (rerun with LMCORE_FAULT_SEED={seed})")
    return seed


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what must hold after every fault -----------------------------------------------------------
def metrics_rows(run: Path, since: float = 0.0) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    from lmcore.track.metrics import read_metrics

    return [r for r in read_metrics(path, tolerant=True) if r.get("time", 0) >= since]


def checkpoint_steps(run: Path, debris: list[str] | None = None) -> list[int]:
    """The run's published checkpoints, oldest first, after checking that every one of them
    verifies (sha256 of every file against its manifest), that nothing half-written has been
    published, and that the checkpoint a resume would pick is the newest one.

    With a `debris` list, step folders OLDER than the newest good checkpoint that are incomplete
    (what a kill in the middle of pruning leaves) are appended to it instead of failing at once,
    so that a test can go on to check the rest and report them at the end."""
    from lmcore.checkpoint import Checkpoint, find_latest
    from lmcore.rundir import RunDir, step_dir_name

    root = run / "checkpoints"
    if not root.is_dir():
        return []
    steps, broken = [], []
    for p in sorted(root.iterdir()):
        if not re.fullmatch(r"step_\d{8}", p.name):
            continue  # not a published checkpoint (e.g. an unfinished write of a killed job): never listed
        assert p.is_dir(), f"{p} is not a folder"
        try:
            Checkpoint.open(p)
            steps.append(int(p.name[5:]))
        except Exception as e:  # noqa: BLE001 - the message is the finding
            broken.append((int(p.name[5:]), f"step folder {p.name} is incomplete ({e}); it holds "
                                             f"{sorted(f.name for f in p.iterdir())}"))
    for step, why in broken:
        if debris is None or not steps or step > steps[-1]:
            listing = {q.name: sorted(f.name for f in q.iterdir()) for q in sorted(root.iterdir())}
            raise AssertionError(f"published checkpoint folder that does not verify: {why}; checkpoints/ "
                                 f"holds {listing}")
        debris.append(why)
    if steps:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning here would mean a damaged checkpoint is listed
            assert find_latest(RunDir(run)).checkpoint.path == root / step_dir_name(steps[-1])
    return steps


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    import torch

    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb), (a, b)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{a} and {b} differ in {different}"


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Bit-identical weights and optimizer state, same data position and counters."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(a / name, b / name)
    sa, sb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    for s in (sa, sb):
        s.pop("train_seconds")
    assert sa == sb


def tree(folder: Path, exclude: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file and folder under folder: sha256 of files, 'dir' for folders; a dangling symlink, a
    FIFO or a device is named by its kind (a FIFO is never opened: that would block)."""
    out: dict[str, str] = {}
    if not folder.exists():
        return out
    for p in sorted(folder.rglob("*")):
        if any(p == x or x in p.parents for x in exclude):
            continue
        key = str(p.relative_to(folder))
        if p.is_dir():
            out[key] = "dir"
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = f"link to {os.readlink(p)}" if p.is_symlink() else f"special {p.stat().st_mode:o}"
    return out


def tree_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return ([f"new: {k}" for k in after if k not in before] + [f"gone: {k}" for k in before if k not in after]
            + [f"changed: {k}" for k in before if k in after and before[k] != after[k]])


# -- a payload that runs code when unpickled ---------------------------------------------------------
class PickleBomb:
    """Creates `marker` when unpickled (through __reduce__: os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def malicious_pickle(marker: Path) -> bytes:
    """Pickle bytes that create `marker` when loaded (pickle.load, torch.load(weights_only=False))."""
    return pickle.dumps({"state_dict": {"weight": PickleBomb(marker)}}, protocol=4)


def malicious_torch_file(marker: Path, path: Path) -> None:
    """A torch.save zip file holding the same payload (what a `.pt`/`.bin` checkpoint looks like)."""
    import torch

    torch.save({"model": PickleBomb(marker)}, str(path))


def assert_payload_is_live(path: Path, marker: Path, loader: str = "pickle") -> None:
    """Prove the crafted file does run code when unpickled (in a throwaway process)."""
    code = {"pickle": "import pickle,sys; pickle.load(open(sys.argv[1],'rb'))",
            "torch": "import torch,sys; torch.load(sys.argv[1], weights_only=False)"}[loader]
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120)
    assert marker.exists(), f"the crafted {loader} file {path} does not run code: the test proves nothing"
    marker.unlink()


def replace_in_checkpoint(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file AND its manifest entry, as someone who can write the folder
    could: only the loader itself stands between the bytes and the process."""
    f = ckpt / name
    f.write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


# -- the shared pre-trained run ---------------------------------------------------------------------
_BUILT: dict[str, Path] = {}


def reference_run(tmp_path_factory) -> Path:
    """A run trained in this process, uninterrupted, to TRAIN_STEPS (its last two checkpoints kept),
    built once per session; tests copy it, never change it. Its data cache is
    REF/cache (pass it as data.cache_dir so children reuse it)."""
    if "ref" not in _BUILT:
        import torch

        from lmcore.config import load_config
        from lmcore.trainer import train

        root = tmp_path_factory.mktemp("fault-ref")
        threads = torch.get_num_threads()
        try:
            train(load_config(None, train_overrides(root / "run", root / "cache")), progress=False)
        finally:
            torch.set_num_threads(threads)
        _BUILT["ref"] = root
    return _BUILT["ref"]


def final_checkpoint(ref_root: Path) -> Path:
    return ref_root / "run" / "checkpoints" / f"step_{TRAIN_STEPS:08d}"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def prompts_file(path: Path, n: int) -> Path:
    """n JSONL prompts of 0 to 8 words from the sample corpus, string and integer ids."""
    from lmcore.data.sample_corpus import sample_reviews

    texts = [r["text"] for r in sample_reviews("test", 200)]
    rows = [{"id": f"p{i}" if i % 3 else i, "prompt": " ".join(texts[i % 200].split()[: i % 9])}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def check_chunks(out: Path, chunk_size: int, records: int, samples: int) -> set[int]:
    """Every chunk file present is complete and holds exactly its own rows, in order."""
    from lmcore.gen.folder import CHUNKS_DIR, done_chunks

    done = done_chunks(out)
    for c in done:
        path = out / CHUNKS_DIR / f"chunk-{c:08d}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        first, last = c * chunk_size, min(records, (c + 1) * chunk_size)
        expected = [(i, s) for i in range(first, last) for s in range(samples)]
        assert [(r["index"], r["sample"]) for r in rows] == expected, f"{path} is incomplete or foreign"
    for p in (out / CHUNKS_DIR).iterdir() if (out / CHUNKS_DIR).is_dir() else []:
        assert p.name.startswith("chunk-") or (p.name.startswith(".chunk-") and p.name.endswith(".tmp")), p
    return done
