"""Configs: YAML files, command-line overrides, and the errors a typo gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcore.config import Config, load_config
from lmcore.errors import ConfigError
from tests.conftest import REPO


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    assert isinstance(load_config(path), Config)


def test_imdb_seed_is_the_notebooks_recipe():
    cfg = load_config(REPO / "configs/imdb_seed.yaml")
    assert (cfg.model.embedding_dim, cfg.model.hidden_dim, cfg.model.num_layers) == (300, 256, 1)
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.train.epochs, cfg.data.truncate) == (32, 1e-3, 10, 256)
    assert cfg.data.min_count == 6 and cfg.optim.schedule == "constant"


def test_overrides_beat_the_file_and_are_typed(tmp_path: Path):
    cfg = load_config(REPO / "configs/tiny.yaml", ["optim.lr=3e-4", "train.max_steps=7",
                                                   "model.tie_weights=true", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.model.tie_weights is True
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.hidden_dim == 64  # from the file


def test_the_resolved_config_round_trips_through_yaml(tmp_path: Path):
    cfg = load_config(REPO / "configs/imdb_seed.yaml", ["optim.lr=0.002"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("optimizer.lr=1", "valid keys in the top level: run, data, model"),
    ("optim.lr=abc", "optim.lr must be a number"),
    ("train.batch_size=1.5", "train.batch_size must be an integer"),
    ("data.batching=foo", "data.batching must be one of padded, packed"),
    ("model.tie_weights=maybe", "model.tie_weights must be true or false"),
    ("train.batch_size=0", "train.batch_size must be in (0, 1000000]"),
    ("run.seed=-5", "run.seed must be in [0, 4294967296)"),
    ("generate.temperature=1e-45", "use 0 for greedy"),
    ("generate.top_p=1.5", "generate.top_p must be in (0, 1]"),
    ("optim=3", "config section 'optim' must be a mapping"),
    ("lr", "must look like section.key=value"),
])
def test_bad_values_are_rejected_with_the_fix_named(override: str, message: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)
