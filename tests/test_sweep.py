"""Hyperparameter sweeps: the grid and its cartesian product (a bracketed list value included), the
points file, bad input before anything runs, a local `lmcore sweep` of two points that a rerun
skips, `lmcore report --compare`, the SLURM plan (one array, split by MaxArraySize), and on the
local cluster `lmcore submit sweep --wait` with a point requeued and resumed (skipped without a
cluster, failing in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmcore.errors import ConfigError, LmcoreError
from lmcore.points import SweepError, grid_points, parse_grid, point_name, read_points
from lmcore.sweep import build
from lmcore.track.compare import write_compare
from tests.conftest import run_cli
from tests.test_report import PNG_MAGIC, png_size, write_run

# Tiny points: the sample corpus, an 8-wide model, 4 steps, validation at steps 2 and 4 on every
# 50th test review, no W&B.
TINY = ["data.source=sample", "model.embedding_dim=8", "model.hidden_dim=8", "train.batch_size=8",
        "train.max_steps=4", "train.eval_interval=2", "train.log_interval=2", "data.val_split=test",
        "data.val_stride=50", "tracking.wandb_mode=disabled", "run.threads=1"]


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcore: error: "), proc.stderr
    return lines[0]


def table(md: Path) -> list[list[str]]:
    """The rows of compare.md's table, as cells."""
    lines = md.read_text().splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith(("| #", "| ---"))]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in rows]


