"""W&B tracking: modes, fallbacks, one run across requeues, and what W&B holds = metrics.jsonl.

Offline runs are read back with `wandb leet inspect --json` (no network needed). Nothing
here can reach a W&B server: WANDB_BASE_URL points at a closed local port, and every
wandb folder (runs, cache, config, data, ~/.netrc) lies in the test's tmp_path.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from lmcore.config import load_config
from lmcore.track.metrics import MetricsLog, read_metrics
from lmcore.track.tracker import Tracker, history_row
from lmcore.track.wandb_init import api_key_configured, open_tracker, resolve_mode
from tests.conftest import REPO, tiny_overrides

STATE_FILE = "wandb_run.json"  # in the run folder (lmcore.rundir.RunDir.wandb_state)

FAKE_KEY = "lmcoretestkey" + "0" * 27  # 40 characters, the shape of a real key
CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens, nothing leaves the host


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch):
    """wandb writes only under tmp_path, has no key and no server; its service is stopped after."""
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # absent file: no credentials
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT_URL)
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")  # no system-metrics sampling: faster
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLED", "WANDB_RUN_GROUP",
                "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    yield home
    if "wandb" in sys.modules:  # no wandb service process outlives the test
        import wandb

        wandb.teardown()


def make_cfg(run_dir: Path, *extra: str):
    return load_config(None, [f"run.dir={run_dir}", "tracking.project=lmcore-test", *extra])


def train_row(step: int) -> dict:
    """A trainer-like row whose figures depend on the step only (exact resume: same numbers)."""
    loss = 6.0 / math.sqrt(step)
    return {"train/loss": loss, "train/ppl": math.exp(loss), "lr": 0.01, "grad_norm": 1.0 / step,
            "tokens_per_s": 1000.0 + step, "epoch": step // 20, "tokens_seen": 100 * step,
            "train_seconds": 0.5 * step}


def log_like_the_trainer(metrics: MetricsLog, steps, ckpt_every: int = 10, val_every: int = 10) -> None:
    for step in steps:
        metrics.log(step, train_row(step))
        if step % val_every == 0:
            metrics.log(step, {"val/ppl": 50.0 / step, "val/loss": math.log(50.0 / step), "val/targets": 123})
        if step % ckpt_every == 0:
            metrics.log(step, {"event": "checkpoint", "path": f"/runs/x/checkpoints/step_{step:08d}"})


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted(p for p in (wandb_dir / "wandb").glob("offline-run-*") if p.is_dir())


def run_id_of(run_folder: Path) -> str:
    """offline-run-<time>-<id>[-n]/run-<id>.wandb (wandb adds -n to a folder name taken in the same second)"""
    (wandb_file,) = run_folder.glob("run-*.wandb")
    return wandb_file.stem[len("run-"):]


def records(run_folder: Path) -> list[dict]:
    """Every record of an offline run's .wandb file, via `wandb leet inspect --json`."""
    (wandb_file,) = run_folder.glob("run-*.wandb")
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                          capture_output=True, text=True, timeout=120)
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert out, proc.stderr
    return out


