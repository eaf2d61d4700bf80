"""Faults: nothing is lost, nothing half-written is ever used, nothing runs that should not.

Real `lmcore` child processes are killed (SIGKILL) at random points drawn from a seeded RNG
(the seed is printed; rerun with LMCORE_FAULT_SEED=N), stopped with the scheduler's signals,
fed damaged checkpoints, full disks, diverging losses and malicious pickles, and run twice
at once on one folder. After every fault the run or output folder must still satisfy its
invariants, and the finished job must equal an uninterrupted one bit for bit.

Heavier variants (more kills, packed batching, a real tmpfs, DDP resume) run with
LMCORE_SLOW_FAULTS=1. Shared helpers: tests/fault_helpers.py.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from lmcore import checkpoint as ckpt_io
from lmcore.checkpoint import Checkpoint, find_latest
from lmcore.rundir import RunDir, step_dir_name
from tests.conftest import REPO, tiny_overrides
from tests.fault_helpers import (
    LMCORE,
    SLOW,
    TRAIN_STEPS,
    Child,
    PickleBomb,
    assert_payload_is_live,
    assert_same_checkpoint,
    check_chunks,
    checkpoint_steps,
    child_env,
    copy_run,
    fault_seed,
    final_checkpoint,
    free_port,
    malicious_pickle,
    malicious_torch_file,
    metrics_rows,
    prompts_file,
    reference_run,
    slow,
    start,
    train_overrides,
    tree,
    wait_until,
)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """REF/run: the uninterrupted reference run (its last two checkpoints); REF/cache: its data cache."""
    return reference_run(tmp_path_factory)


def train_args(run: Path, ref: Path, **extra: object) -> list[str]:
    return ["train", *train_overrides(run, ref / "cache", **extra)]


def trained_steps(run: Path, since: float) -> int:
    return max((r["step"] for r in metrics_rows(run, since) if "train/loss" in r), default=0)


def last_json(text: str) -> dict:
    lines = [x for x in text.splitlines() if x.startswith("{")]
    assert lines, f"no JSON summary in:\n{text}"
    return json.loads(lines[-1])


PROGRESS = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # a job's plain progress lines (log files)


def one_line_error(child_or_proc, *names: str) -> str:
    """Exit 2, no traceback, and exactly one stderr line 'lmcore: error: ...' naming `names`: the
    last one, after nothing but the job's own progress lines."""
    if isinstance(child_or_proc, Child):
        rc, out, err = child_or_proc.poll(), child_or_proc.stdout(), child_or_proc.stderr()
    else:
        rc, out, err = child_or_proc.returncode, child_or_proc.stdout, child_or_proc.stderr
    return check_error_output(rc, out, err, *names)


def check_error_output(rc, out: str, err: str, *names: str) -> str:
    assert "Traceback" not in out + err, f"a traceback instead of one line:\n{err[-4000:]}"
    assert rc == 2, f"exit status {rc}, not 2; stderr:\n{err[-3000:]}"
    lines = [x for x in err.splitlines() if not PROGRESS.match(x)]
    assert len(lines) == 1 and lines[0].startswith("lmcore: error: "), f"not one error line:\n{err[-3000:]}"
    assert err.splitlines()[-1] == lines[0], f"the error is not the last line:\n{err[-3000:]}"
    assert out == "", f"a failed job printed a result: {out[-1000:]}"
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


# == 1. kills ======================================================================================
def _interrupt_training(run: Path, ref: Path, tmp_path: Path, rng: random.Random, kills: int, seed: int,
                        **extra: object) -> list[str]:
    """SIGKILL a training child `kills` times at random points; check the folder after each."""
    args = train_args(run, ref, **extra)
    story, newest_before, debris = [], 0, []
    for k in range(kills):
        resume_at = max(checkpoint_steps(run, debris), default=0)
        more, delay = rng.randint(1, 5), rng.uniform(0.0, 0.06)
        child = start(args, tmp_path / f"kill{k}")
        wait_until(lambda c=child, t=resume_at + more: trained_steps(run, c.t0) >= t, child,
                   f"kill {k}: step {resume_at + more}")
        time.sleep(delay)
        child.kill()
        assert child.proc.returncode == -signal.SIGKILL, (
            f"kill {k} (seed {seed}) came after the run had finished: make the run longer")
        steps = checkpoint_steps(run, debris)  # every published checkpoint verifies, the newest is picked
        newest = max(steps, default=0)
        reported = [r["step"] for r in metrics_rows(run, child.t0) if r.get("event") == "checkpoint"]
        assert newest >= max(reported, default=0), (
            f"kill {k} (seed {seed}): the job reported checkpoint {max(reported)} written, the newest "
            f"left is {newest}")
        assert newest >= newest_before, f"kill {k} (seed {seed}): checkpoint {newest_before} was lost"
        newest_before = newest
        story.append(f"kill {k}: resumed at {resume_at}, killed {delay:.2f} s after step {resume_at + more}, "
                     f"reached {trained_steps(run, child.t0)}, checkpoints {steps}")
    return story, debris


