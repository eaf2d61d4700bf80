"""Child processes: wall time, peak RSS, CPU time, and how busy the rest of the machine was.

Peak memory is the peak RSS of each child process (os.wait4's ru_maxrss: the whole life of the
process, loading included); /proc/PID/status VmHWM is also polled, as a cross-check. A child's
ru_maxrss starts from the parent's peak RSS at fork time, so the driver never imports torch
(helpers that need it run as children, bench/helpers.py), and its own footprint is reported.
Nothing here imports torch or lmcore.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOISY_CORES = 0.25  # other processes' average CPU use while a child ran, above which it is flagged
POLL_S = 0.2  # how often a running child is checked (VmHWM, poll callback, timeout)


def kill_group(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def busy_seconds() -> float:
    """CPU seconds spent busy on all cores since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in fields]
    # user, nice, system, irq, softirq, steal
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def self_maxrss_mb() -> float:
    # VmHWM belongs to this process's own address space; ru_maxrss would also count the peak of
    # whatever forked us (e.g. a pytest that holds torch), since Linux carries it across exec.
    hwm = vm_hwm_mb(os.getpid())
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LoadSampler:
    """The 1-minute load average every few seconds, for the record."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(statistics.mean(s), 2), "max": round(max(s), 2), "samples": len(s)}


def _wait(proc: subprocess.Popen, name: str, t0: float, timeout: float, poll: Callable | None):
    """Wait for proc, polling its VmHWM (and `poll`), killing it `timeout` seconds after t0;
    (wait status, rusage, polled VmHWM in MB)."""
    hwm = 0.0
    killed = False
    try:
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                return status, ru, hwm
            hwm = max(hwm, vm_hwm_mb(proc.pid) or 0.0)
            if poll is not None:
                poll(proc)
            if not killed and time.perf_counter() - t0 > timeout:
                print(f"  {name}: over {timeout:.0f} s, killed", flush=True)
                kill_group(proc.pid)
                killed = True
            time.sleep(POLL_S)
    except BaseException:  # Ctrl-C or SIGTERM on the driver: take the child (and its own) down
        kill_group(proc.pid)
        os.wait4(proc.pid, 0)
        proc.returncode = -9
        raise


def run_child(name: str, cmd: list[str], *, logs: Path, cwd: Path, env: dict, timeout: float,
              poll: Callable | None = None) -> dict:
    """Run cmd to the end; its own peak RSS (wait4), wall, CPU, and foreign CPU load.
    stdout and stderr go to logs/NAME.out and NAME.err; "json" is the last JSON line of stdout."""
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    print(f"  [{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])[:200]}", flush=True)
    busy0, t0 = busy_seconds(), time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # its own process group: a kill reaches its children too (generate_speed's reference)
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env, start_new_session=True)
    status, ru, hwm = _wait(proc, name, t0, timeout, poll)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    busy = busy_seconds() - busy0
    cpu = ru.ru_utime + ru.ru_stime
    return {"rc": rc, "wall_s": round(wall, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "vm_hwm_polled_mb": round(hwm, 1), "cpu_s": round(cpu, 2),
            "other_cpu_cores": round(max(0.0, busy - cpu) / wall, 2) if wall > 0 else None,
            "log": str(out_path), "json": last_json(out_path.read_text(errors="replace"))}


def proc_fields(c: dict) -> dict:
    """The figures of a child's record that go into a section's result."""
    return {k: c[k] for k in ("wall_s", "peak_rss_mb", "vm_hwm_polled_mb", "cpu_s", "other_cpu_cores")}


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(row, dict):
            rows.append(row)
    return rows
