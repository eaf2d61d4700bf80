"""What SLURM's environment says about this process: its rank (torch.distributed's RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from SLURM's, for one process per task:
`srun` starts every rank, on every node), its array task, its CPUs.

Accelerate reads these when the Accelerator is created (lmcore.runtime.make_accelerator),
so they must be in os.environ before that. Taking them from SLURM_PROCID and friends in
each task (never from the batch shell, which runs on the first node only) is what keeps
every node from thinking it is rank 0. Standard library only: the plain sbatch path
(`lmcore --slurm-task`) works without submitit.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
from collections.abc import Mapping

PORT_RANGE = (20000, 60000)


def master_port(job_id: str, restart: str | int = 0) -> int:
    """A port every rank computes alike, distinct per job and per run: two jobs sharing a
    node do not collide, and a requeued run does not wait for the last run's socket."""
    return random.Random(f"lmcore-{job_id}-{restart}").randint(*PORT_RANGE)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu3' -> 'gpu07',
    'rack[1-2]-n[3-4]' -> 'rack1-n3'. Rank 0 runs there (SLURM_PROCID 0 is on the first node)."""
    first_group = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first_group)


def resolve_master(host: str) -> str:
    """MASTER_ADDR that the other ranks can reach. SLURM node names are usually host names,
    but a node may be known by another address (slurm.conf NodeAddr: a fabric interface, or
    127.0.0.1 on the local test cluster); then ask SLURM for it rather than fail to resolve."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", host], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return host
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else host


def torch_env_from_slurm(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables for torch's env:// rendezvous, from the environment of one SLURM task."""
    ntasks = int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 1)
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    job_id = env.get("SLURM_JOB_ID", "0")
    out = {
        "RANK": env.get("SLURM_PROCID", "0"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": str(ntasks),
        "LOCAL_WORLD_SIZE": str(max(1, ntasks // max(1, nnodes))),
        "MASTER_ADDR": resolve_master(first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
                                                 or "127.0.0.1")),
        "MASTER_PORT": str(master_port(job_id, env.get("SLURM_RESTART_COUNT", "0"))),
    }
    return out


def threads_from_slurm(env: Mapping[str, str] = os.environ) -> int:
    """Torch threads per task: the CPUs SLURM gave the task (0 when it did not say). Without
    this every rank starts one thread per core of the node and they all fight."""
    value = env.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() else 0


def export_for_task(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """Set the rendezvous variables (overwriting any the submitting shell passed down: sbatch
    exports the caller's environment) and OMP_NUM_THREADS, before torch is imported."""
    values = torch_env_from_slurm(environ)
    environ.update(values)
    threads = threads_from_slurm(environ)
    if threads:
        environ["OMP_NUM_THREADS"] = str(threads)
    return values


def job_record(env: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """What identifies this SLURM job (None outside one): for the run folder's jobs.jsonl."""
    if not env.get("SLURM_JOB_ID"):
        return None
    keys = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID",
            "array_task": "SLURM_ARRAY_TASK_ID", "restart": "SLURM_RESTART_COUNT",
            "nodes": "SLURM_JOB_NODELIST", "partition": "SLURM_JOB_PARTITION"}
    return {"restart": "0", **{k: env[v] for k, v in keys.items() if env.get(v)}}


def nodes_down(hosts: list[str]) -> list[str]:
    """Which of these hosts SLURM reports down, drained or not responding ([] outside SLURM)."""
    if not hosts or not os.environ.get("SLURM_JOB_ID"):
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(hosts), "-t", "down,drain,fail,no_respond",
                              "-o", "%N"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted(set(out.split()))


def array_job_id(env: Mapping[str, str] = os.environ) -> str:
    """The job id of this task's array ("" outside an array)."""
    return env.get("SLURM_ARRAY_JOB_ID", "")


def array_task(env: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """(index from 0, number of tasks) of this array task, or None outside an array. An array
    such as --array=4-10:2 has its ids mapped to 0, 1, 2, 3."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, "") or default)
        except ValueError:
            return default

    first, step = number("SLURM_ARRAY_TASK_MIN", 0), max(number("SLURM_ARRAY_TASK_STEP", 1), 1)
    return (number("SLURM_ARRAY_TASK_ID", 0) - first) // step, number("SLURM_ARRAY_TASK_COUNT", 1)
