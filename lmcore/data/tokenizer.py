"""The notebook's word tokenizer: lowercase, split on whitespace, keep frequent words.

Differences from the notebook, on purpose: ids are ordered by frequency (most frequent
first, ties in first-seen order) with the four specials first, and words that spell a
special token map to that special. The vocabulary (the set of words) is the notebook's.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lmcore.errors import DataError, LmcoreError

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<bos>", "<eos>"
SPECIALS = (UNK, PAD, BOS, EOS)
FORMAT = "lmcore-word-tokenizer"
VERSION = 1


def split_words(text: str) -> list[str]:
    return text.lower().split()


class WordTokenizer:
    def __init__(self, words: list[str], counts: list[int] | None = None, min_count: int = 6):
        self.itos: list[str] = list(SPECIALS) + list(words)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise LmcoreError("tokenizer vocabulary holds duplicate words; refit the tokenizer")
        self.counts = list(counts) if counts is not None else []
        self.min_count = min_count
        self._fingerprint: str | None = None
        self.unk_id, self.pad_id, self.bos_id, self.eos_id = (self.stoi[s] for s in SPECIALS)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def fit(cls, texts: Iterable[str], min_count: int = 6) -> WordTokenizer:
        counter: Counter[str] = Counter()
        for text in texts:
            counter.update(split_words(text))
        for s in SPECIALS:
            counter.pop(s, None)
        # sorted() is stable and Counter keeps first-seen order, so ties stay in that order.
        kept = sorted(((w, c) for w, c in counter.items() if c >= min_count), key=lambda x: -x[1])
        if not kept:  # a model over <unk> and three specials alone learns nothing
            if not counter:
                raise DataError("the training texts hold no words (every one is empty or blank); check "
                                "data.source and data.text_field")
            word, count = counter.most_common(1)[0]
            raise DataError(
                f"no word occurs data.min_count={min_count} times in the training texts, so the "
                f"vocabulary would be empty (the most frequent, {word[:40]!r}, occurs {count} "
                f"time{'s' if count != 1 else ''}); lower data.min_count to at most {count}"
            )
        return cls([w for w, _ in kept], [c for _, c in kept], min_count)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def fingerprint(self) -> str:
        """Identifies the vocabulary (words, ids, min_count); computed once (the words never change)."""
        if self._fingerprint is None:
            payload = json.dumps({"v": VERSION, "min_count": self.min_count, "itos": self.itos})
            self._fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        get, unk = self.stoi.get, self.unk_id
        return [get(w, unk) for w in split_words(text)]

    def encode_many(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts as one flat int32 array plus offsets (len = n + 1)."""
        get, unk = self.stoi.get, self.unk_id
        flat: list[int] = []
        offsets = [0]
        for text in texts:
            flat.extend(get(w, unk) for w in split_words(text))
            offsets.append(len(flat))
        return np.asarray(flat, dtype=np.int32), np.asarray(offsets, dtype=np.int64)

    def decode(self, ids: Iterable[int], skip_specials: bool = True) -> str:
        words = (self.itos[i] for i in ids)
        if skip_specials:
            words = (w for w in words if w not in (PAD, BOS, EOS))
        return " ".join(words)

    # -- files ----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "lowercase": True,
                "split": "whitespace",
                "min_count": self.min_count,
                "specials": list(SPECIALS),
                "words": self.itos[len(SPECIALS) :],
                "counts": self.counts,
                "fingerprint": self.fingerprint,
            },
            ensure_ascii=False,
        )

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        path = Path(path)
        if not path.is_file():
            raise LmcoreError(
                f"tokenizer file {path} is missing; point to a run or checkpoint folder that holds "
                "tokenizer.json, or train first to create one"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LmcoreError(f"tokenizer file {path} cannot be read ({e}); restore it from the checkpoint "
                              "folder or retrain") from None
        return cls.from_json(text, str(path))

    @classmethod
    def from_json(cls, text: str, path: str = "tokenizer.json") -> WordTokenizer:
        """A tokenizer from its JSON text; any damage is one LmcoreError naming path."""
        try:
            obj = json.loads(text)
            if obj.get("format") != FORMAT or obj.get("version") != VERSION:
                raise ValueError("not an lmcore tokenizer file")
            if tuple(obj["specials"]) != SPECIALS:
                raise ValueError("unexpected special tokens")
            tok = cls(obj["words"], obj.get("counts"), int(obj["min_count"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LmcoreError(
                f"tokenizer file {path} is damaged or not an lmcore tokenizer ({e}); "
                "restore it from the checkpoint folder or retrain"
            ) from None
        if obj.get("fingerprint") != tok.fingerprint:
            raise LmcoreError(
                f"tokenizer file {path} fails its fingerprint check (edited or corrupted); "
                "restore it from the checkpoint folder or retrain"
            )
        return tok
