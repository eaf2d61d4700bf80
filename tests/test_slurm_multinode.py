"""Jobs on several nodes of the local cluster (slurm/local/: each node its own host name and
address): training on 2 nodes x 1 task and 2 nodes x 2 tasks, with the world size, the
rank-to-node mapping and the rendezvous at the allocation's first node checked and the weights
bit-identical to a run on one node with the same global batch; the plain sbatch script on two
nodes; eval on two nodes; a generation array spread over both nodes, and one of more shards than
the cluster's MaxArraySize (several arrays, one merge). Skipped without the cluster; failing
instead in CI (CI=true)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcore.config import load_config
from lmcore.gen.folder import MERGED_FILE
from lmcore.gen.job import generate_shard
from lmcore.gen.merge import merge_outputs
from lmcore.slurm.submit import max_array_size, plan, submit_plan, wait
from lmcore.track.metrics import read_metrics
from tests.conftest import REPO, run_cli
from tests.slurm_helpers import SMALL, STATE_DIR, local_profile, wait_until

WAIT_S = 300
STEPS = 24
TRAIN = [*SMALL, f"train.max_steps={STEPS}", f"train.checkpoint_interval={STEPS}", "train.batch_size=4"]


def submit(kind: str, profile, overrides: list[str], subs: list, shards: int = 0):
    out = submit_plan(plan(kind, profile, load_config(None, overrides), shards=shards,
                           max_array_size=max_array_size()), profile)
    subs.extend(out)
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def nodes_of(job_id: str) -> list[str]:
    """The allocation's nodes, in SLURM's order (the first one runs rank 0)."""
    out = subprocess.run(["scontrol", "show", "hostnames", _nodelist(job_id)], capture_output=True, text=True,
                         timeout=30).stdout
    return out.split()


def _nodelist(job_id: str) -> str:
    """From slurmctld, which knows at once: slurmdbd records a job a moment later, and a job of a
    few seconds once showed sacct its batch step's node alone (a CI run of 2026-12-07)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    found = re.findall(r"(?:^|\s)NodeList=(\S+)", out)
    assert found, f"scontrol knows no nodes of job {job_id}: {out!r}"
    return found[0]


def test_two_nodes_one_task_each_equal_one_node_two_tasks(slurm, submitted, tmp_path):
    two = tmp_path / "two-nodes"
    one = tmp_path / "one-node"
    (sub2,) = submit("train", local_profile(tmp_path, nodes=2, tasks_per_node=1), [*TRAIN, f"run.dir={two}"],
                     submitted)
    (sub1,) = submit("train", local_profile(tmp_path, nodes=1, tasks_per_node=2), [*TRAIN, f"run.dir={one}"],
                     submitted)
    res2, res1 = wait(sub2, WAIT_S), wait(sub1, WAIT_S)
    allocation = nodes_of(sub2.job_id)
    assert len(allocation) == 2 and allocation[0] != allocation[1]
    placed = [(r["rank"], r["world_size"], r["host"]) for r in res2]
    assert placed == [(0, 2, allocation[0]), (1, 2, allocation[1])]
    assert {r["master_addr"] for r in res2} == {allocation[0]}  # the rendezvous: the first node
    assert len({r["weights_sha256"] for r in [*res2, *res1]}) == 1  # every rank, both runs: the same weights
    assert_same_weights(two, one)


def test_two_nodes_two_tasks_each_are_four_ranks_equal_to_four_processes_on_one_machine(slurm, submitted,
                                                                                       tmp_path):
    run = tmp_path / "four"
    (sub,) = submit("train", local_profile(tmp_path, nodes=2, tasks_per_node=2), [*TRAIN, f"run.dir={run}"],
                    submitted)
    res = wait(sub, WAIT_S)
    first, second = nodes_of(sub.job_id)
    assert [(r["rank"], r["world_size"]) for r in res] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [r["host"] for r in res] == [first, first, second, second]  # block distribution: 2 per node
    assert {r["master_addr"] for r in res} == {first} and len({r["weights_sha256"] for r in res}) == 1
    local = tmp_path / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "4", "-m", "lmcore", "train", *TRAIN, f"run.dir={local}", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=WAIT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(run, local)


