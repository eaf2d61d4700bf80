"""The bulk generation job: sharded over SLURM array tasks and DDP ranks, resumable, merged.
What the output folder holds (params.json, chunks/, rejects.jsonl, generations.jsonl,
manifest.json) and how it is claimed: lmcore/gen/folder.py.

Work is cut into chunks of `generate.chunk_size` input lines. Chunk c belongs to shard
c % num_shards (SLURM array task), and within the shard the j-th chunk goes to rank
j % world_size (DDP). A chunk file is written atomically once all its completions exist,
so a chunk file present means done: a rerun (requeue, crash, SIGKILL) skips those and
does the rest, and so does a rerun with another number of shards or ranks. Since every
(prompt id, sample) draws from its own random stream and rows do not influence each
other, the merged file is the same bytes however the work was split (see
lmcore/gen/decoder.py for what that rests on).

Errors in the input (a malformed line, a missing field, a duplicate id, parameters that
differ from what the folder holds) stop the job before any work, on every process alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from lmcore import checkpoint as ckpt_io
from lmcore.errors import ConfigError
from lmcore.fileio import atomic_write, atomic_write_bytes, atomic_write_json
from lmcore.gen.decoder import Decoder, SamplingParams, row_key, row_uniforms
from lmcore.gen.folder import (
    CHUNKS_DIR,
    FORMAT,
    MANIFEST_FILE,
    MERGED_FILE,
    PARAMS_FILE,
    REJECTS_FILE,
    VERSION,
    GenerationError,
    checkpoint_info,
    chunk_path,
    claim_params,
    done_chunks,
    job_params,
    read_params,
    resolve_precision,
    resolve_shard,
    sampling_dict,
)
from lmcore.gen.prompts import PromptRecord, PromptSource, ScanResult

LOG_EVERY_S = 30.0  # plain progress lines (log files) at most this often
SAMPLE_TABLE_ROWS = 20


# -- the shard ------------------------------------------------------------------------------
def _scan(source: PromptSource, g) -> tuple[ScanResult, Path | None]:
    """Check the whole input. With bad_lines=skip the bad lines are collected in a temp file
    (returned), published as OUT/rejects.jsonl only once the folder's parameters agree."""
    if g.bad_lines != "skip" or source.path is None:
        return source.scan(g.chunk_size, g.bad_lines), None
    fd, tmp = tempfile.mkstemp(prefix="lmcore-rejects-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            def reject(lineno: int, why: str, raw: bytes) -> None:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                f.write(json.dumps({"line": lineno, "error": why, "text": text}, ensure_ascii=False) + "\n")

            result = source.scan(g.chunk_size, "skip", reject)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result, Path(tmp)


class _Peek:
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


def _open_tracker(cfg, ckpt: Path, out: Path, enabled: bool):
    """The W&B tracker (lmcore.track.tracker), or None: tracking never stops generation."""
    if not enabled:
        return None
    try:
        from lmcore.track.tracker import open_tracker

        # The training run's folder (RUN/checkpoints/step_X -> RUN) links the runs in W&B.
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else out
        return open_tracker(cfg, run_dir, "generate", enabled=True)
    except Exception as e:  # a missing or broken tracking module
        warnings.warn(f"tracking is off for this job ({type(e).__name__}: {e})", stacklevel=2)
        return None


def _track(tracker, method: str, *args) -> None:
    if tracker is None:
        return
    with contextlib.suppress(Exception):
        getattr(tracker, method)(*args)


def generate_shard(cfg, stop_requested: Callable[[], bool] | None = None, progress: bool = True) -> dict:
    """Generate this process's part of the job into generate.output_dir (skipping chunks
    already written) and return counts; "stopped" is true when a stop request ended it
    with work left (rerun the same command to finish)."""
    from lmcore.checkpoint import load_for_inference
    from lmcore.runtime.accelerator import make_accelerator

    t_start = time.perf_counter()
    stop_requested = stop_requested or (lambda: False)
    g = cfg.generate
    if not g.output_dir:
        raise ConfigError("set generate.output_dir: the bulk generation job writes its files there")
    if not g.prompts and g.num_samples == 0:
        raise ConfigError("nothing to generate: set generate.prompts (a file) or generate.num_samples > 0")
    if g.chunk_size <= 0:
        raise ConfigError(f"config generate.chunk_size must be > 0; got {g.chunk_size}")
    out = Path(g.output_dir)
    shard, nshards = resolve_shard(g.num_shards, g.shard_index)
    ckpt = ckpt_io.resolve(g.checkpoint or cfg.run.dir)
    ckinfo = checkpoint_info(ckpt)
    acc = make_accelerator(cfg)
    main = acc.is_main_process
    model, tok, _ = load_for_inference(ckpt, acc.device)  # a checkpoint that cannot load writes nothing
    source = PromptSource(g.prompts or None, g.num_samples)
    scan, rejects = _scan(source, g)
    try:
        precision = resolve_precision(g.precision, out, acc.device)
        params = job_params(cfg, ckinfo, source, scan, precision)
        claim_params(out, params)
        if rejects is not None and main:
            atomic_write(out / REJECTS_FILE, lambda tmp: shutil.copyfile(rejects, tmp))
    finally:
        if rejects is not None:
            rejects.unlink(missing_ok=True)

    from lmcore.runtime.lock import RunLock

    lock = (RunLock(out / ".locks" / f"shard-{shard:05d}-of-{nshards:05d}", what="output folder",
                    hint="generate.output_dir, or another shard").acquire() if main else None)
    try:
        return _generate(cfg, g, acc, out, ckpt, model, tok, source, scan, precision, shard, nshards,
                         stop_requested, progress, t_start)
    finally:
        if lock is not None:
            lock.release()


def _generate(cfg, g, acc, out, ckpt, model, tok, source, scan, precision, shard, nshards, stop_requested,
              progress, t_start):
    from lmcore.runtime.accelerator import all_sum, any_rank
    from lmcore.track.progress import Progress

    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    sampling = SamplingParams(g.temperature, g.top_k, g.top_p, g.max_new_tokens)
    fixed_rows = g.batch_size if acc.device.type == "cuda" else 0  # same kernels every step
    decoder: Decoder | None = None  # laid out on first use: a finished job's rerun needs none
    row_params = {k: v for k, v in sampling_dict(g).items() if k != "samples_per_prompt"}

    cs, sp = g.chunk_size, g.samples_per_prompt
    total_chunks = len(scan.chunk_records)
    shard_chunks = list(range(shard, total_chunks, nshards))
    already = done_chunks(out)
    mine = [c for j, c in enumerate(shard_chunks) if j % world == rank]
    todo = [c for c in mine if c not in already]
    todo_set = set(todo)
    stream = _Peek(source.records(lambda i: i // cs in todo_set, scan.skip))

    rows_todo = sum(scan.chunk_records[c] for c in todo) * sp
    bar = Progress(rows_todo, enabled=main and progress, desc="generate", unit="row")
    bar.write(f"{source.describe()}: {scan.records} prompts x {sp} samples in {total_chunks} chunks; shard "
              f"{shard} of 0..{nshards - 1}: {len([c for c in shard_chunks if c in already])} of its "
              f"{len(shard_chunks)} chunks already done; world size {world}, device {acc.device}, "
              f"precision {precision}")
    tracker = _open_tracker(cfg, ckpt, out, main)
    samples_table: list[list] = []
    counts = {"rows": 0, "new_tokens": 0, "chunks": 0}
    gen_seconds = 0.0
    last_log = time.monotonic()
    abandoned = False

    def run_chunk(c: int, records: list[PromptRecord]) -> bool:
        """Generate and write one chunk; False if a stop request cut it short."""
        nonlocal gen_seconds, last_log, decoder
        if decoder is None:
            decoder = Decoder(model, tok, sampling, acc.device, precision, fixed_rows)
        encoded = [tok.encode(r.text) for r in records]
        rows = [(i, s) for i in range(len(records)) for s in range(sp)]
        order = sorted(range(len(rows)), key=lambda k: -len(encoded[rows[k][0]]))  # length-aware
        results: list = [None] * len(rows)
        for b in range(0, len(order), g.batch_size):
            batch = order[b:b + g.batch_size]
            keys = [row_key(g.seed, records[rows[k][0]].id, rows[k][1]) for k in batch]
            t0 = time.perf_counter()
            prompts = [encoded[rows[k][0]] for k in batch]
            done = decoder.generate(prompts, row_uniforms(keys, g.max_new_tokens))
            dt = time.perf_counter() - t0
            gen_seconds += dt
            new = sum(len(d.token_ids) for d in done)
            for k, d in zip(batch, done, strict=True):
                results[k] = d
            counts["rows"] += len(batch)
            counts["new_tokens"] += new
            now = time.monotonic()
            speed = counts["new_tokens"] / max(gen_seconds, 1e-9)
            if bar.bar is not None:
                bar.update(len(batch), {"tok/s": speed}, log_line=True)
            else:
                bar.n += len(batch)
                if now - last_log >= LOG_EVERY_S:
                    last_log = now
                    bar.write(f"{bar.n}/{bar.total} rows, {speed:.0f} new tokens/s")
            if stop_requested():
                return False
        lines = []
        unk = tok.unk_id
        for k, (i, s) in enumerate(rows):
            rec, ids, d = records[i], encoded[i], results[k]
            row = {"id": rec.id, "index": rec.index, "sample": s, "prompt": rec.text,
                   "completion": tok.decode(d.token_ids), "num_tokens": len(d.token_ids),
                   "finish_reason": d.finish_reason, "prompt_tokens": len(ids),
                   "prompt_unknown": sum(1 for t in ids if t == unk), "params": row_params}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            if len(samples_table) < SAMPLE_TABLE_ROWS:
                samples_table.append([str(rec.id), s, rec.text, row["completion"], d.finish_reason])
        try:
            atomic_write_bytes(chunk_path(out, c), "".join(lines).encode("utf-8"))
        except OSError as e:
            raise GenerationError(f"could not write {chunk_path(out, c)} ({e.strerror or e}); the "
                                  f"{len(done_chunks(out))} finished chunks in {out} are intact: free space "
                                  "and run the same command again to continue") from None
        counts["chunks"] += 1
        _track(tracker, "log", counts["rows"], {
            "generate/new_tokens_per_s": counts["new_tokens"] / max(gen_seconds, 1e-9),
            "generate/rows": counts["rows"], "generate/new_tokens": counts["new_tokens"],
            "generate/chunks_written": counts["chunks"]})
        if bar.bar is None and main and progress:
            bar.write(f"chunk {c} written ({bar.n}/{bar.total} rows)")
        return True

    rounds = -(-len(shard_chunks) // world)
    for k in range(rounds):
        j = k * world + rank
        c = shard_chunks[j] if j < len(shard_chunks) else None
        if c is not None and c in todo_set and not abandoned:
            records = stream.take_chunk(c, cs)
            abandoned = not run_chunk(c, records)
        if any_rank(acc, abandoned or stop_requested()):
            break
    bar.close()
    acc.wait_for_everyone()
    rows, new_tokens, chunks, secs = all_sum(acc, [counts["rows"], counts["new_tokens"], counts["chunks"],
                                                   gen_seconds])
    present = done_chunks(out)
    acc.end_training()  # frees the process group: a rank may exit while rank 0 still merges
    shard_left = [c for c in shard_chunks if c not in present]
    result = {
        "output_dir": str(out), "shard": shard, "num_shards": nshards, "world_size": world, "rank": rank,
        "chunks_total": total_chunks, "shard_chunks": len(shard_chunks),
        "chunks_done_before": len([c for c in shard_chunks if c in already]), "chunks_written": int(chunks),
        "rows": int(rows), "new_tokens": int(new_tokens),
        "new_tokens_per_s": round(new_tokens / secs, 1) if secs else 0.0,
        "seconds": round(time.perf_counter() - t_start, 2), "precision": precision, "device": str(acc.device),
        "prompts": scan.records, "rejected_lines": scan.rejected,
        "stopped": bool(shard_left), "shard_complete": not shard_left,
        "complete": len(present) >= total_chunks and all(c in present for c in range(total_chunks)),
    }
    _track(tracker, "summary", {f"generate/{k}": v for k, v in result.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if samples_table:
        columns = ["id", "sample", "prompt", "completion", "finish_reason"]
        _track(tracker, "table", "generate/samples", columns, samples_table)
    _track(tracker, "finish", 0)
    return result


# -- merging --------------------------------------------------------------------------------
def merge_outputs(cfg) -> dict:
    """Check that every chunk is there and consistent, write OUT/generations.jsonl (input
    order) and OUT/manifest.json; return the manifest."""
    g = cfg.generate
    if not g.output_dir:
        raise ConfigError("set generate.output_dir to the folder to merge")
    out = Path(g.output_dir)
    params = read_params(out)
    if params is None:
        raise GenerationError(f"no generations in {out} (no {PARAMS_FILE}); run the generate job first")
    cs = params["chunk_size"]
    sp = params["sampling"]["samples_per_prompt"]
    total = params["prompts"]["chunks"]
    present = done_chunks(out)
    missing = [c for c in range(total) if c not in present]
    if missing:
        shown = ", ".join(str(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise GenerationError(f"{out}: {len(missing)} of {total} chunks are not written yet (chunks {shown}; "
                              f"chunk c holds input lines c*{cs} .. (c+1)*{cs}-1); rerun the generate job "
                              "for the shards that did not finish, then merge")
    counts = {"prompts": 0, "rows": 0, "new_tokens": 0, "finish_eos": 0, "finish_length": 0,
              "empty_prompts": 0, "unknown_only_prompts": 0}
    sha = hashlib.sha256()
    size = 0

    def write(tmp: str) -> None:
        nonlocal size
        with open(tmp, "wb") as f:
            for c in range(total):
                path = chunk_path(out, c)
                last = (-1, sp - 1)
                with open(path, "rb") as src:
                    for n, raw in enumerate(src, 1):
                        try:
                            row = json.loads(raw)
                            key = (row["index"], row["sample"])
                            reason = row["finish_reason"]
                        except (ValueError, KeyError, TypeError):
                            raise GenerationError(f"{path}:{n}: not a generation row; delete the chunk "
                                                  "file and rerun the generate job") from None
                        if last[1] < sp - 1:  # the next sample of the same prompt
                            ok = key == (last[0], last[1] + 1)
                        else:  # the first sample of a later prompt of this chunk
                            ok = key[1] == 0 and key[0] > last[0] and key[0] // cs == c
                        if not ok:
                            raise GenerationError(f"{path}:{n}: row (index {key[0]}, sample {key[1]}) is out "
                                                  "of place (duplicate, missing or foreign row); delete the "
                                                  "chunk file and rerun the generate job")
                        last = key
                        counts["rows"] += 1
                        counts["new_tokens"] += row["num_tokens"]
                        counts["finish_eos" if reason == "eos" else "finish_length"] += 1
                        if key[1] == 0:
                            counts["prompts"] += 1
                            counts["empty_prompts"] += row["prompt_tokens"] == 0
                            only_unknown = 0 < row["prompt_tokens"] == row["prompt_unknown"]
                            counts["unknown_only_prompts"] += only_unknown
                        sha.update(raw)
                        size += len(raw)
                        f.write(raw)
                if last[1] != sp - 1:
                    raise GenerationError(f"{path}: the last prompt has {last[1] + 1} of {sp} samples; "
                                          "delete the chunk file and rerun the generate job")

    try:
        atomic_write(out / MERGED_FILE, write)
    except OSError as e:
        raise GenerationError(f"could not write {out / MERGED_FILE} ({e.strerror or e}); the chunks in {out} "
                              "are intact: free space and merge again") from None
    expected = params["prompts"]["records"]
    if counts["prompts"] != expected:
        raise GenerationError(f"{out}: the chunks hold {counts['prompts']} prompts, the input has "
                              f"{expected}; delete the chunks folder and rerun")
    for p in (out / CHUNKS_DIR).glob(".chunk-*.tmp"):  # debris of killed writers
        p.unlink(missing_ok=True)
    files = {MERGED_FILE: {"sha256": sha.hexdigest(), "bytes": size, "rows": counts["rows"]}}
    rejects = out / REJECTS_FILE
    rejected = 0
    if rejects.is_file():
        data = rejects.read_bytes()
        rejected = data.count(b"\n")
        files[REJECTS_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                               "rows": rejected}
    manifest = {
        "format": FORMAT, "version": VERSION, "checkpoint": params["checkpoint"],
        "prompts": params["prompts"], "sampling": params["sampling"], "precision": params["precision"],
        "chunk_size": cs, "chunks": total,
        "counts": {**counts, "rejected_lines": rejected}, "files": files,
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return manifest


def cli_generate(cfg, merge: bool) -> int:
    """`lmcore generate` with generate.output_dir (the bulk job) or --merge. Prints one JSON
    line on rank 0; exit status 0, or STOPPED_EXIT (3) when a stop signal ended it early."""
    from lmcore.runtime.signals import STOPPED_EXIT, StopFlag

    if merge:
        manifest = merge_outputs(cfg)
        out = Path(cfg.generate.output_dir)
        print(json.dumps({"merged": str(out / MERGED_FILE), "manifest": str(out / MANIFEST_FILE),
                          **manifest["counts"], "sha256": manifest["files"][MERGED_FILE]["sha256"]}))
        return 0
    with StopFlag() as stop:
        result = generate_shard(cfg, stop_requested=stop)
    if result["rank"] != 0:
        return STOPPED_EXIT if result["stopped"] else 0
    if result["complete"] and result["num_shards"] == 1:
        manifest = merge_outputs(cfg)
        result["merged"] = str(Path(cfg.generate.output_dir) / MERGED_FILE)
        result["sha256"] = manifest["files"][MERGED_FILE]["sha256"]
    print(json.dumps(result))
    return STOPPED_EXIT if result["stopped"] else 0
