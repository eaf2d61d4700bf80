"""How far each lower precision moves what a trained model computes, against fp32.

    .venv/bin/python bench/precision_quality.py --checkpoint runs/x              # every 10th review
    .venv/bin/python bench/precision_quality.py --checkpoint runs/x --reviews 100 --gen-reviews 50

Reads test reviews as the evaluation does (`<bos>` + first 256 words + `<eos>`, every
--stride-th review) and measures, on the same reviews:
  * eval: the masked perplexity `lmcore eval` reports (lmcore.evaluate.evaluate, the job's
    own code) in fp32 and under each --eval-precisions autocast (the LSTM and the fused loss's
    matmul in that precision; the softmax and the sums in fp32), and its relative error;
  * generation (the first --gen-reviews of them): at every real position, the decoder's output layer
    (lmcore.gen.decoder.Decoder._logits, what the bulk job samples from) in fp32 and in each
    --gen-precisions: the next word's perplexity under each, how often the most likely word
    (greedy decoding's choice) is the same, and mean KL(fp32 || other) and total-variation
    distance of the sampling distribution at each --temperatures (TV bounds the chance that one
    draw differs under the best coupling). The banned words (`<unk> <pad> <bos>`) are excluded
    on both sides, as in generation, and positions whose next word is `<unk>` are left out.
Prints and writes (--out) one JSON, with a pass/fail against the bounds lmcore holds these
precisions to (BOUNDS: bench/README.md "Lower precisions").
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from context import SHARED

from lmcore.checkpoint import resolve
from lmcore.config import DataConfig
from lmcore.data.batching import IGNORE, review_rows, rows_to_batch
from lmcore.data.cache import load_split, strided
from lmcore.evaluate import evaluate
from lmcore.gen.decoder import Decoder
from lmcore.gen.sampling import SamplingParams

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What lmcore holds a lower precision to on a trained model (relative perplexity error; mean
# total variation of the sampling distribution at T = 1).
BOUNDS = {"eval_ppl_rel": 0.005, "gen_ppl_rel": 0.005, "gen_mean_tv": 0.02}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an lmcore run or checkpoint folder (full softmax)")
    p.add_argument("--data", default=str(SHARED / "data" / "imdb"))
    p.add_argument("--stride", type=int, default=10)
    p.add_argument("--reviews", type=int, default=0, help="eval: reviews of the strided test set (0 = all)")
    p.add_argument("--gen-reviews", type=int, default=250, help="generation: the first N of those (0 = all)")
    p.add_argument("--eval-precisions", default="bf16", help="autocast precisions of the eval (bf16, fp16)")
    p.add_argument("--gen-precisions", default="bf16,int8", help="decoder precisions (bf16, int8)")
    p.add_argument("--temperatures", default="1.0,0.3")
    p.add_argument("--out", default="")
    return p.parse_args()


def eval_errors(model, split, tok, precisions: list[str]) -> dict:
    """The eval job's masked perplexity in fp32 and under each autocast precision."""
    def run(dtype: torch.dtype | None) -> float:
        autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else nullcontext
        return evaluate(model, split, tok, 64, 256, autocast=autocast).masked_ppl

    exact = run(None)
    out = {"ppl_fp32": exact}
    for p in precisions:
        got = run(AUTOCAST[p])
        out[f"ppl_{p}"], out[f"ppl_rel_{p}"] = got, got / exact - 1.0
    return out


def compare(sums: dict, exact: Decoder, others: dict[str, Decoder], f: torch.Tensor, t: torch.Tensor,
            vocab: int, temps: list[float]) -> None:
    """Add one chunk of positions (features f, next words t) to the sums: NLL under each, argmax
    agreement, and KL / total variation of the sampling distribution at each temperature."""
    if len(f) < 16:  # the decoder's matmuls see at least 16 rows
        f = torch.cat([f, f.new_zeros(16 - len(f), f.shape[1])])
    l32 = exact._logits(f)[: len(t), :vocab].double()
    sums["positions"] += len(t)
    sums["nll_fp32"] += float((torch.logsumexp(l32, 1) - l32.gather(1, t[:, None]).squeeze(1)).sum())
    for name, dec in others.items():
        lg = dec._logits(f)[: len(t), :vocab].double()
        sums[f"nll_{name}"] += float((torch.logsumexp(lg, 1) - lg.gather(1, t[:, None]).squeeze(1)).sum())
        sums[f"argmax_same_{name}"] += int((l32.argmax(1) == lg.argmax(1)).sum())
        for temp in temps:
            lp32, lp = torch.log_softmax(l32 / temp, 1), torch.log_softmax(lg / temp, 1)
            p32 = lp32.exp()
            sums[f"kl_T{temp}_{name}"] += float(torch.where(p32 > 0, p32 * (lp32 - lp), 0.0).sum())
            sums[f"tv_T{temp}_{name}"] += float(0.5 * (p32 - lp.exp()).abs().sum())


