"""Cluster profiles: where and with what resources jobs run, as a typed dataclass from YAML.

A profile is a built-in name (configs/slurm/NAME.yaml, shipped in the package) or a path.
Unknown keys, wrong types and values SLURM would refuse (a time limit in another format, a
signal name that does not exist) stop before anything is submitted, with one line naming the
key and the valid choices, by the engine run configs use (lmcore/schema.py).

Every string that ends up in the sbatch script is checked here for control characters: a
newline inside a value would end an `#SBATCH` line and start a shell line. Quoting is done
where the script is written (lmcore/slurm/submit.py); `setup` lines and `python` are shell
commands by design (they are the profile author's own commands, like a job script).
"""

from __future__ import annotations

import dataclasses
import re
import signal
import typing
from dataclasses import dataclass, field
from typing import Any

from lmcore.presets import profile_path
from lmcore.schema import Reader, Value, read_yaml, setting, walk
from lmcore.slurm import ProfileError

# Per-job resources: the top level of a profile sets them for every job; the optional
# `eval` and `generate` sections override some of them for those jobs (e.g. one GPU per
# generation shard while training uses whole nodes).
RESOURCE_KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "time")

# sbatch options lmcore writes itself; setting them under `sbatch:` would silently fight
# with the profile key or with submitit's bookkeeping (log paths, arrays, dependencies).
MANAGED_SBATCH = {
    "job-name": "(set by lmcore: lmcore-KIND)", "partition": "partition", "account": "account",
    "qos": "qos", "nodes": "nodes", "ntasks-per-node": "tasks_per_node", "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task", "mem": "mem_gb", "time": "time", "constraint": "constraint",
    "exclude": "exclude", "signal": "signal / signal_delay_s", "output": "log_dir", "error": "log_dir",
    "open-mode": "(set by submitit)", "array": "(set by lmcore submit generate)",
    "dependency": "(set by lmcore submit pipeline)", "requeue": "(always on: jobs requeue themselves)",
    "wrap": "(not a batch-script option)",
}


@dataclass
class Resources:
    nodes: int = 1
    tasks_per_node: int = 0  # 0: one task per GPU, or 1 on CPU-only nodes
    gpus_per_node: int = 0
    cpus_per_task: int = 1  # also the torch threads of each task
    mem_gb: float = 0.0  # per node; 0: the cluster's default
    time: str = "01:00:00"  # MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS

    @property
    def tasks(self) -> int:
        """Tasks per node as submitted: DDP wants exactly one process per GPU."""
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def time_min(self) -> int:
        return parse_time(self.time)