def test_the_plain_sbatch_script_on_two_nodes(slurm, submitted, tmp_path):
    run = tmp_path / "plain"
    log = tmp_path / "plain.out"
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--chdir={REPO}",
                           f"--output={log}", str(REPO / "slurm" / "lmcore.sbatch"), "train", *TRAIN,
                           f"run.dir={run}", "--no-progress"],
                          env={**os.environ, "LMCORE_PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    submitted.append(type("Job", (), {"job_id": job})())
    wait_until(lambda: "srun ended with status" in (log.read_text() if log.exists() else ""), WAIT_S,
               "the sbatch job to end", log)
    text = log.read_text()
    assert "srun ended with status 0" in text, text[-3000:]
    first, second = nodes_of(job)
    ranks = re.findall(r"lmcore\[slurm\]: rank (\d) of (\d) on (\S+), rendezvous ([^:]+):", text)
    assert sorted(ranks) == [("0", "2", first, first), ("1", "2", second, first)]
    one = tmp_path / "one-node"
    (sub,) = submit("train", local_profile(tmp_path, nodes=1, tasks_per_node=2), [*TRAIN, f"run.dir={one}"],
                    submitted)
    wait(sub, WAIT_S)
    assert_same_weights(run, one)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli("train", *SMALL, "train.max_steps=30", f"run.dir={run}", "--no-progress",
                   env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr
    return run


def test_eval_on_two_nodes_gives_the_one_process_figure(slurm, submitted, tmp_path, trained):
    args = ["data.source=sample", f"run.dir={trained}", "eval.batch_size=16"]
    (sub,) = submit("eval", local_profile(tmp_path, nodes=2, tasks_per_node=1), args, submitted)
    on_slurm = wait(sub, WAIT_S)[0]
    assert on_slurm["world_size"] == 2
    local = json.loads(run_cli("eval", *args).stdout)
    assert (on_slurm["masked_ppl"], on_slurm["num_targets"]) == (local["masked_ppl"], local["num_targets"])


def _one_process(trained: Path, out: Path, gen: list[str]) -> bytes:
    cfg = load_config(None, ["data.source=sample", f"run.dir={trained}", *gen, f"generate.output_dir={out}",
                             "generate.num_shards=1", "generate.shard_index=0"])
    generate_shard(cfg, progress=False)
    merge_outputs(cfg)
    return (out / MERGED_FILE).read_bytes()


@pytest.mark.parametrize("beyond_the_array_limit", [False, True], ids=["one-array", "beyond-MaxArraySize"])
def test_a_generation_array_over_both_nodes_gives_the_one_process_bytes(slurm, submitted, tmp_path, trained,
                                                                        beyond_the_array_limit):
    limit = max_array_size()
    assert limit is not None
    shards = limit + 2 if beyond_the_array_limit else min(4, limit)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"the movie {i}\n" for i in range(6 * shards)))
    gen = [f"generate.prompts={prompts}", "generate.chunk_size=3", "generate.max_new_tokens=6",
           "generate.precision=fp32"]
    # a whole node per task, two at once: the scheduler has to use both nodes
    profile = local_profile(tmp_path, array_parallelism=2, generate={"cpus_per_task": 2})
    job = ["data.source=sample", f"run.dir={trained}", *gen, f"generate.output_dir={tmp_path / 'array'}"]
    subs = submit("generate", profile, job, submitted, shards=shards)
    arrays, merge = subs[:-1], subs[-1]
    assert len(arrays) == (2 if beyond_the_array_limit else 1) and sum(len(a.jobs) for a in arrays) == shards
    hosts = {r["host"] for a in arrays for r in wait(a, WAIT_S)}
    wait(merge, WAIT_S)
    assert len(hosts) == 2, f"the array ran on {hosts} only"
    assert (tmp_path / "array" / MERGED_FILE).read_bytes() == _one_process(trained, tmp_path / "one", gen)


