"""Typed settings from YAML files, the command line and dicts: one engine for run configs
(lmcore/config.py) and cluster profiles (lmcore/slurm/profile.py).

A settings class is a dataclass whose fields declare their help text and range with
`setting(...)`. `Reader.build(cls, tree)` makes an instance from a `Value` tree:

- every scalar is converted from its source text by the field's type, so YAML 1.1's guesses
  never decide: `mixed_precision: no` is the string "no", `lr: 1e-3` the number 0.001, and
  `max_steps: 1:30` (YAML 1.1 reads 90) or `seed: 010` (octal 8) are errors;
- a key given twice, a key without a value, an unknown key (with a did-you-mean, also across
  sections: `lr` at the top level -> 'optim.lr') are errors, each naming the file and line;
- ranges declared on the fields are checked, and `explain(cls)` lists every key with its type,
  default, allowed values and help, for `lmcore config --explain`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from lmcore.errors import ConfigError, LmcoreError, first_line

_NULL_TAG = "tag:yaml.org,2002:null"
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, nonempty: bool = False) -> Any:
    """A dataclass field with its help text and the range its value must be in."""
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le, "nonempty": nonempty}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# -- values with their origin ------------------------------------------------------------------
@dataclass
class Value:
    """A parsed value and where it came from ("configs/x.yaml:12", "the command line ...").

    data: a scalar's source text (text=True: a YAML plain or quoted scalar, an override), a
    Python value (from a dict), a list of Values, or a dict of key -> Value."""

    data: Any
    where: str = ""
    text: bool = False  # data is source text, to be converted by the field's type
    null: bool = False  # an explicit YAML null: `key:` with nothing, `~`, `null`
    tag: str = ""  # the YAML tag a plain scalar resolves to (for untyped values)
    override: bool = False  # from the command line, where a list may be written a,b
    key_where: dict[str, str] = field(default_factory=dict)  # line of each key of a mapping

    @classmethod
    def of(cls, obj: Any, where: str = "") -> Value:
        """A tree of Values from plain Python data (a saved config, a job's dict)."""
        if isinstance(obj, dict):
            return cls({str(k): cls.of(v, where) for k, v in obj.items()}, where)
        if isinstance(obj, (list, tuple)):
            return cls([cls.of(v, where) for v in obj], where)
        return cls(obj, where, null=obj is None)

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.data, dict)

    def at(self) -> str:
        return f" ({self.where})" if self.where else ""


def _from_node(node: yaml.Node, path: str, error: Callable[[str], LmcoreError]) -> Value:
    where = f"{path}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.ScalarNode):
        plain = node.style is None
        return Value(node.value, where, text=True, null=plain and node.tag == _NULL_TAG,
                     tag=node.tag if plain else "tag:yaml.org,2002:str")
    if isinstance(node, yaml.SequenceNode):
        return Value([_from_node(n, path, error) for n in node.value], where)
    out: dict[str, Value] = {}
    keys: dict[str, str] = {}
    for key_node, value_node in node.value:
        key_at = f"{path}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode):
            raise error(f"{key_at}: a key must be a plain name")
        key = key_node.value
        if key == "<<":
            raise error(f"{key_at}: YAML merge keys (<<) are not supported; write the keys out")
        if key in out:
            first = keys[key].rsplit(":", 1)[1]
            raise error(f"{key_at}: key '{key}' is given twice (first at line {first}); YAML would silently "
                        "keep the last one: remove one of them")
        out[key], keys[key] = _from_node(value_node, path, error), key_at
    return Value(out, where, key_where=keys)