@dataclass
class ResourceOverrides:
    """Resources of one job kind that differ from the profile's top level (unset: the same)."""

    nodes: int | None = setting(None, "nodes", ge=1, le=100_000)
    tasks_per_node: int | None = setting(None, "tasks per node", ge=0, le=1024)
    gpus_per_node: int | None = setting(None, "GPUs per node", ge=0, le=64)
    cpus_per_task: int | None = setting(None, "CPUs per task", ge=1, le=4096)
    mem_gb: float | None = setting(None, "memory per node in GB", ge=0.0, le=100_000.0)
    time: str | None = setting(None, "time limit")

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Profile:
    """Where and with what resources jobs run: one file in configs/slurm/ (see local.yaml and
    gpu_example.yaml). Every key is documented once, here."""

    partition: str = setting("", "SLURM partition; '' = the cluster's default")
    account: str = setting("", "account to charge")
    qos: str = setting("", "quality of service")
    nodes: int = setting(1, "nodes per training/eval job", ge=1, le=100_000)
    tasks_per_node: int = setting(0, "tasks (= DDP ranks) per node; 0 = one per GPU, or 1 on CPU nodes", ge=0,
                                 le=1024)
    gpus_per_node: int = setting(0, "GPUs per node", ge=0, le=64)
    cpus_per_task: int = setting(1, "CPUs per task, also each rank's torch threads", ge=1, le=4096)
    mem_gb: float = setting(0.0, "memory per node in GB; 0 = the cluster's default", ge=0.0,
                           le=100_000.0)
    time: str = setting("01:00:00", "time limit: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    constraint: str = setting("", "node features, e.g. a100")
    exclude: str = setting("", "nodes to avoid, e.g. node[013-014]")
    sbatch: dict[str, Any] = setting(help="more '#SBATCH --KEY=VALUE' lines (true: a bare flag)",
                                     factory=dict)
    modules: list[str] = setting(help="'module load' each", factory=list)
    venv: str = setting("", "activate this virtualenv on the nodes (and use its python)")
    conda_env: str = setting("", "or this conda environment")
    env: dict[str, Any] = setting(help="variables exported on the nodes (values quoted)", factory=dict)
    setup: list[str] = setting(help="raw shell lines run before the job starts (your own commands)",
                               factory=list)
    python: str = setting("", "python command on the nodes; '' = the venv's, or the submitting interpreter")
    log_dir: str = setting("slurm_logs", "submitit's folder: logs and pickles, one subfolder per job id")
    job_name: str = setting("lmcore", "jobs are named JOB_NAME-KIND")
    signal: str = setting("USR2", "warning signal before the time limit: the job checkpoints and requeues")
    signal_delay_s: int = setting(90, "the warning signal comes this long before the time limit "
                                                 "(the checkpoint must fit in it)", ge=20, le=86400)
    max_requeues: int = setting(3, "a job requeues itself at most this often", ge=0, le=1000)
    term_wait_s: int = setting(600, "after a SIGTERM (a cancel, a preemption) and its checkpoint: how long "
                                    "the job waits for SLURM to end it (a preempted job is requeued only if "
                                    "it still runs when its GraceTime is over)", ge=0, le=86400)
    array_parallelism: int = setting(0, "array tasks (generation shards, sweep points) running at once; "
                                        "0 = all", ge=0, le=1_000_000)
    eval: ResourceOverrides = setting(help="resources of eval jobs", factory=ResourceOverrides)
    generate: ResourceOverrides = setting(help="resources of each generation shard (1 node, 1 task)",
                                          factory=ResourceOverrides)
    name: str = field(default="", init=False)  # set by load_profile: the name or path given
    source: str = field(default="", init=False)  # the file it came from

    def resources(self, kind: str) -> Resources:
        base = {k: getattr(self, k) for k in RESOURCE_KEYS}
        if kind == "generate":  # a shard is one process: one node, one task, at most one GPU
            base.update(nodes=1, tasks_per_node=1, gpus_per_node=min(1, self.gpus_per_node))
        section = {"eval": self.eval, "generate": self.generate}.get(kind)
        return Resources(**{**base, **(section.given() if section else {})})


MAX_TIME_MIN = 365 * 24 * 60


def parse_time(text: str) -> int:
    """A SLURM time limit -> whole minutes (rounded up), as submitit wants them."""
    t = str(text).strip()
    m = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?", t)
    if m:
        d, h, mi, s = (int(x) if x else 0 for x in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    elif re.fullmatch(r"\d+(?::\d+){0,2}", t):
        parts = [int(x) for x in t.split(":")]
        if len(parts) == 1:
            seconds = parts[0] * 60
        elif len(parts) == 2:
            seconds = parts[0] * 60 + parts[1]
        else:
            seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    else:
        raise ValueError(t)
    return -(-seconds // 60)


def _fail(profile: str, message: str) -> typing.NoReturn:
    raise ProfileError(f"cluster profile {profile}: {message}")


def _check_text(profile: str, name: str, value: str) -> str:
    # A newline or other control character would break out of an `#SBATCH` line or a
    # shell line of the script: refuse it rather than try to escape it.
    if re.search(r"[\x00-\x1f\x7f]", value):
        _fail(profile, f"{name} must be one line without control characters; got {value!r}")
    return value


# Values written into `#SBATCH --key=value` lines. sbatch reads those with its own rules,
# not the shell's: a backslash escapes even inside single quotes, so shell-style quoting
# of a ' (as shlex.quote writes it: '"'"') is an "Unmatched `'`" error. Such values are
# refused; everything else (spaces, $(...), backticks, ;, ", #) is safe inside '...'.
SBATCH_VALUE_KEYS = ("partition", "account", "qos", "constraint", "exclude", "job_name", "log_dir")


def check_sbatch_value(where: str, name: str, value: str) -> None:
    if "'" in value or "\\" in value:
        raise ProfileError(f"{where}: {name} must not contain ' or \\ (it goes into an #SBATCH line, which "
                           f"sbatch cannot quote reliably); got {value!r}")


def profile_from_dict(values: dict[str, Any] | Value, name: str = "<dict>", source: str = "") -> Profile:
    tree = values if isinstance(values, Value) else Value.of(values)
    reader = Reader(lambda key: f"cluster profile {name}: {key}".rstrip(": "),
                    lambda key: f"cluster profile {name}: unknown key '{key}'", ProfileError)
    profile = reader.build(Profile, tree)
    profile.name, profile.source = name, source
    validate(profile)
    return profile


def validate(p: Profile) -> None:
    """What the field types cannot say: one-line strings, SLURM's formats, sbatch's quoting."""
    _check_texts(p)
    _check_times(p)
    if p.generate.nodes not in (None, 1) or p.generate.tasks_per_node not in (None, 0, 1):
        _fail(p.name, "generate.nodes and generate.tasks_per_node must be 1: a generation shard is "
                      "one process (use more shards instead)")
    name = p.signal.strip().upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
        _fail(p.name, f"signal {p.signal!r} is not a signal a job can catch; use USR2 (default), USR1, TERM")
    p.signal = name[3:]
    if p.venv and p.conda_env:
        _fail(p.name, "set venv or conda_env, not both")
    _check_sbatch(p)
    for key in p.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            _fail(p.name, f"env key {key!r} is not an environment variable name")


def _check_texts(p: Profile) -> None:
    for name, value, _ in walk(p):
        for i, text in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                _check_text(p.name, f"{name}[{i}]" if isinstance(value, list) else name, text)
    for section in ("sbatch", "env"):
        for key, value in getattr(p, section).items():
            _check_text(p.name, f"{section} key", key)
            if isinstance(value, str):
                _check_text(p.name, f"{section}.{key}", value)


def _check_times(p: Profile) -> None:
    for kind in ("train", "eval", "generate"):
        r = p.resources(kind)
        where = "" if kind == "train" else f"{kind}."
        try:
            minutes = r.time_min
        except ValueError:
            _fail(p.name, f"{where}time {r.time!r} is not a SLURM time limit; use MINUTES, HH:MM:SS, "
                          "D-HH or D-HH:MM:SS (e.g. 04:00:00 or 1-00:00:00)")
        if minutes == 0:
            _fail(p.name, f"{where}time {r.time!r} is no time limit to SLURM, and lmcore needs one to send "
                          "the warning signal before it; give a limit (e.g. 7-00:00:00)")
        if minutes > MAX_TIME_MIN:
            _fail(p.name, f"{where}time {r.time!r} is more than 365 days; give a limit SLURM takes")
        if minutes * 60 <= p.signal_delay_s:
            _fail(p.name, f"{where}time {r.time} is not longer than signal_delay_s={p.signal_delay_s}: "
                          "the warning signal would come before the job starts")


def _check_sbatch(p: Profile) -> None:
    for key in SBATCH_VALUE_KEYS:
        check_sbatch_value(f"cluster profile {p.name}", key, getattr(p, key))
    for key, value in p.sbatch.items():
        if isinstance(value, str):
            check_sbatch_value(f"cluster profile {p.name}", f"sbatch.{key}", value)
        flag = key.replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", flag):
            _fail(p.name, f"sbatch option {key!r} is not an sbatch long option name (e.g. mail-type)")
        if flag in MANAGED_SBATCH:
            _fail(p.name, f"sbatch option {key!r} is managed by lmcore; use the profile key "
                          f"{MANAGED_SBATCH[flag]}")
        if value is False:
            _fail(p.name, f"sbatch.{key}: false is not an sbatch value; remove the key to leave it unset")


def load_profile(spec: str) -> Profile:
    """A built-in profile by name (`lmcore configs` lists them) or a YAML file."""
    path = profile_path(spec, ProfileError)
    tree = read_yaml(path, what="cluster profile", error=ProfileError)
    return profile_from_dict(tree, name=spec, source=str(path))
