"""The bulk generation job: sharded over SLURM array tasks and DDP ranks, resumable.
What the output folder holds and how it is claimed: lmcore/gen/folder.py; the merge of the
finished chunks into one file: lmcore/gen/merge.py.

Work is cut into chunks of `generate.chunk_size` input lines. Chunk c belongs to shard
c % num_shards (SLURM array task), and within the shard the j-th chunk goes to rank
j % world_size (DDP). A chunk file is written atomically once all its completions exist,
so a chunk file present means done: a rerun (requeue, crash, SIGKILL) skips those and
does the rest, and so does a rerun with another number of shards or ranks. Since every
(prompt id, sample) draws from its own random stream and rows do not influence each
other, the merged file is the same bytes however the work was split (see
lmcore/gen/decoder.py for what that rests on).

Everything that can be wrong (a malformed line, a missing field, a duplicate id, a
checkpoint that does not load, a precision the model cannot run, parameters that differ from
what the folder holds) stops the job before it claims the folder, on every process alike.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmcore import fileio
from lmcore.checkpoint import Checkpoint, resolve
from lmcore.config import Config
from lmcore.errors import ConfigError, write_failed
from lmcore.gen.decoder import Completion, Decoder
from lmcore.gen.folder import (
    REJECTS_FILE,
    GenerationError,
    check_output_dir,
    chunk_path,
    claim_params,
    done_chunks,
    job_params,
    resolve_precision,
    resolve_shard,
    sampling_dict,
)
from lmcore.gen.prompts import PromptRecord, PromptSource, ScanResult
from lmcore.gen.sampling import SamplingParams, row_key, row_uniforms
from lmcore.rundir import RunDir
from lmcore.runtime.accelerator import all_sum, any_rank, make_accelerator
from lmcore.runtime.lock import RunLock
from lmcore.track.progress import Progress
from lmcore.track.tracker import Tracker
from lmcore.track.wandb_init import open_tracker

LOG_EVERY_S = 30.0  # plain progress lines (log files) at most this often
SAMPLE_TABLE_ROWS = 20


def generate_shard(cfg: Config, stop_requested: Callable[[], bool] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Generate this process's part of the job into generate.output_dir (skipping chunks
    already written) and return counts; "stopped" is true when a stop request ended it
    with work left (rerun the same command to finish)."""
    t0 = time.perf_counter()
    job = ShardJob(cfg)  # checks everything; writes nothing
    with job.claim():
        return job.run(stop_requested or (lambda: False), progress, t0)


