"""A sweep's points: each a list of config overrides and the folder name made from them.

Points come from a grid (`KEY=V1,V2,...` per axis, their cartesian product, the first axis
varying slowest; a list value is written in brackets, `model.adaptive_cutoffs=[100,200],[500,900]`)
or from a file (`.yaml`/`.yml`: a list of mappings, dotted keys or nested sections; any other
file: one point per line, `key=value ...` as on the command line, `#` comments). Only the syntax
is checked here, with the overrides' own parse_override: keys and values are the config's to
check (lmcore.sweep.build loads every point's config), so a grid or a points file says what an
override would, did-you-mean included.
A point's folder name is made from its own overrides only (`lr-3e-3_hidden_dim-512`: stable,
filesystem-safe, unique; a hash is added where characters had to be replaced).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmcore.config import Config, parse_override
from lmcore.errors import ConfigError, first_line
from lmcore.overrides import OverrideSyntaxError, normalize
from lmcore.reading import regular_file
from lmcore.schema import leaf_paths

MAX_POINTS = 1000  # checking a point's config takes ~5 ms; more is a typo, or several sweeps
MAX_NAME = 100  # characters of a point's folder name
_SAFE = re.compile(r"[A-Za-z0-9.+-]*")  # what a value may hold and stay as it is in a name
# Keys the sweep sets for every point: not to be varied (run.dir) or kept apart from the names.
_PER_POINT = ("run.dir",)


class SweepError(ConfigError):
    """A grid, points file or sweep folder that cannot make a sweep."""


@dataclass(frozen=True)
class Point:
    name: str  # its folder in SWEEP_DIR
    overrides: tuple[str, ...]  # what this point sets, as command-line overrides
    where: str = ""  # where it was given ("points.yaml:4"); "" for a grid


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['optim.lr=1e-3,3e-3', 'model.adaptive_cutoffs=[1,2],[3,4]'] -> [(key, [value, ...]), ...]:
    values split at the commas outside brackets. Keys and values are the config's to check (build
    loads every point's config), so a grid says what an override would, did-you-mean included."""
    axes: list[tuple[str, list[str]]] = []
    for raw in _normalized(items, "the grid"):
        key = ".".join(parse_override(raw)[0])  # the overrides' own syntax check and message
        values = raw.partition("=")[2]
        not_per_point(f"{key}=", "the grid")
        if any(k == key for k, _ in axes):
            raise SweepError(f"grid key {key} is given twice; give all its values in one entry: "
                             f"{key}=V1,V2,...")
        axes.append((key, split_values(values, raw)))
    return axes


def split_values(text: str, entry: str) -> list[str]:
    """'1e-3,3e-3' -> ['1e-3', '3e-3']; '[1,2],[3,4]' -> ['[1,2]', '[3,4]'] (no split inside brackets)."""
    if not text.strip():
        raise SweepError(f"grid entry {entry!r} has no values: write KEY=V1,V2,...")
    values, start = [], 0
    closing = {"]": "[", "}": "{", ")": "("}
    stack: list[str] = []
    for i, c in enumerate(text):
        if c in "[{(":
            stack.append(c)
        elif c in closing:
            if not stack or stack[-1] != closing[c]:
                raise SweepError(f"grid entry {entry!r} has an unmatched {c!r}")
            stack.pop()
        elif c == "," and not stack:
            values.append(text[start:i])
            start = i + 1
    if stack:
        raise SweepError(f"grid entry {entry!r} has an unclosed {stack[-1]!r}")
    values.append(text[start:])
    values = [v.strip() for v in values]
    if any(not v for v in values):
        raise SweepError(f"grid entry {entry!r} has an empty value (two commas in a row, or one at an end)")
    return values


def grid_points(axes: list[tuple[str, list[str]]], has_base: bool = False) -> list[Point]:
    """The cartesian product of the axes, the first axis varying slowest. No axis (every value
    given once): one point, the base config."""
    count = math.prod(len(vs) for _, vs in axes)
    if count > MAX_POINTS:
        sizes = " x ".join(str(len(vs)) for _, vs in axes)
        raise SweepError(f"the grid makes {count} points ({sizes}), more than {MAX_POINTS}: split it into "
                         "several sweeps")
    if not axes:
        return [Point("base", ())] if has_base else []
    return [_point(tuple(f"{k}={v}" for (k, _), v in zip(axes, combo, strict=True)))
            for combo in itertools.product(*(vs for _, vs in axes))]


