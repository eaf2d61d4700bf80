"""How far generate.precision=int8 moves the next-word distribution from fp32.

    .venv/bin/python bench/int8_quality.py --checkpoint runs/x            # every 10th test review
    .venv/bin/python bench/int8_quality.py --checkpoint runs/x --reviews 100

Reads test reviews as the evaluation does (`<bos>` + first 256 words + `<eos>`, every
--stride-th review), runs the trained model over them, and at every real position compares
the generation decoder's output layer in fp32 and in int8 (the same code the bulk job runs:
lmcore.gen.decoder.Decoder._logits). Prints and writes (--out, JSON):
  * masked perplexity of the next word with each (int8 as a scorer: how much it costs);
  * mean KL(fp32 || int8) and mean total-variation distance of the sampling distribution at
    each --temperatures (TV bounds the chance that one draw differs under the best coupling);
  * how often the most likely word (greedy decoding's choice) is the same.
The banned words (`<unk> <pad> <bos>`) are excluded on both sides, as in generation, and
positions whose next word is `<unk>` are left out.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from context import SHARED

from lmcore.checkpoint import resolve
from lmcore.config import DataConfig
from lmcore.data.batching import IGNORE, review_rows, rows_to_batch
from lmcore.data.cache import load_split, strided
from lmcore.gen.decoder import Decoder
from lmcore.gen.sampling import SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an lmcore run or checkpoint folder (full softmax)")
    p.add_argument("--data", default=str(SHARED / "data" / "imdb"))
    p.add_argument("--stride", type=int, default=10)
    p.add_argument("--reviews", type=int, default=250, help="reviews of the strided test set (0 = all)")
    p.add_argument("--temperatures", default="1.0,0.3")
    p.add_argument("--out", default="")
    return p.parse_args()


def compare(sums: dict, exact: Decoder, fast: Decoder, f: torch.Tensor, t: torch.Tensor, vocab: int,
            temps: list[float]) -> None:
    """Add one chunk of positions (features f, next words t) to the sums: NLL under each, argmax
    agreement, and KL / total variation of the sampling distribution at each temperature."""
    if len(f) < 16:  # the decoder's matmuls see at least 16 rows
        f = torch.cat([f, f.new_zeros(16 - len(f), f.shape[1])])
    l32 = exact._logits(f)[: len(t), :vocab].double()
    l8 = fast._logits(f)[: len(t), :vocab].double()
    sums["positions"] += len(t)
    for name, lg in (("nll_fp32", l32), ("nll_int8", l8)):
        sums[name] += float((torch.logsumexp(lg, 1) - lg.gather(1, t[:, None]).squeeze(1)).sum())
    sums["argmax_same"] += int((l32.argmax(1) == l8.argmax(1)).sum())
    for temp in temps:
        lp32, lp8 = torch.log_softmax(l32 / temp, 1), torch.log_softmax(l8 / temp, 1)
        p32 = lp32.exp()
        sums[f"kl_T{temp}"] += float(torch.where(p32 > 0, p32 * (lp32 - lp8), 0.0).sum())
        sums[f"tv_T{temp}"] += float(0.5 * (p32 - lp8.exp()).abs().sum())


def main() -> None:
    args = parse_args()
    found = resolve(args.checkpoint)
    (model, tok), ckpt = found.build_model(), found.path
    if model.adaptive is not None:
        raise SystemExit("int8 is for the full softmax; this checkpoint uses the adaptive softmax")
    split = strided(load_split(DataConfig(source=args.data), "test", tok), args.stride, args.reviews)
    exact = Decoder(model, tok, SamplingParams(1.0), precision="fp32")
    fast = Decoder(model, tok, SamplingParams(1.0), precision="int8")
    temps = [float(t) for t in args.temperatures.split(",")]
    sums = {"positions": 0, "nll_fp32": 0.0, "nll_int8": 0.0, "argmax_same": 0,
            **{f"kl_T{t}": 0.0 for t in temps}, **{f"tv_T{t}": 0.0 for t in temps}}
    vocab = len(tok)
    with torch.inference_mode():
        for lo in range(0, len(split), 32):
            docs = [split.doc(i) for i in range(lo, min(lo + 32, len(split)))]
            batch = rows_to_batch(review_rows(docs, tok.bos_id, tok.eos_id, tok.pad_id, 256), tok.pad_id)
            h, _ = model.features(batch.inputs)
            # real targets that generation could produce (`<unk>` is banned there: -inf)
            keep = (batch.targets != IGNORE) & ~torch.isin(batch.targets, torch.tensor(exact.banned))
            feats, targets = h[keep], batch.targets[keep]
            for a in range(0, len(feats), 256):
                compare(sums, exact, fast, feats[a : a + 256], targets[a : a + 256], vocab, temps)
            print(f"  {min(lo + 32, len(split))}/{len(split)} reviews", flush=True)
    n = sums["positions"]
    res = {"checkpoint": str(ckpt), "reviews": len(split), "positions": n,
           "ppl_fp32": math.exp(sums["nll_fp32"] / n), "ppl_int8": math.exp(sums["nll_int8"] / n),
           "argmax_agreement": sums["argmax_same"] / n,
           **{f"mean_kl_T{t}": sums[f"kl_T{t}"] / n for t in temps},
           **{f"mean_tv_T{t}": sums[f"tv_T{t}"] / n for t in temps}}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
