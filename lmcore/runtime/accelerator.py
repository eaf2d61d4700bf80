"""Process setup shared by the jobs: the Accelerator, threads, and small collectives."""

from __future__ import annotations

import ctypes
import datetime
import os
import re
import socket

import torch

from lmcore.config import Config
from lmcore.deps import require
from lmcore.errors import PeerLostError, first_line
from lmcore.runtime.leave import multi_rank
from lmcore.runtime.precision import auto_precision, require_supported
from lmcore.slurm.env import nodes_down

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc keep big freed blocks for reuse instead of returning them to the kernel.

    Every training step frees and re-allocates tensors above glibc's largest mmap threshold
    (32 MB): the output layer's gradient, Adam's temporaries, the embedding gradient. Each
    fresh mapping then costs a page fault per 4 KB on first touch. Measured on the notebook's
    model (2 CPU cores, packed batches): +6.6% tokens/s and half the system time, for about
    70 MB more peak RSS. Not glibc (musl, macOS): nothing to do, returns False."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def make_accelerator(cfg: Config):
    """One Accelerator for CPU, one GPU or DDP, as the launcher (torchrun, accelerate
    launch, srun) set up the environment. On a machine without CUDA it must be told cpu=True,
    or a 2-process CPU launch silently runs two unconnected copies."""
    os.environ.setdefault("ACCELERATE_DISABLE_RICH", "1")  # read when accelerate is imported, just below
    require("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    if not multi_rank():
        # Accelerate keeps its settings process-wide; a single process may run several jobs
        # with different precisions (tests, notebooks, pipelines), so start each one fresh.
        AcceleratorState._reset_state(reset_partial_state=True)

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    keep_freed_memory()
    # A bounded wait in every collective: a rank whose peer's node died ends in minutes, not at the
    # time limit (gloo's own default is 30 minutes).
    group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.run.collective_timeout_s))
    return Accelerator(cpu=not torch.cuda.is_available(),
                       mixed_precision=autocast_of(cfg.train.mixed_precision), kwargs_handlers=[group])


def autocast_of(setting: str) -> str:
    """train.mixed_precision as accelerate takes it: auto is bf16 where the hardware is fast in it
    (runtime/precision.auto_precision: CUDA with bf16, a CPU with AMX or AMD's AVX512_BF16), else no.
    imdb_fast a step in bf16 against fp32: 0.16-0.19 s against 0.24-0.27 on the AMX VM, 0.142 against
    0.233 on the AMD EPYC of 2026-12-06; on Intel's CPUs without AMX bf16 ran at about half fp32's speed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if setting in ("bf16", "fp16"):
        require_supported(setting, device, "train.mixed_precision")
    if setting != "auto":
        return setting
    return "bf16" if auto_precision(device) == "bf16" else "no"


def rank_hosts(accelerator) -> list[str]:
    """The host of every rank, in rank order (one collective, at the start of a job)."""
    if accelerator.num_processes == 1:
        return [socket.gethostname()]
    hosts: list[str | None] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return [str(h) for h in hosts]


# What a collective raises when a peer is gone: DistError subclasses, or (from DDP's backward hooks
# and gloo) a plain RuntimeError naming the transport; a bug elsewhere never matches these.
_PEER_GONE = re.compile(r"gloo|nccl|c10d|ProcessGroup|Connection (reset|closed|refused)|timed out|Timeout",
                        re.I)


def peer_gone(error: BaseException) -> bool:
    """Whether this exception means another rank stopped answering (its node died or hung)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and bool(_PEER_GONE.search(str(error))))


def out_of_memory(error: BaseException) -> str | None:
    """What an allocation failure asked for ("3.2 GiB for one tensor"), or None if it is not one:
    torch's CPU allocator raises a RuntimeError, CUDA a torch.OutOfMemoryError."""
    if isinstance(error, MemoryError):
        return "Python ran out of memory"
    text = str(error)
    if not isinstance(error, RuntimeError) or not (isinstance(error, torch.OutOfMemoryError)
                                                   or "can't allocate memory" in text):
        return None
    asked = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([\d.]+ [KMGT]iB)", text)
    if asked is None:
        return "out of memory"
    if asked.group(1).isdigit():
        return f"{int(asked.group(1)) / 2**30:.1f} GiB for one tensor"
    return f"{asked.group(1)} for one tensor"


def lost_contact(rank: int, hosts: list[str] | None, error: BaseException, kept: str) -> PeerLostError:
    """One line for a collective that failed or timed out: what the transport said, where the
    other ranks ran (and which of those nodes SLURM reports down), what is kept, what to do."""
    me = hosts[rank] if hosts else socket.gethostname()
    others = sorted({h for h in hosts or [] if h != me}) or [me]
    down = nodes_down(others)
    where = f"node(s) {', '.join(down)} are down" if down else f"the other ranks ran on {', '.join(others)}"
    # gloo prefixes its source position and appends advice; keep the sentence in between
    said = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0]
    return PeerLostError(f"rank {rank} on {me} lost contact with the other ranks ({said}); {where}; {kept}: "
                         "submit the job again (on healthy nodes: sbatch --exclude=NODE) to resume")


def all_sum(accelerator, values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (float64)."""
    if accelerator.num_processes == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def broadcast_object(accelerator, obj):
    """Rank 0's (picklable) obj on every rank: a decision made once, shared."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if any rank says so: how ranks agree to stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