def test_training_killed_five_times_stopped_once_and_damaged_still_ends_bit_identical(ref, tmp_path):
    seed = fault_seed("training kills")
    rng = random.Random(seed)
    run = tmp_path / "run"
    story, debris = _interrupt_training(run, ref, tmp_path, rng, kills=5, seed=seed)

    # Then the scheduler's warning signal, at a random point: one stop, at one step, with a
    # checkpoint there, and exit status 3 (what the sbatch wrapper requeues on).
    resume_at = max(checkpoint_steps(run, debris), default=0)
    child = start(train_args(run, ref), tmp_path / "usr2")
    wait_until(lambda: trained_steps(run, child.t0) >= resume_at + 1, child, "a step after resuming")
    time.sleep(rng.uniform(0.0, 0.05))
    child.proc.send_signal(signal.SIGUSR2)
    assert child.wait() == 3, child.stderr()[-3000:]
    summary = last_json(child.stdout())
    assert summary["stopped_early"] and summary["step"] < TRAIN_STEPS
    assert child.stderr().count("received SIGUSR2") == 1
    assert max(checkpoint_steps(run, debris)) == summary["step"]
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert state["step"] == summary["step"]
    story.append(f"SIGUSR2: stopped at {summary['step']}")

    # And the newest checkpoint gets damaged (a truncated file): the last run warns in one line,
    # resumes from the one before, and still ends bit-identical.
    damaged = run / "checkpoints" / step_dir_name(summary["step"])
    _truncate(damaged / "model.safetensors")
    final = start(train_args(run, ref), tmp_path / "final")
    assert final.wait() == 0, final.stderr()[-3000:]
    warning = [x for x in final.stderr().splitlines() if x.startswith("lmcore: warning:")]
    assert len(warning) == 1 and "skipping damaged checkpoint" in warning[0] and damaged.name in warning[0]
    assert "fails its checksum" in warning[0] and f"resumed from {damaged.parent}" in final.stderr()
    assert f"resumed from {damaged}" not in final.stderr()
    assert last_json(final.stdout())["step"] == TRAIN_STEPS
    assert checkpoint_steps(run, debris)[-1] == TRAIN_STEPS
    assert_same_checkpoint(run / "checkpoints" / f"step_{TRAIN_STEPS:08d}", final_checkpoint(ref))
    steps = [r["step"] for r in metrics_rows(run) if "train/loss" in r]
    assert steps == list(range(1, TRAIN_STEPS + 1)), "metrics.jsonl repeats or misses steps:\n" + "\n".join(
        story)
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir()
                       if p.name.startswith(".tmp-") or not (p / "manifest.json").is_file())
    # A kill while an old checkpoint is being pruned leaves a half-deleted step folder; one that has
    # lost its manifest is never listed again, so never pruned again: it stays on disk for good.
    assert not debris and not leftovers, (
        f"seed {seed}: a kill in the middle of pruning left half-deleted checkpoint folders (listed ones "
        f"fail their checksums until pruned again; unlisted ones stay for good): left at the end "
        f"{leftovers}; seen after the kills: {sorted(set(debris))}")


def test_a_burst_of_stop_signals_still_ends_in_one_checkpoint_and_the_requeue_status(ref, tmp_path):
    """The warning signal can come twice (`scancel --signal=USR2 --full` reaches a rank directly and
    through the sbatch script's forwarding; submitit's interrupt sends TERM, then USR2). The second
    one must not kill a job that is already stopping: once the stop checkpoint is written and the
    job is on its way out, a stop signal that arrives must not turn exit status 3 into 'killed by
    SIGUSR2', which the wrapper would not requeue."""
    run = copy_run(ref / "run", tmp_path / "run")
    child = start([*train_args(run, ref, **{"train.max_steps": 100000}), "--no-progress"], tmp_path / "logs")
    wait_until(lambda: trained_steps(run, child.t0) >= TRAIN_STEPS + 2, child, "two steps")
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        child.proc.send_signal(signal.SIGUSR2)  # a burst, until the job has ended
        time.sleep(0.002)
    code = child.wait()
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    assert code == 3, f"{how}, not exit status 3; stderr:\n{child.stderr()[-2000:]}"
    summary = last_json(child.stdout())
    assert summary["stopped_early"] and max(checkpoint_steps(run)) == summary["step"]
    assert child.stderr().count("received SIGUSR2") == 1


@slow
def test_training_killed_at_many_random_points_packed_two_layers_ends_bit_identical(tmp_path):
    """Packed batches carry the LSTM state across windows: it must survive every kill too."""
    from lmcore.config import load_config
    from lmcore.trainer import train

    seed = fault_seed("packed training kills")
    rng = random.Random(seed)
    extra = {"data.batching": "packed", "data.seq_len": 24, "model.num_layers": 2, "train.max_steps": 70,
             "train.checkpoint_interval": 3, "train.keep_checkpoints": 3}
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    train(load_config(None, train_overrides(straight, cache, **extra)), progress=False)
    run = tmp_path / "run"
    root = tmp_path
    (root / "cache").mkdir(exist_ok=True)
    _, debris = _interrupt_training(run, root, tmp_path, rng, kills=12, seed=seed, **extra)
    final = start(["train", *train_overrides(run, cache, **extra)], tmp_path / "final")
    assert final.wait() == 0, final.stderr()[-3000:]
    assert_same_checkpoint(run / "checkpoints/step_00000070", straight / "checkpoints/step_00000070")
    assert not debris, f"seed {seed}: half-deleted checkpoint folders: {sorted(set(debris))}"


