"""Profile + config -> SLURM jobs through submitit: train, eval, generation arrays, pipelines,
sweeps (an array of training runs, one per point).

The sbatch script is submitit's own (`_make_sbatch_string`, the function its executor
calls), built from the parameters below, so `--dry-run` prints exactly what would be
submitted. Values are quoted there (`#SBATCH --key='value'`, `srun ... 'path'`) and in the
setup lines written here; the profile loader has already refused control characters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit import SlurmExecutor
from submitit.core.utils import UncompletedJobError
from submitit.slurm.slurm import _make_sbatch_string

from lmcore.slurm import JobFailedError, SubmitError
from lmcore.slurm.entry import LmcoreJob
from lmcore.slurm.profile import Profile

# When a job fails, its dependents are cancelled instead of pending forever
# ("DependencyNeverSatisfied"): a broken pipeline leaves nothing in the queue.
KILL_ON_INVALID_DEP = {"kill-on-invalid-dep": "yes"}


@dataclass
class JobSpec:
    """One sbatch submission: what runs (LmcoreJob per array task) and with what."""

    kind: str
    calls: list[LmcoreJob]
    params: dict[str, Any]
    depends_on: tuple[str, ...] = ()  # the names of earlier JobSpecs of the same plan
    name: str = ""  # unique in its plan ("generate.2" for a second array); "" = the kind

    def __post_init__(self) -> None:
        self.name = self.name or self.kind

    @property
    def is_array(self) -> bool:
        return len(self.calls) > 1


@dataclass
class Submitted:
    kind: str
    job_id: str  # the job, or the array's job id
    jobs: list[Any] = field(default_factory=list)  # submitit Job objects (one per array task)
    folder: str = ""

    def log_paths(self) -> tuple[str, str]:
        p = self.jobs[0].paths
        return str(p.stdout), str(p.stderr)


def setup_lines(profile: Profile) -> list[str]:
    """Shell lines before `srun`: environment on the nodes, every value quoted."""
    q = shlex.quote
    lines = ["# lmcore: environment on the nodes (from the cluster profile)"]
    lines += [f"module load {q(m)}" for m in profile.modules]
    if profile.venv:
        lines.append(f"source {q(str(Path(profile.venv) / 'bin' / 'activate'))}")
    if profile.conda_env:
        lines += ['eval "$(conda shell.bash hook)"', f"conda activate {q(profile.conda_env)}"]
    lines += [f"export {k}={q(str(v))}" for k, v in profile.env.items()]
    # submitit reads the warning signal from this variable in the job (default USR2).
    lines.append(f"export SUBMITIT_PREEMPT_SIGNAL={q(profile.signal)}")
    if profile.setup:
        lines.append("# setup lines of the profile, verbatim")
        lines += list(profile.setup)
    return lines


def python_command(profile: Profile) -> str:
    if profile.python:
        return profile.python  # a command by design (e.g. a container wrapper)
    if profile.venv:
        return shlex.quote(str(Path(profile.venv) / "bin" / "python"))
    if profile.conda_env:
        return "python"
    return shlex.quote(sys.executable)


def one_line(text: str) -> str:
    """For text shown in a comment of the script: control characters as escapes, so a
    value can never end the comment line and start a shell line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group(0))[1:-1], text)


def _checked_path(path: str, what: str) -> str:
    # A path with a newline would end an #SBATCH line, a ' or \ breaks sbatch's parsing of
    # it: refuse them (the profile loader checks profile values; this covers the working
    # directory that relative paths are resolved against).
    if one_line(path) != path or "'" in path or "\\" in path:
        raise SubmitError(f"{what} {path!r} contains a control character, ' or \\ (it would go into an "
                          "#SBATCH line); use another folder")
    return path


def log_folder(profile: Profile) -> Path:
    if "%" in profile.log_dir:
        raise SubmitError(f"cluster profile {profile.name}: log_dir must not contain '%' (submitit adds %j)")
    folder = Path(profile.log_dir).expanduser().absolute()
    return Path(_checked_path(str(folder), "log folder")) / "%j"