def history(recs: list[dict]) -> dict[int, dict]:
    rows = {}
    for r in recs:
        if r["type"] == "history":
            item = {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            rows[int(r["history"]["item"]["_step"])] = item
    return rows


def summary_updates(recs: list[dict]) -> dict:
    out: dict = {}
    for r in recs:
        if r["type"] == "summary":
            out.update(r["summary"].get("update", {}))
    return out


def run_record(recs: list[dict]) -> dict:
    return next(r["run"] for r in recs if r["type"] == "run")


def expected_history(rows: list[dict]) -> dict[int, dict]:
    """metrics.jsonl rows merged per step, as the tracker sends them."""
    out: dict[int, dict] = {}
    for row in rows:
        out.setdefault(row["step"], {}).update(history_row(row["step"], row))
    return out


def same(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step].keys() == b[step].keys(), step
        for k, v in a[step].items():
            expected = pytest.approx(b[step][k], rel=1e-12) if isinstance(v, float) else b[step][k]
            assert v == expected, (step, k)


def files_text(root: Path) -> str:
    chunks = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            chunks.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(chunks)


# --- modes -----------------------------------------------------------------------------


def test_mode_resolution(wandb_env: Path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode("offline")[0] == "offline"
    assert resolve_mode("disabled")[0] == "disabled"
    assert resolve_mode("online")[0] == "online"
    # auto, no key, no WANDB_MODE: offline, and the reason says why
    mode, why = resolve_mode("auto")
    assert mode == "offline" and "no API key" in why
    for env, expected in (("offline", "offline"), ("dryrun", "offline"), ("online", "online"),
                          ("disabled", "disabled")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert resolve_mode("auto")[0] == expected
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("online")[0] == "online"  # the config, when explicit, wins
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert resolve_mode("auto")[0] == "disabled"
    monkeypatch.delenv("WANDB_DISABLED")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert api_key_configured() and resolve_mode("auto")[0] == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = Path(os.environ["NETRC"])
    netrc.parent.mkdir(parents=True, exist_ok=True)
    netrc.write_text(f"machine 127.0.0.1:9\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert api_key_configured() and resolve_mode("auto")[0] == "online"


def test_disabled_and_non_main_ranks_do_nothing(wandb_env: Path, tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for tracker in (open_tracker(make_cfg(run), run, "train", enabled=True),
                    open_tracker(make_cfg(run, "tracking.wandb_mode=offline"), run, "train", enabled=False)):
        assert tracker.mode == "disabled" and tracker.run_id is None
        metrics = MetricsLog(run / "metrics.jsonl", tracker=tracker)
        log_like_the_trainer(metrics, [10])
        tracker.summary({"x": 1})
        tracker.table("t", ["a"], [[1]])
        tracker.finish()
    assert not (run / "wandb").exists() and not (run / STATE_FILE).exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [10, 10, 10]
    with pytest.raises(ValueError, match="job must be one of"):
        open_tracker(make_cfg(run), run, "training", enabled=True)


# --- what W&B holds ----------------------------------------------------------------------


def test_offline_run_holds_what_metrics_jsonl_holds(wandb_env: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")  # auto, no key: offline with a one-line notice
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    run = tmp_path / "run"
    cfg = make_cfg(run, "tracking.tags=a,b")
    tracker = open_tracker(cfg, run, "train", enabled=True)
    notice = capsys.readouterr().err
    assert tracker.mode == "offline" and tracker.run_id
    assert notice.count("\n") == 1 and "W&B offline (no API key" in notice and "wandb sync" in notice
    metrics = MetricsLog(run / "metrics.jsonl", tracker=tracker)
    log_like_the_trainer(metrics, range(5, 31, 5))
    metrics.log(30, {"odd": [1, 2], "nothing": None, "nan": float("nan")})  # not charted / NaN kept
    tracker.finish()

    state = json.loads((run / STATE_FILE).read_text())
    assert state["run_id"] == tracker.run_id and state["last_step"] == 30
    (folder,) = offline_runs(run)
    assert run_id_of(folder) == tracker.run_id
    recs = records(folder)
    rows = read_metrics(run / "metrics.jsonl")
    got, want = history(recs), expected_history(rows)
    assert got[30].pop("nan") == "NaN" and math.isnan(want[30].pop("nan"))  # W&B's JSON spelling of NaN
    same(got, want)
    assert got[10]["checkpoint/path"].endswith("step_00000010") and got[10]["checkpoint/step"] == 10
    assert "odd" not in got[30] and "nothing" not in got[30]
    assert summary_updates(recs)["checkpoint/path"].endswith("step_00000030")
    rr = run_record(recs)
    assert rr["run_id"] == tracker.run_id and rr["project"] == "lmcore-test"
    assert rr.get("run_group") == "slurm-array-4242" and rr.get("job_type") == "train"
    assert rr.get("display_name") == "run" and rr.get("tags") == ["a", "b"]
    assert _config(recs) == json.loads(json.dumps({**cfg.to_dict(), "lmcore": {"job": "train"}}))


def _config(recs: list[dict]) -> dict:
    """The run config, as the run record of a .wandb file holds it."""
    return {k: v for k, v in run_record(recs)["config"]["update"].items() if not k.startswith("_")}


KILLED_SEGMENT = r"""
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from lmcore.config import load_config
from lmcore.track.metrics import MetricsLog
from lmcore.track.wandb_init import open_tracker
from tests.test_tracking import log_like_the_trainer
run = Path({run!r})
cfg = load_config(None, ["run.dir=" + str(run), "tracking.project=lmcore-test",
                         "tracking.wandb_mode=offline"])
tracker = open_tracker(cfg, run, "train", enabled=True)
metrics = MetricsLog(run / "metrics.jsonl", tracker=tracker)
log_like_the_trainer(metrics, [5, 10, 15, 20])
metrics.log(25, {{"train/loss": 9.0}})  # the row W&B still holds in memory: lost with the job
time.sleep(1.0)  # past wandb's (test-shortened) flush interval
os.kill(os.getpid(), signal.SIGKILL)  # a node failure: no finish, no checkpoint after step 10
"""


def test_requeue_continues_the_same_run_with_a_monotonic_step(wandb_env: Path, tmp_path: Path,
                                                               monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "0.2")
    script = KILLED_SEGMENT.format(repo=str(REPO), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WANDB_MODE": "disabled"})  # the config's offline wins
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    first_id = json.loads((run / STATE_FILE).read_text())["run_id"]

    # The requeued job resumes from the step-10 checkpoint and logs 15, 20 again, then on.
    cfg = make_cfg(run, "tracking.wandb_mode=offline")
    tracker = open_tracker(cfg, run, "train", enabled=True)
    assert tracker.run_id == first_id
    metrics = MetricsLog(run / "metrics.jsonl", resume_step=10, tracker=tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "step must only increase" or any other warning
        log_like_the_trainer(metrics, range(15, 41, 5))
    tracker.finish()

    first, second = offline_runs(run)
    assert run_id_of(first) == run_id_of(second) == first_id
    h1, h2 = history(records(first)), history(records(second))
    assert sorted(h1) == [5, 10, 15, 20]  # the killed job's rows up to its last flush
    assert sorted(h2) == [25, 30, 35, 40]  # only steps W&B does not have yet
    assert run_record(records(second))["run_id"] == first_id
    # Together they are metrics.jsonl (exact resume: steps 15 and 20 have the same figures).
    same({**h1, **h2}, expected_history(read_metrics(run / "metrics.jsonl")))
    assert json.loads((run / STATE_FILE).read_text())["last_step"] == 40

    # `wandb sync` would upload both files of this one run (listed without network or key).
    sync = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(run / "wandb")],
                          capture_output=True, text=True, timeout=120)
    listing = sync.stdout + sync.stderr
    assert "Would sync 2 run(s)" in listing and listing.count(f"run-{first_id}.wandb") == 2


def test_eval_adds_to_the_training_runs_summary_and_generate_gets_its_own(wandb_env: Path,
                                                                            tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = make_cfg(run, "tracking.group=pipeline-7")
    train = open_tracker(cfg, run, "train", enabled=True)
    MetricsLog(run / "metrics.jsonl", tracker=train).log(10, train_row(10))
    train.finish()

    ev = open_tracker(cfg, run, "eval", enabled=True)
    assert ev.run_id == train.run_id and ev.mode == "offline"
    ev.summary({"eval/test/masked_ppl": 12.5, "eval/test/num_targets": 1000, "eval/test/checkpoint": "c"})
    ev.finish()
    gen = open_tracker(cfg, run, "generate", enabled=True)
    assert gen.run_id != train.run_id
    gen.summary({"generate/tokens_per_s": 5000.0})
    gen.table("samples", ["id", "prompt", "completion"], [[i, "the movie", f"was {i}"] for i in range(3)])
    gen.finish()
    assert json.loads((run / STATE_FILE).read_text())["run_id"] == train.run_id  # eval/generate keep it

    by_id: dict[str, list[Path]] = {}
    for folder in offline_runs(run):
        by_id.setdefault(run_id_of(folder), []).append(folder)
    assert len(by_id[train.run_id]) == 2 and len(by_id[gen.run_id]) == 1
    eval_recs = records(by_id[train.run_id][1])
    assert summary_updates(eval_recs)["eval/test/masked_ppl"] == 12.5
    assert not history(eval_recs)  # eval adds no history rows (and no config) to the run
    gen_recs = records(by_id[gen.run_id][0])
    rr = run_record(gen_recs)
    assert rr.get("run_group") == "pipeline-7" and rr.get("job_type") == "generate"
    assert _config(gen_recs)["lmcore"] == {"job": "generate", "train_run_id": train.run_id}
    assert _config(gen_recs)["generate"] == cfg.to_dict()["generate"]
    summary = summary_updates(gen_recs)
    assert summary["generate/tokens_per_s"] == 5000.0 and summary["samples._type"] == "table-file"
    table = json.loads((by_id[gen.run_id][0] / "files" / summary["samples.path"]).read_text())
    assert table["columns"] == ["id", "prompt", "completion"]
    assert table["data"][2] == [2, "the movie", "was 2"]


# --- failures ----------------------------------------------------------------------------


def test_online_without_network_falls_back_to_offline_quickly_and_never_leaks_the_key(
        wandb_env: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # auto + a key: online is tried
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    run = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="online start failed") as caught:
        tracker = open_tracker(make_cfg(run), run, "train", enabled=True)
    assert time.monotonic() - t0 < 30
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert tracker.mode == "offline" and tracker.run_id
    metrics = MetricsLog(run / "metrics.jsonl", tracker=tracker)
    log_like_the_trainer(metrics, [5, 10])
    tracker.finish()
    assert sorted(history(records(offline_runs(run)[0]))) == [5, 10]
    out = capsys.readouterr()
    everything = files_text(tmp_path) + out.out + out.err + "".join(str(w.message) for w in caught)
    assert FAKE_KEY not in everything


def test_online_without_a_key_falls_back_to_offline_without_asking(wandb_env: Path, tmp_path: Path):
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="no API key is configured") as caught:
        tracker = open_tracker(make_cfg(run, "tracking.wandb_mode=online"), run, "train", enabled=True)
    assert len(caught) == 1 and tracker.mode == "offline"
    tracker.finish()
    assert not list((run / "wandb").glob("run-*"))  # online was not even tried


def test_unwritable_wandb_folder_warns_and_keeps_metrics(wandb_env: Path, tmp_path: Path):
    run = tmp_path / "run"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = make_cfg(run, "tracking.wandb_mode=offline", f"tracking.dir={blocker / 'wandb'}")
    with pytest.warns(UserWarning, match="not writable") as caught:
        tracker = open_tracker(cfg, run, "train", enabled=True)
    assert len(caught) == 1 and tracker.mode == "disabled"
    metrics = MetricsLog(run / "metrics.jsonl", tracker=tracker)
    log_like_the_trainer(metrics, [5, 10])
    tracker.finish()
    assert len(read_metrics(run / "metrics.jsonl")) == 4


def test_wandb_dying_mid_run_warns_once_and_training_goes_on(wandb_env: Path, tmp_path: Path):
    run = tmp_path / "run"
    tracker = open_tracker(make_cfg(run, "tracking.wandb_mode=offline"), run, "train", enabled=True)
    metrics = MetricsLog(run / "metrics.jsonl", tracker=tracker)
    log_like_the_trainer(metrics, [5, 10])
    killed = _kill_wandb_service()
    assert killed, "no wandb-core process found to kill"
    with pytest.warns(UserWarning) as caught:
        log_like_the_trainer(metrics, [15, 20, 25])
        tracker.summary({"x": 1})
        tracker.table("t", ["a"], [[1]])
        tracker.finish()
    assert len(caught) == 1 and "W&B log failed" in str(caught[0].message)
    assert tracker.mode == "disabled"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20, 25]


def _kill_wandb_service() -> list[int]:
    """SIGKILL this process's wandb-core children (what an OOM killer would do)."""
    killed = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"wandb-core" in cmd:
            os.kill(int(stat.parent.name), signal.SIGKILL)
            killed.append(int(stat.parent.name))
    time.sleep(0.3)
    return killed


def test_a_failing_wandb_call_is_contained(wandb_env: Path, tmp_path: Path):
    class Broken:
        def log(self, *a, **k):
            raise RuntimeError("boom\nsecond line")

        def finish(self, *a, **k):
            raise RuntimeError("boom")

    tracker = Tracker(run=Broken(), mode="offline", run_id="abc")
    with pytest.warns(UserWarning, match=r"W&B log failed \(RuntimeError: boom\)") as caught:
        tracker.log(1, {"a": 1.0})
        tracker.log(2, {"a": 2.0})
        tracker.finish()
    assert len(caught) == 1 and "second line" not in str(caught[0].message)


def test_history_row_mapping():
    assert history_row(7, {"step": 7, "time": 1.0, "train/loss": 1.5, "epoch": 0, "flag": True,
                           "name": "x", "bad": [1], "none": None}) == {
        "train/loss": 1.5, "epoch": 0, "flag": True, "name": "x"}
    assert history_row(10, {"event": "checkpoint", "path": "/p"}) == {"checkpoint/step": 10,
                                                                      "checkpoint/path": "/p"}


# --- end to end: the real trainer ----------------------------------------------------------


def test_train_requeue_offline_end_to_end(wandb_env: Path, tmp_path: Path, monkeypatch):
    """A tiny training run, stopped and requeued, in offline mode: one W&B run whose history
    equals metrics.jsonl. Needs the trainer to be wired to lmcore.track.tracker."""
    from lmcore.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    for max_steps in (5, 10):  # the second job resumes from the step-5 checkpoint
        cfg = load_config(None, tiny_overrides(run, **{"train.max_steps": max_steps, "data.val_limit": 20,
                                                        "run.threads": 1,  # steady on a busy 2-core box
                                                        "tracking.project": "lmcore-test"}))
        train(cfg, progress=False)
    assert (run / STATE_FILE).is_file(), "no W&B run: train() does not open a tracker (lmcore.track.tracker)"
    state = json.loads((run / STATE_FILE).read_text())
    segments = offline_runs(run)
    assert len(segments) == 2 and all(run_id_of(s) == state["run_id"] for s in segments)
    merged: dict[int, dict] = {}
    for seg in segments:
        h = history(records(seg))
        assert not set(h) & set(merged) and min(h) > max(merged, default=-1)
        merged.update(h)
    same(merged, expected_history(read_metrics(run / "metrics.jsonl")))
    assert sorted(merged) == [5, 10]
    for step in (5, 10):  # each job: a train row, a checkpoint and a validation at its last step
        assert {"train/loss", "train/ppl", "lr", "grad_norm", "tokens_per_s", "val/ppl",
                "checkpoint/path"} <= merged[step].keys()


def test_resume_drops_damaged_metrics_lines_and_keeps_the_rows(tmp_path: Path):
    """A resumed run keeps its rows up to the step it resumes from; damaged lines (nested 100000
    deep, not UTF-8, a step that is infinite, a string or 400 digits long) are dropped, never a crash."""
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "time": 1.0, "train/loss": 2.0}).encode() for s in (1, 2, 3)]
    path.write_bytes(b"\n".join([good[0], b'{"step": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                 b'{"step": 2, "k": "\xff"}', b'{"step": 1e999}', b'{"step": "1"}',
                                 b'{"step": ' + b"9" * 400 + b"}", good[1], good[2]]) + b"\n")
    MetricsLog(path, resume_step=2)
    assert path.read_bytes() == good[0] + b"\n" + good[1] + b"\n"
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