def read_points(path: str | Path) -> list[Point]:
    """A points file: YAML (.yaml/.yml, a list of mappings) or one override line per point."""
    p = regular_file(path, "points file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"points file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise SweepError(f"points file {p} cannot be read ({first_line(e)})") from None
    raw = _yaml_points(p, text) if p.suffix.lower() in (".yaml", ".yml") else _line_points(p, text)
    if len(raw) > MAX_POINTS:
        raise SweepError(f"points file {p} holds {len(raw)} points, more than {MAX_POINTS}: split it into "
                         "several sweeps")
    points = []
    for where, overrides in raw:
        seen: dict[str, str] = {}
        for text_ in overrides:
            key = text_.partition("=")[0]
            not_per_point(text_, where)
            if key in seen:
                raise SweepError(f"points file {where}: {key} is given twice in one point")
            seen[key] = text_
        points.append(_point(tuple(overrides), where))
    return points


def _line_points(path: Path, text: str) -> list[tuple[str, list[str]]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            tokens = normalize(shlex.split(line, comments=True))
            for t in tokens:
                parse_override(t)  # the overrides' own syntax check and message
        except (ValueError, ConfigError) as e:  # an unclosed quote; a token that is no override
            raise SweepError(f"points file {where}: {first_line(e)}") from None
        out.append((where, tokens))
    return out


def _yaml_points(path: Path, text: str) -> list[tuple[str, list[str]]]:
    try:
        doc = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        cause = e.problem or "syntax error"
        raise SweepError(f"points file {path} is not valid YAML: {cause}{pos}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"points file {path} is not valid YAML ({first_line(e)})") from None
    except RecursionError:
        raise SweepError(f"points file {path} nests lists or mappings too deeply") from None
    if doc is None:
        return []
    if not isinstance(doc, yaml.SequenceNode):
        raise SweepError(f"points file {path} must hold a list of mappings, one per point, e.g. "
                         "'- {optim.lr: 1e-3, model.hidden_dim: 256}'")
    out = []
    for node in doc.value:
        where = f"{path}:{node.start_mark.line + 1}"
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null" and not node.value:
            raise SweepError(f"points file {where}: an empty point; write {{}} for the base config")
        if not isinstance(node, yaml.MappingNode):
            raise SweepError(f"points file {where}: a point must be a mapping of keys to values")
        out.append((where, _flatten(node, "", path)))
    return out


def _flatten(node: yaml.MappingNode, prefix: str, path: Path) -> list[str]:
    """A YAML mapping (dotted keys or nested sections) -> overrides 'a.b=text', the text as written."""
    out = []
    for key_node, value in node.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode) or not key_node.value:
            raise SweepError(f"points file {where}: a key must be a plain name")
        key = f"{prefix}{key_node.value}"
        if isinstance(value, yaml.MappingNode):
            out += _flatten(value, f"{key}.", path)
        elif isinstance(value, yaml.SequenceNode):
            items = []
            for item in value.value:
                if not isinstance(item, yaml.ScalarNode):
                    raise SweepError(f"points file {where}: {key} must be a list of plain values")
                items.append(item.value if _SAFE.fullmatch(item.value) else json.dumps(item.value))
            out.append(f"{key}=[{', '.join(items)}]")
        elif value.tag == "tag:yaml.org,2002:null" and value.style is None:
            raise SweepError(f"points file {where}: {key} has no value; write one, or leave the key out")
        else:
            out.append(f"{key}={value.value}")
    return out


def _normalized(items: Sequence[str], where: str) -> list[str]:
    """`--optim.lr=1` and `--optim.lr 1` spelled `optim.lr=1`, as overrides are."""
    try:
        return normalize(list(items))
    except OverrideSyntaxError as e:
        raise SweepError(f"{first_line(e)} (in {where})") from None


def not_per_point(override: str, where: str) -> None:
    key = override.partition("=")[0]
    if key in _PER_POINT:
        raise SweepError(f"{key} is set by the sweep for each point (SWEEP_DIR/POINT); choose SWEEP_DIR "
                         f"with --dir instead of {key} (in {where})")


# -- names ---------------------------------------------------------------------------------------
def _short_keys() -> dict[str, str]:
    """Dotted key -> its name in folder names: the last part where no other section has it."""
    paths = list(leaf_paths(Config))
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (n if last.count(n) == 1 else p) for p, n in zip(paths, last, strict=True)}


def point_name(overrides: Sequence[str]) -> str:
    """A folder name from a point's overrides: 'lr-3e-3_hidden_dim-512'. Keys never hold '-' and
    values kept as they are never hold '_', so such a name is unique to its overrides; where a
    value had to be changed (characters outside [A-Za-z0-9.+-], lists) or the name is too long,
    8 hex digits of the overrides' sha256 are added."""
    if not overrides:
        return "base"
    short = _short_keys()
    parts, exact = [], True
    for text in overrides:
        key, _, value = text.partition("=")
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):  # a list: its items joined by '+'
            items = [v.strip() for v in split_values(value[1:-1], text)] if value[1:-1].strip() else []
            exact = exact and all(_SAFE.fullmatch(v) and "+" not in v for v in items)
            value = "+".join(items) or "empty"
        if not _SAFE.fullmatch(value) or not value:
            exact = False
            value = re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "x"
        parts.append(f"{short.get(key, key)}-{value}")
    name = "_".join(parts)
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    if len(name) > MAX_NAME:
        return f"{name[:MAX_NAME - 9]}-{digest}"
    return name if exact else f"{name}-{digest}"


def _point(overrides: tuple[str, ...], where: str = "") -> Point:
    return Point(point_name(overrides), overrides, where)
