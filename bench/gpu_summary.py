"""What bench/gpu_check.py makes of its parts' units: the figures side by side (ratios to the
reference), the correctness checks, what did not run and why, and the printed table. Every value
here is read from the units of this run; nothing is filled in."""

from __future__ import annotations

from typing import Any

from report import table
from sections.train import model_flops_per_token

EVAL_AGREE = 5e-3  # masked perplexities within 0.5% (the reference scores <eos> after the padding)


def _ok(parts: dict, part: str, unit: str) -> dict | None:
    u = (parts.get(part) or {}).get("units", {}).get(unit)
    return u if u and u.get("status") == "ok" else None


def _ratio(ours: float | None, ref: float | None) -> float | None:
    return round(ours / ref, 2) if ours and ref else None


def _train_rows(parts: dict, plan: dict) -> list[dict]:
    ref = _ok(parts, "train", "reference")
    ref_tps = ref["real_tokens_per_s"] if ref else None
    vocab = (plan.get("setup") or {}).get("vocab")
    peak = ((_ok(parts, "env", "info") or {}).get("matmul_peak")) or {}
    rows = [{"what": "train: reference (fp32, plain cross-entropy)", "value": ref_tps, "unit": "real tokens/s",
             "ratio": 1.0 if ref else None}]
    for v in plan["train"]["variants"]:
        o = _ok(parts, "train", f"ours_{v}")
        tps = o["real_tokens_per_s"] if o else None
        row = {"what": f"train: ours {v}", "value": tps, "unit": "real tokens/s", "ratio": _ratio(tps, ref_tps)}
        if o and vocab:
            tflops = tps * model_flops_per_token(vocab) / 1e12
            row.update(model_tflops=round(tflops, 2), cuda_peak_mb=o.get("cuda_peak_mb"),
                       of_bf16_peak=round(tflops / peak["bf16_tflops"], 3) if peak.get("bf16_tflops") else None)
        rows.append(row)
    return rows


def _eval_rows(parts: dict) -> tuple[list[dict], bool | None, dict]:
    ref = _ok(parts, "eval", "reference")
    ref_tps = ref["real_tokens_per_s"] if ref else None
    rows = [{"what": "eval: reference (fp32)", "value": ref_tps, "unit": "real tokens/s",
             "ratio": 1.0 if ref else None}]
    for p in ("fp32", "bf16"):
        o = _ok(parts, "eval", f"ours_{p}")
        tps = o["real_tokens_per_s"] if o else None
        rows.append({"what": f"eval: ours {p}", "value": tps, "unit": "real tokens/s", "ratio": _ratio(tps, ref_tps),
                     "masked_ppl": o["masked_ppl"] if o else None})
    ours = _ok(parts, "eval", "ours_fp32")
    agree, detail = None, {}
    if ref and ours:
        rel = ours["masked_ppl"] / ref["masked_ppl"] - 1
        agree = ours["targets"] == ref["targets"] and abs(rel) < EVAL_AGREE
        detail = {"ours_masked_ppl": ours["masked_ppl"], "reference_masked_ppl": ref["masked_ppl"],
                  "relative_difference": round(rel, 6), "targets": [ours["targets"], ref["targets"]],
                  "tolerance": EVAL_AGREE}
    return rows, agree, detail


def _gen_rows(parts: dict, plan: dict) -> list[dict]:
    ref = _ok(parts, "gen", "reference")
    ref_tps = ref["new_tokens_per_s"] if ref else None
    rows = [{"what": "gen: reference (notebook loop, fp32)", "value": ref_tps, "unit": "new tokens/s",
             "ratio": 1.0 if ref else None}]
    for p in plan["gen"]["precisions"]:
        o = _ok(parts, "gen", f"ours_{p}")
        med = o["median"] if o else None
        rows.append({"what": f"gen: ours {p} (median)", "value": med, "unit": "new tokens/s",
                     "ratio": _ratio(med, ref_tps)})
    return rows


def _checks(parts: dict, plan: dict) -> dict:
    def field(part: str, unit: str, key: str) -> Any:
        u = _ok(parts, part, unit)
        return u.get(key) if u else None

    resume = plan["resume"]["configs"]
    precisions = plan["gen"]["precisions"]
    return {
        "resume_bit_exact": {c: field("resume", c, "bit_exact") for c in resume},
        "training_deterministic": {c: field("resume", c, "deterministic") for c in resume},
        "resume_verdicts": {c: field("resume", c, "verdict") for c in resume},
        "gen_identical_across_batch_sizes": {p: field("gen", f"identity_{p}", "identical_across_batch_sizes")
                                             for p in precisions},
        "gen_identical_run_to_run": {p: field("gen", f"identity_{p}", "identical_run_to_run") for p in precisions},
        "gen_verdicts": {p: field("gen", f"identity_{p}", "verdict") for p in precisions},
    }


def _not_run(parts: dict) -> list[dict]:
    out = []
    for name, part in parts.items():
        if part.get("status") != "ok":
            out.append({"part": name, "unit": None, "status": part.get("status"), "why": part.get("why")})
        for unit, u in part.get("units", {}).items():
            if u.get("status") != "ok":
                out.append({"part": name, "unit": unit, "status": u.get("status"), "why": u.get("why")})
    return out


def summarize(parts: dict, plan: dict) -> dict:
    eval_rows, agree, detail = _eval_rows(parts)
    figures = _train_rows(parts, plan) + eval_rows + _gen_rows(parts, plan)
    checks = {**_checks(parts, plan), "eval_figures_agree": agree, "eval_agreement": detail}
    not_run = _not_run(parts)
    table("figures (this run; ratio = ours / the reference on the same device)",
          ["what", "value", "unit", "ratio"], [[f["what"], f["value"], f["unit"], f["ratio"]] for f in figures])
    table("checks", ["check", "result"],
          [[f"resume {c}", v] for c, v in checks["resume_verdicts"].items()]
          + [[f"gen {p}", v] for p, v in checks["gen_verdicts"].items()]
          + [["eval figures agree (fp32, 0.5%)", agree]])
    if not_run:
        table("did not run, or failed", ["part", "unit", "status", "why"],
              [[n["part"], n["unit"], n["status"], (n["why"] or "")[:120]] for n in not_run])
    return {"figures": figures, "checks": checks, "not_run": not_run}