# -- preemption by the scheduler, and a requeue by hand ---------------------------------------------
def _steps_written(segment: Path) -> list[int]:
    """The history steps an offline W&B segment holds (none when its job died before a flush)."""
    (wandb_file,) = segment.glob("run-*.wandb")
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                          capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return sorted(int(r["history"]["item"]["_step"]) for r in rows if r["type"] == "history")


def _records(job_id: str) -> list[tuple[str, str]]:
    """(JobID, State) of every run of the job, requeues included (the real sacct -D)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "--format=JobID,State"],
                         capture_output=True, text=True, timeout=30).stdout
    return [tuple(line.split("|")[:2]) for line in out.splitlines() if line]


@pytest.mark.parametrize("how", ["preemption", "scontrol-requeue"])
def test_a_preempted_or_requeued_two_node_run_resumes_and_ends_bit_identical(slurm, submitted, tmp_path, how,
                                                                            monkeypatch):
    """A job of partition high needing both nodes preempts the training (PreemptMode=REQUEUE, a
    GraceTime on partition debug): SIGTERM, a checkpoint within the grace time, and the job stays
    until SLURM requeues it (one that ends in its grace time is not requeued); or `scontrol
    requeue` by hand. The resumed run ends with the weights of an uninterrupted one, on the same
    W&B run with monotonic steps."""
    from tests.test_tracking import offline_runs, run_id_of

    monkeypatch.setenv("WANDB_MODE", "offline")
    steps = 1500
    common = [*SMALL, f"train.max_steps={steps}", f"train.checkpoint_interval={steps}", "train.batch_size=4",
              "tracking.wandb_mode=offline", "tracking.project=lmcore-test"]
    profile = local_profile(tmp_path, nodes=2, tasks_per_node=1, term_wait_s=120)
    run = tmp_path / "interrupted"
    (sub,) = submit("train", profile, [*common, f"run.dir={run}"], submitted)
    log = Path(sub.log_paths()[1])
    metrics = run / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and "train/loss" in metrics.read_text(), WAIT_S,
               "the training loop to run", log)
    if how == "preemption":
        high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-N", "2", "--exclusive",
                               f"--output={tmp_path}/high.out", "--wrap", "sleep 5"],
                              capture_output=True, text=True, timeout=30)
        assert high.returncode == 0, high.stderr
        submitted.append(type("Job", (), {"job_id": high.stdout.strip()})())
    else:
        subprocess.run(["scontrol", "requeue", sub.job_id], check=True, timeout=30)
    result = wait(sub, 2 * WAIT_S)
    assert [r["restarts"] for r in result] == [1, 1] and result[0]["step"] == steps
    wait_until(lambda: _records(sub.job_id)[-1][1] == "COMPLETED", 60, "sacct to record the end")
    states = [s for _, s in _records(sub.job_id)]
    assert ("PREEMPTED" if how == "preemption" else "REQUEUED") in states[0]
    text = log.read_text()
    assert "SIGTERM: stopping at the next step" in text and f"resumed from {run}/checkpoints/step_" in text
    straight = tmp_path / "straight"
    (ref,) = submit("train", profile, [*common, f"run.dir={straight}"], submitted)
    wait(ref, 2 * WAIT_S)
    wa = load_file(str(run / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
    wb = load_file(str(straight / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    segments = offline_runs(run)
    assert len(segments) == 2 and len({run_id_of(s) for s in segments}) == 1  # one W&B run, two segments
    first, second = (_steps_written(s) for s in segments)
    assert second and (not first or max(first) < min(second)) and second[-1] == steps  # steps only increase
    # nothing lost: what SIGTERM took from the first segment (wandb's service dies with the step
    # before it flushes) the second one sent again, from metrics.jsonl
    logged = {r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}
    assert set(logged) <= {*first, *second}, sorted(set(logged) - {*first, *second})


# -- a node that dies mid-run ----------------------------------------------------------------------
def _node(action: str, node: str) -> None:
    proc = subprocess.run(["bash", str(REPO / "slurm/local/node.sh"), action, node, str(STATE_DIR)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def node2_back(slurm):
    """node2 is started again after the test, whatever happened in it."""
    yield
    subprocess.run(["bash", str(REPO / "slurm/local/node.sh"), "start", "node2", str(STATE_DIR)],
                   capture_output=True, timeout=120)


@pytest.mark.parametrize("noticed", ["at-once", "later"])
def test_a_node_that_dies_mid_run_ends_the_job_clearly_and_the_requeued_job_resumes_bit_identical(
        slurm, submitted, tmp_path, node2_back, noticed):
    """node2's slurmd and the job's processes on it are killed by PID, and node2 is marked down
    at once, or later (as SlurmdTimeout would). The rank on node1 does not wait for the time
    limit: within the collective timeout it stops with one line naming node2. SLURM fails the job
    (NODE_FAIL) and requeues it (JobRequeue=1); once node2 is back the job resumes from the last
    checkpoint and ends with the weights of an uninterrupted run."""
    steps, every = 600, 100
    common = [*SMALL, f"train.max_steps={steps}", f"train.checkpoint_interval={every}", "train.batch_size=4",
              "run.collective_timeout_s=30"]
    profile = local_profile(tmp_path, nodes=2, tasks_per_node=1)
    run = tmp_path / "run"
    (sub,) = submit("train", profile, [*common, f"run.dir={run}"], submitted)
    log = Path(sub.log_paths()[1])
    wait_until(lambda: any(run.glob(f"checkpoints/step_{every:08d}")), WAIT_S, "a first checkpoint", log)
    assert nodes_of(sub.job_id)[1] == "node2"
    if noticed == "at-once":
        _node("kill", "node2")
    else:  # the processes die, but slurmctld believes in node2 until SlurmdTimeout
        pids = subprocess.run(["ip", "netns", "pids", _netns("node2")], capture_output=True, text=True,
                              timeout=30).stdout.split()
        subprocess.run(["kill", "-KILL", *pids], timeout=30)
    waited = wait_until(lambda: "lost contact" in log.read_text(errors="replace"), 30 + 60,
                        "rank 0 to give up on node2", log)
    line = next(x for x in log.read_text(errors="replace").splitlines() if "lmcore: error:" in x)
    assert "rank 0 on node1 lost contact" in line and "node2" in line and "resume" in line, line
    if noticed == "later":
        subprocess.run(["scontrol", "update", "nodename=node2", "state=down", "reason=test"], check=True,
                       timeout=30)
    wait_until(lambda: _records(sub.job_id)[0][1] == "NODE_FAIL", 60, "SLURM to fail the job", log)
    _node("start", "node2")  # SLURM runs the requeued job once both nodes are up
    result = wait(sub, 2 * WAIT_S)
    assert [r["restarts"] for r in result] == [1, 1] and result[0]["step"] == steps, result
    resumed = re.findall(r"resumed from \S+/checkpoints/step_(\d+)", log.read_text())
    assert resumed and int(resumed[-1]) >= every
    report = run_cli("status", str(run)).stdout
    assert "NODE_FAIL" in report and "COMPLETED" in report, report
    straight = tmp_path / "straight"
    (ref,) = submit("train", local_profile(tmp_path, nodes=1, tasks_per_node=2),
                    [*common, f"run.dir={straight}"], submitted)
    wait(ref, 2 * WAIT_S)
    wa = load_file(str(run / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
    wb = load_file(str(straight / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    print(f"rank 0 gave up {waited:.1f} s after node2 died")


def _netns(node: str) -> str:
    ident = dict(line.split("=", 1) for line in (STATE_DIR / "cluster.env").read_text().split())
    return f"lmc{ident['cluster_id']}-n{node.removeprefix('node')}"