# -- the grid and the points ---------------------------------------------------------------------
def test_grid_values_split_outside_brackets_and_the_product_varies_the_first_axis_slowest():
    axes = parse_grid(["optim.lr=1e-3,3e-3", "model.adaptive_cutoffs=[100,200],[500, 900]",
                       "--train.max-steps=4,8"])
    assert axes == [("optim.lr", ["1e-3", "3e-3"]), ("model.adaptive_cutoffs", ["[100,200]", "[500, 900]"]),
                    ("train.max_steps", ["4", "8"])]
    points = grid_points(axes)
    assert len(points) == 8
    assert points[0].overrides == ("optim.lr=1e-3", "model.adaptive_cutoffs=[100,200]", "train.max_steps=4")
    assert points[1].overrides[2] == "train.max_steps=8" and points[4].overrides[0] == "optim.lr=3e-3"
    assert points[0].name == "lr-1e-3_adaptive_cutoffs-100+200_max_steps-4"
    assert len({p.name for p in points}) == 8

    # every point's config is built and checked; the list value is a list
    sweep = build(None, ["data.source=sample", "model.softmax=adaptive"],
                  ["optim.lr=1e-3,3e-3", "model.adaptive_cutoffs=[100,200],[500,900]", "train.max_steps=4"],
                  sweep_dir="runs/my-sweep")
    assert [c.model.adaptive_cutoffs for c in sweep.configs] == [[100, 200], [500, 900]] * 2
    assert [c.optim.lr for c in sweep.configs] == [1e-3, 1e-3, 3e-3, 3e-3]
    assert sweep.overrides[-1] == "train.max_steps=4"  # an axis of one value is common to all points
    assert [c.run.dir for c in sweep.configs] == [f"runs/my-sweep/{p.name}" for p in sweep.points]
    assert {c.tracking.group for c in sweep.configs} == {"my-sweep"}
    assert {c.train.max_steps for c in sweep.configs} == {4}
    # a group the user set is kept
    own = build(None, ["tracking.group=mine"], ["optim.lr=1e-3,3e-3"], sweep_dir="runs/s")
    assert {c.tracking.group for c in own.configs} == {"mine"}

    for bad, message in (("optim.lr=", "has no values"), ("optim.lr=1,,2", "an empty value"),
                         ("model.adaptive_cutoffs=[1,2", r"unclosed '\['"),
                         ("optim.lr=1]", r"unmatched '\]'")):
        with pytest.raises(SweepError, match=message):
            parse_grid([bad])
    # keys are the config's to check, with the overrides' messages
    with pytest.raises(ConfigError, match="override 'optim.lr' must look like section.key=value"):
        parse_grid(["optim.lr"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lr' \(did you mean 'optim.lr'\?\)"):
        build(None, [], ["lr=1e-3,3e-3"], sweep_dir="runs/never")
    with pytest.raises(SweepError, match="given twice"):
        parse_grid(["optim.lr=1,2", "optim.lr=3"])
    with pytest.raises(SweepError, match="run.dir is set by the sweep"):
        parse_grid(["run.dir=a,b"])


def test_point_names_are_stable_safe_and_unique():
    assert point_name(["optim.lr=3e-3", "model.hidden_dim=512"]) == "lr-3e-3_hidden_dim-512"
    assert point_name(["train.batch_size=8"]) == "train.batch_size-8"  # batch_size is in 3 sections
    assert point_name([]) == "base"
    odd = point_name(["tracking.name=a/b c"])
    assert odd.startswith("name-a-b-c-") and len(odd) == len("name-a-b-c-") + 8  # replaced: a hash added
    assert odd != point_name(["tracking.name=a b/c"])
    long = point_name([f"tracking.name={'x' * 300}"])
    assert len(long) == 100
    assert point_name(["optim.lr=3e-3"]) == point_name(["optim.lr=3e-3"])


def test_points_from_a_yaml_file_or_one_line_per_point(tmp_path: Path):
    y = tmp_path / "points.yaml"
    y.write_text("- {optim.lr: 1e-3, model.hidden_dim: 16}\n"
                 "- optim:\n    lr: 3e-3\n    betas: [0.8, 0.9]\n"
                 "- {}\n")
    lines = tmp_path / "points.txt"
    lines.write_text("# one point per line\noptim.lr=1e-3 --model.hidden-dim=16\n\n"
                     "optim.lr=3e-3 'optim.betas=[0.8, 0.9]'  # a comment\noptim.lr=1e-3 optim.eps=1e-9\n")
    from_yaml, from_lines = read_points(y), read_points(lines)
    assert [p.overrides for p in from_yaml] == [("optim.lr=1e-3", "model.hidden_dim=16"),
                                                ("optim.lr=3e-3", "optim.betas=[0.8, 0.9]"), ()]
    assert [p.overrides for p in from_lines][:2] == [p.overrides for p in from_yaml][:2]
    assert from_yaml[2].name == "base" and from_lines[1].where == f"{lines}:4"
    sweep = build(None, ["data.source=sample"], points_file=str(y), sweep_dir=str(tmp_path / "s"))
    assert [c.optim.betas for c in sweep.configs] == [(0.9, 0.999), (0.8, 0.9), (0.9, 0.999)]
    assert [c.model.hidden_dim for c in sweep.configs] == [16, 256, 256]

    bad = tmp_path / "bad.txt"
    bad.write_text("optim.lr=1e-3\noptim.lrr=3e-3\n")
    with pytest.raises(LmcoreError, match=rf"points file {bad}:2: unknown config key 'optim.lrr' "
                                          r"\(did you mean 'optim.lr'\?\)"):
        build(None, [], points_file=str(bad))
    for text, message in (("optim: {lr: 1}\n", "must hold a list of mappings"),
                          ("- [1, 2]\n", "must be a mapping"), ("- {optim.lr: }\n", "has no value"),
                          ("- {a: [\n", "not valid YAML")):
        y.write_text(text)
        with pytest.raises(SweepError, match=message):
            read_points(y)
    with pytest.raises(LmcoreError, match="is a folder"):
        read_points(tmp_path)


# -- bad input on the command line ---------------------------------------------------------------
def test_a_bad_grid_key_is_the_did_you_mean_error_before_anything_runs_or_is_submitted(tmp_path: Path):
    folder = tmp_path / "sweep"
    line = one_error(run_cli("sweep", "--config", "tiny", *TINY, "--grid", "optim.lrr=1e-3,3e-3",
                             "--dir", str(folder), cwd=tmp_path))
    assert "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)" in line
    # a point past the first with a bad value: still before anything runs
    line = one_error(run_cli("sweep", *TINY, "--grid", "optim.lr=1e-3,-1", "--dir", str(folder),
                             cwd=tmp_path))
    assert "config optim.lr must be > 0; got -1.0" in line
    line = one_error(run_cli("submit", "sweep", "--cluster", "local", *TINY, "--grid", "model.hiden_dim=8,16",
                             "--dir", str(folder), cwd=tmp_path))
    assert "unknown config key 'model.hiden_dim' (did you mean 'model.hidden_dim'?)" in line
    line = one_error(run_cli("sweep", *TINY, "run.dir=x", "--grid", "optim.lr=1,2", cwd=tmp_path))
    assert "run.dir is set by the sweep for each point" in line and "--dir" in line
    line = one_error(run_cli("sweep", *TINY, "--grid", "optim.lr=1e-3,0.001", cwd=tmp_path))
    assert "give the same config" in line
    assert not folder.exists() and not (tmp_path / "runs").exists() and not (tmp_path / "slurm_logs").exists()


def test_an_empty_grid_is_one_line(tmp_path: Path):
    assert "the sweep has no points" in one_error(run_cli("sweep", *TINY, cwd=tmp_path))
    assert "--grid: expected at least one argument" in one_error(run_cli("sweep", *TINY, "--grid",
                                                                         cwd=tmp_path))
    assert "has no values" in one_error(run_cli("sweep", *TINY, "--grid", "optim.lr=", cwd=tmp_path))
    (tmp_path / "none.yaml").write_text("# nothing yet\n")
    assert "the sweep has no points" in one_error(run_cli("sweep", *TINY, "--points", "none.yaml",
                                                          cwd=tmp_path))
    assert "the sweep has no points" in one_error(run_cli("submit", "sweep", "--cluster", "local", *TINY,
                                                          cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.yaml"]


# -- a local sweep, its rerun, the comparison ----------------------------------------------------
@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """`lmcore sweep` of two tiny points (what the tests below read), and its output."""
    folder = tmp_path_factory.mktemp("local") / "lr-sweep"
    proc = run_cli("sweep", *TINY, "--grid", "optim.lr=0.003,0.03", "--dir", str(folder), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return folder, proc


def test_a_local_sweep_trains_each_point_in_its_own_folder(local_sweep):
    folder, proc = local_sweep
    names = ["lr-0.003", "lr-0.03"]
    assert sorted(p.name for p in folder.iterdir()) == [*names, "sweep.json"]
    manifest = json.loads((folder / "sweep.json").read_text())
    assert manifest["sweep"] == manifest["group"] == "lr-sweep"
    assert [p["name"] for p in manifest["points"]] == names
    assert [p["overrides"] for p in manifest["points"]] == [["optim.lr=0.003"], ["optim.lr=0.03"]]
    results = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [r["point"] for r in results] == names and [r["step"] for r in results] == [4, 4]
    for name, lr in zip(names, (0.003, 0.03), strict=True):
        cfg = yaml.safe_load((folder / name / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == lr and cfg["tracking"]["group"] == "lr-sweep"
        assert cfg["run"]["dir"] == str(folder / name)
        assert (folder / name / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    assert "sweep point 1/2: lr-0.003 (optim.lr=0.003)" in proc.stderr
    assert f"lmcore report --compare {folder}" in proc.stderr


def test_rerunning_a_sweep_skips_the_finished_points(local_sweep):
    folder, _ = local_sweep
    before = {p: p.read_bytes() for p in folder.glob("*/metrics.jsonl")}
    proc = run_cli("sweep", *TINY, "--grid", "optim.lr=0.003,0.03", "--dir", str(folder), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(ln)["step"] for ln in proc.stdout.splitlines()] == [4, 4]
    after = {p: p.read_bytes() for p in folder.glob("*/metrics.jsonl")}
    assert after == before and len(after) == 2  # nothing trained again: no row added
    assert [p.name for p in (folder / "lr-0.003" / "checkpoints").iterdir()] == ["step_00000004"]


def test_report_compare_draws_the_points_and_sorts_them_by_best_validation(local_sweep, tmp_path: Path):
    folder, _ = local_sweep
    proc = run_cli("report", "--compare", str(folder))
    assert proc.returncode == 0, proc.stderr
    md = Path(proc.stdout.strip())
    assert md == folder / "compare" / "compare.md"
    width, height = png_size(md.parent / "compare.png")
    assert width >= 1000 and height >= 300
    rows = table(md)
    assert {r[1] for r in rows} == {"lr-0.003", "lr-0.03"}
    best = [float(r[3]) for r in rows]
    assert best == sorted(best) and all(r[4] == "4" for r in rows)
    assert rows[0][2] in ("`optim.lr=0.003`", "`optim.lr=0.03`") and rows[0][6] != "–"
    assert {r[8] for r in rows} == {"test, every 50th review"}  # the validation split, never test results
    assert "different reviews" not in md.read_text()
    # the same runs named one by one, elsewhere
    out = tmp_path / "cmp"
    proc = run_cli("report", "--compare", str(folder / "lr-0.03"), str(folder / "lr-0.003"), "--out",
                   str(out))
    assert proc.returncode == 0, proc.stderr
    assert table(out / "compare.md") == rows
    assert "report takes one RUN_DIR" in one_error(run_cli("report", str(folder / "lr-0.03"),
                                                           str(folder / "lr-0.003")))


def test_compare_lists_runs_without_validation_and_what_differs_in_their_configs(tmp_path: Path):
    a, b, c, d = (tmp_path / n for n in ("a", "b", "no-val", "not-started"))
    write_run(a)
    write_run(b)
    rows = [json.loads(ln) for ln in (b / "metrics.jsonl").read_text().splitlines()[:-1]]
    (b / "metrics.jsonl").write_text("".join(json.dumps({**r, "val/ppl": r["val/ppl"] / 2} if "val/ppl" in r
                                                        else r) + "\n" for r in rows))
    c.mkdir()
    (c / "metrics.jsonl").write_text(json.dumps({"step": 5, "time": 1.0, "train/loss": 3.0}) + "\n")
    d.mkdir()
    splits = ({"val_split": "test", "val_stride": 10, "holdout_every": 0},
              {"val_split": "holdout", "val_stride": 1, "holdout_every": 25})
    for run, lr, data in ((a, 0.001, splits[0]), (b, 0.003, splits[1]), (c, 0.01, splits[0])):
        (run / "config.yaml").write_text(yaml.safe_dump({"run": {"dir": str(run)}, "optim": {"lr": lr},
                                                         "model": {"hidden_dim": 8}, "data": data}))
    md = Path(write_compare([d, c, a, b]))
    assert md == tmp_path / "compare" / "compare.md"
    rows = table(md)
    assert [r[1] for r in rows] == ["b", "a", "no-val", "not-started"]
    assert [r[2].split()[-1] for r in rows] == ["`optim.lr=0.003`", "`optim.lr=0.001`", "`optim.lr=0.01`",
                                                "–"]
    assert "`data.val_split=holdout`" in rows[0][2] and "`model.hidden_dim=8`" not in rows[0][2]
    # the split each best figure is from, and a warning where they differ
    assert [r[8] for r in rows] == ["holdout (every 25th review of train)", "test, every 10th review",
                                    "test, every 10th review", "unknown (no config.yaml)"]
    assert "validated on different reviews" in md.read_text()
    assert rows[0][4] == "200" and rows[0][6] == "200,000"
    assert rows[2][3] == "no validation rows" and rows[3][3] == "no metrics.jsonl yet"
    assert (md.parent / "compare.png").read_bytes()[:8] == PNG_MAGIC
    # nothing to plot: the table alone
    md = Path(write_compare([c, d], tmp_path / "none"))
    assert sorted(p.name for p in md.parent.iterdir()) == ["compare.md"]
    assert "nothing to plot" in md.read_text()
    with pytest.raises(LmcoreError, match="does not exist"):
        write_compare([a, tmp_path / "typo"])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text('{"points": [{"name": "../x", "overrides": []}]}')
    with pytest.raises(LmcoreError, match="is not a sweep manifest"):
        write_compare([tmp_path / "s"])


# -- SLURM: the plan, and a real array on the local cluster ---------------------------------------
def test_a_submitted_sweep_is_one_array_split_by_max_array_size(tmp_path: Path):
    pytest.importorskip("submitit")
    from lmcore.slurm.submit import plan
    from tests.slurm_helpers import local_profile

    sweep = build(None, ["data.source=sample"], ["optim.lr=1e-3,2e-3,3e-3,4e-3,5e-3"], sweep_dir="runs/five")
    profile = local_profile(tmp_path)
    specs = plan("sweep", profile, None, points=sweep.configs, parallel=2)
    assert len(specs) == 1 and specs[0].kind == "sweep" and len(specs[0].calls) == 5
    assert specs[0].params["array_parallelism"] == 2 and specs[0].params["job_name"] == "lmcore-sweep"
    assert [c.kind for c in specs[0].calls] == ["train"] * 5
    assert [c.cfg["run"]["dir"] for c in specs[0].calls] == [f"runs/five/{p.name}" for p in sweep.points]
    split = plan("sweep", profile, None, points=sweep.configs, max_array_size=4)
    assert [(s.name, len(s.calls)) for s in split] == [("sweep", 4), ("sweep.2", 1)]
    assert split[0].params["array_parallelism"] == profile.array_parallelism == 2
    dry = run_cli("submit", "sweep", "--cluster", "local", "data.source=sample", "--grid",
                  "optim.lr=1e-3,2e-3", "--dir", str(tmp_path / "dry"), "--parallel", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "sweep job: array of 2 (at most 1 at once)" in dry.stdout and "#SBATCH --array=0-1%1" in dry.stdout
    assert "LmcoreJob('train', config)" in dry.stdout and "2 point(s) in" in dry.stdout
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing


WAIT_S = 300


def test_submit_sweep_on_the_local_cluster_is_one_array_with_one_group_and_a_point_resumes(tmp_path: Path):
    """A points file of two points as one array on the local cluster; the first point is signalled
    mid-run (the time-limit warning): it checkpoints, requeues itself and resumes. It trains until
    its training-time budget (kept across the requeue), so it is surely still running when signalled."""
    from tests.slurm_helpers import cluster_env, require_cluster, wait_until, write_profile

    require_cluster()
    data = yaml.safe_load((Path(__file__).parents[1] / "configs/slurm/local.yaml").read_text())
    profile = write_profile(tmp_path / "p.yaml", {**data, "log_dir": str(tmp_path / "logs")})
    points = tmp_path / "points.txt"
    points.write_text("optim.lr=0.003 train.max_steps=100000 train.max_train_seconds=3 train.log_interval=20 "
                      "train.eval_interval=0\noptim.lr=0.03\n")
    folder = tmp_path / "cluster-sweep"
    env = {**cluster_env(), "PATH": os.environ.get("PATH", "")}
    cmd = [sys.executable, "-m", "lmcore.cli", "submit", "sweep", "--cluster", str(profile), *TINY,
           "--points", str(points), "--dir", str(folder), "--wait", "--json", "--timeout", str(WAIT_S)]
    with subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            first = folder / "lr-0.003_max_steps-100000_max_train_seconds-3_log_interval-20_eval_interval-0"
            wait_until(lambda: '"train/loss"' in _text(first / "metrics.jsonl"), WAIT_S, "point 1 to train")
            array_id = json.loads(_text(first / "jobs.jsonl").splitlines()[0])["array_job_id"]
            subprocess.run(["scancel", f"{array_id}_0", "--signal", "USR2"], env={**os.environ, **env},
                           check=True, timeout=30)
            out, err = proc.communicate(timeout=WAIT_S + 60)
        finally:
            proc.kill()
            ids = [json.loads(ln)["array_job_id"] for ln in _text(first / "jobs.jsonl").splitlines()[:1]]
            if ids:  # whatever happens above, nothing stays queued
                subprocess.run(["scancel", *ids], env={**os.environ, **env}, capture_output=True, timeout=30)
    assert proc.returncode == 0, err
    (job,) = json.loads(out.strip().splitlines()[-1])["jobs"]
    assert job["kind"] == "sweep" and job["tasks"] == [f"{job['job_id']}_0", f"{job['job_id']}_1"]
    results = job["results"]
    assert [Path(r["run_dir"]).name for r in results] == [first.name, "lr-0.03"]
    assert [r["world_size"] for r in results] == [2, 2] and [r["restarts"] for r in results] == [1, 0]
    assert 4 < results[0]["step"] < 100000 and results[1]["step"] == 4
    log = Path(job["stderr"]).read_text()
    assert "requeueing (1 of at most 3" in log and f"resumed from {first}/checkpoints/step_" in log
    rows = [json.loads(ln) for ln in (first / "jobs.jsonl").read_text().splitlines()]
    assert [(r["array_job_id"], r["array_task"], r["restart"]) for r in rows] == [
        (job["job_id"], "0", "0"), (job["job_id"], "0", "1")]
    for name in (first.name, "lr-0.03"):
        cfg = yaml.safe_load((folder / name / "config.yaml").read_text())
        assert cfg["tracking"]["group"] == "cluster-sweep"  # one W&B group for the sweep
    assert json.loads((folder / "sweep.json").read_text())["group"] == "cluster-sweep"


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""
