"""Typed run configuration: dataclasses, loaded from YAML, overridden with `a.b=value`.

Every section is a dataclass; unknown keys and wrong types are rejected with the valid
choices named, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmcore.errors import ConfigError


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run folder: checkpoints, metrics, resolved config
    seed: int = 0
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default


@dataclass
class DataConfig:
    # "sample" (built-in synthetic reviews), "hub:NAME" (datasets.load_dataset), or a local
    # path: a folder of split files, an aclImdb-style folder, or a pattern with "{split}".
    source: str = "sample"
    text_field: str = "text"
    train_split: str = "train"
    val_split: str = "test"
    val_stride: int = 10  # validate on every Nth review of val_split
    val_limit: int = 0  # at most this many validation reviews (0 = all picked by the stride)
    min_count: int = 6  # vocabulary: words seen at least this often (the notebook's "> 5")
    truncate: int = 256  # words kept per review (0 = keep all)
    batching: Literal["padded", "packed"] = "padded"
    seq_len: int = 256  # packed mode: window length; the recurrent state carries across
    cache_dir: str = ""  # token-id cache; "" = $LMCORE_CACHE or ~/.cache/lmcore


@dataclass
class ModelConfig:
    embedding_dim: int = 300
    hidden_dim: int = 256
    num_layers: int = 1
    dropout: float = 0.0
    tie_weights: bool = False  # share embedding and output weights (projects if sizes differ)
    # "full": the notebook's softmax over the whole vocabulary. "adaptive": Grave et al.'s
    # adaptive softmax over the frequency-ordered vocabulary (exact, normalised, far cheaper).
    softmax: Literal["full", "adaptive"] = "full"
    adaptive_cutoffs: list[int] = field(default_factory=lambda: [2000, 10000])
    adaptive_div: float = 4.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    decay_steps: int = 0  # cosine horizon; 0 = the run's total steps
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the notebook clips nothing)


@dataclass
class TrainConfig:
    batch_size: int = 32  # reviews (padded) or streams (packed) per process and micro-step
    epochs: int = 10
    max_steps: int = 0  # optimizer steps; 0 = run the epochs
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16"] = "no"
    loss_chunk: int = 128  # rows per chunk of the fused projection + loss (0 = plain PyTorch)
    log_interval: int = 20
    eval_interval: int = 0  # validate every N steps (0 = only at the end)
    checkpoint_interval: int = 500
    keep_checkpoints: int = 3
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the run folder's latest
    nonfinite: Literal["error", "skip"] = "error"  # a NaN/inf loss: stop naming the step, or skip it


@dataclass
class EvalConfig:
    split: str = "test"
    stride: int = 1  # every Nth review
    limit: int = 0  # at most N reviews (0 = all)
    batch_size: int = 64
    checkpoint: str = ""  # a checkpoint folder; "" = the latest in run.dir
    notebook_figure: bool = True  # also the notebook's unmasked (pads counted) figure


@dataclass
class GenerateConfig:
    checkpoint: str = ""  # "" = the latest in run.dir
    prompts: str = ""  # JSONL ({"id", "prompt"}) or text file, one prompt per line
    num_samples: int = 4  # unconditional samples from <bos> when no prompts file is given
    samples_per_prompt: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    max_new_tokens: int = 50
    seed: int = 0
    batch_size: int = 256  # rows (prompt x sample) per batch, length-aware within a chunk
    output_dir: str = ""  # bulk mode: JSONL shards + merged file + manifest here
    shard_index: int = -1  # this shard (-1: from SLURM_ARRAY_TASK_ID, else 0)
    num_shards: int = 0  # 0: from the SLURM array size, else 1
    chunk_size: int = 1024  # prompts per atomically written output chunk
    bad_lines: Literal["error", "skip"] = "error"  # skip: bad prompt lines go to rejects.jsonl
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"  # int8: the output layer, see README


@dataclass
class TrackingConfig:
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: $WANDB_MODE, key
    project: str = "lmcore"
    entity: str = ""
    group: str = ""  # array tasks and pipeline stages share one
    tags: list[str] = field(default_factory=list)
    name: str = ""  # "" = the run folder's name
    dir: str = ""  # where wandb writes; "" = the run folder


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _fail_unknown(key: str, path: str, valid: list[str]) -> typing.NoReturn:
    where = f"'{path}'" if path else "the top level"
    hint = difflib.get_close_matches(key, valid, n=1)
    did_you_mean = f" (did you mean '{_join(path, hint[0])}'?)" if hint else ""
    raise ConfigError(
        f"unknown config key '{_join(path, key)}'{did_you_mean}; valid keys in {where}: "
        + ", ".join(valid)
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check value against the annotation tp, converting where YAML is ambiguous."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"config {name} must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # tracking.tags=a,b on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config {name} must be a list; got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config {name} must be a list of {len(args)} values; got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config {name} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config {name} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config {name} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config {name} must be a string; got {value!r}")
    raise ConfigError(f"config {name}: unsupported type {tp}")  # a programming error


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            _fail_unknown(str(key), path, names)
        tp = hints[key]
        name = _join(path, key)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{name}' must be a mapping; got {value!r}")
            kwargs[key] = _build(tp, value, name)
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], 3e-4), the value read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge(base: dict[str, Any], keys: list[str], value: Any) -> None:
    node = base
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def read_yaml(path: str | Path, what: str = "config file", error: type[Exception] = ConfigError,
              example: str = "a mapping of sections, e.g. 'optim: ...'") -> dict[str, Any]:
    """A YAML file that must hold a mapping; any problem is one `error` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{what} {path} is not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold {example}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < command-line overrides."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _merge(values, keys, value)
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def _non_finite(obj, path: str = ""):
    import math
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        name = _join(path, f.name)
        if dataclasses.is_dataclass(v):
            yield from _non_finite(v, name)
        elif isinstance(v, float) and not math.isfinite(v):
            yield name, v
        elif isinstance(v, tuple):
            for x in v:
                if isinstance(x, float) and not math.isfinite(x):
                    yield name, x


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    for name, v in _non_finite(cfg):
        raise ConfigError(f"config {name} must be a finite number; got {v}")
    positive = {
        "model.embedding_dim": cfg.model.embedding_dim,
        "model.hidden_dim": cfg.model.hidden_dim,
        "model.num_layers": cfg.model.num_layers,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.log_interval": cfg.train.log_interval,
        "train.checkpoint_interval": cfg.train.checkpoint_interval,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "data.seq_len": cfg.data.seq_len,
        "data.min_count": cfg.data.min_count,
        "data.val_stride": cfg.data.val_stride,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.stride": cfg.eval.stride,
        "generate.batch_size": cfg.generate.batch_size,
        "generate.chunk_size": cfg.generate.chunk_size,
        "generate.samples_per_prompt": cfg.generate.samples_per_prompt,
        "optim.lr": cfg.optim.lr,
    }
    for name, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config {name} must be > 0; got {v}")
    non_negative = {
        "train.epochs": cfg.train.epochs,
        "train.max_steps": cfg.train.max_steps,
        "train.loss_chunk": cfg.train.loss_chunk,
        "train.eval_interval": cfg.train.eval_interval,
        "data.truncate": cfg.data.truncate,
        "data.val_limit": cfg.data.val_limit,
        "eval.limit": cfg.eval.limit,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.decay_steps": cfg.optim.decay_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
        "optim.weight_decay": cfg.optim.weight_decay,
        "generate.max_new_tokens": cfg.generate.max_new_tokens,
        "generate.num_samples": cfg.generate.num_samples,
        "generate.num_shards": cfg.generate.num_shards,
        "run.threads": cfg.run.threads,
    }
    for name, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"config {name} must be >= 0; got {v}")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise ConfigError("config: set train.epochs or train.max_steps above 0")
    if cfg.model.softmax == "adaptive":
        if cfg.model.tie_weights:
            raise ConfigError("config model.tie_weights needs model.softmax=full (the adaptive softmax "
                              "has its own output weights)")
        cuts = cfg.model.adaptive_cutoffs
        if not cuts or any(c <= 0 for c in cuts) or cuts != sorted(set(cuts)):
            raise ConfigError(f"config model.adaptive_cutoffs must be increasing positive ids; got {cuts}")
        if cfg.model.adaptive_div <= 1.0:
            raise ConfigError(f"config model.adaptive_div must be > 1; got {cfg.model.adaptive_div}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"config model.dropout must be in [0, 1); got {cfg.model.dropout}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"config optim.min_lr_ratio must be in [0, 1]; got {cfg.optim.min_lr_ratio}")
    if cfg.generate.temperature < 0:
        raise ConfigError(
            f"config generate.temperature must be >= 0 (0 = greedy); got {cfg.generate.temperature}"
        )
    if cfg.generate.top_k < 0:
        raise ConfigError(f"config generate.top_k must be >= 0 (0 = off); got {cfg.generate.top_k}")
    if not 0.0 < cfg.generate.top_p <= 1.0:
        raise ConfigError(f"config generate.top_p must be in (0, 1]; got {cfg.generate.top_p}")


def save_config(cfg: Config, path: str | Path) -> None:
    from lmcore.fileio import atomic_write_text

    atomic_write_text(path, cfg.to_yaml())
