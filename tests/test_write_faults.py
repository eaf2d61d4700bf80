"""A failing write at every place lmcore writes: a full disk (ENOSPC), a denied folder (EACCES), a
read-only mount (EROFS), a failing disk (EIO), injected by tests/fault_inject.py into the real
command line. Each ends in one line `lmcore: error: ...` naming the file and the cause, exit
status 2, the folders as they were (earlier checkpoints and chunks intact, nothing new claimed)
and no temporary debris; writes that only track (W&B's folder and id file, pruning old
checkpoints) warn in one line and let the job finish.

Every place in lmcore that calls a writer of lmcore.fileio is listed in some SITES row
(`covers`); test_every_write_in_lmcore_has_a_fault_test fails for one that is not, so a new
write path cannot land without its test. Each row runs with one errno (rotating); with
LMCORE_SLOW_FAULTS=1 every row runs with all four.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmcore import fileio
from lmcore.runtime.precision import cpu_supports
from tests.conftest import REPO
from tests.fault_helpers import (
    SLOW,
    TRAIN_STEPS,
    checkpoint_steps,
    child_env,
    copy_run,
    prompts_file,
    reference_run,
    train_overrides,
    tree,
    tree_diff,
)
from tests.fault_inject import ERRNOS

STRERROR = {"ENOSPC": "No space left on device", "EACCES": "Permission denied",
            "EROFS": "Read-only file system", "EIO": "Input/output error"}
MORE = TRAIN_STEPS + 4  # a resumed run: two more checkpoints (every 2 steps)


@dataclass(frozen=True)
class Site:
    name: str
    writer: str  # one of lmcore.fileio.WRITERS
    pattern: str  # fnmatch on the absolute path the writer writes
    job: str  # "train", "resume", "cold-cache", "generate", "skip-bad-lines", "merge", "eval", "report", ...
    covers: tuple[str, ...]  # the call sites in lmcore ("path/to/module.py:Class.function") it exercises
    names: str = ""  # the error line must name this (default: the path's last part)
    nth: int = 1
    midway: bool = False
    warns: bool = False  # tracking only: a warning, and the job finishes
    may_change: tuple[str, ...] = ()  # paths (fnmatch, relative to the case folder) a failed job may change
    env: tuple[tuple[str, str], ...] = ()  # more environment for the job
    extra: tuple[str, ...] = ()  # more overrides for the job
    also: tuple[str, str] | None = None  # a second (writer, pattern) that fails with the same errno


CACHE = ("newcache", "newcache/tokenizers", "newcache/splits", "newcache/tokenizers/*")
TRAINING = ("run/config.yaml", "run/tokenizer.json", "run/metrics.jsonl", "run/.lock")
SITES = [
    Site("run lock", "open_lock", "*/new/.lock", "train", ("lmcore/runtime/lock.py:RunLock.acquire",),
         names="new"),
    Site("a new run's config", "atomic_write", "*/new/config.yaml", "train",  # no run folder left
         ("lmcore/trainer.py:Trainer.resume_or_start",), names="config.yaml"),
    # the failed new run's folder cannot be removed either: the config's error is still the one
    # line, and the folder stays behind as the job left it
    Site("a failed new run's folder removed", "remove_tree", "*/new", "train",
         ("lmcore/runtime/lock.py:RunLock.release",), names="config.yaml",
         also=("atomic_write", "*/new/config.yaml"), may_change=("new", "new/*")),
    Site("run config", "atomic_write", "*/run/config.yaml", "resume",
         ("lmcore/trainer.py:Trainer.resume_or_start",), may_change=("run/.lock",)),
    Site("run tokenizer", "atomic_write", "*/run/tokenizer.json", "resume",
         ("lmcore/trainer.py:Trainer.resume_or_start",), may_change=TRAINING),
    Site("run's SLURM job history", "append_line", "*/run/jobs.jsonl", "resume",
         ("lmcore/trainer.py:Trainer.resume_or_start",), may_change=TRAINING,
         env=(("SLURM_JOB_ID", "4242"),)),
    Site("best checkpoint's record", "atomic_write", "*/new/best.json", "train",
         ("lmcore/trainer.py:Trainer.record_best",), may_change=("new", "new/*"),
         extra=("train.keep_best=true", "data.val_split=holdout", "data.holdout_every=4",
                "train.eval_interval=2")),
    Site("metrics rewrite on resume", "atomic_write", "*/run/metrics.jsonl", "resume",
         ("lmcore/track/metrics.py:MetricsLog.__init__",), may_change=("run/.lock",)),
    Site("metrics row", "append_line", "*/run/metrics.jsonl", "resume",
         ("lmcore/track/metrics.py:MetricsLog.log",), midway=True, may_change=TRAINING),
    Site("checkpoint folder", "make_dir", "*/checkpoints/.tmp-*", "resume",
         ("lmcore/checkpoint.py:CheckpointWriter.begin",), names="step_00000062", may_change=TRAINING),
    Site("checkpoint rank file", "save_tensors", "*/rank_00000.safetensors", "resume",
         ("lmcore/checkpoint.py:CheckpointWriter.write_rank",), names="step_00000062", midway=True,
         may_change=TRAINING),
    Site("checkpoint weights", "save_tensors", "*/model.safetensors", "resume",
         ("lmcore/checkpoint.py:CheckpointWriter.write_main",), names="step_00000062", may_change=TRAINING),
    Site("checkpoint state", "write_new", "*/trainer_state.json", "resume",
         ("lmcore/checkpoint.py:CheckpointWriter.write_main",), names="step_00000062", midway=True,
         may_change=TRAINING),
    Site("checkpoint manifest", "atomic_write", "*/manifest.json", "resume",
         ("lmcore/checkpoint.py:CheckpointWriter.finish",), names="step_00000062", midway=True,
         may_change=TRAINING),
    Site("checkpoint publish", "publish_dir", "*/checkpoints/step_*", "resume",
         ("lmcore/checkpoint.py:CheckpointWriter.finish",), names="step_00000062", may_change=TRAINING),
    Site("old checkpoint pruned", "remove_tree", "*/checkpoints/step_*", "resume",
         ("lmcore/checkpoint.py:prune",), warns=True, may_change=(*TRAINING, "run/checkpoints/*")),
    # (complete cache entries written before the fault may stay: the next run uses them)
    Site("token cache folder", "new_temp_dir", "*/newcache/splits", "cold-cache",
         ("lmcore/data/cache.py:_publish",), names="newcache", may_change=CACHE),
    Site("token cache file", "write_new", "*/newcache/splits/.tmp-*/tokens.npy", "cold-cache",
         ("lmcore/data/cache.py:_publish",), names="newcache", midway=True, may_change=CACHE),
    Site("token cache publish", "publish_dir", "*/newcache/tokenizers/*", "cold-cache",
         ("lmcore/data/cache.py:_publish",), names="newcache", may_change=CACHE),
    Site("W&B folder", "atomic_write", "*/.wandb-probe-*", "train",
         ("lmcore/track/wandb_init.py:_unwritable",), warns=True, may_change=("new", "new/*")),
    Site("W&B folder made", "make_dir", "*/new", "train", ("lmcore/track/wandb_init.py:_unwritable",),
         warns=True, nth=2, may_change=("new", "new/*")),
    Site("loss-precision probe cache", "atomic_write", "*/precision/*.json", "train",
         ("lmcore/runtime/precision.py:_cached_probe",), warns=True, extra=("train.loss_precision=auto",),
         may_change=("new", "new/*")),
    Site("W&B run id", "atomic_write", "*/wandb_run.json", "train",
         ("lmcore/track/tracker.py:Tracker._save_state",), warns=True, may_change=("new", "new/*")),
    Site("generation folder", "make_dir", "*/out", "generate", ("lmcore/gen/folder.py:claim_params",),
         names="params.json"),
    Site("generation params", "create_exclusive", "*/out/params.json", "generate",
         ("lmcore/gen/folder.py:claim_params",)),
    Site("generation rejects", "atomic_write", "*/out/rejects.jsonl", "skip-bad-lines",
         ("lmcore/gen/job.py:ShardJob.claim",), may_change=("out", "out/params.json")),
    Site("generation chunk", "atomic_write", "*/chunks/chunk-*", "generate",
         ("lmcore/gen/job.py:ShardJob._write_chunk",), names="chunk-00000002", nth=3, midway=True,
         may_change=("out", "out/params.json", "out/chunks", "out/chunks/chunk-0000000[01].jsonl")),
    Site("generation shard lock", "open_lock", "*/out/.locks/*", "generate",
         ("lmcore/runtime/lock.py:RunLock.acquire",), names="shard-00000",
         may_change=("out", "out/params.json")),
    Site("merged generations", "atomic_write", "*/out/generations.jsonl", "merge",
         ("lmcore/gen/merge.py:merge_outputs",), midway=True),
    Site("generation manifest", "atomic_write", "*/out/manifest.json", "merge",
         ("lmcore/gen/merge.py:_write_manifest",), may_change=("out/generations.jsonl",)),
    Site("eval result", "atomic_write", "*/eval_train.json", "eval", ("lmcore/evaluate.py:run_eval",)),
    Site("export files", "write_new", "*/.exported-*/model.safetensors", "export",
         ("lmcore/export.py:export",), names="exported", midway=True),
    Site("export publish", "publish_dir", "*/exported", "export", ("lmcore/export.py:export",),
         names="exported"),
    Site("report files", "write_new", "*/.report-*/perplexity.png", "report",
         ("lmcore/track/report.py:_publish",), names="report", midway=True),
    Site("report folder", "new_temp_dir", "*/run", "report", ("lmcore/track/report.py:_publish",),
         names="report"),
    Site("report publish", "publish_files", "*/run/report", "report",
         ("lmcore/track/report.py:_publish",),
         names="report"),
    Site("comparison table", "write_new", "*/.compare-*/compare.md", "compare",
         ("lmcore/track/report.py:_publish",), names="compare", midway=True),
    # the sweep's folder it made is removed again: nothing ran
    Site("sweep manifest", "atomic_write", "*/sw/sweep.json", "sweep", ("lmcore/sweep.py:write_manifest",)),
]


def errnos_for(i: int) -> list[str]:
    names = sorted(ERRNOS)
    return names if SLOW else [names[i % len(names)]]


# the probe writes its cache only where the CPU has bf16 or fp16 natively (else auto is fp32 unmeasured)
NO_PROBE = pytest.mark.skipif(not any(map(cpu_supports, ("bf16", "fp16"))),
                              reason="this CPU has no native bf16 or fp16: loss_precision=auto measures "
                                     "nothing, so it writes no cache")
CASES = [pytest.param(site, e, marks=NO_PROBE if site.covers[0].endswith(":_cached_probe") else ())
         for i, site in enumerate(SITES) for e in errnos_for(i)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


def command(site: Site, tmp: Path, ref: Path) -> list[str]:
    """The lmcore arguments of a site's job, in the case folder tmp (run/ is a copy of the trained run)."""
    gen = [f"generate.checkpoint={tmp / 'run'}", f"generate.prompts={tmp / 'p.jsonl'}",
           f"generate.output_dir={tmp / 'out'}", "generate.chunk_size=4", "generate.max_new_tokens=4",
           "generate.precision=fp32", "run.threads=1"]
    if site.job == "train":
        return ["train", *train_overrides(tmp / "new", ref / "cache", **{"train.max_steps": 4,
                                                                      "tracking.wandb_mode": "offline"}),
                *site.extra]
    if site.job == "resume":
        return ["train", *train_overrides(tmp / "run", ref / "cache", **{"train.max_steps": MORE})]
    if site.job == "cold-cache":
        return ["train", *train_overrides(tmp / "new", tmp / "newcache", **{"train.max_steps": 2})]
    if site.job in ("generate", "skip-bad-lines"):
        return ["generate", *gen, *(["generate.bad_lines=skip"] if site.job == "skip-bad-lines" else [])]
    if site.job == "merge":
        return ["generate", "--merge", *gen]
    if site.job == "eval":
        return ["eval", *train_overrides(tmp / "run", ref / "cache"), "eval.split=train", "eval.limit=8"]
    if site.job == "report":
        return ["report", str(tmp / "run")]
    if site.job == "compare":
        return ["report", "--compare", str(tmp / "run")]
    if site.job == "sweep":  # run.dir is the sweep's to set
        common = [o for o in train_overrides(tmp / "run", ref / "cache") if not o.startswith("run.dir=")]
        return ["sweep", *common, "--grid", "optim.lr=0.01,0.02", "--dir", str(tmp / "sw")]
    if site.job == "export":
        return ["export", str(tmp / "run"), str(tmp / "exported")]
    raise AssertionError(site.job)


