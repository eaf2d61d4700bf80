"""Cluster profiles, dry runs and rank setup: no cluster needed (tests/test_slurm_cluster.py
runs real jobs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmcore.slurm import ProfileError
from lmcore.slurm.env import first_host, master_port, torch_env_from_slurm
from lmcore.slurm.profile import load_profile, parse_time, profile_from_dict
from tests.conftest import REPO, run_cli

# Shell syntax that would create a marker if it ever ran. #SBATCH values cannot hold ' or \
# (refused by the profile loader: sbatch's own parser); shell lines take anything.
SBATCH_NASTY = 'a$(touch {m}/m1)`touch {m}/m2`;touch {m}/m3 "q" #c'
SHELL_NASTY = SBATCH_NASTY + " 'q' \\ $HOME"


def write_profile(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert lines[0].startswith("lmcore: error: ")
    return lines[0]


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("90:30", 91), ("04:00:00", 240), ("1-00", 1440), ("1-02:30", 1590),
    ("2-00:00:30", 2881), (45, 45),
])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


def test_shipped_profiles_load():
    local = load_profile("local")
    assert local.partition == "debug"
    assert (local.resources("train").tasks, local.resources("generate").tasks) == (2, 1)
    gpu = load_profile(str(REPO / "configs/slurm/gpu_example.yaml"))
    r = gpu.resources("train")
    assert (r.nodes, r.gpus_per_node, r.tasks) == (2, 8, 8)  # one task per GPU
    assert gpu.resources("generate").gpus_per_node == 1 and gpu.resources("eval").nodes == 1


@pytest.mark.parametrize("values, expected", [
    ({"partiton": "gpu"}, "unknown key 'partiton' (did you mean 'partition'?); valid keys in the top level: "
                          "partition,"),
    ({"eval": {"gpus": 1}}, "unknown key 'eval.gpus'"),
    ({"time": "4h"}, "time '4h' is not a SLURM time limit; use MINUTES, HH:MM:SS"),
    ({"generate": {"time": "1:2:3:4"}}, "generate.time '1:2:3:4' is not a SLURM time limit"),
    ({"nodes": "two"}, "nodes must be an integer; got 'two'"),
    ({"partition": "gpu\ntouch /tmp/x"}, "partition must be one line without control characters"),
    ({"setup": ["ok", "a\nb"]}, "setup[1] must be one line"),
    ({"sbatch": {"time": "10"}}, "sbatch option 'time' is managed by lmcore; use the profile key time"),
    ({"sbatch": {"bad key": 1}}, "is not an sbatch long option name"),
    ({"signal": "USR9"}, "signal 'USR9' is not a signal a job can catch"),
    ({"time": "1", "signal_delay_s": 90}, "is not longer than signal_delay_s=90"),
    ({"env": {"A-B": "1"}}, "env key 'A-B' is not an environment variable name"),
    ({"job_name": "bob's"}, "job_name must not contain ' or \\ (it goes into an #SBATCH line"),
    ({"sbatch": {"comment": "a\\b"}}, "sbatch.comment must not contain '"),
    ({"generate": {"nodes": 2}}, "a generation shard is one process"),
])
def test_bad_profiles_are_one_clear_error(values, expected):
    with pytest.raises(ProfileError) as e:
        profile_from_dict(values, name="p")
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_profile_errors_are_one_line_exit_2(tmp_path: Path):
    line = error_line(run_cli("submit", "train", "--cluster", "nope", "--dry-run"))
    assert "unknown built-in cluster profile 'nope'; the built-in ones are gpu_example, local" in line
    bad = write_profile(tmp_path / "bad.yaml", partition="x", walltime="1:00:00")
    line = error_line(run_cli("submit", "train", "--cluster", str(bad), "--dry-run"))
    assert "unknown key 'walltime'" in line
    bad = write_profile(tmp_path / "t.yaml", time="1 hour")
    line = error_line(run_cli("submit", "eval", "--cluster", str(bad), "--dry-run"))
    assert "is not a SLURM time limit" in line
    (tmp_path / "y.yaml").write_text("partition: [unclosed\n")
    line = error_line(run_cli("submit", "train", "--cluster", str(tmp_path / "y.yaml")))
    assert "is not valid YAML" in line
    # a bad run config stops before anything is submitted, too
    assert "unknown config key 'optim.lrr'" in error_line(
        run_cli("submit", "train", "--cluster", "local", "optim.lrr=1", "--dry-run"))


def _dry_run(tmp_path: Path, profile: Path, *args: str, env: dict | None = None) -> str:
    proc = run_cli("submit", *args, "--cluster", str(profile), "--dry-run", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dry_run_prints_the_scripts_and_submits_nothing(tmp_path: Path):
    # a fake sbatch first on PATH: calling it would leave a marker
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/called_{tool}\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    gpu = REPO / "configs/slurm/gpu_example.yaml"
    out = _dry_run(tmp_path, gpu, "pipeline", "--config", str(REPO / "configs/tiny.yaml"), env=env)
    assert not list(tmp_path.glob("called_*")) and not (tmp_path / "shared").exists()
    scripts = out.split("# ===== lmcore submit (dry run")[1:]
    assert [re.search(r"--job-name=(\S+)", s).group(1) for s in scripts] == [
        "lmcore-train", "lmcore-eval", "lmcore-generate", "lmcore-merge"]
    train, ev, gen, merge = scripts
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my_project", "#SBATCH --time=1440",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --exclusive",
                 "#SBATCH --mail-type=END,FAIL", "module load cuda/12.1",
                 "source /shared/envs/lmcore/bin/activate", "export SUBMITIT_PREEMPT_SIGNAL=USR2"):
        assert line in train, line
    srun = r"^srun .*--kill-on-bad-exit=1 /shared/envs/lmcore/bin/python -u -m submitit"
    assert re.search(srun, train, re.M)
    assert "--dependency=afterok:TRAIN_JOB_ID" in ev and "--kill-on-invalid-dep=yes" in ev
    assert "#SBATCH --nodes=1" in ev and "#SBATCH --gpus-per-node=1" in ev
    assert "--dependency=afterok:EVAL_JOB_ID" in gen and "--dependency=afterok:GENERATE_JOB_ID" in merge
    assert "--wckey" not in train

    out = _dry_run(tmp_path, REPO / "configs/slurm/local.yaml", "generate", "--shards", "3")
    assert "#SBATCH --array=0-2%2" in out  # 3 shards, 2 at a time (array_parallelism)


def sbatch_argument(text: str) -> str:
    """How sbatch reads the value of an #SBATCH option: a port of _get_argument() in slurm's
    src/sbatch/opt.c (quotes ' and ", a backslash escapes the next character even inside
    quotes, an unquoted # starts a comment, an unquoted space ends the argument)."""
    out, quoted, q, escape, i = [], False, "", False, 0
    while i < len(text) and (quoted or not text[i].isspace()):
        c = text[i]
        if escape:
            escape = False
        elif c == "\\":
            escape, i = True, i + 1
            continue
        elif quoted and c == q:
            quoted, i = False, i + 1
            continue
        elif not quoted and c in "'\"":
            quoted, q, i = True, c, i + 1
            continue
        elif not quoted and c == "#":
            break
        out.append(c)
        i += 1
    assert not quoted, f"sbatch: Unmatched `{q}` in [{text}]"
    return "".join(out)


def test_dry_run_quotes_every_value_and_nothing_runs(tmp_path: Path):
    """Values with $(...), backticks, ';', quotes, '#': the script, run by bash (srun, module,
    conda stubbed), creates no marker and passes the values on literally; sbatch's parser
    reads every #SBATCH value back as it was written in the profile."""
    m = tmp_path / "markers"
    m.mkdir()
    sb, sh = SBATCH_NASTY.format(m=m), SHELL_NASTY.format(m=m)
    profile = write_profile(
        tmp_path / "nasty.yaml", partition=sb, account=sb, qos=sb, constraint=sb, exclude=sb, job_name=sb,
        sbatch={"comment": sb}, log_dir=str(tmp_path / ("logs" + sb.replace("/", "_"))),
        modules=[sh], venv=str(tmp_path / sh), conda_env=None or "", env={"INJ": sh}, eval={"time": "10"})
    out = _dry_run(tmp_path, profile, "eval", f"run.dir={sh}", f"tracking.name={sh}\ntouch {m}/m9")
    script = out.split("\n", 3)[3]
    assert f"#SBATCH --comment={sb}" not in script  # quoted, not raw
    stub = (f"srun() {{ printf '%s' \"$INJ\" > {tmp_path}/inj; }}; module() {{ :; }}; "
            f"conda() {{ :; }}; source() {{ :; }}\n")
    runner = tmp_path / "run.sh"
    runner.write_text(stub + out)
    subprocess.run(["bash", str(runner)], cwd=tmp_path, capture_output=True, timeout=30)
    assert sorted(p.name for p in m.iterdir()) == []
    assert (tmp_path / "inj").read_text() == sh
    values = dict(re.findall(r"^#SBATCH --([a-z-]+)=(.*)$", script, re.M))
    for key in ("comment", "partition", "account", "qos", "constraint", "exclude"):
        assert sbatch_argument(values[key]) == sb, key
    assert sbatch_argument(values["job-name"]) == sb + "-eval"
    assert sbatch_argument(values["output"]).startswith(str(tmp_path / "logs"))
    assert not list(m.iterdir())


def test_env_and_sbatch_values_are_taken_as_written_not_as_yaml_1_1_reads_them(tmp_path: Path):
    """0755 is not 493, on is not True, 1:30 is not 90: what the profile says is what the job gets;
    true alone is a bare flag. A memory below 1 MB rounds up to 1 MB, never to --mem=0 (SLURM:
    all of the node's memory)."""
    profile = tmp_path / "p.yaml"
    profile.write_text("env: {UMASKV: 0755, FLAG: on, OFF: no, T: 1:30, N: 4}\n"
                       "sbatch: {mail-type: 0010, begin: 1:30, overcommit: true}\n"
                       "mem_gb: 0.0001\n")
    script = _dry_run(tmp_path, profile, "train")
    for line in ("export UMASKV=0755", "export FLAG=on", "export OFF=no", "export T=1:30", "export N=4",
                 "#SBATCH --mail-type=0010", "#SBATCH --begin=1:30", "#SBATCH --overcommit",
                 "#SBATCH --mem=1MB"):
        assert re.search(rf"^{re.escape(line)}$", script, re.M), line


def test_first_host_of_node_lists():
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("node1,node2") == "node1"
    assert first_host("rack[1-2]-n[3-4]") == "rack1-n3"
    assert first_host("lonely") == "lonely"


def test_rank_variables_match_submitit(monkeypatch):
    """ranks.py (plain sbatch) and submitit's TorchDistributedEnvironment (submitit jobs)
    give the same ranks for task 5 of a 2-node x 4-task job."""
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
           "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "localhost,other",
           "SUBMITIT_EXECUTOR": "slurm"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ours = torch_env_from_slurm(env)
    assert ours == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                    "MASTER_ADDR": "localhost", "MASTER_PORT": str(master_port("77", "0"))}
    from submitit.helpers import TorchDistributedEnvironment

    monkeypatch.setenv("MASTER_PORT", ours["MASTER_PORT"])
    theirs = TorchDistributedEnvironment()
    assert (theirs.rank, theirs.local_rank, theirs.world_size, theirs.local_world_size) == (5, 1, 8, 4)
    assert theirs.master_addr == "localhost"
    assert master_port("77", "1") != master_port("77", "0")  # a requeued run gets a fresh port


def test_submit_without_slurm_says_so(tmp_path: Path):
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin/nonexistent"}
    line = error_line(run_cli("submit", "train", "--cluster", "local", f"run.dir={tmp_path}", env=env))
    assert "sbatch/srun not found" in line and "--dry-run" in line
