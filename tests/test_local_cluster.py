"""The local test cluster itself (slurm/local/README.md): several nodes, each with its own
host name and its own address on the cluster's bridge; the real sacct (slurmdbd + MariaDB);
a job of partition high preempting one of partition debug, which SLURM requeues; MaxArraySize
from the environment; a second cluster beside the first, which starts again without the jobs
of an unclean stop, and a stop.sh that leaves nothing of it behind. Skipped without the
cluster (or root, CAP_NET_ADMIN, the packages); failing instead in CI (CI=true). Every wait
is bounded; every job a test submits is cancelled."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm_helpers import STATE_DIR, cluster_env, require_cluster, skip_or_fail, wait_until

LOCAL = REPO / "slurm" / "local"
# The variables that would make a second cluster take the first one's names, subnet or ports.
IDENTITY_VARS = ("LMCORE_SLURM_ID", "LMCORE_SLURM_SUBNET", "LMCORE_SLURM_PORT", "LMCORE_SLURM_DIR")
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 60,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{shlex.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}"
    return proc


def _read_env_file(path: Path) -> dict[str, str]:
    """STATE_DIR/cluster.env (written by start.sh): names, addresses and ports of a cluster."""
    return {k: shlex.split(v)[0] if v else "" for k, v in
            (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)}


def _multinode_problem() -> str | None:
    """Why this machine or this cluster cannot be the multi-node one of slurm/local/, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd launching the jobs)"
    status = Path("/proc/self/status").read_text()
    caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")):
        if not caps >> bit & 1:
            return f"needs {name} (bridge, veths, namespaces, bind mounts)"
    commands = ("ip", "nsenter", "unshare", "slurmdbd", "mariadbd", "sacct")
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        return f"missing {', '.join(missing)} (run slurm/local/install.sh as root)"
    if not (STATE_DIR / "cluster.env").is_file():
        return f"{STATE_DIR} holds no cluster of the multi-node slurm/local/start.sh (no cluster.env)"
    return None


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The running cluster of STATE_DIR: its cluster.env values."""
    require_cluster()
    skip_or_fail(_multinode_problem(), "cannot check the local multi-node cluster")
    return _read_env_file(STATE_DIR / "cluster.env")


@pytest.fixture
def jobs(cluster):
    """Job ids a test submitted; cancelled when it ends."""
    ids: list[str] = []
    yield ids
    if ids:
        _run(["scancel", *ids], env=cluster_env(), check=False)


def _sbatch(*args: str, env: dict[str, str] | None = None) -> str:
    out = _run(["sbatch", "--parsable", *args], env=env or cluster_env()).stdout
    return out.strip().split(";")[0]


def _state(job: str, env: dict[str, str] | None = None) -> str:
    out = _run(["scontrol", "-o", "show", "job", job], env=env or cluster_env(), check=False).stdout
    m = re.search(r"\bJobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def _sacct(*args: str) -> list[dict[str, str]]:
    """sacct's rows (--parsable2, with a header) as dicts."""
    lines = _run(["sacct", "--parsable2", *args], env=cluster_env()).stdout.splitlines()
    if not lines:
        return []
    head = lines[0].split("|")
    return [dict(zip(head, line.split("|"), strict=True)) for line in lines[1:]]


def _nodes(env: dict[str, str] | None = None) -> list[str]:
    return sorted(set(_run(["sinfo", "-h", "-N", "-o", "%N"], env=env or cluster_env()).stdout.split()))


def test_srun_on_two_nodes_runs_on_two_distinct_hosts(cluster):
    assert int(cluster["nodes"]) >= 2
    out = _run(["srun", "-N", "2", "--ntasks-per-node=1", "hostname"], env=cluster_env()).stdout.split()
    assert len(out) == 2 and len(set(out)) == 2  # two host names: two nodes, not one twice
    assert set(out) <= set(_nodes()) and os.uname().nodename not in out


def test_each_node_has_its_own_address_on_the_bridge(cluster):
    subnet = ipaddress.ip_network(f"{cluster['subnet']}.0/24")
    host_addrs = _run(["ip", "-4", "-o", "addr", "show"]).stdout
    bridge = _run(["ip", "-4", "-o", "addr", "show", "dev", cluster["bridge"]]).stdout
    assert f" {cluster['bridge_addr']}/24 " in bridge  # this host's end, where slurmctld listens
    script = 'echo "$(hostname) $(hostname -I)"; getent hosts ctl node1 node2 | tr -s " " | sort'
    out = _run(["srun", "-N", "2", "--ntasks-per-node=1", "--label", "sh", "-c", script],
               env=cluster_env()).stdout
    seen: dict[str, str] = {}
    for line in out.splitlines():
        words = line.split()  # "0: node1 10.a.b.1" from the first echo of each task
        if len(words) == 3 and words[1].startswith("node"):
            seen[words[1]] = words[2]
    assert len(seen) == 2 and len(set(seen.values())) == 2, out
    for node, addr in seen.items():
        assert ipaddress.ip_address(addr) in subnet  # only addresses on the cluster's own /24
        assert f" {addr}/" not in host_addrs  # in the node's own namespace, not on this host
        show = _run(["scontrol", "-o", "show", "node", node], env=cluster_env()).stdout
        assert f"NodeAddr={addr} " in show
        assert f"{addr} {node}" in out  # every node resolves every other (MASTER_ADDR)
    assert f"{cluster['bridge_addr']} ctl" in out


