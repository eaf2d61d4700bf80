"""The run configuration: typed dataclasses, loaded from YAML, overridden from the command line.

Defaults < the YAML file < overrides (`optim.lr=3e-4`). Every field says what it means
(`lmcore config --explain` lists them); lmcore/schema.py converts and checks the values, so a
typo or a value YAML misreads stops the job before any work, naming the file and line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from lmcore.errors import ConfigError
from lmcore.presets import config_path
from lmcore.schema import Reader, Value, read_yaml, set_path, setting, where_of


@dataclass
class RunConfig:
    dir: str = setting("runs/default", "run folder: checkpoints, metrics, the resolved config", nonempty=True)
    seed: int = setting(0, "seed of the initial weights, the data order and dropout", ge=0, lt=2**32)
    threads: int = setting(0, "torch intra-op threads per process; 0 = torch's default", ge=0, le=1024)
    collective_timeout_s: int = setting(300, "how long a rank waits for the others in a collective before "
                                             "it gives up (a dead node), seconds", gt=0,
                                         le=86400)


@dataclass
class DataConfig:
    source: str = setting("sample", "'sample' (built-in reviews), 'hub:NAME' (datasets.load_dataset), a "
                                    "folder of split files, an aclImdb folder, or a pattern with {split}",
                          nonempty=True)
    text_field: str = setting("text", "the field (JSONL) or column (CSV, Parquet) holding the text",
                              nonempty=True)
    train_split: str = setting("train", "split the tokenizer is fit on and training reads", nonempty=True)
    val_split: str = setting("test", "split validated on during training; 'holdout' = the training reviews "
                                     "holdout_every keeps out; '' = no validation")
    val_stride: int = setting(10, "validate on every Nth review of val_split", gt=0)
    val_limit: int = setting(0, "at most this many validation reviews; 0 = all the stride picks", ge=0)
    holdout_every: int = setting(0, "keep every Nth review of train_split (0, N, 2N, ...) out of training: "
                                    "a validation set that is not the test reviews; 0 = none", ge=0)
    extra_train_splits: list[str] = setting(help="more splits to train on (e.g. unsupervised); the "
                                                 "vocabulary is still fit on train_split alone",
                                            factory=list)
    min_count: int = setting(6, "vocabulary: words seen at least this often (the notebook's '> 5')", gt=0)
    truncate: int = setting(256, "words kept per review; 0 = keep all", ge=0)
    batching: Literal["padded", "packed"] = setting(
        "padded", "padded: one review per row (the notebook); packed: reviews joined into streams cut "
                  "into seq_len windows, no padding, LSTM state carried")
    seq_len: int = setting(256, "packed: window length (the state carries across windows)", gt=0)
    cache_dir: str = setting("", "token-id cache; '' = $LMCORE_CACHE or ~/.cache/lmcore")


@dataclass
class ModelConfig:
    embedding_dim: int = setting(300, "word embedding size", gt=0, le=65536)
    hidden_dim: int = setting(256, "LSTM hidden size", gt=0, le=65536)
    num_layers: int = setting(1, "LSTM layers", gt=0, le=64)
    dropout: float = setting(0.0, "dropout on embeddings, between layers and on the LSTM output",
                             ge=0.0, lt=1.0)
    tie_weights: bool = setting(False, "share embedding and output weights (through a projection if "
                                       "hidden_dim differs)")
    softmax: Literal["full", "adaptive"] = setting(
        "full", "full: the notebook's softmax over the whole vocabulary; adaptive: Grave et al.'s adaptive "
                "softmax over the frequency-ordered vocabulary (exact, normalised, far cheaper)")
    adaptive_cutoffs: list[int] = setting(help="adaptive: word ids where the softmax clusters start",
                                          factory=lambda: [2000, 10000], gt=0)
    adaptive_div: float = setting(4.0, "adaptive: each tail cluster's size divided by this", gt=1.0,
                                 le=64.0)


@dataclass
class OptimConfig:
    lr: float = setting(1e-3, "Adam's learning rate (the peak, with a schedule)", gt=0.0)
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam's betas, each in [0, 1)", ge=0.0, lt=1.0)
    eps: float = setting(1e-8, "Adam's epsilon", gt=0.0)
    weight_decay: float = setting(0.0, "Adam's (L2) weight decay", ge=0.0)
    schedule: Literal["constant", "cosine", "wsd"] = setting(
        "constant", "learning-rate schedule after the warmup; wsd: constant, then linear to the floor over "
                    "the horizon's last cooldown_fraction")
    warmup_steps: int = setting(0, "linear warmup steps", ge=0)
    min_lr_ratio: float = setting(0.1, "cosine, wsd: the floor as a fraction of lr", ge=0.0, le=1.0)
    cooldown_fraction: float = setting(0.2, "wsd: the last fraction of the horizon spent going down", gt=0.0,
                                       le=1.0)
    decay_steps: int = setting(0, "cosine, wsd: the horizon in steps; 0 = the run's total steps", ge=0)
    horizon: Literal["steps", "time"] = setting(
        "steps", "cosine, wsd: the horizon in steps (decay_steps), or train.max_train_seconds of training "
                 "time (any machine ends its budget at the floor; a resumed run is then not bit-identical)")
    grad_clip: float = setting(0.0, "max global gradient norm; 0 = off (the notebook clips nothing)", ge=0.0)


@dataclass
class TrainConfig:
    batch_size: int = setting(32, "reviews (padded) or streams (packed) per process and micro-step", gt=0,
                             le=1_000_000)
    epochs: int = setting(10, "passes over the training data (when max_steps is 0)", ge=0)
    max_steps: int = setting(0, "optimizer steps; 0 = run the epochs", ge=0)
    max_train_seconds: float = setting(
        0.0, "end the run once this much training time is spent (train_seconds: steps only, kept across "
             "resumes; validation excluded); 0 = no limit", ge=0.0)
    grad_accum: int = setting(1, "micro-batches per optimizer step", gt=0, le=1024)
    mixed_precision: Literal["no", "bf16", "auto"] = setting(
        "no", "autocast precision of the matmuls; auto = bf16 on CUDA with bf16 and on CPUs where it is fast "
              "(AMX, AMD's AVX512_BF16), else no (a rule on the hardware; the run records what it used)")
    loss_chunk: int = setting(128, "rows per chunk of the fused projection + loss; 0 = plain PyTorch", ge=0)
    loss_precision: Literal["autocast", "auto", "fp32", "bf16", "fp16"] = setting(
        "autocast", "full softmax: the fused loss's three matmuls; autocast = mixed_precision's; auto = each "
                    "in the precision measured fastest at its shape on this CPU (cached, kept by the run)")
    log_interval: int = setting(20, "a metrics row (and a log line) every N steps", gt=0)
    eval_interval: int = setting(0, "validate every N steps; 0 = only at the end", ge=0)
    checkpoint_interval: int = setting(500, "save a checkpoint every N steps", gt=0)
    keep_checkpoints: int = setting(3, "how many of the latest checkpoints to keep", gt=0)
    keep_best: bool = setting(False, "also keep the checkpoint of the best validation (saved when it "
                                     "happens; RUN/best.json; checkpoint=best)")
    early_stop_patience: int = setting(0, "stop after this many validations without a better perplexity; "
                                          "0 = never", ge=0)
    resume: Literal["auto", "never"] = setting("auto", "auto: continue from run.dir's latest checkpoint; "
                                                       "never: refuse a run.dir that has checkpoints")
    nonfinite: Literal["error", "skip"] = setting("error", "a NaN/inf loss: stop naming the step, or skip "
                                                           "the update")


@dataclass
class EvalConfig:
    split: str = setting("test", "split to evaluate", nonempty=True)
    stride: int = setting(1, "every Nth review", gt=0)
    limit: int = setting(0, "at most N reviews; 0 = all", ge=0)
    batch_size: int = setting(64, "reviews per batch", gt=0, le=1_000_000)
    checkpoint: str = setting("", "a checkpoint or run folder; '' = the latest in run.dir; best = run.dir's "
                                  "best validation (train.keep_best); RUN/best = that run's")
    notebook_figure: bool = setting(True, "also the notebook's unmasked figure (pads counted; not a "
                                          "perplexity of the text)")
    precision: Literal["fp32", "bf16", "auto"] = setting(
        "fp32", "forward precision of eval and of validation during training (the softmax and the sums "
                "stay fp32); auto = bf16 where it is fast (AMX, AMD's AVX512_BF16, CUDA), bench/README.md "
                "'Lower precisions'")


@dataclass
class GenerateConfig:
    checkpoint: str = setting("", "a checkpoint or run folder; '' = the latest in run.dir; best = run.dir's "
                                  "best validation (train.keep_best); RUN/best = that run's")
    prompts: str = setting("", "JSONL ({\"id\", \"prompt\"} per line) or text file, one prompt per line")
    num_samples: int = setting(4, "unconditional samples from <bos> when no prompts file is given", ge=0,
                              le=10**9)
    samples_per_prompt: int = setting(1, "completions per prompt", gt=0, le=100_000)
    temperature: float = setting(1.0, "softmax temperature; 0 = greedy, else 0.001 to 1000 (float32 logits "
                                            "overflow beyond)", ge=0.0, le=1000.0)
    top_k: int = setting(0, "sample among the k most likely words; 0 = off", ge=0)
    top_p: float = setting(1.0, "nucleus sampling: the smallest set with this much probability",
                           gt=0.0, le=1.0)
    max_new_tokens: int = setting(50, "words generated per completion at most", ge=0, le=1_000_000)
    max_prompt_words: int = setting(10_000, "a longer prompt is a bad line (see bad_lines): the model reads "
                                            "every word of a prompt before it writes one", gt=0)
    seed: int = setting(0, "seed of every (prompt id, sample) random stream")
    batch_size: int = setting(256, "rows (prompt x sample) per batch, length-aware within a chunk", gt=0,
                             le=1_000_000)
    output_dir: str = setting("", "bulk mode: chunk files, the merged JSONL and its manifest go here")
    shard_index: int = setting(-1, "this shard; -1 = SLURM_ARRAY_TASK_ID's, else 0", ge=-1)
    num_shards: int = setting(0, "shards of the job; 0 = the SLURM array's size, else 1", ge=0)
    chunk_size: int = setting(1024, "prompts per atomically written output chunk", gt=0, le=10_000_000)
    bad_lines: Literal["error", "skip"] = setting("error", "a malformed prompt line: stop, or set it aside "
                                                           "in rejects.jsonl")
    precision: Literal["auto", "fp32", "bf16", "int8"] = setting(
        "auto", "matmul precision; int8: the output layer as an exact integer matmul (full softmax)")


@dataclass
class TrackingConfig:
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = setting(
        "auto", "auto: $WANDB_MODE, else online with an API key, else offline")
    project: str = setting("lmcore", "W&B project")
    entity: str = setting("", "W&B entity (team); '' = your default")
    group: str = setting("", "W&B group; '' = the SLURM array's job id for array tasks")
    tags: list[str] = setting(help="W&B tags", factory=list)
    name: str = setting("", "W&B run name; '' = the run folder's name")
    dir: str = setting("", "where wandb writes; '' = the run folder")


@dataclass
class Config:
    run: RunConfig = setting(help="", factory=RunConfig)
    data: DataConfig = setting(help="", factory=DataConfig)
    model: ModelConfig = setting(help="", factory=ModelConfig)
    optim: OptimConfig = setting(help="", factory=OptimConfig)
    train: TrainConfig = setting(help="", factory=TrainConfig)
    eval: EvalConfig = setting(help="", factory=EvalConfig)
    generate: GenerateConfig = setting(help="", factory=GenerateConfig)
    tracking: TrackingConfig = setting(help="", factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check(self, tree: Value) -> None:
        """What one field's range cannot say; `tree` tells where a value was given."""
        def fail(key: str, message: str) -> None:
            where = where_of(tree, key)
            raise ConfigError(f"config {message}{f' ({where})' if where else ''}")

        d = self.data
        if d.val_split == "holdout" and not d.holdout_every:
            fail("data.val_split", "data.val_split=holdout needs data.holdout_every > 0 (e.g. 25: every 25th "
                                   "training review)")
        if d.holdout_every == 1:
            fail("data.holdout_every", "data.holdout_every=1 would hold out every training review")
        if {d.train_split, d.val_split, self.eval.split} & set(d.extra_train_splits):
            fail("data.extra_train_splits", f"data.extra_train_splits {d.extra_train_splits} names the "
                                            "training, validation or evaluation split: never train on those")
        if self.train.epochs == 0 and self.train.max_steps == 0:
            fail("train.epochs", "train.epochs or train.max_steps must be above 0")
        o = self.optim
        if o.horizon == "time" and (o.schedule == "constant" or not self.train.max_train_seconds):
            fail("optim.horizon", "optim.horizon=time decays the rate over the time budget: it needs "
                                  "optim.schedule=cosine or wsd and train.max_train_seconds > 0")
        m = self.model
        if self.train.loss_precision != "autocast" and (m.softmax != "full" or not self.train.loss_chunk):
            fail("train.loss_precision", f"train.loss_precision={self.train.loss_precision} is the precision "
                                         "of the full softmax's fused loss: it needs model.softmax=full and "
                                         "train.loss_chunk > 0; else leave it at autocast")
        if m.softmax == "adaptive":
            if m.tie_weights:
                fail("model.tie_weights", "model.tie_weights needs model.softmax=full (the adaptive softmax "
                                          "has its own output weights)")
            if m.adaptive_cutoffs != sorted(set(m.adaptive_cutoffs)) or not m.adaptive_cutoffs:
                fail("model.adaptive_cutoffs", f"model.adaptive_cutoffs must be increasing positive ids; "
                                               f"got {m.adaptive_cutoffs}")
        if 0 < self.generate.temperature < 1e-3:
            fail("generate.temperature", f"generate.temperature={self.generate.temperature:g} divides the "
                                         "logits past float32's range; use 0 for greedy decoding, else at "
                                         "least 0.001")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


READER = Reader(lambda key: f"config {key}".rstrip(), lambda key: f"unknown config key '{key}'")


def parse_override(text: str) -> tuple[list[str], Value]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], the text '3e-4' to convert by the field's type)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=3e-4")
    return key.split("."), Value(raw, f"command line: {text}", text=True, override=True)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file (a path, or a built-in name: `lmcore configs`) < command-line overrides."""
    tree = read_yaml(config_path(str(path))) if path else Value({})
    for text in overrides or []:
        keys, value = parse_override(text)
        set_path(tree, keys, value, _not_a_section)
    return _finish(tree)


def config_from_dict(values: dict[str, Any]) -> Config:
    """A config from plain data (a job's dict, a checkpoint's config), checked as a file is."""
    return _finish(Value.of(values))


def _finish(tree: Value) -> Config:
    cfg = READER.build(Config, tree)
    cfg.check(tree)
    return cfg


def _not_a_section(key: str) -> None:
    raise ConfigError(f"config key '{key}' is a value, not a section")
