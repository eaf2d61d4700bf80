"""`lmcore status RUN_DIR`: the one place to look when a run went wrong overnight.

What the run folder knows (how far training got, its checkpoints, the last figures) beside what
SLURM's accounting knows of every job that trained in it (RUN/jobs.jsonl names them): each
submission and requeue, its state, start, elapsed time, nodes and exit code, from the real
`sacct` (-D: requeued runs of a job too). Without SLURM, the run folder's part alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from lmcore.checkpoint import list_checkpoints
from lmcore.errors import LmcoreError
from lmcore.rundir import RunDir
from lmcore.track.metrics import read_metrics

SACCT_FIELDS = ["JobID", "JobName", "State", "Submit", "Start", "Elapsed", "NNodes", "NodeList", "ExitCode"]


def status(run_dir: str | Path) -> dict[str, Any]:
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise LmcoreError(f"run folder {run.path} does not exist; pass the run.dir of a training run")
    jobs = _job_rows(run)
    return {"run_dir": str(run.path), "run": _run_facts(run), "slurm_jobs": jobs,
            "sacct": _sacct(sorted({j["job_id"] for j in jobs}))}


def _run_facts(run: RunDir) -> dict[str, Any]:
    ckpts = list_checkpoints(run.checkpoints)
    rows = read_metrics(run.metrics, tolerant=True) if run.metrics.is_file() else []
    wanted = ("train/loss", "val/ppl", "step", "time", "tokens_seen")
    last = {k: v for r in rows for k, v in r.items() if k in wanted}
    val = [r for r in rows if "val/ppl" in r]
    events = [r for r in rows if r.get("event") not in (None, "checkpoint")]
    return {"checkpoints": [p.name for p in ckpts], "last_row": last,
            "last_validation": {"step": val[-1]["step"], "val/ppl": val[-1]["val/ppl"]} if val else None,
            "events": [{"step": r["step"], "event": r["event"]} for r in events[-5:]]}


def _job_rows(run: RunDir) -> list[dict[str, Any]]:
    if not run.jobs.is_file():
        return []
    return [r for r in read_metrics(run.jobs, tolerant=True) if isinstance(r.get("job_id"), str)]


def _sacct(job_ids: list[str]) -> dict[str, Any]:
    if not job_ids:
        return {"available": False, "why": "no SLURM job has trained in this run folder (RUN/jobs.jsonl)"}
    if shutil.which("sacct") is None:
        return {"available": False, "why": "sacct is not installed here"}
    args = ["sacct", "-D", "-X", "-P", "-n", "-j", ",".join(job_ids), "--format=" + ",".join(SACCT_FIELDS)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "why": f"sacct did not answer ({e})"}
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"available": False, "why": said if said.startswith("sacct") else f"sacct: {said}"}
    records = [dict(zip(SACCT_FIELDS, line.split("|"), strict=False))
               for line in proc.stdout.splitlines() if line]
    return {"available": True, "records": records}


def text(report: dict[str, Any]) -> str:
    """The report for a person: the run, then a table of its SLURM jobs."""
    r = report["run"]
    last = r["last_row"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"])) if "time" in last else "never"
    lines = [f"run {report['run_dir']}: last logged step {last.get('step', '-')} at {when}",
             f"  checkpoints: {', '.join(r['checkpoints']) or 'none'}"]
    if "train/loss" in last:
        lines.append(f"  last train loss {last['train/loss']:.4f}")
    if r["last_validation"]:
        v = r["last_validation"]
        lines.append(f"  last validation masked perplexity {v['val/ppl']:.2f} at step {v['step']}")
    lines += [f"  event at step {e['step']}: {e['event']}" for e in r["events"]]
    s = report["sacct"]
    if not s["available"]:
        lines.append(f"SLURM jobs: {s['why']}")
        for j in report["slurm_jobs"]:
            lines.append(f"  job {j['job_id']} (restart {j.get('restart', '0')}) on {j.get('nodes', '?')}, "
                         f"from step {j.get('step', '?')}")
        return "\n".join(lines) + "\n"
    lines.append("SLURM jobs (sacct -D: every run of every job, requeues included):")
    widths = [max(len(f), *(len(rec.get(f, "")) for rec in s["records"])) for f in SACCT_FIELDS]
    for rec in [dict(zip(SACCT_FIELDS, SACCT_FIELDS, strict=True)), *s["records"]]:
        cells = (rec.get(f, "").ljust(w) for f, w in zip(SACCT_FIELDS, widths, strict=True))
        lines.append("  " + "  ".join(cells))
    bad = ("FAILED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY")
    failed = [rec for rec in s["records"] if rec.get("State", "").split(" ")[0] in bad]
    if failed:
        lines.append(f"  {len(failed)} run(s) ended badly: read their logs (lmcore submit printed where), "
                     "then submit the same command again: training resumes from the last checkpoint above")
    return "\n".join(lines) + "\n"


def as_json(report: dict[str, Any]) -> str:
    return json.dumps(report)
