"""How long the notebook's model takes to stop on a signal: the figure a SLURM profile's
`signal_delay_s` and a cluster's `GraceTime` must exceed (slurm/README.md, "SLURM settings").

    python bench/stop_latency.py                         # the real IMDB data, 3 signals
    python bench/stop_latency.py --data DIR --repeats 5 --signal TERM

A real `lmcore train --config imdb_seed` child on --data (the notebook's sizes: Embedding 300,
LSTM 256, full softmax over the IMDB vocabulary; fp32, batch 32) is signalled once it has
trained a few steps; it finishes its step, every rank agrees, it saves a checkpoint and exits
with status 3. Printed per signal: the seconds from the signal to the child's exit, the
checkpoint's own time (the `seconds` of its metrics row: the write, fsync and rename), and the
checkpoint's size. No reference side: the notebook has no checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imdb"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--signal", default="USR2", help="USR2 (the warning) or TERM (a preemption)")
    p.add_argument("--after-steps", type=int, default=5, help="signal once this many steps are logged")
    args = p.parse_args()
    sig = getattr(signal, f"SIG{args.signal.upper().removeprefix('SIG')}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmcore-stop-") as work:
        for i in range(args.repeats):
            rows.append(one_stop(Path(work) / f"run{i}", args.data, sig, args.after_steps))
            print(json.dumps(rows[-1]), flush=True)
    worst = max(r["signal_to_exit_s"] for r in rows)
    print(f"\n{len(rows)} stops on SIG{args.signal.upper().removeprefix('SIG')}: signal to exit "
          f"{min(r['signal_to_exit_s'] for r in rows):.2f}-{worst:.2f} s, checkpoint write "
          f"{min(r['checkpoint_s'] for r in rows):.2f}-{max(r['checkpoint_s'] for r in rows):.2f} s, "
          f"{rows[0]['checkpoint_mb']:.0f} MB, step {rows[0]['step_s']:.2f} s")


def one_stop(run: Path, data: str, sig: signal.Signals, after_steps: int) -> dict:
    cmd = [sys.executable, "-m", "lmcore", "train", "--config", "imdb_seed", "--no-progress",
           f"run.dir={run}", f"data.source={data}", "train.log_interval=1", "data.val_split=",
           "tracking.wandb_mode=disabled", "train.checkpoint_interval=100000"]
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = run / "metrics.jsonl"
    while _steps(metrics) < after_steps:
        if child.poll() is not None:
            raise SystemExit(f"the training ended (exit {child.returncode}) before {after_steps} steps:\n"
                             f"{child.stderr.read()[-2000:]}")
        time.sleep(0.05)
    t0 = time.perf_counter()
    child.send_signal(sig)
    child.communicate(timeout=600)
    elapsed = time.perf_counter() - t0
    if child.returncode != 3:
        raise SystemExit(f"expected exit 3 (stopped with a checkpoint), got {child.returncode}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    ckpt = next(r for r in rows if r.get("event") == "checkpoint")
    trained = [r for r in rows if "train_seconds" in r]
    step_s = (trained[-1]["train_seconds"] - trained[0]["train_seconds"]) / max(len(trained) - 1, 1)
    size = sum(f.stat().st_size for f in Path(ckpt["path"]).iterdir())
    return {"signal_to_exit_s": round(elapsed, 3), "checkpoint_s": ckpt["seconds"],
            "checkpoint_mb": round(size / 2**20, 1), "step_s": round(step_s, 3), "stopped_at": ckpt["step"]}


def _steps(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"train/loss"' in line)


if __name__ == "__main__":
    main()
