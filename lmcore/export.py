"""`lmcore export RUN_OR_CHECKPOINT OUT_DIR`: a Hugging Face-style model folder.

    OUT_DIR/
      config.json         the architecture, the special token ids, the weights' sha256
      model.safetensors   the weights, byte for byte those of the checkpoint
      tokenizer.json      the vocabulary (lmcore.data.tokenizer)
      README.md           a model card: data, vocabulary, evaluation protocol, measured figures
      manifest.json       sha256 of every file, as in a checkpoint: `lmcore verify OUT_DIR`

It loads without lmcore's run folder (`LSTMLM.from_pretrained(OUT_DIR)`), and `lmcore eval` and
`lmcore generate` take it as a checkpoint (same weights: the same figure and the same bytes).
A folder that exists and is not empty is refused unless --force, which replaces it; the folder
appears complete or not at all (written aside, then renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from lmcore import __version__, fileio
from lmcore.checkpoint import FORMAT, MANIFEST, VERSION, Checkpoint, resolve
from lmcore.errors import LmcoreError, write_failed
from lmcore.rundir import RunDir
from lmcore.track.metrics import read_metrics


def export(source: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    ckpt = resolve(source)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmcoreError(f"export folder {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LmcoreError(f"export folder {out} is not empty; pass --force to replace it, or another folder")
    tok = ckpt.tokenizer()
    files = {"config.json": _config_json(ckpt, tok), "model.safetensors": ckpt.files["model.safetensors"],
             "tokenizer.json": ckpt.files["tokenizer.json"], "README.md": model_card(ckpt).encode("utf-8")}
    manifest = {"format": FORMAT, "version": VERSION, "step": ckpt.step, "export": True,
                "architecture": ckpt.manifest["architecture"],
                "tokenizer_fingerprint": ckpt.manifest["tokenizer_fingerprint"],
                "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
                          for n, d in files.items()}}
    files[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    tmp = None
    try:
        tmp = fileio.new_temp_dir(out.absolute().parent, prefix=f".{out.name}-")
        for name, data in files.items():
            fileio.write_new(tmp / name, data)
        fileio.publish_dir(tmp, out, replace=out.exists())
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise LmcoreError(write_failed(f"the export {out}", e, f"checkpoint {ckpt.path} is untouched",
                                       "export again", out.absolute().parent)) from None
    return {"export": str(out), "checkpoint": str(ckpt.path), "fingerprint":
            hashlib.sha256(files[MANIFEST]).hexdigest(), "weights_sha256": ckpt.model_sha256}


def _config_json(ckpt: Checkpoint, tok) -> bytes:
    arch = ckpt.manifest["architecture"]
    config = {"model_type": "lmcore-lstm", "architectures": ["LSTMLM"], "vocab_size": arch["vocab_size"],
              "hidden_size": arch["hidden_dim"], "embedding_size": arch["embedding_dim"],
              "num_hidden_layers": arch["num_layers"], "tie_word_embeddings": arch["tie_weights"],
              "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
              "unk_token_id": tok.unk_id,
              "lmcore": {"version": __version__, "architecture": arch, "weights_sha256": ckpt.model_sha256,
                         "tokenizer_fingerprint": tok.fingerprint, "step": ckpt.step}}
    return (json.dumps(config, indent=2) + "\n").encode()


def model_card(ckpt: Checkpoint) -> str:
    """README.md: what the model is, what it was trained on, how it was evaluated, what it scored."""
    arch, tok = ckpt.manifest["architecture"], ckpt.tokenizer()
    cfg = yaml.safe_load(ckpt.files.get("config.yaml", b"").decode("utf-8") or "{}") or {}
    data = cfg.get("data", {})
    source = data.get("source", "?")
    imdb = "imdb" in str(source).lower()
    head = ["---", "library_name: lmcore", "language: en", "tags: [lstm, language-model, lmcore]",
            *(["datasets: [imdb]"] if imdb else []), "---", ""]
    body = [
        f"# LSTM language model ({arch['embedding_dim']}-dim embedding, {arch['num_layers']} x "
        f"{arch['hidden_dim']} LSTM, {arch['softmax']} softmax over {arch['vocab_size']:,} words)", "",
        f"Trained with lmcore {__version__}, step {ckpt.step}.", "",
        "## Training data", "",
        f"`data.source: {source}`, split `{data.get('train_split', 'train')}`; reviews cut to "
        f"{data.get('truncate', 256)} words; batching `{data.get('batching', 'padded')}`.", "",
        "## Vocabulary", "",
        f"The notebook's tokenizer: lowercase, split on whitespace, words seen at least "
        f"{tok.min_count} times, plus `<unk> <pad> <bos> <eos>` (ids 0-3); {len(tok):,} entries, "
        f"fingerprint `{tok.fingerprint}` (`tokenizer.json`).", "",
        "## Evaluation protocol", "",
        "Masked perplexity: each review scored on its own as `<bos>` + its first 256 words + `<eos>`; the "
        "targets are the words and the `<eos>`, never padding; perplexity = exp(total NLL / number of "
        "targets).", "",
        "## Measured figures", "", *_figures(ckpt, data), "",
        "## Use", "",
        "```bash", "lmcore eval --checkpoint THIS_FOLDER data.source=...", "lmcore generate --checkpoint "
        "THIS_FOLDER --prompt \"the movie was\"", "```", "",
        "```python", "from lmcore.model import LSTMLM", "from lmcore.data.tokenizer import WordTokenizer",
        "model = LSTMLM.from_pretrained(\"THIS_FOLDER\")",
        "tok = WordTokenizer.load(\"THIS_FOLDER/tokenizer.json\")", "```", "",
        f"Weights sha256 `{ckpt.model_sha256}`; check every file with `lmcore verify THIS_FOLDER`.", "",
    ]
    return "\n".join(head + body)


def _figures(ckpt: Checkpoint, data: dict[str, Any]) -> list[str]:
    rows = []
    for path in sorted(ckpt.path.glob("eval_*.json")):
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
            rows.append(f"| masked perplexity on `{res['split']}` (stride {res['stride']}, "
                        f"{res['num_targets']:,} targets) | {res['masked_ppl']:.2f} |")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    run = RunDir.of_checkpoint(ckpt.path)
    if run is not None and run.metrics.is_file():
        rows_ = read_metrics(run.metrics, tolerant=True)
        val = [r for r in rows_ if "val/ppl" in r and r["step"] <= ckpt.step]
        if val:
            where = f"`{data.get('val_split')}`, stride {data.get('val_stride')}"
            rows.append(f"| validation masked perplexity at step {val[-1]['step']} ({where}) | "
                        f"{val[-1]['val/ppl']:.2f} |")
    if not rows:
        return ["No evaluation was recorded with this checkpoint: `lmcore eval --checkpoint THIS_FOLDER`."]
    return ["| what | figure |", "| --- | --- |", *rows]