def gen_errors(model, split, tok, precisions: list[str], temps: list[float]) -> dict:
    exact = Decoder(model, tok, SamplingParams(1.0), precision="fp32")
    others = {p: Decoder(model, tok, SamplingParams(1.0), precision=p) for p in precisions}
    sums: dict[str, float] = defaultdict(float)
    vocab = len(tok)
    for lo in range(0, len(split), 32):
        docs = [split.doc(i) for i in range(lo, min(lo + 32, len(split)))]
        batch = rows_to_batch(review_rows(docs, tok.bos_id, tok.eos_id, tok.pad_id, 256), tok.pad_id)
        h, _ = model.features(batch.inputs)
        # real targets that generation could produce (`<unk>` is banned there: -inf)
        keep = (batch.targets != IGNORE) & ~torch.isin(batch.targets, torch.tensor(exact.banned))
        feats, targets = h[keep], batch.targets[keep]
        for a in range(0, len(feats), 256):
            compare(sums, exact, others, feats[a : a + 256], targets[a : a + 256], vocab, temps)
        print(f"  generation: {min(lo + 32, len(split))}/{len(split)} reviews", flush=True)
    n = int(sums["positions"])
    out = {"positions": n, "ppl_fp32": math.exp(sums["nll_fp32"] / n)}
    for p in precisions:
        out[p] = {"ppl": math.exp(sums[f"nll_{p}"] / n), "argmax_agreement": sums[f"argmax_same_{p}"] / n,
                  **{f"mean_kl_T{t}": sums[f"kl_T{t}_{p}"] / n for t in temps},
                  **{f"mean_tv_T{t}": sums[f"tv_T{t}_{p}"] / n for t in temps}}
        out[p]["ppl_rel"] = out[p]["ppl"] / out["ppl_fp32"] - 1.0
    return out


def verdicts(res: dict) -> dict:
    """Each measured precision against BOUNDS."""
    v = {}
    for p in res["eval_precisions"]:
        v[f"eval_{p}"] = abs(res["eval"][f"ppl_rel_{p}"]) <= BOUNDS["eval_ppl_rel"]
    for p in res["gen_precisions"]:
        g = res["generation"][p]
        v[f"gen_{p}"] = (abs(g["ppl_rel"]) <= BOUNDS["gen_ppl_rel"]
                         and g.get("mean_tv_T1.0", math.inf) <= BOUNDS["gen_mean_tv"])  # T = 1 measured
    return v


def main() -> None:
    args = parse_args()
    found = resolve(args.checkpoint)
    (model, tok), ckpt = found.build_model(), found.path
    gen_p = [p for p in args.gen_precisions.split(",") if p]
    eval_p = [p for p in args.eval_precisions.split(",") if p]
    if not set(eval_p) <= set(AUTOCAST) or not set(gen_p) <= {"bf16", "int8"}:
        raise SystemExit(f"--eval-precisions takes {', '.join(AUTOCAST)}; --gen-precisions bf16, int8")
    if model.adaptive is not None and "int8" in gen_p:
        raise SystemExit("int8 is for the full softmax; this checkpoint uses the adaptive softmax")
    split = strided(load_split(DataConfig(source=args.data), "test", tok), args.stride, args.reviews)
    temps = [float(t) for t in args.temperatures.split(",")]
    gen_split = strided(split, 1, args.gen_reviews)
    with torch.inference_mode():
        res = {"checkpoint": str(ckpt), "reviews": len(split), "stride": args.stride,
               "threads": torch.get_num_threads(), "bounds": BOUNDS, "eval_precisions": eval_p,
               "gen_precisions": gen_p, "eval": eval_errors(model, split, tok, eval_p),
               "gen_reviews": len(gen_split),
               "generation": gen_errors(model, gen_split, tok, gen_p, temps)}
    res["within_bounds"] = verdicts(res)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