def read_yaml(path: str | Path, what: str = "config file", error: type[LmcoreError] = ConfigError) -> Value:
    """A YAML file holding one mapping, as a Value tree. Any problem is one `error` line naming
    the file, and for syntax errors the cause, line and column."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a folder; pass a YAML file")
    if path.exists() and not path.is_file():  # a FIFO would block the read, a device never end it
        raise error(f"{what} {path} is not a regular file; pass a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; pass an existing YAML file") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not valid YAML (not UTF-8 text: byte {e.start}); save it as UTF-8"
                    ) from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({first_line(e)})") from None
    try:
        docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        cause = "; ".join(s for s in (e.context, e.problem) if s) or "syntax error"
        raise error(f"{what} {path} is not valid YAML: {cause}{pos}") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML ({first_line(e)})") from None
    except RecursionError:
        raise error(f"{what} {path} nests lists or mappings too deeply to be a config") from None
    if len(docs) > 1:
        raise error(f"{what} {path} holds {len(docs)} YAML documents (---); keep one")
    if not docs or (isinstance(docs[0], yaml.ScalarNode) and docs[0].tag == _NULL_TAG):
        return Value({}, str(path))
    try:
        tree = _from_node(docs[0], str(path), lambda m: error(f"{what} {m}"))
    except RecursionError:
        raise error(f"{what} {path} nests lists or mappings too deeply to be a config") from None
    if not tree.is_mapping:
        raise error(f"{what} {path} must hold a mapping of keys, e.g. 'optim: ...' (found a "
                    f"{'list' if isinstance(tree.data, list) else 'single value'})")
    return tree


def set_path(tree: Value, keys: list[str], value: Value, section_error: Callable[[str], NoReturn]) -> None:
    """Put value at keys (a dotted override) into tree, making sections on the way."""
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.data.get(k)
        if child is None or child.null:
            child = node.data[k] = Value({}, value.where)
        if not child.is_mapping:
            section_error(".".join(keys[: i + 1]))
        node = child
    node.data[keys[-1]] = value
    node.key_where[keys[-1]] = value.where


# -- building ------------------------------------------------------------------------------------
class Reader:
    """Builds settings dataclasses, phrasing errors for one kind of file.

    value_name(path) names a key in value errors ("config optim.lr"), unknown(path) starts the
    unknown-key error ("unknown config key 'optim.lrr'"), error is the exception type."""

    def __init__(self, value_name: Callable[[str], str], unknown: Callable[[str], str],
                 error: type[LmcoreError] = ConfigError):
        self.value_name, self.unknown, self.error = value_name, unknown, error

    def fail(self, message: str) -> NoReturn:
        raise self.error(message)

    def build(self, cls: type, tree: Value, path: str = "") -> Any:
        """An instance of cls from tree, every value converted and range-checked."""
        self._paths = list(leaf_paths(cls, path))
        obj = self._build(cls, tree, path)
        for name, value, f in walk(obj, path):
            self._check_range(name, value, f, where_of(tree, name[len(path) + 1:] if path else name))
        return obj

    def _build(self, cls: type, tree: Value, path: str) -> Any:
        if not tree.is_mapping:
            what = f"section '{path}'" if path else "the top level"
            self.fail(f"{self.value_name('').strip() or 'config'} {what} must be a mapping; "
                      f"got {_shown(tree)}{tree.at()}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        kwargs: dict[str, Any] = {}
        for key, value in tree.data.items():
            name = _join(path, key)
            if key not in names:
                self._unknown(key, path, names, tree.key_where.get(key, value.where))
            kwargs[key] = self.convert(value, hints[key], name)
        return cls(**kwargs)

    def _unknown(self, key: str, path: str, names: list[str], where: str) -> NoReturn:
        paths = getattr(self, "_paths", [])
        elsewhere = [p for p in paths if p.rsplit(".", 1)[-1] == key and p != _join(path, key)]
        hint = elsewhere[:1] or [_join(path, h) for h in difflib.get_close_matches(key, names, n=1)]
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        scope = f"'{path}'" if path else "the top level"
        at = f" ({where})" if where else ""
        self.fail(f"{self.unknown(_join(path, key))}{did_you_mean}{at}; valid keys in {scope}: "
                  + ", ".join(names))

    def convert(self, v: Value, tp: Any, name: str) -> Any:
        """v converted to the type tp (see the module docstring); name is its dotted key."""
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            if v.null:
                return None
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
            origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            if not v.is_mapping:
                self.fail(f"{self.value_name('').strip() or 'config'} section '{name}' must be a mapping; "
                          f"got {_shown(v)}{v.at()}")
            return self._build(tp, v, name)
        if tp is Any:
            return self._untyped(v, name)
        if v.null:
            self.fail(f"{self.value_name(name)} has no value{v.at()}; write one, or remove the key to use "
                      "the default")
        if origin is Literal:
            choices = [str(c) for c in typing.get_args(tp)]
            text = v.data if isinstance(v.data, str) else None
            if text not in choices:
                self.fail(f"{self.value_name(name)} must be one of {', '.join(choices)}; "
                          f"got {_shown(v)}{v.at()}")
            return text
        if origin is list:
            (item,) = typing.get_args(tp)
            return [self.convert(x, item, f"{name}[{i}]") for i, x in enumerate(self._items(v))]
        if origin is tuple:
            args = typing.get_args(tp)
            items = self._items(v)
            if len(items) != len(args):
                self.fail(f"{self.value_name(name)} must be a list of {len(args)} values; "
                          f"got {_shown(v)}{v.at()}")
            pairs = zip(items, args, strict=True)
            return tuple(self.convert(x, a, f"{name}[{i}]") for i, (x, a) in enumerate(pairs))
        if origin is dict:
            if not v.is_mapping:
                self.fail(f"{self.value_name(name)} must be a mapping; got {_shown(v)}{v.at()}")
            return {k: self._untyped(x, f"{name}.{k}") for k, x in v.data.items()}
        if v.is_mapping or isinstance(v.data, list):
            self.fail(f"{self.value_name(name)} must be a single value; got {_shown(v)}{v.at()}")
        return self._scalar(v, tp, name)

    def _items(self, v: Value) -> list[Value]:
        if isinstance(v.data, list):
            return v.data
        if v.is_mapping:
            self.fail(f"{self.value_name('')}: expected a list{v.at()}")
        if v.text and v.data.strip().startswith("["):  # an override such as model.x=[1, 2]
            try:
                seq = yaml.safe_load(v.data)
            except yaml.YAMLError as e:
                self.fail(f"list {v.data!r} is not valid YAML ({first_line(e)}){v.at()}")
            return [Value(str(x) if not isinstance(x, str) else x, v.where, text=True) for x in seq or []]
        if v.override:  # tracking.tags=a,b
            return [Value(s.strip(), v.where, text=True) for s in v.data.split(",") if s.strip()]
        return [v]  # one value where a list goes: a list of it

    def _untyped(self, v: Value, name: str) -> Any:
        """A value of a free-form mapping (profile env, sbatch options): its text, or a boolean."""
        if v.is_mapping or isinstance(v.data, list) or v.null:
            self.fail(f"{self.value_name(name)} must be a single value; got {_shown(v)}{v.at()}")
        # The text as written ('0755', 'on', '1:30'), which YAML 1.1 would turn into 493, True and 90;
        # only true and false are read (a bare sbatch flag, an omitted one).
        if v.text and v.tag != "tag:yaml.org,2002:str" and v.data.strip().lower() in ("true", "false"):
            return v.data.strip().lower() == "true"
        return v.data

    def _scalar(self, v: Value, tp: type, name: str) -> Any:
        d, label = v.data, self.value_name(name)
        if tp is bool:
            if isinstance(d, bool):
                return d
            if isinstance(d, str) and d.strip().lower() in _TRUE + _FALSE:
                return d.strip().lower() in _TRUE
            self.fail(f"{label} must be true or false; got {_shown(v)}{v.at()}")
        if tp is int:
            if isinstance(d, int) and not isinstance(d, bool):
                return d
            if isinstance(d, str):
                s = d.strip().replace("_", "")
                if re.fullmatch(r"[-+]?0\d+", s):
                    self.fail(f"{label} {d!r} has a leading zero (YAML 1.1 would read it as octal); write "
                              f"{int(s)}{v.at()}")
                if re.fullmatch(r"[-+]?\d+", s):
                    return int(s)
                number = _float(s)
                if number is not None and number.is_integer():  # 1e4
                    return int(number)
            self.fail(f"{label} must be an integer; got {_shown(v)}{v.at()}")
        if tp is float:
            number = float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else (
                _float(d.strip().replace("_", "")) if isinstance(d, str) else None)
            if number is None:
                self.fail(f"{label} must be a number; got {_shown(v)}{v.at()}")
            return number
        if tp is str:
            if isinstance(d, str):
                return d
            if isinstance(d, (int, float)) and not isinstance(d, bool):
                return str(d)
            self.fail(f"{label} must be a string; got {_shown(v)}{v.at()}")
        raise TypeError(f"settings type {tp} of {name} is not supported")  # a programming error

    def _check_range(self, name: str, value: Any, f: dataclasses.Field, where: str) -> None:
        at = f" ({where})" if where else ""
        m = f.metadata
        if m.get("nonempty") and value == "":
            self.fail(f"{self.value_name(name)} must not be empty{at}: give a value (an unset shell variable "
                      "leaves it empty)")
        for x in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                continue
            if isinstance(x, float) and not math.isfinite(x):
                self.fail(f"{self.value_name(name)} must be a finite number; got {x}{at}")
            if not _in_range(x, m):
                self.fail(f"{self.value_name(name)} must be {range_text(f)}; got {x}{at}")


def _in_range(x: float, m: typing.Mapping[str, Any]) -> bool:
    return ((m.get("gt") is None or x > m["gt"]) and (m.get("ge") is None or x >= m["ge"])
            and (m.get("lt") is None or x < m["lt"]) and (m.get("le") is None or x <= m["le"]))


def _float(s: str) -> float | None:
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s):
        return None  # not "inf", "nan", "0x10", "1:30"
    return float(s)


def _shown(v: Value) -> str:
    if v.is_mapping:
        return "a mapping"
    if isinstance(v.data, list):
        return "a list"
    return repr(v.data)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def leaf_paths(cls: type, path: str = "") -> Iterator[str]:
    """Every dotted key of a settings class (for the did-you-mean across sections)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_paths(hints[f.name], _join(path, f.name))
        else:
            yield _join(path, f.name)