GEN = {"max_new_tokens": 16, "chunk_size": 6, "batch_size": 8, "temperature": 0.9, "top_p": 0.95}


def gen_overrides(run: Path, out: Path, prompts: Path, **g: object) -> list[str]:
    values = {**GEN, "prompts": prompts, "output_dir": out, **g}
    return [f"run.dir={run}", "run.threads=1", "tracking.wandb_mode=disabled",
            *[f"generate.{k}={v}" for k, v in values.items()]]


def generate_in_process(overrides: list[str]) -> Path:
    import torch

    from lmcore.config import load_config
    from lmcore.gen.folder import MERGED_FILE
    from lmcore.gen.job import generate_shard
    from lmcore.gen.merge import merge_outputs

    threads = torch.get_num_threads()
    try:
        cfg = load_config(None, overrides)
        assert generate_shard(cfg, progress=False)["complete"]
        merge_outputs(cfg)
    finally:
        torch.set_num_threads(threads)
    return Path(cfg.generate.output_dir) / MERGED_FILE


GEN_PROMPTS = 600


@pytest.fixture(scope="module")
def gen_ref(ref, tmp_path_factory) -> tuple[Path, Path]:
    """(prompts file, merged output) of one uninterrupted in-process job with another batch size."""
    root = tmp_path_factory.mktemp("gen-ref")
    prompts = prompts_file(root / "p.jsonl", GEN_PROMPTS)
    return prompts, generate_in_process(gen_overrides(ref / "run", root / "out", prompts, batch_size=32))


def test_generation_killed_three_times_merges_to_the_uninterrupted_output(ref, gen_ref, tmp_path):
    from lmcore.gen.folder import MERGED_FILE, done_chunks

    seed = fault_seed("generation kills")
    rng = random.Random(seed)
    n = GEN_PROMPTS
    prompts, reference = gen_ref
    out = tmp_path / "out"
    args = ["generate", *gen_overrides(ref / "run", out, prompts)]
    done: set[int] = set()
    for k in range(3):
        more, delay = rng.randint(1, 8), rng.uniform(0.0, 0.05)
        child = start(args, tmp_path / f"kill{k}")
        wait_until(lambda t=len(done) + more: len(done_chunks(out)) >= t, child,
                   f"kill {k}: chunk {len(done) + more}")
        time.sleep(delay)
        child.kill()
        assert child.proc.returncode == -signal.SIGKILL, f"kill {k} (seed {seed}) came after the job finished"
        now = check_chunks(out, GEN["chunk_size"], n, 1)  # every chunk file complete and its own
        assert done <= now, f"kill {k} (seed {seed}): finished chunks disappeared: {sorted(done - now)}"
        done = now
    final = start(args, tmp_path / "final")
    assert final.wait() == 0, final.stderr()[-3000:]
    summary = last_json(final.stdout())
    assert summary["complete"] and summary["chunks_done_before"] == len(done)
    assert (out / MERGED_FILE).read_bytes() == reference.read_bytes(), f"seed {seed}"
    rows = [json.loads(x) for x in (out / MERGED_FILE).read_text(encoding="utf-8").splitlines()]
    given = [json.loads(x)["id"] for x in prompts.read_text(encoding="utf-8").splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n and ids == given  # 0 duplicates, 0 missing, input order


# == 2. stop signals under DDP =========================================================================
def _start_ranks(args: list[str], logs: Path, port: int) -> list[Child]:
    """Two ranks as srun starts them: one process each, rank variables in the environment
    (torchrun would hide each rank's own exit status behind its own)."""
    ranks = []
    for r in (0, 1):
        env = child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ranks.append(start(args, logs / f"rank{r}", env=env))
    return ranks


@pytest.mark.parametrize("sig, target", [(signal.SIGUSR2, 1), (signal.SIGTERM, 0)],
                         ids=["USR2-to-rank1", "TERM-to-rank0"])
def test_a_stop_signal_to_one_ddp_rank_stops_both_at_one_step_with_one_checkpoint(ref, tmp_path, sig, target):
    if sig == signal.SIGTERM and not SLOW:
        pytest.skip("the SIGTERM-to-rank-0 variant is heavier: set LMCORE_SLOW_FAULTS=1")
    run = tmp_path / "run"
    ranks = _start_ranks(train_args(run, ref, **{"train.max_steps": 100000, "train.checkpoint_interval": 7}),
                         tmp_path, free_port())
    try:
        wait_until(lambda: trained_steps(run, ranks[0].t0) >= 3, ranks[0], "3 steps on 2 ranks")
        ranks[target].proc.send_signal(sig)
        codes = [c.wait(timeout=120) for c in ranks]
    finally:
        for c in ranks:
            c.kill()
    assert codes == [3, 3], f"exit statuses {codes}; stderr:\n" + "\n".join(c.stderr()[-1500:] for c in ranks)
    summary = last_json(ranks[0].stdout())
    assert ranks[1].stdout() == ""  # rank 0 alone reports
    step = summary["step"]
    assert summary["stopped_early"] and max(checkpoint_steps(run)) == step
    ckpt = Path(summary["checkpoint"])
    # Both ranks wrote their state into the SAME step's folder: had they stopped at different
    # steps, rank 1's file would be in another (never published) folder.
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"rank_00000.safetensors", "rank_00001.safetensors"} <= set(listed)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (step, 2)
    assert f"received {sig.name}" in ranks[target].stderr()
    assert "received" not in ranks[1 - target].stderr()
    assert not list((run / "checkpoints").glob(".tmp-*"))


