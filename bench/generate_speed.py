"""Generation speed: lmcore's bulk generation job against the notebook's loop, same machine,
same run (absolute speeds drift with the machine and its load; the ratio is the figure).

    python bench/generate_speed.py                       # random weights, notebook sizes
    python bench/generate_speed.py --checkpoint runs/x   # a trained lmcore model instead

What it does:
  1. the real vocabulary: lmcore.data.cache.fit_tokenizer on --data (IMDB train; cached);
  2. a model of the notebook's sizes (Embedding 300, LSTM 256, Linear to the vocabulary),
     random weights (torch.manual_seed(0)) unless --checkpoint is given;
  3. saves it twice: as an lmcore checkpoint, and as the reference's format
     (torch.save(state_dict), keys embedding.weight, lstm.*, cls.weight, cls.bias, rows
     reordered to the notebook's word ids) for `seed_reference.py gen`;
  4. runs the reference (`gen --prompts 40 --max-len 50`: 40 prompts of <bos> + 5 words,
     50 new words at T = 0.3, whole prefix re-run per word), then ours (--prompts test
     reviews' first 5 words as a JSONL file, --new-tokens each, T = 0.3) through
     lmcore.gen.job.generate_shard for each precision and batch size, then the reference
     again; the ratio uses the mean of the two reference runs;
  5. times the parts of one decoding step (output matmul, sampling pass, LSTM step);
  6. prints a table and writes JSON (--out).

Throughput on both sides counts new tokens over the generation loop's time only (the
reference's gen_s; our decoder's time inside the job), setup excluded; the job's wall time
(prompt scan, checkpoint check, weight layout, file writes included) is reported too. With
random weights `<eos>` almost never comes, so both sides produce nearly every token asked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from context import REPO, SHARED

from lmcore.checkpoint import CheckpointWriter, resolve
from lmcore.config import DataConfig, ModelConfig, load_config
from lmcore.data.cache import fit_tokenizer
from lmcore.data.sources import read_texts
from lmcore.data.tokenizer import SPECIALS
from lmcore.gen.decoder import Decoder
from lmcore.gen.job import generate_shard
from lmcore.gen.sampling import SamplingParams, pick_tokens
from lmcore.model import LSTMLM
from lmcore.rundir import RunDir
from lmcore.runtime.precision import auto_precision


def notebook_ids(tok, source: str) -> list[int]:
    """For each lmcore id, the notebook's id of the same word: words in first-seen order over
    IMDB train, then <unk> <pad> <bos> <eos>."""
    order: dict[str, None] = {}
    for text in read_texts(source, "train", "text"):
        for w in Counter(text.lower().split()):
            if w in tok.stoi and w not in SPECIALS:
                order.setdefault(w, None)
    words = list(order)
    ref = {w: i for i, w in enumerate(words)}
    for k, s in enumerate(SPECIALS):
        ref[s] = len(words) + k
    if len(ref) != len(tok):
        raise SystemExit(f"vocabularies differ: notebook order gives {len(ref)} words, lmcore {len(tok)}")
    return [ref[w] for w in tok.itos]


def save_lmcore_checkpoint(model, tok, run_dir: Path) -> Path:
    w = CheckpointWriter(RunDir(run_dir), 0)
    w.begin()
    w.write_main(model, {"state": {}, "param_groups": []}, {"step": 0, "note": "bench: inference only"},
                 tok.to_json(), "")
    return w.finish(model.architecture(), tok.fingerprint, 0, keep=1)


def notebook_model(checkpoint: str, data: str, random_run: Path):
    """(model, tokenizer, lmcore checkpoint, what the weights are): the trained checkpoint given,
    or the notebook's sizes with random weights (torch.manual_seed(0)) saved to random_run.
    Either way the architecture must be the notebook's, which the reference can load."""
    if checkpoint:
        found = resolve(checkpoint)
        (model, tok), ckpt = found.build_model(), found.path
        weights = f"trained: {ckpt}"
    else:
        tok = fit_tokenizer(DataConfig(source=data))
        torch.manual_seed(0)
        model = LSTMLM(len(tok), ModelConfig(embedding_dim=300, hidden_dim=256), tok.pad_id).eval()
        weights = "random (torch.manual_seed(0)): speed only, the text is noise"
        ckpt = save_lmcore_checkpoint(model, tok, random_run)
    if model.adaptive is not None or model.proj is not None or model.cfg.num_layers != 1:
        raise SystemExit("the reference format needs the notebook's architecture (1 layer, full softmax)")
    return model, tok, ckpt, weights