# -- walking and explaining ---------------------------------------------------------------------
def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted name, value, field) of every leaf setting of a dataclass instance."""
    for f in dataclasses.fields(obj):
        name = _join(path, f.name)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk(value, name)
        else:
            yield name, value, f


def where_of(tree: Value, dotted: str) -> str:
    """Where the value of a dotted key was given in tree ("" when it is a default)."""
    node = tree
    for k in dotted.split("."):
        if not node.is_mapping or k not in node.data:
            return ""
        node = node.data[k]
    return node.where


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) and abs(x) < 10**12 else f"{x:g}"


def range_text(f: dataclasses.Field) -> str:
    m = f.metadata
    lo = f"> {_bound(m['gt'])}" if m.get("gt") is not None else \
        f">= {_bound(m['ge'])}" if m.get("ge") is not None else ""
    hi = f"< {_bound(m['lt'])}" if m.get("lt") is not None else \
        f"<= {_bound(m['le'])}" if m.get("le") is not None else ""
    if lo and hi:
        left = "(" if lo.startswith(">") and not lo.startswith(">=") else "["
        right = ")" if hi.startswith("<") and not hi.startswith("<=") else "]"
        return f"in {left}{lo.split()[-1]}, {hi.split()[-1]}{right}"
    return lo or hi