def prepare(site: Site, tmp: Path, ref: Path) -> None:
    copy_run(ref / "run", tmp / "run")
    prompts_file(tmp / "p.jsonl", 10)
    if site.job == "skip-bad-lines":
        with open(tmp / "p.jsonl", "a", encoding="utf-8") as f:
            f.write("not json\n")
    if site.job == "merge":  # the chunks of a finished job in two shards, not merged yet
        job = command(site, tmp, ref)
        for shard in (0, 1):
            proc = subprocess.run([sys.executable, "-m", "lmcore", job[0], *job[2:], "generate.num_shards=2",
                                   f"generate.shard_index={shard}"],
                                  env=child_env(), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr


def debris(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.name.startswith((".tmp-", ".report-", ".compare-", ".exported-")) or p.name.endswith(".tmp")]


IDS = [f"{c.values[0].name.replace(' ', '-')}-{c.values[1]}" for c in CASES]


@pytest.mark.parametrize(("site", "err"), CASES, ids=IDS)
def test_a_failing_write_is_one_line_and_changes_nothing(site: Site, err: str, ref: Path, tmp_path: Path):
    tmp = tmp_path / "case"
    tmp.mkdir()
    prepare(site, tmp, ref)
    steps_before = checkpoint_steps(tmp / "run")
    before = tree(tmp)
    argv = [sys.executable, "-m", "tests.fault_inject", site.writer, site.pattern, err,
            "--nth", str(site.nth), *(["--midway"] if site.midway else []),
            *(["--also", *site.also] if site.also else []), "--", *command(site, tmp, ref)]
    proc = subprocess.run(argv, cwd=REPO, env=child_env(**dict(site.env)), capture_output=True, text=True,
                          timeout=300)
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything, everything[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmcore: ")]
    if site.warns:
        assert proc.returncode == 0, everything[-3000:]
        warned = [ln for ln in lines if ln.startswith("lmcore: warning: ") and STRERROR[err] in ln]
        assert len(warned) == 1, proc.stderr
    else:  # progress lines may come first; then one error line, the last
        assert proc.returncode == 2, everything[-3000:]
        errors = [ln for ln in lines if ln.startswith("lmcore: error: ")]
        assert len(errors) == 1 and proc.stderr.splitlines()[-1] == errors[0], proc.stderr
        assert STRERROR[err] in errors[0], errors[0]
        named = site.names or site.pattern.rsplit("/", 1)[-1].replace("*", "")
        assert named in errors[0], f"{named!r} not named in: {errors[0]}"
        assert proc.stdout == ""
    assert debris(tmp) == [], f"left behind: {debris(tmp)}"
    changed = [d for d in tree_diff(before, tree(tmp))
               if not any(fnmatch.fnmatch(d.split(": ", 1)[1], pat) for pat in site.may_change)]
    assert not changed, f"a failed {site.job} changed: {changed}"
    if steps_before and not site.warns:
        assert checkpoint_steps(tmp / "run") == steps_before  # every earlier checkpoint still verifies


# -- every write has its row ---------------------------------------------------------------------------
def write_call_sites() -> set[str]:
    """'module.py:Class.function' of every call of a lmcore.fileio writer (or of a helper built on
    atomic_write) anywhere in lmcore."""
    writers = set(fileio.WRITERS) | {"atomic_write_bytes", "atomic_write_text", "atomic_write_json"}
    found: set[str] = set()
    for path in sorted((REPO / "lmcore").rglob("*.py")):
        if path.name == "fileio.py":
            continue
        rel = str(path.relative_to(REPO))

        def visit(node: ast.AST, scope: list[str], rel: str = rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, [*scope, child.name], rel)
                    continue
                if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                        and isinstance(child.func.value, ast.Name) and child.func.value.id == "fileio"
                        and child.func.attr in writers):
                    found.add(f"{rel}:{'.'.join(scope)}")
                visit(child, scope, rel)

        visit(ast.parse(path.read_text(encoding="utf-8")), [])
    return found


def test_every_write_in_lmcore_has_a_fault_test():
    covered = {c for site in SITES for c in site.covers}
    untested = write_call_sites() - covered
    assert not untested, f"writes with no row in SITES (tests/test_write_faults.py): {sorted(untested)}"
    assert not covered - write_call_sites(), f"rows naming no write: {sorted(covered - write_call_sites())}"


MODULE_WRITES = {"os": {"rename", "replace", "link", "symlink", "mkdir", "makedirs", "open", "truncate"},
                 "shutil": {"copy", "copy2", "copyfile", "copytree", "move"},
                 "tempfile": {"mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"}}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"}
PATH_WRITES = {"write_text", "write_bytes", "mkdir", "touch", "symlink_to", "hardlink_to"}
TO_MEMORY = {"savefig", "save", "save_file", "save_model"}  # fine into a buffer (buf), a write to a path


def raw_write(node: ast.Call) -> bool:
    f = node.func
    if isinstance(f, ast.Name):
        if f.id != "open":
            return False
        mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
        mode = next((k.value.value for k in node.keywords
                     if k.arg == "mode" and isinstance(k.value, ast.Constant)), mode)
        return isinstance(mode, str) and any(c in mode for c in "wax+")
    if not isinstance(f, ast.Attribute):
        return False
    if isinstance(f.value, ast.Name) and f.value.id in MODULE_WRITES:
        if (f.value.id, f.attr) == ("os", "open") and len(node.args) > 1:  # a read-only open is a read
            return any(isinstance(n, ast.Attribute) and n.attr in WRITE_FLAGS for n in ast.walk(node.args[1]))
        return f.attr in MODULE_WRITES[f.value.id]
    if f.attr == "save" and not (isinstance(f.value, ast.Name) and f.value.id in ("np", "numpy", "torch")):
        return False  # a method of lmcore's own (Trainer.save)
    if f.attr in TO_MEMORY:
        first = node.args[0] if node.args else None
        return not (isinstance(first, ast.Name) and first.id.endswith("buf"))
    return f.attr in PATH_WRITES


def test_lmcore_writes_only_through_fileio():
    """No module but lmcore/fileio.py creates or changes a file by itself (open for writing,
    Path.write_text, os.rename, savefig to a path, ...): so SITES sees every write there is."""
    found = []
    for path in sorted((REPO / "lmcore").rglob("*.py")):
        if path.name == "fileio.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and raw_write(node):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)[:80]}")
    assert not found, "writes outside lmcore/fileio.py:\n" + "\n".join(found)
