"""The command line as users type it: --version, python -m lmcore, built-in config and profile
names, --explain from the dataclasses, overrides as key=value, --key=value and --key value,
the sbatch template, shell completion, and library versions outside the tested range."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmcore import __version__
from lmcore.config import Config
from lmcore.errors import LmcoreError
from lmcore.schema import leaf_paths
from tests.conftest import REPO, run_cli


def lmcore(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmcore", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=120)


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcore: error: "), proc.stderr
    return lines[0]


def test_version_and_python_dash_m(tmp_path: Path):
    assert lmcore("--version", cwd=tmp_path).stdout.strip() == f"lmcore {__version__}"
    assert "COMMAND" in lmcore("--help", cwd=tmp_path).stdout


def test_built_in_configs_and_profiles_are_listed_and_taken_by_name(tmp_path: Path):
    listing = lmcore("configs", cwd=tmp_path).stdout
    for name in ("tiny", "imdb_seed", "imdb_fast", "imdb_best", "local", "gpu_example"):
        assert f"  {name} " in listing
    assert "the notebook's recipe" in listing
    by_name = lmcore("config", "--config", "imdb_seed", cwd=tmp_path)
    by_path = lmcore("config", "--config", str(REPO / "configs" / "imdb_seed.yaml"), cwd=tmp_path)
    assert by_name.returncode == 0 and by_name.stdout == by_path.stdout
    assert ("unknown built-in config 'nope'; the built-in ones are imdb_best, imdb_fast, imdb_seed, tiny"
            in one_error(lmcore("train", "--config", "nope", cwd=tmp_path)))
    assert "the built-in ones are gpu_example, local" in one_error(
        lmcore("submit", "train", "--cluster", "nope", "--dry-run", cwd=tmp_path))
    assert "does not exist" in one_error(lmcore("train", "--config", "mine.yaml", cwd=tmp_path))


def test_explain_lists_every_key_from_the_dataclasses():
    text = lmcore("config", "--config", "tiny", "--explain").stdout
    for key in leaf_paths(Config):
        assert f"\n{key} " in f"\n{text}", key
    assert "(choice; value padded; default padded; allowed padded, packed)" in text
    assert "(float; value 0.01; default 0.001; allowed > 0)" in text  # optim.lr in tiny.yaml


def test_overrides_in_every_spelling_give_the_same_config():
    spelled = [["optim.lr=3e-4", "train.max_steps=7"], ["--optim.lr=3e-4", "--train.max_steps", "7"],
               ["--optim.lr", "3e-4", "--train.max-steps=7"]]
    outputs = {lmcore("config", *args).stdout for args in spelled}
    assert len(outputs) == 1 and "lr: 0.0003" in outputs.pop()
    assert "did you mean 'optim.lr'" in one_error(lmcore("config", "--optim.lrr", "3"))
    assert "did you mean --optim.lr?" in one_error(lmcore("train", "--lr", "3"))
    assert "needs a value" in one_error(lmcore("train", "--optim.lr"))


def test_the_sbatch_template_is_the_shipped_script(tmp_path: Path):
    assert lmcore("sbatch-template", cwd=tmp_path).stdout == (REPO / "slurm" / "lmcore.sbatch").read_text()


def test_bash_completion_offers_commands_options_names_keys_and_choices(tmp_path: Path):
    script = tmp_path / "c.bash"
    script.write_text(lmcore("completion", "bash").stdout)
    probe = f"""source {script}
t() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMPREPLY=(); _lmcore
      echo "${{COMPREPLY[*]}}"; }}
t lmcore ge; t lmcore train --no; t lmcore eval --config ti; t lmcore train optim.l
t lmcore train data.batching = pa; t lmcore submit train --clus; t lmcore submit train --cluster lo
"""
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    out = out.stdout.splitlines()
    assert out == ["generate", "--no-progress", "tiny", "optim.lr=", "padded packed", "--cluster", "local"]
    zsh = lmcore("completion", "zsh").stdout
    assert "bashcompinit" in zsh and "complete -F _lmcore lmcore" in zsh


def test_status_without_slurm_shows_what_the_run_folder_knows(tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "v0_1" / "run", run)
    shown = lmcore("status", str(run), cwd=tmp_path).stdout
    assert "checkpoints: step_00000006" in shown and "last validation masked perplexity" in shown
    assert "no SLURM job has trained in this run folder" in shown
    assert "does not exist" in one_error(lmcore("status", str(tmp_path / "nope"), cwd=tmp_path))


def test_a_library_outside_the_tested_versions_is_one_clear_line(monkeypatch):
    import lmcore.deps as deps

    monkeypatch.setattr(deps.metadata, "version", lambda name: "9.0.1")
    with pytest.raises(LmcoreError, match=r"submitit 9.0.1 is installed.*pip install 'submitit>=1.5,<1.6'"):
        deps.require("submitit")
    assert "does not exist" in one_error(run_cli("verify", "/nonexistent"))
