"""The training loop, flat: data position -> forward -> backward -> step -> log/eval/save.

Loss is the summed NLL over real targets divided by the number of real targets in the
whole optimizer step (all micro-batches, all ranks), so every token weighs the same
whatever the padding, accumulation or world size. The data position (epoch, index), the
carried LSTM state, RNG states, optimizer and weights are all in the checkpoint, so a run
that is stopped and resumed ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from lmcore import checkpoint as ckpt_io
from lmcore.config import Config, save_config
from lmcore.data.batching import PackedBatches, PaddedBatches
from lmcore.data.cache import fit_tokenizer, load_split, strided
from lmcore.data.tokenizer import WordTokenizer
from lmcore.errors import CheckpointError, LmcoreError
from lmcore.evaluate import evaluate
from lmcore.model import LSTMLM, adaptive_cutoffs, detach_state
from lmcore.runtime.accelerator import all_sum, any_rank, make_accelerator
from lmcore.runtime.lock import RunLock
from lmcore.track.metrics import MetricsLog
from lmcore.track.progress import Progress
from lmcore.track.tracker import open_tracker


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    stopped_early: bool  # a stop was requested (signal): resume to finish
    val_ppl: float | None
    model: LSTMLM | None = None  # the trained (unwrapped) model, for callers in-process
    rank: int = 0
    world_size: int = 1


def lr_at(step: int, cfg: Config, total_steps: int) -> float:
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    horizon = o.decay_steps or total_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, horizon - o.warmup_steps))
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_batches(cfg: Config, split, tok: WordTokenizer, rank: int, world: int):
    special = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    try:
        if cfg.data.batching == "packed":
            return PackedBatches(split, cfg.train.batch_size, cfg.data.seq_len, cfg.data.truncate,
                                 special, cfg.run.seed, rank, world)
        return PaddedBatches(split, cfg.train.batch_size, cfg.data.truncate, special, cfg.run.seed,
                             rank, world)
    except ValueError as e:
        raise LmcoreError(f"training data too small: {e}; use more data or a smaller batch") from None


def make_adam(params: list[torch.nn.Parameter], cfg: Config, device_type: str) -> torch.optim.Adam:
    """Adam, fused where this torch has it (CUDA; CPU from torch 2.4): one kernel for the
    whole update, 0.10 -> 0.02 s a step at the notebook's size on 2 CPU cores, same rule."""
    kw = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if device_type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, fused=True, **kw)
        except RuntimeError:  # an older torch without the fused CPU kernel
            pass
    return torch.optim.Adam(params, **kw)


