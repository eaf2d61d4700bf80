"""What runs on the nodes: one `LmcoreJob` per submitted job, called by submitit in every task.

Ranks. Each SLURM task is one rank (srun starts them all, on every node). Before the
Accelerator exists, RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT are exported from
submitit's TorchDistributedEnvironment (itself from SLURM_PROCID, SLURM_NTASKS, the node
list); the port is derived from the job id and restart count so all ranks agree without
talking. On CPU nodes the same path gives gloo (make_accelerator: cpu=not cuda).

Stop, checkpoint, requeue. submitit installs its handlers before calling us: the warning
signal (USR2 by default) calls `checkpoint()` on rank 0 only, from the main thread; SIGTERM
is ignored. A signal handler runs in the main thread between bytecodes, so it cannot wait
for a training loop running in that same thread. Hence the job runs in a worker thread
while the main thread waits:

- warning signal (time limit, preemption with a user signal, `job._interrupt()`): rank 0's
  `checkpoint()` sets the stop flag; every rank sees it at the next step boundary (the
  trainer's any_rank), all save a checkpoint at the same step; `checkpoint()` waits for
  that (bounded by signal_delay_s), then returns a fresh submission: submitit pickles it,
  runs `scontrol requeue` and exits. The requeued job resumes from run.dir's latest
  checkpoint (train.resume=auto); a generation shard skips its finished chunks.
- SIGTERM (a cancel, a preemption, `scontrol requeue`): our handler sets the stop flag on
  every rank; after the checkpoint, every rank waits for SLURM to end the job (at most
  term_wait_s, then it exits with status 3 without a result). It must not exit by itself:
  SLURM requeues a preempted job only if it is still running when its GraceTime is over (a
  job that ends in its grace time stays ended: tried on the local cluster), and a cancel kills
  it after KillWait anyway (it stays CANCELLED). A warning signal in that time (submitit's
  `_interrupt()` sends TERM then USR2) requeues it as above.
- Requeues are capped by max_requeues (SLURM_RESTART_COUNT): past it, the job fails with
  a message saying where the checkpoint is.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

from lmcore.config import config_from_dict
from lmcore.errors import LmcoreError
from lmcore.runtime.leave import leave, leave_when_written, multi_rank
from lmcore.runtime.signals import STOPPED_EXIT
from lmcore.slurm import JobFailedError
from lmcore.slurm.env import master_port, resolve_master, threads_from_slurm

KINDS = ("train", "eval", "generate", "merge")  # as lmcore.jobs.KINDS (not imported here: see _work)


def _log(message: str) -> None:
    print(f"lmcore[slurm]: {message}", file=sys.stderr, flush=True)


class _Escape(BaseException):
    """Raised by checkpoint() into the main thread's wait loop when the work has already
    finished: the job reports its result instead of being requeued. A BaseException so
    that nothing between the signal and the wait loop swallows it."""


class _Stop:
    """The stop_requested callable of the trainer and the generation job, set by the signal paths."""

    WHERE = {"train": "at the next step, with a checkpoint", "generate": "after the current chunk",
             "eval": "(eval reruns from the start)", "merge": "(the merge reruns)"}

    def __init__(self, kind: str = "train") -> None:
        self.reason: str | None = None
        self.kind = kind

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            _log(f"{reason}: stopping {self.WHERE[self.kind]}")

    def __call__(self) -> bool:
        return self.reason is not None


class LmcoreJob(Checkpointable):
    """A picklable job: KIND ('train', 'eval', 'generate', 'merge') with a resolved config."""

    def __init__(self, kind: str, cfg: dict[str, Any], max_requeues: int = 3,
                 signal_delay_s: int = 90, term_wait_s: int = 600) -> None:
        assert kind in KINDS, kind
        self.kind, self.cfg = kind, cfg
        self.max_requeues, self.signal_delay_s, self.term_wait_s = max_requeues, signal_delay_s, term_wait_s
        self._reset()

    def _reset(self) -> None:
        self._stop = _Stop(self.kind)
        self._worker: threading.Thread | None = None
        self._outcome: dict[str, Any] = {}
        self._guard = False

    def __getstate__(self) -> dict[str, Any]:  # threads and flags do not travel
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def fresh(self) -> LmcoreJob:
        return LmcoreJob(self.kind, self.cfg, self.max_requeues, self.signal_delay_s, self.term_wait_s)

    # --- in the job ------------------------------------------------------------------
    def __call__(self) -> dict[str, Any] | None:
        env = submitit.JobEnvironment()
        stale = env.paths.result_pickle  # a result from a run before a requeue must not be read
        if stale.exists():
            stale.unlink()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        rank = self._setup_ranks(env, restarts)
        cfg = self._config()
        if submitit.JobEnvironment._usr_sig() != signal.SIGTERM:  # else TERM is the warning signal
            signal.signal(signal.SIGTERM, lambda *_: self._stop.set("SIGTERM"))

        self._worker = threading.Thread(target=self._work, args=(cfg,), name=f"lmcore-{self.kind}",
                                        daemon=True)
        self._guard = True
        try:
            self._worker.start()
            while self._worker.is_alive():
                self._worker.join(timeout=0.5)
            if self._stopped_early():
                self._wait_to_be_ended(cfg.run.dir)
            self._guard = False
            _quiet_signals()
        except _Escape:
            _quiet_signals()
        if "error" in self._outcome:
            error = self._outcome["error"]
            if isinstance(error, LmcoreError):  # the one line first; submitit's trace follows
                print(f"lmcore: error: {error}", file=sys.stderr, flush=True)
            raise error
        if self._stopped_early():
            # Not requeued by us: SLURM cancels this job or requeues it itself (preemption).
            # Leave no result, so a client sees the job's real state, not a stale answer.
            reason = self._stop.reason or "a stop request on another rank"
            _log(f"stopped ({reason}) with a checkpoint in {cfg.run.dir}; exiting with status "
                 f"{STOPPED_EXIT} and no result: resubmit (or let SLURM requeue) to resume")
            leave(STOPPED_EXIT)
        result = self._outcome["outcome"].result
        if isinstance(result, dict):  # where this rank ran, for whoever reads the job's results
            result = {**result, "restarts": restarts, "host": socket.gethostname(),
                      "master_addr": os.environ.get("MASTER_ADDR", ""), "slurm_rank": rank}
        if multi_rank():  # once submitit has written the result (runtime/leave.py says why)
            leave_when_written(env.paths.result_pickle)
        return result

    def _wait_to_be_ended(self, run_dir: str) -> None:
        """After a SIGTERM stop and its checkpoint: stay until SLURM ends or requeues the job."""
        reason = self._stop.reason or "a stop request on another rank"
        _log(f"stopped ({reason}) with a checkpoint in {run_dir}; waiting for SLURM to end the job (a "
             "cancel ends it after KillWait, a preemption requeues it when its GraceTime is over), at most "
             f"{self.term_wait_s} s")
        deadline = time.monotonic() + self.term_wait_s
        while time.monotonic() < deadline:  # a warning signal here requeues the job (checkpoint())
            time.sleep(0.2)

    def _setup_ranks(self, env: Any, restarts: int) -> int:
        # sbatch hands the submitting shell's environment down: overwrite, never inherit.
        # CUDA_VISIBLE_DEVICES stays as SLURM set it (all the node's GPUs of the job):
        # Accelerate picks cuda:LOCAL_RANK among them.
        os.environ["MASTER_PORT"] = str(master_port(env.job_id, restarts))
        dist = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        dist.master_addr = os.environ["MASTER_ADDR"] = resolve_master(dist.master_addr)
        threads = threads_from_slurm()
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch's first import, below
        import torch  # deferred: OMP_NUM_THREADS (just above) must be set before torch is imported

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and gpus <= dist.local_rank:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            raise JobFailedError(
                f"rank {dist.rank} has local rank {dist.local_rank} but sees {gpus} GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={visible}): every task must see all the GPUs of its node; "
                "request them with gpus_per_node, not per task, and no --gpu-bind")
        _log(f"{self.kind} job {env.job_id} on {socket.gethostname()}: rank {dist.rank}/{dist.world_size} "
             f"(local {dist.local_rank}/{dist.local_world_size}), rendezvous {dist.master_addr}:"
             f"{dist.master_port}, restart {restarts}, {threads or 'default'} threads")
        return dist.rank

    def _config(self):
        cfg = config_from_dict(self.cfg)
        if not cfg.run.threads:
            cfg.run.threads = threads_from_slurm()
        return cfg

    def _work(self, cfg) -> None:
        # Imported in the worker, after _setup_ranks set OMP_NUM_THREADS: this imports torch.
        from lmcore.jobs import run_job

        try:
            self._outcome["outcome"] = run_job(self.kind, cfg, self._stop, progress=True)
        except BaseException as e:  # re-raised by the main thread
            self._outcome["error"] = e

    def _stopped_early(self) -> bool:
        """The work ended early on a stop request (any rank's: the ranks agree) and must be
        resumed. The job's own answer counts, not this rank's flag: another rank may have
        received the signal."""
        outcome = self._outcome.get("outcome")
        return outcome is not None and outcome.stopped

    # --- submitit's hook: rank 0, main thread, inside its warning-signal handler ------
    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        self._stop.set(f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')} (time limit or preemption)")
        worker = self._worker
        if worker is not None and self.kind in ("train", "generate"):
            # Wait for every rank to save at the same step; not past the time limit.
            worker.join(timeout=max(5.0, self.signal_delay_s - 15.0))
            if worker.is_alive():
                _log("no checkpoint in time: requeueing; the job resumes from its last saved checkpoint")
        finished = worker is not None and not worker.is_alive() and not self._stopped_early()
        if finished and self._guard:  # finished (or failed) before the signal: report, do not requeue
            self._guard = False
            raise _Escape()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            raise JobFailedError(
                f"{self.kind} job stopped by a time limit or preemption and not requeued: it was already "
                f"requeued {restarts} time(s) (max_requeues={self.max_requeues}); its checkpoint is in "
                f"{self.cfg.get('run', {}).get('dir', 'run.dir')}: submit it again to continue")
        _log(f"requeueing ({restarts + 1} of at most {self.max_requeues} requeues)")
        return DelayedSubmission(self.fresh())


def _quiet_signals() -> None:
    """Once the work is over, a late warning signal must not requeue a finished job."""
    def ignore(signum: int, frame: Any) -> None:
        _log(f"{signal.Signals(signum).name} after the work finished: ignored")

    for sig in {submitit.JobEnvironment._usr_sig(), signal.SIGTERM}:
        signal.signal(sig, ignore)