def test_real_sacct_shows_finished_jobs_with_state_nodes_and_exit_code(cluster, jobs, tmp_path):
    assert not str(shutil.which("sacct")).startswith(str(STATE_DIR))  # the real one, not a stand-in
    ok = _sbatch("-N", "2", f"--output={tmp_path}/%j.out", "--wrap", "srun true")
    bad = _sbatch("-N", "1", f"--output={tmp_path}/%j.out", "--wrap", "exit 3")
    jobs.extend([ok, bad])

    def recorded() -> bool:
        rows = {r["JobID"]: r for r in _sacct("-X", "-j", f"{ok},{bad}", "-o", "JobID,State,NodeList")}
        return (rows.get(ok, {}).get("State") == "COMPLETED" and rows[ok]["NodeList"] == "node[1-2]"
                and rows.get(bad, {}).get("State") == "FAILED")
    wait_until(recorded, 90, "sacct to show both jobs finished")
    rows = {r["JobID"]: r for r in _sacct("-j", f"{ok},{bad}", "-o", "JobID,State,NodeList,ExitCode")}
    assert rows[bad]["ExitCode"] == "3:0" and rows[bad]["NodeList"].startswith("node")
    assert rows[ok]["ExitCode"] == "0:0"
    assert rows[f"{ok}.0"]["State"] == "COMPLETED" and rows[f"{ok}.0"]["NodeList"] == "node[1-2]"  # the step
    assert f"{ok}.batch" in rows


def test_a_high_partition_job_preempts_a_debug_job_which_slurm_requeues(cluster, jobs, tmp_path):
    """partition_prio preemption, PreemptMode=REQUEUE: the debug job gets GraceTime, then is
    requeued by SLURM itself (no scontrol requeue, no signal handler), and runs again."""
    part = _run(["scontrol", "-o", "show", "partition", "debug"], env=cluster_env()).stdout
    grace = int(re.search(r"\bGraceTime=(\d+)", part).group(1))
    n = cluster["nodes"]
    low_out = tmp_path / "low.out"
    # The batch shell alone (no step): SLURM signals it only when the grace time is over.
    low = _sbatch("-p", "debug", "-N", n, "--exclusive", "--open-mode=append", f"--output={low_out}",
                  "--wrap", 'echo "run ${SLURM_RESTART_COUNT:-0}"; sleep 600')
    jobs.append(low)
    # (slurmd opens the output file a moment after the job shows RUNNING)
    wait_until(lambda: _state(low) == "RUNNING" and low_out.exists() and "run 0" in low_out.read_text(), 120,
               "the debug job to run")
    high = _sbatch("-p", "high", "-N", n, "--exclusive", f"--output={tmp_path}/high.out",
                   "--wrap", "echo high")
    jobs.append(high)
    wait_until(lambda: _state(high) == "COMPLETED", grace + 90, "the high job to preempt and finish")
    wait_until(lambda: "run 1" in low_out.read_text(), 90, "the requeued debug job to run again")

    def two_records() -> bool:
        return len(_sacct("-D", "-X", "-j", low, "-o", "JobID,State")) >= 2
    wait_until(two_records, 60, "sacct -D to show the requeued job's records")
    records = _sacct("-D", "-X", "-j", low, "-o", "JobID,State,Partition,Start,End,NodeList")
    assert records[0]["State"] in ("PREEMPTED", "REQUEUED"), records
    assert records[-1]["State"] in ("RUNNING", "PENDING") and records[-1]["Partition"] == "debug", records
    (hi,) = _sacct("-X", "-j", high, "-o", "JobID,State,Partition,Start")
    assert hi["State"] == "COMPLETED" and hi["Partition"] == "high"
    assert hi["Start"] >= records[0]["End"]  # it ran in the resources the preempted job gave up


def test_max_array_size_is_what_the_environment_says(cluster):
    config = _run(["scontrol", "show", "config"], env=cluster_env()).stdout
    expected = os.environ.get("LMCORE_SLURM_MAX_ARRAY_SIZE", "1001")
    assert re.search(rf"^MaxArraySize\s*=\s*{expected}$", config, re.M), "MaxArraySize is not " + expected