def save_reference_checkpoint(model, ref_ids: list[int], path: Path) -> None:
    perm = torch.tensor(ref_ids)
    sd = {}
    emb = model.embedding.weight.detach()
    sd["embedding.weight"] = torch.empty_like(emb).index_copy_(0, perm, emb)
    for name, p in model.lstm.named_parameters():
        sd[f"lstm.{name}"] = p.detach().clone()
    w, b = model.head.weight.detach(), model.head.bias.detach()
    sd["cls.weight"] = torch.empty_like(w).index_copy_(0, perm, w)
    sd["cls.bias"] = torch.empty_like(b).index_copy_(0, perm, b)
    torch.save(sd, path)


def run_reference(script: Path, data: str, ckpt: Path, prompts: int, max_len: int, threads: int) -> dict:
    cmd = [sys.executable, str(script), "gen", "--data", data, "--ckpt", str(ckpt), "--prompts", str(prompts),
           "--max-len", str(max_len)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"reference failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_profile(model, tok, rows: int, precision: str, reps: int = 5) -> dict:
    """Milliseconds per decoding step, by part, at `rows` rows (T = 0.3 plain sampling)."""
    dec = Decoder(model, tok, SamplingParams(0.3, max_new_tokens=1), "cpu", precision)
    h = [torch.randn(rows, dec.hidden).tanh() for _ in dec.layers]
    c = [torch.randn(rows, dec.hidden) for _ in dec.layers]
    toks = torch.randint(4, len(tok), (rows,))
    u = torch.rand(rows, dtype=torch.float64)

    def best(f) -> float:
        f()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return round(min(times) * 1e3, 2)

    with torch.inference_mode():
        logits = dec._logits(h[-1])
        parts = {"output_matmul_ms": best(lambda: dec._logits(h[-1])),
                 "sampling_ms": best(lambda: pick_tokens(logits, u, dec.params, dec.width, dec.refs)),
                 "lstm_step_ms": best(lambda: dec._step(toks, h, c))}
        if dec.fused:  # what the job runs for bf16 and int8 plain sampling: the two above in one pass
            parts["fused_logits_and_sampling_ms"] = best(lambda: dec._fused_sample(h[-1], rows, u))
    vocab = dec.head_b.shape[0]
    flops = 2 * rows * dec.hidden * vocab  # int8: integer operations
    parts["output_matmul_gflops"] = round(flops / parts["output_matmul_ms"] / 1e6, 1)
    parts["rows"] = rows
    return parts


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data" / "imdb"))
    p.add_argument("--reference", default=str(SHARED / "bench" / "seed_reference.py"))
    p.add_argument("--checkpoint", help="an lmcore run or checkpoint folder (default: random weights)")
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--batch-sizes", default="256")
    p.add_argument("--precisions", default="fp32,bf16,int8")
    p.add_argument("--ref-prompts", type=int, default=40)
    p.add_argument("--ref-max-len", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0 = default)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side (best and median)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--work", help="folder for checkpoints and outputs (default: a temp folder)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "generate_speed.json"))
    return p.parse_args()