def train(cfg: Config, stop_requested: Callable[[], bool] = lambda: False,
          progress: bool = True) -> TrainResult:
    acc = make_accelerator(cfg)
    main = acc.is_main_process
    run_dir = Path(cfg.run.dir)

    # Vocabulary and token ids: rank 0 builds the caches, the others then read them.
    with acc.main_process_first():
        tok = fit_tokenizer(cfg.data)  # cached: cheap, and it tells if the data changed
        train_split = load_split(cfg.data, cfg.data.train_split, tok)
        val_split = None
        if cfg.data.val_split:
            full_val = load_split(cfg.data, cfg.data.val_split, tok)
            val_split = strided(full_val, cfg.data.val_stride, cfg.data.val_limit)
    if cfg.model.softmax == "adaptive":
        adaptive_cutoffs(cfg.model, len(tok))  # an impossible architecture fails before any write
    # One job per run folder (taken after the data checks, so bad input writes nothing).
    lock = RunLock(run_dir).acquire() if main else None
    try:
        return _train(cfg, acc, run_dir, tok, train_split, val_split, stop_requested, progress)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, acc, run_dir: Path, tok: WordTokenizer, train_split, val_split,
           stop_requested: Callable[[], bool], progress: bool) -> TrainResult:
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    if cfg.train.resume == "never" and ckpt_io.list_checkpoints(ckpt_io.checkpoints_dir(run_dir)):
        raise LmcoreError(f"run.dir {run_dir} already holds checkpoints and train.resume=never: "
                          "use a new run.dir")
    resume_from = ckpt_io.latest_valid(run_dir) if cfg.train.resume == "auto" else None
    existing = ckpt_io.list_checkpoints(ckpt_io.checkpoints_dir(run_dir))
    if cfg.train.resume == "auto" and existing and resume_from is None:
        # Starting from step 0 here would silently throw the run's progress away.
        problems: list[str] = []
        ckpt_io.latest_valid(run_dir, problems)
        raise CheckpointError(
            f"run.dir {run_dir} holds {len(existing)} checkpoint(s) and none can be read (newest: "
            f"{problems[0]}); nothing was changed: restore a checkpoint from a backup, or start over "
            "in a new run.dir")
    if resume_from is not None:
        saved = WordTokenizer.load(resume_from / "tokenizer.json")
        if saved.fingerprint != tok.fingerprint:
            raise CheckpointError(
                f"checkpoint {resume_from} was trained with another vocabulary than data.source "
                f"{cfg.data.source} gives (tokenizer {saved.fingerprint} vs {tok.fingerprint}); "
                "point data.source at the run's data, or use a new run.dir"
            )
    batches = make_batches(cfg, train_split, tok, rank, world)
    packed = cfg.data.batching == "packed"
    steps_per_epoch = math.ceil(batches.steps_per_epoch / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    model = LSTMLM(len(tok), cfg.model, tok.pad_id, cfg.train.loss_chunk)
    optimizer = make_adam(list(model.parameters()), cfg, acc.device.type)
    step, epoch, index, tokens_seen, train_seconds, skipped = 0, 0, 0, 0, 0.0, 0
    state = None
    torch.manual_seed(cfg.run.seed * 1000 + rank)  # dropout stream per rank
    if resume_from is not None:
        manifest = ckpt_io.verify(resume_from)
        ckpt_io.check_compatible(manifest, model.architecture(), tok.fingerprint, resume_from)
        ckpt_io.load_weights(model, resume_from)
        optimizer.load_state_dict(ckpt_io.load_optimizer_state(resume_from))
        ts = ckpt_io.load_trainer_state(resume_from)
        step, epoch, index = ts["step"], ts["epoch"], ts["index"]
        skipped = ts.get("skipped_steps", 0)
        tokens_seen, train_seconds = ts["tokens_seen"], ts["train_seconds"]
        rank_state = ckpt_io.load_rank_state(resume_from, rank) if ts["world_size"] == world else None
        if rank_state is not None:
            torch.set_rng_state(rank_state["torch_rng"])
            if packed and "h" in rank_state:
                state = (rank_state["h"], rank_state["c"])
    model, optimizer = acc.prepare(model, optimizer)
    raw_model: LSTMLM = acc.unwrap_model(model)
    if state is not None:
        state = (state[0].to(acc.device), state[1].to(acc.device))

    tracker = open_tracker(cfg, run_dir, job="train", enabled=main)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main, resume_step=step, tracker=tracker)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        tok.save(run_dir / "tokenizer.json")
    bar = Progress(total_steps, initial=step, enabled=main and progress)
    if resume_from is not None:
        bar.write(f"resumed from {resume_from} at step {step}")
    bar.write(f"vocab {len(tok)}, {len(train_split)} reviews, {batches.steps_per_epoch} batches/epoch, "
              f"{total_steps} steps, world size {world}, device {acc.device}, "
              f"precision {cfg.train.mixed_precision}")

    def save_checkpoint() -> Path | None:
        # A finite but huge gradient can still push weights to inf/nan; saving them would make
        # every later resume start from a broken model. Ranks hold the same weights: all agree.
        broken = [n for n, p in raw_model.named_parameters() if not bool(torch.isfinite(p).all())]
        if broken:
            previous = ckpt_io.list_checkpoints(ckpt_io.checkpoints_dir(run_dir))
            kept = f"the last checkpoint {previous[-1]} is intact" if previous else "nothing was saved"
            raise LmcoreError(
                f"the weights are non-finite at step {step} ({', '.join(broken[:3])}"
                f"{', ...' if len(broken) > 3 else ''}), so they were not saved; {kept}: lower optim.lr "
                "or set optim.grad_clip, then resume")
        writer = ckpt_io.CheckpointWriter(run_dir, step)
        try:
            return _write_checkpoint(writer)
        except (OSError, SafetensorError) as e:  # a full disk, a quota, a vanished mount
            if main:
                writer.abort()
            previous = ckpt_io.list_checkpoints(ckpt_io.checkpoints_dir(run_dir))
            kept = (f"the previous checkpoint {previous[-1]} is intact" if previous
                    else "there is no earlier checkpoint")
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise CheckpointError(
                f"could not write checkpoint {writer.final} ({reason}); {kept}; free space (or fix the "
                "folder) and run the same command again to resume"
            ) from None

    def _write_checkpoint(writer: ckpt_io.CheckpointWriter) -> Path | None:
        if main:
            writer.begin()
        acc.wait_for_everyone()
        rank_tensors = {"torch_rng": torch.get_rng_state()}
        if packed and state is not None:
            rank_tensors.update(h=state[0], c=state[1])
        writer.write_rank(rank, rank_tensors)
        if main:
            trainer_state = {"step": step, "epoch": epoch, "index": index, "tokens_seen": tokens_seen,
                             "train_seconds": train_seconds, "world_size": world,
                             "skipped_steps": skipped}
            writer.write_main(raw_model, optimizer.state_dict(), trainer_state, tok.to_json(), cfg.to_yaml())
        acc.wait_for_everyone()
        path = None
        if main:
            path = writer.finish(raw_model.architecture(), tok.fingerprint, step, cfg.train.keep_checkpoints)
            metrics.log(step, {"event": "checkpoint", "path": str(path)})
            bar.write(f"checkpoint {path}")
        acc.wait_for_everyone()
        return path

    def validate() -> float | None:
        if val_split is None:
            return None
        res = evaluate(raw_model, val_split, tok, cfg.eval.batch_size, cfg.data.truncate, acc,
                       autocast=acc.autocast)
        # with the training clock, so that quality can be read against training time
        metrics.log(step, {"val/ppl": res.masked_ppl, "val/loss": res.masked_loss,
                           "val/targets": res.num_targets, "train_seconds": train_seconds,
                           "tokens_seen": tokens_seen})
        bar.write(f"step {step}: validation masked perplexity {res.masked_ppl:.2f} "
                  f"({res.num_targets} targets)")
        return res.masked_ppl

    model.train()
    # A finished run that is started again (a requeue after the end, say) has nothing to do.
    last_saved, val_ppl, stopped = (step if resume_from is not None else -1), None, False
    already_done = step >= total_steps
    window_loss, window_targets, window_seconds = 0.0, 0, 0.0  # since the last log line
    while step < total_steps:
        t_step = time.perf_counter()
        # The micro-batches of one optimizer step, and their real-target count on all ranks.
        micro = []
        for _ in range(cfg.train.grad_accum):
            if index >= batches.steps_per_epoch:
                epoch, index = epoch + 1, 0
            micro.append(batches.get(epoch, index))
            index += 1
        local_targets = sum(b.num_targets for b in micro)
        global_targets = all_sum(acc, [local_targets])[0]
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            if not batch.carries_state:
                state = None
            sync = acc.no_sync(model) if i < len(micro) - 1 else nullcontext()
            with sync, acc.autocast():
                out = model(batch.inputs.to(acc.device), state, batch.targets.to(acc.device))
                loss = out.loss_sum * (world / global_targets)
            acc.backward(loss)
            loss_sum += out.loss_sum.item()
            state = detach_state(out.state) if packed else None
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        lr = lr_at(step, cfg, total_steps)
        # The gradients are averaged over ranks, so every rank sees the same norm: a NaN or inf
        # loss anywhere makes it non-finite everywhere, and all ranks decide alike.
        if math.isfinite(float(grad_norm)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        elif cfg.train.nonfinite == "error":
            raise LmcoreError(
                f"non-finite loss or gradient at step {step + 1} (loss sum {loss_sum}, grad norm "
                f"{float(grad_norm)}); the last checkpoint is intact: lower optim.lr, set optim.grad_clip, "
                "or set train.nonfinite=skip to skip such steps"
            )
        else:
            skipped += 1
            metrics.log(step + 1, {"event": "nonfinite_skipped", "skipped_steps": skipped})
            bar.write(f"step {step + 1}: non-finite loss or gradient, update skipped ({skipped} so far)")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(global_targets)
        step_seconds = time.perf_counter() - t_step  # validation and checkpoints excluded
        train_seconds += step_seconds
        window_seconds += step_seconds
        window_loss += loss_sum
        window_targets += local_targets

        log_now = step % cfg.train.log_interval == 0 or step == total_steps
        if log_now:
            total_loss, total_targets = all_sum(acc, [window_loss, window_targets])
            mean = total_loss / max(total_targets, 1)
            row = {"train/loss": mean, "train/ppl": math.exp(min(mean, 50.0)), "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": total_targets / window_seconds,
                   "epoch": epoch, "tokens_seen": tokens_seen, "train_seconds": train_seconds}
            metrics.log(step, row)
            shown = {"loss": mean, "ppl": row["train/ppl"], "tok/s": row["tokens_per_s"]}
            window_loss, window_targets, window_seconds = 0.0, 0, 0.0  # since the last log line
        bar.update(1, shown if log_now else {}, log_line=log_now)
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < total_steps:
            val_ppl = validate()
        if step % cfg.train.checkpoint_interval == 0 and step < total_steps:
            save_checkpoint()
            last_saved = step
        if any_rank(acc, stop_requested()):
            stopped = step < total_steps
            break
    bar.close()
    path = save_checkpoint() if last_saved != step else None
    if not stopped and not already_done:
        val_ppl = validate()
    elif already_done:
        bar.write(f"nothing to do: {resume_from} is already at step {step} of {total_steps}")
    if main:
        path = path or ckpt_io.checkpoints_dir(run_dir) / ckpt_io.step_dir_name(step)
    acc.wait_for_everyone()
    tracker.finish()
    acc.end_training()
    return TrainResult(run_dir, step, path, stopped, val_ppl, raw_model, rank, world)
