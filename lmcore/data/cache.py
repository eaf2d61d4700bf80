"""Tokenized corpora, cached on disk: encode once, then every run starts in seconds.

The cache key is a fingerprint of the data (its content) and of the tokenizer, so a
changed file or vocabulary never reuses stale ids. Entries are written to a temporary
folder and renamed into place, so concurrent builders (or a killed one) never leave a
half-written entry; under DDP the caller lets rank 0 build first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmcore.config import DataConfig
from lmcore.data.sources import read_texts, source_identity
from lmcore.data.tokenizer import WordTokenizer
from lmcore.fileio import fsync_dir

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


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    env = os.environ.get("LMCORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lmcore"


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join((f"v{CACHE_VERSION}", *parts)).encode()).hexdigest()[:24]


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    fsync_dir(final.parent)


def fit_tokenizer(cfg: DataConfig) -> WordTokenizer:
    """The tokenizer fit on the train split, from the cache when the data is unchanged."""
    ident = source_identity(cfg.source, cfg.train_split)
    entry = cache_root(cfg) / "tokenizers" / _key(ident, cfg.text_field, str(cfg.min_count))
    path = entry / "tokenizer.json"
    if path.is_file():
        from lmcore.errors import LmcoreError
        try:
            return WordTokenizer.load(path)
        except LmcoreError:
            shutil.rmtree(entry, ignore_errors=True)  # a damaged cache entry: rebuild
    texts = read_texts(cfg.source, cfg.train_split, cfg.text_field)
    tok = WordTokenizer.fit(texts, cfg.min_count)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    tok.save(tmp / "tokenizer.json")
    _publish(tmp, entry)
    return tok


def load_split(cfg: DataConfig, split: str, tok: WordTokenizer) -> TokenizedSplit:
    """Token ids of one split, encoded once and then read from the cache (memory-mapped)."""
    ident = source_identity(cfg.source, split)
    entry = cache_root(cfg) / "splits" / _key(ident, cfg.text_field, tok.fingerprint)
    if (entry / "offsets.npy").is_file():
        try:
            return TokenizedSplit(
                np.load(entry / "tokens.npy", mmap_mode="r", allow_pickle=False),
                np.load(entry / "offsets.npy", allow_pickle=False),
            )
        except (OSError, ValueError):
            shutil.rmtree(entry, ignore_errors=True)  # damaged entry: rebuild below
    tokens, offsets = tok.encode_many(read_texts(cfg.source, split, cfg.text_field))
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    for name, arr in (("tokens.npy", tokens), ("offsets.npy", offsets)):
        with open(tmp / name, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    _publish(tmp, entry)
    return TokenizedSplit(tokens, offsets)


def strided(split: TokenizedSplit, stride: int, limit: int = 0) -> TokenizedSplit:
    """Every `stride`-th document (0, stride, 2*stride, ...), at most `limit` of them."""
    idx = np.arange(0, len(split), stride)
    if limit:
        idx = idx[:limit]
    return split.subset(idx)
