"""peak: the machine's ceilings. A 2048x2048 matmul in fp32 and bf16 (best of 10 after 3
warm-ups, medians beside), and each job's own ceiling: its matmuls at their real shapes and
layouts in fp32, bf16, fp16 (and int8 where lmcore has it), combined by FLOPs (bench/ceiling.py).
Both from bench/helpers.py, a child process."""

from __future__ import annotations

from context import Bench
from report import table


def run(b: Bench) -> dict:
    """The peak figures, measured once per bench (the job sections need them too)."""
    if "peak" in b.result["sections"]:
        return b.result["sections"]["peak"]
    r = b.helper("peak", "--size", "2048")
    vocab = (b.result.get("setup") or {}).get("vocab") or 40135
    r["jobs"] = b.helper("ceiling", "--vocab", str(vocab), "--min-seconds", str(b.args.ceiling_min_seconds))
    b.result["sections"]["peak"] = r
    print(f"  2048^2 matmul: fp32 {r['fp32_gflops']} GFLOP/s, bf16 {r['bf16_gflops']} GFLOP/s "
          f"(best of 10; medians {r['fp32_gflops_median']} / {r['bf16_gflops_median']}); "
          f"higher: {r['higher']}", flush=True)
    for job in ("train", "eval", "gen"):
        j = r["jobs"][job]
        precisions = [p for p in j["ceiling_gflops"] if p != "best"]
        table(f"{job}: matmuls at their real shapes (GFLOP/s, best of 5)",
              ["matmul", "shape", "GFLOP/token", *precisions, "int8"],
              [[name, m["shape"], m["gflop_per_token"], *[m.get(p, {}).get("best") for p in precisions],
                m.get("int8", {}).get("best")] for name, m in j["matmuls"].items()])
        print(f"  {job} ceiling GFLOP/s: " + ", ".join(f"{p} {v}" for p, v in j["ceiling_gflops"].items())
              + f" (best: {j['best_choice']})", flush=True)
    return r


def fraction(b: Bench, job: str, gflops: float, precisions: tuple[str, ...]) -> dict:
    """Our model FLOP rate in `job` against its ceiling: the fastest single precision among those
    the run may use (`precisions`), and each matmul in its fastest one ("best")."""
    ceil = run(b)["jobs"][job]["ceiling_gflops"]
    single = max(precisions, key=lambda p: ceil[p])
    return {"ceiling_precision": single, "ceiling_gflops": ceil[single],
            "fraction_of_ceiling": round(gflops / ceil[single], 3), "best_mix_ceiling_gflops": ceil["best"],
            "fraction_of_best_mix": round(gflops / ceil["best"], 3)}
