"""Training, read top to bottom: `train()` checks and sets up, `Trainer.fit()` is the loop,
`Trainer.train_step()` one optimizer step.

Loss is the summed NLL over real targets divided by the number of real targets in the whole
optimizer step (all micro-batches, all ranks), so every token weighs the same whatever the
padding, accumulation or world size. Where training stands (TrainState: step, data position,
counters) and what differs per rank (RankState: the dropout RNG, the carried LSTM state, the
loss window of the next log row) are saved in every checkpoint with the weights and the
optimizer, so a run that is stopped and resumed ends with the same weights, and logs the same
rows, as one that never stopped.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lmcore import fileio
from lmcore.checkpoint import Checkpoint, CheckpointWriter, find_latest, list_checkpoints
from lmcore.config import Config
from lmcore.data.batching import training_batches
from lmcore.data.cache import Corpus, cache_root, load_corpus
from lmcore.errors import CheckpointError, LmcoreError, write_failed
from lmcore.evaluate import evaluate
from lmcore.model import LSTMLM, adaptive_cutoffs, detach_state
from lmcore.optim import lr_at, make_adam
from lmcore.rundir import RunDir
from lmcore.runtime.accelerator import (
    all_sum,
    any_rank,
    broadcast_object,
    lost_contact,
    make_accelerator,
    out_of_memory,
    peer_gone,
    rank_hosts,
)
from lmcore.runtime.lock import RunLock
from lmcore.runtime.precision import dtypes_of, eval_precision, resolve
from lmcore.slurm.env import job_record
from lmcore.track.metrics import MetricsLog
from lmcore.track.progress import Progress
from lmcore.track.wandb_init import open_tracker
from lmcore.train_state import RankState, StepOutput, TrainResult, TrainState


def train(cfg: Config, stop_requested: Callable[[], bool] = lambda: False,
          progress: bool = True) -> TrainResult:
    """Train (or resume) the run in cfg.run.dir. Everything that can be checked is checked
    before the run folder is claimed (its lock taken), so bad input writes nothing."""
    RunDir(cfg.run.dir).check_kinds()
    acc = make_accelerator(cfg)
    with acc.main_process_first():  # rank 0 builds the token caches, the others then read them
        corpus = load_corpus(cfg.data)
    if cfg.model.softmax == "adaptive":
        adaptive_cutoffs(cfg.model, len(corpus.tokenizer))
    trainer = Trainer(cfg, acc, corpus)
    lock = RunLock(cfg.run.dir).acquire() if acc.is_main_process else None
    try:
        trainer.resume_or_start()
        return trainer.fit(stop_requested, progress)
    finally:
        if lock is not None:  # a new run folder that got not one step done is not kept
            lock.release(discard=trainer.state.step == 0 and not list_checkpoints(trainer.run.checkpoints))


class Trainer:
    """One rank's training job: model, optimizer, batches, state, and what each step does."""

    def __init__(self, cfg: Config, acc, corpus: Corpus):
        self.cfg, self.acc, self.corpus = cfg, acc, corpus
        self.run = RunDir(cfg.run.dir)
        self.rank, self.world, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        tok = corpus.tokenizer
        self.batches = training_batches(cfg.data, corpus.train, tok, cfg.train.batch_size, cfg.run.seed,
                                        self.rank, self.world)
        self.packed = cfg.data.batching == "packed"
        steps_per_epoch = math.ceil(self.batches.steps_per_epoch / cfg.train.grad_accum)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self.model = _build_model(len(tok), cfg, tok.pad_id)
        self.optimizer = make_adam(list(self.model.parameters()), cfg.optim, acc.device.type)
        torch.manual_seed(cfg.run.seed * 1000 + self.rank)  # dropout's stream, one per rank
        self.state = TrainState(world_size=self.world)
        self.rank_state = RankState()
        self.resumed_from: Path | None = None
        self.early_stopped = False
        self.hosts = rank_hosts(acc)  # for the message if a rank's node dies
        self.loss_precision_why = ""  # what train.loss_precision chose, and why (_choose_loss_precision)

    # -- setup ----------------------------------------------------------------------------------
    def resume_or_start(self) -> None:
        """Load run.dir's latest checkpoint (train.resume=auto), then claim the run folder."""
        cfg, run = self.cfg, self.run
        latest = find_latest(run)
        if cfg.train.resume == "never" and latest.count:
            raise LmcoreError(f"run.dir {run.path} already holds checkpoints and train.resume=never: "
                              "use a new run.dir")
        if latest.count and latest.checkpoint is None:  # starting over would discard the run
            raise CheckpointError(
                f"run.dir {run.path} holds {latest.count} checkpoint(s) and none can be read (newest: "
                f"{latest.problems[0]}); nothing was changed: restore a checkpoint from a backup, or start "
                "over in a new run.dir")
        if latest.checkpoint is not None:
            for problem in latest.problems:
                warnings.warn(f"skipping damaged checkpoint: {problem}", stacklevel=2)
            self.restore(latest.checkpoint)
        self._note_mixed_precision()
        self._choose_loss_precision()
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.raw_model: LSTMLM = self.acc.unwrap_model(self.model)
        self.tracker = open_tracker(cfg, run.path, job="train", enabled=self.main)
        self.metrics = MetricsLog(run.metrics, enabled=self.main, resume_step=self.state.step,
                                  tracker=self.tracker)
        if self.main:  # the run's config and vocabulary, beside its checkpoints; the SLURM job
            self._record(run.config, lambda: fileio.atomic_write_text(run.config, cfg.to_yaml()))
            self._record(run.tokenizer, lambda: fileio.atomic_write_text(run.tokenizer,
                                                                         self.corpus.tokenizer.to_json()))
            job = job_record()
            if job is not None:
                row = json.dumps({**job, "kind": "train", "step": self.state.step,
                                  "time": round(time.time(), 3)})
                self._record(run.jobs, lambda: fileio.append_line(run.jobs, row))

    def _note_mixed_precision(self) -> None:
        """Record the autocast this run uses; a resumed run that now uses another one says so
        (train.mixed_precision=auto on another kind of node, or a changed setting)."""
        s, now = self.state, self.acc.mixed_precision
        if self.resumed_from is not None and s.mixed_precision and s.mixed_precision != now:
            warnings.warn(f"train.mixed_precision={self.cfg.train.mixed_precision} is {now} here, the run "
                          f"used {s.mixed_precision} before: the resumed run is not bit-identical to an "
                          "uninterrupted one", stacklevel=2)
        s.mixed_precision = now

    def _choose_loss_precision(self) -> None:
        """train.loss_precision, decided once per run on the main rank and shared (a timing could
        differ between ranks); "auto" keeps a resumed run's earlier choice."""
        t, s = self.cfg.train, self.state
        earlier = s.loss_precision if self.resumed_from is not None else ""
        try:
            dtypes_of(earlier)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {self.resumed_from}: trainer_state.json: {e}; resume it with "
                                  "the lmcore version that wrote it") from None
        if t.loss_precision == "auto" and earlier:
            self.loss_precision_why = "auto: the run's earlier choice"
        else:
            choice, self.loss_precision_why = broadcast_object(
                self.acc, self._decide_loss_precision() if self.main else None)
            if earlier and choice != earlier:
                warnings.warn(f"train.loss_precision={t.loss_precision} ({choice}) is not what the run used "
                              f"before ({earlier}): the resumed run is not bit-identical to an uninterrupted "
                              "one", stacklevel=2)
            s.loss_precision = choice
        self.model.loss_dtypes = dtypes_of(s.loss_precision)

    def _decide_loss_precision(self) -> tuple[str, str]:
        t = self.cfg.train
        if t.loss_precision == "auto" and self.acc.device.type != "cpu":
            return "autocast", (f"auto on {self.acc.device.type}: the probe measures CPU matmuls, so the "
                                "loss follows train.mixed_precision")
        head = getattr(self.model, "head", None)  # (the config allows auto only with the full softmax)
        return resolve(t.loss_precision, t.loss_chunk, head.in_features if head is not None else 0,
                       len(self.corpus.tokenizer), cache_root(self.cfg.data), self.acc.device.type)

    def _record(self, path: Path, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as e:
            raise LmcoreError(write_failed(path, e, "nothing was trained", "run the same command again",
                                           self.run.path)) from None

    def restore(self, ckpt: Checkpoint) -> None:
        tok = self.corpus.tokenizer
        if ckpt.manifest["tokenizer_fingerprint"] != tok.fingerprint:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was trained with another vocabulary than data.source "
                f"{self.cfg.data.source} gives (tokenizer {ckpt.manifest['tokenizer_fingerprint']} vs "
                f"{tok.fingerprint}); point data.source at the run's data, or use a new run.dir")
        ckpt.check_compatible(self.model.architecture(), tok.fingerprint)
        ckpt.load_weights(self.model)
        self.optimizer.load_state_dict(ckpt.optimizer_state())
        saved_world = self.state.world_size
        self.state.load_state_dict(ckpt.trainer_state())
        rank_state = ckpt.rank_state(self.rank) if self.state.world_size == self.world else None
        if rank_state is not None:
            self.rank_state.load_state_dict(rank_state, self.acc.device)
        self.state.world_size = saved_world
        self.resumed_from = ckpt.path

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, stop_requested: Callable[[], bool], progress: bool) -> TrainResult:
        s, t, total = self.state, self.cfg.train, self.total_steps
        self.bar = Progress(total, initial=s.step, enabled=self.main and progress)
        self._announce()
        # A finished run started again (a requeue after the end, say) has nothing to do.
        already_done = s.step >= total or self._finished_before() is not None
        last_saved = s.step if self.resumed_from is not None else -1
        val_ppl, stopped = None, False
        self.model.train()
        try:
            while s.step < total and not already_done:
                out = self.train_step()
                self.log(out)
                # validation and checkpoints at their intervals (the last step's come after the loop);
                # with train.keep_best, a new best validation is saved at once
                best = False
                if t.eval_interval and s.step % t.eval_interval == 0 and s.step < total:
                    val_ppl = self.validate()
                    best = self.note_validation(val_ppl)
                if (s.step % t.checkpoint_interval == 0 or (best and t.keep_best)) and s.step < total:
                    self.save()
                    last_saved = s.step
                    self.record_best()
                # early stopping or the time budget end the run here
                if self._run_ends():
                    break
                # a stop request on any rank: all stop at this step
                if any_rank(self.acc, stop_requested()):
                    stopped = s.step < total
                    break
        except RuntimeError as e:
            failure = self._step_failure(e)
            if failure is None:
                raise
            self.tracker.finish(exit_code=1)  # before the CLI's exit (a lost peer's skips atexit)
            raise failure from None
        self.bar.close()
        # the end: validate (unless stopped, or early stopping just did), then save, so that the last
        # checkpoint records its own validation
        if not stopped and not already_done and not self.early_stopped:
            val_ppl = self.validate()
            self.note_validation(val_ppl)
        path = self.save() if last_saved != s.step else None
        self.record_best()
        if already_done:
            why = f"of {total}" if s.step >= total else self._finished_before()
            self.bar.write(f"nothing to do: {self.resumed_from} is already at step {s.step} ({why})")
            self.early_stopped = why == "stopped early"
        return self._result(path, stopped, val_ppl)

    def _finished_before(self) -> str | None:
        """Why a resumed run has nothing left to do (its early stop or its time budget), or None."""
        s, t = self.state, self.cfg.train
        if t.max_train_seconds and s.train_seconds >= t.max_train_seconds:
            return "its time budget spent"
        if t.early_stop_patience and s.stale_validations >= t.early_stop_patience:
            return "stopped early"
        return None

    def _run_ends(self) -> bool:
        """Early stopping (too many validations without a new best), or the time budget spent (rank
        0's clock decides for all): the end of the run, not a stop."""
        s, t = self.state, self.cfg.train
        if t.early_stop_patience and s.stale_validations >= t.early_stop_patience:
            self.early_stopped = True
            self.bar.write(f"step {s.step}: {s.stale_validations} validations without a better "
                           f"perplexity than {s.best_val:.2f} (step {s.best_step}): stopping early")
            return True
        budget = t.max_train_seconds
        if budget and any_rank(self.acc, self.main and s.train_seconds >= budget):
            self.bar.write(f"step {s.step}: {s.train_seconds:.0f} s of training, the budget "
                           f"train.max_train_seconds={budget:g}: ending the run here")
            return True
        return False

    def _step_failure(self, e: RuntimeError) -> LmcoreError | None:
        """The one line for a step that failed: a rank gone, or out of memory; None for other errors."""
        if peer_gone(e):  # a collective failed or timed out: a rank is gone
            return lost_contact(self.acc.process_index, self.hosts, e, self._kept())
        asked = out_of_memory(e)
        if asked is None:
            return None
        return LmcoreError(f"out of memory at step {self.state.step + 1} ({asked}); {self._kept()}: lower "
                           "train.batch_size (raise train.grad_accum to keep the batch), data.truncate "
                           "or the model size, then run again")

    def _result(self, path: Path | None, stopped: bool, val_ppl: float | None) -> TrainResult:
        """Every rank waits for the others, closes its tracker and returns what it did."""
        s = self.state
        if self.main:
            path = path or self.run.step_dir(s.step)
        self.acc.wait_for_everyone()
        self.tracker.finish()  # the process group stays: a rank ends as runtime/leave.py says
        best = {"step": s.best_step, "val_ppl": s.best_val} if s.best_step >= 0 else None
        if best and self.cfg.train.keep_best:
            best["checkpoint"] = str(self.run.step_dir(s.best_step))
        return TrainResult(self.run.path, s.step, path, stopped, val_ppl, self.raw_model, self.rank,
                           self.world, best, self.early_stopped)

    def train_step(self) -> StepOutput:
        """One optimizer step: its micro-batches forward and backward, then the update."""
        acc, s, t0 = self.acc, self.state, time.perf_counter()
        micro = [self._next_batch() for _ in range(self.cfg.train.grad_accum)]
        local_targets = sum(b.num_targets for b in micro)
        # the loss is a mean over all ranks' targets; rank 0's clock sets a time-horizon schedule
        global_targets, seconds_before = all_sum(acc, [local_targets, s.train_seconds if self.main else 0.0])
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            state = self.rank_state.lstm if batch.carries_state else None
            sync = acc.no_sync(self.model) if i < len(micro) - 1 else nullcontext()
            with sync, acc.autocast():
                out = self.model(batch.inputs.to(acc.device), state, batch.targets.to(acc.device))
                loss = out.loss_sum * (self.world / global_targets)
            acc.backward(loss)
            loss_sum += out.loss_sum.item()
            self.rank_state.lstm = detach_state(out.state) if self.packed else None
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or math.inf))
        budget = self.cfg.train.max_train_seconds
        lr = lr_at(s.step, self.cfg.optim, self.total_steps, seconds_before / budget if budget else 0.0)
        self._update(grad_norm, lr, loss_sum)
        s.step += 1
        s.tokens_seen += int(global_targets)
        seconds = time.perf_counter() - t0
        s.train_seconds += seconds
        w = self.rank_state.window
        w[0], w[1], w[2] = w[0] + loss_sum, w[1] + local_targets, w[2] + seconds
        return StepOutput(loss_sum, local_targets, grad_norm, lr)

    def _next_batch(self):
        s = self.state
        if s.index >= self.batches.steps_per_epoch:
            s.epoch, s.index = s.epoch + 1, 0
        batch = self.batches.get(s.epoch, s.index)
        s.index += 1
        return batch

    def _update(self, grad_norm: float, lr: float, loss_sum: float) -> None:
        # The gradients are averaged over ranks, so every rank sees the same norm: a NaN or inf
        # loss anywhere makes it non-finite everywhere, and all ranks decide alike.
        s = self.state
        if math.isfinite(grad_norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        elif self.cfg.train.nonfinite == "error":
            raise LmcoreError(
                f"non-finite loss or gradient at step {s.step + 1} (loss sum {loss_sum}, grad norm "
                f"{grad_norm}); {self._kept()}: lower optim.lr, set optim.grad_clip, or set "
                "train.nonfinite=skip to skip such steps")
        else:
            s.skipped_steps += 1
            self.metrics.log(s.step + 1, {"event": "nonfinite_skipped", "skipped_steps": s.skipped_steps})
            self.bar.write(f"step {s.step + 1}: non-finite loss or gradient, update skipped "
                           f"({s.skipped_steps} so far)")
        self.optimizer.zero_grad(set_to_none=True)

    # -- logging, validation, checkpoints -----------------------------------------------------
    def _announce(self) -> None:
        s, tok = self.state, self.corpus.tokenizer
        if self.resumed_from is not None:
            self.bar.write(f"resumed from {self.resumed_from} at step {s.step}")
        auto = " (train.mixed_precision=auto)" if self.cfg.train.mixed_precision == "auto" else ""
        self.bar.write(f"vocab {len(tok)}, {len(self.corpus.train)} reviews, {self.batches.steps_per_epoch} "
                       f"batches/epoch, {self.total_steps} steps, world size {self.world}, device "
                       f"{self.acc.device}, precision {self.acc.mixed_precision}{auto}")
        if self.cfg.train.loss_precision != "autocast":
            self.bar.write(f"loss matmuls (out, out_grad_h, out_grad_w): {s.loss_precision} "
                           f"({self.loss_precision_why})")

    def log(self, out: StepOutput) -> None:
        """A metrics row every train.log_interval steps (and at the end), averaged over its window."""
        s = self.state
        log_now = s.step % self.cfg.train.log_interval == 0 or s.step == self.total_steps
        shown: dict[str, float] = {}
        if log_now:
            w = self.rank_state.window
            total_loss, total_targets = all_sum(self.acc, w[:2])
            mean = total_loss / max(total_targets, 1)
            row = {"train/loss": mean, "train/ppl": math.exp(min(mean, 50.0)), "lr": out.lr,
                   "grad_norm": out.grad_norm, "tokens_per_s": total_targets / w[2], "epoch": s.epoch,
                   "tokens_seen": s.tokens_seen, "train_seconds": s.train_seconds}
            self.metrics.log(s.step, row)
            shown = {"loss": mean, "ppl": row["train/ppl"], "tok/s": row["tokens_per_s"]}
            self.rank_state.window = [0.0, 0.0, 0.0]
        self.bar.update(1, shown, log_line=log_now)

    def validate(self) -> float | None:
        val = self.corpus.val
        if val is None:
            return None
        _, autocast = eval_precision(self.cfg.eval.precision, self.acc.device)  # not the training's
        res = evaluate(self.raw_model, val, self.corpus.tokenizer, self.cfg.eval.batch_size,
                       self.cfg.data.truncate, self.acc, autocast=autocast)
        s = self.state  # with the training clock, so that quality can be read against training time
        self.metrics.log(s.step, {"val/ppl": res.masked_ppl, "val/loss": res.masked_loss,
                                  "val/targets": res.num_targets, "train_seconds": s.train_seconds,
                                  "tokens_seen": s.tokens_seen})
        self.bar.write(f"step {s.step}: validation masked perplexity {res.masked_ppl:.2f} "
                       f"({res.num_targets} targets)")
        return res.masked_ppl

    def note_validation(self, val_ppl: float | None) -> bool:
        """Whether this validation is the best so far (the counters live in TrainState)."""
        s = self.state
        if val_ppl is None:
            return False
        if val_ppl < s.best_val:
            s.best_val, s.best_step, s.stale_validations = val_ppl, s.step, 0
            return True
        s.stale_validations += 1
        return False

    def record_best(self) -> None:
        """train.keep_best: RUN/best.json names the best validation's checkpoint, once it exists."""
        s = self.state
        if not (self.main and self.cfg.train.keep_best and s.best_step >= 0):
            return
        ckpt = self.run.step_dir(s.best_step)
        if not (ckpt / "manifest.json").is_file():
            return
        record = {"step": s.best_step, "val_ppl": s.best_val, "checkpoint": str(ckpt),
                  "val_split": self.cfg.data.val_split}
        try:
            fileio.atomic_write_json(self.run.best, record)
        except OSError as e:
            raise LmcoreError(write_failed(self.run.best, e, self._kept(), "run the same command again",
                                           self.run.path)) from None

    def save(self) -> Path | None:
        """A checkpoint of every rank at this step; a failure on any rank stops all of them, with the
        previous checkpoint intact."""
        s = self.state
        # A finite but huge gradient can still push weights to inf/nan; saving them would make
        # every later resume start from a broken model. Ranks hold the same weights: all agree.
        broken = [n for n, p in self.raw_model.named_parameters() if not bool(torch.isfinite(p).all())]
        if broken:
            raise LmcoreError(
                f"the weights are non-finite at step {s.step} ({', '.join(broken[:3])}"
                f"{', ...' if len(broken) > 3 else ''}), so they were not saved; {self._kept()}: lower "
                "optim.lr or set optim.grad_clip, then resume")
        t0 = time.perf_counter()
        writer = CheckpointWriter(self.run, s.step)
        arch, fingerprint, keep = (self.raw_model.architecture(), self.corpus.tokenizer.fingerprint,
                                   self.cfg.train.keep_checkpoints)
        best = self.run.step_dir(s.best_step).name if self.cfg.train.keep_best and s.best_step >= 0 else None
        parts = [(self.main, writer.begin), (True, lambda: self._write_files(writer)),
                 (self.main, lambda: writer.finish(arch, fingerprint, s.step, keep, best))]
        for mine, part in parts:  # each part done, on every rank, before the next one starts
            error = _attempt(part) if mine else None
            if any_rank(self.acc, error is not None):
                if self.main:
                    writer.abort()
                if error is None:
                    raise CheckpointError(f"could not write checkpoint {writer.final} (another rank failed: "
                                          f"its error is in its log); {self._kept('previous')}") from None
                kept = self._kept("previous")
                raise CheckpointError(write_failed(f"checkpoint {writer.final}", error, kept,
                                                   "run the same command again to resume",
                                                   self.run.checkpoints)) from None
        if self.main:  # its time, against the warning signal's lead and SLURM's GraceTime
            seconds = round(time.perf_counter() - t0, 3)
            self.metrics.log(s.step, {"event": "checkpoint", "path": str(writer.final), "seconds": seconds})
            self.bar.write(f"checkpoint {writer.final} ({seconds:.2f} s)")
        return writer.final if self.main else None

    def _write_files(self, writer: CheckpointWriter) -> None:
        writer.write_rank(self.rank, self.rank_state.state_dict())
        if self.main:
            writer.write_main(self.raw_model, self.optimizer.state_dict(), self.state.state_dict(),
                              self.corpus.tokenizer.to_json(), self.cfg.to_yaml())

    def _kept(self, which: str = "last") -> str:
        previous = list_checkpoints(self.run.checkpoints)
        if not previous:
            return "no earlier checkpoint exists"
        return f"the {which} checkpoint {previous[-1]} is intact"


def _build_model(vocab: int, cfg: Config, pad_id: int) -> LSTMLM:
    m = cfg.model
    try:
        return LSTMLM(vocab, m, pad_id, cfg.train.loss_chunk)
    except (MemoryError, RuntimeError) as e:
        asked = out_of_memory(e)
        if asked is None:
            raise
        raise LmcoreError(f"the model (vocabulary {vocab}, embedding_dim {m.embedding_dim}, hidden_dim "
                          f"{m.hidden_dim}, {m.num_layers} layer(s)) does not fit in memory ({asked}); "
                          "lower model.embedding_dim or model.hidden_dim") from None


def _attempt(part: Callable[[], Any]) -> BaseException | None:
    """Run one part of a checkpoint write; the error of a full disk or a vanished mount, or None."""
    try:
        part()
    except (OSError, SafetensorError) as e:
        return e
    return None
