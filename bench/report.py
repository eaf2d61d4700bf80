"""What bench.py prints and writes besides the JSON: numbers, console tables, the markdown
table, and the machine's description."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from children import NOISY_CORES
from context import REPO


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(title: str, head: list[str], rows: list[list[Any]]) -> None:
    cells = [head] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    print(f"\n  {title}")
    for k, r in enumerate(cells):
        pairs = enumerate(zip(r, widths, strict=True))
        print("    " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs))
        if k == 0:
            print("    " + "  ".join("-" * w for w in widths))
    print(flush=True)


def machine_info() -> dict:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "host": platform.node()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["amx"] = sorted(f for f in flags if f.startswith("amx"))
        info["avx512_bf16"] = "avx512_bf16" in flags
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                                     capture_output=True, text=True, timeout=10).stdout.strip()
    return info


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Command: `{result['command']}`  ",
             f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('mem_gib')} GiB, AMX "
             f"{'yes' if m.get('amx') else 'no'}; torch {result.get('torch', '?')}; lmcore {m.get('git')}  ",
             f"Date: {result['started']}; load average (1 min) during the run: mean "
             f"{result['load']['mean']}, max {result['load']['max']} (the bench itself keeps "
             f"~{result['threads_used']} cores busy)  ",
             "Other processes' CPU use while each child ran (cores, flagged above "
             f"{NOISY_CORES}): " + (", ".join(f"{n} {v}" for n, v in result["noisy_children"].items())
                                    or "none flagged"), "",
             "| target | reference | ours | ratio | goal | pass |", "| --- | --- | --- | --- | --- | --- |"]
    for t in result["targets"]:
        ok = "-" if t["pass"] is None else ("**pass**" if t["pass"] else "**FAIL**")
        lines.append(f"| {t['what']} | {fmt(t['reference'])} | {fmt(t['ours'])} {t['unit']} | "
                     f"{fmt(t['ratio'])} | {t['target']} | {ok} |")
    lines.append("")
    for t in result["targets"]:
        if t["note"]:
            lines.append(f"- {t['name']}: {t['note']}")
    return "\n".join(lines) + "\n"
