"""Progress for people and for log files: a bar on a terminal, plain lines otherwise.

SLURM writes stdout/stderr to files, where a tqdm bar becomes megabytes of carriage
returns; there we print one line every `log_interval` steps instead.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train",
                 unit: str = "step", force_plain: bool | None = None):
        self.enabled = enabled
        self.desc = desc
        self.total = total
        self.start_time = time.time()
        plain = (not sys.stderr.isatty()) if force_plain is None else force_plain
        self.n = initial
        self.bar = None
        if enabled and not plain:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int, metrics: dict[str, float], log_line: bool) -> None:
        if not self.enabled:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if log_line:
                self.bar.set_postfix({k: _fmt(v) for k, v in metrics.items()}, refresh=False)
        elif log_line:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            self.write(f"step {self.n}/{self.total} {shown}")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%H:%M:%S")
        line = f"[{stamp}] {self.desc}: {text}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if abs(v) >= 1000 or v == 0:
        return f"{v:.0f}" if abs(v) >= 1000 else "0"
    return f"{v:.4g}"