def write_prompts(data: str, n: int, path: Path) -> None:
    """The first n test reviews' first 5 words, as a prompts JSONL file."""
    texts = read_texts(data, "test", "text")[:n]
    path.write_text("".join(json.dumps({"id": i, "prompt": " ".join(t.lower().split()[:5])}) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")


def run_ours(args: argparse.Namespace, work: Path, ckpt: Path, prompts: Path, precision: str, bs: int,
             rep: int) -> dict:
    """One bulk generation job (lmcore.gen.job.generate_shard) in this process: its decoder's
    new tokens/s, and the job's wall time around it."""
    out = work / f"out-{precision}-{bs}-{rep}"
    overrides = [f"run.dir={work / 'run'}", f"generate.checkpoint={ckpt}",
                 f"generate.prompts={prompts}", f"generate.output_dir={out}",
                 f"generate.batch_size={bs}", "generate.temperature=0.3",
                 f"generate.max_new_tokens={args.new_tokens}", f"generate.precision={precision}",
                 "tracking.wandb_mode=disabled", f"run.threads={args.threads}"]
    t0 = time.perf_counter()
    res = generate_shard(load_config(None, overrides), progress=False)
    wall = time.perf_counter() - t0
    row = {"precision": precision, "batch_size": bs, "prompts": res["prompts"],
           "new_tokens": res["new_tokens"], "decode_tokens_per_s": res["new_tokens_per_s"],
           "job_wall_s": round(wall, 2), "job_tokens_per_s": round(res["new_tokens"] / wall, 1)}
    print(f"ours {precision} batch {bs}: {row['new_tokens']} new tokens, decode "
          f"{row['decode_tokens_per_s']} tokens/s, job wall {row['job_wall_s']} s "
          f"({row['job_tokens_per_s']} tokens/s)", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return row


def summarize(result: dict, configs: list[tuple[str, int]]) -> dict:
    """Best and median of each side's runs, and the ratios (ours / the reference); printed."""
    summary = {}
    refs = [r["gen_tokens_per_s"] for r in result["reference"]]
    if refs:
        summary["reference"] = {"best": max(refs), "median": statistics.median(refs), "runs": refs}
        print(f"\nreference (notebook loop): best {max(refs)}, median {statistics.median(refs)} new tokens/s "
              f"over {len(refs)} runs")
    for precision, bs in configs:
        rows = [r for r in result["ours"] if (r["precision"], r["batch_size"]) == (precision, bs)]
        dec = [r["decode_tokens_per_s"] for r in rows]
        job = [r["job_tokens_per_s"] for r in rows]
        entry = {"best": max(dec), "median": statistics.median(dec), "job_best": max(job),
                 "job_median": statistics.median(job)}
        if refs:
            entry["ratio_best"] = round(max(dec) / max(refs), 1)
            entry["ratio_median"] = round(statistics.median(dec) / statistics.median(refs), 1)
            entry["ratio_job_best"] = round(max(job) / max(refs), 1)
        summary[f"{precision}/batch{bs}"] = entry
        ratios = (f"  ratio best/best {entry['ratio_best']}x, median/median {entry['ratio_median']}x, "
                  f"job wall best {entry['ratio_job_best']}x") if refs else ""
        print(f"  ours {precision:5s} batch {bs:4d}: best {max(dec):8.1f}, median "
              f"{statistics.median(dec):8.1f} new tokens/s{ratios}")
    return summary


def main() -> None:
    args = parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lmcore-genbench-"))
    work.mkdir(parents=True, exist_ok=True)
    model, tok, ckpt, weights = notebook_model(args.checkpoint, args.data, work / "run")
    ref_ckpt = work / "reference_lm.pt"
    save_reference_checkpoint(model, notebook_ids(tok, args.data), ref_ckpt)
    prompts = work / "prompts.jsonl"
    write_prompts(args.data, args.prompts, prompts)

    result = {"machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                          "auto_precision": auto_precision("cpu"), "torch": torch.__version__},
              "weights": weights, "vocab": len(tok), "ours": [], "reference": []}

    def reference() -> None:
        if args.skip_reference:
            return
        r = run_reference(Path(args.reference), args.data, ref_ckpt, args.ref_prompts, args.ref_max_len,
                          args.threads)
        result["reference"].append(r)
        print(f"reference: {r['new_tokens']} new tokens in {r['gen_s']} s = {r['gen_tokens_per_s']} tokens/s",
              flush=True)

    configs = [(prec, int(bs)) for prec in args.precisions.split(",") for bs in args.batch_sizes.split(",")]
    for rep in range(args.repeats):  # interleaved, so that a burst of load hits both sides
        reference()
        for precision, bs in configs:
            result["ours"].append(run_ours(args, work, ckpt, prompts, precision, bs, rep))
    reference()

    result["step_profile"] = [step_profile(model, tok, bs, prec) for prec, bs in configs]
    result["summary"] = summarize(result, configs)
    for part in result["step_profile"]:
        print("step profile:", json.dumps(part))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out} (work folder {work})")


if __name__ == "__main__":
    main()
