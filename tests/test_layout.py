"""The package's shape: every module sits in a layer and imports only its own layer or those
below it (no module imports upward, no cycles), and every package says what it offers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO

# Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS = [
    ("foundations", ["lmcore", "lmcore.errors", "lmcore.fileio", "lmcore.reading", "lmcore.rundir",
                     "lmcore.schema", "lmcore.slurm", "lmcore.slurm.env", "lmcore.deps", "lmcore.presets",
                     "lmcore.explain"]),
    ("config", ["lmcore.config", "lmcore.overrides", "lmcore.points"]),
    ("data, runtime, tracking", ["lmcore.data.*", "lmcore.loss", "lmcore.runtime.*", "lmcore.track.*"]),
    ("model", ["lmcore.model", "lmcore.optim"]),
    ("checkpoints", ["lmcore.checkpoint"]),
    ("evaluation, generation", ["lmcore.evaluate", "lmcore.gen.*"]),
    ("training", ["lmcore.train_state", "lmcore.trainer"]),
    ("the dispatcher, export, sweeps", ["lmcore.jobs", "lmcore.export", "lmcore.sweep"]),
    ("SLURM", ["lmcore.slurm.profile", "lmcore.slurm.entry", "lmcore.slurm.submit", "lmcore.slurm.cli",
               "lmcore.slurm.status"]),
    ("command line", ["lmcore.cli", "lmcore.__main__", "lmcore.completion"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            if name == p or (p.endswith(".*") and (name == p[:-2] or name.startswith(p[:-1]))):
                return i
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py: put it in one")


def lmcore_imports(path: Path) -> set[str]:
    """The lmcore modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lmcore"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmcore":
            for a in node.names:  # `from lmcore.gen import job` imports the module lmcore.gen.job
                sub = f"{node.module}.{a.name}"
                found.add(sub if (REPO / Path(*sub.split("."))).with_suffix(".py").exists() else node.module)
    return found


MODULES = {module_name(p): p for p in sorted((REPO / "lmcore").rglob("*.py"))}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_upward(name: str):
    mine = layer_of(name)
    upward = [f"{dep} ({LAYERS[layer_of(dep)][0]})" for dep in sorted(lmcore_imports(MODULES[name]))
              if layer_of(dep) > mine]
    assert not upward, f"{name} ({LAYERS[mine][0]}) imports a higher layer: {', '.join(upward)}"


def test_no_import_cycles():
    graph = {name: {d for d in lmcore_imports(p) if d in MODULES and d != name}
             for name, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, node, dep])}")
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


PACKAGES = [n for n, p in MODULES.items() if p.name == "__init__.py" and n != "lmcore"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_says_what_it_offers(package: str):
    mod = importlib.import_module(package)
    assert mod.__doc__ and mod.__all__
    for name in mod.__all__:  # modules of the package, or names defined in its __init__
        assert hasattr(mod, name) or f"{package}.{name}" in MODULES, f"{package}.__all__ names {name}"