@slow
def test_two_rank_stop_and_resume_equals_a_straight_two_rank_run(ref, tmp_path):
    extra = {"train.max_steps": 24, "train.checkpoint_interval": 5}
    straight = tmp_path / "straight"
    for c in _start_ranks(train_args(straight, ref, **extra), tmp_path / "s", free_port()):
        assert c.wait() == 0, c.stderr()[-2000:]
    run = tmp_path / "run"
    ranks = _start_ranks(train_args(run, ref, **extra), tmp_path / "a", free_port())
    wait_until(lambda: trained_steps(run, ranks[0].t0) >= 8, ranks[0], "8 steps")
    ranks[1].proc.send_signal(signal.SIGUSR2)
    assert [c.wait() for c in ranks] == [3, 3]
    for c in _start_ranks(train_args(run, ref, **extra), tmp_path / "b", free_port()):
        assert c.wait() == 0, c.stderr()[-2000:]
    assert_same_checkpoint(run / "checkpoints/step_00000024", straight / "checkpoints/step_00000024")


@pytest.mark.parametrize("fate", ["killed", "hung"])
def test_a_rank_whose_node_dies_or_hangs_ends_the_other_rank_clearly_within_the_collective_timeout(
        ref, tmp_path, fate):
    """A dead node (its processes gone: the connection resets) or a hung one (SIGSTOP: nothing
    answers) must not leave rank 0 waiting until the time limit: it exits 2 with one line that
    names the other rank's host, keeping the last checkpoint."""
    run = tmp_path / "run"
    args = train_args(run, ref, **{"train.max_steps": 100000, "train.checkpoint_interval": 5,
                                   "run.collective_timeout_s": 10})
    ranks = _start_ranks(args, tmp_path, free_port())
    try:
        wait_until(lambda: trained_steps(run, ranks[0].t0) >= 6, ranks[0], "6 steps on 2 ranks")
        ranks[1].proc.send_signal(signal.SIGKILL if fate == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        code = ranks[0].wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for c in ranks:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGCONT)
            c.kill()
    err = ranks[0].stderr()
    assert code == 2, f"exit {code}:\n{err[-2000:]}"
    lines = [x for x in err.splitlines() if x.startswith("lmcore: error:")]
    assert len(lines) == 1 and "lost contact with the other ranks" in lines[0], err[-2000:]
    assert os.uname().nodename in lines[0] and "resume" in lines[0]
    assert "Traceback" not in err
    assert waited < 10 + 60, f"rank 0 took {waited:.0f} s to give up"
    assert max(checkpoint_steps(run)) >= 5 and not list((run / "checkpoints").glob(".tmp-*"))

