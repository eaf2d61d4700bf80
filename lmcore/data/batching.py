"""Training batches with random access by (epoch, index): resuming is just an index.

Both modes shard the global batch over ranks by slicing, and derive the epoch's order
from (seed, epoch) alone, so the batch sequence does not depend on when a run stopped.

- padded: the notebook's rows, one review each: `<bos>` + up to `truncate` words + `<eos>`
  right after the last word, padded to the longest row of the batch; pad targets are
  ignored (-100).
- packed: reviews (`<bos>` words `<eos>`) joined into one stream per epoch, cut into
  `batch_size` parallel rows read in windows of `seq_len`; no padding. The target after
  each `<eos>` is the next review's `<bos>`, which is ignored: it carries no information,
  and so both modes score exactly the words and one `<eos>` per review.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmcore.config import DataConfig
from lmcore.data.cache import TokenizedSplit
from lmcore.data.tokenizer import WordTokenizer
from lmcore.errors import DataError

IGNORE = -100  # a target that is not scored (F.cross_entropy's ignore_index)


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE where not scored
    carries_state: bool  # packed windows continue the previous window's rows

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def review_rows(
    docs: list[np.ndarray], bos: int, eos: int, pad: int, truncate: int, pad_to: int = 0
) -> np.ndarray:
    """The notebook's row layout, fixed: `<bos>` words `<eos>` then padding."""
    cut = [d[:truncate] if truncate else d for d in docs]
    width = max(max((len(d) for d in cut), default=0) + 2, pad_to)
    rows = np.full((len(cut), width), pad, dtype=np.int64)
    rows[:, 0] = bos
    for r, d in enumerate(cut):
        rows[r, 1 : len(d) + 1] = d
        rows[r, len(d) + 1] = eos
    return rows


def rows_to_batch(rows: np.ndarray, pad: int) -> Batch:
    inputs = torch.from_numpy(rows[:, :-1].copy())
    targets = torch.from_numpy(rows[:, 1:].copy())
    targets[targets == pad] = IGNORE
    return Batch(inputs, targets, carries_state=False)


def _rank_slice(n: int, rank: int, world: int) -> slice:
    """Contiguous, near-equal shares of n rows; every rank gets at least one if n >= world."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


class PaddedBatches:
    def __init__(self, split: TokenizedSplit, batch_size: int, truncate: int, special: dict[str, int],
                 seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.split, self.batch_size, self.truncate = split, batch_size, truncate
        self.bos, self.eos, self.pad = special["bos"], special["eos"], special["pad"]
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.global_batch = batch_size * world
        n = len(split)
        full, tail = divmod(n, self.global_batch)
        # A tail too small to give every rank a row is dropped: DDP needs all ranks to step.
        self.steps_per_epoch = full + (1 if tail >= world else 0)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} reviews cannot fill one batch across {world} processes")
        self._epoch, self._order = -1, np.arange(n)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = len(self.split)
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._epoch = epoch
        return self._order

    def get(self, epoch: int, index: int) -> Batch:
        order = self._order_for(epoch)
        chunk = order[index * self.global_batch : (index + 1) * self.global_batch]
        mine = chunk[_rank_slice(len(chunk), self.rank, self.world)]
        docs = [self.split.doc(int(i)) for i in mine]
        return rows_to_batch(review_rows(docs, self.bos, self.eos, self.pad, self.truncate), self.pad)


class PackedBatches:
    def __init__(self, split: TokenizedSplit, batch_size: int, seq_len: int, truncate: int,
                 special: dict[str, int], seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        self.split, self.batch_size, self.seq_len, self.truncate = split, batch_size, seq_len, truncate
        self.bos, self.eos = special["bos"], special["eos"]
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        lengths = split.lengths()
        if truncate:
            lengths = np.minimum(lengths, truncate)
        total = int(lengths.sum() + 2 * len(lengths))  # the same every epoch
        self.row_len = total // (batch_size * world)
        self.steps_per_epoch = (self.row_len - 1) // seq_len
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{total} tokens cannot fill one window of {seq_len} for {batch_size * world} rows"
            )
        self._epoch, self._rows = -1, np.zeros((0, 0), dtype=np.int64)

    def _rows_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = len(self.split)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            pieces = []
            for i in order:
                d = self.split.doc(int(i))
                pieces.append(np.concatenate(([self.bos], d[: self.truncate] if self.truncate else d,
                                              [self.eos])))
            stream = np.concatenate(pieces).astype(np.int64)
            g = self.batch_size * self.world
            rows = stream[: g * self.row_len].reshape(g, self.row_len)
            lo = self.rank * self.batch_size
            self._rows = np.ascontiguousarray(rows[lo : lo + self.batch_size])
            self._epoch = epoch
        return self._rows

    def get(self, epoch: int, index: int) -> Batch:
        rows = self._rows_for(epoch)
        lo = index * self.seq_len
        inputs = torch.from_numpy(rows[:, lo : lo + self.seq_len].copy())
        targets = torch.from_numpy(rows[:, lo + 1 : lo + self.seq_len + 1].copy())
        targets[targets == self.bos] = IGNORE
        return Batch(inputs, targets, carries_state=index > 0)


def training_batches(cfg: DataConfig, split: TokenizedSplit, tok: WordTokenizer, batch_size: int, seed: int,
                     rank: int, world: int) -> PaddedBatches | PackedBatches:
    """This rank's training batches as data.batching says."""
    special = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    try:
        if cfg.batching == "packed":
            return PackedBatches(split, batch_size, cfg.seq_len, cfg.truncate, special, seed, rank, world)
        return PaddedBatches(split, batch_size, cfg.truncate, special, seed, rank, world)
    except ValueError as e:
        raise DataError(f"training data too small: {e}; use more data or a smaller batch") from None


def eval_batches(split: TokenizedSplit, batch_size: int, truncate: int) -> list[np.ndarray]:
    """Evaluation rows grouped by length (little padding), in an order fixed by the data alone,
    so every world size sees the same batches and sums them to the same figure."""
    lengths = split.lengths()
    if truncate:
        lengths = np.minimum(lengths, truncate)
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
