"""A catalogue of bad inputs, one table, run through the real command line.

Each case is a setup (files it writes into its own folder), the `lmcore` arguments, and what the
error line must name. Every case must end the same way: exit status 2, exactly one stderr line
starting with "lmcore: error:", nothing on stdout, no traceback, no code run from a pickle, and
nothing written: the case folder (data, configs, a copy of a trained run, output folders, the
data cache) is byte-for-byte the same afterwards (RUN/.lock excepted: the lock file records who
last held the run).

Placeholders in arguments and expected text: {tmp} the case folder (also the working directory),
{run} a copy of a tiny trained run (cases with run=True), {ckpt} its newest checkpoint, {cache}
that run's data cache, {repo} the repository. Cases marked slow run with LMCORE_SLOW_FAULTS=1.
Existing tests that this does not repeat: tests/test_bad_inputs.py, tests/test_generate_job.py
(prompt files), tests/test_slurm_profile.py (profiles, in-process), tests/test_sweep.py (grids,
points files, sweep folders).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fault_helpers import (
    LMCORE,
    SLOW,
    TRAIN_STEPS,
    child_env,
    copy_run,
    malicious_pickle,
    malicious_torch_file,
    reference_run,
    replace_in_checkpoint,
    train_overrides,
    tree,
    tree_diff,
)
from tests.test_bad_inputs import one_error_line

MAX_LINE = 1000  # characters: the error names the problem, it never echoes a huge input


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    expect: tuple[str, ...]
    setup: Callable[[Path], None] | None = None  # called with the case folder
    run: bool = False  # copy the shared trained run to {tmp}/run first
    cwd: str = ""  # working directory, relative to the case folder
    slow: bool = False


# -- setups ------------------------------------------------------------------------------------------
def write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return setup


def mkdir(rel: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / rel).mkdir(parents=True, exist_ok=True)


def chain(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)
    return setup


def random_bytes(n: int, seed: int = 7, head: bytes = b"\xff\xfe") -> bytes:
    """Binary junk that is certainly not UTF-8 from its first line on."""
    return head + random.Random(seed).randbytes(n)


HUGE_LINE = '{"text": "' + "word " * 1_600_000  # 8 MB on one line, never closed


def checkpoints(tmp: Path) -> list[Path]:
    return sorted((tmp / "run" / "checkpoints").glob("step_*"))


def newest(tmp: Path) -> Path:
    return checkpoints(tmp)[-1]


def in_checkpoint(name: str, payload: Callable[[Path], bytes], every: bool = False) -> Callable[[Path], None]:
    """Replace a file of the newest (or every) checkpoint, manifest checksum updated to match."""
    def setup(tmp: Path) -> None:
        for ckpt in checkpoints(tmp) if every else [newest(tmp)]:
            replace_in_checkpoint(ckpt, name, payload(tmp))
    return setup


def pickle_bomb(tmp: Path) -> bytes:
    return malicious_pickle(tmp / "PWNED")


def manifest_of_every_checkpoint(text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for ckpt in checkpoints(tmp):
            (ckpt / "manifest.json").write_text(text)
    return setup


def flip_every_checkpoint(tmp: Path) -> None:
    for ckpt in checkpoints(tmp):
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        data[-3] ^= 0x01
        (ckpt / "model.safetensors").write_bytes(bytes(data))


def torch_pickle(rel: str) -> Callable[[Path], None]:
    return lambda tmp: malicious_torch_file(tmp / "PWNED", tmp / rel)


def trainer_state_without_keys(tmp: Path) -> bytes:
    state = json.loads((newest(tmp) / "trainer_state.json").read_text())
    return json.dumps({k: v for k, v in state.items() if k not in ("epoch", "index")}).encode()


def trainer_state_bad_loss_precision(tmp: Path) -> bytes:
    state = json.loads((newest(tmp) / "trainer_state.json").read_text())
    return json.dumps({**state, "loss_precision": "fp8,fp32,fp32"}).encode()


def newer_architecture(tmp: Path) -> None:
    """What a checkpoint written by a newer lmcore looks like: an architecture key this one lacks."""
    for ckpt in checkpoints(tmp):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["architecture"]["attention_heads"] = 4
        (ckpt / "manifest.json").write_text(json.dumps(manifest))


def every_manifest(edit: Callable[[dict, Path], None]) -> Callable[[Path], None]:
    """Edit the manifest of every checkpoint as someone who can write the folder could."""
    def setup(tmp: Path) -> None:
        for ckpt in checkpoints(tmp):
            manifest = json.loads((ckpt / "manifest.json").read_text())
            edit(manifest, ckpt)
            (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return setup


def list_outside_file(manifest: dict, ckpt: Path) -> None:
    """A file list naming a real file outside the folder, with its true size and checksum."""
    outside = ckpt.parent.parent / "config.yaml"
    data = outside.read_bytes()
    manifest["files"]["../../config.yaml"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def list_fifo(manifest: dict, ckpt: Path) -> None:
    os.mkfifo(ckpt / "pipe")
    manifest["files"]["pipe"] = {"bytes": 1, "sha256": "0" * 64}


def adaptive_run(tmp: Path) -> None:
    """A one-step run of an adaptive-softmax model (int8 generation is for the full softmax)."""
    proc = subprocess.run([*LMCORE, "train", "--no-progress", "run.dir=" + str(tmp / "arun"), *TINY,
                           "model.softmax=adaptive", "model.adaptive_cutoffs=[100]", "data.cache_dir=" +
                           str(tmp / "acache")], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def symlink(rel: str, target: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).symlink_to(target)
    return setup


def fifo(rel: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(tmp / rel)
    return setup


def corrupt_gzip(lines: int = 200) -> bytes:
    """A .gz whose deflate data is damaged (byte 20 flipped): not truncated, and no CRC gets checked."""
    data = bytearray(gzip.compress(b"".join(b'{"text": "review %d is fine"}\n' % i for i in range(lines)),
                                   mtime=0))
    data[20] ^= 0xFF
    return bytes(data)


def quote_left_open(tmp: Path) -> None:
    """A CSV whose third line opens a quote that never closes: one field of 70 MB, over any sane limit."""
    (tmp / "data").mkdir()
    with open(tmp / "data" / "train.csv", "w", encoding="utf-8") as f:
        f.write('text,label\ngood,1\n"it starts,0\n')
        f.writelines(["more words " * 99 + "\n"] * 68_000)


GOOD_ROW = '{"text": "a good film"}\n'
REVIEW = write("data/train/pos/1_1.txt", "a good film\n")

def gzip_flipped(rel: str, where: Callable[[int], int]) -> Callable[[Path], None]:
    """A .jsonl.gz of valid prompts with one byte flipped at where(len): damaged deflate data."""
    def setup(tmp: Path) -> None:
        lines = b"".join(b'{"id": %d, "prompt": "the movie was good %d"}\n' % (i, i) for i in range(2000))
        data = bytearray(gzip.compress(lines, mtime=0))
        data[where(len(data))] ^= 0xFF
        write(rel, bytes(data))(tmp)
    return setup


def fifo_beside(name: str) -> Callable[[Path], None]:
    """A FIFO beside the case folder (reading the case folder's tree would block on it)."""
    def setup(tmp: Path) -> None:
        path = tmp.parent / name
        if not path.exists():
            os.mkfifo(path)
    return setup


def generation_folder(chunk: str) -> Callable[[Path], None]:
    """A finished one-chunk generation folder (one prompt, one sample) whose chunk file holds chunk."""
    def setup(tmp: Path) -> None:
        params = {"format": "lmcore-generations", "version": 1, "checkpoint": {}, "chunk_size": 4,
                  "precision": "fp32", "sampling": {"samples_per_prompt": 1},
                  "prompts": {"chunks": 1, "records": 1}}
        write("gen/params.json", json.dumps(params))(tmp)
        write("gen/chunks/chunk-00000000.jsonl", chunk)(tmp)
    return setup


GEN_ROW = {"id": 1, "index": 0, "sample": 0, "prompt": "a", "completion": "b", "num_tokens": 1,
            "finish_reason": "length", "prompt_tokens": 1, "prompt_unknown": 0, "params": {}}
DEEP = "[" * 100_000 + "]" * 100_000


PROMPTS = write("prompts.jsonl", '{"id": 1, "prompt": "the movie"}\n{"id": 2, "prompt": "a film"}\n')

# -- argument templates --------------------------------------------------------------------------------
TINY = ("run.threads=1", "model.embedding_dim=8", "model.hidden_dim=8", "train.batch_size=4",
        "train.max_steps=1", "data.val_split=", "tracking.wandb_mode=disabled")
# Valid data (the sample corpus) reads the shared run's cache: nothing to write there either.
NEW_RUN = ("train", "--no-progress", "run.dir={tmp}/newrun", *TINY, "data.cache_dir={cache}")


def data(source: str) -> tuple[str, ...]:
    """Bad data: a cache inside the case folder, so that it is checked to stay empty too."""
    return ("train", "--no-progress", "run.dir={tmp}/newrun", *TINY, "data.cache_dir={tmp}/cache",
            f"data.source={source}")


RESUME = ("train", "--no-progress", "{RESUME}")  # expanded to train_overrides(run, cache)
EVAL = ("eval", "--checkpoint", "{run}", "data.source=sample", "eval.limit=5", "run.threads=1",
        "data.cache_dir={cache}")
BULK = ("generate", "run.dir={run}", "run.threads=1", "generate.output_dir={tmp}/gen",
        "generate.prompts={tmp}/prompts.jsonl", "generate.max_new_tokens=4")
SUBMIT = ("submit", "train", "--cluster", "{tmp}/p.yaml", "--dry-run")

CASES: dict[str, Case] = {
    # -- config files and values: most fail before torch is imported ---------------------------------
    "config-truncated-mid-key": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("'train'", "must be a mapping"),
        write("c.yaml", "optim:\n  lr: 0.01\ntrain:\n  batch_si")),
    "config-truncated-in-a-list": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("{tmp}/c.yaml", "not valid YAML"),
        write("c.yaml", "optim:\n  betas: [0.9, 0.99")),
    "config-binary": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("{tmp}/c.yaml", "not valid YAML"),
        write("c.yaml", random_bytes(300))),
    "config-a-list": Case(
        ("eval", "--config", "{tmp}/c.yaml"), ("{tmp}/c.yaml", "mapping"),
        write("c.yaml", "- optim\n- train\n")),
    "config-a-folder": Case(
        ("train", "--config", "{tmp}/conf", "run.dir={tmp}/newrun"), ("{tmp}/conf",), mkdir("conf")),
    # YAML that would silently mean something else: refused with the file and line
    "config-duplicate-key": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("c.yaml:3", "'lr' is given twice"),
        write("c.yaml", "optim:\n  lr: 0.01\n  lr: 0.02\n")),
    "config-sexagesimal-number": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"),
        ("train.max_steps", "integer", "c.yaml:2"),
        write("c.yaml", "train:\n  max_steps: 1:30\n")),
    "config-octal-looking-number": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("run.seed", "leading zero"),
        write("c.yaml", "run:\n  seed: 010\n")),
    "config-key-without-a-value": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("optim.lr", "no value", "c.yaml:2"),
        write("c.yaml", "optim:\n  lr:\n")),
    "config-key-at-the-wrong-level": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"),
        ("did you mean 'optim.lr'", "c.yaml:1"),
        write("c.yaml", "lr: 0.01\n")),
    "config-merge-key": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("merge keys",),
        write("c.yaml", "base: &b\n  lr: 1\noptim:\n  <<: *b\n"), slow=True),
    "config-two-documents": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("2 YAML documents",),
        write("c.yaml", "optim: {}\n---\ntrain: {}\n"), slow=True),
    "config-tab-indent": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("not valid YAML", "line 2"),
        write("c.yaml", "optim:\n\tlr: 1\n")),
    "empty-run-dir": Case((*NEW_RUN[:2], *NEW_RUN[3:], "run.dir="), ("run.dir", "must not be empty")),
    "adam-beta-out-of-range": Case((*NEW_RUN, "optim.betas=[0.9, 1.5]"), ("optim.betas", "[0, 1)")),
    "adam-eps-zero": Case((*NEW_RUN, "optim.eps=0"), ("optim.eps", "> 0"), slow=True),
    "token-cache-is-a-file": Case(
        (*data("sample")[:-2], "data.cache_dir={tmp}/afile", "data.source=sample"),
        ("{tmp}/afile", "is a file"),
        write("afile", "not a folder\n")),
    "nan-learning-rate": Case((*NEW_RUN, "optim.lr=nan"), ("optim.lr",)),
    "inf-learning-rate": Case((*NEW_RUN, "optim.lr=.inf"), ("optim.lr",), slow=True),
    "nan-temperature": Case(
        ("generate", "run.dir={run}", "--prompt", "the movie", "generate.temperature=nan",
         "generate.max_new_tokens=3"), ("generate.temperature",), run=True),
    "negative-threads": Case((*NEW_RUN, "run.threads=-1"), ("run.threads",)),
    "uncatchable-stop-signal": Case(
        ("train", "--stop-signals", "KILL", "run.dir={tmp}/newrun", "data.cache_dir={cache}"), ("KILL",)),
    "unknown-stop-signal": Case(
        ("train", "--stop-signals", "USR9", "run.dir={tmp}/newrun"), ("unknown signal 'USR9'",), slow=True),
    "unknown-subcommand": Case(("trian", "run.dir={tmp}/newrun"), ("invalid choice", "'trian'")),
    "unknown-option": Case(("train", "--bogus-flag", "run.dir={tmp}/newrun"), ("'--bogus-flag'",)),
    "override-without-a-key": Case(("train", "=3", "run.dir={tmp}/newrun"), ("'=3'", "section.key=value")),
    "run-dir-is-a-file": Case(
        (*NEW_RUN, "run.dir={tmp}/afile"), ("{tmp}/afile", "run.dir"), write("afile", "not a folder\n")),
    # -- configs, run folders, profiles (hunt) -------------------------------------------------------
    "config-nested-too-deeply": Case(
        ("config", "--config", "{tmp}/c.yaml"), ("{tmp}/c.yaml", "too deeply"),
        write("c.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")),
    "config-a-fifo": Case(
        ("train", "--config", "{tmp}/c.yaml", "run.dir={tmp}/newrun"), ("{tmp}/c.yaml", "not a regular file"),
        lambda tmp: os.mkfifo(tmp / "c.yaml")),
    "seed-beyond-what-numpy-takes": Case(
        (*NEW_RUN, "run.seed=999999999999999999999999"), ("run.seed", "4294967296")),
    "seed-negative": Case((*NEW_RUN, "run.seed=-5"), ("run.seed", "[0, 4294967296)"), slow=True),
    "threads-beyond-reason": Case((*NEW_RUN, "run.threads=100000"), ("run.threads", "1024")),
    "temperature-below-float32": Case(
        ("generate", "run.dir={run}", "--prompt", "the movie", "generate.temperature=1e-45"),
        ("generate.temperature", "use 0 for greedy"), run=True),
    "run-lock-is-a-symlink": Case(
        NEW_RUN, ("{tmp}/newrun/.lock", "symbolic link"),
        chain(write("precious.txt", "keep me\n"), mkdir("newrun"),
              lambda tmp: (tmp / "newrun" / ".lock").symlink_to(tmp / "precious.txt"))),
    "run-metrics-is-a-folder": Case(
        NEW_RUN, ("{tmp}/newrun", "metrics.jsonl"), mkdir("newrun/metrics.jsonl")),
    "run-config-is-a-folder": Case(
        NEW_RUN, ("{tmp}/newrun", "config.yaml"), mkdir("newrun/config.yaml"), slow=True),
    "run-checkpoints-is-a-file": Case(
        NEW_RUN, ("{tmp}/newrun", "checkpoints"), write("newrun/checkpoints", "x\n")),
    "profile-time-zero-means-no-limit": Case(
        SUBMIT, ("time '0'", "no time limit"), write("p.yaml", "time: '0'\n")),
    "profile-time-beyond-a-year": Case(
        SUBMIT, ("365 days",), write("p.yaml", "time: '99999999999999999999'\n"), slow=True),
    "profile-no-time-for-the-warning": Case(
        SUBMIT, ("signal_delay_s", "[20, 86400]"), write("p.yaml", "signal_delay_s: 0\n")),
    "profile-tasks-beyond-reason": Case(
        SUBMIT, ("tasks_per_node", "1024"), write("p.yaml", "tasks_per_node: 99999999999999999999999\n")),
    "submit-shards-beyond-reason": Case(
        ("submit", "generate", "--cluster", "local", "--shards", "100000000", "--dry-run"),
        ("--shards", "100000")),
    # -- data files ---------------------------------------------------------------------------------------
    "data-only-blank-lines": Case(
        data("{tmp}/data/train.jsonl"), ("holds no texts",), write("data/train.jsonl", "\n  \n\t\n")),
    "data-empty-text-file": Case(
        data("{tmp}/data/train.txt"), ("holds no texts",), write("data/train.txt", ""), slow=True),
    "data-binary": Case(
        data("{tmp}/data/train.jsonl"), ("{tmp}/data/train.jsonl:1:", "UTF-8"),
        write("data/train.jsonl", random_bytes(20000))),
    "data-fake-gzip": Case(
        data("{tmp}/data/train.jsonl.gz"), ("{tmp}/data/train.jsonl.gz", "cannot read"),
        write("data/train.jsonl.gz", '{"text": "plain text, not gzip"}\n'), slow=True),
    "data-one-huge-line": Case(
        data("{tmp}/data/train.jsonl"), ("train.jsonl:1:", "malformed JSON"),
        write("data/train.jsonl", HUGE_LINE)),
    "data-csv-wrong-column": Case(
        data("{tmp}/data/train.csv"), ("'text'", "review", "data.text_field"),
        write("data/train.csv", "review,label\ngood film,1\n")),
    "data-field-not-a-string": Case(
        data("{tmp}/data/train.jsonl"), ("train.jsonl:1:", "not a string"),
        write("data/train.jsonl", '{"text": 5}\n'),
        slow=True),
    "data-folder-without-splits": Case(
        data("{tmp}/data"), ("no file for split 'train'",), write("data/README.md", "reviews go here\n"),
        slow=True),
    "data-aclimdb-not-utf8": Case(
        data("{tmp}/data"), ("0_9.txt", "UTF-8"), write("data/train/pos/0_9.txt", b"a caf\xe9 review\n"),
        slow=True),
    "data-corrupt-parquet": Case(
        data("{tmp}/data/train.parquet"), ("train.parquet", "cannot read parquet"),
        write("data/train.parquet", random_bytes(500, head=b"PAR1")), slow=True),
    "data-unknown-format": Case(
        data("{tmp}/data/train.xml"), ("train.xml", "unknown format"),
        write("data/train.xml", "<reviews/>\n"),
        slow=True),
    # -- prompt files (bulk generation) -----------------------------------------------------------------
    "prompts-binary": Case(
        (*BULK[:-2], "generate.prompts={tmp}/prompts.txt"), ("prompts.txt:1:", "UTF-8"),
        write("prompts.txt", random_bytes(5000)), run=True, slow=True),
    "prompts-one-huge-line": Case(
        BULK, ("prompts.jsonl:1:", "malformed JSON"),
        write("prompts.jsonl", HUGE_LINE.replace("text", "prompt")),
        run=True),
    "prompts-a-folder": Case(
        (*BULK[:-2], "generate.prompts={tmp}/pdir"), ("{tmp}/pdir", "folder"), mkdir("pdir"), run=True,
        slow=True),
    "prompts-fake-gzip": Case(
        (*BULK[:-2], "generate.prompts={tmp}/p.jsonl.gz"), ("p.jsonl.gz", "cannot read"),
        write("p.jsonl.gz", '{"id": 1, "prompt": "x"}\n'), run=True, slow=True),
    "prompts-null-line": Case(
        BULK, ("prompts.jsonl:2:", "JSON object"), write("prompts.jsonl", '{"id": 1, "prompt": "x"}\nnull\n'),
        run=True, slow=True),
    "merge-of-an-empty-folder": Case(
        ("generate", "--merge", "generate.output_dir={tmp}/gen"), ("{tmp}/gen", "no generations"),
        mkdir("gen"), slow=True),
    "output-dir-with-chunks-but-no-params": Case(
        BULK, ("{tmp}/gen", "params.json"), chain(PROMPTS, write("gen/chunks/chunk-00000000.jsonl", "{}\n")),
        run=True, slow=True),
    "output-dir-is-a-file": Case(
        BULK, ("generate.output_dir {tmp}/gen", "is a file, not a folder"),
        chain(PROMPTS, write("gen", "a file\n")),
        run=True, slow=True),
    # -- cluster profiles -------------------------------------------------------------------------------
    "profile-a-list": Case(SUBMIT, ("p.yaml", "mapping"), write("p.yaml", "- partition: debug\n")),
    "profile-binary": Case(SUBMIT, ("p.yaml", "not valid YAML"), write("p.yaml", random_bytes(200))),
    "profile-quote-in-account": Case(
        SUBMIT, ("account", "must not contain '"), write("p.yaml", "account: it's\n")),
    "profile-percent-in-log-dir": Case(SUBMIT, ("log_dir", "'%'"), write("p.yaml", "log_dir: logs/%u\n")),
    "profile-sbatch-flag-false": Case(
        SUBMIT, ("sbatch.exclusive", "false"), write("p.yaml", "sbatch:\n  exclusive: false\n")),
    "submit-negative-shards": Case(
        ("submit", "generate", "--cluster", "local", "--shards", "-1", "--dry-run"), ("--shards",)),
    "submit-from-a-folder-with-a-quote": Case(
        ("submit", "train", "--cluster", "local", "--dry-run"), ("working directory", "'"),
        mkdir("bob's work"),
        cwd="bob's work"),
    # -- checkpoints ------------------------------------------------------------------------------------
    "resume-never-on-a-run-with-checkpoints": Case(
        (*RESUME, "train.resume=never", "train.max_steps=2"), ("{run}", "train.resume"), run=True),
    "resume-with-another-vocabulary": Case(
        (*RESUME, "data.min_count=1"), ("vocabulary", "run.dir"), run=True),
    "resume-with-another-architecture": Case(
        (*RESUME, "model.num_layers=2"), ("architecture", "num_layers"), run=True),
    "pickle-as-weights-eval": Case(
        EVAL, ("{ckpt}", "cannot load weights"), in_checkpoint("model.safetensors", pickle_bomb), run=True),
    "pickle-as-weights-generate": Case(
        BULK, ("{ckpt}", "cannot load weights"),
        chain(PROMPTS, in_checkpoint("model.safetensors", pickle_bomb)),
        run=True),
    "pickle-as-weights-resume": Case(
        RESUME, ("{ckpt}", "cannot load weights"), in_checkpoint("model.safetensors", pickle_bomb), run=True,
        slow=True),
    "pickle-as-optimizer-resume": Case(
        RESUME, ("{ckpt}", "optimizer.safetensors"), in_checkpoint("optimizer.safetensors", pickle_bomb),
        run=True),
    "pickle-as-rank-state-resume": Case(
        RESUME, ("{ckpt}", "rank_00000.safetensors"), in_checkpoint("rank_00000.safetensors", pickle_bomb),
        run=True, slow=True),
    "torch-pickle-file-as-checkpoint": Case(
        ("eval", "--checkpoint", "{tmp}/model.pt", "data.source=sample"),
        ("{tmp}/model.pt", "no valid checkpoint"),
        torch_pickle("model.pt"), slow=True),
    "manifest-a-json-list": Case(
        EVAL, ("{run}", "no valid checkpoint"), manifest_of_every_checkpoint("[1, 2]"), run=True),
    "manifest-without-files": Case(
        EVAL, ("{run}", "no valid checkpoint"),
        manifest_of_every_checkpoint('{"format": "lmcore-checkpoint"}'),
        run=True, slow=True),
    "every-checkpoint-bit-flipped": Case(
        EVAL, ("{run}", "no valid checkpoint", "fails its checksum"), flip_every_checkpoint, run=True,
        slow=True),
    "optimizer-json-not-json": Case(
        RESUME, ("{ckpt}", "optimizer.json"), in_checkpoint("optimizer.json", lambda t: b'{"param_groups": '),
        run=True, slow=True),
    "checkpoint-of-a-newer-lmcore": Case(
        EVAL, ("attention_heads", "newer lmcore"), newer_architecture, run=True),
    "int8-on-the-adaptive-softmax": Case(
        ("generate", "run.dir={tmp}/arun", "run.threads=1", "generate.output_dir={tmp}/gen",
         "generate.num_samples=2", "generate.precision=int8"), ("int8", "adaptive softmax"),
        adaptive_run),
    "verify-a-bit-flipped-checkpoint": Case(
        ("verify", "{ckpt}"), ("{ckpt}", "fails its checksum"), flip_every_checkpoint, run=True),
    # -- manifests (hunt) ---------------------------------------------------------------------------
    "manifest-lists-a-file-outside-the-checkpoint": Case(
        EVAL, ("{run}", "no valid checkpoint", "../../config.yaml", "not a file name inside the folder"),
        every_manifest(list_outside_file), run=True),
    "manifest-lists-a-device": Case(
        EVAL, ("{run}", "no valid checkpoint", "/dev/zero"),
        every_manifest(lambda m, c: m["files"].update({"/dev/zero": {"bytes": 1, "sha256": "0" * 64}})),
        run=True),
    "manifest-lists-a-fifo": Case(
        EVAL, ("{run}", "no valid checkpoint", "pipe", "not a regular file"), every_manifest(list_fifo),
        run=True),
    "manifest-nested-too-deeply": Case(
        EVAL, ("{run}", "no valid checkpoint", "nested too deeply"),
        manifest_of_every_checkpoint("[" * 100_000 + "]" * 100_000), run=True),
    "manifest-architecture-of-wrong-types": Case(
        EVAL, ("{run}", "hidden_dim"),
        every_manifest(lambda m, c: m["architecture"].update(hidden_dim="x")), run=True),
    "manifest-negative-vocabulary": Case(
        EVAL, ("{run}", "vocab_size"),
        every_manifest(lambda m, c: m["architecture"].update(vocab_size=-5)), run=True),
    "manifest-step-not-a-number": Case(
        EVAL, ("{run}", "no valid checkpoint", "step 'abc'"),
        every_manifest(lambda m, c: m.update(step="abc")), run=True),
    "trainer-state-missing-keys": Case(
        RESUME, ("{ckpt}", "trainer_state.json"),
        in_checkpoint("trainer_state.json", trainer_state_without_keys),
        run=True, slow=True),
    "trainer-state-unknown-loss-precision": Case(
        RESUME, ("{ckpt}", "trainer_state.json", "'fp8,fp32,fp32'"),
        in_checkpoint("trainer_state.json", trainer_state_bad_loss_precision), run=True),
    "loss-precision-with-the-adaptive-softmax": Case(
        (*NEW_RUN, "model.softmax=adaptive", "train.loss_precision=fp16"),
        ("train.loss_precision=fp16", "model.softmax=full")),
    "loss-precision-without-the-fused-loss": Case(
        (*NEW_RUN, "train.loss_chunk=0", "train.loss_precision=auto"), ("train.loss_chunk > 0",), slow=True),
    "time-horizon-without-a-time-budget": Case(
        (*NEW_RUN, "optim.schedule=cosine", "optim.horizon=time"),
        ("optim.horizon=time", "cosine or wsd", "train.max_train_seconds > 0")),
    # -- data files (hunt) --------------------------------------------------------------------------------
    "data-min-count-above-every-word": Case(
        (*data("{tmp}/data/train.jsonl"), "data.min_count=1000"),
        ("data.min_count=1000", "'the'", "occurs 6 times", "lower data.min_count"),
        write("data/train.jsonl", '{"text": "the film, the end"}\n' * 3)),
    "data-hub-offline": Case(
        data("hub:imdb"), ("'imdb'", "data.source=PATH", "data.source=sample"), slow=True),
    "data-jsonl-nested-too-deeply": Case(
        data("{tmp}/data/train.jsonl"), ("{tmp}/data/train.jsonl:2:", "nested too deeply"),
        write("data/train.jsonl", GOOD_ROW + '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")),
    "data-jsonl-huge-integer": Case(
        data("{tmp}/data/train.jsonl"), ("{tmp}/data/train.jsonl:2:", "more than 4300 digits"),
        write("data/train.jsonl", GOOD_ROW + '{"text": "a", "x": ' + "7" * 5000 + "}\n")),
    "data-jsonl-lone-surrogate": Case(
        data("{tmp}/data/train.jsonl"), ("{tmp}/data/train.jsonl:3:", "surrogate", "\\ud800"),
        write("data/train.jsonl", GOOD_ROW + '{"text": "\\ud83d\\ude00 ok"}\n{"text": "bad\\ud800word"}\n')),
    "data-csv-quote-left-open": Case(  # a long review is read (test_sources.py); 64 Mi characters are not
        data("{tmp}/data/train.csv"), ("{tmp}/data/train.csv:", "not valid CSV", "quote left open"),
        quote_left_open, slow=True),
    "data-gzip-corrupt-deflate": Case(
        data("{tmp}/data/train.jsonl.gz"), ("{tmp}/data/train.jsonl.gz", "cannot read", "not intact gzip"),
        write("data/train.jsonl.gz", corrupt_gzip())),
    "data-aclimdb-dangling-symlink": Case(
        data("{tmp}/data"), ("{tmp}/data/train/pos/2_1.txt", "dangling symlink"),
        chain(REVIEW, symlink("data/train/pos/2_1.txt", "gone.txt"))),
    "data-aclimdb-folder-as-review": Case(
        data("{tmp}/data"), ("{tmp}/data/train/pos/3_1.txt", "is a folder"),
        chain(REVIEW, mkdir("data/train/pos/3_1.txt")), slow=True),
    "data-aclimdb-fifo-as-review": Case(
        data("{tmp}/data"), ("{tmp}/data/train/neg/4_1.txt", "FIFO"),
        chain(REVIEW, fifo("data/train/neg/4_1.txt")), slow=True),
    "data-source-a-fifo": Case(
        data("{tmp}/f.jsonl"), ("{tmp}/f.jsonl", "is a FIFO", "not a regular file"), fifo("f.jsonl")),
    "data-split-file-a-fifo": Case(
        data("{tmp}/data"), ("{tmp}/data/train.jsonl", "FIFO"), fifo("data/train.jsonl"), slow=True),
    "data-pattern-file-a-fifo": Case(
        data("{tmp}/data/{split}.jsonl"), ("{tmp}/data/train.jsonl", "FIFO"), fifo("data/train.jsonl"),
        slow=True),
    "data-source-dev-zero": Case(data("/dev/zero"), ("/dev/zero", "a device", "not a regular file")),
    # -- generation, merge, report (hunt) --------------------------------------------------------------
    "prompts-id-of-5000-digits": Case(
        BULK, ("prompts.jsonl:1:", "more than 4300 digits"),
        write("prompts.jsonl", '{"id": ' + "7" * 5000 + ', "prompt": "a"}\n'), run=True),
    "prompts-nested-100000-deep": Case(
        BULK, ("prompts.jsonl:1:", "nested too deeply"), write("prompts.jsonl", DEEP + "\n"), run=True),
    "prompts-nested-100000-deep-skipped": Case(
        (*BULK, "generate.bad_lines=skip"), ("prompts.jsonl", "holds no prompts", "1 bad lines"),
        write("prompts.jsonl", DEEP + "\n"), run=True, slow=True),
    "prompts-lone-surrogate-in-a-prompt": Case(
        BULK, ("prompts.jsonl:2:", "surrogate", "\\ud800"),
        write("prompts.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "the movie \\ud800 was"}\n'),
        run=True),
    "prompts-lone-surrogate-in-an-id": Case(
        BULK, ("prompts.jsonl:1:", "surrogate"), write("prompts.jsonl", '{"id": "\\udfff", "prompt": "a"}\n'),
        run=True, slow=True),
    "prompts-gzip-byte-flipped-in-the-header": Case(
        (*BULK[:-2], "generate.prompts={tmp}/p.jsonl.gz"), ("p.jsonl.gz", "cannot read", "gzip"),
        gzip_flipped("p.jsonl.gz", lambda n: 20), run=True),
    "prompts-gzip-byte-flipped-a-third-in": Case(
        (*BULK[:-2], "generate.prompts={tmp}/p.jsonl.gz"), ("p.jsonl.gz", "cannot read", "gzip"),
        gzip_flipped("p.jsonl.gz", lambda n: n // 3), run=True),
    "prompts-a-fifo": Case(
        (*BULK[:-2], "generate.prompts={tmp}/../f.jsonl"), ("f.jsonl", "FIFO", "not a regular file"),
        fifo_beside("f.jsonl"), run=True),
    "prompts-dev-zero": Case(
        (*BULK[:-2], "generate.prompts=/dev/zero"), ("/dev/zero", "device", "not a regular file"), run=True),
    "prompts-too-many-words": Case(
        BULK, ("prompts.jsonl:2:", "10001 words", "generate.max_prompt_words"),
        write("prompts.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "' + "the " * 10001 + '"}\n'),
        run=True),
    "prompts-text-line-too-many-words": Case(
        (*BULK[:-2], "generate.prompts={tmp}/p.txt", "generate.max_prompt_words=5"),
        ("p.txt:1:", "6 words", "generate.max_prompt_words"), write("p.txt", "a b c d e f\n"), run=True,
        slow=True),
    "output-params-a-json-list": Case(
        BULK, ("{tmp}/gen/params.json", "damaged", "JSON list"),
        chain(PROMPTS, write("gen/params.json", "[1]\n")),
        run=True),
    "output-params-a-folder": Case(
        BULK, ("{tmp}/gen/params.json", "not a regular file"), chain(PROMPTS, mkdir("gen/params.json")),
        run=True, slow=True),
    "output-dir-under-a-file": Case(
        (*BULK[:3], "generate.output_dir={tmp}/afile/gen", *BULK[4:]),
        ("{tmp}/afile", "is a file, not a folder"),
        chain(PROMPTS, write("afile", "a file\n")), run=True),
    "output-chunks-a-file": Case(
        BULK, ("{tmp}/gen/chunks", "is a file, not a folder"), chain(PROMPTS, write("gen/chunks", "x\n")),
        run=True),
    "merge-row-index-not-an-integer": Case(
        ("generate", "--merge", "generate.output_dir={tmp}/gen"),
        ("chunk-00000000.jsonl:1:", "not a generation row", "'index'"),
        generation_folder(json.dumps({**GEN_ROW, "index": "x"}) + "\n")),
    "merge-row-nested-100000-deep": Case(
        ("generate", "--merge", "generate.output_dir={tmp}/gen"),
        ("chunk-00000000.jsonl:1:", "not a generation row", "nested too deeply"),
        generation_folder(DEEP + "\n")),
    "merge-chunk-a-folder": Case(
        ("generate", "--merge", "generate.output_dir={tmp}/gen"), ("chunk-00000000.jsonl", "cannot read"),
        chain(generation_folder(""), lambda tmp: (tmp / "gen/chunks/chunk-00000000.jsonl").unlink(),
              mkdir("gen/chunks/chunk-00000000.jsonl")), slow=True),
    "merge-params-without-counts": Case(
        ("generate", "--merge", "generate.output_dir={tmp}/gen"),
        ("{tmp}/gen/params.json", "damaged", "chunk_size"),
        write("gen/params.json", '{"prompts": {}}\n'), slow=True),
}


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


def expand(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def without_lock(snapshot: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in snapshot.items() if Path(k).name != ".lock"}


def test_the_catalogue_is_big_and_covers_every_kind_of_input():
    default = [k for k, c in CASES.items() if not c.slow]
    assert len(default) >= 25 and len(CASES) >= 45
    for prefix in ("config", "data-", "prompts-", "profile-", "resume-", "pickle-", "manifest-"):
        assert any(k.startswith(prefix) for k in default), prefix


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_bad_input(name: str, ref: Path, tmp_path: Path):
    case = CASES[name]
    if case.slow and not SLOW:
        pytest.skip("more of the same kind: set LMCORE_SLOW_FAULTS=1 to run it")
    tmp = tmp_path / "case"
    tmp.mkdir()
    values = {"tmp": str(tmp), "run": str(tmp / "run"), "cache": str(ref / "cache"), "repo": str(REPO)}
    if case.run:
        copy_run(ref / "run", tmp / "run")
        values["ckpt"] = str(newest(tmp))
    if case.setup is not None:
        case.setup(tmp)
    args = []
    for a in case.args:
        args += train_overrides(tmp / "run", ref / "cache") if a == "{RESUME}" else [expand(a, values)]
    before = tree(tmp)
    cwd = tmp / case.cwd
    proc = subprocess.run([*LMCORE, *args], cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    line = one_error_line(proc, *(expand(e, values) for e in case.expect))
    assert len(line) < MAX_LINE, f"an error line of {len(line)} characters"
    assert not (tmp / "PWNED").exists(), "a pickle was loaded: its code ran"
    changes = tree_diff(without_lock(before), without_lock(tree(tmp)))
    assert changes == [], f"a failed job wrote: {changes}"


def test_the_shared_run_is_what_the_catalogue_assumes(ref: Path):
    names = sorted(p.name for p in (ref / "run" / "checkpoints").iterdir())
    assert names == [f"step_{TRAIN_STEPS - 2:08d}", f"step_{TRAIN_STEPS:08d}"]
