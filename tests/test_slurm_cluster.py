"""Real jobs on the local SLURM cluster (slurm/local/): 2-rank DDP training interrupted and
requeued, the requeue cap, a cancelled job, eval, a generation array, bad partitions and
injection attempts. Skipped without a cluster; failing instead in CI (CI=true).
Every wait is bounded; every job a test submits is cancelled when the test ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcore.config import load_config
from lmcore.gen.folder import MERGED_FILE
from lmcore.gen.job import generate_shard
from lmcore.gen.merge import merge_outputs
from lmcore.slurm import JobFailedError
from lmcore.slurm.submit import plan, submit_plan, wait
from tests.conftest import REPO, run_cli
from tests.slurm_helpers import (
    SMALL,
    cluster_env,
    local_profile,
    squeue_ids,
    wait_until,
    write_profile,
)

WAIT_S = 240  # per job; the whole module takes about 3 minutes on 2 cores


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A small model trained in one local process: what eval and generation jobs read."""
    run = tmp_path_factory.mktemp("trained") / "run"
    env = {"LMCORE_CACHE": str(tmp_path_factory.getbasetemp() / "lmcore-cache"), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_cli("train", *SMALL, "train.max_steps=30", f"run.dir={run}", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    return run


def _submit(kind: str, profile, overrides: list[str], subs: list, shards: int = 0):
    cfg = load_config(None, overrides)
    out = submit_plan(plan(kind, profile, cfg, shards=shards), profile)
    subs.extend(out)
    return out


def _steps_logged(run: Path) -> bool:
    m = run / "metrics.jsonl"
    return m.exists() and '"train/loss"' in m.read_text()


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


def test_interrupted_two_rank_training_requeues_and_ends_with_the_same_weights(slurm, submitted, tmp_path):
    profile = local_profile(tmp_path)
    common = [*SMALL, "train.max_steps=600", "train.checkpoint_interval=1000"]
    a = tmp_path / "interrupted"
    (sub_a,) = _submit("train", profile, [*common, f"run.dir={a}"], submitted)
    log_a = Path(sub_a.log_paths()[1])
    wait_until(lambda: _steps_logged(a), WAIT_S, "the training loop to run", log_a)
    sub_a.jobs[0]._interrupt()  # SIGTERM then USR2, as a preemption: checkpoint, requeue
    b = tmp_path / "straight"  # runs while the interrupted job waits to be requeued
    (sub_b,) = _submit("train", profile, [*common, f"run.dir={b}"], submitted)

    res_b = wait(sub_b, WAIT_S)
    res_a = wait(sub_a, WAIT_S)
    assert [r["world_size"] for r in res_a] == [2, 2] and [r["rank"] for r in res_a] == [0, 1]
    assert [r["restarts"] for r in res_a] == [1, 1]  # requeued once, by itself
    assert [r["restarts"] for r in res_b] == [0, 0]
    assert res_a[0]["step"] == res_b[0]["step"] == 600 and not res_a[0]["stopped_early"]
    stopped_at = [s for s in _checkpoint_steps(a) if s != 600]
    assert len(stopped_at) == 1 and 0 < stopped_at[0] < 600  # the checkpoint made on the signal
    text = log_a.read_text()
    assert "requeueing (1 of at most 3" in text and f"resumed from {a}/checkpoints/step_" in text
    wa = load_file(str(a / "checkpoints/step_00000600/model.safetensors"))
    wb = load_file(str(b / "checkpoints/step_00000600/model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name  # bit-identical after stop + requeue + resume
    # lmcore status: the run's job history from the real sacct, the requeue included
    report = json.loads(run_cli("status", str(a), "--json", env=cluster_env()).stdout)
    assert [j["restart"] for j in report["slurm_jobs"]] == ["0", "1"]
    states = [r["State"] for r in report["sacct"]["records"]]
    assert len(states) == 2 and states[-1] == "COMPLETED", report["sacct"]["records"]
    assert report["run"]["checkpoints"][-1] == "step_00000600"
    shown = run_cli("status", str(a), env=cluster_env()).stdout
    assert "SLURM jobs (sacct -D" in shown and sub_a.job_id in shown and "COMPLETED" in shown


def test_requeue_cap_ends_the_job_with_a_clear_error(slurm, submitted, tmp_path):
    profile = local_profile(tmp_path, max_requeues=0)
    run = tmp_path / "run"
    (sub,) = _submit("train", profile, [*SMALL, "train.max_steps=100000", f"run.dir={run}"], submitted)
    wait_until(lambda: _steps_logged(run), WAIT_S, "the training loop to run", Path(sub.log_paths()[1]))
    sub.jobs[0]._interrupt()
    with pytest.raises(JobFailedError) as e:
        wait(sub, 120)
    message = str(e.value)
    assert "not requeued" in message and "max_requeues=0" in message and str(run) in message
    assert "\n" not in message
    assert len(_checkpoint_steps(run)) == 1  # saved before giving up: a resubmission resumes


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LMCORE_SLURM_SLOW") != "1", reason="~4 min; LMCORE_SLURM_SLOW=1 runs it")
def test_real_time_limit_signal_checkpoints_requeues_and_stops_at_the_cap(slurm, submitted, tmp_path):
    """SLURM's own warning before a 2-minute time limit (not a test signal): checkpoint,
    requeue, resume; the second time it hits the cap (max_requeues=1) and says so. (With a
    1-minute limit the warning came 30 s after the start: on a CI machine busy with the other
    tests, the requeued job was still starting then and never printed "resumed from".)"""
    profile = local_profile(tmp_path, time="2", signal_delay_s=30, max_requeues=1)
    run = tmp_path / "run"
    overrides = [*SMALL, "train.max_steps=1000000", "train.checkpoint_interval=1000000", f"run.dir={run}"]
    (sub,) = _submit("train", profile, overrides, submitted)
    with pytest.raises(JobFailedError) as e:
        wait(sub, 480)
    assert "already requeued 1 time(s) (max_requeues=1)" in str(e.value)
    out = Path(sub.log_paths()[0]).read_text()
    assert out.count("this job is timed-out") == 2 and "Requeued job" in out
    assert "resumed from" in Path(sub.log_paths()[1]).read_text()
    assert len(_checkpoint_steps(run)) == 2


def test_cancelled_job_is_reported_clearly_and_quickly(slurm, submitted, tmp_path):
    profile = local_profile(tmp_path)
    run = tmp_path / "run"
    (sub,) = _submit("train", profile, [*SMALL, "train.max_steps=100000", f"run.dir={run}"], submitted)
    wait_until(lambda: _steps_logged(run), WAIT_S, "the training loop to run", Path(sub.log_paths()[1]))
    sub.jobs[0].cancel()
    t0 = time.monotonic()
    with pytest.raises(JobFailedError) as e:
        wait(sub, 120)
    assert time.monotonic() - t0 < 60
    assert f"train job {sub.job_id} ended CANCELLED without a result" in str(e.value)
    assert "\n" not in str(e.value)
    assert len(_checkpoint_steps(run)) == 1  # SIGTERM: the work done so far was saved


def test_eval_job_on_two_ranks_gives_the_one_process_figure(slurm, submitted, tmp_path, trained_run):
    profile = write_profile(tmp_path / "p.yaml", {**_local_values(tmp_path)})
    args = ["data.source=sample", f"run.dir={trained_run}", "eval.batch_size=64"]
    proc = run_cli("submit", "eval", "--cluster", str(profile), *args, "--wait", "--json", "--timeout",
                   str(WAIT_S), timeout=WAIT_S + 60)
    assert proc.returncode == 0, proc.stderr
    (job,) = json.loads(proc.stdout.strip().splitlines()[-1])["jobs"]
    submitted.append(_Id(job["job_id"]))
    assert job["kind"] == "eval" and job["stdout"].endswith(f"{job['job_id']}_0_log.out")
    on_slurm, other_rank = job["results"]
    assert other_rank is None and on_slurm["world_size"] == 2
    assert _job_state(job["job_id"]) == "COMPLETED"  # no rank aborted at its exit after the work
    # --dry-run printed exactly what was submitted (less its 3 header comment lines)
    dry = run_cli("submit", "eval", "--cluster", str(profile), *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    script = Path(job["stdout"]).parent / f"{job['job_id']}_submission.sh"
    lines = dry.stdout.splitlines(keepends=True)
    assert "".join(lines[:1] + lines[4:]) == script.read_text()
    local = run_cli("eval", *args)
    assert local.returncode == 0, local.stderr
    one = json.loads(local.stdout)
    assert (on_slurm["masked_ppl"], on_slurm["num_targets"]) == (one["masked_ppl"], one["num_targets"])


def test_unknown_partition_is_one_line_from_sbatch(slurm, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", {**_local_values(tmp_path), "partition": "nope"})
    before = squeue_ids(slurm)
    proc = run_cli("submit", "train", "--cluster", str(profile), *SMALL, f"run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcore: error: sbatch refused the train job: ")
    assert "invalid partition" in lines[0].lower()
    assert squeue_ids(slurm) == before
    logs = Path(_local_values(tmp_path)["log_dir"])
    assert not logs.exists() or not list(logs.rglob("*")), "the refused job's pickle stayed behind"


def test_values_with_shell_syntax_run_nothing_on_a_real_submission(slurm, submitted, tmp_path, trained_run):
    m = tmp_path / "markers"
    m.mkdir()
    nasty = f'a$(touch {m}/m1)`touch {m}/m2`;touch {m}/m3 "q" #c'  # no ' or \: refused in #SBATCH values
    shell = nasty + f" 'q' \\ $(touch {m}/m6)"
    values = {**_local_values(tmp_path), "job_name": nasty, "env": {"INJ": shell},
              "sbatch": {"comment": nasty}, "log_dir": str(tmp_path / f"logs;$(touch {m}/m4)`touch {m}/m5`")}
    profile = write_profile(tmp_path / "p.yaml", values)
    proc = run_cli("submit", "eval", "--cluster", str(profile), "data.source=sample",
                   f"run.dir={trained_run}", f"tracking.name={shell}", "--wait", "--json", "--timeout",
                   str(WAIT_S), timeout=WAIT_S + 60)
    assert proc.returncode == 0, proc.stderr
    (job,) = json.loads(proc.stdout.strip().splitlines()[-1])["jobs"]
    submitted.append(_Id(job["job_id"]))
    assert job["results"][0]["world_size"] == 2  # it ran
    assert not list(m.iterdir())  # and nothing in the values was executed
    show = subprocess.run(["scontrol", "show", "job", job["job_id"]], capture_output=True, text=True,
                          timeout=20).stdout
    assert f"JobName={nasty}-eval" in show and f"Comment={nasty}" in show  # passed on literally
    assert Path(job["stdout"]).is_file()


def test_pipeline_train_eval_generation_array_merge_equals_one_process(slurm, submitted, tmp_path):
    """`lmcore submit pipeline`: train (2 ranks) -> eval -> 3-task generation array -> merge, chained
    with afterok; the merged generations are the bytes one process writes from that checkpoint."""
    profile = write_profile(tmp_path / "p.yaml", _local_values(tmp_path))
    run = tmp_path / "run"
    gen = ["generate.num_samples=24", "generate.seed=3", "generate.max_new_tokens=12",
           "generate.chunk_size=4", "generate.temperature=0.8"]
    proc = run_cli("submit", "pipeline", "--cluster", str(profile), "--shards", "3", "--json", *SMALL,
                   "train.max_steps=30", f"run.dir={run}", *gen, f"generate.output_dir={tmp_path / 'array'}")
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])["jobs"]
    submitted.extend(_Id(j["job_id"]) for j in jobs)
    assert [j["kind"] for j in jobs] == ["train", "eval", "generate", "merge"]
    ids = [j["job_id"] for j in jobs]
    assert jobs[2]["tasks"] == [f"{ids[2]}_{i}" for i in range(3)]
    for kind, job_id, after in zip(["eval", "generate", "merge"], ids[1:], ids[:-1], strict=True):
        show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                              timeout=20).stdout
        assert f"afterok:{after}" in show, (kind, show)  # waits for the previous stage

    merge_log = Path(jobs[3]["stderr"])
    wait_until(lambda: _job_state(ids[3]) in ENDED, 3 * WAIT_S, "the pipeline to finish", merge_log)
    states = [_job_state(i) for i in (ids[0], ids[1], ids[3])]
    assert states == ["COMPLETED"] * 3, f"{states}\n{_stderr_tails(jobs)}"
    assert json.loads((run / "checkpoints/step_00000030/eval_test.json").read_text())["world_size"] == 2
    array = tmp_path / "array"
    assert len(list((array / "chunks").glob("chunk-*.jsonl"))) == 6  # 24 prompts / 4 per chunk

    one = load_config(None, ["data.source=sample", f"run.dir={run}", *gen,
                             f"generate.output_dir={tmp_path / 'one'}", "generate.num_shards=1",
                             "generate.shard_index=0"])
    generate_shard(one, progress=False)
    merge_outputs(one)
    merged = (array / MERGED_FILE).read_bytes()
    assert merged and merged == (tmp_path / "one" / MERGED_FILE).read_bytes()


def _stderr_tails(jobs: list[dict]) -> str:
    """Each submitted job's stderr, its last lines: what a failed stage said; and what SLURM says of
    each job and array task (state, reason, exit code), for a task that never started and so wrote
    nothing (a stage whose rank aborted at exit once left the later ones waiting on afterok)."""
    out = []
    for j in jobs:
        shown = subprocess.run(["scontrol", "-o", "show", "job", j["job_id"]], capture_output=True, text=True,
                               timeout=20).stdout
        for line in shown.splitlines():
            words = [w for w in line.split() if w.split("=", 1)[0] in
                     ("JobId", "ArrayTaskId", "JobState", "Reason", "ExitCode", "Dependency", "NodeList")]
            out.append(f"== {j['kind']}: {' '.join(words)}")
        for path in sorted(Path(j["stderr"]).parent.glob(f"{j['job_id']}_*.err")):  # every rank and task
            out.append(f"== {j['kind']}: {path.name}\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(out)


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def _job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         timeout=20).stdout
    found = [w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")]
    return found[0] if found else "UNKNOWN"


def test_plain_sbatch_script_forwards_the_warning_requeues_on_exit_3_and_stays_cancelled(
        slurm, submitted, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/plain-%j.out",
         str(REPO / "slurm" / "lmcore.sbatch"), "train", *SMALL, "train.max_steps=100000",
         "train.checkpoint_interval=100000", f"run.dir={run}"],
        env={**os.environ, "LMCORE_PYTHON": sys.executable}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    submitted.append(_Id(job))
    log = tmp_path / f"plain-{job}.out"
    wait_until(lambda: _steps_logged(run), WAIT_S, "the training loop to run", log)
    # What --signal=B:USR2@90 does before the time limit: signal the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, timeout=20)
    wait_until(lambda: "train: resumed from" in log.read_text() or _job_state(job) in ENDED, WAIT_S,
               "the requeued job to resume", log)
    text = log.read_text()
    assert "got SIGUSR2: forwarding it to the ranks" in text
    assert text.count("lmcore: received SIGUSR2") == 2  # both ranks got it
    assert "requeueing (requeue 1 of at most 3)" in text and "(restart 1)" in text
    assert len(_checkpoint_steps(run)) == 1

    subprocess.run(["scancel", job], check=True, timeout=20)  # a cancel must stay a cancel
    wait_until(lambda: _job_state(job) in ENDED, 60, "the cancelled job to end", log)
    wait_until(lambda: "not requeueing" in log.read_text(), 30, "the script to say it does not requeue", log)
    assert _job_state(job) == "CANCELLED"
    assert len(_checkpoint_steps(run)) == 2  # SIGTERM saved the progress, too


class _Id:
    def __init__(self, job_id: str):
        self.job_id = job_id


def _local_values(tmp_path: Path) -> dict:
    import yaml

    data = yaml.safe_load((REPO / "configs/slurm/local.yaml").read_text())
    return {**data, "log_dir": str(tmp_path / "logs")}