@dataclass
class Counts:
    rows: int = 0
    new_tokens: int = 0
    chunks: int = 0
    seconds: float = 0.0  # decoding only

    @property
    def speed(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


@dataclass
class ShardJob:
    """One process's share of a bulk generation job, checked before anything is written."""

    cfg: Config
    acc: Any = field(init=False)
    ckpt: Checkpoint = field(init=False)

    def __post_init__(self) -> None:
        g = self.g = self.cfg.generate
        if not g.output_dir:
            raise ConfigError("set generate.output_dir: the bulk generation job writes its files there")
        if not g.prompts and g.num_samples == 0:
            raise ConfigError("nothing to generate: set generate.prompts (a file) or "
                              "generate.num_samples > 0")
        self.out = Path(g.output_dir)
        check_output_dir(self.out)
        self.source = PromptSource(g.prompts or None, g.num_samples, g.max_prompt_words)
        self.source.check()  # before a checkpoint is loaded: a missing or special file fails at once
        self.shard, self.nshards = resolve_shard(g.num_shards, g.shard_index)
        self.ckpt = resolve(g.checkpoint or self.cfg.run.dir, self.cfg.run.dir)  # verified once, here
        self.acc = make_accelerator(self.cfg)
        acc = self.acc
        self.rank, self.world, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        self.model, self.tok = self.ckpt.build_model(self.acc.device)
        self.precision = resolve_precision(g.precision, self.out, self.acc.device)
        Decoder.check(self.model, self.precision, self.acc.device)
        self.rejects: IO[bytes] | None = None
        self.scan = self._scan()
        self.params = job_params(self.cfg, self.ckpt.info(), self.source, self.scan, self.precision)

    def _scan(self) -> ScanResult:
        """Check the whole input. With bad_lines=skip the bad lines are kept aside (in memory, or
        a temp file past a few MB) until the folder is claimed, then published as rejects.jsonl."""
        g = self.g
        if g.bad_lines != "skip" or self.source.path is None:
            return self.source.scan(g.chunk_size, g.bad_lines)
        self.rejects = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 - closed by claim()

        def reject(lineno: int, why: str, raw: bytes) -> None:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            row = json.dumps({"line": lineno, "error": why, "text": text}, ensure_ascii=False)
            self.rejects.write((row + "\n").encode("utf-8"))

        return self.source.scan(g.chunk_size, "skip", reject)

    @contextlib.contextmanager
    def claim(self) -> Iterator[None]:
        """params.json (or agreement with it), rejects.jsonl, and this shard's lock."""
        try:
            claim_params(self.out, self.params)
            if self.rejects is not None and self.main:
                self.rejects.seek(0)
                fileio.atomic_write(self.out / REJECTS_FILE, lambda f: shutil.copyfileobj(self.rejects, f))
        except OSError as e:
            raise GenerationError(write_failed(self.out / REJECTS_FILE, e, "nothing was generated yet",
                                               "run the same command again", self.out)) from None
        finally:
            if self.rejects is not None:
                self.rejects.close()
        lock = None
        if self.main:
            lock = RunLock(self.out / ".locks" / f"shard-{self.shard:05d}-of-{self.nshards:05d}",
                           what="output folder", hint="generate.output_dir, or another shard").acquire()
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    # -- the work -------------------------------------------------------------------------------
    def run(self, stop_requested: Callable[[], bool], progress: bool, t0: float) -> dict[str, Any]:
        g, acc = self.g, self.acc
        total_chunks = len(self.scan.chunk_records)
        shard_chunks = list(range(self.shard, total_chunks, self.nshards))
        already = done_chunks(self.out)
        todo = {c for j, c in enumerate(shard_chunks) if j % self.world == self.rank and c not in already}
        stream = _Peek(self.source.records(lambda i: i // g.chunk_size in todo, self.scan.skip))
        rows_todo = sum(self.scan.chunk_records[c] for c in todo) * g.samples_per_prompt
        self.bar = Progress(rows_todo, enabled=self.main and progress, desc="generate", unit="row")
        self.bar.write(f"{self.source.describe()}: {self.scan.records} prompts x {g.samples_per_prompt} "
                       f"samples in {total_chunks} chunks; shard {self.shard} of 0..{self.nshards - 1}: "
                       f"{len([c for c in shard_chunks if c in already])} of its {len(shard_chunks)} chunks "
                       f"already done; world size {self.world}, device {acc.device}, "
                       f"precision {self.precision}")
        self.tracker = _tracker(self.cfg, self.ckpt, self.out, self.main)
        self.counts, self.table, self._last_log = Counts(), [], time.monotonic()
        self.decoder: Decoder | None = None  # laid out on first use: a finished job's rerun needs none
        abandoned = False
        # Every rank takes part in every round, so that they agree on stopping at the same round.
        for k in range(-(-len(shard_chunks) // self.world)):
            j = k * self.world + self.rank
            c = shard_chunks[j] if j < len(shard_chunks) else None
            if c is not None and c in todo and not abandoned:
                abandoned = not self.run_chunk(c, stream.take_chunk(c, g.chunk_size), stop_requested)
            if any_rank(acc, abandoned or stop_requested()):
                break
        self.bar.close()
        acc.wait_for_everyone()
        return self._summary(total_chunks, shard_chunks, already, t0)

    def run_chunk(self, c: int, records: list[PromptRecord], stop_requested: Callable[[], bool]) -> bool:
        """Generate and write one chunk; False if a stop request cut it short (nothing written)."""
        g, sp = self.g, self.g.samples_per_prompt
        if self.decoder is None:
            fixed_rows = g.batch_size if self.acc.device.type == "cuda" else 0  # the same kernels every step
            self.decoder = Decoder(self.model, self.tok, SamplingParams(g.temperature, g.top_k, g.top_p,
                                                                        g.max_new_tokens),
                                   self.acc.device, self.precision, fixed_rows)
        encoded = [self.tok.encode(r.text) for r in records]
        rows = [(i, s) for i in range(len(records)) for s in range(sp)]
        order = sorted(range(len(rows)), key=lambda k: -len(encoded[rows[k][0]]))  # length-aware batches
        results: list[Completion | None] = [None] * len(rows)
        for b in range(0, len(order), g.batch_size):
            batch = order[b:b + g.batch_size]
            keys = [row_key(g.seed, records[rows[k][0]].id, rows[k][1]) for k in batch]
            t = time.perf_counter()
            prompts = [encoded[rows[k][0]] for k in batch]
            done = self.decoder.generate(prompts, row_uniforms(keys, g.max_new_tokens))
            self.counts.seconds += time.perf_counter() - t
            for k, d in zip(batch, done, strict=True):
                results[k] = d
            self._progress(len(batch), sum(len(d.token_ids) for d in done))
            if stop_requested():
                return False
        self._write_chunk(c, records, encoded, rows, results)
        return True

    def _write_chunk(self, c: int, records: list[PromptRecord], encoded: list[list[int]],
                     rows: list[tuple[int, int]], results: list) -> None:
        row_params = {k: v for k, v in sampling_dict(self.g).items() if k != "samples_per_prompt"}
        lines = []
        for k, (i, s) in enumerate(rows):
            rec, ids, d = records[i], encoded[i], results[k]
            row = {"id": rec.id, "index": rec.index, "sample": s, "prompt": rec.text,
                   "completion": self.tok.decode(d.token_ids), "num_tokens": len(d.token_ids),
                   "finish_reason": d.finish_reason, "prompt_tokens": len(ids),
                   "prompt_unknown": sum(1 for t in ids if t == self.tok.unk_id), "params": row_params}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            if len(self.table) < SAMPLE_TABLE_ROWS:
                self.table.append([str(rec.id), s, rec.text, row["completion"], d.finish_reason])
        try:
            fileio.atomic_write_bytes(chunk_path(self.out, c), "".join(lines).encode("utf-8"))
        except OSError as e:
            kept = f"the {len(done_chunks(self.out))} finished chunks in {self.out} are intact"
            raise GenerationError(write_failed(chunk_path(self.out, c), e, kept,
                                               "run the same command again to continue", self.out)) from None
        n = self.counts
        n.chunks += 1
        self.tracker.log(n.rows, {"generate/new_tokens_per_s": n.speed, "generate/rows": n.rows,
                                  "generate/new_tokens": n.new_tokens, "generate/chunks_written": n.chunks})
        if self.bar.bar is None:
            self.bar.write(f"chunk {c} written ({self.bar.n}/{self.bar.total} rows)")

    def _progress(self, rows: int, new_tokens: int) -> None:
        self.counts.rows += rows
        self.counts.new_tokens += new_tokens
        if self.bar.bar is not None:
            self.bar.update(rows, {"tok/s": self.counts.speed}, log_line=True)
            return
        self.bar.n += rows
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            self.bar.write(f"{self.bar.n}/{self.bar.total} rows, {self.counts.speed:.0f} new tokens/s")

    def _summary(self, total_chunks: int, shard_chunks: list[int], already: set[int], t0: float) -> dict:
        acc, n = self.acc, self.counts
        rows, new_tokens, chunks, secs = all_sum(acc, [n.rows, n.new_tokens, n.chunks, n.seconds])
        present = done_chunks(self.out)
        shard_left = [c for c in shard_chunks if c not in present]
        result = {
            "output_dir": str(self.out), "shard": self.shard, "num_shards": self.nshards,
            "world_size": self.world, "rank": self.rank, "chunks_total": total_chunks,
            "shard_chunks": len(shard_chunks),
            "chunks_done_before": len([c for c in shard_chunks if c in already]),
            "chunks_written": int(chunks), "rows": int(rows), "new_tokens": int(new_tokens),
            "new_tokens_per_s": round(new_tokens / secs, 1) if secs else 0.0,
            "seconds": round(time.perf_counter() - t0, 2), "precision": self.precision,
            "device": str(acc.device),
            "prompts": self.scan.records, "rejected_lines": self.scan.rejected,
            "stopped": bool(shard_left), "shard_complete": not shard_left,
            "complete": all(c in present for c in range(total_chunks)),
        }
        self.tracker.summary({f"generate/{k}": v for k, v in result.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if self.table:
            self.tracker.table("generate/samples", ["id", "sample", "prompt", "completion", "finish_reason"],
                               self.table)
        self.tracker.finish(0)
        return result


class _Peek:
    """The records of the chunks this process does, taken one chunk at a time."""

    def __init__(self, it: Iterator[PromptRecord]):
        self.it, self.head = it, None

    def take_chunk(self, c: int, size: int) -> list[PromptRecord]:
        out = []
        while True:
            if self.head is None:
                self.head = next(self.it, None)
                if self.head is None:
                    return out
            if self.head.index // size != c:
                return out
            out.append(self.head)
            self.head = None


def _tracker(cfg: Config, ckpt: Checkpoint, out: Path, enabled: bool) -> Tracker:
    """The W&B tracker, linked to the training run's folder when the checkpoint is in one.
    Tracking never stops generation: a tracker that cannot start is a no-op."""
    if not enabled:
        return Tracker()
    run = RunDir.of_checkpoint(ckpt.path)
    try:
        return open_tracker(cfg, run.path if run else out, "generate", enabled=True)
    except Exception as e:  # noqa: BLE001 - whatever W&B does, the job goes on
        warnings.warn(f"tracking is off for this job ({type(e).__name__}: {e})", stacklevel=2)
        return Tracker()
