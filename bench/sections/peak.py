"""peak: 2048x2048 matmul GFLOP/s in fp32 and bf16 (the machine's ceiling; which is higher).
Best of 10 after 3 warm-ups, medians beside (bench/helpers.py peak, a child process)."""

from __future__ import annotations

from context import Bench


def run(b: Bench) -> dict:
    """The peak figures, measured once per bench (the train section needs them too)."""
    if "peak" in b.result["sections"]:
        return b.result["sections"]["peak"]
    r = b.helper("peak", "--size", "2048")
    b.result["sections"]["peak"] = r
    print(f"  2048^2 matmul: fp32 {r['fp32_gflops']} GFLOP/s, bf16 {r['bf16_gflops']} GFLOP/s "
          f"(best of 10; medians {r['fp32_gflops_median']} / {r['bf16_gflops_median']}); "
          f"higher: {r['higher']}", flush=True)
    return r