# == 3. corruption ===================================================================================
def _flip(path: Path, at: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _manifest(edit):
    def damage(ckpt: Path) -> None:
        m = json.loads((ckpt / "manifest.json").read_text())
        (ckpt / "manifest.json").write_text(json.dumps(edit(m)))
    return damage


DAMAGE = {
    "truncated-model": lambda c: _truncate(c / "model.safetensors"),
    "bit-flipped-model": lambda c: _flip(c / "model.safetensors"),
    "bit-flipped-optimizer": lambda c: _flip(c / "optimizer.safetensors", 100),
    "truncated-trainer-state": lambda c: _truncate(c / "trainer_state.json"),
    "missing-rank-file": lambda c: (c / "rank_00000.safetensors").unlink(),
    "empty-model-file": lambda c: (c / "model.safetensors").write_bytes(b""),
    "truncated-manifest": lambda c: _truncate(c / "manifest.json"),
    "empty-manifest": lambda c: (c / "manifest.json").write_bytes(b""),
    "manifest-bit-flip-in-a-checksum": _manifest(
        lambda m: {**m, "files": {**m["files"], "model.safetensors": {
            **m["files"]["model.safetensors"],
            "sha256": ("0" if m["files"]["model.safetensors"]["sha256"][0] != "0" else "1")
            + m["files"]["model.safetensors"]["sha256"][1:]}}}),
    "manifest-is-a-json-list": lambda c: (c / "manifest.json").write_text("[1, 2]"),
    "manifest-without-files": _manifest(lambda m: {k: v for k, v in m.items() if k != "files"}),
    "manifest-files-not-a-mapping": _manifest(lambda m: {**m, "files": ["model.safetensors"]}),
}


@pytest.mark.parametrize("kind", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_for_the_previous_one(ref, tmp_path, kind):
    run = copy_run(ref / "run", tmp_path / "run")
    newest, previous = (run / "checkpoints" / step_dir_name(s) for s in (TRAIN_STEPS, TRAIN_STEPS - 2))
    DAMAGE[kind](newest)
    with pytest.raises(ckpt_io.CheckpointError):
        Checkpoint.open(newest)
    latest = find_latest(RunDir(run))  # what a resume picks, and why
    assert latest.checkpoint.path == previous and latest.count == 2
    assert len(latest.problems) == 1 and newest.name in latest.problems[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt_io.resolve(run).path == previous  # what eval and generate pick
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and all("skipping damaged checkpoint" in m and newest.name in m
                                      and "\n" not in m for m in messages), messages


def test_a_damaged_newer_checkpoint_never_gets_the_new_checkpoints_pruned(ref, tmp_path):
    """Resuming past a damaged checkpoint writes new ones with lower step numbers; pruning by
    name then keeps the damaged folder and deletes the good ones, the one just written included."""
    from lmcore.config import load_config
    from lmcore.trainer import train

    run = copy_run(ref / "run", tmp_path / "run")
    _flip(run / "checkpoints" / step_dir_name(TRAIN_STEPS) / "model.safetensors")
    cfg = load_config(None, train_overrides(run, ref / "cache", **{"train.max_steps": TRAIN_STEPS - 1,
                                                                     "train.keep_checkpoints": 1}))
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        result = train(cfg, progress=False)
    assert result.step == TRAIN_STEPS - 1
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert result.checkpoint.is_dir(), (
        f"the run reports {result.checkpoint.name} but pruning deleted it; left: {left}")
    Checkpoint.open(result.checkpoint)
    assert find_latest(RunDir(run)).checkpoint.path == result.checkpoint


def test_a_prune_killed_midway_leaves_no_step_folder_behind_for_good(ref, tmp_path, monkeypatch):
    """rmtree deletes an old checkpoint file by file, in directory order: a kill after the manifest
    went leaves a step folder that is never listed again, so never pruned again (on disk for good),
    and one killed before it went leaves a listed checkpoint that fails its checksums.
    Simulated: the deletion stops (the job dies) once the manifest and one more file are gone."""
    from lmcore.config import load_config
    from lmcore.trainer import train

    class Killed(BaseException):
        pass

    real_rmtree = shutil.rmtree

    def rmtree_killed_midway(path, *args, **kwargs):
        path = Path(path)
        in_checkpoints = path.parent.name == "checkpoints"
        if "step_" in path.name and in_checkpoints and (path / "model.safetensors").exists():
            (path / "manifest.json").unlink(missing_ok=True)
            (path / "model.safetensors").unlink()
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    run = copy_run(ref / "run", tmp_path / "run")
    overrides = train_overrides(run, ref / "cache", **{"train.max_steps": TRAIN_STEPS + 2})
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", rmtree_killed_midway)
    with contextlib.suppress(Killed):  # step 62 written, then the deletion of step 58 dies midway
        train(load_config(None, overrides), progress=False)
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", real_rmtree)
    # The requeued job finishes the run (and prunes as it goes).
    overrides = train_overrides(run, ref / "cache", **{"train.max_steps": TRAIN_STEPS + 6})
    assert train(load_config(None, overrides), progress=False).step == TRAIN_STEPS + 6
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == [step_dir_name(TRAIN_STEPS + s) for s in (4, 6)], f"left in checkpoints/: {left}"


def _cache_entry(cache: Path, kind: str) -> Path:
    found = sorted(cache.glob(f"{kind}/*"))
    assert found, f"no {kind} cache entry under {cache}"
    return found[0]


def _poison_npy(path: Path, marker: Path) -> None:
    """An object array: numpy stores it as a pickle, which np.load(allow_pickle=True) would run."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, np.array([PickleBomb(marker)], dtype=object), allow_pickle=True)


CACHE_DAMAGE = {
    "truncated-tokenizer": ("tokenizers", lambda e, m: _truncate(e / "tokenizer.json")),
    "truncated-token-ids": ("splits", lambda e, m: _truncate(e / "tokens.npy")),
    "pickled-offsets": ("splits", lambda e, m: _poison_npy(e / "offsets.npy", m)),
}


@pytest.mark.parametrize("kind", CACHE_DAMAGE, ids=list(CACHE_DAMAGE))
def test_a_damaged_data_cache_entry_is_rebuilt_not_trusted_nor_fatal(ref, tmp_path, kind):
    """The token cache is ours, not the user's: a damaged entry is rebuilt (as load_split
    already does for token ids), never unpickled, and never a dead end the user must debug."""
    from lmcore.config import load_config
    from lmcore.trainer import train

    cache = tmp_path / "cache"
    shutil.copytree(ref / "cache", cache)
    sub, damage = CACHE_DAMAGE[kind]
    marker = tmp_path / "PWNED"
    damage(_cache_entry(cache, sub), marker)
    result = train(load_config(None, train_overrides(tmp_path / "run", cache, **{"train.max_steps": 4})),
                   progress=False)
    assert result.step == 4
    assert not marker.exists(), "a cached .npy was unpickled"
    ref_model = json.loads((final_checkpoint(ref) / "manifest.json").read_text())["architecture"]
    assert json.loads((result.checkpoint / "manifest.json").read_text())["architecture"] == ref_model


# == 4. full disk =====================================================================================
def _cli_in_process(argv: list[str], capsys) -> tuple[int | str, str, str]:
    """lmcore.cli.main in this process: (exit status or 'uncaught ExcType: msg', stdout, stderr)."""
    from lmcore.cli import main

    try:
        main(argv)
        code: int | str = 0
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # noqa: BLE001 - what the user would get is the finding
        code = f"uncaught {type(e).__name__}: {e} (the user gets a traceback)"
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _fail_midway(real_write, fail_when):
    """An atomic writer that, for the files fail_when(path) picks, gets half the bytes onto the
    disk and then hits ENOSPC, as a full disk does."""
    from lmcore.fileio import atomic_write

    def write(path, data):
        if fail_when(Path(path)):
            def half(f):
                f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

            return atomic_write(path, half)
        return real_write(path, data)
    return write


def test_a_chunk_write_that_fails_midway_keeps_the_finished_chunks_and_says_so(ref, tmp_path, monkeypatch,
                                                                               capsys):
    import lmcore.fileio as fileio

    prompts = prompts_file(tmp_path / "p.jsonl", 36)
    reference = generate_in_process(gen_overrides(ref / "run", tmp_path / "straight", prompts))
    out = tmp_path / "out"
    argv = ["generate", *gen_overrides(ref / "run", out, prompts)]
    written: list[str] = []

    def fourth_chunk(path: Path) -> bool:
        if path.parent.name == "chunks":
            written.append(path.name)
        return len(written) == 4 and path.name == written[-1]

    monkeypatch.setattr(fileio, "atomic_write_bytes", _fail_midway(fileio.atomic_write_bytes, fourth_chunk))
    before = {p.name: p.read_bytes() for p in (tmp_path / "straight" / "chunks").iterdir()}
    code, stdout, stderr = _cli_in_process(argv, capsys)
    finished = sorted(p.name for p in (out / "chunks").iterdir())
    assert finished == written[:3], f"chunk files after the failure: {finished}"
    for name in finished:
        assert (out / "chunks" / name).read_bytes() == before[name]
    assert code == 2, f"a full disk while writing a chunk: {code}"
    check_error_output(code, stdout, stderr, "No space left on device", written[3])
    monkeypatch.undo()
    code, stdout, stderr = _cli_in_process(argv, capsys)  # space freed: the same command finishes
    assert code == 0, stderr
    assert last_json(stdout)["chunks_done_before"] == 3
    assert (out / "generations.jsonl").read_bytes() == reference.read_bytes()


def test_a_merge_that_fails_midway_keeps_the_chunks_and_says_so(ref, tmp_path, monkeypatch, capsys):
    import lmcore.fileio as fileio

    prompts = prompts_file(tmp_path / "p.jsonl", 20)
    overrides = gen_overrides(ref / "run", tmp_path / "out", prompts)
    reference = generate_in_process(overrides)
    merged_bytes = reference.read_bytes()
    reference.unlink()
    (tmp_path / "out" / "manifest.json").unlink()
    chunks = tree(tmp_path / "out" / "chunks")
    real = fileio.atomic_write

    def atomic_write(path, write):
        if Path(path).name == "generations.jsonl":
            def half(f):
                write(f)
                f.flush()
                f.truncate(len(merged_bytes) // 2)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, half)
        return real(path, write)

    monkeypatch.setattr(fileio, "atomic_write", atomic_write)
    code, stdout, stderr = _cli_in_process(["generate", "--merge", *overrides], capsys)
    assert tree(tmp_path / "out" / "chunks") == chunks
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "chunks", "params.json"]  # no generations.jsonl, no manifest
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")], "the half-written merge was left behind"
    assert code == 2, f"a full disk while merging: {code}"
    check_error_output(code, stdout, stderr, "No space left on device", "generations.jsonl")
    monkeypatch.undo()
    code, stdout, stderr = _cli_in_process(["generate", "--merge", *overrides], capsys)
    assert code == 0, stderr
    assert (tmp_path / "out" / "generations.jsonl").read_bytes() == merged_bytes


def _tmpfs(mountpoint: Path, size: str):
    if not SLOW:
        pytest.skip("real tmpfs variant: set LMCORE_SLOW_FAULTS=1")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real tmpfs needs root and mount")
    mountpoint.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def _umount(mountpoint: Path) -> None:
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def test_training_on_a_real_tiny_tmpfs_stops_clearly_with_the_previous_checkpoint_intact(ref, tmp_path):
    """A checkpoint is ~0.7 MB; 1.2 MB holds one and a half: the second write hits a full disk."""
    disk = tmp_path / "disk"
    _tmpfs(disk, "1200k")
    try:
        run = disk / "run"
        child = start([*train_args(run, ref, **{"train.keep_checkpoints": 1, "train.checkpoint_interval": 5}),
                       "--no-progress"], tmp_path / "logs")
        child.wait()
        line = one_line_error(child, "No space left on device", "is intact")
        steps = checkpoint_steps(run)
        assert steps == [5], (steps, line)
        assert f"step_{5:08d}" in line
        assert not list((run / "checkpoints").glob(".tmp-*"))
    finally:
        _umount(disk)


def test_generation_on_a_real_tiny_tmpfs_stops_clearly_with_finished_chunks_intact(ref, tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "48k")
    try:
        prompts = prompts_file(tmp_path / "p.jsonl", 300)
        out = disk / "out"
        args = ["generate", *gen_overrides(ref / "run", out, prompts, chunk_size=10)]
        child = start(args, tmp_path / "logs")
        child.wait()
        one_line_error(child, "No space left on device")
        check_chunks(out, 10, 300, 1)
    finally:
        _umount(disk)


# == 5. numerics =====================================================================================
def test_a_diverging_run_stops_on_the_command_line_naming_the_step_keeping_the_checkpoint(ref, tmp_path):
    run = copy_run(ref / "run", tmp_path / "run")
    before = tree(run / "checkpoints")
    # An absurd learning rate: the next step throws the weights to ~1e38, the one after is inf/NaN.
    child = start([*train_args(run, ref, **{"train.max_steps": TRAIN_STEPS + 10, "optim.lr": 1e38}),
                   "--no-progress"], tmp_path / "logs")
    child.wait()
    line = one_line_error(child, "non-finite loss or gradient at step", "train.nonfinite=skip")
    step = int(re.search(r"at step (\d+)", line).group(1))
    assert TRAIN_STEPS < step <= TRAIN_STEPS + 10
    assert tree(run / "checkpoints") == before, "the last checkpoint changed"
    assert child.stdout() == ""


# == 7. security =======================================================================================
def test_pickles_next_to_a_checkpoint_are_never_loaded_by_eval_generate_or_resume(ref, tmp_path):
    run = copy_run(ref / "run", tmp_path / "run")
    ckpt = run / "checkpoints" / step_dir_name(TRAIN_STEPS)
    marker = tmp_path / "PWNED"
    raw = malicious_pickle(marker)
    for where in (ckpt / "checkpoint.pkl", run / "model.pkl"):
        where.write_bytes(raw)
    for where in (ckpt / "model.pt", ckpt / "pytorch_model.bin", ckpt / "optimizer.pt",
                  ckpt / "training_args.bin", run / "model.pt", run / "last.ckpt"):
        malicious_torch_file(marker, where)
    assert_payload_is_live(ckpt / "checkpoint.pkl", marker, "pickle")
    assert_payload_is_live(ckpt / "model.pt", marker, "torch")

    for what, args in {
        "eval": ["eval", f"run.dir={run}", "data.source=sample", "eval.limit=10", "run.threads=1"],
        "generate": ["generate", f"run.dir={run}", "--prompt", "the movie", "generate.max_new_tokens=5"],
        "train-resume": train_args(run, ref, **{"train.max_steps": TRAIN_STEPS + 2}),
    }.items():
        child = start(args, tmp_path / what)
        assert child.wait() == 0, f"{what}: {child.stderr()[-2000:]}"
        assert not marker.exists(), f"{what} unpickled a file next to the checkpoint"


UNPICKLERS = ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve")


def _unpickling(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            module, _, attr = name.rpartition(".")
            if (module.split(".")[-1] in UNPICKLERS and attr in ("load", "loads", "open")) or name.endswith(
                    ("torch.load", "torch.jit.load")):
                found.append((node.lineno, f"{name}(...)"))
            for kw in node.keywords:
                value = ast.unparse(kw.value)
                if (kw.arg, value) in (("allow_pickle", "True"), ("weights_only", "False")):
                    found.append((node.lineno, f"{kw.arg}={value}"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in UNPICKLERS for n in names):
                found.append((node.lineno, f"import {names}"))
    return found


def test_lmcore_itself_never_calls_an_unpickler():
    """Static guard: no pickle.load(s), torch.load, numpy allow_pickle=True or weights_only=False in
    the package (submitit's own pickles of SLURM jobs are submitit's, outside lmcore's code)."""
    probe = "import pickle\npickle.load(f)\ntorch.load(p)\nnp.load(p, allow_pickle=True)\n"
    assert len(_unpickling(probe)) == 4  # the guard sees what it looks for
    banned = []
    for path in sorted((REPO / "lmcore").rglob("*.py")):
        where = path.relative_to(REPO)
        banned += [f"{where}:{line}: {what}" for line, what in _unpickling(path.read_text(encoding="utf-8"))]
    assert banned == []


NASTY = "$(touch m1)`touch m2`;touch m3 \"q\" #c"


@pytest.mark.parametrize("kind", ["train", "eval", "generate", "pipeline"])
def test_dry_run_scripts_of_every_kind_quote_the_working_dir_config_path_and_values(tmp_path, kind):
    """The working directory (#SBATCH --chdir, log paths, srun arguments), the config file's name and
    override values with $(...), backticks, ;, quotes, # and newlines: running the printed script
    (srun and module stubbed) runs none of them, and sbatch reads every path back as it is."""
    from tests.test_slurm_profile import sbatch_argument

    cwd = tmp_path / f"work {NASTY}"
    cwd.mkdir()
    config = cwd / f"cfg {NASTY}.yaml"
    config.write_text("train:\n  max_steps: 3\n", encoding="utf-8")
    env = child_env()
    proc = subprocess.run([*LMCORE, "submit", kind, "--cluster", "local", "--config", str(config),
                           "--dry-run",
                           "--shards", "2", f"run.dir=r{NASTY}\ntouch m4", f"generate.output_dir=o{NASTY}",
                           f"generate.prompts=p{NASTY}\n$(touch m5)", f"tracking.name=n{NASTY}\r\ntouch m6"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in script.splitlines():
        assert "\r" not in line
    for key in ("chdir", "output", "error"):
        for value in re.findall(rf"^#SBATCH --{key}=(.*)$", script, re.M):
            assert sbatch_argument(value).startswith(str(cwd)), (key, value)
    bash_dir = tmp_path / "bash-cwd"
    bash_dir.mkdir()
    runner = bash_dir / "run.sh"
    runner.write_text("srun() { :; }; module() { :; }; conda() { :; }; source() { :; }\n" + script)
    subprocess.run(["bash", str(runner)], cwd=bash_dir, capture_output=True, timeout=30)
    markers = [p for p in tmp_path.rglob("m[0-9]")]
    assert markers == [], f"the script ran injected commands: {markers}"



def test_an_api_key_never_lands_in_the_run_folder_logs_or_scripts(ref, tmp_path):
    secret = "lmcoreSECRETkey" + "7" * 33  # 48 characters, the shape of a real W&B key
    home = tmp_path / "wandb-home"
    env = child_env(WANDB_API_KEY=secret, WANDB_MODE="offline", WANDB_BASE_URL="http://127.0.0.1:9",
                    WANDB_CACHE_DIR=str(home / "cache"), WANDB_CONFIG_DIR=str(home / "config"),
                    WANDB_DATA_DIR=str(home / "data"), WANDB_ARTIFACT_DIR=str(home / "artifacts"),
                    NETRC=str(home / "netrc"), WANDB__DISABLE_STATS="true", HOME=str(home))
    run = tmp_path / "run"
    args = ["train", *tiny_overrides(run, **{"train.max_steps": 4, "train.log_interval": 2, "run.threads": 1,
                                              "data.val_split": "", "data.cache_dir": str(ref / "cache"),
                                              "tracking.wandb_mode": "auto"})]
    child = start(args, tmp_path / "logs", env=env)
    assert child.wait() == 0, child.stderr()[-3000:]
    assert list((run / "wandb").glob("offline-run-*")), "W&B wrote no offline run: the test checks nothing"
    dry = subprocess.run([*LMCORE, "submit", "pipeline", "--cluster", "local", "--dry-run", f"run.dir={run}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    leaks = [str(p) for p in [*tmp_path.rglob("*")] if p.is_file() and secret.encode() in p.read_bytes()]
    leaks += [name for name, text in (("train stdout", child.stdout()), ("train stderr", child.stderr()),
                                      ("dry-run script", dry.stdout + dry.stderr)) if secret in text]
    assert leaks == []


# == 8. concurrency ===================================================================================
def _lock_holder(run: Path) -> int | None:
    try:
        return int(json.loads((run / ".lock").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def test_two_training_jobs_started_together_on_one_run_one_refuses_the_other_finishes(ref, tmp_path):
    run = tmp_path / "run"
    args = [*train_args(run, ref, **{"train.max_steps": 12}), "--no-progress"]
    jobs = [start(args, tmp_path / "a"), start(args, tmp_path / "b")]
    try:
        pids = {j.pid for j in jobs}
        wait_until(lambda: _lock_holder(run) in pids or all(j.poll() is not None for j in jobs), None,
                   "one job to take the run folder")
        assert _lock_holder(run) in pids, [j.stderr()[-1000:] for j in jobs]
        winner = next(j for j in jobs if j.pid == _lock_holder(run))
        loser = next(j for j in jobs if j is not winner)
        winner.proc.send_signal(signal.SIGSTOP)  # frozen while holding the folder: the overlap is certain
        try:
            loser.wait(timeout=120)
        finally:
            winner.proc.send_signal(signal.SIGCONT)
        assert winner.wait() == 0, winner.stderr()[-3000:]
    finally:
        for j in jobs:
            if j.poll() is None:
                j.proc.send_signal(signal.SIGCONT)
                j.kill()
    one_line_error(loser, "in use by another job", f"pid {winner.pid}", str(run))
    assert loser.stdout() == ""
    assert checkpoint_steps(run) == [10, 12]
    steps = [r["step"] for r in metrics_rows(run) if "train/loss" in r]
    assert steps == list(range(1, 13)), "two jobs' rows are interleaved in metrics.jsonl"


def test_two_generation_jobs_on_the_same_shard_one_refuses_and_nothing_is_interleaved(ref, gen_ref, tmp_path):
    from lmcore.gen.folder import MERGED_FILE, done_chunks

    prompts, reference = gen_ref
    out = tmp_path / "out"
    args = ["generate", *gen_overrides(ref / "run", out, prompts)]
    first = start(args, tmp_path / "first")
    wait_until(lambda: len(done_chunks(out)) >= 2, first, "the first job's chunks")
    first.proc.send_signal(signal.SIGSTOP)  # the first job is mid-work (and would hold any lock)
    try:
        second = start(args, tmp_path / "second")
        second.wait(timeout=180)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    first.wait()
    story = (f"first job: exit {first.poll()} {first.stdout()[-300:]!r} {first.stderr()[-600:]!r}; "
             f"second job: exit {second.poll()} {second.stdout()[-300:]!r}")
    # Both did (or tried to do) the same chunks: that must be refused like training does.
    assert second.poll() == 2 and "in use by another job" in second.stderr(), (
        "nothing stops a second job on the same shard: " + story)
    one_line_error(second, "in use by another job", str(out))
    assert first.poll() == 0, story
    assert (out / MERGED_FILE).read_bytes() == reference.read_bytes()