def _leftovers(state: Path, env: dict[str, str]) -> list[str]:
    """Anything of the cluster of STATE (cluster.env values ENV) still on this machine."""
    prefix = f"lmc{env['cluster_id']}"
    links = re.findall(r"^\d+: ([^:@]+)", _run(["ip", "-o", "link"]).stdout, re.M)
    found = [f"link {name}" for name in links if name.startswith(prefix)]
    netns = _run(["ip", "netns", "list"]).stdout.split()
    found += [f"netns {name}" for name in netns if name.startswith(prefix)]
    mounts = _run(["findmnt", "-rn", "-o", "TARGET,SOURCE"]).stdout.splitlines()
    found += [f"mount {line}" for line in mounts if str(state) in line or f"/run/netns/{prefix}" in line]
    subnet = ipaddress.ip_network(f"{env['subnet']}.0/24")
    used = _run(["ip", "-4", "-o", "addr"]).stdout
    used += _run(["ip", "-4", "route", "show", "table", "all"]).stdout
    addrs = re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", used)
    found += [f"address {w}" for w in addrs if ipaddress.ip_address(w) in subnet]
    for port in (env["ctld_port"], env["slurmd_port"], env["dbd_port"], env["db_port"]):
        if _run(["ss", "-Htuln", f"sport = :{port}"]).stdout.strip():
            found.append(f"port {port}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"{state}/".encode() in text:
            found.append(f"process {proc.name}: {(proc / 'cmdline').read_bytes()[:80]!r}")
    return found


def _log_tails(state: Path) -> str:
    return "".join(f"\n--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-10:])
                   for f in sorted((state / "log").glob("*.log")))


def test_a_second_cluster_runs_beside_the_first_and_stop_leaves_nothing_behind(cluster):
    state = Path(tempfile.mkdtemp(prefix="lmc-t", dir="/tmp"))  # short: the sockets' paths are limited
    env = {k: v for k, v in os.environ.items() if k not in IDENTITY_VARS}
    env.update(LMCORE_SLURM_NODES="2", LMCORE_SLURM_MAX_ARRAY_SIZE="5")
    second = {"SLURM_CONF": str(state / "etc" / "slurm.conf")}
    start = [str(LOCAL / "start.sh"), str(state)]
    try:
        try:
            proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            values = _read_env_file(state / "cluster.env")
            for key in ("cluster_name", "bridge", "subnet", "ctld_port", "dbd_port", "db_port"):
                assert values[key] != cluster[key], key
            again = subprocess.run(start, env=env, capture_output=True, text=True, timeout=60)
            assert again.returncode == 0 and "already running" in again.stdout  # idempotent

            hosts = _run(["srun", "-N", "2", "hostname"], env=second).stdout.split()
            assert sorted(hosts) == ["node1", "node2"], _log_tails(state)
            config = _run(["scontrol", "show", "config"], env=second).stdout
            assert re.search(r"^MaxArraySize\s*=\s*5$", config, re.M)
            refused = _run(["sbatch", "--array=0-5", "--wrap", "true"], env=second, check=False)
            assert refused.returncode != 0 and "array" in refused.stderr.lower()

            # killed uncleanly (as by a kill of the process group that started it) while a job
            # runs: started again, the cluster cancels that stale job instead of keeping the
            # nodes allocated to it until its time limit
            stale = _sbatch("-N", "2", "--time=30", "--wrap", "sleep 600", env=second)
            wait_until(lambda: _state(stale, second) == "RUNNING", 60, "the job to run")
            running_since = time.time()
            saved = state / "state" / "job_state"  # slurmctld saves its job state a few seconds late
            wait_until(lambda: saved.stat().st_mtime > running_since + 1, 60, "the job state to be saved")
            ctld = int((state / "run" / "slurmctld.pid").read_text())
            os.kill(ctld, signal.SIGKILL)
            wait_until(lambda: not Path(f"/proc/{ctld}").exists(), 10, "slurmctld to die")
            proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=240)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            said = rf"cancelling \d+ job\(s\) left by an unclean stop of this cluster: .*\b{stale}\b"
            assert re.search(said, proc.stdout), proc.stdout
            assert _run(["squeue", "-h"], env=second).stdout.strip() == ""
            hosts = _run(["srun", "--immediate=20", "-N", "2", "hostname"], env=second).stdout.split()
            assert sorted(hosts) == ["node1", "node2"], _log_tails(state)

            _run(["sbatch", "--hold", "--array=0-4", "--wrap", "true"], env=second)  # stop.sh cancels it
            assert "is UP" in _run(["scontrol", "ping"], env=cluster_env()).stdout  # the first is untouched
        finally:
            stop = subprocess.run([str(LOCAL / "stop.sh"), str(state)], env=env, capture_output=True,
                                  text=True, timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert _leftovers(state, values) == []
        assert not (state / "run" / "created").exists()
        assert "is UP" in _run(["scontrol", "ping"], env=cluster_env()).stdout
        assert _run(["ip", "link", "show", "dev", cluster["bridge"]], check=False).returncode == 0
    finally:
        shutil.rmtree(state, ignore_errors=True)  # its database alone is ~100 MB
