"""Tokenized corpora, cached on disk: encode once, then every run starts in seconds.

The cache key is the split's identity (its content: lmcore.data.sources.Split) and the
tokenizer's fingerprint, so a changed file or vocabulary never reuses stale ids. Entries are
filled in a temporary folder and renamed into place, so concurrent builders (or a killed one)
never leave a half-written entry; under DDP the caller lets rank 0 build first.

`load_corpus` reads the training file at most once: on a cold cache the same texts fit the
tokenizer and are encoded; on a warm one only the file's checksum is computed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmcore import fileio
from lmcore.config import DataConfig
from lmcore.data.sources import Split
from lmcore.data.tokenizer import WordTokenizer
from lmcore.errors import DataError, LmcoreError, write_failed

CACHE_VERSION = 1


@dataclass
class TokenizedSplit:
    """A split as one flat id array; document i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, indices: np.ndarray) -> TokenizedSplit:
        docs = [self.doc(int(i)) for i in indices]
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(d) for d in docs])
        tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int32)
        return TokenizedSplit(tokens.astype(np.int32, copy=False), offsets)

    def __add__(self, other: TokenizedSplit) -> TokenizedSplit:
        """This split's documents, then the other's."""
        tokens = np.concatenate([self.tokens, other.tokens]).astype(np.int32, copy=False)
        offsets = np.concatenate([self.offsets[:-1], other.offsets + len(self.tokens)]).astype(np.int64)
        return TokenizedSplit(tokens, offsets)


@dataclass
class Corpus:
    tokenizer: WordTokenizer
    train: TokenizedSplit
    val: TokenizedSplit | None  # every val_stride-th review of val_split, at most val_limit


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    env = os.environ.get("LMCORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lmcore"


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join((f"v{CACHE_VERSION}", *parts)).encode()).hexdigest()[:24]


def _publish(cfg: DataConfig, entry: Path, files: dict[str, bytes]) -> None:
    """Write an entry's files into a temp folder and rename it into place; if another process
    won the race, keep theirs. A failed write removes what it made and says how to fix it."""
    root = cache_root(cfg)
    if root.exists() and not root.is_dir():
        raise DataError(f"the token cache {root} is a file, not a folder; set data.cache_dir (or "
                        "$LMCORE_CACHE) to a folder")
    tmp = None
    try:
        tmp = fileio.new_temp_dir(entry.parent)
        for name, data in files.items():
            fileio.write_new(tmp / name, data)
        fileio.publish_dir(tmp, entry)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(write_failed(f"the token cache in {root}", e, "nothing was cached",
                                     "run again (or set data.cache_dir, or $LMCORE_CACHE, to another folder)",
                                     root)) from None


def _tokenizer_entry(cfg: DataConfig, train: Split) -> Path:
    return cache_root(cfg) / "tokenizers" / _key(train.identity, cfg.text_field, str(cfg.min_count))


def _split_entry(cfg: DataConfig, split: Split, tok: WordTokenizer) -> Path:
    return cache_root(cfg) / "splits" / _key(split.identity, cfg.text_field, tok.fingerprint)


def cached_tokenizer(cfg: DataConfig, train: Split) -> WordTokenizer | None:
    path = _tokenizer_entry(cfg, train) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return WordTokenizer.load(path)
    except LmcoreError:
        shutil.rmtree(path.parent, ignore_errors=True)  # a damaged cache entry: rebuild
        return None


def fit_and_cache(cfg: DataConfig, train: Split, texts: list[str]) -> WordTokenizer:
    tok = WordTokenizer.fit(texts, cfg.min_count)
    _publish(cfg, _tokenizer_entry(cfg, train), {"tokenizer.json": tok.to_json().encode("utf-8")})
    return tok


def cached_split(cfg: DataConfig, split: Split, tok: WordTokenizer) -> TokenizedSplit | None:
    entry = _split_entry(cfg, split, tok)
    if not all((entry / name).is_file() for name in ("tokens.npy", "offsets.npy")):  # never open a FIFO
        return None
    try:
        return TokenizedSplit(np.load(entry / "tokens.npy", mmap_mode="r", allow_pickle=False),
                              np.load(entry / "offsets.npy", allow_pickle=False))
    except (OSError, ValueError):
        shutil.rmtree(entry, ignore_errors=True)  # damaged entry: rebuild
        return None


def encode_and_cache(cfg: DataConfig, split: Split, tok: WordTokenizer, texts: list[str]) -> TokenizedSplit:
    tokens, offsets = tok.encode_many(texts)
    files = {}
    for name, arr in (("tokens.npy", tokens), ("offsets.npy", offsets)):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        files[name] = buf.getvalue()
    _publish(cfg, _split_entry(cfg, split, tok), files)
    return TokenizedSplit(tokens, offsets)


def fit_tokenizer(cfg: DataConfig) -> WordTokenizer:
    """The tokenizer fit on the train split, from the cache when the data is unchanged."""
    train = Split(cfg.source, cfg.train_split, cfg.text_field)
    return cached_tokenizer(cfg, train) or fit_and_cache(cfg, train, train.texts())


def load_split(cfg: DataConfig, split: str | Split, tok: WordTokenizer) -> TokenizedSplit:
    """Token ids of one split, encoded once and then read from the cache (memory-mapped)."""
    if isinstance(split, str):
        split = Split(cfg.source, split, cfg.text_field)
    return cached_split(cfg, split, tok) or encode_and_cache(cfg, split, tok, split.texts())


HOLDOUT = "holdout"  # val_split: the reviews data.holdout_every keeps out of training


def load_corpus(cfg: DataConfig) -> Corpus:
    """The tokenizer, the training split and the validation reviews, each file read at most once."""
    train = Split(cfg.source, cfg.train_split, cfg.text_field)
    tok = cached_tokenizer(cfg, train)
    texts = None
    if tok is None:
        texts = train.texts()
        tok = fit_and_cache(cfg, train, texts)
    train_ids = cached_split(cfg, train, tok) or encode_and_cache(cfg, train, tok, texts or train.texts())
    held = None
    if cfg.holdout_every:  # every Nth training review, from 0: never trained on
        keep = np.arange(len(train_ids)) % cfg.holdout_every != 0
        held, train_ids = train_ids.subset(np.flatnonzero(~keep)), train_ids.subset(np.flatnonzero(keep))
    for name in cfg.extra_train_splits:  # more text to train on; the vocabulary stays train_split's
        train_ids = train_ids + load_split(cfg, name, tok)
    val = None
    if cfg.val_split:
        split = held if cfg.val_split == HOLDOUT else load_split(cfg, cfg.val_split, tok)
        val = strided(split, cfg.val_stride, cfg.val_limit)
    return Corpus(tok, train_ids, val)


def strided(split: TokenizedSplit, stride: int, limit: int = 0) -> TokenizedSplit:
    """Every `stride`-th document (0, stride, 2*stride, ...), at most `limit` of them."""
    idx = np.arange(0, len(split), stride)
    if limit:
        idx = idx[:limit]
    return split.subset(idx)