def sbatch_params(profile: Profile, kind: str, num_tasks_array: int = 0,
                  dependency: str | None = None, parallel: int = 0) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (its native names) for one job of KIND; an array runs
    at most `parallel` tasks at once (0 = the profile's array_parallelism; 0 there = all)."""
    res = profile.resources({"merge": "generate", "sweep": "train"}.get(kind, kind))
    if kind == "merge":  # reads shard files: one CPU task, no GPU
        res = dataclasses.replace(res, nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=1, mem_gb=0)
    params: dict[str, Any] = {
        "job_name": f"{profile.job_name}-{kind}", "time": res.time_min, "nodes": res.nodes,
        "ntasks_per_node": res.tasks, "cpus_per_task": res.cpus_per_task,
        "signal_delay_s": profile.signal_delay_s, "setup": setup_lines(profile),
        # One rank dying must end the step, not leave the others blocked in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        "wckey": None,  # submitit's default wckey "submitit" is refused where wckeys are enforced
    }
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(profile, key):
            params[key] = getattr(profile, key)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node  # per node, not per task: see ranks.py
    if res.mem_gb:
        whole = res.mem_gb == int(res.mem_gb)  # MB rounded up: never --mem=0 (all the node's memory)
        params["mem"] = f"{int(res.mem_gb)}GB" if whole else f"{math.ceil(res.mem_gb * 1024)}MB"
    extra: dict[str, Any] = {
        "requeue": True,  # `scontrol requeue` needs it where JobRequeue=0
        "chdir": _checked_path(os.getcwd(), "working directory"),  # relative config paths start here
        "signal": f"{profile.signal}@{profile.signal_delay_s}",
    }
    for key, value in profile.sbatch.items():
        extra[key.replace("_", "-")] = value
    if dependency:
        extra.update(dependency=dependency, **KILL_ON_INVALID_DEP)
    params["additional_parameters"] = extra
    if num_tasks_array:
        params["array_parallelism"] = parallel or profile.array_parallelism or num_tasks_array
    return params


def plan(kind: str, profile: Profile, cfg, shards: int = 0, max_array_size: int | None = None,
         points: list | None = None, parallel: int = 0) -> list[JobSpec]:
    """The jobs one `lmcore submit KIND` makes, in submission order. A generation of more shards
    than the cluster's MaxArraySize is several arrays, the merge after all of them. A sweep
    (points: each point's config, cfg unused) is an array of training runs, one task per point,
    at most `parallel` at once (0 = the profile's array_parallelism), split likewise."""
    job = {"max_requeues": profile.max_requeues, "signal_delay_s": profile.signal_delay_s,
           "term_wait_s": profile.term_wait_s}
    if kind == "sweep":
        calls = [LmcoreJob("train", p.to_dict(), **job) for p in points or []]
        return _arrays("sweep", calls, profile, max_array_size, (), parallel)
    data = cfg.to_dict()
    specs: list[JobSpec] = []
    kinds = ["train", "eval", "generate"] if kind == "pipeline" else [kind]
    for k in kinds:
        after = (specs[-1].name,) if specs else ()
        if k in ("train", "eval"):
            specs.append(JobSpec(k, [LmcoreJob(k, data, **job)], sbatch_params(profile, k), after))
            continue
        n = shards or cfg.generate.num_shards or 1
        out = cfg.generate.output_dir or str(Path(cfg.run.dir) / "generations")
        calls = []
        for i in range(n):
            shard = {**data, "generate": {**data["generate"], "shard_index": i, "num_shards": n,
                                          "output_dir": out}}
            calls.append(LmcoreJob("generate", shard, **job))
        arrays = _arrays("generate", calls, profile, max_array_size, after)
        specs += arrays
        merged = {**data, "generate": {**data["generate"], "num_shards": n, "output_dir": out}}
        specs.append(JobSpec("merge", [LmcoreJob("merge", merged, **job)], sbatch_params(profile, "merge"),
                             tuple(a.name for a in arrays)))
    return specs


def _arrays(kind: str, calls: list[LmcoreJob], profile: Profile, max_array_size: int | None,
            after: tuple[str, ...], parallel: int = 0) -> list[JobSpec]:
    """One array of these calls, or several of at most MaxArraySize tasks (named kind, kind.2, ...)."""
    size = max_array_size or len(calls) or 1
    parts = [calls[lo:lo + size] for lo in range(0, len(calls), size)]
    return [JobSpec(kind, part, sbatch_params(profile, kind, len(part), parallel=parallel), after,
                    f"{kind}.{i + 1}" if i else kind) for i, part in enumerate(parts)]


def node_cpus(partition: str) -> int | None:
    """The most CPUs a node of the partition (the default one if '') has, or None if unknown."""
    args = ["sinfo", "-h", "-o", "%c"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = [int(x) for x in re.findall(r"\d+", out)]
    return max(counts) if counts else None


def check_fits(specs: list[JobSpec], profile: Profile) -> None:
    """Refuse, before sbatch, a job whose tasks need more CPUs than a node of its partition has
    (sbatch would take it and leave it pending forever)."""
    cpus = node_cpus(profile.partition)
    for spec in specs:
        p = spec.params
        need = p["ntasks_per_node"] * p["cpus_per_task"]
        if cpus is not None and need > cpus:
            where = f"partition {profile.partition}" if profile.partition else "the default partition"
            raise SubmitError(f"the {spec.kind} job asks for {p['ntasks_per_node']} task(s) x "
                              f"{p['cpus_per_task']} CPU(s) per node, but the nodes of {where} have at most "
                              f"{cpus} CPUs: lower tasks_per_node or cpus_per_task in the cluster profile")


def max_array_size() -> int | None:
    """The cluster's MaxArraySize (array indices must stay below it), or None if unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else None


def dry_run_text(specs: list[JobSpec], profile: Profile, summary: str = "") -> str:
    """Each script as sbatch would get it; dependencies on jobs not yet submitted shown by name."""
    folder = log_folder(profile)
    command = " ".join([python_command(profile), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    parts = []
    for spec in specs:
        params = dict(spec.params)
        if spec.depends_on:
            params = after_ok(params, *[f"{d.upper().replace('.', '_')}_JOB_ID" for d in spec.depends_on])
        if spec.is_array:
            params["map_count"] = len(spec.calls)
        text = _make_sbatch_string(command=command, folder=folder, **params)
        what = describe(spec)
        cfg = spec.calls[0].cfg
        facts = f"run.dir={cfg['run']['dir']}"
        if spec.kind in ("generate", "merge"):
            facts += f", {cfg['generate']['num_shards']} shard(s) -> {cfg['generate']['output_dir']}"
        if spec.kind == "sweep":  # one point per task, in task order
            dirs = [Path(c.cfg["run"]["dir"]) for c in spec.calls]
            names = ", ".join(d.name for d in dirs[:6]) + (", ..." if len(dirs) > 6 else "")
            facts = f"{len(dirs)} point(s) in {dirs[0].parent}: {names}"
        header = (f"# ===== lmcore submit (dry run, nothing submitted): {what}\n"
                  f"# It runs lmcore.slurm.entry.LmcoreJob('{spec.calls[0].kind}', config), pickled by "
                  "submitit into\n"
                  f"# {folder.parent}/<job id>/ at submission; config: {one_line(summary or 'defaults')}; "
                  f"{one_line(facts)}\n")
        # after the shebang: each script stays one sbatch would take (#! on its first line)
        parts.append(text.replace("#!/bin/bash\n", "#!/bin/bash\n" + header, 1))
    return "\n".join(parts)


def after_ok(params: dict[str, Any], *job_ids: str) -> dict[str, Any]:
    """These sbatch parameters, to start once every job_id has succeeded (and be cancelled if one fails)."""
    extra = dict(params["additional_parameters"])
    extra.update(dependency="afterok:" + ":".join(job_ids), **KILL_ON_INVALID_DEP)
    return {**params, "additional_parameters": extra}


def describe(spec: JobSpec) -> str:
    p = spec.params
    tasks = f"{p['nodes']} node(s) x {p['ntasks_per_node']} task(s), {p['cpus_per_task']} CPU(s)/task"
    gpus = f", {p['gpus_per_node']} GPU(s)/node" if p.get("gpus_per_node") else ""
    arr = f"array of {len(spec.calls)} (at most {p['array_parallelism']} at once), " if spec.is_array else ""
    after = f", after {' and '.join(spec.depends_on)} succeed(s)" if spec.depends_on else ""
    return f"{spec.kind} job: {arr}{tasks}{gpus}, time limit {p['time']} min{after}"


def make_executor(profile: Profile, params: dict[str, Any]):
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SubmitError("sbatch/srun not found: run this on a SLURM login node (or use --dry-run to see "
                          "the script)")
    ex = SlurmExecutor(folder=log_folder(profile), max_num_timeout=profile.max_requeues,
                       python=python_command(profile))
    ex.update_parameters(**params)
    return ex


def sbatch_error(error: BaseException) -> str:
    """sbatch's own message in one line ('Invalid partition name specified', ...)."""
    text = str(error)
    found = re.findall(r"sbatch: error: (.+)", text)
    lines = [ln.strip() for ln in found if ln.strip()]
    if not lines:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()][-1:] or [type(error).__name__]
    return "; ".join(dict.fromkeys(lines))


def submit_plan(specs: list[JobSpec], profile: Profile) -> list[Submitted]:
    done: list[Submitted] = []
    by_name: dict[str, Submitted] = {}
    for spec in specs:
        params = dict(spec.params)
        if spec.depends_on:
            params = after_ok(params, *[by_name[d].job_id for d in spec.depends_on])
        staging = log_folder(profile).parent  # where submitit puts a job's pickle and script before sbatch
        before = _listing(staging)
        try:
            ex = make_executor(profile, params)
            # submitit prints sbatch's stderr itself on failure; we say it in one line below
            with contextlib.redirect_stderr(io.StringIO()):
                jobs = ex.submit_array(spec.calls) if spec.is_array else [ex.submit(spec.calls[0])]
        except SubmitError:
            raise
        except Exception as e:
            _remove_staged(staging, before)
            message = f"sbatch refused the {spec.kind} job: {sbatch_error(e)}"
            if done:
                ids = [s.job_id for s in done]
                # a half-submitted pipeline is worse than none
                subprocess.run(["scancel", *ids], capture_output=True, check=False)
                message += f" (cancelled the jobs already submitted: {', '.join(ids)})"
            raise SubmitError(message) from None
        job_id = jobs[0].job_id.split("_")[0]
        sub = Submitted(spec.kind, job_id, jobs, str(log_folder(profile)).replace("%j", job_id))
        done.append(sub)
        by_name[spec.name] = sub
    return done


def _listing(folder: Path) -> set[Path] | None:
    return set(folder.iterdir()) if folder.is_dir() else None


def _remove_staged(folder: Path, before: set[Path] | None) -> None:
    """What submitit wrote for a submission sbatch refused (a pickle, a script; the folder itself
    if it made it): nothing of a job that never existed stays behind."""
    if not folder.is_dir():
        return
    for p in set(folder.iterdir()) - (before or set()):
        if p.is_file() and (p.suffix == ".pkl" or p.name.startswith(".submission_file_")):
            p.unlink(missing_ok=True)
    if before is None and not any(folder.iterdir()):
        folder.rmdir()


def job_state(job) -> str:
    return job.watcher.get_state(job.job_id, mode="force").split(" ")[0]


def wait(sub: Submitted, timeout_s: float, poll_s: float = 2.0) -> list[Any]:
    """Results of a submitted job (one per task, or per array task), never waiting past
    timeout_s. A job that ended without a result (cancelled, failed, timed out) raises
    JobFailedError in one line naming its state and the log to read."""
    deadline = time.monotonic() + timeout_s
    results = []
    for job in sub.jobs:
        for j in [job, *job._sub_jobs]:
            j._results_timeout_s = min(j._results_timeout_s, 10)  # a missing result is no reason to hang
        # done: a result file, or an end; a job SLURM requeued (a failed node, a preemption) can
        # have both from its last run and still be queued to run again
        while not job.done(force_check=True) or _still_queued(job.job_id):
            if time.monotonic() > deadline:
                raise JobFailedError(f"{sub.kind} job {job.job_id} not finished after {timeout_s:.0f} s "
                                     f"(state {job_state(job)}); it keeps running: squeue -j {job.job_id}, "
                                     f"logs {sub.log_paths()[1]}")
            time.sleep(poll_s)
        try:
            out = job.results()
        except UncompletedJobError as e:
            raise JobFailedError(failure_line(sub.kind, job, e)) from None
        results.append(out)
    # One job: its tasks' (ranks') results; an array: each array task's result.
    return results[0] if len(results) == 1 else [r[0] for r in results]


def _still_queued(job_id: str) -> bool:
    """Whether SLURM still holds the job (pending, requeued, running, completing: a job whose
    node failed completes before SLURM requeues it)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "PD,R,CF,CG,RQ,RH,RS,RD,S,SI,SO,ST",
                               "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def failure_line(kind: str, job, error: BaseException) -> str:
    state = job_state(job)
    if state in ("RUNNING", "COMPLETING", "PENDING", "UNKNOWN", "REQUEUED"):
        state = "ending"  # sacct lags behind the result file
    stderr = Path(str(job.paths.stderr))
    text = str(error)
    if "failed during processing with trace" in text:  # the job raised: its last line says why
        trace = text.split("----------------------")[1] if "------" in text else text
        last = [ln for ln in trace.strip().splitlines() if ln.strip()][-1]
        reason = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
        return f"{kind} job {job.job_id} failed ({state}): {reason} (logs: {stderr})"
    hint = ""
    if stderr.exists():
        ours = [ln for ln in stderr.read_text(errors="replace").splitlines() if "lmcore" in ln]
        hint = f"; last lmcore line: {ours[-1].strip()}" if ours else ""
    return f"{kind} job {job.job_id} ended {state} without a result{hint} (logs: {stderr})"
