"""`lmcore config --explain`: every key of a settings class with its type, value, default,
allowed values and help, read from the dataclasses themselves (lmcore/schema.py's `setting`),
so the list can never drift from what the config accepts."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING
from typing import Any, Literal

from lmcore.schema import range_text


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return f"{len(typing.get_args(tp))} numbers"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def explain(cls: type, path: str = "") -> list[dict[str, str]]:
    """One row per key of cls: key, type, default, allowed values, help (from the fields)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, tp = f"{path}.{f.name}" if path else f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += explain(tp, name)
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        literal = typing.get_origin(tp) is Literal
        allowed = ", ".join(map(str, typing.get_args(tp))) if literal else range_text(f)
        rows.append({"key": name, "type": type_name(tp), "default": _default_text(default),
                     "allowed": allowed, "help": f.metadata.get("help", "")})
    return rows


def _default_text(v: Any) -> str:
    if isinstance(v, str):
        return repr(v) if v == "" else v
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return str(list(v))
    return str(v)


def explain_text(obj: Any) -> str:
    """The rows of explain() for a settings instance, with its values, as aligned text."""
    rows = explain(type(obj))
    for row in rows:
        value: Any = obj
        for part in row["key"].split("."):
            value = getattr(value, part)
        row["value"] = _default_text(value)
    width = max(len(r["key"]) for r in rows)
    lines = []
    for r in rows:
        facts = [r["type"]] + [f"{k} {r[k]}" for k in ("value", "default", "allowed") if r[k]]
        lines.append(f"{r['key']:<{width}}  {r['help']}\n{'':<{width}}  ({'; '.join(facts)})")
    return "\n".join(lines) + "\n"
