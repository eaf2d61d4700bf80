"""Config overrides on the command line, in every spelling users type: `optim.lr=3e-4` (as Hydra),
`--optim.lr=3e-4` and `--optim.lr 3e-4` (as torchtitan, litgpt and tyro); dashes in key names
are underscores (`--train.max-steps 5`). A key always has a section, so `--name` without a dot
is an option of the command, never an override."""

from __future__ import annotations

import argparse


class OverrideSyntaxError(ValueError):
    pass


def normalize(argv: list[str]) -> list[str]:
    """argv with every `--section.key[=value]` override rewritten as `section.key=value`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token[2:].partition("=")
        if token.startswith("--") and "." in name:
            key = name.replace("-", "_")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise OverrideSyntaxError(f"{token} needs a value: {token} VALUE or {token}=VALUE")
                i += 1
                value = argv[i]
            token = f"{key}={value}"
        out.append(token)
        i += 1
    return out


def unknown_argument(item: str) -> str:
    """argparse's complaint, with the config key a user probably meant (--lr -> --optim.lr)."""
    if item.startswith("--"):
        from lmcore.config import Config  # only on this error path: it imports yaml
        from lmcore.schema import leaf_paths

        name = item[2:].split("=")[0].replace("-", "_")
        keys = [k for k in leaf_paths(Config) if k.rsplit(".", 1)[-1] == name]
        if keys:
            return f"unrecognized argument {item!r} (did you mean --{keys[0]}? config keys have a section)"
    return f"unrecognized argument {item!r}"


def add_point_arguments(p: argparse.ArgumentParser) -> None:
    """--grid, --points and --dir: what a sweep's points are and where they run, the same for
    `lmcore sweep` and `lmcore submit sweep`."""
    p.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                   help="sweep: an axis of the grid per entry; the points are their cartesian product")
    p.add_argument("--points", metavar="FILE",
                   help="sweep: the points from a file: YAML (.yaml/.yml, a list of mappings) or one line "
                        "of KEY=VALUE overrides per point")
    p.add_argument("--dir", metavar="SWEEP_DIR",
                   help="sweep: its folder, one run folder per point and sweep.json; its name is the W&B "
                        "group (default: runs/sweep-CONFIG-HASH of the sweep)")
