"""eval: masked test perplexity throughput. `seed_reference.py eval --stride 10` against
`lmcore eval eval.stride=10 eval.notebook_figure=false eval.precision=P` for each of
--eval-precisions, on the same weights (random, torch.manual_seed(0), or --eval-checkpoint;
saved in both formats by bench/helpers.py checkpoints). The figures must agree (a correctness
check); the fastest precision whose figure agrees is the one the targets use (bf16's error on a
trained model: bench/precision_quality.py). Timed: the scoring loop only.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from children import proc_fields
from context import EVAL_STRIDE, TARGETS, Bench
from report import table

from . import peak


def _commands(b: Bench) -> tuple[list[str], list[str], dict, int]:
    """(our command, the reference's, the checkpoints, the review limit) on the same weights."""
    a = b.args
    ckpt_args = ["--data", str(a.data), "--work", str(b.work)]
    if a.eval_checkpoint:
        ckpt_args += ["--checkpoint", str(Path(a.eval_checkpoint).resolve())]
    b.fresh("random_run")
    b.fresh("eval-run")
    ck = b.helper("checkpoints", *ckpt_args)
    limit = a.eval_limit
    if limit % 32:
        limit += 32 - limit % 32  # the reference stops at whole batches of 32
    ours_cmd = b.lmcore("eval", "configs/imdb_seed.yaml", f"run.dir={b.work / 'eval-run'}",
                        f"eval.checkpoint={ck['checkpoint']}", f"eval.stride={EVAL_STRIDE}",
                        f"eval.limit={limit}", "eval.notebook_figure=false", "eval.split=test")
    ref_cmd = b.reference("eval", "--ckpt", ck["reference_checkpoint"], "--stride", str(EVAL_STRIDE),
                          *(["--limit", str(limit)] if limit else []))
    return ours_cmd, ref_cmd, ck, limit


def _run_pairs(b: Bench, ours_cmd: list[str], ref_cmd: list[str]) -> tuple[list[dict], list[dict]]:
    """--eval-repeats rounds of ours in each precision, then the reference; (ours, reference) rows."""
    ours, refs = [], []
    precisions = [p for p in b.args.eval_precisions.split(",") if p]
    order = [(f"ours-{p}", [*ours_cmd, f"eval.precision={p}"]) for p in precisions] + [("ref", ref_cmd)]
    for i, (side, cmd) in enumerate(order * b.args.eval_repeats):
        c = b.child(f"{side}-eval-{i}", cmd)
        j = c["json"]
        if side == "ref":
            row = {"masked_ppl": j["masked_ppl"], "notebook_unmasked_ppl": j["unmasked_ppl"],
                   "targets": j["real_tokens"], "seconds": j["eval_s"],
                   "real_tokens_per_s": round(j["real_tokens"] / j["eval_s"], 1), **proc_fields(c)}
            refs.append(row)
        else:
            row = {"precision": j["precision"], "masked_ppl": round(j["masked_ppl"], 3),
                   "targets": j["num_targets"], "reviews": j["num_reviews"], "seconds": j["seconds"],
                   "real_tokens_per_s": j["tokens_per_s"], **proc_fields(c)}
            ours.append(row)
        print(f"    {side}: masked ppl {row['masked_ppl']}, {row['targets']} targets, "
              f"{row['seconds']} s, {row['real_tokens_per_s']} real tokens/s, "
              f"peak RSS {row['peak_rss_mb']} MB", flush=True)
    return ours, refs


def _by_precision(ours: list[dict], ref: dict) -> dict[str, dict]:
    """Per precision: mean real tokens/s, the figure's difference from the reference's, agreement."""
    out = {}
    for p in dict.fromkeys(o["precision"] for o in ours):
        rows = [o for o in ours if o["precision"] == p]
        rel = rows[0]["masked_ppl"] / ref["masked_ppl"] - 1
        out[p] = {"real_tokens_per_s": round(statistics.mean(o["real_tokens_per_s"] for o in rows), 1),
                  "masked_ppl": rows[0]["masked_ppl"], "ppl_relative_difference": round(rel, 6),
                  "agree": rows[0]["targets"] == ref["targets"] and abs(rel) < 5e-3}
    return out


def run(b: Bench) -> None:
    ours_cmd, ref_cmd, ck, limit = _commands(b)
    ours, refs = _run_pairs(b, ours_cmd, ref_cmd)
    ref_tps = statistics.mean(r["real_tokens_per_s"] for r in refs)
    per = _by_precision(ours, refs[0])
    agreeing = {p: v for p, v in per.items() if v["agree"]} or per
    best = max(agreeing, key=lambda p: agreeing[p]["real_tokens_per_s"])
    our_tps, rel = per[best]["real_tokens_per_s"], per[best]["ppl_relative_difference"]
    agree = per[best]["agree"]
    b.result["sections"]["eval"] = {
        "weights": ck["weights"], "limit": limit, "reference": refs, "ours": ours, "by_precision": per,
        "best_precision": best,
        "reference_real_tokens_per_s": round(ref_tps, 1), "ours_real_tokens_per_s": our_tps,
        "figures_agree": agree, "ppl_relative_difference": rel,
        "agreement_note": "same targets (every word + one <eos> per review); the perplexities differ "
                          "slightly because the reference scores <eos> after the padding (the "
                          "notebook's rows), ours right after the last word; tolerance 0.5%",
        "note": "ours forward-only (eval.notebook_figure=false): the reference gets its unmasked "
                "figure from the same forward pass, ours would need a second one; timed: the scoring "
                "loop only"}
    table("evaluation (masked ppl, every 10th test review)",
          ["side", "ppl", "targets", "s", "real tok/s"],
          [["reference", refs[0]["masked_ppl"], refs[0]["targets"], refs[0]["seconds"], ref_tps]]
          + [[f"ours {o['precision']} run {i + 1}", o["masked_ppl"], o["targets"], o["seconds"],
              o["real_tokens_per_s"]] for i, o in enumerate(ours)])
    ratio = our_tps / ref_tps
    what = f"evaluation real tokens/s (best: {best}; stride 10" + (f", {limit} reviews)" if limit else ")")
    others = ", ".join(f"{p} {v['real_tokens_per_s'] / ref_tps:.2f}x ({v['ppl_relative_difference']:+.3%})"
                       for p, v in per.items())
    b.target("eval_throughput", what, round(ref_tps, 1), our_tps, "real tokens/s", ratio,
             f">= {TARGETS['eval_ratio']:g}x", ratio >= TARGETS["eval_ratio"],
             f"same weights ({ck['weights'].split(':')[0]}); masked ppl against the reference's "
             f"{refs[0]['masked_ppl']}, by precision: {others}; targets {ours[0]['targets']} vs "
             f"{refs[0]['targets']}: {'agree' if agree else 'DIFFER'}")
    _ceiling_target(b, our_tps, best)


def _ceiling_target(b: Bench, our_tps: float, precision: str) -> None:
    """Our eval's model FLOP rate (forward of the LSTM and the output layer per real token)
    against the eval batch's own ceiling (bench/ceiling.py), in the precision it ran and with
    each matmul in its fastest one."""
    gflops = our_tps * peak.run(b)["jobs"]["eval"]["gflop_per_token"]
    f = peak.fraction(b, "eval", gflops, (precision,))
    b.result["sections"]["eval"].update(model_gflops=float(f"{gflops:.4g}"), **f)
    b.target("eval_ceiling_fraction", f"eval model FLOP rate / the eval batch's ceiling, each matmul in "
             f"its fastest precision ({precision})", f["best_mix_ceiling_gflops"], float(f"{gflops:.4g}"),
             "GFLOP/s", f["fraction_of_best_mix"], f">= {TARGETS['ceiling_fraction']:g}",
             f["fraction_of_best_mix"] >= TARGETS["ceiling_fraction"],
             f"of the {precision} ceiling ({f['ceiling_gflops']} GFLOP/s): {f['fraction_of_ceiling']}")
